"""Forgetting a person everywhere the warehouse and landing folder keep them, and keeping them forgotten.

`forget` finds the person (or people) an identifier belongs to, deletes every row that is
theirs from every warehouse table, scrubs their lines out of the landing files, and logs a
keyed hash of each of their identifiers with the time. Ingestion drops later events that
carry a logged identifier (counted as suppressed in the ledger) until an event of theirs
arrives with personalization consent granted, which lifts the suppression from then on.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from persona_assets.contracts import ErasureLog, ddl
from persona_assets.core.pii import hmac_hex, hmac_sql, normalize_email, normalize_phone
from persona_assets.core.publish import sql_identifier
from persona_assets.core.warehouse import scratch, table_exists, transaction

PREFIX = "erased:"  # a different keyed hash from identity_map's: the log cannot be joined to data
# Landing fields that carry an identifier (JSON paths as key lists, and flat column names).
ID_PATHS = (("userId",), ("anonymousId",), ("previousId",), ("context", "device", "id"))
ID_FLATS = ("userId", "anonymousId", "previousId", "context_device_id")
TRAIT_PARENTS = (("traits",), ("context", "traits"))


def erasure_hash(key: bytes, identifier: str) -> str:
    """The log's keyed hash of an identifier as identity_map holds it (email and phone hashed)."""
    return hmac_hex(key, PREFIX + identifier)


def erasure_hash_sql(expr: str) -> str:
    """`erasure_hash` in DuckDB (needs the `hmac_params` bound)."""
    return hmac_sql(f"'{PREFIX}' || {expr}")


def ensure_log(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(ErasureLog, "erasure_log"))


def active_erasures(con: duckdb.DuckDBPyConnection) -> int:
    """How many identifiers were ever erased (events from before a consent stay suppressed)."""
    ensure_log(con)
    return con.execute("SELECT count(*) FROM erasure_log").fetchall()[0][0]


# --- suppression at ingest -----------------------------------------------------------------


def erasure_hits_sql(ids_sql: str) -> str:
    """The staged lines carrying an erased identifier: (batch_id, line, event_at, consent, erasure_hash).

    `ids_sql` selects (batch_id, line, event_at, consent, identifier) for every identifier a
    staged line carries, in identity_map form. Both engines run it (Spark through `engine.to_spark`)."""
    return f"""SELECT i.batch_id, i.line, i.event_at, i.consent, l.erasure_hash
        FROM ({ids_sql}) i JOIN erasure_log l ON l.erasure_hash = {erasure_hash_sql("i.identifier")}"""


# The erasure log with each identifier's consent moved to the earliest staged line that grants it
# (a line with consent granted lifts its identifiers' erasure from its time on).
CONSENTED_LOG = """SELECT l.erasure_hash, l.erased_at,
      CASE WHEN g.first_consent IS NOT NULL AND (l.consented_at IS NULL OR l.consented_at > g.first_consent)
           THEN g.first_consent ELSE l.consented_at END AS consented_at
    FROM erasure_log l LEFT JOIN (
      SELECT erasure_hash, min(event_at) AS first_consent FROM _erasure_hits
      WHERE consent = 'granted' AND event_at IS NOT NULL GROUP BY 1) g ON g.erasure_hash = l.erasure_hash"""

# The staged lines suppressed: an erased identifier with no consent since, or consent given later.
SUPPRESSED = """SELECT DISTINCT h.batch_id, h.line FROM _erasure_hits h JOIN erasure_log l USING (erasure_hash)
    WHERE l.consented_at IS NULL OR coalesce(h.event_at < l.consented_at, true)"""


