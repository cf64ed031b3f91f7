"""Segment's own SDKs, unmodified but for their host, send to `persona serve`: Python
(segment-analytics-python from PyPI), Node (@segment/analytics-node from npm, on Debian's
Node) and the browser (@segment/analytics-next from npm, in Debian's Chromium driven by
Playwright). Their events reach raw_events and, after a run, the profile API."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import duckdb
import pytest

from persona_assets.core.ingest import ingest
from persona_assets.core.pii import hmac_hex, normalize_email
from persona_assets_tests.sdk.serving import READ_KEY, WRITE_KEY, landing_lines, request, start_server
from persona_assets_tests.test_ui import CHROMIUM, CHROMIUM_ARGS

SDK = Path(__file__).parent / "sdk"
NPM_DIR = Path(os.environ.get("PERSONA_NPM_CACHE", Path.home() / ".cache" / "persona-tests" / "npm"))
NPM_PACKAGES = {"@segment/analytics-node": "3.1.0", "@segment/analytics-next": "1.84.3"}
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH", "network")
KEY = b"sdk-test-hash-key"


def _installed(package: str) -> str | None:
    manifest = NPM_DIR / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text()).get("version") if manifest.exists() else None


@pytest.fixture(scope="session")
def npm_packages() -> Path:
    """The npm SDKs at their pinned versions in a cache folder (never in the repository)."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("Debian's nodejs and npm packages are needed (make test installs them: apt-get install nodejs npm)")
    wanted = [f"{p}@{v}" for p, v in NPM_PACKAGES.items() if _installed(p) != v]
    if wanted:
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        if not (NPM_DIR / "package.json").exists():
            (NPM_DIR / "package.json").write_text('{"name": "persona-sdk-tests", "private": true}\n')
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--save-exact", *wanted],
            cwd=NPM_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            if any(word in done.stderr for word in NETWORK_ERRORS):
                pytest.skip(f"npm cannot reach its registry to install {', '.join(wanted)}: {done.stderr[-300:]}")
            pytest.fail(f"npm install {' '.join(wanted)} failed: {done.stderr[-1000:]}")
    return NPM_DIR / "node_modules"


def send_python(url: str, user: str, email: str) -> None:
    from segment.analytics.client import Client

    errors = []
    client = Client(
        write_key=WRITE_KEY,
        host=url,
        gzip=True,
        max_retries=2,
        upload_interval=0.1,
        on_error=lambda exc, batch: errors.append(repr(exc)),
    )
    client.identify(user, {"email": email, "first_name": "Lu", "country": "NL"}, anonymous_id=f"a-{user}")
    client.page(user, name="Home", properties={"url": "https://shop.example/"}, anonymous_id=f"a-{user}")
    for product in ("k1", "k2"):
        client.track(
            user,
            "Product Viewed",
            {"product_id": product, "category": "kitchen", "price": 30.0},
            anonymous_id=f"a-{user}",
        )
    client.flush()
    client.join()
    assert not errors, errors


