"""The settings file: persona.yaml in PERSONA_HOME (or --config), checked whole, used by every run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import duckdb
import pytest

from persona_assets.definitions import build_definitions
from persona_assets.settings import (
    CleaningConfig,
    IngestConfig,
    SettingsError,
    effective_settings,
    load_settings,
    stage_options,
    with_settings,
)


def cli(home, *args):
    env = {**os.environ, "PERSONA_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    env.pop("PERSONA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "text, named",
    [
        ("cleanig:\n  sparse_threshold: 0.4\n", "unknown section 'cleanig'; allowed: ingest, identity, cleaning"),
        ("cleaning:\n  sparse_treshold: 0.4\n", "cleaning.sparse_treshold: unknown setting; allowed: session_gap"),
        ("cleaning:\n  outlier_method: median\n", "outlier_method: Input should be 'zscore', 'iqr' or 'mad'"),
        ("segments:\n  k_min: 5\n  k_max: 3\n", "need 2 <= k_min <= k_max"),
        ("profiles:\n  half_life_days: soon\n", "half_life_days: Input should be a valid number"),
        ("segments:\n  retrain: true\n", "segments.retrain is chosen per run"),
        ("ingest:\n  min_event_at: last year\n", "min_event_at must be an ISO date"),
        ("mappings:\n  - {files: '*.csv', preset: shopify}\n", "preset"),
        ("- just\n- a list\n", "expected sections such as 'cleaning:'"),
        ("cleaning: [1, 2\n", "not a readable YAML file"),
    ],
)
def test_a_bad_settings_file_is_refused_naming_the_key(tmp_path, text, named):
    path = tmp_path / "persona.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert named in str(err.value) and str(path) in str(err.value)


def test_the_file_sets_defaults_and_the_run_config_wins_over_it(tmp_path):
    path = tmp_path / "persona.yaml"
    path.write_text("cleaning:\n  sparse_threshold: 0.3\n  outlier_method: iqr\n")
    settings = load_settings(path)
    assert with_settings(CleaningConfig(), settings).sparse_threshold == 0.3
    # A value the run sets (launchpad, run config) wins over the file.
    assert with_settings(CleaningConfig(outlier_method="zscore"), settings).outlier_method == "zscore"
    assert stage_options(CleaningConfig(), settings).outlier_method == "iqr"
    assert effective_settings(settings)["cleaning"]["sparse_threshold"] == 0.3
    assert effective_settings({})["ingest"]["min_event_at"] == IngestConfig().min_event_at


@pytest.mark.slow
def test_persona_config_prints_the_settings_in_force_and_run_refuses_a_bad_file(persona_home):
    out = cli(persona_home, "config")
    assert out.returncode == 0 and "the defaults" in out.stdout and "sparse_threshold: 0.5" in out.stdout
    (persona_home / "persona.yaml").write_text("cleaning:\n  sparse_threshold: 0.25\n")
    out = cli(persona_home, "config")
    assert "sparse_threshold: 0.25  # from the file" in out.stdout and str(persona_home / "persona.yaml") in out.stdout
    (persona_home / "persona.yaml").write_text("cleaning:\n  outlier_limt: 3\n")
    for command in (["run"], ["config"]):
        proc = cli(persona_home, *command)
        assert proc.returncode == 2 and "cleaning.outlier_limt: unknown setting" in proc.stderr
        assert "Traceback" not in proc.stderr
    other = persona_home / "other.yaml"
    other.write_text("ingest:\n  max_future_hours: 2\n")
    out = cli(persona_home, "config", "--config", str(other))
    assert out.returncode == 0 and "max_future_hours: 2.0  # from the file" in out.stdout


def _order(at: str, n: int) -> str:
    event = {
        "messageId": f"o{n}",
        "type": "track",
        "event": "Order Completed",
        "userId": f"c{n}",
        "timestamp": at,
        "properties": {"revenue": 10.0},
    }
    return json.dumps(event) + "\n"


def test_every_run_reads_the_file_of_its_home(persona_home):
    (persona_home / "landing" / "orders.jsonl").write_text(
        _order("1997-05-01T00:00:00Z", 1) + _order("2024-05-01T00:00:00Z", 2)
    )
    (persona_home / "persona.yaml").write_text('ingest:\n  min_event_at: "2000-01-01"\n')
    job = build_definitions(persona_home).get_job_def("ingest_landing_file")  # the landing sensor's job
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        reasons = con.execute("SELECT reason FROM quarantined_events").fetchall()
    assert reasons == [("timestamp_out_of_range",)], "the file's min_event_at applied"


def test_engine_spark_is_a_setting_with_linkage_on_and_a_bad_engine_is_refused(tmp_path):
    settings = tmp_path / "persona.yaml"
    settings.write_text("engine: spark\n")  # probabilistic linkage on (the default) runs on Spark too
    assert load_settings(settings)["engine"] == {"name": "spark"}
    settings.write_text("engine:\n  name: duckdb\n  spark_master: local[2]\n")
    assert load_settings(settings)["engine"]["name"] == "duckdb"
    settings.write_text("engine: flink\n")
    with pytest.raises(SettingsError, match="engine"):
        load_settings(settings)


def test_an_object_store_warehouse_is_refused_saying_why_and_a_file_uri_is_its_path(tmp_path, persona_home, capsys):
    from persona_assets.core.engine import EngineOptions
    from persona_assets.spark_job import main

    (persona_home / "persona.yaml").write_text("engine:\n  name: spark\n  spark_warehouse: s3a://shop/persona\n")
    env = {**os.environ, "PERSONA_HOME": str(persona_home)}
    env.pop("PERSONA_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", "config"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "s3a:// is not supported yet" in proc.stderr and "renaming folders" in proc.stderr
    for uri in ("gs://b/w", "abfss://c@a.dfs.core.windows.net/w", "hdfs://nn:8020/w"):
        with pytest.raises(ValueError, match="is not supported yet"):
            EngineOptions(name="spark", spark_warehouse=uri)
    local = EngineOptions(name="spark", spark_warehouse=(tmp_path / "my wh").as_uri())
    assert local.warehouse(persona_home) == tmp_path / "my wh"
    assert EngineOptions(name="spark").warehouse(persona_home) == persona_home / "spark"
    with pytest.raises(SystemExit):  # spark-submit's application says the same, before Spark starts
        main(["--warehouse", "s3a://shop/persona", "--stage", "cleaning"])
    assert "warehouse s3a://shop/persona: s3a:// is not supported yet" in capsys.readouterr().err


def test_the_spark_application_takes_a_stages_settings_and_refuses_bad_ones_plainly(tmp_path):
    from persona_assets.core.cleaning import CleaningOptions
    from persona_assets.spark_job import _stage_options

    assert _stage_options(None, "cleaning") == CleaningOptions()
    good = tmp_path / "persona.yaml"
    good.write_text("engine: spark\ncleaning:\n  outlier_method: iqr\n  outlier_limit: 1.5\n")
    assert _stage_options(good, "cleaning") == CleaningOptions(outlier_method="iqr", outlier_limit=1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cleaning:\n  outlier_method: tea\n")
    with pytest.raises(SystemExit, match="bad.yaml: cleaning: .*outlier_method"):
        _stage_options(bad, "cleaning")
    bad.write_text("cleaning: [1\n")
    with pytest.raises(SystemExit, match="not a readable YAML file"):
        _stage_options(bad, "cleaning")


def test_the_spark_application_says_what_a_stage_lacks_before_spark_starts(tmp_path, monkeypatch):
    from persona_assets.spark_job import main

    monkeypatch.delenv("PERSONA_HASH_KEY", raising=False)

    settings = tmp_path / "persona.yaml"
    settings.write_text("identity:\n  linkage: false\n")
    warehouse = ["--warehouse", str(tmp_path / "parquet"), "--settings", str(settings)]
    with pytest.raises(SystemExit, match="cleaning reads raw_events, identity_map, deduped_users from the warehouse"):
        main([*warehouse, "--stage", "cleaning"])
    (tmp_path / "parquet" / "raw_events").mkdir(parents=True)
    with pytest.raises(SystemExit, match="cleaning reads identity_map, deduped_users from"):
        main([*warehouse, "--stage", "cleaning"])
    with pytest.raises(SystemExit, match="set PERSONA_HASH_KEY or pass --home"):
        main([*warehouse, "--landing", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such folder"):
        main([*warehouse, "--landing", str(tmp_path / "nowhere"), "--home", str(tmp_path)])


def test_engine_spark_without_java_is_refused_at_startup_naming_the_package(tmp_path, persona_home):
    (persona_home / "persona.yaml").write_text("engine: spark\nidentity:\n  linkage: false\n")
    env = {**os.environ, "PERSONA_HOME": str(persona_home), "PATH": str(tmp_path)}  # a PATH with no java
    env.pop("JAVA_HOME", None)
    env.pop("PERSONA_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", "run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2 and "engine: spark needs Java 17 or later" in proc.stderr
    assert "openjdk-17-jre-headless" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unquoted_yaml_date_is_a_date_and_errors_show_no_python_values(tmp_path):
    settings = tmp_path / "persona.yaml"
    settings.write_text("ingest:\n  min_event_at: 1850-01-01\n")  # YAML reads it as a date, not text
    assert load_settings(settings)["ingest"]["min_event_at"] == "1850-01-01"
    settings.write_text("segments:\n  k_min: 5\n  k_max: 2\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(settings)
    assert "segments: need 2 <= k_min <= k_max, got 5..2" in str(refused.value) and "{" not in str(refused.value)
    settings.write_text("ingest:\n  min_event_at: yesterday\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(settings)
    assert str(refused.value).count("yesterday") == 1
