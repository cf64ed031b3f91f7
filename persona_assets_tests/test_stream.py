"""The real-time path against a real redis-server: batch and stream agree, a killed consumer
loses and double counts nothing, bad events go to the quarantine stream."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from persona_assets import stream
from persona_assets.core.affinity import AffinityOptions, scores_sql
from persona_assets.core.cleaning import clean
from persona_assets.core.identity import resolve
from persona_assets.core.ingest import ingest, landing_files
from persona_assets.core.publish import publish_snapshot
from persona_assets.datagen import generate

# Slow: runs whole processes (make test runs it; make test-fast leaves it out).
pytestmark = pytest.mark.slow

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def redis_url(tmp_path: Path):
    """A real redis-server (Debian's package) on a free loopback port, stopped afterwards."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("Debian's redis-server package is needed (make test installs it: apt-get install redis-server)")
    server, url = stream.start_redis(tmp_path / "redis")
    yield url
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Generated events through the batch path: identity, counters and category scores."""
    root = tmp_path_factory.mktemp("batch")
    generate(250, 29, root / "landing", "jsonl", people_per_file=125)
    with duckdb.connect(str(root / "warehouse.duckdb")) as con:
        ingest(con, root / "landing", b"k")
        resolve(con)
        clean(con)
        as_of = con.execute("SELECT max(event_at) FROM raw_events").fetchall()[0][0]
        sql = f"CREATE TABLE category_scores AS {scores_sql(AffinityOptions())}"
        con.execute(sql, {"as_of": as_of})
        publish_snapshot(con, root / "serving" / "persona.duckdb", {"identity_map": "SELECT * FROM identity_map"})
        counters = con.execute(
            "SELECT person_id, event_count, order_count, total_revenue, last_seen_at, last_order_at FROM cleaned_users"
        ).df()
        scores = con.execute("SELECT person_id, category, score FROM category_scores").df()
        kept = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
        quarantined = con.execute("SELECT count(*) FROM quarantined_events").fetchall()[0][0]
    return root, as_of, counters, scores, kept, quarantined


def _publish_all(client, landing: Path) -> int:
    return sum(stream.publish(client, path) for path in landing_files(landing))


def _assert_matches_batch(client, as_of, counters, scores) -> None:
    """Every person's hot profile equals the batch: counters exactly, affinity to 1e-9."""
    by_person = scores.groupby("person_id")
    for row in counters.itertuples():
        if row.event_count == 0:
            continue
        hot = stream.hot_profile(client, row.person_id, as_of=as_of)
        assert hot["events"] == row.event_count, row.person_id
        assert hot["orders"] == row.order_count
        assert hot["revenue"] == pytest.approx(row.total_revenue, abs=1e-6)
        assert hot["last_seen_at"] == row.last_seen_at.to_pydatetime()
        if row.order_count:
            assert hot["last_order_at"] == row.last_order_at.to_pydatetime()
        expected = (
            dict(zip(by_person.get_group(row.person_id).category, by_person.get_group(row.person_id).score))
            if row.person_id in by_person.groups
            else {}
        )
        assert set(hot["category_affinity"]) == set(expected), row.person_id
        for category, score in expected.items():
            assert hot["category_affinity"][category] == pytest.approx(score, rel=1e-9, abs=1e-9)


def test_stream_and_batch_agree_and_bad_events_are_quarantined(batch, redis_url, tmp_path):
    root, as_of, counters, scores, kept, quarantined = batch
    client = stream.connect(redis_url)
    stream.load_identity(client, root / "serving" / "persona.duckdb")
    sent = _publish_all(client, root / "landing")
    worker = stream.Consumer(
        client, stream.RedisStreamSource(client, "one"), tmp_path / "landing", stream.ConsumerOptions(block_ms=50)
    )
    while worker.applied + worker.skipped + worker.quarantined < sent:
        assert worker.step() or worker.applied + worker.skipped + worker.quarantined == sent, "stream ran dry"
    worker.flush()
    # Same events, same validation: what batch kept is applied once; re-delivered copies are skipped.
    assert worker.applied == kept and worker.quarantined == quarantined
    reasons = {f[b"reason"].decode() for _, f in client.xrange(stream.QUARANTINE)}
    assert client.xlen(stream.QUARANTINE) == quarantined and {"malformed_json", "missing_id"} & reasons
    _assert_matches_batch(client, as_of, counters, scores)
    # Everything consumed is acknowledged and in landing for the batch graph.
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] == 0
    with duckdb.connect(str(tmp_path / "check.duckdb")) as con:
        ingest(con, tmp_path / "landing", b"k")
        assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == kept


