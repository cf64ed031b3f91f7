"""What is published is what the README promises (issue 28): no quarantined text in the snapshot,
no email or phone number in any text field, forget reaches every copy, the generator's truth
stays out of landing, and CSV output cannot run as a spreadsheet formula."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import duckdb
import pandas as pd

from persona_assets.cli import spreadsheet_safe
from persona_assets.core import erasure
from persona_assets.core.identity import resolve
from persona_assets.core.ingest import ingest
from persona_assets.core.publish import publish_snapshot

from .conftest import materialize_all

EMAIL = "jo.doe@example.com"


def _event(n: int, anon: str, **extra) -> dict:
    event = {
        "messageId": f"m{n}",
        "type": "track",
        "event": "Products Searched",
        "anonymousId": anon,
        "timestamp": f"2025-03-01T{10 + n // 60:02d}:{n % 60:02d}:00Z",
    }
    event.update(extra)
    return event


def test_text_fields_hold_no_email_or_phone_and_the_snapshot_no_quarantined_text(persona_home):
    lines = [
        json.dumps(
            _event(1, "a1", context={"page": {"url": "https://shop.example/signup?email=jo.doe%40example.com"}})
        ),
        json.dumps(_event(2, "a1", properties={"query": f"my number is +49 151 2345678, mail {EMAIL}"})),
        json.dumps(_event(3, "a1", properties={"query": "iphone 15 pro 256gb"})),
        # broken lines carrying restricted traits and phones under other keys
        '{"type": "identify", "anonymousId": "a2", "traits": {"first_name": "Kunigunde", "last_name": "Zwetschge",'
        ' "birthday": "1961-07-04", "mobile": "+49 151 9876543", "phone": 49301234567}',
    ]
    (persona_home / "landing" / "events.jsonl").write_text("\n".join(lines) + "\n")
    materialize_all(persona_home)
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        urls = dict(con.execute("SELECT message_id, coalesce(page_url, search_query) FROM raw_events").fetchall())
        raw = con.execute("SELECT raw_text FROM quarantined_events").fetchall()[0][0]
    assert urls["m1"] == "https://shop.example/signup?email=<email>"
    assert urls["m2"] == "my number is <phone>, mail <email>"
    assert urls["m3"] == "iphone 15 pro 256gb", "a search that is no phone number stays as typed"
    assert '"mobile": "<phone>"' in raw and '"phone": "<phone>"' in raw and "\x01" not in raw
    snapshot = persona_home / "serving" / "persona.duckdb"
    with duckdb.connect(str(snapshot), read_only=True) as con:
        assert "raw_text" not in {r[0] for r in con.execute("DESCRIBE quarantined_events").fetchall()}
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        # Every table the README tells users about is there, except the restricted ones.
        assert {"person_id_history", "trait_importance", "user_profiles", "identity_map"} <= tables
        assert not tables & {"identity_pii", "erasure_log"}
        assert con.execute("SELECT reason FROM quarantined_events").fetchall() == [("malformed_json",)]
    data = snapshot.read_bytes().lower()
    for needle in ("kunigunde", "zwetschge", "1961-07-04", "9876543", "2345678", EMAIL, "jo.doe%40"):
        assert needle.encode() not in data, needle


def test_forget_reaches_malformed_csv_rows_truncated_gzip_and_guarded_ids(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    # A CSV row of the wrong width, kept as written in the quarantine.
    (landing / "rows.csv").write_text(
        "messageId,type,event,userId,anonymousId,timestamp,traits_phone\n"
        "c1,track,Page Viewed,u-gone,a-gone,2025-03-01T10:00:00Z,+49 151 1111111\n"
        "c2,track,Page Viewed,u-gone,a-gone,2025-03-01T10:01:00Z,+49 151 1111111,extra\n"
        "c3,track,Page Viewed,u-stay,a-stay,2025-03-01T10:02:00Z,\n"
    )
    # A gzip cut short: its readable first part holds the person's lines.
    body = "".join(json.dumps(_event(n, "a-gone", userId="u-gone")) + "\n" for n in range(40))
    body += "".join(json.dumps(_event(n + 40, "a-stay")) + "\n" for n in range(5))
    packed = gzip.compress(body.encode())
    (landing / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 2 // 3])
    # An anonymousId seen with two userIds is guarded (links nobody); only the person's events carry it.
    guarded = [_event(90, "a-guard", userId="u-gone"), _event(91, "a-guard", userId="u-other")]
    (landing / "guard.jsonl").write_text("".join(json.dumps(e) + "\n" for e in guarded))
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest(con, landing, b"k")
    resolve(con)
    assert con.execute("SELECT count(*) FROM identity_guard WHERE identifier = 'a-guard'").fetchall()[0][0] == 1
    assert con.execute("SELECT count(*) FROM identity_map WHERE identifier = 'a-guard'").fetchall()[0][0] == 1
    con.execute("DELETE FROM raw_events WHERE message_id = 'm91'")  # the other user's copy is gone (forgotten earlier)
    report = erasure.forget(con, b"k", "u-gone", landing)
    quarantined = " ".join(r[0] or "" for r in con.execute("SELECT raw_text FROM quarantined_events").fetchall())
    assert "u-gone" not in quarantined and "a-gone" not in quarantined
    assert con.execute("SELECT count(*) FROM identity_map WHERE identifier = 'a-guard'").fetchall()[0][0] == 0
    with gzip.open(landing / "cut.jsonl.gz", "rb") as fh:
        text = fh.read().decode()
    assert "u-gone" not in text and report.landing_lines > 0
    assert "u-gone" not in (landing / "rows.csv").read_text() and "u-stay" in (landing / "rows.csv").read_text()


def test_csv_output_cannot_run_as_a_formula():
    frame = pd.DataFrame(
        {"name": ['=HYPERLINK("http://x")', "+1", "-cmd", "@SUM(A1)", "plain", None], "n": [-5, 1, 2, 3, 4, 5]}
    )
    safe = spreadsheet_safe(frame)
    assert safe["name"].tolist()[:5] == ['\'=HYPERLINK("http://x")', "'+1", "'-cmd", "'@SUM(A1)", "plain"]
    assert safe["n"].tolist()[0] == -5, "numbers stay numbers"


def test_generate_writes_its_truth_beside_landing_never_in_it(persona_home):
    env = {**os.environ, "PERSONA_HOME": str(persona_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "persona_assets.cli", "generate", "--people", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (persona_home / "landing" / "_truth").exists()
    assert (persona_home / "landing_truth" / "people.parquet").exists()


def test_a_snapshot_table_whose_columns_changed_is_written_whole(tmp_path):
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT 1 AS batch_id, 'secret' AS raw_text")
    path = tmp_path / "serving" / "persona.duckdb"
    publish_snapshot(con, path, {"t": "SELECT batch_id, raw_text FROM t"}, append={"t": "batch_id"})
    publish_snapshot(con, path, {"t": "SELECT batch_id FROM t"}, append={"t": "batch_id"})
    with duckdb.connect(str(path), read_only=True) as snap:
        assert [r[0] for r in snap.execute("DESCRIBE t").fetchall()] == ["batch_id"]
