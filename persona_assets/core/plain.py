"""Plain events: the common well-formed event typed in Python exactly as the contract query types it.

The stream validates a few dozen events per batch, and DuckDB spends about 8 ms binding and
planning the contract query whatever the batch's size. Most events are plain: JSON that
Python and DuckDB read alike, fields of the expected JSON types, an ISO timestamp with an
offset. `plain_rows` types those and gives every other line None, for the query to decide,
so the contract stays one: this only ever accepts what the query accepts, with the values
it would give (`test_plain.py` compares the two on generated and fuzzed lines).

The server writes each line itself, as `json.dumps` of an event it holds: `plain_event_rows`
checks such lines from the events, not by decoding the lines again (decoding was 40% of the
check). Decoding a line json.dumps wrote gives back the same event, except where this
decoder refuses what json.dumps writes (NaN, Infinity, integers past int64): the server
sends a request whose body held any of those to `plain_rows`.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

from persona_assets.core.events import (
    CONSENT_DECLINED,
    CONSENT_GRANTED,
    EVENT_TYPES,
    FIELDS,
    MAX_AMOUNT,
    TRIMMED_COLUMNS,
)

INT64 = 2**63
EXACT_IN_DOUBLE = 2**53
# A high or low surrogate escape: Python accepts a lone one, DuckDB's parser may not.
SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
MAX_NESTING = 64  # brackets in a line; deeper documents go to the query
MAX_OFFSET_MINUTES = 18 * 60  # the largest UTC offset the query takes (`ingest.VALID_OFFSET`)


class NotPlain(Exception):
    """The line needs the contract query to decide."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # DuckDB reads the first of two equal keys, Python the last.
    found = dict(pairs)
    if len(found) != len(pairs):
        raise NotPlain
    return found


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NotPlain
    return value


def _int64(text: str) -> int:
    value = int(text)
    if not -INT64 <= value < INT64:
        raise NotPlain
    return value


def _no_constant(_: str):  # NaN, Infinity: not JSON to DuckDB
    raise NotPlain


DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys, parse_float=_finite, parse_int=_int64, parse_constant=_no_constant
)
TRIMMED = frozenset(TRIMMED_COLUMNS)
CONSENT = {**{v: "granted" for v in CONSENT_GRANTED}, **{v: "declined" for v in CONSENT_DECLINED}}

# Every object a field's path passes through, parents first, each as (its parent's position,
# its key); and each field's paths as (container position, key). An event's containers are
# then looked up once, not once per field (this check runs per streamed event).
_SPLIT = {f.column: [tuple(p.removeprefix("$.").split(".")) for p in f.paths] for f in FIELDS}
_BOXES = sorted({path[:i] for paths in _SPLIT.values() for path in paths for i in range(len(path))}, key=len)
BOX_STEPS = [(_BOXES.index(box[:-1]), box[-1]) for box in _BOXES[1:]]
FIELD_STEPS = [(f.column, f.kind, [(_BOXES.index(path[:-1]), path[-1]) for path in _SPLIT[f.column]]) for f in FIELDS]
OBJECTS = frozenset(_BOXES.index(box) for box in (("properties",), ("traits",), ("context",)))


def _text(value) -> str:
    """A present value as DuckDB's json_extract_string gives it, for the JSON types it prints alike."""
    if type(value) is str:
        if "\x00" in value:
            raise NotPlain
        return value
    if type(value) is int:
        return str(value)
    raise NotPlain  # floats, booleans and containers print differently


def _trimmed(value: str) -> str | None:
    if value == "":
        return None
    if value != value.strip():  # which characters trim() removes is the query's business
        raise NotPlain
    return value


def _number(value) -> float:
    """An amount as the query takes it: from 0 to MAX_AMOUNT (the query quarantines the rest)."""
    if type(value) in (int, float) and 0 <= value <= MAX_AMOUNT:
        return float(value)
    raise NotPlain


def plain_row(line: str, params: dict) -> dict:
    """The typed row of a plain, valid line (`params`: the contract's limits, `ingest.contract_params`);
    NotPlain for anything else."""
    return _row(_boxes(_decode(line, params)), line, params)


def _row(boxes: list[dict | None], line: str, params: dict) -> dict:
    """The typed row of an event from its containers (`_boxes`); NotPlain when it is not plain or not valid."""
    row: dict = {"reason": None, "detail": None}
    for column, kind, steps in FIELD_STEPS:
        raw = None
        for position, key in steps:  # the first non-null of the paths, as coalesce() takes it
            box = boxes[position]
            if box is not None and (raw := box.get(key)) is not None:
                break
        # Most fields of most events are missing.
        row[column] = None if raw is None else _field(column, kind, raw, params["max_id_chars"])
    _check_event(row, params)
    if row["message_id"] is None:
        row["message_id"] = "derived-" + hashlib.sha256(line.encode("utf-8")).hexdigest()
    return row


