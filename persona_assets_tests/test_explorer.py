"""The person explorer: pages of `persona serve` behind the read key, actions behind the admin key.

Fast tests talk HTTP to a real server on an empty home (keys, cookies, CSRF, escaping) and render
the person page's template with hostile values. The browser tests build one small home (a few
hundred generated people, duplicate sign-ups linkage merges, a person made of HTML and script)
with `persona run`, start one server on it, and drive Debian's Chromium with Playwright."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from persona_assets.datagen import generate, identify_records
from persona_assets_tests.sdk.serving import READ_KEY, WRITE_KEY, request, start_server
from persona_assets_tests.test_ui import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

ADMIN_KEY = "test-admin-key-8910"
HOSTILE = {
    "event": "<img src=x onerror=window.pwned=3>",
    "category": "<script>window.pwned=1</script>",
    "viewed": '"><svg onload=window.pwned=4>',
    "product": "<b>p</b>",
}


# --- a small HTTP client that keeps the session cookies ----------------------------------------


@dataclass
class Client:
    url: str
    cookies: dict = field(default_factory=dict)

    def send(self, method: str, path: str, form: dict | None = None, headers: dict | None = None):
        """(status, body text, headers) of one request, without following redirects."""
        parts = urllib.parse.urlsplit(self.url)
        con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        con.request(method, path, body=body, headers=sent)
        resp = con.getresponse()
        text = resp.read().decode()
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                val = rest.split(";")[0]
                if "Max-Age=0" in value:
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = val
        got = {k.lower(): v for k, v in resp.getheaders()}
        con.close()
        return resp.status, text, got

    def csrf(self, path: str = "/login") -> str:
        status, text, _ = self.send("GET", path)
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        return found.group(1) if found else ""


@pytest.fixture
def explorer(persona_home: Path):
    """A real server on an empty home with an admin key: (url, home)."""
    served = start_server(persona_home, env={"PERSONA_ADMIN_KEY": ADMIN_KEY})
    yield served
    served.stop(signal.SIGKILL)


def test_pages_need_the_read_key_and_a_session_cookie_that_is_not_the_key(explorer):
    client = Client(explorer.url)
    status, text, headers = client.send("GET", "/")
    assert status == 401 and 'name="key"' in text and "PERSONA_READ_KEY" in text
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    # a write key or a wrong key signs nobody in
    for wrong in (WRITE_KEY, "not-the-key-123", ADMIN_KEY):
        assert client.send("POST", "/login", {"key": wrong})[0] == 401
    assert not client.cookies
    status, _, headers = client.send("POST", "/login", {"key": READ_KEY, "next": "/segments/S1"})
    assert status == 303 and headers["location"] == "/segments/S1"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ_KEY not in cookie
    # signed in: the page asks the snapshot, which this home does not have yet
    status, text, _ = client.send("GET", "/")
    assert status == 503 and "persona run" in text
    # a forged or edited session is no session
    token = client.cookies["persona_read"]
    forged = Client(explorer.url, {"persona_read": token[:-4] + ("0000" if not token.endswith("0000") else "1111")})
    assert forged.send("GET", "/")[0] == 401
    # never an open redirect
    assert (
        Client(explorer.url).send("POST", "/login", {"key": READ_KEY, "next": "//evil.example/"})[2]["location"] == "/"
    )
    # the read key in a header reads too (as the profile API takes it), so scripts need no cookie
    assert client.send("GET", "/", headers={"Authorization": f"Bearer {READ_KEY}"})[0] == 503
    assert READ_KEY not in explorer.output() and ADMIN_KEY not in explorer.output()


def test_posts_need_their_csrf_token_the_same_origin_and_actions_the_admin_key(explorer):
    client = Client(explorer.url)
    client.send("POST", "/login", {"key": READ_KEY})
    person = "/people/p0123456789abcdef/forget"
    # no token, a wrong token: refused, nothing started
    assert client.send("POST", "/logout", {})[0] == 403
    assert client.send("POST", "/unlock", {"key": ADMIN_KEY, "csrf": "x" * 64})[0] == 403
    status, text, _ = client.send("GET", "/login")
    assert status == 303  # signed in already
    csrf = client.csrf("/nothing-here")
    assert len(csrf) == 64
    # the right token from another site: refused (a browser names the site it posts from)
    other = {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
    assert client.send("POST", "/unlock", {"key": ADMIN_KEY, "csrf": csrf}, other)[0] == 403
    assert client.send("POST", "/unlock", {"key": ADMIN_KEY, "csrf": csrf}, {"Origin": "http://evil.example"})[0] == 403
    # a read session cannot act; the read key is not the admin key
    status, text, _ = client.send("POST", person, {"csrf": csrf})
    assert status == 403 and "admin key" in text
    assert client.send("POST", "/unlock", {"key": READ_KEY, "csrf": csrf})[0] == 403
    status, _, headers = client.send("POST", "/unlock", {"key": ADMIN_KEY, "csrf": csrf, "next": "/"})
    assert status == 303 and "persona_admin" in client.cookies and ADMIN_KEY not in headers["set-cookie"]
    # unlocked, but the token of another session: refused
    stranger = Client(explorer.url)
    stranger.send("POST", "/login", {"key": READ_KEY})
    stranger.cookies["persona_admin"] = client.cookies["persona_admin"]
    assert stranger.send("POST", person, {"csrf": csrf})[0] == 403
    # unlocked with its own token: the action asks for the person (no snapshot here: nobody to act on)
    assert client.send("POST", person, {"csrf": csrf})[0] in (404, 503)
    # sign out ends both sessions
    assert client.send("POST", "/logout", {"csrf": csrf})[0] == 303
    assert not client.cookies and client.send("GET", "/")[0] == 401


def test_without_an_admin_key_actions_are_off_and_the_page_says_how_to_turn_them_on(persona_home):
    served = start_server(persona_home)
    try:
        client = Client(served.url)
        client.send("POST", "/login", {"key": READ_KEY})
        csrf = client.csrf("/nothing-here")
        for path in ("/unlock", "/people/p0123456789abcdef/unmerge"):
            status, text, _ = client.send("POST", path, {"key": ADMIN_KEY, "csrf": csrf})
            assert status == 403 and "PERSONA_ADMIN_KEY" in text
        assert "persona_admin" not in client.cookies
    finally:
        served.stop(signal.SIGKILL)


def test_the_explorer_is_off_without_a_read_key_and_static_files_are_served(persona_home):
    served = start_server(persona_home, env={"PERSONA_READ_KEY": None})
    try:
        client = Client(served.url)
        status, text, _ = client.send("GET", "/")
        assert status == 503 and "PERSONA_READ_KEY" in text
        status, text, headers = client.send("GET", "/static/explorer.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript") and "use strict" in text
        for sneaky in ("/static/../config.py", "/static/%2e%2e%2fconfig.py", "/static/.hidden.css"):
            status, text, _ = client.send("GET", sneaky)
            assert status in (404, 503) and "ServerSettings" not in text
    finally:
        served.stop(signal.SIGKILL)


def test_what_a_visitor_sends_comes_back_escaped(explorer):
    client = Client(explorer.url)
    path = "/people/" + urllib.parse.quote('"><script>alert(1)</script>')
    status, text, _ = client.send("GET", path)
    assert status == 401 and "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_the_person_page_escapes_every_value(tmp_path):
    """The person template with HTML and script in every field a person or an event can fill."""
    from persona_assets.server.config import ServerSettings
    from persona_assets.server.explorer import BEHAVIOUR, Explorer, Visit, _bars

    evil = "<script>alert(1)</script>"
    traits = {
        "person_id": "p0123456789abcdef",
        "top_category": evil,
        "next_question": evil,
        "live": evil,
        "category_affinity": {evil: 2.0, "books": 1.0},
        "enriched": {evil: evil},
    }
    event = {
        "message_id": evil,
        "event_at": "2025-01-01T00:00:00",
        "event_type": "track",
        "event_name": evil,
        "category": evil,
        "product_id": evil,
        "price": None,
        "quantity": None,
        "revenue": None,
        "order_id": None,
        "search_query": evil,
        "page_url": evil,
        "device_type": None,
        "arrived_via": "stream",
    }
    explorer = Explorer(ServerSettings(write_key="w" * 8, read_key="r" * 8, admin_key="a" * 8), tmp_path, None, None)
    answer = explorer.page(
        "person.html",
        Visit(True, True, "c" * 64),
        person_id=traits["person_id"],
        traits=traits,
        provenance=[{"trait": evil, "value": evil, "source": evil, "confidence": 0.5, "observed_at": None}],
        behaviour=[(label, evil) for _, label in BEHAVIOUR],
        affinity=_bars(traits["category_affinity"]),
        identity={
            "links": [
                {
                    "record_l": evil,
                    "record_r": evil,
                    "match_probability": 0.9,
                    "match_weight": 3.0,
                    "weights": {evil: 1.0},
                    "status": evil,
                    "reason": evil,
                }
            ],
            "history": [
                {
                    "changed_at": None,
                    "old_person_id": evil,
                    "new_person_id": evil,
                    "change": evil,
                    "identifiers_moved": 1,
                }
            ],
        },
        identifiers=[{"type": "user_id", "id": evil, "first_seen_at": None, "last_seen_at": None}],
        audiences={
            "data": [
                {
                    "audience": evil,
                    "entered_at": None,
                    "description": evil,
                    "why": [{"depth": 1, "holds": True, "text": evil, "value": evil}],
                }
            ]
        },
        events={"data": [event], "cursor": {"has_more": True, "next": '"&x=<y>'}},
        after=None,
        path=[{"id": evil, "name": evil, "people": 1, "explanation": evil}],
        jobs=[],
    )
    html = answer.body.decode()
    assert "<script>alert" not in html and html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 20
    assert "next=%22%26x%3D%3Cy%3E" in html  # a cursor is URL-encoded inside the link
    assert "live · stream" in html


# --- in the browser, on one built home ------------------------------------------------------


def _event(message_id: str, kind: str, at: str, **fields) -> str:
    return json.dumps({"messageId": message_id, "type": kind, "timestamp": at, **fields}) + "\n"


AUDIENCES = """computed_traits:
  views: {count: {event: Product Viewed}}
  favourite: {most_frequent: {property: category}}
