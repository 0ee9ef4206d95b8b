"""The namespace as the front ends change it: listings, mkdir, rmdir, new content, rename, delete.

Deleted or renamed-away keys become tombstones (object deletions that wait; uploads.py runs them down).
"""

from __future__ import annotations

import time
from typing import Iterator

from agent.records import Entry
from agent.store.catalog.base import COLUMNS, CatalogBase
from agent.store.errors import AlreadyExists, BadPath, IsADirectory, NotADirectory, NotEmpty, NotFound, PermissionDenied
from agent.store.paths import name_of, parent_of


class Namespace(CatalogBase):
    def children(self, path: str, after: str = "", limit: int = -1) -> list[Entry]:
        """Directory path's entries named after `after`, in name order, at most limit (-1: all): keyset pages on the
        (parent, name) index keep a listing's memory flat."""
        return self._entries(f"SELECT {COLUMNS} FROM entries WHERE parent = ? AND name > ? AND path != '' "
                             "ORDER BY name LIMIT ?", (path, after, limit))

    def count_files_under(self, path: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM entries WHERE path > ? AND path < ? AND is_dir = 0",
                                   (path + "/", path + "0")).fetchone()[0])

    def longest_below(self, path: str) -> str:
        """The longest path (in bytes) below directory `path`, '' when none: a rename of it must leave room for it."""
        row = self.db.execute("SELECT path FROM entries WHERE path > ? AND path < ? "
                              "ORDER BY LENGTH(CAST(path AS BLOB)) DESC LIMIT 1", (path + "/", path + "0")).fetchone()
        return str(row[0]) if row else ""

    def writes_since(self, since: float) -> list[tuple[str, int]]:
        """(parent directory, files) of files stored since `since`: the prefetch cold-start rule's input."""
        return self.db.execute("SELECT parent, COUNT(*) FROM entries WHERE is_dir = 0 AND mtime >= ? "
                               "GROUP BY parent", (since,)).fetchall()

    def files_after(self, last: str, limit: int) -> list[Entry]:
        """A page of files in path order after `last` (keyset pagination keeps memory flat)."""
        return self._entries(f"SELECT {COLUMNS} FROM entries WHERE path > ? AND is_dir = 0 ORDER BY path LIMIT ?",
                             (last, limit))

    def walk_files(self, batch: int = 1000) -> Iterator[Entry]:
        last = ""
        while page := self.files_after(last, batch):
            yield from page
            last = page[-1].path

    def mkdir(self, path: str) -> None:
        now = time.time()
        with self._tx():
            if self._exists("SELECT 1 FROM entries WHERE path = ?", (path,)):
                raise AlreadyExists(path)
            self._ensure_dirs(path, now)
            self.db.execute("INSERT INTO entries (path, parent, name, is_dir, mtime, listed) VALUES (?, ?, ?, 1, ?, 1)",
                            (path, parent_of(path), name_of(path), now))

    def rmdir(self, path: str) -> None:
        with self._tx():
            if (e := self.get(path)) is None:
                raise NotFound(path)
            if not e.is_dir:
                raise NotADirectory(path)
            if self._exists("SELECT 1 FROM entries WHERE parent = ? AND path != '' LIMIT 1", (path,)):
                raise NotEmpty(path)
            self.db.execute("DELETE FROM entries WHERE path = ?", (path,))

    def commit_write(self, path: str, blob: str, size: int, sha256: str, mtime: float, *,
                     claim: bool, base: int | None = None, writer: str | None = None) -> tuple[int, str | None]:
        """Record new content for path (dirty, or uploading when claim) → (gen, replaced blob). `base`: the gen the
        writer's right to replace was judged on (-1: none); a version stored since is not replaced. `writer`: the
        user storing it (its bytes count in dirty_bytes until uploaded)."""
        now = time.time()
        with self._tx():
            if (old := self.get(path)) is not None and old.is_dir:
                raise IsADirectory(path)
            if base is not None and (old.gen if old is not None else -1) != base:
                raise PermissionDenied(path, "changed by another session (stored, renamed or deleted) while this one "
                                             "was written: not stored")
            self._ensure_dirs(path, now)
            state, gen = ("uploading" if claim else "dirty"), self._next_gen()
            known = self._unbury(path)
            if old is None:
                self.db.execute(
                    "INSERT INTO entries (path, parent, name, is_dir, size, mtime, sha256, state, blob, gen, etag, "
                    "dirty_since, last_access, access_count, cached_at, cached_by, writer) "
                    "VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 'write', ?)",
                    (path, parent_of(path), name_of(path), size, mtime, sha256, state, blob, gen, known, now, now, now,
                     writer))
            else:
                self.db.execute(
                    "UPDATE entries SET size = ?, mtime = ?, sha256 = ?, state = ?, blob = ?, gen = ?, "
                    "copy_from = NULL, dirty_since = ?, attempts = 0, next_attempt = 0, last_error = NULL, "
                    "cached_at = ?, cached_by = 'write', writer = ? WHERE path = ?",
                    (size, mtime, sha256, state, blob, gen, now, now, writer, path))
                self._superseded(old)
        return gen, (old.blob if old else None)

    def rename(self, src: str, dst: str, base: int | None = None) -> list[str]:
        """Move a file or directory → blobs it replaced; `base` as in commit_write; each moved file is dirty again."""
        now = time.time()
        with self._tx():
            if (e := self.get(src)) is None:
                raise NotFound(src)
            if dst == src:
                return []
            if e.is_dir and (dst + "/").startswith(src + "/"):
                raise BadPath(dst, "cannot move a directory into itself")  # EINVAL, as rename(2)
            target = self.get(dst)
            if base is not None and (target.gen if target is not None else -1) != base:
                raise PermissionDenied(dst, "stored by another session while this one renamed: not replaced")
            if target is not None:
                if target.is_dir or e.is_dir:
                    raise AlreadyExists(dst)
                self.db.execute("DELETE FROM entries WHERE path = ?", (dst,))
                self._superseded(target)
            self._ensure_dirs(dst, now)
            # '0' sorts right after '/': the subtree of a directory
            subtree = self._entries(f"SELECT {COLUMNS} FROM entries WHERE path > ? AND path < ?",
                                    (src + "/", src + "0")) if e.is_dir else []
            for m in [e, *subtree]:
                # The object this box knew under dst (a file moved over a file): an HA pair's copy or upload to
                # dst is conditional on it (agent/uplink/uploader.py).
                self._move_row(m, dst + m.path[len(src):], now, target.etag if target is not None else None)
        return [target.blob] if target is not None and target.blob else []

    def _move_row(self, e: Entry, new_path: str, now: float, etag: str | None) -> None:
        # the writer moves with the row: a store renamed into place (x.part → x) still counts for its user
        writer = self.db.execute("DELETE FROM entries WHERE path = ? RETURNING writer", (e.path,)).fetchone()[0]
        self._superseded(e)
        if e.is_dir:
            self.db.execute("INSERT INTO entries (path, parent, name, is_dir, mtime, listed) VALUES (?, ?, ?, 1, ?, ?)",
                            (new_path, parent_of(new_path), name_of(new_path), e.mtime, int(e.listed)))
            return
        # Copy from the old key only when a complete object is there (the row was clean, or a pending copy whose
        # source is protected); otherwise the content is in the cache, to upload.
        copy_from = e.path if e.state == "clean" else e.copy_from
        known = self._unbury(new_path)  # the object of a file deleted there, if any
        self.db.execute(
            "INSERT INTO entries (path, parent, name, is_dir, size, mtime, sha256, state, blob, gen, copy_from, "
            "etag, dirty_since, last_access, access_count, writer) "
            "VALUES (?, ?, ?, 0, ?, ?, ?, 'dirty', ?, ?, ?, ?, ?, ?, ?, ?)",
            (new_path, parent_of(new_path), name_of(new_path), e.size, e.mtime, e.sha256, e.blob, self._next_gen(),
             copy_from, known if etag is None else etag, now, e.last_access, e.access_count, writer))
        self._bury(e.path, e.etag, now)

    def _superseded(self, e: Entry) -> None:
        """e's row is gone or newer: an upload of it on the wire may still land, even after a kill -9: a doubt."""
        if e.state == "uploading":
            self._doubt(e.path, e.sha256)

    def delete(self, path: str) -> str | None:
        """Remove a file; its object becomes a tombstone. → the blob to delete, if cached."""
        now = time.time()
        with self._tx():
            if (e := self.get(path)) is None:
                raise NotFound(path)
            if e.is_dir:
                raise IsADirectory(path)
            self.db.execute("DELETE FROM entries WHERE path = ?", (path,))
            self._superseded(e)
            self.db.execute("DELETE FROM prefetched WHERE path = ?", (path,))
            self._bury(path, e.etag, now)
        return e.blob
