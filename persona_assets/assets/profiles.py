"""imputed_attributes and user_profiles: gaps filled with provenance, then one profile per person."""

import dagster as dg
from dagster_duckdb import DuckDBResource
from dagster_pyspark import LazyPySparkResource

from persona_assets.automation import EAGER, PROFILES_FRESHNESS, full_refresh
from persona_assets.checks import contract_check, frame_md, sql_check, stage_metadata
from persona_assets.contracts import (
    ImputedAttributes,
    TraitImportance,
    TraitModelDrift,
    TraitModelMetrics,
    UserProfiles,
)
from persona_assets.core import imputation, profiles, spark_stages
from persona_assets.resources import PersonaHome
from persona_assets.settings import ImputationConfig, ProfilesConfig

GROUP = "profiles"
DRIFT_WARNING = 0.2


def _spec(key: str, description: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key,
        deps=["segments", "normalized_features", "cleaned_users", "deduped_users"],
        automation_condition=EAGER,
        kinds={"duckdb", "lightgbm"},
        group_name=GROUP,
        description=description,
    )


@dg.multi_asset(
    specs=[
        _spec(
            "imputed_attributes",
            "Every trait of every person with source (observed, enriched, inferred, imputed_model, imputed_stat, "
            "unknown), confidence and model version.",
        ),
        _spec("trait_models", "Holdout accuracy and macro-F1 of each trait model beside RandomForest and majority."),
        _spec("trait_model_drift", "Population stability index of each model input since training."),
        _spec("trait_importance", "What an answer to each askable trait is worth (for next_question)."),
    ],
    pool="duckdb",
)
def impute_attributes(
    context: dg.AssetExecutionContext, config: ImputationConfig, warehouse: DuckDBResource, persona: PersonaHome
):
    with warehouse.get_connection() as con:
        result = imputation.impute(
            con, persona.models, persona.options(config), retrain=config.retrain, full=full_refresh(context, config)
        )
        # The table's own figures, every run (an incremental run's are only about its people).
        enriched_people = con.execute(
            "SELECT count(DISTINCT person_id) FROM imputed_attributes WHERE source = 'enriched'"
        ).fetchall()[0][0]
    models, enrichment = result.models, result.enrichment
    metrics = result.metrics[
        ["trait", "model", "chosen", "accuracy", "macro_f1", "ece", "train_rows", "holdout_rows"]
    ].round(4)
    drift = result.drift.sort_values("psi", ascending=False)
    yield dg.MaterializeResult(
        asset_key="imputed_attributes",
        metadata={
            **stage_metadata(result),
            "dagster/row_count": result.counts["imputed_attributes"],  # a row per person and trait
            "model_version": models.version,
            "trained": result.trained,
            "values_by_source": frame_md(result.sources.reset_index()),
            "model_scores": frame_md(metrics),
            "enrichment_table": enrichment["path"] or "none",
            "enriched_people": enriched_people,
            "this_run_enrichment_matched": enrichment["matched"],
            "this_run_enrichment_unmatched_keys": enrichment["unmatched"],
            "this_run_enrichment_without_key": enrichment["no_key"],
            "largest_drift": frame_md(drift.head(5).round(4)),
            "next_question_importance": frame_md(result.importance),
        },
    )
    yield dg.MaterializeResult(
        asset_key="trait_models", metadata={"dagster/row_count": len(metrics), "scores": frame_md(metrics)}
    )
    yield dg.MaterializeResult(
        asset_key="trait_model_drift",
        metadata={
            "dagster/row_count": len(drift),
            "max_psi": float(drift["psi"].max()) if len(drift) else 0.0,
            "features_over_warning": int((drift["psi"] > DRIFT_WARNING).sum()),
        },
    )
    yield dg.MaterializeResult(
        asset_key="trait_importance",
        metadata={"dagster/row_count": len(result.importance), "importance": frame_md(result.importance)},
    )


