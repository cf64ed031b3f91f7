"""raw_events, quarantined_events and the ingest ledger, from the files in landing."""

import dagster as dg
from dagster_duckdb import DuckDBResource
from dagster_pyspark import LazyPySparkResource

from persona_assets.automation import unread_files
from persona_assets.checks import contract_check, frame_md, sql_check
from persona_assets.contracts import HEX64, IngestFiles, QuarantinedEvents, RawEvents
from persona_assets.core import spark_stages
from persona_assets.core.ingest import ingest
from persona_assets.resources import PersonaHome
from persona_assets.settings import IngestConfig

GROUP = "ingest"


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            skippable=True,
            kinds={"duckdb"},
            group_name=GROUP,
            description="Validated Segment events, one row per messageId; email and phone as keyed hashes.",
        ),
        dg.AssetSpec(
            "quarantined_events",
            skippable=True,
            kinds={"duckdb"},
            group_name=GROUP,
            description="Every line that could not become an event: file, line number, reason, redacted text.",
        ),
        dg.AssetSpec(
            "ingest_files",
            skippable=True,
            kinds={"duckdb"},
            group_name=GROUP,
            description="The ingest ledger: each landing file read once, with lines read = kept + quarantined + duplicates (+ lines of erased people).",
        ),
    ],
    pool="duckdb",
)
def ingest_landing(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    persona: PersonaHome,
    warehouse: DuckDBResource,
    spark: LazyPySparkResource,
):
    """Reads every new complete file in PERSONA_HOME/landing (or the files the config names).

    A run for named files (the landing sensor's) that finds them already ingested materializes
    nothing, so automation downstream is not woken for nothing.
    """
    only = set(config.files) or None
    engine = persona.engine()
    with warehouse.get_connection() as con:
        if engine.name == "spark":
            report = spark_stages.ingest(
                con,
                spark.spark_session,
                engine.warehouse(persona.root),
                persona.landing,
                persona.hash_key(),
                persona.options(config),
                run_id=context.run_id,
                only=only,
            )
        else:
            report = ingest(
                con, persona.landing, persona.hash_key(), persona.options(config), run_id=context.run_id, only=only
            )
        if only and not report.files:
            context.log.info(f"Already ingested, nothing new: {', '.join(sorted(only))}")
            return
        totals = con.execute(
            """SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM quarantined_events),
                      (SELECT count(*) FROM ingest_files)"""
        ).fetchall()[0]
        # The table's own figures (every run so far), reported each time: a run that adds nothing
        # must not make the asset's page read as if the table were empty.
        ledger = con.execute(
            "SELECT coalesce(sum(lines_read), 0), coalesce(sum(duplicates), 0), "
            "coalesce(sum(lines_suppressed + lines_erased), 0) FROM ingest_files"
        ).fetchall()[0]
        preview = con.execute(
            "SELECT message_id, event_type, event_name, anonymous_id, user_id, event_at, category, price "
            "FROM raw_events ORDER BY batch_id DESC, source_line LIMIT 5"
        ).df()
        reasons = con.execute(
            "SELECT reason, count(*) AS lines, any_value(source_file) AS example_file, "
            "any_value(source_line) AS example_line FROM quarantined_events GROUP BY 1 ORDER BY 2 DESC"
        ).df()
        files = con.execute(
            "SELECT file_name, status, lines_read, events_kept, lines_quarantined, duplicates, lines_suppressed "
            "FROM ingest_files ORDER BY batch_id DESC LIMIT 20"
        ).df()
    lines = report.total("lines_read")
    kept = report.total("events_kept")
    not_read = unread_files(persona.landing)
    if not_read:
        context.log.warning("not read: " + "; ".join(f"{name} ({why})" for name, why in not_read.items()))
    context.log.info(
        f"{len(report.files)} new files, {len(report.skipped)} already ingested; "
        f"{lines} lines: {kept} kept, {report.total('lines_quarantined')} quarantined, {report.total('duplicates')} duplicates, "
        f"{report.total('lines_suppressed')} suppressed (erased people)"
    )
    yield dg.MaterializeResult(
        asset_key="raw_events",
        metadata={
            "dagster/row_count": totals[0],
            "engine": engine.name,
            "new_files": len(report.files),
            "skipped_files": len(report.skipped),
            "files_not_read": dg.MetadataValue.md(
                "\n".join(f"- `{name}`: {why}" for name, why in not_read.items()) or "none"
            ),
            "lines_read": ledger[0],
            "events_kept": totals[0],
            "duplicates": ledger[1],
            "suppressed_or_erased": ledger[2],
            "this_run_lines_read": lines,
            "this_run_events_kept": kept,
            "this_run_duplicates": report.total("duplicates"),
            "this_run_suppressed": report.total("lines_suppressed"),
            "events_per_second": round(lines / report.seconds, 1) if report.seconds and lines else 0.0,
            "seconds": round(report.seconds, 2),
            "preview": frame_md(preview),
        },
    )
    yield dg.MaterializeResult(
        asset_key="quarantined_events",
        metadata={
            "dagster/row_count": totals[1],
            "this_run_quarantined": report.total("lines_quarantined"),
            "by_reason": frame_md(reasons),
        },
    )
    yield dg.MaterializeResult(
        asset_key="ingest_files",
        metadata={"dagster/row_count": totals[2], "latest_files": frame_md(files)},
    )


