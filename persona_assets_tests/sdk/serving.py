"""A real `persona serve` process for the server and SDK tests, and a small HTTP client."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

WRITE_KEY = "test-write-key-0123"
READ_KEY = "test-read-key-4567"


@dataclass
class Served:
    """A running server: its URL, its process (own process group) and what it printed."""

    url: str
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(home: Path, env: dict | None = None, args: tuple[str, ...] = (), timeout: float = 60.0) -> Served:
    """`persona serve --port 0` on `home`; waits for its 'Persona server on <url>' line."""
    log = home / f"serve-{time.monotonic_ns()}.log"
    full = {**os.environ, "PERSONA_HOME": str(home), "PERSONA_WRITE_KEY": WRITE_KEY, "PERSONA_READ_KEY": READ_KEY}
    full.update(env or {})
    full = {k: v for k, v in full.items() if v is not None}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "persona_assets.cli", "serve", "--port", "0", *args],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served("", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in served.output().splitlines():
            if line.startswith("Persona server on "):
                served.url = line.split()[3].rstrip(":")
                return served
        if process.poll() is not None:
            raise AssertionError(f"persona serve stopped: {served.output()}")
        time.sleep(0.05)
    served.stop(signal.SIGKILL)
    raise AssertionError(f"persona serve did not start: {served.output()}")


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def request(
    url: str,
    body: bytes | dict | None = None,
    key: str | None = WRITE_KEY,
    method: str | None = None,
    headers: dict | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": basic(key)} if key else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, got = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, got = exc.read(), exc.code, dict(exc.headers)
    return status, json.loads(raw) if raw else {}, got


def landing_lines(home: Path) -> list[dict]:
    """Every event line the server moved into landing, parsed."""
    lines = []
    for path in sorted((home / "landing").glob("http-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines
