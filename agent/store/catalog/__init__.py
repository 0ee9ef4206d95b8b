"""The namespace and every file's state, in SQLite (WAL) on the SSD: the only metadata store, one part per concern
(docs/architecture.md, "Who owns which table"). RAM does not grow with the number of files: indexes, totals kept
by triggers, the queue is the rows not 'clean'.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from typing import Any, Callable, Concatenate, Coroutine, ParamSpec, TypeAlias, TypeVar

from agent.records import Entry, RemoteObject
from agent.store.catalog.base import COLUMNS, Totals, entry, row_of, unwritable
from agent.store.catalog.heat import EvictionRow, Heat
from agent.store.catalog.names import Namespace
from agent.store.catalog.remote import RemoteSync
from agent.store.catalog.schema import SCHEMA_VERSION, CatalogSchemaError
from agent.store.catalog.studies import Studies
from agent.store.catalog.uploads import Uploads
from agent.store.errors import NoSpace, Unavailable

__all__ = ["SCHEMA_VERSION", "AsyncCatalog", "Catalog", "CatalogSchemaError", "RemoteObject", "Totals", "failure",
           "outcome"]

P = ParamSpec("P")
R = TypeVar("R")
_Call = tuple[Callable[[], Any], "asyncio.Future[Any] | None", asyncio.AbstractEventLoop]
# Where a grouped call's result goes: a future of the caller's loop, or a callable run on that loop with the result
# (or its exception) in the turn it comes back: one turn before a task awaiting a future would wake
Then: TypeAlias = "asyncio.Future[Any] | Callable[[Any], None]"


class Catalog(Namespace, RemoteSync, Uploads, Heat, Studies):
    """The catalog file at a path (created on first use), every concern's methods on one connection."""


def _offload(method: Callable[Concatenate[Catalog, P], R], batched: bool = False
             ) -> Callable[Concatenate[AsyncCatalog, P], Coroutine[Any, Any, R]]:
    """`await db.totals()` runs `Catalog.totals()` on the catalog's thread, typed; it runs even if cancelled.
    batched: with the other such calls waiting when the catalog thread gets to it, in one transaction apart from
    the durable group commits (no fsync, none waits for one)."""
    async def call(self: AsyncCatalog, /, *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        run = functools.partial(method, self.catalog, *args, **kwargs)
        if batched:
            self.join_group(run, done, loop, durable=False)
        else:
            self._calls.put((run, done, loop))
        return await outcome(done)
    return call


def _queued(method: Callable[Concatenate[Catalog, P], R]
            ) -> Callable[Concatenate[AsyncCatalog, Then, asyncio.AbstractEventLoop, P], None]:
    """`db.queue_x(done, loop, ...)` puts `Catalog.x(...)` into the next group commit from ANY thread (a seal's, so
    that no wake-up of the loop sits between it and the row's commit); `await outcome(done)` on loop: its result,
    or done(result) runs on loop (failure(result): the exception a caller sees)."""
    def queue(self: AsyncCatalog, done: Then, loop: asyncio.AbstractEventLoop, /,
              *args: P.args, **kwargs: P.kwargs) -> None:
        self.join_group(functools.partial(method, self.catalog, *args, **kwargs), done, loop)
    return queue


async def outcome(done: asyncio.Future[R]) -> R:
    """A catalog call's result; the catalog's full disk (the cache's) is the front ends' NoSpace too."""
    try:
        return await done
    except sqlite3.OperationalError as e:
        raise failure(e)  # noqa: B904 (failure sets the cause)


def failure(e: BaseException) -> BaseException:
    """The exception a catalog call's caller sees: the catalog's full disk (the cache's) as NoSpace, one it cannot
    write (read-only, I/O errors) as Unavailable: each was an 'internal error' with a traceback in the log; else e."""
    if not isinstance(e, sqlite3.OperationalError) or not unwritable(e):
        return e
    told = (NoSpace("catalog", "cache disk full (catalog cannot grow)") if e.sqlite_errorcode == sqlite3.SQLITE_FULL
            else Unavailable("catalog", f"the cache disk cannot be written ({e})"))
    told.__cause__ = e
    return told


def _settle(done: asyncio.Future[Any], result: Any) -> None:
    if not done.cancelled():  # a cancelled caller's write is committed all the same, as an ungrouped one
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)


