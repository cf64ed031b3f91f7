"""Audience, computed-trait and destination definitions: read from YAML with their line numbers,
checked as a whole before any run uses them.

The file is `$PERSONA_HOME/audiences.yaml`, or the `computed_traits:` / `audiences:` /
`destinations:` sections of the settings file. Every mistake found is reported at once, each
with its line and the names that would have been accepted; nothing in the file ever reaches SQL
as text except names checked against Persona's own lists (profile columns, event properties).
"""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from persona_assets.contracts import RawEvents, UserProfiles

AUDIENCES_FILE = "audiences.yaml"
SECTIONS = ("computed_traits", "audiences", "destinations")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

TRAIT_KINDS = ("count", "sum", "mean", "min", "max", "most_frequent", "first", "last", "unique_list", "unique_count")
NUMERIC_KINDS = ("count", "sum", "mean", "unique_count")  # always a number, whatever the property
COMPARISONS = ("gte", "lte", "gt", "lt")
OPERATORS = ("eq", "in", *COMPARISONS, "exists", "contains")
SQL_OPERATORS = {"eq": "=", "gte": ">=", "lte": "<=", "gt": ">", "lt": "<"}

# Event properties a trait or filter may read: raw_events' published columns, less identifiers
# and the event's own envelope.
NOT_PROPERTIES = {
    "message_id",
    "event_type",
    "event_name",
    "user_id",
    "anonymous_id",
    "previous_id",
    "event_at",
    "email_hash",
    "phone_hash",
    "device_id",
    "products",
    "batch_id",
    "source_line",
}


def _sql_types(model) -> dict[str, str]:
    schema = model.to_schema()
    return {n: c.metadata["sql"] for n, c in schema.columns.items() if c.metadata.get("serving", True)}


PROPERTY_TYPES = {n: t for n, t in _sql_types(RawEvents).items() if n not in NOT_PROPERTIES}
PROFILE_TYPES = _sql_types(UserProfiles)
MAP_COLUMNS = {n: t for n, t in PROFILE_TYPES.items() if t.startswith("MAP(")}
NUMERIC_SQL = ("BIGINT", "DOUBLE")


class DefinitionsError(ValueError):
    """A definitions file that cannot be used: one line per mistake, each with its line number."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- reading YAML with line numbers -------------------------------------------------------------


class Located(dict):
    """A YAML mapping that remembers its line and each key's line."""

    line: int = 0
    key_lines: dict


class LocatedList(list):
    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    out = Located()
    out.line, out.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    out = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def line_of(value, key=None, default: int = 0) -> int:
    if key is not None and isinstance(value, Located):
        return value.key_lines.get(key, value.line)
    return getattr(value, "line", default)


def plain(value):
    """A located value as plain dicts and lists (for JSON and for the asset's page)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# --- what a file defines ------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """A property condition on events (`where: {category: books}`)."""

    property: str
    op: str
    value: object


@dataclass(frozen=True)
class TraitSpec:
    """A computed trait: `kind` over the `property` of the person's `event`s (within the last
    `within_days` of the data's clock, matching `where`)."""

    name: str
    kind: str
    event: str | None = None
    property: str | None = None
    within_days: int | None = None
    where: tuple[Filter, ...] = ()
    audience: str | None = None  # set for the count behind an audience's event condition

    @builtins.property  # (the field above is called property)
    def column(self) -> str:
        """Which value column of computed_traits holds it: number, text or list."""
        if self.kind == "unique_list":
            return "list"
        if self.kind in NUMERIC_KINDS or PROPERTY_TYPES.get(self.property or "") in NUMERIC_SQL:
            return "number"
        return "text"

    def key(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "audience"}


@dataclass(frozen=True)
class Leaf:
    """A trait, event, segment or audience condition: `subject` (a profile column, a map entry
    `category_affinity.books`, a computed trait, a segment, an audience) `op` `value`."""

    kind: str  # profile, entry, computed, event, segment, audience
    subject: str
    op: str
    value: object
    line: int
    text: str  # the condition as written, for explanations
    spec: TraitSpec | None = None  # an event condition's count


@dataclass(frozen=True)
class Node:
    """all / any / not over conditions."""

    op: str
    items: tuple
    line: int


