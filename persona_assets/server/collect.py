"""Segment's tracking API: a request's body to landing lines, each checked with the landing contract.

A request is read with its limits enforced while it streams in (Content-Length first, then a
running count, then the inflated size of a gzip body), parsed, and each event becomes one
JSON line as a landing file holds it: `receivedAt` stamped, `timestamp` corrected for the
client's clock skew as Segment does (`receivedAt - (sentAt - originalTimestamp)`, the client's
value kept as `originalTimestamp`), a messageId derived from the content when the client sent
none. The line is then checked by the contract itself (`core.plain` for the plain ones,
`ingest.query_lines` for the rest), only to count and to answer: every line, valid or not, is
kept (the app puts the valid ones in the spool or on the Redis stream, the invalid ones in the
spool), and ingest checks it again and quarantines the invalid ones with their reason and raw
text, as it does for any landing line.

A client retrying an event it got no answer for sends the same messageId with new `sentAt`:
the stamps given the first copy are reused (for the newest `RecentIds.capacity` ids), so the
copies are identical and ingest counts the retry as a duplicate, not a conflicting re-delivery.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import duckdb

from persona_assets.core.ingest import contract_params, query_lines
from persona_assets.core.plain import TIMESTAMP, plain_event_rows, plain_rows

TYPES = ("track", "identify", "page", "screen", "group", "alias")
# analytics.js (analytics-next) posts each call to the first letter of its type, and batches to /b.
SHORT = {t[0]: t for t in TYPES} | {"b": "batch"}
# Set by the server on every event, so never part of what identifies a client's copy.
# An event's limit is on what the client sent: its stored line may be longer by the stamps
# (receivedAt, a corrected timestamp beside the original), about 100 bytes.
STAMP_BYTES = 128


class Refused(Exception):
    """A request answered with an error status and a message for the client (no traceback, no key)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: object) -> datetime | None:
    return _parse_time(value) if isinstance(value, str) else None


@functools.lru_cache(maxsize=4096)  # a batch's events often share a sentAt, a retried batch its timestamps
def _parse_time(value: str) -> datetime | None:
    """A timestamp the contract reads as plain ISO-8601 with a zone, else None (left to the contract)."""
    if not TIMESTAMP.fullmatch(value):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def key_matches(given: str | None, expected: str) -> bool:
    """A constant-time comparison, so the time taken says nothing of how much of a key was right."""
    return bool(expected) and given is not None and hmac.compare_digest(given.encode(), expected.encode())


def basic_username(authorization: str | None) -> str | None:
    """The username of an HTTP Basic `Authorization` header (Segment's write key), or None."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0]


def inflate(body: bytes, limit: int) -> bytes:
    """A gzip body's content, refused past `limit` bytes without inflating more than that."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise Refused(400, "the body is not valid gzip") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise Refused(413, f"the body is larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise Refused(400, "the gzip body is cut short")
    return data


INT64 = 2**63


@dataclass
class Body:
    """A request's events, its batch-level fields (sentAt, context, writeKey), and whether every
    number in it is one the contract's decoder reads back as json.dumps writes it (no NaN or
    Infinity, no float too large to be finite, no integer past int64)."""

    items: list[object]
    batch: dict
    exact: bool


def parse_body(body: bytes, kind: str, max_events: int) -> Body:
    if not body.strip():
        raise Refused(400, "the request has no body")
    exact = [True]

    def integer(text: str) -> int:
        value = int(text)
        if not -INT64 <= value < INT64:
            exact[0] = False
        return value

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            exact[0] = False
        return value

    def constant(text: str) -> float:
        exact[0] = False
        return float(text)

    try:
        payload = json.loads(body, parse_int=integer, parse_float=number, parse_constant=constant)
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise Refused(400, "the body must be a JSON object")
    if kind != "batch":
        return Body([payload], {}, exact[0])
    items = payload.get("batch")
    if not isinstance(items, list):
        raise Refused(400, "a batch needs a 'batch' list of events")
    if len(items) > max_events:
        raise Refused(413, f"a batch holds at most {max_events} events; this one has {len(items)}")
    return Body(items, {k: payload[k] for k in ("sentAt", "context", "writeKey") if k in payload}, exact[0])


