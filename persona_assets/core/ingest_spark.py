"""Landing files to `raw_events`, `quarantined_events` and `ingest_files` on Spark, with the rows
DuckDB's `ingest.ingest` gives for the same files and key.

One source: every rule is ingest.py's. A landing file is read and validated by ingest.py's own
staging (`stage_file_row`: the line splitter and the validation statement) in a Spark task, a
file per task, on a private single-thread DuckDB on the executor: Spark's text source gives lines
without their numbers, the splitting rules are ingest.py's (byte-order mark, overlong lines,
invalid UTF-8 per line), and the validation is written in DuckDB's JSON functions (`json_valid`,
`json_type` over a list of paths) that have no Spark function of the same meaning: a compiled
copy would risk quarantining other lines for other reasons. A gzip file cannot be
split anyway. Publishing (one copy per messageId, keyed hashes, conflicting re-deliveries, the
ledger) runs as Spark SQL: ingest.py's statements compiled by `engine.to_spark`.

So far a full build into an empty Spark warehouse: the tables are replaced by what the landing
folder holds now (no ledger of earlier runs, no erasure log). CSV, Parquet and mapped files are
refused before anything is read.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from persona_assets.contracts import IngestFiles, QuarantinedEvents, RawEvents
from persona_assets.core.engine import SparkTables
from persona_assets.core.ingest import (
    CONFLICT_LINES,
    CONFLICT_MARK,
    COPY_ROWS,
    FIRST_COPY,
    LEDGER,
    PHONE_PAIRS,
    UNREADABLE_FILES,
    FileReport,
    IngestOptions,
    IngestReport,
    LandedFile,
    checksum,
    conflict_texts,
    conflicts_sql,
    contract_params,
    copies_sql,
    create_stage,
    file_format,
    landing_files,
    phone_rows,
    quarantine_sql,
    raw_events_sql,
    refused_files,
    stage_file_row,
    stored_columns,
    valid_ids_sql,
)
from persona_assets.core.mappings import mapping_for
from persona_assets.core.pii import hmac_params

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SPARK_FORMATS = ("jsonl", "jsonl.gz")
# Spark has no row id: each staged line gets one from its file's batch and its line number.
STAGE_ROW = "batch_id * 4294967296 + line"
ROW = "s.stage_row"
# The raw_events rows holding a re-delivered copy's messageId (DuckDB finds them by row id instead).
KEPT = "FROM raw_events WHERE message_id IN (SELECT message_id FROM _copies)"
FILES_SCHEMA = (
    "batch_id BIGINT, file_name STRING, checksum STRING, size_bytes BIGINT, mtime_ns BIGINT, file_format STRING, "
    "status STRING, lines_read BIGINT, error STRING, path STRING, extends BIGINT"
)


class SparkIngestRefused(ValueError):
    """Landing files Spark cannot ingest yet: nothing was read."""


def refused_on_spark(landing: Path, opts: IngestOptions) -> dict[str, str]:
    """The landing files Spark does not read yet, each with why (DuckDB reads them all)."""
    refused = {}
    for path in landing_files(landing):
        fmt, mapping = file_format(path), mapping_for(opts.mappings, path.name)
        if fmt not in SPARK_FORMATS:
            refused[path.name] = f"{fmt} (Spark reads JSONL and JSONL.gz so far)"
        elif mapping is not None:
            refused[path.name] = f"mapped vocabulary {mapping.files!r} (Spark reads Segment events only so far)"
    return refused


def _landed(path: Path) -> LandedFile:
    info = path.stat()
    return LandedFile(path, info.st_size, info.st_mtime_ns, checksum(path), None)


def _staged_lines(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """`_stage`'s lines, each with its row key."""
    return con.sql(f"SELECT *, {STAGE_ROW} AS stage_row FROM _stage").to_arrow_table()


def _stage_file(task: tuple) -> list:
    """A Spark task: one landing file staged by ingest.py's own staging, its lines written as a Parquet
    file in `stage_dir`; gives the file's `_files` row."""
    landed, batch_id, order, opts, params, stage_dir = task
    # One thread: the executor runs a task per core already.
    with duckdb.connect(config={"threads": 1}) as con:
        create_stage(con)
        row = stage_file_row(con, landed, batch_id, order, opts, params)
        lines = _staged_lines(con)
    pq.write_table(lines, Path(stage_dir) / f"batch-{batch_id}.parquet")
    return row


def _stage(tables: SparkTables, files: list[LandedFile], opts: IngestOptions, params: dict, stage_dir: Path) -> None:
    """Stage every file, a Spark task each, as views `_stage` (the lines) and `_files` (ledger rows to be)."""
    spark = tables.spark
    stage_dir.mkdir(parents=True)
    # The stage's columns even when no file has a line (an empty landing folder): Spark reads them.
    with duckdb.connect() as con:
        create_stage(con)
        pq.write_table(_staged_lines(con), stage_dir / "columns.parquet")
    tasks = [(landed, i + 1, i + 1, opts, params, str(stage_dir)) for i, landed in enumerate(files)]
    rows = spark.sparkContext.parallelize(tasks, max(1, len(tasks))).map(_stage_file).collect()
    spark.createDataFrame(rows, FILES_SCHEMA).createOrReplaceTempView("_files")
    spark.read.parquet(str(stage_dir)).createOrReplaceTempView("_stage")


def _e164_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """`_phone_map`'s rows from (phone, region) pairs, on the executors (phonenumbers is Python)."""
    for batch in batches:
        yield from phone_rows(batch.column("phone").to_pylist(), batch.column("region").to_pylist()).to_batches()


