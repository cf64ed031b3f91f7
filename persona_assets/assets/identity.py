"""deduped_users and identity_map: people from identifiers seen together."""

import base64
import json

import dagster as dg
from dagster_duckdb import DuckDBResource
from dagster_pyspark import LazyPySparkResource

from persona_assets.automation import EAGER, full_refresh
from persona_assets.checks import contract_check, frame_md, markdown, sql_check, stage_metadata
from persona_assets.contracts import (
    DedupedUsers,
    IdentityGuard,
    IdentityLinks,
    IdentityMap,
    IdentityPii,
    PersonIdHistory,
)
from persona_assets.core import linkage, spark_stages
from persona_assets.core.identity import resolve
from persona_assets.resources import PersonaHome
from persona_assets.settings import IdentityConfig

GROUP = "identity"


def _spec(name: str, description: str, kinds: frozenset = frozenset({"duckdb"})) -> dg.AssetSpec:
    """One table the identity step writes: all read raw_events and refresh together."""
    return dg.AssetSpec(
        name,
        deps=["raw_events"],
        automation_condition=EAGER,
        kinds=set(kinds),
        group_name=GROUP,
        description=description,
    )


@dg.multi_asset(
    specs=[
        _spec(
            "deduped_users", "One row per person; traits survive by most recent non-null value, with time and message."
        ),
        _spec("identity_map", "identifier_type, identifier (email/phone as keyed hash), person_id."),
        _spec("identity_guard", "Identifiers kept out of linking: shared devices, junk emails, call-centre phones."),
        _spec(
            "identity_links",
            "Probabilistic links between people who share no identifier: probability, match weights per comparison, "
            "and whether they merged.",
            frozenset({"duckdb", "splink"}),
        ),
        _spec("identity_pii", "Restricted: the names, birth dates and places linkage compares. Never published."),
        _spec("person_id_history", "old -> new person_id when people merge or split."),
    ],
    pool="duckdb",
)
def resolve_identities(
    context: dg.AssetExecutionContext,
    config: IdentityConfig,
    warehouse: DuckDBResource,
    persona: PersonaHome,
    spark: LazyPySparkResource,
):
    engine = persona.engine()
    with warehouse.get_connection() as con:
        if engine.name == "spark":
            report = spark_stages.identity(
                con,
                spark.spark_session,
                engine.warehouse(persona.root),
                persona.options(config),
                context.run_id,
                retrain_linkage=config.retrain_linkage,
            )
        else:
            report = resolve(
                con,
                persona.options(config),
                run_id=context.run_id,
                full=full_refresh(context, config),
                retrain_linkage=config.retrain_linkage,
            )
        link_rows = con.execute(
            "SELECT status, count(*) AS links, round(avg(match_probability), 4) AS mean_probability "
            "FROM identity_links GROUP BY 1 ORDER BY 1"
        ).df()
        pii_rows = con.execute("SELECT count(*) FROM identity_pii").fetchall()[0][0]
        chart = linkage.weights_png(con, config.link_threshold) if report.links.enabled else None
        in_use = con.execute(
            f"SELECT settings FROM {linkage.MODEL_TABLE} WHERE version = ?", [report.links.model_version]
        ).fetchall()
        model = json.loads(in_use[0][0]) if in_use and report.links.enabled else None
        guard = con.execute(
            "SELECT identifier_type, reason, count(*) AS identifiers FROM identity_guard GROUP BY 1, 2 ORDER BY 3 DESC"
        ).df()
        sizes = con.execute(
            "SELECT anonymous_id_count AS anonymous_ids, count(*) AS people FROM deduped_users GROUP BY 1 ORDER BY 1"
        ).df()
        preview = con.execute(
            "SELECT person_id, identifier_count, event_count, first_seen_at, last_seen_at, country, gender "
            "FROM deduped_users ORDER BY event_count DESC LIMIT 5"
        ).df()
        history_rows = con.execute("SELECT count(*) FROM person_id_history").fetchall()[0][0]
    yield dg.MaterializeResult(
        asset_key="deduped_users",
        metadata={
            **stage_metadata(report),
            "engine": engine.name,
            "identifiers_in": report.identifiers,
            "people_out": report.people,
            "people_with_several_anonymous_ids": report.multi_identifier_people,
            "largest_components": markdown(report.largest, ["person_id", "identifiers"]),
            "anonymous_ids_per_person": frame_md(sizes),
            "preview": frame_md(preview),
        },
    )
    yield dg.MaterializeResult(asset_key="identity_map", metadata={"dagster/row_count": report.identifiers})
    yield dg.MaterializeResult(
        asset_key="identity_guard",
        metadata={
            "dagster/row_count": report.guard_hits,
            "guard_hits": frame_md(guard),
        },
    )
    links = report.links
    link_meta = {
        "enabled": links.enabled,
        "threshold": config.link_threshold,
        "records_compared": links.records,
        "candidate_pairs": links.candidate_pairs,
        "links_above_threshold": links.links,
        "merges": links.merges,
        "blocked_by_user_id_guard": links.blocked,
        "model_version": links.model_version or 0,
        "model_trained_this_run": links.trained,
        "links_by_status": frame_md(link_rows),
    }
    if links.note:
        link_meta["note"] = links.note
    if links.left_out:
        # Blocking's budget of pairs left the most common keys out (see IdentityOptions.link_pairs_per_record).
        link_meta["blocking_left_out"] = dg.MetadataValue.md("\n".join(f"- {k}" for k in links.left_out))
    if links.enabled:
        # How the model in use was made; `persona run` prints a status that is not "fitted".
        link_meta["model_status"] = links.model_status
        link_meta["status"] = (
            f"linked with a fallback model, not EM's: {'; '.join(links.problems[:2]) or 'see model_status'}"
            + (f" (and {len(links.problems) - 2} more in em_model_problems)" if len(links.problems) > 2 else "")
            if links.fallback
            else "fitted"
        )
        if links.problems:
            link_meta["em_model_problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in links.problems))
    if links.by_threshold:
        link_meta["links_at_each_threshold"] = markdown(
            [(f"{t:g}", n) for t, n in links.by_threshold], ["match probability at least", "pairs (compared this run)"]
        )
    if model:
        png = base64.b64encode(linkage.model_png(model, links.model_status)).decode()
        link_meta["model_match_weights"] = dg.MetadataValue.md(
            f"![match weight per comparison](data:image/png;base64,{png})"
        )
        link_meta["model_match_weights_table"] = markdown(
            [(c, lv, "no estimate" if w is None else f"{w:+.2f}") for c, lv, w in linkage.model_weights(model)],
            ["comparison", "level", "match weight"],
        )
    if chart:
        png = base64.b64encode(chart).decode()
        link_meta["match_weights"] = dg.MetadataValue.md(f"![match weights](data:image/png;base64,{png})")
    yield dg.MaterializeResult(
        asset_key="identity_links", metadata={"dagster/row_count": int(link_rows["links"].sum()), **link_meta}
    )
    yield dg.MaterializeResult(asset_key="identity_pii", metadata={"dagster/row_count": pii_rows})
    yield dg.MaterializeResult(
        asset_key="person_id_history", metadata={"dagster/row_count": history_rows, "changes_this_run": report.history}
    )


CHECKS = [
    contract_check("deduped_users", DedupedUsers, "deduped_users"),
    contract_check("identity_map", IdentityMap, "identity_map"),
    contract_check("identity_guard", IdentityGuard, "identity_guard"),
    contract_check("person_id_history", PersonIdHistory, "person_id_history"),
    contract_check("identity_links", IdentityLinks, "identity_links"),
    contract_check("identity_pii", IdentityPii, "identity_pii"),
    sql_check(
        "identity_map",
        "every_anonymous_id_has_one_person",
        """SELECT e.anonymous_id, count(DISTINCT m.person_id) AS people
           FROM (SELECT DISTINCT anonymous_id FROM raw_events WHERE anonymous_id IS NOT NULL) e
           LEFT JOIN identity_map m ON m.identifier_type = 'anonymous_id' AND m.identifier = e.anonymous_id
           GROUP BY 1 HAVING count(DISTINCT m.person_id) <> 1""",
        "Every anonymousId in raw_events maps to exactly one person.",
    ),
]
