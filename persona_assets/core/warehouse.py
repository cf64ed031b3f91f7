"""Warehouse table plumbing: build under a temporary name, swap in one transaction."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import duckdb
import pandera.pandas as pa

from persona_assets.contracts import ddl
from persona_assets.core.faults import kill_point

MEMORY_ENV = "PERSONA_DUCKDB_MEMORY_LIMIT"


def connection_config() -> dict[str, str]:
    """DuckDB settings for warehouse connections: a memory limit (default 5GB) past which
    DuckDB spills to disk, so a big landing folder cannot take the machine's memory."""
    return {"memory_limit": os.environ.get(MEMORY_ENV, "5GB")}


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One warehouse transaction: committed when the block ends, rolled back if anything in it
    raises (or the process is stopped), so no reader ever sees half of it."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


class Scratch:
    """The temporary tables one step makes for itself, by name, dropped when the step ends."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.names: list[str] = []

    def table(self, name: str, select: str, params: dict | list | None = None) -> str:
        """(Re)create temp table `name` from a SELECT; returns the name to read it by."""
        self.con.execute(f'CREATE OR REPLACE TEMP TABLE "{name}" AS {select}', params)
        return self.adopt(name)

    def scalar(self, select: str, params: dict | list | None = None):
        """The one value a SELECT gives (a count an iterative step stops on)."""
        return self.con.execute(select, params).fetchall()[0][0]

    def adopt(self, name: str) -> str:
        """Drop `name` with the rest (a temp table another function made for this step)."""
        if name not in self.names:
            self.names.append(name)
        return name

    def drop(self) -> None:
        for name in reversed(self.names):
            self.con.execute(f'DROP TABLE IF EXISTS "{name}"')
        self.names.clear()


@contextmanager
def scratch(con: duckdb.DuckDBPyConnection) -> Iterator[Scratch]:
    """`with scratch(con) as s:` temp tables made through `s` are gone when the block ends, however it ends."""
    s = Scratch(con)
    try:
        yield s
    finally:
        s.drop()


def bind(sql: str, params: dict | None) -> dict:
    """Only the parameters the statement names (DuckDB refuses extra ones)."""
    return {k: v for k, v in (params or {}).items() if f"${k}" in sql}


@contextmanager
def transaction_if(con: duckdb.DuckDBPyConnection, begin: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """`transaction(con)`, or nothing when the caller's own transaction is already open."""
    if not begin:
        yield con
        return
    with transaction(con):
        yield con


def replace_tables(
    con: duckdb.DuckDBPyConnection,
    tables: Iterable[tuple[type[pa.DataFrameModel], str, str]],
    params: dict | None = None,
    before_commit: Iterable[tuple[str | Callable[[], object], dict | None]] = (),
    transaction: bool = True,
) -> dict[str, int]:
    """Rebuild each (contract, table, SELECT) under a temporary name and swap them all in at once.

    The SELECT's columns are matched by name to the contract's DDL. `before_commit`
    statements (or callables) run inside the same transaction (e.g. appending history). A failure
    anywhere leaves every table as it was. `transaction=False`: the caller has already begun it.
    """
    counts: dict[str, int] = {}
    with transaction_if(con, transaction):
        for model, table, select in tables:
            tmp = f"{table}__new"
            con.execute(f'DROP TABLE IF EXISTS "{tmp}"')
            con.execute(ddl(model, tmp))
            sql = f'INSERT INTO "{tmp}" BY NAME {select}'
            con.execute(sql, bind(sql, params))
            con.execute(f'DROP TABLE IF EXISTS "{table}"')
            con.execute(f'ALTER TABLE "{tmp}" RENAME TO "{table}"')
            counts[table] = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
        for sql, sql_params in before_commit:
            if callable(sql):
                sql()
            else:
                con.execute(sql, bind(sql, sql_params))
        kill_point(counts)
    return counts


def replace_frames(
    con: duckdb.DuckDBPyConnection,
    tables: Iterable[tuple[type[pa.DataFrameModel], str, object]],
    before_commit: Callable[[], object] | None = None,
) -> dict[str, int]:
    """replace_tables for (contract, table, pandas frame) triples: all swapped in at once."""
    tables = list(tables)
    for _, table, frame in tables:
        con.register(f"_{table}_frame", frame)
    try:
        return replace_tables(
            con,
            [(model, table, f'SELECT * FROM "_{table}_frame"') for model, table, _ in tables],
            before_commit=[(before_commit, None)] if before_commit else (),
        )
    finally:
        for _, table, _ in tables:
            con.unregister(f"_{table}_frame")


# The time the data reaches: the newest event (now, before any). Recency is measured to it.
DATA_AS_OF = "SELECT coalesce(max(event_at), now()::TIMESTAMP) FROM raw_events"


def data_as_of(con: duckdb.DuckDBPyConnection):
    """The time the data reaches (`DATA_AS_OF`)."""
    return con.execute(DATA_AS_OF).fetchall()[0][0]


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'", [table]
        ).fetchall()[0][0]
    )


def _frame_transaction(
    con: duckdb.DuckDBPyConnection, table: str, frame, statements: list[str], before_commit: Callable[[], object] | None
) -> int:
    """Run `statements` (which read the frame as {view}) and `before_commit` in one transaction."""
    view = f"_{table}_frame"
    con.register(view, frame)
    try:
        with transaction(con):
            for sql in statements:
                con.execute(sql.format(table=table, view=view))
            if before_commit is not None:
                before_commit()
            kill_point([table])
    finally:
        con.unregister(view)
    return len(frame)


def replace_frame(
    con: duckdb.DuckDBPyConnection, table: str, frame, before_commit: Callable[[], object] | None = None
) -> int:
    """Replace `table` with a pandas frame's columns and rows, built aside and swapped in one transaction."""
    statements = [
        'DROP TABLE IF EXISTS "{table}__new"',
        'CREATE TABLE "{table}__new" AS SELECT * FROM "{view}"',
        'DROP TABLE IF EXISTS "{table}"',
        'ALTER TABLE "{table}__new" RENAME TO "{table}"',
    ]
    return _frame_transaction(con, table, frame, statements, before_commit)


def splice_frame(
    con: duckdb.DuckDBPyConnection, table: str, frame, people: str, before_commit: Callable[[], object] | None = None
) -> int:
    """An incremental run's rows in place of the old rows of the people the SQL condition `people`
    names (a run's `scope.has()`), in one transaction."""
    statements = [
        'DELETE FROM "{table}" WHERE ' + people.replace("{", "{{").replace("}", "}}"),
        'INSERT INTO "{table}" BY NAME SELECT * FROM "{view}"',
    ]
    return _frame_transaction(con, table, frame, statements, before_commit)
