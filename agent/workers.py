"""Serving workers: several processes serve FTP and SFTP on the same ports over one catalog (docs/workers.md).

With `[server] workers = N` (N > 1) the agent's own process, the owner, serves as always and also starts
N-1 workers (`python -m agent.workers`). Every serving process listens with SO_REUSEPORT, so the kernel spreads
new connections over them, and commits to the one SQLite catalog (WAL; every write is BEGIN IMMEDIATE, so the
catalog-wide generation stays unique). A worker uploads what it receives in write-through before it acks,
exactly as the owner does; everything else on the upload queue, eviction, scrub, prefetch, HA, SMB and
HTTP stay with the owner. The owner restarts a worker that dies, after putting the rows it had claimed
back on the queue. A new owner retires the workers a dead owner left behind (they drain, then exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from agent.audit import AuditLog
from agent.config import Config
from agent.daemon import DRAIN_SECONDS, Agent, run_until_signal
from agent.dicom.objectmeta import Describer
from agent.dicom.retention import DicomRetention
from agent.serve.ftp import FtpServer
from agent.serve.sftp import SftpService
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.gateway import Gateway
from agent.store.worm import WormPolicy
from agent.uplink.line import Line
from agent.uplink.s3 import S3Uplink
from agent.uplink.uploader import Uploader

log = structlog.get_logger("pacsgw.workers")

RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying is restarted ever more slowly
STABLE_SECONDS = 60.0  # a worker that ran this long starts the delays over when it dies


def pid_dir(cfg: Config) -> Path:
    return cfg.cache.dir / "workers"


def worker_audit_path(path: Path, index: int) -> Path:
    """A worker's own audit file beside the owner's (one writer per file: rotation is not multi-process)."""
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


class Worker(Agent):
    """One serving worker: the front ends, the gateway and write-through uploads; no queue drain, eviction,
    scrub, prefetch, HA, SMB or HTTP (the owner's). Agent.stop drains it like the owner."""

    def __init__(self, cfg: Config, index: int) -> None:
        super().__init__(cfg)
        self.index = index
        self._scrub = self._ship = self._monitor = self._prefetch = self._prefetch_now = None
        self.ha = None

    async def start(self) -> None:
        cfg = self.cfg
        self.db = AsyncCatalog(await asyncio.to_thread(Catalog, cfg.catalog_path))
        self.cache = Cache(cfg.cache.dir, clear_staging=False)  # the other processes' writes are in staging
        self.s3 = S3Uplink(cfg.uplink)
        self.line = Line(self.s3.probe, self.metrics, cfg.uplink.max_concurrency, self.s3.bandwidth)
        await self.s3.start()
        retention = DicomRetention(cfg.compliance, WormPolicy(cfg.compliance))
        # Not started: the dispatcher (and its reset of claimed rows at start) is the owner's alone.
        self.uploader = Uploader(self.db, self.cache, self.s3, self.line, self.metrics, retention,
                                 Describer(cfg.dicom, retention.retention_class, bool(retention.rules)))
        await self.line.start()
        self.audit = AuditLog(worker_audit_path(Path(cfg.audit.path), self.index), cfg.audit.max_bytes,
                              cfg.audit.keep, cfg.audit.enabled)
        self.gateway = Gateway(cfg, self.db, self.cache, self.s3, self.uploader, self.metrics, self.audit)
        await self.gateway.start(evict=False)
        if cfg.ftp.enabled:
            self.ftp = FtpServer(cfg, self.gateway)
            await self.ftp.start(*cfg.ftp.listen, reuse_port=True)
        if cfg.sftp.enabled:
            self.sftp = SftpService(cfg, self.gateway)
            await self.sftp.start(reuse_port=True)
        path = pid_dir(cfg) / f"{self.index}.pid"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"{os.getpid()}\n")
        log.info("worker_started", worker=self.index, pid=os.getpid())

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        await super().stop(drain_seconds)
        with contextlib.suppress(OSError):
            path = pid_dir(self.cfg) / f"{self.index}.pid"
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def _is_worker_of(pid: int, cfg: Config) -> bool:
    """Whether pid is a worker process of this configuration (a pid file may name a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"agent.workers" in argv and str(cfg.path).encode() in argv


def retire_orphans(cfg: Config) -> int:
    """Workers a killed owner left serving: ask them to drain and exit (their new sessions go to the new
    processes, which listen on the same ports). → how many were told."""
    told = 0
    for path in sorted(pid_dir(cfg).glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(path.read_text().strip())
            if _is_worker_of(pid, cfg):
                os.kill(pid, signal.SIGTERM)
                told += 1
                log.warning("worker_retired", pid=pid, reason="left serving by an owner that died")
            path.unlink()
    return told


class Supervisor:
    """In the owner: starts workers 1..count-1 and restarts one that dies. Before a restart the rows the dead
    worker had claimed for upload go back on the queue (`recover`)."""

    def __init__(self, cfg: Config, count: int, recover: Callable[[], Awaitable[int]]) -> None:
        self.cfg, self.count, self.recover = cfg, count, recover
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        retire_orphans(self.cfg)
        self._tasks = [asyncio.create_task(self._keep(i), name=f"worker-{i}") for i in range(1, self.count)]

    async def _keep(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            proc = self.procs[index] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.workers", "--config", str(self.cfg.path), "--index", str(index),
                start_new_session=True)  # a Ctrl-C on the terminal reaches the owner, which stops them
            code = await proc.wait()
            if self._stopping:
                return
            failures = 0 if asyncio.get_running_loop().time() - started > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            resumed = await self.recover()
            log.error("worker_died", worker=index, pid=proc.pid, returncode=code, uploads_resumed=resumed,
                      restart_in=delay)
            await asyncio.sleep(delay)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each drains like the owner), kill what is left after timeout."""
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


def main(argv: list[str] | None = None) -> int:
    from agent import logs
    from agent.cli import _load_or_exit
    p = argparse.ArgumentParser(prog="python -m agent.workers", description="one serving worker (started by "
                                "the agent when [server] workers > 1; not meant to be run by hand)")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    cfg = _load_or_exit(args.config)
    logs.configure(cfg.log.level, cfg.log.format)
    structlog.contextvars.bind_contextvars(worker=args.index)
    asyncio.run(run_until_signal(Worker(cfg, args.index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
