"""Deterministic identity resolution: identifiers seen together form a graph, a person is a component.

Identifiers are integer-encoded in DuckDB and the components found by scipy's C
implementation. An identifier tied to too many userIds, emails or anonymousIds (a shared
tablet, `test@test.com`, a call-centre phone) is kept out of the graph's edges. A
person's id is a pure function of its component — the hash of its earliest-seen
identifier — so reruns and full rebuilds agree, and it changes only when people merge
or split (recorded in `person_id_history`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import phonenumbers
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from persona_assets.contracts import (
    SURVIVING_TRAITS,
    DedupedUsers,
    IdentityGuard,
    IdentityLinks,
    IdentityMap,
    IdentityPii,
    PersonIdHistory,
    ddl,
)
from persona_assets.core import components, linkage, overrides, refresh
from persona_assets.core.components import Steps
from persona_assets.core.engine import SparkTables, duckdb_functions
from persona_assets.core.faults import kill_point
from persona_assets.core.options import setting
from persona_assets.core.publish import sql_literal
from persona_assets.core.stage import StageResult
from persona_assets.core.warehouse import Scratch, data_as_of, replace_tables, scratch, transaction

if TYPE_CHECKING:  # pyspark is imported only by the Spark path
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class IdentityOptions:
    """How identifiers become people."""

    max_user_ids_per_identifier: int = setting(
        1, "An identifier seen with more userIds than this (a shared tablet) links nobody.", ge=1
    )
    max_emails_per_identifier: int = setting(3, "An identifier seen with more emails than this links nobody.", ge=1)
    max_anonymous_ids_per_identifier: int = setting(
        20, "An identifier seen with more anonymousIds than this (test@test.com) links nobody.", ge=1
    )
    linkage: bool = setting(
        True,
        "After deterministic stitching, link people who share no identifier by name, birth date, "
        "age, postcode and city (Splink).",
    )
    link_threshold: float = setting(
        0.7, "Match probability at or above which two people are linked (7 to 3 or better).", gt=0, lt=1
    )
    link_across_user_ids: bool = setting(
        False, "Let a probabilistic link join two people with different verified userIds."
    )
    link_pairs_per_record: int = setting(
        50,
        "Pairs of records linkage may compare, per record (2 million at least). Where blocking would give "
        "more (a name thousands share), the most common keys are left out, largest first, and the "
        "identity_links metadata says which; a pair there is still compared when a stricter rule finds it.",
        ge=1,
    )
    min_link_records: int = setting(
        200,
        "People with a name or birth date needed before a linkage model is trained. 200 is enough: the prior "
        "is estimated from exact and near-exact pairs (one typo), and a model EM cannot estimate on few "
        "records fails its checks and links with the fallback instead; below it linkage waits and says so.",
        ge=2,
    )


@dataclass
class IdentityReport(StageResult):
    identifiers: int = 0
    guard_hits: int = 0
    multi_identifier_people: int = 0
    largest: list[tuple[str, int]] = field(default_factory=list)
    history: int = 0
    links: linkage.LinkReport = field(default_factory=linkage.LinkReport)
    # A model a Spark run trained, saved by its caller in the carry's transaction (`spark_stages.identity`).
    trained_model: dict | None = field(default=None, repr=False)


# (identifier_type, column in the event tuple)
IDENTIFIER_COLUMNS = [
    ("anonymous_id", "anonymous_id"),
    ("anonymous_id", "previous_id"),
    ("user_id", "user_id"),
    ("email", "email_hash"),
    ("phone", "phone_hash"),
    ("device_id", "device_id"),
]

# Events are attributed to the person of their userId, else of their anonymousId.
PERSON_EVENTS = """
SELECT coalesce(mu.person_id, ma.person_id) AS person_id, e.*
FROM raw_events e
LEFT JOIN identity_map mu ON mu.identifier_type = 'user_id' AND mu.identifier = e.user_id
LEFT JOIN identity_map ma ON ma.identifier_type = 'anonymous_id' AND ma.identifier = e.anonymous_id
"""
PERSON_EVENTS_VIEW = f"CREATE OR REPLACE VIEW person_events AS {PERSON_EVENTS}"


def stage_scope_events(
    con: duckdb.DuckDBPyConnection,
    scope: refresh.Scope,
    columns: tuple[str, ...],
    event_names: tuple[str, ...] = (),
    name: str = "_scope_events",
) -> None:
    """`person_events` for the people in `scope` only, as `_scope_events` (or `name`): one scan of the
    `columns` the stage reads (reading raw_events is most of an incremental run's cost, and each
    column more adds to it), of the events of their userIds and anonymousIds (a userId's person
    wins, as in the view); only events named `event_names` when given."""
    cols = ", ".join(f"e.{c}" for c in columns)
    named = f"event_name IN ({', '.join(sql_literal(n) for n in event_names)}) AND " if event_names else ""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _scope_ids AS
            SELECT identifier_type, identifier FROM identity_map
            WHERE identifier_type IN ('user_id', 'anonymous_id') AND {scope.has()}"""
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {name} AS
        SELECT coalesce(mu.person_id, ma.person_id) AS person_id, {cols}
        FROM (SELECT * FROM raw_events
              WHERE {named}(user_id IN (SELECT identifier FROM _scope_ids WHERE identifier_type = 'user_id')
                 OR anonymous_id IN (SELECT identifier FROM _scope_ids WHERE identifier_type = 'anonymous_id'))) e
        LEFT JOIN identity_map mu ON mu.identifier_type = 'user_id' AND mu.identifier = e.user_id
        LEFT JOIN identity_map ma ON ma.identifier_type = 'anonymous_id' AND ma.identifier = e.anonymous_id
        WHERE {scope.has("coalesce(mu.person_id, ma.person_id)")}"""
    )
    con.execute("DROP TABLE _scope_ids")


IDENTIFIER_TUPLE = ", ".join(sorted({c for _, c in IDENTIFIER_COLUMNS}))

# {events}: the events to read. Each distinct tuple of identifiers seen together, numbered
# (any number unique to the row: see engine.to_spark), with when it was first and last seen.
TUPLES = f"""
SELECT row_number() OVER () AS tid, * FROM (
  SELECT {IDENTIFIER_TUPLE}, min(event_at) AS first_at, max(event_at) AS last_at FROM {{events}} GROUP BY ALL
) AS seen
"""

# Every identifier's occurrence in a tuple.
OCCURRENCES = " UNION ALL ".join(
    f"SELECT tid, '{t}' AS identifier_type, {c} AS identifier, first_at, last_at FROM _tuples WHERE {c} IS NOT NULL"
    for t, c in IDENTIFIER_COLUMNS
)

# Each identifier numbered 0..n-1 (scipy's graph needs dense node numbers), without one sort of
# them all (on Spark a window over every row runs in a single task): the identifiers are spread
# over NODE_BUCKETS buckets by a hash (any hash: the engine's own), numbered within their bucket,
# and each bucket's numbers start after the buckets before it (a running sum over the buckets'
# sizes, NODE_BUCKETS rows). What number an identifier gets changes no result: components, person
# ids and links are read from the identifiers themselves.
NODE_BUCKETS = 1024
NODES = f"""
WITH ids AS (
  SELECT identifier_type, identifier, min(first_at) AS first_seen_at, max(last_at) AS last_seen_at,
         hash(identifier) % {NODE_BUCKETS} AS bucket
  FROM _occ GROUP BY identifier_type, identifier
), sizes AS (SELECT bucket, count(*) AS n FROM ids GROUP BY bucket),
starts AS (SELECT bucket, sum(n) OVER (ORDER BY bucket) - n AS start FROM sizes)
SELECT (s.start + row_number() OVER (PARTITION BY i.bucket ORDER BY i.identifier_type, i.identifier) - 1)::BIGINT AS node,
       i.identifier_type, i.identifier, i.first_seen_at, i.last_seen_at
