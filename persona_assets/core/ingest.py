"""Landing files to `raw_events`: read, type and validate in DuckDB, quarantine the bad, hash PII.

Every line read ends in exactly one of three places: `raw_events`, `quarantined_events`
(a re-delivered messageId with other content too), or the ledger's count of identical
re-delivered copies of a messageId already kept. Each group of files is published in one
transaction, so a run killed half-way leaves every earlier group whole and nothing of its own;
files are read outside it, so no file's content can stop the run: what cannot be read is
quarantined (`unreadable_file`) and the other files go on.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from stat import S_ISDIR, S_ISREG

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
    mapping_top_key,
    strptime_has_zone,
)
from persona_assets.core.options import setting
from persona_assets.core.pii import (
    hmac_params,
    hmac_sql,
    normalize_email_sql,
    normalize_phone,
    redact_line_sql,
    scrub_text_sql,
)
from persona_assets.core.warehouse import bind, transaction

FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".csv": "csv", ".parquet": "parquet"}
PARTIAL_SUFFIXES = (".tmp", ".part")
RAW_TEXT_LIMIT = 10_000  # characters of a bad line kept in quarantine; the file keeps the rest
SCAN_ROWS = 16_384  # rows of a chunk each DuckDB thread takes at a time


@dataclass(frozen=True)
class IngestOptions:
    """How landing files become `raw_events`."""

    min_event_at: datetime = setting(
        datetime(1970, 1, 1, 0, 0, 1),
        "Events stamped before this ISO time are quarantined. History is data: the default keeps "
        "everything after the Unix epoch itself (1970-01-01 00:00:00 is what an unset clock sends).",
    )
    max_future_hours: float = setting(24.0, "Events stamped further than this in the future are quarantined.", ge=0)
    max_line_bytes: int = setting(1_000_000, "A longer line is quarantined as line_too_long.", ge=1)
    max_id_chars: int = setting(
        256, "A longer messageId, userId, anonymousId or id is quarantined as field_too_long.", ge=1
    )
    chunk_bytes: int = 64 * 1024 * 1024
    # Files are committed in groups of about this many bytes of input, so a large landing
    # folder is ingested in bounded memory.
    stage_bytes: int = 512 * 1024 * 1024
    gmail_rules: bool = setting(True, "Gmail addresses with dots or +tags are the same address.")
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
    refused: list[str] = field(default_factory=list)  # entries not read: a link outside, a directory, a FIFO...
    refusals: dict[str, str] = field(default_factory=dict)  # each refused entry's reason
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


def _event_file_name(path: Path) -> bool:
    """A name landing reads: an event file's suffix, not hidden, not still being written."""
    return not path.name.startswith(".") and not path.name.endswith(PARTIAL_SUFFIXES) and bool(file_format(path))


def refusal(path: Path, landing: Path) -> str | None:
    """Why a landing entry with an event file's name is not read, or None for a regular file in the folder.

    Nothing here opens the entry, so a FIFO named `*.jsonl` never blocks a run."""
    try:
        mode = path.stat().st_mode  # follows a link
    except OSError:
        return "a link that leads nowhere" if path.is_symlink() else "gone while the folder was read"
    if not _inside(path, landing):
        return "leads outside the landing folder"
    if S_ISDIR(mode):
        return "a directory"
    if not S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def landing_files(landing: Path) -> list[Path]:
    """Complete event files at the top of the landing folder, oldest first.

    Files still being written (`*.tmp`, `*.part`, hidden files) are left for later; entries that
    are not regular files in the folder are refused (`refused_files`).
    """
    if not landing.is_dir():
        return []
    found = [p for p in landing.iterdir() if _event_file_name(p) and refusal(p, landing) is None]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _inside(path: Path, landing: Path) -> bool:
    """A landing entry is read only if it really is in the landing folder: a symlink to a file
    elsewhere (`/etc/passwd`, another tenant's folder) is refused."""
    return path.resolve().parent == landing.resolve()


def refused_files(landing: Path) -> dict[str, str]:
    """Landing entries with an event file's name that are never read, by name, each with its reason."""
    if not landing.is_dir():
        return {}
    found = {p.name: refusal(p, landing) for p in landing.iterdir() if _event_file_name(p)}
    return {name: why for name, why in sorted(found.items()) if why is not None}


def checksum(path: Path) -> str:
    return _digests(path)[0]


def _digests(path: Path, prefix_bytes: int | None = None) -> tuple[str, str | None]:
    """The file's SHA-256, and that of its first `prefix_bytes` when the file is longer (else None):
    a file that grew by appending starts with the version read before."""
    digest, prefix, read = hashlib.sha256(), None, 0
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            cut = -1 if prefix_bytes is None else prefix_bytes - read
            if 0 <= cut < len(block):
                digest.update(block[:cut])
                prefix = digest.hexdigest()
                digest.update(block[cut:])
            else:
                digest.update(block)
            read += len(block)
    return digest.hexdigest(), prefix


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(RawEvents, "raw_events"))
    con.execute(ddl(QuarantinedEvents, "quarantined_events"))
    con.execute(ddl(IngestFiles, "ingest_files"))
    # Warehouses from before erasure existed get the ledger's two new counts.
    for name in ("lines_suppressed", "lines_erased"):
        con.execute(f"ALTER TABLE ingest_files ADD COLUMN IF NOT EXISTS {name} BIGINT DEFAULT 0")
    ensure_log(con)


# --- reading: every format becomes Arrow batches of (line, raw, <flat columns>) -------------

BOM = b"\xef\xbb\xbf"
GZIP_INPUT = 1 << 20  # compressed bytes handed to zlib at a time
HEAD_BYTES = 4 * RAW_TEXT_LIMIT  # bytes kept of a line too long to hold: RAW_TEXT_LIMIT characters at most
HEADER_CHARS = 1 << 20  # a CSV header is looked for in this much of the file
# What reading a damaged or hostile file raises; and of those, what is the machine's failure, not the
# file's (it stops the run instead of marking the file unreadable for good).
READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    csv.Error,
    UnicodeError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    pa.ArrowException,
    duckdb.Error,
)
NOT_FILE_ERRORS = (
    duckdb.OutOfMemoryException,
    duckdb.IOException,
    duckdb.InterruptException,
    duckdb.FatalException,
    pa.ArrowMemoryError,
)


