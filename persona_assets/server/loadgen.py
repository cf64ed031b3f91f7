"""Load for `persona bench`'s server figures: HTTP/1.1 keep-alive requests from asyncio (uvloop),
measured closed-loop (as fast as answers come) or open-loop (offered at a fixed rate, each
latency counted from the moment its request was due, so a stall counts for everything that
waited behind it). Also the floor: the same server stack answering an empty 200.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

# The floor server, run with `python -c FLOOR port http loop app`: Starlette (or a bare ASGI
# callable) on uvicorn, reading each body and answering an empty 200.
FLOOR = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
port, http, loop, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
async def empty(request):
    await request.body()
    return Response(b"", 200)
async def bare(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
app = bare if kind == "bare" else Starlette(routes=[Route("/{p:path}", empty, methods=["GET", "POST"])])
print("ready", flush=True)
uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop=loop, access_log=False, log_level="warning")
"""


class Connection:
    """One keep-alive connection; `send` writes a whole request and reads the whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, host: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    requests: int
    seconds: float
    errors: int
    latencies_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(host: str, port: int, make: Callable[[int], bytes], connections: int, seconds: float) -> Result:
    """Each connection sends its next request as soon as the last is answered, for `seconds`."""
    counter = itertools.count()
    done, errors = [0], [0]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        conn = await Connection.open(host, port)
        try:
            while time.perf_counter() < deadline:
                status = await conn.send(make(next(counter)))
                done[0] += 1
                errors[0] += status != 200
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return Result(done[0], time.perf_counter() - start, errors[0], [])


async def open_loop(
    host: str, port: int, make: Callable[[int], bytes], rate: float, seconds: float, connections: int = 64
) -> Result:
    """`rate` requests a second on a pool of connections; latency from when each was due."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection.open(host, port))
    latencies: list[float] = []
    errors = [0]

    async def one(i: int, due: float) -> None:
        conn = await pool.get()
        try:
            status = await conn.send(make(i))
        finally:
            pool.put_nowait(conn)
        latencies.append((time.perf_counter() - due) * 1000)
        errors[0] += status != 200

    total = int(rate * seconds)
    start = time.perf_counter()
    tasks = []
    for i in range(total):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait().close()
    return Result(total, elapsed, errors[0], latencies)


def run(coroutine):
    """Run a load coroutine on uvloop (the client should not be the bottleneck). What the client
    process holds is frozen out of the collector's reach while it runs: without it every track
    run stalled 200+ ms at the same request while the server's collector showed no pause, and
    every request due meanwhile counted it as the server's latency."""
    import gc

    import uvloop

    gc.collect()
    gc.freeze()
    try:
        return uvloop.run(coroutine)
    finally:
        gc.unfreeze()
