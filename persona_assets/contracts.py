"""Pandera contracts: one per published table, the single source of its schema and DDL."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from persona_assets.core.events import EVENT_TYPES, MAX_AMOUNT

HEX64 = r"^[0-9a-f]{64}$"


def column(sql: str, *, serving: bool = True, identifying: bool = False, **checks) -> object:
    """A contract field that also knows its DuckDB type, whether it may be published (`serving`:
    restricted columns stay in the warehouse) and whether it names a person (`identifying`:
    its values never go into Dagster's event log, which `persona forget` cannot edit)."""
    return pa.Field(metadata={"sql": sql, "serving": serving, "identifying": identifying}, **checks)


class RawEvents(pa.DataFrameModel):
    """One validated Segment event; email and phone only as keyed hashes."""

    message_id: Series[str] = column("VARCHAR", identifying=True)
    event_type: Series[str] = column("VARCHAR", isin=list(EVENT_TYPES))
    event_name: Series[str] = column("VARCHAR", nullable=True)
    user_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    anonymous_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    previous_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    event_at: Series[pd.Timestamp] = column("TIMESTAMP")
    email_hash: Series[str] = column("VARCHAR", identifying=True, nullable=True, str_matches=HEX64)
    phone_hash: Series[str] = column("VARCHAR", identifying=True, nullable=True, str_matches=HEX64)
    first_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    last_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    birthday: Series[str] = column("VARCHAR", serving=False, nullable=True)
    age: Series[str] = column("VARCHAR", nullable=True)
    gender: Series[str] = column("VARCHAR", nullable=True)
    postal_code: Series[str] = column("VARCHAR", nullable=True)
    city: Series[str] = column("VARCHAR", nullable=True)
    country: Series[str] = column("VARCHAR", nullable=True)
    consent: Series[str] = column("VARCHAR", nullable=True, isin=["granted", "declined"])
    device_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    device_type: Series[str] = column("VARCHAR", nullable=True)
    os_name: Series[str] = column("VARCHAR", nullable=True)
    timezone: Series[str] = column("VARCHAR", nullable=True)
    locale: Series[str] = column("VARCHAR", nullable=True)
    page_url: Series[str] = column("VARCHAR", nullable=True)
    category: Series[str] = column("VARCHAR", nullable=True)
    product_id: Series[str] = column("VARCHAR", nullable=True)
    # An amount is finite, 0 to MAX_AMOUNT (ingest quarantines the rest as bad_value; NaN reads as
    # missing here, so ingest's own test holds that none is stored).
    price: Series[float] = column("DOUBLE", nullable=True, ge=0, le=MAX_AMOUNT)
    quantity: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=0)
    revenue: Series[float] = column("DOUBLE", nullable=True, ge=0, le=MAX_AMOUNT)
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
    "invalid_utf8",
    "empty_line",
    "line_too_long",
    "malformed_json",
    "not_an_object",
    "malformed_row",
    "bad_type",
    "missing_id",
    "unknown_type",
    "missing_timestamp",
    "bad_timestamp",
    "timestamp_out_of_range",
    "missing_event_name",
    "missing_previous_id",
    "field_too_long",
    "unreadable_file",
    # A negative, non-finite or absurd price or revenue (`core.events.MAX_AMOUNT`), a product list
    # holding NaN or Infinity; a re-delivered messageId whose content differs from the copy kept.
    "bad_value",
    "conflicting_redelivery",
)