FROM ids i JOIN starts s ON s.bucket = i.bucket
"""

# Everything an identifier was seen with, counted per kind of identifier; those seen with too many link nobody.
GUARD = """
WITH seen AS (
  SELECT o.identifier_type, o.identifier,
         count(DISTINCT t.user_id) AS user_ids,
         count(DISTINCT t.email_hash) AS emails,
         count(DISTINCT coalesce(t.anonymous_id, t.previous_id)) AS anonymous_ids
  FROM _occ o JOIN _tuples t USING (tid) GROUP BY 1, 2
)
SELECT *, concat_ws('; ',
    CASE WHEN identifier_type <> 'user_id' AND user_ids > $max_users THEN user_ids || ' userIds' END,
    CASE WHEN identifier_type <> 'email' AND emails > $max_emails THEN emails || ' emails' END,
    CASE WHEN identifier_type <> 'anonymous_id' AND anonymous_ids > $max_anons
         THEN anonymous_ids || ' anonymousIds' END) AS reason
FROM seen
WHERE (identifier_type <> 'user_id' AND user_ids > $max_users)
   OR (identifier_type <> 'email' AND emails > $max_emails)
   OR (identifier_type <> 'anonymous_id' AND anonymous_ids > $max_anons)
"""


def _guard_params(opts: IdentityOptions) -> dict[str, int]:
    """GUARD's limits, bound as parameters on both engines."""
    return {
        "max_users": opts.max_user_ids_per_identifier,
        "max_emails": opts.max_emails_per_identifier,
        "max_anons": opts.max_anonymous_ids_per_identifier,
    }


def stage_identifiers(t: Steps, opts: IdentityOptions, events: str = "raw_events") -> None:
    """Tables `_tuples`, `_occ`, `_nodes` and `_guard` from `events`, on either engine."""
    t.table("_tuples", TUPLES.format(events=events))
    t.table("_occ", OCCURRENCES)
    t.table("_nodes", NODES)
    t.table("_guard", GUARD, _guard_params(opts))


def _stage_identifiers(con: duckdb.DuckDBPyConnection, opts: IdentityOptions, events: str = "raw_events") -> None:
    """Temp tables: distinct identifier tuples, occurrences, nodes (integer ids) and guard hits,
    from `events` (all of raw_events, or the events an incremental run touches); the run's
    scratch drops them."""
    stage_identifiers(Scratch(con), opts, events)
    overrides.guard(con)  # identifiers a user took out (persona unmerge --identifier) link nobody either


# The graph's edges (a, b): the identifiers of one event tuple, each joined to the tuple's first
# node; guarded nodes carry no edges.
EDGES = """
WITH linked AS (
  SELECT o.tid, n.node FROM _occ o
  JOIN _nodes n USING (identifier_type, identifier)
  ANTI JOIN _guard g USING (identifier_type, identifier)
), hubs AS (SELECT tid, min(node) AS hub FROM linked GROUP BY tid)
SELECT DISTINCT h.hub AS a, l.node AS b FROM linked l JOIN hubs h USING (tid) WHERE l.node <> h.hub
"""


