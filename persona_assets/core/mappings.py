"""Per-file mappings: where a foreign export keeps each Segment field, so it is ingested as sent.

A mapping says, for the landing files whose name matches its pattern, which column (CSV,
Parquet) or dotted JSON path holds each Segment field, which event names to translate,
which constants fill a field a line leaves empty, and how the file writes its timestamps.
A file that matches no mapping is read as Segment-spec events, exactly as before. Ingestion
(`core.ingest`) applies the mapping; this module only builds and checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import duckdb

from persona_assets.core.events import EVENT_TYPES, FIELDS, Field

# Segment fields by their dotted name in the spec ("traits.email", "context.traits.email").
SEGMENT_FIELDS: dict[str, Field] = {p.removeprefix("$."): f for f in FIELDS for p in f.paths}
ENTRY_KEYS = ("files", "preset", "columns", "events", "defaults", "timestamp_format")
EPOCH_FORMATS = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}  # microseconds per unit
TIMESTAMP_FORMATS = ("iso", *EPOCH_FORMATS)

# Item keys of GA4's `items` and the Segment product keys they are read as, so a mapped
# product list is unpacked by the same code as a Segment one (`core.affinity`).
ITEM_KEYS = {
    "item_id": "product_id",
    "item_name": "name",
    "item_category": "category",
    "item_brand": "brand",
    "item_variant": "variant",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_INDEXED = re.compile(r"(?P<name>.+?)(?P<index>(?:\[\d+\])*)")


@dataclass(frozen=True)
class FileMapping:
    """How the landing files named like `files` (an fnmatch pattern) carry Segment events.

    `columns` maps a Segment field to the column (CSV, Parquet) or dotted JSON path holding
    it; `events` translates source event names; `defaults` fills a field a line leaves empty.
    The dicts are never changed after `parse_mappings` builds them (the hash assumes it).
    """

    files: str
    columns: dict[str, str] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    timestamp_format: str = "iso"  # iso | epoch_s | epoch_ms | epoch_us | a strptime format

    def __hash__(self) -> int:
        dicts = (self.columns, self.events, self.defaults)
        return hash((self.files, self.timestamp_format, *(frozenset(d.items()) for d in dicts)))

    def sources(self, f: Field) -> tuple[str, ...]:
        """Where this file keeps field `f`, in the field's own order of preference."""
        return tuple(self.columns[p[2:]] for p in f.paths if p[2:] in self.columns)

    def default(self, f: Field) -> str | None:
        return next((self.defaults[p[2:]] for p in f.paths if p[2:] in self.defaults), None)

    def source_columns(self) -> tuple[str, ...]:
        """Every mapped column, once each, in a stable order."""
        return tuple(dict.fromkeys(self.columns.values()))


PRESETS: dict[str, dict] = {
    # GA4's BigQuery export, one event object a line.
    "ga4": {
        "columns": {
            "event": "event_name",
            "timestamp": "event_timestamp",
            "anonymousId": "user_pseudo_id",
            "userId": "user_id",
            "context.device.type": "device.category",
            "properties.order_id": "ecommerce.transaction_id",
            "properties.revenue": "ecommerce.purchase_revenue",
            "properties.product_id": "items[0].item_id",
            "properties.category": "items[0].item_category",
            "properties.price": "items[0].price",
            "properties.quantity": "items[0].quantity",
            # An order's categories are read from its product list (see ITEM_KEYS).
            "properties.products": "items",
        },
        # GA4's recommended e-commerce events as the Segment e-commerce spec names them.
        "events": {
            "purchase": "Order Completed",
            "view_item": "Product Viewed",
            "add_to_cart": "Product Added",
            "remove_from_cart": "Product Removed",
            "begin_checkout": "Checkout Started",
            "view_item_list": "Product List Viewed",
            "select_item": "Product Clicked",
            "view_cart": "Cart Viewed",
            "add_to_wishlist": "Product Added to Wishlist",
            "add_payment_info": "Payment Info Entered",
            "refund": "Order Refunded",
            "search": "Products Searched",
            "sign_up": "Signed Up",
            "login": "Signed In",
        },
        "defaults": {"type": "track"},
        "timestamp_format": "epoch_us",
    },
    # A plain orders export: one order a row.
    "orders_csv": {
        "columns": {
            "userId": "customer_id",
            "timestamp": "order_date",
            "properties.revenue": "amount",
            "properties.order_id": "order_id",
            "messageId": "order_id",
        },
        "defaults": {"type": "track", "event": "Order Completed"},
    },
    # Warehouse-style exports (RudderStack, Snowplow): snake_case keys and event names.
    "snake_case": {
        "columns": {
            "userId": "user_id",
            "anonymousId": "anonymous_id",
            "messageId": "message_id",
            "timestamp": "timestamp",
            "event": "event",
        },
        "events": {
            "order_completed": "Order Completed",
            "product_viewed": "Product Viewed",
            "product_added": "Product Added",
            "product_removed": "Product Removed",
            "products_searched": "Products Searched",
            "checkout_started": "Checkout Started",
            "signed_up": "Signed Up",
            "add_to_cart": "Product Added",
            "remove_from_cart": "Product Removed",
            "transaction": "Order Completed",
            "product_view": "Product Viewed",
        },
    },
}