def send_node(modules: Path, url: str, user: str, email: str) -> None:
    env = {**os.environ, "NODE_PATH": str(modules)}
    done = subprocess.run(
        ["node", str(SDK / "node_sdk.js"), url, WRITE_KEY, user, f"a-{user}", email],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "sent" in done.stdout, done.stderr


def send_browser(modules: Path, url: str, user: str, email: str, tmp: Path) -> dict:
    """The page in Chromium; returns what the page reports (its anonymousId and messageIds) and
    every request it made that did not go to loopback (none may: no CDN, no Segment)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is needed (make test installs it: apt-get install chromium)")
    site = tmp / "site"
    site.mkdir()
    shutil.copy(SDK / "page.html", site / "page.html")
    (site / "analytics-next").symlink_to(modules / "@segment" / "analytics-next" / "dist" / "umd")
    handler = functools.partial(_QuietHandler, directory=str(site))
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    api = urllib.parse.urlsplit(url).netloc + "/v1"
    query = urllib.parse.urlencode({"api": api, "key": WRITE_KEY, "user": user, "email": email})
    outside: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()

            def only_loopback(route):
                host = urllib.parse.urlsplit(route.request.url).hostname
                if host in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.goto(f"http://127.0.0.1:{pages.server_address[1]}/page.html?{query}")
            result = page.evaluate("window.sent")
            browser.close()
    finally:
        pages.shutdown()
    return {**result, "outside": outside}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


ROTATE_EVERY_SECOND = "server:\n  rotate_seconds: 1\n"


def _wait_for(served, count: int, user: str, timeout: float = 15.0) -> None:
    """Until `count` events of `user` are in landing (the tests' spools rotate every second)."""
    home = Path(served.log).parent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(e.get("userId") == user for e in landing_lines(home)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{user}'s events did not reach landing: {served.output()}")


def _raw(home: Path, user: str) -> list[tuple]:
    con = duckdb.connect()
    ingest(con, home / "landing", KEY)
    return con.execute(
        "SELECT event_type, event_name, email_hash FROM raw_events WHERE user_id = ? ORDER BY event_at, event_type",
        [user],
    ).fetchall()


def test_segments_python_sdk_events_reach_raw_events(persona_home):
    served = start_server(persona_home, env={"PERSONA_HASH_KEY": KEY.decode()})
    try:
        send_python(served.url, "py-user", "Py.User@Example.com")
    finally:
        served.stop()
    rows = _raw(persona_home, "py-user")
    assert sorted((t, n) for t, n, _ in rows) == [
        ("identify", None),
        ("page", "Home"),
        ("track", "Product Viewed"),
        ("track", "Product Viewed"),
    ]
    assert {h for t, _, h in rows if t == "identify"} == {hmac_hex(KEY, normalize_email("py.user@example.com"))}
    lines = landing_lines(persona_home)
    assert all(e["receivedAt"] and e["originalTimestamp"] and e["sentAt"] for e in lines)  # stamped, skew-corrected


def test_segments_node_sdk_events_reach_raw_events(persona_home, npm_packages):
    served = start_server(persona_home, env={"PERSONA_HASH_KEY": KEY.decode()})
    try:
        send_node(npm_packages, served.url, "node-user", "node@example.com")
    finally:
        served.stop()
    rows = _raw(persona_home, "node-user")
    assert (
        sorted((t, n) for t, n, _ in rows)
        == [("identify", None), ("page", "Home"), ("track", "Order Completed")] + [("track", "Product Viewed")] * 3
    )


@pytest.mark.slow
def test_segments_browser_sdk_in_chromium_sends_to_the_server_and_nowhere_else(persona_home, npm_packages, tmp_path):
    (persona_home / "persona.yaml").write_text(ROTATE_EVERY_SECOND)
    served = start_server(persona_home, env={"PERSONA_HASH_KEY": KEY.decode()})
    try:
        result = send_browser(npm_packages, served.url, "web-user", "web@example.com", tmp_path)
        _wait_for(served, 3, "web-user")
    finally:
        served.stop()
    assert result["outside"] == []  # cdnSettings: no settings fetched from Segment's CDN, nothing sent elsewhere
    lines = landing_lines(persona_home)
    mine = [e for e in lines if e.get("anonymousId") == result["anonymousId"]]
    assert {e["type"] for e in mine} == {"page", "identify", "track"}
    assert set(result["messageIds"]) <= {e["messageId"] for e in mine}
    rows = _raw(persona_home, "web-user")
    assert sorted((t, n) for t, n, _ in rows) == [
        ("identify", None),
        ("track", "Product Added"),
        ("track", "Product Added"),
    ]


@pytest.mark.slow
def test_all_three_sdks_reach_the_profile_api_after_a_run(persona_home, npm_packages, tmp_path, generated):
    """The SDKs' people among a generated population, through the whole graph, read back over HTTP."""
    from persona_assets_tests.conftest import land, materialize_all

    land(generated("jsonl"), persona_home / "landing")
    shutil.rmtree(persona_home / "landing" / "_truth", ignore_errors=True)
    (persona_home / "persona.yaml").write_text(ROTATE_EVERY_SECOND)
    served = start_server(persona_home, env={"PERSONA_HASH_KEY": None})
    people = {
        "python": ("py-1", "py.one@example.com"),
        "node": ("node-1", "node.one@example.com"),
        "browser": ("web-1", "web.one@example.com"),
    }
    try:
        send_python(served.url, *people["python"])
        send_node(npm_packages, served.url, *people["node"])
        send_browser(npm_packages, served.url, *people["browser"], tmp_path)
        _wait_for(served, 3, "web-1")
    finally:
        served.stop(signal.SIGTERM)
    materialize_all(persona_home)
    served = start_server(persona_home, env={"PERSONA_HASH_KEY": None})
    try:
        for sdk, (user, email) in people.items():
            status, body, _ = request(
                f"{served.url}/v1/profiles/email:{urllib.parse.quote(email)}/traits", None, key=READ_KEY, method="GET"
            )
            assert status == 200, (sdk, body)
            status, by_user, _ = request(
                f"{served.url}/v1/profiles/user_id:{user}/events?limit=50", None, key=READ_KEY, method="GET"
            )
            assert status == 200 and by_user["person_id"] == body["person_id"], sdk
            assert body["traits"]["event_count"] >= len(by_user["data"]) >= 3, sdk
    finally:
        served.stop(signal.SIGKILL)
