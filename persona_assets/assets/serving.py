"""The serving snapshot users query with DuckDB while runs write the warehouse."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from persona_assets.automation import EAGER
from persona_assets.contracts import (
    AudienceChanges,
    AudienceMembers,
    AudienceRuns,
    CleanedUsers,
    ComputedTraits,
    DestinationDeadLetters,
    DestinationDeliveries,
    IdentityLinks,
    IdentityMap,
    ImputedAttributes,
    IngestFiles,
    PersonIdHistory,
    QuarantinedEvents,
    RawEvents,
    SegmentCatalog,
    Segments,
    Sessions,
    TraitImportance,
    TraitModelMetrics,
    UserProfiles,
    columns,
)
from persona_assets.resources import PersonaHome, ServingPublisher

# What users may query: each contract's published columns (restricted ones stay behind).
PUBLISHED = {
    "raw_events": RawEvents,
    "quarantined_events": QuarantinedEvents,
    "ingest_files": IngestFiles,
    "identity_map": IdentityMap,
    "identity_links": IdentityLinks,
    "cleaned_users": CleanedUsers,
    "sessions": Sessions,
    "segments": Segments,
    "segment_catalog": SegmentCatalog,
    "imputed_attributes": ImputedAttributes,
    "trait_models": TraitModelMetrics,
    "trait_importance": TraitImportance,
    "person_id_history": PersonIdHistory,
    "user_profiles": UserProfiles,
    "computed_traits": ComputedTraits,
    "audience_members": AudienceMembers,
    "audience_changes": AudienceChanges,
    "audience_runs": AudienceRuns,
    "destination_deliveries": DestinationDeliveries,
    "destination_dead_letters": DestinationDeadLetters,
}


# Tables that only ever grow, by the key they grow along: a publish adds only their new rows.
APPEND_ONLY = {
    "raw_events": "batch_id",
    "quarantined_events": "batch_id",
    "ingest_files": "batch_id",
    "audience_changes": "change_id",
}


# Tables looked up by key (`persona profile`): stored in key order, so DuckDB's min/max per row
# group leaves one group to read, not a scan.
LOOKUP_KEYS = {"identity_map": "identifier", "user_profiles": "person_id", "computed_traits": "person_id"}
# ... and those also indexed on it, for a point read. identity_map is not: at 20M events its
# index took 1.8 s of every publish, and its look-ups stay fast without one (p99 4.3 ms vs 2.6 ms).
INDEXED = {"user_profiles": "person_id"}


# Tables a warehouse built before audiences existed (or by the core stages alone, as the bench
# does) may not have yet: published empty, with their columns, instead of failing the publish.
MAY_BE_MISSING = (
    "computed_traits",
    "audience_members",
    "audience_changes",
    "audience_runs",
    "destination_deliveries",
    "destination_dead_letters",
)


def _empty(model) -> str:
    schema = model.to_schema()
    cells = ", ".join(f'NULL::{schema.columns[c].metadata["sql"]} AS "{c}"' for c in columns(model, serving_only=True))
    return f"SELECT {cells} LIMIT 0"


def published_tables(con=None) -> dict[str, str]:
    """Each published table's SELECT; with the warehouse connection `con`, tables it does not
    have yet (MAY_BE_MISSING) are published empty."""
    missing = set()
    if con is not None:
        from persona_assets.core.warehouse import table_exists

        missing = {t for t in MAY_BE_MISSING if not table_exists(con, t)}
    return {
        table: _empty(model)
        if table in missing
        else f"SELECT {', '.join(columns(model, serving_only=True))} FROM {table}"
        + (f" ORDER BY {LOOKUP_KEYS[table]}" if table in LOOKUP_KEYS else "")
        for table, model in PUBLISHED.items()
    }


@dg.asset(
    deps=list(PUBLISHED),
    automation_condition=EAGER,
    kinds={"duckdb"},
    group_name="serving",
    pool="duckdb",
    description="serving/persona.duckdb: a read-only snapshot of the published tables, swapped in atomically.",
)
def serving_snapshot(
    context: dg.AssetExecutionContext, warehouse: DuckDBResource, serving: ServingPublisher, persona: PersonaHome
):
    engine = persona.engine().name
    with warehouse.get_connection() as con:
        counts = serving.publish(
            con, published_tables(con), run_id=context.run_id, append=APPEND_ONLY, indexes=INDEXED, engine=engine
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(serving.path),
            "engine": engine,
            "tables": dg.MetadataValue.md("\n".join(f"- `{t}`: {n} rows" for t, n in counts.items())),
            "example_query": dg.MetadataValue.md(
                '```\npersona query "SELECT segment_name, count(*) FROM user_profiles GROUP BY 1"\npersona sql\n```'
            ),
        }
    )