class UnreadableFile(Exception):
    """A landing file, or its rest from some point on, that cannot be read (a bad gzip stream, a
    broken Parquet file, a CSV header naming a column twice)."""


def _damage(exc: BaseException, where: str = "") -> UnreadableFile:
    """The file's damage as UnreadableFile, `where` saying what could not be read; a failure of the
    machine is raised as itself."""
    if isinstance(exc, NOT_FILE_ERRORS) or not isinstance(exc, READ_ERRORS):
        raise exc
    return UnreadableFile(f"{where}{type(exc).__name__}: {exc}"[:300])


def _file_blocks(path: Path, size: int) -> Iterator[bytes]:
    """A landing file's bytes in blocks of about `size`, decompressed for `.gz`. A damaged gzip
    stream gives every byte it holds before the damage, then raises."""
    with open(path, "rb") as fh:
        if not path.name.endswith(".gz"):
            while block := fh.read(size):
                yield block
            return
        pending: list[bytes] = []
        held, error = 0, None
        try:
            for piece in _gunzip(fh, size):
                pending.append(piece)
                held += len(piece)
                if held >= size:
                    yield b"".join(pending)
                    pending, held = [], 0
        except READ_ERRORS as exc:
            error = exc
        if pending:
            yield b"".join(pending)
        if error is not None:
            raise error


def _gunzip(fh, size: int) -> Iterator[bytes]:
    """The decompressed pieces (at most `size` bytes each) of a gzip file's members in turn.

    Unlike `gzip.open`, a stream cut short yields all it holds before raising, and a piece is
    bounded however much one compressed block expands (a 400 KB file can hold a 400 MB line)."""
    inflate, data, in_member, full = zlib.decompressobj(wbits=31), b"", False, False
    while True:
        if not data and not full:
            data = fh.read(GZIP_INPUT)
            if not data:
                break
        if not in_member:
            data = data.lstrip(b"\0")  # zero padding after the last member, as gzip allows
            if not data:
                continue
            in_member = True
        piece = inflate.decompress(data, size)
        data, full = inflate.unconsumed_tail, len(piece) == size
        if piece:
            yield piece
        if inflate.eof:
            data, inflate, in_member, full = inflate.unused_data, zlib.decompressobj(wbits=31), False, False
    if in_member:
        raise EOFError("the gzip stream ends before its end marker")


def _line_ends(data: bytes, final: bool) -> np.ndarray:
    """Offsets of the line ends in `data`: LF, the LF of CRLF, and a lone CR. A CR closing a block
    that is not the last may be the first half of a CRLF, so it is left for the next block."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = arr == 10
    if b"\r" in data:  # a byte search; most files have no CR
        lone = arr == 13
        lone[:-1] &= ~ends[1:]
        lone[-1] &= final
        ends |= lone
    return np.flatnonzero(ends)


def _utf8_head(data: bytes, size: int) -> bytes:
    """The first `size` bytes of `data`, cut before a character, not inside one."""
    cut = min(size, len(data))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return data[:cut]


class _LineSplitter:
    """Numbered lines from consecutive blocks of a file (see `_json_line_batches`).

    The start of a line not ended yet is held until a later block ends it; one longer than
    `max_line_bytes` is not held: its head is kept, the rest skipped to its end."""

    def __init__(self, max_line_bytes: int):
        self.max_line_bytes = max_line_bytes
        self.lines = 0  # lines given so far
        self.rest = b""  # the start of the line not ended yet
        self.head: bytes | None = None  # the head of an overlong line being skipped
        self.started = False  # the file's first bytes were seen (a byte-order mark there is dropped)

    def feed(self, block: bytes, final: bool = False) -> Iterator[pa.Table]:
        data = self.rest + block
        if not self.started:
            if len(data) < len(BOM) and BOM.startswith(data) and not final:
                self.rest = data
                return
            data, self.started = data.removeprefix(BOM), True
        if final and data and self.head is None and data[-1:] not in (b"\n", b"\r"):
            data += b"\n"  # the last line, unterminated
        ends, start = _line_ends(data, final), 0
        if self.head is not None:
            if not len(ends):
                self.rest = b"\r" if data.endswith(b"\r") else b""
                if final:
                    yield self._overlong()
                return
            yield self._overlong()
            start, ends = int(ends[0]) + 1, ends[1:]
        if len(ends):
            yield _line_table(data[start : ends[-1] + 1], ends - start, self.lines)
            self.lines += len(ends)
            start = int(ends[-1]) + 1
        self.rest = data[start:]
        if len(self.rest) > self.max_line_bytes:
            self.head = _utf8_head(self.rest, HEAD_BYTES)
            self.rest = b"\r" if self.rest.endswith(b"\r") else b""

    def _overlong(self) -> pa.Table:
        table = _line_table(self.head + b"\n", np.array([len(self.head)]), self.lines, too_long=True)
        self.head = None
        self.lines += 1
        return table


def _json_line_batches(path: Path, chunk_bytes: int, max_line_bytes: int) -> Iterator[pa.Table]:
    """Split a (gzipped) JSON-lines file into numbered lines, without parsing them.

    Newlines are found with numpy and the lines handed to Arrow as offsets into the block read,
    so no Python object is made per line. A line ends at LF, CRLF or a lone CR; a byte-order mark
    opening the file is not part of the first line; memory stays within a block and one line of
    `max_line_bytes`. A damaged file gives its lines up to the damage, then UnreadableFile.
    """
    lines, blocks = _LineSplitter(max_line_bytes), _file_blocks(path, chunk_bytes)
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            break
        except READ_ERRORS as exc:
            yield from lines.feed(b"", final=True)
            raise _damage(exc, f"unreadable after line {lines.lines}: ") from exc
        yield from lines.feed(block)
    yield from lines.feed(b"", final=True)


def _line_table(data: bytes, ends: np.ndarray, first: int, too_long: bool = False) -> pa.Table:
    """Lines of `data` ending at the line-end offsets `ends`, numbered from first + 1."""
    offsets = np.concatenate(([0], ends + 1)).astype(np.int64)
    binary = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    numbers = pa.array(np.arange(first + 1, first + 1 + len(ends), dtype=np.int64))
    text, bad = _utf8(binary)
    text = pc.utf8_rtrim(text, characters="\r\n")
    bad_utf8 = np.zeros(len(ends), dtype=bool) if bad is None else bad
    return pa.table({"line": numbers, "raw": text, "bad_utf8": bad_utf8, "too_long": np.full(len(ends), too_long)})


def _utf8(binary: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Binary values as text, and which were not valid UTF-8 (None when all were; a bad one has
    U+FFFD for each bad byte)."""
    target = pa.large_string() if pa.types.is_large_binary(binary.type) else pa.string()
    try:
        return binary.cast(target), None
    except pa.ArrowInvalid:
        values = binary.to_pylist()  # a rare block: one Python object per value
        decoded = [None if b is None else b.decode("utf-8", errors="replace") for b in values]
        bad = [b is not None and d.encode("utf-8") != b for d, b in zip(decoded, values)]
        return pa.array(decoded, target), np.array(bad, dtype=bool)