@dataclass(frozen=True)
class Audience:
    name: str
    description: str
    where: Node | Leaf
    line: int
    definition: dict = field(hash=False, compare=False, default_factory=dict)

    def definition_json(self) -> str:
        return json.dumps(self.definition, sort_keys=True, default=str)


@dataclass(frozen=True)
class Destination:
    name: str
    kind: str  # webhook or file
    audiences: tuple[str, ...]  # empty: every audience
    url: str = ""
    secret_env: str = ""
    batch_size: int = 100
    max_attempts: int = 5
    timeout_seconds: float = 10.0
    folder: str = ""
    format: str = "csv"


@dataclass(frozen=True)
class Definitions:
    traits: dict[str, TraitSpec] = field(default_factory=dict)
    audiences: dict[str, Audience] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)
    source: str = ""

    @property
    def all_traits(self) -> dict[str, TraitSpec]:
        """Named computed traits and the counts behind event conditions."""
        hidden = {t.name: t for a in self.audiences.values() for t in event_traits(a)}
        return {**self.traits, **hidden}

    def settings_key(self) -> dict:
        return {name: spec.key() for name, spec in sorted(self.all_traits.items())}

    def depends_on(self, audience: str) -> list[str]:
        """The audiences `audience`'s conditions name directly."""
        return sorted({leaf.subject for leaf in leaves(self.audiences[audience].where) if leaf.kind == "audience"})


@dataclass(frozen=True)
class Vocabulary:
    """What the data knows, for checking names against it: event names and segments seen (None:
    not known yet, any name passes)."""

    events: frozenset[str] | None = None
    segments: frozenset[str] | None = None


