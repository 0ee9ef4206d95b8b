"""The namespace and every file's state, in SQLite (WAL) on the SSD: the only metadata store.

RAM does not grow with the number of files: lookups and listings go through indexes, totals are kept
by triggers in a one-row table, and the upload queue is the set of rows whose state is not 'clean'.

File states: dirty (content on the SSD only) → uploading (claimed by an upload) → clean (confirmed in S3).
`blob` names the cached content file (NULL: not cached). `gen` increases on every content or name
change, so an upload that finishes after the file changed cannot mark the new content clean.
Deleted or renamed-away keys become tombstones: object deletions that wait, durably, until no pending
copy still reads from that key.

The class is synchronous and not thread-safe: the gateway runs every call on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from agent.store.errors import AlreadyExists, IsADirectory, NotADirectory, NotEmpty, NotFound
from agent.store.paths import ancestors, name_of, parent_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    path         TEXT PRIMARY KEY,
    parent       TEXT NOT NULL,
    name         TEXT NOT NULL,
    is_dir       INTEGER NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    mtime        REAL NOT NULL,
    sha256       TEXT,
    state        TEXT,
    blob         TEXT,
    gen          INTEGER NOT NULL DEFAULT 0,
    etag         TEXT,
    version_id   TEXT,
    copy_from    TEXT,
    listed       INTEGER NOT NULL DEFAULT 0,
    dirty_since  REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error   TEXT,
    last_access  REAL,
    access_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent, name);
CREATE INDEX IF NOT EXISTS entries_queue ON entries(next_attempt) WHERE state IN ('dirty', 'uploading');
CREATE INDEX IF NOT EXISTS entries_dirty_since ON entries(dirty_since) WHERE state IN ('dirty', 'uploading');
CREATE INDEX IF NOT EXISTS entries_evictable ON entries(last_access) WHERE state = 'clean' AND blob IS NOT NULL;

CREATE TABLE IF NOT EXISTS tombstones (
    key          TEXT PRIMARY KEY,
    queued       REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS totals (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    files        INTEGER NOT NULL,
    cached_files INTEGER NOT NULL,
    cached_bytes INTEGER NOT NULL,
    queue_files  INTEGER NOT NULL,
    queue_bytes  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0, 0);

CREATE TRIGGER IF NOT EXISTS totals_ins AFTER INSERT ON entries WHEN NEW.is_dir = 0 BEGIN
    UPDATE totals SET
        files = files + 1,
        cached_files = cached_files + (NEW.blob IS NOT NULL),
        cached_bytes = cached_bytes + (CASE WHEN NEW.blob IS NOT NULL THEN NEW.size ELSE 0 END),
        queue_files = queue_files + (NEW.state != 'clean'),
        queue_bytes = queue_bytes + (CASE WHEN NEW.state != 'clean' THEN NEW.size ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_del AFTER DELETE ON entries WHEN OLD.is_dir = 0 BEGIN
    UPDATE totals SET
        files = files - 1,
        cached_files = cached_files - (OLD.blob IS NOT NULL),
        cached_bytes = cached_bytes - (CASE WHEN OLD.blob IS NOT NULL THEN OLD.size ELSE 0 END),
        queue_files = queue_files - (OLD.state != 'clean'),
        queue_bytes = queue_bytes - (CASE WHEN OLD.state != 'clean' THEN OLD.size ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_upd AFTER UPDATE OF blob, size, state ON entries WHEN NEW.is_dir = 0 BEGIN
    UPDATE totals SET
        cached_files = cached_files + (NEW.blob IS NOT NULL) - (OLD.blob IS NOT NULL),
        cached_bytes = cached_bytes + (CASE WHEN NEW.blob IS NOT NULL THEN NEW.size ELSE 0 END)
                                    - (CASE WHEN OLD.blob IS NOT NULL THEN OLD.size ELSE 0 END),
        queue_files = queue_files + (NEW.state != 'clean') - (OLD.state != 'clean'),
        queue_bytes = queue_bytes + (CASE WHEN NEW.state != 'clean' THEN NEW.size ELSE 0 END)
                                  - (CASE WHEN OLD.state != 'clean' THEN OLD.size ELSE 0 END)
    WHERE id = 1;
END;
"""

_COLUMNS = ("path, is_dir, size, mtime, sha256, state, blob, gen, etag, version_id, copy_from, listed, "
            "dirty_since, attempts, last_error, last_access, access_count")


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    is_dir: bool
    size: int
    mtime: float
    sha256: str | None
    state: str | None
    blob: str | None
    gen: int
    etag: str | None
    version_id: str | None
    copy_from: str | None
    listed: bool
    dirty_since: float | None
    attempts: int
    last_error: str | None
    last_access: float | None
    access_count: int

    @property
    def name(self) -> str:
        return name_of(self.path)

    @property
    def cached(self) -> bool:
        return self.blob is not None


