"""Retraining: a job that refits the feature transform and retrains segment and trait models, weekly and on request."""

import dagster as dg

from persona_assets.settings import FeaturesConfig, ImputationConfig, SegmentsConfig

# Everything a retrain touches: the models and what is published from them.
RETRAIN_SELECTION = dg.AssetSelection.assets(
    "normalized_features",
    "segments",
    "segment_catalog",
    "imputed_attributes",
    "trait_models",
    "trait_model_drift",
    "trait_importance",
    "user_profiles",
    "serving_snapshot",
)

retrain_models = dg.define_asset_job(
    "retrain_models",
    selection=RETRAIN_SELECTION,
    description="Refit the feature transform, retrain segmentation and the trait models, rebuild profiles; people "
    "keep their segment ids where segments did not change (Hungarian matching on centroids).",
    config=dg.RunConfig(
        ops={
            "normalized_features": FeaturesConfig(refit=True),
            "segment_people": SegmentsConfig(retrain=True),
            "impute_attributes": ImputationConfig(retrain=True),
        }
    ),
)

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_models,
    cron_schedule="0 3 * * 0",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Sunday 03:00: retrain on the week's people. Between retrains, new people are assigned "
    "with the saved models.",
)