def _components(con: duckdb.DuckDBPyConnection) -> None:
    """Label each node with its component (`_labels`), by scipy's C implementation on this machine."""
    edges = con.execute(EDGES).fetchnumpy()
    n = con.execute("SELECT count(*) FROM _nodes").fetchall()[0][0]
    src = np.asarray(edges["a"], dtype=np.int64)
    dst = np.asarray(edges["b"], dtype=np.int64)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    con.register(
        "_labels_arrow", pa.table({"node": np.arange(n, dtype=np.int64), "component": labels.astype(np.int64)})
    )
    con.execute("CREATE OR REPLACE TEMP TABLE _labels AS SELECT * FROM _labels_arrow")
    con.unregister("_labels_arrow")


# The identifiers that belong to someone, with their component; {area}: an optional filter.
MEMBERS_SELECT = """
SELECT n.*, l.component FROM _nodes n JOIN _labels l USING (node) {area}
-- A guarded device, email or phone belongs to nobody; a guarded anonymous or user id is a person alone.
WHERE NOT EXISTS (SELECT 1 FROM _guard g WHERE g.identifier_type = n.identifier_type
                  AND g.identifier = n.identifier AND n.identifier_type NOT IN ('anonymous_id', 'user_id'))
"""
MEMBERS = f"CREATE OR REPLACE TEMP VIEW _members AS {MEMBERS_SELECT}"

# A person_id is a pure function of its component: the hash of its earliest-seen identifier.
IDENTITY_MAP_SELECT = """
WITH firsts AS (
  SELECT component, arg_min(identifier_type || ':' || identifier, (first_seen_at, identifier_type, identifier)) AS first_id
  FROM _members GROUP BY component
)
SELECT m.identifier_type, m.identifier, 'p' || left(sha256(f.first_id), 16) AS person_id,
       m.first_seen_at, m.last_seen_at
FROM _members m JOIN firsts f USING (component)
"""
NEW_IDENTITY_MAP = f"CREATE OR REPLACE TEMP TABLE identity_map__next AS {IDENTITY_MAP_SELECT}"


# What a usable trait value is (cleaning maps values with the same vocabularies). A trait
# survives by its most recent *valid* value: an age of 150 typed after an earlier 34 leaves
# 34, not nothing. Only when a person never gave a valid value does the latest invalid one
# survive, so cleaning can say why the trait is missing.
MIN_AGE, MAX_AGE = 13, 100
GENDERS = {
    "female": ("f", "female", "woman", "w", "frau"),
    "male": ("m", "male", "man", "mann"),
    "nonbinary": ("nb", "non-binary", "nonbinary", "non binary", "diverse", "other"),
}
COUNTRY_ALIASES = {
    "USA": "US",
    "UNITED STATES": "US",
    "UNITED STATES OF AMERICA": "US",
    "UK": "GB",
    "UNITED KINGDOM": "GB",
    "GREAT BRITAIN": "GB",
    "ENGLAND": "GB",
    "GERMANY": "DE",
    "DEUTSCHLAND": "DE",
    "FRANCE": "FR",
    "BRAZIL": "BR",
    "BRASIL": "BR",
    "INDIA": "IN",
    "SPAIN": "ES",
    "ITALY": "IT",
    "CANADA": "CA",
    "MEXICO": "MX",
    "NETHERLANDS": "NL",
}
COUNTRIES = {**{c: c for c in sorted(phonenumbers.SUPPORTED_REGIONS)}, **COUNTRY_ALIASES}


def _in(expr: str, values) -> str:
    return f"{expr} IN ({', '.join(sql_literal(v) for v in sorted(values))})"


def birth_date_sql(col: str) -> str:
    """A birth date as a DATE, in SQL both engines run: what casts to a date (ISO), YYYYMMDD, or a
    day-first D/M/YYYY with `.`, `/` or `-` (month-first when the second number cannot be a
    month), the forms linkage compares (`linkage._date`); NULL otherwise."""
    v = f"trim(CAST({col} AS VARCHAR))"
    # No braces in the patterns: the SQL is pasted into templates that `str.format` fills.
    digits = "[0-9]"
    dmy = f"({digits}{digits}?)[./-]({digits}{digits}?)[./-]({digits * 4})"
    first, second, year = (f"regexp_extract({v}, '{dmy}', {i})" for i in (1, 2, 3))
    swap = f"coalesce(TRY_CAST({second} AS INT) > 12, false)"
    day, month = (f"CASE WHEN {swap} THEN {a} ELSE {b} END" for a, b in ((second, first), (first, second)))
    compact = f"substr({v}, 1, 4) || '-' || substr({v}, 5, 2) || '-' || substr({v}, 7, 2)"
    return f"""coalesce(TRY_CAST({v} AS DATE), CASE
        WHEN regexp_full_match({v}, '{digits * 8}') THEN TRY_CAST({compact} AS DATE)
        WHEN regexp_full_match({v}, '{dmy}')
          THEN TRY_CAST({year} || '-' || lpad({month}, 2, '0') || '-' || lpad({day}, 2, '0') AS DATE)
        END)"""


