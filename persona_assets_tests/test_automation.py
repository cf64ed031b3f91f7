"""The landing sensor, declarative automation, the failure sensor and the schedules, evaluated by Dagster."""

import json
import os
import time

import dagster as dg
import duckdb
import pytest

from persona_assets import automation
from persona_assets.core.ingest import checksum
from persona_assets.definitions import build_definitions

from .conftest import land

PERSON_LEVEL = {
    "deduped_users",
    "identity_map",
    "cleaned_users",
    "sessions",
    "normalized_features",
    "segments",
    "segment_catalog",
    "imputed_attributes",
    "user_profiles",
    "serving_snapshot",
}


def _sensor_tick(defs, sensor, instance, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources)
    return sensor(context)


def test_the_landing_sensor_waits_for_complete_files_and_requests_each_once(persona_home, generated):
    landing = persona_home / "landing"
    defs = build_definitions(persona_home)
    instance = dg.DagsterInstance.ephemeral()
    (landing / "incoming.jsonl.part").write_text("{}\n")  # still being written under its temporary name
    fresh = landing / "fresh.jsonl"
    fresh.write_text("{}\n")  # complete name, but modified just now
    landed = land(generated("jsonl"), landing)
    for path in landed:
        os.utime(path, (time.time() - 60, time.time() - 60))
    old = landed[0]
    first = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), instance)
    requested = {r.tags["persona/landing_file"] for r in first.run_requests}
    assert old.name in requested and "fresh.jsonl" not in requested and "incoming.jsonl.part" not in requested
    request = next(r for r in first.run_requests if r.tags["persona/landing_file"] == old.name)
    assert request.run_config["ops"]["ingest_landing"]["config"]["files"] == [old.name]
    assert request.run_key.startswith(old.name + ":")
    # Next tick: nothing twice; the settled file now goes.
    os.utime(fresh, (time.time() - 60, time.time() - 60))
    second = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), instance, first.cursor)
    assert [r.tags["persona/landing_file"] for r in second.run_requests] == ["fresh.jsonl"]
    third = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), instance, second.cursor)
    assert not third.run_requests and "no new files" in third.skip_reason.skip_message
    # A file rewritten in place is new again (its run key changes with size and mtime).
    fresh.write_text("{}\n{}\n")
    os.utime(fresh, (time.time() - 60, time.time() - 60))
    fourth = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), instance, third.cursor)
    assert [r.tags["persona/landing_file"] for r in fourth.run_requests] == ["fresh.jsonl"]
    assert json.loads(fourth.cursor).keys() >= {"fresh.jsonl", old.name}


@pytest.mark.slow
def test_a_landed_file_flows_to_profiles_through_automation(persona_home, generated):
    landing = persona_home / "landing"
    files = land(generated("jsonl"), landing)
    held_back = files[-1].rename(persona_home / files[-1].name)
    defs = build_definitions(persona_home)
    instance = dg.DagsterInstance.ephemeral()
    everything = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)
    assert everything.success
    _assert_segment_figures_are_numbers(everything)
    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert settled.total_requested == 0  # all materialized by the run that targeted them

    # The sensor's run for a new file, then one automation tick: every person-level asset is requested.
    held_back.rename(landing / held_back.name)
    ingest_job = defs.resolve_job_def("ingest_landing_file")
    run_config = {"ops": {"ingest_landing": {"config": {"files": [held_back.name]}}}}
    assert ingest_job.execute_in_process(instance=instance, run_config=run_config).success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=settled.cursor)
    requested = {key.to_user_string() for key in tick._requested_partitions_by_asset_key}
    assert PERSON_LEVEL <= requested, requested
    assert not requested & set(automation.INGEST_KEYS)

    # A run for a file already ingested materializes nothing, so automation stays quiet.
    assert ingest_job.execute_in_process(instance=instance, run_config=run_config).success
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert quiet.total_requested == 0


def _assert_segment_figures_are_numbers(result) -> None:
    """The segments asset's first figures are typed numbers, which the asset page shows without a
    click and its Plots tab draws across materializations (a markdown picture needs a click)."""
    segments = next(
        m for m in result.asset_materializations_for_node("segment_people") if m.asset_key == dg.AssetKey("segments")
    ).metadata
    floats = ["silhouette_features", "noise_share", "largest_segment_share", "smallest_segment_share"]
    assert all(isinstance(segments[name], dg.FloatMetadataValue) for name in floats), segments
    assert all(isinstance(segments[name], dg.IntMetadataValue) for name in ("segment_count", "chosen_k"))
    assert 0 < segments["smallest_segment_share"].value <= segments["largest_segment_share"].value < 1
    assert segments["segment_count"].value == segments["chosen_k"].value


