"""Ingest reads a landing folder the same whatever the size of its steps.

The usual run reads each file in 64 MB chunks, hands DuckDB each chunk in slices its threads
scan in parallel, and publishes a whole group of files at once (one hash of the group's
messageIds against the stored ones). The reference here reads 2 KB at a time (a few lines a
chunk, many lines split across two reads; a CSV block must still hold the header), on one
DuckDB thread, and publishes every file as its own group. Both must give the same raw_events,
quarantined_events and ledger on files with and without malformed lines, in every format.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from persona_assets.core.events import FLAT_COLUMNS, flatten
from persona_assets.core.ingest import IngestOptions, ingest
from persona_assets.core.mappings import parse_mappings

KEY = b"paths-key"
NOW = datetime(2026, 11, 1)
MAPPINGS = parse_mappings(
    [
        {
            "files": "shop-*.jsonl",
            "columns": {"userId": "customer.id", "properties.revenue": "order.total"},
            "events": {"purchase": "Order Completed"},
            "defaults": {"type": "track"},
        }
    ]
)


def _event(n: int, **over) -> dict:
    ev = {
        "messageId": f"m{n}",
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": f"a{n % 7}",
        "userId": f"u{n % 5}",
        "timestamp": f"2026-09-01T10:{n % 60:02d}:00Z",
        "context": {
            "device": {"id": f"d{n % 3}", "type": "mobile"},
            "locale": "en-GB",
            "page": {"url": "https://x.example/p"},
        },
        "properties": {"price": 9.5 + n, "category": "books", "product_id": f"p{n % 11}"},
    }
    if n % 4 == 0:
        ev.update(type="identify", traits={"email": f"Person.{n % 5}@Gmail.com", "phone": "+44 20 7946 0958"})
        ev.pop("event")
    if n % 9 == 0:
        ev["properties"]["products"] = [{"product_id": "p1", "price": 2.5, "quantity": 2}]
    ev.update(over)
    return ev


def _clean(count: int, start: int) -> list[str]:
    return [json.dumps(_event(n)) for n in range(start, start + count)]


def _malformed(start: int) -> list[str]:
    """Good lines among every kind of bad one, copies of kept events (identical and not), id-less events."""
    lines = _clean(30, start)
    lines[3] = "{not json"
    lines[5] = "[1, 2]"
    lines[7] = ""
    lines[8] = "   "
    lines[9] = json.dumps(_event(start + 9, messageId={"nested": 1}))
    lines[11] = json.dumps(_event(start + 11, properties="not an object"))
    lines[12] = json.dumps(_event(start + 12, timestamp="yesterday"))
    lines[13] = json.dumps(_event(start + 13, type="trakc"))
    lines[14] = json.dumps(_event(start + 14, anonymousId=None, userId=None))
    lines[15] = json.dumps(_event(start + 15, properties={"price": "cheap"}))
    lines[16] = json.dumps(_event(start + 16, properties={"products": [{"price": float("nan")}]}))
    lines[17] = json.dumps(_event(start + 17, messageId="x" * 400))
    lines[18] = json.dumps(_event(start + 18, timestamp="2026-09-01T10:00:00+99:00"))
    lines[19] = json.dumps(_event(start + 19, messageId=None))
    lines[20] = lines[19]  # an identical id-less copy
    lines[21] = lines[0]  # an identical copy
    lines[22] = json.dumps(_event(start, event="Product Added"))  # the same messageId, other content
    lines[23] = json.dumps(_event(start + 23, messageId=" m-trim "))
    return lines


def _write_jsonl(path: Path, lines: list[str], tail: bytes = b"") -> None:
    path.write_bytes("\r\n".join(lines).encode() + b"\n" + tail)


def _flat_table(events: list[dict]) -> pa.Table:
    rows = [flatten(e) for e in events]
    for row in rows:
        if row["properties_products"] is not None:
            row["properties_products"] = json.dumps(row["properties_products"])
    return pa.table(
        {c: pa.array([None if r[c] is None else str(r[c]) for r in rows], pa.string()) for c in FLAT_COLUMNS}
    )


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    """Files of every format, with and without malformed lines, with copies across files."""
    folder = tmp_path / "landing"
    folder.mkdir()
    _write_jsonl(folder / "01-clean.jsonl", _clean(400, 0))
    _write_jsonl(folder / "02-malformed.jsonl", _malformed(1000), tail=b"\xff\xfe not utf-8\n" + b'{"messageId": "cut')
    with gzip.open(folder / "03-clean.jsonl.gz", "wb") as fh:
        fh.write(("\n".join(_clean(300, 2000)) + "\n").encode())
    with gzip.open(folder / "04-malformed.jsonl.gz", "wb") as fh:
        fh.write(("\n".join(_malformed(3000) + _clean(5, 0)) + "\n").encode())  # copies of file 01's events
    events = [_event(n) for n in range(4000, 4200)] + [_event(5, event="Changed")]  # m5: a conflicting copy
    pacsv.write_csv(_flat_table(events), folder / "05-clean.csv")
    text = (folder / "05-clean.csv").read_text()
    (folder / "06-malformed.csv").write_text(text.replace("m4010", "m6010") + "x,y\n" + "broken,\n")
    pq.write_table(
        _flat_table([_event(n) for n in range(7000, 7150)] + [_event(n) for n in range(10)]),
        folder / "07-clean.parquet",
    )
    shop = [
        {
            "messageId": f"s{n}",
            "event": "purchase",
            "anonymousId": f"a{n}",
            "timestamp": "2026-09-02T08:00:00Z",
            "customer": {"id": f"c{n}"},
            "order": {"total": 20 + n},
        }
        for n in range(50)
    ]
    _write_jsonl(
        folder / "shop-08.jsonl", [json.dumps(e) for e in shop] + ['{"messageId": "s1", "order": {"total": "x"}}']
    )
    return folder


def _tables(con: duckdb.DuckDBPyConnection) -> list[list[tuple]]:
    queries = (
        "SELECT * EXCLUDE (batch_id) FROM raw_events ORDER BY ALL",
        "SELECT * EXCLUDE (batch_id, quarantined_at) FROM quarantined_events ORDER BY ALL",
        "SELECT file_name, status, lines_read, events_kept, lines_quarantined, duplicates FROM ingest_files ORDER BY ALL",
    )
    return [con.execute(q).fetchall() for q in queries]


def test_chunked_parallel_ingest_matches_line_by_line_ingest(tmp_path, landing):
    whole = IngestOptions(mappings=MAPPINGS)
    line_by_line = IngestOptions(mappings=MAPPINGS, chunk_bytes=2048, stage_bytes=1)
    results = []
    for name, opts, threads in (("whole", whole, 4), ("lines", line_by_line, 1)):
        with duckdb.connect(str(tmp_path / f"{name}.duckdb")) as con:
            con.execute(f"SET threads = {threads}")
            ingest(con, landing, KEY, opts, now=NOW)
            results.append(_tables(con))
    kept, quarantined, ledger = results[0]
    assert results[0] == results[1]
    reasons = {row[2] for row in quarantined}
    assert {
        "malformed_json",
        "not_an_object",
        "empty_line",
        "bad_type",
        "bad_value",
        "invalid_utf8",
        "conflicting_redelivery",
        "malformed_row",
        "field_too_long",
        "bad_timestamp",
    } <= reasons
    assert sum(row[5] for row in ledger) > 0, "copies across files are counted"
    assert all(row[1] == "ingested" for row in ledger) and len(ledger) == 8
    assert sum(row[2] for row in ledger) == sum(row[3] + row[4] + row[5] for row in ledger)
    assert len(kept) == len({row[0] for row in kept}), "one row per messageId"
