"""Serving workers: with `[server] workers = N` (N > 1) the owner (the agent's own process) also runs N-1 worker
processes (`python -m agent.worker`) serving FTP and SFTP on the same ports (SO_REUSEPORT) over the one catalog.
Who owns what, and why: docs/workers.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

import psutil
import structlog

from agent.audit import AuditLog
from agent.config import Config
from agent.store.cache import Cache

log = structlog.get_logger("pacsgw.workers")

RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying is restarted ever more slowly
STABLE_SECONDS = 60.0  # a worker that ran this long starts the delays over when it dies
PID_DIR = "workers"  # in the cache directory: <index>.pid of each serving worker


def worker_audit(cfg: Config, index: int, enabled: bool) -> AuditLog:
    """Worker index's own audit file beside the owner's (one writer per file: rotation is not multi-process)."""
    a, path = cfg.audit, Path(cfg.audit.path)
    return AuditLog(path.with_name(f"{path.stem}.worker{index}{path.suffix}"), a.max_bytes, a.keep, enabled)


def worker_audits(cfg: Config) -> list[AuditLog]:
    """The serving workers' audit files, which the owner ships (enabled=False: it only reads and trims them)."""
    return [worker_audit(cfg, i, False) for i in range(1, cfg.server.serving_processes())]


def _is_worker_of(pid: int, cfg: Config) -> bool:
    """Whether pid is a worker process of this configuration (a pid file may name a reused pid)."""
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"agent.worker" in argv and str(cfg.path).encode() in argv
    return False


def retire_orphans(cfg: Config) -> list[int]:
    """Workers a killed owner left serving: ask them to drain and exit (new sessions go to the new
    processes, which listen on the same ports). → their pids."""
    told = []
    for path in sorted((cfg.cache.dir / PID_DIR).glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            if _is_worker_of(pid := int(path.read_text().strip()), cfg):
                os.kill(pid, signal.SIGTERM)
                told.append(pid)
                log.warning("worker_retired", pid=pid, reason="left serving by an owner that died")
            path.unlink()
    return told


def open_cache(cfg: Config) -> Cache:
    """The owner's cache at start. Staging holds only unacknowledged writes, discarded, except those that
    retired workers (still draining) hold open: their transfers may yet finish and be acknowledged."""
    draining = retire_orphans(cfg)
    cache = Cache(cfg.cache.dir, clear_staging=not draining)
    if draining:
        held: set[str] = set()  # the files those workers hold open
        for pid in draining:
            with contextlib.suppress(psutil.Error):
                held.update(f.path for f in psutil.Process(pid).open_files())
        for f in os.scandir(cache.staging):
            if f.path not in held:
                cache.discard_staging(f.name)
    return cache


class Supervisor:
    """In the owner: starts workers 1..count-1 and restarts one that dies. Before a restart the rows the dead
    worker had claimed for upload go back on the queue (`recover`)."""

    def __init__(self, cfg: Config, count: int, recover: Callable[[], Awaitable[int]]) -> None:
        self.cfg, self.count, self.recover = cfg, count, recover
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i), name=f"worker-{i}") for i in range(1, self.count)]

    async def _keep(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            try:
                proc = self.procs[index] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agent.worker", "--config", str(self.cfg.path), "--index", str(index),
                    start_new_session=True)  # a Ctrl-C on the terminal reaches the owner, which stops them
                pid, code = proc.pid, await proc.wait()
            except OSError as e:  # e.g. out of memory or pids: try again like after a death
                pid, code = 0, f"not started: {e}"
            if self._stopping:
                return
            failures = 0 if asyncio.get_running_loop().time() - started > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            try:
                resumed: int | str = await self.recover()
            except Exception as e:  # the catalog failed (disk full): the next owner start resets the rows
                resumed = f"failed: {e}"
            log.error("worker_died", worker=index, pid=pid, returncode=code, uploads_resumed=resumed, restart_in=delay)
            self.restarts += 1
            await asyncio.sleep(delay)

    def status(self) -> dict[str, int]:
        """For /healthz: serving processes configured (the owner included), workers running, restarts so far."""
        running = sum(p.returncode is None for p in self.procs.values())
        return {"processes": self.count, "workers_running": running, "restarts": self.restarts}

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        _, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in live], timeout=timeout) \
            if live else (set(), set())
        for p in live:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for t in (*self._tasks, *pending):
            t.cancel()
        await asyncio.gather(*self._tasks, *pending, return_exceptions=True)


