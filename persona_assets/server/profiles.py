"""The profile API's reads, on the read-only serving snapshot (and the hot store when a stream runs).

One worker thread owns the snapshot connection and runs every read that asks it, so no read
ever shares it with another. Before each read it looks at the snapshot's file: when a run or
`persona forget` has published a new one (a new inode), it closes the old connection first
and opens the new file. Closing first matters: DuckDB hands a process that still holds a database open
the same instance again for the same path, so a reopen without closing would keep serving
the old file (and an erased person with it). A read in flight finishes on the file it began
with, which stays whole after the rename.

When it opens a snapshot, the worker also reads what a traits or audiences read needs
(identity_map, user_profiles, audience_members) into memory, each table up to a row limit, as
a `View` that never changes once made. It is held in columns, not as Python objects: who each
identifier is as 16 bytes of a salted hash an identifier (`IdentityIndex`), the profiles as an
Arrow table sorted by person_id (`ProfileRows`), so a 20M-event snapshot (3.3M identifiers,
626k people) fits in about 500 MB and a read finds its row by binary search. A read whose answer is all in the view is answered on
the event loop (`ProfileReader.from_view`), after the same look at the snapshot's file: a new
file sends it to the worker, which opens it and makes the next view, so a forgotten person is
gone from memory as soon as from the file. Events, identifiers and tables past their limits
are asked of the snapshot, as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from persona_assets.core.pii import hmac_hex, normalize_email, normalize_phone
from persona_assets.core.publish import PERSON_ID, open_snapshot

ID_TYPES = ("user_id", "anonymous_id", "email", "phone", "device_id", "person_id")
EVENT_LIMIT, MAX_EVENT_LIMIT = 20, 200
# identity_map is held in memory up to this many rows (20 bytes a row and the person_ids once:
# 113 MB and 3.2 s to build for 3.3M identifiers of 626k people); past it, each first read of
# an identifier asks the snapshot (the table is sorted by identifier, so it reads one row group).
IDENTITY_IN_MEMORY = 20_000_000
# user_profiles is held in memory up to this many people (as Arrow columns: 376 MB and 1.2 s for
# 626k people; the server peaked at 1.5 GB resident with both),
# audience_members up to this many memberships; past them, each first read asks the snapshot.
PROFILES_IN_MEMORY = 2_000_000
MEMBERSHIPS_IN_MEMORY = 2_000_000


class NotFound(Exception):
    """No profile for the identifier asked for."""


class BadRequest(ValueError):
    """A request the API cannot answer as asked; the message says what it may be."""


def jsonable(value):
    """A snapshot value as JSON: times as ISO-8601, NaN as null, maps as objects."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def encode_cursor(event_at: datetime, message_id: str) -> str:
    text = json.dumps([event_at.isoformat(), message_id])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        at, message_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return datetime.fromisoformat(at), str(message_id)
    except (ValueError, TypeError):
        raise BadRequest("next: not a cursor this API gave") from None


@dataclass(frozen=True)
class Page:
    events: list[dict]
    next: str | None


