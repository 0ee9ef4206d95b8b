"""The catalog's connection, its transactions and what every part of it shares: a row by path, the
ancestors a new path needs, the totals, small facts kept across restarts (agent_state)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from agent.records import Entry
from agent.store.catalog.schema import ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION, check_schema_version
from agent.store.errors import NotADirectory
from agent.store.paths import ancestors, name_of, parent_of

COLUMNS = ("path, is_dir, size, mtime, sha256, state, blob, gen, etag, version_id, copy_from, listed, "
           "dirty_since, attempts, last_error, last_access, access_count")
# A server-side copy carries its source's study-index row: (dst, src). Used by a rename's copy and by a parked one.
COPY_INDEX_ROW = ("INSERT OR REPLACE INTO dicom_objects SELECT ?, size, study_uid, series_uid, sop_uid, modality, "
                  "study_date, patient FROM dicom_objects WHERE path = ?")
# The files of a study key (agent/prefetcher.py `PriorFetcher.key`, the evictor's group of a file): those the study
# index holds under it, else those below the directory it names (not both: a header's UID "2025" took a year in)
OF_STUDY = ("(path > ? AND path < ? AND NOT EXISTS (SELECT 1 FROM dicom_objects WHERE study_uid = ?) OR path IN "
            "(SELECT path FROM dicom_objects WHERE study_uid = ?))")


def of_study(key: str) -> tuple[str, str, str, str]:
    return key + "/", key + "0", key, key    # '0' sorts right after '/': the directory's subtree


@dataclass(frozen=True, slots=True)
class Totals:
    files: int
    cached_files: int
    cached_bytes: int
    queue_files: int
    queue_bytes: int


def entry(row: Sequence[Any]) -> Entry:
    return Entry(row[0], bool(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
                 row[10], bool(row[11]), row[12], row[13], row[14], row[15], row[16])


def row_of(db: sqlite3.Connection, path: str) -> Entry | None:
    """The row of a path on a connection: the catalog's own, or a reader's (AsyncCatalog.get)."""
    row = db.execute(f"SELECT {COLUMNS} FROM entries WHERE path = ?", (path,)).fetchone()
    return entry(row) if row else None


def unwritable(e: sqlite3.Error) -> bool:
    """The catalog's disk failed its write: an I/O error, read-only (remounted so after one), full."""
    return isinstance(e, sqlite3.OperationalError) and e.sqlite_errorcode & 0xFF in (
        sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_FULL)


