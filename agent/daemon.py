"""Wires the parts together, runs them on one asyncio loop, and drains gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import resource
import signal
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import structlog

from agent import __version__
from agent.audit import AuditLog, ship
from agent.auth import GUARD_FILE, LoginGuard
from agent.config import Config, ConfigError, parse_size
from agent.dicom import deltas, snapshot
from agent.dicom.header import read_fd
from agent.dicom.objectmeta import Describer
from agent.dicom.retention import DicomRetention, RetentionGuard
from agent.metrics import Metrics
from agent.monitor import PressureMonitor
from agent.policy.pressure import Level
from agent.prefetcher import DirPrefetcher, Fetcher, PriorFetcher, stack_for
from agent.records import Header
from agent.selfcheck import last_result
from agent.serve.contract import watch_descriptors
from agent.serve.ftp import FtpServer
from agent.serve.http import (
    ADMIN_TOKEN_FILE,
    HttpServer,
    clock_sync,
    issue_admin_token,
    judge,
    model_info,
    process_memory,
)
from agent.serve.sftp import SftpService
from agent.store.access import AccessStats
from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.errors import Unavailable
from agent.store.evictor import Evictor
from agent.store.gateway import ACCESS_FLUSH_SECONDS, Gateway, Refusals
from agent.store.scrub import Scrubber
from agent.supervise import CRASH_SHOWN_SECONDS, Loops
from agent.uplink.line import Line
from agent.uplink.s3 import S3Uplink
from agent.uplink.uploader import Uploader
from agent.workers import Supervisor, open_cache, worker_audits

log = structlog.get_logger("pacsgw.daemon")

DRAIN_SECONDS = 60.0


def take_every_descriptor() -> None:
    """Raise the soft limit of open descriptors to the hard one the per-user caps are sized for (not 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.info("nofile_raised", was=soft, now=want)
    except (ValueError, OSError) as e:
        log.warning("nofile_not_raised", soft=soft, hard=hard, error=str(e))


@contextlib.contextmanager
def _setting(cfg: Config, key: str, value: Any, allowed: str) -> Any:
    """A start-up step that fails on the host (port taken, directory unusable) names its config key."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(cfg.path, key, value, f"{allowed} ({getattr(e, 'strerror', None) or e})") from None


def _listening(cfg: Config, key: str, listen: tuple[str, int]) -> Any:
    return _setting(cfg, key, f"{listen[0]}:{listen[1]}", "an address this box can listen on")


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.started = time.time()
        self.draining = False
        self.ftp: FtpServer | None = None
        self.sftp: SftpService | None = None
        self.smb = None  # agent.serve.smb.SmbService when [smb] is enabled (imports pyfuse3)
        self.ha = None  # agent.ha.HaMonitor when [ha] is enabled
        self.http: HttpServer | None = None
        self.workers: Supervisor | None = None  # [server] workers > 1
        self.priors: PriorFetcher | None = None  # the owner's (a serving worker queues its new studies for it)
        self.loops = Loops(self.metrics)  # background loops, restarted after a crash (a worker's: pressure only)

    async def start(self) -> None:
        cfg = self.cfg
        take_every_descriptor()
        with _setting(cfg, "cache.dir", str(cfg.cache.dir), "a writable directory on the cache SSD"):
            cfg.cache.dir.mkdir(parents=True, exist_ok=True)
            self.db = AsyncCatalog(await asyncio.to_thread(Catalog, cfg.catalog_path))
            # each confirmed upload queues its study-index row for the next index delta (agent/dicom/deltas.py)
            self.db.catalog.ship_index = bool(cfg.dicom.snapshot_interval and cfg.dicom.delta_interval)
            self.cache = open_cache(cfg)  # Cache(cfg.cache.dir), minding workers a dead owner left serving
        self._build_uplink()
        await self.s3.start()
        if cfg.compliance.worm:
            await self._check_object_lock()
        # In an HA pair every PUT is conditional, also the queue a returning box uploads before its monitor runs
        self.uploader.conditional = cfg.ha.enabled
        await self.uploader.start()
        await self.line.start()
        self.audit = AuditLog(Path(cfg.audit.path), cfg.audit.max_bytes, cfg.audit.keep, cfg.audit.enabled)
        if cfg.audit.enabled and cfg.audit.ship:  # the rotated audit files of the owner, then of each serving worker
            for i, audit in enumerate([self.audit, *worker_audits(cfg)]):
                self.loops.start(f"audit-ship-{i}" if i else "audit-ship",
                                 functools.partial(ship, audit, self.s3, cfg.audit.ship_prefix))
        # prior prefetch hears of every store; self.priors is built below, before any front end serves
        await self._start_gateway((lambda path, header, user: self.priors.on_stored(path, header, user))
                                  if cfg.prefetch.priors else None)
        if cfg.ha.enabled:
            from agent.ha import HaMonitor
            self.ha = HaMonitor(cfg, self.gateway, self.db, self.refusals, self.uploader, self.s3, self.cache,
                                self.audit, self.metrics, self.loops)
            await self.ha.start()
        # the study-index snapshot and the deltas between snapshots, by the active box only (agent/dicom)
        def active() -> bool:
            return self.ha is None or self.ha.state.role == "active"
        if cfg.dicom.snapshot_interval:
            self.loops.every("index-snapshot", cfg.dicom.snapshot_interval, lambda: snapshot.scheduled(cfg, active))
        if cfg.dicom.snapshot_interval and cfg.dicom.delta_interval:
            self.loops.every("index-deltas", cfg.dicom.delta_interval,
                             lambda: deltas.ship(cfg, self.db, self.s3, active))
        fetcher = Fetcher(self.gateway, self.db, lambda: self.monitor.current.level)
        stack = stack_for(cfg)   # one policy stack: the evictor and the prior-study planner share it
        self.evictor.use(stack, cfg.prefetch.study_depth)
        self.loops.start("evict", self.evictor.run)
        self.prefetcher = DirPrefetcher(cfg, self.db, self.gateway, fetcher)
        if cfg.prefetch.enabled:
            self.loops.start("prefetch", self.prefetcher.loop)
        self.priors = PriorFetcher(cfg, self.db, self.gateway, fetcher, stack, self.evictor, self.metrics)
        self.evictor.plans_pending = self.priors.planning
        if cfg.prefetch.priors and self.shares_ports:   # new studies the serving workers stored (agent/worker.py)
            self.priors.adopt_workers()
        self.scrubber = Scrubber(self.db, self.cache, cfg.scrub.rate, cfg.scrub.pause_seconds)
        if cfg.scrub.enabled:
            self.loops.start("scrub", self.scrubber.run)
        await self._serve_ftp_sftp()
        if cfg.smb.enabled:
            from agent.serve.smb import SmbService
            self.smb = SmbService(cfg, self.gateway, self.logins)
            await self.smb.start()
        if cfg.http.enabled:
            self.http = HttpServer(*cfg.http.listen, health=self.health, metrics=self.render_metrics, admin={
                ("POST", "/admin/evict"): self.admin_evict, ("GET", "/admin/evict"): self.admin_evict_plan,
                ("GET", "/admin/prefetch"): self.admin_prefetch_plan,
                ("POST", "/admin/prefetch"): self.admin_prefetch_run},
                admin_token=issue_admin_token(cfg.cache.dir / ADMIN_TOKEN_FILE))
            with _listening(cfg, "http.listen", cfg.http.listen):
                await self.http.start()
            if cfg.http.metrics_listen:
                with _listening(cfg, "http.metrics_listen", cfg.http.metrics_listen):
                    await self.http.start_scrape(cfg.http, self.logins)
        if self.shares_ports:  # [server] workers > 1: the serving workers (agent.workers) beside this process
            self.workers = Supervisor(cfg, cfg.server.serving_processes(), self.recover_claims)
            await self.workers.start()
        log.info("started", version=__version__, config=str(cfg.path),
                 **{name: section.listen if section.enabled else None
                    for name, section in (("ftp", cfg.ftp), ("sftp", cfg.sftp), ("smb", cfg.smb), ("http", cfg.http))},
                 uplink=cfg.uplink.endpoint_url, bucket=cfg.uplink.bucket, write_mode=cfg.uplink.write_mode,
                 uplink_reachable=self.line.reachable)

    def _build_uplink(self) -> None:
        """The S3 client, the line and the uploader, not yet started (a worker never starts the dispatcher)."""
        cfg = self.cfg
        self.s3 = S3Uplink(cfg.uplink)
        self.s3.known_sizes = self.db.known_sizes  # listings of compressed objects: logical sizes
        self.line = Line(self.s3.probe, self.metrics, cfg.uplink.max_concurrency, self.s3.bandwidth)
        retention = DicomRetention(cfg.compliance)
        # one set of rules: the uploader locks objects by them, the gateway refuses changes by them
        self.worm = RetentionGuard(retention, self.cache, self.s3)
        self.describer = Describer(cfg.dicom, retention.retention_class,
                                   bool(retention.rules) or cfg.uplink.compress != "off")
        self.uploader = Uploader(self.db, self.cache, self.s3, self.line, self.metrics, retention, self.describer)

    async def _start_gateway(self, on_stored: Callable[[str, Header, str], None] | None = None) -> None:
        """The gateway and the parts the agent keeps (after _build_uplink); the pressure monitor, in every process.
        A stored file's header is read once, at its commit, if prior prefetch (on_stored) or the uploader reads it."""
        cfg = self.cfg
        self.refusals = Refusals()
        access = AccessStats(cfg.prefetch.dir_depth)
        self.evictor = Evictor(cfg.cache, self.db, self.cache, self.metrics, access)
        self.gateway = Gateway(cfg, self.db, self.cache, self.s3, self.uploader, self.metrics, self.audit,
                               worm=self.worm, access=access, evictor=self.evictor, refusals=self.refusals,
                               on_stored=on_stored,
                               read_header=read_fd if on_stored is not None or self.describer.reads else None)
        await self.evictor.prepare()  # before any front end serves; a full disk makes a worker evict too
        self.loops.every("access-flush", ACCESS_FLUSH_SECONDS, self.gateway.flush_access)
        self.monitor = PressureMonitor(cfg, self.db, self.cache, self.gateway, self.line, self.metrics, self.refusals)
        await self.monitor.sample()
        self.loops.every("pressure", cfg.pressure.interval_seconds, self.monitor.sample)
        # one count of failed logins and sessions for every front end of every serving process of the box
        self.logins = LoginGuard(cfg.login, self.metrics, self.audit, cfg.cache.dir / GUARD_FILE)

    async def _serve_ftp_sftp(self) -> None:
        """FTP and SFTP listeners: the owner's and every worker's (SO_REUSEPORT when several processes serve)."""
        cfg, logins = self.cfg, self.logins
        if cfg.ftp.enabled:
            self.ftp = FtpServer(cfg, self.gateway, logins)
            with _listening(cfg, "ftp.listen", cfg.ftp.listen):
                await self.ftp.start(*cfg.ftp.listen, reuse_port=self.shares_ports)
        if cfg.sftp.enabled:
            self.sftp = SftpService(cfg, self.gateway, logins)
            with _listening(cfg, "sftp.listen", cfg.sftp.listen):
                await self.sftp.start(reuse_port=self.shares_ports)

    @property
    def shares_ports(self) -> bool:
        """Several processes serve FTP and SFTP (docs/workers.md): every listener takes SO_REUSEPORT."""
        return self.cfg.server.serving_processes() > 1

    async def recover_claims(self) -> int:
        """A worker died: the rows it had claimed for upload go back on the queue (others' too: harmless twice)."""
        resumed = await self.db.reset_uploading()
        self.uploader.wake()
        return resumed

    async def _check_object_lock(self) -> None:
        """WORM needs a bucket created with Object Lock: refuse to run against one without."""
        try:
            enabled = await self.s3.object_lock_enabled()
        except Exception as e:  # unreachable now: checked by S3 itself on every locked PUT
            log.warning("object_lock_unchecked", bucket=self.cfg.uplink.bucket, error=str(e)[:200])
            return
        if not enabled:
            raise SystemExit(f"pacsgw: [compliance] worm = true but bucket {self.cfg.uplink.bucket!r} has no "
                             "Object Lock; create the bucket with Object Lock enabled (it cannot be added later "
                             "on most S3 services) or set worm = false")

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """No new sessions; let in-flight transfers and uploads finish; the rest stays queued on disk."""
        self.draining = True
        t0 = time.monotonic()
        log.info("draining", active_writes=self.gateway.active_writes)
        workers = asyncio.create_task(self.workers.stop(drain_seconds + 10)) if self.workers else None
        listeners = [listener for listener in (self.ftp, self.sftp, self.smb) if listener]
        for listener in listeners:
            listener.stop_accepting()
        drained = await self.gateway.wait_writes_idle(drain_seconds)
        if self.smb:
            drained = await self.smb.wait_files_closed(max(0.0, drain_seconds - (time.monotonic() - t0))) and drained
        for listener in listeners:
            await listener.close()
        if self.priors is not None:  # no store starts a plan now; one running must not outlive the line and the catalog
            await self.priors.stop()
        await self.loops.stop()  # the HA monitor's too
        await self.uploader.stop(max(1.0, drain_seconds - (time.monotonic() - t0)))
        await self.line.stop()
        try:
            await self.gateway.flush_access()
        except Unavailable as e:  # a read-only cache disk: the counts are lost, the stop goes on
            log.warning("stop_unsaved", what="access counts since the last flush", error=str(e))
        if self.http:
            await self.http.close()
        if workers:
            await workers
        await self.s3.close()
        self.audit.close()
        self.logins.close()
        totals = await self.db.totals()
        await asyncio.to_thread(self.db.shutdown)
        log.info("stopped", drained=drained, queued_files=totals.queue_files, seconds=round(time.monotonic() - t0, 2))

    async def health(self) -> dict[str, Any]:
        totals = await self.db.totals()
        oldest = await self.db.oldest_dirty()
        disk = self.cache.disk_usage()
        up = self.line.health
        mode = self.cfg.uplink.write_mode
        h: dict[str, Any] = {
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started, 1),
            "draining": self.draining,
            "uplink": {"reachable": up.reachable, "endpoint": self.cfg.uplink.endpoint_url,
                       "bucket": self.cfg.uplink.bucket, "prefix": self.cfg.uplink.prefix,
                       "last_error": up.last_error, "since": up.since},
            "write_mode": mode if up.reachable else f"{mode} (degraded to write-back)",
            "queue_depth": totals.queue_files,
            "queue_bytes": totals.queue_bytes,
            "oldest_dirty_seconds": round(time.time() - oldest, 1) if oldest else 0.0,
            "pending_deletes": await self.db.tombstone_count(),
            "cache": {"files": totals.files, "cached_files": totals.cached_files, "bytes": totals.cached_bytes,
                      "max_bytes": self.cfg.cache.max_bytes, "disk_total": disk.total, "disk_free": disk.free,
                      "inodes_free": disk.inodes_free},
            "catalog": {"write_failure": self.db.catalog.write_failure},
            "memory": process_memory(),
            "model": model_info(self.cfg.model.path),
            "pressure": {"level": str(self.monitor.current.level), "reasons": list(self.monitor.current.reasons)},
            "prefetch": self.prefetch_health(),
            "eviction": {"policy": self.cfg.cache.eviction, "k": self.evictor.last_k, **self.evictor.status()},
            "scrub": {"passes": self.scrubber.passes, "last_pass_end": self.scrubber.last_pass_end},
            "clock": clock_sync(),
            "selfcheck": last_result(self.cfg),
        }
        if self.smb is not None:
            h["smb"] = self.smb.health()
        if self.ha is not None:
            h["ha"] = self.ha.health(totals.queue_files, self.draining)
        if self.workers is not None:
            h["workers"] = self.workers.status()
        loops = [self.loops, self.line.loops, self.uploader.loops]
        h["loops"] = {name: s for part in loops for name, s in part.status().items()}
        h["status"], h["reasons"] = judge(h, self.cfg.cache.min_free_bytes)
        h["reasons"] += [f"background loop {name} crashed {s['crashes']} times, last: {s['last_error']}"
                         for name, s in h["loops"].items() if time.time() - s["last_crash"] < CRASH_SHOWN_SECONDS]
        if h["status"] == "ok" and any(part.crash_looping() for part in loops):
            h["status"] = "degraded"  # its work may not be getting done: a monitor of status must see it
        return h

    def prefetch_health(self) -> dict[str, Any]:
        """Prefetch on /healthz: whether it runs, and why not (pressure pauses it)."""
        p, level = self.cfg.prefetch, self.monitor.current.level
        if not p.enabled:
            state = "disabled"
        elif level >= Level.HIGH:
            state = f"paused: pressure {level}"
        else:
            state = "running" if self.prefetcher.status.running else "idle"
        return {"state": state, "window": "-".join(f"{t // 3600:02d}:{t % 3600 // 60:02d}" for t in p.window),
                "priors": p.priors, "priors_over_cap": self.priors.over_cap, "last_run": asdict(self.prefetcher.status),
                "model": str(self.prefetcher.predictor.path) if self.prefetcher.predictor else None,
                "model_state": self.prefetcher.model_state}

    async def admin_prefetch_plan(self, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`pacsgw prefetch --dry-run`: what a run now would fetch and why, and the last run's progress."""
        plan = {} if "status" in query else (await self.prefetcher.plan(time.time())).as_json()
        return 200, plan | {"status": asdict(self.prefetcher.status)}

    async def admin_prefetch_run(self, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`pacsgw prefetch`: start a run now (it ends with the current window, or after a window's length)."""
        if self.prefetcher.status.running:
            return 409, {"error": "a prefetch run is already running", "status": asdict(self.prefetcher.status)}
        if self.monitor.current.level >= Level.HIGH:
            return 409, {"error": f"prefetch paused: pressure {self.monitor.current.level} "
                                  f"({'; '.join(self.monitor.current.reasons)})"}
        self.loops.start("prefetch-now", self.prefetcher.run)
        await asyncio.sleep(0)  # let it take the lock and mark itself running before we answer
        return 202, {"started": True}

    async def admin_evict_plan(self, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`pacsgw evict --dry-run`: what the policy would evict now (to the low watermark, or `bytes`)."""
        totals = await self.db.totals()
        try:
            want = parse_size(query["bytes"]) if "bytes" in query else self.evictor.excess(totals.cached_bytes)
        except ValueError:
            return 400, {"error": f"bytes={query['bytes']!r} is not a size such as '10MB'"}
        victims = await self.evictor.plan(want, explain=True)
        return 200, {"policy": self.cfg.cache.eviction, "bytes_to_free": want, "cached_bytes": totals.cached_bytes,
                     "k": self.evictor.last_k, "victims": [asdict(v) for v in victims]}

    async def admin_evict(self, query: dict[str, str], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Drop one file's cached copy (it must be clean: safe in S3); → (HTTP status, JSON result)."""
        from agent.store.errors import BadPath, GatewayError, NotFound, PermissionDenied
        from agent.store.paths import resolve
        client_path = body.get("path")
        if not isinstance(client_path, str):
            return 400, {"error": 'expected a JSON body {"path": "…"}'}
        try:
            path = resolve("/", "/", client_path)
            evicted = await self.gateway.evict(path)
        except GatewayError as e:
            status = 400 if isinstance(e, (BadPath, PermissionDenied)) else 404 if isinstance(e, NotFound) else 409
            return status, {"path": client_path, "error": e.reason}
        if not evicted:
            return 409, {"path": path, "evicted": False,
                         "error": "not cached, or not yet in object storage (only clean files can be evicted)"}
        return 200, {"path": path, "evicted": True}

    async def render_metrics(self) -> bytes:
        totals = await self.db.totals()
        self.metrics.queue_depth.set(totals.queue_files)
        self.metrics.queue_bytes.set(totals.queue_bytes)
        oldest = await self.db.oldest_dirty()
        self.metrics.queue_oldest.set(time.time() - oldest if oldest else 0)
        self.metrics.cached_bytes.set(totals.cached_bytes)
        self.metrics.uplink_up.set(1 if self.line.reachable else 0)
        return self.metrics.render()


def share_the_gil() -> None:
    """A thread running Python (the evictor feeding its policy: seconds of CPU at 200 000 cached files, each minute)
    kept the GIL up to CPython's 5 ms switch interval each time the event loop woke: a cached reader got 16–151 RETRs
    a second meanwhile, 124–236 with 1 ms (docs/benchmarks.md §35). The collector's full passes hold it with no
    switch at all: at CPython's gen-0 threshold of 700 that sync started seven (51–164 ms, the loop stopped for each),
    one at 10 000, for the same peak memory (§36)."""
    sys.setswitchinterval(0.001)
    gc.set_threshold(10_000, 10, 10)


async def run_until_signal(agent: Agent) -> None:
    """Start the owner or a serving worker (agent.worker), run until SIGTERM or SIGINT, then drain."""
    share_the_gil()
    watch_descriptors(asyncio.get_running_loop())
    await agent.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