class Recent(OrderedDict):
    """A bounded map that forgets what was used least recently."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def keep(self, key, value):
        self[key] = value
        if len(self) > self.capacity:
            self.popitem(last=False)
        return value

    def find(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class IdentityIndex:
    """identity_map in memory, about 20 bytes an identifier: for each, the 16 bytes of an md5 of
    (salt, type, identifier), sorted, and which person it belongs to; a look-up is a binary search.

    The salt is drawn afresh each time a snapshot is opened and never leaves the process, so no
    sender can make two identifiers whose hashes collide (an md5 collision needs its prefix known
    in advance); by chance, two of 20M identifiers share 128 bits with odds under 1e-24."""

    def __init__(self, con) -> None:
        self.salt = secrets.token_hex(16)
        # con.sql, not con.execute: a DB-API result's Arrow output copies every row once more.
        table = con.sql(
            """SELECT md5_number_upper(k) AS upper, md5_number_lower(k) AS lower, person_id
               FROM (SELECT $salt || identifier_type || chr(0) || identifier AS k, person_id FROM identity_map)
               ORDER BY upper, lower""",
            params={"salt": self.salt},
        ).to_arrow_table()
        self.upper = table["upper"].to_numpy()
        self.lower = table["lower"].to_numpy()
        people = pc.dictionary_encode(table["person_id"].combine_chunks())
        self.person = people.indices.to_numpy()
        self.people = people.dictionary.to_pylist()

    def __len__(self) -> int:
        return len(self.upper)

    def get(self, id_type: str, identifier: str) -> str | None:
        """The person_id of an identifier as identity_map holds it (normalized, hashed); None: not known."""
        try:
            key = f"{self.salt}{id_type}\0{identifier}".encode()
        except UnicodeEncodeError:  # a lone surrogate from the URL: no identifier in the snapshot is one
            return None
        digest = hashlib.md5(key, usedforsecurity=False).digest()
        # DuckDB's md5_number_upper / _lower read the digest's two halves as little-endian integers.
        upper = np.uint64(int.from_bytes(digest[:8], "little"))
        lower = np.uint64(int.from_bytes(digest[8:], "little"))
        at = int(np.searchsorted(self.upper, upper))
        while at < len(self.upper) and self.upper[at] == upper:
            if self.lower[at] == lower:
                return self.people[self.person[at]]
            at += 1
        return None


class ProfileRows:
    """user_profiles in memory as Arrow columns sorted by person_id (a few hundred bytes a person
    where Python objects took 2.7 KB); a row becomes a dict, as a query's row would, when read."""

    def __init__(self, con) -> None:
        self.table = con.sql("SELECT * FROM user_profiles ORDER BY person_id").to_arrow_table().combine_chunks()
        self.columns = tuple(self.table.column_names)
        self.ids = np.array(self.table["person_id"].to_pylist(), dtype=str)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, person_id: str) -> dict | None:
        at = int(np.searchsorted(self.ids, person_id))
        if at == len(self.ids) or self.ids[at] != person_id:
            return None
        return self.table.slice(at, 1).to_pylist(maps_as_pydicts="strict")[0]


@dataclass(frozen=True)
class View:
    """What was read into memory from one snapshot file, never changed once made: who each
    identifier is, each person's profile row, each person's audiences (None where the table
    was past its limit and is asked instead)."""

    file: tuple[int, int]
    identity: IdentityIndex | None
    profiles: ProfileRows | None
    audiences: dict[str, list[dict]] | None


