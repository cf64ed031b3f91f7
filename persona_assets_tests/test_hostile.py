"""Hostile input never stops ingest, never leaks into the tables, and every line is accounted for.

Each hostile file is written by the test itself. The rule held throughout: a file Persona cannot
read is quarantined whole (`unreadable_file`) while the others go on; what can be read is read;
and for every file the ledger adds up (lines read = kept + quarantined + duplicates).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from decimal import Decimal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_assets.contracts import CleanedUsers, IngestFiles, QuarantinedEvents, RawEvents, columns
from persona_assets.core.ingest import RAW_TEXT_LIMIT, IngestOptions, contract_params, ingest, query_lines
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


def _parquet(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


# --- one file never blocks the others ------------------------------------------------------------


def test_a_csv_naming_a_column_twice_is_quarantined_whole_and_the_others_go_on(tmp_path):
    con, report = _run(
        tmp_path,
        {
            "twice.csv": b"userId,type,event,userId,timestamp\nu1,track,x,u2,2026-09-01T10:00:00Z\n",
            "good.jsonl": (_line(messageId="g1") + "\n").encode(),
        },
    )
    assert _statuses(report) == {"twice.csv": "unreadable", "good.jsonl": "ingested"}
    [(name, line, reason, detail)] = _quarantine(con)
    assert (name, line, reason) == ("twice.csv", None, "unreadable_file") and "'userId' 2 times" in detail
    assert con.execute("SELECT message_id FROM raw_events").fetchall() == [("g1",)]
    _assert_accounted(con)


def test_a_csv_with_a_byte_order_mark_or_a_line_break_in_its_header_is_read(tmp_path):
    bom = b"\xef\xbb\xbftimestamp,userId,type,event,messageId\n2026-09-01T10:00:00Z,5,track,x,b1\n"
    broken_header = b'"user\nId",anonymousId,type,event,timestamp,messageId\nu,a7,track,x,2026-09-01T10:00:00Z,n1\n'
    numbers = b"\xef\xbb\xbfproperties_price,anonymousId,type,event,timestamp,messageId\n12,a8,track,x,2026-09-01,p1\n"
    con, report = _run(tmp_path, {"bom.csv": bom, "header.csv": broken_header, "numbers.csv": numbers})
    assert set(_statuses(report).values()) == {"ingested"}
    rows = con.execute(
        "SELECT message_id, user_id, anonymous_id, event_at, price FROM raw_events ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("b1", "5", None, datetime(2026, 9, 1, 10), None),
        ("n1", None, "a7", datetime(2026, 9, 1, 10), None),
        ("p1", None, "a8", datetime(2026, 9, 1), 12.0),
    ]
    _assert_accounted(con)


def test_a_parquet_file_with_nested_and_unusual_columns_is_read(tmp_path):
    products = pa.array(
        [[{"category": "shoes", "price": 19.5}], None],
        pa.list_(pa.struct([("category", pa.string()), ("price", pa.float64())])),
    )
    table = pa.table(
        {
            "messageId": ["o1", "o2"],
            "type": pa.array(["track", "track"]).dictionary_encode(),
            "event": ["Order Completed", "Product Viewed"],
            "anonymousId": pa.array([b"a1", b"a2"], pa.binary()),
            "timestamp": pa.array(
                [datetime(2026, 9, 1, 10), datetime(2026, 9, 1, 11)], pa.timestamp("ms", tz="Europe/Berlin")
            ),
            "properties_revenue": pa.array([Decimal("19.50"), None], pa.decimal128(10, 2)),
            "properties_products": products,
            "extra": pa.array([{"k": 1}, {"k": 2}], pa.struct([("k", pa.int8())])),
            "tags": pa.array([[("a", 1)], []], pa.map_(pa.string(), pa.int32())),
        }
    )
    con, report = _run(tmp_path, {"nested.parquet": _parquet(table)})
    assert _statuses(report) == {"nested.parquet": "ingested"}
    rows = con.execute(
        "SELECT message_id, anonymous_id, event_at, revenue, products FROM raw_events ORDER BY 1"
    ).fetchall()
    assert rows[0][:4] == ("o1", "a1", datetime(2026, 9, 1, 10), 19.5)
    assert json.loads(rows[0][4]) == [{"category": "shoes", "price": 19.5}]
    assert rows[1] == ("o2", "a2", datetime(2026, 9, 1, 11), None, None)
    _assert_accounted(con)


CSV_NAMES = st.sampled_from(
    [
        "messageId",
        "type",
        "event",
        "userId",
        "anonymousId",
        "timestamp",
        "properties_price",
        "properties_revenue",
        "properties_quantity",
        "properties_products",
        "traits_email",
        "x",
        "",
        "user\nId",
        'a"b',
        "\ufefftype",
    ]
)
CELLS = st.one_of(
    st.sampled_from(["track", "identify", "2026-09-01T10:00:00Z", "2026-09-01", "a1", "-5", "1e309", "NaN", "[1,"]),
    st.sampled_from(['[{"price": NaN}]', '"quoted, comma"', '"open quote', "x\ny", "x\ry", "", "12", "true"]),
    st.text(max_size=8),
    st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])


@st.composite
def csv_files(draw) -> bytes:
    header = draw(st.lists(CSV_NAMES, min_size=1, max_size=7))
    rows = draw(st.lists(st.lists(CELLS, min_size=0, max_size=len(header) + 1), max_size=8))
    text = "\n".join(",".join(cells) for cells in [header, *rows])
    body = text.encode(draw(ENCODINGS), errors="replace")
    if draw(st.booleans()):  # a stray byte, an invalid UTF-8 sequence or a cut
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\r", b"\x00", b""])) + body[at:]
    return body


PARQUET_TYPES = st.sampled_from(
    [
        pa.string(),
        pa.large_string(),
        pa.binary(),
        pa.int64(),
        pa.float64(),
        pa.bool_(),
        pa.timestamp("us"),
        pa.timestamp("ns", tz="UTC"),
        pa.date32(),
        pa.decimal128(12, 3),
        pa.list_(pa.int32()),
        pa.list_(pa.struct([("category", pa.string()), ("price", pa.float64())])),
        pa.map_(pa.string(), pa.string()),
        pa.struct([("a", pa.int16())]),
        pa.null(),
        pa.dictionary(pa.int8(), pa.string()),
        pa.duration("s"),
        pa.time64("us"),
        pa.large_list(pa.float32()),
    ]
)
PARQUET_NAMES = st.sampled_from(
    [
        "messageId",
        "type",
        "event",
        "anonymousId",
        "userId",
        "timestamp",
        "properties_price",
        "properties_revenue",
        "properties_products",
        "properties_quantity",
        "traits_email",
        "other",
    ]
)


def _column(kind: pa.DataType, n: int, rng: np.random.Generator) -> pa.Array:
    """`n` values of a type, with nulls and awkward values (NaN, infinities, invalid UTF-8)."""
    if pa.types.is_dictionary(kind):
        return pa.array(rng.choice(["track", "page", "x"], n)).dictionary_encode().cast(kind)
    if pa.types.is_null(kind):
        return pa.nulls(n)
    if pa.types.is_floating(kind) and kind == pa.float64():
        return pa.array(rng.choice([1.5, -5.0, np.nan, np.inf, 1e300, 0.0], n))
    if pa.types.is_binary(kind):
        return pa.array([rng.choice([b"track", b"\xff\xfe", b"a1", b"2026-09-01T10:00:00Z"]) for _ in range(n)], kind)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.array(
            [str(rng.choice(["track", "a1", "2026-09-01T10:00:00Z", "", "NaN", "-1"])) for _ in range(n)], kind
        )
    sample = {
        pa.int64(): [1, -1, 2**62],
        pa.bool_(): [True, False],
        pa.date32(): [datetime(2026, 9, 1).date()],
        pa.time64("us"): [datetime(2026, 1, 1, 10).time()],
        pa.duration("s"): [5],
    }
    if kind in sample:
        return pa.array([sample[kind][i % len(sample[kind])] for i in range(n)], kind)
    if pa.types.is_timestamp(kind):
        return pa.array([datetime(2026, 9, 1, 10)] * n, kind)
    if pa.types.is_decimal(kind):
        return pa.array([None] * n, kind)
    if pa.types.is_map(kind):
        return pa.array([[("k", "v")]] * n, kind)
    if pa.types.is_struct(kind):
        return pa.array([{f.name: None for f in kind}] * n, kind)
    return pa.array([[] if i % 2 else None for i in range(n)], kind)


@st.composite
def parquet_files(draw) -> bytes:
    names = draw(st.lists(PARQUET_NAMES, min_size=1, max_size=6))
    n = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = [_column(draw(PARQUET_TYPES), n, rng) for _ in names]
    body = _parquet(pa.Table.from_arrays(arrays, names=names), row_group_size=2)
    if draw(st.integers(0, 3)) == 0:  # damage a byte or cut the file
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :] if draw(st.booleans()) else body[:at]
    return body


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(csvs=st.lists(csv_files(), min_size=1, max_size=3), parquets=st.lists(parquet_files(), max_size=3))
def test_no_file_content_stops_ingest_and_every_line_is_accounted_for(tmp_path_factory, csvs, parquets):
    files = {f"f{i}.csv": body for i, body in enumerate(csvs)}
    files |= {f"p{i}.parquet": body for i, body in enumerate(parquets)}
    files["good.jsonl"] = (_line(messageId="g1") + "\n").encode()
    con, report = _run(tmp_path_factory.mktemp("fuzz"), files)
    assert len(report.files) == len(files)
    assert ("g1",) in con.execute("SELECT message_id FROM raw_events").fetchall()
    _assert_accounted(con)


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
    st.none(),
    st.floats(),
    st.integers(),
    st.text(max_size=12),
    st.sampled_from(["1e309", "-0", "NaN", "Infinity", "1e15", "1000000000000000.1", " 5", "5e-324", True]),
)
TIMESTAMPS = st.one_of(
    st.sampled_from(
        [
            "2026-09-01T10:00:00Z",
            "2026-09-01T10:00:00",
            "2026-09-01",
            "2026-09-01T10:00:00-99:00",
            "2026-09-01T10:00:00+18:00",
            "2026-09-01T10:00:00+18:01",
            "2026-09-01T10:00:00+05:99",
            "2026-09-01 10:00:00 Europe/Berlin",
            "1970-01-01T00:00:01Z",
            "2026-11-02T00:00:00+14:00",
            "2026-09-01T10:00:00.1234567+0530",
        ]
    ),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2030, 1, 1)).map(lambda d: d.isoformat()),
    st.text(max_size=25),
)
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


def _edge_lines() -> list[str]:
    """Lines every field of which is at an edge ingest still accepts."""
    edge = [
        {"revenue": 1e15, "price": 1e15, "quantity": 2**53 - 1},
        {"revenue": 0, "price": -0.0},
        {"revenue": 5e-324, "price": 1e-300},
        {"revenue": "1000000000000000", "price": " 7 "},
    ]
    lines = []
    for i in range(40):
        props = edge[i % len(edge)]
        lines.append(
            _line(
                messageId=f"o{i}",
                event="Order Completed",
                anonymousId=f"a{i % 3}",
                properties=props,
                timestamp=[
                    "2026-09-01T10:00:00",
                    "1970-01-01T00:00:01Z",
                    "2026-11-02T00:00:00+14:00",
                    "2026-09-01T10:00:00-18:00",
                ][i % 4],
            )
        )
    lines += [
        _line(messageId="id1", type="identify", anonymousId="a0", traits={"age": "1e309", "email": "NaN"}),
        _line(messageId="id2", type="identify", anonymousId="a1", traits={"age": -5, "country": "∞"}),
        _line(messageId="al", type="alias", anonymousId="a2", previousId="a1", userId="u NaN"),
    ]
    return lines


def test_hostile_but_accepted_values_pass_cleaning_and_its_contract(tmp_path):
    from persona_assets.core.cleaning import clean
    from persona_assets.core.identity import resolve

    lines = _edge_lines()
    con, report = _run(tmp_path, {"edge.jsonl": ("\n".join(lines) + "\n").encode()})
    assert report.total("events_kept") == len(lines)
    resolve(con)
    clean(con)
    users = con.execute(f"SELECT {', '.join(columns(CleanedUsers))} FROM cleaned_users").df()
    CleanedUsers.validate(users, lazy=True)
    assert np.isfinite(users["total_revenue"]).all() and (users["total_revenue"] > 1e15).any()


@pytest.mark.slow
def test_what_ingest_keeps_every_contract_accepts_through_user_profiles(persona_home, generated):
    # The edge values beside an ordinary population (so every model fits), through the whole
    # graph: every contract check, from raw_events to user_profiles, passes, and the snapshot
    # is published.
    from .conftest import land, materialize_all

    land(generated("jsonl"), persona_home / "landing")
    (persona_home / "landing" / "edge.jsonl").write_text("\n".join(_edge_lines()) + "\n")
    materialize_all(persona_home)  # asserts the run and every check passed
    with duckdb.connect(str(persona_home / "serving" / "persona.duckdb"), read_only=True) as con:
        revenue = con.execute("SELECT max(total_revenue) FROM user_profiles").fetchall()[0][0]
    assert np.isfinite(revenue) and revenue > 1e15


# --- every line accounted, exactly ---------------------------------------------------------------


def test_an_invalid_byte_in_one_csv_row_quarantines_that_row_only(tmp_path):
    body = b"messageId,type,event,anonymousId,timestamp\n" + b"".join(
        f"c{i},track,x,a{i},2026-09-01T10:00:00Z\n".encode() for i in range(5)
    )
    body = body.replace(b"a2,", b"a\xff2,")
    con, report = _run(tmp_path, {"bad.csv": body})
    assert _statuses(report) == {"bad.csv": "ingested"}
    assert [r[1:3] for r in _quarantine(con)] == [(4, "invalid_utf8")]
    assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == 4
    _assert_accounted(con)


def test_csv_rows_keep_their_line_numbers_across_blocks(tmp_path):
    # Arrow reports a row of the wrong width while parsing ahead of the rows it returns; numbering
    # them as they came let the line numbers drift and dropped a malformed row now and then.
    rows = [
        f"c{i},track,x,a{i},2026-09-01T10:00:00Z" if i % 7 else f"c{i},track" for i in range(2, 400)
    ]  # line i holds c{i}
    body = ("messageId,type,event,anonymousId,timestamp\n" + "\n".join(rows) + "\n").encode()
    con, report = _run(tmp_path, {"rows.csv": body}, IngestOptions(chunk_bytes=512))
    assert report.total("lines_read") == 398
    kept = con.execute("SELECT source_line, message_id FROM raw_events").fetchall()
    assert all(message_id == f"c{line}" for line, message_id in kept) and len(kept) == 398 - 57
    bad = [line for _, line, reason, _ in _quarantine(con) if reason == "malformed_row"]
    assert bad == [i for i in range(2, 400) if i % 7 == 0]
    _assert_accounted(con)


def test_a_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path):
    body = "".join(_line(messageId=f"g{i}", anonymousId=f"anon-{i * 7919}") + "\n" for i in range(2000)).encode()
    packed = gzip.compress(body)
    con, report = _run(tmp_path, {"cut.jsonl.gz": packed[: len(packed) // 2]})
    [file] = report.files
    assert file.status == "ingested" and 500 < file.events_kept < 2000
    assert file.lines_read == file.events_kept + file.lines_quarantined
    reasons = [(line, reason) for _, line, reason, _ in _quarantine(con)]
    assert reasons in ([(None, "unreadable_file")], [(file.lines_read, "malformed_json"), (None, "unreadable_file")])
    detail = con.execute("SELECT detail FROM quarantined_events WHERE reason = 'unreadable_file'").fetchall()[0][0]
    assert f"after line {file.lines_read}" in detail
    _assert_accounted(con)


def test_a_parquet_file_damaged_part_way_keeps_its_readable_rows_and_says_which_are_not(tmp_path):
    n = 300
    table = pa.table(
        {
            "messageId": [f"p{i}" for i in range(n)],
            "type": ["track"] * n,
            "event": ["x"] * n,
            "anonymousId": [f"a{i}" for i in range(n)],
            "timestamp": ["2026-09-01T10:00:00Z"] * n,
        }
    )
    body = bytearray(_parquet(table, row_group_size=100, compression="snappy"))
    second = pq.ParquetFile(io.BytesIO(bytes(body))).metadata.row_group(1).column(0)
    start = second.data_page_offset
    body[start + 10 : start + 60] = b"\xff" * 50  # the second row group's first column page
    con, report = _run(tmp_path, {"damaged.parquet": bytes(body), "broken.parquet": b"PAR1 not parquet at all"})
    by_name = {f.file_name: f for f in report.files}
    assert by_name["damaged.parquet"].status == "ingested" and by_name["damaged.parquet"].events_kept == 100
    assert by_name["broken.parquet"].status == "unreadable"
    details = dict(con.execute("SELECT source_file, detail FROM quarantined_events").fetchall())
    assert details["damaged.parquet"].startswith("rows 101 to 300 of 300 unreadable")
    assert details["broken.parquet"].startswith("unreadable (23 bytes)")
    assert con.execute("SELECT size_bytes FROM ingest_files WHERE file_name = 'broken.parquet'").fetchall() == [(23,)]
    _assert_accounted(con)


def test_cr_line_endings_and_a_byte_order_mark_are_read_as_line_ends_and_no_content(tmp_path):
    five = [_line(messageId=f"r{i}") for i in range(5)]
    con, report = _run(
        tmp_path,
        {
            "mac.jsonl": "\r".join(five).encode(),
            "mixed.jsonl": ("\r\n".join(five[:2]) + "\r" + five[2] + "\n").encode(),
            "bom.jsonl": b"\xef\xbb\xbf" + (_line(messageId="b1") + "\n").encode(),
        },
    )
    assert {f.file_name: (f.lines_read, f.lines_quarantined) for f in report.files} == {
        "mac.jsonl": (5, 0),
        "mixed.jsonl": (3, 0),
        "bom.jsonl": (1, 0),
    }
    assert {r[0] for r in con.execute("SELECT message_id FROM raw_events").fetchall()} == {"b1"} | {
        f"r{i}" for i in range(5)
    }
    _assert_accounted(con)


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


def test_a_half_written_last_line_completed_later_is_kept_and_no_longer_quarantined(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    full = "".join(_line(messageId=f"h{i}") + "\n" for i in range(3)) + "{broken\n" + _line(messageId="last") + "\n"
    path = landing / "growing.jsonl"
    path.write_text(full[:-20])  # the writer is half-way through the last line
    con = duckdb.connect()
    first = ingest(con, landing, KEY, now=NOW)
    assert first.total("lines_quarantined") == 2  # the broken line, and the half-written one
    path.write_text(full)
    second = ingest(con, landing, KEY, now=NOW)
    assert [(f.lines_read, f.events_kept, f.lines_quarantined, f.duplicates) for f in second.files] == [(5, 1, 1, 3)]
    assert [(line, reason) for _, line, reason, _ in _quarantine(con)] == [(4, "malformed_json")]
    ledger = con.execute(
        "SELECT lines_read, events_kept, lines_quarantined, duplicates FROM ingest_files ORDER BY batch_id"
    )
    assert ledger.fetchall() == [(3, 3, 0, 0), (5, 1, 1, 3)]
    _assert_accounted(con)


def test_a_line_too_long_is_streamed_not_held(tmp_path):
    # One 150 MB line in a 150 KB gzip: reading it must not hold it (the old reader took 2 GB for 400 MB).
    landing = tmp_path / "landing"
    landing.mkdir()
    with gzip.open(landing / "bomb.jsonl.gz", "wb", compresslevel=1) as fh:
        fh.write(b'{"type": "track", "event": "' + b"x" * (150 << 20) + b'"}\n')
        fh.write((_line(messageId="after") + "\n").encode())
    script = f"""
