"""Wires the parts together, runs them on one asyncio loop, and drains gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog

from agent import __version__
from agent.config import Config
from agent.metrics import Metrics
from agent.serve.ftp import FtpServer
from agent.serve.http import HttpServer, judge, model_info, process_memory
from agent.serve.sftp import SftpService
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.gateway import Gateway
from agent.uplink.s3 import S3Uplink
from agent.uplink.uploader import Uploader

log = structlog.get_logger("pacsgw.daemon")

DRAIN_SECONDS = 60.0


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.started = time.time()
        self.draining = False
        self.ftp: FtpServer | None = None
        self.sftp: SftpService | None = None
        self.http: HttpServer | None = None

    async def start(self) -> None:
        cfg = self.cfg
        cfg.cache.dir.mkdir(parents=True, exist_ok=True)
        self.db = AsyncCatalog(await asyncio.to_thread(Catalog, cfg.catalog_path))
        self.cache = Cache(cfg.cache.dir)
        self.s3 = S3Uplink(cfg.uplink)
        await self.s3.start()
        self.uploader = Uploader(self.db, self.cache, self.s3, self.metrics, cfg.uplink.max_concurrency)
        await self.uploader.start()
        self.gateway = Gateway(cfg, self.db, self.cache, self.s3, self.uploader, self.metrics)
        await self.gateway.start()
        if cfg.ftp.enabled:
            self.ftp = FtpServer(cfg, self.gateway)
            await self.ftp.start(*cfg.ftp.listen)
        if cfg.sftp.enabled:
            self.sftp = SftpService(cfg, self.gateway)
            await self.sftp.start()
        if cfg.http.enabled:
            self.http = HttpServer(*cfg.http.listen, health=self.health, metrics=self.render_metrics)
            await self.http.start()
        log.info("started", version=__version__, config=str(cfg.path),
                 ftp=cfg.ftp.listen if cfg.ftp.enabled else None,
                 sftp=cfg.sftp.listen if cfg.sftp.enabled else None,
                 http=cfg.http.listen if cfg.http.enabled else None,
                 uplink=cfg.uplink.endpoint_url, bucket=cfg.uplink.bucket, write_mode=cfg.uplink.write_mode,
                 uplink_reachable=self.uploader.reachable)

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """No new sessions; let in-flight transfers and uploads finish; the rest stays queued on disk."""
        self.draining = True
        t0 = time.monotonic()
        log.info("draining", active_writes=self.gateway.active_writes)
        if self.ftp:
            self.ftp.server.close()
        if self.sftp:
            self.sftp.stop_accepting()
        drained = await self.gateway.wait_writes_idle(drain_seconds)
        if self.ftp:
            await self.ftp.close()
        if self.sftp:
            await self.sftp.close()
        await self.uploader.stop(max(1.0, drain_seconds - (time.monotonic() - t0)))
        await self.gateway.stop()
        if self.http:
            await self.http.close()
        await self.s3.close()
        totals = await self.db.totals()
        await asyncio.to_thread(self.db.shutdown)
        log.info("stopped", drained=drained, queued_files=totals.queue_files,
                 seconds=round(time.monotonic() - t0, 2))

    async def health(self) -> dict[str, Any]:
        totals = await self.db.totals()
        oldest = await self.db.oldest_dirty()
        disk = self.cache.disk_usage()
        up = self.uploader.health
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
                      "max_bytes": self.cfg.cache.max_bytes, "disk_total": disk.total, "disk_free": disk.free},
            "memory": process_memory(),
            "model": model_info(self.cfg.model.path),
        }
        h["status"], h["reasons"] = judge(h, self.cfg.cache.min_free_bytes)
        return h

    async def render_metrics(self) -> bytes:
        totals = await self.db.totals()
        self.metrics.queue_depth.set(totals.queue_files)
        self.metrics.queue_bytes.set(totals.queue_bytes)
        self.metrics.cached_bytes.set(totals.cached_bytes)
        self.metrics.uplink_up.set(1 if self.uploader.reachable else 0)
        return self.metrics.render()


async def serve(cfg: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    agent = Agent(cfg)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
