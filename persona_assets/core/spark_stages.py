"""`engine: spark`: the event-scale stages run on Spark over the Parquet warehouse, and what they
write is carried into the DuckDB warehouse, where the person-level stages, the contracts'
checks, the serving snapshot and every command read it as they do under `engine: duckdb`.

The Parquet warehouse (`engine.spark_warehouse`, one folder a table) is where Spark's stages
read their inputs and write their results: raw_events and the ledger from ingest, the
identity tables, sessions and cleaned_users, category_scores. After a Spark stage has written
its tables, `carry` replaces the DuckDB copies of them in one transaction, with the stage's
refresh record, so a run killed half-way leaves the DuckDB warehouse as it was and the next
run carries the whole stage again. Tables that only grow (raw_events, quarantined_events,
ingest_files, by batch_id) take only their new batches.

What DuckDB holds that Spark's stages read goes the other way before they run (`hand_over`):
the persona merge / unmerge decisions and the erasure log. `persona forget` deletes a person
from both warehouses (`forget_in_parquet`); a forget killed between the two is finished by the
next Spark stage, which finds the erasure log ahead of the Parquet warehouse's copy.

Why copy into DuckDB and not read the Parquet tables in place: the person-level stages splice
and delete rows, the checks and the serving snapshot read DuckDB tables, and `persona forget`
deletes in one transaction; views over Parquet would give every one of them a second path. The
copy is one machine's work (DuckDB writes 20M events in seconds); at a billion events it is the
serving side's limit, see docs/scaling.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandera.pandas as pa

from persona_assets.core import refresh
from persona_assets.core.engine import parquet_glob, write_aside
from persona_assets.core.warehouse import replace_tables, table_exists, transaction

# The tables that only grow, by the key they grow along (a carry takes their new batches only; the
# ledger is replaced whole: a file that grew changes its earlier rows).
APPEND_ONLY = {"raw_events": "batch_id", "quarantined_events": "batch_id"}
# What Spark's stages read that only DuckDB writes (persona merge / unmerge, persona forget).
HANDED_OVER = ("identity_overrides", "erasure_log")


def parquet_select(warehouse: Path, table: str) -> tuple[str, dict]:
    """A SELECT of a Parquet table's rows in DuckDB, and its parameters (the path is bound, not
    pasted). Read inside `utc(con)`: Spark writes its timestamps as instants (TIMESTAMPTZ to DuckDB)."""
    param = f"parquet_{table}"
    return f"SELECT * FROM read_parquet(${param}, union_by_name = true)", {param: parquet_glob(warehouse, table)}


@contextmanager
def utc(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """The connection's time zone set to UTC while Spark's tables are read: a Spark timestamp
    (an instant) then becomes the contract's TIMESTAMP as written, whatever the machine's zone."""
    zone = con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0]
    con.execute("SET TimeZone = 'UTC'")
    try:
        yield
    finally:
        con.execute("SET TimeZone = $zone", {"zone": zone})


def has_table(warehouse: Path, table: str) -> bool:
    return any((Path(warehouse) / table).glob("*.parquet"))


def carry(
    con: duckdb.DuckDBPyConnection,
    warehouse: Path,
    stage: str | None,
    tables: Iterable[tuple[type[pa.DataFrameModel], str]],
    settings: object = None,
    before_commit: Iterable[tuple[str | Callable[[], object], dict | None]] = (),
) -> dict[str, int]:
    """Spark's tables `tables` (contract, name) into the DuckDB warehouse in one transaction, with
    `stage`'s refresh record (a full rebuild: the stages after it rebuild in full too). Returns
    each table's rows."""
    tables = list(tables)
    whole = []
    counts: dict[str, int] = {}
    params: dict = {}
    with utc(con), transaction(con):
        for model, table in tables:
            select, bound = parquet_select(warehouse, table)
            params.update(bound)
            key = APPEND_ONLY.get(table)
            if key and table_exists(con, table) and _append(con, model, table, key, select, bound):
                counts[table] = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
            else:
                whole.append((model, table, select))
        after = list(before_commit)
        if stage is not None:
            p = refresh.plan(con, stage, settings, tuple(t for _, t in tables), full=True, full_reason="built on Spark")
            after.append((lambda: refresh.record(con, p, _as_of(con), None), None))
        counts.update(replace_tables(con, whole, params, before_commit=after, transaction=False))
    return counts