class QuarantinedEvents(pa.DataFrameModel):
    """A line that could not become an event: where it came from, why, and its text (PII redacted)."""

    batch_id: Series[int] = column("BIGINT")
    source_file: Series[str] = column("VARCHAR")
    source_line: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=1)
    reason: Series[str] = column("VARCHAR", isin=list(QUARANTINE_REASONS))
    detail: Series[str] = column("VARCHAR", nullable=True)
    # Never published: a broken line can carry any trait anywhere (names, birth dates, addresses),
    # which no redaction can find for sure. The snapshot keeps file, line, reason and detail; the
    # warehouse keeps the text with emails and phone numbers redacted (and forget erases it).
    raw_text: Series[str] = column("VARCHAR", identifying=True, serving=False, nullable=True)
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
    # Lines of erased people: dropped at ingest (suppressed) or deleted later by `persona forget`.
    lines_suppressed: Series[int] = column("BIGINT DEFAULT 0", ge=0)
    lines_erased: Series[int] = column("BIGINT DEFAULT 0", ge=0)

    @pa.dataframe_check(error="every line read is kept, quarantined, a counted duplicate, suppressed or erased")
    def nothing_lost(cls, df: pd.DataFrame) -> Series[bool]:
        accounted = (
            df["events_kept"] + df["lines_quarantined"] + df["duplicates"] + df["lines_suppressed"] + df["lines_erased"]
        )
        return (df["status"] == "unreadable") | (accounted == df["lines_read"])

    class Config:
        strict = True


def columns(model: type[pa.DataFrameModel], *, serving_only: bool = False) -> list[str]:
    """The contract's column names in order (optionally only those that may be published)."""
    schema = model.to_schema()
    return [name for name, col in schema.columns.items() if not serving_only or col.metadata.get("serving", True)]


def identifying_columns() -> set[str]:
    """The names of every contract's columns that name a person (see `column`)."""
    return {
        name
        for model in pa.DataFrameModel.__subclasses__()
        if model.__module__ == __name__
        for name, col in model.to_schema().columns.items()
        if (col.metadata or {}).get("identifying")
    }


def ddl(model: type[pa.DataFrameModel], table: str) -> str:
    """CREATE TABLE statement for a contract (the table name is ours, never user input)."""
    schema = model.to_schema()
    cols = ", ".join(f'"{name}" {col.metadata["sql"]}' for name, col in schema.columns.items())
    return f'CREATE TABLE IF NOT EXISTS "{table}" ({cols})'


class ErasureLog(pa.DataFrameModel):
    """Who was forgotten, as keyed hashes only: later events for these identifiers are
    suppressed until one arrives with consent (`consented_at`). Restricted: never published."""

    erasure_hash: Series[str] = column("VARCHAR", serving=False, str_matches=HEX64, unique=True)
    erased_at: Series[pd.Timestamp] = column("TIMESTAMP")
    consented_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)

    class Config:
        strict = True


IDENTIFIER_TYPES = ["anonymous_id", "user_id", "email", "phone", "device_id"]
PERSON_ID = r"^p[0-9a-f]{16}$"


class IdentityMap(pa.DataFrameModel):
    """Which person each identifier belongs to (email and phone as keyed hashes)."""

    identifier_type: Series[str] = column("VARCHAR", isin=IDENTIFIER_TYPES)
    identifier: Series[str] = column("VARCHAR", identifying=True)
    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    first_seen_at: Series[pd.Timestamp] = column("TIMESTAMP")
    last_seen_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True
        unique = ["identifier_type", "identifier"]


class IdentityGuard(pa.DataFrameModel):
    """Identifiers not used to link people: tied to too many userIds, emails or anonymousIds."""

    identifier_type: Series[str] = column("VARCHAR", isin=IDENTIFIER_TYPES)
    identifier: Series[str] = column("VARCHAR", identifying=True)
    user_ids: Series[int] = column("BIGINT", ge=0)
    emails: Series[int] = column("BIGINT", ge=0)
    anonymous_ids: Series[int] = column("BIGINT", ge=0)
    reason: Series[str] = column("VARCHAR")

    class Config:
        strict = True


