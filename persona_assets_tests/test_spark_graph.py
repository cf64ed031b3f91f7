"""The whole asset graph with `engine: spark` beside `engine: duckdb`: the same landing files, the
same key, two homes; every table the same after a first run and after an incremental refresh (new
files, one of them a later order of someone already known), on PySpark in local mode through
dagster-pyspark's resource bound in the Definitions. Then `persona forget` reaches the Parquet
warehouse, and the snapshot says which engine built it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets.core import spark_stages
from persona_assets.core.affinity import AffinityOptions
from persona_assets.datagen import generate
from persona_assets_tests.conftest import materialize_all
from persona_assets_tests.test_settings import cli
from persona_assets_tests.test_spark import assert_same_table

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-graph")]  # one worker, its Spark session (conftest)

PEOPLE = 120
# Each compared table's key, and the columns that hold the moment of a run (not the data's).
KEYS = {
    "raw_events": ["message_id"],
    "quarantined_events": ["source_file", "source_line"],
    "ingest_files": ["file_name", "batch_id"],
    "person_id_history": ["old_person_id", "new_person_id"],
    "identity_map": ["identifier_type", "identifier"],
    "identity_pii": ["record_id"],
    "identity_links": ["record_id_l", "record_id_r"],
    "deduped_users": ["person_id"],
    "sessions": ["person_id", "started_at"],
    "cleaned_users": ["person_id"],
    "category_scores": ["person_id"],
    "segments": ["person_id"],
    "imputed_attributes": ["person_id", "trait"],
    "user_profiles": ["person_id"],
}
RUN_TIME = {
    "user_profiles": ["updated_at"],
    "quarantined_events": ["quarantined_at"],
    "ingest_files": ["ingested_at", "run_id", "mtime_ns"],  # each home's copy of a file has its own mtime
    "person_id_history": ["changed_at", "run_id"],
}
# Both homes alike; fewer k tried than the default keeps the person-level stages (DuckDB on both) short.
ON_SPARK = "engine:\n  name: spark\n  spark_master: local[2]\n"
# Probabilistic linkage on (the default), trained on the generated people's names and birth dates.
SETTINGS = "identity:\n  min_link_records: 40\nsegments:\n  k_max: 4\n"


def _later_order(path: Path, anonymous_id: str, ids: str = "later") -> None:
    """A later order by someone the first run knew (by anonymousId) and a quarantined line."""
    lines = [
        {"messageId": f"{ids}-1", "type": "track", "event": "Order Completed", "anonymousId": anonymous_id,
         "timestamp": "2026-11-30T12:00:00Z", "properties": {"order_id": "o-later", "revenue": 42.5}},
        {"messageId": f"{ids}-2", "type": "track", "event": "Order Completed", "timestamp": "2026-11-30T12:00:00Z"},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


# People who signed up twice as two anonymous visitors, written two ways (the generator makes no
# such duplicates): only probabilistic linkage makes each one person.
SIGNUPS = [
    ("Margarethe", "Vandersloot", "1974-03-09", "10115", "Berlin"),
    ("Téodor", "Przybylski", "1988-11-23", "00-950", "Warszawa"),
    ("Oluwaseun", "Adeyemi-Cole", "1992-06-30", "SW1A 1AA", "London"),
]


def _signups(path: Path, prefix: str, people: list[tuple], day: str) -> None:
    lines = []
    for i, (first, last, born, postcode, city) in enumerate(people):
        day_first = f"{born[8:]}/{born[5:7]}/{born[:4]}"
        forms = [
            (first, last, born, postcode, city),
            (first.upper(), last.lower(), day_first, postcode.replace(" ", ""), city.lower()),
        ]
        for j, (f, surname, b, pc, c) in enumerate(forms):
            traits = {"first_name": f, "last_name": surname, "birthday": b, "postal_code": pc, "city": c}
            lines.append(
                {
                    "type": "identify",
                    "messageId": f"{prefix}-{i}-{j}",
                    "anonymousId": f"{prefix}-{i}-{j}",
                    "timestamp": f"{day}T1{j}:00:00Z",
                    "traits": traits,
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # fmt: skip


# An incremental profiles run keeps the scores of people it did not touch valued at their own time
# (profiles carry them to the as-of time when read); a full run values everyone at the as-of time.
# Compared carried to the as-of time, as user_profiles reads them.
AT_AS_OF = f"""SELECT person_id, top_category,
       map_from_entries(list_transform(map_entries(scores), lambda e: {{'key': e.key, 'value': e.value * carried}})) AS scores
