"""Landing files to `raw_events`: read, type and validate in DuckDB, quarantine the bad, hash PII.

Every line read ends in exactly one of three places: `raw_events`, `quarantined_events`,
or the ledger's count of re-delivered copies of a messageId already kept. One call is
one transaction: a run killed half-way leaves the tables as they were.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from persona_assets.contracts import IngestFiles, QuarantinedEvents, RawEvents, columns, ddl
from persona_assets.core.erasure import active_erasures, ensure_log, suppress_staged
from persona_assets.core.events import (
    EVENT_TYPES,
    FIELD_BY_COLUMN,
    FIELDS,
    FLAT_COLUMNS,
    MAX_AMOUNT,
    TRIMMED_COLUMNS,
    Field,
    consent_sql,
)
from persona_assets.core.faults import kill_point
from persona_assets.core.mappings import (
    EPOCH_FORMATS,
    ITEM_KEYS,
    FileMapping,
    json_path,
    mapping_for,
    strptime_has_zone,
)
from persona_assets.core.pii import (
    hmac_params,
    hmac_sql,
    normalize_email_sql,
    normalize_phone,
    redact_line_sql,
    scrub_text_sql,
)
from persona_assets.core.warehouse import bind

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".csv": "csv", ".parquet": "parquet"}
PARTIAL_SUFFIXES = (".tmp", ".part")
RAW_TEXT_LIMIT = 10_000  # characters of a bad line kept in quarantine; the file keeps the rest


@dataclass(frozen=True)
class IngestOptions:
    """Tunables of ingestion (mirrored by `settings.IngestConfig`)."""

    min_event_at: datetime = datetime(1970, 1, 1, 0, 0, 1)
    max_future_hours: float = 24.0
    max_line_bytes: int = 1_000_000
    max_id_chars: int = 256
    chunk_bytes: int = 64 * 1024 * 1024
    # Files are committed in groups of about this many bytes of input, so a large landing
    # folder is ingested in bounded memory.
    stage_bytes: int = 512 * 1024 * 1024
    gmail_rules: bool = True
    # Where foreign exports keep the Segment fields (`core.mappings`); the first whose pattern
    # matches a file's name applies, and a file matching none is read as Segment events.
    mappings: tuple[FileMapping, ...] = ()


@dataclass
class FileReport:
    file_name: str
    status: str
    lines_read: int = 0
    events_kept: int = 0
    lines_quarantined: int = 0
    duplicates: int = 0
    lines_suppressed: int = 0  # lines of erased people, dropped


@dataclass
class IngestReport:
    files: list[FileReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # links that lead outside the landing folder
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(f, attr) for f in self.files)


def file_format(path: Path) -> str | None:
    name = path.name
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


def landing_files(landing: Path) -> list[Path]:
    """Complete event files at the top of the landing folder, oldest first.

    Files still being written (`*.tmp`, `*.part`, hidden files) are left for later.
    """
    if not landing.is_dir():
        return []
    found = [
        p
        for p in landing.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(PARTIAL_SUFFIXES)
        and file_format(p)
        and _inside(p, landing)
    ]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _inside(path: Path, landing: Path) -> bool:
    """A landing entry is read only if it really is in the landing folder: a symlink to a file
    elsewhere (`/etc/passwd`, another tenant's folder) is refused."""
    return path.resolve().parent == landing.resolve()


def refused_files(landing: Path) -> list[str]:
    """Landing entries that lead outside the landing folder, by name (never read)."""
    if not landing.is_dir():
        return []
    return sorted(p.name for p in landing.iterdir() if p.is_file() and file_format(p) and not _inside(p, landing))


def checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(RawEvents, "raw_events"))
    con.execute(ddl(QuarantinedEvents, "quarantined_events"))
    con.execute(ddl(IngestFiles, "ingest_files"))
    # Warehouses from before erasure existed get the ledger's two new counts.
    for name in ("lines_suppressed", "lines_erased"):
        con.execute(f"ALTER TABLE ingest_files ADD COLUMN IF NOT EXISTS {name} BIGINT DEFAULT 0")
    ensure_log(con)


# --- reading: every format becomes Arrow batches of (line, raw, <flat columns>) -------------