@dg.asset(
    deps=["imputed_attributes", "trait_importance", "segments", "cleaned_users", "deduped_users"],
    automation_condition=EAGER,
    freshness_policy=PROFILES_FRESHNESS,
    kinds={"duckdb"},
    group_name=GROUP,
    pool="duckdb",
    description="One row per person: identity, behaviour, time-decayed category affinity, traits with provenance, "
    "segment path, quality, completeness and the next question to ask.",
)
def user_profiles(
    context: dg.AssetExecutionContext,
    config: ProfilesConfig,
    warehouse: DuckDBResource,
    persona: PersonaHome,
    spark: LazyPySparkResource,
):
    engine = persona.engine()
    with warehouse.get_connection() as con:
        if engine.name == "spark":  # the category scores (read from events) on Spark, the rest here
            result = spark_stages.profiles(
                con, spark.spark_session, engine.warehouse(persona.root), persona.options(config)
            )
        else:
            result = profiles.build(con, persona.options(config), full=full_refresh(context, config))
        quality = con.execute(
            """SELECT round(avg(completeness), 3) AS mean_completeness,
                      count(*) FILTER (WHERE age_bracket IS NOT NULL) AS with_age_bracket,
                      count(*) FILTER (WHERE gender IS NOT NULL) AS with_gender,
                      count(*) FILTER (WHERE country IS NOT NULL) AS with_country,
                      count(*) FILTER (WHERE next_question IS NOT NULL) AS with_a_next_question
               FROM user_profiles"""
        ).df()
        questions = con.execute(
            "SELECT next_question, count(*) AS people FROM user_profiles GROUP BY 1 ORDER BY 2 DESC"
        ).df()
        preview = con.execute(
            """SELECT person_id, segment_name, top_category, age_bracket, age_bracket_source,
                      round(age_bracket_confidence, 2) AS age_conf, gender, gender_source, country, country_source,
                      round(completeness, 2) AS completeness, next_question
               FROM user_profiles ORDER BY total_revenue DESC LIMIT 10"""
        ).df()
    return dg.MaterializeResult(
        metadata={
            **stage_metadata(result),
            "engine": engine.name,
            "quality": frame_md(quality),
            "next_questions": frame_md(questions),
            "preview_top_spenders": frame_md(preview),
        }
    )


OBSERVED_COLUMNS = {"age_bracket": "age_bracket", "gender": "gender", "country": "country"}
CHECKS = [
    contract_check("imputed_attributes", ImputedAttributes, "imputed_attributes"),
    contract_check("trait_models", TraitModelMetrics, "trait_models"),
    contract_check("trait_model_drift", TraitModelDrift, "trait_model_drift"),
    contract_check("trait_importance", TraitImportance, "trait_importance"),
    contract_check("user_profiles", UserProfiles, "user_profiles"),
    sql_check(
        "imputed_attributes",
        "trait_models_beat_baseline",
        "SELECT trait, model, accuracy, macro_f1 FROM trait_models WHERE chosen AND NOT beats_baseline",
        "Each trait model beats the majority baseline on its holdout (accuracy and macro-F1); a model that does "
        "not is not used: its trait stays unknown.",
    ),
    sql_check(
        "imputed_attributes",
        "observed_never_overwritten",
        " UNION ALL ".join(
            f"""SELECT c.person_id, '{trait}' AS trait, c.{column} AS observed, a.value, a.source
                FROM cleaned_users c JOIN imputed_attributes a ON a.person_id = c.person_id AND a.trait = '{trait}'
                WHERE c.{column} IS NOT NULL AND (a.source <> 'observed' OR a.value IS DISTINCT FROM c.{column})"""
            for trait, column in OBSERVED_COLUMNS.items()
        ),
        "Every observed trait value is kept as observed: imputation never overwrites it.",
    ),
    sql_check(
        "imputed_attributes",
        "every_trait_has_a_source",
        """SELECT c.person_id, t.trait FROM cleaned_users c
           CROSS JOIN (VALUES ('age_bracket'), ('gender'), ('country'), ('primary_device'), ('usual_daypart')) t(trait)
           ANTI JOIN imputed_attributes a ON a.person_id = c.person_id AND a.trait = t.trait""",
        "Every person has a value or an explicit unknown, with a source, for every profile trait.",
    ),
    sql_check(
        "trait_model_drift",
        "model_inputs_stable",
        f"SELECT trait, feature, psi FROM trait_model_drift WHERE psi > {DRIFT_WARNING}",
        f"No model input drifted since training (population stability index above {DRIFT_WARNING} warns).",
        blocking=False,
    ),
    sql_check(
        "user_profiles",
        "everyone_has_a_profile",
        "SELECT c.person_id FROM cleaned_users c ANTI JOIN user_profiles p USING (person_id)",
        "Every cleaned person has exactly one profile.",
    ),
]
