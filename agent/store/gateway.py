"""The facade every front end uses: stat, list, open-read, open-write, commit, rename, delete.

Write: bytes stream into a staging file; `commit` makes it durable in cache and catalog and, in write-through,
waits for the verified PUT; the front end replies only after it returns. With the line down the row stays queued
and `commit` still returns: the PACS is never refused because the cloud is down.
Read: from the SSD, or one shared fetch streamed to its readers as it lands, the end only once verified.
Paths here are already resolved and confined (agent.store.paths).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar

import structlog

from agent.audit import AuditLog, Who
from agent.audit import failure as op_failure
from agent.config import Config
from agent.metrics import Metrics
from agent.records import S3_KEY_BYTES, Entry, Header
from agent.store.access import AccessStats
from agent.store.cache import WOULD_BLOCK, Cache, DiskUsage, Opened, fast_hash, hash_range, sha256_fd
from agent.store.catalog import AsyncCatalog, failure
from agent.store.errors import (
    AlreadyExists,
    BadOffset,
    BadPath,
    Corrupt,
    GatewayError,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from agent.store.evictor import Evictor
from agent.store.fetch import download
from agent.store.paths import MAX_PATH_BYTES, ancestors, check_creatable, check_name, parent_of
from agent.store.writing import WriteMarks
from agent.uplink.line import SERVER_ERROR_RETRIES
from agent.uplink.s3 import S3Uplink, error_code
from agent.uplink.uploader import CONFLICT_EXTRA, CONFLICTS, HA_DIR, PARKED, Uploader

log = structlog.get_logger("pacsgw.gateway")
T = TypeVar("T")

ACCESS_FLUSH_SECONDS = 5.0
LIST_PAGE = 1000  # a directory's rows read at once for a client's listing
STEP = 256 * 1024  # a reader streaming a fetch moves on once this much more has landed (or the end)
# A copy is checked this far ahead of the sender, a smaller one whole first: a bad one is fetched again, no read fails
VERIFY_AHEAD = 1024 * 1024
RANGE_GAP = 2 * 1024 * 1024  # a cold reader this far ahead of the fetch's stream gets a ranged GET
RANGE_FIRST = 1024 * 1024  # the first ranged GET of a fetch; each next one doubles, up to RANGE_MAX
RANGE_MAX = 8 * 1024 * 1024
PIN_RETRY_S = 0.005  # a read waits this long, again, while its copy's eviction (one catalog transaction) ends
# Bytes of files being written kept in memory for their write-through PUTs, all writes together (see WriteHandle)
BODY_BUDGET = 64 * 1024 * 1024
# directories at the namespace's root only the agent writes (Gateway._not_the_agents)
AGENT_DIRS = (CONFLICTS, HA_DIR, PARKED)


@dataclass(frozen=True, slots=True)
class Through:
    """A write-through upload started by a commit. The ack waits for `confirmed`: S3 confirmed the object, or the
    attempt ended without (failed: the row is queued again). `task` goes on to record the row clean."""

    task: asyncio.Task[bool]
    confirmed: asyncio.Future[None]


def _end_wait(confirmed: asyncio.Future[None], _: asyncio.Task[bool]) -> None:
    if not confirmed.done():
        confirmed.set_result(None)


@dataclass(frozen=True, slots=True)
class _Sealing:
    """A commit under way: its seal in a thread, then its row in a group commit, whose result runs the rest of the
    commit on the loop (WriteHandle._row_back) and settles `made`, which the client's ack waits for."""

    made: asyncio.Future[Through | None]
    body: bytes | None
    claim: bool
    mtime: float


