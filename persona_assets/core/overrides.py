"""Merges a user can undo: `persona unmerge` and `persona merge` decisions, and how identity applies them.

A decision is kept in `identity_overrides` (one row per identifier it names, email and phone as
keyed hashes) and applied by every later identity run, full or incremental, until a later
decision undoes it (`revoked_at`, `revoked_by`):

- `take_out` (a split): one identifier is kept out of linking, as the identity guard keeps a
  shared tablet out. A userId or anonymousId taken out is a person alone; a device, email or
  phone taken out belongs to nobody (its events go to the people of their userIds and
  anonymousIds). It shows in `identity_guard` with the decision's number.
- `keep_apart` (a split): a person falls back into the groups of identifiers seen together in
  events (each named by its earliest identifier), and no match may link two of them again; the
  links that would have are kept in `identity_links` as blocked, with the decision's number.
  New events that carry identifiers of two groups still join them (take that identifier out).
- `join` (a merge): the people holding the parts are one person, whatever linkage says.

Identity calls four functions: `guard` when it stages identifiers, `take_in` when an incremental
run chooses its people (anyone a decision does not yet hold for, and the people of every part
of a decision that touches the run, so each decision is applied on whole people), `keep_apart`
after scoring links and `apply` before it writes the identity map. A full rebuild replaces the
person tables but never this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pandas as pd

from persona_assets.contracts import HEX64, IDENTIFIER_TYPES, OVERRIDE_ACTIONS, PERSON_ID, IdentityOverrides, ddl
from persona_assets.core import components, refresh
from persona_assets.core.components import Steps
from persona_assets.core.pii import hmac_hex, normalize_email, normalize_phone
from persona_assets.core.warehouse import scratch, table_exists, transaction

TABLE = "identity_overrides"
TAKEN_OUT = "taken out by persona unmerge"  # identity_guard's reason for a take_out, then its number
ACTIVE = f"(SELECT * FROM {TABLE} WHERE revoked_at IS NULL)"
# Each active decision's parts with the person holding each now (parts nobody holds are left out).
HELD = f"""(SELECT a.override_id, a.action, a.part, m.person_id
            FROM {ACTIVE} a JOIN identity_map m USING (identifier_type, identifier))"""
# The events' identifier columns, by the identifier type each holds.
EVENT_COLUMNS = {
    "user_id": ("user_id",),
    "anonymous_id": ("anonymous_id", "previous_id"),
    "email": ("email_hash",),
    "phone": ("phone_hash",),
    "device_id": ("device_id",),
}


class OverrideError(ValueError):
    """A decision that cannot be made as asked; the message says why, in the user's words."""


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(IdentityOverrides, TABLE))


# --- applied by identity --------------------------------------------------------------------


# The identifiers taken out (and seen in the staged events), counted as the guard counts,
# unless the guard already keeps them out: rows for `_guard`.
TAKEN_OUT_SELECT = f"""
WITH taken AS (SELECT identifier_type, identifier, min(override_id) AS override_id FROM {ACTIVE}
               WHERE action = 'take_out' GROUP BY 1, 2)
SELECT o.identifier_type, o.identifier, count(DISTINCT t.user_id) AS user_ids,
       count(DISTINCT t.email_hash) AS emails,
       count(DISTINCT coalesce(t.anonymous_id, t.previous_id)) AS anonymous_ids,
       '{TAKEN_OUT} (decision ' || min(k.override_id) || ')' AS reason
FROM _occ o JOIN taken k USING (identifier_type, identifier) JOIN _tuples t USING (tid)
ANTI JOIN _guard g USING (identifier_type, identifier)
GROUP BY o.identifier_type, o.identifier
"""

# Each active join decision's components (of `_members`): the components `apply` makes one.
JOIN_PARTS = f"""
SELECT DISTINCT a.override_id, m.component FROM {ACTIVE} a
JOIN _members m USING (identifier_type, identifier) WHERE a.action = 'join'
"""