def _json_line_batches(path: Path, chunk_bytes: int) -> Iterator[pa.Table]:
    """Split a (gzipped) JSON-lines file into numbered lines, without parsing them.

    Newlines are found with numpy and the lines handed to Arrow as offsets into the
    block read, so no Python object is made per line.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    rest = b""
    with opener(path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            data = rest + block
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            if len(ends) == 0:
                rest = data
                continue
            rest = data[ends[-1] + 1 :]
            yield _line_table(data[: ends[-1] + 1], ends, line_no)
            line_no += len(ends)
    if rest:
        yield _line_table(rest + b"\n", np.array([len(rest)]), line_no)


def _line_table(data: bytes, ends: np.ndarray, first: int) -> pa.Table:
    """Lines of `data` ending at the newline offsets `ends`, numbered from first + 1."""
    offsets = np.concatenate(([0], ends + 1)).astype(np.int64)
    binary = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    numbers = pa.array(np.arange(first + 1, first + 1 + len(ends), dtype=np.int64))
    try:
        text = binary.cast(pa.large_string())
        bad_utf8 = pa.array(np.zeros(len(ends), dtype=bool))
    except pa.ArrowInvalid:
        lines = binary.to_pylist()
        decoded = [b.decode("utf-8", errors="replace") for b in lines]
        text = pa.array(decoded, pa.large_string())
        bad_utf8 = pa.array([d.encode("utf-8") != b for d, b in zip(decoded, lines)])
    text = pc.utf8_rtrim(text, characters="\r\n")
    return pa.table({"line": numbers, "raw": text, "bad_utf8": bad_utf8})


def _csv_batches(path: Path, chunk_bytes: int, sources: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """CSV rows as strings with their line numbers; rows of the wrong width become bad rows.
    `sources`: the columns a mapping reads, kept besides the Segment ones."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = next(csv.reader([fh.readline()]), [])
    if not header:
        raise UnreadableFile("CSV file without a header line")
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=min(chunk_bytes, 1 << 24), use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    next_line = 2  # line 1 is the header
    for batch in reader:
        # Valid rows fill the line numbers the invalid ones (reported during this batch) did not take.
        taken = sorted(n for n, _ in invalid)
        numbers: list[int] = []
        line = next_line
        ti = 0
        while len(numbers) < batch.num_rows:
            while ti < len(taken) and taken[ti] < line:
                ti += 1
            if ti < len(taken) and taken[ti] == line:
                line += 1
                continue
            numbers.append(line)
            line += 1
        bad = [(n, t) for n, t in invalid if n >= next_line]
        next_line = max([line] + [n + 1 for n, _ in bad])
        invalid.clear()
        yield _flat_table(pa.Table.from_batches([batch]), numbers, sources)
        if bad:
            yield _bad_rows_table(bad, sources)
    if invalid:
        yield _bad_rows_table(invalid, sources)


