"""Erasure and consent: `persona forget` leaves no trace of a person in any table or file Persona
writes (warehouse, snapshot, models, landing files and ledger, Dagster's run storage, Redis and
its append-only file), later events of theirs are suppressed until they come back with consent,
and people who declined personalization are counted but never profiled."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets import cli, stream
from persona_assets.core.pii import hmac_hex, load_key, normalize_email, normalize_phone
from persona_assets_tests.conftest import land
from persona_assets_tests.test_stream import REDIS_SERVER

PERSON_TABLES = (
    "cleaned_users",
    "sessions",
    "normalized_features",
    "segments",
    "imputed_attributes",
    "category_scores",
    "user_profiles",
)


def _needles(key: bytes, person: pd.Series, anonymous_ids: list[str], devices: list[str], person_id: str) -> list[str]:
    """Every form a person's identity takes anywhere: raw values, normalized values, keyed hashes, person_id."""
    found = [person_id, *anonymous_ids, *devices]
    if person.user_id:
        found.append(person.user_id)
    if person.email:
        found += [person.email, normalize_email(person.email), hmac_hex(key, normalize_email(person.email))]
    if person.phone:
        e164 = normalize_phone(person.phone, None)
        found += [person.phone, e164, hmac_hex(key, e164)]
    return sorted({f for f in found if f})


def _redis_text(client) -> bytes:
    """Everything Redis holds, keys and values, as one blob to search."""
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key))
        elif kind == "hash":
            parts += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == "set":
            parts += list(client.smembers(key))
        elif kind == "stream":
            parts += [b for _, fields in client.xrange(key) for kv in fields.items() for b in kv]
        elif kind == "list":
            parts += client.lrange(key, 0, -1)
    return b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)


def _traces(roots: list[Path], client, needles: list[str]) -> list[tuple[str, str]]:
    """(where, needle) for each place a needle is found: bytes of every file under the roots,
    every column of every table of every DuckDB file, and everything in Redis."""
    lowered = [n.lower().encode() for n in needles]
    hits = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes().lower()
            hits += [(str(path), n.decode()) for n in lowered if n in data]
            if path.suffix == ".duckdb" and not path.name.startswith("."):
                with duckdb.connect(str(path), read_only=True) as con:
                    cols = con.execute(
                        "SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_catalog = current_database()"
                    ).fetchall()
                    for table, column in cols:
                        found = con.execute(
                            f'SELECT DISTINCT x FROM "{table}", (SELECT unnest($n::VARCHAR[]) AS x) '
                            f'WHERE contains(lower("{column}"::VARCHAR), lower(x))',
                            {"n": needles},
                        ).fetchall()
                        hits += [(f"{path.name}:{table}.{column}", r[0]) for r in found]
    if client is not None:
        blob = _redis_text(client).lower()
        hits += [("redis", n.decode()) for n in lowered if n in blob]
    return hits