class WriteHandle:
    """One file being written, hashed as it comes (or at commit when written out of order). A small write-through
    file keeps its bytes (BODY_BUDGET) for its upload: no reading back and hashing again (~0.5 ms per 512 KiB)."""

    def __init__(self, gw: "Gateway", path: str, blob: str, fd: int, protocol: str, who: Who | None) -> None:
        self.gw, self.path, self.blob, self.fd, self.protocol, self.who = gw, path, blob, fd, protocol, who
        self.size = 0
        # Stored bytes a user without the `delete` right resumed from: appended to, never changed or cut
        self.protected = 0
        self.base: int | None = None  # the gen the commit must still find (Catalog.commit_write); None: any
        self.user = who.user if who is not None else ""
        self.counted = 0  # bytes counted against the user's unfinished uploads (Gateway.count_unfinished)
        self._hash: hashlib._Hash | None = hashlib.sha256()
        self._fast = fast_hash()  # the same bytes: the copy's stamp (agent.store.cache)
        self._body: list[bytes] | None = [] if gw.cfg.uplink.write_mode == "through" else None
        self._held = 0  # bytes of _body taken from the gateway's budget
        self._done = False
        self._failed: BaseException | None = None
        self._acked: Callable[[], None] | None = None  # the client's ack, until told (_told)
        self._t0 = 0.0  # the commit's start: the ack's time (metrics)

    def moved(self, path: str) -> None:
        """The file being written was renamed to path, marked for it already (Gateway._claim): its commit stores it
        there."""
        self.gw.marks.remove(self.path)
        self.path = path

    async def write(self, data: bytes | memoryview, offset: int | None = None) -> None:
        try:
            await self._write(data, offset)
        except BaseException as e:
            # A hole or a missing tail: the close an SFTP client sends after a failed write must not commit it
            self._failed = e
            raise

    async def _write(self, data: bytes | memoryview, offset: int | None) -> None:
        if not data:  # as pwrite(2): no bytes, no change (an empty SFTP WRITE past the end set a size without bytes)
            return
        pos = self.size if offset is None else offset
        if pos < self.protected:
            raise PermissionDenied(self.path, "changing stored bytes needs the 'delete' permission")
        self.gw.count_unfinished(self, pos + len(data))
        if pos != self.size:
            self._unhashed()  # out-of-order write: hash the whole file at commit
        elif self._hash is not None:
            if self._body is not None and self.gw.hold(len(data), self.size + len(data)):
                self._body.append(bytes(data))  # data may be the front end's reused buffer; hashed at commit
                self._held += len(data)
            else:  # the budget is spent: hash the bytes kept so far (never hashed yet), then each write as it comes
                for block in [*(self._body or ()), data]:
                    self._hash.update(block)
                    self._fast.update(block)
                self._drop_body()
        # min_free_bytes stays free for the catalog (one that cannot commit can never evict again). A hole left
        # by a write past the end is sparse here but real bytes in S3 and every fetched copy: it must fit too.
        if not await self.gw.ensure_space(max(len(data), pos + len(data) - self.size)):
            raise self.gw.disk_full(self.path)
        # A nearly full disk gives short writes before ENOSPC: make room while anything can be evicted
        view, done = memoryview(data), 0
        while done < len(data):
            try:
                written = os.pwrite(self.fd, view[done:], pos + done)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if not await self.gw.make_room(len(data) - done):
                    raise self.gw.disk_full(self.path) from e
                continue
            if written <= 0:
                raise NoSpace(self.path, "cache disk full: no progress writing")
            done += written
        self.size = max(self.size, pos + len(data))
        self.gw.metrics.bytes_in.labels(self.protocol).inc(len(data))

    @property
    def open(self) -> bool:
        """Still being written: neither committed nor aborted."""
        return self.fd >= 0

    async def read_back(self, offset: int, length: int) -> bytes:
        """Bytes written so far (SMB reads a file it is still writing)."""
        return await asyncio.to_thread(os.pread, self.fd, length, offset)

    async def fsync(self) -> None:
        """Flush what was written so far to the staging file (SFTP's fsync@openssh.com); the commit does the rest."""
        if self.open:
            await asyncio.to_thread(os.fsync, self.fd)

    async def truncate(self, length: int) -> None:
        """Cut (or extend with zeros) the file being written to `length` bytes (SMB/FUSE set end-of-file)."""
        if length == self.size:
            return
        if length < self.protected:
            raise PermissionDenied(self.path, "cutting a stored file needs the 'delete' permission")
        self.gw.count_unfinished(self, length)
        if length > self.size and not await self.gw.ensure_space(length - self.size):
            raise self.gw.disk_full(self.path)  # the zeros are real bytes in S3
        await asyncio.to_thread(os.ftruncate, self.fd, length)
        self._unhashed()  # hash the whole file at commit
        self.size = length

    def _unhashed(self) -> None:
        self._hash = None
        self._drop_body()

    def _drop_body(self) -> None:
        self.gw.release(self._held)
        self._body, self._held = None, 0

    def _ended(self) -> None:
        self._drop_body()  # (nothing left if its upload took the bytes)
        self.gw.write_finished(self)

    async def commit(self, acked: Callable[[], None] | None = None) -> None:
        """Make the file durable (and, in write-through, confirmed in S3); only then may the client be told: acked() is
        called once if this returns (never if it raises), in the turn of the loop that learned it (_told). A client
        gone meanwhile cancels only the waits, never the fsync, the catalog commit or the PUT (_row_back runs them)."""
        if self._done:
            if acked is not None:
                acked()
            return
        if self._failed is not None:
            reason = self._failed.reason if isinstance(self._failed, GatewayError) else type(self._failed).__name__
            await self.abort(f"a write failed earlier: {reason}")
            if isinstance(self._failed, GatewayError):
                raise type(self._failed)(self.path, f"{reason}; file discarded")
            raise Unavailable(self.path, f"a write failed earlier ({reason}); file discarded")
        self._t0, self._acked = time.monotonic(), acked
        try:
            made = self._start_seal().made
        except BaseException as e:
            await self.abort(f"its commit could not start: {type(e).__name__}")
            raise
        self._done = True
        try:
            async with self.gw.audit.op(self.who, "store", self.path, record_ok=False, bytes=self.size):
                upload = await made  # a cancelled waiter cancels only made: the durable part runs on (_settled)
                await self.gw.write_through(self.path, upload)
        finally:
            if not (made.cancelled() or made.cancel()):  # else the durable part, still running, ends the write
                self._ended()
        self._told()  # a write-through ack, after S3's answer (a write-back one was told with its row)

    def _told(self) -> None:
        """The file is stored: its audit record, the ack's time, and the client's ack, once."""
        if self._t0:
            self.gw.audit.record(self.who, "store", self.path, bytes=self.size)
            self.gw.metrics.ack_seconds.labels(self.protocol).observe(time.monotonic() - self._t0)
            self._t0, acked, self._acked = 0.0, self._acked, None
            if acked is not None:
                acked()

    def _start_seal(self) -> _Sealing:
        """Start the seal in a thread now, not at the commit task's first turn of the loop (~0.7 ms p50 with 8 clients
        storing, docs/benchmarks.md §29). The seal's thread queues the row's commit itself once the file is durable:
        no turn of the loop between the two hops either (on a loaded loop, the seal's wake-up waited behind every
        session's work before the commit could even be queued)."""
        body = b"".join(self._body) if self._body is not None else None
        loop = asyncio.get_running_loop()
        # Write-through while the line is up: the row is claimed for its upload in the same commit
        claim = self.gw.cfg.uplink.write_mode == "through" and self.gw.line.reachable
        s = _Sealing(loop.create_future(), body, claim, time.time())
        path, blob, base = self.path, self.blob, self.base

        def queue_row(sha: str, header: Header | None) -> None:  # on the seal's thread, once the file is durable
            self.gw.db.queue_commit_write(functools.partial(self._row_back, s, sha, header), loop, path, blob,
                                          size=self.size, sha256=sha, mtime=s.mtime, claim=claim, base=base,
                                          writer=self.user or None)

        loop.run_in_executor(None, self._seal, body, queue_row).add_done_callback(functools.partial(self._unsealed, s))
        return s

    def _unsealed(self, s: _Sealing, sealed: asyncio.Future[None]) -> None:
        """The seal ended; if it failed, nothing is durable and no row was queued: the staging file goes."""
        if (error := sealed.exception()) is not None:
            self._close_fd()
            self.gw.cache.discard_staging(self.blob)
            self._settled(s, error=error)

    def _row_back(self, s: _Sealing, sha: str, header: Header | None, row: tuple[int, str | None] | BaseException
                  ) -> None:
        """The row's commit came back: the rest of the commit (+ start of a write-through upload) runs in this turn of
        the loop, not in a task woken one turn later (~1.5 ms p50 with 8 clients storing, docs/benchmarks.md §31)."""
        self._close_fd()
        if isinstance(row, BaseException):  # no row names the copy: it goes
            self.gw.cache.remove(self.blob)
            self._settled(s, error=failure(row))
            return
        try:
            upload = self.gw.stored(self.path, self.blob, self.size, sha, s.body, s.claim, s.mtime, row, header,
                                    self.user)
        except Exception as e:
            # The row is committed: its copy, durable and queued, stays. That is what a write-back ack (or a write-
            # through one whose upload failed) promises: OK, not an error the PACS would store it again for, refused
            # without 'delete' or under WORM. A claimed row goes back to the queue: its upload may not have started.
            log.error("stored_aftermath_failed", path=self.path, error=repr(e)[:300], requeued=s.claim)
            if s.claim:
                self.gw.db.join_group(functools.partial(self.gw.db.catalog.mark_failed, self.path, row[0],
                                                        f"upload not started: {e!r}", time.time()),
                                      self._requeued, asyncio.get_running_loop())
            upload = None
        if upload is not None and s.body is not None:
            # The bytes stay counted in BODY_BUDGET as long as their upload lives: a slow line cannot pile them up
            held, self._body, self._held = self._held, None, 0
            upload.task.add_done_callback(lambda _: self.gw.release(held))
        self._settled(s, upload)

    def _requeued(self, result: object) -> None:
        if isinstance(result, BaseException):  # still durable: the next start-up queues it (reset_uploading)
            log.error("requeue_failed", path=self.path, error=repr(result)[:300])
        self.gw.uploader.wake()

    def _settled(self, s: _Sealing, upload: Through | None = None, error: BaseException | None = None) -> None:
        if s.made.cancelled():  # the client left mid-commit: the write ends here, a failure told to nobody
            self._ended()
        elif error is not None:
            s.made.set_exception(error)
        else:
            s.made.set_result(upload)
            if upload is None:  # durable, and no S3 answer to wait for: the ack goes now, not a turn later when
                self._told()  # commit() wakes (~0.8 ms p50 with 8 clients storing, docs/benchmarks.md §45)

    def _seal(self, body: bytes | None, queue_row: Callable[[str, Header | None], None]) -> None:
        """Digests and the DICOM header if anyone reads it (the prior planner and the upload share this one read; a
        failed read fails the seal before anything is durable), then Cache.commit, then queue_row(SHA-256, header).
        Blocking: its one thread hop, where hashing holds no loop."""
        if self._hash is None:
            fast = fast_hash()
            sha = sha256_fd(self.fd, fast)
        else:
            fast = self._fast
            if body is not None:
                self._hash.update(body)
                fast.update(body)
            sha = self._hash.hexdigest()
        header = self.gw.read_header(self.fd, self.size) if self.gw.read_header else None
        self.gw.cache.commit(self.blob, self.fd, fast.hexdigest())
        queue_row(sha, header)

    async def abort(self, reason: str) -> None:
        """The client went away or failed: nothing becomes visible under the final name."""
        if self._done:
            return
        self._done = True
        self._ended()
        self._close_fd()
        self.gw.cache.discard_staging(self.blob)
        log.warning("upload_aborted", path=self.path, protocol=self.protocol, bytes=self.size, reason=reason)
        self.gw.audit.record(self.who, "store", self.path, f"aborted: {reason}", self.size)

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def seek(self, offset: int, whence: int) -> int:
        return no_holes(self.size, offset, whence)


async def _in_thread(work: Callable[[], T], undo: Callable[[T], None]) -> T:
    """work() in a thread that runs on if the caller is cancelled, then undo(its result): a cut leaked it."""
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        running.add_done_callback(functools.partial(_undone, undo))
        raise


def _undone(undo: Callable[[T], None], done: asyncio.Future[T]) -> None:
    if not done.cancelled() and done.exception() is None:
        undo(done.result())


def _close_opened(result: tuple[Opened | None, str | None]) -> None:
    if result[0] is not None:
        os.close(result[0].fd)


async def _one(e: Entry) -> AsyncIterator[Entry]:
    yield e