class IdentityPii(pa.DataFrameModel):
    """Restricted: the matching traits of each record (a person as deterministic stitching found them).

    Names and birth dates live only here and in raw_events; neither is ever published.
    """

    record_id: Series[str] = column("VARCHAR", identifying=True, serving=False, str_matches=PERSON_ID, unique=True)
    person_id: Series[str] = column("VARCHAR", identifying=True, serving=False, str_matches=PERSON_ID)
    anchor_type: Series[str] = column("VARCHAR", serving=False, isin=IDENTIFIER_TYPES)
    anchor: Series[str] = column("VARCHAR", identifying=True, serving=False)
    user_ids: Series[int] = column("BIGINT", serving=False, ge=0)
    user_id: Series[str] = column("VARCHAR", identifying=True, serving=False, nullable=True)
    first_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    last_name: Series[str] = column("VARCHAR", serving=False, nullable=True)
    birthday: Series[str] = column("VARCHAR", serving=False, nullable=True)
    age: Series[pd.Int64Dtype] = column("BIGINT", serving=False, nullable=True, coerce=True)
    postal_code: Series[str] = column("VARCHAR", serving=False, nullable=True)
    city: Series[str] = column("VARCHAR", serving=False, nullable=True)
    # An email or phone (type:keyed hash) this record shares with another userId's: evidence, not a merge.
    shared_contact: Series[str] = column("VARCHAR", serving=False, nullable=True)

    class Config:
        strict = True


class IdentityLinks(pa.DataFrameModel):
    """Probabilistic links between records above the threshold: why people merged, or why they did not."""

    record_id_l: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    record_id_r: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    match_probability: Series[float] = column("DOUBLE", ge=0, le=1)
    match_weight: Series[float] = column("DOUBLE")
    weights: Series[str] = column("VARCHAR")
    status: Series[str] = column("VARCHAR", isin=["merged", "redundant", "blocked"])
    reason: Series[str] = column("VARCHAR", nullable=True)
    model_version: Series[int] = column("BIGINT", ge=1)

    class Config:
        strict = True


class PersonIdHistory(pa.DataFrameModel):
    """When a person's id changed because people merged or split: old -> new."""

    old_person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    new_person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    change: Series[str] = column("VARCHAR", isin=["merge", "split", "rekey"])
    identifiers_moved: Series[int] = column("BIGINT", ge=1)
    changed_at: Series[pd.Timestamp] = column("TIMESTAMP")
    run_id: Series[str] = column("VARCHAR", nullable=True)

    class Config:
        strict = True


OVERRIDE_ACTIONS = {"take_out": "split", "keep_apart": "split", "join": "merge"}


class IdentityOverrides(pa.DataFrameModel):
    """A user's decision about who is who (`persona unmerge`, `persona merge`), applied by every later
    identity run, full or incremental, until a later decision undoes it. One row per identifier the
    decision names (email and phone as keyed hashes): `take_out` keeps one identifier out of linking,
    `keep_apart` keeps its parts from being linked by a match, `join` makes its parts one person.
    Kept across full rebuilds (identity never rewrites it)."""

    override_id: Series[int] = column("BIGINT", ge=1)
    kind: Series[str] = column("VARCHAR", isin=["split", "merge"])
    action: Series[str] = column("VARCHAR", isin=list(OVERRIDE_ACTIONS))
    part: Series[int] = column("BIGINT", ge=1)
    identifier_type: Series[str] = column("VARCHAR", isin=IDENTIFIER_TYPES)
    identifier: Series[str] = column("VARCHAR")
    person_id: Series[str] = column("VARCHAR", str_matches=PERSON_ID)  # the person it was decided on
    decided_by: Series[str] = column("VARCHAR")
    decided_at: Series[pd.Timestamp] = column("TIMESTAMP")
    reason: Series[str] = column("VARCHAR", nullable=True)
    revoked_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    revoked_by: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=1)

    @pa.dataframe_check(error="take_out and keep_apart are splits, join is a merge")
    def kind_matches_action(cls, df: pd.DataFrame) -> Series[bool]:
        return df["action"].map(OVERRIDE_ACTIONS) == df["kind"]

    class Config:
        strict = True
        unique = ["override_id", "part"]


SURVIVING_TRAITS = [
    "email_hash",
    "phone_hash",
    "age",
    "birthday",
    "gender",
    "postal_code",
    "city",
    "country",
    "consent",
]


