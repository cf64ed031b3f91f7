"""The one Definitions object: every asset, check, resource and the executor, bound once."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dagster as dg

from persona_assets import automation, schedules
from persona_assets.assets import audiences, cleaning, identity, ingest, profiles, segments, serving
from persona_assets.checks import CONTRACTS, column_schema
from persona_assets.resources import PersonaHome, ServingPublisher, spark_resource, warehouse_resource
from persona_assets.settings import CONFIG_ENV, SettingsError, persona_home


def build_definitions(
    home: Path | None = None, config_file: str | None = None, timing: automation.Timing | None = None
) -> dg.Definitions:
    """Definitions over PERSONA_HOME (or `home`, for tests), with the settings file `config_file`
    (default PERSONA_CONFIG, else PERSONA_HOME/persona.yaml when present) and the sensors'
    `timing` (default: from the environment, see `automation.Timing`)."""
    timing = timing or automation.Timing.from_environment()
    persona = PersonaHome(
        home=str(home or persona_home()),
        config_file=config_file or os.environ.get(CONFIG_ENV, ""),
        landing_settle_seconds=timing.landing_settle,
    )
    audience_assets, audience_checks = audiences.build_assets(persona)
    assets = [
        ingest.ingest_landing,
        identity.resolve_identities,
        cleaning.clean_users,
        segments.normalized_features,
        segments.segment_people,
        profiles.impute_attributes,
        profiles.user_profiles,
        *audience_assets,
        serving.serving_snapshot,
    ]
    return dg.Definitions(
        assets=catalogued(assets),
        asset_checks=[
            *ingest.CHECKS,
            *identity.CHECKS,
            *cleaning.CHECKS,
            *segments.CHECKS,
            *profiles.CHECKS,
            *audience_checks,
        ],
        jobs=[schedules.retrain_models, automation.ingest_landing_job, automation.nightly_refresh],
        schedules=[schedules.weekly_retrain, automation.nightly_schedule],
        sensors=automation.sensors(timing),
        resources={
            "persona": persona,
            "warehouse": warehouse_resource(persona),
            "serving": ServingPublisher(path=str(persona.serving_path)),
            # Lazy: no JVM starts unless a stage runs on Spark (`engine: spark`).
            "spark": spark_resource(_engine(persona)),
        },
        # One DuckDB writer at a time; in-process is also the fast choice on small machines.
        executor=dg.in_process_executor,
    )


def _engine(persona: PersonaHome):
    """The engine settings when Dagster loads the code (the Spark session's master and settings;
    a run reads `engine.name` again). A settings file with a mistake is said by the run that reads
    it, not by the code location failing to load."""
    from persona_assets.core.engine import EngineOptions

    try:
        return persona.engine()
    except SettingsError:
        return EngineOptions()


OWNERS = ["team:persona"]


def catalogued(assets: list) -> list:
    """The assets with owners, column schemas and links to their code (Dagster marks the
    code-reference API beta; its warning is not the user's to read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.with_source_code_references(dg.map_asset_specs(in_catalog, assets))


def in_catalog(spec: dg.AssetSpec) -> dg.AssetSpec:
    """Every asset with its owners and, for a table with a contract, the contract as its column schema."""
    table = spec.key.to_user_string()
    metadata = {"dagster/column_schema": column_schema(CONTRACTS[table])} if table in CONTRACTS else {}
    return spec.merge_attributes(owners=OWNERS, metadata=metadata)


@dg.definitions
def defs() -> dg.Definitions:
    """What `dagster dev`, the UI and the daemon load (workspace.yaml): PERSONA_HOME, the settings
    file and the sensors' timing are read when Dagster loads the code, not when this module is imported."""
    return build_definitions()
