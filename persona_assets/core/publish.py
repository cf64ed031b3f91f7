"""The serving snapshot: a separate DuckDB file written aside and renamed into place.

Readers open the snapshot, never the warehouse, so they never block a run; a reader that
holds the old file keeps its consistent view after a publish (the rename swaps inodes).
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from persona_assets.core.faults import kill_point


def sql_literal(text: str) -> str:
    """A SQL string literal of one of Persona's own constants (values from users or files are
    always bound as parameters, never pasted)."""
    return "'" + text.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def publish_snapshot(con: duckdb.DuckDBPyConnection, path: Path, tables: dict[str, str],
                     run_id: str | None = None, append: dict[str, str] | None = None,
                     indexes: dict[str, str] | None = None) -> dict[str, int]:  # fmt: skip
    """Write each `name -> SELECT` into a new file, then rename it over `path`.

    Table names are Persona's own; the SELECTs run on the warehouse connection `con`.
    `append` names append-only tables and their ever-growing key (`raw_events: batch_id`):
    the new file starts as a copy of the previous snapshot and those tables only get the rows
    past the key they reached (written whole again if their row count no longer matches),
    so a refresh does not copy every event again. `indexes` (`table: column`) get an index in
    the snapshot, for point look-ups. Returns the row count of each table.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Publishes take turns (each holds the warehouse's one writer connection), so any other
    # half-written file is a killed publish's leftover.
    for leftover in path.parent.glob(f".{path.name}.*.tmp*"):
        leftover.unlink(missing_ok=True)
    append = append or {}
    if append and path.exists():
        shutil.copyfile(path, tmp)
    counts: dict[str, int] = {}
    default = con.execute("SELECT current_database()").fetchall()[0][0]
    con.execute("ATTACH $path AS _snapshot", {"path": str(tmp)})
    try:
        existing = {
            r[0]
            for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = '_snapshot'").fetchall()
        }
        for name, select in tables.items():
            key = append.get(name)
            if key and name in existing:
                # The key as a value, not a subquery: the scan then skips every row group whose
                # keys are all older (they grow with insertion order), instead of reading them all.
                reached = con.execute(f'SELECT coalesce(max("{key}"), -1) FROM _snapshot."{name}"').fetchall()[0][0]
                con.execute(f'INSERT INTO _snapshot."{name}" SELECT * FROM ({select}) WHERE "{key}" > $reached',
                            {"reached": reached})  # fmt: skip
                want = con.execute(f"SELECT count(*) FROM ({select})").fetchall()[0][0]
                if con.execute(f'SELECT count(*) FROM _snapshot."{name}"').fetchall()[0][0] == want:
                    counts[name] = want
                    continue
            con.execute(f'DROP TABLE IF EXISTS _snapshot."{name}"')
            con.execute(f'CREATE TABLE _snapshot."{name}" AS {select}')
            counts[name] = con.execute(f'SELECT count(*) FROM _snapshot."{name}"').fetchall()[0][0]
            if name in (indexes or {}):
                # CREATE INDEX takes no database prefix: make the snapshot the default for it.
                con.execute("USE _snapshot")
                try:
                    con.execute(f'CREATE INDEX "{name}_lookup" ON "{name}" ("{indexes[name]}")')
                finally:
                    con.execute(f"USE {sql_identifier(default)}")
        con.execute("DROP TABLE IF EXISTS _snapshot.snapshot_info")
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
    kill_point(["snapshot"])
    os.replace(tmp, path)
    return counts


def open_snapshot(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the serving snapshot, with a clear error when there is none yet."""
    if not path.exists():
        raise FileNotFoundError(
            f"No serving snapshot at {path}. Run `make demo` or `persona run` (or materialize in the UI) first."
        )
    return duckdb.connect(str(path), read_only=True)
