"""Destinations: audience entries and exits delivered where people act on them.

- **webhook**: JSON batches of Segment-spec Track events (`Audience Entered` / `Audience
  Exited`, userId or else anonymousId, the audience key in the properties), signed with
  HMAC-SHA256 over the timestamp and the body, each event's messageId its idempotency key.
  Batches go in change order, one at a time; a failed batch is retried with exponential
  backoff and full jitter, and after `max_attempts` (or a refusal, a 4xx) its changes go to
  `destination_dead_letters` and delivery moves on. The cursor moves only after a batch is
  delivered or dead-lettered, so a run killed in between sends it again: at least once, and a
  receiver that keeps the messageIds it saw takes each change once. Dead letters are sent
  again, oldest first, when asked (`redeliver=True`, the deliveries asset's
  `redeliver_dead_letters`), with their original messageIds.
- **file**: each audience's members as CSV or Parquet in a folder, written aside and renamed.

A run spends at most `budget_seconds` per destination: what is left waits for the next run,
its attempts counted (the receiver being down for a while loses nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from persona_assets.contracts import DestinationDeadLetters, DestinationDeliveries, ddl
from persona_assets.core.audience_definitions import Definitions, Destination
from persona_assets.core.warehouse import transaction

SIGNATURE_HEADER = "X-Persona-Signature"
TIMESTAMP_HEADER = "X-Persona-Timestamp"
EVENTS = {"entered": "Audience Entered", "exited": "Audience Exited"}


@dataclass(frozen=True)
class DeliveryOptions:
    base_delay: float = 0.5  # seconds before the first retry (then doubling, with full jitter)
    max_delay: float = 30.0
    budget_seconds: float = 60.0  # per destination and run; the rest waits for the next run
    seed: int | None = None


@dataclass
class DeliveryReport:
    destination: str
    kind: str
    delivered: int = 0
    dead_lettered: int = 0
    attempts_failed: int = 0
    pending: int = 0
    error: str | None = None
    redelivered: int = 0  # dead letters sent again


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(DestinationDeliveries, "destination_deliveries"))
    con.execute(ddl(DestinationDeadLetters, "destination_dead_letters"))


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class State:
    delivered_through: int = 0
    delivered: int = 0
    attempts_failed: int = 0
    pending_attempts: int = 0
    last_success_at: datetime | None = None
    last_error: str | None = None


def load_state(con: duckdb.DuckDBPyConnection, name: str) -> State:
    rows = con.execute(
        "SELECT delivered_through, delivered, attempts_failed, pending_attempts, last_success_at, last_error "
        "FROM destination_deliveries WHERE destination = ?",
        [name],
    ).fetchall()
    return State(*rows[0]) if rows else State()


def save_state(con: duckdb.DuckDBPyConnection, dest: Destination, s: State) -> None:
    """One UPDATE (atomic on its own) once the destination has its row."""
    con.execute(
        "INSERT INTO destination_deliveries SELECT ?, ?, 0, 0, 0, 0, NULL, NULL, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM destination_deliveries WHERE destination = ?)",
        [dest.name, dest.kind, now(), dest.name],
    )
    con.execute(
        """UPDATE destination_deliveries SET delivered_through = ?, delivered = ?, attempts_failed = ?,
           pending_attempts = ?, last_success_at = ?, last_error = ?, updated_at = ? WHERE destination = ?""",
        [
            s.delivered_through,
            s.delivered,
            s.attempts_failed,
            s.pending_attempts,
            s.last_success_at,
            s.last_error,
            now(),
            dest.name,
        ],
    )


def _audience_filter(dest: Destination) -> tuple[str, dict]:
    if not dest.audiences:
        return "", {}
    return "AND c.audience IN (SELECT unnest($audiences))", {"audiences": list(dest.audiences)}


def pending(con: duckdb.DuckDBPyConnection, dest: Destination, after: int, limit: int | None = None) -> list[dict]:
    """The destination's changes after change `after`, in order, each with the person's userId
    (else anonymousId) from the identity map."""
    where, params = _audience_filter(dest)
    limit_sql = "LIMIT $limit" if limit else ""
    result = con.execute(
        f"""SELECT c.change_id, c.audience, c.person_id, c.change, c.changed_at,
                   (SELECT min(identifier) FROM identity_map m WHERE m.person_id = c.person_id
                    AND m.identifier_type = 'user_id') AS user_id,
                   (SELECT min(identifier) FROM identity_map m WHERE m.person_id = c.person_id
                    AND m.identifier_type = 'anonymous_id') AS anonymous_id
            FROM audience_changes c WHERE c.change_id > $after {where} ORDER BY c.change_id {limit_sql}""",
        {"after": after, **params, **({"limit": limit} if limit else {})},
    )
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def idempotency_key(destination: str, change: dict) -> str:
    text = f"{destination}|{change['change_id']}|{change['audience']}|{change['person_id']}|{change['change']}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def track_event(destination: str, change: dict) -> dict:
    """One change as a Segment Track event."""
    event = {
        "type": "track",
        "event": EVENTS[change["change"]],
        "messageId": idempotency_key(destination, change),
        "timestamp": change["changed_at"].isoformat() + "Z",
        "properties": {"audience_key": change["audience"], change["audience"]: change["change"] == "entered"},
        "context": {
            "personas": {"computation_key": change["audience"], "computation_class": "audience"},
            "library": {"name": "persona"},
        },
    }
    if change["user_id"]:
        event["userId"] = change["user_id"]
    else:
        event["anonymousId"] = change["anonymous_id"] or change["person_id"]
    return event


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 of `timestamp.body` (a receiver checks both)."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def send(dest: Destination, events: list[dict], secret: bytes) -> tuple[bool, bool, str | None]:
    """POST one batch: (delivered, worth retrying, error)."""
    body = json.dumps({"batch": events, "sentAt": now().isoformat() + "Z"}, separators=(",", ":")).encode()
    stamp = str(int(time.time()))
    batch_key = hashlib.sha256("".join(e["messageId"] for e in events).encode()).hexdigest()[:32]
    request = urllib.request.Request(
        dest.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(secret, stamp, body),
            "Idempotency-Key": batch_key,
            "User-Agent": "persona",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=dest.timeout_seconds) as response:  # noqa: S310 (http(s) only: checked)
            response.read()
            return True, False, None
    except urllib.error.HTTPError as exc:
        retry = exc.code >= 500 or exc.code in (408, 425, 429)
        return False, retry, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, True, f"could not reach {dest.url}: {reason}"


def _dead_letter(con: duckdb.DuckDBPyConnection, dest: Destination, batch: list[dict], attempts: int, error: str):
    rows = [
        (
            dest.name,
            c["change_id"],
            idempotency_key(dest.name, c),
            c["audience"],
            c["person_id"],
            c["change"],
            attempts,
            error,
            now(),
        )
        for c in batch
    ]
    con.execute(
        "DELETE FROM destination_dead_letters WHERE destination = ? AND change_id IN (SELECT unnest(?))",
        [dest.name, [c["change_id"] for c in batch]],
    )
    con.executemany("INSERT INTO destination_dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def deliver_webhook(con: duckdb.DuckDBPyConnection, dest: Destination, opts: DeliveryOptions) -> DeliveryReport:
    """Send the destination's pending changes, a batch at a time, in order, within the run's budget."""
    report = DeliveryReport(dest.name, "webhook")
    state = load_state(con, dest.name)
    secret = os.environ.get(dest.secret_env)
    if not secret:
        state.last_error = report.error = f"the signing secret's variable {dest.secret_env} is not set: nothing sent"
        save_state(con, dest, state)
        report.pending = len(pending(con, dest, state.delivered_through))
        return report
    rng, deadline = random.Random(opts.seed), time.monotonic() + opts.budget_seconds
    while time.monotonic() < deadline:
        batch = pending(con, dest, state.delivered_through, dest.batch_size)
        if not batch:
            break
        ok, retry, error = send(dest, [track_event(dest.name, c) for c in batch], secret.encode())
        if ok:
            state.delivered_through, state.pending_attempts = batch[-1]["change_id"], 0
            state.delivered, state.last_success_at = state.delivered + len(batch), now()
            report.delivered += len(batch)
            save_state(con, dest, state)
            continue
        state.attempts_failed, state.pending_attempts, state.last_error = (
            state.attempts_failed + 1,
            state.pending_attempts + 1,
            error,
        )
        report.attempts_failed += 1
        if not retry or state.pending_attempts >= dest.max_attempts:
            with transaction(con):
                _dead_letter(con, dest, batch, state.pending_attempts, error or "failed")
                state.delivered_through, state.pending_attempts = batch[-1]["change_id"], 0
                save_state(con, dest, state)
            report.dead_lettered += len(batch)
            continue
        save_state(con, dest, state)
        delay = min(opts.max_delay, opts.base_delay * 2 ** (state.pending_attempts - 1))
        time.sleep(min(rng.uniform(0, delay), max(0.0, deadline - time.monotonic())))
    report.pending = len(pending(con, dest, state.delivered_through))
    report.error = state.last_error if report.attempts_failed else None
    return report


def redeliver_dead_letters(con: duckdb.DuckDBPyConnection, dest: Destination, opts: DeliveryOptions) -> int:
    """Send a webhook's dead letters again, oldest first, in batches; each batch delivered leaves
    the table. A batch that fails again stays (its attempts counted). Returns how many went."""
    secret = os.environ.get(dest.secret_env)
    if not secret:
        return 0
    sent, deadline = 0, time.monotonic() + opts.budget_seconds
    while time.monotonic() < deadline:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT change_id FROM destination_dead_letters WHERE destination = ? ORDER BY change_id LIMIT ?",
                [dest.name, dest.batch_size],
            ).fetchall()
        ]
        if not ids:
            break
        batch = [c for c in pending(con, dest, ids[0] - 1, None) if c["change_id"] in set(ids)]
        ok, _, error = send(dest, [track_event(dest.name, c) for c in batch], secret.encode())
        if not ok:
            con.execute(
                "UPDATE destination_dead_letters SET attempts = attempts + 1, error = ? "
                "WHERE destination = ? AND change_id IN (SELECT unnest(?))",
                [error, dest.name, ids],
            )
            break
        con.execute(
            "DELETE FROM destination_dead_letters WHERE destination = ? AND change_id IN (SELECT unnest(?))",
            [dest.name, ids],
        )
        sent += len(batch)
    return sent


def deliver_files(
    con: duckdb.DuckDBPyConnection, dest: Destination, definitions: Definitions, home: Path
) -> DeliveryReport:
    """Each audience's members as one file per audience, written aside and renamed into place."""
    folder = Path(dest.folder).expanduser()
    folder = folder if folder.is_absolute() else Path(home) / folder
    folder.mkdir(parents=True, exist_ok=True)
    state = load_state(con, dest.name)
    names = list(dest.audiences or definitions.audiences)
    fmt = "(FORMAT parquet)" if dest.format == "parquet" else "(FORMAT csv, HEADER)"
    for name in names:
        path = folder / f"{name}.{dest.format}"
        tmp = path.with_name(f".{path.name}.tmp")
        con.execute(
            f"""COPY (SELECT m.person_id,
                       (SELECT min(identifier) FROM identity_map i WHERE i.person_id = m.person_id
                        AND i.identifier_type = 'user_id') AS user_id,
                       (SELECT min(identifier) FROM identity_map i WHERE i.person_id = m.person_id
                        AND i.identifier_type = 'anonymous_id') AS anonymous_id, m.entered_at
                     FROM audience_members m WHERE m.audience = $audience ORDER BY m.person_id) TO $path {fmt}""",
            {"audience": name, "path": str(tmp)},
        )
        os.replace(tmp, path)
    through = con.execute("SELECT coalesce(max(change_id), 0) FROM audience_changes").fetchall()[0][0]
    written = len(pending(con, dest, state.delivered_through))
    state.delivered_through, state.delivered = through, state.delivered + written
    state.last_success_at, state.pending_attempts, state.last_error = now(), 0, None
    save_state(con, dest, state)
    return DeliveryReport(dest.name, "file", delivered=written)


