"""`persona serve`: one ASGI process (uvicorn, httptools, uvloop) for Segment's tracking API and the profile API.

Collection (`POST /v1/track|identify|page|screen|group|alias|batch`, and analytics.js's short
paths `/v1/t|i|p|s|g|a|b`) answers 200 only once the request's events are durable, so a 200 is
never lost: with `durable: disk`, every line fsync'd in the spool (`spool.py`), the valid ones
then also put on the Redis stream for the hot profiles when one is configured; with `durable:
stream`, the valid lines on the Redis stream (the consumer lands them as Parquet) and the
refused ones fsync'd in the spool, which also takes the valid ones whenever Redis does not.
The spool's files reach `raw_events` through the landing sensor (or `persona run`).
Profiles (`GET /v1/profiles/{id_type}:{id}/traits|events|identifiers|audiences|provenance|links`,
`/v1/search`, `/v1/segments`, `/v1/audiences`) are read from the serving snapshot (`profiles.py`) with a
read key that is not the write key. Every other path is the person explorer (`explorer.py`), which
reads through the same reader.

No request is logged: paths carry emails and phone numbers, headers carry keys.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import socket
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from persona_assets.server.asgi import Answer, ClientGone, Request
from persona_assets.server.collect import (
    SHORT,
    TYPES,
    ContractCheck,
    Prepared,
    RecentIds,
    Refused,
    Stamps,
    basic_username,
    inflate,
    key_matches,
    lines_data,
    parse_body,
    prepare,
    stamps,
)
from persona_assets.server.config import ServerSettings, ServerSettingsError
from persona_assets.server.explorer import Explorer
from persona_assets.server.profiles import EVENT_LIMIT, ID_TYPES, MAX_EVENT_LIMIT, BadRequest, NotFound, ProfileReader
from persona_assets.server.spool import PREFIX, Recovered, Spool, recover

log = logging.getLogger("persona.server")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After",
}
PREFLIGHT = CORS | {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding, X-Retry-Count",
    "Access-Control-Max-Age": "86400",
}
RECENT_FILES_BYTES = 64 << 20  # newest server files (and stream entries) read at start for the stamps of retried events
# A request waits this long for Redis to take its events before the spool takes them instead; after
# a failure the stream is left alone for STREAM_PAUSE seconds, so no request waits on a Redis that is down.
STREAM_TIMEOUT = 0.25
STREAM_PAUSE = 1.0
STARTUP_TIMEOUT = 10.0  # for what the server asks Redis when it starts
# All of a request's events in one call. From redis.asyncio here, 100 XADDs took 3.96 ms (p50) as a
# pipeline, most of it packing commands and parsing replies in Python, and 0.39 ms as this script.
XADD_ALL = """
for _, line in ipairs(ARGV) do redis.call('XADD', KEYS[1], '*', 'event', line) end
return #ARGV
"""


class TokenBucket:
    """At most `rate` requests a second on average, `burst` at once; 0 turns it off."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self.tokens, self.at = float(self.burst), time.monotonic()

    def wait(self) -> float:
        """0 when a request may go now (and takes its token), else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class State:
    settings: ServerSettings
    home: Path
    address: str = ""
    spool: Spool | None = None
    check: ContractCheck | None = None
    recent: RecentIds = field(default_factory=RecentIds)
    reader: ProfileReader | None = None
    reads: ThreadPoolExecutor | None = None
    stream: object = None  # an async Redis client when events go to the stream
    xadd: object = None  # XADD_ALL on that client
    durable: str = "disk"  # where a valid event is durable before its 200 (`durability`)
    persistence: str = ""  # what Redis says of its own durability, for the start line
    stream_down: bool = False  # since a call failed, until one succeeds (one warning an outage)
    stream_paused_until: float = 0.0
    limiter: TokenBucket | None = None
    ticker: asyncio.Task | None = None
    recovered: Recovered | None = None
    stream_errors: int = 0
    explorer: object = None  # explorer.Explorer, made at start


def error(status: int, message: str, headers: dict | None = None) -> Answer:
    return Answer.json({"success": False, "error": message}, status, headers)


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` (Content-Length, then as it streams)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def collect(request: Request, state: State, name: str) -> Answer:
    kind = SHORT.get(name, name)
    try:
        result = await _collect(request, state, kind)
    except Refused as exc:
        headers = dict(CORS)
        if exc.status == 413:
            headers["Connection"] = "close"  # the rest of the body is not read
        if exc.status == 429:
            headers["Retry-After"] = exc.message.split()[-1]
        return error(exc.status, exc.message, headers)
    except OSError:
        log.error("the spool could not be written (disk full or gone?): events not accepted")
        return error(503, "events could not be stored; retry later", CORS)
    except ClientGone:
        return error(400, "the body was cut short", CORS)
    except Exception as exc:
        return failed(exc, CORS)
    return Answer.json(result, headers=CORS)


async def _collect(request: Request, state: State, kind: str) -> dict:
    settings = state.settings
    wait = state.limiter.wait()
    if wait:
        raise Refused(429, f"too many requests; retry after {max(1, math.ceil(wait))}")
    header_key = basic_username(request.headers.get("authorization"))
    if header_key is not None and not key_matches(header_key, settings.write_key):
        raise Refused(401, "wrong write key")
    limit = settings.batch_bytes if kind == "batch" else settings.event_bytes
    body = await read_limited(request, limit)
    if request.headers.get("content-encoding", "").strip().lower() == "gzip":
        body = inflate(body, limit)
    parsed = parse_body(body, kind, settings.batch_events)
    if header_key is None:
        given = parsed.batch.get("writeKey") if kind == "batch" else parsed.items[0].get("writeKey")
        if not key_matches(given if isinstance(given, str) else None, settings.write_key):
            raise Refused(401, "a write key is needed: HTTP Basic username, or writeKey in the body")
    prepared = prepare(parsed, kind, state.recent, settings.event_bytes)
    if state.durable == "stream":
        await _check(state, prepared)
        await _keep_on_stream(state, prepared)
    else:
        await _keep_on_disk(state, prepared)
    quarantined = prepared.quarantined
    answer = {"success": True, "accepted": prepared.accepted, "quarantined": sum(quarantined.values())}
    return answer | ({"reasons": quarantined} if quarantined else {})


async def _check(state: State, prepared: Prepared) -> None:
    """The contract's reasons for each line: plain lines here, the rest by its query on a thread."""
    left = state.check.plain(prepared)
    if left:
        await asyncio.to_thread(state.check.query, prepared, left)