class DedupedUsers(pa.DataFrameModel):
    """One row per person: identifiers, activity span and the most recent valid value of each trait
    (the latest invalid one only when none was ever valid)."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    identifier_count: Series[int] = column("BIGINT", ge=1)
    anonymous_id_count: Series[int] = column("BIGINT", ge=0)
    user_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    event_count: Series[int] = column("BIGINT", ge=0)
    first_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    email_hash: Series[str] = column("VARCHAR", identifying=True, nullable=True, str_matches=HEX64)
    email_hash_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    email_hash_message_id: Series[str] = column("VARCHAR", nullable=True)
    phone_hash: Series[str] = column("VARCHAR", identifying=True, nullable=True, str_matches=HEX64)
    phone_hash_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    phone_hash_message_id: Series[str] = column("VARCHAR", nullable=True)
    age: Series[str] = column("VARCHAR", nullable=True)
    age_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    age_message_id: Series[str] = column("VARCHAR", nullable=True)
    birthday: Series[str] = column("VARCHAR", serving=False, nullable=True)
    birthday_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    birthday_message_id: Series[str] = column("VARCHAR", nullable=True)
    gender: Series[str] = column("VARCHAR", nullable=True)
    gender_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    gender_message_id: Series[str] = column("VARCHAR", nullable=True)
    postal_code: Series[str] = column("VARCHAR", nullable=True)
    postal_code_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    postal_code_message_id: Series[str] = column("VARCHAR", nullable=True)
    city: Series[str] = column("VARCHAR", nullable=True)
    city_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    city_message_id: Series[str] = column("VARCHAR", nullable=True)
    country: Series[str] = column("VARCHAR", nullable=True)
    country_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    country_message_id: Series[str] = column("VARCHAR", nullable=True)
    # The person's last word on personalization: 'declined' keeps them out of profiling.
    consent: Series[str] = column("VARCHAR", nullable=True, isin=["granted", "declined"])
    consent_observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    consent_message_id: Series[str] = column("VARCHAR", nullable=True)

    class Config:
        strict = True


class Sessions(pa.DataFrameModel):
    """A person's run of events without a pause longer than the session gap."""

    session_id: Series[str] = column("VARCHAR", identifying=True, unique=True)
    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    started_at: Series[pd.Timestamp] = column("TIMESTAMP")
    ended_at: Series[pd.Timestamp] = column("TIMESTAMP")
    duration_seconds: Series[float] = column("DOUBLE", ge=0)
    event_count: Series[int] = column("BIGINT", ge=1)
    events_per_minute: Series[float] = column("DOUBLE", ge=0)
    device_type: Series[str] = column("VARCHAR", nullable=True)
    anonymous_id: Series[str] = column("VARCHAR", identifying=True, nullable=True)
    is_long: Series[bool] = column("BOOLEAN")
    is_burst: Series[bool] = column("BOOLEAN")

    class Config:
        strict = True


AGE_BRACKETS = ["<25", "25-34", "35-44", "45-54", "55+"]


