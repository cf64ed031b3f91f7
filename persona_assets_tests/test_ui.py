"""End to end, as a person uses it: `dagster dev`, headless Chromium, Materialize all, then a file
lands and the profiles it touches update with no clicks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from persona_assets.datagen import generate
from persona_assets.definitions import build_definitions

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network: no background connections, no first-run or update checks.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
SCREENSHOTS = Path(os.environ.get("PERSONA_SCREENSHOTS", "")) if os.environ.get("PERSONA_SCREENSHOTS") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _snapshot(home: Path, sql: str, params=None):
    path = home / "serving" / "persona.duckdb"
    if not path.exists():
        return None
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return con.execute(sql, params).fetchall()
    except duckdb.Error:  # being swapped in this instant
        return None


@contextlib.contextmanager
def running_ui(tmp_path: Path, home: Path, dagster_home: Path):
    """`persona ui` (dagster dev: webserver and daemon) on a free loopback port, in its own process
    group, on the given homes; every process it started is stopped afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is needed (make test installs it: apt-get install chromium)")
    port = _free_port()
    env = {
        **os.environ,
        "PERSONA_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "PERSONA_LANDING_INTERVAL": "3",
        "PERSONA_LANDING_SETTLE_SECONDS": "2",
        "PERSONA_AUTOMATION_INTERVAL": "5",
    }
    log = open(tmp_path / "dagster-dev.log", "w")
    persona = str(Path(sys.executable).with_name("persona"))
    process = subprocess.Popen(
        [persona, "ui", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{url}/server_info", timeout=2).status == 200
        except OSError:
            assert process.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-3000:]
            return False

    try:
        _wait(up, 120, "the Dagster webserver")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Code servers and run workers are in the same group: none may outlive the test.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture
def dagster_dev(tmp_path: Path):
    """The UI on a new, empty home: (url, PERSONA_HOME, DAGSTER_HOME)."""
    home, dagster_home = tmp_path / "persona", tmp_path / "dagster"
    (home / "landing").mkdir(parents=True)
    with running_ui(tmp_path, home, dagster_home) as url:
        yield url, home, dagster_home


def _runs(dagster_home: Path) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return list(instance.get_runs())


def _idle(dagster_home: Path) -> bool:
    runs = _runs(dagster_home)
    return bool(runs) and all(r.is_finished for r in runs)


def test_materialize_all_in_the_ui_then_a_landed_file_updates_profiles_by_itself(dagster_dev, tmp_path):
    from playwright.sync_api import sync_playwright

    url, home, dagster_home = dagster_dev
    generate(300, 13, tmp_path / "gen", "jsonl", people_per_file=100)
    files = sorted((tmp_path / "gen").glob("*.jsonl"))
    for path in files[:-1]:
        shutil.copy2(path, home / "landing" / path.name)
    shots = SCREENSHOTS or tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        try:
            # 1. Materialize all from the asset graph, and wait for that run to succeed.
            page.goto(f"{url}/asset-groups")
            page.get_by_role("button", name="Materialize all").first.click(timeout=60_000)
            clicked = _wait(
                lambda: [r for r in _runs(dagster_home) if "dagster/sensor_name" not in r.tags],
                60,
                "the run Materialize all launched",
            )[0]
            run = _wait(
                lambda: (
                    next(r for r in _runs(dagster_home) if r.run_id == clicked.run_id).is_finished
                    and next(r for r in _runs(dagster_home) if r.run_id == clicked.run_id)
                ),
                300,
                "the Materialize all run to finish",
            )
            assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
            page.goto(f"{url}/runs/{run.run_id}")
            page.get_by_text("Success").first.wait_for(timeout=30_000)
            profiles = _snapshot(home, "SELECT count(*) FROM user_profiles")
            assert profiles and profiles[0][0] > 100
            _wait(lambda: _idle(dagster_home), 300, "the sensor's and automation's runs to settle")

            # 2. A new file lands (written under a temporary name, then renamed): no clicks from here.
            before = {r.run_id for r in _runs(dagster_home)}
            landed_at = datetime.now(UTC).replace(tzinfo=None)
            new = files[-1]
            part = home / "landing" / (new.name + ".part")
            shutil.copy2(new, part)
            part.rename(home / "landing" / new.name)

            def updated():
                # Everyone holding an id seen in the new file's kept events has a profile rebuilt since it landed.
                rows = _snapshot(
                    home,
                    """WITH new AS (SELECT r.user_id, r.anonymous_id FROM raw_events r
                                    JOIN ingest_files f USING (batch_id) WHERE f.file_name = $1),
                            ids AS (SELECT user_id AS identifier FROM new WHERE user_id IS NOT NULL
                                    UNION SELECT anonymous_id FROM new WHERE anonymous_id IS NOT NULL)
                       SELECT count(DISTINCT p.person_id) FILTER (WHERE p.updated_at >= $2), count(DISTINCT p.person_id)
                       FROM identity_map m JOIN ids USING (identifier) JOIN user_profiles p USING (person_id)
                       WHERE m.identifier_type IN ('user_id', 'anonymous_id')""",
                    [new.name, landed_at],
                )
                return rows and rows[0][1] > 0 and rows[0][0] == rows[0][1]

            _wait(updated, 300, "the new file's people to have fresh profiles in the snapshot", every=3)
            after = [r for r in _runs(dagster_home) if r.run_id not in before]
            launched_by = {r.tags.get("dagster/sensor_name") for r in after}
            assert {"landing_sensor", "persona_automation"} <= launched_by, launched_by
            _wait(lambda: _idle(dagster_home), 300, "the runs to finish")
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in _runs(dagster_home))
            fresh = _snapshot(home, "SELECT max(updated_at), count(*) FROM user_profiles")[0]
            assert fresh[0] >= landed_at and fresh[1] > profiles[0][0]

            # 3. Each asset page says what happened and how good it is; screenshots for the README.
            page.goto(f"{url}/locations/persona/asset-groups/segmentation")
            page.get_by_text("segments").first.wait_for(timeout=30_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(shots / "asset-graph.png"))
            page.goto(f"{url}/assets/segments")
            for label in ("chosen_k", "why_this_k", "people_recomputed", "refresh"):
                page.get_by_text(label, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "segments-asset.png"), full_page=True)
            page.goto(f"{url}/assets/user_profiles?view=checks")
            page.get_by_text("everyone_has_a_profile").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "profiles-checks.png"))
        finally:
            browser.close()
    for name in ("asset-graph.png", "segments-asset.png", "profiles-checks.png"):
        assert (shots / name).stat().st_size > 10_000


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