class CatalogBase:
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
        for table, column, kind in ADDED_COLUMNS:
            if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.db.execute("INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime) VALUES ('', '', '', 1, ?)",
                        (time.time(),))
        self._grouped = False  # inside group(): a transaction is a SAVEPOINT of the group's
        self.write_failure = ""  # why the last transaction failed to write (the disk's fault), until one commits
        self.ship_index = False  # the agent ships study-index deltas: mark_clean queues each row (dicom_unshipped)

    def group(self, calls: Sequence[Callable[[], Any]], durable: bool = True) -> list[Any]:
        """Group commit: calls (each opening its own transaction) in ONE transaction, durable unless told → each
        call's result or exception (a raising call is rolled back to its SAVEPOINT alone). Nothing returns before the
        COMMIT."""
        if len(calls) == 1:
            try:
                return [calls[0]()]
            except Exception as e:
                return [e]
        results: list[Any] = []
        try:
            with self._tx(durable=durable):
                self._grouped = True
                try:
                    for call in calls:
                        try:
                            results.append(call())
                        except Exception as e:
                            if not self.db.in_transaction:  # SQLite rolled the whole group back (e.g. disk full)
                                raise
                            results.append(e)
                finally:
                    self._grouped = False
        except sqlite3.Error as e:
            return [e] * len(calls)
        return results

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self, durable: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception (in a group commit, a SAVEPOINT). durable (FULL):
        what a client is told about; bookkeeping redone after a power cut commits with NORMAL (safe from crashes)."""
        grouped = self._grouped
        if not grouped and self._synchronous_full != durable:
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._synchronous_full = durable
        try:
            self.db.execute("SAVEPOINT member" if grouped else "BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO member" if grouped else "ROLLBACK")
                if grouped:
                    self.db.execute("RELEASE member")
                raise
            try:
                self.db.execute("RELEASE member" if grouped else "COMMIT")
            except sqlite3.Error:
                # E.g. SQLITE_FULL: a transaction left open fails every later BEGIN
                if self.db.in_transaction and not grouped:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:  # /healthz: every store refused while the cache disk cannot be written
            if not grouped and unwritable(e):
                self.write_failure = f"{e} ({e.sqlite_errorname})"
            raise
        if not grouped:
            self.write_failure = ""

    def _write(self, sql: str, args: Sequence[object] = (), *, durable: bool) -> int:
        with self._tx(durable):
            return self.db.execute(sql, args).rowcount

    def _next_gen(self) -> int:
        """A gen never handed out, to any path (per-path ones let a late mark_clean match a new row); above 1."""
        return int(self.db.execute(
            "INSERT INTO agent_state (key, value) VALUES ('gen', (SELECT MAX(COALESCE(MAX(gen), 0), 1) + 1 "
            "FROM entries)) ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
        ).fetchone()[0])

    def _index_rows(self, rows: Sequence[tuple[object, ...]]) -> None:
        """Upsert study-index rows inside the caller's transaction (Studies.index_dicom, Uploads.mark_clean)."""
        self.db.executemany("INSERT OR REPLACE INTO dicom_objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def _bury(self, key: str, etag: str | None, now: float) -> None:
        """key's object (etag: the one this box knew) is to be deleted: a tombstone, in the caller's transaction."""
        self.db.execute("INSERT OR IGNORE INTO tombstones (key, queued, etag) VALUES (?, ?, ?)", (key, now, etag))

    def _unbury(self, key: str) -> str | None:
        """key is written before its tombstone ran: it goes → the ETag known there, for HA's conditional write."""
        row = self.db.execute("DELETE FROM tombstones WHERE key = ? RETURNING etag", (key,)).fetchone()
        return str(row[0]) if row and row[0] is not None else None

    def _doubt(self, key: str, sha256: str | None = None) -> None:
        """A write to key (of sha256; None: a DELETE) may still land: a doubt (Uploads.recheck), caller's tx."""
        now = time.time()
        self.db.execute("INSERT INTO doubts (key, since, next_check, sha256) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO "
                        "UPDATE SET since = excluded.since, next_check = excluded.next_check, checks = 0, sha256 = "
                        "CASE WHEN doubts.sha256 IS excluded.sha256 THEN excluded.sha256 END", (key, now, now, sha256))

    def _exists(self, sql: str, args: Sequence[object]) -> bool:
        return self.db.execute(sql, args).fetchone() is not None

    def _entries(self, sql: str, args: Sequence[object]) -> list[Entry]:
        return [entry(r) for r in self.db.execute(sql, args).fetchall()]

    def _ensure_dirs(self, path: str, now: float) -> None:
        """Create the missing ancestors of path as directories; refuse if one of them is a file. The ancestors are
        read in one statement (one per ancestor was 4 of a stored file's ~20, docs/benchmarks.md §43)."""
        chain = ancestors(path)[1:]
        known = dict(self.db.execute(f"SELECT path, is_dir FROM entries WHERE path IN ({', '.join('?' * len(chain))})",
                                     chain).fetchall()) if chain else {}
        for anc in chain:
            if (is_dir := known.get(anc)) is None:
                self.db.execute("INSERT INTO entries (path, parent, name, is_dir, mtime) VALUES (?, ?, ?, 1, ?)",
                                (anc, parent_of(anc), name_of(anc), now))
            elif not is_dir:
                raise NotADirectory(anc)

    def get(self, path: str) -> Entry | None:
        return row_of(self.db, path)

    def totals(self) -> Totals:
        return Totals(*self.db.execute(
            "SELECT files, cached_files, cached_bytes, queue_files, queue_bytes FROM totals").fetchone())

    def get_state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM agent_state WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_state(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO agent_state (key, value) VALUES (?, ?)", (key, value), durable=True)

    def shrink_memory(self) -> None:
        self.db.execute("PRAGMA shrink_memory")