class ProfileReader:
    """Look-ups by any identifier; every method but `from_view` runs on the reader's one worker thread.

    A snapshot never changes once published, so what was read from it (who an identifier is,
    a profile row) is kept for the next request, up to `cache` entries each, and dropped with
    the connection when a new snapshot comes."""

    def __init__(
        self, snapshot: Path, key: bytes, gmail_rules: bool = True, live=None, cache: int = 50_000, definitions=None
    ) -> None:
        self.snapshot, self.key, self.gmail_rules, self.live = snapshot, key, gmail_rules, live
        # definitions(con) -> the audience definitions in force, checked against the snapshot (for `why`)
        self.definitions = definitions
        self._con = None
        self._file: tuple[int, int] | None = None
        self.reopened = 0
        self._people: Recent = Recent(cache)
        self._profiles: Recent = Recent(cache)
        self._identity: IdentityIndex | None = None
        self.view: View | None = None  # replaced whole (never changed) by the worker thread

    def _connection(self):
        """The snapshot connection, reopened when a new snapshot was published."""
        st = os.stat(self.snapshot)  # FileNotFoundError: no snapshot yet
        if (st.st_ino, st.st_dev) != self._file:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._people.clear()
            self._profiles.clear()
            self.view = None
            self._con = open_snapshot(self.snapshot)
            self._identity = _identity_index(self._con, IDENTITY_IN_MEMORY)
            self._file = (st.st_ino, st.st_dev)
            self.view = _view(self._con, self._file, self._identity, PROFILES_IN_MEMORY, MEMBERSHIPS_IN_MEMORY)
            self.reopened += 1
        return self._con

    def from_view(self, what: str, id_type: str, value: str, fields: list[str] | None) -> dict | None:
        """The answer from memory, on the caller's thread, when the snapshot's file is still the one
        the view was made from and holds all the answer needs; None: ask the worker thread.
        Raises NotFound (an identifier the in-memory identity map does not hold) like the others."""
        view = self.view
        if view is None or what not in ("traits", "audiences") or (what == "traits" and self.live is not None):
            return None
        try:
            st = os.stat(self.snapshot)
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_dev) != view.file:
            return None  # a new snapshot: the worker opens it (and makes its view)
        if id_type == "person_id":
            if view.profiles is None:
                return None
            profile = view.profiles.get(value)
            if profile is None:
                raise NotFound
            person_id = value
        else:
            if view.identity is None:
                return None
            normalized = self._normalized(id_type, value)
            person_id = view.identity.get(id_type, normalized) if normalized is not None else None
            if person_id is None:
                raise NotFound
            profile = None
        if what == "audiences":
            if view.audiences is None:
                return None
            return {"person_id": person_id, "data": view.audiences.get(person_id, [])}
        if view.profiles is None:
            return None
        profile = profile or view.profiles.get(person_id) or {"person_id": person_id}
        return {"person_id": person_id, "traits": jsonable(_select(profile, fields))}

    def _normalized(self, id_type: str, value: str) -> str | None:
        """An identifier as identity_map holds it: email and phone normalized and keyed-hashed."""
        if id_type == "email":
            value = normalize_email(value, self.gmail_rules)
        elif id_type == "phone":
            value = normalize_phone(value, None)
        if value is not None and id_type in ("email", "phone"):
            value = hmac_hex(self.key, value)
        return value

    def warm(self) -> None:
        """Open the snapshot now, if there is one, so the first read does not wait for its view."""
        try:
            self._connection()
        except FileNotFoundError:
            pass
        except Exception as exc:  # the read that comes will meet it again and answer it
            import logging

            logging.getLogger("persona.server").warning("the snapshot could not be opened: %s", type(exc).__name__)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def person(self, id_type: str, value: str) -> str:
        """The person_id an identifier belongs to (email and phone normalized and hashed first)."""
        con = self._connection()
        found = self._people.find((id_type, value))
        if found is None:
            found = self._people.keep((id_type, value), self._person(con, id_type, value))
        return found

    def _person(self, con, id_type: str, value: str) -> str:
        if id_type == "person_id":
            found = (
                re.fullmatch(PERSON_ID, value)
                and con.execute("SELECT person_id FROM user_profiles WHERE person_id = ?", [value]).fetchall()
            )
            if not found:
                raise NotFound
            return found[0][0]
        value = self._normalized(id_type, value)
        if value is None:
            raise NotFound
        if self._identity is not None:
            found = self._identity.get(id_type, value)
            if found is None:
                raise NotFound
            return found
        rows = con.execute(
            "SELECT person_id FROM identity_map WHERE identifier = ? AND identifier_type = ?", [value, id_type]
        ).fetchall()
        if not rows:
            raise NotFound
        return rows[0][0]

    def traits(self, id_type: str, value: str, fields: list[str] | None) -> dict:
        person_id = self.person(id_type, value)
        profile = self._profiles.find(person_id)
        view = self.view
        if profile is None and view is not None and view.profiles is not None:
            profile = view.profiles.get(person_id) or {"person_id": person_id}
        if profile is None:
            result = self._connection().execute("SELECT * FROM user_profiles WHERE person_id = ?", [person_id])
            names = [d[0] for d in result.description]
            row = result.fetchone()
            profile = self._profiles.keep(
                person_id, dict(zip(names, row, strict=True)) if row else {"person_id": person_id}
            )
        profile = dict(profile)
        if self.live is not None:
            profile.update(self.live(person_id, profile))
        return {"person_id": person_id, "traits": jsonable(_select(profile, fields))}

    def audiences(self, id_type: str, value: str) -> dict:
        """The audiences the person is in now (audience_members), oldest entry first; none when the
        snapshot was published before audiences existed."""
        person_id = self.person(id_type, value)
        view = self.view
        if view is not None and view.audiences is not None:
            return {"person_id": person_id, "data": view.audiences.get(person_id, [])}
        con = self._connection()
        if not _has_table(con, "audience_members"):
            return {"person_id": person_id, "data": []}
        rows = con.execute(
            "SELECT audience, entered_at FROM audience_members WHERE person_id = ? ORDER BY entered_at, audience",
            [person_id],
        ).fetchall()
        return {"person_id": person_id, "data": [_membership(a, at) for a, at in rows]}

    def identifiers(self, id_type: str, value: str) -> dict:
        person_id = self.person(id_type, value)
        rows = (
            self._connection()
            .execute(
                "SELECT identifier_type, identifier, first_seen_at, last_seen_at FROM identity_map "
                "WHERE person_id = ? ORDER BY identifier_type, identifier",
                [person_id],
            )
            .fetchall()
        )
        data = [{"type": t, "id": i, "first_seen_at": f, "last_seen_at": s} for t, i, f, s in rows]
        return {"person_id": person_id, "data": jsonable(data)}

    def events(self, id_type: str, value: str, limit: int, after: str | None, fields: list[str] | None) -> dict:
        """The person's events, newest first, `limit` at a time; `after` is the last page's cursor
        (keyset paging on (event_at, message_id), so a page never repeats or skips an event)."""
        person_id = self.person(id_type, value)
        at, message_id = decode_cursor(after) if after else (None, None)
        # `arrived_via`: how the event reached landing (the stream consumer's and the HTTP server's
        # files are named by them), so the explorer can mark the live ones.
        result = self._connection().execute(
            """WITH ids AS (SELECT identifier_type, identifier FROM identity_map WHERE person_id = $person),
               mine AS (SELECT * FROM raw_events
                        WHERE (user_id IN (SELECT identifier FROM ids WHERE identifier_type = 'user_id')
                           OR anonymous_id IN (SELECT identifier FROM ids WHERE identifier_type = 'anonymous_id'))
                          AND ($at IS NULL OR (event_at, message_id) < ($at, $message_id))
                        ORDER BY event_at DESC, message_id DESC LIMIT $limit)
               SELECT e.* EXCLUDE (batch_id, source_line),
                      CASE WHEN f.file_name LIKE 'stream-%' THEN 'stream' WHEN f.file_name LIKE 'http-%' THEN 'http'
                           ELSE 'file' END AS arrived_via
               FROM mine e LEFT JOIN ingest_files f ON f.batch_id = e.batch_id
               ORDER BY e.event_at DESC, e.message_id DESC""",
            {"person": person_id, "at": at, "message_id": message_id, "limit": limit + 1},
        )
        names = [d[0] for d in result.description]
        rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        token = encode_cursor(rows[-1]["event_at"], rows[-1]["message_id"]) if more else None
        return {
            "person_id": person_id,
            "data": [jsonable(_select(r, fields)) for r in rows],
            "cursor": {"has_more": more, "next": token},
        }

    # --- reads the person explorer needs (also under /v1/: search, provenance, links, segments, audiences) ---

    def search(self, text: str) -> dict:
        """Everyone an identifier of any kind names: `type:value` asks one kind; otherwise a person_id,
        userId, anonymousId and device id as given, an email or phone normalized and hashed."""
        text = text.strip()
        kind, sep, rest = text.partition(":")
        if sep and kind in ID_TYPES:
            asked = [(kind, rest.strip())]
        else:
            asked = [("person_id", text)] if re.fullmatch(PERSON_ID, text) else []
            asked += [("user_id", text), ("anonymous_id", text), ("device_id", text)]
            if "@" in text:
                asked.append(("email", text))
            if re.fullmatch(r"[+0-9 ()./-]{6,}", text):
                asked.append(("phone", text))
        found: dict[str, list[str]] = {}
        for id_type, value in asked:
            if not value:
                continue
            try:
                found.setdefault(self.person(id_type, value), []).append(id_type)
            except NotFound:
                continue
        return {"data": [{"person_id": p, "matched": kinds} for p, kinds in found.items()]}

    def provenance(self, id_type: str, value: str) -> dict:
        """Each trait with its value, source, confidence and when it was observed (imputed_attributes),
        and each computed trait (source `computed`)."""
        person_id = self.person(id_type, value)
        con = self._connection()
        rows = con.execute(
            "SELECT trait, value, source, confidence, model_version, observed_at FROM imputed_attributes "
            "WHERE person_id = ? ORDER BY trait",
            [person_id],
        ).fetchall()
        names = ("trait", "value", "source", "confidence", "model_version", "observed_at")
        data = [dict(zip(names, r, strict=True)) for r in rows]
        if _has_table(con, "computed_traits"):
            computed = con.execute(
                "SELECT trait, kind, number, text, list, source FROM computed_traits WHERE person_id = ? ORDER BY trait",
                [person_id],
            ).fetchall()
            for trait, kind, number, text, items, source in computed:
                shown = items if items is not None else text if text is not None else number
                data.append(
                    {
                        "trait": trait,
                        "value": shown,
                        "source": source,
                        "kind": kind,
                        "confidence": None,
                        "model_version": None,
                        "observed_at": None,
                    }
                )
        return {"person_id": person_id, "data": jsonable(data)}

    def links(self, id_type: str, value: str) -> dict:
        """How the person came to be: the probabilistic links that hold their records together (with the
        weight each comparison added) and their person_id's history (merges and splits)."""
        person_id = self.person(id_type, value)
        con = self._connection()
        links = None
        if _has_table(con, "identity_links"):
            rows = con.execute(
                "SELECT record_id_l, record_id_r, match_probability, match_weight, weights, status, reason "
                "FROM identity_links WHERE person_id = ? ORDER BY match_weight DESC, record_id_l, record_id_r",
                [person_id],
            ).fetchall()
            names = ("record_l", "record_r", "match_probability", "match_weight", "weights", "status", "reason")
            links = [dict(zip(names, r, strict=True)) for r in rows]
            for link in links:
                link["weights"] = json.loads(link["weights"]) if link["weights"] else {}
        history = con.execute(
            "SELECT old_person_id, new_person_id, change, identifiers_moved, changed_at FROM person_id_history "
            "WHERE old_person_id = $p OR new_person_id = $p ORDER BY changed_at DESC, old_person_id",
            {"p": person_id},
        ).fetchall()
        names = ("old_person_id", "new_person_id", "change", "identifiers_moved", "changed_at")
        return {
            "person_id": person_id,
            "links": jsonable(links),
            "history": jsonable([dict(zip(names, r, strict=True)) for r in history]),
        }

    def activity(self, id_type: str, value: str, weeks: int = 26) -> dict:
        """The person's events and orders a week, over the `weeks` weeks up to their latest event
        (weeks without events count 0)."""
        person_id = self.person(id_type, value)
        rows = (
            self._connection()
            .execute(
                """WITH ids AS (SELECT identifier_type, identifier FROM identity_map WHERE person_id = $person),
               mine AS (SELECT event_at, event_name FROM raw_events
                        WHERE user_id IN (SELECT identifier FROM ids WHERE identifier_type = 'user_id')
                           OR anonymous_id IN (SELECT identifier FROM ids WHERE identifier_type = 'anonymous_id')),
               span AS (SELECT date_trunc('week', max(event_at)) AS last FROM mine)
               SELECT CAST(date_trunc('week', event_at) AS DATE) AS week, count(*) AS events,
                      count(*) FILTER (WHERE event_name = 'Order Completed') AS orders
               FROM mine, span WHERE event_at >= span.last - to_weeks(CAST($weeks AS INTEGER) - 1)
               GROUP BY 1 ORDER BY 1""",
                {"person": person_id, "weeks": weeks},
            )
            .fetchall()
        )
        counted = {week: (events, orders) for week, events, orders in rows}
        data = []
        if rows:
            last = rows[-1][0]
            for back in range(weeks - 1, -1, -1):
                week = last - timedelta(weeks=back)
                events, orders = counted.get(week, (0, 0))
                data.append({"week": week.isoformat(), "events": events, "orders": orders})
        return {"person_id": person_id, "data": data}

    def audiences_why(self, id_type: str, value: str) -> dict:
        """The person's audiences with, for each, every condition of its definition and whether it
        holds, with the value read (as `persona audience NAME WHO` prints it)."""
        from persona_assets.core.audience_definitions import DefinitionsError
        from persona_assets.core.audiences import explain

        answer = self.audiences(id_type, value)
        con = self._connection()
        try:
            definitions = self.definitions(con) if self.definitions is not None else None
        except DefinitionsError as exc:
            return answer | {"why_unavailable": f"the audience definitions cannot be read: {exc}"}
        for member in answer["data"]:
            if definitions is None or member["audience"] not in definitions.audiences:
                member["why"] = None
                continue
            audience = definitions.audiences[member["audience"]]
            member["description"] = audience.description
            reasons = explain(con, definitions, member["audience"], answer["person_id"])
            member["why"] = [
                {"depth": r.depth, "holds": r.holds, "text": r.text, "value": jsonable(r.value)} for r in reasons
            ]
        return answer

    def segments(self) -> dict:
        """The segment catalog: every segment and sub-segment with its size and explanation."""
        rows = (
            self._connection()
            .execute("SELECT level, id, parent_id, name, people, share, explanation FROM segment_catalog ORDER BY id")
            .fetchall()
        )
        names = ("level", "id", "parent_id", "name", "people", "share", "explanation")
        return {"data": jsonable([dict(zip(names, r, strict=True)) for r in rows])}

    def segment_members(self, segment_id: str, limit: int, after: str | None) -> dict:
        """The people of a segment or sub-segment, by person_id, `limit` at a time (`after`: the last page's cursor)."""
        con = self._connection()
        found = con.execute(
            "SELECT level, id, parent_id, name, people, share, explanation FROM segment_catalog WHERE id = ?",
            [segment_id],
        ).fetchall()
        if not found:
            raise NotFound
        names = ("level", "id", "parent_id", "name", "people", "share", "explanation")
        rows = con.execute(
            """SELECT person_id, segment_name, subsegment_name, event_count, order_count, total_revenue, top_category
               FROM user_profiles WHERE (segment_id = $id OR subsegment_id = $id) AND ($after IS NULL OR person_id > $after)
               ORDER BY person_id LIMIT $limit""",
            {"id": segment_id, "after": _person_cursor(after), "limit": limit + 1},
        )
        return {"segment": jsonable(dict(zip(names, found[0], strict=True)))} | _page(rows, limit, "person_id")

    def audience_list(self) -> dict:
        """Every audience with its latest evaluation (size, who entered and exited, when)."""
        con = self._connection()
        if not _has_table(con, "audience_runs"):
            return {"data": []}
        rows = con.execute(
            """SELECT audience, arg_max(size, evaluated_at), arg_max(entered, evaluated_at),
                      arg_max(exited, evaluated_at), max(evaluated_at), arg_max(definition, evaluated_at)
               FROM audience_runs GROUP BY audience ORDER BY audience"""
        ).fetchall()
        names = ("audience", "size", "entered", "exited", "evaluated_at", "definition")
        return {"data": jsonable([dict(zip(names, r, strict=True)) for r in rows])}

    def audience_members(self, name: str, limit: int, after: str | None) -> dict:
        """An audience's members, by person_id, `limit` at a time, with when each entered."""
        audiences = {a["audience"]: a for a in self.audience_list()["data"]}
        if name not in audiences:
            raise NotFound
        rows = self._connection().execute(
            """SELECT m.person_id, m.entered_at, p.segment_name, p.event_count, p.order_count, p.total_revenue
               FROM audience_members m LEFT JOIN user_profiles p USING (person_id)
               WHERE m.audience = $name AND ($after IS NULL OR m.person_id > $after)
               ORDER BY m.person_id LIMIT $limit""",
            {"name": name, "after": _person_cursor(after), "limit": limit + 1},
        )
        return {"audience": audiences[name]} | _page(rows, limit, "person_id")