def no_holes(size: int, offset: int, whence: int) -> int:
    """lseek(2)'s SEEK_DATA and SEEK_HOLE (asyncssh answers ranges@asyncssh.com so): a file has no holes."""
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE are served")
    if offset >= size:
        raise OSError(errno.ENXIO, "no data at or past the end of the file")
    return offset if whence == os.SEEK_DATA else size


@dataclass
class _Fill:
    """A fetch from S3 in progress; readers wait on `cond`. Ranged GETs for a reader far ahead land beyond the
    stream under `lock`, and the verified stream overwrites them: the cached copy is always the stream's."""

    entry: Entry
    blob: str
    fd: int
    written: int = 0
    verified: bool = False
    done: bool = False
    error: GatewayError | None = None
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    etag: str | None = None  # of the version the stream reads; None until it answered
    started: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)  # landed by ranged GETs, [start, end)
    ranging: asyncio.Task[None] | None = None  # one ranged GET at a time per fetch
    window: int = RANGE_FIRST  # the next ranged GET's size: doubles for a sequential reader
    no_ranges: bool = False  # a ranged GET failed: the stream brings the rest
    by: str = "read"  # who began the fetch: a read's miss or a prefetch (the eviction policy is told, heat.py)
    at: float = field(default_factory=time.time)

    def landed_from(self, pos: int) -> int:
        """How far the bytes from pos have landed, by the stream or ranged GETs (pos: not yet)."""
        end = self.written if pos < self.written else pos
        grew = True
        while grew:
            grew = False
            for a, b in self.ranges:
                if a <= end < b:
                    end, grew = b, True
        return end


class ReadHandle:
    """A file open for reading: a cached copy, checked VERIFY_AHEAD ahead of the sender, or a fetch."""

    def __init__(self, gw: "Gateway", entry: Entry, fd: int, fill: _Fill | None, protocol: str,
                 digest: str | None = None) -> None:
        self.gw, self.entry, self.fd, self.fill, self.protocol = gw, entry, fd, fill, protocol
        self.size = entry.size
        self._digest = digest  # still to be checked; None once it was (or for a fetch: the fetch checks)
        self._hash = fast_hash()
        self._checked = 0  # bytes of the cached copy fed to _hash so far
        self._checking = asyncio.Lock()
        self._broken: Corrupt | None = None
        self.held = 0  # bytes counted against the files open for reading (Gateway.hold_open)
        self.reader = ""  # the user they are counted for
        self.record: Callable[[], None] | None = None  # the open's audit record while not yet written

    def recorded(self) -> None:
        """Write the open's audit record, once (Gateway.open_read's record_later)."""
        if self.record is not None:
            record, self.record = self.record, None
            record()

    async def ready(self, pos: int) -> int:
        """Wait until bytes from pos may be served → how far; a file's end only once all of it was verified."""
        if self.fill is not None:
            return await self._landed(self.fill, pos, min(pos + STEP, self.size))
        await self._check(min(pos + VERIFY_AHEAD, self.size))
        return self.size if self._digest is None else self._checked

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:  # EOF, also at an SFTP offset of 2^63 or more (pread raised OverflowError)
            return b""
        end = min(offset + length, self.size)
        if self.fill is not None:
            await self._landed(self.fill, offset, end)
        else:
            await self._check(end)
        data = await asyncio.to_thread(os.pread, self.fd, length, offset)
        self.sent(len(data))
        return data

    def seek(self, offset: int, whence: int) -> int:
        return no_holes(self.size, offset, whence)

    def sent(self, nbytes: int) -> None:
        """Bytes a front end sent straight from `fd` (FTP's sendfile), counted like those of `read`."""
        self.gw.metrics.bytes_out.labels(self.protocol).inc(nbytes)

    async def _check(self, end: int) -> None:
        """Hash the copy up to `end`, at its end check the stamp: a mismatch fails every read, drops the copy."""
        if self._broken is not None:
            raise self._broken
        if self._digest is None or (self._checked >= end and end < self.size):
            return
        async with self._checking:
            if self._digest is None or (self._checked >= end and end < self.size):
                return
            target = min(max(end, self._checked + VERIFY_AHEAD), self.size)
            reached = await asyncio.to_thread(hash_range, self.fd, self._hash, self._checked, target)
            if reached == target:
                self._checked = reached
                if reached < self.size:
                    return
                if self._hash.hexdigest() == self._digest:
                    self._digest = None
                    return
            problem = "checksum mismatch while sending" if reached == target else "content ends early"
            self._broken = Corrupt(self.entry.path, f"cached copy failed its check ({problem})")
            await self.gw.bad_copy(self.entry, problem, found_by="read")
            raise self._broken

    async def _landed(self, fill: _Fill, pos: int, end: int) -> int:
        """Wait until the fetch landed [pos, end) → how far from pos they may be served (≥ end), starting ranged GETs
        for a reader ahead; the end of the file only once verified, so no client gets a whole bad file."""
        async with fill.cond:
            while True:
                if fill.error is not None:
                    raise fill.error
                if fill.verified:
                    return self.size
                if fill.done:
                    raise Unavailable(self.entry.path, "fetch ended unverified")
                landed = fill.landed_from(pos)
                avail = min(landed, self.size - 1)
                if end <= avail:
                    if landed - pos <= fill.window // 2:
                        self.gw.read_ahead(fill, landed)
                    return avail
                self.gw.read_ahead(fill, pos)
                await fill.cond.wait()

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.gw.read_closed(self.entry.path, self.held, self.reader)


@dataclass
class Refusals:
    """Why the gateway refuses now ("": it does not). The daemon hands one to the gateway and to who decides."""

    fetch: str = ""  # set by the pressure monitor under critical pressure: no new fetches from S3
    write: str = ""  # set on the standby box of an HA pair (agent/ha.py): no changes


class Retention(Protocol):
    """What the gateway asks of the retention rules (agent.dicom.retention.RetentionGuard, handed in)."""

    async def check_mutable(self, e: Entry, now: float) -> None: ...


