"""`persona serve`: Segment's tracking API into landing (durable before 200) and the profile API.

Every test talks to a real server process over HTTP; events are followed into raw_events by
the real ingest."""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from persona_assets.core.ingest import ingest, landing_files
from persona_assets.server import spool
from persona_assets.server.config import ServerSettingsError, check_section
from persona_assets_tests.sdk.serving import (
    READ_KEY,
    WRITE_KEY,
    basic,
    landing_lines,
    request,
    start_server,
)

NOW = datetime.now(UTC)


def event(n: int | str, **extra) -> dict:
    return {"type": "track", "event": "Product Viewed", "userId": f"u{n}", "messageId": f"m-{n}",
            "properties": {"category": "shoes", "price": 10.0},
            "timestamp": NOW.isoformat().replace("+00:00", "Z"), **extra}  # fmt: skip


@pytest.fixture
def server(persona_home: Path):
    started = []

    def start(**kwargs):
        started.append(start_server(persona_home, **kwargs))
        return started[-1]

    yield start
    for served in started:
        served.stop(signal.SIGKILL)


def ingested(home: Path) -> duckdb.DuckDBPyConnection:
    """The server's landing files through the real ingest, into a fresh warehouse in memory."""
    con = duckdb.connect()
    ingest(con, home / "landing", b"test-key")
    return con


