"""The serving snapshot's publish: a copy or the spare brought up to date, never a file in use."""

import os
import subprocess
import sys

import duckdb
import pytest

from persona_assets.core.publish import publish_snapshot, spare_path

TABLES = {"raw_events": "SELECT * FROM raw_events", "people": "SELECT * FROM people ORDER BY person_id"}
APPEND = {"raw_events": "batch_id"}

# Holds the snapshot open and reports its row count when asked (a line on stdin).
READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
for _ in range(2):
    print(con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0], flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def warehouse(tmp_path):
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    con.execute("CREATE TABLE raw_events (batch_id BIGINT, message_id VARCHAR)")
    con.execute("CREATE TABLE people (person_id VARCHAR, events BIGINT)")
    yield con
    con.close()


def land(con, batch: int, n: int = 50) -> None:
    """A new batch of events, and every person's count rewritten (as a refresh rewrites them)."""
    con.execute("INSERT INTO raw_events SELECT $b, $b || '-' || i FROM range($n) t(i)", {"b": batch, "n": n})
    con.execute("DELETE FROM people")
    con.execute("INSERT INTO people SELECT 'p' || batch_id, count(*) FROM raw_events GROUP BY 1")


def rows(path, table: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return sorted(con.execute(f"SELECT * FROM {table}").fetchall())


def assert_published(con, path) -> None:
    for table in TABLES:
        assert rows(path, table) == sorted(con.execute(f"SELECT * FROM {table}").fetchall()), table


def test_each_publish_updates_the_spare_in_place_and_keeps_the_file_it_replaces_as_the_next(warehouse, tmp_path):
    path = tmp_path / "serving" / "persona.duckdb"
    land(warehouse, 1)
    publish_snapshot(warehouse, path, TABLES, append=APPEND)
    assert_published(warehouse, path)
    assert rows(spare_path(path), "raw_events") == rows(path, "raw_events")  # the first publish copies itself
    for batch in (2, 3, 4):  # the spare is one publish behind, then two
        land(warehouse, batch)
        before, spare = path.stat().st_ino, spare_path(path).stat().st_ino
        publish_snapshot(warehouse, path, TABLES, append=APPEND)
        assert_published(warehouse, path)
        assert path.stat().st_ino == spare  # the spare was brought up to date, not a copy made
        assert spare_path(path).stat().st_ino == before  # and the replaced file kept for next time
    assert sorted(p.name for p in path.parent.iterdir()) == [".persona.duckdb.spare", "persona.duckdb"]


def test_a_spare_a_reader_still_holds_is_left_alone(warehouse, tmp_path):
    path = tmp_path / "serving" / "persona.duckdb"
    land(warehouse, 1)
    publish_snapshot(warehouse, path, TABLES, append=APPEND)
    land(warehouse, 2)
    publish_snapshot(warehouse, path, TABLES, append=APPEND)
    # A reader in another process opened the snapshot before the next publish, and one in this
    # process (the lock DuckDB takes is per process, so only /proc/locks shows it).
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        seen = int(reader.stdout.readline())
        held = path.stat().st_ino
        land(warehouse, 3)
        publish_snapshot(warehouse, path, TABLES, append=APPEND)  # the spare is free: taken
        assert spare_path(path).stat().st_ino == held  # the file the reader holds is now the spare
        with duckdb.connect(str(path), read_only=True) as here:
            in_process = here.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
            mine = path.stat().st_ino
            land(warehouse, 4)
            publish_snapshot(warehouse, path, TABLES, append=APPEND)  # held: copied instead
            assert path.stat().st_ino not in (held, mine)
            land(warehouse, 5)
            publish_snapshot(warehouse, path, TABLES, append=APPEND)  # held by this process: copied
            assert path.stat().st_ino not in (held, mine)
            assert here.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == in_process
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert int(reader.stdout.readline()) == seen  # its view did not change under it
    finally:
        reader.kill()
    assert_published(warehouse, path)


def test_a_spare_that_is_the_current_file_is_never_written(warehouse, tmp_path):
    path = tmp_path / "serving" / "persona.duckdb"
    land(warehouse, 1)
    publish_snapshot(warehouse, path, TABLES, append=APPEND)
    # Killed between linking the old snapshot as the spare and renaming the new one in.
    spare_path(path).unlink()
    os.link(path, spare_path(path))
    kept = tmp_path / "kept.duckdb"
    os.link(path, kept)
    land(warehouse, 2)
    publish_snapshot(warehouse, path, TABLES, append=APPEND)
    assert_published(warehouse, path)
    assert len(rows(kept, "raw_events")) == 50  # the old snapshot is as it was


def test_a_publish_written_afresh_leaves_no_older_copy(warehouse, tmp_path):
    path = tmp_path / "serving" / "persona.duckdb"
    for batch in (1, 2):
        land(warehouse, batch)
        publish_snapshot(warehouse, path, TABLES, append=APPEND)
    assert spare_path(path).exists()
    warehouse.execute("DELETE FROM raw_events WHERE batch_id = 1")  # as an erasure does
    publish_snapshot(warehouse, path, TABLES)
    assert not spare_path(path).exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["persona.duckdb"]
    assert_published(warehouse, path)
