"""Hostile input never stops ingest, never leaks into the tables, and every line is accounted for.

Each hostile file is written by the test itself. The rule held throughout: a file Persona cannot
read is quarantined whole (`unreadable_file`) while the others go on; what can be read is read;
and for every file the ledger adds up (lines read = kept + quarantined + duplicates).
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_assets.contracts import CleanedUsers, IngestFiles, QuarantinedEvents, RawEvents, columns
from persona_assets.core.ingest import IngestOptions, contract_params, ingest, query_lines
from persona_assets.core.plain import plain_rows

KEY = b"test-key"
NOW = datetime(2026, 11, 1)
GOOD = {"type": "track", "event": "Product Viewed", "anonymousId": "a1", "timestamp": "2026-09-01T10:00:00Z"}
FUZZ_EXAMPLES = int(os.environ.get("PERSONA_FUZZ_EXAMPLES", "40"))


def _line(**over) -> str:
    return json.dumps({**GOOD, **over})


def _run(tmp_path, files: dict[str, bytes], opts: IngestOptions | None = None, con=None):
    """Write `files` into a landing folder and ingest them; returns the connection and the report."""
    landing = tmp_path / "landing"
    landing.mkdir(exist_ok=True)
    for name, body in files.items():
        (landing / name).write_bytes(body)
    con = con or duckdb.connect()
    return con, ingest(con, landing, KEY, opts, now=NOW)


def _assert_accounted(con) -> None:
    """The ledger adds up per file, the quarantine holds exactly the lines it counts, and the
    tables meet their contracts."""
    ledger = con.execute(
        """SELECT f.file_name, f.status, f.lines_read, f.events_kept, f.lines_quarantined, f.duplicates,
                  (SELECT count(*) FROM raw_events r WHERE r.batch_id = f.batch_id),
                  (SELECT count(source_line) FROM quarantined_events q WHERE q.batch_id = f.batch_id),
                  (SELECT count(*) FROM quarantined_events q WHERE q.batch_id = f.batch_id
                     AND q.reason = 'unreadable_file')
           FROM ingest_files f"""
    ).fetchall()
    for name, status, read, kept, quarantined, duplicates, stored, lines_held, unreadable in ledger:
        assert read == kept + quarantined + duplicates, name
        assert duplicates >= 0 and stored == kept and lines_held == quarantined, name
        if status == "unreadable":
            assert read == 0 and unreadable == 1, name
    for model, table in (
        (RawEvents, "raw_events"),
        (QuarantinedEvents, "quarantined_events"),
        (IngestFiles, "ingest_files"),
    ):
        model.validate(con.execute(f"SELECT {', '.join(columns(model))} FROM {table}").df(), lazy=True)
    not_finite = "NOT isfinite(price) OR NOT isfinite(revenue) OR price < 0 OR revenue < 0"
    assert con.execute(f"SELECT count(*) FROM raw_events WHERE {not_finite}").fetchall()[0][0] == 0


def _statuses(report) -> dict[str, str]:
    return {f.file_name: f.status for f in report.files}


def _quarantine(con) -> list[tuple]:
    return con.execute(
        "SELECT source_file, source_line, reason, detail FROM quarantined_events ORDER BY source_file, source_line"
    ).fetchall()


# --- one line never blocks publishing ------------------------------------------------------------


def test_negative_and_non_finite_amounts_are_quarantined_as_bad_values(tmp_path):
    lines = [
        _line(messageId="neg", properties={"revenue": -5}),
        _line(messageId="negp", properties={"price": -0.01}),
        '{"messageId": "inf", "type": "track", "event": "x", "anonymousId": "a", "timestamp": "2026-09-01T10:00:00Z", '
        '"properties": {"revenue": 1e309}}',
        '{"messageId": "nan", "type": "track", "event": "x", "anonymousId": "a", "timestamp": "2026-09-01T10:00:00Z", '
        '"properties": {"price": NaN}}',
        _line(messageId="nans", properties={"price": "NaN"}),
        _line(messageId="huge", properties={"revenue": 1e16}),
        '{"messageId": "prod", "type": "track", "event": "x", "anonymousId": "a", "timestamp": "2026-09-01T10:00:00Z", '
        '"properties": {"products": [{"price": -Infinity, "name": "NaN"}]}}',
        _line(messageId="zero", properties={"revenue": 0, "price": 0.0, "products": [{"name": "NaN", "price": 1e308}]}),
    ]
    csv = b"messageId,type,event,anonymousId,timestamp,properties_price\nc1,track,x,a,2026-09-01T10:00:00Z,inf\n"
    con, _ = _run(tmp_path, {"amounts.jsonl": ("\n".join(lines) + "\n").encode(), "amounts.csv": csv})
    got = {(f, n): (r, d) for f, n, r, d in _quarantine(con)}
    assert got == {
        ("amounts.csv", 2): ("bad_value", "price inf"),
        ("amounts.jsonl", 1): ("bad_value", "revenue -5"),
        ("amounts.jsonl", 2): ("bad_value", "price -0.01"),
        ("amounts.jsonl", 3): ("bad_value", "revenue 1e309"),
        ("amounts.jsonl", 4): ("bad_value", "price NaN"),
        ("amounts.jsonl", 5): ("bad_value", "price NaN"),
        ("amounts.jsonl", 6): ("bad_value", "revenue 10000000000000000.0"),
        ("amounts.jsonl", 7): ("bad_value", "products hold a number that is not finite"),
    }
    assert con.execute("SELECT message_id, revenue, price FROM raw_events").fetchall() == [("zero", 0.0, 0.0)]
    _assert_accounted(con)


AMOUNTS = st.one_of(
    st.none(), st.floats(), st.integers(), st.text(max_size=12),
    st.sampled_from(["1e309", "-0", "NaN", "Infinity", "1e15", "1000000000000000.1", " 5", "5e-324", True]),
)  # fmt: skip
TIMESTAMPS = st.one_of(
    st.sampled_from(
        ["2026-09-01T10:00:00Z", "2026-09-01T10:00:00", "2026-09-01", "2026-09-01T10:00:00-99:00",
         "2026-09-01T10:00:00+18:00", "2026-09-01T10:00:00+18:01", "2026-09-01T10:00:00+05:99",
         "2026-09-01 10:00:00 Europe/Berlin", "1970-01-01T00:00:01Z", "2026-11-02T00:00:00+14:00", "2026-09-01T10:00:00.1234567+0530"]
    ),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2030, 1, 1)).map(lambda d: d.isoformat()),
    st.text(max_size=25),
)  # fmt: skip
TEXTS = st.one_of(st.none(), st.text(max_size=20), st.integers(), st.sampled_from(["", " ", "x" * 300, "NaN"]))


@st.composite
def hostile_events(draw) -> dict:
    event = {
        "messageId": draw(st.one_of(st.none(), st.text(max_size=8))),
        "type": draw(st.sampled_from(["track", "identify", "page", "alias", "TRACK", "bogus"])),
        "event": draw(st.sampled_from(["Order Completed", "Product Viewed", None])),
        "anonymousId": draw(st.one_of(st.sampled_from(["a1", "a2", "a3"]), TEXTS)),
        "userId": draw(TEXTS),
        "previousId": draw(TEXTS),
        "timestamp": draw(TIMESTAMPS),
        "traits": {"email": draw(TEXTS), "age": draw(TEXTS), "gender": draw(TEXTS), "country": draw(TEXTS)},
        "context": {"device": {"type": draw(TEXTS)}, "consent": {"personalization": draw(TEXTS)}},
        "properties": {
            "revenue": draw(AMOUNTS),
            "price": draw(AMOUNTS),
            "quantity": draw(AMOUNTS),
            "category": draw(TEXTS),
        },
    }
    return event


def _json(event: dict) -> str:
    return json.dumps(event, allow_nan=True)  # NaN and Infinity as DuckDB's reader takes them


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=st.lists(hostile_events(), min_size=1, max_size=25))
def test_every_value_that_passes_ingest_passes_the_event_contracts(tmp_path_factory, events):
    lines = [_json(e) for e in events]
    con, report = _run(tmp_path_factory.mktemp("values"), {"values.jsonl": ("\n".join(lines) + "\n").encode()})
    assert report.total("lines_read") == len(lines)
    _assert_accounted(con)
    # The stream's fast path agrees: it types only lines the query keeps, as the query types them.
    params = contract_params(now=NOW)
    for plain, queried in zip(
        plain_rows(lines, params), query_lines(duckdb.connect(), lines, params, [False] * len(lines))
    ):
        assert plain is None or queried["reason"] is None


def test_hostile_but_accepted_values_pass_cleaning_and_its_contract(tmp_path):
    from persona_assets.core.cleaning import clean
    from persona_assets.core.identity import resolve

    edge = [
        {"revenue": 1e15, "price": 1e15, "quantity": 2**53 - 1},
        {"revenue": 0, "price": -0.0},
        {"revenue": 5e-324, "price": 1e-300},
        {"revenue": "1000000000000000", "price": " 7 "},
    ]
    lines = []
    for i in range(40):
        props = edge[i % len(edge)]
        lines.append(_line(messageId=f"o{i}", event="Order Completed", anonymousId=f"a{i % 3}", properties=props,
                           timestamp=["2026-09-01T10:00:00", "1970-01-01T00:00:01Z", "2026-11-02T00:00:00+14:00",
                                      "2026-09-01T10:00:00-18:00"][i % 4]))  # fmt: skip
    lines += [
        _line(messageId="id1", type="identify", anonymousId="a0", traits={"age": "1e309", "email": "NaN"}),
        _line(messageId="id2", type="identify", anonymousId="a1", traits={"age": -5, "country": "∞"}),
        _line(messageId="al", type="alias", anonymousId="a2", previousId="a1", userId="u NaN"),
    ]
    con, report = _run(tmp_path, {"edge.jsonl": ("\n".join(lines) + "\n").encode()})
    assert report.total("events_kept") == len(lines)
    resolve(con)
    clean(con)
    users = con.execute(f"SELECT {', '.join(columns(CleanedUsers))} FROM cleaned_users").df()
    CleanedUsers.validate(users, lazy=True)
    assert np.isfinite(users["total_revenue"]).all() and (users["total_revenue"] > 1e15).any()


# --- every line accounted, exactly ---------------------------------------------------------------


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_a_timestamp_without_a_zone_is_utc_whatever_the_machines_zone(tmp_path, monkeypatch, zone):
    monkeypatch.setenv("TZ", zone)
    con = duckdb.connect()
    con.execute(f"SET TimeZone = '{zone}'")
    lines = [
        _line(messageId="naive", timestamp="2026-09-01T10:00:00"),
        _line(messageId="space", timestamp="2026-09-01 10:00:00.250"),
        _line(messageId="date", timestamp="2026-09-01"),
        _line(messageId="offset", timestamp="2026-09-01T12:00:00+02:00"),
        _line(messageId="named", timestamp="2026-09-01 12:00:00 Europe/Berlin"),
    ]
    csv = b"messageId,type,event,anonymousId,timestamp\nc1,track,x,a,2026-09-01 10:00:00\n"
    con, _ = _run(tmp_path, {"naive.jsonl": ("\n".join(lines) + "\n").encode(), "naive.csv": csv}, con=con)
    assert dict(con.execute("SELECT message_id, event_at FROM raw_events").fetchall()) == {
        "naive": datetime(2026, 9, 1, 10),
        "space": datetime(2026, 9, 1, 10, 0, 0, 250000),
        "date": datetime(2026, 9, 1),
        "offset": datetime(2026, 9, 1, 10),
        "named": datetime(2026, 9, 1, 10),
        "c1": datetime(2026, 9, 1, 10),
    }


def test_an_offset_that_is_no_offset_is_a_bad_timestamp(tmp_path):
    stamps = [
        "2026-09-01T10:00:00-99:00",
        "2026-09-01T10:00:00+05:99",
        "2026-09-01T10:00:00+18:30",
        "2026-09-01T10:00:00+24:00",
    ]
    good = [
        "2026-09-01T10:00:00+14:00",
        "2026-09-01T10:00:00-12:00",
        "2026-09-01T10:00:00+0530",
        "2026-09-01T10:00:00-18:00",
    ]
    lines = [_line(messageId=f"m{i}", timestamp=t) for i, t in enumerate(stamps + good)]
    con, _ = _run(tmp_path, {"offsets.jsonl": ("\n".join(lines) + "\n").encode()})
    assert [(line, reason) for _, line, reason, _ in _quarantine(con)] == [(i + 1, "bad_timestamp") for i in range(4)]
    params = contract_params(now=NOW)
    assert plain_rows(lines[:4], params) == [None] * 4
    assert [r["reason"] for r in query_lines(duckdb.connect(), lines, params, [False] * 8)] == ["bad_timestamp"] * 4 + [
        None
    ] * 4