# The same as a graph's edges (a, b): each decision's components tied to its smallest one.
JOIN_EDGES = f"""
WITH parts AS ({JOIN_PARTS}), hubs AS (SELECT override_id, min(component) AS hub FROM parts GROUP BY override_id)
SELECT p.component AS a, h.hub AS b FROM parts p JOIN hubs h ON h.override_id = p.override_id
WHERE p.component <> h.hub
"""

# `_labels` with each join's components made one, named by the smallest (`_joined`: join_components).
JOINED_LABELS = """
SELECT l.node, coalesce(j.component, l.component) AS component
FROM _labels l LEFT JOIN _joined j ON j.node = l.component
"""


def guard(con: duckdb.DuckDBPyConnection) -> None:
    """Add the identifiers taken out (and seen in the staged events) to `_guard`."""
    ensure_table(con)
    con.execute(f"INSERT INTO _guard BY NAME {TAKEN_OUT_SELECT}")


def take_in(con: duckdb.DuckDBPyConnection, scope: refresh.Scope) -> int:
    """Widen an incremental run's `scope` with the people a decision does not hold for yet, then
    with the people of every part of each decision a person in scope holds a part of (until no
    more come in). Returns how many people came in."""
    ensure_table(con)
    if not con.execute(f"SELECT count(*) FROM {TABLE}").fetchall()[0][0]:
        return 0
    added = scope.widen(con, UNHELD)
    added += scope.widen(con, "SELECT unnest($people) AS person_id", {"people": _guard_changed_people(con)})
    while more := scope.widen(con, _partners(scope)):
        added += more
    return added


UNHELD = f"""
WITH held AS {HELD}
-- joins whose parts are held by several people, keep_aparts with two parts in one person
SELECT person_id FROM held WHERE action = 'join' AND override_id IN
  (SELECT override_id FROM held WHERE action = 'join' GROUP BY 1 HAVING count(DISTINCT person_id) > 1)
UNION SELECT person_id FROM held WHERE action = 'keep_apart' GROUP BY override_id, person_id
  HAVING count(DISTINCT part) > 1
-- identifiers taken out that are not yet kept out
UNION SELECT m.person_id FROM {ACTIVE} a JOIN identity_map m USING (identifier_type, identifier)
  WHERE a.action = 'take_out' AND NOT EXISTS (
    SELECT 1 FROM identity_guard g WHERE g.identifier_type = a.identifier_type AND g.identifier = a.identifier)
"""


def _partners(scope: refresh.Scope) -> str:
    """The people holding a part of a decision someone in `scope` holds a part of."""
    return f"""
WITH held AS {HELD}
SELECT b.person_id FROM held a JOIN held b USING (override_id)
WHERE a.action IN ('join', 'keep_apart') AND {scope.has("a.person_id")}
"""


def _guard_changed_people(con: duckdb.DuckDBPyConnection) -> list[str]:
    """For each identifier the guard keeps out for a take_out undone since: stage it again (it is
    nobody's, so only `_new_ids` brings it into the run's area), and return the people of its
    events, whom the run must link again."""
    undone = con.execute(
        f"""SELECT g.identifier_type, g.identifier FROM identity_guard g
            WHERE starts_with(g.reason, '{TAKEN_OUT}') AND NOT EXISTS (
              SELECT 1 FROM {ACTIVE} a WHERE a.action = 'take_out'
                AND a.identifier_type = g.identifier_type AND a.identifier = g.identifier)"""
    ).fetchall()
    people: set[str] = set()
    for kind, identifier in undone:
        con.execute("INSERT INTO _new_ids VALUES (?, ?)", [kind, identifier])
        seen = " OR ".join(f"e.{c} = $id" for c in EVENT_COLUMNS[kind])
        rows = con.execute(
            f"""SELECT DISTINCT m.person_id FROM (SELECT user_id, anonymous_id FROM raw_events e WHERE {seen}) e
                JOIN identity_map m ON (m.identifier_type = 'user_id' AND m.identifier = e.user_id)
                                    OR (m.identifier_type = 'anonymous_id' AND m.identifier = e.anonymous_id)""",
            {"id": identifier},
        ).fetchall()
        people |= {r[0] for r in rows}
    return sorted(people)