def deliver(
    con: duckdb.DuckDBPyConnection,
    definitions: Definitions,
    home: Path,
    opts: DeliveryOptions | None = None,
    redeliver: bool = False,
) -> list[DeliveryReport]:
    """Every destination's pending changes, delivered (destinations no longer defined are left as
    they were); with `redeliver`, webhooks' dead letters are sent again first."""
    ensure_tables(con)
    opts = opts or DeliveryOptions()
    reports = []
    for dest in definitions.destinations.values():
        if dest.kind == "webhook":
            again = redeliver_dead_letters(con, dest, opts) if redeliver else 0
            reports.append(deliver_webhook(con, dest, opts))
            reports[-1].redelivered = again
        else:
            reports.append(deliver_files(con, dest, definitions, home))
    return reports


def lag(con: duckdb.DuckDBPyConnection, definitions: Definitions) -> list[dict]:
    """Each destination's state: delivered, pending changes and the age of the oldest, failures, dead
    letters (read only: on the snapshot too)."""
    out = []
    for dest in definitions.destinations.values():
        state = load_state(con, dest.name)
        waiting = pending(con, dest, state.delivered_through)
        dead = con.execute(
            "SELECT count(*) FROM destination_dead_letters WHERE destination = ?", [dest.name]
        ).fetchall()[0][0]
        oldest = waiting[0]["changed_at"] if waiting else None
        out.append(
            {
                "destination": dest.name,
                "kind": dest.kind,
                "delivered": state.delivered,
                "pending": len(waiting),
                "lag_seconds": round((now() - oldest).total_seconds(), 1) if oldest else 0.0,
                "failed_attempts": state.attempts_failed,
                "dead_letters": dead,
                "last_success_at": state.last_success_at,
                "last_error": state.last_error,
            }
        )
    return out
