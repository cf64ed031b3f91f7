import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from persona_assets.checks import validate_in_chunks
from persona_assets.contracts import RawEvents, ddl
from persona_assets.core.events import RESTRICTED_COLUMNS
from persona_assets.definitions import build_definitions

from .conftest import land, truth_counts


def _run(home, selection=None, run_config=None):
    defs = build_definitions(home)
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        asset_selection=[dg.AssetKey(s) for s in selection] if selection else None,
        raise_on_error=False,
        run_config=run_config,
    )


def _checks(result):
    return {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_definitions_load_with_every_check_blocking():
    defs = build_definitions()
    specs = [spec for checks in defs.asset_checks for spec in checks.check_specs]
    assert {s.name for s in specs} >= {"raw_events_contract", "message_id_unique", "nothing_lost"}
    # Every check blocks what depends on its asset, except drift, which only warns.
    assert {s.name for s in specs if not s.blocking} == {"model_inputs_stable"}
    assert isinstance(defs.executor, dg.ExecutorDefinition) and defs.executor.name == "in_process"


@pytest.mark.slow
def test_materializing_everything_publishes_a_snapshot_without_restricted_columns(persona_home, generated):
    source = generated("jsonl")
    land(source, persona_home / "landing")
    result = _run(persona_home)
    assert result.success
    checks = _checks(result)
    declared = {spec.name for c in build_definitions(persona_home).asset_checks for spec in c.check_specs}
    assert set(checks) == declared and all(checks.values()), checks
    snapshot = persona_home / "serving" / "persona.duckdb"
    with duckdb.connect(str(snapshot), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"raw_events", "quarantined_events", "ingest_files", "identity_map", "cleaned_users"} <= tables
        assert {"segments", "segment_catalog"} <= tables
        cols = {r[0] for r in con.execute("DESCRIBE raw_events").fetchall()}
        assert cols.isdisjoint(RESTRICTED_COLUMNS) and "email_hash" in cols
        kept = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
        assert not tables & {"identity_pii", "identity_link_model"}
        # Look-ups by person_id are index reads; by identifier, reads of one row group of a sorted table.
        indexed = {r[0] for r in con.execute("SELECT table_name FROM duckdb_indexes()").fetchall()}
        assert "user_profiles" in indexed
        identifiers = [r[0] for r in con.execute("SELECT identifier FROM identity_map").fetchall()]
        assert identifiers == sorted(identifiers)
        text_columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE data_type = 'VARCHAR'"
        ).fetchall()
        published = set()
        for table, column in text_columns:
            rows = con.execute(f'SELECT DISTINCT lower("{column}") FROM "{table}" WHERE "{column}" IS NOT NULL')
            published |= {r[0] for r in rows.fetchall()}
    assert kept == truth_counts(source)["events"]
    # No name or birth date (what linkage matches on) is anywhere in the snapshot, in any column.
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        matching = {
            r[0]
            for r in con.execute(
                """SELECT DISTINCT lower(trim(v)) FROM (SELECT unnest([first_name, last_name, birthday]) AS v
                   FROM raw_events) WHERE v IS NOT NULL"""
            ).fetchall()
        }
    assert len(matching) > 20 and not matching & published, sorted(matching & published)[:5]
    # The segments asset is its own dashboard: chosen k and why, curves, sizes, names, noise.
    metadata = {
        e.asset_key.path[-1]: e.step_materialization_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }["segments"]
    assert {"chosen_k", "why_this_k", "curves", "segments", "subsegments", "noise_share", "model_version"} <= set(
        metadata
    )
    assert "data:image/png;base64," in metadata["curves"].value
    assert "explanation" in metadata["segments"].value


@pytest.mark.slow
def test_a_failing_contract_check_blocks_the_snapshot(persona_home, generated):
    land(generated("jsonl"), persona_home / "landing")
    assert _run(persona_home).success
    warehouse = persona_home / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        # Break the contract behind the asset's back: a raw email where only hashes may be.
        con.execute("UPDATE raw_events SET email_hash = 'jane@example.com' WHERE rowid = 1")
    snapshot = persona_home / "serving" / "persona.duckdb"
    before = snapshot.stat().st_mtime_ns
    (persona_home / "landing" / "late.jsonl").write_text(
        '{"messageId":"late-1","type":"page","anonymousId":"z","timestamp":"2026-09-02T10:00:00Z"}\n'
    )
    result = _run(persona_home)
    assert not result.success
    assert _checks(result)["pii_only_as_hashes"] is False
    assert snapshot.stat().st_mtime_ns == before  # nothing downstream ran


READER = """
import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0], flush=True)
sys.stdin.readline()
print(con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0], flush=True)
"""


@pytest.mark.slow
def test_a_reader_keeps_its_snapshot_while_a_run_republishes(persona_home, generated):
    files = land(generated("jsonl"), persona_home / "landing")
    held = files[-1].rename(persona_home / files[-1].name)
    assert _run(persona_home).success
    snapshot = persona_home / "serving" / "persona.duckdb"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(snapshot)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        first = int(reader.stdout.readline())
        held.rename(persona_home / "landing" / held.name)
        result = _run(persona_home)  # not blocked by the open reader
        assert result.success
        reader.stdin.write("\n")
        reader.stdin.flush()
        still = int(reader.stdout.readline())
    finally:
        reader.kill()
    assert still == first  # the reader's view did not change under it
    with duckdb.connect(str(snapshot), read_only=True) as con:
        now = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    assert now > first


