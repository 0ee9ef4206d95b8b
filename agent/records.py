"""Value types shared by the store and the uplink: neither layer owns them, so neither imports the other
to use them (the uplink imports nothing from agent.store)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalog row: a file or directory and its state (see agent.store.catalog)."""

    path: str
    is_dir: bool
    size: int
    mtime: float
    sha256: str | None
    state: str | None
    blob: str | None
    gen: int
    etag: str | None
    version_id: str | None
    copy_from: str | None
    listed: bool
    dirty_since: float | None
    attempts: int
    last_error: str | None
    last_access: float | None
    access_count: int

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def cached(self) -> bool:
        return self.blob is not None


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object found by a remote listing, relative to the directory listed."""

    name: str
    size: int
    mtime: float
    etag: str | None


@dataclass(frozen=True)
class Lock:
    """The S3 Object Lock an object is written with (decided by agent.store.worm, applied by the uplink)."""

    mode: str
    until: datetime.datetime
    legal_hold: bool

    def s3_args(self) -> dict[str, object]:
        args: dict[str, object] = {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": self.until}
        if self.legal_hold:
            args["ObjectLockLegalHoldStatus"] = "ON"
        return args
