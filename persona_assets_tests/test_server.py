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
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
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
    return {
        "type": "track",
        "event": "Product Viewed",
        "userId": f"u{n}",
        "messageId": f"m-{n}",
        "properties": {"category": "shoes", "price": 10.0},
        "timestamp": NOW.isoformat().replace("+00:00", "Z"),
        **extra,
    }


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


def test_serve_refuses_durable_stream_without_a_stream(persona_home):
    (persona_home / "persona.yaml").write_text("server:\n  durable: stream\n")
    env = {**os.environ, "PERSONA_HOME": str(persona_home), "PERSONA_WRITE_KEY": WRITE_KEY}
    env.pop("PERSONA_REDIS_URL", None)
    cmd = [sys.executable, "-m", "persona_assets.cli", "serve", "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "server.durable is stream but no Redis stream is configured" in done.stderr


def test_the_server_section_of_persona_yaml_is_checked():
    assert check_section({"port": 9000, "max_requests_per_second": 5}) == {"port": 9000, "max_requests_per_second": 5.0}
    with pytest.raises(ServerSettingsError, match="server.prot: unknown setting"):
        check_section({"prot": 9000})
    with pytest.raises(ServerSettingsError, match="server.port: expected int, got str"):
        check_section({"port": "9000"})
    assert check_section({"durable": "stream"}) == {"durable": "stream"}
    with pytest.raises(ServerSettingsError, match="server.durable: one of disk, stream, got 'memory'"):
        check_section({"durable": "memory"})


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
    huge = {"batch": [event(i, properties={"n": "y" * 20_000}) for i in range(30)]}  # 600 KB
    try:
        status = request(f"{url}/v1/batch", huge)[0]
    except urllib.error.URLError as exc:
        # Refused from its Content-Length and closed unread (see the next test): a client still
        # sending can meet the closed connection before it reads the 413. Only that refusal
        # leaves a body unread; any other answer reads it whole.
        assert isinstance(exc.reason, BrokenPipeError | ConnectionResetError), exc
        status = 413
    assert status == 413
    assert request(f"{url}/v1/nothing", event(7))[0] == 404
    status, _, headers = request(
        f"{url}/v1/t",
        None,
        method="OPTIONS",
        key=None,
        headers={"Origin": "http://shop.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 204 and "Authorization" in headers["access-control-allow-headers"]
    assert WRITE_KEY not in served.output() and READ_KEY not in served.output()


def test_a_batch_answers_how_many_were_accepted_and_quarantined_and_nothing_is_lost(server, persona_home):
    served = server()
    batch = [
        event(1),
        {"type": "track", "event": "No one"},
        {"type": "launch", "userId": "u9"},
        "a string",
        event(2, timestamp="yesterday"),
        event(3, properties={"price": -5}),
    ]
    status, body, _ = request(f"{served.url}/v1/batch", {"batch": batch})
    assert status == 200
    assert body == {
        "success": True,
        "accepted": 1,
        "quarantined": 5,
        "reasons": {"missing_id": 1, "unknown_type": 1, "not_an_object": 1, "bad_timestamp": 1, "bad_value": 1},
    }
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
    (persona_home / "persona.yaml").write_text("server:\n  rotate_seconds: 1\n")
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
    """Sends batches of new events; a batch without a 200 is sent again (same messageIds, a new
    sentAt, as an SDK retries) until one comes."""
    rng = random.Random(seed)
    while not stop.is_set():
        batch = [event(f"{seed}-{uuid.uuid4().hex[:12]}") for _ in range(rng.randint(1, 40))]
        while not stop.is_set():
            try:
                status, _, _ = request(f"{url_box['url']}/v1/batch", {"batch": batch, "sentAt": sent_now()}, timeout=2)
            except OSError:
                status = 0
            if status == 200:
                acked.update(e["messageId"] for e in batch)
                break
            time.sleep(0.02)


def sent_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _kill_while_sending(home: Path, env: dict | None = None, kills: int = 6) -> set[str]:
    """SIGKILL the server `kills` times at random moments while four clients send; the messageIds
    answered 200."""
    rng = random.Random(24)
    acked: set[str] = set()
    stop = threading.Event()
    served = start_server(home, env=env)
    url_box = {"url": served.url}
    senders = [threading.Thread(target=_sender, args=(url_box, acked, stop, i)) for i in range(4)]
    for t in senders:
        t.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.5))
            served.stop(signal.SIGKILL)
            served = start_server(home, env=env)
            url_box["url"] = served.url
        time.sleep(0.5)
    finally:
        stop.set()
        for t in senders:
            t.join()
        served.stop()
    assert len(acked) > 200
    assert not list((home / "landing").glob(".http-*"))
    return acked


def _replay(home: Path, acked: set[str], env: dict | None = None) -> None:
    """Send every acknowledged event again (a client replaying its whole log, with a new sentAt)."""
    served = start_server(home, env=env)
    replay = [event(m.removeprefix("m-")) for m in sorted(acked)]
    for start in range(0, len(replay), 500):
        batch = {"batch": replay[start : start + 500], "sentAt": sent_now()}
        assert request(f"{served.url}/v1/batch", batch)[0] == 200
    served.stop()


def _each_once(con: duckdb.DuckDBPyConnection, acked: set[str]) -> None:
    kept = {m for (m,) in con.execute("SELECT message_id FROM raw_events").fetchall()}
    assert acked <= kept
    assert con.execute("SELECT count(*) = count(DISTINCT message_id) FROM raw_events").fetchall()[0][0]
    assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0  # no torn line, no conflict


@pytest.mark.slow
def test_a_server_killed_at_random_moments_loses_no_event_it_answered_200_for(persona_home):
    """SIGKILL while four clients send; each restart recovers the spool. Every acknowledged
    event reaches raw_events once, and the retries of unanswered batches count once too."""
    acked = _kill_while_sending(persona_home)
    con = ingested(persona_home)
    _each_once(con, acked)
    before = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    _replay(persona_home, acked)
    ingest(con, persona_home / "landing", b"test-key")
    assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == before
    assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0


def consumed(url: str, home: Path) -> int:
    """Everything on the stream through the real consumer into landing (Parquet), acknowledged."""
    from persona_assets import stream

    client = stream.connect(url)
    worker = stream.Consumer(
        client, stream.RedisStreamSource(client, "test"), home / "landing", stream.ConsumerOptions(block_ms=50)
    )
    while worker.step():
        pass
    worker.flush()
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] == 0
    return worker.handled


