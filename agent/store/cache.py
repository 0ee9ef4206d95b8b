"""Content files on the SSD: staging, durable commit (fsync + rename), read, evict, verify.

Content is stored by blob name (a random id), not by path: a rename is a catalog change only, and an upload reading the
old content of a file being overwritten keeps reading consistent bytes. Layout: DIR/data/<id[:2]>/<id> once committed. A
write or a fetch begins in a spare: an empty file made ahead (by the process that owns staging) in data/<id[:2]>/ with
its directory fsynced, and linked as DIR/spare/<id> until it is committed in place — no rename and no directory fsync
when a file is acknowledged (docs/benchmarks.md §38). The spare/ link is what tells an unused spare from an orphan: fsck
leaves a file with two links, and start-up removes the spares it finds, but for a committed one (stamped) that a crash
caught before its spare/ link's removal was on the disk. Without a spare ready (or in a serving worker, fsck):
DIR/staging/<id>, renamed into data/ at the commit.

Integrity: the catalog's SHA-256 is what S3 checks; hashing a whole copy with it before every read would
put ~2 ms per MiB before the first byte. So a committed copy carries a stamp in an extended attribute:
a fast digest (xxh3-128, ~20x SHA-256's speed here) and the size, mtime_ns and inode it had when it was
verified. Opening checks the stamp against fstat (cheap); the reader checks the digest while sending
(agent.store.gateway). A copy without a valid stamp is verified with SHA-256 first and stamped again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import structlog
import xxhash

from agent.store.errors import NoSpace

log = structlog.get_logger("pacsgw.cache")
T = TypeVar("T")

CHUNK = 1024 * 1024
STAMP = "user.pacsgw.verified"  # xattr: "<xxh3-128 hex> <size> <mtime_ns> <inode>"
WOULD_BLOCK = "would block"  # open_checked(nowait=True): the check needs the disk, run it in a thread
# Empty staging files kept ready: a cold read's fetch makes its staging file on the event loop, and a create
# allocates an inode (ext4 scans past recently freed ones: 13 µs quiet, 132-444 µs p50 on this VM's disk under
# other processes' churn, the loop's time; docs/benchmarks.md §27); and a spare's directory entry is made durable
# ahead, a batch's in one data/<xx> with one fsync (§38). Made by one thread for all caches.
SPARES = 16
_SPARE_MAKER = ThreadPoolExecutor(1, thread_name_prefix="staging-spares")


def fast_hash() -> "xxhash.xxh3_128":
    """The running digest cached copies are checked with while they are sent."""
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class Stamp:
    digest: str
    size: int
    mtime_ns: int
    ino: int

    def matches(self, st: os.stat_result) -> bool:
        return (self.size, self.mtime_ns, self.ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Opened:
    """A cached copy opened for reading: `digest` is the stamp's, to be checked while sending, or None
    when the whole copy was already verified at open."""

    fd: int
    digest: str | None


@dataclass(frozen=True)
class DiskUsage:
    total: int
    used: int
    free: int
    # out of them with bytes free, a store evicts as for a full disk (Gateway._new_staging); None where the file
    # system counts no inodes (btrfs: f_files 0), which 0 would have read as 'none left', /healthz failing for good
    inodes_free: int | None


class Cache:
    def __init__(self, root: Path, *, clear_staging: bool = True) -> None:
        self.root = root
        self.staging, self.data, self.spare = root / "staging", root / "data", root / "spare"
        self._data_dir, self._staging_dir, self._spare_dir = str(self.data), str(self.staging), str(self.spare)
        self._durable_dirs: set[str] = set()  # data/<xx> whose own entry in data/ this process fsynced
        self.data.mkdir(parents=True, exist_ok=True)
        # Spares only in the process that owns staging (it clears it): fsck and serving workers make their own
        # staging files, and leave no spares behind when they exit.
        self._spares: deque[tuple[str, int]] = deque()  # (blob, fd) of spares: popped on the loop, added by the maker
        self._placed: set[str] = set()  # blobs made as spares, in data/<xx> already, until committed or discarded
        self._spares_wanted = SPARES if clear_staging else 0
        self._making = False
        if clear_staging:
            # At agent start, anything left in staging or a spare is a write that was never acknowledged: discard it.
            shutil.rmtree(self.staging, ignore_errors=True)
            self.spare.mkdir(parents=True, exist_ok=True)
            for blob in os.listdir(self.spare):
                if not _stamped(self.blob_file(blob)):
                    Path(self.blob_file(blob)).unlink(missing_ok=True)
                os.unlink(f"{self._spare_dir}/{blob}")
        self.staging.mkdir(parents=True, exist_ok=True)
        # open_checked(nowait=True) reads into this one buffer: it runs on the event loop only, and a fresh
        # 512 KiB buffer per read cost ~30 µs of page faults
        self._nowait_buf = bytearray(CHUNK)

    def staging_path(self, blob: str) -> str:
        return f"{self._staging_dir}/{blob}"

    def blob_file(self, blob: str) -> str:
        """Where a blob lives: data/<first two characters>/<blob>. A string: a cached read opens it, and two
        pathlib joins per open were ~2 % of a cached read's CPU."""
        return f"{self._data_dir}/{blob[:2]}/{blob}"

    def new_staging(self) -> tuple[str, int]:
        """A new blob and its staging file, open for writing (a spare when one is ready); → (blob, fd). Raises NoSpace
        when the disk is full."""
        if (spare := self.spare_staging()) is not None:
            return spare
        blob, fd = _new_file(self._staging_dir)
        try:  # its data/<xx> now: out of inodes, the commit's mkdir failed an upload the caller could have evicted for
            os.mkdir(os.path.dirname(self.blob_file(blob)))
        except FileExistsError:
            pass
        except OSError as e:
            os.close(fd)
            os.unlink(self.staging_path(blob))
            raise _translate(e, blob) from e
        return blob, fd

    def spare_staging(self) -> tuple[str, int] | None:
        """A spare → (blob, fd), or None when none is ready: never touches the disk, so an event loop may call it
        where a create belongs in a thread."""
        if self._spares_wanted and len(self._spares) <= self._spares_wanted // 2 and not self._making:
            self._making = True
            _SPARE_MAKER.submit(self._make_spares)
        try:
            return self._spares.popleft()
        except IndexError:
            return None

    def _make_spares(self) -> None:
        """Top the spares up (the maker thread). A full disk stops it quietly: new_staging then makes its own file
        and raises NoSpace to its caller, who reports it."""
        try:
            with contextlib.suppress(NoSpace, OSError):
                while len(self._spares) < self._spares_wanted:
                    self._spares.extend(self._spare_batch(self._spares_wanted - len(self._spares)))
        finally:
            self._making = False

    def _spare_batch(self, n: int) -> list[tuple[str, int]]:
        """n spares in one data/<xx>, each made in spare/ first (never an unmarked file in data/ that fsck could take
        for an orphan) and linked into data/<xx>, whose one fsync makes all n entries durable before any is taken."""
        parent = f"{self._data_dir}/{secrets.token_hex(1)}"
        os.makedirs(parent, exist_ok=True)
        made: list[tuple[str, int]] = []
        try:
            for _ in range(n):
                made.append(_new_file(self._spare_dir, os.path.basename(parent)))
                os.link(f"{self._spare_dir}/{made[-1][0]}", self.blob_file(made[-1][0]))
            self._durable(parent)
        except BaseException:
            for blob, fd in made:
                os.close(fd)
                self._unplace(blob)
            raise
        self._placed.update(blob for blob, _ in made)
        return made

    def _durable(self, parent: str) -> None:
        """fsync data/<xx>, and data/ the first time this process does: a power cut lost a new data/<xx> (or one
        from before) and the files in it."""
        _fsync_dir(parent)
        if parent not in self._durable_dirs:
            _fsync_dir(self._data_dir)
            self._durable_dirs.add(parent)

    def _unplace(self, blob: str) -> None:
        Path(self.blob_file(blob)).unlink(missing_ok=True)
        Path(f"{self._spare_dir}/{blob}").unlink(missing_ok=True)

    def commit(self, blob: str, fd: int, digest: str | None = None, *, durable: bool = True) -> None:
        """Stamp the staging file (digest: its fast digest if the caller hashed it on the way in), fsync it, rename it
        into data/, fsync the directories; a spare is in data/ already: its fsync only. Blocking: run in a thread.

        durable=False (a copy of an object S3 holds, just fetched): no fsyncs. A copy a crash left torn or
        missing fails the checks every read makes (size, the stamp's size, mtime_ns and inode, its digest) and
        is fetched again; the two fsyncs cost ~5 ms per file on this VM's disk, with the fetch's slot held."""
        try:
            _stamp(fd, digest or fast_digest_fd(fd))
            if blob in self._placed:  # a spare: in data/<xx>, its entry durable already (_spare_batch)
                # Its spare/ link goes first: then the file's fsync is the commit's one flush (on ext4 it carries the
                # unlink too), and a spare taken by hand from data/ fails here, not as a row without a file.
                Path(f"{self._spare_dir}/{blob}").unlink(missing_ok=True)
                if durable:
                    os.fsync(fd)
                os.stat(self.blob_file(blob))
                self._placed.discard(blob)
                return
            if durable:
                os.fsync(fd)
            target = self.blob_file(blob)
            parent = os.path.dirname(target)
            try:  # data/<xx> is there but for the first blobs of a cache: a mkdir each time was an EEXIST
                os.rename(self.staging_path(blob), target)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(parent)
                os.rename(self.staging_path(blob), target)
            if durable:
                self._durable(parent)
        except OSError as e:
            raise _translate(e, blob) from e

    def discard_staging(self, blob: str) -> None:
        if blob in self._placed:
            self._placed.discard(blob)
            self._unplace(blob)
        else:
            Path(self.staging_path(blob)).unlink(missing_ok=True)

    def remove(self, blob: str) -> None:
        Path(self.blob_file(blob)).unlink(missing_ok=True)

    def open_blob(self, blob: str) -> int:
        return os.open(self.blob_file(blob), os.O_RDONLY)

    def read_blob(self, blob: str, read: Callable[[int], T]) -> T | None:
        """read(fd) of blob's cached copy; None when there is none (evicted meanwhile). Blocking. A copy that cannot be
        opened now raises: taken for none (out of descriptors, attack48), a WORM check went on without its header."""
        try:
            fd = self.open_blob(blob)
        except FileNotFoundError:
            return None
        try:
            return read(fd)
        finally:
            os.close(fd)

    def open_verified(self, blob: str, sha256: str | None) -> tuple[int | None, str | None]:
        """Open a cached copy only if its bytes hash to sha256 (and stamp it): the full check of a copy (scrub, fsck,
        a read of a copy without a valid stamp). Blocking. → (fd, None), or (None, 'missing' | 'checksum mismatch')."""
        try:
            fd = self.open_blob(blob)
        except FileNotFoundError:
            return None, "missing"
        fast = fast_hash()
        if sha256 is None or sha256_fd(fd, fast) == sha256:
            if sha256 is not None and _read_stamp(fd) != _stamp_of(fd, fast.hexdigest()):
                _stamp(fd, fast.hexdigest())
            return fd, None
        os.close(fd)
        return None, "checksum mismatch"

    def open_checked(self, blob: str, size: int, sha256: str | None, whole: int,
                     nowait: bool = False) -> tuple[Opened | None, str | None]:
        """Open a cached copy for a read after cheap checks (size; the stamp's size, mtime_ns and inode).
        Copies up to `whole` bytes are checked against the stamp's digest here; larger ones are checked
        while they are sent. A copy without a valid stamp gets the full SHA-256 check. Blocking.

        nowait: read only what the page cache holds (a copy just written or read: the common hit), so the
        caller may run this on its event loop; → (None, WOULD_BLOCK) when the check needs the disk or a full
        SHA-256 pass, to be run again without nowait in a thread.
        → (Opened, None), or (None, 'missing' | 'size mismatch' | 'checksum mismatch')."""
        try:
            fd = self.open_blob(blob)
        except FileNotFoundError:
            return None, "missing"
        st = os.fstat(fd)
        stamp = _read_stamp(fd)
        problem = "size mismatch" if st.st_size != size else None
        if problem is None and stamp is not None and stamp.matches(st):
            if size > whole:
                return Opened(fd, stamp.digest), None
            h = fast_hash()
            if nowait and hash_range(fd, h, 0, size, nowait_buf=self._nowait_buf) < size:
                os.close(fd)  # not all in the page cache (or shorter than its stamp): the thread decides
                return None, WOULD_BLOCK
            if (h.hexdigest() if nowait else fast_digest_fd(fd)) == stamp.digest:
                return Opened(fd, None), None
            problem = "checksum mismatch"
        os.close(fd)
        if problem is not None or nowait:  # nowait without a valid stamp: the full SHA-256 check belongs in a thread
            return None, problem or WOULD_BLOCK
        fd2, problem = self.open_verified(blob, sha256)  # no stamp, or a stale one: the full check
        return (Opened(fd2, None) if fd2 is not None else None), problem

    def disk_usage(self) -> DiskUsage:
        st = os.statvfs(self.root)  # free: what an unprivileged process may still use (as shutil.disk_usage)
        return DiskUsage(st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize,
                         st.f_favail if st.f_files else None)

    def iter_blobs(self) -> Iterator[str]:  # blob names on disk: data/<first two characters>/<blob>
        return (f.name for f in self.data.glob("*/*"))


