"""The audit trail: who did what to which file, from where, over which protocol, with what result.

Separate from the operational log: one JSON object per line in its own append-only file, rotated by
size to time-stamped files (stdlib RotatingFileHandler), and optionally shipped to the bucket under a
prefix outside the PACS namespace. Passwords and keys are never part of a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import structlog

log = structlog.get_logger("pacsgw.audit")

SHIP_INTERVAL = 60.0


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
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8")
        # Rotated files get unique, sortable names instead of .1, .2 … so they can be shipped as they are.
        handler.namer = lambda _: str(path.with_name(f"{path.stem}-{time.strftime('%Y%m%dT%H%M%S')}"
                                                     f"-{time.time_ns() % 10**9:09d}{path.suffix}"))
        handler.rotator = self._rotate
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger(f"pacsgw.audit.{path}")  # private: never propagates to the ops log
        self._logger.addHandler(handler)
        self._handler = handler

    def record(self, who: Who | None, op: str, path: str, result: str = "ok", nbytes: int | None = None,
               **detail: object) -> None:
        if who is None or not self.enabled:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        entry = {"time": stamp, "user": who.user, "peer": who.peer, "protocol": who.protocol, "op": op, "path": path,
                 "result": result}
        if nbytes is not None:
            entry["bytes"] = nbytes
        entry.update(detail)
        self._logger.info(json.dumps(entry, ensure_ascii=False))

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

    def _rotate(self, source: str, dest: str) -> None:
        os.rename(source, dest)
        # Wake the shipper now. emit() runs on the recording thread: the event loop's, or the login guard's
        # (agent.auth), whose records must reach the loop's Event through the loop.
        try:
            asyncio.get_running_loop()
            self.rotated_event.set()
        except RuntimeError:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.rotated_event.set)

    def rotated(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}"))

    def close(self) -> None:
        if self.enabled:
            self._handler.close()


class AuditShipper:
    """Uploads rotated audit files to the bucket, then keeps only the newest `keep` of them locally."""

    def __init__(self, audit: AuditLog, s3, prefix: str) -> None:  # S3Uplink
        self.audit, self.s3, self.prefix = audit, s3, prefix

    async def run(self) -> None:
        self.audit.loop = asyncio.get_running_loop()
        while True:
            self.audit.rotated_event.clear()
            await self.ship_once()
            with contextlib.suppress(asyncio.TimeoutError):  # ship right after a rotation; retry every interval
                await asyncio.wait_for(self.audit.rotated_event.wait(), SHIP_INTERVAL)

    async def ship_once(self) -> int:
        shipped = 0
        for f in self.audit.rotated():
            marker = f.with_name(f.name + ".shipped")
            if marker.exists():
                continue
            try:
                await self.s3.put_raw(self.prefix + f.name, await asyncio.to_thread(f.read_bytes))
            except Exception as e:  # retried at the next interval
                log.warning("audit_ship_failed", file=f.name, error=str(e)[:200])
                return shipped
            marker.touch()
            shipped += 1
            log.info("audit_shipped", file=f.name, key=self.prefix + f.name)
        self._trim()
        return shipped

    def _trim(self) -> None:
        files = self.audit.rotated()
        for f in files[: max(0, len(files) - self.audit.keep)]:
            if f.with_name(f.name + ".shipped").exists():
                f.unlink()
                f.with_name(f.name + ".shipped").unlink()