VALID_TRAITS = {
    "age": f"TRY_CAST(age AS DOUBLE) BETWEEN {MIN_AGE} AND {MAX_AGE}",
    "birthday": f"{birth_date_sql('birthday')} IS NOT NULL",
    "gender": _in("lower(trim(gender))", {a for aliases in GENDERS.values() for a in aliases}),
    "country": _in("upper(trim(country))", COUNTRIES),
}


def _trait_columns() -> str:
    """Each trait's surviving value, when and in which message it was seen: the most recent
    valid value (VALID_TRAITS; any non-null value for the rest), else the most recent one."""
    parts = []
    for t in SURVIVING_TRAITS:
        rank = f"({t}_valid, event_at, message_id)" if t in VALID_TRAITS else "(event_at, message_id)"
        for value, name in ((t, t), ("event_at", f"{t}_observed_at"), ("message_id", f"{t}_message_id")):
            parts.append(f"arg_max({value}, {rank}) FILTER (WHERE {t} IS NOT NULL) AS {name}")
    return ",\n  ".join(parts)


# deduped_users' trait columns, named (Spark has no `* EXCLUDE`).
TRAIT_OUTPUTS = ", ".join(
    f"traits.{c}"
    for c in ["first_seen_at", "last_seen_at"]
    + [f"{t}{suffix}" for t in SURVIVING_TRAITS for suffix in ("", "_observed_at", "_message_id")]
)

VALID_COLUMNS = ", ".join(f"coalesce({sql}, false) AS {t}_valid" for t, sql in VALID_TRAITS.items())


# {map}: the identity map to read; {events}: events holding every event of the people built;
# {people}: an optional filter to the people built.
DEDUPED_USERS = f"""
WITH ids AS (
  SELECT person_id, count(*) AS identifier_count,
         count(*) FILTER (WHERE identifier_type = 'anonymous_id') AS anonymous_id_count,
         arg_max(identifier, (last_seen_at, identifier)) FILTER (WHERE identifier_type = 'user_id') AS user_id
  FROM {{map}} {{people}} GROUP BY person_id
), events AS (
  SELECT coalesce(mu.person_id, ma.person_id) AS person_id, e.*, {VALID_COLUMNS}
  FROM {{events}} e
  LEFT JOIN {{map}} mu ON mu.identifier_type = 'user_id' AND mu.identifier = e.user_id
  LEFT JOIN {{map}} ma ON ma.identifier_type = 'anonymous_id' AND ma.identifier = e.anonymous_id
), traits AS (
  SELECT person_id, count(*) AS event_count, min(event_at) AS first_seen_at, max(event_at) AS last_seen_at,
  {_trait_columns()}
  FROM events GROUP BY person_id
)
SELECT ids.*, coalesce(traits.event_count, 0) AS event_count, {TRAIT_OUTPUTS}
FROM ids LEFT JOIN traits USING (person_id)
"""

# How people changed from the identity map to identity_map__next (merges, splits, new keys).
HISTORY_SELECT = """
WITH pairs AS (
  SELECT o.person_id AS old_person_id, n.person_id AS new_person_id
  FROM identity_map o JOIN identity_map__next n USING (identifier_type, identifier)
), moved AS (
  SELECT old_person_id, new_person_id, count(*) AS identifiers_moved
  FROM pairs WHERE old_person_id <> new_person_id GROUP BY 1, 2
), fan AS (
  SELECT old_person_id, count(DISTINCT new_person_id) AS new_ids FROM pairs GROUP BY 1
), fan_in AS (
  SELECT new_person_id, count(DISTINCT old_person_id) AS old_ids FROM pairs GROUP BY 1
)
SELECT m.old_person_id, m.new_person_id,
       CASE WHEN f.new_ids > 1 THEN 'split' WHEN fi.old_ids > 1 THEN 'merge' ELSE 'rekey' END AS change,
       m.identifiers_moved, $now AS changed_at, $run_id AS run_id
FROM moved m JOIN fan f USING (old_person_id) JOIN fan_in fi USING (new_person_id)
"""
HISTORY = f"INSERT INTO person_id_history BY NAME {HISTORY_SELECT}"


# Temp tables a run of identity makes (its steps share them; all are dropped when it ends).
SCRATCH_TABLES = (
    "_tuples",
    "_occ",
    "_nodes",
    "_guard",
    "_labels",
    "identity_map__next",
    "_new_ids",
    "_area",
    "_area_events",
    "_records",
    "_candidates",
    "_link_status",
    "_merges",
)


def resolve(
    con: duckdb.DuckDBPyConnection,
    opts: IdentityOptions | None = None,
    run_id: str | None = None,
    full: bool = False,
    retrain_linkage: bool = False,
) -> IdentityReport:
    """Bring identity_map, identity_guard and deduped_users (and, with linkage, identity_pii and
    identity_links) up to date with raw_events, in one transaction.

    Incrementally, only the identifiers of new events and the people holding them are
    recomputed (see `_stage_area`); the result equals a full rebuild on the same events.
    """
    opts = opts or IdentityOptions()
    con.execute(ddl(PersonIdHistory, "person_id_history"))
    con.execute(ddl(IdentityMap, "identity_map"))
    linkage.ensure_tables(con)
    model, train, waiting = _linkage_plan(con, opts, retrain_linkage)
    settings = {**asdict(opts), "link_model": model[0] if model else None}
    # Training a model changes how everyone links, so it makes the run full.
    p = refresh.plan(
        con,
        "identity",
        settings,
        ("deduped_users", "identity_guard"),
        full=full or train,
        full_reason="full rebuild asked for" if full else "training the linkage model",
    )
    run = _Run(
        p,
        data_as_of(con),
        datetime.now(UTC).replace(tzinfo=None),
        run_id,
        linkage.LinkReport(enabled=opts.linkage and (model is not None or train), note=waiting),
    )
    with scratch(con) as s:
        for name in SCRATCH_TABLES:
            s.adopt(name)
        try:
            if p.full:
                _resolve_full(con, opts, run, model, train, settings)
            else:
                _resolve_incremental(con, opts, run, model)
            return _report(con, run)
        finally:
            con.execute("DROP VIEW IF EXISTS _members")