def _phone_map(tables: SparkTables) -> None:
    """`_phone_map` as DuckDB's ingest builds it, normalized on the executors and cached (two statements read it)."""
    pairs = tables.query(PHONE_PAIRS)
    frame = pairs.mapInArrow(_e164_batches, "phone STRING, region STRING, e164 STRING").cache()
    frame.createOrReplaceTempView("_phone_map")


def _marked_stage() -> str:
    """The staged lines with the conflicting copies marked: DuckDB updates `_stage` in place with
    `CONFLICT_MARK`; a Spark view cannot be updated, so the same marks are selected."""
    marks = ", ".join(
        f"CASE WHEN c.line IS NULL THEN s.{col} ELSE {expr} END AS {col}" for col, expr in CONFLICT_MARK.items()
    )
    return f"""SELECT s.batch_id, s.line, {marks}
        FROM _stage s LEFT JOIN (SELECT * FROM _conflicts LEFT JOIN _conflict_texts USING (batch_id, line)) c
          ON s.batch_id = c.batch_id AND s.line = c.line"""


def _conflicts(tables: SparkTables, opts: IngestOptions, stored: dict[str, str], params: dict) -> None:
    """The re-delivered copies that differ from the kept one, with their text read again from their
    files on the driver (they are few: the stage keeps no text of a valid line)."""
    tables.table("_copy_rows", COPY_ROWS)
    tables.table("_copies", copies_sql(stored, ROW), params)
    tables.table("_conflicts", conflicts_sql(stored, KEPT))
    wanted = [tuple(r) for r in tables.query(CONFLICT_LINES).collect()]
    texts = conflict_texts(wanted, opts)
    rows = list(zip(*(texts.column(c).to_pylist() for c in texts.column_names)))
    tables.spark.createDataFrame(rows, "batch_id BIGINT, line BIGINT, raw STRING").createOrReplaceTempView(
        "_conflict_texts"
    )
    tables.view("_stage_marked", _marked_stage())


def _publish(tables: SparkTables, opts: IngestOptions, params: dict, run_id: str | None) -> None:
    """ingest.py's publishing statements on Spark, each table written as Parquet in turn."""
    # A full build: nothing stored before, no erased people (the empty tables the statements read).
    tables.view("raw_events", "SELECT message_id FROM _stage WHERE false")
    tables.view("ingest_files", "SELECT batch_id, file_name FROM _files WHERE false")
    tables.view("_suppressed", "SELECT batch_id, line FROM _stage WHERE false")
    _phone_map(tables)
    stored = stored_columns(opts)
    tables.table("_valid_ids", valid_ids_sql(ROW))
    tables.table("_first_copy", FIRST_COPY)
    tables.write(RawEvents, "raw_events", raw_events_sql(stored, ROW), params)
    _conflicts(tables, opts, stored, params)
    quarantined = f"{quarantine_sql('_stage_marked')} UNION ALL {UNREADABLE_FILES}"
    tables.write(QuarantinedEvents, "quarantined_events", quarantined)
    tables.write(IngestFiles, "ingest_files", LEDGER, {"run_id": run_id})


def _report(tables: SparkTables, report: IngestReport) -> None:
    """The run's files and quarantine reasons, as DuckDB's ingest reports them."""
    ledger = tables.query(
        """SELECT file_name, status, lines_read, events_kept, lines_quarantined, duplicates, lines_suppressed
           FROM ingest_files ORDER BY batch_id"""
    )
    report.files = [FileReport(*row) for row in ledger.collect()]
    reasons = tables.query("SELECT reason, count(*) AS n FROM quarantined_events GROUP BY 1 ORDER BY 2 DESC")
    report.reasons = {row[0]: row[1] for row in reasons.collect()}


def ingest_on_spark(
    spark: SparkSession,
    landing: Path,
    warehouse: Path,
    key: bytes,
    opts: IngestOptions | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
) -> IngestReport:
    """Ingest every complete file in `landing` on Spark into `warehouse` (Parquet, a folder a table),
    replacing `raw_events`, `quarantined_events` and `ingest_files`.

    Refuses (SparkIngestRefused, naming them) when a file is one Spark cannot read yet: never a
    silent skip, never half a landing folder."""
    opts = opts or IngestOptions()
    started = time.perf_counter()
    refused = refused_on_spark(landing, opts)
    if refused:
        names = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise SparkIngestRefused(f"Spark cannot ingest these landing files yet (nothing was read): {names}")
    now = now or datetime.now(UTC).replace(tzinfo=None)
    params = {**hmac_params(key), **contract_params(opts, now)}
    report = IngestReport(refusals=refused_files(landing))
    report.refused = sorted(report.refusals)
    tables = SparkTables(spark, warehouse)
    stage_dir = Path(warehouse) / f".ingest-stage-{uuid.uuid4().hex}"
    try:
        # Staging binds the contract's limits only: the hash key's pads stay out of the tasks' closures.
        _stage(tables, [_landed(p) for p in landing_files(landing)], opts, contract_params(opts, now), stage_dir)
        _publish(tables, opts, params, run_id)
        _report(tables, report)
    finally:
        if spark.catalog.tableExists("_phone_map"):
            spark.catalog.uncacheTable("_phone_map")
        for name in ("_stage", "_files", "_phone_map", "_conflict_texts"):
            spark.catalog.dropTempView(name)
        tables.drop()
        shutil.rmtree(stage_dir, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report