async def _keep_on_disk(state: State, prepared: Prepared) -> None:
    """Every line fsync'd in the spool. Each is stored whatever the contract says of it, so the
    fsync need not wait for the check: it runs meanwhile. Then the valid lines go onto the
    stream, if any, for the hot profiles: already durable, a Redis error only delays those."""
    durable = asyncio.ensure_future(state.spool.append(prepared.data()))
    try:
        await _check(state, prepared)
    finally:
        await durable
    if state.stream is not None:
        await _xadd(state, prepared.valid_lines())


async def _keep_on_stream(state: State, prepared: Prepared) -> None:
    """The valid lines onto the stream and the refused ones fsync'd in the spool meanwhile (ingest
    quarantines them with their reason); valid lines the stream did not take are fsync'd too."""
    valid, refused = prepared.valid_lines(), prepared.refused_lines()
    spooled = asyncio.ensure_future(state.spool.append(lines_data(refused))) if refused else None
    try:
        if valid and not await _xadd(state, valid):
            await state.spool.append(lines_data(valid))
    finally:
        if spooled is not None:
            await spooled


async def _xadd(state: State, lines: list[str]) -> bool:
    """True once Redis has every line on the stream; False when it is down, refuses, or is slower
    than STREAM_TIMEOUT. A call that timed out may still be carried out: then the event lands both
    ways, identical, and ingest counts the second copy as a re-delivered duplicate."""
    from persona_assets.stream import STREAM

    if not lines:
        return True
    if time.monotonic() < state.stream_paused_until:
        return False
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            await state.xadd(keys=[STREAM], args=[line.encode("utf-8", "surrogatepass") for line in lines])
    except Exception as exc:  # the type only: a Redis error's text may carry its URL
        state.stream_errors += 1
        state.stream_paused_until = time.monotonic() + STREAM_PAUSE
        if not state.stream_down:
            state.stream_down = True
            log.warning(
                "the Redis stream did not take events (%s): they are fsync'd in the spool until it does, "
                "and reach profiles at the next run",
                type(exc).__name__,
            )
        return False
    if state.stream_down:
        state.stream_down = False
        log.warning("the Redis stream takes events again")
    return True