@dataclass
class _Run:
    """What one identity run's steps share."""

    plan: refresh.Plan
    as_of: datetime
    now: datetime
    run_id: str | None
    links: linkage.LinkReport

    @property
    def history(self) -> tuple[str, dict]:
        return HISTORY, {"now": self.now, "run_id": self.run_id}


def _linkage_plan(
    con: duckdb.DuckDBPyConnection,
    opts: IdentityOptions,
    retrain: bool,
    matching_people: Callable[[], int] | None = None,
) -> tuple[tuple[int, dict] | None, bool, str]:
    """The linkage model in use (None: none yet, or linkage off), whether to train one, and why
    linkage waits when there are too few people to train on (`matching_people`: counted on the
    engine holding the events, by default `con`)."""
    model = linkage.latest_model(con) if opts.linkage else None
    if not opts.linkage or model is not None:
        return model, opts.linkage and retrain, ""
    people = matching_people() if matching_people else linkage.matching_people(con)
    if people >= opts.min_link_records:
        return None, True, ""
    waits = (
        f"linkage waits: {people} people with a name or birth date, {opts.min_link_records} needed "
        "before a linkage model is trained (identity.min_link_records); nobody was linked by name"
    )
    return None, False, waits


def _resolve_full(
    con: duckdb.DuckDBPyConnection, opts: IdentityOptions, run: _Run, model, train: bool, settings: dict
) -> None:
    """Everyone's identifiers, components, links and people, rebuilt and swapped in at once."""
    p, links = run.plan, run.links
    _stage_identifiers(con, opts)
    _components(con)
    con.execute(MEMBERS.format(area=""))
    saved = _link(con, opts, links, model, train, outside=None)
    if saved is not None:
        p.settings = refresh.settings_key({**settings, "link_model": links.model_version})
    overrides.apply(con)  # persona merge / unmerge decisions
    con.execute(NEW_IDENTITY_MAP)
    deduped = DEDUPED_USERS.format(map="identity_map__next", events="raw_events", people="")
    tables = [(DedupedUsers, "deduped_users", deduped), (IdentityGuard, "identity_guard", "SELECT * FROM _guard")]
    if links.enabled:
        people = linkage.record_people_sql("identity_map__next")
        tables += [
            (IdentityPii, "identity_pii", linkage.PII_SELECT.format(people=people)),
            (IdentityLinks, "identity_links", linkage.LINKS_SELECT.format(people=people)),
        ]
    save = (
        [(lambda: linkage.save_model(con, saved, links.records, links.model_status), None)] if saved is not None else []
    )
    # Linkage off (or no model yet): no links stand, and no matching traits are kept.
    unlink = [] if links.enabled else [("DELETE FROM identity_links", None), ("DELETE FROM identity_pii", None)]
    replace_tables(
        con,
        tables,
        params={"model_version": links.model_version},
        before_commit=[
            *save,
            *unlink,
            run.history,
            ("DELETE FROM identity_map", None),
            ("INSERT INTO identity_map BY NAME SELECT * FROM identity_map__next", None),
            (PERSON_EVENTS_VIEW, None),
            (lambda: refresh.record(con, p, run.as_of, None), None),
        ],
    )


def _resolve_incremental(con: duckdb.DuckDBPyConnection, opts: IdentityOptions, run: _Run, model) -> None:
    """The identifiers of new events and the people holding them (widened until linkage reaches
    nobody new outside), recomputed and spliced in."""
    links, scope = run.links, run.plan.scope
    for _ in range(MAX_LINK_ROUNDS):
        _stage_area(con, opts, scope, run.plan.since_batch)
        _components(con)
        con.execute(MEMBERS.format(area="SEMI JOIN _area USING (identifier_type, identifier)"))
        outside = f"SELECT * FROM identity_pii WHERE {scope.lacks()}"
        _link(con, opts, links, model, False, outside=outside, cluster=False)
        pulled = linkage.outside_people(con, scope) if links.enabled else []
        if not pulled:
            break
        # A new record links to someone outside the run: take that person in, and look again.
        scope.widen(con, "SELECT unnest($people) AS person_id", {"people": pulled})
    else:
        raise RuntimeError(
            f"incremental linkage kept reaching new people after {MAX_LINK_ROUNDS} rounds; "
            "run identity with full_refresh"
        )
    if links.enabled:
        counts = linkage.cluster(con, _link_user_ids(opts))
        links.merges, links.blocked = counts["merged"], counts["blocked"]
    overrides.apply(con)  # persona merge / unmerge decisions
    con.execute(NEW_IDENTITY_MAP)
    with transaction(con):
        _splice_area(con, run)