class Stamps(NamedTuple):
    """What the server gave one event: `received` first, so a list of them sorts oldest first."""

    received: str
    message_id: object
    original: object
    timestamp: object


def stamps(raws: Iterable[bytes]) -> Iterator[Stamps]:
    """The stamps of the server-stamped events among JSON lines (others are skipped)."""
    for raw in raws:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("receivedAt"), str):
            original = event.get("originalTimestamp")
            yield Stamps(event["receivedAt"], event.get("messageId"), original, event.get("timestamp"))


class RecentIds:
    """The stamps given to the newest messageIds, so a retried copy gets the same ones.

    Keyed by messageId and the client's own timestamp: a retry carries both unchanged (only
    sentAt moves), while a copy with another timestamp is another event under the same id and
    gets its own stamps, so ingest sees it differ and quarantines it as a conflicting re-delivery."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._stamps: OrderedDict[tuple, tuple[str, object]] = OrderedDict()

    @staticmethod
    def _key(message_id: str, original: object) -> tuple:
        # The client's timestamp as sent: a string as is (the usual case), anything else as its JSON.
        return (message_id, original) if type(original) is str else (message_id, None, json.dumps(original))

    def get(self, message_id: object, original: object) -> tuple[str, object] | None:
        if not isinstance(message_id, str):
            return None
        return self._stamps.get(self._key(message_id, original))

    def remember(self, message_id: object, original: object, received: str, timestamp: object) -> None:
        if not isinstance(message_id, str):
            return
        key = self._key(message_id, original)
        self._stamps[key] = (received, timestamp)
        self._stamps.move_to_end(key)
        if len(self._stamps) > self.capacity:
            self._stamps.popitem(last=False)

    def load(self, path: Path) -> int:
        """Learn the stamps of the events in one of the server's landing files."""
        with open(path, "rb") as fh:
            return self.learn(stamps(fh))

    def learn(self, stamped: Iterable[Stamps]) -> int:
        """Remember stamps in the order given (the last is the newest kept)."""
        learned = 0
        for one in stamped:
            self.remember(one.message_id, one.original, one.received, one.timestamp)
            learned += 1
        return learned

    def __len__(self) -> int:
        return len(self._stamps)


def _derived_id(event: dict) -> str:
    """A messageId for an event sent without one, from its content (so retries of it hash alike)."""
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"))
    return "http-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def corrected(original: object, sent_at: object, received: datetime) -> object:
    """Segment's skew correction: receivedAt - (sentAt - originalTimestamp). Without a client
    timestamp the event happened when it was received; a timestamp the contract does not read
    as plain ISO is left as sent, for the contract to judge."""
    if original is None:
        return iso(received)
    happened = parse_time(original)
    if happened is None:
        return original
    sent = parse_time(sent_at)
    return iso(happened + (received - sent)) if sent is not None else iso(happened)