import resource, duckdb
from pathlib import Path
from persona_assets.core.ingest import IngestOptions, ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
con = duckdb.connect()
report = ingest(con, Path({str(landing)!r}), b"k", IngestOptions(chunk_bytes=4 << 20))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
reason, size = con.execute("SELECT reason, strlen(raw_text) FROM quarantined_events").fetchall()[0]
print(grew // 1024, report.total("events_kept"), reason, size)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grew_mb, kept, reason, size = int(out[0]), int(out[1]), out[2], int(out[3])
    assert (kept, reason) == (1, "line_too_long") and size <= RAW_TEXT_LIMIT
    assert grew_mb < 120, f"reading one long line took {grew_mb} MB more"


def test_a_directory_or_a_fifo_named_like_an_event_file_is_refused_and_never_blocks(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "folder.jsonl").mkdir()
    os.mkfifo(landing / "pipe.jsonl")
    (landing / "nowhere.csv").symlink_to(tmp_path / "missing.csv")
    (landing / "good.jsonl").write_text(_line(messageId="g1") + "\n")
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(report=ingest(duckdb.connect(), landing, KEY, now=NOW)))
    worker.start()
    worker.join(timeout=60)
    assert "report" in done, "ingest blocked on the FIFO"
    report = done["report"]
    assert [f.file_name for f in report.files] == ["good.jsonl"]
    assert report.refused == ["folder.jsonl", "nowhere.csv", "pipe.jsonl"]
    assert report.refusals == {
        "folder.jsonl": "a directory",
        "nowhere.csv": "a link that leads nowhere",
        "pipe.jsonl": "not a regular file (a FIFO, socket or device)",
    }