@pytest.fixture
def redis_home(persona_home: Path, monkeypatch: pytest.MonkeyPatch):
    """A real redis-server keeping its append-only file in PERSONA_HOME/redis, as `persona stream --start-redis`."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("Debian's redis-server package is needed (make test installs it: apt-get install redis-server)")
    monkeypatch.setenv("DAGSTER_HOME", str(persona_home / "dagster"))
    server, url = stream.start_redis(persona_home / "redis")
    (persona_home / "redis" / "url").write_text(url)
    yield stream.connect(url)
    server.terminate()
    server.wait(timeout=20)


def _people(source: Path, con) -> pd.DataFrame:
    """Generated people whose resolved person holds only their own identifiers, with that person_id."""
    ids = pd.read_parquet(source / "_truth" / "identifiers.parquet")
    mapped = con.execute(
        "SELECT identifier AS anonymous_id, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'"
    ).df()
    ids = ids.merge(mapped, on="anonymous_id")
    owners = ids.groupby("person_id")["person_key"].nunique()
    persons = ids.groupby("person_key")["person_id"].nunique()
    clean = ids[ids.person_id.isin(owners[owners == 1].index) & ids.person_key.isin(persons[persons == 1].index)]
    people = pd.read_parquet(source / "_truth" / "people.parquet").set_index("person_key")
    rows = []
    for key, group in clean.groupby("person_key"):
        rows.append(
            {
                **people.loc[key].to_dict(),
                "person_key": key,
                "person_id": group.person_id.iloc[0],
                "anonymous_ids": sorted(group.anonymous_id),
                "devices": sorted(group[~group.shared_device].device_id),
            }
        )
    return pd.DataFrame(rows)


def _event(anonymous_id: str, message_id: str, day: int, **extra) -> dict:
    return {
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": anonymous_id,
        "messageId": message_id,
        "timestamp": f"2026-11-{day:02d}T12:00:00Z",
        "properties": {"category": "books", "price": 9.5},
        **extra,
    }


@pytest.mark.slow
def test_forget_leaves_no_trace_anywhere_and_keeps_the_person_forgotten(persona_home, generated, redis_home):
    client = redis_home
    source = generated("jsonl")
    land(source, persona_home / "landing")
    assert cli.materialize()
    key = load_key(persona_home)
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        people = _people(source, con)
    with_email = people[people.email.notna() & people.phone.isna()].iloc[0]
    with_phone = people[people.phone.notna() & (people.person_key != with_email.person_key)].iloc[0]
    taken = {with_email.person_key, with_phone.person_key}
    with_user = people[people.user_id.notna() & ~people.person_key.isin(taken)].iloc[0]
    taken.add(with_user.person_key)
    rest = people[~people.person_key.isin(taken)]
    by_anon, by_person, kept = rest.iloc[0], rest.iloc[1], rest.iloc[2]

    # The stream sees some of their events: hot profiles, processed ids, a flushed Parquet
    # landing file, and entries still pending when the consumer stops.
    lines = [
        json.dumps(_event(p.anonymous_ids[0], f"live-{i}-{p.person_key}", 20))
        for i, p in enumerate([with_email, by_anon, kept])
    ]
    for line in lines:
        client.xadd(stream.STREAM, {"event": line})
    snapshot = persona_home / "serving" / "persona.duckdb"
    stream.run(client, persona_home / "landing", snapshot, "c1", stream.ConsumerOptions(block_ms=50), max_events=3)
    pending = _event(by_person.anonymous_ids[0], "pending-1", 21)
    client.xadd(stream.STREAM, {"event": json.dumps(pending)})
    assert cli.materialize()  # ingests the stream's Parquet file too
    assert client.exists(stream.hot_key(with_email.person_id))

    forgotten = [with_email, with_phone, with_user, by_anon, by_person]
    needles = {p.person_key: _needles(key, p, p.anonymous_ids, p.devices, p.person_id) for p in forgotten}
    kept_needles = _needles(key, kept, kept.anonymous_ids, kept.devices, kept.person_id)
    roots = [persona_home]
    # The search finds people before they are forgotten: every one of them, in several places.
    before = _traces(roots, client, sorted({n for ns in needles.values() for n in ns}))
    for p in forgotten:
        assert {n for _, n in before} & set(needles[p.person_key]), p.person_key

    spaced_phone = with_phone.phone[:3] + " " + with_phone.phone[3:6] + " " + with_phone.phone[6:]
    # Several at once (one snapshot and compaction for all), and one more on its own.
    assert (
        cli.main(
            ["forget", f"  {with_email.email.upper()} ", spaced_phone, with_user.user_id, by_anon.anonymous_ids[-1]]
        )
        == 0
    )
    assert cli.main(["forget", by_person.person_id]) == 0

    after = _traces(roots, client, sorted({n for ns in needles.values() for n in ns}))
    assert after == []
    assert {n for _, n in _traces(roots, client, kept_needles)} >= {kept.person_id, kept.anonymous_ids[0]}

    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        lost = con.execute(
            """SELECT count(*) FROM ingest_files WHERE status = 'ingested' AND lines_read <>
               events_kept + lines_quarantined + duplicates + lines_suppressed + lines_erased"""
        ).fetchall()[0][0]
        assert lost == 0
        logged = con.execute("SELECT count(*), count(consented_at) FROM erasure_log").fetchall()[0]
        assert logged[0] >= 5 * 2 and logged[1] == 0  # every identifier of five people, as keyed hashes only
        assert (
            con.execute(
                "SELECT count(*) FROM erasure_log WHERE NOT regexp_full_match(erasure_hash, '[0-9a-f]{64}')"
            ).fetchall()[0][0]
            == 0
        )

    # Later events of the forgotten are suppressed (in batch and in the stream) until one comes with consent.
    late = [
        _event(with_email.anonymous_ids[0], "late-1", 22),
        _event(by_anon.anonymous_ids[0], "late-2", 22),
        _event(by_anon.anonymous_ids[0], "late-3", 23, context={"consent": {"personalization": True}}),
        _event(by_anon.anonymous_ids[0], "late-4", 24),
    ]
    (persona_home / "landing" / "late.jsonl").write_text("".join(json.dumps(e) + "\n" for e in late))
    for who, message_id in ((with_user, "live-late-1"), (by_person, "live-late-2")):
        client.xadd(stream.STREAM, {"event": json.dumps(_event(who.anonymous_ids[0], message_id, 22))})
    worker = stream.run(
        client, persona_home / "landing", snapshot, "c2", stream.ConsumerOptions(block_ms=50), max_events=2
    )
    assert worker.suppressed == 2 and worker.applied == 0  # (the pending entry was erased from the stream)
    assert not client.exists(stream.hot_key(with_user.person_id))
    assert cli.materialize()
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        kept_ids = {
            r[0] for r in con.execute("SELECT message_id FROM raw_events WHERE message_id LIKE 'late-%'").fetchall()
        }
        assert kept_ids == {"late-3", "late-4"}  # back with consent from late-3 on
        suppressed = con.execute("SELECT lines_suppressed FROM ingest_files WHERE file_name = 'late.jsonl'").fetchall()
        assert suppressed == [(2,)]
        assert con.execute("SELECT count(*) FROM erasure_log WHERE consented_at IS NOT NULL").fetchall()[0][0] == 1
    assert not [h for h in _traces(roots, client, needles[with_email.person_key]) if "late.jsonl" not in h[0]]


@pytest.mark.slow
def test_people_who_decline_personalization_are_counted_but_never_profiled(persona_home, generated, redis_home):
    client = redis_home
    source = generated("jsonl")
    land(source, persona_home / "landing")
    assert cli.materialize()
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        people = _people(source, con)
        declined = people.iloc[0]
        events_before = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    no = {"consent": {"personalization": "declined"}}
    (persona_home / "landing" / "consent.jsonl").write_text(
        json.dumps(_event(declined.anonymous_ids[0], "no-1", 22, context=no)) + "\n"
    )
    assert cli.materialize()
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == events_before + 1
        assert con.execute(
            "SELECT consent FROM deduped_users WHERE person_id = ?", [declined.person_id]
        ).fetchall() == [("declined",)]
        for table in PERSON_TABLES:
            rows = con.execute(
                f"SELECT count(*) FILTER (WHERE person_id = $d), count(*) FROM {table}", {"d": declined.person_id}
            ).fetchall()[0]
            assert rows[0] == 0 and rows[1] > 0, table
    # The stream keeps no hot profile for them; a later "yes" brings them back.
    stream.load_identity(client, persona_home / "serving" / "persona.duckdb")
    events = [
        _event(declined.anonymous_ids[0], "s-1", 23, context=no),
        _event(declined.anonymous_ids[0], "s-2", 23),
        _event(declined.anonymous_ids[0], "s-3", 24, context={"consent": {"personalization": "yes"}}),
    ]
    for e in events[:2]:
        client.xadd(stream.STREAM, {"event": json.dumps(e)})
    worker = stream.run(
        client,
        persona_home / "landing",
        persona_home / "missing.duckdb",
        "c",
        stream.ConsumerOptions(block_ms=50),
        max_events=2,
    )
    assert worker.not_profiled == 2 and not client.exists(stream.hot_key(declined.person_id))
    client.xadd(stream.STREAM, {"event": json.dumps(events[2])})
    worker = stream.run(
        client,
        persona_home / "landing",
        persona_home / "missing.duckdb",
        "c",
        stream.ConsumerOptions(block_ms=50),
        max_events=1,
    )
    assert worker.applied == 1 and client.exists(stream.hot_key(declined.person_id))
    assert cli.materialize()
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute(
            "SELECT count(*) FROM user_profiles WHERE person_id = ?", [declined.person_id]
        ).fetchall() == [(1,)]


def test_forget_reaches_the_hot_store_of_a_stopped_stream_through_its_append_only_file(persona_home):
    from persona_assets.core.identity import resolve
    from persona_assets.core.ingest import ingest

    anon, email = "5f0c2a9e-forget-me-7d41", "forget.me.please@example.org"
    events = [_event(anon, f"e-{i}", 20 + i) for i in range(3)]
    events[0]["traits"] = {"email": email}
    (persona_home / "landing" / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    with duckdb.connect(str(persona_home / "warehouse.duckdb")) as con:
        ingest(con, persona_home / "landing", load_key(persona_home))
        resolve(con)
        person_id = con.execute("SELECT DISTINCT person_id FROM identity_map").fetchall()[0][0]
    # `persona stream --start-redis` ran and stopped: only its append-only files are left.
    server, url = stream.start_redis(persona_home / "redis")
    client = stream.connect(url)
    client.hset(stream.IDS["anonymous_id"], anon, person_id)
    for e in events:
        client.xadd(stream.STREAM, {"event": json.dumps(e)})
    stream.run(
        client,
        persona_home / "landing",
        persona_home / "none.duckdb",
        "c",
        stream.ConsumerOptions(block_ms=50),
        max_events=3,
    )
    assert client.exists(stream.hot_key(person_id))
    server.terminate()
    server.wait(timeout=20)
    assert anon.encode() in b"".join(p.read_bytes() for p in (persona_home / "redis").rglob("*") if p.is_file())

    assert cli.main(["forget", email]) == 0
    assert not list(persona_home.joinpath("redis").glob("url"))
    server, url = stream.start_redis(persona_home / "redis")  # what it kept on disk, loaded again
    try:
        client = stream.connect(url)
        assert not client.exists(stream.hot_key(person_id))
        needles = [anon, person_id, hmac_hex(load_key(persona_home), normalize_email(email))]
        assert _traces([persona_home], client, needles) == []
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.mark.parametrize("fmt", ["csv", "jsonl.gz", "parquet"])
def test_forget_rewrites_landing_files_of_every_format_and_they_are_not_ingested_again(fmt, generated, tmp_path):
    import gzip

    from persona_assets.core import erasure
    from persona_assets.core.identity import resolve
    from persona_assets.core.ingest import checksum, ingest

    source = generated(fmt)
    landing = tmp_path / "landing"
    landing.mkdir()
    files = [p for p in land(source, landing) if p.is_file()]
    key = b"k"
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest(con, landing, key)
    resolve(con)
    person = _people(source, con).iloc[0]
    lines_before = con.execute("SELECT sum(lines_read) FROM ingest_files").fetchall()[0][0]
    report = erasure.forget(con, key, person.anonymous_ids[0], landing)
    assert report.people == [person.person_id] and report.landing_files >= 1 and report.landing_lines >= report.events

    def text(path: Path) -> bytes:
        if fmt == "parquet":
            return pd.read_parquet(path).to_csv().encode()
        return gzip.decompress(path.read_bytes()) if fmt == "jsonl.gz" else path.read_bytes()

    for path in files:
        assert not any(a.encode() in text(path) for a in person.anonymous_ids), path.name
    ledger = dict(con.execute("SELECT file_name, checksum FROM ingest_files").fetchall())
    assert all(ledger[p.name] == checksum(p) for p in files)
    again = ingest(con, landing, key)
    assert not again.files  # the rewritten files are the ones the ledger knows
    counts = con.execute(
        "SELECT sum(lines_read), sum(events_kept + lines_quarantined + duplicates + lines_suppressed + lines_erased), "
        "sum(lines_erased) FROM ingest_files"
    ).fetchall()[0]
    assert counts[0] == counts[1] == lines_before and counts[2] == report.events + report.quarantined_lines


def test_forget_before_identity_has_run_erases_events_and_logs_the_identifier(tmp_path):
    from persona_assets.core import erasure
    from persona_assets.core.ingest import ingest

    landing = tmp_path / "landing"
    landing.mkdir()
    events = [_event("anon-early-1", "x-1", 20), _event("anon-early-2", "x-2", 20)]
    (landing / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest(con, landing, b"k")
    report = erasure.forget(con, b"k", "anon-early-1", landing)
    assert report.people == [] and report.events == 1
    assert con.execute("SELECT message_id FROM raw_events").fetchall() == [("x-2",)]
    assert "anon-early-1" not in (landing / "a.jsonl").read_text()
    assert con.execute("SELECT count(*) FROM erasure_log").fetchall()[0][0] == 1
