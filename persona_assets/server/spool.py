"""Durable before 200: accepted events are appended to a spool file and fsync'd before the answer
(all of them with `durable: disk`; with `durable: stream`, the refused ones and any Redis did not take).

Requests that arrive while one fsync runs wait together for the next one (group commit), so a
busy server pays one fsync for many requests. The spool is a hidden `.part` file in the
landing folder, which ingest and the landing sensor never read; it is renamed to a complete
`http-*.jsonl` file (same folder, so the rename is atomic) every `rotate_seconds` or
`rotate_bytes`, and the folder is fsync'd after each rename. A server killed at any moment
leaves its spool behind, locked by nobody: the next server to start truncates it to its last
complete line (what follows was never answered 200) and renames it in. A live server holds
a lock on its spool, so a second server on the same home never takes it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

PREFIX = "http-"
SPOOL_GLOB = f".{PREFIX}*.jsonl.part"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def final_name(spool: Path) -> Path:
    """`.http-X.jsonl.part` -> `http-X.jsonl`, in the same folder."""
    return spool.with_name(spool.name[1:].removesuffix(".part"))


@dataclass
class Recovered:
    """Spool files a killed server left, now complete landing files (and the bytes cut off their ends)."""

    files: list[Path] = field(default_factory=list)
    torn_bytes: int = 0


def recover(landing: Path) -> Recovered:
    """Move every unlocked spool in `landing` into place, cut to its last complete line."""
    found = Recovered()
    for spool in sorted(landing.glob(SPOOL_GLOB)):
        try:
            fd = os.open(spool, os.O_RDWR)
        except FileNotFoundError:  # another server recovered it meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live server's spool
                continue
            size = os.fstat(fd).st_size
            keep = _complete_length(fd, size)
            if keep < size:
                os.ftruncate(fd, keep)
                found.torn_bytes += size - keep
            os.fsync(fd)
            if keep == 0:
                spool.unlink()
            else:
                os.rename(spool, final_name(spool))
                found.files.append(final_name(spool))
        finally:
            os.close(fd)
    _fsync_dir(landing)
    return found


def _complete_length(fd: int, size: int, block: int = 1 << 16) -> int:
    """The length up to and including the last newline."""
    end = size
    while end > 0:
        start = max(0, end - block)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


class Spool:
    """The open spool file and its group commit. `append` returns once the bytes are on disk."""

    def __init__(self, landing: Path, rotate_seconds: float = 10.0, rotate_bytes: int = 16 << 20) -> None:
        self.landing, self.rotate_seconds, self.rotate_bytes = landing, rotate_seconds, rotate_bytes
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0
        self._seq = 0
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future] = []
        self._flusher: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.commits = 0  # fsyncs done, for the bench and the tests
        self.rotated: list[Path] = []

    async def append(self, data: bytes) -> None:
        """Queue `data` (whole lines) for the next commit and wait for it."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(data)
        self._waiters.append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            data, waiters = b"".join(self._pending), self._waiters
            self._pending, self._waiters = [], []
            try:
                async with self._lock:
                    await asyncio.to_thread(self._write, data)
            except Exception as exc:  # the disk refused: those requests are answered with an error
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _open(self) -> None:
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self._path = self.landing / f".{PREFIX}{stamp}-{os.getpid()}-{self._seq:06d}.jsonl.part"
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _fsync_dir(self.landing)  # the spool's name survives a crash, so recovery finds it
        self._fd, self._opened, self._size = fd, time.monotonic(), 0

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fdatasync(self._fd)
        self._size += len(data)
        self.commits += 1
        if self._size >= self.rotate_bytes or time.monotonic() - self._opened >= self.rotate_seconds:
            self._rotate()

    def _rotate(self) -> None:
        """Rename the spool into landing as a complete file (under its lock, then let go)."""
        if self._fd is None:
            return
        fd, path = self._fd, self._path
        self._fd = self._path = None
        try:
            if self._size:
                os.rename(path, final_name(path))
                _fsync_dir(self.landing)
                self.rotated.append(final_name(path))
            else:
                path.unlink()
        finally:
            os.close(fd)

    async def tick(self) -> None:
        """Rotate a spool that has been open long enough (called while the server is idle too)."""
        if self._fd is not None and time.monotonic() - self._opened >= self.rotate_seconds:
            async with self._lock:
                if self._fd is not None and time.monotonic() - self._opened >= self.rotate_seconds:
                    await asyncio.to_thread(self._rotate)

    async def close(self) -> None:
        """Commit what is queued and move the spool into landing (a clean stop)."""
        if self._flusher is not None:
            await self._flusher
        async with self._lock:
            await asyncio.to_thread(self._rotate)
