"""The upload queue: catalog rows not yet 'clean', pushed to S3 with bounded concurrency and retries.

The queue is the catalog itself, so it survives kill -9 and power loss: on start every 'uploading' row
goes back to 'dirty'. Write-through closes call `transfer` directly (the row was claimed in the same
transaction that committed it); everything else — write-back, retries, renames, rows left by a crash —
is picked up by the dispatcher. Deleted and renamed-away keys are removed by the tombstone loop.
A per-key lock keeps a delete and a put of the same key from overlapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import structlog

from agent.dicom.objectmeta import ObjectMeta, index_row
from agent.metrics import Metrics
from agent.store.cache import Cache
from agent.store.catalog import Entry
from agent.store.worm import WormPolicy
from agent.uplink.s3 import PutResult, S3Uplink, error_code, is_unreachable, meta_sha, precondition_failed

log = structlog.get_logger("pacsgw.uplink")

PROBE_INTERVAL = 2.0
IDLE_POLL = 5.0
LINE_CHECK_TIMEOUT = 3.0
CONFLICTS = ".pacsgw-conflicts"  # where an HA box keeps content it must not write over the other box's


def backoff(attempts: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) of the nominal delay."""
    return min(cap, base * 2 ** min(attempts, 16)) * random.uniform(0.5, 1.5)