TICKS = """query Ticks($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { ticks(limit: 20) { status skipReason runIds } } } } }"""
RUNS = "{ runsOrError { ... on Runs { results { runId pipelineName assetSelection { path } } } } }"


def _ticks(url: str, sensor: str) -> list[dict]:
    selector = {"repositoryLocationName": "persona", "repositoryName": "__repository__", "sensorName": sensor}
    found = _graphql(url, TICKS, {"selector": selector})["sensorOrError"]
    assert found["__typename"] == "Sensor", found
    return found["sensorState"]["ticks"]


def _latest_checks(dagster_home: Path, home: Path) -> dict:
    """Each asset check's latest execution: (status, run id)."""
    keys = list(build_definitions(home).resolve_asset_graph().asset_check_keys)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    return {key.to_user_string(): (record.status.value, record.run_id) for key, record in latest.items()}


def test_starting_the_ui_on_a_home_persona_run_brought_up_to_date_launches_nothing(tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    from persona_assets import cli

    home, dagster_home = tmp_path / "persona", tmp_path / "dagster"
    (home / "landing").mkdir(parents=True)
    generate(150, 5, tmp_path / "gen", "jsonl", people_per_file=75)
    for path in sorted((tmp_path / "gen").glob("*.jsonl")):
        shutil.copy2(path, home / "landing" / path.name)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    assert cli.main(["run"]) == 0
    checks = _latest_checks(dagster_home, home)
    assert checks and all(status == "SUCCEEDED" for status, _ in checks.values()), checks
    (cli_run,) = _runs(dagster_home)

    with running_ui(tmp_path, home, dagster_home) as url:
        # Two ticks of the landing sensor and of automation: each finds nothing to do.
        # A tick still being evaluated is STARTED; only ended ticks say what the sensor decided.
        def ended(name):
            return [t for t in _ticks(url, name) if t["status"] != "STARTED"]

        _wait(lambda: len(ended("landing_sensor")) >= 2, 120, "two landing sensor ticks")
        _wait(lambda: len(ended("persona_automation")) >= 2, 120, "two automation ticks")
        landing = ended("landing_sensor")
        assert all(t["status"] == "SKIPPED" and not t["runIds"] for t in landing), landing
        assert all(not t["runIds"] for t in _ticks(url, "landing_sensor"))
        assert all(not t["runIds"] for t in _ticks(url, "persona_automation"))
        runs = _graphql(url, RUNS)["runsOrError"]["results"]
        assert [r["runId"] for r in runs] == [cli_run.run_id], runs
        # The CLI's run names its assets: the Runs page's Target column shows them.
        assert {tuple(k["path"]) for k in runs[0]["assetSelection"]} >= {("raw_events",), ("serving_snapshot",)}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 950})
                page.goto(f"{url}/runs")
                page.get_by_text(cli_run.run_id[:8]).wait_for(timeout=30_000)
                # One asset's name and "N more": the Target column as a person sees it.
                page.get_by_text(f"{len(runs[0]['assetSelection']) - 1} more").wait_for(timeout=30_000)
                page.screenshot(path=str(tmp_path / "runs.png"))
                # The segments' first figures are on the asset's page as numbers, no click needed.
                page.goto(f"{url}/assets/segments")
                for label in ("segment_count", "largest_segment_share", "silhouette_features", "noise_share"):
                    page.get_by_text(label, exact=True).first.wait_for(timeout=30_000)
                page.screenshot(path=str(tmp_path / "segments.png"), full_page=True)
            finally:
                browser.close()
    assert _latest_checks(dagster_home, home) == checks  # no check ran again, none became skipped
