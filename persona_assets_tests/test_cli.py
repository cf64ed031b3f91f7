import json
import os
import subprocess
import sys

import pandas as pd
import pytest


def persona(*args, env_home, check=True):
    env = {**os.environ, "PERSONA_HOME": str(env_home)}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_demo_twice_counts_no_event_twice_and_query_answers(persona_home):
    first = persona("demo", "--people", "300", env_home=persona_home)
    assert "Events kept:" in first.stdout and "persona query" in first.stdout
    second = persona("demo", "--people", "300", env_home=persona_home)
    assert "already in" in second.stdout
    assert "No new files in landing; profiles unchanged." in second.stdout
    assert "persona sql" in first.stdout and "duckdb -readonly" not in first.stdout

    def kept(out):
        return next(line for line in out.splitlines() if line.startswith("Events kept:"))

    assert kept(first.stdout) == kept(second.stdout)
    truth = json.loads((persona_home / "landing_truth" / "counts.json").read_text())
    assert kept(first.stdout).split()[-1] == str(truth["events"])
    out = persona("query", "SELECT count(*) AS n FROM raw_events", "--format", "json", env_home=persona_home).stdout
    assert json.loads(out) == [{"n": truth["events"]}]
    assert "Segments:" in first.stdout

    # A retrain on request makes model version 2; people keep their ids where segments held.
    def rows(sql: str) -> list[dict]:
        out = persona("query", sql, "--format", "json", "--max-rows", "100000", env_home=persona_home).stdout
        return json.loads(out)

    before = rows("SELECT person_id, segment_id FROM segments ORDER BY 1")
    retrained = persona("retrain", env_home=persona_home)
    assert "Segments:" in retrained.stdout
    assert rows("SELECT DISTINCT model_version AS v FROM segments") == [{"v": 2}]
    after = rows("SELECT person_id, segment_id FROM segments ORDER BY 1")
    same = {r["person_id"]: r["segment_id"] for r in before}
    kept = sum(same[r["person_id"]] == r["segment_id"] for r in after) / len(same)
    assert kept >= 0.95
    # One profile, found by an email written differently from how it was sent.
    people = pd.read_parquet(persona_home / "landing_truth" / "people.parquet")
    email = people[people.email.notna() & ~people.is_bot].email.iloc[0]
    shown = persona("profile", f" {email.upper()} ", env_home=persona_home).stdout
    assert "age_bracket_source" in shown and "next_question" in shown and email not in shown
    missing = persona("profile", "nobody@example.org", env_home=persona_home, check=False)
    assert missing.returncode == 1 and "no profile" in missing.stderr
    # The demo's runs are recorded in the project-local DAGSTER_HOME the UI reads.
    assert (persona_home / "dagster" / "dagster.yaml").read_text().count("enabled: false") == 2


def test_query_without_a_snapshot_says_what_to_do(persona_home):
    proc = persona("query", "SELECT 1", env_home=persona_home, check=False)
    assert proc.returncode == 2 and "make demo" in proc.stderr


@pytest.mark.slow
def test_query_reports_sql_errors_plainly(persona_home, generated):
    persona("generate", "--people", "50", "--seed", "3", env_home=persona_home)
    persona("run", env_home=persona_home)
    proc = persona("query", "SELECT nope FROM raw_events", env_home=persona_home, check=False)
    assert proc.returncode == 2 and "query failed" in proc.stderr
    csv = persona("query", "SELECT event_type FROM raw_events LIMIT 1", "--format", "csv", env_home=persona_home)
    assert csv.stdout.splitlines()[0] == "event_type"