def _csv_header(path: Path) -> list[str]:
    """The CSV header's names (a byte-order mark dropped, a quoted line break kept)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        head = fh.read(HEADER_CHARS)
    return next(csv.reader(io.StringIO(head)), [])


def _read_columns(names: list[str], sources: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The columns read from a CSV or Parquet file: Segment's flat names and a mapping's, each once,
    as the file spells them; and the file's names to rename to those (a header written ` Order_ID `
    or `Customer Email` is matched without its spaces, case or separators when no column has the
    exact name and only one has the loose one). A file naming one of them twice is ambiguous, so it
    is refused whole."""
    # A nested source (`ecommerce.purchase_revenue`) not named as a column is read from its first key's.
    tops = {s: _top_key(s) for s in sources if s not in names}
    nested = {s: top for s, top in tops.items() if top not in (None, s)}
    own = [s for s in sources if s not in nested]
    desired = list(dict.fromkeys((*FLAT_COLUMNS, *own, *nested.values())))
    loose: dict[str, list[str]] = {}
    for name in names:
        loose.setdefault(_loose(name), []).append(name)
    read, renamed = [], {}
    for name in desired:
        if names.count(name) > 1:
            raise UnreadableFile(f"the header names {name!r} {names.count(name)} times")
        found = loose.get(_loose(name), [])
        if name not in names and len(found) == 1 and found[0] not in desired:
            renamed[found[0]] = name
            name = found[0]
        read.append(name)
    return read, renamed


def _loose(name: str) -> str:
    return re.sub(r"[\s_.-]+", "_", name.strip().lstrip("\ufeff")).strip("_").casefold()


def _top_key(source: str) -> str | None:
    try:
        return mapping_top_key(source)
    except ValueError:
        return None


def _csv_batches(path: Path, chunk_bytes: int, sources: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """CSV rows as strings with their line numbers; rows of the wrong width become bad rows.
    `sources`: the columns a mapping reads, kept besides the Segment ones.

    Only the columns read are converted, each as bytes then text, so no value is typed by guessing
    and a row that is not UTF-8 is one bad row. What a file holds before a row Arrow cannot parse
    is given, then UnreadableFile."""
    header = _csv_header(path)
    if not header:
        raise UnreadableFile("CSV file without a header line")
    wanted, renamed = _read_columns(header, sources)
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=min(chunk_bytes, 1 << 24), use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in wanted},
            include_columns=wanted,
            include_missing_columns=True,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    next_line = 2  # line 1 is the header
    for batch in _until_damaged(reader, lambda: f"unreadable after line {next_line - 1}: "):  # noqa: B023 (late on purpose)
        # Valid rows fill the line numbers the invalid ones did not take. Arrow parses ahead, so an
        # invalid row reported by now may belong to a later batch: it waits for its place.
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
        bad = [(n, t) for n, t in invalid if n < line]
        invalid[:] = [(n, t) for n, t in invalid if n >= line]
        next_line = line
        yield _flat_table(_renamed(pa.Table.from_batches([batch]), renamed), numbers, sources)
        if bad:
            yield _bad_rows_table(bad, sources)
    if invalid:
        yield _bad_rows_table(invalid, sources)


def _until_damaged(batches: Iterator, where: Callable[[], str]) -> Iterator:
    """A reader's batches until one cannot be read; then UnreadableFile, saying from where (`where`
    is asked at that moment, so it names the last line or row given)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except READ_ERRORS as exc:
            raise _damage(exc, where()) from exc
        yield batch


def _parquet_batches(path: Path, rows: int = 500_000, sources: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """A Parquet file's rows, numbered from 1, with the columns read as text (`_text`), a row group at
    a time: what the file holds before a row group that cannot be read is given, then UnreadableFile."""
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        read, renamed = _read_columns(names, sources)
        wanted = [name for name in read if name in names]
        total = parquet.metadata.num_rows
    except READ_ERRORS as exc:
        raise _damage(exc) from exc
    first = 1
    for group in range(parquet.num_row_groups):
        batches = parquet.iter_batches(batch_size=rows, row_groups=[group], columns=wanted, use_threads=False)
        for batch in _until_damaged(batches, lambda: f"rows {first} to {total} of {total} unreadable: "):  # noqa: B023
            table = _renamed(pa.Table.from_batches([batch]), renamed)
            yield _flat_table(table, list(range(first, first + batch.num_rows)), sources)
            first += batch.num_rows


def _renamed(table: pa.Table, renamed: dict[str, str]) -> pa.Table:
    return table.rename_columns([renamed.get(name, name) for name in table.column_names]) if renamed else table


def _source_column(i: int) -> str:
    """The chunk's name for a mapping's i-th source column: the file's own names never reach the SQL."""
    return f"_source{i}"