def preflight() -> Answer:
    return Answer(204, headers=PREFLIGHT)


def read_key(request: Request) -> str | None:
    """The read key: HTTP Basic username (as Segment's Profile API takes its token) or a Bearer token."""
    header = request.headers.get("authorization") or ""
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return basic_username(header)


def read_refused(request: Request, state: State) -> Answer | None:
    """The 401 for a read without the read key (or with the profile API off), else None."""
    if not state.settings.read_key:
        return error(401, "the profile API is off: no read key is set (PERSONA_READ_KEY or server.read_key)")
    if not key_matches(read_key(request), state.settings.read_key):
        return error(401, "a read key is needed: HTTP Basic username or Authorization: Bearer")
    return None


async def answered(read, not_found: str) -> Answer:
    """Await `read` (a coroutine giving the answer) and say the reader's refusals as statuses."""
    try:
        answer = await read
    except NotFound:
        return error(404, not_found)
    except BadRequest as exc:
        return error(400, str(exc))
    except FileNotFoundError:
        return error(503, "no serving snapshot yet: run `persona run` (or make demo) first")
    except Exception as exc:
        return failed(exc)
    return Answer.json(answer)


async def profile(request: Request, state: State, who: str, what: str) -> Answer:
    if refused := read_refused(request, state):
        return refused
    id_type, sep, value = who.partition(":")
    if not sep or id_type not in ID_TYPES or not value:
        return error(400, f"ask for {{id_type}}:{{id}} with id_type one of {', '.join(ID_TYPES)}")
    fields = [f for f in request.query.get("fields", "").split(",") if f] or None
    if what == "audiences" and request.query.get("why", "").lower() in ("1", "true", "yes"):
        what = "audiences_why"

    async def read():
        # Answered from what the reader holds in memory when it can: no hop to its thread.
        answer = state.reader.from_view(what, id_type, value, fields)
        if answer is None:
            call = _reader_call(state.reader, what, id_type, value, fields, request.query)
            answer = await asyncio.get_running_loop().run_in_executor(state.reads, call)
        return answer

    return await answered(read(), f"no profile for this {id_type}")


def _reader_call(reader: ProfileReader, what: str, id_type: str, value: str, fields, query):
    if what == "traits":
        return lambda: reader.traits(id_type, value, fields)
    if what == "identifiers":
        return lambda: reader.identifiers(id_type, value)
    if what == "audiences":
        return lambda: reader.audiences(id_type, value)
    if what == "audiences_why":
        return lambda: reader.audiences_why(id_type, value)
    if what == "provenance":
        return lambda: reader.provenance(id_type, value)
    if what == "links":
        return lambda: reader.links(id_type, value)
    if what == "activity":
        return lambda: reader.activity(id_type, value)
    limit = _limit(query)
    return lambda: reader.events(id_type, value, limit, query.get("next"), fields)


def _limit(query: dict) -> int:
    try:
        limit = int(query.get("limit", EVENT_LIMIT))
    except ValueError:
        raise BadRequest("limit: a whole number") from None
    if not 1 <= limit <= MAX_EVENT_LIMIT:
        raise BadRequest(f"limit: from 1 to {MAX_EVENT_LIMIT}")
    return limit


