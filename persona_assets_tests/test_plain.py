"""The plain-event check types only what the contract query accepts, exactly as the query types it."""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_assets.core.ingest import contract_params, landing_files, query_lines
from persona_assets.core.plain import plain_rows

NOW = datetime(2026, 11, 1)
FUZZ_EXAMPLES = int(os.environ.get("PERSONA_FUZZ_EXAMPLES", "150"))  # more for a deeper search
PARAMS = contract_params(now=NOW)


def _compare(lines: list[str], bad_utf8: list[bool] | None = None) -> tuple[int, int]:
    """Asserts every plain row equals the query's row; returns (plain lines, valid lines)."""
    flags = bad_utf8 or [False] * len(lines)
    plain = plain_rows(lines, PARAMS, flags)
    queried = query_lines(duckdb.connect(), lines, PARAMS, flags)
    for line, mine, theirs in zip(lines, plain, queried):
        if mine is None:
            continue
        assert theirs["reason"] is None, (line, theirs["reason"], theirs["detail"])
        mine, theirs = dict(mine), dict(theirs)
        for row in (mine, theirs):  # the same JSON, whichever way it is spaced
            row["products"] = None if row["products"] is None else json.loads(row["products"])
        assert mine == theirs, (line, {k: (mine[k], theirs[k]) for k in theirs if mine.get(k) != theirs[k]})
    return sum(r is not None for r in plain), sum(r["reason"] is None for r in queried)


def test_generated_events_are_plain_and_typed_as_the_query_types_them(generated):
    lines = [line for path in landing_files(generated("jsonl")) for line in path.read_text().splitlines()]
    plain, valid = _compare(lines)
    assert valid > 10_000
    assert plain >= 0.99 * valid  # the stream's fast path covers nearly every good event
    assert plain <= valid


BASE = [
    {
        "messageId": "m-1",
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": "a1",
        "timestamp": "2026-09-01T10:00:00.123Z",
        "context": {
            "device": {"id": "d1", "type": "mobile"},
            "os": {"name": "iOS"},
            "locale": "de-DE",
            "timezone": "Europe/Berlin",
            "consent": {"personalization": "yes"},
            "traits": {"email": "x@y.de"},
        },
        "properties": {"order_id": "o1", "revenue": 59.9, "products": [{"category": "shoes", "price": 19.95}]},
    },
    {
        "type": "identify",
        "anonymousId": "a2",
        "timestamp": "2026-09-01T10:00:00+02:00",
        "traits": {
            "email": " Jane@Example.COM ",
            "phone": "+49 170 1234567",
            "age": 34,
            "first_name": "Jane",
            "birthday": "1990-01-02",
            "postal_code": "10115",
            "city": "Berlin",
            "country": "DE",
        },
    },
    {
        "type": "page",
        "name": "Home",
        "anonymousId": "a3",
        "timestamp": "2026-09-01T10:00:00Z",
        "context": {"page": {"url": "https://shop.example/"}},
    },
    {"type": "alias", "previousId": "a4", "userId": "u4", "timestamp": "2026-09-01T10:00:00Z"},
    {
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": "a5",
        "timestamp": "2026-09-01T10:00:00Z",
        "properties": {"category": "books", "product_id": "p9", "price": 12, "quantity": 1, "query": "q"},
    },
]

PATHS = [
    ("messageId",),
    ("type",),
    ("event",),
    ("name",),
    ("userId",),
    ("anonymousId",),
    ("previousId",),
    ("timestamp",),
    ("traits",),
    ("traits", "email"),
    ("traits", "age"),
    ("context",),
    ("context", "traits"),
    ("context", "traits", "email"),
    ("context", "device"),
    ("context", "device", "id"),
    ("context", "locale"),
    ("context", "consent", "personalization"),
    ("properties",),
    ("properties", "price"),
    ("properties", "quantity"),
    ("properties", "revenue"),
    ("properties", "category"),
    ("properties", "products"),
    ("properties", "product_id"),
    ("properties", "order_id"),
]