def test_a_consumer_killed_mid_batch_is_replayed_exactly_once(batch, redis_url, tmp_path):
    root, as_of, counters, scores, kept, quarantined = batch
    client = stream.connect(redis_url)
    stream.load_identity(client, root / "serving" / "persona.duckdb")
    assert _publish_all(client, root / "landing") > kept
    env = {**os.environ, "PERSONA_HOME": str(tmp_path), "PERSONA_REDIS_URL": redis_url}
    persona = str(Path(sys.executable).with_name("persona"))
    first = subprocess.Popen(
        [persona, "stream", "--consumer", "doomed", "--batch", "50", "--flush-seconds", "0.5"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while client.scard(stream.SEEN) < kept // 3:
        assert time.monotonic() < deadline and first.poll() is None, "the first consumer made no progress"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert client.scard(stream.SEEN) < kept, "killed too late to prove anything"
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] > 0
    # Another consumer claims what the dead one left pending, and reads the rest.
    second = subprocess.Popen(
        [persona, "stream", "--consumer", "heir", "--claim-idle-ms", "0", "--flush-seconds", "0.5"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while client.scard(stream.SEEN) < kept or client.xpending(stream.STREAM, stream.GROUP)["pending"]:
        assert time.monotonic() < deadline and second.poll() is None, "the second consumer did not finish"
        time.sleep(0.1)
    second.send_signal(signal.SIGTERM)  # stops after a last flush
    assert second.wait(timeout=60) == 0
    assert client.scard(stream.SEEN) == kept
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] == 0
    _assert_matches_batch(client, as_of, counters, scores)
    # Landing has every event at least once; ingest keeps one copy each.
    with duckdb.connect(str(tmp_path / "check.duckdb")) as con:
        ingest(con, tmp_path / "landing", b"k")
        assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == kept


def test_unknown_visitors_get_a_provisional_id_until_the_batch_stitches_them(redis_url, tmp_path):
    client = stream.connect(redis_url)
    snapshot = tmp_path / "serving" / "persona.duckdb"
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE identity_map AS SELECT 'anonymous_id' AS identifier_type, 'a-known' AS identifier, "
            "'p0000000000000001' AS person_id"
        )
        publish_snapshot(con, snapshot, {"identity_map": "SELECT * FROM identity_map"})
    stream.load_identity(client, snapshot)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    line = '{"messageId":"m%d","anonymousId":"%s","type":"track","event":"Product Viewed","timestamp":"%s","properties":{"category":"books"}}'
    for i, anon in enumerate(["a-known", "a-new", "a-new"]):
        client.xadd(stream.STREAM, {"event": line % (i, anon, now)})
    worker = stream.Consumer(client, stream.RedisStreamSource(client, "c"), tmp_path / "landing")
    worker.step()
    provisional = stream.provisional_id("a-new")
    assert stream.hot_profile(client, provisional)["events"] == 2
    assert stream.hot_profile(client, "p0000000000000001")["events"] == 1
    # The next batch run links a-new to the known person: the provisional profile moves over.
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE identity_map AS SELECT * FROM (VALUES ('anonymous_id', 'a-known', "
            "'p0000000000000001'), ('anonymous_id', 'a-new', 'p0000000000000001')) t(identifier_type, "
            "identifier, person_id)"
        )
        publish_snapshot(con, snapshot, {"identity_map": "SELECT * FROM identity_map"})
    stream.load_identity(client, snapshot)
    assert stream.stitch_provisional(client) == 1
    merged = stream.hot_profile(client, "p0000000000000001")
    assert merged["events"] == 3 and merged["category_affinity"]["books"] == pytest.approx(3.0, rel=1e-6)
    assert stream.hot_profile(client, provisional) == {}


def test_events_the_plain_check_cannot_type_wait_for_the_contract_query_until_the_stream_is_quiet(redis_url, tmp_path):
    client = stream.connect(redis_url)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    line = '{"messageId":"%s","anonymousId":"%s","type":"page","timestamp":"%s"}'
    plain, spaced, bad = line % ("m1", "a-plain", now), line % ("m2", "  a-odd ", now), '{"type": "page"'
    not_utf8 = (line % ("m4", "a-\xff", now)).encode("latin-1")  # a byte that is not UTF-8
    for event in (plain, spaced, bad, not_utf8):
        client.xadd(stream.STREAM, {"event": event})
    worker = stream.Consumer(
        client,
        stream.RedisStreamSource(client, "c"),
        tmp_path / "landing",
        stream.ConsumerOptions(block_ms=10, query_seconds=60),
    )
    assert worker.step() == 4
    assert (worker.applied, worker.quarantined) == (1, 0)  # the plain event is in, the others wait
    client.xadd(stream.STREAM, {"event": line % ("m3", "a-plain", now)})
    assert worker.step() == 1 and (worker.applied, worker.quarantined) == (2, 0)
    assert worker.step() == 0  # quiet: the waiting lines go through the contract query
    assert (worker.applied, worker.quarantined) == (3, 2)
    assert stream.hot_profile(client, stream.provisional_id("a-odd"))["events"] == 1  # trimmed as batch trims it
    reasons = [fields[b"reason"] for _, fields in client.xrange(stream.QUARANTINE)]
    assert reasons == [b"malformed_json", b"invalid_utf8"]
    worker.flush()
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] == 0


def test_scores_stay_exact_when_a_person_comes_back_after_many_half_lives(redis_url, tmp_path):
    client = stream.connect(redis_url)
    start = datetime.now(UTC) - timedelta(days=800)
    line = '{"messageId":"m%d","anonymousId":"a-back","type":"track","event":"Product Viewed","timestamp":"%s","properties":{"category":"%s"}}'
    days = [(0, "books"), (700, "books"), (701, "games")]  # the second is past the 20 half-lives of re-anchoring
    for i, (day, category) in enumerate(days):
        at = (start + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        client.xadd(stream.STREAM, {"event": line % (i, at, category)})
    worker = stream.Consumer(client, stream.RedisStreamSource(client, "c"), tmp_path / "landing")
    while worker.handled < len(days):
        worker.step()
    as_of = (start + timedelta(days=701)).replace(tzinfo=None, microsecond=0)
    affinity = stream.hot_profile(client, stream.provisional_id("a-back"), as_of=as_of)["category_affinity"]
    half = AffinityOptions().half_life_days
    assert affinity["books"] == pytest.approx(2 ** (-701 / half) + 2 ** (-1 / half), rel=1e-12)
    assert affinity["games"] == pytest.approx(1.0, rel=1e-12)


def test_a_window_the_clock_ends_emits_the_exit_with_the_next_batch_not_at_a_sweep(redis_url, tmp_path):
    from persona_assets.core.audience_definitions import parse, read_sections
    from persona_assets.stream_audiences import CHANGES, DUE, LiveAudiences

    (tmp_path / "audiences.yaml").write_text(
        "audiences:\n"
        "  viewers: {where: {event: Product Viewed, count: {gte: 2}, within_days: 7}}\n"
        "  buyers: {where: {event: Order Completed, count: {gte: 1}}}\n"
    )
    client = stream.connect(redis_url)
    live = LiveAudiences(client, parse(read_sections(tmp_path / "audiences.yaml"), "audiences.yaml"))
    worker = stream.Consumer(
        client,
        stream.RedisStreamSource(client, "c"),
        tmp_path / "landing",
        stream.ConsumerOptions(block_ms=10),
        audiences=live,
    )
    start = datetime(2026, 3, 1, tzinfo=UTC)
    line = '{"messageId":"m%d","anonymousId":"%s","type":"track","event":"%s","timestamp":"%s"}'

    def send(i: int, anon: str, event: str, day: float) -> None:
        at = (start + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        client.xadd(stream.STREAM, {"event": line % (i, anon, event, at)})

    def changes() -> list[tuple[str, str, str]]:
        return [
            (f[b"audience"].decode(), f[b"person_id"].decode(), f[b"change"].decode())
            for _, f in client.xrange(CHANGES)
        ]

    viewer, buyer = stream.provisional_id("a-viewer"), stream.provisional_id("a-buyer")
    send(1, "a-viewer", "Product Viewed", 0)
    send(2, "a-viewer", "Product Viewed", 1)  # leaves the window when the clock reaches day 8
    send(3, "a-viewer", "Product Viewed", 5)
    worker.step()
    assert changes() == [("viewers", viewer, "entered")]
    assert float(client.zscore(DUE, viewer)) == (start + timedelta(days=7)).timestamp()

    send(4, "a-buyer", "Order Completed", 7.5)  # someone else's event moves the clock past day 7
    worker.step()
    assert changes()[1:] == [("buyers", buyer, "entered")] and live.due == [viewer]
    worker.step()  # decided with the next batch: two views left in 7 days, still in; due when day 1's leaves
    assert changes()[2:] == [] and live.due == []
    assert float(client.zscore(DUE, viewer)) == (start + timedelta(days=8)).timestamp()

    send(5, "a-buyer", "Order Completed", 9)  # the clock passes day 8: one view is left in the window
    worker.step()  # this batch finds the viewer due
    worker.step()  # and the next one (the stream is quiet now) decides them: no flush, no sweep
    assert changes()[2:] == [("viewers", viewer, "exited")]
    assert client.zscore(DUE, viewer) == (start + timedelta(days=12)).timestamp()  # the view of day 5
    assert live.members("viewers") == set() and live.members("buyers") == {buyer}
    assert client.zscore(DUE, buyer) is None  # no windowed event of theirs: never due
    worker.flush()
    assert changes()[3:] == []  # the last sweep finds nothing left to change


def test_a_busy_stream_leaves_the_contract_query_to_its_thread_and_applies_its_verdicts_later(redis_url, tmp_path):
    client = stream.connect(redis_url)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    line = '{"messageId":"%s","anonymousId":"a-busy","type":"page","timestamp":"%s"}'
    worker = stream.Consumer(
        client,
        stream.RedisStreamSource(client, "c"),
        tmp_path / "landing",
        stream.ConsumerOptions(block_ms=10, query_seconds=0),
    )
    client.xadd(stream.STREAM, {"event": line % ("m1", now)})
    client.xadd(stream.STREAM, {"event": '{"type": "page"'})
    assert worker.step() == 2  # busy: the bad line went to the query, which this step did not wait for
    assert (worker.applied, worker.quarantined) == (1, 0)
    client.xadd(stream.STREAM, {"event": line % ("m2", now)})
    for _ in range(100):  # a later step applies the verdict (a quiet one waits for it)
        if worker.quarantined:
            break
        worker.step()
    assert (worker.applied, worker.quarantined) == (2, 1)
    assert [f[b"reason"] for _, f in client.xrange(stream.QUARANTINE)] == [b"malformed_json"]
    worker.flush()
    assert client.xpending(stream.STREAM, stream.GROUP)["pending"] == 0
