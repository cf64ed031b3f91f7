"""The serving snapshot: a separate DuckDB file written aside and renamed into place.

Readers open the snapshot, never the warehouse, so they never block a run; a reader that
holds the old file keeps its consistent view after a publish (the rename swaps inodes).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb


def sql_literal(text: str) -> str:
    """A SQL string literal (for the few statements, like ATTACH, that take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def publish_snapshot(con: duckdb.DuckDBPyConnection, path: Path, tables: dict[str, str],
                     run_id: str | None = None) -> dict[str, int]:  # fmt: skip
    """Write each `name -> SELECT` into a fresh file, then rename it over `path`.

    Table names are Persona's own; the SELECTs run on the warehouse connection `con`.
    Returns the row count of each published table.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
        leftover.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    con.execute(f"ATTACH {sql_literal(str(tmp))} AS _snapshot")
    try:
        for name, select in tables.items():
            con.execute(f'CREATE TABLE _snapshot."{name}" AS {select}')
            counts[name] = con.execute(f'SELECT count(*) FROM _snapshot."{name}"').fetchall()[0][0]
        con.execute(
            "CREATE TABLE _snapshot.snapshot_info AS SELECT ?::TIMESTAMP AS published_at, ?::VARCHAR AS run_id, "
            "?::VARCHAR[] AS tables",
            [datetime.now(UTC).replace(tzinfo=None), run_id, list(tables)],
        )
        con.execute("CHECKPOINT _snapshot")
    except BaseException:
        con.execute("DETACH _snapshot")
        tmp.unlink(missing_ok=True)
        raise
    con.execute("DETACH _snapshot")
    os.replace(tmp, path)
    return counts


def open_snapshot(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the serving snapshot, with a clear error when there is none yet."""
    if not path.exists():
        raise FileNotFoundError(
            f"No serving snapshot at {path}. Run `make demo` or `persona run` (or materialize in the UI) first."
        )
    return duckdb.connect(str(path), read_only=True)
