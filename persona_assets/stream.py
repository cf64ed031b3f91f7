"""Real-time profiles: a Redis Streams consumer that keeps a hot profile per person.

Each batch read from the consumer group is validated against the same contract as a landing
file: plain events are typed in Python (`core.plain`, which accepts only what the contract
query accepts), the rest by the query itself (`ingest.query_lines`, on a thread of its own so
plain events flow meanwhile) a few times a second;
bad events go to the quarantine stream with their reason. A good
event is resolved to a person with the identity map loaded from the serving snapshot (an
unknown anonymousId gets a provisional id until the next batch stitch), then applied to
that person's hot profile by one Lua script that first adds the messageId to a processed
set: applying twice is impossible, so a re-delivery after a crash never double counts.
The category scores use the batch formula (`affinity.decayed_update`): kept as of one
reference time per person (newer events add in scaled up; the reference moves on after 20
half-lives) and decayed forward when read.

Consumed events are also written to landing as Parquet (every `flush_seconds` or
`flush_events`), and only then acknowledged: a consumer killed before a flush leaves its
entries pending, and the next consumer claims and replays them (the processed set makes
the replay harmless for the hot profile; ingest keeps one copy of each messageId).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import duckdb

from persona_assets.core.affinity import AffinityOptions, decay_to, shrunk_top
from persona_assets.core.erasure import ErasureReport, EventMatcher, contact_hashes, erasure_hash, event_identifiers
from persona_assets.core.events import FIELDS, NUMERIC_FLAT_COLUMNS
from persona_assets.core.ingest import contract_params, query_lines
from persona_assets.core.plain import plain_rows

STREAM = "persona:events"
GROUP = "persona"
QUARANTINE = "persona:quarantine"
SEEN = "persona:seen"
PROVISIONAL = "persona:provisional"  # anonymousId -> provisional person id, until a batch stitches it
IDS = {"user_id": "persona:ids:user", "anonymous_id": "persona:ids:anon"}
ERASED = "persona:erased"  # keyed erasure hashes of forgotten identifiers: their events are dropped
DECLINED = "persona:declined"  # people who declined personalization: counted, never profiled
PROVISIONAL_PREFIX = "t"
REDIS_ENV = "PERSONA_REDIS_URL"
KINDS = {"Product Viewed": "view", "Product Added": "add_to_cart", "Order Completed": "purchase"}


def hot_key(person_id: str) -> str:
    return f"persona:hot:{person_id}"


def scores_key(person_id: str) -> str:
    return f"persona:hot:{person_id}:scores"


# One call applies a whole batch, atomically. KEYS: the processed set, then per event its
# hot hash and scores hash. ARGV: half-life seconds, session gap seconds, then per event:
# message id, epoch seconds, is_order, revenue, n pairs, then n (category, weight) pairs.
# Returns, per event, 1 (applied) or 0 (already applied before).
APPLY = """
local half, gap = tonumber(ARGV[1]), tonumber(ARGV[2])
local done, a = {}, 3
for e = 1, (#KEYS - 1) / 2 do
  local hot, scores = KEYS[2 * e], KEYS[2 * e + 1]
  local id, at, is_order, revenue, pairs = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local first = a + 5
  a = first + 2 * pairs
  if redis.call('SADD', KEYS[1], id) == 0 then
    done[e] = 0
  else
    done[e] = 1
    local t = tonumber(at)
    -- one read of the profile's times, one write of what moves (calls are most of the cost)
    local h = redis.call('HMGET', hot, 'last_seen', 'last_order', 'session_start', 'session_last', 'scores_at')
    local set = {}
    redis.call('HINCRBY', hot, 'events', 1)
    if t > tonumber(h[1] or '-1e300') then set[#set + 1] = 'last_seen'; set[#set + 1] = at end
    if is_order == '1' then
      redis.call('HINCRBY', hot, 'orders', 1)
      redis.call('HINCRBYFLOAT', hot, 'revenue', revenue)
      if t > tonumber(h[2] or '-1e300') then set[#set + 1] = 'last_order'; set[#set + 1] = at end
    end
    local s_start = tonumber(h[3] or '-1e300')
    local s_last = tonumber(h[4] or '-1e300')
    if t > s_last + gap then
      for _, v in ipairs({'session_start', at, 'session_last', at, 'session_events', '1'}) do set[#set + 1] = v end
    else
      redis.call('HINCRBY', hot, 'session_events', 1)
      if t > s_last then set[#set + 1] = 'session_last'; set[#set + 1] = at end
      if t < s_start then set[#set + 1] = 'session_start'; set[#set + 1] = at end
    end
    if pairs > 0 then
      -- Scores stay valued at one reference time and newer events add in scaled up, so an
      -- event does not rewrite every category; the reference moves on only when the scale
      -- factor would pass 2^20 (about 20 half-lives), to keep the numbers bounded.
      local ref = tonumber(h[5] or at)
      if t - ref > 20 * half then
        local f = 2 ^ (-(t - ref) / half)
        local all = redis.call('HGETALL', scores)
        for i = 1, #all, 2 do
          redis.call('HSET', scores, all[i], string.format('%.17g', tonumber(all[i + 1]) * f))
        end
        ref = t
      end
      set[#set + 1] = 'scores_at'; set[#set + 1] = string.format('%.17g', ref)
      for i = first, first + 2 * pairs - 1, 2 do
        local w = tonumber(ARGV[i + 1]) * 2 ^ (-(ref - t) / half)
        local old = tonumber(redis.call('HGET', scores, ARGV[i]) or '0')
        redis.call('HSET', scores, ARGV[i], string.format('%.17g', old + w))
      end
    end
    if #set > 0 then redis.call('HSET', hot, unpack(set)) end
  end
end
return done
"""


class EventSource(Protocol):
    """Where events come from. Redis Streams is the shipped one; another broker implements this."""

    def read(self, count: int, block_ms: int) -> list[tuple[str, bytes]]: ...  # (entry id, JSON line)

    def ack(self, entry_ids: list[str]) -> None: ...

    def quarantine(self, entry_id: str, line: str, reason: str, detail: str | None) -> None: ...


class RedisStreamSource:
    """A consumer in the `persona` group of the `persona:events` stream.

    It first re-reads its own pending entries (from before a restart), then claims entries
    left pending by consumers that died (idle longer than `claim_idle_ms`), then reads new ones.
    """

    def __init__(self, client, consumer: str, claim_idle_ms: int = 30_000) -> None:
        self.redis, self.consumer, self.claim_idle_ms = client, consumer, claim_idle_ms
        try:
            client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise
        self._own_pending: str | None = "0"
        self._claim_cursor, self._next_claim = "0-0", 0.0
        self.held: set[str] = set()  # read and not yet acknowledged: never claimed back from ourselves

    def read(self, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        if self._own_pending is not None:  # entries this consumer had before it restarted
            entries = self._entries(
                self.redis.xreadgroup(GROUP, self.consumer, {STREAM: self._own_pending}, count=count)
            )
            if entries:
                self._own_pending = entries[-1][0]
                return self._hold(entries)
            self._own_pending = None
        if time.monotonic() >= self._next_claim:
            # One pass over the group's pending entries, a page at a time, then a pause.
            cursor, claimed, *_ = self.redis.xautoclaim(
                STREAM, GROUP, self.consumer, self.claim_idle_ms, self._claim_cursor, count=count
            )
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            if self._claim_cursor == "0-0":
                self._next_claim = time.monotonic() + max(self.claim_idle_ms / 1000, 1.0)
            fresh = [(i.decode(), f[b"event"]) for i, f in claimed if f and i.decode() not in self.held]
            if fresh:
                return self._hold(fresh)
        return self._hold(
            self._entries(self.redis.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=count, block=block_ms))
        )

    def _hold(self, entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        self.held.update(i for i, _ in entries)
        return entries

    @staticmethod
    def _entries(reply) -> list[tuple[str, bytes]]:
        return [(i.decode(), f[b"event"]) for _, items in reply or [] for i, f in items if f]

    def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.redis.xack(STREAM, GROUP, *entry_ids)
            self.held.difference_update(entry_ids)

    def quarantine(self, entry_id: str, line: str, reason: str, detail: str | None) -> None:
        self.redis.xadd(QUARANTINE, {"entry": entry_id, "reason": reason, "detail": detail or "", "event": line})


def load_identity(client, snapshot: Path) -> int:
    """identity_map's userId and anonymousId rows from the serving snapshot into Redis."""
    from persona_assets.core.publish import open_snapshot

    with open_snapshot(snapshot) as con:
        rows = con.execute(
            "SELECT identifier_type, identifier, person_id FROM identity_map "
            "WHERE identifier_type IN ('user_id', 'anonymous_id')"
        ).fetchall()
    pipe = client.pipeline(transaction=False)
    for kind, key in IDS.items():
        pipe.delete(key + ":next")
        mapping = {identifier: person for t, identifier, person in rows if t == kind}
        items = list(mapping.items())
        for start in range(0, len(items), 10_000):
            pipe.hset(key + ":next", mapping=dict(items[start : start + 10_000]))
        pipe.hset(key + ":next", "__loaded__", "1")
        pipe.rename(key + ":next", key)
    pipe.execute()
    return len(rows)


def stitch_provisional(client, opts: AffinityOptions | None = None) -> int:
    """Move each provisional hot profile whose anonymousId the batch now knows onto the real
    person: counters add, times take the later, category scores add at a common time."""
    opts = opts or AffinityOptions()
    half = opts.half_life_days * 86400
    moved = 0
    for key, provisional in client.hgetall(PROVISIONAL).items():
        key, provisional = key.decode(), provisional.decode()
        real = client.hget(IDS["anonymous_id"], key) or client.hget(IDS["user_id"], key)
        if real is None:
            continue
        real = real.decode()
        src = {k.decode(): v.decode() for k, v in client.hgetall(hot_key(provisional)).items()}
        dst = {k.decode(): v.decode() for k, v in client.hgetall(hot_key(real)).items()}
        merged = dict(dst)
        for name in ("events", "orders", "session_events"):
            merged[name] = str(int(dst.get(name, 0)) + int(src.get(name, 0)))
        merged["revenue"] = repr(float(dst.get("revenue", 0.0)) + float(src.get("revenue", 0.0)))
        for name in ("last_seen", "last_order", "session_last", "scores_at"):
            values = [float(v[name]) for v in (src, dst) if name in v]
            if values:
                merged[name] = repr(max(values))
        if "session_start" in src or "session_start" in dst:
            merged["session_start"] = repr(min(float(v["session_start"]) for v in (src, dst) if "session_start" in v))
        scores: dict[str, float] = {}
        at = float(merged.get("scores_at", 0.0))
        for hot, name in ((src, provisional), (dst, real)):
            for category, score in client.hgetall(scores_key(name)).items():
                shift = at - float(hot.get("scores_at", at))
                scores[category.decode()] = scores.get(category.decode(), 0.0) + float(score) * 2 ** (-shift / half)
        pipe = client.pipeline(transaction=True)
        pipe.hset(hot_key(real), mapping=merged)
        if scores:
            pipe.hset(scores_key(real), mapping={c: repr(v) for c, v in scores.items()})
        pipe.delete(hot_key(provisional), scores_key(provisional))
        pipe.hdel(PROVISIONAL, key)
        pipe.execute()
        moved += 1
    return moved


def provisional_id(anonymous_id: str) -> str:
    import hashlib

    return PROVISIONAL_PREFIX + hashlib.sha256(anonymous_id.encode()).hexdigest()[:16]


@dataclass
class ConsumerOptions:
    batch: int = 1000
    block_ms: int = 200
    flush_seconds: float = 10.0
    flush_events: int = 50_000
    # Lines the plain check leaves to the contract query (malformed or unusual ones, about 1%)
    # wait at most this long, or until the stream goes quiet, so a busy consumer plans that
    # query a few times a second instead of in every other batch.
    query_seconds: float = 0.5
    session_gap_minutes: float = 30.0
    claim_idle_ms: int = 30_000
    affinity: AffinityOptions = field(default_factory=AffinityOptions)


@dataclass
class Consumer:
    """Reads, validates, resolves, applies and flushes; `step()` handles one batch."""

    client: object
    source: EventSource
    landing: Path
    opts: ConsumerOptions = field(default_factory=ConsumerOptions)
    key: bytes | None = None  # the hash key, to recognise erased identifiers (loaded from PERSONA_HOME if None)
    applied: int = 0
    skipped: int = 0
    quarantined: int = 0
    suppressed: int = 0  # events of erased people: acknowledged, never applied or written
    not_profiled: int = 0  # events of people who declined personalization: written for counts only
    # The newest events' milliseconds from XADD to applied (bounded: the consumer runs for days).
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1_000_000))
    _buffer: list[str] = field(default_factory=list)
    _buffer_ids: list[str] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)
    _unplain: list[tuple[str, str, bool]] = field(default_factory=list)  # (entry id, line, bad utf-8)
    _unplain_since: float = 0.0
    _checking: tuple[list[tuple[str, str, bool]], Future] | None = None  # lines in the contract query now
    _pending: Future | None = None
    # stream_audiences.LiveAudiences: the audiences decided per event (None: none defined)
    audiences: object | None = None

    @property
    def handled(self) -> int:
        return self.applied + self.skipped + self.quarantined + self.suppressed + self.not_profiled

    def __post_init__(self) -> None:
        # Batches are small: planning the validation query is most of its cost, and the optimizer's
        # share of it (a third) buys nothing on a few hundred rows, nor do extra threads.
        self.con = duckdb.connect(config={"threads": 1})
        self.con.execute("PRAGMA disable_optimizer")
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        # The contract query runs on its own thread (DuckDB lets go of the GIL while it plans and
        # runs), so plain events keep flowing meanwhile: run inline, its 20-40 ms (measured at
        # 2,000 events/s) held up every event that arrived during it.
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contract")
        # The flush thread's own connection, opened here: opening one holds the GIL for 20-30 ms,
        # and one thread leaves the other core to the events.
        self._flush_con = duckdb.connect(config={"threads": 1})
        self.apply = self.client.register_script(APPLY)
        # Warm up before the first event: the first validation query and the script load
        # would otherwise stall the first batch by half a second.
        self.client.script_load(APPLY)
        query_lines(self.con, ['{"type":"track","event":"warm-up","anonymousId":"x"}'], contract_params(), [False])
        # Everything imported so far lives as long as the process: out of the collector's sight,
        # a full collection no longer walks it (that walk took 140 ms in the middle of a batch).
        gc.collect()
        gc.freeze()

    def step(self) -> int:
        entries = self.source.read(self.opts.batch, self.opts.block_ms)
        if entries:
            self._handle(entries)
        elif self.audiences is not None and self.audiences.due:
            self.audiences.apply([])  # windows the last batch's clock ended, while the stream is quiet
        # A busy stream leaves the contract query to its thread; a quiet one waits for its verdicts.
        quiet = not entries
        if self._checking is not None and (quiet or self._checking[1].done()):
            self._settle_unplain()
        if (
            self._unplain
            and self._checking is None
            and (quiet or time.monotonic() - self._unplain_since >= self.opts.query_seconds)
        ):
            self._query_unplain(wait=quiet)
        if self._buffer_ids and (
            len(self._buffer_ids) >= self.opts.flush_events
            or time.monotonic() - self._last_flush >= self.opts.flush_seconds
        ):
            self.flush(wait=False)
        return len(entries)

    def _handle(self, raw_entries: list[tuple[str, bytes]]) -> None:
        """Plain events are applied now; the others wait for the contract query."""
        entries, bad_utf8 = [], []
        for entry_id, data in raw_entries:
            try:
                entries.append((entry_id, data.decode("utf-8")))
                bad_utf8.append(False)
            except UnicodeDecodeError:  # kept with replacement characters, for the quarantine's raw text
                entries.append((entry_id, data.decode("utf-8", errors="replace")))
                bad_utf8.append(True)
        rows = plain_rows([line for _, line in entries], contract_params(), bad_utf8)
        if not self._unplain:
            self._unplain_since = time.monotonic()
        self._unplain += [(i, line, bad) for (i, line), row, bad in zip(entries, rows, bad_utf8) if row is None]
        self._apply([(e, row) for e, row in zip(entries, rows) if row is not None])

    def _query_unplain(self, wait: bool = True) -> None:
        """Send the waiting lines through the contract query; with `wait`, settle them (and any
        lines already in it) before returning."""
        if self._checking is not None:
            self._settle_unplain()
        if self._unplain:
            waiting, self._unplain = self._unplain, []
            lines, bad_utf8 = [line for _, line, _ in waiting], [b for _, _, b in waiting]
            self._checking = (waiting, self._checker.submit(query_lines, self.con, lines, contract_params(), bad_utf8))
        if wait and self._checking is not None:
            self._settle_unplain()

    def _settle_unplain(self) -> None:
        """Apply the contract query's verdicts (waiting for them if need be)."""
        waiting, future = self._checking
        self._checking = None
        rows = future.result()
        self._apply([((i, line), row) for (i, line, _), row in zip(waiting, rows)])

    def _apply(self, checked: list[tuple[tuple[str, str], dict]]) -> None:
        """Quarantine the bad, resolve and apply the good, in one Lua call; buffer all for the flush."""
        if not checked:
            return
        entries, rows = [e for e, _ in checked], [r for _, r in checked]
        people = self._resolve(rows)
        actions = self._privacy(rows, people)
        keys, args = [SEEN], [repr(self.opts.affinity.half_life_days * 86400), repr(self.opts.session_gap_minutes * 60)]
        good: list[tuple[str, str]] = []
        good_rows: list[tuple[str, dict]] = []
        for (entry_id, line), row, person, action in zip(entries, rows, people, actions):
            if action == "drop":
                self.suppressed += 1
                self._buffer_ids.append(entry_id)
                continue
            if row["reason"] is not None:
                self.source.quarantine(entry_id, line, row["reason"], row["detail"])
                self.quarantined += 1
                self._buffer_ids.append(entry_id)  # acknowledged with the next flush: it is handled
                continue
            if action == "count":
                self.not_profiled += 1
                self._buffer.append(line)
                self._buffer_ids.append(entry_id)
                continue
            pairs = _interactions(row)
            keys += [hot_key(person), scores_key(person)]
            args += [
                row["message_id"],
                repr(row["event_at"].replace(tzinfo=UTC).timestamp()),
                "1" if row["event_name"] == "Order Completed" else "0",
                repr(row["revenue"] or 0.0),
                str(len(pairs)),
            ]
            for category, kind in pairs:
                args += [category, repr(self.opts.affinity.weight(kind))]
            good.append((entry_id, line))
            good_rows.append((person, row))
        results = self.apply(keys=keys, args=args) if good else []
        if self.audiences is not None:
            self.audiences.tick([r for r, a in zip(rows, actions) if r["reason"] is None and a != "drop"])
            self.audiences.apply([pr for pr, done in zip(good_rows, results) if done])
        now_ms = time.time() * 1000
        for (entry_id, line), done in zip(good, results):
            self.applied += int(done)
            self.skipped += int(not done)
            if done:  # an entry id starts with the millisecond Redis added it
                self.latencies.append(now_ms - int(entry_id.split("-")[0]))
            self._buffer.append(line)
            self._buffer_ids.append(entry_id)

    def _hash_key(self) -> bytes:
        """The hash key, read when the first erased identifier needs checking."""
        if self.key is None:
            from persona_assets.core.pii import load_key
            from persona_assets.settings import persona_home

            self.key = load_key(persona_home())
        return self.key

    def _identifiers(self, row: dict) -> list[str]:
        """A validated row's identifiers in identity_map form (email and phone hashed)."""
        found = [row[c] for c in ("user_id", "anonymous_id", "previous_id") if row.get(c)]
        return found + contact_hashes(self._hash_key(), row.get("email"), row.get("phone"), row.get("locale"))

    def _privacy(self, rows: list[dict], people: list[str]) -> list[str]:
        """Per row: 'apply', 'count' (declined personalization: written to landing, no hot profile)
        or 'drop' (an erased person's event, until one comes with consent granted)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(ERASED)
        pipe.smismember(DECLINED, people) if people else pipe.exists(DECLINED)
        erased_any, declined = pipe.execute()
        declined = declined if people else [0] * len(rows)
        actions = ["apply"] * len(rows)
        if erased_any:
            hashes = [[erasure_hash(self._hash_key(), i) for i in self._identifiers(row)] for row in rows]
            flat = [h for hs in hashes for h in hs]
            hits = dict(zip(flat, self.client.smismember(ERASED, flat))) if flat else {}
            for i, (row, hs) in enumerate(zip(rows, hashes)):
                if any(hits.get(h) for h in hs):
                    if row["reason"] is None and row["consent"] == "granted":
                        self.client.srem(ERASED, *hs)  # back with consent: suppression lifts from here on
                    else:
                        actions[i] = "drop"
        state = {p: bool(d) for p, d in zip(people, declined)}  # declined as of each event, in order
        for i, (row, person) in enumerate(zip(rows, people)):
            if actions[i] == "drop" or row["reason"] is not None:
                continue
            if row["consent"] in ("declined", "granted"):
                state[person] = row["consent"] == "declined"
            if state[person]:
                actions[i] = "count"
        for person, was in dict(zip(people, declined)).items():
            if state[person] and not was:
                # Declined in this batch: none of this batch's events are applied, the profile goes.
                self.client.sadd(DECLINED, person)
                self.client.delete(hot_key(person), scores_key(person))
                if self.audiences is not None:
                    from persona_assets.stream_audiences import drop_person

                    drop_person(self.client, person)
                actions = ["count" if p == person and a == "apply" else a for a, p in zip(actions, people)]
            elif was and not state[person]:
                self.client.srem(DECLINED, person)
        return actions

    def _resolve(self, rows: list[dict]) -> list[str]:
        """A userId's person, else the anonymousId's, else a provisional id for the anonymousId."""
        by_user, by_anon = [], []
        if rows:  # one round trip for both maps
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(IDS["user_id"], [row["user_id"] or "" for row in rows])
            pipe.hmget(IDS["anonymous_id"], [row["anonymous_id"] or "" for row in rows])
            by_user, by_anon = pipe.execute()
        people = []
        for row, user, anon in zip(rows, by_user, by_anon):
            person = user or anon
            if person is not None:
                people.append(person.decode())
            else:
                key = row["anonymous_id"] or row["user_id"] or row["message_id"]
                people.append(provisional_id(key))
                if row["reason"] is None:
                    self.client.hset(PROVISIONAL, key, people[-1])
        return people

    def flush(self, wait: bool = True) -> None:
        """Write the consumed events to landing as one Parquet file, then acknowledge them.

        In the loop this runs on a background thread (its own DuckDB connection; DuckDB and
        the socket wait release the GIL), so events keep flowing to hot profiles meanwhile.
        Flushes stay in order, and the last one is waited for when the consumer stops (which
        first settles the lines waiting for the contract query)."""
        if wait and (self._unplain or self._checking is not None):
            self._query_unplain()
        if self.audiences is not None:
            # Windows the clock ended, for people who did nothing: those due at a periodic flush
            # (each batch decides up to a hundred of them too); everyone at the last.
            self.audiences.sweep() if wait else self.audiences.expire()
        lines, ids = self._buffer, self._buffer_ids
        self._buffer, self._buffer_ids = [], []
        self._last_flush = time.monotonic()
        if self._pending is not None:
            self._pending.result()  # the previous flush first; its error, if any, surfaces here
            self._pending = None
        if wait:
            self._write_and_ack(lines, ids)
        elif lines or ids:
            self._pending = self._flusher.submit(self._write_and_ack, lines, ids)

    def _write_and_ack(self, lines: list[str], ids: list[str]) -> None:
        if lines and self.client.exists(ERASED):
            lines = self._not_erased(lines)  # people forgotten while their events waited here
        if lines:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            self.landing.mkdir(parents=True, exist_ok=True)
            write_flat_parquet(self._flush_con, lines, self.landing / f"stream-{stamp}-{uuid.uuid4().hex[:6]}.parquet")
        self.source.ack(ids)

    def _not_erased(self, lines: list[str]) -> list[str]:
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({})
        key = self._hash_key()
        hashes = [
            [erasure_hash(key, i) for i in event_identifiers(e, key)] if isinstance(e, dict) else [] for e in events
        ]
        flat = [h for hs in hashes for h in hs]
        hits = dict(zip(flat, self.client.smismember(ERASED, flat))) if flat else {}
        return [line for line, hs in zip(lines, hashes) if not any(hits.get(h) for h in hs)]


def forget(client, key: bytes, report: ErasureReport, page: int = 1000) -> dict[str, int]:
    """Erase a person from Redis: mark their identifiers erased (the consumer drops their events
    from now on), delete their hot profiles and id mappings, their entries in the event and
    quarantine streams (pending ones too) and their processed messageIds; then rewrite the
    append-only file so no old copy of them stays on disk."""
    counts = {"erased_ids": len(report.erasure_hashes), "hot_keys": 0, "stream_entries": 0, "seen": 0}
    if report.erasure_hashes:
        client.sadd(ERASED, *report.erasure_hashes)
    doomed = [*report.people]
    for raw in report.raw_ids:
        provisional = client.hget(PROVISIONAL, raw)
        doomed += [provisional.decode()] if provisional else []
        doomed.append(provisional_id(raw))
        client.hdel(PROVISIONAL, raw)
        for mapping in IDS.values():
            client.hdel(mapping, raw)
    from persona_assets.stream_audiences import drop_person

    for person in doomed:
        counts["hot_keys"] += client.delete(hot_key(person), scores_key(person))
        client.srem(DECLINED, person)
        drop_person(client, person)  # their event windows and audience memberships
    for start in range(0, len(report.message_ids), 10_000):
        counts["seen"] += client.srem(SEEN, *report.message_ids[start : start + 10_000])
    matcher = EventMatcher(report, key, gmail_rules=True)
    for stream in (STREAM, QUARANTINE):
        cursor = "-"
        while True:
            entries = client.xrange(stream, min=cursor, max="+", count=page)
            theirs = [i for i, fields in entries if matcher.json_line(fields.get(b"event", b""))]
            if theirs:
                if stream == STREAM:
                    client.xack(STREAM, GROUP, *theirs)
                counts["stream_entries"] += client.xdel(stream, *theirs)
            if len(entries) < page:
                break
            last = entries[-1][0].decode()
            cursor = "(" + last
    if client.config_get("appendonly").get("appendonly") == "yes":
        _rewrite_aof(client)
    return counts


def _rewrite_aof(client, timeout: float = 60.0) -> None:
    """BGREWRITEAOF and wait for it: the old append-only file (with every command ever run) goes."""
    deadline = time.monotonic() + timeout
    while client.info("persistence").get("aof_rewrite_in_progress"):
        time.sleep(0.05)  # one already running started before the erasure: wait, then start ours
    client.bgrewriteaof()
    time.sleep(0.05)
    while True:
        info = client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("Redis did not finish rewriting its append-only file in time")
        time.sleep(0.05)


def write_flat_parquet(con: duckdb.DuckDBPyConnection, lines: list[str], path: Path) -> None:
    """JSON events as a Parquet landing file with the flat columns ingest reads (numbers typed,
    products as JSON text), written aside and renamed into place."""
    import pyarrow as pa

    paths = [(json_path, flat, f.kind) for f in FIELDS for json_path, flat in zip(f.paths, f.flats)]
    columns = []  # one parse per line: every path extracted at once, then picked by position
    for i, (json_path, flat, kind) in enumerate(paths, start=1):
        value = f"v[{i}]"
        if flat in NUMERIC_FLAT_COLUMNS:
            value = f"TRY_CAST({value} AS {NUMERIC_FLAT_COLUMNS[flat]})"
        elif kind == "json":
            value = f"json_extract(raw, '{json_path}')::VARCHAR"
        columns.append(f'{value} AS "{flat}"')
    extract = f"json_extract_string(raw, [{', '.join(repr(p) for p, _, _ in paths)}])"
    con.register("_flush_lines", pa.table({"raw": pa.array(lines, pa.large_string())}))
    tmp = path.with_name(path.name + ".part")
    try:
        con.execute(
            f"COPY (SELECT {', '.join(columns)} FROM (SELECT raw, {extract} AS v FROM _flush_lines)) "
            "TO $path (FORMAT parquet)",
            {"path": str(tmp)},
        )
    finally:
        con.unregister("_flush_lines")
    tmp.rename(path)


def _interactions(row: dict) -> list[tuple[str, str]]:
    """(category, kind) of each product interaction in an event, as the batch counts them."""
    kind = KINDS.get(row["event_name"] or "")
    if kind in ("view", "add_to_cart"):
        return [(row["category"], kind)] if row["category"] else []
    if kind == "purchase" and row["products"]:
        try:
            items = json.loads(row["products"])
        except ValueError:
            return []
        return [(i["category"], "purchase") for i in items if isinstance(i, dict) and i.get("category")]
    return []


def hot_profile(
    client,
    person_id: str,
    as_of: datetime | None = None,
    opts: AffinityOptions | None = None,
    prior: dict[str, float] | None = None,
) -> dict:
    """A person's hot profile, with category scores decayed to `as_of` (default now).

    The scores are the batch's `category_affinity` to 1e-9. The top category is the batch's
    formula too (`affinity.shrunk_top`): scores plus `prior`, the person's segment's
    pseudo-scores (`affinity.segment_priors` on the serving snapshot). Without a prior it is
    the person's own highest score: a segment is a batch fit, so a prior cannot be refitted
    per event, and the consumer does not load one."""
    opts = opts or AffinityOptions()
    raw = {k.decode(): v.decode() for k, v in client.hgetall(hot_key(person_id)).items()}
    if not raw:
        return {}
    scores = {k.decode(): float(v) for k, v in client.hgetall(scores_key(person_id)).items()}
    at = (as_of or datetime.now(UTC)).replace(tzinfo=UTC).timestamp()
    scores_at = float(raw.get("scores_at", at))
    affinity = {c: decay_to(s, at - scores_at, opts) for c, s in sorted(scores.items())}

    def moment(key: str):
        return datetime.fromtimestamp(float(raw[key]), UTC).replace(tzinfo=None) if key in raw else None

    last_order = moment("last_order")
    return {
        "person_id": person_id,
        "events": int(raw.get("events", 0)),
        "orders": int(raw.get("orders", 0)),
        "revenue": float(raw.get("revenue", 0.0)),
        "last_seen_at": moment("last_seen"),
        "last_order_at": last_order,
        "days_since_last_order": (at - float(raw["last_order"])) / 86400 if last_order else None,
        "session_started_at": moment("session_start"),
        "session_events": int(raw.get("session_events", 0)),
        "category_affinity": affinity,
        "top_category": shrunk_top(affinity, prior),
    }


def redis_url(home: Path | None = None) -> str:
    """PERSONA_REDIS_URL, else the server `persona stream --start-redis` started for this
    PERSONA_HOME, else Redis's default port on loopback."""
    if os.environ.get(REDIS_ENV):
        return os.environ[REDIS_ENV]
    if home is not None and (home / "redis" / "url").exists():
        return (home / "redis" / "url").read_text().strip()
    return "redis://127.0.0.1:6379/0"


def connect(url: str | None = None):
    import redis

    from persona_assets.settings import persona_home

    return redis.Redis.from_url(url or redis_url(persona_home()))


def start_redis(folder: Path, timeout: float = 20.0) -> tuple[subprocess.Popen, str]:
    """Debian's redis-server on a free loopback port, its files in `folder`; returns (process, url)."""
    import shutil
    import socket

    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        raise RuntimeError("redis-server is not installed: apt-get install redis-server (make stream does it as root)")
    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client, deadline = connect(url), time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return server, url
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


def run(
    client,
    landing: Path,
    snapshot: Path,
    consumer: str,
    opts: ConsumerOptions,
    reload_seconds: float = 60.0,
    max_events: int | None = None,
    audiences=None,
) -> Consumer:
    """Consume until SIGTERM/SIGINT (or `max_events`), reloading the identity map when the
    snapshot changes; flushes before it stops. `audiences` (stream_audiences.LiveAudiences):
    audiences decided per event."""
    source = RedisStreamSource(client, consumer, opts.claim_idle_ms)
    worker = Consumer(client, source, landing, opts, audiences=audiences)
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    loaded_mtime, last_check = None, -math.inf
    while not stop and (max_events is None or worker.handled < max_events):
        if time.monotonic() - last_check > reload_seconds and snapshot.exists():
            last_check = time.monotonic()
            if snapshot.stat().st_mtime != loaded_mtime:
                loaded_mtime = snapshot.stat().st_mtime
                load_identity(client, snapshot)
                stitch_provisional(client, opts.affinity)
        worker.step()
    worker.flush()
    return worker


def publish(client, path: Path, rate: float | None = None, limit: int | None = None) -> int:
    """Push a JSON-lines landing file's lines to the stream, at most `rate` per second."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    sent, started = 0, time.monotonic()
    pipe = client.pipeline(transaction=False)
    with opener(path, "rb") as fh:
        for line in fh:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            pipe.xadd(STREAM, {"event": line})
            sent += 1
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    pipe.execute()
                    time.sleep(ahead)
            elif sent % 1000 == 0:
                pipe.execute()
            if limit and sent >= limit:
                break
    pipe.execute()
    return sent