def _flat_table(table: pa.Table, numbers: list[int], sources: tuple[str, ...] = ()) -> pa.Table:
    n = len(numbers)
    bad_utf8 = np.zeros(n, dtype=bool)

    def text(name: str) -> pa.Array:
        if name not in table.column_names:
            nested = _nested_text(table, name)
            return pa.nulls(n, pa.string()) if nested is None else nested
        values, bad = _text(table[name])
        if bad is not None:
            bad_utf8[:] |= bad
        return values

    cols = {"line": pa.array(numbers, pa.int64()), "malformed": pa.nulls(n, pa.string())}
    for flat in FLAT_COLUMNS:
        cols[flat] = text(flat)
    for i, source in enumerate(sources):
        cols[_source_column(i)] = text(source)
    cols["bad_utf8"] = pa.array(bad_utf8)
    return pa.table(cols)


def _text(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray | None]:
    """A CSV or Parquet column as text, and which rows were not valid UTF-8 (None when all were).

    Bytes are decoded; numbers, dates and times printed as Arrow prints them (a time zone as an
    offset); lists, structs and maps written as JSON. A type none of these reads raises UnreadableFile."""
    values = column.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            values.validate(full=True)  # a damaged Parquet file's "strings" need not be UTF-8
            return values, None
        except pa.ArrowInvalid:
            kind = pa.binary() if pa.types.is_string(kind) else pa.large_binary()
            values = values.view(kind)
    if pa.types.is_fixed_size_binary(kind):
        values, kind = values.cast(pa.binary()), pa.binary()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        text, bad = _utf8(values)
        return text, bad
    if not pa.types.is_nested(kind):
        try:
            return values.cast(pa.string()), None
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            pass
    return _json_text(values), None


def _nested_text(table: pa.Table, source: str) -> pa.Array | None:
    """A mapping's nested source (`ecommerce.purchase_revenue`, `items[0].item_id`) read from a CSV
    or Parquet column holding a struct, a list or JSON text, as the JSON reader reads it from a line
    (numbers as JSON writes them, objects and lists as JSON); None when no column starts it."""
    top = _top_key(source)
    if top is None or top not in table.column_names:
        return None
    rest = json_path(source)[len(json_path(top)) :]
    kind = table.schema.field(top).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_nested(kind):
        column, document = table[top].combine_chunks(), "to_json(v)"
    else:
        column, document = _text(table[top])[0], "CASE WHEN json_valid(v) THEN v::JSON END"
    return _each_value(
        column,
        f"json_extract_string({document}, $path)",
        {"path": "$" + rest},
        f"column {top!r} cannot be read for {source!r}: ",
    )


def _each_value(values: pa.Array, expr: str, params: dict, what: str) -> pa.Array:
    """DuckDB's `expr` of each value `v`, in order, in a connection of its own (so an error here is
    no error of the warehouse's); one it cannot compute is UnreadableFile, saying `what`."""
    with duckdb.connect() as scratch:
        try:
            scratch.register("_values", pa.table({"i": np.arange(len(values)), "v": values}))
            result = scratch.execute(f"SELECT {expr} AS v FROM _values ORDER BY i", params).to_arrow_table()
        except READ_ERRORS as exc:
            raise _damage(exc, what) from exc
    return result["v"].combine_chunks()


def _json_text(values: pa.Array) -> pa.Array:
    """Values as JSON text, written by DuckDB."""
    return _each_value(values, "to_json(v)::VARCHAR", {}, f"values of type {values.type} cannot be read as text: ")


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
    cols["bad_utf8"] = pa.array(np.zeros(n, dtype=bool))
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
    CASE WHEN too_long THEN 'line_too_long'
         WHEN bad_utf8 THEN 'invalid_utf8'
         -- The usual line is valid JSON and short; trimming every line cost more than parsing it.
         WHEN strlen(raw) <= $max_line_bytes AND json_valid(raw) THEN NULL
         WHEN trim(raw) = '' THEN 'empty_line'
         WHEN strlen(raw) > $max_line_bytes THEN 'line_too_long'
         ELSE 'malformed_json' END AS early_error
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
  CASE WHEN malformed IS NOT NULL THEN 'malformed_row' WHEN bad_utf8 THEN 'invalid_utf8' END AS parse_error,
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


def _typed_sql(timestamp_format: str) -> str:
    """The lines of CTE `s` with each field typed (ids and names trimmed, numbers and the timestamp parsed), with
    the texts the numbers and timestamp came from, for the problem's detail."""
    cleaned = {column: f"nullif(trim(s.{column}), '')" for column in TRIMMED_COLUMNS}
    return f"""SELECT s.line, s.raw, s.parse_error, s.bad_field,
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
  FROM s"""


def _reason_sql() -> str:
    """A typed line's first problem, as a quarantine reason (NULL: the line is valid)."""
    ids = [f.column for f in ID_FIELDS]
    types = ", ".join(f"'{t}'" for t in EVENT_TYPES)
    return f"""CASE
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
  END"""


def _detail_sql() -> str:
    """What exactly was wrong with a quarantined line's field, for its quarantine row."""
    too_long = " ".join(f"WHEN strlen({f.column}) > $max_id_chars THEN '{f.column}'" for f in ID_FIELDS)
    types = ", ".join(f"'{t}'" for t in EVENT_TYPES)
    return f"""CASE
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
  END"""


def _validate_select(source_sql: str, timestamp_format: str = "iso") -> str:
    """Type each field and give each line its first problem (reason), or none.

    A price or revenue must be a finite amount from 0 to MAX_AMOUNT (a refund is its own event,
    `Order Refunded`, with a positive amount), so sums of them downstream stay finite and
    non-negative; a product list must not hold a number that is not finite."""
    return f"""
WITH s AS ({source_sql}),
v AS (
  {_typed_sql(timestamp_format)}
)
SELECT *, {_reason_sql()} AS reason, {_detail_sql()} AS detail
FROM v
"""


STAGE_COLUMNS = [
    "message_id",
    "event_type",
    "event_name",
    "user_id",
    "anonymous_id",
    "previous_id",
    "event_at",
    "email",
    "phone",
    "first_name",
    "last_name",
    "birthday",
    "age",
    "gender",
    "postal_code",
    "city",
    "country",
    "consent",
    "device_id",
    "device_type",
    "os_name",
    "timezone",
    "locale",
    "page_url",
    "category",
    "product_id",
    "price",
    "quantity",
    "revenue",
    "order_id",
    "products",
    "search_query",
]