@pytest.mark.slow
def test_with_durable_stream_a_server_killed_at_random_moments_loses_no_event_it_answered_200_for(persona_home):
    """As above with the valid events on the Redis stream before the 200 (the default with a
    stream): once the consumer lands them, each acknowledged event is in raw_events once, and
    a replay adds nothing (a restarted server learns the stamps it gave from the stream)."""
    from persona_assets import stream

    redis_server, url = stream.start_redis(persona_home.parent / "redis")
    env = {"PERSONA_REDIS_URL": url}
    try:
        # Three kills, not six: the spool's recovery is what the six above test; here a kill can
        # only land before or after the one XADD a batch is (the test took 70 s with six).
        acked = _kill_while_sending(persona_home, env, kills=3)
        assert consumed(url, persona_home) >= len(acked)
        assert list((persona_home / "landing").glob("stream-*.parquet"))
        con = ingested(persona_home)
        _each_once(con, acked)
        before = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
        _replay(persona_home, acked, env)
        assert consumed(url, persona_home) == len(acked)
        ingest(con, persona_home / "landing", b"test-key")
        assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == before
        assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0
    finally:
        redis_server.kill()
        redis_server.wait()


def test_with_durable_disk_valid_events_also_go_to_the_redis_stream_when_one_is_configured(server, persona_home):
    from persona_assets import stream

    (persona_home / "persona.yaml").write_text("server:\n  durable: disk\n")
    redis_server, url = stream.start_redis(persona_home / "redis-data")
    try:
        served = server(env={"PERSONA_REDIS_URL": url})
        assert "events fsync'd to" in served.output() and "the valid ones then onto the Redis stream" in served.output()
        status, body, _ = request(f"{served.url}/v1/batch", {"batch": [event(1), event(2), {"type": "track"}]})
        assert (status, body["accepted"], body["quarantined"]) == (200, 2, 1)
        entries = stream.connect(url).xrange(stream.STREAM)
        assert sorted(json.loads(fields[b"event"])["messageId"] for _, fields in entries) == ["m-1", "m-2"]
        served.stop()
        assert len(landing_lines(persona_home)) == 3  # landing holds them all, the invalid one too
    finally:
        redis_server.kill()
        redis_server.wait()