# The records holding each part of a keep_apart decision (identity's `_members` and `_records`),
# on either engine.
KEEP_APART_PARTS = f"""
SELECT a.override_id, a.part, r.record_id FROM {ACTIVE} a
JOIN _members m ON m.identifier_type = a.identifier_type AND m.identifier = a.identifier
JOIN _records r ON r.component = m.component
WHERE a.action = 'keep_apart'
"""


def keep_apart(con: duckdb.DuckDBPyConnection, parts: str | None = None) -> None:
    """Set aside (in `_kept_apart`) the scored links between records holding different parts of
    one keep_apart decision, so that clustering never makes them; `restore_kept_apart` records
    them as blocked. `parts`: a table of KEEP_APART_PARTS made elsewhere (on Spark), else made here."""
    ensure_table(con)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _kept_apart AS
        WITH parts AS ({f"SELECT * FROM {parts}" if parts else KEEP_APART_PARTS})
        SELECT c.*, min(l.override_id) AS override_id FROM _candidates c
        JOIN parts l ON l.record_id = c.record_id_l
        JOIN parts r ON r.record_id = c.record_id_r AND r.override_id = l.override_id AND r.part <> l.part
        GROUP BY ALL"""
    )
    con.execute(
        """DELETE FROM _candidates c USING _kept_apart k
           WHERE c.record_id_l = k.record_id_l AND c.record_id_r = k.record_id_r"""
    )


def apply(con: duckdb.DuckDBPyConnection) -> None:
    """Before the identity map is written: make each join's parts one component in `_labels`, and
    put the links kept apart back among the links (`restore_kept_apart`)."""
    ensure_table(con)
    with scratch(con) as s:
        if join_components(s):
            con.execute(f"CREATE OR REPLACE TEMP TABLE _labels AS {JOINED_LABELS}")
    restore_kept_apart(con)


def restore_kept_apart(con: duckdb.DuckDBPyConnection) -> None:
    """The links `keep_apart` set aside, back among the links, blocked with the decision's number."""
    if table_exists_temp(con, "_kept_apart"):
        if table_exists_temp(con, "_link_status"):
            con.execute("INSERT INTO _candidates BY NAME SELECT * EXCLUDE (override_id) FROM _kept_apart")
            con.execute(
                """INSERT INTO _link_status SELECT record_id_l, record_id_r, 'blocked',
                   'kept apart by persona unmerge (decision ' || override_id || ')' FROM _kept_apart"""
            )
        con.execute("DROP TABLE _kept_apart")


def join_components(t: Steps) -> bool:
    """Table `_joined` (node: a component of `_labels`, component: the one its join decisions make
    it part of), by the components algorithm identity's graph uses, on either engine; False
    when no decision joins anything (then `_labels` stands as it is)."""
    edges = t.table("_join_edges", JOIN_EDGES)
    if not t.scalar(f"SELECT count(*) FROM {edges}"):
        return False
    components.label(t, "(SELECT DISTINCT component AS node FROM _labels)", edges, "_joined")
    return True


def table_exists_temp(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary AND table_name = ?", [name]).fetchall()[0][0]
    )


# --- making decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    """What a user named: the person, and the identifier standing for them (as identity_map holds it)."""

    person_id: str
    identifier_type: str
    identifier: str
    named_identifier: bool  # an identifier was named (not a person_id)
    taken_out: bool = False  # nobody's: a decision took it out of `person_id`


@dataclass
class Decision:
    override_id: int
    kind: str
    action: str
    person_id: str
    parts: list[tuple[str, str]]
    revoked: list[int] = field(default_factory=list)
    decided_at: datetime | None = None