def parse_mappings(raw: list[dict] | None) -> tuple[FileMapping, ...]:
    """FileMappings from the `mappings:` list of a settings file; a ValueError names what is wrong.

    An entry's `preset` gives the base values; its own `columns`, `events` and `defaults`
    extend or override the preset's, key by key, and its `timestamp_format` replaces it.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"mappings: expected a list of entries, got {type(raw).__name__}")
    return tuple(_parse_entry(entry, f"mappings[{i}]") for i, entry in enumerate(raw))


def mapping_for(mappings: tuple[FileMapping, ...], file_name: str) -> FileMapping | None:
    """The first mapping whose pattern matches the file's name (case-sensitive), or None."""
    return next((m for m in mappings if fnmatchcase(file_name, m.files)), None)


def json_path(dotted: str) -> str:
    """DuckDB JSON path of a dotted source path: `items[0].item_id` -> `$."items"[0]."item_id"`.

    Every key is quoted, so a key may hold spaces or quotes; dots separate keys."""
    parts = []
    for key in dotted.split("."):
        match = _INDEXED.fullmatch(key)
        if match is None:
            raise ValueError(f"not a dotted JSON path: {dotted!r}")
        quoted = match["name"].replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'."{quoted}"{match["index"]}')
    return "$" + "".join(parts)


def mapping_top_key(dotted: str) -> str:
    """The first key of a dotted source path (`items[0].item_id` -> `items`): the column of a CSV or
    Parquet file that holds the rest."""
    match = _INDEXED.fullmatch(dotted.split(".")[0])
    if match is None:
        raise ValueError(f"not a dotted JSON path: {dotted!r}")
    return match["name"]


def strptime_has_zone(fmt: str) -> bool:
    """Whether a strptime format reads a time zone (then DuckDB returns an aware timestamp)."""
    return bool(re.search(r"%[zZ]", fmt.replace("%%", "")))


def _parse_entry(entry: object, where: str) -> FileMapping:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(ENTRY_KEYS)}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(ENTRY_KEYS)}")
    files = entry.get("files")
    if not isinstance(files, str) or not files:
        raise ValueError(f"{where}.files: expected a file-name pattern such as 'ga4_*.jsonl', got {files!r}")
    base = _preset(entry, where)
    columns = {**base.get("columns", {}), **_pairs(entry, "columns", where)}
    events = {**base.get("events", {}), **_pairs(entry, "events", where)}
    defaults = {**base.get("defaults", {}), **_pairs(entry, "defaults", where)}
    timestamp_format = entry.get("timestamp_format", base.get("timestamp_format", "iso"))
    _check_columns(columns, f"{where}.columns")
    _check_events(events, f"{where}.events")
    _check_defaults(defaults, f"{where}.defaults")
    _check_timestamp_format(timestamp_format, f"{where}.timestamp_format")
    return FileMapping(files, columns, events, defaults, timestamp_format)


def _preset(entry: dict, where: str) -> dict:
    if "preset" not in entry:
        return {}
    name = entry["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"{where}.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def _pairs(entry: dict, key: str, where: str) -> dict[str, str]:
    """The entry's `key` as a dict of strings (absent or empty: none)."""
    value = entry.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}.{key}: expected a mapping of names to strings, got {type(value).__name__}")
    for name, target in value.items():
        if not isinstance(name, str) or not isinstance(target, str):
            raise ValueError(
                f"{where}.{key}: {name!r}: {target!r} is not a string pair (quote numbers and booleans in YAML)"
            )
    return dict(value)


def _check_field(name: str, where: str) -> None:
    if name not in SEGMENT_FIELDS:
        raise ValueError(f"{where}: unknown Segment field {name!r}; allowed: {', '.join(SEGMENT_FIELDS)}")


def _check_columns(columns: dict[str, str], where: str) -> None:
    for name, source in columns.items():
        _check_field(name, where)
        if not source or _CONTROL.search(source) or "" in source.split("."):
            raise ValueError(
                f"{where}.{name}: {source!r} is not a column name or dotted JSON path "
                "(no control characters, no empty part between dots)"
            )


def _check_events(events: dict[str, str], where: str) -> None:
    for source, target in events.items():
        if not source or not target.strip():
            raise ValueError(f"{where}: {source!r}: {target!r}: event names must not be empty")


def _check_defaults(defaults: dict[str, str], where: str) -> None:
    for name, value in defaults.items():
        _check_field(name, where)
        if name == "type" and value not in EVENT_TYPES:
            raise ValueError(f"{where}.type: unknown event type {value!r}; allowed: {', '.join(EVENT_TYPES)}")


def _check_timestamp_format(fmt: object, where: str) -> None:
    allowed = f"allowed: {', '.join(TIMESTAMP_FORMATS)} or a strptime format such as '%Y%m%d'"
    if not isinstance(fmt, str) or (fmt not in TIMESTAMP_FORMATS and "%" not in fmt):
        raise ValueError(f"{where}: {fmt!r} is not a timestamp format; {allowed}")
    if fmt in TIMESTAMP_FORMATS:
        return
    try:
        with duckdb.connect() as con:
            con.execute("SELECT try_strptime('', ?)", [fmt])
    except duckdb.Error as exc:
        raise ValueError(f"{where}: {fmt!r} is not a strptime format DuckDB reads ({exc}); {allowed}") from None
