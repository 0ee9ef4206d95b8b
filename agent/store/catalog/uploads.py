"""The upload queue: rows whose state is not 'clean' (dirty: on the SSD only → uploading → clean: in S3), the
tombstones (object deletions that wait) and the doubts (keys a request went to with no outcome heard). Their
rules are docs/architecture.md's "Generations", "One key at a time" and "Late requests are re-checked".
"""

from __future__ import annotations

import dataclasses
import time
from typing import cast

from agent.records import Entry
from agent.store.catalog.base import COLUMNS, COPY_INDEX_ROW, CatalogBase


class Uploads(CatalogBase):
    def oldest_dirty(self) -> float | None:
        return cast("float | None", self.db.execute(
            "SELECT MIN(dirty_since) FROM entries WHERE state IN ('dirty', 'uploading')").fetchone()[0])

    def due_uploads(self, now: float, limit: int, hold: float = 0.0) -> list[Entry]:
        """Rows to upload now; with hold, only those stored (made dirty) at least hold seconds ago."""
        return self._entries(f"SELECT {COLUMNS} FROM entries WHERE state = 'dirty' AND next_attempt <= ? "
                             "AND COALESCE(dirty_since, 0) <= ? ORDER BY next_attempt, dirty_since LIMIT ?",
                             (now, now - hold, limit))

    def next_due(self, hold: float = 0.0) -> float | None:
        """When the next row is due (due_uploads with the same hold)."""
        # without hold, MIN(next_attempt): the index's first column, no scan
        due = "MAX(next_attempt, COALESCE(dirty_since, 0) + ?)" if hold else "next_attempt"
        return cast("float | None", self.db.execute(f"SELECT MIN({due}) FROM entries WHERE state = 'dirty'",
                                                    (hold,) if hold else ()).fetchone()[0])

    def claim_due(self, now: float, limit: int, hold: float = 0.0) -> list[Entry]:
        """due_uploads claimed ('uploading') in one transaction → those rows: each is claimed once, by the process
        whose transaction read it dirty (a claim per row was a transaction per uploaded file: benchmarks.md §43)."""
        with self._tx(durable=False):
            if rows := self.due_uploads(now, limit, hold):
                self.db.execute(f"UPDATE entries SET state = 'uploading' WHERE state = 'dirty' AND path IN "
                                f"({', '.join('?' * len(rows))})", [e.path for e in rows])
        return [dataclasses.replace(e, state="uploading") for e in rows]

    def claim(self, path: str, gen: int) -> bool:
        return self._write("UPDATE entries SET state = 'uploading' WHERE path = ? AND gen = ? AND state = 'dirty'",
                           (path, gen), durable=False) == 1

    def mark_clean(self, path: str, gen: int, etag: str | None, version_id: str | None, sha256: str | None,
                   index_row: tuple[object, ...] | None = None) -> bool:
        """The upload of (path, gen) is confirmed. index_row, written in the same transaction: the study-index
        row of the object the key now holds (superseded or not); () it has none (not DICOM, or stored without
        metadata); None: a server-side copy, whose row copy_dicom_row wrote."""
        with self._tx(durable=False):
            if index_row:
                self._index_rows([index_row])
            elif index_row is not None:
                self.db.execute("DELETE FROM dicom_objects WHERE path = ?", (path,))
            if self.ship_index and etag:  # path's index row, if it has one, describes the object under etag: next delta
                self.db.execute("INSERT OR REPLACE INTO dicom_unshipped (path, etag) SELECT path, ? FROM dicom_objects "
                                "WHERE path = ?", (etag, path))
            return self.db.execute(
                "UPDATE entries SET state = 'clean', etag = ?, version_id = ?, copy_from = NULL, dirty_since = NULL, "
                "attempts = 0, next_attempt = 0, last_error = NULL, sha256 = ? WHERE path = ? AND gen = ?",
                (etag, version_id, sha256, path, gen)).rowcount == 1

    def mark_failed(self, path: str, gen: int, error: str, retry_at: float, unsure: bool = False) -> None:
        """The upload failed; unsure: with no answer, so it may still land (a doubt, even if the row is gone)."""
        with self._tx(durable=False):
            self.db.execute("UPDATE entries SET state = 'dirty', attempts = attempts + 1, next_attempt = ?, "
                            "last_error = ? WHERE path = ? AND gen = ? AND state = 'uploading'",
                            (retry_at, error[:500], path, gen))
            if unsure:
                row = self.db.execute("SELECT sha256 FROM entries WHERE path = ? AND gen = ?", (path, gen)).fetchone()
                self._doubt(path, row[0] if row else None)

    def requeue(self, path: str, gen: int, etag: str | None) -> bool:
        """The object is missing or wrong in S3 but the cache holds verified content: upload it again. etag: what
        the key holds now, as the caller saw it (None: nothing), the object an HA box's conditional PUT may replace;
        with the ETag of its own upload it took the missing or late object for the other box's (`ha_conflict`)."""
        return self._write(
            "UPDATE entries SET state = 'dirty', copy_from = NULL, etag = ?, dirty_since = ?, attempts = 0, "
            "next_attempt = 0 WHERE path = ? AND gen = ? AND state = 'clean' AND blob IS NOT NULL",
            (etag, time.time(), path, gen), durable=True) == 1

    def drop_copy_source(self, path: str, gen: int) -> None:
        """The copy source vanished: fall back to uploading from the cached blob."""
        self._write("UPDATE entries SET copy_from = NULL WHERE path = ? AND gen = ?", (path, gen), durable=False)

    def reset_uploading(self) -> int:
        """After a crash or restart, unfinished uploads start again. Each of them, and each DELETE sent for a
        tombstone still pending, may have been on the wire: a doubt."""
        with self._tx():
            for key, sha in self.db.execute("SELECT path, sha256 FROM entries WHERE state = 'uploading' UNION ALL "
                                            "SELECT key, NULL FROM tombstones WHERE attempts > 0").fetchall():
                self._doubt(key, sha)
            return int(self.db.execute("UPDATE entries SET state = 'dirty', next_attempt = 0 "
                                       "WHERE state = 'uploading'").rowcount)

    def due_tombstones(self, now: float, limit: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT key FROM tombstones WHERE next_attempt <= ? AND key NOT IN "
            "(SELECT copy_from FROM entries WHERE copy_from IS NOT NULL) ORDER BY queued LIMIT ?", (now, limit))]

    def tombstone_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0])

    def tombstone_done(self, key: str, unsure: bool = False) -> None:
        """key's object is deleted; unsure: an earlier attempt of its DELETE had no answer, may still land (a doubt)."""
        with self._tx(durable=False):
            if unsure:
                self._doubt(key)
            self.db.execute("DELETE FROM tombstones WHERE key = ?", (key,))
            now = time.time()
            self.db.execute("DELETE FROM deleted WHERE at < ?", (now - 3600,))
            self.db.execute("INSERT OR REPLACE INTO deleted (key, at) VALUES (?, ?)", (key, now))
            self.db.execute("DELETE FROM dicom_objects WHERE path = ?", (key,))  # the object is gone
            self.db.execute("DELETE FROM dicom_unshipped WHERE path = ?", (key,))

    def tombstone_sending(self, key: str) -> None:
        """key's DELETE is about to be sent: counted first, so that after a kill -9 it is known it may have been."""
        self._write("UPDATE tombstones SET attempts = attempts + 1 WHERE key = ?", (key,), durable=False)

    def tombstone_failed(self, key: str, retry_at: float, unsure: bool = False) -> None:
        """The DELETE failed; unsure: with no answer, so it may still land, after a new file took the key (a doubt)."""
        with self._tx(durable=False):
            self.db.execute("UPDATE tombstones SET next_attempt = ? WHERE key = ?", (retry_at, key))
            if unsure:
                self._doubt(key)

    def tombstone_pending(self, key: str) -> bool:
        """key is still to be deleted, and no pending copy reads from it (checked again under the key's lock)."""
        return self._exists("SELECT 1 FROM tombstones WHERE key = ? AND NOT EXISTS "
                            "(SELECT 1 FROM entries WHERE copy_from = ?)", (key, key))

    def queue_tombstone(self, key: str) -> None:
        """key is about to be written by the agent for itself (a parked copy): recorded first, so that an object
        left by a crash before anything pointed there is deleted, not kept for ever; and a doubt, for a copy the
        store carries out after that tombstone ran."""
        with self._tx():
            self._bury(key, None, time.time())
            self._doubt(key)

    def due_doubts(self, now: float, limit: int) -> list[tuple[str, int, str | None]]:
        """(key, checks so far, the content the write in doubt carries or None) of the doubts due for a check."""
        return self.db.execute("SELECT key, checks, sha256 FROM doubts WHERE next_check <= ? ORDER BY next_check "
                               "LIMIT ?", (now, limit)).fetchall()

    def recheck(self, key: str, found: str | None, next_check: float, forget_before: float) -> Entry | None:
        """A doubt's check under the uploader's key lock (docs/architecture.md, "Late requests are re-checked");
        found: the ETag S3 holds under key (None: none). A key no file has gets its tombstone again in the
        transaction that sees no row; a doubt whose write is older than forget_before goes. → the file under key."""
        with self._tx(durable=False):
            if found is not None and not self._exists("SELECT 1 FROM entries WHERE path = ? AND is_dir = 0", (key,)):
                self._bury(key, found, time.time())
            self.db.execute("DELETE FROM doubts WHERE key = ? AND since < ?", (key, forget_before))
            self.db.execute("UPDATE doubts SET checks = checks + 1, next_check = ? WHERE key = ?", (next_check, key))
            return self.get(key)

    def park_copies(self, key: str, parked: str) -> int:
        """key's object was copied aside to `parked` before key is written again: the renames still waiting to
        be copied from key copy from there instead (with its study-index row), and `parked` is a tombstone,
        deleted once they have. → the rows pointed there."""
        with self._tx(durable=True):
            self._bury(parked, None, time.time())
            self.db.execute(COPY_INDEX_ROW, (parked, key))
            return int(self.db.execute("UPDATE entries SET copy_from = ? WHERE copy_from = ? AND path != ?",
                                       (parked, key, key)).rowcount)

    def tombstones_under(self, path: str) -> bool:
        return self._exists("SELECT 1 FROM tombstones WHERE key > ? AND key < ? LIMIT 1",
                            (path + "/", path + "0"))  # '0' sorts right after '/'
