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
import itertools
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from agent.records import Entry, RemoteObject
from agent.store.errors import AlreadyExists, IsADirectory, NoSpace, NotADirectory, NotEmpty, NotFound
from agent.store.paths import ancestors, name_of, parent_of

# PRAGMA user_version of a catalog this release writes. Bump it (and add the migration) only for a change an
# older release cannot read correctly; a new table that older releases simply ignore needs no bump. The
# guard in both directions: a release refuses a catalog written by a newer schema (a rollback across a
# schema change must restore the catalog the old release wrote), and a catalog older than this release
# knows how to upgrade. 0 is a catalog from before versioning (its tables are version 1's) or a new file.
SCHEMA_VERSION = 1


class CatalogSchemaError(RuntimeError):
    """The catalog's schema version is not one this release reads."""


def check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise CatalogSchemaError(
            f"{path}: catalog schema version {found} was written by a newer release; this release "
            f"reads version {SCHEMA_VERSION}. Start the newer release again, or restore the catalog "
            "backup taken before that release was installed.")
    if 0 < found < SCHEMA_VERSION:
        raise CatalogSchemaError(
            f"{path}: catalog schema version {found} is older than this release's {SCHEMA_VERSION} and "
            "this release has no migration from it.")


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
-- Partial indexes are used only when the query repeats their WHERE term verbatim: keep them in step.
DROP INDEX IF EXISTS entries_queue;
CREATE INDEX IF NOT EXISTS entries_dirty ON entries(next_attempt, dirty_since) WHERE state = 'dirty';
CREATE INDEX IF NOT EXISTS entries_uploading ON entries(path) WHERE state = 'uploading';
CREATE INDEX IF NOT EXISTS entries_dirty_since ON entries(dirty_since) WHERE state IN ('dirty', 'uploading');
CREATE INDEX IF NOT EXISTS entries_blob ON entries(blob) WHERE blob IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_copy_from ON entries(copy_from) WHERE copy_from IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_evictable ON entries(last_access) WHERE state = 'clean' AND blob IS NOT NULL;

CREATE TABLE IF NOT EXISTS tombstones (
    key          TEXT PRIMARY KEY,
    queued       REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0
);

-- Reads per directory (the first [prefetch] dir_depth levels, e.g. CT/2026-11-23) per local day: the history
-- the heat model learns from. Bounded by directories x days, not by files.
CREATE TABLE IF NOT EXISTS heat (
    dir    TEXT NOT NULL,
    day    TEXT NOT NULL,
    reads  INTEGER NOT NULL,
    misses INTEGER NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (dir, day)
) WITHOUT ROWID;

-- Files fetched ahead of any read by a prefetch, until they are read (a prefetch hit) or evicted.
CREATE TABLE IF NOT EXISTS prefetched (
    path   TEXT PRIMARY KEY,
    bytes  INTEGER NOT NULL,
    at     REAL NOT NULL
) WITHOUT ROWID;

-- One row per study directory seen being written ([prefetch] study_depth levels), from the DICOM header of
-- its first file: what prior-study prefetch finds a patient's earlier studies by. patient is NULL for a
-- directory whose first file was not DICOM (it is not looked at again).
CREATE TABLE IF NOT EXISTS studies (
    dir        TEXT PRIMARY KEY,
    patient    TEXT,
    study_uid  TEXT,
    study_date TEXT,
    modality   TEXT,
    recorded   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient, study_date) WHERE patient IS NOT NULL;

-- Prior studies fetched by prior-study prefetch, with their rank, until it is known whether they were opened
-- (a file read after the fetch) or not (evicted unread): what PriorPrefetcher learns its per-rank heat from.
CREATE TABLE IF NOT EXISTS prior_fetches (
    dir     TEXT PRIMARY KEY,
    rank    INTEGER NOT NULL,
    fetched REAL NOT NULL,
    used    INTEGER
) WITHOUT ROWID;