async def listing(request: Request, state: State, parts: list[str]) -> Answer:
    """`/v1/search?q=`, `/v1/segments[/{id}/members]`, `/v1/audiences[/{name}/members]`: the explorer's
    look-ups and lists, for any client with the read key."""
    if refused := read_refused(request, state):
        return refused
    if parts not in (["search"], ["segments"], ["audiences"]) and not (len(parts) == 3 and parts[2] == "members"):
        return error(404, NO_ENDPOINT)
    reader, query = state.reader, request.query

    async def read():
        if parts == ["search"]:
            if not query.get("q", "").strip():
                raise BadRequest("q: an identifier to look for")
            call = lambda: reader.search(query["q"])  # noqa: E731
        elif parts in (["segments"], ["audiences"]):
            call = reader.segments if parts == ["segments"] else reader.audience_list
        else:  # {segments|audiences}/{id}/members
            limit, after, name = _limit(query), query.get("next"), parts[1]
            members = reader.segment_members if parts[0] == "segments" else reader.audience_members
            call = lambda: members(name, limit, after)  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(state.reads, call)

    return await answered(read(), f"no such {parts[0][:-1]}" if len(parts) > 1 else "not found")


NO_ENDPOINT = "no such endpoint; see README 'Send events over HTTP' and 'Read profiles over HTTP'"
COLLECT_PATHS = {*TYPES, "batch", *SHORT}
PROFILE_PARTS = ("traits", "events", "identifiers", "audiences", "provenance", "links", "activity")
LISTINGS = ("search", "segments", "audiences")


def failed(exc: Exception, headers: dict | None = None) -> Answer:
    """500 for what no handler expected: the type logged, never its text (it may hold what was asked)."""
    log.error("request failed: %s", type(exc).__name__)
    return error(500, "internal error", headers)


async def route(request: Request, state: State) -> Answer:
    """/v1/<call> for collection, /v1/profiles/<id_type>:<id>/<part> for reads (an id may hold '/'),
    /v1/search|segments|audiences for look-ups and lists; any other path is the explorer's."""
    parts = request.path.split("/")
    if len(parts) == 3 and parts[1] == "v1" and parts[2] in COLLECT_PATHS:
        if request.method == "POST":
            return await collect(request, state, parts[2])
        return preflight() if request.method == "OPTIONS" else error(405, "POST only", {"Allow": "POST, OPTIONS"})
    if len(parts) >= 5 and parts[1:3] == ["v1", "profiles"] and parts[-1] in PROFILE_PARTS:
        if request.method == "GET":
            return await profile(request, state, "/".join(parts[3:-1]), parts[-1])
        return error(405, "GET only", {"Allow": "GET"})
    if len(parts) >= 3 and parts[1] == "v1" and parts[2] in LISTINGS:
        if request.method == "GET":
            return await listing(request, state, [urllib.parse.unquote(p) for p in parts[2:]])
        return error(405, "GET only", {"Allow": "GET"})
    if parts[1] != "v1" and state.explorer is not None:
        return await state.explorer.handle(request)
    return error(404, NO_ENDPOINT)


class PersonaApp:
    """The ASGI application: lifespan starts and stops the server's parts; requests are routed."""

    def __init__(self, home: Path, settings: ServerSettings, address: str = "") -> None:
        self.state = State(settings=settings, home=home, address=address)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                answer = await route(Request(scope, receive), self.state)
            except Exception as exc:
                answer = failed(exc)
            await answer.send(send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await _start(self.state)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"could not start: {exc}"})
                    return
                _announce(self.state)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await _stop(self.state)
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_app(home: Path, settings: ServerSettings, address: str = "") -> PersonaApp:
    return PersonaApp(home, settings, address)


def _landing(home: Path) -> Path:
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    return landing


