"""The first hour with Persona (issue 22): the everyday commands start fast, `persona query` and
`persona sql` can read the snapshot and nothing else, and every mistake a new user makes ends
in one line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("dagster", "sklearn", "lightgbm", "pandas")


def persona(*args, home: Path, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PERSONA_HOME": str(home), **(env or {})}
    environ.pop("DAGSTER_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", *args],
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line_error(proc: subprocess.CompletedProcess, *words: str, code: int | None = None) -> str:
    """The command failed with one line on stderr holding `words`, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    if code is not None:
        assert proc.returncode == code
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PERSONA_HOME after `persona generate --people 120` and one `persona run`."""
    home = tmp_path_factory.mktemp("first-hour") / "persona"
    assert persona("generate", "--people", "120", "--seed", "5", home=home).returncode == 0
    run = persona("run", home=home)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "This run: 1 new files" in run.stdout
    return home


def imported(proc: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages a `python -X importtime` run imported."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", proc.stderr, re.M)}


@pytest.mark.parametrize(
    "args",
    [
        ["query", "SELECT count(*) FROM user_profiles"],
        ["profile", "nobody@example.org"],
        ["failures"],
        ["sql"],
        ["--help"],
    ],
)
def test_commands_that_read_the_snapshot_import_no_dagster_or_models(built, args):
    env = {**os.environ, "PERSONA_HOME": str(built)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "persona_assets.cli", *args],
        env=env,
        input="SELECT 1;",
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = imported(proc)
    assert "duckdb" in modules or args == ["--help"]
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_the_light_person_id_pattern_is_the_contracts_one():
    from persona_assets.contracts import PERSON_ID
    from persona_assets.core import publish

    assert publish.PERSON_ID == PERSON_ID


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH '{home}/warehouse.duckdb' AS w",
        "SELECT count(*) FROM identity_pii",
        "COPY user_profiles TO '{home}/leak.csv'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SET enable_external_access = true",
        "SET memory_limit = '100GB'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE mine AS SELECT 1",
        "DROP TABLE user_profiles",
    ],
)
def test_query_reads_the_snapshot_and_nothing_else(built, sql):
    proc = persona("query", sql.format(home=built), home=built)
    one_line_error(proc, "persona:", code=2)
    assert not (built / "leak.csv").exists()
    assert persona("query", "SELECT count(*) AS n FROM user_profiles", "--format", "json", home=built).returncode == 0


def test_refusals_say_they_are_refusals(built):
    for sql in (
        f"ATTACH '{built}/warehouse.duckdb' AS w",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SET enable_external_access = true",
        "LOAD httpfs",
    ):
        assert "refused" in one_line_error(persona("query", sql, home=built))


def test_several_statements_print_each_result_or_are_refused(built):
    proc = persona("query", "SELECT 41 AS first; SELECT 42 AS second", home=built)
    assert proc.returncode == 0, proc.stderr
    assert "41" in proc.stdout and "42" in proc.stdout and "first" in proc.stdout
    one_line_error(persona("query", "SELECT 1; SELECT 2", "--format", "json", home=built), "one statement")
    one_line_error(persona("query", "", home=built), "empty query")
    one_line_error(persona("query", "  ;  ", home=built), "empty query")


def test_query_output_formats(built):
    out = persona(
        "query", "SELECT 1 AS n, '=cmd' AS t, TIMESTAMP '2024-01-02 03:04:05' AS at", "--format", "json", home=built
    ).stdout
    assert json.loads(out) == [{"n": 1, "t": "=cmd", "at": "2024-01-02T03:04:05"}]
    csv = persona("query", "SELECT 1 AS n, '=cmd' AS t", "--format", "csv", home=built).stdout
    assert csv.splitlines() == ["n,t", "1,'=cmd"]
    table = persona("query", "SELECT range AS i FROM range(500)", "--max-rows", "10", home=built).stdout
    assert "500 rows" in table


def test_sql_shell_reads_statements_from_stdin_with_the_same_locks(built):
    proc = persona("sql", home=built, stdin="SELECT count(*) AS people FROM user_profiles;\nSELECT 7 AS seven;\n")
    assert proc.returncode == 0, proc.stderr
    people = json.loads(
        persona("query", "SELECT count(*) AS n FROM user_profiles", "--format", "json", home=built).stdout
    )[0]["n"]
    assert f"│ {people:>6} │" in proc.stdout and "seven" in proc.stdout
    one_line_error(persona("sql", home=built, stdin=f"ATTACH '{built}/warehouse.duckdb' AS w;"), "refused")
    one_line_error(persona("sql", home=built, stdin="COPY raw_events TO '/tmp/x.csv';"), "refused")


def test_profile_still_finds_people_on_the_locked_snapshot(built):
    person = json.loads(
        persona("query", "SELECT person_id FROM user_profiles LIMIT 1", "--format", "json", home=built).stdout
    )[0]["person_id"]
    proc = persona("profile", person, home=built)
    assert proc.returncode == 0 and "person_id" in proc.stdout and person in proc.stdout


def test_profile_into_a_closed_pipe_exits_quietly(built):
    environ = {**os.environ, "PERSONA_HOME": str(built)}
    for args in (["profile", "nobody"], ["query", "SELECT * FROM range(200000)", "--format", "csv"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "persona_assets.cli", *args],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()  # as `| head` does once it has its lines
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_query_on_a_file_that_is_not_a_snapshot(built, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(
        persona("query", "SELECT 1", "--snapshot", str(tmp_path / "notes.txt"), home=built), "not a DuckDB database"
    )
    one_line_error(persona("query", "SELECT 1", "--snapshot", str(tmp_path), home=built), "folder")
    one_line_error(persona("query", "SELECT 1", "--snapshot", str(tmp_path / "none.duckdb"), home=built), "persona run")


def test_run_without_event_files_says_how_to_add_some(tmp_path):
    home = tmp_path / "persona"
    proc = persona("run", home=home)
    one_line_error(proc, "does not exist", "persona generate", code=1)
    (home / "landing").mkdir(parents=True, exist_ok=True)
    one_line_error(persona("run", home=home), "is empty", "persona generate", code=1)


def test_a_landing_folder_of_files_that_are_not_event_files_names_them(tmp_path):
    home = tmp_path / "persona"
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "events.json").write_text("[]")
    line = one_line_error(persona("run", home=home), "holds no event file", "events.json", ".jsonl", code=1)
    assert "is empty" not in line


def test_the_summary_says_why_lines_were_quarantined_and_which_files_gave_nothing(tmp_path):
    home = tmp_path / "persona"
    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "twice.csv").write_text("userId,type,userId,timestamp\nu1,track,u2,2024-05-01T00:00:00Z\n")
    (landing / "future.jsonl").write_text(
        "".join(
            json.dumps({"type": "track", "event": "x", "userId": f"u{i}", "timestamp": "2300-01-01T00:00:00Z"}) + "\n"
            for i in range(2)
        )
    )
    (landing / "ga.jsonl").write_text(
        "".join(
            json.dumps({"event_name": "page_view", "user_pseudo_id": f"p{i}", "timestamp": "2024-05-01T00:00:00Z"})
            + "\n"
            for i in range(3)
        )
    )
    proc = persona("run", home=home)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    out = proc.stdout
    assert "  by reason: missing_id 3, timestamp_out_of_range 2, unreadable_file 1" in out
    assert "  unreadable: twice.csv (" in out and "the header names 'userId' 2 times" in out
    assert "  nothing kept of ga.jsonl: all 3 lines quarantined (missing_id 3); if it is another vocabulary" in out
    assert (
        "  nothing kept of future.jsonl: all 2 lines quarantined (timestamp_out_of_range 2); ingest.min_event_at" in out
    )
    assert "Profiles:           0\n" in out and "None" not in out


@pytest.mark.parametrize("command", [["run"], ["ui", "--port", "1"], ["generate", "--people", "3"]])
def test_a_persona_home_that_cannot_be_written_is_named(tmp_path, command):
    # Tests run as root, whom a read-only mode does not stop: a path under a regular file is
    # unwritable for everyone.
    (tmp_path / "afile").write_text("")
    proc = persona(*command, home=tmp_path / "afile" / "home")
    one_line_error(proc, "PERSONA_HOME=", "afile")


def test_mistyped_arguments(built, tmp_path):
    line = one_line_error(persona("run", "--select", "raw_event", home=built), "raw_event")
    assert "raw_events" in line and "user_profiles" in line
    one_line_error(persona("generate", "--people", "0", home=tmp_path), "--people")
    one_line_error(persona("publish", "/missing.jsonl", home=tmp_path), "/missing.jsonl")


def test_publish_and_stream_without_redis(built):
    landing = next((built / "landing").glob("*.jsonl"))
    one_line_error(persona("publish", str(landing), "--redis", "redis://127.0.0.1:1", home=built), "Redis", "--redis")
    one_line_error(persona("stream", "--redis", "redis://127.0.0.1:1", "--max-events", "1", home=built), "Redis")


def test_forget_someone_unknown_and_a_dry_run(built, tmp_path):
    home = tmp_path / "persona"
    shutil.copytree(built, home)
    proc = persona("forget", "nobody@example.org", "--skip-redis", "--no-compact", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "Nobody was found for 'nobody@example.org'" in proc.stdout and "future events" in proc.stdout
    user = json.loads(
        persona(
            "query",
            "SELECT identifier FROM identity_map WHERE identifier_type = 'user_id' LIMIT 1",
            "--format",
            "json",
            home=home,
        ).stdout
    )[0]["identifier"]
    before = (home / "warehouse.duckdb").read_bytes()
    plan = persona("forget", user, "--dry-run", home=home)
    assert plan.returncode == 0, plan.stderr
    assert f"Would forget {user!r}: 1 person(s)" in plan.stdout and "nothing was changed" in plan.stdout
    assert (home / "warehouse.duckdb").read_bytes() == before
    nobody = persona("forget", "nobody@example.org", "--dry-run", home=home)
    assert "Nobody was found" in nobody.stdout
    still = persona(
        "query", f"SELECT count(*) AS n FROM identity_map WHERE identifier = '{user}'", "--format", "json", home=home
    )
    assert json.loads(still.stdout) == [{"n": 1}]


@pytest.mark.slow
def test_a_run_that_does_nothing_new_says_so(built):
    proc = persona("run", home=built)
    assert proc.returncode == 0, proc.stderr
    assert "No new files in landing; profiles unchanged." in proc.stdout
    assert "Totals in the snapshot" in proc.stdout and "Files ingested:     1" in proc.stdout


def test_a_failed_cli_run_is_listed_by_persona_failures(persona_home, monkeypatch, capsys):
    import dagster as dg

    from persona_assets import cli, definitions

    @dg.asset
    def raw_events():
        raise RuntimeError("the landing disk went away")

    monkeypatch.setattr(definitions, "build_definitions", lambda home: dg.Definitions(assets=[raw_events]))
    assert cli.materialize() is False
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("persona: the run failed at raw_events: RuntimeError: the landing disk went away")
    assert cli.main(["failures"]) == 0
    out = capsys.readouterr().out
    assert "no failed runs recorded" not in out
    assert "raw_events" in out and "the landing disk went away" in out


def test_bench_reports_how_long_a_user_waits_for_query_and_profile(built):
    from persona_assets.bench import cli_startup, report_markdown

    startup = cli_startup(built / "serving" / "persona.duckdb", runs=1)
    assert set(startup) == {"python_ms", "query_ms", "profile_ms"}
    assert 0 < startup["python_ms"] < startup["query_ms"]
    figures = {
        "scale": "small",
        "events": 1,
        "people": 1,
        "date": "today",
        "machine": "m",
        "stages": {},
        "full_build_seconds": 1.0,
        "full_build_peak_gb": 0.1,
        "startup": startup,
        "lookup": {"lookups": 1, "p50_ms": 1.0, "p99_ms": 2.0, "cold_p50_ms": 3.0, "cold_p99_ms": 4.0},
    }
    assert '`persona query "SELECT 1"`' in report_markdown(figures)


def test_profile_with_events_shows_the_merged_identifiers_and_a_timeline(built):
    person = json.loads(
        persona(
            "query",
            "SELECT person_id FROM user_profiles ORDER BY event_count DESC LIMIT 1",
            "--format",
            "json",
            home=built,
        ).stdout
    )[0]["person_id"]
    out = persona("profile", person, "--events", "5", home=built).stdout
    ids = out.split(f"identifiers merged into {person}")[1].split("latest")[0]
    assert "anonymous_id" in ids and "user_id" in ids
    timeline = out.split("latest 5 events, newest first:")[1].strip().splitlines()
    assert len(timeline) == 5
    stamps = [line.split()[0] + " " + line.split()[1] for line in timeline]
    assert stamps == sorted(stamps, reverse=True)
    assert "identifiers merged" not in persona("profile", person, home=built).stdout


def test_stage_metadata_shows_the_table_beside_what_the_run_did():
    from persona_assets.checks import stage_metadata
    from persona_assets.core.stage import StageResult

    idle = stage_metadata(StageResult(mode="incremental", why="incremental", people=500, people_recomputed=0))
    assert idle == {
        "dagster/row_count": 500,
        "refresh": "incremental",
        "people_recomputed": 0,
        "people_in_table": 500,
        "why": "incremental",
        "status": "fitted",
    }
    assert stage_metadata(StageResult(mode="full", people=500))["people_recomputed"] == 500


def test_sql_shell_at_a_terminal(built):
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: persona sql on a terminal
        os.environ["PERSONA_HOME"] = str(built)
        os.execv(sys.executable, [sys.executable, "-m", "persona_assets.cli", "sql"])
    os.write(fd, b"SELECT 6 * 7\nAS answer;\n.tables\nLOAD httpfs;\n.quit\n")
    out, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the shell has left
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "answer" in text and "42" in text and "user_profiles" in text and "refused" in text


def test_profile_with_a_stream_configured_reads_redis_without_dagster(built, tmp_path):
    from persona_assets import stream

    server, url = stream.start_redis(tmp_path / "redis")
    try:
        person = json.loads(
            persona("query", "SELECT person_id FROM user_profiles LIMIT 1", "--format", "json", home=built).stdout
        )[0]["person_id"]
        env = {**os.environ, "PERSONA_HOME": str(built), "PERSONA_REDIS_URL": url}
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "persona_assets.cli", "profile", person],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and "no streamed events for this person" in proc.stdout
        assert "dagster" not in imported(proc)
    finally:
        server.terminate()
        server.wait(timeout=30)