class CleanedUsers(pa.DataFrameModel):
    """One row per person: behaviour aggregates, cleaned traits, missing ratio and outlier flags."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    first_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    event_count: Series[int] = column("BIGINT", ge=0)
    behaviour_events: Series[int] = column("BIGINT", ge=0)  # track, page and screen calls
    session_count: Series[int] = column("BIGINT", ge=0)
    avg_session_seconds: Series[float] = column("DOUBLE", nullable=True, ge=0)
    median_session_seconds: Series[float] = column("DOUBLE", nullable=True, ge=0)
    order_count: Series[int] = column("BIGINT", ge=0)
    total_revenue: Series[float] = column("DOUBLE", ge=0)
    avg_order_value: Series[float] = column("DOUBLE", nullable=True, ge=0)
    first_order_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_order_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    days_since_last_order: Series[float] = column("DOUBLE", nullable=True)
    sessions_per_week: Series[float] = column("DOUBLE", ge=0)
    category_counts: Series[object] = column("MAP(VARCHAR, BIGINT)", nullable=True)
    mobile_share: Series[float] = column("DOUBLE", ge=0, le=1)
    desktop_share: Series[float] = column("DOUBLE", ge=0, le=1)
    tablet_share: Series[float] = column("DOUBLE", ge=0, le=1)
    night_share: Series[float] = column("DOUBLE", ge=0, le=1)
    morning_share: Series[float] = column("DOUBLE", ge=0, le=1)
    afternoon_share: Series[float] = column("DOUBLE", ge=0, le=1)
    evening_share: Series[float] = column("DOUBLE", ge=0, le=1)
    age: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=13, le=100)
    age_bracket: Series[str] = column("VARCHAR", nullable=True, isin=AGE_BRACKETS)
    gender: Series[str] = column("VARCHAR", nullable=True, isin=["female", "male", "nonbinary"])
    country: Series[str] = column("VARCHAR", nullable=True, str_matches=r"^[A-Z]{2}$")
    postal_code: Series[str] = column("VARCHAR", nullable=True)
    has_email: Series[bool] = column("BOOLEAN")
    has_phone: Series[bool] = column("BOOLEAN")
    trait_issues: Series[object] = column("VARCHAR[]", nullable=True)
    missing_ratio: Series[float] = column("DOUBLE", ge=0, le=1)
    is_sparse: Series[bool] = column("BOOLEAN")
    has_long_session: Series[bool] = column("BOOLEAN")
    is_bot: Series[bool] = column("BOOLEAN")
    outlier_flags: Series[object] = column("VARCHAR[]", nullable=True)
    exclude_from_fitting: Series[bool] = column("BOOLEAN")

    class Config:
        strict = True


class NormalizedFeatures(pa.DataFrameModel):
    """The modelling matrix: one row per non-sparse person, features log1p'd, clipped and scaled.

    Besides the fixed behaviour features there is one `category_<name>` column per category
    the transform was fitted with (plus `category_other`).
    """

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    used_for_fitting: Series[bool] = column("BOOLEAN")
    transform_version: Series[int] = column("BIGINT", ge=1)
    event_count: Series[float] = column("DOUBLE")
    session_count: Series[float] = column("DOUBLE")
    avg_session_seconds: Series[float] = column("DOUBLE")
    events_per_session: Series[float] = column("DOUBLE")
    sessions_per_week: Series[float] = column("DOUBLE")
    order_count: Series[float] = column("DOUBLE")
    total_revenue: Series[float] = column("DOUBLE")
    avg_order_value: Series[float] = column("DOUBLE")
    conversion_rate: Series[float] = column("DOUBLE")
    mobile_share: Series[float] = column("DOUBLE")
    desktop_share: Series[float] = column("DOUBLE")
    tablet_share: Series[float] = column("DOUBLE")
    night_share: Series[float] = column("DOUBLE")
    morning_share: Series[float] = column("DOUBLE")
    afternoon_share: Series[float] = column("DOUBLE")
    evening_share: Series[float] = column("DOUBLE")

    @pa.dataframe_check(error="every feature is a finite number")
    def finite(cls, df: pd.DataFrame) -> Series[bool]:
        numeric = df.drop(columns=["person_id", "used_for_fitting", "transform_version"], errors="ignore")
        return pd.Series(np.isfinite(numeric.to_numpy(dtype=float)).all(axis=1), index=df.index)


SEGMENT_ID = r"^S[0-9]+$"


class Segments(pa.DataFrameModel):
    """Each person's segment, sub-segment and noise flag under one saved segment model."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    # Empty (NULL) for people with no behaviour to place them by, and for everyone while no
    # segment model could be fitted (see the segments asset's status).
    segment_id: Series[str] = column("VARCHAR", nullable=True, str_matches=SEGMENT_ID)
    segment_name: Series[str] = column("VARCHAR", nullable=True)
    subsegment_id: Series[str] = column("VARCHAR", nullable=True, str_matches=r"^S[0-9]+\.[0-9]+$")
    subsegment_name: Series[str] = column("VARCHAR", nullable=True)
    is_noise: Series[bool] = column("BOOLEAN")
    segment_distance: Series[float] = column("DOUBLE", nullable=True, ge=0)
    segment_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    low_confidence: Series[bool] = column("BOOLEAN")
    model_version: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True, ge=1)

    class Config:
        strict = True


