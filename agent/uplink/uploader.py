"""The upload queue: catalog rows not yet 'clean', pushed to S3 with bounded concurrency and retries.

The queue is the catalog itself, so it survives kill -9 and power loss: on start every 'uploading' row goes back to
'dirty'. Write-through closes call `transfer` directly (the row was claimed in the same transaction that committed it);
everything else — write-back, retries, renames, rows left by a crash — is picked up by the dispatcher. Deleted and
renamed-away keys are removed by the tombstone loop, which also checks again, for DOUBT_SECONDS, each key a write went
to whose outcome the agent did not hear (see _recheck). A per-key lock keeps a delete and a put of the same key from
overlapping. Transfers take a slot on the line (agent.uplink.line) and tell it whether the server answered.

Lock order: a rename's copy holds its own key's lock and its source's, taken in sorted order (two renames
copying from each other's keys cannot deadlock); a parked key's lock (PARKED) is always taken last.

The uploader sees the catalog, the cache and the WORM policy only through the small interfaces below:
the uplink imports nothing from agent.store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import os
import time
import weakref
from typing import Any, Awaitable, Callable, Protocol, TypeVar

import structlog

from agent.metrics import Metrics
from agent.records import MAX_NAME_BYTES, S3_KEY_BYTES, Entry, Header, Lock, ObjectMeta, index_row
from agent.supervise import Loops
from agent.uplink.encoding import logical_size, worth_compressing
from agent.uplink.line import Line, backoff
from agent.uplink.s3 import (
    ChecksumMismatch,
    PutResult,
    S3Uplink,
    error_code,
    is_unreachable,
    meta_sha,
    outcome_unknown,
    precondition_failed,
    read_verified,
)

log = structlog.get_logger("pacsgw.uplink")

IDLE_POLL = 5.0
CONFLICTS = ".pacsgw-conflicts"  # where an HA box keeps content it must not write over the other box's
HA_DIR = ".pacsgw-ha"  # the HA pair's own objects (agent.ha), in the namespace's prefix, never followed as files
# S3Uplink.store_verifies's probe object, where no client writes (refused by a store that checks, else deleted at once)
VERIFY_PROBE = f"{HA_DIR}/upload-verify-probe"
PARKED = ".pacsgw-parked"  # an object a waiting rename's copy needs, kept aside while a new file takes its key
CONFLICT_EXTRA = len(CONFLICTS) + 2 + 16  # what conflict_key adds to a path: the folder, '/', '.', the hash prefix
# How long after the agent gave up on a write (no answer within read_timeout, or killed) the store may still carry it
# out: the key is checked that long. A store that holds a request longer can still leave an old object behind.
DOUBT_SECONDS = 3600.0
HEADERS_KEPT = 1024  # headers read at commits, kept for their uploads: a longer backlog's older files are read again
# While files are being stored, a queued upload waits until its file is this old (rclone's --vfs-write-back default):
# on the one loop, and on the cores an S3 beside it shares, an upload's work delayed every ack behind it (write-back
# ack p50 12-18 ms held, 17-31 not: docs/benchmarks.md §39). Write-through uploads never wait.
STORING_HOLD = 5.0
T = TypeVar("T")


def conflict_key(path: str, sha256: str | None, prefix: str) -> str:
    """Where an HA box keeps its copy of `path` that the other box's object refused: the path itself under
    CONFLICTS, so an administrator finds it by name. A path too long for that (stored before [ha] was enabled,
    when new names could take the whole key: Gateway._fits keeps CONFLICT_EXTRA free with [ha] on) is kept under
    its SHA-256 instead, so that the copy can always be stored (the `ha_conflict` event names both)."""
    side = f"{CONFLICTS}/{path}.{(sha256 or '')[:16]}"
    if len((prefix + side).encode("utf-8", "surrogatepass")) <= S3_KEY_BYTES and len(
            side.rpartition("/")[2].encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        return side
    return f"{CONFLICTS}/{hashlib.sha256(path.encode('utf-8', 'surrogatepass')).hexdigest()}.{(sha256 or '')[:16]}"


class UploadQueue(Protocol):
    """The durable queue (agent.store.catalog through AsyncCatalog): rows to upload, keys to delete."""

    async def get(self, path: str) -> Entry | None: ...
    def row(self, path: str) -> Entry | None: ...
    async def reset_uploading(self) -> int: ...
    async def claim_due(self, now: float, limit: int, hold: float = 0.0) -> list[Entry]: ...
    async def next_due(self, hold: float = 0.0) -> float | None: ...
    async def mark_clean(self, path: str, gen: int, etag: str | None, version_id: str | None,
                         sha256: str | None, index_row: tuple[object, ...] | None = None) -> bool: ...
    async def mark_failed(self, path: str, gen: int, error: str, retry_at: float, unsure: bool = False) -> None: ...
    async def requeue(self, path: str, gen: int, etag: str | None) -> bool: ...
    async def drop_copy_source(self, path: str, gen: int) -> None: ...
    async def queue_tombstone(self, key: str) -> None: ...
    async def park_copies(self, key: str, parked: str) -> int: ...
    async def copies_read(self, key: str) -> bool: ...
    async def due_tombstones(self, now: float, limit: int) -> list[str]: ...
    async def tombstone_pending(self, key: str) -> bool: ...
    async def tombstone_sending(self, key: str) -> None: ...
    async def tombstone_failed(self, key: str, retry_at: float, unsure: bool = False) -> None: ...
    async def tombstone_done(self, key: str, unsure: bool = False) -> None: ...
    async def due_doubts(self, now: float, limit: int) -> list[tuple[str, int, str | None]]: ...
    async def recheck(self, key: str, found: str | None, next_check: float, forget_before: float) -> Entry | None: ...
    async def adopt_remote(self, path: str, gen: int, size: int | None, etag: str | None) -> str | None: ...
    async def index_dicom(self, rows: list[tuple[object, ...]]) -> None: ...
    async def copy_dicom_row(self, src: str, dst: str) -> None: ...


class Blobs(Protocol):
    """The cached content files (agent.store.cache.Cache)."""

    def open_blob(self, blob: str) -> int: ...
    def read_blob(self, blob: str, read: Callable[[int], T]) -> T | None: ...
    def remove(self, blob: str) -> None: ...


class LockPolicy(Protocol):
    """Which Object Lock a new object gets (agent.dicom.retention.DicomRetention: path and DICOM rules)."""

    def lock_for(self, path: str, stored_at: float, header: Header | None = None) -> Lock | None: ...


class Uploader:
    def __init__(self, db: UploadQueue, blobs: Blobs, s3: S3Uplink, line: Line, metrics: Metrics, locks: LockPolicy,
                 describe: Callable[[str, int, int, Header | None], ObjectMeta] | None = None) -> None:
        self.db, self.blobs, self.s3, self.line, self.metrics, self.locks = db, blobs, s3, line, metrics, locks
        # (path, fd, size, header read at the commit or None) → the object's metadata and tags (DICOM header)
        self.describe = describe
        self._headers: dict[str, Header] = {}  # blob → its header, read at its commit (keep_header)
        self._wake = asyncio.Event()
        self._key_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[bool]] = set()
        self.loops = Loops(metrics)  # the dispatcher and the tombstone loop, restarted if one crashes
        self._starved = False  # the dispatcher stopped for want of room: a finished transfer wakes it
        # Whether files are being stored (set by the gateway: it has writes open): queued uploads wait STORING_HOLD,
        # or until the last write ends and wakes the dispatcher (Gateway.write_finished)
        self.storing: Callable[[], bool] = lambda: False
        line.watch(self.wake)
        # In an HA pair (agent/ha.py) every PUT is conditional: never over an object this box did not know.
        self.conditional = False

    async def start(self) -> None:
        if resumed := await self.db.reset_uploading():
            log.info("uploads_resumed", files=resumed)
        self.loops.start("upload-dispatch", self._dispatch)
        self.loops.start("tombstones", self._tombstones)

    async def stop(self, timeout: float) -> None:
        """Let in-flight transfers finish (up to timeout); what remains stays queued in the catalog."""
        await self.loops.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def keep_header(self, blob: str, header: Header) -> None:
        """A stored file's header, read at its commit for the prior planner too: its upload describes the object
        from it instead of reading it again (one parse per stored file)."""
        self._headers[blob] = header
        if len(self._headers) > HEADERS_KEPT:
            del self._headers[next(iter(self._headers))]

    def key_lock(self, key: str) -> asyncio.Lock:
        return self._key_locks.setdefault(key, asyncio.Lock())

    async def transfer(self, e: Entry, body: bytes | None, confirmed: asyncio.Future[None] | None) -> bool:
        """Upload (or server-side copy) one claimed row; → True when it is clean in S3. body: the file's bytes,
        hashed to e.sha256 by the writer (a write-through file that kept them), sent instead of the cached copy's.
        confirmed: resolved as soon as S3 confirmed the object, before the catalog records it clean."""
        async with self.line.slots:
            while True:
                async with contextlib.AsyncExitStack() as locks:
                    for key in sorted({e.path, e.copy_from or e.path}, key=lambda k: (k.startswith(PARKED + "/"), k)):
                        await locks.enter_async_context(self.key_lock(key))
                    # Read again under the locks (its slot may come long after the claim), without get's loop turn
                    now = self.db.row(e.path)
                    if now is not None and now.gen == e.gen and now.copy_from != e.copy_from:
                        e = dataclasses.replace(e, copy_from=now.copy_from)  # its source was parked meanwhile
                        continue
                    return await self._transfer(e, now, body, confirmed)

    async def _transfer(self, e: Entry, now: Entry | None, body: bytes | None,
                        confirmed: asyncio.Future[None] | None) -> bool:
        """transfer, under the locks of e's key and its copy source; now: e's row as the catalog has it."""
        if now is None or now.gen != e.gen:
            # Deleted, renamed away or written again while this waited for its slot: the key's tombstone may
            # already be done, and an upload now would leave an object nobody deletes.
            log.info("upload_skipped", path=e.path, reason="superseded before its slot")
            return False
        t0 = time.monotonic()
        try:
            result = await self.line.patiently(lambda: self._send(e, body), e.path)
        except asyncio.CancelledError:
            await asyncio.shield(self.db.mark_failed(e.path, e.gen, "cancelled", time.time(), unsure=True))
            raise
        except Exception as exc:  # every failure is retried from the durable queue
            if isinstance(exc, FileNotFoundError) and ((row := await self.db.get(e.path)) is None or row.gen != e.gen):
                # Its cached copy went with it: a race, nothing lost (the catalog has no such version any more). A
                # cached copy missing while its row is still this version is lost data, not a race: a failure.
                log.info("upload_skipped_gone", path=e.path, gen=e.gen,
                         reason="deleted, renamed or written again while its upload was about to read it")
                return False
            retry_at = time.time() + backoff(e.attempts)
            await self.db.mark_failed(e.path, e.gen, f"{error_code(exc)}: {exc}", retry_at, outcome_unknown(exc))
            self.metrics.uploads.labels("error").inc()
            if is_unreachable(exc):
                self.line.failed(exc)
            else:
                log.error("upload_failed", path=e.path, error=error_code(exc), detail=str(exc)[:300],
                          attempts=e.attempts + 1, retry_in=round(retry_at - time.time(), 1))
            return False
        if confirmed is not None and not confirmed.done():
            # A write-through ack needs S3's answer only: a kill -9 before the clean mark leaves the row 'uploading',
            # which a restart uploads again (a doubt, reset_uploading), the same bytes under the same key.
            confirmed.set_result(None)
        try:
            clean = await self.db.mark_clean(e.path, e.gen, result.etag, result.version_id, e.sha256, result.index_row)
        except Exception as exc:  # e.g. the catalog's disk is full: retry the row later
            log.error("catalog_update_failed", path=e.path, error=error_code(exc), detail=str(exc)[:300])
            with contextlib.suppress(Exception):
                await self.db.mark_failed(e.path, e.gen, f"catalog: {exc}", time.time() + backoff(e.attempts))
            return False
        elapsed = time.monotonic() - t0
        self.metrics.uploads.labels("ok").inc()
        self.metrics.upload_seconds.observe(elapsed)
        self.line.answered()
        log.info("uploaded", path=e.path, bytes=e.size, seconds=round(elapsed, 4),
                 parts=result.parts, copy=bool(e.copy_from), superseded=not clean)
        return clean

    async def _send(self, e: Entry, body: bytes | None) -> PutResult:
        await self._park(e.path)
        return await (self._copy_or_upload(e) if e.copy_from else self._upload(e, body))

    async def _park(self, key: str) -> None:
        """key is about to be written while renames still wait to be copied from its object (a file renamed
        away, then a new file stored under its old name, before the copy ran): copy that object aside first
        and point them there, or their content would exist nowhere once key is overwritten."""
        if not await self.db.copies_read(key):
            return
        if (head := await self.s3.head(key)) is None:
            return  # gone already: their copies fall back to the cache, or report the loss
        version = f"{key}\0{head.get('ETag')}".encode("utf-8", "surrogatepass")
        parked = f"{PARKED}/{hashlib.sha256(version).hexdigest()}"  # one per object version of key
        async with self.key_lock(parked):  # the tombstone loop must not delete it between the copy and the repoint
            # Its deletion is queued before it exists: a kill -9 between the copy and park_copies left it in the
            # bucket for ever when the renames then copied from key itself (nothing parks again).
            await self.db.queue_tombstone(parked)
            await self.s3.copy(key, parked, meta_sha(head.get("Metadata")), src_etag=head.get("ETag"))
            moved = await self.db.park_copies(key, parked)
        log.warning("rename_source_parked", path=key, parked=parked, renames=moved,
                    reason="a new file takes the name before the renamed file's copy ran")

    def _condition(self, e: Entry) -> dict[str, str] | None:
        """In an HA pair: the object this box last knew under e.path (its etag), or none at all. S3 refuses the
        write (412) if the key holds anything else, i.e. what the other box wrote since."""
        if not self.conditional:
            return None
        return {"IfMatch": e.etag} if e.etag else {"IfNoneMatch": "*"}

    async def _upload(self, e: Entry, body: bytes | None = None) -> PutResult:
        if e.blob is None:
            raise FileNotFoundError(f"{e.path}: no cached content to upload")
        if e.sha256 is None:
            raise ValueError(f"{e.path}: no checksum recorded for its cached content")
        sha, condition, kept = e.sha256, self._condition(e), self._headers.pop(e.blob, None)
        # A body read from the cached copy is hashed here only if the store would take other bytes than the
        # catalog's SHA-256 (~5 % of the agent's CPU per file, docs/benchmarks.md §40)
        by_store = body is None and self.s3.single_request(e.size) and await self.s3.store_verifies(
            self.s3.key(VERIFY_PROBE))
        stage = functools.partial(self._stage, e.path, e.blob, e.size, sha, body, kept, by_store)
        # With the writer's copy, just written, its open and header read wait for no disk: a thread hop would
        fd, meta, body = stage() if body is not None else await asyncio.to_thread(stage)
        try:
            lock = self.locks.lock_for(e.path, e.mtime, meta.header if meta else None)
            result = await self.s3.put_file(e.path, fd, e.size, sha, lock, meta, condition, self._compress(meta), body)
        except Exception as exc:
            if condition is None or not precondition_failed(exc):
                raise
            return await self._not_overwritten(e, lambda side: self.s3.put_file(side, fd, e.size, sha))
        finally:
            os.close(fd)
        self.metrics.uploaded_bytes.inc(e.size)
        # the study-index row of what the key holds now, written in mark_clean's transaction (no catalog round
        # trip of its own); () for an object without DICOM metadata: a row of an earlier file under this name goes
        row = index_row(e.path, e.size, meta.metadata) if meta else None
        return dataclasses.replace(result, index_row=row or ())

    def _compress(self, meta: ObjectMeta | None) -> bool:
        header = meta.header if meta else None
        return self.s3.cfg.compress == "zstd" and header is not None and worth_compressing(header.transfer_syntax)

    def _stage(self, path: str, blob: str, size: int, sha256: str, body: bytes | None, header: Header | None,
               by_store: bool) -> tuple[int, ObjectMeta | None, bytes | None]:
        """Open the cached copy, describe it (from its header, read now unless kept from the commit) and, for a
        single-request PUT without the writer's body, read its bytes checked against the catalog's SHA-256 (by the
        store that checks it, unless they are to be compressed: the store sees the packed body's own hash):
        blocking, all in one thread hop (each hop costs the loop a wake-up)."""
        fd = self.blobs.open_blob(blob)
        try:
            meta = self.describe(path, fd, size, header) if self.describe else None
            if body is None and self.s3.single_request(size):
                body = read_verified(path, fd, size, sha256, by_store and not self._compress(meta))
            return fd, meta, body
        except BaseException:
            os.close(fd)
            raise

    async def _not_overwritten(self, e: Entry, keep_aside: Callable[[str], Awaitable[PutResult]]) -> PutResult:
        """A conditional PUT or copy was refused: the key holds an object this box did not know."""
        head = await self.s3.head(e.path)
        size = logical_size(head) if head is not None else None
        if head is not None and size is not None and (row := index_row(e.path, size, head.get("Metadata") or {})):
            await self.db.index_dicom([row])  # the study index describes the object the key holds, not ours
        if head is not None and meta_sha(head.get("Metadata")) == e.sha256:
            return PutResult(head.get("ETag"), head.get("VersionId"))  # our own write, whose answer was lost
        # The other box stored this path after this box last saw it (its content is the newer one: this box's
        # queue predates its failure). Keep this copy beside the namespace and take the other box's object.
        side = conflict_key(e.path, e.sha256, self.s3.cfg.prefix)
        result = await keep_aside(side)
        if blob := await self.db.adopt_remote(e.path, e.gen, size, head.get("ETag") if head else None):
            self.blobs.remove(blob)
        log.error("ha_conflict", path=e.path, kept_as=side, remote_etag=head.get("ETag") if head else None,
                  rename_from=e.copy_from,
                  reason="the other box of the HA pair wrote this path after this box last knew it; its object stays")
        return result

    async def _header(self, e: Entry) -> Header | None:
        """The DICOM header of a renamed file's cached content (the copy keeps its metadata, but DICOM
        retention rules need the header); None when it is not cached."""
        if (describe := self.describe) is None or e.blob is None:
            return None
        meta = await asyncio.to_thread(self.blobs.read_blob, e.blob, lambda fd: describe(e.path, fd, e.size, None))
        return meta.header if meta else None

    async def _copy_or_upload(self, e: Entry) -> PutResult:
        """A rename: server-side copy from the old key (conditional like a PUT in an HA pair)."""
        src = e.copy_from
        assert src is not None
        head = await self.s3.head(src)
        sha = meta_sha(head.get("Metadata")) if head is not None else None
        # An object another client stored has no sha256 metadata: its size is what can be compared (that it was
        # taken for other content left the file to be uploaded from a cache that may not hold it, for ever).
        same = head is not None and (sha == e.sha256 if sha else logical_size(head) == e.size)
        if src == e.path and head is not None and same:
            # Renamed away and back before the copy ran: the object never left its key (its tombstone waited
            # for the copy) and S3 refuses a copy onto itself. Nothing to send.
            return PutResult(head.get("ETag"), head.get("VersionId"))
        if head is None or src == e.path or (e.blob is not None and sha != e.sha256):
            # The source went away (deleted behind our back), or its key holds other content (renamed away and back,
            # or a new file stored under the old name before this copy ran): upload from the cache if we still can.
            await self.db.drop_copy_source(e.path, e.gen)
            return await self._upload(e)
        if not same:
            # Not cached, and another writer (the other box of an HA pair, another client, a write the store carried
            # out late) replaced the only object that held this file: copying it would store that content under
            # this name. Stays queued, failing loudly, until an administrator restores the object.
            raise ChecksumMismatch(f"{src}: holds other content (sha256 {sha}, {logical_size(head)} bytes) than "
                                   f"{e.path} renamed from it, which is not cached: nothing to copy it from")
        condition, etag = self._condition(e), head.get("ETag")
        lock = self.locks.lock_for(e.path, e.mtime, await self._header(e))
        try:
            result = await self.s3.copy(src, e.path, e.sha256, lock, condition, etag)
        except Exception as exc:
            if not precondition_failed(exc):
                raise
            if ((await self.s3.head(src)) or {}).get("ETag") != etag:  # CopySourceIfMatch refused it
                raise ChecksumMismatch(f"{src}: another object took the key between its HEAD and "
                                       f"{e.path}'s copy from it") from exc
            if condition is None:
                raise
            return await self._not_overwritten(e, lambda side: self.s3.copy(src, side, e.sha256, src_etag=etag))
        await self.db.copy_dicom_row(src, e.path)  # the copy carries the source's metadata
        return result

    async def _dispatch(self) -> None:
        while True:
            await self.line.up.wait()
            self._wake.clear()
            room = self.line.slots.limit * 2 - len(self._tasks)
            hold = STORING_HOLD if self.storing() else 0.0
            rows = await self.db.claim_due(time.time(), room, hold) if room > 0 else []
            self._starved = room <= 0 or len(rows) >= room
            for row in rows:
                self.start_transfer(row)
            if rows:
                continue
            # With no room, a finished transfer wakes it (_done): nothing to ask the catalog until then
            next_due = await self.db.next_due(hold) if room > 0 else None
            delay = IDLE_POLL if next_due is None else min(IDLE_POLL, max(0.05, next_due - time.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def start_transfer(self, e: Entry, body: bytes | None = None, confirmed: asyncio.Future[None] | None = None
                       ) -> asyncio.Task[bool]:
        """Run `transfer` for a claimed row as a task the drain on stop waits for."""
        task = asyncio.create_task(self.transfer(e, body, confirmed))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[bool]) -> None:
        """A transfer ended: the dispatcher looks again if it waits for room and a slot's worth is left (a refill per
        finished upload cost a query or two each, docs/benchmarks.md §41), or if this one failed (its retry time
        changed). A clean write-through upload leaves it asleep: two catalog queries fewer per stored file."""
        self._tasks.discard(task)
        if (self._starved and len(self._tasks) <= self.line.slots.limit) or task.cancelled() or \
                task.exception() is not None or not task.result():
            self.wake()

    async def _tombstones(self) -> None:
        while True:
            await self.line.up.wait()
            keys = await self.db.due_tombstones(time.time(), 100)
            for key in keys:
                async with self.key_lock(key):
                    if not await self.db.tombstone_pending(key):
                        continue  # the key was written again meanwhile: nothing to delete
                    await self.db.tombstone_sending(key)
                    try:
                        retried = await self.line.patiently(functools.partial(self.s3.delete, key), key)
                    except Exception as exc:  # retried from the durable tombstone table
                        # The DELETE may still land, after a new file took the key (see _recheck).
                        await self.db.tombstone_failed(key, time.time() + backoff(1), outcome_unknown(exc))
                        if is_unreachable(exc):
                            self.line.failed(exc)
                            break
                        log.error("delete_failed", path=key, error=error_code(exc))
                        continue
                    await self.db.tombstone_done(key, unsure=retried)  # an unanswered first attempt: see _recheck
                    log.info("deleted", path=key, retried=retried)
            await self._recheck()
            if not keys:
                await asyncio.sleep(1.0)

    async def _recheck(self) -> None:
        """Keys the store may still write to (a request the agent gave up on): such a late write lands after the
        key's tombstone ran (an orphan object) or over a newer file (its old content), a late DELETE after a newer
        file's upload. Checked again and again, less often each time (up to read_timeout apart): a key no file has
        holding an object gets a tombstone again, a clean file whose object is missing or holds other content is
        uploaded again. Never a file's key deleted: see Uploads.recheck. In an HA pair only an object of the content
        this box's write carried is deleted: another may be the other box's, stored since a fail-over and not yet
        in this box's catalog (a follow pass would have imported it)."""
        now = time.time()
        for key, checks, sha in await self.db.due_doubts(now, 100):
            async with self.key_lock(key):
                try:
                    head: dict[str, Any] | None | Exception = await self.s3.head(key)
                except Exception as exc:  # checked again next time
                    log.warning("recheck_failed", path=key, error=error_code(exc))
                    head = exc
                later = now + backoff(checks, cap=self.s3.cfg.read_timeout)
                forget_before = 0.0 if isinstance(head, Exception) else now - DOUBT_SECONDS  # only after a look
                seen: str | None = head.get("ETag", "") if isinstance(head, dict) else None
                theirs = meta_sha(head.get("Metadata")) if isinstance(head, dict) else None
                keep = seen is not None and self.conditional and (sha is None or theirs != sha)
                e = await self.db.recheck(key, None if keep else seen, later, forget_before)
                if keep and (e is None or e.is_dir):  # with a file there, nothing was to be deleted anyway
                    log.warning("late_object_kept", path=key, found=theirs, doubt=sha,
                                reason="HA pair: not the content this box wrote there, maybe the other box's file")
                if isinstance(head, Exception) and is_unreachable(head):
                    self.line.failed(head)
                    break  # the others wait for the line, not a timeout each
                if isinstance(head, Exception) or e is None or e.is_dir or e.state != "clean":
                    continue  # a file still to be uploaded writes its key again after any late write seen so far
                if theirs != e.sha256:
                    requeued = await self.db.requeue(e.path, e.gen, (head or {}).get("ETag"))
                    log.error("late_write_found", path=key, found=theirs, requeued=requeued,
                              reason="a write or delete the agent gave up on landed after a newer file")
                    self.wake()
