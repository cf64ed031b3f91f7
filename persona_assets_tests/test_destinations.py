"""Destinations against a real local HTTP receiver that fails a share of requests and is down for
a while: nothing lost, nothing duplicated at the receiver, order per person kept; files written
aside and renamed."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets.contracts import AudienceChanges, AudienceMembers, IdentityMap, ddl
from persona_assets.core import destinations
from persona_assets.core.audience_definitions import Audience, Definitions, Destination, Node

SECRET = "s3cret-for-tests"
AUDIENCES = ("buyers", "gamers", "lapsed")


class Receiver:
    """A webhook receiver on a loopback port: checks each request's signature, keeps each
    messageId once (the first copy) in arrival order, and fails `fail_share` of the requests,
    half before reading them and half after (a receiver that stored the batch, then failed)."""

    def __init__(self, fail_share: float = 0.0, seed: int = 1, status: int = 503) -> None:
        self.fail_share, self.rng, self.status = fail_share, random.Random(seed), status
        self.events: dict[str, dict] = {}
        self.copies = self.requests = self.failed = self.bad_signatures = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server name)
                receiver.handle(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.allow_reuse_address = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers["Content-Length"]))
        stamp = request.headers[destinations.TIMESTAMP_HEADER]
        expected = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        with self.lock:
            self.requests += 1
            roll = self.rng.random()
            if not hmac.compare_digest(expected, request.headers[destinations.SIGNATURE_HEADER]):
                self.bad_signatures += 1
                return self._reply(request, 401)
            if roll < self.fail_share / 2:
                self.failed += 1
                return self._reply(request, self.status)
            for event in json.loads(body)["batch"]:
                self.copies += 1
                self.events.setdefault(event["messageId"], event)  # dedup by idempotency key
            if roll < self.fail_share:
                self.failed += 1
                return self._reply(request, self.status)
        self._reply(request, 200)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int) -> None:
        request.send_response(status)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def by_person(self) -> dict[str, list[tuple[str, str]]]:
        out = defaultdict(list)
        for event in self.events.values():  # insertion order: first arrival
            out[event.get("userId") or event["anonymousId"]].append(
                (event["properties"]["audience_key"], event["event"])
            )
        return out


@pytest.fixture
def receiver():
    made = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def _warehouse(path: Path, people: int = 120, runs: int = 6, seed: int = 3) -> duckdb.DuckDBPyConnection:
    """audience_changes as runs make them (each person entering and leaving audiences over
    several runs), the identity map (userIds for some, anonymousIds for all) and the members."""
    con = duckdb.connect(str(path))
    for model, table in (
        (AudienceChanges, "audience_changes"),
        (IdentityMap, "identity_map"),
        (AudienceMembers, "audience_members"),
    ):
        con.execute(ddl(model, table))
    rng, start = random.Random(seed), datetime(2026, 1, 1)
    ids, rows, members, change_id = [], [], {}, 0
    for i in range(people):
        person = f"p{i:016x}"
        ids.append(("anonymous_id", f"anon-{i}", person, start, start))
        if i % 3:
            ids.append(("user_id", f"user-{i}", person, start, start))
    for run in range(runs):
        for i in range(people):
            for audience in AUDIENCES:
                person, inside = f"p{i:016x}", (f"p{i:016x}", audience) in members
                if rng.random() < 0.35:
                    change_id += 1
                    at = start + timedelta(hours=run)
                    rows.append((change_id, audience, person, "exited" if inside else "entered", at, at, f"run{run}"))
                    if inside:
                        del members[(person, audience)]
                    else:
                        members[(person, audience)] = at
    con.executemany("INSERT INTO audience_changes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO identity_map VALUES (?, ?, ?, ?, ?)", ids)
    con.executemany("INSERT INTO audience_members VALUES (?, ?, ?)", [(a, p, at) for (p, a), at in members.items()])
    return con


def _definitions(*dests: Destination) -> Definitions:
    audiences = {a: Audience(a, "", Node("all", (), 1), 1) for a in AUDIENCES}
    return Definitions(audiences=audiences, destinations={d.name: d for d in dests})


def _expected(con, audiences=AUDIENCES) -> dict[str, list[tuple[str, str]]]:
    rows = con.execute(
        """SELECT coalesce((SELECT min(identifier) FROM identity_map m WHERE m.person_id = c.person_id
                            AND identifier_type = 'user_id'),
                           (SELECT min(identifier) FROM identity_map m WHERE m.person_id = c.person_id
                            AND identifier_type = 'anonymous_id')), audience, change
           FROM audience_changes c WHERE audience IN (SELECT unnest(?)) ORDER BY change_id""",
        [list(audiences)],
    ).fetchall()
    out = defaultdict(list)
    for who, audience, change in rows:
        out[who].append((audience, destinations.EVENTS[change]))
    return out


def test_webhook_through_failures_and_an_outage_loses_and_duplicates_nothing(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    con = _warehouse(tmp_path / "w.duckdb")
    total = con.execute("SELECT count(*) FROM audience_changes").fetchall()[0][0]
    hook = receiver(fail_share=0.3, seed=7)
    dest = Destination("crm", "webhook", (), url=hook.url, secret_env="HOOK_SECRET", batch_size=40, max_attempts=50)
    definitions = _definitions(dest)
    opts = destinations.DeliveryOptions(base_delay=0.02, max_delay=0.3, budget_seconds=60, seed=1)

    # The receiver goes down once a few batches are in, and comes back 1.5 s later.
    def outage():
        while hook.requests < 4:
            time.sleep(0.005)
        hook.stop()
        time.sleep(1.5)
        hook.start()

    down = threading.Thread(target=outage)
    down.start()
    [report] = destinations.deliver(con, definitions, tmp_path, opts)
    down.join()
    assert report.pending == 0 and report.dead_lettered == 0 and report.delivered == total
    assert report.attempts_failed > 0 and hook.failed > 0 and hook.bad_signatures == 0
    # Nothing lost, nothing duplicated at the receiver (copies arrived, one kept per key), order per person kept.
    assert len(hook.events) == total and hook.copies > total
    assert hook.by_person() == _expected(con)
    assert {e["event"] for e in hook.events.values()} == {"Audience Entered", "Audience Exited"}
    assert all(("userId" in e) != ("anonymousId" in e) for e in hook.events.values())
    # Another run sends nothing more.
    requests = hook.requests
    [again] = destinations.deliver(con, definitions, tmp_path, opts)
    assert again.delivered == 0 and hook.requests == requests
    [state] = destinations.lag(con, definitions)
    assert state["pending"] == 0 and state["delivered"] == total and state["failed_attempts"] == report.attempts_failed


def test_a_receiver_down_for_a_whole_run_gets_everything_on_the_next(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    con = _warehouse(tmp_path / "w.duckdb", people=40)
    total = con.execute("SELECT count(*) FROM audience_changes WHERE audience = 'gamers'").fetchall()[0][0]
    hook = receiver()
    hook.stop()
    dest = Destination(
        "crm", "webhook", ("gamers",), url=hook.url, secret_env="HOOK_SECRET", batch_size=25, max_attempts=100
    )
    definitions = _definitions(dest)
    opts = destinations.DeliveryOptions(base_delay=0.05, max_delay=0.2, budget_seconds=1.0, seed=2)
    [first] = destinations.deliver(con, definitions, tmp_path, opts)
    assert first.delivered == 0 and first.pending == total and first.attempts_failed >= 2
    assert "could not reach" in first.error
    [state] = destinations.lag(con, definitions)
    assert state["pending"] == total and state["lag_seconds"] > 0 and "could not reach" in state["last_error"]
    hook.start()
    [second] = destinations.deliver(con, definitions, tmp_path, opts)
    assert second.delivered == total and second.pending == 0
    assert hook.by_person() == _expected(con, ("gamers",))


def test_refused_batches_go_to_dead_letters_and_delivery_moves_on(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    con = _warehouse(tmp_path / "w.duckdb", people=30)
    total = con.execute("SELECT count(*) FROM audience_changes").fetchall()[0][0]
    hook = receiver(fail_share=2.0, status=400)  # every request refused before it is read
    dest = Destination("crm", "webhook", (), url=hook.url, secret_env="HOOK_SECRET", batch_size=30, max_attempts=3)
    [report] = destinations.deliver(con, _definitions(dest), tmp_path, destinations.DeliveryOptions(base_delay=0.01))
    # A 4xx is a refusal: not retried, each batch dead-lettered at once, every change kept there.
    assert report.dead_lettered == total and report.delivered == 0 and report.pending == 0
    assert hook.requests == -(-total // 30)
    dead = con.execute("SELECT count(DISTINCT change_id), min(attempts), max(error) FROM destination_dead_letters")
    assert dead.fetchall()[0] == (total, 1, "HTTP 400 Bad Request")
    # Fixed at the receiver: the dead letters are sent again on request, oldest first, and leave the table.
    hook.fail_share = 0.0
    [again] = destinations.deliver(con, _definitions(dest), tmp_path, destinations.DeliveryOptions(), redeliver=True)
    assert again.redelivered == total and len(hook.events) == total
    assert hook.by_person() == _expected(con)
    assert con.execute("SELECT count(*) FROM destination_dead_letters").fetchall()[0][0] == 0


def test_server_errors_are_retried_then_dead_lettered_after_max_attempts(receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    con = _warehouse(tmp_path / "w.duckdb", people=10, runs=2)
    total = con.execute("SELECT count(*) FROM audience_changes").fetchall()[0][0]
    hook = receiver(fail_share=2.0)  # every request fails before it is read
    dest = Destination("crm", "webhook", (), url=hook.url, secret_env="HOOK_SECRET", batch_size=1000, max_attempts=3)
    [report] = destinations.deliver(con, _definitions(dest), tmp_path, destinations.DeliveryOptions(base_delay=0.01))
    assert hook.requests == 3 and report.attempts_failed == 3 and report.dead_lettered == total
    assert con.execute("SELECT max(attempts) FROM destination_dead_letters").fetchall()[0][0] == 3


def test_no_secret_no_delivery(receiver, tmp_path, monkeypatch):
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    con = _warehouse(tmp_path / "w.duckdb", people=10, runs=1)
    hook = receiver()
    dest = Destination("crm", "webhook", (), url=hook.url, secret_env="HOOK_SECRET")
    [report] = destinations.deliver(con, _definitions(dest), tmp_path)
    assert hook.requests == 0 and report.pending > 0 and "HOOK_SECRET is not set" in report.error


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_destination_writes_each_audience_aside_and_renames(tmp_path, fmt):
    con = _warehouse(tmp_path / "w.duckdb", people=50)
    dest = Destination("exports", "file", ("buyers", "lapsed"), folder="exports", format=fmt)
    [report] = destinations.deliver(con, _definitions(dest), tmp_path)
    folder = tmp_path / "exports"
    assert sorted(p.name for p in folder.iterdir()) == [f"buyers.{fmt}", f"lapsed.{fmt}"]  # nothing left aside
    for audience in ("buyers", "lapsed"):
        path = folder / f"{audience}.{fmt}"
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
        members = con.execute("SELECT person_id FROM audience_members WHERE audience = ? ORDER BY 1", [audience])
        assert frame["person_id"].tolist() == [r[0] for r in members.fetchall()]
        assert frame["anonymous_id"].notna().all()
    assert report.delivered > 0
    [state] = destinations.lag(con, _definitions(dest))
    assert state["pending"] == 0