def create_stage(con: duckdb.DuckDBPyConnection) -> None:
    """The staged lines of the group of files being read, and the files (`_files`, their ledger rows to be)."""
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
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _files (batch_id BIGINT, file_name VARCHAR, checksum VARCHAR,
           size_bytes BIGINT, mtime_ns BIGINT, file_format VARCHAR, status VARCHAR, lines_read BIGINT,
           error VARCHAR, path VARCHAR, extends BIGINT)"""
    )


def _reader(path: Path, fmt: str, opts: IngestOptions) -> tuple[Iterator[pa.Table], str, FileMapping | None]:
    """A file's chunks, the query from a chunk to one VARCHAR per field, and its mapping if one matches
    its name."""
    mapping = mapping_for(opts.mappings, path.name)
    sources = mapping.source_columns() if mapping is not None else ()
    if fmt in ("jsonl", "jsonl.gz"):
        return _json_line_batches(path, opts.chunk_bytes, opts.max_line_bytes), _json_select(mapping), mapping
    if fmt == "csv":
        return _csv_batches(path, opts.chunk_bytes, sources), _flat_select(mapping), mapping
    return _parquet_batches(path, sources=sources), _flat_select(mapping), mapping


def _stage_file(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    fmt: str,
    batch_id: int,
    file_order: int,
    opts: IngestOptions,
    params: dict,
) -> tuple[int, str | None]:
    """Read one file into `_stage`, through its mapping if one matches its name; returns the number
    of lines read and, for a file damaged part-way, why the rest could not be read. A file of which
    nothing can be read raises."""
    batches, select, mapping = _reader(path, fmt, opts)
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
            return lines, None
        except UnreadableFile as exc:
            if not lines:
                raise
            return lines, str(exc)
        # DuckDB scans an Arrow table one record batch per thread: a chunk in slices is read by every core.
        con.register("_chunk", pa.Table.from_batches(chunk.to_batches(max_chunksize=SCAN_ROWS)))
        try:
            con.execute(insert, bound)
        finally:
            con.unregister("_chunk")
        lines += chunk.num_rows


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
            "too_long": pa.array([False] * len(lines), pa.bool_()),
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


# --- publishing: statements both engines run (DuckDB here, Spark in `ingest_spark`) ------------
# Each reads the staged lines `_stage s` and the files `_files`; `row` names the stage's row key:
# DuckDB's `s.rowid`, or on Spark (which has none) a `stage_row` column the staging gives each line.

# The distinct (phone, locale region) pairs of the valid staged lines: few, normalized in Python.
PHONE_PAIRS = """SELECT DISTINCT phone, upper(nullif(split_part(locale, '-', 2), '')) AS region
    FROM _stage WHERE reason IS NULL AND phone IS NOT NULL"""

# A staged line's E.164 phone (`pm.e164`), from the pairs normalized in `_phone_map`.
PHONE_MAP = (
    "LEFT JOIN _phone_map pm ON pm.phone = s.phone AND pm.region IS NOT DISTINCT FROM "
    "upper(nullif(split_part(s.locale, '-', 2), ''))"
)


def phone_rows(phones: list[str | None], regions: list[str | None]) -> pa.Table:
    """`_phone_map`'s rows: each (phone, region) pair with its E.164 form (phonenumbers is Python)."""
    return pa.table(
        {
            "phone": pa.array(phones, pa.string()),
            "region": pa.array(regions, pa.string()),
            "e164": pa.array([normalize_phone(p, r) for p, r in zip(phones, regions)], pa.string()),
        }
    )


def _normalize_phones(con: duckdb.DuckDBPyConnection) -> None:
    """E.164 for each distinct (phone, locale region) seen; a small table, not one call per event."""
    pairs = con.execute(PHONE_PAIRS).fetchall()
    con.register("_phone_rows", phone_rows([p for p, _ in pairs], [r for _, r in pairs]))
    con.execute("CREATE OR REPLACE TEMP TABLE _phone_map AS SELECT * FROM _phone_rows")
    con.unregister("_phone_rows")


def _redact_sql(expr: str) -> str:
    """Quarantined text keeps its shape but not the email or phone values it carried."""
    return redact_line_sql(expr)


def stored_columns(opts: IngestOptions) -> dict[str, str]:
    """Each raw_events column's expression over a staged line `s`, its kept id `k` (`message_id`) and
    its phone `pm` (`PHONE_MAP`): emails and phones leave only as keyed hashes."""
    select = {c: f"s.{c}" for c in columns(RawEvents)}
    select["email_hash"] = hmac_sql(normalize_email_sql("s.email", opts.gmail_rules))
    select["phone_hash"] = f"CASE WHEN pm.e164 IS NOT NULL THEN {hmac_sql('pm.e164')} END"
    select["source_line"] = "s.line"
    select["batch_id"] = "s.batch_id"
    # People type emails and phone numbers into searches and forms that end up in URLs: never stored raw.
    select["page_url"] = scrub_text_sql("s.page_url")
    select["search_query"] = scrub_text_sql("s.search_query")
    select["message_id"] = "k.message_id"
    return select


def valid_ids_sql(row: str) -> str:
    """Every valid staged line's messageId (a derived id hashes the content, so re-delivered copies of
    an id-less event hash alike), with its row key, file order and line."""
    return f"""SELECT {row} AS stage_row, coalesce(s.message_id, 'derived-' || sha256(s.raw)) AS message_id,
         s.message_id IS NULL AS derived, s.file_order, s.line
       FROM _stage s WHERE s.reason IS NULL"""


# The line kept for each messageId: the earliest line of the earliest file, none for an id already stored.
FIRST_COPY = """SELECT i.message_id, arg_min(i.stage_row, (i.file_order, i.line)) AS stage_row
    FROM _valid_ids i ANTI JOIN (
      SELECT message_id FROM raw_events WHERE message_id IN (SELECT message_id FROM _valid_ids)
    ) r ON r.message_id = i.message_id
    GROUP BY i.message_id"""


