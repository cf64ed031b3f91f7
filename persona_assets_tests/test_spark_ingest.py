"""Ingest on Spark against DuckDB: the same landing files and key give the same raw_events,
quarantined_events and ingest ledger on both engines, and nothing is lost on Spark."""

from __future__ import annotations

import gzip
import json
import time
from datetime import datetime

import duckdb
import pandas as pd
import pytest

from persona_assets.core.engine import SparkTables, parquet_glob
from persona_assets.core.ingest import ingest
from persona_assets.core.ingest_spark import SparkIngestRefused, ingest_on_spark
from persona_assets.core.pii import hmac_hex
from persona_assets.datagen import generate
from persona_assets_tests.test_spark import assert_same_table

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark")]

KEY = b"spark-ingest-key"
NOW = datetime(2026, 12, 1, 12, 0, 0)
TABLES = {"raw_events": "message_id", "quarantined_events": "_key", "ingest_files": "batch_id"}
# When a row was written: the one thing the engines cannot agree on.
WALL_CLOCK = ("quarantined_at", "ingested_at")


def _event(message_id: str | None, user: str | None, **fields) -> dict:
    event = {"type": "track", "event": "Product Viewed", "timestamp": "2026-06-01T10:00:00.000Z"}
    event |= {"messageId": message_id, "userId": user} | fields
    return {k: v for k, v in event.items() if v is not None}


def _hostile_lines() -> list[str]:
    """What the generator seldom writes: each kind of bad line, re-deliveries, PII to hash and redact."""
    traits = {"email": " Jo.Doe+news@GMail.com ", "phone": "030 1234567"}
    ordered = {"event": "Order Completed", "properties": {"revenue": 12.5, "price": 3.25, "quantity": 2}}
    return [
        json.dumps(_event("h-1", "u-1", type="identify", traits=traits, context={"locale": "de-DE"})),
        json.dumps(_event("h-2", "u-1", **ordered)),
        json.dumps(_event("h-2", "u-1", **ordered)),  # an identical re-delivery: a counted duplicate
        json.dumps(_event("h-2", "u-1", event="Order Completed", properties={"revenue": 99.0})),  # a conflict
        json.dumps(_event(None, "u-2", context={"page": {"url": "https://x.test/?q=jo%40example.com"}})),
        json.dumps(_event(None, "u-2", context={"page": {"url": "https://x.test/?q=jo%40example.com"}})),
        '{"messageId": "h-3", "userId": "u-3", "type": "track", "event": "X", "timestamp": ',  # malformed
        "",  # an empty line
        "   ",
        json.dumps(_event("h-4", None)),  # no userId nor anonymousId
        json.dumps(_event("h-5", {"id": 1})),  # a userId of the wrong JSON type
        json.dumps(_event("h-6", "u-6", properties={"price": "cheap"})),  # a price that is no number
        json.dumps(_event("h-7", "u-7", timestamp="yesterday")),
        json.dumps(_event("h-8", "u-8", type="teleport")),
        '{"messageId": "h-9", "phone": "+49 151 2345678", "email": "jo@example.com", "broken"',  # PII in a bad line
        "[1, 2, 3]",
    ]