def _check_text(line: str, params: dict) -> None:
    """What the line's text alone rules out: too long, escapes DuckDB reads otherwise, too deep."""
    if len(line.encode("utf-8")) > params["max_line_bytes"] or SURROGATE.search(line) or "\\u0000" in line:
        raise NotPlain
    if line.count("{") + line.count("[") > MAX_NESTING:
        raise NotPlain


def _decode(line: str, params: dict) -> dict:
    """The line as a JSON object, if it is a plain one the query would take."""
    _check_text(line, params)
    try:
        event = DECODER.decode(line)
    except (ValueError, RecursionError) as exc:
        raise NotPlain from exc
    if not isinstance(event, dict):
        raise NotPlain
    return event


def _boxes(event: dict) -> list[dict | None]:
    """The event's nested objects (context, traits, properties, ...) in BOX_STEPS order."""
    boxes: list[dict | None] = [event]
    for position, (parent, key) in enumerate(BOX_STEPS, start=1):
        box = boxes[parent].get(key) if boxes[parent] is not None else None
        if type(box) is not dict:
            if box is not None and position in OBJECTS:
                raise NotPlain  # the query calls that a bad_type
            box = None  # a path through a scalar finds nothing
        boxes.append(box)
    return boxes


def _field(column: str, kind: str, raw, max_id_chars: int):
    """One field's value, typed as the query types it."""
    if kind == "json":
        if type(raw) is not list:
            raise NotPlain
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    if kind == "number":
        return _number(raw)
    if kind == "integer":
        if type(raw) is not int or not 0 <= raw < EXACT_IN_DOUBLE:
            raise NotPlain
        return raw
    text = _text(raw)
    if column in TRIMMED:
        text = _trimmed(text)
    if kind == "id" and text is not None and len(text.encode("utf-8")) > max_id_chars:
        raise NotPlain
    return text


def _check_event(row: dict, params: dict) -> None:
    """The event-level rules (a known type, an id, a track's name, an alias's previous id, a
    timestamp in range, a plain consent), normalising type, timestamp and consent in place."""
    event_type = row["event_type"]
    if event_type is None or not event_type.isascii() or event_type.lower() not in EVENT_TYPES:
        raise NotPlain
    row["event_type"] = event_type.lower()
    if row["user_id"] is None and row["anonymous_id"] is None:
        raise NotPlain
    if (row["event_type"] == "track" and row["event_name"] is None) or (
        row["event_type"] == "alias" and row["previous_id"] is None
    ):
        raise NotPlain
    row["event_at"] = _timestamp(row["event_at"], params["min_event_at"], params["max_event_at"])
    consent = row["consent"]
    if consent is not None and consent != consent.strip():
        raise NotPlain
    row["consent"] = CONSENT.get(consent.lower()) if consent is not None and consent.isascii() else None


def _timestamp(text: str | None, min_at: datetime, max_at: datetime) -> datetime:
    """An ISO timestamp with its offset, as a naive UTC time; anything looser is the query's."""
    if text is None or not TIMESTAMP.fullmatch(text):
        raise NotPlain
    if text[-1] != "Z" and (int(text[-2:]) >= 60 or int(text[-5:-3]) * 60 + int(text[-2:]) > MAX_OFFSET_MINUTES):
        raise NotPlain  # Python would read +05:99; the query refuses it, and any offset over 18 hours
    try:
        at = datetime.fromisoformat(text).astimezone(UTC).replace(tzinfo=None)
    except ValueError as exc:
        raise NotPlain from exc
    if not min_at <= at <= max_at:
        raise NotPlain
    return at


def plain_rows(lines: list[str], params: dict, bad_utf8: list[bool] | None = None) -> list[dict | None]:
    """Per line its typed row when it is plain and valid, else None."""
    rows: list[dict | None] = []
    for i, line in enumerate(lines):
        try:
            if bad_utf8 and bad_utf8[i]:
                raise NotPlain
            rows.append({"line": i + 1, **plain_row(line, params)})
        except NotPlain:
            rows.append(None)
    return rows


def plain_event_rows(events: list[object], lines: list[str], params: dict) -> list[dict | None]:
    """`plain_rows(lines)` for lines that are `json.dumps` of `events`, checked from the events.
    The events must hold no float that is not finite and no integer past int64 (json.dumps writes
    them; the decoder refuses them), so that each line decodes back to its event."""
    rows: list[dict | None] = []
    for i, (event, line) in enumerate(zip(events, lines)):
        try:
            _check_text(line, params)
            if not isinstance(event, dict):
                raise NotPlain
            rows.append({"line": i + 1, **_row(_boxes(event), line, params)})
        except NotPlain:
            rows.append(None)
    return rows