TRICKY = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            " ",
            " x",
            "x ",
            "\tx",
            "x\u00a0",
            "\u3000x",
            "ÄÖü",
            "x\u2028y",
            "😀",
            "a\u0000b",
            "TRACK",
            "Track",
            " track",
            "ıdentify",
            "İDENTIFY",
            "identify",
            "alias",
            "YES",
            " yes",
            "Granted",
            "opt-in",
            "ja",
            "0",
            "1",
            "19.99",
            "1_000",
            " 5",
            "1e3",
            "x" * 257,
            "é" * 129,
            "é" * 128,
            "2026-09-01T10:00:00Z",
            "2026-09-01 10:00:00Z",
            "2026-09-01T10:00:00.1234567Z",
            "2026-09-01T10:00:00+05:30",
            "2026-09-01T10:00:00-00:00",
            "2026-02-30T10:00:00Z",
            "2026-09-01T24:00:00Z",
            "2026-09-01T10:00:00",
            "2026-09-01",
            "1999-12-31T23:59:59Z",
            "2026-11-02T00:30:00+00:00",
            "2026-11-01T23:59:59Z",
            "2099-01-01T00:00:00Z",
            "2026-09-01T10:00:00.5+14:00",
            "2026-09-01T10:00:60Z",
            "2026-9-1T10:00:00Z",
            "2026-09-01t10:00:00z",
            "2026-09-01T10:00:00+18:00",
            "2026-09-01T10:00:00-18:01",
            "2026-09-01T10:00:00+05:99",
            "2026-09-01T10:00:00-99:00",
            "2026-09-01T10:00:00+0530",
            0,
            1,
            -1,
            2,
            2**53,
            2**53 + 1,
            2**63 - 1,
            2**63,
            -(2**63),
            10**30,
            1.5,
            2.0,
            -0.0,
            1e20,
            1e308,
            5e-324,
            -5,
            -0.01,
            1e15,
            1e15 + 0.5,
            10**15 + 1,
            0.1,
            19.99,
            True,
            False,
            [],
            {},
            [1, "a", None],
            [{"category": "x"}],
            [{"category": 5, "p": 1.1e-7}],
            {"a": 1},
            {"id": "nested"},
            ["shoes"],
        ]
    ),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)

RAW = st.sampled_from(["none", "dup", "nan", "inf", "bom", "trailing_comma", "garbage", "cut", "big_int", "deep"])


def _put(event: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        if not isinstance(event.get(key), dict):
            event[key] = {}
        event = event[key]
    event[path[-1]] = value


def _raw(text: str, how: str) -> str:
    """Text-level changes json.dumps cannot make."""
    if how == "dup":
        return text[:-1] + ', "anonymousId": "other"}'
    if how == "nan":
        return text[:-1] + ', "properties2": NaN}'
    if how == "inf":
        return text[:-1] + ', "x": 1e400}'
    if how == "bom":
        return "\ufeff" + text
    if how == "trailing_comma":
        return text[:-1] + ",}"
    if how == "garbage":
        return text + " x"
    if how == "cut":
        return text[: len(text) // 2]
    if how == "big_int":
        return text[:-1] + ', "y": ' + "9" * 400 + "}"
    if how == "deep":
        return text[:-1] + ', "z": ' + "[" * 70 + "]" * 70 + "}"
    return text


@st.composite
def event_lines(draw) -> str:
    event = copy.deepcopy(draw(st.sampled_from(BASE)))
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), TRICKY), max_size=4)):
        _put(event, path, value)
    text = json.dumps(
        event,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")])),
    )
    return _raw(text, draw(RAW) if draw(st.integers(0, 3)) == 0 else "none")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(event_lines(), min_size=1, max_size=20))
def test_fuzzed_events_are_plain_only_when_the_query_agrees(lines):
    _compare(lines)