def raw_events_sql(stored: dict[str, str], row: str) -> str:
    """The kept lines as raw_events rows."""
    return f"""SELECT {", ".join(f"{expr} AS {c}" for c, expr in stored.items())}
        FROM _first_copy k JOIN _stage s ON {row} = k.stage_row {PHONE_MAP}"""


# The valid lines with a sent messageId that were not kept: re-delivered copies.
COPY_ROWS = """SELECT i.stage_row, i.message_id FROM _valid_ids i ANTI JOIN _first_copy k ON k.stage_row = i.stage_row
    WHERE NOT i.derived"""


def copies_sql(stored: dict[str, str], row: str) -> str:
    """The re-delivered copies typed as they would be stored."""
    return f"""SELECT {", ".join(f"{expr} AS {c}" for c, expr in stored.items())}
        FROM _copy_rows k JOIN _stage s ON {row} = k.stage_row {PHONE_MAP}"""


def conflicts_sql(stored: dict[str, str], kept: str) -> str:
    """The copies whose content differs from the kept copy's, each with a detail naming both copies
    and the columns that differ. `kept`: the raw_events rows holding a copy's messageId (DuckDB finds
    them by row id, the fast way there)."""
    content = [c for c in stored if c not in ("message_id", "batch_id", "source_line")]
    differs = ", ".join(f"CASE WHEN c.{c} IS DISTINCT FROM k.{c} THEN '{c}' END" for c in content)
    return f"""WITH copies AS (FROM _copies), kept AS ({kept}),
    files AS (SELECT batch_id, file_name FROM ingest_files UNION ALL SELECT batch_id, file_name FROM _files)
    SELECT c.batch_id, c.source_line AS line,
      cf.file_name || ' line ' || c.source_line || ' differs from the copy kept from '
        || coalesce(kf.file_name, 'an earlier batch') || ' line ' || k.source_line || ' in ' || concat_ws(', ', {differs})
        AS detail
    FROM copies c JOIN kept k ON k.message_id = c.message_id
    JOIN files cf ON cf.batch_id = c.batch_id LEFT JOIN files kf ON kf.batch_id = k.batch_id
    WHERE {" OR ".join(f"c.{c} IS DISTINCT FROM k.{c}" for c in content)}"""


# The conflicting copies' lines by file, to read their text again (the stage keeps none of a valid line).
CONFLICT_LINES = """SELECT f.batch_id, f.path, f.file_format, list(c.line) AS lines
    FROM _conflicts c JOIN _files f ON f.batch_id = c.batch_id GROUP BY f.batch_id, f.path, f.file_format"""

# A conflicting copy's staged line, marked from its `_conflicts` row `c` joined with its text.
CONFLICT_MARK = {"reason": "'conflicting_redelivery'", "detail": "c.detail", "raw": f"left(c.raw, {RAW_TEXT_LIMIT})"}


def quarantine_sql(stage: str = "_stage") -> str:
    """The staged lines with a reason as quarantined_events rows (`stage`: the staged lines, marked)."""
    return f"""SELECT s.batch_id, f.file_name AS source_file, s.line AS source_line, s.reason, s.detail,
        {_redact_sql("s.raw")} AS raw_text, now()::TIMESTAMP AS quarantined_at
        FROM {stage} s JOIN _files f ON f.batch_id = s.batch_id WHERE s.reason IS NOT NULL"""


# A file that could not be read (whole, or from some line on): one quarantine row, without a line.
UNREADABLE_FILES = """SELECT batch_id, file_name AS source_file, NULL::BIGINT AS source_line,
    'unreadable_file' AS reason, error AS detail, NULL::VARCHAR AS raw_text, now()::TIMESTAMP AS quarantined_at
    FROM _files WHERE error IS NOT NULL"""

# The staged files' ledger rows: every line read is kept, quarantined, suppressed or a counted duplicate.
LEDGER = """SELECT *, lines_read - events_kept - lines_quarantined - lines_suppressed AS duplicates FROM (
      SELECT f.batch_id, f.file_name, f.checksum, f.size_bytes, f.mtime_ns, f.file_format, f.status,
        f.lines_read,
        (SELECT count(*) FROM raw_events r WHERE r.batch_id = f.batch_id) AS events_kept,
        (SELECT count(*) FROM quarantined_events q WHERE q.batch_id = f.batch_id AND q.source_line IS NOT NULL)
          AS lines_quarantined,
        (SELECT count(*) FROM _suppressed x WHERE x.batch_id = f.batch_id) AS lines_suppressed,
        0 AS lines_erased, $run_id::VARCHAR AS run_id, now()::TIMESTAMP AS ingested_at
      FROM _files f)
    ORDER BY batch_id"""


def staged_ids_sql(stored: dict[str, str]) -> str:
    """Every identifier a staged line carries, in identity_map form (what erasure suppression matches)."""
    return f"""SELECT s.batch_id, s.line, s.event_at, s.consent,
               unnest([s.user_id, s.anonymous_id, s.previous_id, {stored["email_hash"]},
                       {stored["phone_hash"]}]) AS identifier
        FROM _stage s {PHONE_MAP}"""


def _publish_stage(con: duckdb.DuckDBPyConnection, opts: IngestOptions, params: dict, suppress: bool) -> None:
    """Move the staged lines to their three destinations (after taking out erased people's lines)."""
    _normalize_phones(con)
    stored = stored_columns(opts)
    if suppress:
        suppress_staged(con, staged_ids_sql(stored), params)
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE _suppressed (batch_id BIGINT, line BIGINT)")
    _first_copies(con)
    insert = f"INSERT INTO raw_events ({', '.join(stored)}) {raw_events_sql(stored, 's.rowid')}"
    con.execute(insert, bind(insert, params))
    _mark_conflicts(con, opts, stored, params)
    con.execute("DROP TABLE _valid_ids")
    con.execute("DROP TABLE _first_copy")
    con.execute(f"INSERT INTO quarantined_events BY NAME {quarantine_sql()}")


