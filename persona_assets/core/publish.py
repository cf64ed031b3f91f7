"""The serving snapshot: a separate DuckDB file written aside and renamed into place.

Readers open the snapshot, never the warehouse, so they never block a run; a reader that
holds the old file keeps its consistent view after a publish (the rename swaps inodes).

A publish that appends starts from the previous snapshot's content. Rather than copying the
current file (3 GB at 20M events), it takes the spare: the snapshot before it, kept under a
hidden name when it was replaced, and brought up to date in place (its append-only tables
get the rows they lack). The spare is taken only when no process holds it open, which DuckDB
readers always show as a lock; otherwise the current file is copied as before.
"""

from __future__ import annotations

import contextlib
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


def spare_path(path: Path) -> Path:
    """Where the snapshot before the current one is kept for the next publish to update."""
    return path.with_name(f".{path.name}.spare")


def _held(st: os.stat_result) -> bool:
    """Whether any process holds the file open: another process shows the lock DuckDB takes on
    every database file it opens (read-only ones too) in /proc/locks; this process is asked for
    its open files instead, since closing any descriptor of a file (a copy of it, say) drops
    the process's locks on it. Without /proc to tell, assume it is held."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            if any(device in line.split() for line in locks):
                return True
        for fd in os.listdir("/proc/self/fd"):
            try:
                opened = os.stat(f"/proc/self/fd/{fd}")
            except OSError:  # closed meanwhile, or not a file
                continue
            if (opened.st_dev, opened.st_ino) == (st.st_dev, st.st_ino):
                return True
    except OSError:
        return True
    return False


def _take_spare(path: Path, tmp: Path) -> bool:
    """Move the spare to `tmp` when nobody holds it; True if it is there to be updated."""
    spare = spare_path(path)
    try:
        st = spare.stat()
    except FileNotFoundError:
        return False
    # Killed between linking the old snapshot as the spare and renaming the new one in: the
    # spare is the current file, which must never be written.
    if st.st_ino == path.stat().st_ino or _held(st):
        spare.unlink()  # a reader keeps its file; only the name goes
        return False
    os.replace(spare, tmp)
    if _held(tmp.stat()):  # a reader that had it open was about to lock it
        tmp.unlink()
        return False
    return True


def _keep_as_spare(path: Path) -> None:
    """After a first publish: a copy of it for the next publish to update (written aside, so a
    killed copy is never taken as a spare)."""
    aside = path.with_name(f".{path.name}.spare.tmp")
    shutil.copyfile(path, aside)
    os.replace(aside, spare_path(path))


def publish_snapshot(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    tables: dict[str, str],
    run_id: str | None = None,
    append: dict[str, str] | None = None,
    indexes: dict[str, str] | None = None,
    engine: str = "duckdb",
) -> dict[str, int]:
    """Write each `name -> SELECT` into a new file, then rename it over `path` (`engine`: which
    engine built the event-scale tables, said in `snapshot_info`).

    Table names are Persona's own; the SELECTs run on the warehouse connection `con`.
    `append` names append-only tables and their ever-growing key (`raw_events: batch_id`):
    the new file starts from an earlier snapshot (the spare, or else a copy of the current one)
    and those tables only get the rows past the key they reached (written whole again if their row count no longer matches),
    so a refresh does not copy every event again. `indexes` (`table: column`) get an index in
    the snapshot, for point look-ups. Without `append` the file is written afresh and no spare
    is kept (an erasure must leave no older copy behind). Returns the row count of each table.
    """
    append, indexes = append or {}, indexes or {}
    previous = path.exists()
    tmp, took = _start_file(path, append)
    _attach(con, path, tmp, took)
    try:
        existing = {
            r[0]
            for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = '_snapshot'").fetchall()
        }
        counts = {
            name: _write_table(con, name, select, append.get(name) if name in existing else None, indexes.get(name))
            for name, select in tables.items()
        }
        _stamp(con, run_id, list(tables), engine)
    except BaseException:
        con.execute("DETACH _snapshot")
        tmp.unlink(missing_ok=True)
        raise
    con.execute("DETACH _snapshot")
    kill_point(["snapshot"])
    _swap_in(path, tmp, bool(append), previous)
    return counts


def _start_file(path: Path, append: dict[str, str]) -> tuple[Path, bool]:
    """The file the new snapshot is written in, beside `path`: empty, or (to append to) the spare
    taken over or a copy of the current snapshot. Returns it and whether the spare was taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Publishes take turns (each holds the warehouse's one writer connection), so any other
    # half-written file is a killed publish's leftover.
    for leftover in path.parent.glob(f".{path.name}.*.tmp*"):
        leftover.unlink(missing_ok=True)
    previous = path.exists()
    took = bool(append) and previous and _take_spare(path, tmp)
    if not append:
        spare_path(path).unlink(missing_ok=True)
    elif previous and not took:
        shutil.copyfile(path, tmp)
    return tmp, took


def _attach(con: duckdb.DuckDBPyConnection, path: Path, tmp: Path, took: bool) -> None:
    try:
        con.execute("ATTACH $path AS _snapshot", {"path": str(tmp)})
    except duckdb.IOException:
        if not took:
            raise
        tmp.unlink(missing_ok=True)  # a reader locked the spare after all: start from a copy
        shutil.copyfile(path, tmp)
        con.execute("ATTACH $path AS _snapshot", {"path": str(tmp)})


def _write_table(con: duckdb.DuckDBPyConnection, name: str, select: str, key: str | None, index: str | None) -> int:
    """One table into the attached snapshot: only its rows past `key` when it can be appended
    to, else written whole (with an index on `index`). Returns its row count."""
    if key and _same_columns(con, name, select):
        # The key as a value, not a subquery: the scan then skips every row group whose
        # keys are all older (they grow with insertion order), instead of reading them all.
        reached = con.execute(f'SELECT coalesce(max("{key}"), -1) FROM _snapshot."{name}"').fetchall()[0][0]
        con.execute(
            f'INSERT INTO _snapshot."{name}" SELECT * FROM ({select}) WHERE "{key}" > $reached', {"reached": reached}
        )
        want = con.execute(f"SELECT count(*) FROM ({select})").fetchall()[0][0]
        if con.execute(f'SELECT count(*) FROM _snapshot."{name}"').fetchall()[0][0] == want:
            return want
    con.execute(f'DROP TABLE IF EXISTS _snapshot."{name}"')
    con.execute(f'CREATE TABLE _snapshot."{name}" AS {select}')
    if index:
        # CREATE INDEX takes no database prefix: make the snapshot the default for it.
        default = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute("USE _snapshot")
        try:
            con.execute(f'CREATE INDEX "{name}_lookup" ON "{name}" ("{index}")')
        finally:
            con.execute(f"USE {sql_identifier(default)}")
    return con.execute(f'SELECT count(*) FROM _snapshot."{name}"').fetchall()[0][0]


def _stamp(con: duckdb.DuckDBPyConnection, run_id: str | None, tables: list[str], engine: str) -> None:
    """`snapshot_info`: when the snapshot was published, by which run and engine, with which tables;
    then on disk."""
    con.execute("DROP TABLE IF EXISTS _snapshot.snapshot_info")
    con.execute(
        "CREATE TABLE _snapshot.snapshot_info AS SELECT ?::TIMESTAMP AS published_at, ?::VARCHAR AS run_id, "
        "?::VARCHAR[] AS tables, ?::VARCHAR AS engine",
        [datetime.now(UTC).replace(tzinfo=None), run_id, tables, engine],
    )
    con.execute("CHECKPOINT _snapshot")


def _swap_in(path: Path, tmp: Path, append: bool, previous: bool) -> None:
    """Rename the new file over the snapshot; when appending, the replaced file becomes the spare."""
    if append and previous:  # the file being replaced becomes the spare, instead of being deleted
        spare_path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # no hard links here: no spare, the next publish copies
            os.link(path, spare_path(path))
    os.replace(tmp, path)
    if append and not previous:
        _keep_as_spare(path)


def _same_columns(con: duckdb.DuckDBPyConnection, name: str, select: str) -> bool:
    """Whether the snapshot's table has the columns the SELECT gives (a changed contract means
    writing the table whole, not appending to it)."""
    wanted = [d[0] for d in con.execute(f"SELECT * FROM ({select}) LIMIT 0").description]
    have = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = '_snapshot' AND table_name = ? "
        "ORDER BY column_index",
        [name],
    ).fetchall()
    return [c for (c,) in have] == wanted