def test_only_ids_names_types_and_timestamps_are_trimmed_other_text_is_kept_as_sent():
    line = (
        '{"type":"track","event":"Product Viewed","anonymousId":"a","timestamp":"2026-09-01T10:00:00Z",'
        '"context":{"locale":"","device":{"type":" tablet "},"os":{"name":"\\u00a0iOS"}},'
        '"properties":{"category":" books ","query":""}}'
    )
    assert _compare([line]) == (1, 1)
    row = plain_rows([line], PARAMS)[0]
    assert (row["locale"], row["device_type"], row["category"], row["search_query"]) == ("", " tablet ", " books ", "")


def test_unusual_but_valid_lines_are_left_to_the_query():
    lines = [
        '{"type":"page","anonymousId":"a","timestamp":"2026-09-01T10:00:00Z","anonymousId":"b"}',  # two keys
        '{"type":"page","anonymousId":" a","timestamp":"2026-09-01T10:00:00Z"}',  # spaces a query trims
        '{"type":"page","anonymousId":"a","timestamp":"2026-09-01 10:00:00"}',  # no offset
        '{"type":"page","anonymousId":"a","timestamp":"2026-09-01T10:00:00Z","properties":{"price":"9.5"}}',
        '{"type":"PAGE","anonymousId":"a\\ud83d\\ude00","timestamp":"2026-09-01T10:00:00Z"}',  # escaped pair
    ]
    assert plain_rows(lines, PARAMS) == [None] * len(lines)
    queried = query_lines(duckdb.connect(), lines, PARAMS, [False] * len(lines))
    assert [r["reason"] for r in queried] == [None] * len(lines)
    assert plain_rows(lines[:1], PARAMS, bad_utf8=[True]) == [None]


# --- the server's check: from the events it wrote, not by decoding their lines again -----------------

NOT_ROUND_TRIP = st.sampled_from([float("nan"), float("inf"), float("-inf"), 2**63, -(2**63) - 1, 10**30])


@st.composite
def server_events(draw) -> object:
    if draw(st.integers(0, 19)) == 0:
        return draw(TRICKY)  # not an object at all
    event = copy.deepcopy(draw(st.sampled_from(BASE)))
    values = st.one_of(TRICKY, NOT_ROUND_TRIP) if draw(st.integers(0, 4)) == 0 else TRICKY
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), values), max_size=4)):
        _put(event, path, value)
    return event


def _server_lines(events: list[object]):
    """The events as the server receives them in a batch, stamps them and writes their lines."""
    from persona_assets.server.collect import RecentIds, parse_body, prepare

    body = json.dumps({"batch": events, "sentAt": "2026-12-01T10:00:01Z"}).encode()
    return prepare(parse_body(body, "batch", 2500), "batch", RecentIds(), 32 * 1024)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(server_events(), min_size=1, max_size=20))
def test_the_servers_check_from_its_events_equals_the_check_of_its_lines(events):
    from persona_assets.core.plain import plain_event_rows
    from persona_assets.server.collect import ContractCheck

    params = contract_params()  # the server stamps receivedAt now
    prepared = _server_lines(events)
    full = plain_rows(prepared.lines, params)
    if prepared.exact:  # checked from the events: the very rows the lines' check gives
        assert plain_event_rows(prepared.events, prepared.lines, params) == full
    # Exact or not, the server leaves to the query exactly the lines the full check leaves to it.
    assert ContractCheck.plain(prepared) == [i for i, row in enumerate(full) if row is None]
    assert prepared.reasons == [None] * len(full)


def test_a_body_with_numbers_that_do_not_round_trip_is_not_exact():
    from persona_assets.server.collect import parse_body

    event = '{"type":"track","event":"x","anonymousId":"a","properties":{"price":%s}}'
    assert parse_body((event % "19.99").encode(), "track", 1).exact
    assert parse_body((event % str(2**63 - 1)).encode(), "track", 1).exact
    for number in ("NaN", "Infinity", "-Infinity", "1e400", str(2**63), str(-(2**63) - 1)):
        assert not parse_body((event % number).encode(), "track", 1).exact, number
    # Exact or not, the server's answer for such an event is the contract's (the query's reason).
    prepared = _server_lines([json.loads(event % "NaN")])
    assert plain_rows(prepared.lines, contract_params()) == [None]
