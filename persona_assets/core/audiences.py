"""Audiences: all / any / not trees of trait, event, segment and audience conditions, compiled to
SQL over user_profiles and computed_traits, evaluated into audience_members with every entry
and exit in audience_changes, and explained person by person.

Membership is evaluated for everyone at each run: conditions on the profile (days since the
last order, say) move with the data's clock for people who did nothing, and the evaluation is
one scan of a few profile columns. What reads events (computed traits, event conditions) is
computed incrementally in `computed_traits` first. Values from the file are bound parameters;
names pasted into the SQL are profile columns checked against the UserProfiles contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb

from persona_assets.contracts import AudienceChanges, AudienceMembers, AudienceRuns, ddl
from persona_assets.core.audience_definitions import (
    MAP_COLUMNS,
    PROFILE_TYPES,
    SQL_OPERATORS,
    Audience,
    Definitions,
    Leaf,
    Node,
    TraitSpec,
)
from persona_assets.core.computed_traits import Binder
from persona_assets.core.publish import sql_identifier
from persona_assets.core.warehouse import data_as_of, scratch, table_exists, transaction

TABLES = {"audience_members": AudienceMembers, "audience_changes": AudienceChanges, "audience_runs": AudienceRuns}
SEGMENT_COLUMNS = ("segment_id", "segment_name", "subsegment_id", "subsegment_name")
VALUE_TYPES = {"number": "DOUBLE", "text": "VARCHAR", "list": "VARCHAR[]"}


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    for table, model in TABLES.items():
        con.execute(ddl(model, table))


@dataclass
class Compiler:
    """Turns conditions into SQL over `user_profiles p`, binding every value."""

    definitions: Definitions
    bind: Binder = field(default_factory=Binder)

    def condition(self, node) -> str:
        if isinstance(node, Node):
            if node.op == "not":
                return f"(NOT {self.condition(node.items[0])})"
            joiner = " AND " if node.op == "all" else " OR "
            if not node.items:
                return "true" if node.op == "all" else "false"
            return "(" + joiner.join(self.condition(item) for item in node.items) + ")"
        return f"coalesce({self.leaf(node)}, false)"

    def subject(self, leaf: Leaf, raw: bool = False) -> tuple[str, str]:
        """(SQL of the value a leaf tests, its SQL type). `raw`: a computed trait as stored
        (NULL when the person has no row), else a count with no row reads 0."""
        if leaf.kind == "profile":
            return f"p.{sql_identifier(leaf.subject)}", PROFILE_TYPES[leaf.subject]
        if leaf.kind == "entry":
            column, _, key = leaf.subject.partition(".")
            value_type = MAP_COLUMNS[column].removeprefix("MAP(VARCHAR, ").removesuffix(")")
            return f"map_extract_value(p.{sql_identifier(column)}, {self.bind(key)})", value_type
        spec: TraitSpec = self.definitions.all_traits[leaf.subject]
        stored = (
            f"(SELECT c.{spec.column} FROM computed_traits c WHERE c.person_id = p.person_id "
            f"AND c.trait = {self.bind(spec.name)})"
        )
        if not raw and spec.kind in ("count", "unique_count"):
            stored = f"coalesce({stored}, 0)"
        return stored, VALUE_TYPES[spec.column]

    def leaf(self, leaf: Leaf) -> str:
        if leaf.kind == "segment":
            names = self.bind(list(leaf.value))
            return "(" + " OR ".join(f"list_contains({names}, p.{c})" for c in SEGMENT_COLUMNS) + ")"
        if leaf.kind == "audience":
            return self.condition(self.definitions.audiences[leaf.subject].where)
        value, sql_type = self.subject(leaf, raw=leaf.op == "exists")
        if leaf.op == "exists":
            return f"({value} IS {'NOT ' if leaf.value else ''}NULL)"
        if leaf.op == "contains":
            wanted = leaf.value if isinstance(leaf.value, list) else [leaf.value]
            return f"list_has_any({value}, {self.bind([str(v) for v in wanted])})"
        cast = (lambda v: f"CAST({v} AS TIMESTAMP)") if sql_type == "TIMESTAMP" else (lambda v: v)
        if leaf.op == "in":
            return f"list_contains({cast(self.bind(list(leaf.value)))}, {value})"
        return f"({value} {SQL_OPERATORS[leaf.op]} {cast(self.bind(leaf.value))})"


def members_sql(definitions: Definitions, name: str) -> tuple[str, dict]:
    """SELECT person_id of everyone in audience `name` now, and its parameters."""
    compiler = Compiler(definitions)
    where = compiler.condition(definitions.audiences[name].where)
    return f"SELECT p.person_id FROM user_profiles p WHERE {where}", compiler.bind.params


@dataclass
class AudienceReport:
    audience: str
    size: int
    entered: int
    exited: int
    seconds: float
    as_of: datetime | None
    run: str


CHANGES_SQL = """
INSERT INTO audience_changes
SELECT $first + row_number() OVER (ORDER BY change, person_id) AS change_id, $audience, person_id, change,
       $at, $as_of, $run