def suppress_staged(con: duckdb.DuckDBPyConnection, ids_sql: str, params: dict) -> None:
    """Mark the staged lines of erased people (into temp table `_suppressed(batch_id, line)`) and take
    them out of `_stage`; lines before a consent (or with no such line) are suppressed."""
    hits = f"CREATE OR REPLACE TEMP TABLE _erasure_hits AS {erasure_hits_sql(ids_sql)}"
    con.execute(hits, {k: v for k, v in params.items() if f"${k}" in hits})
    con.execute(
        f"""UPDATE erasure_log l SET consented_at = n.consented_at FROM ({CONSENTED_LOG}) n
            WHERE l.erasure_hash = n.erasure_hash AND l.consented_at IS DISTINCT FROM n.consented_at"""
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _suppressed AS {SUPPRESSED}")
    con.execute("DELETE FROM _stage s USING _suppressed x WHERE s.batch_id = x.batch_id AND s.line = x.line")
    con.execute("DROP TABLE _erasure_hits")


# --- forgetting -----------------------------------------------------------------------------


@dataclass
class ErasureReport:
    people: list[str] = field(default_factory=list)
    identifiers: int = 0
    events: int = 0
    quarantined_lines: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows deleted
    landing_files: int = 0  # files rewritten
    landing_lines: int = 0  # lines taken out of them
    message_ids: list[str] = field(default_factory=list)
    raw_ids: list[str] = field(default_factory=list)  # pseudonymous ids (userId, anonymousId, device id)
    hashed_ids: list[str] = field(default_factory=list)  # email and phone keyed hashes
    erasure_hashes: list[str] = field(default_factory=list)


def candidates(key: bytes, value: str, gmail_rules: bool = True) -> list[str]:
    """Every identity_map form the value could take: as given, and hashed as an email or a phone."""
    forms = [value.strip()]
    email = normalize_email(value, gmail_rules)
    if email:
        forms.append(hmac_hex(key, email))
    phone = normalize_phone(value, None) if any(ch.isdigit() for ch in value) else None
    if phone:
        forms.append(hmac_hex(key, phone))
    return [f for f in dict.fromkeys(forms) if f]


def find_people(con: duckdb.DuckDBPyConnection, forms: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The people an identifier (in any of its `forms`, or a person_id) belongs to, and all their identifiers."""
    if not table_exists(con, "identity_map"):  # nothing resolved yet: no people, only what is ingested
        return [], []
    people = [
        r[0]
        for r in con.execute(
            """SELECT DISTINCT person_id FROM identity_map WHERE identifier IN (SELECT unnest($forms))
               UNION SELECT person_id FROM identity_map WHERE person_id IN (SELECT unnest($forms))
               ORDER BY 1""",
            {"forms": forms},
        ).fetchall()
    ]
    ids = con.execute(
        "SELECT identifier_type, identifier FROM identity_map WHERE person_id IN (SELECT unnest($people)) ORDER BY 1, 2",
        {"people": people},
    ).fetchall()
    return people, ids


def _tables_with(con: duckdb.DuckDBPyConnection, column: str) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            """SELECT c.table_name FROM information_schema.columns c JOIN information_schema.tables t
                 ON t.table_catalog = c.table_catalog AND t.table_schema = c.table_schema AND t.table_name = c.table_name
               WHERE c.table_catalog = current_database() AND c.table_schema = 'main' AND c.column_name = ?
                 AND t.table_type = 'BASE TABLE' ORDER BY 1""",
            [column],
        ).fetchall()
    ]


def forget(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    value: str,
    landing: Path | None = None,
    gmail_rules: bool = True,
    now: datetime | None = None,
) -> ErasureReport:
    """Erase the person `value` names (email, phone, userId, anonymousId or person_id) from the
    warehouse and the landing files, and log their identifiers' keyed hashes. One transaction:
    killed half-way, nothing is erased and running it again does it all."""
    report = plan(con, key, value, gmail_rules)
    erase(con, key, report, landing, gmail_rules, now)
    return report


def plan(con: duckdb.DuckDBPyConnection, key: bytes, value: str, gmail_rules: bool = True) -> ErasureReport:
    """Find what erasing `value` deletes (read-only; the plan lives in this connection's temp tables)."""
    from persona_assets.core.ingest import ensure_tables

    ensure_tables(con)  # a warehouse that has never ingested still logs the erasure, for later events
    forms = candidates(key, value, gmail_rules)
    people, ids = find_people(con, forms)
    report = ErasureReport(people=people, identifiers=len(ids))
    identifiers = sorted({i for _, i in ids} | set(forms))
    report.raw_ids = sorted({i for t, i in ids if t not in ("email", "phone")} | {forms[0]})
    report.hashed_ids = sorted({i for t, i in ids if t in ("email", "phone")} | set(forms[1:]))
    report.erasure_hashes = sorted({erasure_hash(key, i) for i in identifiers})
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _forget_people AS SELECT unnest($p::VARCHAR[]) AS person_id", {"p": people}
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _forget_ids AS SELECT unnest($i::VARCHAR[]) AS identifier", {"i": identifiers}
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _forget_raw AS SELECT unnest($i::VARCHAR[]) AS identifier", {"i": report.raw_ids}
    )
    by_person = (
        "OR message_id IN (SELECT message_id FROM person_events WHERE person_id IN (SELECT person_id FROM _forget_people))"
        if table_exists(con, "person_events")
        else ""
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _forget_events AS
           SELECT message_id, batch_id FROM raw_events
           WHERE user_id IN (SELECT identifier FROM _forget_ids) OR anonymous_id IN (SELECT identifier FROM _forget_ids)
              OR previous_id IN (SELECT identifier FROM _forget_ids) OR email_hash IN (SELECT identifier FROM _forget_ids)
              OR phone_hash IN (SELECT identifier FROM _forget_ids)
              {by_person}"""
    )
    _own_identifiers(con, key, report)
    # Quarantined text keeps ids as JSON strings (CSV and Parquet rows are kept as JSON too); a
    # CSV row of the wrong width is kept as written, so its comma-separated fields are compared.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _forget_quarantine AS
           SELECT q.rowid AS row_id, q.batch_id, q.source_line FROM quarantined_events q
           WHERE q.raw_text IS NOT NULL
             AND EXISTS (SELECT 1 FROM _forget_raw r WHERE contains(q.raw_text, to_json(r.identifier)::VARCHAR)
                           OR (q.reason = 'malformed_row' AND list_contains(
                                 list_transform(string_split(q.raw_text, ','), lambda x: trim(x, ' "')), r.identifier)))"""
    )
    report.message_ids = [r[0] for r in con.execute("SELECT message_id FROM _forget_events").fetchall()]
    return report


def _own_identifiers(con: duckdb.DuckDBPyConnection, key: bytes, report: ErasureReport) -> None:
    """Add to the plan the ids their events carry that nobody else's events do: an id the
    identity guard kept out of linking (a shared-looking anonymousId) is still theirs alone."""
    own = [
        r[0]
        for r in con.execute(
            """SELECT identifier FROM (
                 SELECT unnest([user_id, anonymous_id, previous_id, device_id]) AS identifier FROM raw_events
                 WHERE message_id IN (SELECT message_id FROM _forget_events))
               WHERE identifier IS NOT NULL
               EXCEPT
               SELECT unnest([user_id, anonymous_id, previous_id, device_id]) FROM raw_events
               WHERE message_id NOT IN (SELECT message_id FROM _forget_events)
               EXCEPT
               SELECT identifier FROM _forget_ids"""
        ).fetchall()
    ]
    if not own:
        return
    con.execute("INSERT INTO _forget_ids SELECT unnest($i::VARCHAR[])", {"i": own})
    con.execute("INSERT INTO _forget_raw SELECT unnest($i::VARCHAR[])", {"i": own})
    report.raw_ids = sorted(set(report.raw_ids) | set(own))
    report.identifiers += len(own)
    report.erasure_hashes = sorted(set(report.erasure_hashes) | {erasure_hash(key, i) for i in own})


def _log_erasures(con: duckdb.DuckDBPyConnection, hashes: list[str], now: datetime) -> None:
    """Log (or log again, consent cleared) the erased identifiers' hashes."""
    con.execute("DELETE FROM erasure_log WHERE erasure_hash IN (SELECT unnest($h::VARCHAR[]))", {"h": hashes})
    con.execute("INSERT INTO erasure_log SELECT unnest($h::VARCHAR[]), $now, NULL", {"h": hashes, "now": now})


def erase(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    report: ErasureReport,
    landing: Path | None = None,
    gmail_rules: bool = True,
    now: datetime | None = None,
) -> None:
    """Carry out a `plan` made on the same connection: one warehouse transaction, then the
    landing files' scrubbed copies renamed into place."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    scrubbed = scrub_landing(landing, report, key, gmail_rules) if landing else []
    with scratch(con) as s:
        for name in ("_forget_people", "_forget_ids", "_forget_raw", "_forget_events", "_forget_quarantine"):
            s.adopt(name)  # made by `plan`
        try:
            with transaction(con):
                _erase_rows(con, report)
                for name, size, mtime, old, new in scrubbed:
                    con.execute(
                        "UPDATE ingest_files SET checksum = ?, size_bytes = ?, mtime_ns = ? "
                        "WHERE file_name = ? AND checksum = ?",
                        [new, size, mtime, name, old],
                    )
                _log_erasures(con, report.erasure_hashes, now)
        except BaseException:
            for path, *_ in _tmp_paths(landing, scrubbed):
                path.unlink(missing_ok=True)
            raise
    # The log and ledger are committed: rename the scrubbed copies into place. Killed before this,
    # the old files look changed to ingest, and their erased lines are suppressed on the way in.
    for tmp, target in _tmp_paths(landing, scrubbed):
        os.replace(tmp, target)
    report.landing_files = len(scrubbed)


def _erase_rows(con: duckdb.DuckDBPyConnection, report: ErasureReport) -> None:
    """Every row of the people, their events and their quarantined lines, in every table; the
    ledger keeps its counts (erased lines move to `lines_erased`)."""
    con.execute(
        """UPDATE ingest_files SET events_kept = events_kept - c.kept,
                  lines_quarantined = lines_quarantined - c.quarantined,
                  lines_erased = lines_erased + c.kept + c.quarantined
           FROM (SELECT batch_id, sum(kept) AS kept, sum(quarantined) AS quarantined FROM (
                   SELECT batch_id, 1 AS kept, 0 AS quarantined FROM _forget_events
                   UNION ALL SELECT batch_id, 0, 1 FROM _forget_quarantine WHERE source_line IS NOT NULL)
                 GROUP BY batch_id) c
           WHERE ingest_files.batch_id = c.batch_id"""
    )
    rows: dict[str, int] = {}

    def delete(table: str, where: str) -> None:
        n = con.execute(f'DELETE FROM "{table}" WHERE {where}').fetchall()[0][0]
        if n:
            rows[table] = rows.get(table, 0) + n

    delete("raw_events", "message_id IN (SELECT message_id FROM _forget_events)")
    delete("quarantined_events", "rowid IN (SELECT row_id FROM _forget_quarantine)")
    if "identity_links" in _tables_with(con, "record_id_l"):
        delete(
            "identity_links",
            """record_id_l IN (SELECT record_id FROM identity_pii WHERE person_id IN (SELECT person_id FROM _forget_people))
               OR record_id_r IN (SELECT record_id FROM identity_pii WHERE person_id IN (SELECT person_id FROM _forget_people))
               OR record_id_l IN (SELECT person_id FROM _forget_people)
               OR record_id_r IN (SELECT person_id FROM _forget_people)""",
        )
    for table in _tables_with(con, "message_id"):
        if table != "raw_events":
            delete(table, "message_id IN (SELECT message_id FROM _forget_events)")
    for table in _tables_with(con, "person_id"):
        delete(table, "person_id IN (SELECT person_id FROM _forget_people)")
    for table in _tables_with(con, "identifier"):
        delete(table, "identifier IN (SELECT identifier FROM _forget_ids)")
    for table in _tables_with(con, "old_person_id"):
        delete(
            table,
            "old_person_id IN (SELECT person_id FROM _forget_people) OR new_person_id IN "
            "(SELECT person_id FROM _forget_people)",
        )
    report.rows = rows
    report.events = rows.get("raw_events", 0)
    report.quarantined_lines = rows.get("quarantined_events", 0)


# --- the landing files ----------------------------------------------------------------------


def _tmp_paths(landing: Path | None, scrubbed: list) -> list[tuple[Path, Path]]:
    return [(landing / f".{name}.forget.tmp", landing / name) for name, *_ in scrubbed] if landing else []


class EventMatcher:
    """Whether a landing event belongs to the person: one of their ids, or their email or phone."""

    def __init__(self, report: ErasureReport, key: bytes, gmail_rules: bool) -> None:
        self.ids = set(report.raw_ids)
        self.hashes = set(report.hashed_ids)
        self.key, self.gmail_rules = key, gmail_rules
        needles = [re.escape(json.dumps(i)) for i in sorted(self.ids)]
        # A cheap first look for JSON lines: any id as a JSON string. Emails and phones travel
        # with an id of the same person (that is how they were linked), so this finds their lines.
        self.prefilter = re.compile("|".join(needles).encode()) if needles else None

    def contact(self, email: object, phone: object, locale: object = None) -> bool:
        return not self.hashes.isdisjoint(contact_hashes(self.key, email, phone, locale, self.gmail_rules))

    def json_line(self, line: bytes) -> bool:
        if self.prefilter is None or not self.prefilter.search(line):
            return False
        try:
            event = json.loads(line)
        except ValueError:
            return True  # a broken line that names one of their ids is theirs
        if not isinstance(event, dict):
            return True
        for path in ID_PATHS:
            value = _dig(event, path)
            if isinstance(value, str | int) and str(value).strip() in self.ids:
                return True
        for parent in TRAIT_PARENTS:
            traits = _dig(event, parent)
            if isinstance(traits, dict) and self.contact(
                traits.get("email"), traits.get("phone"), _dig(event, ("context", "locale"))
            ):
                return True
        return False

    def flat_row(self, row: dict) -> bool:
        if any(str(row.get(c) or "").strip() in self.ids for c in ID_FLATS):
            return True
        return any(
            self.contact(row.get(f"{p}_email"), row.get(f"{p}_phone"), row.get("context_locale"))
            for p in ("traits", "context_traits")
        )


def contact_hashes(
    key: bytes, email: object, phone: object, locale: object = None, gmail_rules: bool = True
) -> list[str]:
    """The keyed hashes identity_map holds for an email and a phone as sent (the phone read
    with the locale's region, as ingest reads it); none for a value that is not one."""
    region = str(locale).split("-")[1].upper() if locale and "-" in str(locale) else None
    email = normalize_email(str(email), gmail_rules) if email else None
    phone = normalize_phone(str(phone), region) if phone else None
    return [hmac_hex(key, v) for v in (email, phone) if v]


def event_identifiers(event: dict, key: bytes, gmail_rules: bool = True) -> list[str]:
    """The identifiers a Segment event carries, in identity_map form (email and phone hashed)."""
    found = [str(v).strip() for v in (_dig(event, p) for p in ID_PATHS[:3]) if isinstance(v, str | int)]
    locale = _dig(event, ("context", "locale"))
    for parent in TRAIT_PARENTS:
        traits = _dig(event, parent)
        if isinstance(traits, dict):
            found += contact_hashes(key, traits.get("email"), traits.get("phone"), locale, gmail_rules)
    return found


def _dig(obj: object, path: tuple[str, ...]) -> object:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def scrub_landing(
    landing: Path, report: ErasureReport, key: bytes, gmail_rules: bool = True
) -> list[tuple[str, int, int, str, str]]:
    """Write a copy of each landing file without the person's lines beside it (`.<name>.forget.tmp`).

    Returns (name, new size, new mtime_ns, old checksum, new checksum) per file that changes;
    `forget` renames the copies into place once the warehouse has committed.
    """
    from persona_assets.core.ingest import checksum, file_format, landing_files

    matcher = EventMatcher(report, key, gmail_rules)
    changed = []
    for path in landing_files(landing):
        fmt = file_format(path)
        tmp = landing / f".{path.name}.forget.tmp"
        try:
            removed = _scrub_file(path, fmt, tmp, matcher)
        except (OSError, EOFError, ValueError, pa.ArrowInvalid):
            tmp.unlink(missing_ok=True)
            removed = _scrub_unreadable(path, tmp, matcher)
        if not removed:
            tmp.unlink(missing_ok=True)
            continue
        report.landing_lines += removed
        stat = tmp.stat()
        changed.append((path.name, stat.st_size, stat.st_mtime_ns, checksum(path), checksum(tmp)))
    return changed


def _scrub_file(path: Path, fmt: str, tmp: Path, matcher: EventMatcher) -> int:
    """Copy `path` to `tmp` without the matching lines or rows; returns how many were left out."""
    removed = 0
    if fmt in ("jsonl", "jsonl.gz"):
        opener = gzip.open if fmt == "jsonl.gz" else open
        with opener(path, "rb") as src, opener(tmp, "wb") as dst:
            try:
                for line in src:
                    if matcher.json_line(line.rstrip(b"\r\n")):
                        removed += 1
                    else:
                        dst.write(line)
            except (EOFError, zlib.error, gzip.BadGzipFile):
                # A truncated gzip: the lines before the break are read like any others (and the
                # copy keeps them, whole); what cannot be decompressed holds no event to keep.
                if fmt != "jsonl.gz":
                    raise
    elif fmt == "csv":
        with (
            open(path, encoding="utf-8", errors="replace", newline="") as src,
            open(tmp, "w", encoding="utf-8", newline="") as dst,
        ):
            reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
            header = next(reader, [])
            writer.writerow(header)
            for row in reader:
                if matcher.flat_row(dict(zip(header, row))) or (len(row) != len(header) and matcher.ids & set(row)):
                    removed += 1
                else:
                    writer.writerow(row)
    else:
        table = pq.read_table(path)
        keep = pa.array([not matcher.flat_row(r) for r in _flat_rows(table)], pa.bool_())
        removed = len(table) - pc.sum(keep).as_py() if len(table) else 0
        if removed:
            pq.write_table(table.filter(keep), tmp)
    return removed


def _flat_rows(table: pa.Table):
    wanted = [
        c for c in table.column_names if c in ID_FLATS or c.endswith(("_email", "_phone")) or c == "context_locale"
    ]
    yield from table.select(wanted).to_pylist()


def _scrub_unreadable(path: Path, tmp: Path, matcher: EventMatcher) -> int:
    """A file ingest could not read (bad gzip, broken Parquet) holds no event; if its bytes name
    the person it goes whole (an empty copy replaces it)."""
    data = path.read_bytes()
    if matcher.prefilter is None or not matcher.prefilter.search(data):
        return 0
    tmp.write_bytes(b"")
    return 1


def compact(path: Path) -> int:
    """Rewrite a DuckDB file with only its live rows and swap it in, so deleted rows leave no
    bytes behind in freed blocks; returns the bytes saved. Needs the only connection to it."""
    tmp = path.with_name(f".{path.name}.compact.tmp")
    for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
        leftover.unlink(missing_ok=True)
    before = path.stat().st_size
    with duckdb.connect(str(path)) as con:
        name = con.execute("SELECT current_database()").fetchall()[0][0]
        con.execute("ATTACH $path AS _compact", {"path": str(tmp)})
        try:
            con.execute(f"COPY FROM DATABASE {sql_identifier(name)} TO _compact")
            con.execute("CHECKPOINT _compact")
        finally:
            con.execute("DETACH _compact")
    os.replace(tmp, path)
    path.with_name(path.name + ".wal").unlink(missing_ok=True)
    return before - path.stat().st_size