@dataclass(frozen=True, slots=True)
class Totals:
    files: int
    cached_files: int
    cached_bytes: int
    queue_files: int
    queue_bytes: int


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object found by a remote listing, relative to the directory listed."""

    name: str
    size: int
    mtime: float
    etag: str | None


def _entry(row: tuple) -> Entry:
    return Entry(row[0], bool(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
                 row[10], bool(row[11]), row[12], row[13], row[14], row[15], row[16])


class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, which the durability contract needs before any ack.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache, whatever the archive size
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)
        self._ensure_root()

    def close(self) -> None:
        self.db.close()

    # --- transactions ----------------------------------------------------------------------

    def _tx(self) -> "_Tx":
        return _Tx(self.db)

    def _ensure_root(self) -> None:
        self.db.execute("INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime) VALUES ('', '', '', 1, ?)",
                        (time.time(),))

    def _ensure_dirs(self, path: str, now: float) -> None:
        """Create the missing ancestors of path as directories; refuse if one of them is a file."""
        for anc in ancestors(path)[1:]:
            row = self.db.execute("SELECT is_dir FROM entries WHERE path = ?", (anc,)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO entries (path, parent, name, is_dir, mtime) VALUES (?, ?, ?, 1, ?)",
                    (anc, parent_of(anc), name_of(anc), now))
            elif not row[0]:
                raise NotADirectory(anc)

    # --- reads -----------------------------------------------------------------------------

    def get(self, path: str) -> Entry | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path = ?", (path,)).fetchone()
        return _entry(row) if row else None

    def children(self, path: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE parent = ? AND path != '' ORDER BY name",
                               (path,)).fetchall()
        return [_entry(r) for r in rows]

    def has_children(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE parent = ? AND path != '' LIMIT 1",
                               (path,)).fetchone() is not None

    def totals(self) -> Totals:
        return Totals(*self.db.execute(
            "SELECT files, cached_files, cached_bytes, queue_files, queue_bytes FROM totals").fetchone())

    def oldest_dirty(self) -> float | None:
        row = self.db.execute(
            "SELECT MIN(dirty_since) FROM entries WHERE state IN ('dirty', 'uploading')").fetchone()
        return row[0]

    def due_uploads(self, now: float, limit: int) -> list[Entry]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE state = 'dirty' AND next_attempt <= ? "
            "ORDER BY next_attempt, dirty_since LIMIT ?", (now, limit)).fetchall()
        return [_entry(r) for r in rows]

    def next_due(self) -> float | None:
        row = self.db.execute("SELECT MIN(next_attempt) FROM entries WHERE state = 'dirty'").fetchone()
        return row[0]

    def due_tombstones(self, now: float, limit: int) -> list[str]:
        rows = self.db.execute(
            "SELECT key FROM tombstones WHERE next_attempt <= ? AND key NOT IN "
            "(SELECT copy_from FROM entries WHERE copy_from IS NOT NULL) ORDER BY queued LIMIT ?",
            (now, limit)).fetchall()
        return [r[0] for r in rows]

    def tombstone_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]

    def lru_evictable(self, limit: int) -> list[Entry]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE state = 'clean' AND blob IS NOT NULL "
            "ORDER BY last_access LIMIT ?", (limit,)).fetchall()
        return [_entry(r) for r in rows]

    def walk_files(self, batch: int = 1000) -> Iterator[Entry]:
        """Every file, in path order, a batch at a time (keyset pagination keeps memory flat)."""
        last = ""
        while True:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND is_dir = 0 "
                                   "ORDER BY path LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            yield from (_entry(r) for r in rows)
            last = rows[-1][0]

    # --- namespace changes -----------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        now = time.time()
        with self._tx():
            if self.db.execute("SELECT 1 FROM entries WHERE path = ?", (path,)).fetchone():
                raise AlreadyExists(path)
            self._ensure_dirs(path, now)
            self.db.execute("INSERT INTO entries (path, parent, name, is_dir, mtime, listed) VALUES (?, ?, ?, 1, ?, 1)",
                            (path, parent_of(path), name_of(path), now))

    def rmdir(self, path: str) -> None:
        with self._tx():
            e = self.get(path)
            if e is None:
                raise NotFound(path)
            if not e.is_dir:
                raise NotADirectory(path)
            if self.has_children(path):
                raise NotEmpty(path)
            self.db.execute("DELETE FROM entries WHERE path = ?", (path,))

    def commit_write(self, path: str, blob: str, size: int, sha256: str, mtime: float, *,
                     claim: bool) -> tuple[int, str | None]:
        """Record new content for path (state dirty, or uploading when claim). → (gen, replaced blob)."""
        now = time.time()
        with self._tx():
            old = self.get(path)
            if old is not None and old.is_dir:
                raise IsADirectory(path)
            self._ensure_dirs(path, now)
            state = "uploading" if claim else "dirty"
            if old is None:
                self.db.execute(
                    "INSERT INTO entries (path, parent, name, is_dir, size, mtime, sha256, state, blob, gen, "
                    "dirty_since, last_access, access_count) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, 1, ?, ?, 0)",
                    (path, parent_of(path), name_of(path), size, mtime, sha256, state, blob, now, now))
                gen = 1
            else:
                gen = old.gen + 1
                self.db.execute(
                    "UPDATE entries SET size = ?, mtime = ?, sha256 = ?, state = ?, blob = ?, gen = ?, "
                    "copy_from = NULL, dirty_since = ?, attempts = 0, next_attempt = 0, last_error = NULL "
                    "WHERE path = ?", (size, mtime, sha256, state, blob, gen, now, path))
            self.db.execute("DELETE FROM tombstones WHERE key = ?", (path,))
        return gen, (old.blob if old else None)

    def rename(self, src: str, dst: str) -> list[str]:
        """Move a file or a whole directory; → blobs of files the move replaced (to delete).

        Each moved file becomes dirty again: its object must appear under the new key, by a server-side
        copy from the old key when the old object is complete, else by a fresh upload. The old keys
        become tombstones, deleted once no pending copy reads from them.
        """
        now = time.time()
        replaced: list[str] = []
        with self._tx():
            e = self.get(src)
            if e is None:
                raise NotFound(src)
            if dst == src:
                return replaced
            if e.is_dir and (dst + "/").startswith(src + "/"):
                raise NotADirectory(dst, "cannot move a directory into itself")
            target = self.get(dst)
            if target is not None:
                if target.is_dir or e.is_dir:
                    raise AlreadyExists(dst)
                if target.blob:
                    replaced.append(target.blob)
                self.db.execute("DELETE FROM entries WHERE path = ?", (dst,))
            self._ensure_dirs(dst, now)
            moves = [e] if not e.is_dir else [e, *self._subtree(src)]
            for m in moves:
                new_path = dst + m.path[len(src):]
                self._move_row(m, new_path, now)
        return replaced

    def _subtree(self, path: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND path < ?",
                               (path + "/", path + "0")).fetchall()  # '0' sorts right after '/'
        return [_entry(r) for r in rows]

    def _move_row(self, e: Entry, new_path: str, now: float) -> None:
        self.db.execute("DELETE FROM entries WHERE path = ?", (e.path,))
        if e.is_dir:
            self.db.execute("INSERT INTO entries (path, parent, name, is_dir, mtime, listed) VALUES (?, ?, ?, 1, ?, ?)",
                            (new_path, parent_of(new_path), name_of(new_path), e.mtime, int(e.listed)))
            return
        # A complete object exists under the old key only when the row was clean (or already a pending
        # copy whose source is still protected): copy from there; otherwise upload from the cache.
        copy_from = e.path if e.state == "clean" else (e.copy_from if e.state == "dirty" else None)
        self.db.execute(
            "INSERT INTO entries (path, parent, name, is_dir, size, mtime, sha256, state, blob, gen, copy_from, "
            "dirty_since, last_access, access_count) VALUES (?, ?, ?, 0, ?, ?, ?, 'dirty', ?, ?, ?, ?, ?, ?)",
            (new_path, parent_of(new_path), name_of(new_path), e.size, e.mtime, e.sha256, e.blob, e.gen + 1,
             copy_from, now, e.last_access, e.access_count))
        self.db.execute("DELETE FROM tombstones WHERE key = ?", (new_path,))
        self.db.execute("INSERT OR IGNORE INTO tombstones (key, queued) VALUES (?, ?)", (e.path, now))

    def delete(self, path: str) -> str | None:
        """Remove a file; its object becomes a tombstone. → the blob to delete, if cached."""
        now = time.time()
        with self._tx():
            e = self.get(path)
            if e is None:
                raise NotFound(path)
            if e.is_dir:
                raise IsADirectory(path)
            self.db.execute("DELETE FROM entries WHERE path = ?", (path,))
            self.db.execute("INSERT OR IGNORE INTO tombstones (key, queued) VALUES (?, ?)", (path, now))
        return e.blob

    def merge_listing(self, path: str, objects: Iterable[RemoteObject], dirs: Iterable[str]) -> None:
        """Add what a remote listing of directory `path` found and the catalog lacks; mark it listed."""
        now = time.time()
        prefix = path + "/" if path else ""
        with self._tx():
            self._ensure_dirs(prefix + "x", now)
            for d in dirs:
                self.db.execute(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime) VALUES (?, ?, ?, 1, ?)",
                    (prefix + d, path, d, now))
            for o in objects:
                self.db.execute(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, size, mtime, state, etag, gen) "
                    "VALUES (?, ?, ?, 0, ?, ?, 'clean', ?, 1)", (prefix + o.name, path, o.name, o.size, o.mtime, o.etag))
            self.db.execute("UPDATE entries SET listed = 1 WHERE path = ?", (path,))

    # --- upload queue ----------------------------------------------------------------------

    def claim(self, path: str, gen: int) -> bool:
        with self._tx():
            cur = self.db.execute("UPDATE entries SET state = 'uploading' WHERE path = ? AND gen = ? AND state = 'dirty'",
                                  (path, gen))
            return cur.rowcount == 1

    def mark_clean(self, path: str, gen: int, etag: str | None, version_id: str | None, sha256: str) -> bool:
        with self._tx():
            cur = self.db.execute(
                "UPDATE entries SET state = 'clean', etag = ?, version_id = ?, copy_from = NULL, dirty_since = NULL, "
                "attempts = 0, next_attempt = 0, last_error = NULL, sha256 = ? WHERE path = ? AND gen = ?",
                (etag, version_id, sha256, path, gen))
            return cur.rowcount == 1

    def mark_failed(self, path: str, gen: int, error: str, retry_at: float) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE entries SET state = 'dirty', attempts = attempts + 1, next_attempt = ?, last_error = ? "
                "WHERE path = ? AND gen = ? AND state = 'uploading'", (retry_at, error[:500], path, gen))

    def drop_copy_source(self, path: str, gen: int) -> None:
        """The copy source vanished: fall back to uploading from the cached blob."""
        with self._tx():
            self.db.execute("UPDATE entries SET copy_from = NULL WHERE path = ? AND gen = ?", (path, gen))

    def reset_uploading(self) -> int:
        """After a crash or restart, unfinished uploads start again."""
        with self._tx():
            return self.db.execute("UPDATE entries SET state = 'dirty', next_attempt = 0 "
                                   "WHERE state = 'uploading'").rowcount

    def tombstone_done(self, key: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM tombstones WHERE key = ?", (key,))

    def tombstone_failed(self, key: str, retry_at: float) -> None:
        with self._tx():
            self.db.execute("UPDATE tombstones SET attempts = attempts + 1, next_attempt = ? WHERE key = ?",
                            (retry_at, key))

    def tombstone_pending(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM tombstones WHERE key = ?", (key,)).fetchone() is not None

    # --- cache ----------------------------------------------------------------------------

    def set_cached(self, path: str, gen: int, blob: str, sha256: str) -> bool:
        with self._tx():
            cur = self.db.execute("UPDATE entries SET blob = ?, sha256 = COALESCE(sha256, ?) "
                                  "WHERE path = ? AND gen = ? AND blob IS NULL", (blob, sha256, path, gen))
            return cur.rowcount == 1

    def uncache(self, path: str, gen: int) -> str | None:
        """Drop the cached copy of a clean file (eviction). → its blob, or None if not evictable now."""
        with self._tx():
            row = self.db.execute("SELECT blob FROM entries WHERE path = ? AND gen = ? AND state = 'clean' "
                                  "AND blob IS NOT NULL", (path, gen)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE entries SET blob = NULL WHERE path = ?", (path,))
            return row[0]

    def drop_corrupt(self, path: str, blob: str) -> bool:
        """A cached copy failed its checksum: forget it if the object is safe in S3."""
        with self._tx():
            cur = self.db.execute("UPDATE entries SET blob = NULL WHERE path = ? AND blob = ? AND state = 'clean'",
                                  (path, blob))
            return cur.rowcount == 1

    def record_access(self, hits: Iterable[tuple[str, float, int]]) -> None:
        """Batched access statistics: (path, last access time, count)."""
        with self._tx():
            self.db.executemany("UPDATE entries SET last_access = MAX(COALESCE(last_access, 0), ?), "
                                "access_count = access_count + ? WHERE path = ?",
                                [(t, n, p) for p, t, n in hits])

    def blobs(self) -> set[str]:
        """Every referenced blob (for fsck's orphan sweep; proportional to cached files)."""
        return {r[0] for r in self.db.execute("SELECT blob FROM entries WHERE blob IS NOT NULL")}


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class AsyncCatalog:
    """Runs every Catalog call on one dedicated thread, so SQLite's fsyncs never block the event loop.

    `await db.get(path)` calls `Catalog.get(path)` on that thread.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")

    def __getattr__(self, name: str):  # noqa: ANN204
        method = getattr(self.catalog, name)

        async def call(*args, **kwargs):  # noqa: ANN202
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(method, *args, **kwargs))

        return call

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self.catalog.close()
