"""The Segment-spec event fields Persona reads: one table, shared by the generator and ingestion."""

from __future__ import annotations

from dataclasses import dataclass

EVENT_TYPES = ("identify", "track", "page", "screen", "alias")


@dataclass(frozen=True)
class Field:
    """One input field and the `raw_events` column it lands in.

    `paths` are JSON paths in the nested Segment object, `flats` the same fields
    flattened with underscores (CSV and Parquet headers); the first non-null wins,
    so `traits.email` is preferred over `context.traits.email`.
    """

    column: str
    paths: tuple[str, ...]
    kind: str  # id | text | timestamp | number | integer | json | email | phone | trait | restricted

    @property
    def flats(self) -> tuple[str, ...]:
        return tuple(p.removeprefix("$.").replace(".", "_") for p in self.paths)


def _trait(name: str, kind: str = "trait") -> Field:
    return Field(name, (f"$.traits.{name}", f"$.context.traits.{name}"), kind)


FIELDS: tuple[Field, ...] = (
    Field("message_id", ("$.messageId",), "id"),
    Field("event_type", ("$.type",), "text"),
    Field("event_name", ("$.event", "$.name"), "text"),
    Field("user_id", ("$.userId",), "id"),
    Field("anonymous_id", ("$.anonymousId",), "id"),
    Field("previous_id", ("$.previousId",), "id"),
    # A payload as an SDK sends it (RudderStack's, Segment's before its API stamps it) has only originalTimestamp.
    Field("event_at", ("$.timestamp", "$.originalTimestamp"), "timestamp"),
    _trait("email", "email"),
    _trait("phone", "phone"),
    _trait("first_name", "restricted"),
    _trait("last_name", "restricted"),
    _trait("birthday", "restricted"),
    _trait("age"),
    _trait("gender"),
    _trait("postal_code"),
    _trait("city"),
    _trait("country"),
    Field("consent", ("$.context.consent.personalization",), "text"),
    Field("device_id", ("$.context.device.id",), "id"),
    Field("device_type", ("$.context.device.type",), "text"),
    Field("os_name", ("$.context.os.name",), "text"),
    Field("timezone", ("$.context.timezone",), "text"),
    Field("locale", ("$.context.locale",), "text"),
    Field("page_url", ("$.context.page.url",), "text"),
    Field("category", ("$.properties.category",), "text"),
    Field("product_id", ("$.properties.product_id",), "id"),
    Field("price", ("$.properties.price",), "number"),
    Field("quantity", ("$.properties.quantity",), "integer"),
    Field("revenue", ("$.properties.revenue",), "number"),
    Field("order_id", ("$.properties.order_id",), "id"),
    Field("products", ("$.properties.products",), "json"),
    Field("search_query", ("$.properties.query",), "text"),
)

FIELD_BY_COLUMN = {f.column: f for f in FIELDS}

# The largest price or revenue taken as an amount: a larger one is an error (a single order of a
# thousand trillion is not a sale), and sums of amounts stay finite however many there are.
MAX_AMOUNT = 1e15

# Every flattened header name a CSV or Parquet landing file may carry, in a stable order.
FLAT_COLUMNS: tuple[str, ...] = tuple(flat for f in FIELDS for flat in f.flats)

# The flattened columns a typed file (Parquet) may carry as numbers: flat name -> "DOUBLE" or "BIGINT".
NUMERIC_FLAT_COLUMNS: dict[str, str] = {
    flat: "DOUBLE" if f.kind == "number" else "BIGINT"
    for f in FIELDS
    if f.kind in ("number", "integer")
    for flat in f.flats
}

# Columns read with surrounding spaces trimmed and an empty value as missing; every other
# text column is kept as sent.
TRIMMED_COLUMNS = tuple(f.column for f in FIELDS if f.kind == "id") + ("event_type", "event_name", "event_at")

# Columns that identify a person: at least one of these two is required.
PERSON_KEYS = ("user_id", "anonymous_id")

# Columns that never leave the warehouse (used only for matching people).
RESTRICTED_COLUMNS = tuple(f.column for f in FIELDS if f.kind == "restricted")


# `context.consent.personalization` spellings, read as granted or declined; anything else
# (or none) says nothing, and the person's last word stands.
CONSENT_GRANTED = ("true", "yes", "1", "granted", "accepted", "opt_in", "opt-in", "optin")
CONSENT_DECLINED = ("false", "no", "0", "declined", "denied", "rejected", "opt_out", "opt-out", "optout")


def consent_sql(expr: str) -> str:
    """DuckDB expression: 'granted', 'declined' or NULL from a consent value as sent."""
    granted = ", ".join(f"'{v}'" for v in CONSENT_GRANTED)
    declined = ", ".join(f"'{v}'" for v in CONSENT_DECLINED)
    value = f"lower(trim({expr}))"
    return f"CASE WHEN {value} IN ({granted}) THEN 'granted' WHEN {value} IN ({declined}) THEN 'declined' END"


def flatten(event: dict) -> dict[str, object]:
    """Flatten a nested Segment event into the underscore names of FLAT_COLUMNS."""
    out: dict[str, object] = {}
    for flat in FLAT_COLUMNS:
        out[flat] = None
    stack: list[tuple[str, object]] = [("", event)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict) and prefix != "properties_products":
            for key, inner in value.items():
                stack.append((f"{prefix}_{key}" if prefix else key, inner))
        elif prefix in out:
            out[prefix] = value
    return out