FROM (SELECT person_id, 'entered' AS change FROM _audience_now
      WHERE person_id NOT IN (SELECT person_id FROM audience_members WHERE audience = $audience)
      UNION ALL
      SELECT person_id, 'exited' FROM audience_members
      WHERE audience = $audience AND person_id NOT IN (SELECT person_id FROM _audience_now))
"""


def _next_change(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT coalesce(max(change_id), 0) FROM audience_changes").fetchall()[0][0]


def _counted(con: duckdb.DuckDBPyConnection, audience: str, first: int) -> tuple[int, int]:
    rows = dict(
        con.execute(
            "SELECT change, count(*) FROM audience_changes WHERE audience = ? AND change_id > ? GROUP BY 1",
            [audience, first],
        ).fetchall()
    )
    return rows.get("entered", 0), rows.get("exited", 0)


def evaluate(
    con: duckdb.DuckDBPyConnection, definitions: Definitions, name: str, run: str, now: datetime | None = None
) -> AudienceReport:
    """Who is in audience `name` now: members replaced and each entry and exit recorded, in one transaction."""
    started = time.perf_counter()
    ensure_tables(con)
    as_of = data_as_of(con)
    at = now or datetime.now(UTC).replace(tzinfo=None)
    sql, params = members_sql(definitions, name)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _audience_now AS {sql}", params)
    audience = definitions.audiences[name]
    with scratch(con) as s, transaction(con):
        s.adopt("_audience_now")
        first = _next_change(con)
        values = {"first": first, "audience": name, "at": at, "as_of": as_of, "run": run}
        con.execute(CHANGES_SQL, values)
        con.execute(
            "DELETE FROM audience_members WHERE audience = $audience "
            "AND person_id NOT IN (SELECT person_id FROM _audience_now)",
            {"audience": name},
        )
        con.execute(
            "INSERT INTO audience_members SELECT $audience, person_id, $at FROM _audience_now "
            "WHERE person_id NOT IN (SELECT person_id FROM audience_members WHERE audience = $audience)",
            {"audience": name, "at": at},
        )
        entered, exited = _counted(con, name, first)
        size = con.execute("SELECT count(*) FROM _audience_now").fetchall()[0][0]
        seconds = time.perf_counter() - started
        con.execute(
            "INSERT INTO audience_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [name, run, at, as_of, size, entered, exited, audience.definition_json(), seconds],
        )
    return AudienceReport(name, size, entered, exited, seconds, as_of, run)


def retire(con: duckdb.DuckDBPyConnection, definitions: Definitions, run: str) -> dict[str, int]:
    """Audiences no longer defined: each member's exit is recorded (destinations hear of it), then
    their rows go. Returns how many members each retired audience had."""
    ensure_tables(con)
    gone = [
        r[0]
        for r in con.execute("SELECT DISTINCT audience FROM audience_members ORDER BY 1").fetchall()
        if r[0] not in definitions.audiences
    ]
    out = {}
    for name in gone:
        empty = Definitions(audiences={name: Audience(name, "", Node("any", (), 0), 0)})
        out[name] = evaluate(con, empty, name, run).exited
    return out


def sizes_over_time(con: duckdb.DuckDBPyConnection, name: str):
    """Each evaluation of an audience: when, size, entered, exited (for the asset's plot)."""
    if not table_exists(con, "audience_runs"):
        return con.execute("SELECT NULL::TIMESTAMP AS evaluated_at, 0 AS size LIMIT 0").df()
    return con.execute(
        "SELECT evaluated_at, as_of, size, entered, exited FROM audience_runs WHERE audience = ? ORDER BY evaluated_at",
        [name],
    ).df()


def size_png(history, name: str) -> bytes:
    """The audience's size at each evaluation, with entries above and exits below the axis."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    runs = range(1, len(history) + 1)
    axes[0].plot(runs, history["size"], marker="o")
    axes[0].set_title(f"{name}: members after each run", fontsize=10)
    axes[1].bar(runs, history["entered"], color="tab:green", label="entered")
    axes[1].bar(runs, -history["exited"], color="tab:red", label="exited")
    axes[1].set_title("entered and exited per run", fontsize=10)
    axes[1].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("run")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class Reason:
    """One condition of an explanation: whether it holds for the person, and the value it read."""

    depth: int
    holds: bool
    text: str
    value: object = None


def explain(con: duckdb.DuckDBPyConnection, definitions: Definitions, name: str, person_id: str) -> list[Reason]:
    """Why `person_id` is in or out of audience `name`: each condition of its tree (audiences it
    names opened in place) with whether it holds and the value it read, on `con`'s tables."""
    out: list[Reason] = []

    def holds(sql: str, params: dict) -> tuple[bool, object]:
        row = con.execute(
            f"SELECT {sql} FROM user_profiles p WHERE p.person_id = $person", {**params, "person": person_id}
        )
        found = row.fetchall()
        return (bool(found[0][0]), found[0][1] if len(found[0]) > 1 else None) if found else (False, None)

    def walk(node, depth: int) -> None:
        compiler = Compiler(definitions)
        sql = compiler.condition(node)
        if isinstance(node, Leaf) and node.kind not in ("segment", "audience"):
            value_sql, _ = compiler.subject(node)
            ok, value = holds(f"{sql}, {value_sql}", compiler.bind.params)
            out.append(Reason(depth, ok, f"line {node.line}: {node.text}", value))
            return
        ok, _ = holds(sql, compiler.bind.params)
        if isinstance(node, Leaf) and node.kind == "segment":
            segment = con.execute("SELECT segment_name FROM user_profiles WHERE person_id = ?", [person_id]).fetchall()
            out.append(Reason(depth, ok, f"line {node.line}: {node.text}", segment[0][0] if segment else None))
            return
        if isinstance(node, Leaf):  # another audience: its own tree, opened in place
            out.append(Reason(depth, ok, f"line {node.line}: in audience {node.subject}"))
            walk(definitions.audiences[node.subject].where, depth + 1)
            return
        label = {"all": "all of", "any": "any of", "not": "not"}[node.op]
        out.append(Reason(depth, ok, f"line {node.line}: {label}"))
        for item in node.items:
            walk(item, depth + 1)

    walk(definitions.audiences[name].where, 1)
    return out


def vocabulary(con: duckdb.DuckDBPyConnection):
    """The event names and segments (ids and names) the data holds, to check definitions against."""
    from persona_assets.core.audience_definitions import Vocabulary

    events = segments = None
    if table_exists(con, "raw_events"):
        rows = con.execute("SELECT DISTINCT event_name FROM raw_events WHERE event_name IS NOT NULL").fetchall()
        events = frozenset(r[0] for r in rows) or None
    if table_exists(con, "segment_catalog"):
        rows = con.execute("SELECT id, name FROM segment_catalog").fetchall()
        segments = frozenset(v for r in rows for v in r if v) or None
    return Vocabulary(events, segments)
