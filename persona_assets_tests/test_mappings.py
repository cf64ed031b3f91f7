"""Per-file mappings: foreign exports (GA4, orders CSVs, snake_case events) ingested as sent."""

import csv
import io
import json
from datetime import date, datetime, timedelta
from decimal import Decimal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_assets.core.affinity import interactions_sql
from persona_assets.core.ingest import IngestOptions, ingest
from persona_assets.core.mappings import PRESETS, FileMapping, mapping_for, parse_mappings

from .conftest import land

KEY = b"test-key"
NOW = datetime(2026, 11, 1)
SINCE_1970 = datetime(1970, 1, 1)


def _ingest(tmp_path, landing, mappings, name="warehouse"):
    con = duckdb.connect(str(tmp_path / f"{name}.duckdb"))
    opts = IngestOptions(mappings=parse_mappings(mappings), min_event_at=SINCE_1970)
    return con, ingest(con, landing, KEY, opts, now=NOW)


def _accounted(report) -> None:
    for f in report.files:
        assert f.events_kept + f.lines_quarantined + f.duplicates + f.lines_suppressed == f.lines_read, f


def _landing(tmp_path, files: dict[str, str | bytes]):
    landing = tmp_path / "landing"
    landing.mkdir()
    for name, text in files.items():
        (landing / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return landing


def _us(micros: int) -> datetime:
    """A UTC wall-clock datetime from microseconds since the epoch, computed without floats."""
    return datetime(1970, 1, 1) + timedelta(microseconds=micros)


# --- GA4 ------------------------------------------------------------------------------------------

GA4_LINES = [
    {"event_name": "session_start", "event_timestamp": "1730000000000001", "user_pseudo_id": "p1.17"},
    {
        "event_name": "page_view",
        "event_timestamp": 1730000000500000,
        "user_pseudo_id": "p1.17",
        "device": {"category": "mobile"},
    },
    {
        "event_name": "view_item",
        "event_timestamp": 1730000001123456,
        "user_pseudo_id": "p1.17",
        "device": {"category": "mobile"},
        "items": [
            {"item_id": "SKU-9", "item_name": "Trail shoe", "item_category": "Shoes", "price": 89.9, "quantity": 1}
        ],
    },
    {
        "event_name": "add_to_cart",
        "event_timestamp": "1730000002000000",
        "user_pseudo_id": "p1.17",
        "items": [{"item_id": "SKU-9", "item_category": "Shoes", "price": 89.9, "quantity": 2}],
    },
    {
        "event_name": "purchase",
        "event_timestamp": 1730000003999999,
        "user_pseudo_id": "p1.17",
        "user_id": "U-42",
        "ecommerce": {"transaction_id": "T-1001", "purchase_revenue": 179.8},
        "items": [
            {"item_id": "SKU-9", "item_category": "Shoes", "price": 89.9, "quantity": 2},
            {"item_id": "SKU-3", "item_category": "Socks", "price": 0.0, "quantity": 1},
        ],
    },
]


def test_a_ga4_export_is_ingested_with_segment_names_exact_values_and_every_line_accounted(tmp_path):
    text = "\n".join(json.dumps(line) for line in GA4_LINES) + '\n{"event_name": "purchase", "event_ti\n'
    landing = _landing(tmp_path, {"ga4_events_20241027.jsonl": text})
    con, report = _ingest(tmp_path, landing, [{"files": "ga4*.jsonl", "preset": "ga4"}])

    assert report.total("lines_read") == 6
    assert (report.total("events_kept"), report.total("lines_quarantined"), report.total("duplicates")) == (5, 1, 0)
    _accounted(report)
    assert con.execute("SELECT source_line, reason FROM quarantined_events").fetchall() == [(6, "malformed_json")]
    rows = con.execute(
        """SELECT source_line, event_type, event_name, event_at, anonymous_id, user_id, device_type,
                  category, product_id, price, quantity, revenue, order_id
           FROM raw_events ORDER BY source_line"""
    ).fetchall()
    assert rows == [
        (1, "track", "session_start", _us(1730000000000001), "p1.17", None, None, None, None, None, None, None, None),
        (2, "track", "page_view", _us(1730000000500000), "p1.17", None, "mobile", None, None, None, None, None, None),
        (
            3,
            "track",
            "Product Viewed",
            _us(1730000001123456),
            "p1.17",
            None,
            "mobile",
            "Shoes",
            "SKU-9",
            89.9,
            1,
            None,
            None,
        ),
        (
            4,
            "track",
            "Product Added",
            _us(1730000002000000),
            "p1.17",
            None,
            None,
            "Shoes",
            "SKU-9",
            89.9,
            2,
            None,
            None,
        ),
        (
            5,
            "track",
            "Order Completed",
            _us(1730000003999999),
            "p1.17",
            "U-42",
            None,
            "Shoes",
            "SKU-9",
            89.9,
            2,
            179.8,
            "T-1001",
        ),
    ]
    assert rows[0][3] == datetime(2024, 10, 27, 3, 33, 20, 1)  # 1730000000 s is 2024-10-27 03:33:20 UTC


def test_a_ga4_order_counts_for_the_categories_of_all_its_items(tmp_path):
    # Segment's product list is read by `affinity.interactions_sql`; GA4's item keys must reach it.
    landing = _landing(tmp_path, {"ga4.jsonl": "\n".join(json.dumps(line) for line in GA4_LINES) + "\n"})
    con, _ = _ingest(tmp_path, landing, [{"files": "ga4*.jsonl", "preset": "ga4"}])
    con.execute("CREATE VIEW person_events AS SELECT *, anonymous_id AS person_id FROM raw_events")
    got = con.execute(f"SELECT kind, category, product_id FROM ({interactions_sql()}) ORDER BY ALL").fetchall()
    assert got == [
        ("add_to_cart", "Shoes", "SKU-9"),
        ("purchase", "Shoes", "SKU-9"),
        ("purchase", "Socks", "SKU-3"),
        ("view", "Shoes", "SKU-9"),
    ]
    kept = json.loads(con.execute("SELECT products FROM raw_events WHERE order_id = 'T-1001'").fetchall()[0][0])
    assert kept[1] == {
        "item_id": "SKU-3",
        "item_category": "Socks",
        "price": 0.0,
        "quantity": 1,
        "product_id": "SKU-3",
        "category": "Socks",
    }


def test_a_mapped_field_of_the_wrong_json_type_is_quarantined_with_its_segment_name(tmp_path):
    lines = [
        {"event_name": "login", "event_timestamp": 1730000000000000, "user_pseudo_id": {"nested": 1}},
        {"event_name": "purchase", "event_timestamp": 1730000000000000, "user_pseudo_id": "p", "items": "SKU-1"},
        {"event_name": "login", "event_timestamp": "yesterday", "user_pseudo_id": "p"},
        {"event_name": "login", "user_pseudo_id": "p"},
        {"event_name": "login", "event_timestamp": 1730000000000000, "user_pseudo_id": "p"},
    ]
    landing = _landing(tmp_path, {"ga4.jsonl": "\n".join(json.dumps(line) for line in lines) + "\n"})
    con, report = _ingest(tmp_path, landing, [{"files": "ga4*.jsonl", "preset": "ga4"}])
    got = con.execute("SELECT source_line, reason, detail FROM quarantined_events ORDER BY 1").fetchall()
    assert got == [
        (1, "bad_type", "anonymousId has the wrong JSON type"),
        (2, "bad_type", "properties.products has the wrong JSON type"),
        (3, "bad_timestamp", "timestamp yesterday"),
        (4, "missing_timestamp", None),
    ]
    assert con.execute("SELECT event_name FROM raw_events").fetchall() == [("Signed In",)]
    _accounted(report)


# --- orders exports -------------------------------------------------------------------------------

ORDERS = """customer_id,order_date,amount,order_id
C-1,1997-01-01,29.99,O-1
C-2,1997-01-01,5.00,O-2
C-1,1997-01-12,120.50,O-3
C-3,1997-02-28,0.01,O-4
C-2,1997-01-01,5.00,O-2
"""
REDELIVERED = """customer_id,order_date,amount,order_id
C-3,1997-02-28,0.01,O-4
C-4,1997-03-01,10,O-5
"""
SHOP = """cust,day,total
K1,19970105,12.25
K2,19970106,7
K1,19970107,3.5
K3,1997-01-08,1
"""


def _sum(text: str, column: str) -> Decimal:
    return sum((Decimal(r[column]) for r in csv.DictReader(io.StringIO(text))), Decimal(0))


def test_orders_csvs_are_read_through_a_preset_and_explicit_columns(tmp_path):
    landing = _landing(tmp_path, {"orders_a.csv": ORDERS, "orders_b.csv": REDELIVERED, "shop.csv": SHOP})
    mappings = [
        {"files": "orders_*.csv", "preset": "orders_csv"},
        {
            "files": "shop*.csv",
            "columns": {"userId": "cust", "timestamp": "day", "properties.revenue": "total"},
            "defaults": {"type": "track", "event": "Order Completed"},
            "timestamp_format": "%Y%m%d",
        },
    ]
    con, report = _ingest(tmp_path, landing, mappings)
    _accounted(report)
    by_file = {f.file_name: (f.lines_read, f.events_kept, f.lines_quarantined, f.duplicates) for f in report.files}
    # O-2 is sent twice in orders_a and O-4 again in orders_b: each kept once, the copies counted.
    assert by_file == {"orders_a.csv": (5, 4, 0, 1), "orders_b.csv": (2, 1, 0, 1), "shop.csv": (4, 3, 1, 0)}
    assert con.execute("SELECT source_line, reason, detail FROM quarantined_events").fetchall() == [
        (5, "bad_timestamp", "timestamp 1997-01-08")
    ]
    orders = con.execute(
        """SELECT message_id, order_id, user_id, event_type, event_name, event_at, revenue
           FROM raw_events WHERE order_id IS NOT NULL ORDER BY order_id"""
    ).fetchall()
    assert [r[:5] for r in orders] == [
        (f"O-{i}", f"O-{i}", c, "track", "Order Completed")
        for i, c in enumerate(["C-1", "C-2", "C-1", "C-3", "C-4"], 1)
    ]
    assert [r[5] for r in orders] == [
        datetime(1997, 1, 1),
        datetime(1997, 1, 1),
        datetime(1997, 1, 12),
        datetime(1997, 2, 28),
        datetime(1997, 3, 1),
    ]
    distinct_orders = _sum(ORDERS, "amount") - Decimal("5.00") + Decimal("10")  # O-2's copy out, O-5 in
    assert Decimal(str(round(sum(r[6] for r in orders), 2))) == distinct_orders
    shop = con.execute(
        "SELECT user_id, event_name, event_at, revenue FROM raw_events WHERE order_id IS NULL ORDER BY event_at"
    ).fetchall()
    assert shop == [
        ("K1", "Order Completed", datetime(1997, 1, 5), 12.25),
        ("K2", "Order Completed", datetime(1997, 1, 6), 7.0),
        ("K1", "Order Completed", datetime(1997, 1, 7), 3.5),
    ]
    assert Decimal(str(sum(r[3] for r in shop))) == _sum(SHOP, "total") - Decimal(1)  # the bad date's 1 is out


def test_a_ga4_export_as_parquet_or_csv_reads_its_nested_fields_as_the_jsonl_does(tmp_path):
    # Parquet keeps GA4's records as structs and lists; a CSV export holds them as JSON text. The
    # preset's nested sources (`ecommerce.purchase_revenue`, `items[0].item_id`) reach into both.
    lines = [{**line, "event_timestamp": int(line["event_timestamp"])} for line in GA4_LINES]
    header = ["event_name", "event_timestamp", "user_pseudo_id", "user_id", "device", "ecommerce", "items"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for line in lines:
        writer.writerow(
            [json.dumps(line[k]) if isinstance(line.get(k), dict | list) else line.get(k, "") for k in header]
        )
    columns = (
        "event_at, event_name, anonymous_id, user_id, device_type, category, product_id, price, "
        "quantity, revenue, order_id"
    )
    got = {}
    for fmt in ("jsonl", "parquet", "csv"):
        landing = tmp_path / fmt / "landing"
        landing.mkdir(parents=True)
        if fmt == "jsonl":
            (landing / "ga4.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        elif fmt == "parquet":
            # (from_pylist takes its columns from the first row: every row names them all)
            pq.write_table(
                pa.Table.from_pylist([{k: line.get(k) for k in header} for line in lines]), landing / "ga4.parquet"
            )
        else:
            (landing / "ga4.csv").write_text(out.getvalue())
        con, report = _ingest(tmp_path / fmt, landing, [{"files": "ga4*", "preset": "ga4"}])
        _accounted(report)
        assert report.total("events_kept") == 5, fmt
        rows = con.execute(f"SELECT {columns} FROM raw_events ORDER BY 1").fetchall()
        con.execute("CREATE VIEW person_events AS SELECT *, anonymous_id AS person_id FROM raw_events")
        items = con.execute(f"SELECT kind, category, product_id FROM ({interactions_sql()}) ORDER BY ALL").fetchall()
        got[fmt] = (rows, items)
    assert got["jsonl"][0][4][-2:] == (179.8, "T-1001") and len(got["jsonl"][1]) == 4
    assert got["jsonl"][0][1][4] == "mobile" and got["jsonl"][0][2][5:8] == ("Shoes", "SKU-9", 89.9)
    assert got["parquet"] == got["jsonl"] == got["csv"]


def test_a_mapped_parquet_file_with_typed_columns_is_read_as_text(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    table = pa.table(
        {
            "customer_id": ["C-1", "C-2"],
            "order_date": pa.array([date(1997, 1, 1), date(1997, 1, 2)], pa.date32()),
            "amount": [29.99, 5.0],
            "order_id": pa.array([101, 102], pa.int64()),
        }
    )
    pq.write_table(table, landing / "orders.parquet")
    con, report = _ingest(tmp_path, landing, [{"files": "orders*", "preset": "orders_csv"}])
    _accounted(report)
    got = con.execute("SELECT message_id, user_id, event_at, revenue FROM raw_events ORDER BY 1").fetchall()
    assert got == [("101", "C-1", datetime(1997, 1, 1), 29.99), ("102", "C-2", datetime(1997, 1, 2), 5.0)]


@pytest.mark.parametrize(
    ("fmt", "value", "expected"),
    [
        ("epoch_s", 1730000000, datetime(2024, 10, 27, 3, 33, 20)),
        ("epoch_s", "1730000000.25", datetime(2024, 10, 27, 3, 33, 20, 250000)),
        ("epoch_ms", 1730000000123, datetime(2024, 10, 27, 3, 33, 20, 123000)),
        ("epoch_us", "1730000000123456", datetime(2024, 10, 27, 3, 33, 20, 123456)),
        ("iso", "2024-10-27T05:33:20+02:00", datetime(2024, 10, 27, 3, 33, 20)),
        ("%d/%m/%Y %H:%M", "27/10/2024 03:33", datetime(2024, 10, 27, 3, 33)),
        ("%Y-%m-%d %H:%M %z", "2024-10-27 05:33 +0200", datetime(2024, 10, 27, 3, 33)),
        ("epoch_s", "1e9", "bad_timestamp"),
        ("epoch_ms", "soon", "bad_timestamp"),
        ("epoch_s", 99999999999999999999999, "bad_timestamp"),  # past DuckDB's timestamps: no time, no error
        ("epoch_us", "-9223372036854775807", "bad_timestamp"),
        ("epoch_ms", "9999999999999999", "bad_timestamp"),  # past a BIGINT of microseconds: no time, no error
        ("%Y%m%d", "2024-10-27", "bad_timestamp"),
        ("epoch_us", "", "missing_timestamp"),
    ],
)
def test_timestamp_formats(tmp_path, fmt, value, expected):
    line = json.dumps({"uid": "u1", "ts": value})
    landing = _landing(tmp_path, {"app.jsonl": line + "\n"})
    mapping = {
        "files": "*.jsonl",
        "columns": {"userId": "uid", "timestamp": "ts"},
        "defaults": {"type": "identify"},
        "timestamp_format": fmt,
    }
    con, report = _ingest(tmp_path, landing, [mapping])
    _accounted(report)
    if isinstance(expected, datetime):
        assert con.execute("SELECT event_at FROM raw_events").fetchall() == [(expected,)]
    else:
        assert con.execute("SELECT reason FROM quarantined_events").fetchall() == [(expected,)]


# --- snake_case events and unmapped files ----------------------------------------------------------


def test_snake_case_events_are_renamed_and_unknown_names_kept(tmp_path):
    lines = [
        {
            "type": "track",
            "event": "order_completed",
            "user_id": "u1",
            "message_id": "m1",
            "timestamp": "2024-01-01T00:00:00Z",
            "properties": {"revenue": 10},
        },
        {"type": "track", "event": "transaction", "anonymous_id": "a1", "timestamp": "2024-01-02T00:00:00Z"},
        {"type": "track", "event": "link_click", "anonymous_id": "a1", "timestamp": "2024-01-03T00:00:00Z"},
        {"type": "track", "event": " product_view ", "anonymous_id": "a1", "timestamp": "2024-01-04T00:00:00Z"},
    ]
    landing = _landing(tmp_path, {"rudder.jsonl": "\n".join(json.dumps(line) for line in lines) + "\n"})
    con, report = _ingest(tmp_path, landing, [{"files": "rudder*", "preset": "snake_case"}])
    _accounted(report)
    got = con.execute("SELECT message_id, event_name, user_id, anonymous_id, revenue FROM raw_events ORDER BY event_at")
    rows = got.fetchall()
    assert [r[1] for r in rows] == ["Order Completed", "Order Completed", "link_click", "Product Viewed"]
    assert rows[0] == ("m1", "Order Completed", "u1", None, 10.0)
    assert rows[1][3] == "a1"


def test_a_file_matching_no_mapping_is_ingested_exactly_as_before(tmp_path, generated):
    landing = tmp_path / "landing"
    landing.mkdir()
    land(generated("jsonl"), landing)
    land(generated("csv"), landing)
    mappings = [{"files": "ga4*.jsonl", "preset": "ga4"}, {"files": "orders*.csv", "preset": "orders_csv"}]
    tables = []
    for name, given in (("plain", None), ("mapped", mappings)):
        con, report = _ingest(tmp_path, landing, given, name)
        _accounted(report)
        tables.append(
            [
                con.execute(f"SELECT * EXCLUDE ({skip}) FROM {t} ORDER BY ALL").fetchall()
                for t, skip in (
                    ("raw_events", "batch_id"),
                    ("quarantined_events", "quarantined_at, batch_id"),
                    ("ingest_files", "ingested_at, run_id, batch_id"),
                )
            ]
        )
        con.close()
    assert tables[0] == tables[1]
    assert len(tables[0][0]) > 1000


# --- values from settings stay data -----------------------------------------------------------------

NASTY = "x'); DROP TABLE raw_events; --"


def test_quotes_and_sql_in_names_defaults_and_columns_stay_data(tmp_path):
    csv_text = 'who,"it\'s ""when""",what\nu1,2024-01-01,buy "now"\nu2,2024-01-02,\n'
    json_line = json.dumps({'we\'ird "key"': {"id": "u3"}, "at": "2024-01-03", "what": NASTY})
    landing = _landing(tmp_path, {"odd.csv": csv_text, "odd.jsonl": json_line + "\n"})
    renamed = "Order 'Completed\"; DROP TABLE ingest_files; --"
    mappings = [
        {
            "files": "odd.csv",
            "columns": {"userId": "who", "timestamp": 'it\'s "when"', "event": "what"},
            "defaults": {"type": "track", "event": NASTY},
            "events": {'buy "now"': renamed},
        },
        {
            "files": "odd.jsonl",
            "columns": {"userId": 'we\'ird "key".id', "timestamp": "at", "event": "what"},
            "defaults": {"type": "track"},
            "events": {NASTY: renamed},
        },
    ]
    con, report = _ingest(tmp_path, landing, mappings)
    _accounted(report)
    got = con.execute("SELECT user_id, event_name, event_at FROM raw_events ORDER BY user_id").fetchall()
    assert got == [
        ("u1", renamed, datetime(2024, 1, 1)),
        ("u2", NASTY, datetime(2024, 1, 2)),
        ("u3", renamed, datetime(2024, 1, 3)),
    ]
    assert con.execute("SELECT count(*) FROM ingest_files").fetchall() == [(2,)]


# --- parsing settings ---------------------------------------------------------------------------------


def test_a_preset_is_the_base_and_the_entry_overrides_and_extends_it():
    (m,) = parse_mappings(
        [
            {
                "files": "ga4_*.jsonl",
                "preset": "ga4",
                "columns": {"userId": "user_properties.crm_id", "traits.email": "user_properties.email"},
                "events": {"purchase": "Order Placed"},
                "timestamp_format": "epoch_ms",
            }
        ]
    )
    assert m.columns["userId"] == "user_properties.crm_id"
    assert m.columns["traits.email"] == "user_properties.email"
    assert m.columns["anonymousId"] == "user_pseudo_id"
    assert m.events["purchase"] == "Order Placed" and m.events["view_item"] == "Product Viewed"
    assert m.defaults == {"type": "track"} and m.timestamp_format == "epoch_ms"
    assert PRESETS["ga4"]["events"]["purchase"] == "Order Completed", "the preset itself is unchanged"


def test_the_first_matching_mapping_applies_and_options_stay_hashable():
    mappings = parse_mappings([{"files": "ga4_*.jsonl", "preset": "ga4"}, {"files": "*.jsonl"}])
    assert mapping_for(mappings, "ga4_1.jsonl") is mappings[0]
    assert mapping_for(mappings, "app.jsonl") is mappings[1]
    assert mapping_for(mappings, "GA4_1.csv") is None
    assert hash(IngestOptions(mappings=mappings)) == hash(
        IngestOptions(mappings=parse_mappings([{"files": "ga4_*.jsonl", "preset": "ga4"}, {"files": "*.jsonl"}]))
    )
    assert FileMapping("*.csv") == FileMapping("*.csv", {}, {}, {}, "iso")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"files": "a", "preset": "ga5"}, r"mappings\[0\]\.preset: unknown preset 'ga5'; allowed: ga4, orders_csv"),
        (
            {"files": "a", "columns": {"properties.revnue": "x"}},
            r"mappings\[0\]\.columns: unknown Segment field 'properties.revnue'; allowed: messageId, type, event, ",
        ),
        ({"files": "a", "colums": {}}, r"mappings\[0\]: unknown key 'colums'; allowed: files, preset, columns"),
        ({"preset": "ga4"}, r"mappings\[0\]\.files: expected a file-name pattern"),
        ({"files": ["a", "b"]}, r"mappings\[0\]\.files: expected a file-name pattern"),
        ({"files": "a", "defaults": {"traits.mail": "x"}}, r"mappings\[0\]\.defaults: unknown Segment field 'traits"),
        ({"files": "a", "defaults": {"type": "event"}}, r"mappings\[0\]\.defaults\.type: unknown event type 'event'"),
        (
            {"files": "a", "defaults": {"context.consent.personalization": True}},
            r"mappings\[0\]\.defaults: 'context.consent.personalization': True is not a string",
        ),
        ({"files": "a", "events": {"purchase": 1}}, r"mappings\[0\]\.events: 'purchase': 1 is not a string"),
        ({"files": "a", "events": {"purchase": " "}}, r"mappings\[0\]\.events: .*must not be empty"),
        ({"files": "a", "columns": "userId"}, r"mappings\[0\]\.columns: expected a mapping"),
        ({"files": "a", "columns": {"userId": "a\nb"}}, r"mappings\[0\]\.columns\.userId: .*control characters"),
        ({"files": "a", "columns": {"userId": "a..b"}}, r"mappings\[0\]\.columns\.userId: .*empty part"),
        ({"files": "a", "timestamp_format": "unix"}, r"mappings\[0\]\.timestamp_format: 'unix' .*allowed: iso, "),
        ({"files": "a", "timestamp_format": "%Y%Q"}, r"mappings\[0\]\.timestamp_format: '%Y%Q' is not a strptime"),
        ({"files": "a", "timestamp_format": 13}, r"mappings\[0\]\.timestamp_format: 13 is not a timestamp format"),
        ("ga4", r"mappings\[0\]: expected a mapping with keys files"),
    ],
)
def test_wrong_settings_are_refused_naming_the_key(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_mappings([entry])


def test_segment_fields_include_both_trait_spellings_and_the_list_must_be_a_list():
    parse_mappings([{"files": "a", "columns": {"traits.email": "mail", "context.traits.email": "ctx.mail"}}])
    assert parse_mappings(None) == () and parse_mappings([]) == ()
    with pytest.raises(ValueError, match="mappings: expected a list"):
        parse_mappings({"files": "a"})


def test_an_sdk_payload_with_only_original_timestamp_is_kept_at_that_time(tmp_path):
    # RudderStack's payloads (and Segment's before its API stamps them) carry originalTimestamp only.
    lines = [
        {"type": "track", "event": "x", "userId": "u1", "originalTimestamp": "2024-05-01T10:00:00.123Z"},
        {
            "type": "track",
            "event": "y",
            "userId": "u1",
            "timestamp": "2024-05-02T00:00:00Z",
            "originalTimestamp": "2024-05-01T23:59:00Z",
        },
        {"type": "track", "event": "z", "userId": "u1", "sentAt": "2024-05-03T00:00:00Z"},
    ]
    landing = _landing(tmp_path, {"rudder.jsonl": "".join(json.dumps(line) + "\n" for line in lines)})
    con, report = _ingest(tmp_path, landing, [])
    _accounted(report)
    kept = con.execute("SELECT event_name, event_at FROM raw_events ORDER BY 1").fetchall()
    assert kept == [("x", datetime(2024, 5, 1, 10, 0, 0, 123000)), ("y", datetime(2024, 5, 2))]  # timestamp first
    assert con.execute("SELECT reason FROM quarantined_events").fetchall() == [("missing_timestamp",)]


def test_a_header_with_other_spaces_case_or_separators_still_finds_its_mapped_columns(tmp_path):
    landing = _landing(
        tmp_path,
        {
            "orders_shop.csv": "\ufeff Order_ID , Customer_Email,Order Date,AMOUNT\n"
            "A1,ann@example.com,2024-01-05,49.90\nA2,bob@example.com,2024-01-06,120.00\n"
        },
    )
    pq.write_table(
        pa.table(
            {"Order-ID": ["B1"], "customer email": ["cat@example.com"], "ORDER_DATE": ["2024-01-07"], "Amount": ["5"]}
        ),
        landing / "orders_more.parquet",
    )
    # Two columns loosely named alike: neither is taken for the other's name.
    (landing / "orders_twice.csv").write_text(
        "order_id,customer email,Customer_Email,order_date,amount\nC1,x,y,2024-01-08,1\n"
    )
    mapping = [{"files": "orders_*", "preset": "orders_csv", "columns": {"userId": "customer_email"}}]
    con, report = _ingest(tmp_path, landing, mapping)
    _accounted(report)
    got = con.execute("SELECT message_id, user_id, event_at, revenue FROM raw_events ORDER BY 1").fetchall()
    assert got == [
        ("A1", "ann@example.com", datetime(2024, 1, 5), 49.9),
        ("A2", "bob@example.com", datetime(2024, 1, 6), 120.0),
        ("B1", "cat@example.com", datetime(2024, 1, 7), 5.0),
    ]
    assert con.execute("SELECT source_file, reason FROM quarantined_events").fetchall() == [
        ("orders_twice.csv", "missing_id")
    ]
