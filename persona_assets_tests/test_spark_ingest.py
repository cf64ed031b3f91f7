"""Ingest on Spark against DuckDB: the same landing files and key give the same raw_events,
quarantined_events and ingest ledger on both engines, and nothing is lost on Spark."""

from __future__ import annotations

import gzip
import json
import time
from datetime import datetime

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_assets.contracts import IngestFiles, QuarantinedEvents, RawEvents, columns
from persona_assets.core import ingest_spark
from persona_assets.core.engine import SparkTables, parquet_glob
from persona_assets.core.erasure import erasure_hash
from persona_assets.core.ingest import IngestOptions, ingest
from persona_assets.core.ingest_spark import ingest_on_spark
from persona_assets.core.mappings import parse_mappings
from persona_assets.core.pii import hmac_hex
from persona_assets.datagen import generate
from persona_assets_tests.test_mappings import GA4_LINES, ORDERS, REDELIVERED
from persona_assets_tests.test_spark import assert_same_table

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark-stages")]  # one worker, its Spark session (conftest)

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


def _read(warehouse, table: str) -> pd.DataFrame:
    """A Spark warehouse table read by DuckDB (`parquet_glob`)."""
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute("SELECT * FROM read_parquet(?)", [parquet_glob(warehouse, table)]).df()


def _spark_tables(warehouse) -> dict[str, pd.DataFrame]:
    return {table: _read(warehouse, table) for table in TABLES}


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


# --- runs after the first, and the other file formats ------------------------------------------------

MAPPINGS = parse_mappings(
    [
        {"files": "orders*.csv", "preset": "orders_csv"},
        {
            "files": "shop*.parquet",
            "columns": {"userId": "cust", "timestamp": "day", "properties.revenue": "total"},
            "defaults": {"type": "track", "event": "Order Completed"},
            "timestamp_format": "%Y%m%d",
        },
        {"files": "ga4*.jsonl", "preset": "ga4"},
    ]
)
SEQUENCE_OPTS = IngestOptions(mappings=MAPPINGS, min_event_at=datetime(1970, 1, 1))
ERASED = "u-erased"


