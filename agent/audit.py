"""The audit trail, apart from the operational log: who did what to which file, from where, over which protocol,
with what result. Passwords and keys are never part of a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import structlog

log = structlog.get_logger("pacsgw.audit")

SHIP_INTERVAL = 60.0
# json.dumps with ensure_ascii=False builds a new encoder for every call
_json = json.JSONEncoder(ensure_ascii=False).encode


def _printable(line: str) -> str:
    """A record's characters that are not printable (a client's C1 controls, line and paragraph separators, text
    direction marks; JSON escapes only C0 controls) as JSON escapes, as the operational log writes them: a terminal
    showed a failed login's user 'x' + U+202E reversed, and a line splitter cut the record at a U+2028 or U+0085 in
    it. A name that was not UTF-8 (surrogate escapes) is so written as JSON escapes too, not lost."""
    if line.isprintable():  # nearly every record: no per-character pass
        return line
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in line)


@dataclass(frozen=True)
class Who:
    """The party behind a request: an authenticated user (or a login attempt) on one connection."""

    user: str
    protocol: str
    peer: str = ""


def failure(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {getattr(e, 'reason', e)}"


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, keep: int, enabled: bool = True) -> None:
        self.path, self.keep, self.enabled = path, keep, enabled
        self.rotated_event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the shipper's, which waits on rotated_event
        self.max_bytes, self._fd, self._size = max_bytes, -1, 0
        # One write(2) a line to an O_APPEND file, on the recording thread (a RotatingFileHandler: ~75 µs a transfer)
        self._lock = threading.Lock()
        self._second = (-1, "")  # the last record's whole second and its text: strftime once a second
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def record(self, who: Who | None, op: str, path: str, result: str = "ok", nbytes: int | None = None,
               **detail: object) -> None:
        if who is None or not self.enabled:
            return
        now = time.time()
        second, text = self._second  # read once: records come from two threads
        if int(now) != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            self._second = (int(now), text)
        entry = {"time": f"{text}.{int(now * 1000) % 1000:03d}Z", "user": who.user, "peer": who.peer,
                 "protocol": who.protocol, "op": op, "path": path, "result": result}
        if nbytes is not None:
            entry["bytes"] = nbytes
        entry.update(detail)
        self._write((_printable(_json(entry)) + "\n").encode("utf-8"))

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _write(self, line: bytes) -> None:
        """Append one line, rotating first when it would fill the file; a failing disk loses the record (logged)."""
        with self._lock:
            try:
                if self._fd < 0:  # closed (a record at shutdown): reopened, as logging's FileHandler did
                    self._open()
                if self.max_bytes > 0 and self._size and self._size + len(line) >= self.max_bytes:
                    self._roll()
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    self._size += written
                    view = view[written:]
            except OSError as e:
                log.error("audit_write_failed", path=str(self.path), error=str(e)[:200])

    def _roll(self) -> None:
        """Rename the full file to a unique, sortable name (shipped as it is) and start a new one."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())  # UTC, as the records: the names sort in their order
        os.rename(self.path, self.path.with_name(f"{self.path.stem}-{stamp}-{time.time_ns() % 10**9:09d}"
                                                 f"{self.path.suffix}"))
        # Wake the shipper now, through its loop: a record on the login guard's thread may not touch the Event
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.rotated_event.set)
        full = self._fd
        self._open()
        os.close(full)

    @contextlib.asynccontextmanager
    async def op(self, who: Who | None, op: str, path: str, *, record_ok: bool = True,
                 **detail: object) -> AsyncIterator[None]:
        """Record the operation in the block: the error it raised, or 'ok' (unless record_ok is False)."""
        try:
            yield
        except Exception as e:
            self.record(who, op, path, failure(e), **detail)
            raise
        if record_ok:
            self.record(who, op, path, **detail)

    def rotated(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


async def ship(audit: AuditLog, s3, prefix: str) -> None:  # s3: an S3Uplink
    """Upload rotated audit files to the bucket, then keep only the newest `keep` of them locally."""
    audit.loop = asyncio.get_running_loop()
    while True:
        audit.rotated_event.clear()
        await _ship_rotated(audit, s3, prefix)
        with contextlib.suppress(asyncio.TimeoutError):  # ship right after a rotation; retry every interval
            await asyncio.wait_for(audit.rotated_event.wait(), SHIP_INTERVAL)


async def _ship_rotated(audit: AuditLog, s3, prefix: str) -> None:
    for f in audit.rotated():
        if (marker := f.with_name(f.name + ".shipped")).exists():
            continue
        try:
            await s3.put_raw(prefix + f.name, await asyncio.to_thread(f.read_bytes))
        except Exception as e:  # retried at the next interval
            log.warning("audit_ship_failed", file=f.name, error=str(e)[:200])
            return
        marker.touch()
        log.info("audit_shipped", file=f.name, key=prefix + f.name)
    files = audit.rotated()  # locally, the newest `keep` of them, and those not yet shipped
    for f in files[: max(0, len(files) - audit.keep)]:
        if (marker := f.with_name(f.name + ".shipped")).exists():
            f.unlink()
            marker.unlink()
