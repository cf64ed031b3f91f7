"""Incremental refresh: any sequence of landed increments gives what a full rebuild gives."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from persona_assets.core import cleaning, features, identity, imputation, ingest, profiles, segments
from persona_assets.core.models import ModelStore
from persona_assets.datagen import generate
from persona_assets.settings import shipped_enrichment

KEY = b"k"
INCREMENTS = 4

# Every person-level table, with the columns that say when or in which batch a row was written left out.
COMPARED = {
    "identity_map": [],
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
    "identity_guard": ["identifier_type", "identifier"],
    "sessions": ["session_id"],
    "segment_catalog": ["id"],
    "imputed_attributes": ["person_id", "trait"],
    "trait_importance": ["trait"],
}


def build(con: duckdb.DuckDBPyConnection, landing: Path, store: ModelStore, full: bool = False) -> dict:
    """One refresh of the whole graph, as the assets run it."""
    ingest.ingest(con, landing, KEY)
    report = {"identity": identity.resolve(con, full=full).people_recomputed}
    report["cleaning"] = cleaning.clean(con, full=full).get("people_recomputed")
    report["features"] = features.build(con, store, features.FeatureOptions(), full=full).get("people_recomputed")
    report["segments"] = segments.build(con, store, segments.SegmentOptions(), full=full).get("people_recomputed")
    opts = imputation.ImputationOptions(enrichment_path=str(shipped_enrichment()))
    report["imputation"] = imputation.impute(con, store, opts, full=full).get("people_recomputed")
    report["profiles"] = profiles.build(con, full=full).get("people_recomputed")
    return report


def split_lines(source: Path, out: Path, parts: int, seed: int) -> list[list[str]]:
    """Every generated line dealt at random into `parts` files: each person's events, their
    re-delivered copies and their late events arrive spread over several increments."""
    lines = [line for f in sorted(source.glob("*.jsonl")) for line in f.read_text().splitlines(keepends=True)]
    rng = random.Random(seed)
    dealt: list[list[str]] = [[] for _ in range(parts)]
    for line in lines:
        dealt[rng.randrange(parts)].append(line)
    return dealt


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
            left, right = x.map(_comparable), y.map(_comparable)
            differ = left != right
            assert not differ.any(), f"{name}.{column}: {differ.sum()} rows differ, e.g.\n{a[differ].head(3)}\n{b[differ].head(3)}"


def _comparable(value):
    """Maps and lists compare by content; floats inside them to 9 decimals."""
    if isinstance(value, dict):
        return tuple(sorted((k, _comparable(v)) for k, v in value.items()))
    if isinstance(value, (list, np.ndarray)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 9)
    if value is pd.NaT or value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


@pytest.fixture(scope="module")
def increments(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    root = tmp_path_factory.mktemp("increments")
    generate(2000, 23, root / "gen", "jsonl", people_per_file=1000)
    dealt = split_lines(root / "gen", root, INCREMENTS, seed=5)
    # A last, small increment: a few people come back (late copies of their own old events included).
    few = dealt[0][:40]
    return root, [*dealt, few]


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
    for path in (inc_home / "landing").iterdir():
        shutil.copy2(path, full_home / "landing" / path.name)
    shutil.copytree(inc_home / "models", full_home / "models")
    with duckdb.connect(str(full_home / "warehouse.duckdb")) as con:
        build(con, full_home / "landing", ModelStore(full_home / "models"), full=True)
        rebuilt = {name: table(con, name) for name in COMPARED}
    for name in COMPARED:
        assert_same(incremental[name], rebuilt[name], name)