def _append(
    con: duckdb.DuckDBPyConnection, model: type[pa.DataFrameModel], table: str, key: str, select: str, params: dict
) -> bool:
    """A growing table's batches past the DuckDB copy's last one, appended; False (nothing done)
    when the copy is not a prefix of Spark's table (it was rebuilt there): it is then replaced whole."""
    reached = con.execute(f'SELECT coalesce(max("{key}"), -1), count(*) FROM "{table}"').fetchall()[0]
    older = con.execute(f'SELECT count(*) FROM ({select}) WHERE "{key}" <= $reached', {**params, "reached": reached[0]})
    if older.fetchall()[0][0] != reached[1]:
        return False
    cols = ", ".join(f'"{c}"' for c in model.to_schema().columns)
    con.execute(
        f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM ({select}) WHERE "{key}" > $reached',
        {**params, "reached": reached[0]},
    )
    return True


def _as_of(con: duckdb.DuckDBPyConnection):
    from persona_assets.core.warehouse import data_as_of

    return data_as_of(con) if table_exists(con, "raw_events") else None


def export(con: duckdb.DuckDBPyConnection, warehouse: Path, table: str) -> int:
    """DuckDB table `table` as Parquet table `table` in the warehouse, written beside it and moved in
    whole (as `SparkTables.write` does). Its timestamps are written as Spark writes them (instants,
    the same UTC time), so Spark's later files in the same folder read with them. Returns its rows."""
    target = Path(warehouse) / table
    stamps = [
        name
        for name, kind in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = $t",
            {"t": table},
        ).fetchall()
        if kind == "TIMESTAMP"
    ]
    instants = f" REPLACE ({', '.join(f'{_quoted(c)}::TIMESTAMPTZ AS {_quoted(c)}' for c in stamps)})" if stamps else ""

    def copy(folder: Path) -> None:
        folder.mkdir(parents=True)
        with utc(con):
            con.execute(
                f"COPY (SELECT *{instants} FROM {_quoted(table)}) TO $file (FORMAT parquet)",
                {"file": str(folder / "part-0.parquet")},
            )

    write_aside(target, copy)
    return con.execute("SELECT count(*) FROM read_parquet($f)", {"f": str(target / "part-0.parquet")}).fetchall()[0][0]


def _quoted(table: str) -> str:
    return '"' + table.replace('"', '""') + '"'


# What each Spark stage reads that an earlier stage wrote (the ledger last: it commits ingest's tables).
STAGE_INPUTS = {
    "ingest": ("raw_events", "quarantined_events", "ingest_files"),
    "identity": ("raw_events", "identity_map", "person_id_history"),
    "cleaning": ("raw_events", "identity_map", "deduped_users"),
    "scores": ("raw_events", "identity_map", "cleaned_users"),
}


def hand_over(con: duckdb.DuckDBPyConnection, warehouse: Path, stage: str) -> None:
    """What `stage` on Spark reads, as the DuckDB warehouse has it, into the Parquet warehouse:
    the merge / unmerge decisions and the erasure log (a table DuckDB has not made yet is removed
    there too), and each input table whose Parquet copy is missing or holds another number of rows
    than DuckDB's (a home that ran on DuckDB before, or a Spark stage stopped before its carry:
    every Spark table is carried into DuckDB, so DuckDB's copy is the one the graph published). A
    forget that reached DuckDB but not the Parquet tables (killed between the two) is finished
    first; a Spark ingest whose carry into DuckDB was stopped is carried first (its ledger is ahead)."""
    if _ledger_ahead(con, warehouse):
        carry_ingest(con, warehouse)
    if _erasures_behind(con, warehouse):
        forget_in_parquet(con, warehouse)
    for table in HANDED_OVER:
        if table_exists(con, table):
            export(con, warehouse, table)
        else:
            shutil.rmtree(Path(warehouse) / table, ignore_errors=True)
    for table in STAGE_INPUTS[stage]:
        if table_exists(con, table) and _rows(con, warehouse, table) != _rows(con, None, table):
            export(con, warehouse, table)


