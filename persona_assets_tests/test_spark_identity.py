"""Identity on Spark against DuckDB: the same raw_events give the same people on both engines.

`resolve_on_spark` runs identity's statements (written once, compiled by engine.to_spark) and
finds components with components.py's large-star/small-star rounds; DuckDB's `resolve` uses
scipy. Two builds: generated people, then the same with a 200-identifier chain joining two of
them (a merge person_id_history records), a shared device the guard keeps out, a `persona
merge` and an anonymousId taken out by `persona unmerge`. The module took 45-100 s with
Spark's start on 2 shared cores (load average 2.5-8), most of it the two Spark builds.
"""

from __future__ import annotations

import json
import shutil
import time

import duckdb
import pandas as pd
import pytest

from persona_assets.core import identity, overrides
from persona_assets.core.engine import SparkTables
from persona_assets.core.ingest import ingest
from persona_assets.datagen import generate
from persona_assets_tests.test_spark import _read_parquet, assert_same_table

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-graph")]  # one worker, its Spark session (conftest)

PEOPLE = 200
SEED = 3
CHAIN = 200
OFF = identity.IdentityOptions(linkage=False)
# Each table's key; person_id_history's changed_at is the moment of each run, so it is left out.
KEYS = {
    "identity_map": ["identifier_type", "identifier"],
    "deduped_users": ["person_id"],
    "identity_guard": ["identifier_type", "identifier"],
    "person_id_history": ["old_person_id", "new_person_id"],
}


def _chain_events(path, first_user: str, last_user: str) -> None:
    """A chain of anonymousIds, each aliased to the one before, from one person's userId to
    another's (one component 200 links long); and a device two userIds share (a guard hit)."""
    at = "2026-06-01T10:00:{:02d}.000Z"
    lines = [{"type": "identify", "userId": first_user, "anonymousId": "chain-0", "timestamp": at.format(0)}]
    lines += [
        {"type": "alias", "anonymousId": f"chain-{i}", "previousId": f"chain-{i - 1}", "timestamp": at.format(i % 60)}
        for i in range(1, CHAIN)
    ]
    lines.append(
        {"type": "identify", "userId": last_user, "anonymousId": f"chain-{CHAIN - 1}", "timestamp": at.format(1)}
    )
    for user in ("tablet-a", "tablet-b"):
        lines.append(
            {
                "type": "identify",
                "userId": user,
                "context": {"device": {"id": "shared-tablet"}},
                "timestamp": at.format(2),
            }
        )
    path.write_text("".join(json.dumps({"messageId": f"chain-m{i}", **e}) + "\n" for i, e in enumerate(lines)))


def _export_inputs(con: duckdb.DuckDBPyConnection, warehouse) -> None:
    """identity's inputs as DuckDB's ingest and the merge / unmerge commands left them, as Parquet."""
    for table in ("raw_events", overrides.TABLE):
        folder = warehouse / table
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        con.execute(f"COPY {table} TO '{folder / 'part-0.parquet'}' (FORMAT parquet)")


def _decide(con: duckdb.DuckDBPyConnection, users: list[str]) -> str:
    """A merge of the people of users[2] and users[3], and an anonymousId taken out of someone
    else who holds several (persona merge / unmerge); returns the identifier taken out."""
    overrides.merge(con, b"k", f"user_id:{users[2]}", f"user_id:{users[3]}")
    user, anonymous_id = con.execute(
        """SELECT d.user_id, min(m.identifier) FROM deduped_users d JOIN identity_map m USING (person_id)
           WHERE d.anonymous_id_count > 1 AND m.identifier_type = 'anonymous_id' AND d.user_id NOT IN ?
           GROUP BY d.user_id ORDER BY d.user_id LIMIT 1""",
        [users[:4]],
    ).fetchall()[0]
    overrides.unmerge(con, b"k", f"user_id:{user}", f"anonymous_id:{anonymous_id}")
    return anonymous_id


def _duckdb_tables(con: duckdb.DuckDBPyConnection) -> dict[str, pd.DataFrame]:
    return {table: con.execute(f"SELECT * FROM {table}").df() for table in KEYS}


def _build(spark, con, warehouse, seconds: dict) -> tuple[dict, dict, identity.IdentityReport]:
    """identity in full on both engines from the DuckDB warehouse's raw_events: both engines' tables."""
    started = time.perf_counter()
    identity.resolve(con, OFF, full=True)
    seconds.setdefault("duckdb", []).append(time.perf_counter() - started)
    _export_inputs(con, warehouse)
    started = time.perf_counter()
    report = identity.resolve_on_spark(spark, warehouse, OFF)
    seconds.setdefault("spark", []).append(time.perf_counter() - started)
    return _duckdb_tables(con), {table: _read_parquet(warehouse / table) for table in KEYS}, report