def test_sensor_timing_is_read_from_the_environment_when_dagster_loads_the_definitions(monkeypatch, persona_home):
    from persona_assets import definitions

    monkeypatch.setenv("PERSONA_LANDING_INTERVAL", "3")
    monkeypatch.setenv("PERSONA_LANDING_SETTLE_SECONDS", "2.5")
    defs = definitions.defs()  # what workspace.yaml names: a function Dagster calls, not a module-level object
    assert isinstance(defs, dg.Definitions)
    assert defs.get_sensor_def("landing_sensor").minimum_interval_seconds == 3
    assert defs.get_sensor_def("persona_automation").minimum_interval_seconds == 30  # the default
    assert defs.resources["persona"].landing_settle_seconds == 2.5
    monkeypatch.setenv("PERSONA_AUTOMATION_INTERVAL", "soon")
    with pytest.raises(ValueError, match="PERSONA_AUTOMATION_INTERVAL must be a number of seconds, got 'soon'"):
        automation.Timing.from_environment()
    assert automation.Timing.from_environment({"PERSONA_FAILURE_INTERVAL": "7.9"}).failure_interval == 7


def test_sensors_and_schedules_are_on_by_default_and_profiles_declare_freshness():
    defs = build_definitions()
    repo = defs.get_repository_def()
    sensors = {s.name: s for s in repo.sensor_defs}
    assert set(sensors) == {"landing_sensor", "persona_automation", "failure_sensor"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    schedules = {s.name: s for s in repo.schedule_defs}
    assert {"nightly", "weekly_retrain"} <= set(schedules)
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in schedules.values())
    profiles = defs.resolve_assets_def("user_profiles")
    assert profiles.specs_by_key[dg.AssetKey("user_profiles")].freshness_policy is not None
    assert defs.resolve_job_def("nightly_refresh").tags[automation.FULL_REFRESH_TAG] == "true"


@pytest.mark.slow
def test_the_nightly_tag_rebuilds_every_person_level_stage_in_full(persona_home, generated):
    """A run with nothing new is incremental everywhere; the same run with the nightly refresh's
    tag rebuilds every person-level stage in full."""
    land(generated("jsonl"), persona_home / "landing")
    job = build_definitions(persona_home).resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.ephemeral()
    assert job.execute_in_process(instance=instance).success

    def modes(tags: dict) -> dict[str, str]:
        result = job.execute_in_process(instance=instance, tags=tags)
        assert result.success
        return {
            m.asset_key.to_user_string(): m.metadata["refresh"].value
            for m in (
                e.step_materialization_data.materialization for e in result.all_events if e.is_step_materialization
            )
            if "refresh" in m.metadata
        }

    stages = {
        "deduped_users",
        "cleaned_users",
        "imputed_attributes",
        "user_profiles",
        "segments",
        "normalized_features",
    }
    quiet = modes({})
    assert stages <= set(quiet) and {quiet[s] for s in stages} == {"incremental"}, quiet
    nightly = modes({automation.FULL_REFRESH_TAG: "true"})
    assert {nightly[s] for s in stages} == {"full"}, nightly