def _new_file(directory: str, prefix: str = "") -> tuple[str, int]:
    """A new blob's empty file in directory, open for writing → (blob, fd); prefix: the blob's first characters (its
    data/<xx>). Raises NoSpace when the disk is full."""
    blob = prefix + secrets.token_hex(16)[len(prefix):]
    try:
        return blob, os.open(f"{directory}/{blob}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise _translate(e, blob) from e


def sha256_fd(fd: int, also: "xxhash.xxh3_128") -> str:
    """SHA-256 of a whole file by pread (the fd's offset is untouched), feeding `also` the same bytes.
    Blocking: run in a thread."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        h.update(chunk)
        also.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def hash_range(fd: int, h: "xxhash.xxh3_128", start: int, end: int, *, nowait_buf: bytearray | None = None) -> int:
    """Feed h the file's bytes [start, end) by pread; → where it stopped (< end only at the file's end).
    Blocking: run in a thread. With nowait_buf, only bytes in the page cache are read (preadv2 RWF_NOWAIT, no
    disk wait), into that buffer: it also stops where the next byte is not cached."""
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        chunk = memoryview(os.pread(fd, n, pos)) if nowait_buf is None else _pread_cached(fd, nowait_buf, n, pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return pos


def _pread_cached(fd: int, buf: bytearray, n: int, offset: int) -> memoryview:
    """Up to n (≤ len(buf)) bytes at offset that are in the page cache, read into buf (empty when the first is
    not, or at the end)."""
    try:
        got = os.preadv(fd, [memoryview(buf)[:n]], offset, os.RWF_NOWAIT)
    except OSError as e:  # EAGAIN: not cached; EOPNOTSUPP, ENOTSUP, EINVAL: no RWF_NOWAIT here (ask the thread)
        if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
        return memoryview(b"")
    return memoryview(buf)[:got]


def fast_digest_fd(fd: int) -> str:
    """The fast digest of a whole file by pread. Blocking."""
    h = fast_hash()
    hash_range(fd, h, 0, sys.maxsize)  # to the file's end
    return h.hexdigest()


_stamps_unsupported = False


def _stamp_of(fd: int, digest: str) -> Stamp:
    st = os.fstat(fd)
    return Stamp(digest, st.st_size, st.st_mtime_ns, st.st_ino)


def _stamp(fd: int, digest: str) -> None:
    """Record that the file behind fd, as it is now, has this fast digest."""
    global _stamps_unsupported
    s = _stamp_of(fd, digest)
    try:
        os.setxattr(fd, STAMP, f"{s.digest} {s.size} {s.mtime_ns} {s.ino}".encode())
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if not _stamps_unsupported:  # then every read checks the whole copy with SHA-256 first, as before
            _stamps_unsupported = True
            log.warning("cache_stamps_unsupported", error=str(e),
                        effect="every cached read is verified in full before its first byte")


def _stamped(path: str) -> bool:
    """Whether a spare was committed (stamped before its fsync; a row comes only after both). A file system without
    stamps cannot say: kept then, an orphan for fsck if no row names it."""
    try:
        os.getxattr(path, STAMP)
    except OSError as e:
        return e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


def _read_stamp(fd: int) -> Stamp | None:
    try:
        digest, size, mtime_ns, ino = os.getxattr(fd, STAMP).decode().split()
        return Stamp(digest, int(size), int(mtime_ns), int(ino))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(e: OSError, blob: str) -> Exception:
    return NoSpace(blob, "cache disk full") if e.errno in (errno.ENOSPC, errno.EDQUOT) else e
