import gzip
import hashlib
import hmac
import json
import shutil
from datetime import datetime

import duckdb
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_assets.core.ingest import IngestOptions, ingest, landing_files
from persona_assets.core.pii import hmac_hex, normalize_email, normalize_phone

from .conftest import land, truth_counts

KEY = b"test-key"


def _ingest(tmp_path, landing, **kw):
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    return con, ingest(con, landing, KEY, **kw)


def _event(**over):
    ev = {
        "messageId": "m1",
        "type": "track",
        "event": "Product Viewed",
        "anonymousId": "a1",
        "timestamp": "2026-09-01T10:00:00Z",
        "properties": {"price": 9.5, "category": "books"},
    }
    ev.update(over)
    return json.dumps(ev)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv", "parquet"])
def test_every_line_is_kept_quarantined_or_a_counted_copy(tmp_path, generated, fmt):
    source = generated(fmt)
    landing = tmp_path / "landing"
    landing.mkdir()
    land(source, landing)
    con, report = _ingest(tmp_path, landing)
    truth = truth_counts(source)
    assert report.total("lines_read") == truth["lines"]
    assert report.total("events_kept") == truth["events"]
    assert report.total("lines_quarantined") == truth["malformed_lines"]
    assert report.total("duplicates") == truth["duplicate_lines"]
    stored = con.execute("SELECT count(*), count(DISTINCT message_id) FROM raw_events").fetchall()[0]
    assert stored == (truth["events"], truth["events"])
    ledger = con.execute(
        "SELECT sum(lines_read), sum(events_kept + lines_quarantined + duplicates) FROM ingest_files"
    ).fetchall()[0]
    assert ledger[0] == ledger[1] == truth["lines"]
    planted = {k.split(":")[1]: v for k, v in truth.items() if k.startswith("malformed:")}
    found = dict(con.execute("SELECT reason, count(*) FROM quarantined_events GROUP BY 1").fetchall())
    # A truncated JSON line is malformed JSON; a truncated CSV row has the wrong width.
    planted["malformed_json"] = planted.pop("malformed_json", 0) + planted.pop("truncated", 0) * (fmt != "csv")
    if fmt == "csv":
        planted["malformed_row"] = truth.get("malformed:truncated", 0)
    assert found == {k: v for k, v in planted.items() if v}


def test_reingesting_the_same_files_counts_nothing_twice(tmp_path, generated):
    landing = tmp_path / "landing"
    landing.mkdir()
    files = land(generated("jsonl"), landing)
    con, first = _ingest(tmp_path, landing)
    before = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    second = ingest(con, landing, KEY)
    assert second.files == [] and sorted(second.skipped) == sorted(p.name for p in files)
    # The same content under a new name (a re-delivery) is read, and every event in it is a copy.
    shutil.copy(files[0], landing / "redelivered.jsonl")
    third = ingest(con, landing, KEY)
    assert [f.file_name for f in third.files] == ["redelivered.jsonl"]
    assert third.total("events_kept") == 0
    assert third.total("duplicates") + third.total("lines_quarantined") == third.total("lines_read")
    assert con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0] == before


def test_staging_in_small_steps_gives_the_same_tables_as_one_step(tmp_path, generated):
    # A big landing folder is moved on from the stage every stage_bytes; copies of an event
    # in later files must still count as copies, and nothing else may change.
    landing = tmp_path / "landing"
    landing.mkdir()
    files = land(generated("jsonl"), landing)
    shutil.copy(files[0], landing / "zz-redelivered.jsonl")
    tables = []
    for name, stage_bytes in (("one", 1 << 40), ("small", 1)):
        with duckdb.connect(str(tmp_path / f"{name}.duckdb")) as con:
            ingest(con, landing, KEY, IngestOptions(stage_bytes=stage_bytes), now=datetime(2026, 11, 1))
            tables.append(
                [
                    con.execute(f"SELECT * EXCLUDE ({skip}) FROM {t} ORDER BY ALL").fetchall()
                    for t, skip in (
                        ("raw_events", "batch_id"),
                        ("quarantined_events", "quarantined_at"),
                        ("ingest_files", "ingested_at, run_id, mtime_ns, lines_suppressed, lines_erased"),
                    )
                ]
            )
    assert tables[0] == tables[1]
    assert tables[1][2][-1][-1] > 0, "the re-delivered file's lines are counted as copies"


