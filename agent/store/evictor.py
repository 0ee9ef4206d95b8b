"""Runs the policy stack's eviction (agent/policy/stack.py, the runner the simulator drives too) against the live cache:
the policy decides from the catalog's rows; this module feeds it what changed since the last pass and drops the copies
it picks. Only `clean` files are offered, and `Catalog.uncache` re-checks in its transaction (docs/architecture.md,
"Evict only clean"). A pass frees what it was asked to plus the rest of the last study it started (a radiologist waits
for all of one; `adaptive` cuts it short instead: agent/policy/eviction.py `trim`)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np
import structlog

from agent.config import CacheConfig
from agent.metrics import Metrics
from agent.policy import eviction
from agent.policy.stack import CatalogRow, PolicyStack, StackSpec
from agent.store.access import AccessStats
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog
from agent.store.catalog.heat import EvictionRow as Row
from agent.store.paths import study_of
from agent.store.writing import ReadPins

log = structlog.get_logger("pacsgw.evict")


@dataclass(frozen=True)
class Victim:
    path: str
    gen: int
    size: int
    last_access: float
    access_count: int
    cluster: int | None     # k-means cluster rank (0 = coldest), None for lru/age or too few files
    score: float | None     # k-means hotness score


@dataclass(frozen=True)
class Candidates:
    """The clean cached files as the policy sees them, with what is needed to evict them."""

    table: eviction.FileTable
    paths: list[str]
    gens: np.ndarray


def stack_for(c: CacheConfig, planners: tuple[str, ...] = (), priors_k: int = 3) -> PolicyStack:
    return PolicyStack(StackSpec(c.eviction, planners), priors_k=priors_k,
                       kmeans=eviction.KMeansConfig(refit_seconds=c.kmeans_refit_seconds), max_age_days=c.age_max_days)


def candidates(rows: list[Row]) -> Candidates:
    """Catalog rows (`Row`) → the policy's FileTable."""
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), (), (), ()]
    paths = list(cols[0])
    parents = np.array([p.rpartition("/")[0] for p in paths], dtype=object)
    directory = np.unique(parents, return_inverse=True)[1] if paths else np.zeros(0, dtype=np.int64)
    table = eviction.FileTable(key=np.arange(len(paths)), size=np.array(cols[2], dtype=np.int64),
                               last_access=np.array(cols[3], dtype=np.float64),
                               access_count=np.array(cols[4], dtype=np.int64),
                               created=np.array(cols[5], dtype=np.float64), directory=directory)
    return Candidates(table, paths, np.array(cols[1], dtype=np.int64))