class AsyncCatalog:
    """Runs Catalog calls on one dedicated thread, so SQLite's fsyncs never block the event loop."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        # A plain queue of (call, the caller's future or None, its loop): run_in_executor was ~14 % of a cached read
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="catalog", daemon=True)
        self._thread.start()
        # the calls waiting for the next group commit (True) and for the next non-durable batch (False)
        self._groups: dict[bool, list[tuple[Callable[[], Any], Callable[[Any], None]]]] = {True: [], False: []}
        self._group_lock = threading.Lock()
        path = catalog.db.execute("PRAGMA database_list").fetchone()[2]
        # `get` and `get_many` read on the caller's thread through a read-only WAL connection, which never waits for
        # the writer: the hop to the catalog thread was the largest wait before a cached read's first byte.
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=ON")
        self._reader.execute("PRAGMA busy_timeout=1000")  # a WAL reader waits only while a crashed WAL is recovered
        # eviction_rows reads for seconds at a million files (2-3 s for 200 000 rows): on the catalog thread every
        # commit waited behind it, once a pass and once a minute. A connection of its own, read in a thread
        self._scanner = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._scanner.execute("PRAGMA query_only=ON")
        self._scanning = threading.Lock()

    def _serve(self) -> None:
        """The catalog thread: each call in turn, its result (or exception) handed to its caller's loop."""
        while (item := self._calls.get()) is not None:
            call, done, loop = item
            try:
                result = call()
            except BaseException as e:  # the caller gets it
                result = e
            if done is not None:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, done, result)

    def join_group(self, run: Callable[[], Any], done: Then, loop: asyncio.AbstractEventLoop,
                   durable: bool = True) -> None:
        """run() joins the next group commit (durable=False: the next batch without an fsync); its result goes to
        done (Then) on loop. Any thread may call this."""
        then = functools.partial(_settle, done) if isinstance(done, asyncio.Future) else done
        with self._group_lock:
            self._groups[durable].append((run, then))
            first = len(self._groups[durable]) == 1
        if first:  # else a group is already waiting for the thread: this call joins it
            self._calls.put((functools.partial(self._run_group, loop, durable), None, loop))

    def _run_group(self, loop: asyncio.AbstractEventLoop, durable: bool) -> None:
        """On the catalog thread: every grouped call waiting now, in one transaction; then wake each caller."""
        with self._group_lock:
            group, self._groups[durable] = self._groups[durable], []
        try:
            results = self.catalog.group([call for call, _ in group], durable=durable)
        except BaseException as e:  # never leave a caller waiting
            results = [e] * len(group)
        for (_, then), result in zip(group, results, strict=True):
            loop.call_soon_threadsafe(then, result)

    def shutdown(self) -> None:
        self._calls.put(None)
        self._thread.join()
        self._reader.close()
        with self._scanning:
            self._scanner.close()
        self.catalog.close()

    async def get(self, path: str) -> Entry | None:
        await asyncio.sleep(0)  # a turn of the loop first, as the hop gave: sessions ready meanwhile go before it
        return self.row(path)

    async def eviction_rows(self, limit: int) -> list[EvictionRow]:
        def scan() -> list[EvictionRow]:
            with self._scanning:
                return self.catalog.eviction_rows(limit, self._scanner)
        return await asyncio.to_thread(scan)

    def row(self, path: str) -> Entry | None:
        """The row of a path now, on the caller's thread (the reader connection never waits for the writer)."""
        return row_of(self._reader, path)

    async def get_many(self, paths: list[str]) -> dict[str, Entry]:
        """The rows of these paths (a path's ancestors and itself: one statement, one snapshot)."""
        return {e.path: e for e in map(entry, self._reader.execute(
            f"SELECT {COLUMNS} FROM entries WHERE path IN ({', '.join('?' * len(paths))})", paths).fetchall())}

    async def copies_read(self, key: str) -> bool:
        """A rename still waits to be copied from key: asked before every upload, so on the reader connection."""
        return self._reader.execute("SELECT 1 FROM entries WHERE copy_from = ? AND path != ? LIMIT 1",
                                    (key, key)).fetchone() is not None

    def dirty_bytes(self, user: str) -> int:
        """Bytes of user's files on the disk not yet in object storage (cache.max_dirty_per_user), now."""
        row = self._reader.execute("SELECT bytes FROM dirty_bytes WHERE user = ?", (user,)).fetchone()
        return int(row[0]) if row else 0

    def queued_files(self) -> int:
        """Files not yet in object storage, now (a full disk's reason while the store is down)."""
        return int(self._reader.execute("SELECT queue_files FROM totals").fetchone()[0])

    totals = _offload(Catalog.totals)
    get_state = _offload(Catalog.get_state)
    set_state = _offload(Catalog.set_state)
    shrink_memory = _offload(Catalog.shrink_memory)
    # the namespace
    children = _offload(Catalog.children)
    longest_below = _offload(Catalog.longest_below)
    count_files_under = _offload(Catalog.count_files_under)
    writes_since = _offload(Catalog.writes_since)
    files_after = _offload(Catalog.files_after)
    mkdir = _offload(Catalog.mkdir)
    rmdir = _offload(Catalog.rmdir)
    queue_commit_write = _queued(Catalog.commit_write)  # one per stored file, queued by the thread that sealed it
    rename = _offload(Catalog.rename)
    delete = _offload(Catalog.delete)
    # the bucket's view
    merge_listing = _offload(Catalog.merge_listing)
    known_sizes = _offload(Catalog.known_sizes)
    correct_size = _offload(Catalog.correct_size)
    unlist_all = _offload(Catalog.unlist_all)
    hot_paths = _offload(Catalog.hot_paths)
    follow_begin = _offload(Catalog.follow_begin)
    follow_batch = _offload(Catalog.follow_batch)
    follow_end = _offload(Catalog.follow_end)
    adopt_remote = _offload(Catalog.adopt_remote)
    # the upload queue
    oldest_dirty = _offload(Catalog.oldest_dirty)
    claim_due = _offload(Catalog.claim_due)
    next_due = _offload(Catalog.next_due)
    mark_clean = _offload(Catalog.mark_clean, batched=True)  # the finished uploads waiting then: one transaction
    mark_failed = _offload(Catalog.mark_failed)
    requeue = _offload(Catalog.requeue)
    drop_copy_source = _offload(Catalog.drop_copy_source)
    queue_tombstone = _offload(Catalog.queue_tombstone)
    park_copies = _offload(Catalog.park_copies)
    reset_uploading = _offload(Catalog.reset_uploading)
    due_tombstones = _offload(Catalog.due_tombstones)
    tombstone_count = _offload(Catalog.tombstone_count)
    tombstone_done = _offload(Catalog.tombstone_done)
    tombstone_failed = _offload(Catalog.tombstone_failed)
    tombstone_sending = _offload(Catalog.tombstone_sending)
    tombstone_pending = _offload(Catalog.tombstone_pending)
    tombstones_under = _offload(Catalog.tombstones_under)
    due_doubts = _offload(Catalog.due_doubts)
    recheck = _offload(Catalog.recheck)
    # cached copies and heat
    set_cached = _offload(Catalog.set_cached)
    uncache = _offload(Catalog.uncache)
    drop_corrupt = _offload(Catalog.drop_corrupt)
    blob_referenced = _offload(Catalog.blob_referenced)
    cached_after = _offload(Catalog.cached_after)
    missing_under = _offload(Catalog.missing_under)
    missing_page = _offload(Catalog.missing_page)
    record_access = _offload(Catalog.record_access)
    mark_prefetched = _offload(Catalog.mark_prefetched)
    heat_since = _offload(Catalog.heat_since)
    # studies
    study_known = _offload(Catalog.study_known)
    record_study = _offload(Catalog.record_study)
    patient_studies = _offload(Catalog.patient_studies)
    queue_worker_study = _queued(Catalog.queue_worker_study)  # a serving worker's, into its next group commit
    worker_studies = _offload(Catalog.worker_studies)
    worker_studies_taken = _offload(Catalog.worker_studies_taken)
    record_prior_fetch = _offload(Catalog.record_prior_fetch)
    settle_prior_fetches = _offload(Catalog.settle_prior_fetches)
    prior_outcomes = _offload(Catalog.prior_outcomes)
    index_dicom = _offload(Catalog.index_dicom)
    copy_dicom_row = _offload(Catalog.copy_dicom_row)
    unshipped_index_rows = _offload(Catalog.unshipped_index_rows)
    index_rows_shipped = _offload(Catalog.index_rows_shipped)