class SegmentCatalog(pa.DataFrameModel):
    """Every segment and sub-segment of the current model: name, size and what sets it apart."""

    level: Series[str] = column("VARCHAR", isin=["segment", "subsegment"])
    id: Series[str] = column("VARCHAR", unique=True)
    parent_id: Series[str] = column("VARCHAR", nullable=True)
    name: Series[str] = column("VARCHAR")
    people: Series[int] = column("BIGINT", ge=0)
    share: Series[float] = column("DOUBLE", ge=0, le=1)
    explanation: Series[str] = column("VARCHAR")
    model_version: Series[int] = column("BIGINT", ge=1)

    class Config:
        strict = True


TRAIT_SOURCES = ["observed", "enriched", "inferred", "imputed_model", "imputed_stat", "unknown"]


class ImputedAttributes(pa.DataFrameModel):
    """One row per person and trait: the value and where it came from."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID)
    trait: Series[str] = column("VARCHAR")
    value: Series[str] = column("VARCHAR", nullable=True)
    source: Series[str] = column("VARCHAR", isin=TRAIT_SOURCES)
    confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    model_version: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True)
    observed_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)

    @pa.dataframe_check(error="a value has a source other than unknown, and unknown has no value")
    def source_matches_value(cls, df: pd.DataFrame) -> Series[bool]:
        return df["value"].isna() == (df["source"] == "unknown")

    @pa.dataframe_check(error="only model imputations carry a model version")
    def model_version_only_for_models(cls, df: pd.DataFrame) -> Series[bool]:
        return df["model_version"].isna() != (df["source"] == "imputed_model")

    class Config:
        strict = True
        unique = ["person_id", "trait"]


class TraitModelMetrics(pa.DataFrameModel):
    """Holdout scores of each trait model next to its baselines."""

    trait: Series[str] = column("VARCHAR")
    model: Series[str] = column("VARCHAR", isin=["lightgbm", "logistic_tfidf", "random_forest", "majority_baseline"])
    accuracy: Series[float] = column("DOUBLE", ge=0, le=1)
    macro_f1: Series[float] = column("DOUBLE", ge=0, le=1)
    train_rows: Series[int] = column("BIGINT", ge=1)
    holdout_rows: Series[int] = column("BIGINT", ge=1)
    model_version: Series[int] = column("BIGINT", ge=1)
    # The model the trait's guesses come from (chosen by holdout macro-F1), and its expected
    # calibration error on the holdout before and after calibration (NULL on the other rows).
    chosen: Series[bool] = column("BOOLEAN")
    ece: Series[float] = column("DOUBLE", nullable=True, ge=0, le=1)
    ece_uncalibrated: Series[float] = column("DOUBLE", nullable=True, ge=0, le=1)
    beats_baseline: Series[bool] = column("BOOLEAN")
    trained_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True


class TraitModelDrift(pa.DataFrameModel):
    """Population stability index of each model input, training snapshot vs. now."""

    trait: Series[str] = column("VARCHAR")
    feature: Series[str] = column("VARCHAR")
    psi: Series[float] = column("DOUBLE", ge=0)
    model_version: Series[int] = column("BIGINT", ge=1)

    class Config:
        strict = True


class TraitImportance(pa.DataFrameModel):
    """How much an answer to each askable trait is worth (for next_question)."""

    trait: Series[str] = column("VARCHAR", unique=True)
    segment_ami: Series[float] = column("DOUBLE", ge=0, le=1)
    importance: Series[float] = column("DOUBLE", ge=0)

    class Config:
        strict = True


class CategoryScores(pa.DataFrameModel):
    """Each person's decayed interest per category (category -> score) and the category they are
    most into, valued at `scored_at` (behind category_affinity and top_category)."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    scores: Series[object] = column("MAP(VARCHAR, DOUBLE)")
    top_category: Series[str] = column("VARCHAR")
    scored_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True


