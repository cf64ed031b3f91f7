"""The one Definitions object: every asset, check, resource and the executor, bound once."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from persona_assets import automation, schedules
from persona_assets.assets import audiences, cleaning, identity, ingest, profiles, segments, serving
from persona_assets.resources import PersonaHome, ServingPublisher, warehouse_resource
from persona_assets.settings import CONFIG_ENV, persona_home


def build_definitions(home: Path | None = None, config_file: str | None = None) -> dg.Definitions:
    """Definitions over PERSONA_HOME (or `home`, for tests), with the settings file `config_file`
    (default PERSONA_CONFIG, else PERSONA_HOME/persona.yaml when present)."""
    persona = PersonaHome(home=str(home or persona_home()), config_file=config_file or os.environ.get(CONFIG_ENV, ""))
    audience_assets, audience_checks = audiences.build_assets(persona)
    return dg.Definitions(
        assets=[
            ingest.ingest_landing,
            identity.resolve_identities,
            cleaning.clean_users,
            segments.normalized_features,
            segments.segment_people,
            profiles.impute_attributes,
            profiles.user_profiles,
            *audience_assets,
            serving.serving_snapshot,
        ],
        asset_checks=[*ingest.CHECKS, *identity.CHECKS, *cleaning.CHECKS, *segments.CHECKS, *profiles.CHECKS,
                      *audience_checks],
        jobs=[schedules.retrain_models, automation.ingest_landing_job, automation.nightly_refresh],
        schedules=[schedules.weekly_retrain, automation.nightly_schedule],
        sensors=[automation.landing_sensor, automation.automation_sensor, automation.failure_sensor],
        resources={
            "persona": persona,
            "warehouse": warehouse_resource(persona),
            "serving": ServingPublisher(path=str(persona.serving_path)),
        },
        # One DuckDB writer at a time; in-process is also the fast choice on small machines.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