FROM (SELECT *, pow(2.0, -epoch(max(scored_at) OVER () - scored_at) / 86400.0
                         / {AffinityOptions().half_life_days}) AS carried FROM category_scores)"""


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, pd.DataFrame]:
    out = {}
    for table, key in KEYS.items():
        select = AT_AS_OF if table == "category_scores" else f"SELECT * FROM {table}"
        frame = con.execute(select).df().drop(columns=RUN_TIME.get(table, []), errors="ignore")
        out[table] = frame.assign(_key=["|".join(map(str, k)) for k in frame[key].itertuples(index=False)])
    return out


def _run(home: Path) -> dict[str, pd.DataFrame]:
    materialize_all(home)
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        return _tables(con)


def _run_spark_stages(home: Path) -> None:
    """The stages that run on Spark alone (ingest, identity, cleaning), as the landing sensor's run does."""
    import dagster as dg

    from persona_assets.definitions import build_definitions

    keys = [
        dg.AssetKey(k)
        for k in ("raw_events", "quarantined_events", "ingest_files", "deduped_users", "identity_map")
        + ("identity_guard", "identity_links", "identity_pii", "person_id_history", "cleaned_users", "sessions")
    ]
    job = build_definitions(home).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), asset_selection=keys, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure][:3]


@pytest.fixture(scope="module")
def homes(spark, tmp_path_factory, request):
    """Homes built twice from the same files: DuckDB's, Spark's (sharing the test session), and one
    that ran on DuckDB first and then on Spark (a home switched to Spark keeps its history)."""
    root = tmp_path_factory.mktemp("spark-graph")
    source = root / "generated"
    generate(PEOPLE, 5, source, "jsonl", people_per_file=40)
    files = sorted(p for p in source.iterdir() if p.is_file())
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setenv("PERSONA_HASH_KEY", "graph-key")
    homes = {"duckdb": root / "duckdb", "spark": root / "spark", "switched": root / "switched"}
    for engine, home in homes.items():
        (home / "landing").mkdir(parents=True)
        (home / "persona.yaml").write_text(SETTINGS + (ON_SPARK if engine == "spark" else ""))
    builds: dict[str, list] = {"duckdb": [], "spark": [], "switched": []}

    def build(batch: list[Path]) -> None:
        for engine, home in homes.items():
            for path in batch:
                shutil.copy(path, home / "landing" / path.name)
            mp.setenv("PERSONA_HOME", str(home))
            builds[engine].append(_run(home))

    signups, later_signups = root / "signups.jsonl", root / "later-signups.jsonl"
    _signups(signups, "signup", SIGNUPS[:2], "2026-11-01")
    build([*files[:2], signups])
    (homes["switched"] / "persona.yaml").write_text(SETTINGS + ON_SPARK)
    later = root / "later.jsonl"
    _later_order(later, builds["duckdb"][0]["raw_events"]["anonymous_id"].dropna().min())
    # A new person twice, and two more records of a known one: linkage reaches a person the run did not hold.
    _signups(later_signups, "later-signup", [SIGNUPS[2], SIGNUPS[0]], "2026-11-29")
    build([*files[2:], later, later_signups])
    return homes, builds


@pytest.mark.parametrize("build", [0, 1], ids=["first run", "incremental refresh"])
@pytest.mark.parametrize("table", KEYS)
def test_both_engines_give_the_same_tables(homes, build, table):
    _, builds = homes
    duck, on_spark = builds["duckdb"][build][table], builds["spark"][build][table]
    assert len(duck) > 0 or table == "person_id_history"  # nobody merged or split here
    assert_same_table(duck, on_spark, "_key")


