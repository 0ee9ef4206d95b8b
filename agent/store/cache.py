"""Content files on the SSD: staging, durable commit (fsync + rename), read, evict, verify.

Content is stored by blob name (a random id), not by path: a rename is a catalog change only, and an
upload reading the old content of a file being overwritten keeps reading consistent bytes.
Layout: DIR/staging/<id> while being written, DIR/data/<id[:2]>/<id> once committed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agent.store.errors import NoSpace

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class DiskUsage:
    total: int
    used: int
    free: int


class Cache:
    def __init__(self, root: Path, *, clear_staging: bool = True) -> None:
        self.root = root
        self.staging = root / "staging"
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        if clear_staging:
            # At agent start, anything left in staging is a write that was never acknowledged: discard it.
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_blob() -> str:
        return secrets.token_hex(16)

    def staging_path(self, blob: str) -> Path:
        return self.staging / blob

    def blob_path(self, blob: str) -> Path:
        return self.data / blob[:2] / blob

    def create_staging(self, blob: str) -> int:
        """Open a new staging file for writing; → fd. Raises NoSpace when the disk is full."""
        try:
            return os.open(self.staging_path(blob), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise _translate(e, blob) from e

    def commit(self, blob: str, fd: int) -> None:
        """fsync the staging file, rename it into data/, fsync the directories. Blocking: run in a thread."""
        try:
            os.fsync(fd)
            target = self.blob_path(blob)
            target.parent.mkdir(exist_ok=True)
            os.rename(self.staging_path(blob), target)
            _fsync_dir(target.parent)
        except OSError as e:
            raise _translate(e, blob) from e

    def discard_staging(self, blob: str) -> None:
        try:
            os.unlink(self.staging_path(blob))
        except FileNotFoundError:
            pass

    def remove(self, blob: str) -> None:
        try:
            os.unlink(self.blob_path(blob))
        except FileNotFoundError:
            pass

    def exists(self, blob: str) -> bool:
        return self.blob_path(blob).exists()

    def open_blob(self, blob: str) -> int:
        return os.open(self.blob_path(blob), os.O_RDONLY)

    def open_verified(self, blob: str, sha256: str | None) -> tuple[int | None, str | None]:
        """Open a cached copy only if its bytes hash to sha256. Blocking: run in a thread.

        → (fd, None), or (None, 'missing' | 'checksum mismatch').
        """
        try:
            fd = self.open_blob(blob)
        except FileNotFoundError:
            return None, "missing"
        if sha256 is None or sha256_fd(fd) == sha256:
            return fd, None
        os.close(fd)
        return None, "checksum mismatch"

    def sha256(self, blob: str) -> str:
        """Hash a committed blob. Blocking: run in a thread."""
        fd = self.open_blob(blob)
        try:
            return sha256_fd(fd)
        finally:
            os.close(fd)

    def disk_usage(self) -> DiskUsage:
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return DiskUsage(total=total, used=total - st.f_bfree * st.f_frsize, free=free)

    def iter_blobs(self) -> Iterator[str]:  # blob names on disk
        for sub in self.data.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    yield f.name


def sha256_fd(fd: int) -> str:
    """SHA-256 of a whole file by pread (the fd's offset is untouched). Blocking: run in a thread."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(e: OSError, blob: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(blob, "cache disk full")
    return e