def find(con: duckdb.DuckDBPyConnection, key: bytes, text: str, gmail_rules: bool = True) -> Who:
    """The person a person_id or identifier names: `TYPE:VALUE` (user_id:u1, email:ann@example.com,
    phone:+4930..., anonymous_id:..., device_id:...) or a bare value tried as each type."""
    text = text.strip()
    if not table_exists(con, "identity_map"):
        raise OverrideError("No people resolved yet: run `persona run` first.")
    if re.fullmatch(PERSON_ID, text):
        row = con.execute(
            """SELECT person_id, arg_min(identifier_type, (first_seen_at, identifier_type, identifier)),
                      arg_min(identifier, (first_seen_at, identifier_type, identifier))
               FROM identity_map WHERE person_id = ? GROUP BY 1""",
            [text],
        ).fetchall()
        if not row:
            raise OverrideError(
                f"No person {text} in the warehouse (person ids change when people merge or split: "
                "`persona profile` finds the current one by any identifier)."
            )
        return Who(*row[0], named_identifier=False)
    kind, _, value = text.partition(":")
    forms = _forms(key, kind, value, gmail_rules) if kind in IDENTIFIER_TYPES and value else _bare_forms(key, text)
    rows = con.execute(
        """SELECT DISTINCT m.person_id, m.identifier_type, m.identifier FROM identity_map m
           JOIN (SELECT unnest($types) AS identifier_type, unnest($ids) AS identifier) f
           USING (identifier_type, identifier) ORDER BY ALL""",
        {"types": [t for t, _ in forms], "ids": [i for _, i in forms]},
    ).fetchall()
    if not rows:
        rows = con.execute(
            f"""SELECT DISTINCT a.person_id, a.identifier_type, a.identifier FROM {ACTIVE} a
                JOIN (SELECT unnest($types) AS identifier_type, unnest($ids) AS identifier) f
                USING (identifier_type, identifier) WHERE a.action = 'take_out' ORDER BY ALL""",
            {"types": [t for t, _ in forms], "ids": [i for _, i in forms]},
        ).fetchall()[:1]
        if rows:
            return Who(*rows[0], named_identifier=True, taken_out=True)
        raise OverrideError(
            f"No person holds {text!r}: name a person_id, or an identifier as TYPE:VALUE with "
            f"TYPE one of {', '.join(IDENTIFIER_TYPES)} (an identifier the guard keeps out "
            "belongs to nobody)."
        )
    if len(rows) > 1:
        kinds = ", ".join(f"{t}:{text}" for _, t, _ in rows)
        raise OverrideError(
            f"{text!r} is held by {len(rows)} people as different kinds of identifier; name one: {kinds}."
        )
    return Who(*rows[0], named_identifier=True)


def _forms(key: bytes, kind: str, value: str, gmail_rules: bool) -> list[tuple[str, str]]:
    """An identifier as identity_map holds it: email and phone normalized and keyed-hashed (or
    given as the keyed hash `label` shows)."""
    value = value.strip()
    if kind in ("email", "phone") and re.fullmatch(HEX64, value):
        return [(kind, value)]
    if kind == "email":
        email = normalize_email(value, gmail_rules)
        return [("email", hmac_hex(key, email))] if email else []
    if kind == "phone":
        phone = normalize_phone(value, None)
        return [("phone", hmac_hex(key, phone))] if phone else []
    return [(kind, value)]


def _bare_forms(key: bytes, value: str) -> list[tuple[str, str]]:
    forms = [(t, value.strip()) for t in ("user_id", "anonymous_id", "device_id")]
    if "@" in value:
        forms += _forms(key, "email", value, True)
    if re.fullmatch(r"[+0-9 ()./-]{6,}", value.strip()):
        forms += _forms(key, "phone", value, True)
    return forms


