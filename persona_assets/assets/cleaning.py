"""cleaned_users and sessions: behaviour, cleaned traits, sparsity and outliers per person."""

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource
from dagster_pyspark import LazyPySparkResource

from persona_assets.automation import EAGER, full_refresh
from persona_assets.checks import contract_check, frame_md, sql_check, stage_metadata
from persona_assets.contracts import CleanedUsers, Sessions
from persona_assets.core import spark_stages
from persona_assets.core.cleaning import OUTLIER_FEATURES, clean
from persona_assets.resources import PersonaHome
from persona_assets.settings import CleaningConfig

GROUP = "cleaning"


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "cleaned_users",
            deps=["deduped_users", "identity_map"],
            automation_condition=EAGER,
            kinds={"duckdb"},
            group_name=GROUP,
            description="Per person: sessions, orders, revenue, mixes, cleaned traits, missing_ratio, outlier flags.",
        ),
        dg.AssetSpec(
            "sessions",
            deps=["identity_map"],
            automation_condition=EAGER,
            kinds={"duckdb"},
            group_name=GROUP,
            description="Each person's sessions (30-minute gap), with 10-hour sessions and bot bursts flagged.",
        ),
    ],
    pool="duckdb",
)
def clean_users(
    context: dg.AssetExecutionContext,
    config: CleaningConfig,
    warehouse: DuckDBResource,
    persona: PersonaHome,
    spark: LazyPySparkResource,
):
    engine = persona.engine()
    with warehouse.get_connection() as con:
        if engine.name == "spark":
            result = spark_stages.cleaning(
                con, spark.spark_session, engine.warehouse(persona.root), persona.options(config)
            )
        else:
            result = clean(con, persona.options(config), full=full_refresh(context, config))
        quality = con.execute(
            """SELECT count(*) AS people, count(*) FILTER (WHERE is_sparse) AS sparse,
                      count(*) FILTER (WHERE is_bot) AS bots, count(*) FILTER (WHERE has_long_session) AS long_sessions,
                      count(*) FILTER (WHERE exclude_from_fitting) AS excluded_from_fitting,
                      round(avg(missing_ratio), 3) AS mean_missing_ratio
               FROM cleaned_users"""
        ).df()
        outliers = con.execute(
            "SELECT flag AS feature, count(*) AS people FROM (SELECT unnest(outlier_flags) AS flag FROM cleaned_users) "
            "GROUP BY 1 ORDER BY 2 DESC"
        ).df()
        issues = con.execute(
            "SELECT issue, count(*) AS people FROM (SELECT unnest(trait_issues) AS issue FROM cleaned_users) "
            "GROUP BY 1 ORDER BY 2 DESC"
        ).df()
        flagged_sessions = con.execute(
            "SELECT count(*) FILTER (WHERE is_long), count(*) FILTER (WHERE is_burst) FROM sessions"
        ).fetchall()[0]
    yield dg.MaterializeResult(
        asset_key="cleaned_users",
        metadata={
            **stage_metadata(result),
            "engine": engine.name,
            "quality": frame_md(quality),
            "outliers_per_feature": dg.MetadataValue.md(
                outliers.to_markdown(index=False) if len(outliers) else "_none_"
            ),
            "features_checked": ", ".join(OUTLIER_FEATURES),
            # Where each line was drawn, in the feature's own units, and why a feature flags nobody.
            "fences": frame_md(pd.DataFrame(result.fences)),
            "trait_issues": frame_md(issues),
        },
    )
    yield dg.MaterializeResult(
        asset_key="sessions",
        metadata={
            "dagster/row_count": result.counts["sessions"],
            "long_sessions": flagged_sessions[0],
            "burst_sessions": flagged_sessions[1],
        },
    )


CHECKS = [
    contract_check("cleaned_users", CleanedUsers, "cleaned_users"),
    contract_check("sessions", Sessions, "sessions"),
    sql_check(
        "cleaned_users",
        "nobody_dropped",
        """SELECT d.person_id, 'missing' AS problem FROM deduped_users d ANTI JOIN cleaned_users c USING (person_id)
           WHERE d.consent IS DISTINCT FROM 'declined'
           UNION ALL
           SELECT person_id, 'declined personalization but profiled' FROM cleaned_users
           WHERE person_id IN (SELECT person_id FROM deduped_users WHERE consent = 'declined')""",
        "Sparse people and outliers stay: every deduped person has a cleaned row, except those who "
        "declined personalization, who have none.",
    ),
]