class UserProfiles(pa.DataFrameModel):
    """One row per person: what users query (the README's "user_profiles" section lists every column)."""

    person_id: Series[str] = column("VARCHAR", identifying=True, str_matches=PERSON_ID, unique=True)
    identifier_count: Series[int] = column("BIGINT", ge=1)
    first_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_seen_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    session_count: Series[int] = column("BIGINT", ge=0)
    avg_session_seconds: Series[float] = column("DOUBLE", nullable=True, ge=0)
    event_count: Series[int] = column("BIGINT", ge=0)
    order_count: Series[int] = column("BIGINT", ge=0)
    total_revenue: Series[float] = column("DOUBLE", ge=0)
    avg_order_value: Series[float] = column("DOUBLE", nullable=True, ge=0)
    first_order_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_order_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    days_since_last_order: Series[float] = column("DOUBLE", nullable=True)
    sessions_per_week: Series[float] = column("DOUBLE", ge=0)
    top_category: Series[str] = column("VARCHAR", nullable=True)
    category_affinity: Series[object] = column("MAP(VARCHAR, DOUBLE)", nullable=True)
    age_bracket: Series[str] = column("VARCHAR", nullable=True, isin=AGE_BRACKETS)
    age_bracket_source: Series[str] = column("VARCHAR", isin=TRAIT_SOURCES)
    age_bracket_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    age_bracket_model_version: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True)
    gender: Series[str] = column("VARCHAR", nullable=True, isin=["female", "male", "nonbinary"])
    gender_source: Series[str] = column("VARCHAR", isin=TRAIT_SOURCES)
    gender_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    gender_model_version: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True)
    country: Series[str] = column("VARCHAR", nullable=True, str_matches=r"^[A-Z]{2}$")
    country_source: Series[str] = column("VARCHAR", isin=TRAIT_SOURCES)
    country_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    country_model_version: Series[pd.Int64Dtype] = column("BIGINT", nullable=True, coerce=True)
    primary_device: Series[str] = column("VARCHAR", nullable=True)
    primary_device_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    usual_daypart: Series[str] = column("VARCHAR", nullable=True, isin=["night", "morning", "afternoon", "evening"])
    usual_daypart_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    intent_score: Series[float] = column("DOUBLE", ge=0, le=1)
    enriched: Series[object] = column("MAP(VARCHAR, VARCHAR)", nullable=True)
    segment_id: Series[str] = column("VARCHAR", nullable=True, str_matches=SEGMENT_ID)
    segment_name: Series[str] = column("VARCHAR", nullable=True)
    subsegment_id: Series[str] = column("VARCHAR", nullable=True)
    subsegment_name: Series[str] = column("VARCHAR", nullable=True)
    is_noise: Series[bool] = column("BOOLEAN")
    segment_confidence: Series[float] = column("DOUBLE", ge=0, le=1)
    missing_ratio: Series[float] = column("DOUBLE", ge=0, le=1)
    is_sparse: Series[bool] = column("BOOLEAN")
    is_bot: Series[bool] = column("BOOLEAN")
    outlier_flags: Series[object] = column("VARCHAR[]", nullable=True)
    completeness: Series[float] = column("DOUBLE", ge=0, le=1)
    next_question: Series[str] = column("VARCHAR", nullable=True)
    updated_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True


# --- audiences (DESIGN.md section 11) -------------------------------------------------------------

COMPUTED_TRAIT_KINDS = [
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "most_frequent",
    "first",
    "last",
    "unique_list",
    "unique_count",
]
AUDIENCE_CHANGES = ["entered", "exited"]