# The snapshot connection is for reading the snapshot and nothing else: no other file (ATTACH
# of the warehouse, COPY ... TO, read_csv of /etc/passwd), no extensions, and no SET to undo
# any of it. DuckDB refuses each with a Permission Error or "the configuration has been locked".
LOCKED_DOWN = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}


class NotASnapshot(ValueError):
    """A file given as the snapshot that DuckDB cannot open as one."""


def open_snapshot(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only, locked-down connection to the serving snapshot (`LOCKED_DOWN`), with a clear
    error when there is none yet or the file is not a DuckDB database."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No serving snapshot at {path}. Run `make demo` or `persona run` (or materialize in the UI) first."
        )
    if path.is_dir():
        raise NotASnapshot(f"{path} is a folder, not a serving snapshot (serving/persona.duckdb).")
    try:
        return duckdb.connect(str(path), read_only=True, config=LOCKED_DOWN)
    except duckdb.IOException as exc:
        if "not a valid duckdb database" in str(exc).lower() or "magic" in str(exc).lower():
            raise NotASnapshot(f"{path} is not a DuckDB database, so not a serving snapshot.") from None
        raise


# A person_id as the contracts define it (contracts.PERSON_ID; kept here so a look-up imports
# no contract library, and a test holds the two equal).
PERSON_ID = r"^p[0-9a-f]{16}$"


def find_person(con: duckdb.DuckDBPyConnection, query: str, key: bytes, gmail_rules: bool = True) -> list[str]:
    """person_ids for a person_id, email, phone, userId, anonymousId or device id, on the snapshot.

    An email or phone is normalized and hashed with the installation's key first, as ingest
    did: the raw value never needs to be stored to be found. Each candidate is a plain
    equality on the identifier column the snapshot keeps sorted, so it reads one row group.
    """
    import re

    from persona_assets.core.pii import hmac_hex, normalize_email, normalize_phone

    query = query.strip()
    if re.fullmatch(PERSON_ID, query):
        rows = con.execute("SELECT person_id FROM user_profiles WHERE person_id = ?", [query]).fetchall()
        return [r[0] for r in rows]
    candidates = [(("user_id", "anonymous_id", "device_id"), query)]
    if "@" in query and (email := normalize_email(query, gmail_rules)):
        candidates.append((("email",), hmac_hex(key, email)))
    if re.fullmatch(r"[+0-9 ()./-]{6,}", query) and (phone := normalize_phone(query, None)):
        candidates.append((("phone",), hmac_hex(key, phone)))
    found: list[str] = []
    for kinds, value in candidates:
        rows = con.execute("SELECT identifier_type, person_id FROM identity_map WHERE identifier = ?", [value])
        found += sorted({person for kind, person in rows.fetchall() if kind in kinds} - set(found))
    return found
