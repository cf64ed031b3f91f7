"""Incremental refresh bookkeeping: which people each stage changed, and what each stage still owes.

Each person-level stage runs in one of two modes:

- **full**: rebuild every row (first run, settings or model changed, an upstream full rebuild,
  or asked for). It records "everyone changed" for the stage after it.
- **incremental**: recompute only the people its upstream stage changed since it last ran
  (plus the few its own inputs name, e.g. people whose age moved with the data's clock),
  splice their rows in, and redo the cheap population-wide steps (fences, catalog sizes).

`person_changes` is the log between stages: each stage run appends the person ids it
rewrote under one sequence number (a NULL person id means everyone). A stage reads its
upstream's entries newer than its own watermark, so a stage that missed a run (it failed,
or automation had not reached it yet) catches up on everything it missed. `refresh_state`
keeps each stage's watermark, the batch of events it has read, the data's as-of time it
used, and its settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from persona_assets.core.warehouse import table_exists

# computed_traits (audiences) reads the people profiles changed, so profiles log them too.
STAGES = ("identity", "cleaning", "features", "segments", "imputation", "profiles", "computed_traits")
UPSTREAM = dict(zip(STAGES[1:], STAGES[:-1]))


@dataclass(frozen=True)
class Scope:
    """The people a run recomputes: a temp table of person_ids that `plan` fills with those its
    upstream changed (empty in a full run) and the stage widens with those its own inputs name.
    A stage gets it from its Plan and passes it to every step that reads or widens it; no module
    knows the table by name. Filters are SQL text: `scope.has("c.person_id")`, `scope.lacks()`."""

    table: str = "_scope"

    def has(self, column: str = "person_id") -> str:
        return f"{column} IN (SELECT person_id FROM {self.table})"

    def lacks(self, column: str = "person_id") -> str:
        return f"{column} NOT IN (SELECT person_id FROM {self.table})"

    def reset(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {self.table} (person_id VARCHAR)")

    def widen(self, con: duckdb.DuckDBPyConnection, select: str, params: dict | list | None = None) -> int:
        """Add the people a SELECT of person_id names; returns how many were new."""
        before = self.size(con)
        con.execute(
            f"INSERT INTO {self.table} SELECT DISTINCT person_id FROM ({select}) s "
            f"WHERE person_id IS NOT NULL AND {self.lacks()}",
            params,
        )
        return self.size(con) - before

    def size(self, con: duckdb.DuckDBPyConnection) -> int:
        return con.execute(f"SELECT count(*) FROM {self.table}").fetchall()[0][0]


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """CREATE TABLE IF NOT EXISTS refresh_state (stage VARCHAR PRIMARY KEY, change_seq BIGINT, batch_id BIGINT,
           as_of TIMESTAMP, settings VARCHAR, mode VARCHAR, people BIGINT, updated_at TIMESTAMP)"""
    )
    con.execute("CREATE TABLE IF NOT EXISTS person_changes (change_seq BIGINT, stage VARCHAR, person_id VARCHAR)")


@dataclass
class Plan:
    stage: str
    full: bool
    reason: str
    since_seq: int = 0
    upto_seq: int = 0
    since_batch: int = 0
    upto_batch: int = 0
    previous_as_of: datetime | None = None
    settings: str = ""
    scope: Scope = field(default_factory=Scope)

    @property
    def mode(self) -> str:
        return "full" if self.full else "incremental"

    def where(self, column: str = "person_id") -> str:
        """A WHERE clause for the people this run recomputes; empty in a full run (everyone)."""
        return "" if self.full else f"WHERE {self.scope.has(column)}"


def settings_key(settings: object) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def plan(
    con: duckdb.DuckDBPyConnection,
    stage: str,
    settings: object,
    tables: tuple[str, ...],
    full: bool = False,
    full_reason: str = "",
) -> Plan:
    """Decide full or incremental for `stage`; for incremental, fill the plan's scope with the
    people its upstream changed since this stage last ran."""
    ensure_tables(con)
    key = settings_key(settings)
    state = con.execute(
        "SELECT change_seq, batch_id, as_of, settings FROM refresh_state WHERE stage = ?", [stage]
    ).fetchall()
    upto_seq = _last_seq(con)
    upto_batch = con.execute("SELECT coalesce(max(batch_id), 0) FROM raw_events").fetchall()[0][0]
    p = Plan(stage, True, "", upto_seq=upto_seq, upto_batch=upto_batch, settings=key)
    upstream = UPSTREAM.get(stage)
    if state:
        p.since_seq, p.since_batch, p.previous_as_of, saved = state[0]
    reasons = {
        full_reason or "full rebuild asked for": full,
        "first run": not state,
        "settings or model changed": bool(state) and saved != key,
        "a table is missing": any(not table_exists(con, t) for t in tables),
    }
    if upstream and state and not any(reasons.values()):
        everyone = con.execute(
            "SELECT count(*) FROM person_changes WHERE stage = ? AND change_seq > ? AND person_id IS NULL",
            [upstream, p.since_seq],
        ).fetchall()[0][0]
        reasons[f"{upstream} was rebuilt in full"] = everyone > 0
    hits = [r for r, hit in reasons.items() if hit]
    p.full, p.reason = bool(hits), "; ".join(hits) or "incremental"
    p.scope.reset(con)
    if not p.full and upstream:
        p.scope.widen(
            con,
            "SELECT person_id FROM person_changes WHERE stage = ? AND change_seq > ? AND change_seq <= ?",
            [upstream, p.since_seq, p.upto_seq],
        )
    return p


def _last_seq(con: duckdb.DuckDBPyConnection) -> int:
    """The newest sequence number handed out (log entries are pruned, watermarks are not)."""
    return con.execute(
        """SELECT greatest((SELECT coalesce(max(change_seq), 0) FROM person_changes),
                           (SELECT coalesce(max(change_seq), 0) FROM refresh_state))"""
    ).fetchall()[0][0]


def record(con: duckdb.DuckDBPyConnection, p: Plan, as_of: datetime | None, people: int | None) -> None:
    """Inside the stage's transaction: log who this run changed (everyone for a full run), move
    the watermark, and drop log entries every reader has consumed."""
    seq = max(p.upto_seq, _last_seq(con)) + 1
    if p.stage not in UPSTREAM.values():
        pass  # the last stage: nobody reads its changes
    elif p.full:
        con.execute("INSERT INTO person_changes VALUES (?, ?, NULL)", [seq, p.stage])
    else:
        con.execute(f"INSERT INTO person_changes SELECT ?, ?, person_id FROM {p.scope.table}", [seq, p.stage])
    con.execute(
        """INSERT OR REPLACE INTO refresh_state VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)""",
        [p.stage, seq, p.upto_batch, as_of, p.settings, p.mode, people],
    )
    # An entry is done once the stage reading it has moved past it.
    for reader, source in UPSTREAM.items():
        con.execute(
            """DELETE FROM person_changes WHERE stage = ?
               AND change_seq <= (SELECT coalesce(max(change_seq), -1) FROM refresh_state WHERE stage = ?)""",
            [source, reader],
        )
