"""A real standalone Spark cluster on this machine: a master and two workers started on loopback
with the scripts inside the pyspark package, and Persona's Spark application
(`persona_assets/spark_job.py`) submitted to it with the package's spark-submit: ingest of the
landing files, identity, cleaning and category scores. Its tables must equal what the same stages make on DuckDB, and
the work must have had both workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest

from persona_assets.contracts import CategoryScores
from persona_assets.core import cleaning, profiles
from persona_assets.core.affinity import AffinityOptions
from persona_assets.core.engine import contract_select
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import ingest
from persona_assets.core.warehouse import data_as_of
from persona_assets.datagen import generate
from persona_assets_tests.test_spark import KEYS, _read_parquet, assert_same_table
from persona_assets_tests.test_spark_profiles import assert_same_scores

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-stages")]  # with the stages, not beside the graph test

# The tables before cleaning's, each with the columns that make a row's key.
CHAIN = {
    "raw_events": ["message_id"],
    "identity_map": ["identifier_type", "identifier"],
    "deduped_users": ["person_id"],
}


def _keyed(frame, key):
    """The frame with one key column, `_key`, made of `key`'s columns (a table's own key may be several)."""
    columns = [key] if isinstance(key, str) else key
    return frame.assign(_key=frame[columns].astype(str).agg("\x1f".join, axis=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_bin(name: str) -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / name)


def _master_state(ui: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as answer:
        return json.load(answer)


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    """A master and two workers (one core, 1 GB each): (master URL, master web UI port)."""
    if shutil.which("java") is None:
        pytest.skip("no java: Debian's openjdk-17-jre-headless is needed")
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    port, ui = _free_port(), _free_port()
    started = []

    def daemon(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("w")
        cmd = [_spark_bin("spark-class"), *args]
        started.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        master = "org.apache.spark.deploy.master.Master"
        daemon("master", master, "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui))
        _wait(lambda: _master_state(ui)["status"] == "ALIVE", 60, "the master")
        for n in (1, 2):
            work = tmp_path / f"worker-{n}"
            worker = "org.apache.spark.deploy.worker.Worker"
            args = ["--host", "127.0.0.1", "--cores", "1", "--memory", "1g", "--work-dir", str(work)]
            daemon(f"worker-{n}", worker, *args, "--webui-port", str(_free_port()), f"spark://127.0.0.1:{port}")
        _wait(lambda: _master_state(ui)["aliveworkers"] == 2, 60, "two workers")
        yield f"spark://127.0.0.1:{port}", ui, env
    finally:
        for proc in started:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_spark_application_on_a_standalone_cluster_gives_duckdbs_tables(cluster, tmp_path):
    master, ui, env = cluster
    generate(150, 11, tmp_path / "landing", "jsonl", people_per_file=75)
    settings = tmp_path / "persona.yaml"
    settings.write_text("identity:\n  linkage: false\n")
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        ingest(con, tmp_path / "landing", b"k")
        resolve(con, IdentityOptions(linkage=False), full=True)
        cleaning.clean(con, cleaning.CleaningOptions(), full=True)
        duck = {table: con.execute(f"SELECT * FROM {table}").df() for table in [*KEYS, *CHAIN]}
        scores = contract_select(CategoryScores, profiles.category_scores_sql(AffinityOptions()))
        duck["category_scores"] = con.execute(scores, {"as_of": data_as_of(con)}).df()

    # The whole chain on the cluster, from the landing files to cleaned_users: nothing from DuckDB.
    warehouse = tmp_path / "parquet"
    job = Path(cleaning.__file__).parents[1] / "spark_job.py"
    cmd = [_spark_bin("spark-submit"), "--master", master, "--conf", "spark.executor.memory=512m"]
    cmd += ["--conf", "spark.ui.enabled=false", "--conf", "spark.sql.shuffle.partitions=4", str(job)]
    cmd += ["--warehouse", str(warehouse), "--landing", str(tmp_path / "landing"), "--settings", str(settings)]
    done = subprocess.run(cmd, env={**env, "PERSONA_HASH_KEY": "k"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["master"] == master and report["executors"] == 2, report
    assert list(report["stages"]) == ["ingest", "identity", "cleaning", "scores"]
    assert report["stages"]["ingest"]["rows"]["raw_events"] == len(duck["raw_events"])
    assert report["stages"]["identity"]["rows"]["identity_map"] == len(duck["identity_map"])
    assert report["stages"]["cleaning"]["rows"] == {table: len(duck[table]) for table in KEYS}
    for table, key in {**CHAIN, **KEYS}.items():
        assert_same_table(_keyed(duck[table], key), _keyed(_read_parquet(warehouse / table), key), "_key")
    assert report["stages"]["scores"]["rows"] == {"category_scores": len(duck["category_scores"])}
    assert_same_scores(duck["category_scores"], _read_parquet(warehouse / "category_scores"))
    # The master ran it: one finished application, which had cores on both workers.
    _wait(lambda: len(_master_state(ui)["completedapps"]) == 1, 30, "the application to be finished")
    state = _master_state(ui)
    assert [app["name"] for app in state["completedapps"]] == ["persona"], state["completedapps"]
    assert all(worker["coresused"] == 0 and worker["state"] == "ALIVE" for worker in state["workers"])


def test_identity_on_the_spark_application_needs_linkage_off_and_says_so(tmp_path):
    from persona_assets.spark_job import main

    with pytest.raises(SystemExit, match="needs the DuckDB warehouse its model is kept in: run it through the graph"):
        main(["--warehouse", str(tmp_path), "--stage", "identity"])