def _first_copies(con: duckdb.DuckDBPyConnection) -> None:
    """One copy per messageId: `_valid_ids` holds every valid staged line's id, `_first_copy` the line
    kept for each id.

    Only these narrow rows are grouped (a window over the whole staged rows cost most of publishing),
    and the stored ids are probed with this group's (a hash of the group, not of everything stored)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _valid_ids AS {valid_ids_sql('s.rowid')}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _first_copy AS {FIRST_COPY}")


# DuckDB fetches the kept copies by row id.
KEPT_BY_ROWID = """FROM raw_events
    WHERE rowid IN (SELECT rowid FROM raw_events WHERE message_id IN (SELECT message_id FROM _copies))"""


def _mark_conflicts(con: duckdb.DuckDBPyConnection, opts: IngestOptions, stored: dict[str, str], params: dict) -> None:
    """After publishing the kept events: a valid staged line not kept (a re-delivered copy of a kept
    messageId) whose content differs from the kept copy becomes a quarantined `conflicting_redelivery`
    naming both copies, so it is seen and counted as quarantined; an identical copy stays a counted
    duplicate. The copies are compared as they would be stored (`stored_columns`).

    Only the copies are typed and compared, and both copies are fetched by row id."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _copy_rows AS {COPY_ROWS}")
    typed = f"CREATE OR REPLACE TEMP TABLE _copies AS {copies_sql(stored, 's.rowid')}"
    con.execute(typed, bind(typed, params))
    con.execute(f"CREATE OR REPLACE TEMP TABLE _conflicts AS {conflicts_sql(stored, KEPT_BY_ROWID)}")
    if con.execute("SELECT count(*) FROM _conflicts").fetchall()[0][0]:
        con.register("_conflict_texts", conflict_texts(con.execute(CONFLICT_LINES).fetchall(), opts))
        marks = ", ".join(f"{c} = {expr}" for c, expr in CONFLICT_MARK.items())
        con.execute(
            f"""UPDATE _stage s SET {marks}
                FROM (SELECT * FROM _conflicts LEFT JOIN _conflict_texts USING (batch_id, line)) c
                WHERE s.batch_id = c.batch_id AND s.line = c.line"""
        )
        con.unregister("_conflict_texts")
    for name in ("_copy_rows", "_copies", "_conflicts"):
        con.execute(f"DROP TABLE {name}")


def conflict_texts(wanted: list[tuple[int, str, str, list[int]]], opts: IngestOptions) -> pa.Table:
    """(batch_id, line, raw) of the conflicting copies (`CONFLICT_LINES`), read again from their files:
    the stage keeps no text of a valid line. A file that cannot be read again gives none (its rows
    keep their detail)."""
    texts: list[tuple[int, int, str]] = []
    for batch_id, path, fmt, lines in wanted:
        try:
            texts += [(batch_id, line, raw) for line, raw in _line_texts(Path(path), fmt, opts, list(lines))]
        except (UnreadableFile, *READ_ERRORS) as exc:
            if isinstance(exc, NOT_FILE_ERRORS):
                raise
            continue
    batch_ids, lines, raws = zip(*texts) if texts else ((), (), ())
    return pa.table(
        {
            "batch_id": pa.array(batch_ids, pa.int64()),
            "line": pa.array(lines, pa.int64()),
            "raw": pa.array(raws, pa.string()),
        }
    )


def _line_texts(path: Path, fmt: str, opts: IngestOptions, lines: list[int]) -> list[tuple[int, str]]:
    """The text of some lines of a landing file as its quarantine rows would hold it (a CSV or Parquet
    row as JSON of its columns), read in a connection of its own."""
    batches, select, mapping = _reader(path, fmt, opts)
    if fmt in ("jsonl", "jsonl.gz"):
        select = "SELECT line, raw FROM _chunk"
    sql = f"SELECT line, raw FROM ({select}) WHERE list_contains($lines, line)"
    bound = bind(sql, {**_mapping_params(mapping, fmt), "lines": lines})
    found: list[tuple[int, str]] = []
    with duckdb.connect() as scratch:
        for chunk in batches:
            scratch.register("_chunk", chunk)
            found += scratch.execute(sql, bound).fetchall()
            scratch.unregister("_chunk")
    return found


# The quarantine rows for lines of the earlier versions of files that grew by appending (`_withdraw_regrown`).
WITHDRAWN = "source_line IS NOT NULL AND batch_id IN (SELECT extends FROM _files WHERE extends IS NOT NULL)"

# Those earlier versions' ledger rows, each as many lines fewer as it had quarantined lines.
REGROWN_LEDGER = f"""SELECT f.batch_id, f.lines_read - q.n AS lines_read, f.lines_quarantined - q.n AS lines_quarantined
    FROM ingest_files f JOIN (SELECT batch_id, count(*) AS n FROM quarantined_events WHERE {WITHDRAWN} GROUP BY 1) q
      ON f.batch_id = q.batch_id"""


def _withdraw_regrown(con: duckdb.DuckDBPyConnection) -> None:
    """A file that grew by appending is read again whole, its earlier version's lines with it. The
    lines that version quarantined are counted again by the new one (as quarantined, or kept: a
    half-written last line the writer has since completed), so that version's quarantine rows for
    lines go and its ledger row reads as many lines fewer; both rows still add up."""
    con.execute(
        f"""UPDATE ingest_files f SET lines_read = w.lines_read, lines_quarantined = w.lines_quarantined
            FROM ({REGROWN_LEDGER}) w WHERE f.batch_id = w.batch_id"""
    )
    con.execute(f"DELETE FROM quarantined_events WHERE {WITHDRAWN}")


def _finish_group(
    con: duckdb.DuckDBPyConnection, opts: IngestOptions, params: dict, run_id: str | None, suppress: bool
) -> None:
    """Move the staged files' lines to raw_events and quarantined_events and write their ledger rows."""
    _withdraw_regrown(con)
    _publish_stage(con, opts, params, suppress)
    con.execute(f"INSERT INTO quarantined_events BY NAME {UNREADABLE_FILES}")
    con.execute(f"INSERT INTO ingest_files BY NAME {LEDGER}", bind(LEDGER, {"run_id": run_id}))
    con.execute("DROP TABLE _suppressed")
    con.execute("DELETE FROM _stage")
    con.execute("DELETE FROM _files")


