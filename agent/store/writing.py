"""Which paths an upload is writing, and which files a reader holds open, seen by every serving process
(docs/workers.md, "Files being written").

A set in one process saw only its own sessions. A mark is a read lock (OFD) on the byte of a lock file in the cache
(`writing.lock`, `reading.lock`) a hash of the key picks, which another process tests for (F_OFD_GETLK) or takes the
write lock of; the kernel drops a dead process's locks. A hash collision of two keys (2^-62) only refuses a rename
or keeps a copy wrongly, until the other upload or read ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Iterator

from agent.store.paths import ancestors

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padded to 32 bytes. OFD locks
# need l_pid 0.
_FLOCK = struct.Struct("hhqqi4x")


def _byte(path: str) -> int:
    """The byte of the lock file that stands for path (63-bit off_t, so below 2^62)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big") >> 2


def _open(lock_file: Path) -> int:
    # Open for the process's life. Not inherited (O_CLOEXEC, Python's default): a child holding the
    # description would keep the marks alive after the agent died.
    return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)


class _Marks:
    """This process's marks, counted (two sessions may mark one key), over one open file description."""

    def __init__(self, lock_file: Path) -> None:
        self._fd = _open(lock_file)
        self._mine: Counter[str] = Counter()

    def _lock(self, cmd: int, kind: int, key: str, fd: int | None = None) -> int:
        """One fcntl on key's byte → the lock type the kernel answers (F_GETLK: the conflicting one)."""
        reply = fcntl.fcntl(self._fd if fd is None else fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, _byte(key), 1, 0))
        return int(_FLOCK.unpack(reply)[0])

    def _try(self, kind: int, key: str, fd: int | None = None) -> bool:
        """Set a lock on key's byte → False when another open file description holds one in the way (F_OFD_SETLK's
        refusal, not a failure)."""
        try:
            self._lock(fcntl.F_OFD_SETLK, kind, key, fd)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False
        return True

    def _take(self, key: str) -> bool:
        """Mark key: a read lock on its byte, the first time → False (not marked) while another description holds
        the byte's write lock."""
        if not self._mine[key] and not self._try(fcntl.F_RDLCK, key):
            return False
        self._mine[key] += 1
        return True

    def _drop(self, key: str) -> None:
        self._mine[key] -= 1
        if not self._mine[key]:
            del self._mine[key]
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, key)


class WriteMarks(_Marks):
    """This process's paths being written, with the directories above them, and the other processes'. Counted:
    two sessions may write one path, and many files one directory."""

    @staticmethod
    def _keys(path: str) -> list[str]:
        """The file, and 'dir/' for each directory it is in: a directory renamed to one of those would bring
        its own files where the upload's commit stores."""
        return [path, *(d + "/" for d in ancestors(path) if d)]

    def add(self, path: str) -> None:
        for key in self._keys(path):
            if not self._take(key):  # a read lock is refused only for the instant of another process's claim()
                raise BlockingIOError(errno.EAGAIN, "another serving process is claiming this name", key)

    def claim(self, path: str) -> bool:
        """add(path) for an exclusive create, unless an upload of any process writes path or a file below it →
        whether marked. Tested then marked, two processes could both find the path free and both create it: the
        kernel gives the byte's write lock to one of them, which turns it into its mark (one fcntl, never unlocked
        between); the other is refused."""
        if path in self._mine or self.writing(path + "/") or not self._try(fcntl.F_WRLCK, path):
            return False  # marked here, below, or by another process
        self._lock(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, path)  # the write lock becomes the read lock of a mark
        self.add(path)
        return True

    def remove(self, path: str) -> None:
        for key in self._keys(path):
            self._drop(key)

    def busy(self, path: str) -> bool:
        """Whether an upload of this process or of another one writes path, or a file below it, now."""
        return self.writing(path) or self.writing(path + "/")

    def writing(self, key: str, besides: int = 0) -> bool:
        """Whether an upload of this process or of another one writes key now (a path itself; 'dir/': a file below
        dir), besides `besides` of this process's (a session's own uploads, which its rename moves or remove drops)."""
        return self._mine[key] > besides or self._lock(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, key) != fcntl.F_UNLCK


class ReadPins(_Marks):
    """The files readers of every serving process hold open: the evictor leaves their copies, whose space would
    only come back at the reader's close (the disk keeps an unlinked file's blocks while it is open). A pin is a
    read lock on the path's byte of `reading.lock`; an eviction takes the byte's write lock, on a description of its
    own so that this process's pins refuse it too, for the time it drops the copy: either the reader's pin comes
    first and the copy stays, or the eviction does and the reader finds it gone (and fetches it)."""

    def __init__(self, lock_file: Path) -> None:
        super().__init__(lock_file)
        self._evicting_fd = _open(lock_file)

    pin = _Marks._take  # pin path's copy → False while an eviction of it is under way (it is about to be gone)
    unpin = _Marks._drop

    @contextlib.contextmanager
    def evicting(self, path: str) -> Iterator[bool]:
        """→ whether path's copy may be dropped: no reader of any process holds it; no new pin until the end."""
        if not self._try(fcntl.F_WRLCK, path, self._evicting_fd):
            yield False
            return
        try:
            yield True
        finally:
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, path, self._evicting_fd)