def test_serve_refuses_to_start_without_a_write_key_and_says_how_to_set_one(persona_home):
    env = {**os.environ, "PERSONA_HOME": str(persona_home)}
    env.pop("PERSONA_WRITE_KEY", None)
    cmd = [sys.executable, "-m", "persona_assets.cli", "serve", "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PERSONA_WRITE_KEY" in done.stderr and "Traceback" not in done.stderr
    same = {**env, "PERSONA_WRITE_KEY": "same-key-123", "PERSONA_READ_KEY": "same-key-123"}
    done = subprocess.run(cmd, env=same, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "read key equals the write key" in done.stderr
    assert "same-key-123" not in done.stderr


def test_the_server_section_of_persona_yaml_is_checked():
    assert check_section({"port": 9000, "max_requests_per_second": 5}) == {"port": 9000, "max_requests_per_second": 5.0}
    with pytest.raises(ServerSettingsError, match="server.prot: unknown setting"):
        check_section({"prot": 9000})
    with pytest.raises(ServerSettingsError, match="server.port: expected int, got str"):
        check_section({"port": "9000"})


def test_every_status_code_of_the_tracking_api(server, persona_home):
    served = server()
    url = served.url
    status, body, headers = request(f"{url}/v1/track", event(1))
    assert (status, body) == (200, {"success": True, "accepted": 1, "quarantined": 0})
    assert headers["access-control-allow-origin"] == "*"
    # the write key in the body instead of Basic auth (analytics.js sends both)
    assert request(f"{url}/v1/identify", {"userId": "u2", "writeKey": WRITE_KEY}, key=None)[0] == 200
    assert request(f"{url}/v1/identify", {"userId": "u2", "writeKey": "not-the-key"}, key=None)[0] == 401
    assert request(f"{url}/v1/track", event(3), key=None)[0] == 401
    assert request(f"{url}/v1/track", event(3), key="wrong-key-123")[0] == 401
    assert request(f"{url}/v1/track", event(3), key=READ_KEY)[0] == 401  # a read key cannot write
    assert request(f"{url}/v1/track", b"{not json")[:2] == (
        400,
        {"success": False, "error": "the body is not valid JSON"},
    )
    assert request(f"{url}/v1/track", b"", method="POST")[0] == 400
    assert request(f"{url}/v1/track", b"[1, 2]")[0] == 400
    assert request(f"{url}/v1/batch", {"batch": "nope"})[0] == 400
    assert request(f"{url}/v1/batch", {"batch": [event(4)] * 2501})[0] == 413
    big = event(5, properties={"notes": "x" * 33_000})
    assert request(f"{url}/v1/track", big)[0] == 413
    assert request(f"{url}/v1/batch", {"batch": [event(6), big]})[0] == 413  # one event past 32 KB
    assert (
        request(f"{url}/v1/batch", {"batch": [event(i, properties={"n": "y" * 20_000}) for i in range(30)]})[0] == 413
    )
    assert request(f"{url}/v1/nothing", event(7))[0] == 404
    status, _, headers = request(f"{url}/v1/t", None, method="OPTIONS", key=None,
                                 headers={"Origin": "http://shop.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert status == 204 and "Authorization" in headers["access-control-allow-headers"]
    assert WRITE_KEY not in served.output() and READ_KEY not in served.output()


def test_a_batch_answers_how_many_were_accepted_and_quarantined_and_nothing_is_lost(server, persona_home):
    served = server()
    batch = [event(1), {"type": "track", "event": "No one"}, {"type": "launch", "userId": "u9"}, "a string",
             event(2, timestamp="yesterday"), event(3, properties={"price": -5})]  # fmt: skip
    status, body, _ = request(f"{served.url}/v1/batch", {"batch": batch})
    assert status == 200
    assert body == {"success": True, "accepted": 1, "quarantined": 5, "reasons": {
        "missing_id": 1, "unknown_type": 1, "not_an_object": 1, "bad_timestamp": 1, "bad_value": 1}}  # fmt: skip
    served.stop()
    con = ingested(persona_home)
    assert con.execute("SELECT message_id FROM raw_events").fetchall() == [("m-1",)]
    reasons = con.execute("SELECT reason, count(*) FROM quarantined_events GROUP BY 1").fetchall()
    assert dict(reasons) == body["reasons"]  # the server's answer and ingest agree: the same contract


def test_gzip_bodies_and_their_limits(server, persona_home):
    served = server()
    body = gzip.compress(json.dumps({"batch": [event(i) for i in range(50)]}).encode())
    status, answer, _ = request(f"{served.url}/v1/batch", body, headers={"Content-Encoding": "gzip"})
    assert (status, answer["accepted"]) == (200, 50)
    bomb = gzip.compress(json.dumps({"batch": [event(1, properties={"pad": " " * 400_000}), event(2)] * 2}).encode())
    assert len(bomb) < 10_000
    assert request(f"{served.url}/v1/batch", bomb, headers={"Content-Encoding": "gzip"})[0] == 413
    assert request(f"{served.url}/v1/batch", b"\x1f\x8b not gzip", headers={"Content-Encoding": "gzip"})[0] == 400


def test_413_is_answered_from_the_headers_before_the_body_is_read(server):
    served = server()
    parts = urllib.parse.urlsplit(served.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.putrequest("POST", "/v1/batch")
    conn.putheader("Authorization", basic(WRITE_KEY))
    conn.putheader("Content-Length", str(10_000_000))
    conn.endheaders()  # no body is ever sent: the answer cannot wait for it
    assert conn.getresponse().status == 413
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.putrequest("POST", "/v1/batch")  # chunked, no length: cut off while it streams
    conn.putheader("Authorization", basic(WRITE_KEY))
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(10):
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert conn.getresponse().status == 413


def test_429_with_retry_after_past_the_configured_rate(server, persona_home):
    (persona_home / "persona.yaml").write_text("server:\n  max_requests_per_second: 1\n  burst: 3\n")
    served = server()
    statuses = [request(f"{served.url}/v1/track", event(i)) for i in range(6)]
    assert [s for s, _, _ in statuses[:3]] == [200, 200, 200]
    refused = [(s, h) for s, _, h in statuses[3:] if s != 200]
    assert refused and all(s == 429 and int(h["retry-after"]) >= 1 for s, h in refused)
    time.sleep(1.1)
    assert request(f"{served.url}/v1/track", event(9))[0] == 200


def test_received_at_is_stamped_and_timestamp_corrected_for_clock_skew(server, persona_home):
    served = server()
    # The client's clock runs an hour fast: it says it sent the batch an hour from now.
    original = NOW - timedelta(minutes=5)
    sent = datetime.now(UTC) + timedelta(hours=1)
    batch = [event(1, timestamp=(original + timedelta(hours=1)).isoformat()), event(2)]
    del batch[1]["timestamp"]
    request(f"{served.url}/v1/batch", {"batch": batch, "sentAt": sent.isoformat()})
    served.stop()
    first, second = landing_lines(persona_home)
    received = datetime.fromisoformat(first["receivedAt"])
    assert abs(received - datetime.now(UTC)) < timedelta(minutes=1)
    assert first["originalTimestamp"] == (original + timedelta(hours=1)).isoformat()  # kept as sent
    corrected = datetime.fromisoformat(first["timestamp"])
    assert abs(corrected - original) < timedelta(seconds=5)  # receivedAt - (sentAt - originalTimestamp)
    assert second["timestamp"] == second["receivedAt"] and "originalTimestamp" not in second
    assert "writeKey" not in json.dumps([first, second])


def test_spool_files_move_into_landing_whole_and_only_then_are_read(server, persona_home):
    served = server()
    request(f"{served.url}/v1/track", event(1))
    assert list((persona_home / "landing").glob(".http-*.part"))  # the open spool: never read by ingest
    assert landing_files(persona_home / "landing") == []
    time.sleep(1.6)  # rotated within rotate_seconds even when no further request comes
    assert [p.name.startswith("http-") for p in landing_files(persona_home / "landing")] == [True]
    assert not list((persona_home / "landing").glob(".http-*.part"))


def test_recovery_cuts_a_torn_last_line_and_leaves_a_live_servers_spool_alone(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    dead = landing / ".http-1-1-000001.jsonl.part"
    dead.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    live = landing / ".http-2-2-000001.jsonl.part"
    live.write_bytes(b'{"d":4}\n')
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running server holds its spool
    try:
        found = spool.recover(landing)
    finally:
        os.close(fd)
    assert found.files == [landing / "http-1-1-000001.jsonl"] and found.torn_bytes == 5
    assert found.files[0].read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert live.exists()


def test_concurrent_requests_share_one_fsync(tmp_path):
    async def run() -> spool.Spool:
        s = spool.Spool(tmp_path, rotate_seconds=60)
        await asyncio.gather(*(s.append(f'{{"n":{i}}}\n'.encode()) for i in range(200)))
        await s.close()
        return s

    s = asyncio.run(run())
    assert s.commits < 20
    lines = [json.loads(line)["n"] for p in s.rotated for line in p.read_text().splitlines()]
    assert sorted(lines) == list(range(200))


def _sender(url_box: dict, acked: set, stop: threading.Event, seed: int) -> None:
    """Sends batches of new events; a batch without a 200 is sent again (same messageIds) until one comes."""
    rng = random.Random(seed)
    while not stop.is_set():
        batch = [event(f"{seed}-{uuid.uuid4().hex[:12]}") for _ in range(rng.randint(1, 40))]
        while not stop.is_set():
            try:
                status, _, _ = request(f"{url_box['url']}/v1/batch", {"batch": batch}, timeout=2)
            except OSError:
                status = 0
            if status == 200:
                acked.update(e["messageId"] for e in batch)
                break
            time.sleep(0.02)


@pytest.mark.slow
def test_a_server_killed_at_random_moments_loses_no_event_it_answered_200_for(persona_home):
    """SIGKILL while four clients send; each restart recovers the spool. Every acknowledged
    event reaches raw_events once, and the retries of unanswered batches count once too."""
    rng = random.Random(24)
    acked: set[str] = set()
    stop = threading.Event()
    url_box = {"url": ""}
    served = start_server(persona_home)
    url_box["url"] = served.url
    senders = [threading.Thread(target=_sender, args=(url_box, acked, stop, i)) for i in range(4)]
    for t in senders:
        t.start()
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            served.stop(signal.SIGKILL)
            served = start_server(persona_home)
            url_box["url"] = served.url
        time.sleep(0.5)
    finally:
        stop.set()
        for t in senders:
            t.join()
        served.stop()
    assert len(acked) > 200
    assert not list((persona_home / "landing").glob(".http-*"))
    con = ingested(persona_home)
    kept = {m for (m,) in con.execute("SELECT message_id FROM raw_events").fetchall()}
    assert acked <= kept
    assert con.execute("SELECT count(*) = count(DISTINCT message_id) FROM raw_events").fetchall()[0][0]
    assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0  # no torn line, no conflict
    # Sending everything again (a client replaying its whole log) adds nothing.
    served = start_server(persona_home)
    replay = [event(m.removeprefix("m-")) for m in sorted(acked)]
    for start in range(0, len(replay), 500):
        assert request(f"{served.url}/v1/batch", {"batch": replay[start : start + 500]})[0] == 200
    served.stop()
    before = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    ingest(con, persona_home / "landing", b"test-key")
    assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == before
    assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0