def _splice_area(con: duckdb.DuckDBPyConnection, run: _Run) -> None:
    """Inside the run's transaction: the area's identifiers, guard entries and people in place of their old rows."""
    scope = run.plan.scope
    deduped = DEDUPED_USERS.format(map="identity_map", events="_area_events", people=f"WHERE {scope.has()}")
    scope.widen(con, "SELECT person_id FROM identity_map__next")
    con.execute(*run.history)
    con.execute("DELETE FROM identity_guard WHERE (identifier_type, identifier) IN (SELECT * FROM _area)")
    con.execute(
        "INSERT INTO identity_guard BY NAME SELECT * FROM _guard SEMI JOIN _area USING (identifier_type, identifier)"
    )
    con.execute("DELETE FROM identity_map WHERE (identifier_type, identifier) IN (SELECT * FROM _area)")
    con.execute("INSERT INTO identity_map BY NAME SELECT * FROM identity_map__next")
    con.execute(f"DELETE FROM deduped_users WHERE {scope.has()}")
    con.execute(f"INSERT INTO deduped_users BY NAME {deduped}")
    if run.links.enabled:
        _splice_links(con, scope, run.links.model_version)
    refresh.record(con, run.plan, run.as_of, scope.size(con))
    kill_point(["deduped_users", "identity_map"])


def _report(con: duckdb.DuckDBPyConnection, run: _Run) -> IdentityReport:
    recomputed = None if run.plan.full else run.plan.scope.size(con)
    return report_from_tables(con, run.plan.mode, run.plan.reason, run.links, run.run_id, run.now, recomputed)


def report_from_tables(
    con: duckdb.DuckDBPyConnection,
    mode: str,
    why: str,
    links: linkage.LinkReport,
    run_id: str | None,
    now: datetime | None = None,
    recomputed: int | None = None,
) -> IdentityReport:
    """A run's report read from the identity tables as it left them (on either engine: Spark's are
    carried into `con` first); the history it wrote is that of `run_id` at `now` (None: its latest)."""

    def one(sql: str, params: list | None = None):
        return con.execute(sql, params).fetchall()[0][0]

    people = one("SELECT count(*) FROM deduped_users")
    at = (
        "?"
        if now is not None
        else "(SELECT max(changed_at) FROM person_id_history WHERE run_id IS NOT DISTINCT FROM ?)"
    )
    return IdentityReport(
        mode=mode,
        why=why,
        people=people,
        people_recomputed=recomputed,
        counts={"deduped_users": people, "identity_map": one("SELECT count(*) FROM identity_map")},
        identifiers=one("SELECT count(*) FROM identity_map"),
        guard_hits=one("SELECT count(*) FROM identity_guard"),
        links=links,
        multi_identifier_people=one("SELECT count(*) FROM deduped_users WHERE anonymous_id_count > 1"),
        largest=con.execute(
            "SELECT person_id, identifier_count FROM deduped_users ORDER BY identifier_count DESC, person_id LIMIT 5"
        ).fetchall(),
        history=one(
            f"SELECT count(*) FROM person_id_history WHERE run_id IS NOT DISTINCT FROM ? AND changed_at = {at}",
            [run_id, now if now is not None else run_id],
        ),
    )


MAX_LINK_ROUNDS = 5


def _link_user_ids(opts: IdentityOptions) -> int:
    """How many different userIds one person may hold after linkage (the guard against over-merging)."""
    return 1_000_000 if opts.link_across_user_ids else 1


def _link(
    con: duckdb.DuckDBPyConnection,
    opts: IdentityOptions,
    links: linkage.LinkReport,
    model: tuple[int, dict] | None,
    train: bool,
    outside: str | None,
    cluster: bool = True,
    spark: SparkSession | None = None,
) -> dict | None:
    """Stage records, train a model if asked, score candidate pairs and (unless the caller merges
    later) merge. Returns newly trained settings to save, else None. With `spark`, the records
    (`_records`) and the records of keep_apart decisions (`_keep_apart_parts`) were staged on Spark
    and brought here, the pairs are scored there, and the merges are left in `_merges` for Spark's
    components (`_link_on_spark`)."""
    if not links.enabled:
        return None
    if spark is None:
        links.records = linkage.stage_records(con, "_area_events" if outside else "raw_events", "_members")
    else:
        links.records = con.execute("SELECT count(*) FROM _records").fetchall()[0][0]
    trained = None
    if train:
        if links.records < 2:
            links.enabled, links.note = False, "no linkage model: fewer than two people to compare"
            return None
        try:
            trained, links.model_status, links.problems = linkage.train(con, opts.link_pairs_per_record)
        except linkage.NotTrainable as exc:
            links.enabled, links.note = False, f"no linkage model: {exc}"
            return None
        model = (None, trained)
        links.trained = True
    else:
        links.model_status = linkage.model_status(con, model[0])
    links.fallback = links.model_status.startswith("fallback")
    links.model_version = model[0] if model[0] is not None else linkage.next_version(con)
    args = (model[1], opts.link_threshold, outside, opts.link_pairs_per_record, links)
    if spark is None:
        linkage.predict(con, *args)
    else:
        linkage.predict_on_spark(spark, con, *args)
    links.links = con.execute("SELECT count(*) FROM _candidates").fetchall()[0][0]
    overrides.keep_apart(con, None if spark is None else "_keep_apart_parts")
    if cluster:
        counts = linkage.cluster(con, _link_user_ids(opts), relabel=spark is None)
        links.merges, links.blocked = counts["merged"], counts["blocked"]
    return trained