class Evictor:
    SYNC_S = 60.0
    # Passes wait up to this long after a new study's first file for its priors to be planned and fetched
    # (plans_pending): a plan weighs the cache as that write left it and its files land before a pass weighs them, as in
    # the simulator; a pass in between evicted a prior the plan then fetched again, settled it as unread first (its
    # cell's heat fell), or freed the room for a plan's last files from its first ones
    PLAN_WAIT_S = 5.0

    def __init__(self, cfg: CacheConfig, db: AsyncCatalog, cache: Cache, metrics: Metrics, reads: AccessStats) -> None:
        self.cfg, self.db, self.cache, self.metrics = cfg, db, cache, metrics
        self.reads = reads  # buffered for seconds: flushed first, the policy must see the latest
        self.pins = ReadPins(cache.root / "reading.lock")  # the copies readers of every serving process hold open
        self.use(stack_for(cfg), 3)
        self._lock = asyncio.Lock()
        self._synced = 0.0
        self._hits: list[tuple[float, float, float]] = []   # (time, hits, misses) samples: recent hit ratio
        # (seconds) → whether a study stored that recently has priors to plan or fetch: the daemon's planner says
        self.plans_pending: Callable[[float], bool] = lambda within: False

    def use(self, stack: PolicyStack, study_depth: int) -> None:
        """Run this stack (the daemon hands over the one its prior-study planner shares)."""
        self.stack, self.policy, self.study_depth = stack, stack.policy, study_depth

    @property
    def last_k(self) -> int | None:
        """The k of the last K-means fit (None: another policy, or not fitted yet)."""
        return getattr(self.policy, "last_k", None)

    def recent_hit_ratio(self, window_s: float = 3600.0) -> float | None:
        """Reads served from the cache over about the last `window_s` (None: no reads yet)."""
        now = time.time()
        value = self.metrics.registry.get_sample_value
        hits, misses = value("pacsgw_cache_hits_total") or 0.0, value("pacsgw_cache_misses_total") or 0.0
        self._hits.append((now, hits, misses))
        while len(self._hits) > 2 and self._hits[1][0] < now - window_s:
            self._hits.pop(0)
        _, h0, m0 = self._hits[0]
        reads = hits - h0 + misses - m0
        return (hits - h0) / reads if reads else None

    def status(self) -> dict[str, object]:
        return {**self.stack.status(), "recent_hit_ratio": self.recent_hit_ratio()}

    def excess(self, cached: int) -> int:
        """Bytes to free down to the low watermark; 0 under the high one while the disk's free-space reserve holds."""
        c = self.cfg
        disk = self.cache.disk_usage()
        limit = min(c.max_bytes, disk.total)
        used = max(cached, disk.used) if c.max_bytes >= disk.total else cached
        if used < c.high_watermark * limit and disk.free > c.min_free_bytes:
            return 0
        return int(used - c.low_watermark * limit)

    async def plan(self, bytes_to_free: int, *, explain: bool = False) -> list[Victim]:
        """What the policy would evict to free bytes_to_free, in eviction order (no file is touched);
        explain: with each file's k-means cluster and score (for `pacsgw evict --dry-run`)."""
        await self.flush_reads()
        rows = await self.db.eviction_rows(self.cfg.eviction_candidates)
        cand = candidates(rows)
        now = time.time()
        # the policy (sklearn for kmeans) is CPU work: off the event loop. A dry run asks a copy: asking an online
        # policy for victims takes them out of its index
        stack = copy.deepcopy(self.stack) if explain and self.stack.online else self.stack
        order = await asyncio.to_thread(self._choose, stack, rows, cand, bytes_to_free, now)
        if stack is self.stack:
            self._synced = now
        cluster, score = (await asyncio.to_thread(self.policy.clusters, cand.table, now)
                          if explain and isinstance(self.policy, eviction.KMeansEviction) else (None, None))
        t = cand.table
        return [Victim(cand.paths[i], int(cand.gens[i]), int(t.size[i]), float(t.last_access[i]),
                       int(t.access_count[i]), None if cluster is None else int(cluster[i]),
                       None if score is None else round(float(score[i]), 4)) for i in order.tolist()]

    def _sync(self, stack: PolicyStack, rows: list[Row], now: float) -> None:
        # a file's study is its header's StudyInstanceUID (the study index), as a trace's study column is the
        # simulator's; a file not in the index (not DICOM, an archive file read on a miss) keeps its directory's
        stack.sync((CatalogRow(p, size, last, count, mtime, uid or study_of(p, self.study_depth), at, by)
                    for p, _, size, last, count, mtime, at, by, uid in rows), now)

    def _choose(self, stack: PolicyStack, rows: list[Row], cand: Candidates,
                bytes_to_free: int, now: float) -> np.ndarray:
        """Row indices to evict, in order: the runner is fed this pass's view, then asked."""
        self._sync(stack, rows, now)
        if not stack.online:   # batch (kmeans): one call over the table
            return stack.policy.select_victims(cand.table, bytes_to_free, now)
        row_of = {p: i for i, p in enumerate(cand.paths)}
        out = [row_of[k] for k in stack.victims(bytes_to_free, now, lambda: (cand.table, cand.paths))
               if k in row_of]      # after the sync every key the policy holds is one of this pass's rows
        return np.array(out, dtype=np.int64)

    async def flush_reads(self) -> None:
        """Reads buffered since the last flush reach the catalog (a prior read just now counts as opened)."""
        await self.reads.flush(self.db, self.metrics)

    @contextlib.asynccontextmanager
    async def synced(self) -> AsyncIterator[PolicyStack]:
        """The stack fed the catalog's view of the cache at most a pass interval ago, and no pass until the caller is
        done: a prior plan weighs its priors against what is cached as its study's first write left it (the
        simulator's state then), not as the last pass saw it (a full cache under its high watermark has no pass).
        At most one view per interval: reading and feeding 200 000 rows takes seconds of CPU."""
        async with self._lock:
            now = time.time()
            if now - self._synced >= self.cfg.evict_interval_seconds:
                await self._feed(now)
            yield self.stack

    async def _feed(self, now: float) -> None:
        await self.flush_reads()
        await asyncio.to_thread(self._sync, self.stack, await self.db.eviction_rows(self.cfg.eviction_candidates), now)
        self._synced = now

    async def learn(self) -> None:
        """An online policy learns from the traffic whether or not anything has to go: feed it the
        catalog's view at most every SYNC_S (sessions are minutes apart; the query reads many rows)."""
        now = time.time()
        if self.stack.online and now - self._synced >= self.SYNC_S:
            await self._feed(now)

    async def free(self, bytes_to_free: int, reason: str) -> int:
        if bytes_to_free <= 0:
            return 0
        freed = files = 0
        # Victims a reader holds open (ReadPins) are left: dropped, their space would stay taken until the close.
        # The policy is asked again for what they would have freed, plus them (it offers them again, or others: at
        # worst a pass frees the pinned bytes too many, bounded by cache.max_open_for_reading)
        pinned: dict[str, int] = {}
        async with self._lock:
            while freed < bytes_to_free:
                known = len(pinned)
                for v in await self.plan(bytes_to_free - freed + sum(pinned.values())):
                    with self.pins.evicting(v.path) as unpinned:
                        blob = await self.db.uncache(v.path, v.gen) if unpinned else None
                    if not unpinned:
                        pinned[v.path] = v.size
                    if blob is None:
                        continue  # pinned; or written, read into a new copy or deleted meanwhile: no longer this row
                    self.cache.remove(blob)
                    freed += v.size
                    files += 1
                    self.metrics.evictions.inc()
                    self.metrics.evicted_bytes.inc(v.size)
                if len(pinned) == known:
                    break  # no new pinned victim: another round would offer what this one did
        if files or pinned:
            log.info("eviction_pass", policy=self.policy.name, reason=reason, files=files, bytes=freed,
                     wanted=bytes_to_free, k=self.last_k, pinned=len(pinned))
        return freed

    async def prepare(self) -> None:
        """Load the policy's libraries before the front ends serve. sklearn's import (~1.3 s of CPU, mostly
        holding the GIL) used to happen at the first K-means fit, stalling the event loop mid-transfers."""
        if isinstance(self.policy, eviction.KMeansEviction):
            await asyncio.to_thread(importlib.import_module, "sklearn.cluster")

    async def refit_if_due(self) -> None:
        """K-means: fit again once the model is kmeans_refit_seconds old, whether or not anything has to go,
        so the clusters follow the cache and the next pass under pressure does not wait for a fit."""
        if not isinstance(p := self.policy, eviction.KMeansEviction) or p.cfg.refit_seconds <= 0:
            return
        now = time.time()
        if p.fitted_at is not None and now - p.fitted_at < p.cfg.refit_seconds:
            return
        cand = candidates(await self.db.eviction_rows(self.cfg.eviction_candidates))
        if len(cand.table):
            await asyncio.to_thread(p.clusters, cand.table, now)
            if p.fitted_at == now:  # too few (or identical) files are ranked by score alone, without a fit
                log.info("kmeans_fitted", files=len(cand.table), k=p.last_k)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.evict_interval_seconds)
            # each new study holds passes PLAN_WAIT_S at most, and so does a stream of them each pass
            deadline = time.monotonic() + self.PLAN_WAIT_S
            while self.plans_pending(self.PLAN_WAIT_S) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            try:
                async with self._lock:
                    await self.refit_if_due()
                    await self.learn()
                await self.free(self.excess((await self.db.totals()).cached_bytes), "high watermark")
            except Exception as e:  # a failed pass (e.g. disk full) is retried next interval
                log.error("eviction_failed", error=repr(e)[:300])