def _write_hostile(landing) -> int:
    lines = _hostile_lines()
    (landing / "a-hostile.jsonl").write_text("\r\n".join(lines[:9]) + "\r\n")
    with gzip.open(landing / "b-hostile.jsonl.gz", "wt") as fh:
        # A copy of the first file's h-1 (a duplicate across files) and the rest of the bad lines.
        fh.write("\n".join([lines[0], *lines[9:]]))  # no final line end
    # A gzip file cut short: the lines before the damage are read, the rest is one unreadable_file row.
    whole = gzip.compress("".join(json.dumps(_event(f"cut-{i}", f"u-{i}")) + "\n" for i in range(400)).encode())
    (landing / "c-cut.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    return len(lines) + 1


def _duckdb_tables(con) -> dict[str, pd.DataFrame]:
    return {table: con.execute(f"SELECT * FROM {table}").df() for table in TABLES}


def _spark_tables(warehouse) -> dict[str, pd.DataFrame]:
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return {
            table: con.execute("SELECT * FROM read_parquet(?)", [parquet_glob(warehouse, table)]).df()
            for table in TABLES
        }


def _comparable(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """Without the wall-clock columns; quarantine rows keyed by file and line (a file's own row has none)."""
    frame = frame.drop(columns=[c for c in WALL_CLOCK if c in frame.columns])
    for column in frame.columns:
        if str(frame[column].dtype).startswith("datetime64") and frame[column].dt.tz is not None:
            frame[column] = frame[column].dt.tz_convert("UTC").dt.tz_localize(None)
    if table == "quarantined_events":
        frame = frame.assign(_key=frame.batch_id.astype(str) + ":" + frame.source_line.astype(str))
    return frame


@pytest.fixture(scope="module")
def both(spark, tmp_path_factory):
    """The same landing folder (150 generated people in three files, plus the hostile files) ingested
    by DuckDB and by Spark; each engine's tables and seconds."""
    root = tmp_path_factory.mktemp("spark-ingest")
    landing = root / "landing"
    generate(150, 23, root / "gen", "jsonl", people_per_file=50)
    landing.mkdir()
    for path in sorted((root / "gen").glob("*.jsonl")):
        (landing / path.name).write_bytes(path.read_bytes())
    hostile_lines = _write_hostile(landing)
    started = time.perf_counter()
    with duckdb.connect() as con:
        duck_report = ingest(con, landing, KEY, now=NOW)
        duck = _duckdb_tables(con)
    duck_seconds = time.perf_counter() - started
    started = time.perf_counter()
    spark_report = ingest_on_spark(spark, landing, root / "warehouse", KEY, now=NOW)
    spark_seconds = time.perf_counter() - started
    on_spark = _spark_tables(root / "warehouse")
    print(
        f"ingest of {duck_report.total('lines_read')} lines: DuckDB {duck_seconds:.1f} s, Spark {spark_seconds:.1f} s"
    )
    return duck, on_spark, landing, hostile_lines, duck_report, spark_report


@pytest.mark.parametrize("table", list(TABLES))
def test_ingest_gives_the_same_tables_on_spark_and_duckdb(both, table):
    duck, on_spark, *_ = both
    assert_same_table(_comparable(duck[table], table), _comparable(on_spark[table], table), TABLES[table])
    for column in WALL_CLOCK:
        if column in on_spark[table]:
            assert on_spark[table][column].notna().all()


def test_nothing_is_lost_on_spark(both):
    """Every line of every file is kept, quarantined or a counted re-delivery, and the hostile files
    reach each of those outcomes."""
    _, on_spark, landing, hostile_lines, _, spark_report = both
    ledger = on_spark["ingest_files"].set_index("file_name")
    for path in landing.iterdir():
        if path.name == "c-cut.jsonl.gz":
            continue  # cannot be read to its end: counted below
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            lines = fh.read().replace(b"\r\n", b"\n").rstrip(b"\n").count(b"\n") + 1
        row = ledger.loc[path.name]
        assert row.lines_read == lines
        assert row.events_kept + row.lines_quarantined + row.duplicates == lines
    cut = ledger.loc["c-cut.jsonl.gz"]
    assert 0 < cut.lines_read < 400 and cut.events_kept + cut.lines_quarantined == cut.lines_read
    quarantined = on_spark["quarantined_events"]
    unreadable = quarantined[quarantined.reason == "unreadable_file"]
    assert list(unreadable.source_file) == ["c-cut.jsonl.gz"] and unreadable.source_line.isna().all()
    hostile = ledger.loc[["a-hostile.jsonl", "b-hostile.jsonl.gz"]]
    assert hostile.lines_read.sum() == hostile_lines
    raw = on_spark["raw_events"]
    assert len(raw) == ledger.events_kept.sum()
    assert quarantined.source_line.notna().sum() == ledger.lines_quarantined.sum()
    assert hostile.duplicates.sum() == 3  # h-2's copy, the id-less copy and h-1 in the gzip file
    expected = {"conflicting_redelivery", "malformed_json", "empty_line", "missing_id", "bad_type", "bad_timestamp"}
    assert expected | {"unknown_type", "not_an_object", "unreadable_file"} <= set(quarantined.reason)
    assert spark_report.reasons == quarantined.reason.value_counts().to_dict()
    assert raw.message_id.str.startswith("derived-").sum() == 1
    # The keyed hashes of the normalized email (Gmail rules) and phone (E.164 from the locale's region).
    assert hmac_hex(KEY, "jodoe@gmail.com") in set(raw.email_hash)
    assert hmac_hex(KEY, "+49301234567") in set(raw.phone_hash)
    texts = " ".join(quarantined.raw_text.dropna())
    assert "jo@example.com" not in texts and "2345678" not in texts and "<phone>" in texts


def test_a_file_that_grew_is_refused_before_anything_is_read(spark, tmp_path):
    """A landing file that grew by appending since it was ingested is refused by name (DuckDB alone
    withdraws the earlier version's quarantine rows so far); the warehouse stays as it was."""
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    landing.mkdir()
    (landing / "events.jsonl").write_text(json.dumps(_event("r-1", "u-1")) + "\n")
    ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    before = _spark_tables(warehouse)
    with open(landing / "events.jsonl", "a") as fh:
        fh.write(json.dumps(_event("r-2", "u-2")) + "\n")
    with pytest.raises(SparkIngestRefused, match="events.jsonl: grew by appending since batch 1"):
        ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    after = _spark_tables(warehouse)
    for table in TABLES:
        pd.testing.assert_frame_equal(before[table], after[table])


RULES = [
    ("regexp_full_match", "SELECT regexp_full_match('a@b.co' || chr(10), '^[^@]+@[^@]+[.][a-z]+$')::INT AS v"),
    ("regexp_full_match whole", "SELECT regexp_full_match('xab', 'a|xab')::INT AS v"),
    ("back-reference", "SELECT regexp_replace('phone: 42', '(phone: )([0-9]+)', '\\1<phone>', 'g') AS v"),
]


def test_the_ingest_compile_rules_give_duckdbs_answers(spark, tmp_path):
    """Each rule ingest needed (engine.py) gives DuckDB's answer on Spark."""
    tables = SparkTables(spark, tmp_path)
    with duckdb.connect() as con:
        for why, sql in RULES:
            assert tables.query(sql).collect()[0][0] == con.execute(sql).fetchall()[0][0], why