def _splice_links(con: duckdb.DuckDBPyConnection, scope: refresh.Scope, model_version: int) -> None:
    """Replace the records and links of the people this incremental run rebuilt."""
    old = f"SELECT record_id FROM identity_pii WHERE {scope.has()}"
    con.execute(f"DELETE FROM identity_links WHERE record_id_l IN ({old}) OR record_id_r IN ({old})")
    con.execute(f"DELETE FROM identity_pii WHERE {scope.has()}")
    people = linkage.record_people_sql("identity_map__next")
    con.execute(f"INSERT INTO identity_pii BY NAME {linkage.PII_SELECT.format(people=people)}")
    sql = f"INSERT INTO identity_links BY NAME {linkage.LINKS_SELECT.format(people=people)}"
    con.execute(sql, {"model_version": model_version})


def _stage_area(con: duckdb.DuckDBPyConnection, opts: IdentityOptions, scope: refresh.Scope, since_batch: int) -> None:
    """The part of the identity graph new events can change, staged like a full rebuild.

    The area is every identifier in a new event plus every identifier of a person holding one.
    Guard counts only grow as events arrive, and a component can only gain edges through a new
    event's identifiers, so no person outside the area changes. `_area_events` holds every
    event touching the area, so the area's tuples, guard counts and first/last-seen times are
    complete; `scope` starts as the people who held area identifiers before.
    """
    new_ids = " UNION ".join(
        f"SELECT '{t}' AS identifier_type, {c} AS identifier FROM raw_events WHERE batch_id > $since AND {c} IS NOT NULL"
        for t, c in IDENTIFIER_COLUMNS
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _new_ids AS {new_ids}", {"since": since_batch})
    scope.widen(con, "SELECT person_id FROM identity_map SEMI JOIN _new_ids USING (identifier_type, identifier)")
    # People whose record holds a shared email or phone seen again: whether it still is evidence may change.
    scope.widen(
        con,
        "SELECT person_id FROM identity_pii WHERE shared_contact IN "
        "(SELECT identifier_type || ':' || identifier FROM _new_ids)",
    )
    overrides.take_in(con, scope)  # people a decision does not hold for yet, and every part of those it touches
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _area AS
            SELECT identifier_type, identifier FROM identity_map WHERE {scope.has()}
            UNION SELECT identifier_type, identifier FROM _new_ids"""
    )
    # One scan of raw_events: the columns identity reads, of every event holding an area identifier.
    touching = " OR ".join(
        f"{c} IN (SELECT identifier FROM _area WHERE identifier_type = '{t}')" for t, c in IDENTIFIER_COLUMNS
    )
    cols = ", ".join(
        sorted(
            {c for _, c in IDENTIFIER_COLUMNS}
            | {"message_id", "event_at", *SURVIVING_TRAITS, "first_name", "last_name"}
        )
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _area_events AS SELECT {cols} FROM raw_events WHERE {touching}")
    _stage_identifiers(con, opts, "_area_events")
    # Guard counts are exact for area identifiers; everyone else keeps theirs.
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _guard_area AS
           SELECT * FROM _guard SEMI JOIN _area USING (identifier_type, identifier)
           UNION ALL BY NAME
           SELECT * FROM identity_guard ANTI JOIN _area USING (identifier_type, identifier)"""
    )
    con.execute("DROP TABLE _guard")
    con.execute("ALTER TABLE _guard_area RENAME TO _guard")


# --- on Spark -------------------------------------------------------------------------------

LINKAGE_ON_SPARK = (
    "identity on Spark with probabilistic linkage needs the DuckDB warehouse its model is kept in: "
    "run it through the graph (persona run, Dagster), or set identity.linkage: false"
)
# What linkage's driver side leaves in the DuckDB connection on a Spark run, for the caller to write
# identity_pii and identity_links from before dropping them (`spark_stages.identity`).
LINKAGE_LEFT = ("_records", "_candidates", "_link_status", "_merges", "_kept_apart", "_keep_apart_parts")