@dataclass
class Prepared:
    """One request's events as landing lines, and what the contract says of them."""

    lines: list[str] = field(default_factory=list)
    events: list[object] = field(default_factory=list)  # what each line is the JSON text of
    reasons: list[str | None] = field(default_factory=list)
    exact: bool = True  # each line decodes back to its event (`Body.exact`)

    @property
    def accepted(self) -> int:
        return sum(r is None for r in self.reasons)

    @property
    def quarantined(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.reasons:
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
        return counts

    def data(self) -> bytes:
        return lines_data(self.lines)

    def valid_lines(self) -> list[str]:
        return [line for line, reason in zip(self.lines, self.reasons) if reason is None]

    def refused_lines(self) -> list[str]:
        return [line for line, reason in zip(self.lines, self.reasons) if reason is not None]


def lines_data(lines: list[str]) -> bytes:
    """Lines as the bytes a landing file holds them in."""
    if not lines:
        return b""
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Received:
    """When a request arrived, as a moment and as the text stamped on its events."""

    at: datetime
    text: str

    @classmethod
    def now(cls) -> Received:
        at = datetime.now(UTC)
        return cls(at, iso(at))


def prepare_event(
    item: object, kind: str, batch: dict, received: Received, recent: RecentIds, max_bytes: int
) -> tuple[object, str]:
    """One event as stamped, and its landing line."""
    if not isinstance(item, dict):  # written as sent: the contract quarantines it (not_an_object)
        return item, _line(item)
    event = {k: v for k, v in item.items() if k not in ("writeKey", "receivedAt")}
    if kind != "batch":
        event["type"] = kind
    if isinstance(batch.get("context"), dict):
        own = event.get("context")
        event["context"] = {**batch["context"], **own} if isinstance(own, dict) else own or batch["context"]
    sent_at = event.pop("sentAt", batch.get("sentAt"))
    original = event.pop("timestamp", None)
    if original is None:
        original = event.pop("originalTimestamp", None)
    if original is not None:
        event["originalTimestamp"] = original
    if event.get("messageId") is None:
        event["messageId"] = _derived_id(event)
    stamps = recent.get(event["messageId"], original)
    if stamps is None:
        stamps = (received.text, corrected(original, sent_at, received.at))
        recent.remember(event["messageId"], original, *stamps)
    event["receivedAt"], event["timestamp"] = stamps
    if sent_at is not None:
        event["sentAt"] = sent_at
    line = _line(event)
    if len(line) > max_bytes + STAMP_BYTES and len(line.encode("utf-8")) > max_bytes + STAMP_BYTES:
        raise Refused(413, f"an event is larger than {max_bytes} bytes")
    return event, line


# One encoder for every line (json.dumps with options builds one a call).
LINE_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _line(value: object) -> str:
    """JSON text for one landing line: as is when it is valid UTF-8, else with every character
    escaped (`\\ud800`), as a landing file holding the same text would have it."""
    text = LINE_ENCODER.encode(value)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))


class ContractCheck:
    """The landing contract over a request's lines: plain ones in Python, the rest by the query
    (its own DuckDB connection, one query at a time, called from a worker thread)."""

    def __init__(self) -> None:
        self._con = duckdb.connect(config={"threads": 1})
        self._con.execute("PRAGMA disable_optimizer")
        self._lock = threading.Lock()
        query_lines(self._con, ['{"type":"track","event":"warm-up","anonymousId":"x"}'], contract_params(), [False])

    @staticmethod
    def plain(prepared: Prepared) -> list[int]:
        """Fill in the reasons of plain lines; the positions left for `query`."""
        if prepared.exact:  # checked from the events, not decoded again
            rows = plain_event_rows(prepared.events, prepared.lines, contract_params())
        else:
            rows = plain_rows(prepared.lines, contract_params())
        prepared.reasons = [None] * len(rows)
        return [i for i, row in enumerate(rows) if row is None]

    def query(self, prepared: Prepared, positions: list[int]) -> None:
        lines = [prepared.lines[i] for i in positions]
        with self._lock:
            rows = query_lines(self._con, lines, contract_params(), [False] * len(lines))
        for i, row in zip(positions, rows):
            prepared.reasons[i] = row["reason"]

    def close(self) -> None:
        self._con.close()


def prepare(body: Body, kind: str, recent: RecentIds, max_bytes: int) -> Prepared:
    received = Received.now()
    prepared = Prepared(exact=body.exact)
    for item in body.items:
        event, line = prepare_event(item, kind, body.batch, received, recent, max_bytes)
        prepared.events.append(event)
        prepared.lines.append(line)
    return prepared