@pytest.mark.parametrize("table", KEYS)
def test_a_home_switched_from_duckdb_to_spark_gives_the_same_tables(homes, table):
    _, builds = homes
    assert_same_table(builds["duckdb"][1][table], builds["switched"][1][table], "_key")


def test_linkage_made_one_person_of_each_signup_on_both_engines(homes):
    _, builds = homes
    for engine in ("duckdb", "spark", "switched"):
        tables = builds[engine][1]
        people = tables["identity_map"].query("identifier.str.contains('signup')", engine="python")
        links = tables["identity_links"].query("status == 'merged'")
        assert len(people) == 8 and people["person_id"].nunique() == 3, engine  # 3 people, 8 sign-ups
        assert len(links) >= 5 and (tables["identity_pii"]["anchor"].str.contains("signup")).sum() == 8, engine


def test_the_spark_home_built_on_spark_and_the_duckdb_one_refreshed_incrementally(homes):
    paths, _ = homes
    with duckdb.connect(str(paths["spark"] / "warehouse.duckdb"), read_only=True) as con:
        spark_modes = dict(con.execute("SELECT stage, mode FROM refresh_state").fetchall())
    with duckdb.connect(str(paths["duckdb"] / "warehouse.duckdb"), read_only=True) as con:
        duck_modes = dict(con.execute("SELECT stage, mode FROM refresh_state").fetchall())
    assert spark_modes["identity"] == spark_modes["cleaning"] == "full"
    assert duck_modes["identity"] == "incremental"
    warehouse = paths["spark"] / "spark"
    for table in ("raw_events", "identity_map", "deduped_users", "sessions", "cleaned_users"):
        assert spark_stages.has_table(warehouse, table), table
    with duckdb.connect(str(paths["spark"] / "serving" / "persona.duckdb"), read_only=True) as con:
        assert con.execute("SELECT engine FROM snapshot_info").fetchall() == [("spark",)]


def test_forget_reaches_the_parquet_warehouse_and_the_next_spark_run_keeps_them_gone(homes, tmp_path, monkeypatch):
    paths, builds = homes
    home = tmp_path / "spark"
    shutil.copytree(paths["spark"], home)
    warehouse = home / "spark"
    user = builds["spark"][1]["deduped_users"]["user_id"].dropna().min()
    person = builds["spark"][1]["deduped_users"].set_index("user_id").loc[user, "person_id"]
    proc = cli(home, "forget", user)
    assert proc.returncode == 0, proc.stderr
    assert "Spark's Parquet warehouse: " in proc.stdout and "Traceback" not in proc.stderr

    def parquet_rows(table: str, where: str, value: str) -> int:
        select, params = spark_stages.parquet_select(warehouse, table)
        with duckdb.connect() as con:
            return con.execute(
                f"SELECT count(*) FROM ({select}) WHERE {where} = $v", {**params, "v": value}
            ).fetchall()[0][0]

    assert parquet_rows("raw_events", "user_id", user) == 0
    assert parquet_rows("identity_map", "person_id", person) == 0
    assert parquet_rows("cleaned_users", "person_id", person) == 0
    assert spark_stages.has_table(warehouse, "erasure_log")
    assert parquet_rows("category_scores", "person_id", person) == 0
    # A new file after the forget: Spark's batch files join the rewritten table and read with it.
    _later_order(home / "landing" / "after-forget.jsonl", "after-forget-anon", ids="after-forget")
    monkeypatch.setenv("PERSONA_HOME", str(home))
    _run_spark_stages(home)
    assert parquet_rows("raw_events", "user_id", user) == 0
    assert parquet_rows("raw_events", "anonymous_id", "after-forget-anon") == 1
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        for table in ("identity_map", "deduped_users", "cleaned_users", "user_profiles"):
            held = con.execute(f"SELECT count(*) FROM {table} WHERE person_id = $p", {"p": person}).fetchall()[0][0]
            assert held == 0, table
