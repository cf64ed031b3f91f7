"""Pandera contracts: one per published table, the single source of its schema and DDL."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from persona_assets.core.events import EVENT_TYPES

HEX64 = r"^[0-9a-f]{64}$"


def column(sql: str, *, serving: bool = True, **checks) -> object:
    """A contract field that also knows its DuckDB type and whether it may be published."""
    return pa.Field(metadata={"sql": sql, "serving": serving}, **checks)


class RawEvents(pa.DataFrameModel):
    """One validated Segment event; email and phone only as keyed hashes."""

    message_id: Series[str] = column("VARCHAR")
    event_type: Series[str] = column("VARCHAR", isin=list(EVENT_TYPES))
    event_name: Series[str] = column("VARCHAR", nullable=True)
    user_id: Series[str] = column("VARCHAR", nullable=True)
    anonymous_id: Series[str] = column("VARCHAR", nullable=True)
    previous_id: Series[str] = column("VARCHAR", nullable=True)
    event_at: Series[pd.Timestamp] = column("TIMESTAMP")
    email_hash: Series[str] = column("VARCHAR", nullable=True, str_matches=HEX64)
    phone_hash: Series[str] = column("VARCHAR", nullable=True, str_matches=HEX64)
    first_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    last_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    birthday: Series[str] = column("VARCHAR", serving=False, nullable=True)
    age: Series[str] = column("VARCHAR", nullable=True)
    gender: Series[str] = column("VARCHAR", nullable=True)
    postal_code: Series[str] = column("VARCHAR", nullable=True)
    city: Series[str] = column("VARCHAR", nullable=True)
    country: Series[str] = column("VARCHAR", nullable=True)
    consent: Series[str] = column("VARCHAR", nullable=True)
    device_id: Series[str] = column("VARCHAR", nullable=True)
    device_type: Series[str] = column("VARCHAR", nullable=True)
    os_name: Series[str] = column("VARCHAR", nullable=True)
    timezone: Series[str] = column("VARCHAR", nullable=True)
    locale: Series[str] = column("VARCHAR", nullable=True)
    page_url: Series[str] = column("VARCHAR", nullable=True)
    category: Series[str] = column("VARCHAR", nullable=True)
    product_id: Series[str] = column("VARCHAR", nullable=True)
    price: Series[float] = column("DOUBLE", nullable=True)
    quantity: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=0)
    revenue: Series[float] = column("DOUBLE", nullable=True)
    order_id: Series[str] = column("VARCHAR", nullable=True)
    products: Series[str] = column("VARCHAR", nullable=True)
    search_query: Series[str] = column("VARCHAR", nullable=True)
    batch_id: Series[int] = column("BIGINT")
    source_line: Series[int] = column("BIGINT", ge=1)

    @pa.dataframe_check(error="an event needs a userId or an anonymousId")
    def has_person_key(cls, df: pd.DataFrame) -> Series[bool]:
        return df["user_id"].notna() | df["anonymous_id"].notna()

    @pa.dataframe_check(error="a track event needs an event name")
    def track_has_name(cls, df: pd.DataFrame) -> Series[bool]:
        return (df["event_type"] != "track") | df["event_name"].notna()

    class Config:
        strict = True
        unique = ["message_id"]


QUARANTINE_REASONS = (
    "invalid_utf8", "empty_line", "line_too_long", "malformed_json", "not_an_object",
    "malformed_row", "bad_type", "missing_id", "unknown_type", "missing_timestamp",
    "bad_timestamp", "timestamp_out_of_range", "missing_event_name", "missing_previous_id",
    "field_too_long", "unreadable_file",
)  # fmt: skip


class QuarantinedEvents(pa.DataFrameModel):
    """A line that could not become an event: where it came from, why, and its text (PII redacted)."""

    batch_id: Series[int] = column("BIGINT")
    source_file: Series[str] = column("VARCHAR")
    source_line: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=1)
    reason: Series[str] = column("VARCHAR", isin=list(QUARANTINE_REASONS))
    detail: Series[str] = column("VARCHAR", nullable=True)
    raw_text: Series[str] = column("VARCHAR", nullable=True)
    quarantined_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True


class IngestFiles(pa.DataFrameModel):
    """The ingest ledger: one row per landing file version read, with its line accounting."""

    batch_id: Series[int] = column("BIGINT", unique=True)
    file_name: Series[str] = column("VARCHAR")
    checksum: Series[str] = column("VARCHAR", str_matches=HEX64)
    size_bytes: Series[int] = column("BIGINT", ge=0)
    mtime_ns: Series[int] = column("BIGINT")
    file_format: Series[str] = column("VARCHAR", isin=["jsonl", "jsonl.gz", "csv", "parquet"])
    status: Series[str] = column("VARCHAR", isin=["ingested", "unreadable"])
    lines_read: Series[int] = column("BIGINT", ge=0)
    events_kept: Series[int] = column("BIGINT", ge=0)
    lines_quarantined: Series[int] = column("BIGINT", ge=0)
    duplicates: Series[int] = column("BIGINT", ge=0)
    run_id: Series[str] = column("VARCHAR", nullable=True)
    ingested_at: Series[pd.Timestamp] = column("TIMESTAMP")

    @pa.dataframe_check(error="every line read is kept, quarantined or a counted duplicate")
    def nothing_lost(cls, df: pd.DataFrame) -> Series[bool]:
        accounted = df["events_kept"] + df["lines_quarantined"] + df["duplicates"]
        return (df["status"] == "unreadable") | (accounted == df["lines_read"])

    class Config:
        strict = True


def columns(model: type[pa.DataFrameModel], *, serving_only: bool = False) -> list[str]:
    """The contract's column names in order (optionally only those that may be published)."""
    schema = model.to_schema()
    return [name for name, col in schema.columns.items() if not serving_only or col.metadata.get("serving", True)]


def ddl(model: type[pa.DataFrameModel], table: str) -> str:
    """CREATE TABLE statement for a contract (the table name is ours, never user input)."""
    schema = model.to_schema()
    cols = ", ".join(f'"{name}" {col.metadata["sql"]}' for name, col in schema.columns.items())
    return f'CREATE TABLE IF NOT EXISTS "{table}" ({cols})'