def test_quarantine_names_the_reason_for_each_bad_line(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = [
        _event(messageId="ok1"),  # 1 kept
        "{not json",  # 2
        "[1, 2, 3]",  # 3
        "",  # 4
        _event(messageId="m5", anonymousId=None),  # 5
        _event(messageId="m6", type="trakc"),  # 6
        _event(messageId="m7", timestamp="yesterday"),  # 7
        _event(messageId="m8", timestamp="1970-01-01T00:00:00Z"),  # 8
        _event(messageId="m9", properties={"price": "cheap"}),  # 9
        _event(messageId={"nested": 1}),  # 10
        _event(messageId="m11", event=None),  # 11
        _event(messageId="m12", type="alias", previousId=None),  # 12
        _event(messageId="m13", anonymousId="x" * 1000),  # 13
        _event(messageId="m14", timestamp=None),  # 14
        _event(messageId="m15", properties="not an object"),  # 15
        _event(messageId="ok1"),  # 16 a re-delivered copy of line 1
        _event(messageId=None, anonymousId="a16"),  # 17 kept with a derived id
        _event(messageId=None, anonymousId="a16"),  # 18 its copy
    ]
    (landing / "mixed.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken utf8\n")
    con, report = _ingest(tmp_path, landing)
    got = dict(con.execute("SELECT source_line, reason FROM quarantined_events").fetchall())
    assert got == {
        2: "malformed_json",
        3: "not_an_object",
        4: "empty_line",
        5: "missing_id",
        6: "unknown_type",
        7: "bad_timestamp",
        8: "timestamp_out_of_range",
        9: "bad_type",
        10: "bad_type",
        11: "missing_event_name",
        12: "missing_previous_id",
        13: "field_too_long",
        14: "missing_timestamp",
        15: "bad_type",
        19: "invalid_utf8",
    }
    kept = con.execute("SELECT message_id, source_line FROM raw_events ORDER BY source_line").fetchall()
    assert kept[0] == ("ok1", 1)
    assert kept[1][0].startswith("derived-") and kept[1][1] == 17
    assert report.total("duplicates") == 2 and report.total("lines_read") == 19


def test_a_line_too_long_is_quarantined_with_its_text_cut(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "big.jsonl").write_text(_event(messageId="big", event="x" * 5000) + "\n" + _event() + "\n")
    from persona_assets.core.ingest import IngestOptions

    con, report = _ingest(tmp_path, landing, opts=IngestOptions(max_line_bytes=1000))
    reason, raw = con.execute("SELECT reason, raw_text FROM quarantined_events").fetchall()[0]
    assert reason == "line_too_long" and len(raw) <= 10_000
    assert report.total("events_kept") == 1


def test_emails_and_phones_are_stored_only_as_keyed_hashes(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    variants = ["Jane.Doe@Gmail.com", "  janedoe@gmail.com ", "jane.doe+shop@googlemail.com"]
    lines = [
        _event(messageId=f"i{i}", type="identify", traits={"email": e, "phone": "+1 (415) 555-0100"})
        for i, e in enumerate(variants)
    ]
    lines.append(_event(messageId="bad1", type="trakc", traits={"email": "jane.doe@gmail.com", "phone": "4155550100"}))
    (landing / "pii.jsonl").write_text("\n".join(lines) + "\n")
    con, _ = _ingest(tmp_path, landing)
    hashes = con.execute("SELECT DISTINCT email_hash, phone_hash FROM raw_events").fetchall()
    assert hashes == [(hmac_hex(KEY, "janedoe@gmail.com"), hmac_hex(KEY, "+14155550100"))]
    assert hashes[0][0] == hmac.new(KEY, b"janedoe@gmail.com", hashlib.sha256).hexdigest()
    dump = json.dumps(con.execute("SELECT * FROM raw_events").df().astype(str).values.tolist())
    dump += json.dumps(con.execute("SELECT * FROM quarantined_events").df().astype(str).values.tolist())
    assert "jane" not in dump.lower() and "5550100" not in dump and "555-0100" not in dump
    assert "<email>" in dump and "<phone>" in dump


def test_pii_normalization_rules():
    assert normalize_email(" J.Doe+x@GMAIL.com ") == "jdoe@gmail.com"
    assert normalize_email("J.Doe@Example.org", gmail_rules=True) == "j.doe@example.org"
    assert normalize_email("j.doe+x@gmail.com", gmail_rules=False) == "j.doe+x@gmail.com"
    assert normalize_email("not an email") is None
    assert normalize_phone("(415) 555-0100", "US") == "+14155550100"
    assert normalize_phone("0044 20 7946 0958", None) == "+442079460958"
    assert normalize_phone("12", "US") is None


def test_unreadable_files_are_quarantined_whole_and_the_rest_proceed(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "good.jsonl").write_text(_event() + "\n")
    body = "".join(_event(messageId=f"g{i}", anonymousId=f"anon-{i * 7919}") + "\n" for i in range(2000))
    packed = gzip.compress(body.encode())
    # Cut off before its first line ends (a file cut later keeps the lines before the cut: test_hostile.py).
    (landing / "broken.jsonl.gz").write_bytes(packed[:40])
    (landing / "notgzip.jsonl.gz").write_bytes(b"plain text, not gzip\n")
    (landing / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (landing / "still-writing.jsonl.part").write_text(_event(messageId="later") + "\n")
    con, report = _ingest(tmp_path, landing)
    assert {f.file_name: f.status for f in report.files} == {
        "good.jsonl": "ingested",
        "broken.jsonl.gz": "unreadable",
        "broken.parquet": "unreadable",
        "notgzip.jsonl.gz": "unreadable",
    }
    reasons = con.execute("SELECT source_file, reason FROM quarantined_events ORDER BY 1").fetchall()
    assert reasons == [
        ("broken.jsonl.gz", "unreadable_file"),
        ("broken.parquet", "unreadable_file"),
        ("notgzip.jsonl.gz", "unreadable_file"),
    ]
    assert con.execute("SELECT message_id FROM raw_events").fetchall() == [("m1",)]


def test_landing_skips_partial_and_hidden_files(tmp_path):
    for name in ("a.jsonl", "b.csv.tmp", "c.jsonl.part", ".d.jsonl", "e.txt", "f.parquet"):
        (tmp_path / name).write_text("")
    assert [p.name for p in landing_files(tmp_path)] == ["a.jsonl", "f.parquet"]


def test_a_failed_ingest_leaves_every_table_as_it_was(tmp_path, generated, monkeypatch):
    landing = tmp_path / "landing"
    landing.mkdir()
    files = land(generated("jsonl"), landing)
    for extra in files[1:]:
        extra.rename(tmp_path / extra.name)
    con, _ = _ingest(tmp_path, landing)
    before = con.execute(
        "SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM quarantined_events), "
        "(SELECT count(*) FROM ingest_files)"
    ).fetchall()
    for extra in files[1:]:
        (tmp_path / extra.name).rename(extra)

    import persona_assets.core.ingest as core

    def crash(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(core, "_redact_sql", crash)
    with pytest.raises(RuntimeError, match="half-way"):
        ingest(con, landing, KEY)
    after = con.execute(
        "SELECT (SELECT count(*) FROM raw_events), (SELECT count(*) FROM quarantined_events), "
        "(SELECT count(*) FROM ingest_files)"
    ).fetchall()
    assert after == before


def test_a_run_killed_after_a_committed_group_resumes_without_counting_twice(tmp_path, generated, monkeypatch):
    landing = tmp_path / "landing"
    landing.mkdir()
    files = land(generated("jsonl"), landing)
    import persona_assets.core.ingest as core

    real, calls = core._publish_stage, []

    def dies_on_the_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed half-way")
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "_publish_stage", dies_on_the_second_group)
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    small = IngestOptions(stage_bytes=1)  # every file is its own group
    with pytest.raises(RuntimeError, match="half-way"):
        ingest(con, landing, KEY, small)
    ledger = con.execute("SELECT file_name, lines_read, events_kept + lines_quarantined + duplicates FROM ingest_files")
    committed = ledger.fetchall()
    assert [r[0] for r in committed] == [files[0].name], "the first group is whole, the second left nothing"
    assert committed[0][1] == committed[0][2]
    monkeypatch.setattr(core, "_publish_stage", real)
    report = ingest(con, landing, KEY, small)
    assert report.skipped == [files[0].name]
    truth = truth_counts(generated("jsonl"))
    stored = con.execute("SELECT count(*), count(DISTINCT message_id) FROM raw_events").fetchall()[0]
    assert stored == (truth["events"], truth["events"])
    assert con.execute("SELECT sum(lines_read) FROM ingest_files").fetchall()[0][0] == truth["lines"]


def test_csv_and_parquet_land_in_the_same_columns_as_json(tmp_path, generated):
    seen = {}
    for fmt in ("jsonl", "csv", "parquet"):
        landing = tmp_path / fmt
        landing.mkdir()
        land(generated(fmt), landing)
        con = duckdb.connect()
        ingest(con, landing, KEY)
        seen[fmt] = con.execute(
            "SELECT count(*), count(email_hash), count(phone_hash), sum(revenue)::DECIMAL(18,2), "
            "count(DISTINCT device_id), count(products) FROM raw_events"
        ).fetchall()
    # Same people and events in every format (the generator's choices do not depend on the format).
    people = {fmt: pq.read_table(generated(fmt) / "_truth" / "people.parquet").num_rows for fmt in seen}
    assert len(set(people.values())) == 1
    assert seen["jsonl"][0][1:] == seen["csv"][0][1:] == seen["parquet"][0][1:]


JUNK = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda mid, t, uid, ts, price: json.dumps(
            {"messageId": mid, "type": t, "anonymousId": uid, "timestamp": ts, "properties": {"price": price}}
        ),
        st.one_of(st.none(), st.text(max_size=20), st.integers(), st.lists(st.integers(), max_size=2)),
        st.sampled_from(["track", "identify", "page", "bogus", None, 5]),
        st.one_of(st.none(), st.text(max_size=30), st.just("a" * 5000)),
        st.one_of(st.none(), st.text(max_size=30), st.just("2026-09-01T10:00:00Z"), st.integers()),
        st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=10), st.booleans()),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(JUNK, min_size=1, max_size=40))