def test_a_failed_run_is_recorded_in_a_table_and_in_its_tags(persona_home):
    defs = build_definitions(persona_home)
    instance = dg.DagsterInstance.ephemeral()
    (persona_home / "landing" / "a.jsonl").write_text("")
    # identity needs raw_events: running it alone on an empty warehouse fails.
    failed = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=[
            dg.AssetKey(k)
            for k in (
                "deduped_users",
                "identity_map",
                "identity_guard",
                "identity_links",
                "identity_pii",
                "person_id_history",
            )
        ],
        raise_on_error=False,
    )
    assert not failed.success
    run = instance.get_run_by_id(failed.run_id)
    failure = next(e for e in failed.all_events if e.event_type_value == "PIPELINE_FAILURE")
    context = dg.build_run_status_sensor_context(
        sensor_name="failure_sensor",
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=failure,
        resources={"persona": defs.resources["persona"]},
    ).for_run_failure()
    defs.get_sensor_def("failure_sensor")(context)
    with duckdb.connect(str(persona_home / "ops.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT run_id, job_name, failed_steps, error FROM run_failures").fetchall()
    assert rows[0][0] == failed.run_id and "resolve_identities" in rows[0][2] and rows[0][3]
    tags = instance.get_run_by_id(failed.run_id).tags
    assert "resolve_identities" in tags["persona/failed_steps"] and tags["persona/failure"]


def _ledger_snapshot(home, files) -> None:
    """A serving snapshot whose ledger holds `files` as they are now (name, size, mtime)."""
    (home / "serving").mkdir(exist_ok=True)
    with duckdb.connect(str(home / "serving" / "persona.duckdb")) as con:
        con.execute(
            "CREATE OR REPLACE TABLE ingest_files (file_name VARCHAR, size_bytes BIGINT, mtime_ns BIGINT, checksum VARCHAR)"
        )
        for path in files:
            stat = path.stat()
            row = [path.name, stat.st_size, stat.st_mtime_ns, checksum(path)]
            con.execute("INSERT INTO ingest_files VALUES (?, ?, ?, ?)", row)


def test_a_first_tick_on_an_up_to_date_home_requests_only_what_the_ledger_lacks(persona_home, generated):
    # A new DAGSTER_HOME (or `persona run` before `persona ui`): the sensor starts with no cursor.
    landing = persona_home / "landing"
    landed = land(generated("jsonl"), landing)
    for path in landed:
        os.utime(path, (time.time() - 60, time.time() - 60))
    *ingested, rewritten = landed
    _ledger_snapshot(persona_home, landed)
    rewritten.write_text("{}\n")  # changed since it was ingested
    os.utime(rewritten, (time.time() - 60, time.time() - 60))
    defs = build_definitions(persona_home)
    first = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), dg.DagsterInstance.ephemeral())
    assert [r.tags["persona/landing_file"] for r in first.run_requests] == [rewritten.name]
    assert json.loads(first.cursor).keys() == {p.name for p in landed}  # the ledger's files remembered too

    # Everything ingested: nothing to launch, and the ledger is read only for files the cursor lacks.
    _ledger_snapshot(persona_home, landed)
    calls = []
    requests, cursor, _ = automation.landing_requests(
        landing,
        {},
        10,
        time.time(),
        ingested=lambda: calls.append(1) or automation.ingested_files(persona_home / "serving" / "persona.duckdb"),
    )
    assert not requests and cursor.keys() == {p.name for p in landed} and calls == [1]
    automation.landing_requests(landing, cursor, 10, time.time(), ingested=lambda: calls.append(1))
    assert calls == [1]
    # Copied in again with a new mtime (`cp` without -p), same content: still nothing to launch.
    copied = landed[0]
    os.utime(copied, (time.time() - 30, time.time() - 30))
    requests, _, _ = automation.landing_requests(
        landing,
        {},
        10,
        time.time(),
        ingested=lambda: automation.ingested_files(persona_home / "serving" / "persona.duckdb"),
    )
    assert not requests
    # No snapshot yet (a new home): every settled file is requested, as before.
    (persona_home / "serving" / "persona.duckdb").unlink()
    assert automation.ingested_files(persona_home / "serving" / "persona.duckdb") is None
    again = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), dg.DagsterInstance.ephemeral())
    assert {r.tags["persona/landing_file"] for r in again.run_requests} == {p.name for p in landed}


@pytest.mark.slow
def test_a_run_the_cli_launches_names_its_assets_for_the_runs_page(persona_home, tmp_path):
    from persona_assets import cli

    # The Runs page's Target column shows a run's asset_selection (the job's name for a named job).
    cli.materialize(["ingest_files"])
    cli.materialize()  # every asset: fails on an empty landing, but the run is recorded all the same
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        every, one = instance.get_runs()
    assert one.asset_selection == {dg.AssetKey(k) for k in automation.INGEST_KEYS}  # made together
    assert every.asset_selection == set(build_definitions(persona_home).resolve_all_asset_keys())


def test_automation_on_a_new_instance_requests_nothing(persona_home):
    # A new DAGSTER_HOME over a home built before: every person-level asset is missing to it,
    # but eager waits for raw_events, which only the landing sensor's runs (or a click) make.
    defs = build_definitions(persona_home)
    first = dg.evaluate_automation_conditions(defs=defs, instance=dg.DagsterInstance.ephemeral())
    assert first.total_requested == 0


def test_files_persona_does_not_read_are_named_by_the_sensor_and_persona_run(persona_home, generated, capsys):
    from persona_assets import cli

    landing = persona_home / "landing"
    event_file = land(generated("jsonl"), landing)[0]
    for path in landing.iterdir():
        if path != event_file:
            path.unlink()
    for name in ("notes.txt", "events.json", "data.gz", ".DS_Store", "late.jsonl.part"):
        (landing / name).write_text("x\n")
    (landing / "archive").mkdir()
    why = "not an event file: .jsonl, .jsonl.gz, .csv, .parquet"
    assert automation.unread_files(landing) == {name: why for name in ("data.gz", "events.json", "notes.txt")}

    defs = build_definitions(persona_home)
    os.utime(event_file, (time.time() - 60, time.time() - 60))
    first = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), dg.DagsterInstance.ephemeral())
    assert [r.tags["persona/landing_file"] for r in first.run_requests] == [event_file.name]
    quiet = _sensor_tick(defs, defs.get_sensor_def("landing_sensor"), dg.DagsterInstance.ephemeral(), first.cursor)
    assert quiet.skip_reason.skip_message == (
        f"no new files in landing. Not read: data.gz ({why}); events.json ({why}); notes.txt ({why})"
    )
    assert cli.materialize(["raw_events"])
    assert f"Not read: data.gz ({why}); events.json ({why}); notes.txt ({why})" in capsys.readouterr().out