# --- the same messageId with other content --------------------------------------------------------


def test_a_redelivery_with_other_content_is_quarantined_naming_both_copies(tmp_path):
    first = [_line(messageId="m1", properties={"revenue": 10}), _line(messageId="m2"), _line(messageId="m3")]
    later = [
        _line(messageId="m1", properties={"revenue": 99}),  # other content: a conflict
        json.dumps(
            {**json.loads(_line(messageId="m2")), "context": {"ip": "1.2.3.4"}}
        ),  # nothing Persona keeps differs
        _line(messageId="m3", timestamp="2026-09-01T12:00:00+02:00"),  # the same time, written otherwise
        _line(messageId="m3", anonymousId="someone-else"),  # a second conflict, within this file too
    ]
    con, report = _run(
        tmp_path,
        {"a.jsonl": ("\n".join(first) + "\n").encode(), "b.jsonl": ("\n".join(later) + "\n").encode()},
    )
    assert {f.file_name: (f.events_kept, f.lines_quarantined, f.duplicates) for f in report.files} == {
        "a.jsonl": (3, 0, 0),
        "b.jsonl": (0, 2, 2),
    }
    rows = con.execute(
        "SELECT source_file, source_line, reason, detail, raw_text FROM quarantined_events ORDER BY source_line"
    ).fetchall()
    assert [r[:4] for r in rows] == [
        (
            "b.jsonl",
            1,
            "conflicting_redelivery",
            "b.jsonl line 1 differs from the copy kept from a.jsonl line 1 in revenue",
        ),
        (
            "b.jsonl",
            4,
            "conflicting_redelivery",
            "b.jsonl line 4 differs from the copy kept from a.jsonl line 3 in anonymous_id",
        ),
    ]
    assert json.loads(rows[0][4])["properties"]["revenue"] == 99
    assert con.execute("SELECT revenue FROM raw_events WHERE message_id = 'm1'").fetchall() == [(10.0,)]
    _assert_accounted(con)
    # A later run compares with the stored copy, and a CSV copy's text is its row as JSON.
    csv = b"messageId,type,event,anonymousId,timestamp\nm2,track,Other Event,a1,2026-09-01T10:00:00Z\n"
    con, report = _run(tmp_path, {"c.csv": csv}, con=con)
    assert [(f.lines_quarantined, f.duplicates) for f in report.files] == [(1, 0)]
    detail, raw = con.execute("SELECT detail, raw_text FROM quarantined_events WHERE source_file = 'c.csv'").fetchall()[
        0
    ]
    assert detail == "c.csv line 2 differs from the copy kept from a.jsonl line 2 in event_name"
    assert json.loads(raw)["event"] == "Other Event"
    _assert_accounted(con)