def resolve_on_spark(
    spark: SparkSession,
    warehouse: Path,
    opts: IdentityOptions | None = None,
    run_id: str | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    retrain_linkage: bool = False,
) -> IdentityReport:
    """identity_map, deduped_users, identity_guard and person_id_history rebuilt in full on Spark
    from the Parquet table raw_events in `warehouse`, with the statements `resolve` runs on DuckDB
    (compiled by `engine.to_spark`), the components found by `components.label` (distributed:
    the graph never reaches the driver). The tables are written there as Parquet, each swapped
    in whole, as `SparkTables.write` does.

    persona merge / unmerge decisions (identity_overrides as Parquet there, when it exists) apply
    as on DuckDB. Probabilistic linkage (`opts.linkage`; `opts` defaults to linkage off) needs
    `con`, the DuckDB warehouse its model is kept in (see `_link_on_spark`); a model trained by
    this run is returned in the report (`trained_model`) for the caller to save.
    """
    opts = opts or IdentityOptions(linkage=False)
    if opts.linkage and con is None:
        raise ValueError(LINKAGE_ON_SPARK)
    t = SparkTables(spark, warehouse, checkpoint=True)
    try:
        t.read("raw_events")
        model, train, waiting = _linkage_plan(con, opts, retrain_linkage, lambda: t.scalar(linkage.MATCHING_PEOPLE))
        links = linkage.LinkReport(enabled=opts.linkage and (model is not None or train), note=waiting)
        decisions = t.path(overrides.TABLE).exists()
        if decisions:
            t.read(overrides.TABLE)
        stage_identifiers(t, opts)
        if decisions:  # identifiers a user took out (persona unmerge --identifier) link nobody either
            t.table("_guard", f"SELECT * FROM _guard UNION ALL SELECT * FROM ({overrides.TAKEN_OUT_SELECT}) AS taken")
        t.view("_identity_edges", EDGES)  # read once, by the components' first step
        _, rounds = components.label(t, "_nodes", "_identity_edges")
        t.table("_members", MEMBERS_SELECT.format(area=""))
        trained = _link_on_spark(t, con, opts, links, model, train, decisions) if links.enabled else None
        if decisions:
            _join_on_spark(t)
        t.table("identity_map__next", IDENTITY_MAP_SELECT)
        now = datetime.now(UTC).replace(tzinfo=None)
        counts = {"person_id_history": _history_on_spark(t, {"now": now, "run_id": run_id})}
        counts["identity_map"] = t.write(IdentityMap, "identity_map", "SELECT * FROM identity_map__next")
        deduped = DEDUPED_USERS.format(map="identity_map__next", events="raw_events", people="")
        counts["deduped_users"] = t.write(DedupedUsers, "deduped_users", deduped)
        counts["identity_guard"] = t.write(IdentityGuard, "identity_guard", "SELECT * FROM _guard")
    finally:
        t.drop()
    return IdentityReport(
        mode="full",
        why=f"Spark builds in full ({rounds} rounds of connected components)",
        people=counts["deduped_users"],
        counts=counts,
        identifiers=counts["identity_map"],
        guard_hits=counts["identity_guard"],
        links=links,
        trained_model=trained,
    )


def _link_on_spark(
    t: SparkTables,
    con: duckdb.DuckDBPyConnection,
    opts: IdentityOptions,
    links: linkage.LinkReport,
    model: tuple[int, dict] | None,
    train: bool,
    decisions: bool,
) -> dict | None:
    """Probabilistic linkage with the events on Spark: the records (`linkage.records_select`, each
    trait read by DuckDB's own SQL on the executors) staged there from every event, then brought to
    the driver's DuckDB (`con`): one row per person with a name or birth date, person-level like
    the features. There, as on DuckDB, a model is trained when none is saved, the pairs blocking
    gives are scored on Spark (`linkage.predict_on_spark`), and the links clustered strongest first
    under the userId guard (`linkage.cluster`); the merges go back to Spark's components. Returns
    newly trained settings, else None."""
    duckdb_functions(t.spark, linkage.SPARK_TRAIT_FUNCTIONS)
    t.table("_records", linkage.records_select("raw_events", "_members", linkage.SPARK_TRAIT_SQL))
    _to_duckdb(con, "_records", t.query("SELECT * FROM _records ORDER BY record_id"))
    if decisions:
        _to_duckdb(con, "_keep_apart_parts", t.query(overrides.KEEP_APART_PARTS))
    else:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _keep_apart_parts (override_id BIGINT, part BIGINT, record_id VARCHAR)"
        )
    trained = _link(con, opts, links, model, train, outside=None, spark=t.spark)
    if not links.enabled:  # nothing to learn from: no model, nobody linked
        return None
    overrides.restore_kept_apart(con)
    merges = con.execute("SELECT component, merged FROM _merges").fetchall()
    if merges:
        t.spark.createDataFrame(merges, "component BIGINT, merged BIGINT").createOrReplaceTempView("_merges")
        t.table(
            "_labels",
            """SELECT l.node, coalesce(m.merged, l.component) AS component
               FROM _labels l LEFT JOIN _merges m ON m.component = l.component""",
        )
        t.table("_members", MEMBERS_SELECT.format(area=""))
    return trained


def _to_duckdb(con: duckdb.DuckDBPyConnection, name: str, frame) -> None:
    """A Spark query's rows (person-level: a few per person) as temp table `name` in `con`."""
    con.register(f"{name}_arrow", frame.toArrow())
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
    finally:
        con.unregister(f"{name}_arrow")


def _join_on_spark(t: SparkTables) -> None:
    """persona merge decisions: the components of each join's parts made one, with the statements
    `overrides.apply` runs on DuckDB."""
    if overrides.join_components(t):
        t.table("_labels", overrides.JOINED_LABELS)
        t.table("_members", MEMBERS_SELECT.format(area=""))


def _history_on_spark(t: SparkTables, params: dict) -> int:
    """person_id_history with this build's changes appended (against the identity map written
    before; a first build has none to compare with)."""
    if t.path("identity_map").exists():
        t.read("identity_map")
    else:
        t.view("identity_map", "SELECT * FROM identity_map__next WHERE false")
    new = HISTORY_SELECT
    if t.path("person_id_history").exists():
        t.read("person_id_history")
        cols = ", ".join(PersonIdHistory.to_schema().columns)
        new = f"SELECT {cols} FROM person_id_history UNION ALL SELECT {cols} FROM ({HISTORY_SELECT}) AS changes"
    return t.write(PersonIdHistory, "person_id_history", new, params)