def test_contract_validation_reports_failure_cases():
    con = duckdb.connect()
    con.execute(ddl(RawEvents, "raw_events"))
    con.execute(
        "INSERT INTO raw_events (message_id, event_type, event_at, email_hash, batch_id, source_line) VALUES "
        "('m1', 'track', TIMESTAMP '2026-09-01', 'jane@example.com', 1, 1)"
    )
    rows, cases = validate_in_chunks(con, RawEvents, "SELECT * FROM raw_events")
    assert rows == 1
    assert set(cases["column"].dropna()) >= {"email_hash"}
    assert any("userId" in str(c) for c in cases["check"])  # neither userId nor anonymousId


@pytest.mark.slow
def test_a_trait_model_that_does_not_beat_the_baseline_stops_profiles_and_the_snapshot(persona_home, generated):
    land(generated("jsonl"), persona_home / "landing")
    # No model can beat the majority class by a whole 1.0 of accuracy.
    config = {"ops": {"impute_attributes": {"config": {"min_lift": 1.0}}}}
    result = _run(persona_home, run_config=config)
    assert not result.success
    checks = _checks(result)
    assert checks["trait_models_beat_baseline"] is False
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "imputed_attributes" in done and "user_profiles" not in done and "serving_snapshot" not in done
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        sources = {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT source FROM imputed_attributes WHERE trait = 'age_bracket'"
            ).fetchall()
        }
    assert "imputed_model" not in sources, "the failed model's guesses were not used"


@pytest.mark.slow
def test_a_run_that_changes_nothing_keeps_the_figures_that_describe_each_table(persona_home, generated):
    land(generated("jsonl"), persona_home / "landing")
    instance = dg.DagsterInstance.ephemeral()
    job = build_definitions(persona_home).resolve_implicit_global_asset_job_def()

    def figures() -> dict:
        out = {}
        for key in ("raw_events", "normalized_features", "imputed_attributes", "cleaned_users", "segments"):
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            out[key] = {k: v.value for k, v in event.asset_materialization.metadata.items()}
        return out

    assert job.execute_in_process(instance=instance).success
    first = figures()
    assert job.execute_in_process(instance=instance).success  # nothing new in landing
    second = figures()
    for key, wanted in {
        "raw_events": ("lines_read", "events_kept", "duplicates", "dagster/row_count"),
        "normalized_features": ("people_without_behaviour", "dagster/row_count"),
        "imputed_attributes": ("enriched_people", "dagster/row_count"),
        "cleaned_users": ("people_in_table", "dagster/row_count"),
    }.items():
        for name in wanted:
            assert second[key][name] == first[key][name], (key, name)
    assert first["raw_events"]["lines_read"] > 0 and second["raw_events"]["this_run_lines_read"] == 0
    # The segment curves are a picture file beside the model, its path shown in the metadata table.
    picture = Path(first["segments"]["curves_picture"])
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.parent == persona_home / "models" / "segments"


SNAPSHOT = Path(__file__).with_name("definitions.snapshot.json")


def definitions_outline(defs: dg.Definitions) -> dict:
    """What the Definitions declare, as plain data: each asset's group, kinds, owners, upstream
    assets and whether it has a column schema; each check's asset and whether it blocks; jobs,
    sensors (with their default status) and schedules (with their cron)."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "owners": list(node.owners),
            "upstream": sorted(k.to_user_string() for k in node.parent_keys),
            "column_schema": "dagster/column_schema" in node.metadata,
        }
    checks = sorted(
        (spec.asset_key.to_user_string(), spec.name, spec.blocking) for c in defs.asset_checks for spec in c.check_specs
    )
    return {
        "assets": assets,
        "checks": [list(c) for c in checks],
        "jobs": sorted(j.name for j in defs.jobs if not j.name.startswith("__")),
        "sensors": sorted([s.name, str(s.default_status.value)] for s in defs.sensors),
        "schedules": sorted([s.name, s.cron_schedule] for s in defs.schedules),
    }


def test_definitions_match_their_snapshot():
    """A cheap guard on the graph's shape: an asset, check, job, sensor or schedule added, removed
    or rewired shows here first. After a deliberate change, rewrite the snapshot with
    `PERSONA_UPDATE_SNAPSHOT=1 pytest persona_assets_tests/test_definitions.py -k definitions_match` and
    review its diff."""
    outline = definitions_outline(build_definitions())
    text = json.dumps(outline, indent=1, sort_keys=True) + "\n"
    if os.environ.get("PERSONA_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), f"no snapshot yet: run with PERSONA_UPDATE_SNAPSHOT=1 to write {SNAPSHOT.name}"
    assert json.loads(SNAPSHOT.read_text()) == outline