def groups(con: duckdb.DuckDBPyConnection, person_id: str) -> list[list[tuple[str, str]]]:
    """A person's identifiers in the groups events tie together (identifiers seen in one event),
    each group earliest identifier first, groups in the order of their first identifiers."""
    ids = con.execute(
        "SELECT identifier_type, identifier FROM identity_map WHERE person_id = ? "
        "ORDER BY first_seen_at, identifier_type, identifier",
        [person_id],
    ).fetchall()
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    columns = [(kind, c) for kind, cols in EVENT_COLUMNS.items() for c in cols]
    touching = " OR ".join(f"{c} IN (SELECT unnest($ids))" for _, c in columns)
    tuples = con.execute(
        f"SELECT DISTINCT {', '.join(c for _, c in columns)} FROM raw_events WHERE {touching}",
        {"ids": [i for _, i in ids]},
    ).fetchall()
    for row in tuples:
        held = [n for n in ((kind, v) for (kind, _), v in zip(columns, row)) if n in parent]
        for other in held[1:]:
            a, b = root(held[0]), root(other)
            if a != b:
                parent[b] = a
    out: dict = {}
    for i in ids:
        out.setdefault(root(i), []).append(i)
    return list(out.values())


def label(kind: str, identifier: str) -> str:
    """An identifier as a user can read it and type it back (email and phone as their keyed hash)."""
    return f"{kind}:{identifier}"


