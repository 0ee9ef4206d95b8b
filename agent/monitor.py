"""Samples memory and disk (psutil), asks the pressure policy for a level, and applies it to the agent."""

from __future__ import annotations

import psutil
import structlog

from agent.config import Config
from agent.metrics import Metrics
from agent.policy.pressure import Level, Pressure, Readings, Watermarks, assess, concurrency_at
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog
from agent.store.gateway import Gateway, Refusals
from agent.uplink.line import Line

log = structlog.get_logger("pacsgw.pressure")


class PressureMonitor:
    def __init__(self, cfg: Config, db: AsyncCatalog, cache: Cache, gateway: Gateway, line: Line,
                 metrics: Metrics, refusals: Refusals) -> None:
        self.cfg, self.db, self.cache, self.gateway, self.line, self.metrics, self.refusals = (
            cfg, db, cache, gateway, line, metrics, refusals)  # refusals.fetch is set here
        p, c = cfg.pressure, cfg.cache
        self.watermarks = Watermarks(c.high_watermark, p.disk_critical, p.memory_high, p.memory_critical,
                                     p.rss_high, p.rss_critical)
        self.current = Pressure(Level.NORMAL, ())
        self._process = psutil.Process()

    async def readings(self) -> Readings:
        totals = await self.db.totals()
        disk = self.cache.disk_usage()
        budget = min(self.cfg.cache.max_bytes, disk.total)
        used = max(totals.cached_bytes, disk.used if self.cfg.cache.max_bytes >= disk.total else 0)
        return Readings(disk_used=used / budget if budget else 1.0, mem_available=psutil.virtual_memory().available,
                        rss=self._process.memory_info().rss)

    async def sample(self) -> Pressure:
        if (new := assess(await self.readings(), self.watermarks)).level != self.current.level:
            (log.warning if new.level > self.current.level else log.info)(
                "pressure", now=str(new.level), was=str(self.current.level), reasons=list(new.reasons))
            await self.line.slots.set_limit(concurrency_at(new.level, self.cfg.uplink.max_concurrency))
            self.refusals.fetch = f"pressure critical ({'; '.join(new.reasons)})" if new.level is Level.CRITICAL else ""
            if new.level >= Level.HIGH:
                await self.gateway.shrink_memory()
        self.current = new
        self.metrics.pressure_level.set(int(new.level))
        return new