def test_fuzzed_lines_are_all_accounted_for(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("fuzz")
    landing = folder / "landing"
    landing.mkdir()
    body = "\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n"
    (landing / "fuzz.jsonl").write_bytes(body.encode("utf-8", errors="surrogatepass"))
    con = duckdb.connect()
    report = ingest(con, landing, KEY)
    read = report.total("lines_read")
    assert read == len(lines)
    assert report.total("events_kept") + report.total("lines_quarantined") + report.total("duplicates") == read
    stored = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
    assert stored == report.total("events_kept")


def test_a_landing_link_that_leads_outside_the_folder_is_refused(tmp_path):
    import duckdb

    from persona_assets.core.ingest import ingest

    landing, outside = tmp_path / "landing", tmp_path / "elsewhere"
    landing.mkdir()
    outside.mkdir()
    event = (
        '{"messageId": "m1", "type": "track", "event": "x", "anonymousId": "a", "timestamp": "2026-01-01T00:00:00Z"}\n'
    )
    (outside / "secret.jsonl").write_text(event)
    (landing / "secret.jsonl").symlink_to(outside / "secret.jsonl")
    (landing / "own.jsonl").write_text(event.replace("m1", "m2"))
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        report = ingest(con, landing, b"k")
        ids = [r[0] for r in con.execute("SELECT message_id FROM raw_events").fetchall()]
    assert ids == ["m2"] and report.refused == ["secret.jsonl"]


def test_security_defaults_key_file_private_ui_local_files_are_names(tmp_path, monkeypatch):
    import stat

    import pytest
    from pydantic import ValidationError

    from persona_assets.cli import build_parser
    from persona_assets.core.pii import load_key
    from persona_assets.settings import IngestConfig

    monkeypatch.delenv("PERSONA_HASH_KEY", raising=False)
    load_key(tmp_path)
    assert stat.S_IMODE((tmp_path / ".hash_key").stat().st_mode) == 0o600
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    for bad in ("../warehouse.duckdb", "/etc/passwd", "sub/file.jsonl", ".."):
        with pytest.raises(ValidationError, match="names of files in the landing folder"):
            IngestConfig(files=[bad])
    assert IngestConfig(files=["events-1.jsonl"]).files == ["events-1.jsonl"]