def test_with_durable_stream_valid_events_go_only_to_the_stream_and_refused_ones_to_the_spool(server, persona_home):
    from persona_assets import stream

    redis_server, url = stream.start_redis(persona_home.parent / "redis")
    try:
        served = server(env={"PERSONA_REDIS_URL": url})  # the default with a stream
        assert "valid events on the Redis stream before each 200 (Redis appendonly yes" in served.output()
        status, body, _ = request(f"{served.url}/v1/batch", {"batch": [event(1), event(2), {"type": "track"}]})
        assert (status, body["accepted"], body["quarantined"]) == (200, 2, 1)
        entries = stream.connect(url).xrange(stream.STREAM)
        assert sorted(json.loads(fields[b"event"])["messageId"] for _, fields in entries) == ["m-1", "m-2"]
        served.stop()
        assert [sorted(line) for line in landing_lines(persona_home)] == [
            ["messageId", "receivedAt", "timestamp", "type"]
        ]
        assert consumed(url, persona_home) == 2
        con = ingested(
            persona_home
        )  # each event once: the valid from the consumer's Parquet, the refused from the spool
        assert sorted(m for (m,) in con.execute("SELECT message_id FROM raw_events").fetchall()) == ["m-1", "m-2"]
        assert con.execute("SELECT reason FROM quarantined_events").fetchall() == [("missing_id",)]
    finally:
        redis_server.kill()
        redis_server.wait()


def test_with_durable_stream_events_go_to_the_spool_while_redis_is_slow_or_down(server, persona_home):
    """A hung Redis (SIGSTOP) costs a request the stream's timeout, a dead one nothing; both
    requests are answered 200 with their events fsync'd in the spool, and the log says so once."""
    from persona_assets import stream

    redis_server, url = stream.start_redis(persona_home.parent / "redis")
    try:
        served = server(env={"PERSONA_REDIS_URL": url})
        assert request(f"{served.url}/v1/batch", {"batch": [event(1), event(2)]})[0] == 200
        redis_server.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        assert request(f"{served.url}/v1/track", event(3))[:2] == (
            200,
            {"success": True, "accepted": 1, "quarantined": 0},
        )
        assert time.monotonic() - started < 3
        redis_server.kill()
        redis_server.wait()
        time.sleep(1.2)  # past the pause after a failure: the next request tries Redis again
        assert request(f"{served.url}/v1/track", event(4))[0] == 200
        served.stop()
        assert sorted(line["messageId"] for line in landing_lines(persona_home)) == ["m-3", "m-4"]
        log = served.output()
        assert log.count("the Redis stream did not take events") == 1 and "redis://" not in log
        redis_server, url = stream.start_redis(persona_home.parent / "redis")  # its append-only file: m-1, m-2
        assert consumed(url, persona_home) == 2
        con = ingested(persona_home)
        assert sorted(m for (m,) in con.execute("SELECT message_id FROM raw_events").fetchall()) == [
            "m-1",
            "m-2",
            "m-3",
            "m-4",
        ]
        assert con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0] == 0
    finally:
        redis_server.kill()
        redis_server.wait()


def test_the_profile_api_needs_its_own_key_and_a_snapshot(server, persona_home):
    served = server()
    path = f"{served.url}/v1/profiles/user_id:u1/traits"
    assert request(path, None, key=None, method="GET")[0] == 401
    assert request(path, None, key=WRITE_KEY, method="GET")[0] == 401
    assert request(path, None, key=READ_KEY, method="GET")[:2] == (
        503,
        {"success": False, "error": "no serving snapshot yet: run `persona run` (or make demo) first"},
    )
    assert request(f"{served.url}/v1/profiles/shoe:1/traits", None, key=READ_KEY, method="GET")[0] == 400
    served.stop()
    served = server(env={"PERSONA_READ_KEY": None})
    assert "profile API off" in served.output()
    assert request(f"{served.url}/v1/profiles/user_id:u1/traits", None, key=READ_KEY, method="GET")[0] == 401


