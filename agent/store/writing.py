"""Which paths an upload is writing, seen by every serving process ([server] workers > 1).

A rename over a file that an upload is still writing is refused (the upload's commit would store over what was
renamed there). A set in one process sees only its own sessions; with several processes a session on another
one renamed over the file. Each process marks the paths it writes with an open file description (OFD) lock on
one byte of the shared file `cache/writing.lock`, the byte picked by a hash of the path: a read lock per path
written, which a rename tests for (F_OFD_GETLK) without taking anything. The kernel drops the locks of a
process that dies (kill -9, OOM) with its file descriptions, so a mark never outlives its writer and the file
never needs cleaning: it stays empty. A hash collision of two paths (2^-62) only refuses a rename wrongly,
until the other upload ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from collections import Counter
from pathlib import Path

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padded to 32 bytes. OFD locks
# need l_pid 0.
_FLOCK = struct.Struct("hhqqi4x")


def _byte(path: str) -> int:
    """The byte of the lock file that stands for path (63-bit off_t, so below 2^62)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big") >> 2


class WriteMarks:
    """This process's paths being written (counted: two sessions may write the same path) and the others'."""

    def __init__(self, lock_file: Path) -> None:
        # Open for the process's life. Not inherited (O_CLOEXEC, Python's default): a child holding the
        # description would keep the marks alive after the agent died.
        self._fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        self._mine: Counter[str] = Counter()

    def _lock(self, cmd: int, kind: int, path: str) -> int:
        """One fcntl on path's byte → the lock type the kernel answers (F_GETLK: the conflicting one)."""
        reply = fcntl.fcntl(self._fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, _byte(path), 1, 0))
        return int(_FLOCK.unpack(reply)[0])

    def add(self, path: str) -> None:
        if not self._mine[path]:
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, path)  # read locks never conflict: never refused
        self._mine[path] += 1

    def remove(self, path: str) -> None:
        self._mine[path] -= 1
        if not self._mine[path]:
            del self._mine[path]
            self._lock(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, path)

    def move(self, old: str, new: str) -> None:
        self.add(new)
        self.remove(old)

    def busy(self, path: str) -> bool:
        """Whether an upload of this process or of another one writes path now."""
        return path in self._mine or self._lock(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, path) != fcntl.F_UNLCK