audiences:
  buyers: {description: ordered at least once, where: {trait: order_count, gte: 1}}
  browsers: {where: {all: [{trait: views, gte: 1}, {not: {trait: order_count, gte: 5}}]}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One home for the browser tests: 150 generated people, 240 sign-ups (a quarter signing up
    twice, which linkage merges) and one person whose every free-text field is HTML or script."""
    root = tmp_path_factory.mktemp("explorer")
    home = root / "persona"
    landing = home / "landing"
    landing.mkdir(parents=True)
    generate(150, 21, landing, "jsonl", people_per_file=75, truth_dir=root / "truth")
    identify_records(240, 3, root / "signups")
    shutil.copy2(root / "signups" / "signups-s3.jsonl", landing / "signups.jsonl")
    (landing / "hostile.jsonl").write_text(
        _event(
            "x1",
            "identify",
            "2025-06-01T10:00:00Z",
            userId="evil-1",
            anonymousId="evil-a",
            traits={"email": "evil@example.com", "gender": HOSTILE["category"]},
        )
        + _event(
            "x2",
            "track",
            "2025-06-01T10:01:00Z",
            userId="evil-1",
            event=HOSTILE["event"],
            properties={"category": HOSTILE["category"], "product_id": HOSTILE["product"], "price": 3},
        )
        + _event(
            "x3",
            "track",
            "2025-06-01T10:02:00Z",
            userId="evil-1",
            event="Product Viewed",
            properties={"category": HOSTILE["viewed"], "query": HOSTILE["category"]},
        )
        + _event(
            "x4",
            "track",
            "2025-06-01T10:03:00Z",
            userId="evil-1",
            event="Product Viewed",
            properties={"category": HOSTILE["viewed"]},
        )
    )
    (home / "audiences.yaml").write_text(AUDIENCES)
    # One event through the HTTP collector (the server's spool moves into landing as it stops): a live one.
    collector = start_server(home, env={"PERSONA_HASH_KEY": None})
    live = {"userId": "evil-1", "event": "Live Ping", "messageId": "live-1", "timestamp": "2025-06-01T10:05:00Z"}
    assert request(f"{collector.url}/v1/track", live)[0] == 200
    collector.stop()
    assert len(list(landing.glob("http-*.jsonl"))) == 1
    env = {**os.environ, "PERSONA_HOME": str(home), "DAGSTER_HOME": str(root / "dagster")}
    env.pop("PERSONA_HASH_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", "run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    served = start_server(
        home, env={"PERSONA_ADMIN_KEY": ADMIN_KEY, "DAGSTER_HOME": str(root / "dagster"), "PERSONA_HASH_KEY": None}
    )
    yield home, served
    served.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is needed (make test installs it: apt-get install chromium)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(built, browser):
    """A new browser context, signed in with the read key."""
    _, served = built
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    tab = context.new_page()
    tab.goto(served.url + "/")
    tab.fill("input[name=key]", READ_KEY)
    with tab.expect_navigation():
        tab.click("main button[type=submit]")
    yield tab
    context.close()


def _snapshot(home: Path, sql: str, params=None) -> list[tuple]:
    with duckdb.connect(str(home / "serving" / "persona.duckdb"), read_only=True) as con:
        return con.execute(sql, params).fetchall()


def _unlock(page) -> None:
    page.fill("#actions input[name=key]", ADMIN_KEY)
    with page.expect_navigation():
        page.click("#actions button[type=submit]")


def _an_email_of_one_person(home: Path) -> tuple[str, str]:
    """(email as written in an event, its person), for an email identity_map holds for one person."""
    from persona_assets.core.pii import hmac_hex, load_key, normalize_email

    key = load_key(home)
    for path in sorted((home / "landing").glob("events-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                email = json.loads(line).get("traits", {}).get("email")
            except (ValueError, AttributeError):
                continue
            normal = normalize_email(email, True) if isinstance(email, str) else None
            if normal:
                rows = _snapshot(
                    home,
                    "SELECT DISTINCT person_id FROM identity_map WHERE identifier_type = 'email' AND identifier = ?",
                    [hmac_hex(key, normal)],
                )
                if len(rows) == 1:
                    return email, rows[0][0]
    raise AssertionError("no email of one person in the generated files")


@pytest.mark.slow
def test_search_by_email_opens_the_person_with_traits_and_sources_as_in_the_snapshot(built, page):
    home, served = built
    email, person = _an_email_of_one_person(home)
    # written another way: the server normalizes and hashes it as ingest did
    page.fill("form.big-search input[name=q]", f"  {email.upper()} ")
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "explorer-search.png"))
    with page.expect_navigation():
        page.click("form.big-search button")
    assert page.url.endswith(f"/people/{person}")
    assert page.inner_text("h1#person") == person
    from persona_assets.server.explorer import _number

    # as the page writes them: imputed values as stored, computed numbers through the page's format
    expected = _snapshot(home, "SELECT trait, value, source FROM imputed_attributes WHERE person_id = ?", [person])
    computed = _snapshot(home, "SELECT trait, number, text, source FROM computed_traits WHERE person_id = ?", [person])
    expected += [(trait, _number(n) if n is not None else text, source) for trait, n, text, source in computed]
    assert page.locator("#traits tbody tr").count() == len(expected) > 5
    for trait, value, source in expected:
        row = page.locator(f'#traits tr[data-trait="{trait}"]')
        assert row.locator("[data-source]").get_attribute("data-source") == source, trait
        assert row.locator("td.value").inner_text() == ("unknown" if value is None else value), trait
    assert len({s for _, _, s in expected}) >= 2 and "computed" in {s for _, _, s in expected}
    nq = _snapshot(home, "SELECT next_question FROM user_profiles WHERE person_id = ?", [person])[0][0]
    assert page.inner_text("#next-question") == (nq or "nothing (every askable trait is known)")
    assert page.locator("#affinity rect.bar").count() >= 1
    assert page.locator("#activity rect.week").count() == 26
    segment = _snapshot(home, "SELECT segment_id, subsegment_id FROM user_profiles WHERE person_id = ?", [person])[0]
    if segment[0]:
        assert segment[0] in page.inner_text("#segment")
    members = _snapshot(home, "SELECT audience FROM audience_members WHERE person_id = ?", [person])
    for (audience,) in members:
        assert audience in page.inner_text("#audiences")
    assert page.locator("#audiences .why li.holds").count() >= len(members)
    if SCREENSHOTS:
        page.screenshot(path=str(SCREENSHOTS / "explorer-person.png"), full_page=True)


@pytest.mark.slow
def test_the_timeline_is_newest_first_and_pages_without_repeating_an_event(built, page):
    home, served = built
    person, count = _snapshot(
        home, "SELECT person_id, event_count FROM user_profiles ORDER BY event_count DESC, person_id LIMIT 1"
    )[0]
    assert count > 45
    page.goto(f"{served.url}/people/{person}")
    seen = []
    for _ in range(3):
        ids = page.locator("#timeline tr.event").evaluate_all("rows => rows.map(r => r.dataset.messageId)")
        assert len(ids) == 20
        seen += ids
        with page.expect_navigation():
            page.click("#older")
    seen += page.locator("#timeline tr.event").evaluate_all("rows => rows.map(r => r.dataset.messageId)")
    expected = _snapshot(
        home,
        """WITH ids AS (SELECT identifier_type, identifier FROM identity_map WHERE person_id = ?)
        SELECT message_id FROM raw_events WHERE user_id IN (SELECT identifier FROM ids WHERE identifier_type = 'user_id')
           OR anonymous_id IN (SELECT identifier FROM ids WHERE identifier_type = 'anonymous_id')
        ORDER BY event_at DESC, message_id DESC LIMIT ?""",
        [person, len(seen)],
    )
    assert seen == [m for (m,) in expected] and len(set(seen)) == len(seen)


@pytest.mark.slow
def test_browse_an_audience_page_by_page_from_the_first_page(built, page):
    home, _ = built
    with page.expect_navigation():
        page.click("text=browsers")
    seen = []
    while True:
        seen += page.locator("table.members tbody a").all_inner_texts()
        if page.locator("a.next").count() == 0:
            break
        with page.expect_navigation():
            page.click("a.next")
    expected = _snapshot(home, "SELECT person_id FROM audience_members WHERE audience = 'browsers' ORDER BY 1")
    assert seen == [p for (p,) in expected] and len(seen) > 100  # three pages of 50


@pytest.mark.slow
def test_html_and_script_in_traits_event_names_and_properties_show_as_text(built, page):
    _, served = built
    page.fill("header input[name=q]", "evil@example.com")
    with page.expect_navigation():
        page.click("header form.search button")
    assert page.evaluate("typeof window.pwned") == "undefined"
    live = page.locator("#timeline tr.event.live")  # the event the HTTP collector took, marked
    assert live.count() == 1 and "live · HTTP" in live.inner_text() and "Live Ping" in live.inner_text()
    timeline = page.inner_text("#timeline")
    for text in (HOSTILE["event"], HOSTILE["category"], HOSTILE["viewed"], HOSTILE["product"]):
        assert text in timeline, text
    assert HOSTILE["viewed"] in page.inner_text("#traits")  # the computed trait `favourite`
    assert HOSTILE["viewed"] in page.locator("#affinity title").all_text_contents()[0]  # the chart's label
    assert page.locator("main img, main script, main b, #timeline svg").count() == 0
    # and where the same values are listed: the audiences the person is in
    page.goto(f"{served.url}/search?q=" + urllib.parse.quote(HOSTILE["category"]))
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert HOSTILE["category"] in page.inner_text("h1")


@pytest.mark.slow
def test_the_reads_behind_the_pages_are_profile_api_endpoints(built):
    home, served = built
    url = served.url
    status, found, _ = request(f"{url}/v1/search?q=evil%40example.com", key=READ_KEY)
    assert status == 200 and [f["matched"] for f in found["data"]] == [["email"]]
    person = found["data"][0]["person_id"]
    assert request(f"{url}/v1/search?q=evil%40example.com", key=WRITE_KEY)[0] == 401
    assert request(f"{url}/v1/search?q=nobody-at-all", key=READ_KEY)[1] == {"data": []}
    status, provenance, _ = request(f"{url}/v1/profiles/user_id:evil-1/provenance", key=READ_KEY)
    traits = {t["trait"]: t for t in provenance["data"]}
    assert traits["favourite"] == {
        "trait": "favourite",
        "value": HOSTILE["viewed"],
        "source": "computed",
        "kind": "most_frequent",
        "confidence": None,
        "model_version": None,
        "observed_at": None,
    }
    assert request(f"{url}/v1/profiles/user_id:evil-1/links", key=READ_KEY)[1]["person_id"] == person
    status, audiences, _ = request(f"{url}/v1/profiles/person_id:{person}/audiences?why=true", key=READ_KEY)
    browsers = next(a for a in audiences["data"] if a["audience"] == "browsers")
    assert browsers["why"][0]["holds"] and any(r["value"] == 2 for r in browsers["why"])
    status, events, _ = request(f"{url}/v1/profiles/user_id:evil-1/events?limit=2", key=READ_KEY)
    assert [(e["message_id"], e["arrived_via"]) for e in events["data"]] == [("live-1", "http"), ("x4", "file")]
    weeks = request(f"{url}/v1/profiles/user_id:evil-1/activity", key=READ_KEY)[1]["data"]
    assert len(weeks) == 26 and weeks[-1] == {"week": "2025-05-26", "events": 5, "orders": 0}
    assert sum(w["events"] for w in weeks) == 5
    segments = request(f"{url}/v1/segments", key=READ_KEY)[1]["data"]
    first = segments[0]
    seen, after = [], ""
    while True:
        page = request(f"{url}/v1/segments/{first['id']}/members?limit=40{after}", key=READ_KEY)[1]
        seen += [m["person_id"] for m in page["data"]]
        if not page["cursor"]["has_more"]:
            break
        after = f"&next={page['cursor']['next']}"
    expected = _snapshot(
        home,
        "SELECT person_id FROM user_profiles WHERE segment_id = $1 OR subsegment_id = $1 ORDER BY person_id",
        [first["id"]],
    )
    assert seen == [p for (p,) in expected] and len(seen) == first["people"]
    listed = request(f"{url}/v1/audiences", key=READ_KEY)[1]["data"]
    assert {a["audience"] for a in listed} == {"buyers", "browsers"}
    members = request(f"{url}/v1/audiences/buyers/members?limit=200", key=READ_KEY)[1]["data"]
    assert len(members) == next(a["size"] for a in listed if a["audience"] == "buyers")
    assert request(f"{url}/v1/audiences/nope/members", key=READ_KEY)[0] == 404
    assert request(f"{url}/v1/segments/S1/members?next=%27%3B--", key=READ_KEY)[0] == 400


@pytest.mark.slow
def test_undo_a_merge_from_the_page_and_see_two_people_after_the_refresh(built, page):
    home, served = built
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        person = con.execute(
            """SELECT person_id FROM identity_links WHERE status = 'merged' GROUP BY 1 HAVING count(*) = 1
               AND person_id IN (SELECT person_id FROM identity_map GROUP BY 1 HAVING count(*) = 2)
               ORDER BY 1 LIMIT 1"""
        ).fetchall()[0][0]
    page.goto(f"{served.url}/people/{person}")
    assert page.locator("#identifiers tbody tr").count() == 2
    # the link that merged them, with the weight each comparison added, from the published identity_links
    link = page.locator("#links tbody tr")
    assert link.count() == 1 and "merged" in link.inner_text()
    weights = link.locator("td.weights").inner_text()
    assert "name" in weights and "+" in weights, weights
    if SCREENSHOTS:  # a person two records made, with the link that merged them
        page.locator("#identity").screenshot(path=str(SCREENSHOTS / "explorer-links.png"))
    _unlock(page)
    page.click("text=Undo a merge")
    assert "Undo the merge" in page.inner_text("h1")
    page.fill("input[name=reason]", "two sisters, same birthday")
    with page.expect_navigation():
        page.click("#confirm")
    page.wait_for_selector("#status.done, #status.failed", timeout=240_000)  # the page follows the action
    assert page.locator("#status.done").count() == 1, page.inner_text("#action")
    assert page.inner_text("#people-now").startswith("2 people")
    people = page.locator("#people-now a.person-link").all_inner_texts()
    assert person in people and len(set(people)) == 2
    for other in people:
        page.goto(f"{served.url}/people/{other}")
        assert page.locator("#identifiers tbody tr").count() == 1
    assert {"split"} == {
        c for (c,) in _snapshot(home, "SELECT change FROM person_id_history WHERE old_person_id = ?", [person])
    }

    # and forced back together from the page, naming the other by one of its identifiers
    other = next(p for p in people if p != person)
    anonymous_id = _snapshot(home, "SELECT identifier FROM identity_map WHERE person_id = ?", [other])[0][0]
    page.goto(f"{served.url}/people/{person}")
    page.fill("#actions input[name=with]", anonymous_id)
    with page.expect_navigation():
        page.click("#actions form[method=get] button")
    assert f"{person} and {other} one person" in page.inner_text("main")
    with page.expect_navigation():
        page.click("#confirm")
    page.wait_for_selector("#status.done, #status.failed", timeout=240_000)
    assert page.locator("#status.done").count() == 1, page.inner_text("#action")
    assert page.inner_text("#people-now").startswith("1 person")  # holding both people's identifiers
    with page.expect_navigation():
        page.click("#people-now a.person-link")
    assert page.locator("#identifiers tbody tr").count() == 2


@pytest.mark.slow
def test_forget_a_person_from_the_page_and_see_them_gone(built, page):
    home, served = built
    email, person = _an_email_of_one_person(home)
    identifiers = _snapshot(home, "SELECT count(*) FROM identity_map WHERE person_id = ?", [person])[0][0]
    page.goto(f"{served.url}/people/{person}")
    _unlock(page)
    page.click("text=Forget this person")
    erased = page.inner_text("#erased")
    assert f"{identifiers} identifiers" in erased and "events" in erased and "audience memberships" in erased
    with page.expect_navigation():
        page.click("#confirm")
    page.wait_for_selector("#status.done, #status.failed", timeout=240_000)
    assert page.locator("#status.done").count() == 1, page.inner_text("#action")
    assert "nobody" in page.inner_text("#action table")
    page.goto(f"{served.url}/search?q=" + urllib.parse.quote(email))
    assert page.inner_text("h1").startswith("0 people")
    assert page.goto(f"{served.url}/people/{person}").status == 404
    assert not _snapshot(home, "SELECT 1 FROM user_profiles WHERE person_id = ?", [person])


def test_links_are_read_with_their_weights_when_the_snapshot_holds_them(tmp_path):
    """The reader gives a person's links with each comparison's weight, as the snapshot holds them."""
    from persona_assets.server.profiles import ProfileReader

    path = tmp_path / "persona.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE user_profiles AS SELECT 'p00000000000000aa' AS person_id")
        con.execute("""CREATE TABLE identity_map AS SELECT 'user_id' AS identifier_type, 'u1' AS identifier,
                       'p00000000000000aa' AS person_id, now()::TIMESTAMP AS first_seen_at,
                       now()::TIMESTAMP AS last_seen_at""")
        con.execute("""CREATE TABLE person_id_history AS SELECT 'p00000000000000bb' AS old_person_id,
                       'p00000000000000aa' AS new_person_id, 'merge' AS change, 1 AS identifiers_moved,
                       TIMESTAMP '2026-01-01' AS changed_at""")
        con.execute("""CREATE TABLE identity_links AS SELECT 'p00000000000000aa' AS record_id_l,
                       'p00000000000000bb' AS record_id_r, 'p00000000000000aa' AS person_id, 0.98 AS match_probability,
                       14.5 AS match_weight, '{"first_name": 6.7, "birthday": 7.8}' AS weights, 'merged' AS status,
                       NULL AS reason""")
    reader = ProfileReader(path, b"k")
    try:
        answer = reader.links("user_id", "u1")
    finally:
        reader.close()
    assert answer["links"] == [
        {
            "record_l": "p00000000000000aa",
            "record_r": "p00000000000000bb",
            "match_probability": 0.98,
            "match_weight": 14.5,
            "weights": {"first_name": 6.7, "birthday": 7.8},
            "status": "merged",
            "reason": None,
        }
    ]
    assert answer["history"][0]["change"] == "merge"