class Limiter:
    """A semaphore whose limit can change while it is in use (memory pressure lowers it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._cond = asyncio.Condition()

    async def set_limit(self, limit: int) -> None:
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()


@dataclass
class UplinkHealth:
    reachable: bool = True
    last_error: str = ""
    since: float = 0.0


class Uploader:
    def __init__(self, db, cache: Cache, s3: S3Uplink, metrics: Metrics, max_concurrency: int,
                 worm: WormPolicy, describe: Callable[[str, int, int], ObjectMeta] | None = None) -> None:
        self.db, self.cache, self.s3, self.metrics, self.worm = db, cache, s3, metrics, worm
        self.describe = describe  # (path, fd, size) → the object's metadata and tags (DICOM header)
        self.slots = Limiter(max_concurrency)
        self.max_concurrency = max_concurrency
        self.health = UplinkHealth(since=time.time())
        self._wake = asyncio.Event()
        self._reachable = asyncio.Event()
        self._reachable.set()
        self._key_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        # In an HA pair (agent/ha.py) every PUT is conditional: never over an object this box did not know.
        self.conditional = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        resumed = await self.db.reset_uploading()
        if resumed:
            log.info("uploads_resumed", files=resumed)
        self._loops = [asyncio.create_task(self._dispatch(), name="upload-dispatch"),
                       asyncio.create_task(self._tombstones(), name="tombstones")]
        try:
            await self.s3.probe()
        except Exception as e:  # noqa: BLE001 - any failure means 'not reachable yet'
            self._unreachable(e)

    async def stop(self, timeout: float) -> None:
        """Let in-flight transfers finish (up to timeout); what remains stays queued in the catalog."""
        for t in self._loops:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    # --- health ---------------------------------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> None:
        self.health.last_error = f"{error_code(exc)}: {exc}"[:300]
        if self.health.reachable:
            self.health.reachable, self.health.since = False, time.time()
            self._reachable.clear()
            self.metrics.uplink_up.set(0)
            log.warning("uplink_unreachable", error=self.health.last_error, mode="write-back")
            self._loops.append(asyncio.create_task(self._probe(), name="uplink-probe"))

    def _reached(self) -> None:
        if not self.health.reachable:
            log.info("uplink_reachable", down_seconds=round(time.time() - self.health.since, 1))
            self.health.reachable, self.health.since, self.health.last_error = True, time.time(), ""
            self._reachable.set()
            self.wake()
        self.metrics.uplink_up.set(1)

    async def check_line(self) -> None:
        """Probe the line now, not only when an upload fails: an HA box must give up the address on a dead
        line even when no upload is in flight."""
        if not self.health.reachable:
            return  # the probe loop runs until the line is back
        try:
            # A pooled connection into a dead line waits for the whole read timeout: a HEAD answers faster.
            await asyncio.wait_for(self.s3.probe(), LINE_CHECK_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - only 'unreachable' matters here; uploads report the rest
            if is_unreachable(e):
                self._unreachable(e)

    async def _probe(self) -> None:
        while not self.health.reachable:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self.s3.probe()
            except Exception as e:  # noqa: BLE001
                self.health.last_error = f"{error_code(e)}: {e}"[:300]
                continue
            self._reached()

    # --- transfers -------------------------------------------------------------------------------

    def key_lock(self, key: str) -> asyncio.Lock:
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = asyncio.Lock()
        return lock

    async def transfer(self, e: Entry) -> bool:
        """Upload (or server-side copy) one claimed row; → True when it is clean in S3."""
        async with self.slots, self.key_lock(e.path):
            t0 = time.monotonic()
            try:
                if e.copy_from:
                    result = await self._copy_or_upload(e)
                else:
                    result = await self._upload(e)
            except asyncio.CancelledError:
                await asyncio.shield(self.db.mark_failed(e.path, e.gen, "cancelled", time.time()))
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried from the durable queue
                retry_at = time.time() + backoff(e.attempts)
                await self.db.mark_failed(e.path, e.gen, f"{error_code(exc)}: {exc}", retry_at)
                self.metrics.uploads.labels("error").inc()
                if is_unreachable(exc):
                    self._unreachable(exc)
                else:
                    log.error("upload_failed", path=e.path, error=error_code(exc), detail=str(exc)[:300],
                              attempts=e.attempts + 1, retry_in=round(retry_at - time.time(), 1))
                return False
            try:
                clean = await self.db.mark_clean(e.path, e.gen, result.etag, result.version_id, e.sha256)
            except Exception as exc:  # noqa: BLE001 - e.g. the catalog's disk is full: retry the row later
                log.error("catalog_update_failed", path=e.path, error=error_code(exc), detail=str(exc)[:300])
                with contextlib.suppress(Exception):
                    await self.db.mark_failed(e.path, e.gen, f"catalog: {exc}", time.time() + backoff(e.attempts))
                return False
            elapsed = time.monotonic() - t0
            self.metrics.uploads.labels("ok").inc()
            self.metrics.upload_seconds.observe(elapsed)
            self._reached()
            log.info("uploaded", path=e.path, bytes=e.size, seconds=round(elapsed, 4),
                     parts=result.parts, copy=bool(e.copy_from), superseded=not clean)
            return clean

    async def _upload(self, e: Entry):  # noqa: ANN202
        if e.blob is None:
            raise FileNotFoundError(f"{e.path}: no cached content to upload")
        # The object this box last knew (its etag), or none at all: S3 refuses the PUT if that changed.
        condition = ({"IfMatch": e.etag} if e.etag else {"IfNoneMatch": "*"}) if self.conditional else None
        fd = await asyncio.to_thread(self.cache.open_blob, e.blob)
        try:
            meta = await asyncio.to_thread(self.describe, e.path, fd, e.size) if self.describe else None
            try:
                result = await self.s3.put_file(e.path, fd, e.size, e.sha256, self.worm.lock_for(e.path, e.mtime),
                                                meta, condition)
            except Exception as exc:
                if condition is None or not precondition_failed(exc):
                    raise
                result = await self._not_overwritten(e, fd)
        finally:
            os.close(fd)
        if meta and (row := index_row(e.path, e.size, meta.metadata)):
            await self.db.index_dicom([row])
        self.metrics.uploaded_bytes.inc(e.size)
        return result

    async def _not_overwritten(self, e: Entry, fd: int) -> PutResult:
        """A conditional PUT was refused: the key holds an object this box did not know."""
        head = await self.s3.head(e.path)
        if head is not None and meta_sha(head.get("Metadata")) == e.sha256:
            return PutResult(head.get("ETag"), head.get("VersionId"))  # our own PUT, whose answer was lost
        # The other box stored this path after this box last saw it (its content is the newer one: this box's
        # queue predates its failure). Keep this copy beside the namespace and take the other box's object.
        side = f"{CONFLICTS}/{e.path}.{e.sha256[:16]}"
        result = await self.s3.put_file(side, fd, e.size, e.sha256)
        blob = await self.db.adopt_remote(e.path, e.gen, head["ContentLength"] if head else None,
                                          head.get("ETag") if head else None)
        if blob:
            self.cache.remove(blob)
        log.error("ha_conflict", path=e.path, kept_as=side, remote_etag=head.get("ETag") if head else None,
                  reason="the other box of the HA pair wrote this path after this box last knew it; its object stays")
        return result

    async def _copy_or_upload(self, e: Entry):  # noqa: ANN202
        if await self.s3.head(e.copy_from) is None:
            # The source went away (deleted behind our back): upload from the cache if we still can.
            await self.db.drop_copy_source(e.path, e.gen)
            return await self._upload(e)
        result = await self.s3.copy(e.copy_from, e.path, e.sha256, self.worm.lock_for(e.path, e.mtime))
        await self.db.copy_dicom_row(e.copy_from, e.path)  # the copy carries the source's metadata
        return result

    # --- background loops ------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._reachable.wait()
            self._wake.clear()
            room = self.slots.limit * 2 - len(self._tasks)
            rows = await self.db.due_uploads(time.time(), max(room, 0)) if room > 0 else []
            for row in rows:
                if await self.db.claim(row.path, row.gen):
                    self.start_transfer(row)
            if rows and room > 0:
                continue
            next_due = await self.db.next_due()
            delay = IDLE_POLL if next_due is None else min(IDLE_POLL, max(0.05, next_due - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def start_transfer(self, e: Entry) -> asyncio.Task:
        """Run `transfer` for a claimed row as a task the drain on stop waits for."""
        task = asyncio.create_task(self.transfer(e))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.wake()

    async def _tombstones(self) -> None:
        while True:
            await self._reachable.wait()
            keys = await self.db.due_tombstones(time.time(), 100)
            for key in keys:
                async with self.key_lock(key):
                    if not await self.db.tombstone_pending(key):
                        continue  # the key was written again meanwhile: nothing to delete
                    try:
                        await self.s3.delete(key)
                    except Exception as exc:  # noqa: BLE001
                        await self.db.tombstone_failed(key, time.time() + backoff(1))
                        if is_unreachable(exc):
                            self._unreachable(exc)
                            break
                        log.error("delete_failed", path=key, error=error_code(exc))
                        continue
                    await self.db.tombstone_done(key)
                    log.info("deleted", path=key)
            if not keys:
                await asyncio.sleep(1.0)
