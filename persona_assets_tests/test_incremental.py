"""Incremental refresh: any sequence of landed increments gives what a full rebuild gives."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from persona_assets.core import cleaning, features, identity, imputation, ingest, linkage, profiles, segments
from persona_assets.core.models import ModelStore
from persona_assets.datagen import generate
from persona_assets.settings import shipped_enrichment

KEY = b"k"
INCREMENTS = 4

# Every person-level table, with the columns that say when or in which batch a row was written left out.
COMPARED = {
    "identity_map": [],
    "identity_pii": [],
    "identity_links": [],
    "identity_guard": [],
    "deduped_users": [],
    "sessions": [],
    "cleaned_users": [],
    "normalized_features": [],
    "segments": [],
    "segment_catalog": [],
    "imputed_attributes": [],
    "trait_importance": [],
    "user_profiles": ["updated_at"],
}
KEYS = {
    "identity_map": ["identifier_type", "identifier"],
    "identity_pii": ["record_id"],
    "identity_links": ["record_id_l", "record_id_r"],
    "identity_guard": ["identifier_type", "identifier"],
    "sessions": ["session_id"],
    "segment_catalog": ["id"],
    "imputed_attributes": ["person_id", "trait"],
    "trait_importance": ["trait"],
}


def build(con: duckdb.DuckDBPyConnection, landing: Path, store: ModelStore, full: bool = False) -> dict:
    """One refresh of the whole graph, as the assets run it."""
    ingest.ingest(con, landing, KEY)
    # The linkage model is trained on the first (full) build, as the other models are, and reused.
    opts = identity.IdentityOptions(min_link_records=100)
    report = {"identity": identity.resolve(con, opts, full=full).people_recomputed}
    report["cleaning"] = cleaning.clean(con, full=full).people_recomputed
    report["features"] = features.build(con, store, features.FeatureOptions(), full=full).people_recomputed
    report["segments"] = segments.build(con, store, segments.SegmentOptions(), full=full).people_recomputed
    opts = imputation.ImputationOptions(enrichment_path=str(shipped_enrichment()))
    report["imputation"] = imputation.impute(con, store, opts, full=full).people_recomputed
    report["profiles"] = profiles.build(con, full=full).people_recomputed
    return report


def rebuild_beside(con: duckdb.DuckDBPyConnection, inc_home: Path, full_home: Path) -> None:
    """In `full_home` (its warehouse open as `con`): a full rebuild on the landing files and saved
    models of the incrementally built `inc_home`, with its linkage model (kept in the warehouse itself)."""
    for path in (inc_home / "landing").iterdir():
        shutil.copy2(path, full_home / "landing" / path.name)
    shutil.copytree(inc_home / "models", full_home / "models")
    linkage.ensure_tables(con)
    con.execute(f"ATTACH '{inc_home / 'warehouse.duckdb'}' AS inc (READ_ONLY)")
    con.execute(f"INSERT INTO {linkage.MODEL_TABLE} SELECT * FROM inc.{linkage.MODEL_TABLE}")
    con.execute("DETACH inc")
    build(con, full_home / "landing", ModelStore(full_home / "models"), full=True)


def split_lines(source: Path, parts: int, seed: int) -> list[list[str]]:
    """Every generated line dealt into `parts` files, mostly in time order (so the data's clock
    moves on with each increment: recency, decay, intent windows and birthdays all move), a
    third at random (late and out-of-order events, re-delivered copies in later files)."""
    lines = [line for f in sorted(source.glob("*.jsonl")) for line in f.read_text().splitlines(keepends=True)]
    rng = random.Random(seed)
    stamps = [_stamp(line) for line in lines]
    order = sorted(s for s in stamps if s)
    cuts = [order[len(order) * (i + 1) // parts - 1] for i in range(parts - 1)]
    dealt: list[list[str]] = [[] for _ in range(parts)]
    for line, stamp in zip(lines, stamps):
        in_time = stamp and rng.random() < 2 / 3
        dealt[sum(stamp > c for c in cuts) if in_time else rng.randrange(parts)].append(line)
    return dealt


def _stamp(line: str) -> str:
    try:
        return str(json.loads(line).get("timestamp") or "")
    except (ValueError, AttributeError):
        return ""


def table(con: duckdb.DuckDBPyConnection, name: str) -> pd.DataFrame:
    frame = con.execute(f"SELECT * FROM {name}").df().drop(columns=COMPARED[name])
    keys = KEYS.get(name, ["person_id"])
    return frame.sort_values(keys).reset_index(drop=True)[sorted(frame.columns)]


def assert_same(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    assert list(a.columns) == list(b.columns), name
    assert len(a) == len(b), f"{name}: {len(a)} rows incrementally, {len(b)} in a full rebuild"
    for column in a.columns:
        x, y = a[column], b[column]
        if pd.api.types.is_float_dtype(x) and pd.api.types.is_float_dtype(y):
            assert np.allclose(x.to_numpy(float), y.to_numpy(float), rtol=1e-9, atol=1e-9, equal_nan=True), (
                f"{name}.{column}"
            )
        else:
            differ = pd.Series([_comparable(u) != _comparable(v) for u, v in zip(x, y)], index=a.index)
            assert not differ.any(), (
                f"{name}.{column}: {differ.sum()} rows differ, e.g.\n{a[differ].head(3)}\n{b[differ].head(3)}"
            )


def _comparable(value):
    """Maps and lists compare by content; floats inside them to 9 decimals."""
    if isinstance(value, dict):
        return tuple(sorted((k, _comparable(v)) for k, v in value.items()))
    if isinstance(value, (list, np.ndarray)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 9)
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    return value


@pytest.fixture(scope="module")
def increments(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    root = tmp_path_factory.mktemp("increments")
    generate(2000, 23, root / "gen", "jsonl", people_per_file=1000)
    dealt = split_lines(root / "gen", INCREMENTS, seed=5)
    # A last, small increment: the newest events (the clock moves on for everyone, but few people
    # act), with re-delivered copies of old events.
    last = sorted(dealt[-1], key=_stamp)
    dealt[-1], newest = last[:-80], last[-80:]
    return root, [*dealt, newest + dealt[0][:20]]


@pytest.mark.slow
def test_increments_equal_a_full_rebuild(increments, tmp_path):
    root, parts = increments
    inc_home, full_home = tmp_path / "inc", tmp_path / "full"
    for home in (inc_home, full_home):
        (home / "landing").mkdir(parents=True)
    store = ModelStore(inc_home / "models")
    reports = []
    with duckdb.connect(str(inc_home / "warehouse.duckdb")) as con:
        for i, lines in enumerate(parts):
            (inc_home / "landing" / f"part-{i}.jsonl").write_text("".join(lines))
            reports.append(build(con, inc_home / "landing", store))
        incremental = {name: table(con, name) for name in COMPARED}
        people = con.execute("SELECT count(*) FROM deduped_users").fetchall()[0][0]
    # The first build is full; every later one is incremental, and the small last one touches few people.
    assert all(v is None for v in reports[0].values())
    assert all(v is not None for r in reports[1:] for v in r.values()), reports
    assert 0 < reports[-1]["identity"] < 0.05 * people, reports[-1]
    assert reports[-1]["segments"] < 0.1 * people, reports[-1]

    # A full rebuild on the same events, with the same saved models.
    with duckdb.connect(str(full_home / "warehouse.duckdb")) as con:
        rebuild_beside(con, inc_home, full_home)
        rebuilt = {name: table(con, name) for name in COMPARED}
    for name in COMPARED:
        assert_same(incremental[name], rebuilt[name], name)


def _event(message_id: str, kind: str, at: str, **fields) -> str:
    return json.dumps({"messageId": message_id, "type": kind, "timestamp": at, **fields}) + "\n"


def test_the_clock_moving_reaches_people_without_new_events(tmp_path):
    """A new year in the data ages people whose age comes from a birthday, though they did nothing."""
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "a.jsonl").write_text(
        _event(
            "m1", "identify", "2025-12-20T10:00:00Z", userId="ua", anonymousId="a1", traits={"birthday": "1990-06-15"}
        )
        + _event("m2", "track", "2025-12-31T10:00:00Z", anonymousId="b1", event="Products Searched")
    )
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        ingest.ingest(con, landing, KEY)
        identity.resolve(con)
        cleaning.clean(con)
        age = "SELECT c.age FROM cleaned_users c JOIN identity_map m USING (person_id) WHERE m.identifier = 'ua'"
        assert con.execute(age).fetchall() == [(35,)]
        (landing / "b.jsonl").write_text(
            _event("m3", "track", "2026-01-02T10:00:00Z", anonymousId="b1", event="Products Searched")
        )
        ingest.ingest(con, landing, KEY)
        assert identity.resolve(con).people_recomputed == 1  # only b1's person has new events
        report = cleaning.clean(con)
        assert report.mode == "incremental" and report.people_recomputed == 2
        assert con.execute(age).fetchall() == [(36,)]