def _commit_group(
    con: duckdb.DuckDBPyConnection, opts: IngestOptions, params: dict, run_id: str | None, suppress: bool, last: bool
) -> None:
    """Publish the staged files and their ledger rows in one transaction."""
    with transaction(con):
        if con.execute("SELECT count(*) FROM _files").fetchall()[0][0]:
            _finish_group(con, opts, params, run_id, suppress)
        if last:
            kill_point(["raw_events", "ingest_files"])


# The temporary tables a run makes, dropped however it ends.
SCRATCH_TABLES = (
    "_stage",
    "_files",
    "_phone_map",
    "_suppressed",
    "_copy_rows",
    "_copies",
    "_conflicts",
    "_valid_ids",
    "_first_copy",
)


# The batch_id the run's first new file gets.
NEXT_BATCH = "SELECT coalesce(max(batch_id), 0) + 1 FROM ingest_files"


@dataclass
class LandedFile:
    """A landing file not yet in the ledger."""

    path: Path
    size: int
    mtime_ns: int
    digest: str
    extends: int | None  # the batch of the earlier version it grew from by appending (`_withdraw_regrown`)


def new_files(
    con: duckdb.DuckDBPyConnection, landing: Path, only: set[str] | None, report: IngestReport
) -> Iterator[LandedFile]:
    """The landing files not in the ledger (by name, size and mtime, then by name and checksum), oldest
    first; the others are listed in the report as skipped, or refused for this run if they cannot be
    opened."""
    known = con.execute("SELECT file_name, size_bytes, mtime_ns, checksum FROM ingest_files ORDER BY batch_id")
    known = known.fetchall()
    by_stat = {(n, s, m) for n, s, m, _ in known}
    by_sum = {(n, c) for n, _, _, c in known}
    latest = {n: (s, c) for n, s, _, c in known}  # each name's last version
    batches = dict(con.execute("SELECT file_name, max(batch_id) FROM ingest_files GROUP BY 1").fetchall())
    for path in landing_files(landing):
        if only is not None and path.name not in only:
            continue
        before = latest.get(path.name)
        try:
            info = path.stat()
            if (path.name, info.st_size, info.st_mtime_ns) in by_stat:
                report.skipped.append(path.name)
                continue
            digest, prefix = _digests(path, before[0] if before else None)
        except OSError as exc:  # gone, or not ours to read: a later run tries again
            report.refusals[path.name] = f"cannot be read: {exc.strerror or exc}"
            continue
        if (path.name, digest) in by_sum:
            report.skipped.append(path.name)
            continue
        extends = batches[path.name] if before and prefix == before[1] else None
        yield LandedFile(path, info.st_size, info.st_mtime_ns, digest, extends)


def _stage_landed(
    con: duckdb.DuckDBPyConnection, landed: LandedFile, batch_id: int, order: int, opts: IngestOptions, params: dict
) -> None:
    """Stage one file and its ledger row (`stage_file_row`)."""
    con.execute(
        "INSERT INTO _files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        stage_file_row(con, landed, batch_id, order, opts, params),
    )


def stage_file_row(
    con: duckdb.DuckDBPyConnection, landed: LandedFile, batch_id: int, order: int, opts: IngestOptions, params: dict
) -> list:
    """Stage one file's lines in `_stage` and give its `_files` row. Nothing in a file can stop the run:
    staging runs outside any transaction, so a DuckDB error on one file's chunk undoes that statement
    only, and a file of which nothing can be read is quarantined whole (`unreadable_file`) while the
    others go on. Spark runs this too, a file per task (`ingest_spark`)."""
    fmt = file_format(landed.path)
    try:
        lines, error = _stage_file(con, landed.path, fmt, batch_id, order, opts, params)
    except (UnreadableFile, *READ_ERRORS) as exc:
        why = exc if isinstance(exc, UnreadableFile) else _damage(exc)
        con.execute("DELETE FROM _stage WHERE batch_id = ?", [batch_id])
        lines, error = 0, f"unreadable ({landed.size} bytes): {why}"
    return [
        batch_id,
        landed.path.name,
        landed.digest,
        landed.size,
        landed.mtime_ns,
        fmt,
        "ingested" if lines or error is None else "unreadable",
        lines,
        error,
        str(landed.path),
        landed.extends,
    ]


def ingest(
    con: duckdb.DuckDBPyConnection,
    landing: Path,
    key: bytes,
    opts: IngestOptions | None = None,
    run_id: str | None = None,
    now: datetime | None = None,
    only: set[str] | None = None,
) -> IngestReport:
    """Ingest every new complete file in `landing` (or, with `only`, those of the names given).

    Files are committed in groups of about `stage_bytes` of input, each group with its ledger
    rows in one transaction: a failure leaves every earlier group complete and nothing of its
    own group, and the next run picks up the files not yet in the ledger. Files are staged
    outside the transaction, so no file's content can abort it (`_stage_landed`).
    """
    opts = opts or IngestOptions()
    started = time.perf_counter()
    now = now or datetime.now(UTC).replace(tzinfo=None)
    report = IngestReport()
    ensure_tables(con)
    params = {**hmac_params(key), **contract_params(opts, now)}
    suppress = active_erasures(con) > 0
    report.refusals = refused_files(landing)
    next_batch = con.execute(NEXT_BATCH).fetchall()[0][0]
    order, staged_bytes = 0, 0
    try:
        create_stage(con)
        for landed in new_files(con, landing, only, report):
            order += 1
            _stage_landed(con, landed, next_batch + order - 1, order, opts, params)
            staged_bytes += landed.size
            if staged_bytes >= opts.stage_bytes:
                # A big landing folder commits a group of whole files at a time: memory stays
                # bounded, and a run killed later resumes after the last committed group.
                _commit_group(con, opts, params, run_id, suppress, last=False)
                staged_bytes = 0
        _commit_group(con, opts, params, run_id, suppress, last=True)
    finally:
        for name in SCRATCH_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {name}")
    report.refused = sorted(report.refusals)
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