def test_the_nothing_lost_check_holds_with_conflicts_partial_and_unreadable_files(tmp_path):
    from dagster_duckdb import DuckDBResource

    from persona_assets.assets.ingest import CHECKS

    body = "".join(_line(messageId=f"n{i}") + "\n" for i in range(300)).encode()
    packed = gzip.compress(body)
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        _run(
            tmp_path,
            {
                "a.jsonl": (_line(messageId="n1", properties={"price": 1}) + "\n").encode(),
                "cut.jsonl.gz": packed[: len(packed) * 2 // 3],
                "twice.csv": b"userId,userId\n1,2\n",
            },
            con=con,
        )
        assert {r[0] for r in _quarantine(con)} == {"cut.jsonl.gz", "twice.csv"}
        _assert_accounted(con)
    for check in CHECKS:
        if {key.name for key in check.check_keys} & {
            "nothing_lost",
            "ingest_files_contract",
            "quarantined_events_contract",
        }:
            assert check(warehouse=DuckDBResource(database=str(path))).passed, check.check_keys


def test_a_parquet_string_column_that_is_not_utf8_quarantines_its_rows_only(tmp_path):
    # A damaged file's "string" column can hold bytes that are not UTF-8; handed to DuckDB as
    # text they raised an internal error that stopped the whole run (found by the fuzz test).
    ids = pa.array([b"ok-1", b"bad-\xd2", b"ok-2"], pa.binary()).view(pa.string())
    table = pa.table(
        {
            "messageId": ids,
            "type": ["track"] * 3,
            "event": ["Page Viewed"] * 3,
            "anonymousId": ["a1", "a2", "a3"],
            "timestamp": ["2025-01-01T00:00:00Z"] * 3,
        }
    )
    con, report = _run(tmp_path, {"damaged.parquet": _parquet(table)})
    kept = sorted(r[0] for r in con.execute("SELECT message_id FROM raw_events").fetchall())
    assert kept == ["ok-1", "ok-2"]
    assert con.execute("SELECT source_line, reason FROM quarantined_events").fetchall() == [(2, "invalid_utf8")]
    _assert_accounted(con)