def _lines(path, events: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def _first_run(landing, warehouse, con) -> set[str] | None:
    """Generated people in two files, and hand-written events some later files deliver again."""
    generate(40, 31, landing.parent / "gen", "jsonl", people_per_file=20)
    for path in sorted((landing.parent / "gen").glob("*.jsonl")):
        (landing / path.name).write_bytes(path.read_bytes())
    _lines(landing / "s1.jsonl", [_event(f"r-{i}", f"u-{i}", properties={"price": i}) for i in range(1, 6)])
    return None


def _second_run(landing, warehouse, con) -> set[str] | None:
    """r-1 and r-3 delivered again as they were (duplicates), r-2 with another price (a conflicting copy),
    new events, and the hostile files."""
    events = [
        _event("r-1", "u-1", properties={"price": 1}),
        _event("r-2", "u-2", properties={"price": 99}),
        _event("r-3", "u-3", properties={"price": 3}),
        *(_event(f"n-{i}", f"u-{i}") for i in range(10)),
    ]
    _lines(landing / "s2.jsonl", events)
    _write_hostile(landing)
    return None


def _nothing_new(landing, warehouse, con) -> set[str] | None:
    return None


def _only_one(landing, warehouse, con) -> set[str] | None:
    """Two new files, one named: the other waits for a later run."""
    _lines(landing / "s3.jsonl", [_event(f"o-{i}", f"u-{i}") for i in range(5)] + [_event("r-4", "u-4")])
    _lines(landing / "s4.jsonl", [_event(f"w-{i}", f"u-{i}") for i in range(5)] + [_event("r-5", "u-5", event="X")])
    return {"s3.jsonl"}


def _after_an_erasure(landing, warehouse, con) -> set[str] | None:
    """u-erased is logged as forgotten (both warehouses' erasure_log); a line of theirs before their
    consent is suppressed, the consent line and those after it are kept."""
    con.execute("INSERT INTO erasure_log VALUES ($h, $at, NULL)", {"h": erasure_hash(KEY, ERASED), "at": NOW})
    (warehouse / "erasure_log").mkdir()
    con.execute(f"COPY erasure_log TO '{warehouse / 'erasure_log' / 'part-0.parquet'}' (FORMAT parquet)")
    granted = {"consent": {"personalization": "granted"}}
    _lines(
        landing / "s5.jsonl",
        [
            _event("e-1", ERASED, timestamp="2026-06-01T09:00:00Z"),
            _event("e-2", ERASED, timestamp="2026-06-02T09:00:00Z", context=granted),
            _event("e-3", ERASED, timestamp="2026-06-03T09:00:00Z"),
            _event("e-4", "u-kept", anonymousId="a-1"),
        ],
    )
    return None


def _other_formats(landing, warehouse, con) -> set[str] | None:
    """CSV and Parquet in Segment's flat names, a plain orders CSV, a shop's Parquet export and a GA4
    export, each read through its mapping; one order re-delivered from the CSV, one conflicting."""
    flat = "messageId,type,event,userId,timestamp,properties_price,context_traits_email\n"
    flat += "c-1,track,Product Viewed,u-1,2026-06-01T10:00:00Z,5,Jo@Example.com\n"
    flat += "c-2,track,,u-2,2026-06-01T10:00:00Z,x,\n"  # no event name, a price that is no number
    flat += "c-3,track,Product Viewed,u-3,2026-06-01T10:00:00Z,1,2,3\n"  # a row too wide
    (landing / "events.csv").write_text(flat)
    table = pa.table(
        {
            "messageId": ["p-1", "p-2", "r-1"],
            "type": ["identify", "track", "track"],
            "event": [None, "Order Completed", "Product Viewed"],
            "userId": ["u-7", "u-8", "u-1"],
            "timestamp": ["2026-06-01T10:00:00Z", "2026-06-01T11:00:00+02:00", "2026-06-01T10:00:00.000Z"],
            "traits_phone": ["+49 151 2345678", None, None],
            "properties_revenue": [None, 12.5, None],
            "properties_price": [None, None, 1.0],
        }
    )
    pq.write_table(table, landing / "events.parquet")
    (landing / "orders_a.csv").write_text(ORDERS)
    (landing / "orders_b.csv").write_text(REDELIVERED + "C-1,1997-01-12,999,O-3\n")
    shop = pa.table({"cust": ["K1", "K2", "K3"], "day": ["19970105", "19970106", "1997-01-08"], "total": [12.25, 7, 1]})
    pq.write_table(shop, landing / "shop.parquet")
    _lines(landing / "ga4-export.jsonl", GA4_LINES)
    return None


def _a_file_grew(landing, warehouse, con) -> set[str] | None:
    """s2.jsonl (with a conflicting copy, quarantined) grew by appending: read again whole, its earlier
    version's quarantine row withdrawn and its ledger row a line fewer."""
    with open(landing / "s2.jsonl", "a") as fh:
        fh.write(json.dumps(_event("g-1", "u-1")) + "\n")
    return None


STEPS = {
    "first": _first_run,
    "second": _second_run,
    "nothing new": _nothing_new,
    "only": _only_one,
    "the rest": _nothing_new,
    "after an erasure": _after_an_erasure,
    "other formats": _other_formats,
    "a file grew": _a_file_grew,
}
SEQUENCE_TABLES = {**TABLES, "erasure_log": "erasure_hash"}


@pytest.fixture(scope="module")
def sequence(spark, tmp_path_factory):
    """The same landing folder ingested run after run (`STEPS`, each adding files first) by DuckDB and
    by Spark: after each run, each engine's tables and report."""
    root = tmp_path_factory.mktemp("spark-runs")
    landing, warehouse = root / "landing", root / "warehouse"
    landing.mkdir()
    after = {}
    with duckdb.connect() as con:
        for i, (step, change) in enumerate(STEPS.items()):
            only = change(landing, warehouse, con)
            run = f"run-{i}"
            duck_report = ingest(con, landing, KEY, SEQUENCE_OPTS, run_id=run, now=NOW, only=only)
            spark_report = ingest_on_spark(
                spark, landing, warehouse, KEY, SEQUENCE_OPTS, run_id=run, now=NOW, only=only
            )
            duck = _duckdb_tables(con) | {"erasure_log": con.execute("SELECT * FROM erasure_log").df()}
            on_spark = _spark_tables(warehouse)
            if (warehouse / "erasure_log").exists():
                on_spark["erasure_log"] = _read(warehouse, "erasure_log")
            after[step] = duck, on_spark, duck_report, spark_report
            print(f"run {step!r}: DuckDB {duck_report.seconds:.2f} s, Spark {spark_report.seconds:.1f} s")
    return after


@pytest.mark.parametrize("step", list(STEPS))
def test_runs_after_the_first_give_the_same_tables_on_spark_and_duckdb(sequence, step):
    """After each run of the sequence, every table holds the same rows on both engines, and both
    engines report the same files, skipped files and quarantine reasons."""
    duck, on_spark, duck_report, spark_report = sequence[step]
    for table, key in SEQUENCE_TABLES.items():
        if table == "erasure_log" and table not in on_spark:
            assert duck[table].empty
            continue
        assert_same_table(_comparable(duck[table], table), _comparable(on_spark[table], table), key)
    assert spark_report.files == duck_report.files
    assert spark_report.skipped == duck_report.skipped
    assert spark_report.reasons == duck_report.reasons


def test_the_sequence_reaches_every_outcome(sequence):
    """The runs above are not vacuous: earlier runs' ids re-delivered (a duplicate, a conflicting
    copy), files skipped, one file held back by `only`, an erased person's line suppressed and their
    consent logged, and every format and mapping kept events."""
    _, on_spark, _, report = sequence["second"]
    ledger = on_spark["ingest_files"].set_index("file_name")
    assert ledger.loc["s2.jsonl"].duplicates == 2 and ledger.loc["s2.jsonl"].lines_quarantined == 1
    quarantined = on_spark["quarantined_events"]
    conflict = quarantined[quarantined.reason == "conflicting_redelivery"].set_index("source_file")
    assert "s1.jsonl line 2" in conflict.loc["s2.jsonl"].detail
    assert sequence["nothing new"][3].files == [] and "s1.jsonl" in sequence["nothing new"][3].skipped
    assert [f.file_name for f in sequence["only"][3].files] == ["s3.jsonl"]
    assert [f.file_name for f in sequence["the rest"][3].files] == ["s4.jsonl"]
    _, on_spark, _, report = sequence["after an erasure"]
    assert [(f.file_name, f.lines_suppressed, f.events_kept) for f in report.files] == [("s5.jsonl", 1, 3)]
    assert on_spark["erasure_log"].consented_at.notna().all()
    _, on_spark, _, report = sequence["other formats"]
    kept = {f.file_name: f.events_kept for f in report.files}
    assert set(kept) == {
        "events.csv",
        "events.parquet",
        "orders_a.csv",
        "orders_b.csv",
        "shop.parquet",
        "ga4-export.jsonl",
    }
    assert all(kept.values()), kept
    assert sum(f.duplicates for f in report.files) >= 2
    _, on_spark, _, report = sequence["a file grew"]
    assert [(f.file_name, f.events_kept, f.lines_quarantined) for f in report.files] == [("s2.jsonl", 1, 1)]
    versions = on_spark["ingest_files"].query("file_name == 's2.jsonl'").sort_values("batch_id")
    assert list(versions.lines_read) == [12, 14] and list(versions.lines_quarantined) == [0, 1]
    assert sorted(on_spark["ingest_files"].batch_id) == list(range(1, len(on_spark["ingest_files"]) + 1))


def test_a_run_killed_before_its_ledger_is_done_again_by_the_next(spark, tmp_path, monkeypatch):
    """A run stopped after its rows were moved in but before its ledger was: the next run takes its rows
    out and ingests its files again, so the tables are DuckDB's after the same files, nothing twice."""
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    landing.mkdir()
    _lines(landing / "s1.jsonl", [_event(f"r-{i}", f"u-{i}") for i in range(5)])
    ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    _lines(landing / "s2.jsonl", [_event("r-1", "u-1"), _event("n-1", "u-9"), _event("n-2", None)])
    swap = ingest_spark.swap_folder

    def killed(new, target):
        if target.name == "ingest_files":
            raise KeyboardInterrupt("killed before the ledger")
        swap(new, target)

    monkeypatch.setattr(ingest_spark, "swap_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    half = _spark_tables(warehouse)
    assert len(half["ingest_files"]) == 1 and len(half["raw_events"]) == 6  # n-1 moved in, not in the ledger
    monkeypatch.setattr(ingest_spark, "swap_folder", swap)
    report = ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    assert [f.file_name for f in report.files] == ["s2.jsonl"]
    with duckdb.connect() as con:
        ingest(con, landing, KEY, only={"s1.jsonl"}, now=NOW)
        ingest(con, landing, KEY, now=NOW)
        duck = _duckdb_tables(con)
    on_spark = _spark_tables(warehouse)
    for table, key in TABLES.items():
        assert_same_table(_comparable(duck[table], table), _comparable(on_spark[table], table), key)
    assert not list(warehouse.glob(".ingest-*"))


def test_a_grown_file_run_stopped_after_its_ledger_is_finished_by_the_next(spark, tmp_path, monkeypatch):
    """A file that grew: its run is stopped after the ledger was written but before the earlier run's
    quarantine file was replaced; the next run (nothing new) puts the replacement in place first."""
    landing, warehouse = tmp_path / "landing", tmp_path / "warehouse"
    landing.mkdir()
    _lines(landing / "s1.jsonl", [_event("r-1", "u-1"), _event("r-2", None)])
    with duckdb.connect() as con:
        ingest(con, landing, KEY, now=NOW)
        ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
        with open(landing / "s1.jsonl", "a") as fh:
            fh.write(json.dumps(_event("r-3", "u-3")) + "\n")
        ingest(con, landing, KEY, now=NOW)
        duck = _duckdb_tables(con)
    monkeypatch.setattr(ingest_spark, "_apply_pending", _raise_killed)
    with pytest.raises(KeyboardInterrupt):
        ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    assert len(_read(warehouse, "quarantined_events")) == 2  # the earlier version's missing_id row, not yet withdrawn
    monkeypatch.undo()
    report = ingest_on_spark(spark, landing, warehouse, KEY, now=NOW)
    assert report.files == [] and report.skipped == ["s1.jsonl"]
    on_spark = _spark_tables(warehouse)
    for table, key in TABLES.items():
        assert_same_table(_comparable(duck[table], table), _comparable(on_spark[table], table), key)
    assert not list(warehouse.glob(".pending-*"))


def _raise_killed(*args) -> None:
    raise KeyboardInterrupt("killed before the rewritten files were moved in")


def test_an_empty_landing_folder_gives_the_empty_tables_with_the_contracts_columns(spark, tmp_path):
    """Nothing landed yet: both readers find the three tables, empty, in the contracts' columns."""
    (tmp_path / "landing").mkdir()
    report = ingest_on_spark(spark, tmp_path / "landing", tmp_path / "warehouse", KEY, now=NOW)
    assert report.files == []
    for table, model in (
        ("raw_events", RawEvents),
        ("quarantined_events", QuarantinedEvents),
        ("ingest_files", IngestFiles),
    ):
        assert spark.read.parquet(str(tmp_path / "warehouse" / table)).columns == columns(model)
        assert list(_read(tmp_path / "warehouse", table).columns) == columns(model)
        assert _read(tmp_path / "warehouse", table).empty


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