-- The study index: one row per DICOM object, from the header metadata its S3 object carries (agent/dicom),
-- written when the upload is confirmed and rebuildable from the bucket alone (`pacsgw index-rebuild`).
-- patient is the keyed pseudonym, never the PatientID. What `pacsgw find` answers from.
CREATE TABLE IF NOT EXISTS dicom_objects (
    path       TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    study_uid  TEXT,
    series_uid TEXT,
    sop_uid    TEXT,
    modality   TEXT,
    study_date TEXT,
    patient    TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dicom_objects_study ON dicom_objects(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS dicom_objects_patient ON dicom_objects(patient) WHERE patient IS NOT NULL;
CREATE INDEX IF NOT EXISTS dicom_objects_modality ON dicom_objects(modality, study_date);

-- Small facts that must survive a restart (e.g. the start of the last prefetch window that had its run).
CREATE TABLE IF NOT EXISTS agent_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

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
class Totals:
    files: int
    cached_files: int
    cached_bytes: int
    queue_files: int
    queue_bytes: int


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
        self._synchronous_full = True
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache, whatever the archive size
        self.db.execute("PRAGMA busy_timeout=10000")
        check_schema_version(self.db, path)
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._ensure_root()

    def close(self) -> None:
        self.db.close()

    # --- transactions ----------------------------------------------------------------------

    def _tx(self, durable: bool = True) -> "_Tx":
        return _Tx(self, durable)

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

    def eviction_rows(self, limit: int) -> list[tuple[str, int, int, float, int, float]]:
        """(path, gen, size, last access, access count, mtime) of the `limit` least recently read clean cached
        files: the eviction policy's input. Dirty and uploading files are never in it."""
        return self.db.execute(
            "SELECT path, gen, size, COALESCE(last_access, mtime), access_count, mtime FROM entries "
            "WHERE state = 'clean' AND blob IS NOT NULL ORDER BY last_access LIMIT ?", (limit,)).fetchall()

    def missing_under(self, path: str) -> tuple[int, int]:
        """(files, bytes) below directory path that are in S3 but not cached: what a prefetch would fetch."""
        return self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE path > ? AND path < ? "
                               "AND is_dir = 0 AND blob IS NULL AND state = 'clean'",
                               (path + "/", path + "0")).fetchone()  # '0' sorts right after '/'

    def missing_page(self, path: str, after: str, limit: int) -> list[Entry]:
        """The next page (path order, after `after`) of uncached clean files below directory path."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND path < ? AND is_dir = 0 "
                               "AND blob IS NULL AND state = 'clean' ORDER BY path LIMIT ?",
                               (max(after, path + "/"), path + "0", limit)).fetchall()
        return [_entry(r) for r in rows]

    def count_files_under(self, path: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE path > ? AND path < ? AND is_dir = 0",
                               (path + "/", path + "0")).fetchone()[0]

    def writes_since(self, since: float) -> list[tuple[str, int]]:
        """(parent directory, files) of files stored since `since`: the prefetch cold-start rule's input."""
        return self.db.execute("SELECT parent, COUNT(*) FROM entries WHERE is_dir = 0 AND mtime >= ? "
                               "GROUP BY parent", (since,)).fetchall()

    def files_after(self, last: str, limit: int) -> list[Entry]:
        """A page of files in path order after `last` (keyset pagination keeps memory flat)."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND is_dir = 0 "
                               "ORDER BY path LIMIT ?", (last, limit)).fetchall()
        return [_entry(r) for r in rows]

    def cached_after(self, last_blob: str, limit: int) -> list[Entry]:
        """A page of cached files in blob order after `last_blob`: through the partial blob index, so a
        page costs what the cache holds, not what the archive holds (in path order it scanned every file)."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE blob > ? ORDER BY blob LIMIT ?",
                               (last_blob, limit)).fetchall()
        return [_entry(r) for r in rows]

    def walk_files(self, batch: int = 1000) -> Iterator[Entry]:
        """Every file, in path order, a page at a time."""
        last = ""
        while page := self.files_after(last, batch):
            yield from page
            last = page[-1].path

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
                # The object this box knew under dst (a file moved over a file): an HA pair's copy or upload to
                # dst is conditional on it (agent/uplink/uploader.py).
                self._move_row(m, new_path, now, target.etag if target is not None else None)
        return replaced

    def _subtree(self, path: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND path < ?",
                               (path + "/", path + "0")).fetchall()  # '0' sorts right after '/'
        return [_entry(r) for r in rows]

    def _move_row(self, e: Entry, new_path: str, now: float, etag: str | None) -> None:
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
            "etag, dirty_since, last_access, access_count) VALUES (?, ?, ?, 0, ?, ?, ?, 'dirty', ?, ?, ?, ?, ?, ?, ?)",
            (new_path, parent_of(new_path), name_of(new_path), e.size, e.mtime, e.sha256, e.blob, e.gen + 1,
             copy_from, etag, now, e.last_access, e.access_count))
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
            self.db.execute("DELETE FROM prefetched WHERE path = ?", (path,))
            self.db.execute("INSERT OR IGNORE INTO tombstones (key, queued) VALUES (?, ?)", (path, now))
        return e.blob

    def merge_listing(self, path: str, objects: Iterable[RemoteObject], dirs: Iterable[str]) -> None:
        """Add what a remote listing of directory `path` found and the catalog lacks; mark it listed."""
        now = time.time()
        prefix = path + "/" if path else ""
        with self._tx(durable=False):
            self._ensure_dirs(prefix + "x", now)
            for d in dirs:
                self.db.execute(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime) VALUES (?, ?, ?, 1, ?)",
                    (prefix + d, path, d, now))
            for o in objects:  # an object whose key waits for deletion was deleted (or renamed) here
                self.db.execute(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, size, mtime, state, etag, gen) "
                    "SELECT ?, ?, ?, 0, ?, ?, 'clean', ?, 1 WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE key = ?)",
                    (prefix + o.name, path, o.name, o.size, o.mtime, o.etag, prefix + o.name))
            self.db.execute("UPDATE entries SET listed = 1 WHERE path = ?", (path,))

    def import_inventory(self, files: Iterable[tuple[str, int, float]], batch: int = 200_000) -> int:
        """Record objects already in S3 (an inventory of path, size, mtime) as clean, uncached files.

        The inventory is taken as complete: the directories it implies are created as listed, so they are
        never listed remotely. Existing rows are kept. Bulk speed needs path order; memory is one batch.
        → the number of files added.
        """
        added, rows = 0, iter(files)
        while chunk := list(itertools.islice(rows, batch)):
            dirs = {d for p in {parent_of(f[0]) for f in chunk} for d in ancestors(p + "/x")[1:]}
            with self._tx(durable=False):
                self.db.executemany(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime, listed) "
                    "VALUES (?, ?, ?, 1, ?, 1)",
                    ((d, parent_of(d), name_of(d), chunk[0][2]) for d in sorted(dirs)))
                self.db.execute("UPDATE entries SET listed = 1 WHERE path = ''")
                added += self.db.executemany(
                    "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, size, mtime, state, gen) "
                    "VALUES (?, ?, ?, 0, ?, ?, 'clean', 1)",
                    ((p, parent_of(p), name_of(p), size, mtime) for p, size, mtime in chunk)).rowcount
        return added

    # --- following the active box's namespace (HA standby, agent/ha.py) -----------------------

    def follow_begin(self) -> None:
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS follow_seen (path TEXT PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("DELETE FROM follow_seen")

    def follow_batch(self, objects: list[tuple[str, int, float, str | None]]) -> tuple[int, int, list[str]]:
        """One page of a full listing of the bucket (path, size, mtime, etag): a new object becomes a clean,
        uncached file; a clean file whose object changed (size or etag) takes the new object and drops its
        cached copy. Dirty rows are this box's own queue and stay. → (added, changed, blobs to delete)."""
        now, added, changed, stale = time.time(), 0, 0, []
        with self._tx(durable=False):
            self.db.executemany("INSERT OR IGNORE INTO follow_seen VALUES (?)", ((o[0],) for o in objects))
            for path, size, mtime, etag in objects:
                e = self.get(path)
                if e is None:
                    try:
                        self._ensure_dirs(path, now)
                    except NotADirectory:
                        continue  # a key below a file's name: not representable, as in a listing
                    self.db.execute(
                        "INSERT INTO entries (path, parent, name, is_dir, size, mtime, state, etag, gen) "
                        "VALUES (?, ?, ?, 0, ?, ?, 'clean', ?, 1)", (path, parent_of(path), name_of(path), size,
                                                                      mtime, etag))
                    added += 1
                # Only a newer object replaces a clean row: a page listed before this box's own upload
                # still shows the object that upload replaced.
                elif not e.is_dir and e.state == "clean" and mtime > e.mtime and (
                        e.size != size or (etag and e.etag and etag.strip('"') != e.etag.strip('"'))):
                    self.db.execute(
                        "UPDATE entries SET size = ?, mtime = ?, etag = ?, sha256 = NULL, version_id = NULL, "
                        "blob = NULL, gen = gen + 1 WHERE path = ?", (size, mtime, etag, path))
                    stale += [e.blob] if e.blob else []
                    changed += 1
                elif not e.is_dir and e.state == "clean" and e.etag is None and etag and e.size == size:
                    # e.g. a row from an S3 inventory: the ETag its next conditional overwrite needs
                    self.db.execute("UPDATE entries SET etag = ? WHERE path = ?", (etag, path))
        return added, changed, stale

    def follow_end(self) -> int:
        """After a complete listing: forget clean, uncached files whose object is gone. → how many."""
        with self._tx(durable=False):
            gone = self.db.execute(
                "DELETE FROM entries WHERE is_dir = 0 AND state = 'clean' AND blob IS NULL "
                "AND path NOT IN (SELECT path FROM follow_seen)").rowcount
            self.db.execute("DELETE FROM follow_seen")
        return gone

    def adopt_remote(self, path: str, gen: int, size: int | None, etag: str | None) -> str | None:
        """This box's queued content lost to the other HA box's newer object: the row takes that object
        (uncached; or goes, when the object was deleted). → the blob to delete."""
        with self._tx():
            e = self.get(path)
            if e is None or e.gen != gen:
                return None
            if size is None:
                self.db.execute("DELETE FROM entries WHERE path = ? AND gen = ?", (path, gen))
            else:
                self.db.execute(
                    "UPDATE entries SET state = 'clean', size = ?, etag = ?, sha256 = NULL, version_id = NULL, "
                    "blob = NULL, copy_from = NULL, dirty_since = NULL, attempts = 0, next_attempt = 0, "
                    "last_error = NULL, gen = gen + 1 WHERE path = ? AND gen = ?", (size, etag, path, gen))
        return e.blob

    def hot_paths(self, limit: int) -> list[str]:
        """The most recently used files this box has cached (clean): its hot set, hottest first."""
        return [r[0] for r in self.db.execute(
            "SELECT path FROM entries WHERE state = 'clean' AND blob IS NOT NULL ORDER BY last_access DESC LIMIT ?",
            (limit,))]

    def unlist_all(self) -> None:
        """Every directory is listed again on its next use (a take-over: the old active may have written
        since the standby's last sync)."""
        with self._tx(durable=False):
            self.db.execute("UPDATE entries SET listed = 0 WHERE is_dir = 1")

    # --- upload queue ----------------------------------------------------------------------

    def claim(self, path: str, gen: int) -> bool:
        with self._tx(durable=False):
            cur = self.db.execute(
                "UPDATE entries SET state = 'uploading' WHERE path = ? AND gen = ? AND state = 'dirty'", (path, gen))
            return cur.rowcount == 1

    def mark_clean(self, path: str, gen: int, etag: str | None, version_id: str | None, sha256: str) -> bool:
        with self._tx(durable=False):
            cur = self.db.execute(
                "UPDATE entries SET state = 'clean', etag = ?, version_id = ?, copy_from = NULL, dirty_since = NULL, "
                "attempts = 0, next_attempt = 0, last_error = NULL, sha256 = ? WHERE path = ? AND gen = ?",
                (etag, version_id, sha256, path, gen))
            return cur.rowcount == 1

    def mark_failed(self, path: str, gen: int, error: str, retry_at: float) -> None:
        with self._tx(durable=False):
            self.db.execute(
                "UPDATE entries SET state = 'dirty', attempts = attempts + 1, next_attempt = ?, last_error = ? "
                "WHERE path = ? AND gen = ? AND state = 'uploading'", (retry_at, error[:500], path, gen))

    def requeue(self, path: str, gen: int) -> bool:
        """The object is missing or wrong in S3 but the cache holds verified content: upload it again."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE entries SET state = 'dirty', copy_from = NULL, dirty_since = ?, attempts = 0, next_attempt = 0 "
                "WHERE path = ? AND gen = ? AND state = 'clean' AND blob IS NOT NULL", (time.time(), path, gen))
            return cur.rowcount == 1

    def drop_copy_source(self, path: str, gen: int) -> None:
        """The copy source vanished: fall back to uploading from the cached blob."""
        with self._tx(durable=False):
            self.db.execute("UPDATE entries SET copy_from = NULL WHERE path = ? AND gen = ?", (path, gen))

    def reset_uploading(self) -> int:
        """After a crash or restart, unfinished uploads start again."""
        with self._tx():
            return self.db.execute("UPDATE entries SET state = 'dirty', next_attempt = 0 "
                                   "WHERE state = 'uploading'").rowcount

    def tombstone_done(self, key: str) -> None:
        with self._tx(durable=False):
            self.db.execute("DELETE FROM tombstones WHERE key = ?", (key,))
            self.db.execute("DELETE FROM dicom_objects WHERE path = ?", (key,))  # the object is gone

    def tombstone_failed(self, key: str, retry_at: float) -> None:
        with self._tx(durable=False):
            self.db.execute("UPDATE tombstones SET attempts = attempts + 1, next_attempt = ? WHERE key = ?",
                            (retry_at, key))

    def tombstone_pending(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM tombstones WHERE key = ?", (key,)).fetchone() is not None

    def tombstones_under(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM tombstones WHERE key > ? AND key < ? LIMIT 1",
                               (path + "/", path + "0")).fetchone() is not None  # '0' sorts right after '/'

    # --- cache ----------------------------------------------------------------------------

    def set_cached(self, path: str, gen: int, blob: str, sha256: str) -> bool:
        with self._tx(durable=False):
            cur = self.db.execute("UPDATE entries SET blob = ?, sha256 = COALESCE(sha256, ?) "
                                  "WHERE path = ? AND gen = ? AND blob IS NULL", (blob, sha256, path, gen))
            return cur.rowcount == 1

    def uncache(self, path: str, gen: int) -> str | None:
        """Drop the cached copy of a clean file (eviction). → its blob, or None if not evictable now."""
        with self._tx(durable=False):
            row = self.db.execute("SELECT blob FROM entries WHERE path = ? AND gen = ? AND state = 'clean' "
                                  "AND blob IS NOT NULL", (path, gen)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE entries SET blob = NULL WHERE path = ?", (path,))
            self.db.execute("DELETE FROM prefetched WHERE path = ?", (path,))
            return row[0]

    def drop_corrupt(self, path: str, blob: str) -> bool:
        """A cached copy failed its checksum: forget it if the object is safe in S3."""
        with self._tx(durable=False):
            cur = self.db.execute("UPDATE entries SET blob = NULL WHERE path = ? AND blob = ? AND state = 'clean'",
                                  (path, blob))
            return cur.rowcount == 1

    def record_access(self, hits: Iterable[tuple[str, float, int]],
                      heat: Iterable[tuple[str, str, int, int, int]] = ()) -> tuple[int, int]:
        """Batched access statistics: per file (path, last access time, count) and per directory and day
        (dir, day, reads, misses, bytes). → (files, bytes) of prefetched files read for the first time."""
        hits = list(hits)
        with self._tx(durable=False):
            self.db.executemany("UPDATE entries SET last_access = MAX(COALESCE(last_access, 0), ?), "
                                "access_count = access_count + ? WHERE path = ?",
                                [(t, n, p) for p, t, n in hits])
            used = [r for (p, _, _) in hits
                    for r in self.db.execute("DELETE FROM prefetched WHERE path = ? RETURNING bytes", (p,))]
            self.db.executemany(
                "INSERT INTO heat (dir, day, reads, misses, bytes) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (dir, day) DO UPDATE SET reads = reads + excluded.reads, "
                "misses = misses + excluded.misses, bytes = bytes + excluded.bytes", list(heat))
        return len(used), sum(b for (b,) in used)

    def mark_prefetched(self, path: str, size: int) -> None:
        with self._tx(durable=False):
            self.db.execute("INSERT OR REPLACE INTO prefetched (path, bytes, at) VALUES (?, ?, ?)",
                            (path, size, time.time()))

    def record_prior_fetch(self, dir: str, rank: int) -> None:
        with self._tx(durable=False):
            self.db.execute("INSERT OR REPLACE INTO prior_fetches (dir, rank, fetched, used) VALUES (?, ?, ?, NULL)",
                            (dir, rank, time.time()))

    def settle_prior_fetches(self) -> list[tuple[int, bool]]:
        """Decide the outcome of prior fetches still open: used when one of the study's files was read since,
        unused when none of them is cached any more. → (rank, used) of those decided now."""
        settled = []
        with self._tx(durable=False):
            for d, rank, fetched in self.db.execute(
                    "SELECT dir, rank, fetched FROM prior_fetches WHERE used IS NULL").fetchall():
                lo, hi = d + "/", d + "0"  # '0' sorts right after '/': the directory's subtree
                read = self.db.execute("SELECT 1 FROM entries WHERE path > ? AND path < ? AND last_access > ? "
                                       "LIMIT 1", (lo, hi, fetched)).fetchone()
                cached = self.db.execute("SELECT 1 FROM entries WHERE path > ? AND path < ? AND blob IS NOT NULL "
                                         "LIMIT 1", (lo, hi)).fetchone()
                if read or not cached:
                    self.db.execute("UPDATE prior_fetches SET used = ? WHERE dir = ?", (int(bool(read)), d))
                    settled.append((rank, bool(read)))
        return settled

    def prior_outcomes(self) -> list[tuple[int, bool]]:
        return [(r, bool(u)) for r, u in self.db.execute(
            "SELECT rank, used FROM prior_fetches WHERE used IS NOT NULL").fetchall()]

    def get_state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM agent_state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO agent_state (key, value) VALUES (?, ?)", (key, value))

    def study_known(self, dir: str) -> bool:
        return self.db.execute("SELECT 1 FROM studies WHERE dir = ?", (dir,)).fetchone() is not None

    def record_study(self, dir: str, patient: str | None, study_uid: str | None, study_date: str | None,
                     modality: str | None) -> bool:
        """Remember a study directory (first writer wins). → False if it was already known."""
        with self._tx(durable=False):
            cur = self.db.execute("INSERT OR IGNORE INTO studies (dir, patient, study_uid, study_date, modality, "
                                  "recorded) VALUES (?, ?, ?, ?, ?, ?)",
                                  (dir, patient, study_uid, study_date, modality, time.time()))
            return cur.rowcount == 1

    def index_dicom(self, rows: list[tuple]) -> None:
        """Upsert study-index rows (path, size, study_uid, series_uid, sop_uid, modality, study_date, patient)."""
        with self._tx(durable=False):
            self.db.executemany("INSERT OR REPLACE INTO dicom_objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def copy_dicom_row(self, src: str, dst: str) -> None:
        """A server-side copy (rename) of an indexed object: index the copy too (the source leaves with its
        tombstone)."""
        with self._tx(durable=False):
            self.db.execute("INSERT OR REPLACE INTO dicom_objects SELECT ?, size, study_uid, series_uid, sop_uid, "
                            "modality, study_date, patient FROM dicom_objects WHERE path = ?", (dst, src))

    def dicom_index_size(self) -> int:
        return self.db.execute("SELECT count(*) FROM dicom_objects").fetchone()[0]

    def clear_dicom_index(self) -> None:
        with self._tx(durable=False):
            self.db.execute("DELETE FROM dicom_objects")

    def find_dicom(self, study: str | None = None, patient: str | None = None, modality: str | None = None,
                   date_from: str | None = None, date_to: str | None = None) -> list[tuple]:
        """(path, size, study_uid, series_uid, modality, study_date, cached) of the matching objects, by path."""
        where, args = [], []
        for column, value in (("study_uid", study), ("patient", patient), ("modality", modality)):
            if value is not None:
                where.append(f"d.{column} = ?")
                args.append(value)
        if date_from is not None:
            where.append("d.study_date >= ?")
            args.append(date_from)
        if date_to is not None:
            where.append("d.study_date <= ?")
            args.append(date_to)
        return self.db.execute(
            "SELECT d.path, d.size, d.study_uid, d.series_uid, d.modality, d.study_date, e.blob IS NOT NULL "
            "FROM dicom_objects d LEFT JOIN entries e ON e.path = d.path"
            + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY d.path", args).fetchall()

    def patient_studies(self, patient: str) -> list[tuple[str, str | None, str | None, str | None]]:
        """(dir, study_uid, study_date, modality) of every study of a patient, oldest first."""
        return self.db.execute("SELECT dir, study_uid, study_date, modality FROM studies "
                               "WHERE patient = ? ORDER BY study_date, dir", (patient,)).fetchall()

    def heat_since(self, day: str) -> list[tuple[str, str, int, int, int]]:
        """(dir, day, reads, misses, bytes) for every directory read on or after day (YYYY-MM-DD)."""
        return self.db.execute("SELECT dir, day, reads, misses, bytes FROM heat WHERE day >= ? ORDER BY dir, day",
                               (day,)).fetchall()

    def shrink_memory(self) -> None:
        self.db.execute("PRAGMA shrink_memory")

    def blob_referenced(self, blob: str) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE blob = ?", (blob,)).fetchone() is not None


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception.

    A durable transaction (synchronous=FULL) is fsynced before it returns: every change a client is told
    about. Bookkeeping that can be redone after a power cut (upload results, access counts, claims) commits
    with synchronous=NORMAL — safe against a crash of the process, and fsynced by the next durable commit.
    """

    def __init__(self, catalog: "Catalog", durable: bool) -> None:
        self.db, self.catalog, self.durable = catalog.db, catalog, durable

    def __enter__(self) -> None:
        if self.catalog._synchronous_full != self.durable:
            self.db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            self.catalog._synchronous_full = self.durable
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type:
            self.db.execute("ROLLBACK")
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error:
            # E.g. SQLITE_FULL: the transaction may still be open; leave it rolled back, or every
            # later BEGIN fails ("cannot start a transaction within a transaction").
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise


class AsyncCatalog:
    """Runs every Catalog call on one dedicated thread, so SQLite's fsyncs never block the event loop.

    `await db.get(path)` calls `Catalog.get(path)` on that thread.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")

    def __getattr__(self, name: str):
        method = getattr(self.catalog, name)

        async def call(*args, **kwargs):
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, functools.partial(method, *args, **kwargs))
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    # The catalog shares the cache disk: a full disk is the front ends' NoSpace too.
                    raise NoSpace("catalog", "cache disk full (catalog cannot grow)") from e
                raise

        return call

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self.catalog.close()
