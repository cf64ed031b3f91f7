"""The little of HTTP the server needs, as plain ASGI on uvicorn: a request's parts and a JSON answer.

Measured (`persona bench --server`, docs/benchmarks.md): uvicorn with httptools and uvloop
answering an empty 200 took 2.5 times as many requests a second as the same answer through
Starlette's routing, request and response objects, on the same machine in the same run; the
server has three routes and needs none of the rest, so it speaks ASGI itself.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class ClientGone(Exception):
    """The client closed the connection before its body was read."""


class Request:
    """An HTTP request's method, path, lower-cased headers, query values and streamed body."""

    def __init__(self, scope: dict, receive) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.query = {k: v[0] for k, v in urllib.parse.parse_qs(scope["query_string"].decode("latin-1")).items()}
        self._receive = receive

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


@dataclass
class Answer:
    """A response: its status, body and headers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: object, status: int = 200, headers: dict | None = None) -> Answer:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return cls(status, text.encode(), {"content-type": "application/json", **(headers or {})})

    async def send(self, send) -> None:
        headers = [(b"content-length", str(len(self.body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