async def _learn_recent(state: State, landing: Path) -> int:
    """The stamps of the newest events the server stored, so a retry after a restart gets the same
    ones: from its newest landing files and, with a stream, the stream's newest entries. With
    `durable: stream` the valid events are only on the stream, which keeps every entry the
    consumer acknowledged (nothing trims it); the consumer's `stream-*.parquet` files cannot
    serve, as they keep neither receivedAt nor originalTimestamp. Both sources are merged oldest
    first, so the newest `capacity` stamps are the ones kept, whichever way each event went."""
    mine = sorted(landing.glob(f"{PREFIX}*.jsonl"), key=lambda p: p.name)
    chosen, size = [], 0
    for path in reversed(mine):
        size += path.stat().st_size
        if size > RECENT_FILES_BYTES:
            break
        chosen.append(path)
    found: list[Stamps] = []
    for path in chosen:
        with open(path, "rb") as fh:
            found += stamps(fh)
    if state.stream is not None:
        found += await _stream_stamps(state.stream, state.recent.capacity)
    found.sort(key=lambda one: one.received)
    return state.recent.learn(found)


async def _stream_stamps(client, count: int, page: int = 10_000) -> list[Stamps]:
    """The stamps on the stream's newest `count` entries (at most RECENT_FILES_BYTES of them); none,
    with a warning, when Redis does not answer."""
    from persona_assets.stream import STREAM

    raws, size, newest = [], 0, "+"
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while len(raws) < count and size < RECENT_FILES_BYTES:
                entries = await client.xrevrange(STREAM, newest, "-", count=min(page, count - len(raws)))
                if not entries:
                    break
                for _, entry in entries:
                    raws.append(entry.get(b"event", b""))
                    size += len(raws[-1])
                newest = "(" + entries[-1][0].decode()
    except Exception as exc:  # the type only: a Redis error's text may carry its URL
        log.warning(
            "the Redis stream's newest events could not be read (%s): a retry of one of them may be "
            "quarantined as a conflicting re-delivery",
            type(exc).__name__,
        )
    return list(stamps(reversed(raws)))


def durability(home: Path, settings: ServerSettings) -> tuple[str, str | None]:
    """(`disk` or `stream`, the stream's URL or None): the setting, else `stream` when events go
    onto a stream; a ServerSettingsError for `stream` without one."""
    url = _stream_url(home) if settings.stream else None
    if settings.durable == "stream" and url is None:
        raise ServerSettingsError(
            "server.durable is stream but no Redis stream is configured: set PERSONA_REDIS_URL (or start one "
            "with `persona stream --start-redis`) and leave server.stream true, or set server.durable: disk"
        )
    return settings.durable or ("stream" if url else "disk"), url


async def _persistence(client) -> str:
    """What Redis says of its own durability (`CONFIG GET`, which a managed Redis may refuse)."""
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            config = await client.config_get("append*")
    except Exception:
        return "Redis's persistence unknown (CONFIG GET refused)"
    if config.get("appendonly") != "yes":
        return "Redis appendonly no: events live in its memory until the consumer lands them"
    return f"Redis appendonly yes, appendfsync {config.get('appendfsync')}"


async def _start(state: State) -> None:
    from persona_assets.core.pii import load_key
    from persona_assets.home import snapshot_path

    landing = _landing(state.home)
    state.recovered = recover(landing)
    s = state.settings
    state.durable, url = durability(state.home, s)
    state.spool = Spool(landing, s.rotate_seconds, s.rotate_bytes)
    state.check = await asyncio.to_thread(ContractCheck)
    state.limiter = TokenBucket(s.max_requests_per_second, s.burst)
    state.reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profiles")
    live = _live_reader(url) if url else None
    state.reader = ProfileReader(
        snapshot_path(), load_key(state.home), s.gmail_rules, live, definitions=_definitions(state.home)
    )
    loop = asyncio.get_running_loop()
    state.explorer = Explorer(s, state.home, state.reader, lambda call: loop.run_in_executor(state.reads, call))
    state.reads.submit(state.reader.warm)  # the snapshot opened (and held) before the first read asks
    if url:
        import redis.asyncio

        state.stream = redis.asyncio.Redis.from_url(url, decode_responses=False)
        state.xadd = state.stream.register_script(XADD_ALL)
        if state.durable == "stream":
            state.persistence = await _persistence(state.stream)
    await _learn_recent(state, landing)
    state.ticker = asyncio.create_task(_tick(state.spool, s.rotate_seconds))
    # What was imported and built to start (pandas, pandera, DuckDB, the contract) lives as long as
    # the server: moved out of the collector's reach, full collections under load take a few ms,
    # not the 50-150 ms measured with it in (`persona bench --server`).
    gc.freeze()


