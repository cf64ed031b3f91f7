"""The profile API's reads, on the read-only serving snapshot (and the hot store when a stream runs).

One worker thread owns the snapshot connection and runs every read, so no read ever shares
it with another. Before each read it looks at the snapshot's file: when a run or `persona
forget` has published a new one (a new inode), it closes the old connection first and opens
the new file. Closing first matters: DuckDB hands a process that still holds a database open
the same instance again for the same path, so a reopen without closing would keep serving
the old file (and an erased person with it). A read in flight finishes on the file it began
with, which stays whole after the rename.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from persona_assets.core.pii import hmac_hex, normalize_email, normalize_phone
from persona_assets.core.publish import PERSON_ID, open_snapshot

ID_TYPES = ("user_id", "anonymous_id", "email", "phone", "device_id", "person_id")
EVENT_LIMIT, MAX_EVENT_LIMIT = 20, 200
# identity_map is held in memory up to this many rows (about 100 MB); past it, each first read
# of an identifier asks the snapshot (the table is sorted by identifier, so it reads one row group).
IDENTITY_IN_MEMORY = 1_000_000


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


class ProfileReader:
    """Look-ups by any identifier; every method runs on the reader's one worker thread.

    A snapshot never changes once published, so what was read from it (who an identifier is,
    a profile row) is kept for the next request, up to `cache` entries each, and dropped with
    the connection when a new snapshot comes."""

    def __init__(self, snapshot: Path, key: bytes, gmail_rules: bool = True, live=None, cache: int = 50_000) -> None:
        self.snapshot, self.key, self.gmail_rules, self.live = snapshot, key, gmail_rules, live
        self._con = None
        self._file: tuple[int, int] | None = None
        self.reopened = 0
        self._people: Recent = Recent(cache)
        self._profiles: Recent = Recent(cache)
        self._identity: dict[tuple[str, str], str] | None = None

    def _connection(self):
        """The snapshot connection, reopened when a new snapshot was published."""
        st = os.stat(self.snapshot)  # FileNotFoundError: no snapshot yet
        if (st.st_ino, st.st_dev) != self._file:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._people.clear()
            self._profiles.clear()
            self._con = open_snapshot(self.snapshot)
            self._identity = _identity_index(self._con)
            self._file = (st.st_ino, st.st_dev)
            self.reopened += 1
        return self._con

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
        if id_type == "email":
            value = normalize_email(value, self.gmail_rules)
        elif id_type == "phone":
            value = normalize_phone(value, None)
        if value is None:
            raise NotFound
        if id_type in ("email", "phone"):
            value = hmac_hex(self.key, value)
        if self._identity is not None:
            if (id_type, value) not in self._identity:
                raise NotFound
            return self._identity[(id_type, value)]
        rows = con.execute(
            "SELECT person_id FROM identity_map WHERE identifier = ? AND identifier_type = ?", [value, id_type]
        ).fetchall()
        if not rows:
            raise NotFound
        return rows[0][0]

    def traits(self, id_type: str, value: str, fields: list[str] | None) -> dict:
        person_id = self.person(id_type, value)
        profile = self._profiles.find(person_id)
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
        result = self._connection().execute(
            """WITH ids AS (SELECT identifier_type, identifier FROM identity_map WHERE person_id = $person)
               SELECT * EXCLUDE (batch_id, source_line) FROM raw_events
               WHERE (user_id IN (SELECT identifier FROM ids WHERE identifier_type = 'user_id')
                  OR anonymous_id IN (SELECT identifier FROM ids WHERE identifier_type = 'anonymous_id'))
                 AND ($at IS NULL OR (event_at, message_id) < ($at, $message_id))
               ORDER BY event_at DESC, message_id DESC LIMIT $limit""",
            {"person": person_id, "at": at, "message_id": message_id, "limit": limit + 1},
        )
        names = [d[0] for d in result.description]
        rows = [dict(zip(names, r, strict=True)) for r in result.fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        token = encode_cursor(rows[-1]["event_at"], rows[-1]["message_id"]) if more else None
        return {"person_id": person_id, "data": [jsonable(_select(r, fields)) for r in rows],
                "cursor": {"has_more": more, "next": token}}  # fmt: skip


def _identity_index(con, limit: int = IDENTITY_IN_MEMORY) -> dict[tuple[str, str], str] | None:
    """identity_map as a dict, when it is small enough to hold: a first read is then one query."""
    if con.execute("SELECT count(*) FROM identity_map").fetchall()[0][0] > limit:
        return None
    rows = con.execute("SELECT identifier_type, identifier, person_id FROM identity_map").fetchall()
    return {(kind, identifier): person for kind, identifier, person in rows}


def _select(row: dict, fields: list[str] | None) -> dict:
    if not fields:
        return row
    unknown = [f for f in fields if f not in row]
    if unknown:
        raise BadRequest(f"fields: unknown {', '.join(unknown)}; known: {', '.join(row)}")
    return {f: row[f] for f in fields}