@pytest.fixture(scope="module")
def builds(spark, tmp_path_factory):
    """Generated people built on both engines, then the chain and shared tablet added and built again."""
    root = tmp_path_factory.mktemp("spark-identity")
    generate(PEOPLE, SEED, root / "landing", "jsonl", people_per_file=100)
    warehouse, seconds = root / "parquet", {}
    with duckdb.connect(str(root / "warehouse.duckdb")) as con:
        ingest(con, root / "landing", b"k")
        first = _build(spark, con, warehouse, seconds)
        query = "SELECT user_id FROM deduped_users WHERE user_id IS NOT NULL ORDER BY 1 LIMIT 4"
        users = [u[0] for u in con.execute(query).fetchall()]
        _chain_events(root / "landing" / "chain.jsonl", users[0], users[1])
        ingest(con, root / "landing", b"k")
        taken = _decide(con, users)
        second = _build(spark, con, warehouse, seconds)
    print(f"identity at {PEOPLE} people (first, second build): DuckDB {seconds['duckdb']}, Spark {seconds['spark']} s")
    return {"first": first, "second": second, "users": users, "taken": taken, "warehouse": warehouse}


def _same(duck: pd.DataFrame, spark: pd.DataFrame, table: str) -> None:
    """Every row and column equal (test_spark's comparison) under the table's key."""
    if table == "person_id_history":
        duck, spark = duck.drop(columns="changed_at"), spark.drop(columns="changed_at")
    keyed = [
        f.assign(_key=["|".join(map(str, k)) for k in f[KEYS[table]].itertuples(index=False)]) for f in (duck, spark)
    ]
    assert_same_table(*keyed, "_key")


@pytest.mark.parametrize("build", ["first", "second"])
def test_identity_gives_the_same_tables_on_spark_and_duckdb(builds, build):
    duck, on_spark, report = builds[build]
    for table in KEYS:
        _same(duck[table], on_spark[table], table)
    assert report.counts["deduped_users"] == len(duck["deduped_users"]) > 0


def test_the_data_reaches_what_identity_branches_on(builds):
    """The comparison means something only if the builds merge people, guard identifiers, take
    several rounds, apply decisions and record merges: the chain joins two people into one of
    202 identifiers or more, a merge joins two more, an anonymousId taken out is a person alone."""
    duck, _, report = builds["second"]
    first_people = builds["first"][0]["deduped_users"]
    people, ids, users = duck["deduped_users"], duck["identity_map"], builds["users"]
    # +2 tablet users, -1 chain, -1 merge, +1 taken out
    assert (first_people.identifier_count > 1).any() and len(people) == len(first_people) + 1
    person = ids.set_index("identifier").person_id
    assert person[users[0]] == person[users[1]] and person[users[2]] == person[users[3]] != person[users[0]]
    assert (ids.person_id == person[users[0]]).sum() >= CHAIN + 2
    guard = duck["identity_guard"].set_index("identifier").reason
    assert "shared-tablet" in guard.index and guard[builds["taken"]].startswith(overrides.TAKEN_OUT)
    assert (ids.person_id == person[builds["taken"]]).sum() == 1
    assert "merge" in set(duck["person_id_history"].change)
    assert int(report.why.split("(")[1].split()[0]) > 2  # rounds of connected components


def test_the_comparison_catches_a_different_person(builds):
    duck, on_spark, _ = builds["second"]
    moved = on_spark["identity_map"].copy()
    moved.loc[moved.index[0], "person_id"] = moved.person_id.iloc[-1]
    with pytest.raises(AssertionError):
        _same(duck["identity_map"], moved, "identity_map")


def test_unnumbered_row_number_is_unique_on_spark_as_on_duckdb(spark, tmp_path):
    """The compile rule for `row_number() OVER ()`: one number a row on both engines (DuckDB's 1..n)."""
    sql = "SELECT count(DISTINCT tid) = count(*) AND count(*) = 500 FROM (SELECT row_number() OVER () AS tid FROM range(500))"
    with duckdb.connect() as con:
        assert con.execute(sql).fetchall()[0][0] is True
    assert SparkTables(spark, tmp_path).query(sql).collect()[0][0] is True


def test_linkage_on_spark_without_the_warehouse_its_model_is_kept_in_is_refused(spark, builds):
    with pytest.raises(ValueError, match="needs the DuckDB warehouse its model is kept in"):
        identity.resolve_on_spark(spark, builds["warehouse"], identity.IdentityOptions(linkage=True))