def unmerge(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    person: str,
    identifier: str | None = None,
    by: str = "persona",
    reason: str | None = None,
    now: datetime | None = None,
    gmail_rules: bool = True,
) -> Decision:
    """Record a split of the person `person` names: take `identifier` out of them, or (without one)
    keep apart the groups of identifiers events tie together, undoing the matches and merges that
    joined them. Applied by the next identity run."""
    ensure_table(con)
    who = find(con, key, person, gmail_rules)
    if who.taken_out:
        raise OverrideError(f"{person!r} was taken out of {who.person_id} already: it belongs to nobody.")
    ids = [
        tuple(r)
        for r in con.execute(
            "SELECT identifier_type, identifier FROM identity_map WHERE person_id = ? ORDER BY ALL", [who.person_id]
        ).fetchall()
    ]
    if identifier:
        out = find(con, key, identifier, gmail_rules)
        if out.taken_out or out.person_id != who.person_id:
            raise OverrideError(f"{identifier!r} belongs to {out.person_id}, not to {who.person_id}.")
        if len(ids) == 1:
            raise OverrideError(f"{who.person_id} holds only {identifier!r}: there is nothing to take it out of.")
        parts = [(out.identifier_type, out.identifier)]
        revoke = _decisions_naming(con, "join", parts)
        return _record(con, "take_out", who.person_id, parts, revoke, by, reason, now)
    found = groups(con, who.person_id)
    if len(found) < 2:
        listed = ", ".join(label(*i) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        raise OverrideError(
            f"{who.person_id} was not joined by a match or a merge: events tie all its identifiers together. "
            f"Take one out with --identifier TYPE:VALUE (its identifiers: {listed})."
        )
    revoke = [
        r[0]
        for r in con.execute(
            f"""WITH held AS {HELD} SELECT override_id FROM held WHERE action = 'join'
                GROUP BY 1 HAVING bool_and(person_id = ?) ORDER BY 1""",
            [who.person_id],
        ).fetchall()
    ]
    return _record(con, "keep_apart", who.person_id, [g[0] for g in found], revoke, by, reason, now)


def merge(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    first: str,
    second: str,
    by: str = "persona",
    reason: str | None = None,
    now: datetime | None = None,
    gmail_rules: bool = True,
) -> Decision:
    """Record that the people `first` and `second` name are one person, undoing any split that
    kept them apart. Applied by the next identity run."""
    ensure_table(con)
    a, b = find(con, key, first, gmail_rules), find(con, key, second, gmail_rules)
    if a.person_id == b.person_id and not (a.taken_out or b.taken_out):
        raise OverrideError(f"{first!r} and {second!r} are already one person ({a.person_id}).")
    parts = [(a.identifier_type, a.identifier), (b.identifier_type, b.identifier)]
    apart = con.execute(
        f"""WITH held AS {HELD} SELECT override_id FROM held WHERE action = 'keep_apart'
            GROUP BY 1 HAVING bool_or(person_id = $a) AND bool_or(person_id = $b) ORDER BY 1""",
        {"a": a.person_id, "b": b.person_id},
    ).fetchall()
    revoke = sorted({r[0] for r in apart} | set(_decisions_naming(con, "take_out", parts)))
    return _record(con, "join", a.person_id, parts, revoke, by, reason, now)


def _decisions_naming(con: duckdb.DuckDBPyConnection, action: str, parts: list[tuple[str, str]]) -> list[int]:
    """Active decisions of one kind that name any of these identifiers."""
    rows = con.execute(
        f"""SELECT DISTINCT override_id FROM {ACTIVE} a
            JOIN (SELECT unnest($types) AS identifier_type, unnest($ids) AS identifier) p
            USING (identifier_type, identifier) WHERE a.action = $action ORDER BY 1""",
        {"types": [t for t, _ in parts], "ids": [i for _, i in parts], "action": action},
    ).fetchall()
    return [r[0] for r in rows]


def _record(
    con: duckdb.DuckDBPyConnection,
    action: str,
    person_id: str,
    parts: list[tuple[str, str]],
    revoke: list[int],
    by: str,
    reason: str | None,
    now: datetime | None,
) -> Decision:
    """Write the decision (checked against its contract) and mark the ones it undoes, in one transaction."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    override_id = con.execute(f"SELECT coalesce(max(override_id), 0) + 1 FROM {TABLE}").fetchall()[0][0]
    frame = pd.DataFrame(
        {
            "override_id": override_id,
            "kind": OVERRIDE_ACTIONS[action],
            "action": action,
            "part": range(1, len(parts) + 1),
            "identifier_type": [t for t, _ in parts],
            "identifier": [i for _, i in parts],
            "person_id": person_id,
            "decided_by": by or "persona",
            "decided_at": pd.Timestamp(now),
            "reason": reason or None,
            "revoked_at": pd.NaT,
            "revoked_by": pd.array([None] * len(parts), dtype="Int64"),
        }
    )
    frame = IdentityOverrides.validate(frame)
    con.register("_override_frame", frame)
    try:
        with transaction(con):
            con.execute(
                f"UPDATE {TABLE} SET revoked_at = $now, revoked_by = $id WHERE override_id IN (SELECT unnest($revoke))",
                {"now": now, "id": override_id, "revoke": revoke},
            )
            con.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM _override_frame")
    finally:
        con.unregister("_override_frame")
    return Decision(override_id, OVERRIDE_ACTIONS[action], action, person_id, parts, revoke, now)


def where_now(con: duckdb.DuckDBPyConnection, decision: Decision) -> list[tuple[str, str, str | None]]:
    """Each identifier a decision names with the person holding it now (None: kept out, nobody's)."""
    out = []
    for kind, identifier in decision.parts:
        rows = con.execute(
            "SELECT person_id FROM identity_map WHERE identifier_type = ? AND identifier = ?", [kind, identifier]
        ).fetchall()
        out.append((kind, identifier, rows[0][0] if rows else None))
    return out


def changes_since(con: duckdb.DuckDBPyConnection, decision: Decision, people: list[str]) -> list[tuple]:
    """The person_id changes (old, new, change, identifiers moved) of these people since the decision."""
    return con.execute(
        """SELECT old_person_id, new_person_id, change, identifiers_moved FROM person_id_history
           WHERE changed_at >= $at AND (old_person_id IN (SELECT unnest($people)) OR new_person_id IN
             (SELECT unnest($people))) ORDER BY changed_at, old_person_id, new_person_id""",
        {"at": decision.decided_at, "people": people},
    ).fetchall()
