"""What the SSD holds and how hot it is: the cached copy of each file (`blob`, NULL: not cached), reads per
file and per directory and day (the heat the prefetch model learns from), and files fetched ahead of a read."""

from __future__ import annotations

import sqlite3
import time
from typing import Iterable, TypeAlias

from agent.records import Entry
from agent.store.catalog.base import COLUMNS, OF_STUDY, CatalogBase, of_study

# path, gen, size, last access, access count, mtime, cached at, cached by, study UID
EvictionRow: TypeAlias = tuple[str, int, int, float, int, float, float | None, str | None, str | None]


class Heat(CatalogBase):
    def set_cached(self, path: str, gen: int, blob: str, sha256: str, by: str = "read",
                   at: float | None = None) -> bool:
        """A fetched copy landed: `by` a read's miss or a prefetch, whose fetch began `at` (now if None)."""
        return self._write("UPDATE entries SET blob = ?, sha256 = COALESCE(sha256, ?), cached_at = ?, cached_by = ? "
                           "WHERE path = ? AND gen = ? AND blob IS NULL",
                           (blob, sha256, time.time() if at is None else at, by, path, gen), durable=False) == 1

    def uncache(self, path: str, gen: int) -> str | None:
        """Drop a clean file's cached copy → its blob; None if not evictable (a doubt: the copy re-uploads it)."""
        with self._tx(durable=False):
            row = self.db.execute("SELECT blob FROM entries WHERE path = ? AND gen = ? AND state = 'clean' AND blob IS "
                                  "NOT NULL AND NOT EXISTS (SELECT 1 FROM doubts WHERE doubts.key = entries.path AND "
                                  "doubts.sha256 IS NOT entries.sha256)", (path, gen)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE entries SET blob = NULL WHERE path = ?", (path,))
            self.db.execute("DELETE FROM prefetched WHERE path = ?", (path,))
            return str(row[0])

    def drop_corrupt(self, path: str, blob: str) -> bool:
        """A cached copy failed its checksum: forget it if the object is safe in S3."""
        return self._write("UPDATE entries SET blob = NULL WHERE path = ? AND blob = ? AND state = 'clean'",
                           (path, blob), durable=False) == 1

    def blob_referenced(self, blob: str) -> bool:
        return self._exists("SELECT 1 FROM entries WHERE blob = ?", (blob,))

    def cached_after(self, last_blob: str, limit: int) -> list[Entry]:
        """A page of cached files in blob order after `last_blob` (the partial blob index: no scan of the archive)."""
        return self._entries(f"SELECT {COLUMNS} FROM entries WHERE blob > ? ORDER BY blob LIMIT ?", (last_blob, limit))

    def eviction_rows(self, limit: int, db: sqlite3.Connection | None = None) -> list[EvictionRow]:
        """(path, gen, size, last access, count, mtime, cached at, cached by, study UID) of the `limit` least recently
        read clean cached files (cached at / by: None for a copy from before those columns, or moved here by a rename;
        the study UID: None for a file not in the DICOM study index), read through db if given."""
        return (db or self.db).execute(
            "SELECT e.path, gen, e.size, COALESCE(last_access, mtime), access_count, mtime, cached_at, cached_by, "
            "d.study_uid FROM entries e LEFT JOIN dicom_objects d ON d.path = e.path "
            "WHERE state = 'clean' AND blob IS NOT NULL ORDER BY last_access LIMIT ?", (limit,)).fetchall()

    def missing_under(self, key: str) -> tuple[int, int]:
        """(files, bytes) of directory or study `key` (OF_STUDY) in S3 but not cached: what a prefetch would fetch."""
        files, size = self.db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE {OF_STUDY} AND "
                                      "is_dir = 0 AND blob IS NULL AND state = 'clean'", of_study(key)).fetchone()
        return int(files), int(size)

    def missing_page(self, key: str, after: str, limit: int) -> list[Entry]:
        """The next page (path order, after `after`) of uncached clean files of directory or study `key` (OF_STUDY;
        two disjoint ordered halves merged: the OR of one statement sorts a directory's whole subtree each page)."""
        lo, hi, uid, _ = of_study(key)
        missing = "AND path > ? AND is_dir = 0 AND blob IS NULL AND state = 'clean'"
        return self._entries(f"SELECT {COLUMNS} FROM entries WHERE path < ? AND NOT EXISTS (SELECT 1 FROM "
                             f"dicom_objects WHERE study_uid = ?) {missing} UNION ALL SELECT {COLUMNS} FROM entries "
                             f"WHERE path IN (SELECT path FROM dicom_objects WHERE study_uid = ?) {missing} ORDER BY "
                             "path LIMIT ?", (hi, uid, max(after, lo), uid, after, limit))

    def record_access(self, hits: Iterable[tuple[str, float, int]],
                      heat: Iterable[tuple[str, str, int, int, int]] = ()) -> tuple[int, int]:
        """Batched reads per file (path, time, count) and per dir and day → (files, bytes) of prefetches first read."""
        hits = list(hits)
        with self._tx(durable=False):
            self.db.executemany("UPDATE entries SET last_access = MAX(COALESCE(last_access, 0), ?), "
                                "access_count = access_count + ? WHERE path = ?", [(t, n, p) for p, t, n in hits])
            used = [r for (p, _, _) in hits
                    for r in self.db.execute("DELETE FROM prefetched WHERE path = ? RETURNING bytes", (p,))]
            self.db.executemany(
                "INSERT INTO heat (dir, day, reads, misses, bytes) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (dir, day) DO UPDATE SET reads = reads + excluded.reads, "
                "misses = misses + excluded.misses, bytes = bytes + excluded.bytes", list(heat))
        return len(used), sum(b for (b,) in used)

    def mark_prefetched(self, path: str, size: int) -> None:
        self._write("INSERT OR REPLACE INTO prefetched (path, bytes, at) VALUES (?, ?, ?)", (path, size, time.time()),
                    durable=False)

    def heat_since(self, day: str) -> list[tuple[str, str, int, int, int]]:
        """(dir, day, reads, misses, bytes) for every directory read on or after day (YYYY-MM-DD)."""
        return self.db.execute("SELECT dir, day, reads, misses, bytes FROM heat WHERE day >= ? ORDER BY dir, day",
                               (day,)).fetchall()
