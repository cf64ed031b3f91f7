"""Category scores on Spark against DuckDB: profiles' event-scale part, written once, gives the
same category_scores on both engines, and profiles built from Spark's scores are the profiles
DuckDB builds itself.

Generated people plus what the generator does not make: a GA4 export (another vocabulary, read
through the `ga4` mapping) and Segment events with views and adds without a category, product
lists holding items that are not objects, a category that is a number or an object, events
from the 1970s and 1990s, a tie between two categories. The chain is built on DuckDB (ingest,
identity, cleaning, features, segments, imputation, profiles); raw_events, identity_map and
cleaned_users go to Parquet and `profiles.category_scores_on_spark` scores them on Spark.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import duckdb
import numpy as np
import pytest
import sqlglot

from persona_assets.core import cleaning, features, imputation, profiles, segments
from persona_assets.core.engine import SparkTables
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import IngestOptions, ingest
from persona_assets.core.mappings import parse_mappings
from persona_assets.core.models import ModelStore
from persona_assets.datagen import generate
from persona_assets.settings import shipped_enrichment
from persona_assets_tests.test_spark import _read_parquet, assert_same_table

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-stages")]  # one worker, its Spark session (conftest)

PEOPLE = 150
SEED = 11
# Old events are kept (the default refuses events before 2000 as absurd).
INGEST = IngestOptions(
    mappings=parse_mappings([{"files": "ga4*.jsonl", "preset": "ga4"}]), min_event_at=datetime(1970, 1, 1)
)


def _segment(message_id: str, at: str, user: str, event: str, **properties) -> dict:
    return {
        "messageId": message_id,
        "type": "track",
        "userId": user,
        "timestamp": at,
        "event": event,
        "properties": properties,
    }


def _edge_events(landing) -> None:
    """What the generator does not make, in Segment's names and in GA4's."""
    mixed = [
        {"product_id": "p1", "category": "books"},
        7,
        "text",
        None,
        {"product_id": "p2"},
        {"category": 12},
        {"category": {"shelf": "top"}},
        {"category": "Café"},
    ]
    segment = [
        _segment("e-nocat-1", "2026-05-01T10:00:00Z", "edge-nocat", "Product Viewed", product_id="p9"),
        _segment("e-nocat-2", "2026-05-01T10:01:00Z", "edge-nocat", "Product Added", product_id="p9"),
        _segment("e-mixed", "2026-05-02T08:00:00.250Z", "edge-mixed", "Order Completed", revenue=20, products=mixed),
        _segment("e-empty", "2026-05-02T09:00:00Z", "edge-mixed", "Order Completed", revenue=5, products=[]),
        _segment("e-old-1", "1975-05-01T12:00:00Z", "edge-old", "Product Viewed", category="antiques"),
        _segment(
            "e-old-2",
            "1999-12-31T23:59:59.999Z",
            "edge-old",
            "Order Completed",
            revenue=1,
            products=[{"product_id": "p3", "category": "antiques"}],
        ),
        _segment("e-tie-a", "2026-05-03T10:00:00Z", "edge-tie", "Product Viewed", category="b-cat"),
        _segment("e-tie-b", "2026-05-03T10:00:00Z", "edge-tie", "Product Viewed", category="a-cat"),
    ]
    (landing / "edges.jsonl").write_text("".join(json.dumps(e) + "\n" for e in segment))
    at = lambda day: str(int(datetime(2026, 5, day, 12).timestamp() * 1_000_000))  # noqa: E731
    items = [
        {"item_id": "S1", "item_category": "Garden"},
        {"item_id": "S2"},
        {"item_id": "S3", "item_category": "Tools"},
    ]
    ga4 = [
        {"event_name": "view_item", "event_timestamp": at(1), "user_pseudo_id": "ga-1"},
        {
            "event_name": "view_item",
            "event_timestamp": at(2),
            "user_pseudo_id": "ga-1",
            "items": [{"item_id": "S1", "item_category": "Garden"}],
        },
        {"event_name": "add_to_cart", "event_timestamp": at(3), "user_pseudo_id": "ga-1", "items": [{"item_id": "S2"}]},
        {
            "event_name": "purchase",
            "event_timestamp": at(4),
            "user_pseudo_id": "ga-1",
            "items": items,
            "ecommerce": {"transaction_id": "T-1", "purchase_revenue": 30},
        },
        {
            "event_name": "purchase",
            "event_timestamp": "631152000000000",
            "user_pseudo_id": "ga-2",  # 1990-01-01
            "items": [{"item_id": "S4", "item_category": "Garden"}],
            "ecommerce": {"transaction_id": "T-2"},
        },
    ]
    (landing / "ga4_export.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ga4))


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """The chain on DuckDB, its category scores on Spark: (DuckDB connection, Parquet folder, seconds)."""
    root = tmp_path_factory.mktemp("spark-profiles")
    generate(PEOPLE, SEED, root / "landing", "jsonl", people_per_file=PEOPLE)
    _edge_events(root / "landing")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    store = ModelStore(root / "models")
    ingest(con, root / "landing", b"k", INGEST)
    resolve(con, IdentityOptions(linkage=False), full=True)
    cleaning.clean(con, full=True)
    features.build(con, store, features.FeatureOptions())
    segments.build(con, store, segments.SegmentOptions())
    imputation.impute(con, store, imputation.ImputationOptions(enrichment_path=str(shipped_enrichment())))
    started = time.perf_counter()
    profiles.build(con, full=True)
    seconds = {"duckdb profiles": time.perf_counter() - started}
    warehouse = root / "parquet"
    for table in profiles.SPARK_INPUTS:
        (warehouse / table).mkdir(parents=True)
        con.execute(f"COPY {table} TO '{warehouse / table / 'part-0.parquet'}' (FORMAT parquet)")
    started = time.perf_counter()
    rows = profiles.category_scores_on_spark(spark, warehouse)
    seconds["spark scores"] = time.perf_counter() - started
    print(f"category scores at {PEOPLE} people: {seconds}")
    yield con, warehouse, rows
    con.close()


def _person(con, identifier: str) -> str:
    return con.execute("SELECT person_id FROM identity_map WHERE identifier = ?", [identifier]).fetchall()[0][0]


def assert_same_scores(duck, spark) -> None:
    """Same people, columns and types, top categories and times; each map's categories the same and
    its scores equal to 1e-9."""
    assert_same_table(duck.drop(columns="scores"), spark.drop(columns="scores"), "person_id")
    duck, spark = duck.set_index("person_id").scores, spark.set_index("person_id").scores
    for person, scores in duck.items():
        got = spark[person]
        assert sorted(got) == sorted(scores), person
        assert np.allclose([got[c] for c in scores], list(scores.values()), rtol=0, atol=1e-9), person


def test_category_scores_on_spark_are_duckdbs(built):
    con, warehouse, rows = built
    duck = con.execute("SELECT * FROM category_scores").df()
    on_spark = _read_parquet(warehouse / "category_scores")
    assert rows == len(duck) == len(on_spark) > PEOPLE / 2
    assert_same_scores(duck, on_spark)
    # The same time on both: the newest event, which the profiles build carries scores forward from.
    newest = con.execute("SELECT max(event_at) FROM raw_events").fetchall()[0][0]
    assert set(on_spark.scored_at) == {newest}


def test_the_edge_events_reach_the_branches(built):
    """The comparison means something only if the hand-written events were scored as intended."""
    con, warehouse, _ = built
    scores = _read_parquet(warehouse / "category_scores").set_index("person_id")
    mixed = scores.loc[_person(con, "edge-mixed")]
    assert sorted(mixed.scores) == ["12", "Café", "books", '{"shelf":"top"}']  # items that are not objects skipped
    assert _person(con, "edge-nocat") not in scores.index  # views and adds without a category score nothing
    old = scores.loc[_person(con, "edge-old")].scores
    assert 0 < old["antiques"] < 1e-90  # decayed over decades (2^-321 of a purchase), still there
    assert scores.loc[_person(con, "edge-tie")].top_category == "b-cat"  # a tie goes to the later name
    ga4 = scores.loc[_person(con, "ga-1")].scores
    assert sorted(ga4) == ["Garden", "Tools"] and ga4["Garden"] > ga4["Tools"]  # a view and a purchase


def test_profiles_built_from_given_scores_are_the_same(built):
    con, warehouse, _ = built
    before = con.execute("SELECT * EXCLUDE (updated_at) FROM user_profiles").df()
    con.execute(
        f"CREATE OR REPLACE TABLE spark_scores AS SELECT * FROM read_parquet('{warehouse / 'category_scores'}/*.parquet')"
    )
    result = profiles.build(con, scores="spark_scores")
    assert result.mode == "full" and "given" in result.why
    after = con.execute("SELECT * EXCLUDE (updated_at) FROM user_profiles").df()
    assert_same_table(before, after, "person_id")
    assert_same_scores(
        con.execute("SELECT * FROM spark_scores").df(), con.execute("SELECT * FROM category_scores").df()
    )
    # Then an incremental run works from them as from its own.
    assert profiles.build(con).mode == "incremental"


# The compile rules category scores needed, on values where SQLGlot's own translation fails or differs.
ITEMS = """SELECT item.category AS v FROM (SELECT unnest(from_json($p, '[{"category": "VARCHAR"}]')) AS item)
WHERE item.category IS NOT NULL ORDER BY v"""
VALID = "SELECT json_valid($p) AND NOT json_valid('[1, 2') AND json_valid(NULL) IS NULL AS v"


@pytest.mark.parametrize(
    "sql, p",
    [(ITEMS, '[1, "x", {"category": "a"}, null, {"category": 5}, {"category": {"k": [1]}}]'), (VALID, "[1, 2]")],
    ids=["from_json reads a list item by item", "json_valid"],
)
def test_each_json_rule_gives_duckdbs_answer(spark, tmp_path, sql, p):
    with duckdb.connect() as con:
        expected = con.execute(sql, {"p": p}).fetchall()
    got = [tuple(row) for row in SparkTables(spark, tmp_path).query(sql, {"p": p}).collect()]
    assert got == expected and expected
    plain = sqlglot.transpile(sql, read="duckdb", write="spark")[0]
    with pytest.raises(Exception, match="PARSE_SYNTAX_ERROR|UNRESOLVED_ROUTINE"):  # Spark refuses SQLGlot's own
        spark.sql(plain, args={"p": p}).collect()
    if sql == ITEMS:  # and Spark's own reading of the list as a whole loses the objects in it
        whole = "SELECT explode(from_json(:p, 'array<struct<category:string>>')) AS item"
        assert spark.sql(whole, args={"p": p}).collect() == []


def test_the_scores_stage_is_in_the_spark_application():
    from persona_assets.core.engine import SPARK_STAGES
    from persona_assets.spark_job import INPUTS, OUTPUTS, STAGES

    assert list(STAGES).index("scores") > list(STAGES).index("cleaning")
    assert INPUTS["scores"] == profiles.SPARK_INPUTS and OUTPUTS["scores"] == ("category_scores",)
    assert "category scores" in SPARK_STAGES
