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
from persona_assets.resources import ServingPublisher

# What users may query: each contract's published columns (restricted ones stay behind).
PUBLISHED = {
    "raw_events": RawEvents,
    "quarantined_events": QuarantinedEvents,
    "ingest_files": IngestFiles,
    "identity_map": IdentityMap,
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
APPEND_ONLY = {"raw_events": "batch_id", "quarantined_events": "batch_id", "ingest_files": "batch_id",
               "audience_changes": "change_id"}  # fmt: skip


# Tables looked up by key (`persona profile`): stored in key order, so DuckDB's min/max per row
# group leaves one group to read, not a scan.
LOOKUP_KEYS = {"identity_map": "identifier", "user_profiles": "person_id", "computed_traits": "person_id"}
# ... and those also indexed on it, for a point read. identity_map is not: at 20M events its
# index took 1.8 s of every publish, and its look-ups stay fast without one (p99 4.3 ms vs 2.6 ms).
INDEXED = {"user_profiles": "person_id"}


def published_tables() -> dict[str, str]:
    return {
        table: f"SELECT {', '.join(columns(model, serving_only=True))} FROM {table}"
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
def serving_snapshot(context: dg.AssetExecutionContext, warehouse: DuckDBResource, serving: ServingPublisher):
    with warehouse.get_connection() as con:
        counts = serving.publish(con, published_tables(), run_id=context.run_id, append=APPEND_ONLY, indexes=INDEXED)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(serving.path),
            "tables": dg.MetadataValue.md("\n".join(f"- `{t}`: {n} rows" for t, n in counts.items())),
            "example_query": dg.MetadataValue.md(
                '```\npersona query "SELECT segment_name, count(*) FROM user_profiles GROUP BY 1"\npersona sql\n```'
            ),
        }
    )
