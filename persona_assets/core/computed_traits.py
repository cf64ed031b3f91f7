"""computed_traits: Segment's kinds of computed trait (count, sum, mean, min, max, most frequent,
first, last, unique list, unique count) over each person's events, with property filters and
windows relative to the data's clock.

Incremental like the profiles: a run recomputes the people the profiles stage changed, plus
those whose window lost an event as the clock moved on; everyone else's rows stand. Every
value from the definitions file is a bound parameter; the only names pasted into the SQL are
event properties checked against raw_events' contract (`audience_definitions.PROPERTY_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from persona_assets.contracts import ComputedTraits, ddl
from persona_assets.core import refresh, warehouse
from persona_assets.core.audience_definitions import SQL_OPERATORS, Definitions, Filter, TraitSpec
from persona_assets.core.identity import stage_scope_events
from persona_assets.core.publish import sql_identifier
from persona_assets.core.stage import StageResult
from persona_assets.core.warehouse import data_as_of

TABLE = "computed_traits"
# The events of profiled people (cleaning leaves out those who declined personalization).
PROFILED = "(SELECT * FROM {events} WHERE person_id IN (SELECT person_id FROM user_profiles))"


@dataclass
class TraitsReport(StageResult):
    rows: int = 0  # a row per person and trait
    traits: int = 0
    as_of: object = None


class Binder:
    """Hands out parameter names for values: `$v0`, `$v1`, ... (never pasted into the SQL)."""

    def __init__(self, prefix: str = "v") -> None:
        self.prefix, self.params = prefix, {}

    def __call__(self, value) -> str:
        name = f"{self.prefix}{len(self.params)}"
        self.params[name] = list(value) if isinstance(value, tuple) else value
        return f"${name}"


def filter_sql(f: Filter, bind: Binder, column: str) -> str:
    """One property condition on an event row, `column` being the property's (checked) column."""
    if f.op == "exists":
        return f"({column} IS {'NOT ' if f.value else ''}NULL)"
    if f.op == "in":
        return f"list_contains({bind(list(f.value))}, {column})"
    return f"({column} {SQL_OPERATORS[f.op]} {bind(f.value)})"


def _where(spec: TraitSpec, bind: Binder) -> str:
    parts = []
    if spec.event:
        parts.append(f"event_name = {bind(spec.event)}")
    if spec.within_days:
        parts.append(f"event_at > $as_of - to_days(CAST({bind(spec.within_days)} AS INTEGER))")
    parts += [filter_sql(f, bind, sql_identifier(f.property)) for f in spec.where]
    return " AND ".join(parts) or "true"


def _value(spec: TraitSpec) -> str:
    """The aggregate giving the trait's value from the matching events of one person."""
    if spec.kind == "count":
        return "count(*)"
    x = sql_identifier(spec.property or "")
    number = f"TRY_CAST({x} AS DOUBLE)"
    return {
        "sum": f"sum({number})",
        "mean": f"avg({number})",
        "min": f"min({number})",
        "max": f"max({number})",
        "first": f"arg_min({x}, (event_at, message_id)) FILTER (WHERE {x} IS NOT NULL)",
        "last": f"arg_max({x}, (event_at, message_id)) FILTER (WHERE {x} IS NOT NULL)",
        "unique_list": f"list_sort(list(DISTINCT {x}::VARCHAR) FILTER (WHERE {x} IS NOT NULL))",
        "unique_count": f"count(DISTINCT {x})",
    }[spec.kind]


def trait_select(spec: TraitSpec, events: str, bind: Binder) -> str:
    """SELECT of one trait's rows (person_id, trait, kind, number, text, list, source) from `events`."""
    where = _where(spec, bind)
    if spec.kind == "most_frequent":
        # The most frequent value; ties go to the greatest value, so a rerun gives the same answer.
        x = sql_identifier(spec.property or "")
        source = f"""(SELECT person_id, arg_max(v, (n, v)) AS value FROM
                      (SELECT person_id, {x} AS v, count(*) AS n FROM {events}
                       WHERE {where} AND {x} IS NOT NULL GROUP BY ALL) GROUP BY person_id)"""
        value = "value"
    else:
        source = f"(SELECT person_id, {_value(spec)} AS value FROM {events} WHERE {where} GROUP BY person_id)"
        value = "value"
    cells = {"number": "NULL::DOUBLE", "text": "NULL::VARCHAR", "list": "NULL::VARCHAR[]"}
    cells[spec.column] = f"CAST({value} AS {dict(number='DOUBLE', text='VARCHAR', list='VARCHAR[]')[spec.column]})"
    return (
        f"SELECT person_id, {bind(spec.name)} AS trait, {bind(spec.kind)} AS kind, {cells['number']} AS number, "
        f"{cells['text']} AS text, {cells['list']} AS list, 'computed' AS source FROM {source} s"
    )


def _columns(specs: list[TraitSpec]) -> tuple[str, ...]:
    props = sorted({s.property for s in specs if s.property} | {f.property for s in specs for f in s.where})
    return ("message_id", "event_name", "event_at", *props)


def _widen_windows(con: duckdb.DuckDBPyConnection, scope: refresh.Scope, specs: list[TraitSpec], old, new) -> None:
    """People an event of a windowed trait left the window for, as the clock moved from `old` to `new`."""
    for event, days in sorted({(s.event or "", s.within_days) for s in specs if s.within_days}):
        named = "event_name = $event AND " if event else ""
        scope.widen(
            con,
            f"SELECT person_id FROM person_events WHERE {named}event_at > $old - to_days(CAST($days AS INTEGER)) "
            "AND event_at <= $new - to_days(CAST($days AS INTEGER))",
            {"old": old or new, "new": new, "days": days, **({"event": event} if event else {})},
        )


def build(con: duckdb.DuckDBPyConnection, definitions: Definitions, full: bool = False) -> TraitsReport:
    """Bring computed_traits up to date for every trait the definitions name (one transaction)."""
    con.execute(ddl(ComputedTraits, TABLE))
    specs = list(definitions.all_traits.values())
    as_of = data_as_of(con)
    p = refresh.plan(con, "computed_traits", definitions.settings_key(), (TABLE, "user_profiles"), full=full)
    if not p.full and specs:
        _widen_windows(con, p.scope, specs, p.previous_as_of, as_of)
        # Every event of their people, the names filtered by bound values in each trait's SELECT.
        stage_scope_events(con, p.scope, _columns(specs), name="_trait_events")
    events = PROFILED.format(events="person_events" if p.full else "_trait_events")
    bind = Binder()
    selects = [trait_select(spec, events, bind) for spec in specs]
    scoped = p.where()
    with warehouse.scratch(con) as s, warehouse.transaction(con):
        s.adopt("_trait_events")
        con.execute(f"DELETE FROM {TABLE} {scoped}")
        con.execute(f"DELETE FROM {TABLE} WHERE person_id NOT IN (SELECT person_id FROM user_profiles)")
        if selects:
            sql = f"INSERT INTO {TABLE} BY NAME {' UNION ALL '.join(selects)}"
            con.execute(sql, warehouse.bind(sql, {**bind.params, "as_of": as_of}))
        recomputed = None if p.full else p.scope.size(con)
        refresh.record(con, p, as_of, recomputed)
    rows, people = con.execute(f"SELECT count(*), count(DISTINCT person_id) FROM {TABLE}").fetchall()[0]
    return TraitsReport(
        mode=p.mode,
        why=p.reason,
        people=people,
        people_recomputed=recomputed,
        counts={TABLE: rows},
        rows=rows,
        traits=len(specs),
        as_of=as_of,
    )
