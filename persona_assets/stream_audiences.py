"""Audiences in real time: the stream consumer decides, for each event, the audiences it can
decide from the hot profile and the event windows it keeps, and emits each entry and exit.

An audience is decided live when every condition in it is one of: an event condition (a
count, within a window or not, with property filters), a computed trait of kind count, a
trait condition on a live field of the hot profile (order_count, event_count,
total_revenue), or another audience decided live, under all / any / not. The others
(segments, imputed traits, affinity) wait for the next batch run.

Per person and counted condition, the consumer keeps the events that count in a window as a
sorted set (messageId by event time), pruned as the data's clock (the newest event time seen)
moves; counts without a window are counters, applied once per event as the hot profile is
(the processed set). Members are a Redis set per audience; entries and exits go to the
`persona:audience_changes` stream. The clock moving also ends windows of people who did
nothing: `sweep` re-evaluates people with live state, a slice at each periodic flush (a
rolling pass) and everyone at the consumer's last flush.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from persona_assets.core.audience_definitions import Definitions, Filter, Leaf, Node, TraitSpec, leaves

CLOCK = "persona:audience_clock"  # the newest event time applied (epoch seconds)
CHANGES = "persona:audience_changes"
PEOPLE = "persona:audience_people"  # everyone with live audience state
LIVE_FIELDS = {"order_count": ("orders", int), "event_count": ("events", int), "total_revenue": ("revenue", float)}


def members_key(audience: str) -> str:
    return f"persona:audience:{audience}"


def window_key(person: str, trait: str) -> str:
    return f"persona:hot:{person}:win:{trait}"


def counts_key(person: str) -> str:
    return f"persona:hot:{person}:counts"


def decidable(definitions: Definitions, node) -> bool:
    """Whether the consumer can decide a condition from the hot profile and its windows."""
    if isinstance(node, Node):
        return all(decidable(definitions, item) for item in node.items)
    if node.kind == "event":
        return True
    if node.kind == "computed":
        return definitions.all_traits[node.subject].kind == "count" and node.op != "exists"
    if node.kind == "profile":
        return node.subject in LIVE_FIELDS
    if node.kind == "audience":
        return decidable(definitions, definitions.audiences[node.subject].where)
    return False


def _matches(f: Filter, row: dict) -> bool:
    value = row.get(f.property)
    if f.op == "exists":
        return (value is not None) == bool(f.value)
    if value is None:
        return False
    if f.op == "eq":
        return value == f.value
    if f.op == "in":
        return value in f.value
    return {"gte": value >= f.value, "lte": value <= f.value, "gt": value > f.value, "lt": value < f.value}[f.op]


def counts(spec: TraitSpec, row: dict) -> bool:
    """Whether an event counts for a count trait (its name and property filters; the window is the clock's)."""
    return (spec.event is None or row["event_name"] == spec.event) and all(_matches(f, row) for f in spec.where)


def _compare(op: str, value, wanted) -> bool:
    if value is None:
        return False
    if op == "in":
        return value in wanted
    return {"eq": value == wanted, "gte": value >= wanted, "lte": value <= wanted, "gt": value > wanted,
            "lt": value < wanted, "exists": True}[op]  # fmt: skip


@dataclass
class LiveAudiences:
    """The audiences decided live, their counted conditions, and the changes they emit."""

    client: object
    definitions: Definitions
    emitted: int = 0
    audiences: list[str] = field(default_factory=list)
    specs: dict[str, TraitSpec] = field(default_factory=dict)
    _cursor: int = 0  # where the rolling sweep goes on
    clock: float = float("-inf")  # the data's clock: the newest valid event's time (epoch seconds)
    _dirty: bool = False  # the clock moved since it was last written to Redis

    def __post_init__(self) -> None:
        self.audiences = [n for n, a in self.definitions.audiences.items() if decidable(self.definitions, a.where)]
        for name in self.audiences:
            for leaf in leaves(self.definitions.audiences[name].where):
                if leaf.kind in ("event", "computed"):
                    self.specs[leaf.subject] = self.definitions.all_traits[leaf.subject]
        self._windowed = [n for n, s in self.specs.items() if s.within_days]
        # The clock only moves forward, whichever consumer saw the newer event.
        self._advance = self.client.register_script(
            "local c = tonumber(redis.call('GET', KEYS[1]) or '-1e300') "
            "if tonumber(ARGV[1]) > c then redis.call('SET', KEYS[1], ARGV[1]) end return 1"
        )
        self._read_clock()

    def _read_clock(self) -> None:
        """Take on the clock in Redis when it is ahead (another consumer, or before a restart)."""
        if self.audiences:
            stored = self.client.get(CLOCK)
            self.clock = max(self.clock, float(stored)) if stored is not None else self.clock

    def observe(self, applied: list[tuple[str, dict]]) -> set[str]:
        """Count each newly applied (person, row) event in the windows and counters it belongs to;
        returns the people touched."""
        if not self.audiences or not applied:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for person, row in applied:
            at = _utc(row["event_at"])
            for name, spec in self.specs.items():
                if not counts(spec, row):
                    continue
                if spec.within_days:
                    pipe.zadd(window_key(person, name), {row["message_id"]: at})
                else:
                    pipe.hincrby(counts_key(person), name, 1)
            pipe.sadd(PEOPLE, person)
        pipe.execute()
        return {person for person, _ in applied}

    def tick(self, rows: list[dict]) -> None:
        """Move the data's clock to the newest valid event (a person's who is not profiled too, as
        the batch's clock is the newest event kept); a late event does not move it back. Kept
        here and written to Redis with the next evaluation (no round trip of its own)."""
        if self.audiences and rows:
            newest = max(_utc(row["event_at"]) for row in rows)
            if newest > self.clock:
                self.clock, self._dirty = newest, True

    def _queue_values(self, pipe, people: list[str]) -> None:
        """Queue the reads (and window pruning) of each person's live fields and counts at the clock."""
        from persona_assets.stream import hot_key

        for person in people:
            pipe.hmget(hot_key(person), [f for f, _ in LIVE_FIELDS.values()])
            pipe.hgetall(counts_key(person))
            for name in self._windowed:
                edge = self.clock - self.specs[name].within_days * 86400
                pipe.zremrangebyscore(window_key(person, name), "-inf", edge)  # out of the window for good
                pipe.zcard(window_key(person, name))

    def _parse_values(self, replies: list, people: list[str]) -> list[dict]:
        per, out = 2 + 2 * len(self._windowed), []
        for i, _ in enumerate(people):
            fields, counters, windows = replies[i * per], replies[i * per + 1], replies[i * per + 3 : (i + 1) * per : 2]
            values = {c: (kind(v) if v is not None else kind(0)) for (c, (_, kind)), v in zip(LIVE_FIELDS.items(), fields)}
            values.update({k.decode(): int(v) for k, v in counters.items()})
            values.update({n: int(w) for n, w in zip(self._windowed, windows)})
            out.append(values)
        return out

    def holds(self, node, values: dict) -> bool:
        if isinstance(node, Node):
            if node.op == "not":
                return not self.holds(node.items[0], values)
            results = (self.holds(item, values) for item in node.items)
            return all(results) if node.op == "all" else any(results)
        leaf: Leaf = node
        if leaf.kind == "audience":
            return self.holds(self.definitions.audiences[leaf.subject].where, values)
        value = values.get(leaf.subject, 0)
        return _compare(leaf.op, value, leaf.value)

    def evaluate(self, people: set[str] | list[str], at: float | None = None) -> list[tuple[str, str, str]]:
        """Decide each live audience for `people`; record and emit who entered and exited. One
        round trip reads everything (and writes the clock when it moved), one more emits."""
        people = sorted(people)
        if not self.audiences or not people:
            return []
        pipe = self.client.pipeline(transaction=False)
        self._queue_values(pipe, people)
        for name in self.audiences:
            pipe.smismember(members_key(name), people)
        if self._dirty:
            self._advance(keys=[CLOCK], args=[repr(self.clock)], client=pipe)
        replies = pipe.execute()
        self._dirty, n = False, len(people) * (2 + 2 * len(self._windowed))
        values = self._parse_values(replies[:n], people)
        was = dict(zip(self.audiences, replies[n : n + len(self.audiences)]))
        changes = []
        for name in self.audiences:
            where = self.definitions.audiences[name].where
            for person, member, vals in zip(people, was[name], values):
                now = self.holds(where, vals)
                if now != bool(member):
                    changes.append((name, person, "entered" if now else "exited"))
        self._emit(changes, self.clock if at is None else at)
        return changes

    def _emit(self, changes: list[tuple[str, str, str]], at: float) -> None:
        if not changes:
            return
        pipe = self.client.pipeline(transaction=True)
        for audience, person, change in changes:
            (pipe.sadd if change == "entered" else pipe.srem)(members_key(audience), person)
            pipe.xadd(CHANGES, {"audience": audience, "person_id": person, "change": change, "at": repr(at)})
        pipe.execute()
        self.emitted += len(changes)

    def sweep(self, limit: int | None = None, page: int = 1000) -> list[tuple[str, str, str]]:
        """Re-decide people with live state (windows end as the clock moves, for people who did
        nothing): everyone, or with `limit` about that many, going on from where the last
        sweep stopped, so a busy consumer spreads a pass over many flushes."""
        changes, seen = [], 0
        self._read_clock()
        if limit is None:
            self._cursor = 0  # a whole pass starts at the beginning
        while True:
            self._cursor, batch = self.client.sscan(PEOPLE, self._cursor, count=page)
            changes += self.evaluate([p.decode() for p in batch])
            seen += len(batch)
            if int(self._cursor) == 0 and limit is None:
                return changes
            if limit is not None and (seen >= limit or int(self._cursor) == 0):
                return changes

    def members(self, audience: str) -> set[str]:
        return {m.decode() for m in self.client.smembers(members_key(audience))}


def _utc(at) -> float:
    """A validated event time (naive, UTC) as epoch seconds."""
    from datetime import UTC

    return at.replace(tzinfo=UTC).timestamp()


def drop_person(client, person: str) -> None:
    """A person's live audience state (windows, counters, memberships) removed: erased or declined."""
    keys = [k for k in client.scan_iter(match=f"persona:hot:{person}:win:*")]
    client.delete(counts_key(person), *keys)
    client.srem(PEOPLE, person)
    for key in client.scan_iter(match="persona:audience:*"):
        if client.type(key) == b"set":
            client.srem(key, person)
