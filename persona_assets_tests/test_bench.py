"""`persona bench` end to end on a tiny data set: every figure the docs table needs is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pytest

from persona_assets.bench import SCALES, report_markdown, resample_people, write_docs

# Slow: runs whole processes (make test runs it; make test-fast leaves it out).
pytestmark = pytest.mark.slow


def test_bench_measures_every_stage_the_refresh_lookups_and_linkage(tmp_path):
    work = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "persona_assets.cli",
        "bench",
        "--events",
        "6400",
        "--no-stream",
        "--refresh-share",
        "0.05",
        "--link-records",
        "3000",
        "--engine",
        "spark",
        # The one Spark stage whose figure is set beside another DuckDB stage; every Spark stage's
        # rows are held to DuckDB's by the differential tests, and all of them run on the cluster.
        "--spark-stages",
        "scores",
        "--segment-people",
        "150,400",
        "--workdir",
        str(work),
    ]
    env = {**os.environ, "PERSONA_HOME": str(tmp_path)}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    results = json.loads(next(work.glob("bench-*.json")).read_text())
    stages = results["stages"]
    assert list(stages) == [
        "ingest",
        "identity",
        "cleaning",
        "features",
        "segments",
        "imputation",
        "profiles",
        "serving",
    ]
    for name, stage in stages.items():
        assert stage["seconds"] > 0 and stage["peak_gb"] > 0, name
        assert stage["rows_out"] > 0, name
    assert stages["identity"]["rows_in"] == stages["ingest"]["rows_out"]  # events in, people out
    assert stages["identity"]["rows_out"] == stages["profiles"]["rows_out"] == results["people"]
    assert results["full_build_ratio_to_floor"] > 1
    refresh = results["refresh"]
    assert refresh["new_events"] > 0 and 0 < refresh["share_of_full_build"] < 1
    assert 0 < results["lookup"]["p50_ms"] <= results["lookup"]["p99_ms"]
    assert results["linkage"]["link_records"] == 3000 and results["linkage"]["link_f1"] > 0.9
    # --engine spark --spark-stages scores: that Spark stage on the same inputs, beside DuckDB's.
    assert list(results["spark"]["stages"]) == ["scores"]
    scores = results["spark"]["stages"]["scores"]  # DuckDB has no scores stage: set beside its profiles stage
    assert scores["rows_out"]["category_scores"] > 0 and scores["duckdb_stage"] == "profiles"
    assert scores["ratio_to_duckdb"] == pytest.approx(scores["seconds"] / stages["profiles"]["seconds"], rel=0.05)
    assert scores["seconds"] > 0 and scores["session_seconds"] > 0 and scores["peak_gb"] > 0
    assert "- On Spark (local[*]" in report_markdown(results)
    assert "DuckDB's profiles stage (scores and profiles together)" in report_markdown(results)
    # The person-level stages on resampled people, at each count asked for.
    scaling = results["people_scaling"]
    assert [row["people"] for row in scaling] == [150, 400]
    for row in scaling:
        for stage in ("features", "segments", "imputation", "profiles", "serving"):
            assert row[stage]["seconds"] > 0 and row[stage]["peak_gb"] > 0, (row["people"], stage)
    assert "- Person-level stages on 400 resampled people (no events of their own): features" in report_markdown(
        results
    )
    # Nothing of the built warehouse is left behind: no warehouse, no snapshot, no spare of it.
    assert not [p.name for p in work.iterdir() if ".duckdb" in p.name]

    # The docs page: one section per scale run, each with its stage table.
    docs = tmp_path / "docs"
    (docs / "benchmarks").mkdir(parents=True)
    (docs / "benchmarks" / "small.json").write_text(json.dumps({**results, "scale": "small"}))
    write_docs(docs)
    page = (docs / "benchmarks.md").read_text()
    assert "### small:" in page and "| imputation |" in page and "| **full build** |" in page
    assert "goal (20m)" in report_markdown({**results, "scale": "20m"})
    assert set(SCALES) == {"small", "1m", "20m"}


def test_resampled_people_have_both_person_rows_under_new_ids(tmp_path):
    warehouse = tmp_path / "w.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute("CREATE TABLE deduped_users AS SELECT 'p' || i AS person_id, i AS age FROM range(3) t(i)")
        con.execute("CREATE TABLE cleaned_users AS SELECT person_id, age * 10 AS score FROM deduped_users")
    assert resample_people(warehouse, 7) == 7
    with duckdb.connect(str(warehouse)) as con:
        deduped = con.execute("SELECT person_id, age FROM deduped_users ORDER BY 1").fetchall()
        cleaned = con.execute("SELECT person_id, score FROM cleaned_users ORDER BY 1").fetchall()
        columns = [c for (c,) in con.execute("SELECT name FROM pragma_table_info('cleaned_users')").fetchall()]
    assert len({p for p, _ in deduped}) == 7 and [p for p, _ in deduped] == [p for p, _ in cleaned]
    assert all(score == 10 * age for (_, age), (_, score) in zip(deduped, cleaned)), "one person's rows agree"
    assert columns == ["person_id", "score"], "no column of the resampling's own"
    assert {age for _, age in deduped} == {0, 1, 2}
    assert resample_people(warehouse, 2) == 2  # and shrinks