def leaves(node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    return [leaf for item in node.items for leaf in leaves(item)]


def event_trait_name(audience: str, leaf: Leaf) -> str:
    return f"{audience}.line_{leaf.line}"


def event_traits(audience: Audience) -> list[TraitSpec]:
    """The count behind each event condition of an audience, stored as a computed trait."""
    return [leaf.spec for leaf in leaves(audience.where) if leaf.spec is not None]


# --- checking a file ----------------------------------------------------------------------------


def _names(values) -> str:
    values = sorted(values)
    return ", ".join(values) if values else "(none)"


@dataclass
class _Reader:
    """Collects every mistake in a file, each as `file:line: where: what (allowed: ...)`."""

    source: str
    vocab: Vocabulary
    problems: list[str] = field(default_factory=list)
    traits: dict[str, TraitSpec] = field(default_factory=dict)

    def fail(self, line: int, where: str, message: str) -> None:
        self.problems.append(f"{self.source}:{line}: {where}: {message}")

    def mapping(self, value, line: int, where: str) -> bool:
        if isinstance(value, dict):
            return True
        self.fail(line, where, f"expected 'key: value' entries, got {type(value).__name__}")
        return False

    def names(self, section, what: str) -> list[tuple[str, object, int]]:
        """(name, body, line) of each entry of a section, names checked."""
        if section is None:
            return []
        if not self.mapping(section, line_of(section), what):
            return []
        out = []
        for name, body in section.items():
            line = line_of(section, name)
            if not isinstance(name, str) or not NAME.match(name):
                self.fail(
                    line,
                    what,
                    f"{name!r} is not a usable name: lower-case letters, digits and _, starting with a letter",
                )
                continue
            out.append((name, body, line))
        return out


def _event_name(r: _Reader, value, line: int, where: str) -> str | None:
    if not isinstance(value, str) or not value:
        r.fail(line, where, "event must be an event name such as Order Completed")
        return None
    if r.vocab.events is not None and value not in r.vocab.events:
        r.fail(line, where, f"unknown event {value!r}; the data's events: {_names(r.vocab.events)}")
        return None
    return value


def _property(r: _Reader, value, line: int, where: str, numeric: bool = False) -> str | None:
    allowed = [p for p, t in PROPERTY_TYPES.items() if not numeric or t in NUMERIC_SQL]
    if value not in allowed:
        kind = "numeric property" if numeric else "property"
        r.fail(line, where, f"unknown {kind} {value!r}; allowed: {_names(allowed)}")
        return None
    return value


def _filters(r: _Reader, where_map, line: int, where: str) -> tuple[Filter, ...]:
    if where_map is None:
        return ()
    if not r.mapping(where_map, line, f"{where}.where"):
        return ()
    out = []
    for prop, cond in where_map.items():
        at = line_of(where_map, prop, line)
        name = _property(r, prop, at, f"{where}.where")
        if name is None:
            continue
        if isinstance(cond, dict):
            if len(cond) != 1:
                r.fail(at, f"{where}.where.{prop}", f"one operator, got {len(cond)}; operators: {_names(OPERATORS)}")
                continue
            op, value = next(iter(cond.items()))
        else:
            op, value = ("in", cond) if isinstance(cond, list) else ("eq", cond)
        kind = "DOUBLE" if PROPERTY_TYPES[name] in NUMERIC_SQL else "VARCHAR"
        if _operand(r, op, value, kind, at, f"{where}.where.{prop}"):
            out.append(Filter(name, op, plain(value)))
    return tuple(out)


def _within(r: _Reader, value, line: int, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        r.fail(line, where, f"within_days must be a whole number of days, 1 or more, got {value!r}")
        return None
    return value


TRAIT_KEYS = ("event", "property", "within_days", "where")


def _trait(r: _Reader, name: str, body, line: int) -> TraitSpec | None:
    where = f"computed_traits.{name}"
    if not r.mapping(body, line, where):
        return None
    kinds = [k for k in body if k in TRAIT_KINDS]
    if len(body) != 1 or not kinds:
        r.fail(line, where, f"one kind of trait, got {_names(map(str, body))}; kinds: {', '.join(TRAIT_KINDS)}")
        return None
    kind = kinds[0]
    params = body[kind] if body[kind] is not None else Located()
    if not r.mapping(params, line, f"{where}.{kind}"):
        return None
    for key in params:
        if key not in TRAIT_KEYS:
            r.fail(line_of(params, key, line), f"{where}.{kind}", f"unknown key {key!r}; allowed: {_names(TRAIT_KEYS)}")
    event = _event_name(r, params["event"], line_of(params, "event", line), where) if "event" in params else None
    prop = None
    if kind != "count":
        at = line_of(params, "property", line)
        if "property" not in params:
            r.fail(at, where, f"{kind} needs a property; allowed: {_names(PROPERTY_TYPES)}")
        else:
            prop = _property(r, params["property"], at, where, numeric=kind in ("sum", "mean", "min", "max"))
    elif "property" in params:
        r.fail(line_of(params, "property", line), where, "count counts events: use where: to filter on a property")
    within = _within(r, params.get("within_days"), line_of(params, "within_days", line), where)
    filters = _filters(r, params.get("where"), line_of(params, "where", line), where)
    if any(f": {where}:" in p or f": {where}." in p for p in r.problems):
        return None
    return TraitSpec(name, kind, event, prop, within, filters)


def _value_type(r: _Reader, subject: str) -> tuple[str, str] | None:
    """(kind of subject, its SQL type) for a trait condition's subject."""
    if subject in r.traits:
        return "computed", {"number": "DOUBLE", "text": "VARCHAR", "list": "VARCHAR[]"}[r.traits[subject].column]
    if subject in PROFILE_TYPES:
        return "profile", PROFILE_TYPES[subject]
    column, _, entry = subject.partition(".")
    if entry and column in MAP_COLUMNS:
        return "entry", MAP_COLUMNS[column].removeprefix("MAP(VARCHAR, ").removesuffix(")")
    return None


def _operand(r: _Reader, op, value, sql_type: str, line: int, where: str) -> bool:
    """Whether `op: value` suits a subject of `sql_type`."""
    is_list = sql_type.endswith("[]")
    problem = None
    if op not in OPERATORS:
        problem = f"unknown operator {op!r}; operators: {', '.join(OPERATORS)}"
    elif op == "exists":
        problem = None if isinstance(value, bool) else "exists takes true or false"
    elif is_list != (op == "contains"):
        problem = "a list is tested with contains (one value or a list)" if is_list else "contains is for lists"
    elif op in ("in", "contains") and isinstance(value, list):
        bad = [v for v in value if isinstance(v, (dict, list)) or v is None]
        problem = "in takes a non-empty list of values" if bad or not value else None
    elif op == "in":
        problem = "in takes a list of values, such as [books, music]"
    elif isinstance(value, (dict, list)) or value is None:
        problem = f"{op} takes one value"
    elif (
        op in COMPARISONS
        and sql_type in NUMERIC_SQL
        and (isinstance(value, bool) or not isinstance(value, (int, float)))
    ):
        problem = f"{op} on a number takes a number, got {value!r}"
    elif sql_type == "TIMESTAMP" and op != "exists":
        problem = _timestamp_problem(value)
    if problem:
        r.fail(line, where, problem)
    return problem is None


def _timestamp_problem(value) -> str | None:
    from datetime import date, datetime

    if isinstance(value, (date, datetime)):
        return None
    try:
        datetime.fromisoformat(str(value))
        return None
    except ValueError:
        return f"a time is compared with an ISO time such as 2026-01-31, got {value!r}"


CONDITION_KEYS = ("all", "any", "not", "trait", "event", "segment", "audience")


def _condition(r: _Reader, value, line: int, audience: str):
    where = f"audiences.{audience}"
    if not r.mapping(value, line, where):
        return None
    line = line_of(value, default=line)
    heads = [k for k in CONDITION_KEYS if k in value]
    if len(heads) != 1:
        r.fail(
            line, where, f"a condition starts with one of: {', '.join(CONDITION_KEYS)}; got {_names(map(str, value))}"
        )
        return None
    head = heads[0]
    text = json.dumps(plain(value), default=str)
    if head in ("all", "any"):
        items = value[head]
        if not isinstance(items, list) or not items:
            r.fail(line, where, f"{head} takes a non-empty list of conditions")
            return None
        parsed = [_condition(r, item, line_of(item, default=line), audience) for item in items]
        return Node(head, tuple(parsed), line) if all(p is not None for p in parsed) else None
    if head == "not":
        if len(value) != 1:
            r.fail(line, where, "not takes one condition")
            return None
        inner = _condition(r, value["not"], line_of(value["not"], default=line), audience)
        return Node("not", (inner,), line) if inner is not None else None
    if head == "trait":
        return _trait_condition(r, value, line, where, text)
    if head == "event":
        return _event_condition(r, value, line, audience, text)
    if len(value) != 1:
        r.fail(line, where, f"{head} takes only its name, got {_names(map(str, value))}")
        return None
    names = value[head] if isinstance(value[head], list) else [value[head]]
    if not names or not all(isinstance(n, str) for n in names):
        r.fail(line, where, f"{head} takes a name or a list of names")
        return None
    if head == "segment" and r.vocab.segments is not None and set(names) - r.vocab.segments:
        unknown = sorted(set(names) - r.vocab.segments)
        r.fail(line, where, f"unknown segment {', '.join(unknown)}; segments: {_names(r.vocab.segments)}")
        return None
    return (
        Leaf(head, names[0], "in", tuple(names), line, text)
        if head == "segment"
        else Leaf("audience", names[0], "in", names[0], line, text)
    )


def _trait_condition(r: _Reader, value: dict, line: int, where: str, text: str) -> Leaf | None:
    subject = value["trait"]
    ops = [k for k in value if k != "trait"]
    typed = _value_type(r, subject) if isinstance(subject, str) else None
    if typed is None:
        allowed = [*PROFILE_TYPES, *r.traits, *(f"{m}.<key>" for m in MAP_COLUMNS)]
        r.fail(line, where, f"unknown trait {subject!r}; traits: {_names(allowed)}")
        return None
    if len(ops) != 1:
        r.fail(
            line,
            where,
            f"a trait condition takes one operator, got {_names(map(str, ops))}; operators: {', '.join(OPERATORS)}",
        )
        return None
    kind, sql_type = typed
    if not _operand(r, ops[0], value[ops[0]], sql_type, line, where):
        return None
    return Leaf(kind, subject, ops[0], plain(value[ops[0]]), line, text)


EVENT_KEYS = ("event", "count", "within_days", "where")


def _event_condition(r: _Reader, value: dict, line: int, audience: str, text: str) -> Leaf | None:
    where = f"audiences.{audience}"
    for key in value:
        if key not in EVENT_KEYS:
            r.fail(line, where, f"unknown key {key!r} in an event condition; allowed: {', '.join(EVENT_KEYS)}")
            return None
    event = _event_name(r, value["event"], line, where)
    count = value.get("count")
    if not isinstance(count, dict) or len(count) != 1:
        r.fail(line, where, "an event condition needs count: with one operator, such as count: {gte: 2}")
        return None
    op, threshold = next(iter(count.items()))
    ok = _operand(r, op, threshold, "DOUBLE", line, where)
    if ok and op in ("exists", "contains"):
        r.fail(line, where, f"count takes eq, in, {', '.join(COMPARISONS)}")
        ok = False
    within = _within(r, value.get("within_days"), line, where)
    filters = _filters(r, value.get("where"), line, where)
    if event is None or not ok:
        return None
    leaf = Leaf("event", "", op, plain(threshold), line, text)
    spec = TraitSpec(event_trait_name(audience, leaf), "count", event, None, within, filters, audience=audience)
    return Leaf("event", spec.name, op, plain(threshold), line, text, spec)


def _audience(r: _Reader, name: str, body, line: int) -> Audience | None:
    where = f"audiences.{name}"
    if not r.mapping(body, line, where):
        return None
    for key in body:
        if key not in ("description", "where"):
            r.fail(line_of(body, key, line), where, f"unknown key {key!r}; allowed: description, where")
    if "where" not in body:
        r.fail(line, where, "an audience needs where: (its conditions)")
        return None
    condition = _condition(r, body["where"], line_of(body, "where", line), name)
    if condition is None:
        return None
    return Audience(name, str(body.get("description") or ""), condition, line, plain(body))


def _check_references(r: _Reader, audiences: dict[str, Audience], declared: list[str]) -> None:
    """Every audience named exists (`declared`: in the file, even with mistakes of its own, which
    are named already), and none depends on itself."""
    for audience in audiences.values():
        for leaf in leaves(audience.where):
            if leaf.kind == "audience" and leaf.subject not in declared:
                r.fail(
                    leaf.line,
                    f"audiences.{audience.name}",
                    f"unknown audience {leaf.subject!r}; audiences: {_names(audiences)}",
                )
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done" or name not in audiences:
            return
        if state.get(name) == "open":
            cycle = path[path.index(name) :] + [name]
            r.fail(audiences[name].line, f"audiences.{name}", f"audiences depend on each other: {' -> '.join(cycle)}")
            return
        state[name] = "open"
        for leaf in leaves(audiences[name].where):
            if leaf.kind == "audience":
                visit(leaf.subject, [*path, name])
        state[name] = "done"

    for name in audiences:
        visit(name, [])


WEBHOOK_KEYS = ("url", "secret_env", "batch_size", "max_attempts", "timeout_seconds")
FILE_KEYS = ("folder", "format")


def _destination(r: _Reader, name: str, body, line: int, audiences: list[str]) -> Destination | None:
    where = f"destinations.{name}"
    if not r.mapping(body, line, where):
        return None
    kinds = [k for k in ("webhook", "file") if k in body]
    extra = [k for k in body if k not in ("webhook", "file", "audiences")]
    if len(kinds) != 1 or extra:
        r.fail(line, where, "a destination is one of webhook: or file:, with audiences: (default every audience)")
        return None
    names = body.get("audiences") or []
    if not isinstance(names, list) or any(n not in audiences for n in names):
        unknown = [n for n in names if n not in audiences] if isinstance(names, list) else names
        r.fail(line_of(body, "audiences", line), where, f"unknown audience {unknown!r}; audiences: {_names(audiences)}")
        return None
    kind, params = kinds[0], body[kinds[0]]
    if not r.mapping(params, line, f"{where}.{kind}"):
        return None
    allowed = WEBHOOK_KEYS if kind == "webhook" else FILE_KEYS
    for key in params:
        if key not in allowed:
            r.fail(line_of(params, key, line), f"{where}.{kind}", f"unknown key {key!r}; allowed: {', '.join(allowed)}")
    if kind == "file":
        return _file_destination(r, name, params, line, tuple(names))
    return _webhook_destination(r, name, params, line, tuple(names))


def _file_destination(r: _Reader, name: str, params: dict, line: int, names: tuple) -> Destination | None:
    folder, fmt = params.get("folder"), params.get("format", "csv")
    if not isinstance(folder, str) or not folder:
        r.fail(line, f"destinations.{name}", "a file destination needs folder: (relative to PERSONA_HOME, or absolute)")
        return None
    if fmt not in ("csv", "parquet"):
        r.fail(line_of(params, "format", line), f"destinations.{name}", f"format is csv or parquet, got {fmt!r}")
        return None
    return Destination(name, "file", names, folder=folder, format=fmt)


def _webhook_destination(r: _Reader, name: str, params: dict, line: int, names: tuple) -> Destination | None:
    where = f"destinations.{name}"
    url, secret = params.get("url"), params.get("secret_env")
    if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
        r.fail(line_of(params, "url", line), where, f"url must be an http:// or https:// address, got {url!r}")
        return None
    if not isinstance(secret, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", secret):
        r.fail(
            line_of(params, "secret_env", line),
            where,
            "secret_env names the environment variable holding the signing secret (the secret itself "
            "never goes in the file)",
        )
        return None
    numbers = {}
    for key, default, low in (("batch_size", 100, 1), ("max_attempts", 5, 1), ("timeout_seconds", 10.0, 0.1)):
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            r.fail(line_of(params, key, line), where, f"{key} must be a number of at least {low}, got {value!r}")
            return None
        numbers[key] = value
    return Destination(
        name,
        "webhook",
        names,
        url=url,
        secret_env=secret,
        batch_size=int(numbers["batch_size"]),
        max_attempts=int(numbers["max_attempts"]),
        timeout_seconds=float(numbers["timeout_seconds"]),
    )


def parse(raw: dict, source: str, vocab: Vocabulary | None = None) -> Definitions:
    """The sections' definitions, checked as a whole: a DefinitionsError lists every mistake."""
    r = _Reader(source, vocab or Vocabulary())
    for name, body, line in r.names(raw.get("computed_traits"), "computed_traits"):
        if name in PROFILE_TYPES:
            r.fail(line, f"computed_traits.{name}", "a profile column already has this name")
        elif (spec := _trait(r, name, body, line)) is not None:
            r.traits[name] = spec
    audiences, declared = {}, []
    for name, body, line in r.names(raw.get("audiences"), "audiences"):
        declared.append(name)
        if (audience := _audience(r, name, body, line)) is not None:
            audiences[name] = audience
    _check_references(r, audiences, declared)
    destinations = {}
    for name, body, line in r.names(raw.get("destinations"), "destinations"):
        if (destination := _destination(r, name, body, line, declared)) is not None:
            destinations[name] = destination
    if r.problems:
        raise DefinitionsError(r.problems)
    return Definitions(dict(r.traits), audiences, destinations, source)


def read_sections(path: Path) -> dict:
    """A YAML file's audience sections, located (line numbers kept)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DefinitionsError([f"{path}: not a readable YAML file: {exc}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DefinitionsError([f"{path}: expected sections such as 'audiences:' at the top"])
    return raw


def definitions_file(home: Path, settings_file: Path | None) -> Path | None:
    """Where the definitions are: PERSONA_HOME/audiences.yaml, else the settings file when it has a section."""
    own = Path(home) / AUDIENCES_FILE
    if own.is_file():
        return own
    if settings_file is not None and Path(settings_file).is_file():
        raw = read_sections(Path(settings_file))
        if any(s in raw for s in SECTIONS):
            return Path(settings_file)
    return None


def load(home: Path, settings_file: Path | None = None, vocab: Vocabulary | None = None) -> Definitions:
    """The definitions in force (empty when there are none), checked against `vocab`."""
    path = definitions_file(home, settings_file)
    if path is None:
        return Definitions()
    raw = read_sections(path)
    if path.name == AUDIENCES_FILE:
        unknown = [k for k in raw if k not in SECTIONS]
        if unknown:
            raise DefinitionsError(
                [f"{path}:{line_of(raw, unknown[0])}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}"]
            )
    return parse({k: raw.get(k) for k in SECTIONS}, str(path), vocab)
