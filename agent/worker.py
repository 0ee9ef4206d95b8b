"""One serving worker process (`python -m agent.worker`, started by agent.workers.Supervisor; docs/workers.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import structlog

from agent.config import Config
from agent.daemon import DRAIN_SECONDS, Agent, run_until_signal
from agent.prefetcher import StudyStarts
from agent.records import Header
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog, Catalog
from agent.workers import PID_DIR, worker_audit

log = structlog.get_logger("pacsgw.workers")


class Worker(Agent):
    """One serving worker: the front ends, the gateway, write-through uploads and its own pressure monitor; no
    queue drain, eviction loop, scrub, prefetch, HA, SMB or HTTP (the owner's: a study this worker saw start is queued
    for its prior planning). Agent.stop drains it like the owner."""

    def __init__(self, cfg: Config, index: int) -> None:
        super().__init__(cfg)
        self.index, self.pid_file = index, cfg.cache.dir / PID_DIR / f"{index}.pid"
        self.starts = StudyStarts(cfg)

    async def start(self) -> None:
        cfg = self.cfg
        self.db = AsyncCatalog(await asyncio.to_thread(Catalog, cfg.catalog_path))
        self.cache = Cache(cfg.cache.dir, clear_staging=False)  # the other processes' writes are in staging
        self._build_uplink()  # the dispatcher (and its reset of claimed rows at start) is the owner's alone
        await self.s3.start()
        await self.line.start()
        self.audit = worker_audit(cfg, self.index, cfg.audit.enabled)
        # and its own pressure monitor; the eviction loop and prior planning stay with the owner
        await self._start_gateway(self.study_started if cfg.prefetch.priors else None)
        await self._serve_ftp_sftp()  # its LoginGuard opens the box's shared counts (agent.auth)
        self.pid_file.parent.mkdir(exist_ok=True)
        self.pid_file.write_text(f"{os.getpid()}\n")
        log.info("worker_started", worker=self.index, pid=os.getpid())

    def study_started(self, path: str, header: Header, user: str) -> None:
        """At the commit of a file that starts a study not seen lately: queued in the catalog for the owner, which
        plans its priors as if stored there (PriorFetcher.adopt_workers), in the next group commit."""
        if (first := self.starts.first(path, header)) is not None:
            h = first[1]
            self.db.queue_worker_study(_study_queued, asyncio.get_running_loop(), path, h.study_uid, h.study_date,
                                       h.modality, h.patient, user)

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        await super().stop(drain_seconds)
        with contextlib.suppress(OSError):
            if self.pid_file.read_text().strip() == str(os.getpid()):
                self.pid_file.unlink()


def _study_queued(result: object) -> None:
    """A study queued for the owner: best effort, as prior planning is (the store itself succeeded)."""
    if isinstance(result, BaseException):
        log.error("worker_study_not_queued", error=repr(result)[:300])


def main(argv: list[str] | None = None) -> int:
    from agent import logs
    p = argparse.ArgumentParser(prog="python -m agent.worker", description="one serving worker (started by "
                                "the agent when [server] workers > 1; not meant to be run by hand)")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    cfg = logs.load_config(args.config)
    structlog.contextvars.bind_contextvars(worker=args.index)
    asyncio.run(run_until_signal(Worker(cfg, args.index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
