"""The namespace as the bucket says it is: a remote listing merged in, and the HA
standby following the active box's namespace (agent/ha.py)."""

from __future__ import annotations

import time
from typing import Iterable

from agent.records import RemoteObject
from agent.store.catalog.base import CatalogBase
from agent.store.errors import NotADirectory
from agent.store.paths import name_of, parent_of


class RemoteSync(CatalogBase):
    def merge_listing(self, path: str, objects: Iterable[RemoteObject], dirs: Iterable[str], begun: float,
                      complete: bool = True) -> None:
        """Add what a remote listing of directory `path`, asked for at `begun`, found and the catalog lacks; mark it
        listed if complete. A key whose DELETE landed since may still be listed: neither it nor a directory above it
        is taken (a deleted file would come back), and the directory is listed again at its next use."""
        now = time.time()
        prefix = path + "/" if path else ""
        with self._tx(durable=False):
            gone = {r[0][len(prefix):] for r in self.db.execute(
                "SELECT key FROM deleted WHERE at >= ? AND substr(key, 1, ?) = ?", (begun, len(prefix), prefix))}
            self._ensure_dirs(prefix + "x", now)
            self.db.executemany(
                "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime) VALUES (?, ?, ?, 1, ?)",
                ((prefix + d, path, d, now) for d in set(dirs) - {g.split("/", 1)[0] for g in gone}))
            # an object whose key waits for deletion was deleted (or renamed) here, and one under a key in doubt
            # that no file has is a write the agent gave up on (Uploads.recheck deletes it)
            self.db.executemany(
                "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, size, mtime, state, etag, gen) "
                "SELECT ?, ?, ?, 0, ?, ?, 'clean', ?, 1 WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE key = ?) "
                "AND NOT EXISTS (SELECT 1 FROM doubts WHERE key = ?)",
                ((prefix + o.name, path, o.name, o.size, o.mtime, o.etag, prefix + o.name, prefix + o.name)
                 for o in objects if o.name not in gone))
            if complete and not gone:
                self.db.execute("UPDATE entries SET listed = 1 WHERE path = ?", (path,))

    def known_sizes(self, objects: list[tuple[str, str | None]]) -> dict[str, int]:
        """The catalog's sizes of listed (path, ETag) objects it knows by ETag: logical sizes a listing cannot show."""
        known = {}
        for path, etag in objects:
            row = self.db.execute("SELECT size, etag FROM entries WHERE path = ? AND is_dir = 0", (path,)).fetchone()
            if etag and row is not None and row[1] and row[1].strip('"') == etag.strip('"'):
                known[path] = row[0]
        return known

    def correct_size(self, path: str, gen: int, listed: int, size: int) -> bool:
        """A clean uncached row holding a compressed object's listed size takes the file's; False: it changed."""
        return self._write("UPDATE entries SET size = ? WHERE path = ? AND gen = ? AND size = ? AND state = 'clean' "
                           "AND blob IS NULL", (size, path, gen, listed), durable=False) == 1

    def unlist_all(self) -> None:
        """Every directory is listed again on its next use (a take-over: the old active may have written since)."""
        self._write("UPDATE entries SET listed = 0 WHERE is_dir = 1", durable=False)

    def hot_paths(self, limit: int) -> list[str]:
        """The most recently used files this box has cached (clean): its hot set, hottest first."""
        return [r[0] for r in self.db.execute(
            "SELECT path FROM entries WHERE state = 'clean' AND blob IS NOT NULL ORDER BY last_access DESC LIMIT ?",
            (limit,))]

    def follow_begin(self) -> None:
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS follow_seen (path TEXT PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("DELETE FROM follow_seen")

    def follow_batch(self, objects: list[tuple[str, int, float, str | None]]) -> tuple[int, int, list[str]]:
        """A page of the bucket's listing: new objects, changed ones over clean rows → (added, changed, stale blobs)."""
        now, added, changed, stale = time.time(), 0, 0, []
        with self._tx(durable=False):
            self.db.executemany("INSERT OR IGNORE INTO follow_seen VALUES (?)", ((o[0],) for o in objects))
            for path, size, mtime, etag in objects:
                if (e := self.get(path)) is None:
                    try:
                        self._ensure_dirs(path, now)
                    except NotADirectory:
                        continue  # a key below a file's name: not representable, as in a listing
                    self.db.execute("INSERT INTO entries (path, parent, name, is_dir, size, mtime, state, etag, gen) "
                                    "VALUES (?, ?, ?, 0, ?, ?, 'clean', ?, 1)",
                                    (path, parent_of(path), name_of(path), size, mtime, etag))
                    added += 1
                # Only a newer object replaces a clean row: a page listed before this box's own upload
                # still shows the object that upload replaced.
                elif not e.is_dir and e.state == "clean" and mtime > e.mtime and (
                        e.size != size or (etag and e.etag and etag.strip('"') != e.etag.strip('"'))):
                    self.db.execute(
                        "UPDATE entries SET size = ?, mtime = ?, etag = ?, sha256 = NULL, version_id = NULL, "
                        "blob = NULL, gen = ? WHERE path = ?", (size, mtime, etag, self._next_gen(), path))
                    stale += [e.blob] if e.blob else []
                    changed += 1
                elif not e.is_dir and e.state == "clean" and e.etag is None and etag and e.size == size:
                    # e.g. a row listed by a store that gave no ETag: the one its next conditional overwrite needs
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
        """The other HA box's newer object won: the row takes it (uncached) or goes (deleted) → blob to delete."""
        with self._tx():
            if (e := self.get(path)) is None or e.gen != gen:
                return None
            if size is None:
                self.db.execute("DELETE FROM entries WHERE path = ? AND gen = ?", (path, gen))
            else:
                self.db.execute(
                    "UPDATE entries SET state = 'clean', size = ?, etag = ?, sha256 = NULL, version_id = NULL, "
                    "blob = NULL, copy_from = NULL, dirty_since = NULL, attempts = 0, next_attempt = 0, "
                    "last_error = NULL, gen = ? WHERE path = ? AND gen = ?", (size, etag, self._next_gen(), path, gen))
        return e.blob