def _parquet_batches(path: Path, rows: int = 500_000, sources: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    first = 1
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
        table = pa.Table.from_batches([batch])
        table = pa.table({name: table[name].cast(pa.string()) for name in table.column_names})
        yield _flat_table(table, list(range(first, first + table.num_rows)), sources)
        first += table.num_rows


def _source_column(i: int) -> str:
    """The chunk's name for a mapping's i-th source column: the file's own names never reach the SQL."""
    return f"_source{i}"


def _flat_table(table: pa.Table, numbers: list[int], sources: tuple[str, ...] = ()) -> pa.Table:
    cols = {"line": pa.array(numbers, pa.int64()), "malformed": pa.nulls(table.num_rows, pa.string())}
    for flat in FLAT_COLUMNS:
        cols[flat] = table[flat] if flat in table.column_names else pa.nulls(table.num_rows, pa.string())
    for i, source in enumerate(sources):
        cols[_source_column(i)] = (
            table[source] if source in table.column_names else pa.nulls(table.num_rows, pa.string())
        )
    return pa.table(cols)


def _bad_rows_table(rows: list[tuple[int, str]], sources: tuple[str, ...] = ()) -> pa.Table:
    n = len(rows)
    cols = {
        "line": pa.array([r[0] for r in rows], pa.int64()),
        "malformed": pa.array([r[1] for r in rows], pa.string()),
    }
    for flat in FLAT_COLUMNS:
        cols[flat] = pa.nulls(n, pa.string())
    for i in range(len(sources)):
        cols[_source_column(i)] = pa.nulls(n, pa.string())
    return pa.table(cols)


# --- typing and validation in SQL -------------------------------------------------------------

ID_FIELDS = [f for f in FIELDS if f.kind == "id"]
CONTAINERS = {"$.properties": "OBJECT", "$.traits": "OBJECT", "$.context": "OBJECT", "$.properties.products": "ARRAY"}


PRODUCTS = FIELD_BY_COLUMN["products"]


def _json_paths(mapping: FileMapping | None) -> tuple[dict[str, tuple[str, ...]], list, list]:
    """Each field's JSON paths (a mapped path first), the id paths type-checked, and the containers,
    each check with the Segment name its message gives."""
    fields = {f.column: f.paths for f in FIELDS}
    if mapping is not None:
        fields = {f.column: (*(json_path(s) for s in mapping.sources(f)), *f.paths) for f in FIELDS}
    ids = [(p, p.removeprefix("$.") if p in f.paths else f.paths[0][2:]) for f in ID_FIELDS for p in fields[f.column]]
    containers = [(p, kind, p.removeprefix("$.")) for p, kind in CONTAINERS.items()]
    if mapping is not None:
        containers += [(json_path(s), "ARRAY", PRODUCTS.paths[0][2:]) for s in mapping.sources(PRODUCTS)]
    return fields, ids, containers


@functools.lru_cache(maxsize=64)
def _json_select(mapping: FileMapping | None = None) -> str:
    """From (line, raw, bad_utf8) to (line, raw, parse_error, bad_field, <one VARCHAR per field>).

    A mapped file's paths come from its settings, so they are bound (`_json_params`), not pasted."""
    fields, ids, containers = _json_paths(mapping)
    paths = [p for f in FIELDS for p in fields[f.column]]
    type_paths = ["$"] + [p for p, _ in ids] + [p for p, _, _ in containers]
    path_list = "[" + ", ".join(f"'{p}'" for p in paths) + "]" if mapping is None else "$map_paths"
    type_list = "[" + ", ".join(f"'{p}'" for p in type_paths) + "]" if mapping is None else "$map_type_paths"
    # 1-based list positions for each field's paths
    index = {p: i + 1 for i, p in enumerate(paths)}
    values = ",\n".join(
        f"  coalesce({', '.join(f'v[{index[p]}]' for p in fields[f.column])}) AS {f.column}"
        if len(fields[f.column]) > 1
        else f"  v[{index[f.paths[0]]}] AS {f.column}"
        for f in FIELDS
    )
    id_checks = " ".join(
        f"WHEN t[{i + 2}] IN ('OBJECT', 'ARRAY', 'BOOLEAN') THEN '{label}'" for i, (_, label) in enumerate(ids)
    )
    offset = 2 + len(ids)
    container_checks = " ".join(
        f"WHEN t[{offset + i}] NOT IN ('{kind}', 'NULL') THEN '{label}'"
        for i, (_, kind, label) in enumerate(containers)
    )
    return f"""
WITH lines AS (
  SELECT line, raw,
    CASE WHEN bad_utf8 THEN 'invalid_utf8'
         WHEN trim(raw) = '' THEN 'empty_line'
         WHEN strlen(raw) > $max_line_bytes THEN 'line_too_long'
         WHEN NOT json_valid(raw) THEN 'malformed_json' END AS early_error
  FROM _chunk
), typed AS (
  SELECT line, raw, early_error,
    CASE WHEN early_error IS NULL THEN json_type(raw, {type_list}) END AS t
  FROM lines
), parsed AS (
  SELECT line, raw, t,
    coalesce(early_error, CASE WHEN t[1] <> 'OBJECT' THEN 'not_an_object' END) AS parse_error,
    CASE WHEN parse_error IS NULL THEN json_extract_string(raw, {path_list}) END AS v
  FROM typed
)
SELECT line, raw, parse_error,
  CASE WHEN parse_error IS NULL THEN CASE {id_checks} {container_checks} END END AS bad_field,
{values}
FROM parsed
"""


def _json_params(mapping: FileMapping) -> dict:
    fields, ids, containers = _json_paths(mapping)
    return {
        "map_paths": [p for f in FIELDS for p in fields[f.column]],
        "map_type_paths": ["$"] + [p for p, _ in ids] + [p for p, _, _ in containers],
    }


def _flat_value(f: Field, mapping: FileMapping | None = None) -> str:
    names = list(f.flats)
    if mapping is not None:
        sources = mapping.source_columns()
        names = [_source_column(sources.index(s)) for s in mapping.sources(f)] + names
    parts = [f"nullif(\"{name}\", '')" for name in names]
    return f"coalesce({', '.join(parts)})" if len(parts) > 1 else parts[0]


def _raw_columns(mapping: FileMapping) -> dict[str, str]:
    """A mapped row's quarantine text and derived id: its Segment columns and mapped columns, by name."""
    columns = {flat: flat for flat in FLAT_COLUMNS}
    for i, source in enumerate(mapping.source_columns()):
        columns.setdefault(source, _source_column(i))
    return columns


@functools.lru_cache(maxsize=64)
def _flat_select(mapping: FileMapping | None = None) -> str:
    """From CSV/Parquet columns (already strings) to the same shape as `_json_select`."""
    values = ",\n".join(f"  {_flat_value(f, mapping)} AS {f.column}" for f in FIELDS)
    if mapping is None:
        struct = ", ".join(f'"{flat}" := "{flat}"' for flat in FLAT_COLUMNS)
        raw = f"to_json(struct_pack({struct}))::VARCHAR"
    else:  # the file's own column names are bound as the keys ($map_raw_names)
        chunk_columns = ", ".join(f'"{c}"' for c in _raw_columns(mapping).values())
        raw = f"to_json(map($map_raw_names, [{chunk_columns}]))::VARCHAR"
    products = _flat_value(PRODUCTS, mapping)
    return f"""
SELECT line,
  coalesce(malformed, {raw}) AS raw,
  CASE WHEN malformed IS NOT NULL THEN 'malformed_row' END AS parse_error,
  CASE WHEN malformed IS NULL AND {products} IS NOT NULL AND NOT json_valid({products})
       THEN 'properties.products' END AS bad_field,
{values}
FROM _chunk
"""


# --- a mapped file's defaults, event names and timestamps ----------------------------------------


def _products_sql(expr: str) -> str:
    """A product list with GA4's item keys also under Segment's (`item_category` as `category`)."""
    keys = ", ".join(f"'{segment}', coalesce(x->>'{segment}', x->>'{item}')" for item, segment in ITEM_KEYS.items())
    return f"""CASE WHEN json_valid({expr}) AND json_type({expr}) = 'ARRAY' THEN to_json(list_transform(
      json_extract({expr}, '$[*]'),
      lambda x: CASE WHEN json_type(x) = 'OBJECT' THEN json_merge_patch(x, json_object({keys})) ELSE x END))::VARCHAR
    ELSE {expr} END"""


def _mapping_select(source_sql: str, mapping: FileMapping) -> str:
    """A mapped file's lines after its defaults fill empty fields, then its event names are translated
    (a name it does not list is kept as sent). Every value is bound (`_mapping_params`)."""
    replace: dict[str, str] = {}
    for f in FIELDS:
        if mapping.default(f) is not None:
            empty = f"nullif(trim({f.column}), '') IS NULL"
            replace[f.column] = f"CASE WHEN {empty} THEN $map_default_{f.column} ELSE {f.column} END"
    if mapping.events:
        name = replace.get("event_name", "event_name")
        position = f"list_position($map_event_sources, trim({name}))"
        replace["event_name"] = f"coalesce(list_extract($map_event_targets, {position}), {name})"
    if mapping.sources(PRODUCTS):
        replace["products"] = _products_sql("products")
    if not replace:
        return source_sql
    return f"SELECT * REPLACE ({', '.join(f'{sql} AS {c}' for c, sql in replace.items())}) FROM ({source_sql})"


def _mapping_params(mapping: FileMapping | None, fmt: str) -> dict:
    if mapping is None:
        return {}
    params = _json_params(mapping) if fmt in ("jsonl", "jsonl.gz") else {"map_raw_names": list(_raw_columns(mapping))}
    params |= {f"map_default_{f.column}": mapping.default(f) for f in FIELDS if mapping.default(f) is not None}
    params |= {"map_event_sources": list(mapping.events), "map_event_targets": list(mapping.events.values())}
    return params | {"map_timestamp_format": mapping.timestamp_format}


# A numeric offset after the time, and one that is a real offset: at most 18 hours (real ones run
# from -12:00 to +14:00) with minutes and seconds under 60; DuckDB alone would take -99:00.
NUMERIC_OFFSET = r":[0-9]{2}(\.[0-9]*)?\s*[+-][0-9]"
VALID_OFFSET = r"[+-]((0[0-9]|1[0-7])(:?[0-5][0-9]){0,2}|18(:?00){0,2})$"


def _timestamp_sql(text: str, timestamp_format: str) -> str:
    """A UTC TIMESTAMP from the timestamp text as the file writes it, NULL where it does not parse."""
    zoned = f"timezone('UTC', TRY_CAST({text} AS TIMESTAMPTZ))"
    if timestamp_format == "iso":
        # A time without a zone is UTC, whatever the session's zone; a zone is `Z`, an offset or a name.
        return f"""CASE WHEN suffix({text}, 'Z') THEN {zoned}
          WHEN regexp_matches({text}, '{NUMERIC_OFFSET}') THEN
            CASE WHEN regexp_matches({text}, '{VALID_OFFSET}') THEN {zoned} END
          WHEN regexp_matches({text}, '[A-Za-z]$') THEN {zoned}
          ELSE TRY_CAST({text} AS TIMESTAMP) END"""
    if timestamp_format in EPOCH_FORMATS:
        # Exact decimal arithmetic to microseconds; past ±9e18 µs (a BIGINT's reach, DuckDB's
        # timestamps) a value is no time rather than an error that would stop the run.
        number = f"CASE WHEN regexp_full_match({text}, '-?[0-9]{{1,18}}(\\.[0-9]+)?') THEN {text} END"
        micros = f"round(TRY_CAST({number} AS DECIMAL(38, 9)) * {EPOCH_FORMATS[timestamp_format]})"
        return f"CASE WHEN abs({micros}) < 9e18 THEN make_timestamp(CAST({micros} AS BIGINT)) END"
    parsed = f"try_strptime({text}, $map_timestamp_format)"
    if not strptime_has_zone(timestamp_format):
        return parsed
    offset_ok = f"NOT regexp_matches({text}, '[+-][0-9]{{2}}:?[0-9]{{2}}$') OR regexp_matches({text}, '{VALID_OFFSET}')"
    return f"CASE WHEN {offset_ok} THEN timezone('UTC', {parsed}) END"


def _non_finite_sql(expr: str) -> str:
    """DuckDB expression: the JSON text holds NaN, Infinity or a number too large for a double
    (DuckDB's JSON reader takes them; a strings' content does not count). Only text with one of
    their spellings is tokenized."""
    token = r"""'"(?:[^"\\]|\\.)*"|(-?(?:NaN|Infinity|[0-9][0-9.eE+-]*))'"""  # a string, or a number's group
    numbers = f"regexp_extract_all({expr}, {token}, 1)"
    return f"""coalesce(CASE WHEN regexp_matches({expr}, 'NaN|Infinity|[eE][+]?[0-9]{{3}}') THEN
      list_bool_or(list_transform({numbers}, lambda x: x <> '' AND NOT isfinite(TRY_CAST(x AS DOUBLE)))) END, false)"""


def _validate_select(source_sql: str, timestamp_format: str = "iso") -> str:
    """Type each field and give each line its first problem (reason), or none.

    A price or revenue must be a finite amount from 0 to MAX_AMOUNT (a refund is its own event,
    `Order Refunded`, with a positive amount), so sums of them downstream stay finite and
    non-negative; a product list must not hold a number that is not finite."""
    ids = [f.column for f in ID_FIELDS]
    too_long = " ".join(f"WHEN strlen({c}) > $max_id_chars THEN '{c}'" for c in ids)
    types = ", ".join(f"'{t}'" for t in EVENT_TYPES)
    cleaned = {column: f"nullif(trim(s.{column}), '')" for column in TRIMMED_COLUMNS}
    return f"""
WITH s AS ({source_sql}),
v AS (
  SELECT s.line, s.raw, s.parse_error, s.bad_field,
    {cleaned["message_id"]} AS message_id,
    lower({cleaned["event_type"]}) AS event_type,
    {cleaned["event_name"]} AS event_name,
    {cleaned["user_id"]} AS user_id,
    {cleaned["anonymous_id"]} AS anonymous_id,
    {cleaned["previous_id"]} AS previous_id,
    {cleaned["event_at"]} AS event_at_text,
    {_timestamp_sql(cleaned["event_at"], timestamp_format)} AS event_at,
    s.email, s.phone, s.first_name, s.last_name, s.birthday, s.age, s.gender, s.postal_code, s.city, s.country,
    {consent_sql("s.consent")} AS consent, {cleaned["device_id"]} AS device_id, s.device_type, s.os_name, s.timezone, s.locale, s.page_url,
    s.category, {cleaned["product_id"]} AS product_id,
    s.price AS price_text, TRY_CAST(s.price AS DOUBLE) AS price,
    s.quantity AS quantity_text, TRY_CAST(TRY_CAST(s.quantity AS DOUBLE) AS BIGINT) AS quantity,
    s.revenue AS revenue_text, TRY_CAST(s.revenue AS DOUBLE) AS revenue,
    {cleaned["order_id"]} AS order_id, s.products, s.search_query
  FROM s
)
SELECT *,
  CASE
    WHEN parse_error IS NOT NULL THEN parse_error
    WHEN bad_field IS NOT NULL THEN 'bad_type'
    WHEN user_id IS NULL AND anonymous_id IS NULL THEN 'missing_id'
    WHEN event_type IS NULL OR event_type NOT IN ({types}) THEN 'unknown_type'
    WHEN event_at_text IS NULL THEN 'missing_timestamp'
    WHEN event_at IS NULL THEN 'bad_timestamp'
    WHEN event_at < $min_event_at OR event_at > $max_event_at THEN 'timestamp_out_of_range'
    WHEN (price_text IS NOT NULL AND price IS NULL) OR (revenue_text IS NOT NULL AND revenue IS NULL)
      OR (quantity_text IS NOT NULL AND (quantity IS NULL OR quantity < 0)) THEN 'bad_type'
    WHEN NOT (price BETWEEN 0 AND {MAX_AMOUNT:g}) OR NOT (revenue BETWEEN 0 AND {MAX_AMOUNT:g})
      OR {_non_finite_sql("products")} THEN 'bad_value'
    WHEN event_type = 'track' AND event_name IS NULL THEN 'missing_event_name'
    WHEN event_type = 'alias' AND previous_id IS NULL THEN 'missing_previous_id'
    WHEN {" OR ".join(f"strlen({c}) > $max_id_chars" for c in ids)} THEN 'field_too_long'
  END AS reason,
  CASE
    WHEN parse_error IS NOT NULL THEN NULL
    WHEN bad_field IS NOT NULL THEN bad_field || ' has the wrong JSON type'
    WHEN event_type IS NOT NULL AND event_type NOT IN ({types}) THEN 'type ' || event_type
    WHEN event_at IS NULL AND event_at_text IS NOT NULL THEN 'timestamp ' || left(event_at_text, 64)
    WHEN event_at < $min_event_at OR event_at > $max_event_at THEN 'timestamp ' || event_at_text
    WHEN price_text IS NOT NULL AND price IS NULL THEN 'price ' || left(price_text, 64)
    WHEN revenue_text IS NOT NULL AND revenue IS NULL THEN 'revenue ' || left(revenue_text, 64)
    WHEN quantity_text IS NOT NULL AND (quantity IS NULL OR quantity < 0) THEN 'quantity ' || left(quantity_text, 64)
    WHEN NOT (price BETWEEN 0 AND {MAX_AMOUNT:g}) THEN 'price ' || left(price_text, 64)
    WHEN NOT (revenue BETWEEN 0 AND {MAX_AMOUNT:g}) THEN 'revenue ' || left(revenue_text, 64)
    WHEN {_non_finite_sql("products")} THEN 'products hold a number that is not finite'
    ELSE CASE {too_long} END
  END AS detail
FROM v
"""


STAGE_COLUMNS = [
    "message_id", "event_type", "event_name", "user_id", "anonymous_id", "previous_id", "event_at",
    "email", "phone", "first_name", "last_name", "birthday", "age", "gender", "postal_code", "city",
    "country", "consent", "device_id", "device_type", "os_name", "timezone", "locale", "page_url",
    "category", "product_id", "price", "quantity", "revenue", "order_id", "products", "search_query",
]  # fmt: skip


def _create_stage(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("DROP TABLE IF EXISTS _stage")
    con.execute(
        """CREATE TEMP TABLE _stage (
        batch_id BIGINT, file_order INTEGER, line BIGINT, reason VARCHAR, detail VARCHAR, raw VARCHAR,
        message_id VARCHAR, event_type VARCHAR, event_name VARCHAR, user_id VARCHAR, anonymous_id VARCHAR,
        previous_id VARCHAR, event_at TIMESTAMP, email VARCHAR, phone VARCHAR, first_name VARCHAR,
        last_name VARCHAR, birthday VARCHAR, age VARCHAR, gender VARCHAR, postal_code VARCHAR, city VARCHAR,
        country VARCHAR, consent VARCHAR, device_id VARCHAR, device_type VARCHAR, os_name VARCHAR,
        timezone VARCHAR, locale VARCHAR, page_url VARCHAR, category VARCHAR, product_id VARCHAR,
        price DOUBLE, quantity BIGINT, revenue DOUBLE, order_id VARCHAR, products VARCHAR, search_query VARCHAR)"""
    )


def _stage_file(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, batch_id: int, file_order: int,
                opts: IngestOptions, params: dict) -> int:  # fmt: skip
    """Read one file into `_stage`, through its mapping if one matches its name; returns the number
    of lines read."""
    mapping = mapping_for(opts.mappings, path.name)
    sources = mapping.source_columns() if mapping is not None else ()
    if fmt in ("jsonl", "jsonl.gz"):
        batches, select = _json_line_batches(path, opts.chunk_bytes), _json_select(mapping)
    elif fmt == "csv":
        batches, select = _csv_batches(path, opts.chunk_bytes, sources), _flat_select(mapping)
    else:
        batches, select = _parquet_batches(path, sources=sources), _flat_select(mapping)
    batches = iter(batches)
    if mapping is not None:
        select = _mapping_select(select, mapping)
    sql = _validate_select(select, mapping.timestamp_format if mapping is not None else "iso")
    cols = ", ".join(STAGE_COLUMNS)
    insert = f"""
        INSERT INTO _stage (batch_id, file_order, line, reason, detail, raw, {cols})
        SELECT $batch_id, $file_order, line, reason, detail,
               CASE WHEN reason IS NOT NULL THEN left(raw, {RAW_TEXT_LIMIT})
                    WHEN message_id IS NULL THEN raw END,
               {cols}
        FROM ({sql})"""
    bound = bind(insert, {**params, **_mapping_params(mapping, fmt), "batch_id": batch_id, "file_order": file_order})
    lines = 0
    while True:
        try:
            chunk = next(batches)
        except StopIteration:
            break
        except (UnreadableFile, *READ_ERRORS) as exc:
            raise UnreadableFile(f"{type(exc).__name__}: {exc}") from exc
        con.register("_chunk", chunk)
        try:
            con.execute(insert, bound)
        finally:
            con.unregister("_chunk")
        lines += chunk.num_rows
    return lines


def contract_params(opts: IngestOptions | None = None, now: datetime | None = None) -> dict:
    """The contract's limits as the validation query binds them."""
    opts = opts or IngestOptions()
    now = now or datetime.now(UTC).replace(tzinfo=None)
    return {
        "max_line_bytes": opts.max_line_bytes,
        "max_id_chars": opts.max_id_chars,
        "min_event_at": opts.min_event_at,
        "max_event_at": now + timedelta(hours=opts.max_future_hours),
    }


def query_lines(con: duckdb.DuckDBPyConnection, lines: list[str], params: dict, bad_utf8: list[bool]) -> list[dict]:
    """Each JSON line checked exactly as a landing file's line is: a dict per line with its
    `reason` (None when valid), `detail` and typed fields, `message_id` derived as ingest does.
    The stream runs it on the lines `core.plain` cannot type; its planning would dominate a
    small batch."""
    chunk = pa.table(
        {
            "line": pa.array(range(1, len(lines) + 1), pa.int64()),
            "raw": pa.array(lines, pa.large_string()),
            "bad_utf8": pa.array(bad_utf8, pa.bool_()),
        }
    )
    sql = f"""SELECT line, reason, detail, coalesce(message_id, 'derived-' || sha256(raw)) AS message_id,
                     {", ".join(c for c in STAGE_COLUMNS if c != "message_id")}
              FROM ({_validate_select(_json_select())}) ORDER BY line"""
    con.register("_chunk", chunk)
    try:
        result = con.execute(sql, bind(sql, params))
        names = [d[0] for d in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]
    finally:
        con.unregister("_chunk")


READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowInvalid)


class UnreadableFile(Exception):
    """A landing file that cannot be read at all (bad gzip, broken Parquet, not CSV)."""


def _normalize_phones(con: duckdb.DuckDBPyConnection) -> None:
    """E.164 for each distinct (phone, locale region) seen; a small table, not one call per event."""
    pairs = con.execute(
        """SELECT DISTINCT phone, upper(nullif(split_part(locale, '-', 2), '')) AS region
           FROM _stage WHERE reason IS NULL AND phone IS NOT NULL"""
    ).fetchall()
    mapping = pa.table(
        {
            "phone": pa.array([p for p, _ in pairs], pa.string()),
            "region": pa.array([r for _, r in pairs], pa.string()),
            "e164": pa.array([normalize_phone(p, r) for p, r in pairs], pa.string()),
        }
    )
    con.register("_phone_rows", mapping)
    con.execute("CREATE OR REPLACE TEMP TABLE _phone_map AS SELECT * FROM _phone_rows")
    con.unregister("_phone_rows")


def _redact_sql(expr: str) -> str:
    """Quarantined text keeps its shape but not the email or phone values it carried."""
    return redact_line_sql(expr)


def _publish_stage(con: duckdb.DuckDBPyConnection, opts: IngestOptions, params: dict, suppress: bool) -> None:
    """Move the staged lines to their three destinations (after taking out erased people's lines)."""
    _normalize_phones(con)
    raw_cols = columns(RawEvents)
    email_hash = hmac_sql(normalize_email_sql("s.email", opts.gmail_rules))
    phone_hash = f"CASE WHEN pm.e164 IS NOT NULL THEN {hmac_sql('pm.e164')} END"
    phone_map = "LEFT JOIN _phone_map pm ON pm.phone = s.phone AND pm.region IS NOT DISTINCT FROM " \
                "upper(nullif(split_part(s.locale, '-', 2), ''))"  # fmt: skip
    if suppress:
        suppress_staged(
            con,
            f"""SELECT s.batch_id, s.line, s.event_at, s.consent,
                       unnest([s.user_id, s.anonymous_id, s.previous_id, {email_hash}, {phone_hash}]) AS identifier
                FROM _stage s {phone_map}""",
            params,
        )
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE _suppressed (batch_id BIGINT, line BIGINT)")
    select = {c: f"s.{c}" for c in raw_cols}
    select["email_hash"] = email_hash
    select["phone_hash"] = phone_hash
    select["source_line"] = "s.line"
    select["batch_id"] = "s.batch_id"
    # People type emails and phone numbers into searches and forms that end up in URLs: never stored raw.
    select["page_url"] = scrub_text_sql("s.page_url")
    select["search_query"] = scrub_text_sql("s.search_query")
    # Derived ids hash the content, so re-delivered copies of an id-less event hash alike.
    select["message_id"] = "coalesce(s.message_id, 'derived-' || sha256(s.raw))"
    # One copy per messageId: the earliest line of the earliest file, and none already stored.
    insert = f"""INSERT INTO raw_events ({", ".join(raw_cols)})
        WITH kept AS (
          SELECT {", ".join(f"{expr} AS {c}" for c, expr in select.items())}, s.file_order
          FROM _stage s {phone_map}
          WHERE s.reason IS NULL
        )
        , stored AS (
          -- Probe the stored ids with this batch's (a hash of the batch, not of everything stored).
          SELECT message_id FROM raw_events WHERE message_id IN (SELECT message_id FROM kept)
        )
        SELECT {", ".join(raw_cols)} FROM (
          SELECT k.* FROM kept k ANTI JOIN stored r ON r.message_id = k.message_id
          QUALIFY row_number() OVER (PARTITION BY k.message_id ORDER BY k.file_order, k.source_line) = 1
        )"""
    con.execute(insert, bind(insert, params))
    con.execute(
        f"""INSERT INTO quarantined_events
        SELECT s.batch_id, f.file_name, s.line, s.reason, s.detail, {_redact_sql("s.raw")}, now()::TIMESTAMP
        FROM _stage s JOIN _files f USING (batch_id) WHERE s.reason IS NOT NULL"""
    )


def _finish_group(con: duckdb.DuckDBPyConnection, opts: IngestOptions, params: dict, run_id: str | None,
                  suppress: bool) -> None:  # fmt: skip
    """Move the staged files' lines to raw_events and quarantined_events and write their ledger rows."""
    _publish_stage(con, opts, params, suppress)
    con.execute(
        """INSERT INTO quarantined_events
           SELECT batch_id, file_name, NULL, 'unreadable_file', error, NULL, now()::TIMESTAMP
           FROM _files WHERE status = 'unreadable'"""
    )
    con.execute(
        """INSERT INTO ingest_files BY NAME
        SELECT *, lines_read - events_kept - lines_quarantined - lines_suppressed AS duplicates FROM (
          SELECT f.batch_id, f.file_name, f.checksum, f.size_bytes, f.mtime_ns, f.file_format, f.status,
            f.lines_read,
            (SELECT count(*) FROM raw_events r WHERE r.batch_id = f.batch_id) AS events_kept,
            (SELECT count(*) FROM quarantined_events q WHERE q.batch_id = f.batch_id AND q.source_line IS NOT NULL)
              AS lines_quarantined,
            (SELECT count(*) FROM _suppressed x WHERE x.batch_id = f.batch_id) AS lines_suppressed,
            0 AS lines_erased, ?::VARCHAR AS run_id, now()::TIMESTAMP AS ingested_at
          FROM _files f)
        ORDER BY batch_id""",
        [run_id],
    )
    con.execute("DROP TABLE _suppressed")
    con.execute("DELETE FROM _stage")
    con.execute("DELETE FROM _files")


def ingest(con: duckdb.DuckDBPyConnection, landing: Path, key: bytes, opts: IngestOptions | None = None,
           run_id: str | None = None, now: datetime | None = None,
           only: set[str] | None = None) -> IngestReport:  # fmt: skip
    """Ingest every new complete file in `landing` (or, with `only`, those of the names given).

    Files are committed in groups of about `stage_bytes` of input, each group with its ledger
    rows in one transaction: a failure leaves every earlier group complete and nothing of its
    own group, and the next run picks up the files not yet in the ledger.
    """
    opts = opts or IngestOptions()
    started = time.perf_counter()
    now = now or datetime.now(UTC).replace(tzinfo=None)
    report = IngestReport()
    ensure_tables(con)
    params = {
        **hmac_params(key),
        "max_line_bytes": opts.max_line_bytes,
        "max_id_chars": opts.max_id_chars,
        "min_event_at": opts.min_event_at,
        "max_event_at": now + timedelta(hours=opts.max_future_hours),
    }
    suppress = active_erasures(con) > 0
    known = con.execute("SELECT file_name, size_bytes, mtime_ns, checksum FROM ingest_files").fetchall()
    by_stat = {(n, s, m) for n, s, m, _ in known}
    by_sum = {(n, c) for n, _, _, c in known}
    con.execute("BEGIN TRANSACTION")
    try:
        _create_stage(con)
        con.execute(
            """CREATE OR REPLACE TEMP TABLE _files (batch_id BIGINT, file_name VARCHAR, checksum VARCHAR,
               size_bytes BIGINT, mtime_ns BIGINT, file_format VARCHAR, status VARCHAR, lines_read BIGINT,
               error VARCHAR)"""
        )
        next_batch = con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM ingest_files").fetchall()[0][0]
        order, staged_bytes = 0, 0
        report.refused = refused_files(landing)
        for path in landing_files(landing):
            if only is not None and path.name not in only:
                continue
            stat = path.stat()
            if (path.name, stat.st_size, stat.st_mtime_ns) in by_stat:
                report.skipped.append(path.name)
                continue
            digest = checksum(path)
            if (path.name, digest) in by_sum:
                report.skipped.append(path.name)
                continue
            fmt = file_format(path)
            batch_id = next_batch + order
            order += 1
            try:
                lines = _stage_file(con, path, fmt, batch_id, order, opts, params)
                status, error = "ingested", None
            except UnreadableFile as exc:
                # A file that cannot be read at all is quarantined whole; the rest of the batch goes on.
                con.execute("DELETE FROM _stage WHERE batch_id = ?", [batch_id])
                lines, status, error = 0, "unreadable", str(exc)[:500]
            con.execute(
                "INSERT INTO _files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [batch_id, path.name, digest, stat.st_size, stat.st_mtime_ns, fmt, status, lines, error],
            )
            staged_bytes += stat.st_size
            if staged_bytes >= opts.stage_bytes:
                # A big landing folder commits a group of whole files at a time: memory stays
                # bounded, and a run killed later resumes after the last committed group.
                _finish_group(con, opts, params, run_id, suppress)
                con.execute("COMMIT")
                con.execute("BEGIN TRANSACTION")
                staged_bytes = 0
        if order:
            _finish_group(con, opts, params, run_id, suppress)
        kill_point(["raw_events", "ingest_files"])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for name in ("_stage", "_files", "_phone_map"):
            con.execute(f"DROP TABLE IF EXISTS {name}")
    if order:
        rows = con.execute(
            """SELECT file_name, status, lines_read, events_kept, lines_quarantined, duplicates, lines_suppressed
               FROM ingest_files WHERE batch_id >= ? ORDER BY batch_id""",
            [next_batch],
        ).fetchall()
        report.files = [FileReport(*r) for r in rows]
        report.reasons = dict(
            con.execute(
                "SELECT reason, count(*) FROM quarantined_events WHERE batch_id >= ? GROUP BY 1 ORDER BY 2 DESC",
                [next_batch],
            ).fetchall()
        )
    report.seconds = time.perf_counter() - started
    return report
