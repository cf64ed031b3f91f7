"""Security: no SQL pasted from names, ids or paths, and settings refused with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from persona_assets import cli, settings
from persona_assets.core.pii import load_key
from persona_assets.core.profiles import find_person
from persona_assets_tests.conftest import land

HOSTILE_USER = "' OR '1'='1' --"
HOSTILE_ANON = 'x"); DROP TABLE identity_map; --'
HOSTILE_FILE = "o'brien\"; DROP TABLE raw_events; --.jsonl"


@pytest.mark.slow
def test_names_ids_and_paths_made_of_sql_are_only_ever_data(tmp_path, generated, monkeypatch):
    # A home whose path has quotes in it: every ATTACH, COPY and file read must bind it.
    home = tmp_path / 'it\'s "here"; DROP TABLE x' / "persona"
    (home / "landing").mkdir(parents=True)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    land(generated("jsonl"), home / "landing")
    events = [
        {
            "type": "identify",
            "userId": HOSTILE_USER,
            "anonymousId": HOSTILE_ANON,
            "messageId": "m'1",
            "timestamp": "2026-11-20T10:00:00Z",
            "traits": {"email": "o'hara@example.com", "country": "GB"},
        },
        {
            "type": "track",
            "event": "Product Viewed",
            "anonymousId": HOSTILE_ANON,
            "messageId": "m'2",
            "timestamp": "2026-11-20T10:01:00Z",
            "properties": {"category": "b'ooks", "price": 3},
        },
    ]
    (home / "landing" / HOSTILE_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    assert cli.materialize()
    snapshot = home / "serving" / "persona.duckdb"
    with duckdb.connect(str(snapshot), read_only=True) as con:
        assert con.execute(
            "SELECT status, events_kept FROM ingest_files WHERE file_name = ?", [HOSTILE_FILE]
        ).fetchall() == [("ingested", 2)]
        people = find_person(con, HOSTILE_USER, load_key(home))
        assert len(people) == 1 and find_person(con, HOSTILE_ANON, load_key(home)) == people
        assert find_person(con, "o'hara@example.com", load_key(home)) == people
        assert con.execute("SELECT count(*) FROM identity_map").fetchall()[0][0] > 100  # nothing was dropped
    assert cli.main(["profile", HOSTILE_USER]) == 0
    assert cli.main(["forget", HOSTILE_ANON, "--skip-redis"]) == 0
    with duckdb.connect(str(snapshot), read_only=True) as con:
        assert find_person(con, HOSTILE_USER, load_key(home)) == []
        assert con.execute("SELECT count(*) FROM raw_events WHERE message_id LIKE 'm''%'").fetchall()[0][0] == 0
        assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] > 1000
    assert json.dumps(HOSTILE_ANON)[1:-1] not in (home / "landing" / HOSTILE_FILE).read_text()


def test_stream_flush_binds_the_landing_path(tmp_path):
    from persona_assets.stream import write_flat_parquet

    landing = tmp_path / "a'b; DROP TABLE t" / "landing"
    landing.mkdir(parents=True)
    line = json.dumps({"type": "track", "event": "x", "anonymousId": "a'1", "timestamp": "2026-11-20T10:00:00Z"})
    with duckdb.connect() as con:
        write_flat_parquet(con, [line], landing / "stream-1.parquet")
        assert con.execute(
            "SELECT anonymousId FROM read_parquet($p)", {"p": str(landing / "stream-1.parquet")}
        ).fetchall() == [("a'1",)]


@pytest.mark.parametrize(
    ("config", "values", "named"),
    [
        (settings.SegmentsConfig, {"k_min": 6, "k_max": 3}, "k_min <= k_max"),
        (settings.SegmentsConfig, {"space": "umap"}, "space\n  Input should be 'auto', 'features' or 'autoencoder'"),
        (settings.CleaningConfig, {"outlier_method": "median"}, "Input should be 'zscore', 'iqr' or 'mad'"),
        (
            settings.CleaningConfig,
            {"outlier_action": "delete"},
            "outlier_action\n  Input should be 'flag', 'clip' or 'exclude'",
        ),
        (settings.CleaningConfig, {"missing_attributes": ["shoe_size"]}, "missing_attributes"),
        (settings.CleaningConfig, {"sparse_threshold": 1.5}, "sparse_threshold"),
        (settings.FeaturesConfig, {"scaling": "robust"}, "scaling\n  Input should be 'zscore' or 'minmax'"),
        (
            settings.FeaturesConfig,
            {"clip_method": "winsor"},
            "clip_method\n  Input should be 'mad', 'iqr', 'zscore' or 'none'",
        ),
        (settings.ImputationConfig, {"model_traits": ["income"]}, "model_traits must be among"),
        (settings.ImputationConfig, {"statistical_fallback": ["height"]}, "statistical_fallback"),
        (settings.ImputationConfig, {"enrichment_keys": ["street"]}, "enrichment_keys"),
        (settings.ImputationConfig, {"enrichment_path": "/no/such/file.csv"}, "enrichment_path must name a CSV"),
        (settings.IdentityConfig, {"link_threshold": 1.5}, "link_threshold"),
        (settings.IngestConfig, {"min_event_at": "last tuesday"}, "min_event_at must be an ISO date"),
        (settings.IngestConfig, {"files": ["../../etc/passwd"]}, "not paths"),
        (settings.ProfilesConfig, {"half_life_days": 0}, "half_life_days"),
    ],
)
def test_settings_are_refused_with_an_error_naming_them(config, values, named):
    with pytest.raises(ValidationError, match=named):
        config(**values)


def test_a_run_with_a_bad_setting_fails_before_touching_data(persona_home, generated):
    land(generated("jsonl"), persona_home / "landing")
    from persona_assets_tests.test_definitions import _run

    result = _run(
        persona_home,
        ["raw_events", "quarantined_events", "ingest_files"],
        run_config={"ops": {"ingest_landing": {"config": {"min_event_at": "someday"}}}},
    )
    assert not result.success
    errors = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
    assert any("min_event_at must be an ISO date" in str(error.to_string()) for error in errors)
    assert not (persona_home / "warehouse.duckdb").exists() or _count(persona_home) == 0


def _count(home: Path) -> int:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'raw_events'").fetchall()[
            0
        ][0]