class ComputedTraits(pa.DataFrameModel):
    """One computed trait of one person (audiences.yaml `computed_traits:`, and the counts behind
    audiences' event conditions): a number, a text or a list, with provenance `computed`. A person
    with no matching event has no row (a count reads as 0)."""

    person_id: Series[str] = column("VARCHAR", str_matches=PERSON_ID)
    trait: Series[str] = column("VARCHAR")
    kind: Series[str] = column("VARCHAR", isin=COMPUTED_TRAIT_KINDS)
    number: Series[float] = column("DOUBLE", nullable=True)
    text: Series[str] = column("VARCHAR", nullable=True)
    list: Series[object] = column("VARCHAR[]", nullable=True)
    source: Series[str] = column("VARCHAR", isin=["computed"])

    class Config:
        strict = True
        unique = ["person_id", "trait"]


class AudienceMembers(pa.DataFrameModel):
    """Who is in each audience now, and since when (the run that saw them enter)."""

    audience: Series[str] = column("VARCHAR")
    person_id: Series[str] = column("VARCHAR", str_matches=PERSON_ID)
    entered_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True
        unique = ["audience", "person_id"]


class AudienceChanges(pa.DataFrameModel):
    """Every entry and exit, in order (`change_id`), with the run that saw it and the data's clock then."""

    change_id: Series[int] = column("BIGINT", ge=1, unique=True)
    audience: Series[str] = column("VARCHAR")
    person_id: Series[str] = column("VARCHAR", str_matches=PERSON_ID)
    change: Series[str] = column("VARCHAR", isin=AUDIENCE_CHANGES)
    changed_at: Series[pd.Timestamp] = column("TIMESTAMP")
    as_of: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    run: Series[str] = column("VARCHAR")

    class Config:
        strict = True


class AudienceRuns(pa.DataFrameModel):
    """Each evaluation of an audience: its size, who entered and exited, and the definition used."""

    audience: Series[str] = column("VARCHAR")
    run: Series[str] = column("VARCHAR")
    evaluated_at: Series[pd.Timestamp] = column("TIMESTAMP")
    as_of: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    size: Series[int] = column("BIGINT", ge=0)
    entered: Series[int] = column("BIGINT", ge=0)
    exited: Series[int] = column("BIGINT", ge=0)
    definition: Series[str] = column("VARCHAR")
    seconds: Series[float] = column("DOUBLE", ge=0)

    class Config:
        strict = True


class DestinationDeliveries(pa.DataFrameModel):
    """Each destination's progress: the last change delivered, failures and the last error."""

    destination: Series[str] = column("VARCHAR", unique=True)
    kind: Series[str] = column("VARCHAR", isin=["webhook", "file"])
    delivered_through: Series[int] = column("BIGINT", ge=0)
    delivered: Series[int] = column("BIGINT", ge=0)
    attempts_failed: Series[int] = column("BIGINT", ge=0)
    pending_attempts: Series[int] = column("BIGINT", ge=0)
    last_success_at: Series[pd.Timestamp] = column("TIMESTAMP", nullable=True)
    last_error: Series[str] = column("VARCHAR", nullable=True)
    updated_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True


class DestinationDeadLetters(pa.DataFrameModel):
    """Changes a destination refused or could not take after its attempts: kept, to be sent again."""

    destination: Series[str] = column("VARCHAR")
    change_id: Series[int] = column("BIGINT", ge=1)
    idempotency_key: Series[str] = column("VARCHAR")
    audience: Series[str] = column("VARCHAR")
    person_id: Series[str] = column("VARCHAR", str_matches=PERSON_ID)
    change: Series[str] = column("VARCHAR", isin=AUDIENCE_CHANGES)
    attempts: Series[int] = column("BIGINT", ge=1)
    error: Series[str] = column("VARCHAR")
    dead_at: Series[pd.Timestamp] = column("TIMESTAMP")

    class Config:
        strict = True
        unique = ["destination", "change_id"]