def _identity_index(con, limit: int) -> IdentityIndex | None:
    """identity_map in memory, when it is small enough to hold: a first read is then one query."""
    if con.execute("SELECT count(*) FROM identity_map").fetchall()[0][0] > limit:
        return None
    return IdentityIndex(con)


def _person_cursor(after: str | None) -> str | None:
    if after is not None and not re.fullmatch(PERSON_ID, after):
        raise BadRequest("next: not a cursor this API gave")
    return after


def _page(result, limit: int, key: str) -> dict:
    """Rows of a keyset page asked for with `limit + 1`: the first `limit`, and the cursor when more follow."""
    names = [d[0] for d in result.description]
    rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"data": jsonable(rows), "cursor": {"has_more": more, "next": rows[-1][key] if more else None}}


def _has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT 1 FROM duckdb_tables() WHERE table_name = ?", [name]).fetchall())


def _membership(audience: str, entered_at) -> dict:
    return {"audience": audience, "entered_at": jsonable(entered_at)}


def _view(con, file: tuple[int, int], identity, profiles_limit: int, memberships_limit: int) -> View:
    """The snapshot's user_profiles and audience_members in memory, each when small enough to hold."""
    profiles = None
    if con.execute("SELECT count(*) FROM user_profiles").fetchall()[0][0] <= profiles_limit:
        profiles = ProfileRows(con)
    audiences: dict[str, list[dict]] | None = {}
    if _has_table(con, "audience_members"):
        if con.execute("SELECT count(*) FROM audience_members").fetchall()[0][0] <= memberships_limit:
            rows = con.execute(
                "SELECT person_id, audience, entered_at FROM audience_members ORDER BY person_id, entered_at, audience"
            ).fetchall()
            for person_id, audience, entered_at in rows:
                audiences.setdefault(person_id, []).append(_membership(audience, entered_at))
        else:
            audiences = None
    return View(file, identity, profiles, audiences)


def _select(row: dict, fields: list[str] | None) -> dict:
    if not fields:
        return row
    unknown = [f for f in fields if f not in row]
    if unknown:
        raise BadRequest(f"fields: unknown {', '.join(unknown)}; known: {', '.join(row)}")
    return {f: row[f] for f in fields}
