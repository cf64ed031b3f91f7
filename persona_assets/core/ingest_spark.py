"""Landing files to `raw_events`, `quarantined_events` and `ingest_files` on Spark, run after run, with
the rows DuckDB's `ingest.ingest` gives after the same runs over the same files and key.

One source: every rule is ingest.py's. Which files are new (by name, size and mtime, then by
checksum) and their batch_ids are decided by ingest.py's own `new_files` and `NEXT_BATCH`, run on
the driver over the Parquet ledger. A new file is read and validated by ingest.py's own staging
(`stage_file_row`: the line splitter, the CSV and Parquet readers, a mapping's select, the
validation statement) in a Spark task, a file per task, on a private single-thread DuckDB on the
executor: Spark's text source gives lines without their numbers, and the validation is written in
DuckDB's JSON functions (`json_valid`, `json_type` over a list of paths) that have no Spark function
of the same meaning. Publishing (erasure suppression, one copy per messageId against the ids already
stored, keyed hashes, conflicting re-deliveries, the ledger) runs as Spark SQL: ingest.py's and
erasure.py's statements compiled by `engine.to_spark`.

The warehouse holds a folder of Parquet files a table. A run writes its new rows and the whole new
ledger in a folder aside, then appends its rows to `raw_events` and `quarantined_events` as files
named after its first batch (`batch-000000000007-00000.parquet`: the earlier files are never
rewritten), then replaces `erasure_log` (consents moved) and last the ledger, a folder rename each.
The ledger commits the run: the next run first deletes any file of a batch the ledger does not list
(a run killed before its ledger) and ingests those files again, so nothing is counted twice. A
reader may see a run's rows a moment before its ledger row. Read a table with
`spark.read.parquet(str(warehouse / table))` or DuckDB's `read_parquet(engine.parquet_glob(warehouse, table))`.

A file that grew by appending is read again whole, as on DuckDB: the earlier version's line
quarantine rows are withdrawn (`WITHDRAWN`, `REGROWN_LEDGER`) by writing each earlier run's
quarantine file holding them again without them; the copies wait in `.pending-<first batch>` and
replace the old files (a file rename each) once the ledger is written, or at the start of the next
run if this one stopped in between. Nothing is refused on Spark that DuckDB reads.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from persona_assets.contracts import ErasureLog, IngestFiles, QuarantinedEvents, RawEvents, columns, ddl
from persona_assets.core.engine import SparkTables, contract_select, empty_select, parquet_glob, swap_folder
from persona_assets.core.erasure import CONSENTED_LOG, SUPPRESSED, erasure_hits_sql
from persona_assets.core.faults import kill_point
from persona_assets.core.ingest import (
    CONFLICT_LINES,
    CONFLICT_MARK,
    COPY_ROWS,
    FIRST_COPY,
    LEDGER,
    NEXT_BATCH,
    PHONE_PAIRS,
    REGROWN_LEDGER,
    UNREADABLE_FILES,
    WITHDRAWN,
    FileReport,
    IngestOptions,
    IngestReport,
    LandedFile,
    conflict_texts,
    conflicts_sql,
    contract_params,
    copies_sql,
    create_stage,
    new_files,
    phone_rows,
    quarantine_sql,
    raw_events_sql,
    refused_files,
    stage_file_row,
    staged_ids_sql,
    stored_columns,
    valid_ids_sql,
)
from persona_assets.core.pii import hmac_params

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

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
    """Landing files Spark cannot ingest: nothing was read. None is refused so far (every format,
    mapping and grown file is read); kept for callers that catch it (`spark_job`)."""


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


def _stage(
    tables: SparkTables, files: list[LandedFile], first_batch: int, opts: IngestOptions, params: dict, stage_dir: Path
) -> None:
    """Stage every file, a Spark task each, as views `_stage` (the lines) and `_files` (ledger rows to be)."""
    spark = tables.spark
    stage_dir.mkdir(parents=True)
    # The stage's columns even when no file has a line (an empty landing folder): Spark reads them.
    with duckdb.connect() as con:
        create_stage(con)
        pq.write_table(_staged_lines(con), stage_dir / "columns.parquet")
    tasks = [(landed, first_batch + i, i + 1, opts, params, str(stage_dir)) for i, landed in enumerate(files)]
    rows = spark.sparkContext.parallelize(tasks, max(1, len(tasks))).map(_stage_file).collect()
    spark.createDataFrame(rows, FILES_SCHEMA).createOrReplaceTempView("_files")
    spark.read.parquet(str(stage_dir)).createOrReplaceTempView("_staged_lines")
    spark.sql("SELECT * FROM _staged_lines").createOrReplaceTempView("_stage")


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


def _stored(tables: SparkTables, model: type, table: str) -> str:
    """Warehouse table `table` as it stands before this run, as view `_stored_<table>` (empty in the
    contract's columns when no run wrote it yet)."""
    name = f"_stored_{table}"
    if _has_parquet(tables.path(table)):
        tables.parquet(name, tables.path(table))
    else:
        tables.view(name, empty_select(model))
    return name


def _has_parquet(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.parquet"))


def _suppress(tables: SparkTables, stored: dict[str, str], params: dict) -> None:
    """Erasure suppression as DuckDB's ingest does it (`erasure.suppress_staged`): `_suppressed` holds
    the erased people's staged lines, `_stage` becomes the lines without them, and `erasure_log` the
    log with consents moved (written with the run)."""
    _stored(tables, ErasureLog, "erasure_log")
    tables.view("erasure_log", "SELECT * FROM _stored_erasure_log")
    tables.table("_erasure_hits", erasure_hits_sql(staged_ids_sql(stored)), params)
    tables.table("_consented_log", CONSENTED_LOG)
    tables.view("erasure_log", "SELECT * FROM _consented_log")
    tables.table("_suppressed", SUPPRESSED)
    tables.view(
        "_stage", "SELECT * FROM _staged_lines s ANTI JOIN _suppressed x ON s.batch_id = x.batch_id AND s.line = x.line"
    )


def _withdraw_regrown(tables: SparkTables, run_dir: Path) -> None:
    """DuckDB's `_withdraw_regrown` for the files that grew by appending: `_earlier_ledger` is the
    ledger with their earlier versions' rows as many lines fewer (`REGROWN_LEDGER`), and each earlier
    run's quarantine file holding `WITHDRAWN` rows is written again without them, in `run_dir/pending`
    under its own name, to replace it once the ledger is committed (`_apply_pending`)."""
    if not tables.scalar("SELECT count(*) FROM _files WHERE extends IS NOT NULL"):
        tables.view("_earlier_ledger", "SELECT * FROM _stored_ingest_files")
        return
    tables.view("quarantined_events", "SELECT * FROM _stored_quarantined_events")
    tables.table("_regrown", REGROWN_LEDGER)
    counts = ("lines_read", "lines_quarantined")
    cols = ", ".join(f"coalesce(w.{c}, l.{c}) AS {c}" if c in counts else f"l.{c}" for c in columns(IngestFiles))
    tables.view("_earlier_ledger", f"SELECT {cols} FROM _stored_ingest_files l LEFT JOIN _regrown w USING (batch_id)")
    folder = tables.path("quarantined_events")
    files = tables.spark.read.parquet(str(folder)).selectExpr("*", "_metadata.file_path AS _file")
    files.createOrReplaceTempView("_quarantine_files")
    holding = tables.query(f"SELECT DISTINCT _file FROM _quarantine_files WHERE {WITHDRAWN}")
    pending = run_dir / "pending" / "quarantined_events"
    pending.mkdir(parents=True)
    for (uri,) in holding.collect():
        path = Path(unquote(urlparse(uri).path))
        if path.parent.resolve() != folder.resolve():
            raise RuntimeError(f"quarantined_events rows read from {uri}, not from {folder}")
        tables.parquet("_rewritten", path)
        kept = tables.query(f"SELECT * FROM _rewritten WHERE NOT ({WITHDRAWN})")
        kept.coalesce(1).write.parquet(str(run_dir / "rewritten" / path.name))
        next((run_dir / "rewritten" / path.name).glob("part-*.parquet")).rename(pending / path.name)


def _apply_pending(warehouse: Path, pending: Path) -> None:
    """Put a committed run's rewritten files of earlier runs in place (a file rename each), then drop
    the folder: done after the ledger's swap, or by the next run if this one was stopped before."""
    for part in sorted((pending / "quarantined_events").glob("*.parquet")):
        os.replace(part, warehouse / "quarantined_events" / part.name)
    shutil.rmtree(pending)


def _publish(tables: SparkTables, opts: IngestOptions, params: dict, run_id: str | None, run_dir: Path) -> None:
    """ingest.py's publishing statements on Spark, over the tables as earlier runs left them: the run's
    new rows and the whole new ledger are written in `run_dir`, to be moved in by `_commit`."""
    _stored(tables, RawEvents, "raw_events")
    _stored(tables, QuarantinedEvents, "quarantined_events")
    _stored(tables, IngestFiles, "ingest_files")
    tables.view("raw_events", "SELECT * FROM _stored_raw_events")
    tables.view("ingest_files", "SELECT * FROM _stored_ingest_files")
    _withdraw_regrown(tables, run_dir)
    _phone_map(tables)
    stored = stored_columns(opts)
    if _has_parquet(tables.path("erasure_log")):
        _suppress(tables, stored, params)
    else:
        tables.view("_suppressed", "SELECT batch_id, line FROM _staged_lines WHERE false")
    tables.table("_valid_ids", valid_ids_sql(ROW))
    tables.table("_first_copy", FIRST_COPY)
    _write_aside(tables, RawEvents, "raw_events", raw_events_sql(stored, ROW), run_dir, params)
    tables.view("raw_events", "SELECT * FROM _stored_raw_events UNION ALL SELECT * FROM _new_raw_events")
    _conflicts(tables, opts, stored, params)
    quarantined = f"{quarantine_sql('_stage_marked')} UNION ALL {UNREADABLE_FILES}"
    _write_aside(tables, QuarantinedEvents, "quarantined_events", quarantined, run_dir)
    # The ledger counts the run's own rows (its batches are in no earlier run's rows).
    tables.view("raw_events", "SELECT * FROM _new_raw_events")
    tables.view("quarantined_events", "SELECT * FROM _new_quarantined_events")
    ledger = f"SELECT * FROM _earlier_ledger UNION ALL {contract_select(IngestFiles, LEDGER)}"
    _write_aside(tables, IngestFiles, "ingest_files", ledger, run_dir, {"run_id": run_id})
    if tables.spark.catalog.tableExists("_consented_log"):
        _write_aside(tables, ErasureLog, "erasure_log", "SELECT * FROM _consented_log", run_dir)


def _write_aside(
    tables: SparkTables, model: type, table: str, select: str, run_dir: Path, params: dict | None = None
) -> None:
    """`select`'s rows in the contract's columns written as Parquet in `run_dir/<table>`, and read back
    as view `_new_<table>` (computed once)."""
    folder = run_dir / table
    tables.query(contract_select(model, select), params).write.parquet(str(folder))
    tables.parquet(f"_new_{table}", folder)


# A run's rows of an append-only table are files named after the run's first batch: a file of a
# batch the ledger does not list is from a run killed before its ledger was written.
RUN_FILE = re.compile(r"^batch-(\d+)-")
APPENDED = ("raw_events", "quarantined_events")
REPLACED = ("erasure_log", "ingest_files")  # the ledger last: it commits the run


def _commit(warehouse: Path, run_dir: Path, first_batch: int) -> None:
    """Move the run's files into the warehouse: its rows of the append-only tables appended (a file
    rename each), then the erasure log and the ledger replaced (a folder rename each), the ledger
    last. A run killed before the ledger is moved is done again by the next (`_drop_uncommitted`)."""
    for table in APPENDED:
        target = warehouse / table
        target.mkdir(exist_ok=True)
        for i, part in enumerate(sorted((run_dir / table).glob("part-*.parquet"))):
            # An empty part file is kept only to give a new table its columns.
            if pq.ParquetFile(part).metadata.num_rows or not _has_parquet(target):
                part.rename(target / f"batch-{first_batch:012d}-{i:05d}.parquet")
    pending = warehouse / f".pending-{first_batch}"
    if (run_dir / "pending").exists():
        (run_dir / "pending").rename(pending)
    for table in REPLACED:
        if table == "ingest_files":
            kill_point(["raw_events", "ingest_files"])
        if (run_dir / table).exists():
            swap_folder(run_dir / table, warehouse / table)
    if pending.exists():
        _apply_pending(warehouse, pending)


def _drop_uncommitted(warehouse: Path, committed: int) -> None:
    """Before a run: take out what a run stopped before its ledger was written left (its append-only
    files, of batches above the ledger's last; its folders aside; its pending rewrites), and put in
    place the pending rewrites of a run stopped after its ledger. One writer at a time, as on DuckDB."""
    for table in APPENDED:
        for part in (warehouse / table).glob("batch-*.parquet"):
            found = RUN_FILE.match(part.name)
            if found and int(found.group(1)) > committed:
                part.unlink()
    for aside in warehouse.glob(".ingest-*"):
        shutil.rmtree(aside, ignore_errors=True)
    for pending in warehouse.glob(".pending-*"):
        if int(pending.name.removeprefix(".pending-")) <= committed:
            _apply_pending(warehouse, pending)
        else:
            shutil.rmtree(pending)


def _ledger(warehouse: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding the Spark warehouse's ledger as table `ingest_files`, so ingest.py's
    own `new_files` and `NEXT_BATCH` decide what is new."""
    con = duckdb.connect()
    con.execute(ddl(IngestFiles, "ingest_files"))
    if _has_parquet(warehouse / "ingest_files"):
        con.execute(
            "INSERT INTO ingest_files BY NAME SELECT * FROM read_parquet($p)",
            {"p": parquet_glob(warehouse, "ingest_files")},
        )
    return con


def _report(tables: SparkTables, report: IngestReport) -> None:
    """The run's files and quarantine reasons, as DuckDB's ingest reports them."""
    ledger = tables.query(
        """SELECT file_name, status, lines_read, events_kept, lines_quarantined, duplicates, lines_suppressed
           FROM _new_ingest_files WHERE batch_id IN (SELECT batch_id FROM _files) ORDER BY batch_id"""
    )
    report.files = [FileReport(*row) for row in ledger.collect()]
    reasons = tables.query("SELECT reason, count(*) AS n FROM _new_quarantined_events GROUP BY 1 ORDER BY 2 DESC")
    report.reasons = {row[0]: row[1] for row in reasons.collect()}


def _new_landed(
    warehouse: Path, landing: Path, only: set[str] | None, report: IngestReport
) -> tuple[list[LandedFile], int]:
    """The landing files not in the ledger (ingest.py's `new_files`), and the batch_id of the first."""
    with _ledger(warehouse) as con:
        committed = con.execute(NEXT_BATCH).fetchall()[0][0] - 1
        _drop_uncommitted(warehouse, committed)
        files = list(new_files(con, landing, only, report))
    return files, committed + 1


def ingest_on_spark(
    spark: SparkSession,
    landing: Path,
    warehouse: Path,
    key: bytes,
    opts: IngestOptions | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
    *,
    only: set[str] | None = None,
) -> IngestReport:
    """Ingest the new complete files in `landing` (or, with `only`, those of the names given) on Spark
    into `warehouse` (Parquet, a folder a table), as DuckDB's `ingest` does: the files the ledger
    lists are skipped, the new ones get the next batch_ids, their rows are appended to `raw_events`
    and `quarantined_events`, and the ledger `ingest_files` is written last."""
    opts = opts or IngestOptions()
    started = time.perf_counter()
    warehouse = Path(warehouse)
    warehouse.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(UTC).replace(tzinfo=None)
    params = {**hmac_params(key), **contract_params(opts, now)}
    report = IngestReport(refusals=refused_files(landing))
    files, first_batch = _new_landed(warehouse, landing, only, report)
    report.refused = sorted(report.refusals)
    if not files and all(_has_parquet(warehouse / t) for t in (*APPENDED, "ingest_files")):
        report.seconds = time.perf_counter() - started
        return report
    tables = SparkTables(spark, warehouse)
    run_dir = warehouse / f".ingest-{uuid.uuid4().hex}"
    try:
        # Staging binds the contract's limits only: the hash key's pads stay out of the tasks' closures.
        _stage(tables, files, first_batch, opts, contract_params(opts, now), run_dir / "stage")
        _publish(tables, opts, params, run_id, run_dir)
        if files:
            _report(tables, report)
        _commit(warehouse, run_dir, first_batch)
    finally:
        if spark.catalog.tableExists("_phone_map"):
            spark.catalog.uncacheTable("_phone_map")
        for name in ("_staged_lines", "_stage", "_files", "_phone_map", "_conflict_texts", "_quarantine_files"):
            spark.catalog.dropTempView(name)
        tables.drop()
        shutil.rmtree(run_dir, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report