def _rows(con: duckdb.DuckDBPyConnection, warehouse: Path | None, table: str) -> int | None:
    """A table's rows in DuckDB (warehouse None) or in the Parquet warehouse (None: it has no such table)."""
    if warehouse is None:
        return con.execute(f"SELECT count(*) FROM {_quoted(table)}").fetchall()[0][0]
    if not has_table(warehouse, table):
        return None
    select, params = parquet_select(warehouse, table)
    return con.execute(f"SELECT count(*) FROM ({select})", params).fetchall()[0][0]


def _ledger_ahead(con: duckdb.DuckDBPyConnection, warehouse: Path) -> bool:
    """Whether Spark's ledger holds a batch DuckDB's copy lacks (a carry stopped after Spark's commit)."""
    if not has_table(warehouse, "ingest_files"):
        return False
    select, params = parquet_select(warehouse, "ingest_files")
    spark_last = con.execute(f"SELECT max(batch_id) FROM ({select})", params).fetchall()[0][0]
    duck_last = (
        con.execute("SELECT max(batch_id) FROM ingest_files").fetchall()[0][0]
        if table_exists(con, "ingest_files")
        else None
    )
    return spark_last is not None and (duck_last is None or spark_last > duck_last)


def carry_ingest(con: duckdb.DuckDBPyConnection, warehouse: Path) -> None:
    """Ingest's tables (and the erasure log, whose consents ingest records) from Spark into DuckDB."""
    from persona_assets.contracts import ErasureLog, IngestFiles, QuarantinedEvents, RawEvents

    tables = [(RawEvents, "raw_events"), (QuarantinedEvents, "quarantined_events"), (IngestFiles, "ingest_files")]
    if has_table(warehouse, "erasure_log"):  # consents that arrived lift suppressions: recorded there
        tables.append((ErasureLog, "erasure_log"))
    carry(con, warehouse, None, tables)


def _erasures_behind(con: duckdb.DuckDBPyConnection, warehouse: Path) -> bool:
    """Whether DuckDB's erasure log holds an erasure the Parquet warehouse's copy lacks."""
    if not table_exists(con, "erasure_log") or not Path(warehouse).is_dir():
        return False
    if not has_table(warehouse, "erasure_log"):
        return bool(con.execute("SELECT count(*) FROM erasure_log").fetchall()[0][0])
    select, params = parquet_select(warehouse, "erasure_log")
    with utc(con):
        missing = con.execute(
            f"SELECT count(*) FROM erasure_log WHERE (erasure_hash, erased_at) NOT IN "
            f"(SELECT (erasure_hash, erased_at::TIMESTAMP) FROM ({select}))",
            params,
        )
        return bool(missing.fetchall()[0][0])


