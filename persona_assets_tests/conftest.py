"""Fixtures: a temporary PERSONA_HOME per test and small generated data sets shared by a session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from persona_assets.core.engine import EngineOptions
from persona_assets.datagen import generate
from persona_assets.resources import spark_resource

SMALL_PEOPLE = 400
SMALL_PER_FILE = 150


@pytest.fixture
def persona_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "persona"
    (home / "landing").mkdir(parents=True)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("PERSONA_HASH_KEY", raising=False)
    return home


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """generated(fmt) -> folder of landing files (with _truth/) for a small population."""
    made: dict[str, Path] = {}

    def make(fmt: str = "jsonl") -> Path:
        if fmt not in made:
            out = tmp_path_factory.mktemp(f"gen-{fmt.replace('.', '')}")
            generate(SMALL_PEOPLE, 7, out, fmt, people_per_file=SMALL_PER_FILE)
            made[fmt] = out
        return made[fmt]

    return make


def land(source: Path, landing: Path) -> list[Path]:
    """Copy a generated data set's event files into a landing folder."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file():
            copied.append(Path(shutil.copy2(path, landing / path.name)))
    return copied


def truth_counts(source: Path) -> dict[str, int]:
    return json.loads((source / "_truth" / "counts.json").read_text())


@pytest.fixture(scope="session")
def resolved(tmp_path_factory: pytest.TempPathFactory):
    """A warehouse with raw_events, identities and cleaned users for 3,000 generated people."""
    import duckdb

    from persona_assets.core.cleaning import clean
    from persona_assets.core.identity import resolve
    from persona_assets.core.ingest import ingest

    root = tmp_path_factory.mktemp("resolved")
    source = root / "landing"
    generate(3000, 11, source, "jsonl", people_per_file=1000)
    path = root / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        ingest(con, source, b"k")
        resolve(con)
        clean(con)
    return path, source / "_truth"


@pytest.fixture
def warehouse_copy(resolved, tmp_path: Path):
    """A private, writable copy of the resolved warehouse, with its own model store."""
    import duckdb

    from persona_assets.core.models import ModelStore

    path, truth_dir = resolved
    copy = tmp_path / "warehouse.duckdb"
    shutil.copy2(path, copy)
    con = duckdb.connect(str(copy))
    yield con, ModelStore(tmp_path / "models"), truth_dir
    con.close()


@pytest.fixture(scope="session")
def segmented_once(resolved, tmp_path_factory: pytest.TempPathFactory):
    """The resolved warehouse with features and segments built once for the session: its file,
    its model folder, the truth folder and the segments stage's result (tests copy the files)."""
    import duckdb

    from persona_assets.core import features, segments
    from persona_assets.core.models import ModelStore

    path, truth_dir = resolved
    root = tmp_path_factory.mktemp("segmented")
    shutil.copy2(path, root / "warehouse.duckdb")
    with duckdb.connect(str(root / "warehouse.duckdb")) as con:
        store = ModelStore(root / "models")
        features.build(con, store, features.FeatureOptions())
        result = segments.build(con, store, segments.SegmentOptions())
    return root / "warehouse.duckdb", root / "models", truth_dir, result


def person_truth(con, truth_dir: Path) -> pd.DataFrame:
    """Each resolved person_id with the generated person it mostly came from (archetype, age, bot...)."""
    ids = pd.read_parquet(truth_dir / "identifiers.parquet")
    mapped = con.execute(
        "SELECT identifier AS anonymous_id, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'"
    ).df()
    owner = ids.merge(mapped, on="anonymous_id").groupby("person_id")["person_key"].agg(lambda s: s.mode()[0])
    people = pd.read_parquet(truth_dir / "people.parquet").set_index("person_key")
    return people.loc[owner.to_numpy()].set_index(owner.index).reset_index(names="person_id")


def segmented_copy(resolved, root: Path):
    """A writable copy of the resolved warehouse in `root` with features and segments built."""
    import duckdb

    from persona_assets.core import features, segments
    from persona_assets.core.models import ModelStore

    path, truth_dir = resolved
    shutil.copy2(path, root / "warehouse.duckdb")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    store = ModelStore(root / "models")
    features.build(con, store, features.FeatureOptions())
    segments.build(con, store, segments.SegmentOptions())
    return con, store, truth_dir


def materialize_all(home: Path) -> dict[str, str]:
    """Materialize every asset in-process, as `persona run` does, asserting the run and every
    check passed; returns the status of each stage that could not fit (asset -> status)."""
    import dagster as dg

    from persona_assets.cli import stage_statuses
    from persona_assets.definitions import build_definitions

    result = (
        build_definitions(home)
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    failures = [e.message for e in result.all_events if e.is_failure]
    assert result.success, failures[:3]
    checks = {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert all(checks.values()), {k: v for k, v in checks.items() if not v}
    return {asset: status for assets, status in stage_statuses(result.all_events) for asset in assets}


@pytest.fixture(scope="session")
def spark():
    """One Spark session (local[2], dagster-pyspark's resource) for the Spark tests of a worker (each of the two
    Spark test groups keeps to one worker): it takes 7-15 s to start."""
    if shutil.which("java") is None:
        if os.geteuid() != 0:
            pytest.skip("no java: Debian's openjdk-17-jre-headless is needed and only root can install it")
        pytest.fail(
            "Debian's openjdk-17-jre-headless is needed (make test installs it: apt-get install openjdk-17-jre-headless)"
        )
    resource = spark_resource(
        EngineOptions(name="spark", spark_master="local[2]"),
        **{"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.sql.shuffle.partitions": "4"},
    )
    session = resource.spark_session
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
