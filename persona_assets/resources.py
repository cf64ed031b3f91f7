"""Resources: where Persona keeps its files, the DuckDB warehouse, and the serving publisher."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from persona_assets.core.engine import EngineOptions
from persona_assets.core.models import ModelStore
from persona_assets.core.pii import load_key
from persona_assets.core.publish import publish_snapshot
from persona_assets.core.warehouse import connection_config


class PersonaHome(dg.ConfigurableResource):
    """PERSONA_HOME: landing/, warehouse.duckdb, serving/persona.duckdb, models/, and the settings
    file (`persona.yaml` in the home, or `config_file`)."""

    home: str
    config_file: str = ""
    landing_settle_seconds: float = 10.0  # how long a landing file must stay unchanged before it is read

    def settings(self) -> dict:
        """The settings file's sections, checked (read at each run, so an edit applies to the next run)."""
        from persona_assets.settings import load_settings, settings_path

        return load_settings(settings_path(self.root, self.config_file or None))

    def options(self, config):
        """A stage's options: the run's config over the settings file over the defaults."""
        from persona_assets.settings import stage_options

        return stage_options(config, self.settings())

    @property
    def root(self) -> Path:
        return Path(self.home)

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def warehouse_path(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def serving_path(self) -> Path:
        return self.root / "serving" / "persona.duckdb"

    @property
    def models(self) -> ModelStore:
        return ModelStore(self.root / "models")

    def hash_key(self) -> bytes:
        return load_key(self.root)

    def engine(self) -> EngineOptions:
        """Which engine runs the event-scale stages (the settings file's `engine`, read at each run)."""
        from persona_assets.settings import EngineConfig

        return EngineConfig(**self.settings().get("engine", {})).options()

    @property
    def spark_warehouse(self) -> Path:
        """Where Spark's Parquet tables live under `engine: spark`."""
        return self.engine().warehouse(self.root)


class ServingPublisher(dg.ConfigurableResource):
    """Publishes the read-only serving snapshot next to the warehouse, atomically."""

    path: str

    def publish(
        self,
        con,
        tables: dict[str, str],
        run_id: str | None = None,
        append: dict | None = None,
        indexes: dict | None = None,
        engine: str = "duckdb",
    ) -> dict:
        return publish_snapshot(
            con, Path(self.path), tables, run_id=run_id, append=append, indexes=indexes, engine=engine
        )


def warehouse_resource(home: PersonaHome) -> DuckDBResource:
    home.root.mkdir(parents=True, exist_ok=True)
    return DuckDBResource(database=str(home.warehouse_path), connection_config=connection_config())


def spark_resource(options: EngineOptions, **spark_config: str):
    """dagster-pyspark's Spark session for `engine: spark`, with the master from the settings
    (`spark_config` adds or overrides session settings). Lazy: no JVM starts until a stage asks
    for `.spark_session` (a Spark session takes ~13 s to start on 2 cores)."""
    from dagster_pyspark import LazyPySparkResource

    # Ingest reads landing files in Python on the executors (`ingest_spark`): they must run this
    # interpreter, with Persona's packages, not pyspark's default `python3` from PATH (read when the
    # session starts, from the environment only).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return LazyPySparkResource(spark_config={**options.spark_config(), **spark_config})