class Gateway:
    """read_header(fd, size) reads a stored file's header at its commit, once, for on_stored(path, header, user), which
    runs after each commit (prior-study prefetch: capped per writing user), and for its upload's metadata."""

    def __init__(self, cfg: Config, db: AsyncCatalog, cache: Cache, s3: S3Uplink, uploader: Uploader,
                 metrics: Metrics, audit: AuditLog, *, worm: Retention, access: AccessStats, evictor: Evictor,
                 refusals: Refusals, on_stored: Callable[[str, Header, str], None] | None = None,
                 read_header: Callable[[int, int], Header] | None = None) -> None:
        self.cfg, self.db, self.cache, self.s3, self.uploader, self.metrics = cfg, db, cache, s3, uploader, metrics
        self.audit, self.line, self.worm = audit, uploader.line, worm  # worm: path and DICOM retention rules
        self.refusals, self.access, self.evictor, self.on_stored = refusals, access, evictor, on_stored
        self.read_header = read_header
        self._fills: dict[str, _Fill] = {}
        self._listings: dict[str, asyncio.Future[None]] = {}
        self._active_writes = 0
        self.marks = WriteMarks(cache.root / "writing.lock")  # the paths uploads write, in every serving process
        self._unfinished: dict[str, int] = {}  # user → the `counted` bytes of its files being written
        self._reading: Counter[str] = Counter()  # user → bytes of the files its readers here hold open (hold_open)
        self._body_room = BODY_BUDGET
        self._writes_idle = asyncio.Event()
        self._writes_idle.set()
        uploader.storing = lambda: self._active_writes > 0  # queued uploads wait while files are stored here
        self._rights = {u.name: frozenset(u.permissions) for u in cfg.users}
        # Every user's root and those above it: removing or renaming one leaves sessions without a directory
        self._fixed = {""}
        for u in cfg.users:
            root = u.root.strip("/")
            self._fixed.update([root, *ancestors(root)])

    # --- permissions ----------------------------------------------------------------------------

    def allowed(self, who: Who | None, right: str) -> bool:
        """Whether `who` holds `right` under [[users]] permissions; the agent (None) and local processes pass."""
        rights = self._rights.get(who.user) if who is not None else None
        return rights is None or right in rights

    def _base(self, who: Who | None, seen: Entry | None) -> int | None:
        """The gen a replacing commit or rename must still find at its target (-1: none; None: any), for a user
        without `delete` or under WORM: what another session stores there meanwhile was not checked."""
        if self.allowed(who, "delete") and not self.cfg.compliance.worm:
            return None
        return seen.gen if seen is not None else -1

    def _require(self, who: Who | None, right: str, path: str) -> None:
        if who is not None and not self.allowed(who, right):
            raise PermissionDenied(path, f"user {who.user} lacks the '{right}' permission")

    def _movable(self, path: str) -> None:
        if path in self._fixed:
            raise PermissionDenied("/" + path, "the root of the namespace or of a user cannot be removed or renamed")

    # --- what front ends decide themselves ------------------------------------------------------

    def audit_event(self, who: Who | None, op: str, path: str = "", result: str = "ok") -> None:
        """An audit record of a front end's own decision (a login, a refusal before any gateway call)."""
        self.audit.record(who, op, path, result)

    def count_error(self, protocol: str, kind: str) -> None:
        """An error answered to a client, in pacsgw_errors_total{protocol,kind}."""
        self.metrics.errors.labels(protocol, kind).inc()

    def disk_usage(self) -> DiskUsage:
        """The cache disk's size and free space (FUSE's statfs)."""
        return self.cache.disk_usage()

    # --- namespace ------------------------------------------------------------------------------

    def _may_change(self, who: Who | None, right: str, path: str) -> None:
        """A change to the namespace: refused on an HA standby, without `right`, in the agent's own directories."""
        if self.refusals.write:
            raise Unavailable(path, self.refusals.write)
        self._require(who, right, path)
        self._not_the_agents(who, path)
        self._fits(path)

    def _fits(self, path: str) -> None:
        """A path whose object key would pass S3's limit is refused up front: acknowledged, it stayed on the SSD."""
        limit = S3_KEY_BYTES - len(self.cfg.uplink.prefix.encode()) - (CONFLICT_EXTRA if self.cfg.ha.enabled else 0)
        if len(path.encode("utf-8", "surrogatepass")) > limit:
            raise BadPath(path, f"path longer than {limit} bytes (with the uplink prefix, an object key holds at "
                                f"most {S3_KEY_BYTES}" + (f", {CONFLICT_EXTRA} of them kept for an HA conflict "
                                                          "copy's name)" if self.cfg.ha.enabled else ")"))

    @staticmethod
    def _not_the_agents(who: Who | None, path: str) -> None:
        """Clients never change the agent's own directories: its conflict copies and hot set would be lost or forged."""
        if who is not None and path.split("/", 1)[0] in AGENT_DIRS:
            raise PermissionDenied(path, f"{path.split('/', 1)[0]} is written by the agent only")

    async def stat(self, path: str, *, turn: bool = True) -> Entry:
        """turn=False: the row on the spot, without the loop turn AsyncCatalog.get takes first (a read's open: at 8
        readers that turn put each open at the back of the loop's ready work, between its RETR and its 150)."""
        if (e := await self.db.get(path) if turn else self.db.row(path)) is None and path:
            e = await self._ensure_listed(parent_of(path), then=path)
        if e is None:
            raise NotFound(path)
        return e

    async def find(self, path: str) -> Entry | None:
        try:
            return await self.stat(path)
        except NotFound:
            return None

    async def listdir(self, path: str, who: Who | None = None, *, file_too: bool = False) -> AsyncIterator[Entry]:
        """Checked and listed from the store now; the entries then come a page at a time as the client takes them.
        file_too: a file's listing is its own entry (FTP's LIST of a file), audited as the listing it is."""
        async with self.audit.op(who, "list", path):
            self._require(who, "read", path)
            try:
                await self._ensure_listed(path)
            except NotADirectory as e:
                if not file_too or e.path != path:
                    raise
                return _one(await self.stat(path))
        return self._children(path)

    async def _children(self, path: str) -> AsyncIterator[Entry]:
        """A directory's entries read LIST_PAGE rows at a time (a listing of a million files held every row, 488 MB,
        however slowly its client read it), only the names a client may look up (check_name). A control character
        would forge a listing line; a name longer than MAX_NAME_BYTES (another S3 writer's: AWS and Ceph take 1 024-byte
        keys), '..', '.' or with a backslash (keys AWS and Ceph store as given) SFTP and FTP listed, then refused its
        every use (a '..' shown in d was taken for a directory below d), and SMB never showed it."""
        page = await self.db.children(path, "", LIST_PAGE)
        while True:
            for e in page:
                try:
                    check_name(e.name, e.path)
                    if len(e.path.encode("utf-8")) > MAX_PATH_BYTES:  # S3 takes 1 024: named, refused at every use
                        raise BadPath(e.path, f"path longer than {MAX_PATH_BYTES} bytes")
                except BadPath as problem:
                    log.warning("listing_name_hidden", directory=path, name=repr(e.name), reason=problem.reason)
                    continue
                yield e
            if len(page) < LIST_PAGE:
                return
            page = await self.db.children(path, page[-1].name, LIST_PAGE)

    async def _ensure_listed(self, path: str, *, missing_ok: bool = False, then: str | None = None) -> Entry | None:
        """Merge the remote listing of `path` and its ancestors into the catalog, once per directory → the row of
        `then` (a name in `path`). missing_ok: a missing directory ends the walk (a write will create it)."""
        chain = ancestors(path + "/x") if path else [""]
        known = await self.db.get_many(chain if then is None else [*chain, then])
        merged = False
        for d in chain:
            if (e := await self.db.get(d) if merged else known.get(d)) is None:
                if missing_ok:
                    break
                raise NotFound(d)
            if not e.is_dir:
                raise NotADirectory(d)
            if not e.listed:
                await self._list_remote(d)
                merged = True
        if then is None:
            return None
        return await self.db.get(then) if merged else known.get(then)

    async def _list_remote(self, path: str) -> None:
        if (pending := self._listings.get(path)) is None:
            pending = self._listings[path] = asyncio.ensure_future(self._do_list(path))
            pending.add_done_callback(lambda _: self._listings.pop(path, None))
        await asyncio.shield(pending)

    async def _do_list(self, path: str) -> None:
        if not self.line.reachable:
            return  # serve what the catalog knows; list again once the line is back
        t0, begun = time.monotonic(), time.time()
        files = dirs = unsized = 0
        try:  # merged a page at a time: the directory is marked listed once the last one is in
            async for page in self.s3.list_dir(path):
                # Directories holding only keys whose deletion is still queued are gone (else a deleted file comes back)
                live = page.dirs
                if live and await (self.db.tombstones_under(path) if path else self.db.tombstone_count()):
                    live = [d for d in live if await self._remote_dir_live(f"{path}/{d}" if path else d)]
                await self.db.merge_listing(path, page.objects, live, begun, complete=False)
                files, dirs, unsized = files + len(page.objects), dirs + len(page.dirs), unsized + len(page.unsized)
        except Exception as e:  # a failed listing must not fail the client's request
            log.warning("remote_list_failed", path=path, error=error_code(e))
            return
        # Files the store did not size now: listed again at the next use, HEADing only them (the rest known by ETag)
        await self.db.merge_listing(path, [], [], begun, complete=not unsized)
        log.info("remote_listed", path=path, files=files, dirs=dirs, unsized=unsized,
                 seconds=round(time.monotonic() - t0, 4))

    async def _remote_dir_live(self, path: str) -> bool:
        """Whether the remote directory `path` holds an object that is not a pending delete here."""
        if not await self.db.tombstones_under(path):
            return True
        files, dirs = await self.s3.names(path)
        for name in files:
            if not await self.db.tombstone_pending(f"{path}/{name}"):
                return True
        for d in dirs:
            if await self._remote_dir_live(f"{path}/{d}"):
                return True
        return False

    async def mkdir(self, path: str, who: Who | None = None) -> None:
        async with self.audit.op(who, "mkdir", path):
            self._may_change(who, "write", path)
            check_creatable(path)
            if self.marks.writing(path):  # its commit would fail on the directory ("is a directory")
                raise AlreadyExists(path, "a file of this name is being written")
            await self._ensure_listed(parent_of(path), missing_ok=True)
            await self.db.mkdir(path)
        log.info("mkdir", path=path)

    async def rmdir(self, path: str, who: Who | None = None) -> None:
        async with self.audit.op(who, "rmdir", path):
            self._may_change(who, "delete", path)
            self._movable(path)
            await self._ensure_listed(path)
            if self.marks.busy(path):  # not empty: the upload's commit would bring the directory back
                raise NotEmpty(path, "a file in this directory is being written; try again later")
            await self.db.rmdir(path)
        log.info("rmdir", path=path)

    async def delete(self, path: str, who: Who | None = None, *, dropping: Sequence[WriteHandle] = ()) -> None:
        """`dropping`: the session's own uploads of path (SFTP, SMB), aborted once the delete is allowed: a refused
        delete had already dropped them."""
        async with self.audit.op(who, "delete", path):
            self._may_change(who, "delete", path)
            self._movable(path)
            await self.worm.check_mutable(await self.stat(path), time.time())
            self._not_written(path, besides=len(dropping))
            for writer in dropping:
                await writer.abort("removed by its own session before its close")
            blob = await self.db.delete(path)
        if blob:
            self.cache.remove(blob)
        self.uploader.wake()
        log.info("delete", path=path)

    async def rename(self, src: str, dst: str, who: Who | None = None, *, replace: bool = True,
                     moving: Sequence[WriteHandle] = ()) -> None:
        """Like rename(2), replacing an existing target (x.part → x); without `replace` it is AlreadyExists. `moving`:
        the session's own open uploads of src, which move with it (SFTP, SMB): their commits store dst."""
        async with self.audit.op(who, "rename", src, to=dst):
            self._may_change(who, "rename", src)
            self._movable(src)
            if src == dst and replace:  # rename(2) to itself changes nothing (a directory's, an upload's were refused)
                await self.stat(src)
                return
            self._may_take(who, dst)
            e = await self.stat(src)
            await self.worm.check_mutable(e, time.time())
            self._not_written(src, besides=len(moving))
            if e.is_dir:
                if self.marks.busy(src):  # an upload's commit would bring the directory back (Windows refuses too)
                    raise PermissionDenied(src, "a file in this directory is being written; try again later")
                await self.list_tree(src)
                if longest := await self.db.longest_below(src):  # moved, it must keep a path clients and S3 take
                    self._fits(moved := dst + longest[len(src):])
                    if len(moved.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
                        raise BadPath(dst, f"a file below would have a path longer than {MAX_PATH_BYTES} bytes")
            replaced_entry = await self._replaced_by_rename(who, dst, replace)
            self._claim(dst, len(moving))
            try:
                replaced = await self.db.rename(src, dst, self._base(who, replaced_entry))
            except BaseException:
                self._unclaim(dst, len(moving))
                raise
            await self._fetches_moved(src, dst)
            row = await self.db.get(dst) if any(upload.base is not None for upload in moving) else None
            for upload in moving:  # each keeps bytes of the file it started from: now the row at dst
                upload.moved(dst)
                if upload.base is not None and row is not None:
                    upload.base = row.gen
        for blob in replaced:
            self.cache.remove(blob)
        self.uploader.wake()
        log.info("rename", src=src, dst=dst, directory=e.is_dir)

    async def rename_unstored(self, uploads: Sequence[WriteHandle], dst: str, who: Who | None, *,
                              replace: bool = True) -> None:
        """A file being written and never stored yet is to be committed under dst instead (a client renames the
        new file it still has open; `uploads`: the session's own of it): dst is judged as rename judges a target, or
        its name, its directory or the file it replaces went unchecked (Windows device names, text-direction controls
        and a WORM file stored there). Whether who may move the file is the front end's to say."""
        src = uploads[0].path
        async with self.audit.op(who, "rename", src, to=dst):
            if src == dst and replace:  # as rename's
                return
            self._not_written(src, besides=len(uploads))
            self._may_take(who, dst)
            base = self._base(who, await self._replaced_by_rename(who, dst, replace))
            self._claim(dst, len(uploads))
            for upload in uploads:
                upload.base = base
                upload.moved(dst)

    async def _fetches_moved(self, src: str, dst: str) -> None:
        """A fetch under way of a file just renamed (or below a directory renamed) goes on under the new name: its
        copy lands there and the new name's readers join it (keyed by the old name, the object was fetched twice and
        the first copy thrown away). Only a fetch of the bytes the moved row names (its SHA-256): the old name may
        have been stored again between the rename's stat and its move. Before any other await: a fetch landing
        meanwhile finds its new name (_fetch)."""
        fills = {dst + p[len(src):]: f for p, f in self._fills.items() if p == src or p.startswith(src + "/")}
        for now in (await self.db.get_many(list(fills))).values() if fills else ():
            fill = fills[now.path]
            if not fill.done and fill.entry.sha256 is not None and (now.sha256, now.size, now.blob) == (
                    fill.entry.sha256, fill.entry.size, None):
                del self._fills[fill.entry.path]
                self._fills[now.path], fill.entry = fill, now

    def _claim(self, dst: str, uploads: int) -> None:
        """Mark dst for `uploads` moving there, before the catalog moves their file: marked after, another process's
        claim of dst in that instant raised there (the file renamed, its marks not moved), and its exclusive create
        of dst since _may_take wrote dst beside them. Either now refuses the rename, which has changed nothing."""
        for taken in range(uploads):
            try:
                self.marks.add(dst)
            except BlockingIOError:
                self._unclaim(dst, taken)
                raise PermissionDenied(dst, "another serving process is creating the target; try again later") from None
        if self.marks.writing(dst, uploads):
            self._unclaim(dst, uploads)
            raise PermissionDenied(dst, "the target is being written by another upload; try again later")

    def _unclaim(self, dst: str, uploads: int) -> None:
        for _ in range(uploads):
            self.marks.remove(dst)

    def being_written(self, path: str) -> bool:
        """Whether an upload of any session (of any serving process) writes path now."""
        return self.marks.writing(path)

    def _not_written(self, path: str, besides: int = 0) -> None:
        """Refused while an upload other than the session's own `besides` writes path: its commit would store the
        file again, under the name a delete or a rename took away."""
        if self.marks.writing(path, besides):
            raise PermissionDenied(path, "being written by another upload; try again later")

    def _may_take(self, who: Who | None, dst: str) -> None:
        """A rename's target name: one clients may create, outside the agent's directories, written by no upload."""
        self._not_the_agents(who, dst)
        self._fits(dst)
        self._movable(dst)
        check_creatable(dst)
        if self.marks.busy(dst):  # its commit would replace what is renamed there
            raise PermissionDenied(dst, "the target is being written by another upload; try again later")

    async def _replaced_by_rename(self, who: Who | None, dst: str, replace: bool) -> Entry | None:
        """The file a rename to dst would replace (None: none), if it may. Its directory must exist (ENOENT, as
        rename(2) and SMB): a rename into `nodir/x/` made both directories."""
        await self._ensure_listed(parent_of(dst))
        if (replaced := await self.db.get(dst)) is not None:
            if not replace:
                raise AlreadyExists(dst, "the target exists and this rename does not replace")
            if replaced.is_dir:  # the catalog refuses it too, but an upload moved there (rename_unstored) got no answer
                raise AlreadyExists(dst, "a directory of this name exists")
            self._require(who, "delete", dst)  # the file replaced is lost
            await self.worm.check_mutable(replaced, time.time())
        return replaced

    async def list_tree(self, path: str) -> None:
        """A directory is about to move: every remote object under it must be known first."""
        await self._ensure_listed(path)
        for child in await self.db.children(path):
            if child.is_dir:
                await self.list_tree(child.path)

    # --- writes ----------------------------------------------------------------------------------

    async def open_write(self, path: str, protocol: str, *, offset: int = 0, who: Who | None = None) -> WriteHandle:
        """Start writing path; offset > 0 resumes (REST/append); one past the end is BadOffset (a hole)."""
        return await self._open_write(path, protocol, who, lambda _: offset)

    async def open_for_write(self, path: str, protocol: str, who: Who | None, *, keep: int | None = None,
                             create: bool = True, exclusive: bool = False) -> WriteHandle:
        """open(2) for writing (SFTP, SMB), keeping the stored file's first `keep` bytes (None: all)."""
        def offset(e: Entry | None) -> int:
            if e is not None and exclusive:
                raise AlreadyExists(path)
            if e is None and not create:
                raise NotFound(path)
            size = e.size if e is not None and not e.is_dir else 0  # a directory: _open_write refuses it
            return size if keep is None else min(keep, size)
        return await self._open_write(path, protocol, who, offset, exclusive=exclusive)

    async def _open_write(self, path: str, protocol: str, who: Who | None,
                          offset_for: Callable[[Entry | None], int], *, exclusive: bool = False) -> WriteHandle:
        """open_write at the offset offset_for(the stored row) gives: the row is looked up once (issue 14).
        exclusive: the name is also refused while another upload writes it, and if it was stored meanwhile (a new
        file is in the catalog from its commit on: two exclusive creates of one name both had it)."""
        async with self.audit.op(who, "store", path, record_ok=False):
            self._may_change(who, "write", path)
            if not path:
                raise IsADirectory(path)
            existing = await self._ensure_listed(parent_of(path), missing_ok=True, then=path)
            offset = offset_for(existing)
            if existing is not None and existing.is_dir:
                raise IsADirectory(path)
            if existing is None:
                check_creatable(path)  # a new name: Windows (SMB) clients must be able to use it
            elif offset > existing.size:
                raise BadOffset(path, f"offset {offset} is beyond the end of the file ({existing.size} bytes)")
            if existing is not None:
                await self.worm.check_mutable(existing, time.time())
                if offset < existing.size and not self.allowed(who, "delete"):
                    raise PermissionDenied(path, "replacing a stored file needs the 'delete' permission")
            user = who.user if who is not None else ""
            self.dirty_share(user, path, self._unfinished.get(user, 0) + 1)  # a byte at least must fit
            blob, fd = await self._new_staging(path)
            if exclusive and not self.marks.claim(path):  # one of two processes claiming it at once (WriteMarks)
                self._discard_made((blob, fd))
                raise AlreadyExists(path)
            if not exclusive:
                self.marks.add(path)
            handle = WriteHandle(self, path, blob, fd, protocol, who)
            self._active_writes += 1
            self._writes_idle.clear()
            if exclusive and await self.db.get(path) is not None:
                await handle.abort("exclusive create: the name was stored meanwhile")
                raise AlreadyExists(path)
        if offset:
            if existing is None:
                await handle.abort("resume of a missing file")
                raise NotFound(path)
            try:
                source = await self.open_read(path, protocol)
                try:
                    while handle.size < min(offset, source.size):  # each write appends: size is where the next reads
                        if not (data := await source.read(handle.size, min(1024 * 1024, offset - handle.size))):
                            break
                        await handle.write(data)
                finally:
                    await source.close()
                if handle.size < offset:  # the file was replaced by a shorter one meanwhile
                    raise BadOffset(path, f"offset {offset} is beyond the end of the file ({handle.size} bytes)")
            except BaseException as e:
                await handle.abort(f"resume failed: {type(e).__name__}")
                raise
        if not self.allowed(who, "delete"):
            handle.protected = handle.size
        # Bytes kept from the stored version (append, resume, an open without truncate): committed over another one
        # (stored, renamed away or deleted meanwhile), the file lost that store's bytes or came back as deleted
        handle.base = existing.gen if offset and existing is not None else self._base(who, existing)
        return handle

    async def _new_staging(self, path: str) -> tuple[str, int]:
        """A spare made ahead (a thread hop and two wake-ups fewer per stored file, and no directory fsync at its
        commit); else made in a thread, as an inode may wait for the disk (issue 14), undone if cancelled."""
        if (spare := self.cache.spare_staging()) is not None:
            return spare
        return await self._evicting(path, lambda: _in_thread(self.cache.new_staging, self._discard_made))

    async def _evicting(self, path: str, make: Callable[[], Awaitable[T]]) -> T:
        """make() a new file in the cache. Out of inodes with bytes free (ensure_space counts bytes), clean files are
        evicted as for a full disk, then make() again: nothing was evicted, and every store and cold read refused."""
        try:
            return await make()
        except NoSpace:
            if not await self.make_room(1):
                raise self.disk_full(path) from None
        return await make()

    def _discard_made(self, made: tuple[str, int]) -> None:
        blob, fd = made
        os.close(fd)
        self.cache.discard_staging(blob)

    async def truncate(self, path: str, length: int, protocol: str, who: Who | None) -> None:
        """truncate(2) by name (SFTP setstat, SMB set end-of-file): a new version cut or extended with zeros. To the
        size it has, nothing changes (truncate(2), OpenSSH's server): clients set it after each upload, and each was
        a new version uploaded again, fetched first if evicted."""
        if (e := await self.find(path)) is not None and not e.is_dir and e.size == length:
            async with self.audit.op(who, "store", path, record_ok=False):
                self._may_change(who, "write", path)
            return
        async with self.audit.op(who, "store", path, record_ok=False):  # its close would store over the cut file
            self._not_written(path)
        handle = await self.open_for_write(path, protocol, who, keep=length, create=False)
        try:
            await handle.truncate(length)
        except BaseException as e:
            await handle.abort(f"truncate failed: {type(e).__name__}")
            raise
        await handle.commit()

    @property
    def active_writes(self) -> int:
        return self._active_writes

    def hold(self, nbytes: int, size: int) -> bool:
        """Whether a write-through file may keep nbytes more of its bytes in memory (it has size bytes then)."""
        if nbytes > self._body_room or not self.s3.single_request(size):
            return False
        self._body_room -= nbytes
        return True

    def release(self, nbytes: int) -> None:
        self._body_room += nbytes

    def count_unfinished(self, handle: WriteHandle, end: int) -> None:
        """A write reaches `end`: NoSpace past its user's share for unfinished uploads (one filled the disk)."""
        if end <= handle.counted:
            return
        held, limit = self._unfinished.get(handle.user, 0) + end - handle.counted, self.unfinished_limit
        if held > limit:
            log.warning("unfinished_limit", user=handle.user, path=handle.path, bytes=held, limit=limit)
            raise NoSpace(handle.path, f"this user's unfinished uploads would hold {held} bytes, over its "
                                       f"{limit} (cache.max_unfinished_per_user)")
        self.dirty_share(handle.user, handle.path, held)
        self._unfinished[handle.user], handle.counted = held, end

    def dirty_share(self, user: str, path: str, writing: int) -> None:
        """NoSpace when the user's stored files not yet uploaded and those being written would pass its share: with
        the store down they cannot be evicted, and one user's would leave no room for the others'. The total is read
        at each call (each write past the counted end): the files the user's other uploads, of any process, stored
        meanwhile count; read once at the open, 14 uploads opened at once each stored its file past the share."""
        if not (self.dirty_limit and user):
            return
        if (dirty := self.db.dirty_bytes(user)) + writing > self.dirty_limit:
            log.warning("dirty_limit", user=user, path=path, dirty_bytes=dirty, writing=writing,
                        limit=self.dirty_limit, share=self.cfg.cache.max_dirty_per_user)
            raise NoSpace(path, f"this user's files not yet in object storage hold {dirty} bytes, with its uploads "
                                f"over its {self.dirty_limit} (cache.max_dirty_per_user)")

    @functools.cached_property
    def unfinished_limit(self) -> int:
        """One user's share of the cache for files being written, this process's part of it."""
        return self._share(self.cfg.cache.max_unfinished_per_user)

    @functools.cached_property
    def dirty_limit(self) -> int:
        """One user's share of the cache for stored files not yet uploaded, all processes' (0: none, at 100 %)."""
        ratio = self.cfg.cache.max_dirty_per_user
        return self._share(ratio, whole=True) if ratio < 1 else 0

    def disk_full(self, path: str) -> NoSpace:
        """NoSpace for a full disk, naming the files waiting for an unreachable store (no eviction frees them)."""
        reason = "cache disk full and nothing evictable"
        if not self.line.reachable and (waiting := self.db.queued_files()):
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.line.health.since))
            reason += f": {waiting} files not yet in object storage: the object store is unreachable since {since}"
        return NoSpace(path, reason)

    def _share(self, ratio: float, whole: bool = False) -> int:
        """`ratio` of the cache (max_bytes, or the disk less min_free_bytes when smaller), this process's part (whole:
        all processes', for what the catalog counts)."""
        c = self.cfg.cache
        room = min(c.max_bytes, self.cache.disk_usage().total - c.min_free_bytes)
        return int(ratio * room) // (1 if whole else self.cfg.server.serving_processes())

    def write_finished(self, handle: WriteHandle) -> None:
        if left := self._unfinished.pop(handle.user, 0) - handle.counted:
            self._unfinished[handle.user] = left
        self._active_writes -= 1
        self.marks.remove(handle.path)
        if not self._active_writes:
            self._writes_idle.set()
            self.uploader.wake()  # the uploads held while files were being stored (Uploader.storing)

    async def wait_writes_idle(self, timeout: float) -> bool:
        """Drain: wait until no file is being written; → False on timeout."""
        try:
            await asyncio.wait_for(self._writes_idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def stored(self, path: str, blob: str, size: int, sha: str, body: bytes | None, claim: bool, mtime: float,
               committed: tuple[int, str | None], header: Header | None, user: str) -> Through | None:
        """The row of (path, blob) is committed → (gen, replaced blob); in write-through (claim), start its upload (of
        body, if kept) → that upload, in the same uncancellable step as the claim: a claimed row without an upload
        would wait for the next restart."""
        gen, replaced = committed
        if replaced:
            self.cache.remove(replaced)
        log.info("stored", path=path, bytes=size, sha256=sha, write_through=claim)
        if header is not None:
            if self.on_stored is not None:
                self.on_stored(path, header, user)
            self.uploader.keep_header(blob, header)
        if not claim:  # queued: the dispatcher holds it while writes are open (this one is), their end wakes it
            return None
        if self.uploader.conditional:
            # An HA pair's PUT is conditional on the ETag the row holds now: read it back.
            if (entry := self.db.row(path)) is None or entry.gen != gen:
                return None  # already superseded by a newer write
        else:
            # The row as commit_write left it (no second round trip): mark_clean is gen-checked against a newer one
            entry = Entry(path=path, is_dir=False, size=size, mtime=mtime, sha256=sha, state="uploading", blob=blob,
                          gen=gen, etag=None, version_id=None, copy_from=None, listed=False, dirty_since=mtime,
                          attempts=0, last_error=None, last_access=None, access_count=0)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self.uploader.start_transfer(entry, body, confirmed)
        task.add_done_callback(functools.partial(_end_wait, confirmed))
        return Through(task, confirmed)

    async def write_through(self, path: str, upload: Through | None) -> None:
        """Wait (up to through_timeout) for S3 to confirm a write-through upload; it goes on regardless. The wait
        ends at S3's answer, not at the row's clean mark, a commit behind others' fsyncs on the catalog's thread:
        a crash before that mark only uploads the file again (Uploader._transfer). The mark is queued on that thread
        before `confirmed` wakes this, so every catalog change this process makes after the ack (a rename, a delete,
        the next version) finds the row clean; in another serving process such a change can still find it
        'uploading', and costs a doubt and a whole upload instead of a copy, nothing else."""
        if upload is None:
            return
        # The wait is `confirmed` itself, not a shield inside wait_for (two turns of the loop more per ack): a client
        # gone cancels only this future, which the upload never waits on, and the timeout resolves it
        late = asyncio.get_running_loop().call_later(self.cfg.uplink.through_timeout, self._through_late, path,
                                                     upload.confirmed)
        try:
            await upload.confirmed
        finally:
            late.cancel()

    def _through_late(self, path: str, confirmed: asyncio.Future[None]) -> None:
        if not confirmed.done():
            log.warning("write_through_timeout", path=path, seconds=self.cfg.uplink.through_timeout, mode="write-back")
            confirmed.set_result(None)

    # --- reads -----------------------------------------------------------------------------------

    async def open_read(self, path: str, protocol: str, who: Who | None = None, *, record_later: bool = False
                        ) -> ReadHandle:
        """Pinned first (the evictor leaves the copy while it is open), then counted (hold_open); both undone at
        the handle's close. record_later: the open's audit record is the caller's to write, by handle.recorded(),
        once its first bytes are on their way (FTP: after the 150), and at the latest before it answers."""
        try:
            self._require(who, "read", path)
            while not self.evictor.pins.pin(path):
                await asyncio.sleep(PIN_RETRY_S)  # it is being evicted: looked up after, it is not cached (fetched)
            held, user = 0, who.user if who is not None else ""
            try:
                e = await self._file(path)
                held = self.hold_open(e, user)
                handle = await self._open_entry(e, protocol)
            except BaseException:
                self.read_closed(path, held, user)
                raise
        except Exception as exc:  # audit.op's record, without an async generator and the loop's hooks for it per read
            self.audit.record(who, "retrieve", path, op_failure(exc))
            raise
        handle.held, handle.reader = held, user
        handle.record = functools.partial(self.audit.record, who, "retrieve", path, "ok", handle.size,
                                          cached=handle.fill is None)
        if not record_later:
            handle.recorded()
        return handle

    async def _file(self, path: str) -> Entry:
        try:
            e = await self.stat(path, turn=False)
        except NotFound:  # in a directory never listed (the line is down), a missing name is unknown: 451, not 550
            chain = ancestors(path)
            known = await self.db.get_many(chain)
            above = next((known[a] for a in reversed(chain) if a in known), None)
            if above is not None and above.is_dir and not above.listed:
                raise Unavailable(path, "object storage cannot list its directory now; the file may be there") \
                    from None
            raise
        if e.is_dir:
            raise IsADirectory(path)
        return e

    def hold_open(self, e: Entry, user: str) -> int:
        """A file opened for reading keeps its disk space until closed, even once evicted, deleted or replaced:
        the files this process's readers hold are limited to cache.max_open_for_reading of the cache, or the PACS's
        stores would be refused for want of room; one user's to cache.max_open_for_reading_per_user of it, or one
        reader would hold them all and the PACS's reads be refused (one file at least, each). → the bytes counted."""
        for held, limit, whose, key in (
                (self._reading[user], self.reading_user_limit, "this user's files", "max_open_for_reading_per_user"),
                (self._reading.total(), self.reading_limit, "files", "max_open_for_reading")):
            if held and held + e.size > limit:
                log.warning("open_for_reading_limit", user=user, path=e.path, bytes=held + e.size, limit=limit)
                raise Unavailable(e.path, f"{whose} open for reading would hold {held + e.size} bytes of the "
                                          f"cache, over its {limit} (cache.{key}): try again later")
        self._reading[user] = self._reading.get(user, 0) + e.size
        return e.size

    @functools.cached_property
    def reading_limit(self) -> int:
        return self._share(self.cfg.cache.max_open_for_reading)

    @functools.cached_property
    def reading_user_limit(self) -> int:
        return self._share(self.cfg.cache.max_open_for_reading_per_user)

    def read_closed(self, path: str, held: int, user: str) -> None:
        if (left := self._reading.get(user, 0) - held) > 0:  # not Counter's -=: a Counter built and every user walked
            self._reading[user] = left
        else:
            self._reading.pop(user, None)  # the user goes at 0
        self.evictor.pins.unpin(path)

    async def _open_entry(self, e: Entry, protocol: str) -> ReadHandle:
        path = e.path
        if e.blob is not None:
            # On the loop when the copy is in the page cache (under load each thread hop waits for a CPU)
            opened, problem = self.cache.open_checked(e.blob, e.size, e.sha256, VERIFY_AHEAD, nowait=True)
            if problem == WOULD_BLOCK:
                opened, problem = await _in_thread(
                    functools.partial(self.cache.open_checked, e.blob, e.size, e.sha256, VERIFY_AHEAD), _close_opened)
            if opened is not None:
                self.metrics.hits.inc()
                self.access.note(path, e.size, hit=True)
                return ReadHandle(self, e, opened.fd, None, protocol, opened.digest)
            await self.bad_copy(e, problem or "")
            e = await self.stat(path)  # the bad copy is gone: fetch the object again below
        self.metrics.misses.inc()
        self.access.note(path, e.size, hit=False)
        fill = await self._fill_for(e)
        return ReadHandle(self, e, os.dup(fill.fd), fill, protocol)

    async def bad_copy(self, e: Entry, problem: str, found_by: str = "open") -> None:
        """A copy failed a check: a clean file's copy is dropped (fetched again); Corrupt if it is the only one."""
        if (cur := await self.db.get(e.path)) is not None and cur.blob == e.blob:
            e = cur  # it may have reached S3 since it was opened
        if e.state != "clean":
            log.critical("cache_copy_lost", path=e.path, blob=e.blob, problem=problem, state=e.state, found_by=found_by)
            raise Corrupt(e.path, f"cached copy {problem} and not yet in object storage")
        log.error("cache_copy_corrupt", path=e.path, blob=e.blob, problem=problem, action="fetch again",
                  found_by=found_by)
        if e.blob is not None and await self.db.drop_corrupt(e.path, e.blob):
            self.cache.remove(e.blob)

    async def prefetch(self, e: Entry) -> bool:
        """Bring one file into the cache ahead of any read (joining a running fetch) → whether it landed."""
        if e.blob is not None:
            return False
        fill = await self._fill_for(e, "prefetch")
        async with fill.cond:
            await fill.cond.wait_for(lambda: fill.done)
        if fill.error is not None:
            return False
        await self.db.mark_prefetched(e.path, e.size)
        self.metrics.note_prefetched(e.size)
        return True

    async def _fill_for(self, e: Entry, by: str = "read") -> _Fill:
        """The running fetch of e to join, else a new one: not one of an earlier version (its bytes are old)."""
        return await self._evicting(e.path, functools.partial(self._joined, e, by))

    async def _joined(self, e: Entry, by: str) -> _Fill:
        fill = self._fills.get(e.path)
        if fill is not None and not fill.done and fill.fd >= 0 and fill.entry.gen == e.gen:
            return fill
        if not self.line.reachable:
            raise Unavailable(e.path, "not in the cache and object storage is unreachable")
        if self.refusals.fetch:
            log.warning("fetch_refused", path=e.path, reason=self.refusals.fetch)
            raise Unavailable(e.path, f"not in the cache; fetching refused: {self.refusals.fetch}")
        fill = _Fill(e, *self.cache.new_staging(), by=by)
        self._fills[e.path] = fill
        asyncio.create_task(self._fetch(fill))
        return fill

    async def _fetch(self, fill: _Fill) -> None:
        e, t0 = fill.entry, time.monotonic()

        async def landed(written: int) -> None:
            async with fill.cond:
                fill.written = written
                fill.cond.notify_all()

        async def verified() -> None:
            async with fill.cond:
                fill.verified = True
                fill.cond.notify_all()

        def started(etag: str | None, rangeable: bool) -> None:  # a compressed object is read whole
            fill.etag, fill.started, fill.no_ranges = etag, True, not rangeable

        async def attempt() -> str:
            while True:
                try:
                    return await download(self.s3, self.cache, fill.entry, fill.blob, fill.fd, landed, verified,
                                          started, fill.lock)
                except Exception as exc:
                    # A renamed file's copy may have run while this fetch waited: read where the object is now
                    if fill.started or error_code(exc) not in ("NoSuchKey", "ChecksumMismatch") or (
                            now := await self._moved(fill.entry)) is None:
                        raise
                    fill.entry = now

        try:
            async with self.line.slots:  # fetches share the line's concurrency with uploads
                sha = await self.line.patiently(attempt, e.path, server_errors=SERVER_ERROR_RETRIES)
            while not await self.db.set_cached((e := fill.entry).path, e.gen, fill.blob, sha, fill.by, fill.at):
                if fill.entry is e:  # else renamed while it landed (_fetches_moved): lands at the new name
                    self.cache.remove(fill.blob)  # the file changed meanwhile; this copy is stale
                    break
            self.metrics.fetched_bytes.inc(fill.written)
            self.metrics.fetch_seconds.observe(time.monotonic() - t0)
            log.info("fetched", path=e.path, bytes=fill.written, seconds=round(time.monotonic() - t0, 4))
        except Exception as exc:  # every failure reaches the waiting readers
            fill.error = (exc if isinstance(exc, GatewayError)
                          else Unavailable(e.path, f"fetch failed: {error_code(exc)}"))
            self.cache.discard_staging(fill.blob)
            log.error("fetch_failed", path=e.path, error=error_code(exc), detail=str(exc)[:300])
        finally:
            async with fill.lock:  # a ranged GET writing into the file finishes first
                os.close(fill.fd)
                fill.fd = -1
            async with fill.cond:
                fill.done = True
                fill.cond.notify_all()
            if self._fills.get(fill.entry.path) is fill:
                del self._fills[fill.entry.path]

    async def _moved(self, e: Entry) -> Entry | None:
        """e's row, if the same version of the file is now to be read from another object key (its copy ran)."""
        now = await self.db.get(e.path)
        return now if now is not None and now.gen == e.gen and now.object_key != e.object_key else None

    def read_ahead(self, fill: _Fill, pos: int) -> None:
        """Start a ranged GET from pos when a reader there is far ahead of the stream (one at a time a fetch)."""
        if (fill.ranging is not None or not fill.started or fill.no_ranges or fill.done
                or pos >= fill.entry.size or pos < fill.written + RANGE_GAP):
            return
        fill.ranging = asyncio.create_task(self._fetch_range(fill, pos))

    async def _fetch_range(self, fill: _Fill, start: int) -> None:
        e, t0 = fill.entry, time.monotonic()
        length = min(fill.window, e.size - start)
        try:
            data = await self.s3.get_range(e.object_key, start, length, fill.etag)
            if len(data) != length:
                raise Corrupt(e.path, f"ranged GET gave {len(data)} of {length} bytes")
            async with fill.lock:  # only beyond the stream: its bytes are the ones verified and kept
                lo = max(start, fill.written)
                if fill.fd >= 0 and lo < start + length:
                    await asyncio.to_thread(os.pwrite, fill.fd, memoryview(data)[lo - start:], lo)
                    fill.ranges.append((lo, start + length))
            log.info("ranged_get", path=e.path, offset=start, bytes=length, stream_at=fill.written,
                     seconds=round(time.monotonic() - t0, 4))
            fill.window = min(fill.window * 2, RANGE_MAX)
        except Exception as exc:  # the stream brings these bytes anyway
            fill.no_ranges = True
            log.warning("ranged_get_failed", path=e.path, offset=start, error=error_code(exc), detail=str(exc)[:200])
        finally:
            fill.ranging = None
            async with fill.cond:
                fill.cond.notify_all()

    # --- access statistics ---------------------------------------------------------------------

    async def flush_access(self) -> None:
        """The access counts since the last flush, into the catalog (the daemon does it every ACCESS_FLUSH_SECONDS)."""
        await self.access.flush(self.db, self.metrics)

    async def shrink_memory(self) -> None:
        """Memory pressure: flush buffered statistics and give SQLite's page cache back."""
        await self.flush_access()
        await self.db.shrink_memory()

    # --- eviction (the policy runs in agent.store.evictor) ---------------------------------------

    async def evict(self, path: str) -> bool:
        """Drop the cached copy of one clean file; → False if it is dirty or not cached. Unavailable while a reader
        of any serving process holds it open: its disk space would come back only at the close, and an admin
        freeing room would be told it had (the evictor leaves such copies too)."""
        e = await self.stat(path)
        with self.evictor.pins.evicting(path) as unpinned:
            if not unpinned:
                raise Unavailable(path, "open for reading now: its copy is kept until the reader closes it")
            blob = await self.db.uncache(path, e.gen)
        if blob is None:
            return False
        self.cache.remove(blob)
        self.metrics.evictions.inc()
        self.metrics.evicted_bytes.inc(e.size)
        log.info("evicted", path=path, bytes=e.size)
        return True

    async def ensure_space(self, need: int) -> bool:
        """True when `need` more bytes fit above the free-space reserve, after evicting if necessary."""
        reserve = self.cfg.cache.min_free_bytes
        usage = self.cache.disk_usage()
        if usage.free - need >= reserve:
            return True
        if need > usage.total - reserve:
            return False  # can never fit (a write at a far offset): evicting the whole cache would not help
        await self.make_room(need)
        return self.cache.disk_usage().free - need >= reserve

    async def make_room(self, need: int) -> bool:
        """The disk is full: evict clean files until `need` more bytes fit; → whether anything went."""
        return await self.evictor.free(need + self.cfg.cache.min_free_bytes, "disk full") > 0