def forget_in_parquet(
    con: duckdb.DuckDBPyConnection, warehouse: Path, tables: Iterable[str] | None = None
) -> list[str]:
    """After `persona forget` committed in DuckDB: the Parquet tables it changed (`tables`; None:
    every table both warehouses hold), written again from DuckDB's copy, which no longer has the
    person; then the erasure log. Every table Spark's stages write is carried into DuckDB after each
    stage, so DuckDB's copy is Spark's table without the forgotten rows (and with the ledger's
    counts moved to lines_erased). Returns the tables rewritten."""
    warehouse = Path(warehouse)
    if not warehouse.is_dir():
        return []
    held = sorted(p.name for p in warehouse.iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = held if tables is None else [t for t in held if t in set(tables)]
    rewritten = []
    for table in wanted:
        if table != "erasure_log" and table_exists(con, table) and has_table(warehouse, table):
            export(con, warehouse, table)
            rewritten.append(table)
    if table_exists(con, "erasure_log"):
        export(con, warehouse, "erasure_log")
    return rewritten


# --- the stages, as the assets run them under engine: spark ------------------------------------


def _quiet(spark) -> None:
    """Spark's own warnings (a window over one partition, ...) are for its operators' logs, not
    for `persona run`'s output: errors only."""
    spark.sparkContext.setLogLevel("ERROR")


def ingest(con, spark, warehouse: Path, landing: Path, key: bytes, opts, run_id: str | None = None, only=None):
    """Landing files into raw_events, quarantined_events and ingest_files on Spark, then carried."""
    from persona_assets.core.ingest_spark import ingest_on_spark

    _quiet(spark)
    hand_over(con, warehouse, "ingest")
    report = ingest_on_spark(spark, landing, warehouse, key, opts, run_id=run_id, only=only)
    carry_ingest(con, warehouse)
    return report


def identity(con, spark, warehouse: Path, opts, run_id: str | None = None, retrain_linkage: bool = False):
    """identity_map, deduped_users, identity_guard and person_id_history on Spark, then carried;
    with linkage, identity_pii and identity_links written here from the records and links the run
    left in `con` (person-level), and a newly trained model saved, in the carry's transaction."""
    from dataclasses import asdict

    from persona_assets.contracts import DedupedUsers, IdentityGuard, IdentityMap, PersonIdHistory
    from persona_assets.core import linkage
    from persona_assets.core.identity import LINKAGE_LEFT, PERSON_EVENTS_VIEW, report_from_tables, resolve_on_spark

    _quiet(spark)
    hand_over(con, warehouse, "identity")
    linkage.ensure_tables(con)
    try:
        report = resolve_on_spark(spark, warehouse, opts, run_id=run_id, con=con, retrain_linkage=retrain_linkage)
        links = report.links
        tables = [
            (IdentityMap, "identity_map"),
            (DedupedUsers, "deduped_users"),
            (IdentityGuard, "identity_guard"),
            (PersonIdHistory, "person_id_history"),
        ]
        settings = {**asdict(opts), "link_model": links.model_version if links.enabled else None}
        # Linkage off (or no model yet): no links stand, and no matching traits are kept.
        after = [("DELETE FROM identity_links", None), ("DELETE FROM identity_pii", None)]
        if links.enabled:
            people = linkage.record_people_sql("identity_map")
            after += [
                (f"INSERT INTO identity_pii BY NAME {linkage.PII_SELECT.format(people=people)}", None),
                (
                    f"INSERT INTO identity_links BY NAME {linkage.LINKS_SELECT.format(people=people)}",
                    {"model_version": links.model_version},
                ),
            ]
        if report.trained_model is not None:
            model = report.trained_model
            after.append((lambda: linkage.save_model(con, model, links.records, links.model_status), None))
        carry(con, warehouse, "identity", tables, settings, before_commit=[*after, (PERSON_EVENTS_VIEW, None)])
    finally:
        for name in LINKAGE_LEFT:
            con.execute(f"DROP TABLE IF EXISTS {name}")
    # The figures a DuckDB run reports (largest people, those with several anonymousIds, history), from the carried tables.
    return report_from_tables(con, report.mode, report.why, links, run_id)


def cleaning(con, spark, warehouse: Path, opts):
    """sessions and cleaned_users on Spark, then carried."""
    from dataclasses import asdict

    from persona_assets.contracts import CleanedUsers, Sessions
    from persona_assets.core.cleaning import clean_on_spark

    _quiet(spark)
    hand_over(con, warehouse, "cleaning")
    result = clean_on_spark(spark, warehouse, opts)
    carry(con, warehouse, "cleaning", [(Sessions, "sessions"), (CleanedUsers, "cleaned_users")], asdict(opts))
    return result


def profiles(con, spark, warehouse: Path, opts):
    """user_profiles: the category scores (the part read from events) on Spark, then the profiles
    built here from them and the person-level tables, in full."""
    from persona_assets.core import profiles as stage

    _quiet(spark)
    hand_over(con, warehouse, "scores")
    stage.category_scores_on_spark(spark, warehouse, opts)
    select, params = parquet_select(warehouse, "category_scores")
    with utc(con):
        con.execute(f"CREATE OR REPLACE TEMP TABLE _spark_scores AS {select}", params)
    try:
        return stage.build(con, opts, scores="_spark_scores")
    finally:
        con.execute("DROP TABLE IF EXISTS _spark_scores")