def _definitions(home: Path):
    """definitions(con): the audience definitions in force (audiences.yaml or persona.yaml), checked against
    the snapshot `con` is on; read again when the file or the snapshot changes."""
    from persona_assets.core.audience_definitions import load
    from persona_assets.core.audiences import vocabulary

    kept: dict = {}

    def definitions(con):
        settings = Path(os.environ.get("PERSONA_CONFIG") or home / "persona.yaml")
        files = [home / "audiences.yaml", settings]
        stamp = (id(con), *(f.stat().st_mtime_ns if f.exists() else None for f in files))
        if kept.get("stamp") != stamp:
            kept.update(stamp=stamp, value=load(home, settings if settings.is_file() else None, vocabulary(con)))
        return kept["value"]

    return definitions


def _stream_url(home: Path) -> str | None:
    """The Redis stream's URL when one is configured (as `persona profile` finds it), else None."""
    from persona_assets.stream import REDIS_ENV, redis_url

    if os.environ.get(REDIS_ENV) or (home / "redis" / "url").exists():
        return redis_url(home)
    return None


def _live_reader(url: str):
    import redis

    from persona_assets.cli import live_fields

    client = redis.Redis.from_url(url, socket_timeout=1.0)

    def live(person_id: str, profile: dict) -> dict:
        try:
            return live_fields(client, person_id, profile)
        except Exception as exc:  # the hot store is optional: the batch profile still answers
            return {"live": f"hot store unreachable ({type(exc).__name__})"}

    return live


async def _tick(spool: Spool, every: float) -> None:
    while True:
        await asyncio.sleep(min(every, 0.25))
        try:
            await spool.tick()
        except OSError:
            log.error("the spool could not be moved into landing; retrying")


async def _stop(state: State) -> None:
    if state.explorer is not None:
        await state.explorer.stop()
    if state.ticker is not None:
        state.ticker.cancel()
    if state.spool is not None:
        await state.spool.close()
    if state.reads is not None:
        state.reads.submit(state.reader.close).result()
        state.reads.shutdown()
    if state.check is not None:
        state.check.close()
    if state.stream is not None:
        await state.stream.aclose()


def _announce(state: State) -> None:
    recovered = state.recovered
    if recovered.files:
        print(
            f"recovered {len(recovered.files)} spool file(s) a stopped server left "
            f"({recovered.torn_bytes} bytes of unanswered lines cut)",
            flush=True,
        )
    reads = "on" if state.settings.read_key else "off (no read key)"
    if state.settings.read_key:
        reads += f"; person explorer at {state.address}/ (actions {'on' if state.settings.admin_key else 'off'})"
    print(f"Persona server on {state.address}: {_durable_line(state)}; profile API {reads}", flush=True)


def _durable_line(state: State) -> str:
    """Where an accepted event is before its 200, as the start line says it."""
    landing = state.home / "landing"
    if state.durable == "stream":
        return (
            f"valid events on the Redis stream before each 200 ({state.persistence}; `persona stream` lands them), "
            f"refused ones and any Redis does not take fsync'd to {landing}"
        )
    copied = ", the valid ones then onto the Redis stream" if state.stream is not None else " (no Redis stream)"
    return f"events fsync'd to {landing} before each 200{copied}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(home: Path, settings: ServerSettings) -> None:
    """Run until SIGTERM or Ctrl-C; the spool is moved into landing on the way out."""
    import uvicorn

    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    app = build_app(home, settings, f"http://{shown}:{port}")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="persona serve: %(message)s")
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run(sockets=[sock])