# --- The profile API on a snapshot (the graph runs once for these: slow) --------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, generated):
    """A home with generated events run through the whole graph: a warehouse and a snapshot."""
    import shutil

    from persona_assets_tests.conftest import land, materialize_all

    home = tmp_path_factory.mktemp("served") / "persona"
    (home / "landing").mkdir(parents=True)
    land(generated("jsonl"), home / "landing")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONA_HOME", str(home))
        mp.delenv("PERSONA_HASH_KEY", raising=False)
        materialize_all(home)
    shutil.rmtree(home / "landing" / "_truth", ignore_errors=True)
    return home


@pytest.fixture(scope="module")
def reading(built):
    served = start_server(built, env={"PERSONA_HASH_KEY": None})
    yield served
    served.stop(signal.SIGKILL)


def someone(home: Path) -> dict:
    """A generated person with a userId, an email and a phone their identify call sent, each of them
    in the snapshot's identity map (found there by its keyed hash, as the server must find it)."""
    from persona_assets.core.pii import hmac_hex, load_key, normalize_email, normalize_phone

    key = load_key(home)
    with duckdb.connect(str(home / "serving" / "persona.duckdb"), read_only=True) as con:
        known = {i for (i,) in con.execute("SELECT identifier FROM identity_map").fetchall()}
    for path in sorted((home / "landing").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            traits = e.get("traits") or {}
            email, phone = traits.get("email"), traits.get("phone")
            if not (e.get("userId") and isinstance(email, str) and isinstance(phone, str)):
                continue
            email_hash = normalize_email(email) and hmac_hex(key, normalize_email(email))
            phone_hash = normalize_phone(phone, None) and hmac_hex(key, normalize_phone(phone, None))
            if {e["userId"], email_hash, phone_hash} <= known:
                return {
                    "user_id": e["userId"],
                    "anonymous_id": e.get("anonymousId"),
                    "email": email,
                    "phone": phone,
                    "device_id": (e.get("context") or {}).get("device", {}).get("id"),
                }
    raise AssertionError("no identified person with a phone in the generated data")


def read(url: str, path: str, key: str | None = READ_KEY, bearer: bool = False) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if bearer and key else {}
    status, body, _ = request(f"{url}{path}", None, key=None if bearer else key, method="GET", headers=headers)
    return status, body


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


@pytest.mark.slow
def test_a_profile_is_found_by_every_kind_of_identifier(reading, built):
    person = someone(built)
    status, by_user = read(reading.url, f"/v1/profiles/user_id:{q(person['user_id'])}/traits")
    assert status == 200
    pid = by_user["person_id"]
    traits = by_user["traits"]
    assert traits["person_id"] == pid and "segment_name" in traits and "age_bracket_source" in traits
    assert isinstance(traits["category_affinity"], dict | None)
    # The email and phone as a person types them: normalized and hashed by the server, as ingest does.
    messy_email = "  " + person["email"].upper() + " "
    for kind, value in (
        ("anonymous_id", person["anonymous_id"]),
        ("email", messy_email),
        ("phone", person["phone"]),
        ("device_id", person["device_id"]),
        ("person_id", pid),
    ):
        if value:
            status, body = read(reading.url, f"/v1/profiles/{kind}:{q(value)}/traits")
            assert (status, body.get("person_id")) == (200, pid), (kind, body)
    status, body = read(reading.url, f"/v1/profiles/user_id:{q(person['user_id'])}/traits?fields=segment_name,gender")
    assert status == 200 and set(body["traits"]) == {"segment_name", "gender"}
    status, body = read(reading.url, f"/v1/profiles/user_id:{q(person['user_id'])}/traits?fields=shoe_size")
    assert status == 400 and "shoe_size" in body["error"]
    status, body = read(reading.url, f"/v1/profiles/user_id:{q(person['user_id'])}/identifiers")
    kinds = {i["type"] for i in body["data"]}
    assert {"user_id", "email", "phone"} <= kinds
    assert person["email"] not in json.dumps(body)  # hashed, never raw


@pytest.mark.slow
def test_unknown_people_and_bad_requests_get_json_errors(reading):
    assert read(reading.url, "/v1/profiles/email:nobody%40example.com/traits") == (
        404,
        {"success": False, "error": "no profile for this email"},
    )
    assert read(reading.url, "/v1/profiles/person_id:p0000000000000000/events")[0] == 404
    assert read(reading.url, "/v1/profiles/shoe:42/traits")[0] == 400
    assert read(reading.url, "/v1/profiles/user_id:x/everything")[0] == 404
    assert read(reading.url, "/v1/profiles/user_id:x/events?limit=0")[0] == 400


@pytest.mark.slow
def test_the_read_key_is_separate_from_the_write_key(reading, built):
    path = f"/v1/profiles/user_id:{q(someone(built)['user_id'])}/traits"
    assert read(reading.url, path, key=None)[0] == 401
    assert read(reading.url, path, key=WRITE_KEY)[0] == 401  # a write key ships in web pages: it cannot read
    assert read(reading.url, path, key="wrong-read-key")[0] == 401
    assert read(reading.url, path, key=READ_KEY, bearer=True)[0] == 200
    assert read(reading.url, path, key=READ_KEY)[0] == 200
    assert READ_KEY not in reading.output() and WRITE_KEY not in reading.output()


@pytest.mark.slow
def test_events_page_newest_first_with_a_cursor(reading, built):
    from persona_assets.core.publish import open_snapshot

    with open_snapshot(built / "serving" / "persona.duckdb") as con:
        user = con.execute(
            "SELECT user_id FROM raw_events WHERE user_id IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        ).fetchall()[0][0]
    pages, token = [], None
    while True:
        path = f"/v1/profiles/user_id:{q(user)}/events?limit=3" + (f"&next={token}" if token else "")
        status, body = read(reading.url, path)
        assert status == 200
        pages.append(body["data"])
        token = body["cursor"]["next"]
        assert body["cursor"]["has_more"] == (token is not None)
        if token is None:
            break
    seen = [(e["event_at"], e["message_id"]) for page in pages for e in page]
    assert len(pages) > 1 and all(len(p) == 3 for p in pages[:-1])
    with open_snapshot(built / "serving" / "persona.duckdb") as con:
        pid = con.execute("SELECT person_id FROM identity_map WHERE identifier = ?", [user]).fetchall()[0][0]
        want = con.execute(
            """SELECT strftime(event_at, '%Y-%m-%dT%H:%M:%S'), message_id FROM raw_events WHERE user_id IN
               (SELECT identifier FROM identity_map WHERE person_id = $p AND identifier_type = 'user_id')
               OR anonymous_id IN (SELECT identifier FROM identity_map WHERE person_id = $p AND identifier_type = 'anonymous_id')
               ORDER BY event_at DESC, message_id DESC""",
            {"p": pid},
        ).fetchall()
    assert [(at[:19], m) for at, m in seen] == want  # every event once, newest first
    status, body = read(reading.url, f"/v1/profiles/user_id:{q(user)}/events?limit=2&fields=event_name,event_at")
    assert status == 200 and all(set(e) == {"event_name", "event_at"} for e in body["data"])


@pytest.mark.slow
def test_a_persons_audiences_are_listed_and_a_snapshot_without_them_lists_none(built, tmp_path):
    """`/audiences` lists the person's current audience_members rows (audience, entered_at), oldest
    entry first; a snapshot published before audiences existed has no such table: an empty list."""
    import shutil

    home = tmp_path / "persona"
    shutil.copytree(built, home, ignore=shutil.ignore_patterns("serve-*.log"))
    snapshot = home / "serving" / "persona.duckdb"
    person = someone(home)
    with duckdb.connect(str(snapshot)) as con:
        who = con.execute("SELECT person_id FROM identity_map WHERE identifier = ?", [person["user_id"]])
        pid = who.fetchall()[0][0]
        other = con.execute("SELECT person_id FROM user_profiles WHERE person_id <> ? LIMIT 1", [pid]).fetchall()[0][0]
        con.execute(
            "CREATE OR REPLACE TABLE audience_members (audience VARCHAR, person_id VARCHAR, entered_at TIMESTAMP)"
        )
        con.execute(
            "INSERT INTO audience_members VALUES ('recent_book_buyers', $p, TIMESTAMP '2026-03-02 10:00:00'), "
            "('buyers', $p, TIMESTAMP '2026-01-05 08:30:00'), ('buyers', $o, TIMESTAMP '2026-02-01 00:00:00')",
            {"p": pid, "o": other},
        )
    served = start_server(home, env={"PERSONA_HASH_KEY": None})
    try:
        want = [
            {"audience": "buyers", "entered_at": "2026-01-05T08:30:00"},
            {"audience": "recent_book_buyers", "entered_at": "2026-03-02T10:00:00"},
        ]
        for kind, value in (("user_id", person["user_id"]), ("email", person["email"]), ("person_id", pid)):
            assert read(served.url, f"/v1/profiles/{kind}:{q(value)}/audiences") == (
                200,
                {"person_id": pid, "data": want},
            ), kind
        with duckdb.connect(str(snapshot), read_only=True) as con:
            nobody = con.execute(
                "SELECT person_id FROM user_profiles WHERE person_id NOT IN "
                "(SELECT person_id FROM audience_members) LIMIT 1"
            ).fetchall()[0][0]
        none = read(served.url, f"/v1/profiles/person_id:{nobody}/audiences")
        assert none == (200, {"person_id": nobody, "data": []})
        assert read(served.url, "/v1/profiles/email:nobody%40example.com/audiences")[0] == 404
        assert read(served.url, "/v1/profiles/person_id:p0000000000000000/audiences")[0] == 404
        path = f"/v1/profiles/user_id:{q(person['user_id'])}/audiences"
        assert read(served.url, path, key=WRITE_KEY)[0] == 401 and read(served.url, path, key=None)[0] == 401
        assert read(served.url, path, key=READ_KEY, bearer=True)[0] == 200
        # A snapshot published before audiences existed (a new file, renamed in as a publish does).
        older = snapshot.with_name("older.duckdb")
        shutil.copyfile(snapshot, older)
        with duckdb.connect(str(older)) as con:
            con.execute("DROP TABLE audience_members")
        os.replace(older, snapshot)
        assert read(served.url, path) == (200, {"person_id": pid, "data": []})
        assert read(served.url, f"/v1/profiles/user_id:{q(person['user_id'])}/traits")[0] == 200
    finally:
        served.stop(signal.SIGKILL)


def test_past_its_row_limits_the_reader_asks_the_snapshot_and_answers_the_same(tmp_path):
    """The in-memory view and the per-read queries give the same answers (a snapshot too large to hold
    is read row by row), and a snapshot without audience_members lists none either way."""
    from persona_assets.server import profiles

    path = tmp_path / "persona.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE user_profiles AS SELECT 'p' || lpad(i::VARCHAR, 16, '0') AS person_id, "
            "i * 2 AS order_count FROM range(5) t(i)"
        )
        con.execute(
            "CREATE TABLE identity_map AS SELECT 'user_id' AS identifier_type, 'u' || i AS identifier, "
            "'p' || lpad(i::VARCHAR, 16, '0') AS person_id, NULL::TIMESTAMP AS first_seen_at, "
            "NULL::TIMESTAMP AS last_seen_at FROM range(5) t(i)"
        )
        con.execute(
            "CREATE TABLE audience_members AS SELECT * FROM (VALUES ('b', 'p0000000000000001', "
            "TIMESTAMP '2026-01-02'), ('a', 'p0000000000000001', TIMESTAMP '2026-01-03')) "
            "t(audience, person_id, entered_at)"
        )
    answers = []
    for limit in (1_000, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(profiles, "PROFILES_IN_MEMORY", limit)
            mp.setattr(profiles, "MEMBERSHIPS_IN_MEMORY", limit)
            mp.setattr(profiles, "IDENTITY_IN_MEMORY", limit)
            reader = profiles.ProfileReader(path, b"k")
            try:
                got = [
                    reader.traits("user_id", "u1", None),
                    reader.audiences("user_id", "u1"),
                    reader.audiences("person_id", "p0000000000000002"),
                    reader.traits("person_id", "p0000000000000003", ["order_count"]),
                ]
                in_memory = reader.from_view("traits", "user_id", "u1", None)
                with pytest.raises(profiles.NotFound):
                    reader.audiences("user_id", "nobody")
            finally:
                reader.close()
            answers.append(got)
            assert (in_memory == got[0]) if limit else (in_memory is None)
    assert answers[0] == answers[1]
    assert answers[0][1]["data"] == [
        {"audience": "b", "entered_at": "2026-01-02T00:00:00"},
        {"audience": "a", "entered_at": "2026-01-03T00:00:00"},
    ]
    assert answers[0][0]["traits"]["order_count"] == 2 and answers[0][2]["data"] == []


@pytest.mark.slow
def test_the_in_memory_view_answers_every_identifier_and_profile_as_the_snapshot_does(built):
    """On a whole graph's snapshot: the columnar view (hashed identifiers, Arrow profile rows) finds
    every identifier of identity_map and gives every profile exactly as a query of the snapshot
    does (maps, lists, times, decimals, NULLs), and finds nobody for identifiers it does not hold."""
    from persona_assets.core.pii import load_key
    from persona_assets.server import profiles

    snapshot = built / "serving" / "persona.duckdb"
    with duckdb.connect(str(snapshot), read_only=True) as con:
        ids = con.execute("SELECT identifier_type, identifier, person_id FROM identity_map").fetchall()
        result = con.execute("SELECT * FROM user_profiles")
        names = [d[0] for d in result.description]
        rows = {r[names.index("person_id")]: dict(zip(names, r, strict=True)) for r in result.fetchall()}
    reader = profiles.ProfileReader(snapshot, load_key(built))
    try:
        reader.warm()
        view = reader.view
        assert view is not None and len(view.identity) == len(ids) and len(view.profiles) == len(rows)
        assert all(view.identity.get(kind, identifier) == person for kind, identifier, person in ids)
        assert {view.identity.get(kind, identifier + "x") for kind, identifier, _ in ids[:500]} == {None}
        assert view.identity.get("email", "\ud800") is None
        for person_id, row in rows.items():
            assert view.profiles.get(person_id) == row
        assert view.profiles.get("p0000000000000000") is None
        someone_id = ids[0]
        assert reader.from_view("traits", "person_id", someone_id[2], None)["traits"] == profiles.jsonable(
            rows.get(someone_id[2], {"person_id": someone_id[2]})
        )
    finally:
        reader.close()


@pytest.mark.slow
def test_the_bench_replicates_a_snapshot_into_new_people_the_server_finds(built, tmp_path):
    """`persona bench --only server --snapshot-copies K` times reads on a snapshot made K times
    bigger: every person comes K times, each with a person_id and identifiers of its own, and
    the server's view finds each copy with the original's traits."""
    from persona_assets.bench import _snapshot_sizes, replicate_snapshot
    from persona_assets.core.pii import load_key
    from persona_assets.core.publish import PERSON_ID
    from persona_assets.server import profiles

    bigger = tmp_path / "persona.duckdb"
    shutil.copyfile(built / "serving" / "persona.duckdb", bigger)
    with duckdb.connect(str(bigger), read_only=True) as con:
        ids = con.execute("SELECT identifier_type, identifier, person_id FROM identity_map").fetchall()
        people = con.execute("SELECT count(*) FROM user_profiles").fetchall()[0][0]
    assert replicate_snapshot(bigger, 3) == {"copies": 3, "from_people": people}
    with duckdb.connect(str(bigger), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT person_id) FROM user_profiles").fetchall() == [
            (3 * people, 3 * people)
        ]
        assert con.execute(
            "SELECT count(*), count(DISTINCT (identifier_type, identifier)) FROM identity_map"
        ).fetchall() == [(3 * len(ids), 3 * len(ids))]
        assert con.execute(
            "SELECT bool_and(regexp_full_match(person_id, $p)) FROM user_profiles", {"p": PERSON_ID[1:-1]}
        ).fetchall() == [(True,)]
    reader = profiles.ProfileReader(bigger, load_key(built))
    try:
        reader.warm()
        view = reader.view
        for kind, identifier, _ in ids[:200]:
            found = {view.identity.get(kind, identifier + suffix) for suffix in ("", "-1", "-2")}
            assert None not in found and len(found) == 3, (kind, identifier)
            traits = [{k: v for k, v in (view.profiles.get(p) or {}).items() if k != "person_id"} for p in found]
            assert traits[0] == traits[1] == traits[2]
    finally:
        reader.close()
    line = _snapshot_sizes(
        {
            "snapshot": {
                "people": 3 * people,
                "identifiers": 3 * len(ids),
                "replicated": {"copies": 3, "from_people": people},
            }
        }
    )
    assert f"{3 * people:,} people" in line and "3 times over" in line


def _hammer(url: str, paths: list[str], stop: threading.Event, results: list) -> None:
    while not stop.is_set():
        for path in paths:
            try:
                results.append(read(url, path)[0])
            except OSError as exc:
                results.append(repr(exc))


@pytest.mark.slow
def test_reads_never_fail_while_runs_publish_new_snapshots(reading, built):
    from persona_assets.assets.serving import APPEND_ONLY, INDEXED, published_tables
    from persona_assets.core.publish import publish_snapshot

    person = someone(built)
    paths = [
        f"/v1/profiles/user_id:{q(person['user_id'])}/traits",
        f"/v1/profiles/email:{q(person['email'])}/events?limit=5",
        f"/v1/profiles/user_id:{q(person['user_id'])}/identifiers",
    ]
    stop, results = threading.Event(), []
    readers = [threading.Thread(target=_hammer, args=(reading.url, paths, stop, results)) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        with duckdb.connect(str(built / "warehouse.duckdb")) as con:
            for _ in range(4):
                publish_snapshot(
                    con,
                    built / "serving" / "persona.duckdb",
                    published_tables(),
                    run_id="again",
                    append=APPEND_ONLY,
                    indexes=INDEXED,
                )
                time.sleep(0.3)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert len(results) > 50
    assert set(results) == {200}


@pytest.mark.slow
def test_reads_never_fail_while_forget_runs_and_the_forgotten_are_gone(built, tmp_path):
    import shutil

    home = tmp_path / "persona"
    shutil.copytree(built, home, ignore=shutil.ignore_patterns("serve-*.log"))
    served = start_server(home, env={"PERSONA_HASH_KEY": None})
    try:
        person = someone(home)
        others = []
        with duckdb.connect(str(home / "serving" / "persona.duckdb"), read_only=True) as con:
            for (user,) in con.execute(
                "SELECT identifier FROM identity_map WHERE identifier_type = 'user_id' AND identifier <> ? LIMIT 3",
                [person["user_id"]],
            ).fetchall():
                others.append(f"/v1/profiles/user_id:{q(user)}/traits")
        stop, results = threading.Event(), []
        readers = [threading.Thread(target=_hammer, args=(served.url, others, stop, results)) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            env = {**os.environ, "PERSONA_HOME": str(home)}
            env.pop("PERSONA_HASH_KEY", None)
            done = subprocess.run(
                [sys.executable, "-m", "persona_assets.cli", "forget", person["email"], "--skip-redis"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr
            time.sleep(0.3)
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert len(results) > 20 and set(results) == {200}
        assert read(served.url, f"/v1/profiles/user_id:{q(person['user_id'])}/traits")[0] == 404
        assert read(served.url, f"/v1/profiles/email:{q(person['email'])}/traits")[0] == 404
    finally:
        served.stop(signal.SIGKILL)


@pytest.mark.slow
def test_traits_carry_the_hot_profiles_live_fields_when_a_stream_runs(built, tmp_path):
    """An event sent over HTTP goes onto the Redis stream; once the consumer applies it, the
    profile API shows the live fields over the batch profile, as `persona profile` does."""
    import shutil

    from persona_assets import stream

    home = tmp_path / "persona"
    shutil.copytree(built, home, ignore=shutil.ignore_patterns("serve-*.log"))
    redis_server, url = stream.start_redis(tmp_path / "redis")
    served = start_server(home, env={"PERSONA_REDIS_URL": url, "PERSONA_HASH_KEY": None})
    try:
        person = someone(home)
        path = f"/v1/profiles/user_id:{q(person['user_id'])}/traits"
        assert read(served.url, path)[1]["traits"]["live"] == "no streamed events for this person"
        sent = {"userId": person["user_id"], "event": "Product Viewed", "properties": {"category": "garden"}}
        assert request(f"{served.url}/v1/track", sent)[0] == 200
        client = stream.connect(url)
        stream.load_identity(client, home / "serving" / "persona.duckdb")
        worker = stream.Consumer(client, stream.RedisStreamSource(client, "test"), tmp_path / "flushed")
        deadline = time.monotonic() + 30
        while worker.applied < 1 and time.monotonic() < deadline:
            worker.step()
        status, body = read(served.url, path)
        assert status == 200 and body["traits"]["live_events_streamed"] == 1
        assert "garden" in body["traits"]["live_category_affinity"]
    finally:
        served.stop(signal.SIGKILL)
        redis_server.kill()
        redis_server.wait()