# Event checks validate what the latest ingest run added; earlier rows passed when they landed.
LATEST_RUN_ROWS = (
    "WHERE batch_id >= (SELECT coalesce(min(batch_id), 0) FROM ingest_files "
    "WHERE run_id IS NOT DISTINCT FROM (SELECT run_id FROM ingest_files ORDER BY batch_id DESC LIMIT 1))"
)


CHECKS = [
    contract_check(
        "raw_events",
        RawEvents,
        "raw_events",
        where=LATEST_RUN_ROWS,
        description="Events added by the latest ingest run satisfy the RawEvents contract.",
    ),
    contract_check("quarantined_events", QuarantinedEvents, "quarantined_events", where=LATEST_RUN_ROWS),
    contract_check("ingest_files", IngestFiles, "ingest_files"),
    sql_check(
        "raw_events",
        "amounts_are_finite",
        "SELECT message_id, price, revenue FROM raw_events WHERE NOT isfinite(price) OR NOT isfinite(revenue)",
        "No price or revenue is NaN or infinite (the contract reads NaN as missing; ingest quarantines them).",
    ),
    sql_check(
        "raw_events",
        "message_id_unique",
        "SELECT message_id, count(*) AS copies FROM raw_events GROUP BY 1 HAVING count(*) > 1",
        "Each messageId is stored once: re-delivered copies are counted, not kept.",
    ),
    sql_check(
        "raw_events",
        "pii_only_as_hashes",
        f"""SELECT message_id, email_hash, phone_hash FROM raw_events
            WHERE NOT regexp_full_match(coalesce(email_hash, repeat('0', 64)), '{HEX64[1:-1]}')
               OR NOT regexp_full_match(coalesce(phone_hash, repeat('0', 64)), '{HEX64[1:-1]}')""",
        "Across all of raw_events, email and phone appear only as 64-hex keyed hashes.",
    ),
    sql_check(
        "ingest_files",
        "nothing_lost",
        """SELECT f.file_name, f.lines_read, f.events_kept, f.lines_quarantined, f.duplicates, f.lines_suppressed,
                  f.lines_erased, (SELECT count(*) FROM raw_events r WHERE r.batch_id = f.batch_id) AS events_stored
           FROM ingest_files f
           WHERE f.status = 'ingested'
             AND (f.lines_read <> f.events_kept + f.lines_quarantined + f.duplicates + f.lines_suppressed + f.lines_erased
                  OR f.events_kept <> (SELECT count(*) FROM raw_events r WHERE r.batch_id = f.batch_id))""",
        "Every line read is in raw_events, in quarantined_events, counted as a re-delivered copy, "
        "or counted as a line of an erased person (suppressed at ingest, or erased later).",
    ),
]
