"""`pacsgw retention apply`: bring the Object Lock of objects already in the bucket up to today's rules (a rule
change applies by itself only to new uploads). It HEADs every object, puts it to the uploader's decision
(agent.dicom.retention) and only ever extends: a later retain-until, a legal hold switched on; nothing is
shortened, released or deleted, and every change is audited with the rule that asked for it (README, "Operating").
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field, replace
from typing import Any

from agent.audit import AuditLog, Who, failure
from agent.config import Config
from agent.dicom.header import HEADER_MAX, parse
from agent.dicom.retention import DicomRetention, header_from_meta
from agent.uplink.encoding import decode_head, encoding_of
from agent.uplink.s3 import S3Uplink, error_code

SLACK = datetime.timedelta(days=1)  # the upload time (LastModified) trails the PACS's write: not worth a request
FIRST_READ = 64 * 1024              # the header of almost every file; HEADER_MAX when it is longer


@dataclass(frozen=True)
class Change:
    path: str
    version_id: str | None
    mode: str                              # kept when the object already has one (COMPLIANCE cannot change)
    until_before: datetime.datetime | None
    until: datetime.datetime | None        # None: the date stays
    legal_hold: bool                       # switch legal hold on
    reason: str


@dataclass
class Plan:
    objects: int = 0
    failed: list[str] = field(default_factory=list)   # 'path: error' of objects that could not be read
    changes: list[Change] = field(default_factory=list)


async def _birth_date(s3: S3Uplink, path: str, version: str | None, size: int, encoded: bool) -> str | None:
    """PatientBirthDate from the object's first bytes (decoded if compressed): metadata never holds it."""
    for n in (min(size, FIRST_READ), min(size, HEADER_MAX)):
        head = await s3.first_bytes(path, n, version)
        if encoded:
            head = decode_head(head, HEADER_MAX)  # what parse reads at most, however far the frame goes
        if not (h := parse(head, whole=n == size and not encoded)).problem or n == size or n == HEADER_MAX:
            return h.birth_date
    return None


def _change(path: str, head: dict[str, Any], decision_lock: Any, reason: str) -> Change | None:
    current = head.get("ObjectLockRetainUntilDate")
    if decision_lock is None:
        return None
    longer = decision_lock.until if current is None or decision_lock.until > current + SLACK else None
    hold = decision_lock.legal_hold and head.get("ObjectLockLegalHoldStatus") != "ON"
    if longer is None and not hold:
        return None
    return Change(path, head.get("VersionId"), head.get("ObjectLockMode") or decision_lock.mode, current, longer,
                  hold, reason)


class NoObjectLock(RuntimeError):
    """The bucket cannot hold retention: there is nothing to extend."""


async def plan(cfg: Config, concurrency: int = 32) -> Plan:
    """What today's rules would extend on the objects in the bucket (read only)."""
    rules = DicomRetention(cfg.compliance)
    out = Plan()
    queue: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue(maxsize=concurrency * 4)

    async def worker(s3: S3Uplink) -> None:
        while (item := await queue.get()) is not None:
            path, mtime = item
            out.objects += 1
            try:
                if (head := await s3.head(path)) is None:
                    continue  # deleted since the listing
                if (h := header_from_meta(head.get("Metadata") or {})) is not None and rules.needs_birth_date:
                    born = await _birth_date(s3, path, head.get("VersionId"), head["ContentLength"],
                                             encoding_of(head.get("Metadata")) is not None)
                    h = replace(h, birth_date=born)
                d = rules.decide(path, mtime, h)
                if (c := _change(path, head, d.lock, d.reason)) is not None:
                    out.changes.append(c)
            except Exception as e:  # reported and counted; the command can be run again
                out.failed.append(f"{path}: {error_code(e)}: {str(e)[:200]}")

    async with S3Uplink(cfg.uplink) as s3, S3Uplink(cfg.uplink) as lister:
        if not await s3.object_lock_enabled():
            raise NoObjectLock(f"bucket {cfg.uplink.bucket!r} has no Object Lock: its objects cannot be retained")
        workers = [asyncio.create_task(worker(s3)) for _ in range(concurrency)]
        async for page in lister.walk(logical=False):  # sizes unused: every object is HEADed
            for path, _size, mtime, _etag in page:
                await queue.put((path, mtime))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    out.changes.sort(key=lambda c: c.path)
    return out


async def apply(cfg: Config, changes: list[Change], audit: AuditLog, who: Who) -> list[str]:
    """Extend retention and set legal holds as planned; → 'path: error' of the changes S3 refused."""
    failed = []
    async with S3Uplink(cfg.uplink) as s3:
        for c in changes:
            detail = {"until_before": c.until_before.isoformat() if c.until_before else None,
                      "reason": c.reason, "version_id": c.version_id}
            try:
                if c.until is not None:
                    await s3.retain(c.path, c.mode, c.until, c.version_id)
                    audit.record(who, "retention-extend", c.path, until=c.until.isoformat(), mode=c.mode, **detail)
                if c.legal_hold:
                    await s3.hold(c.path, c.version_id)
                    audit.record(who, "legal-hold", c.path, status="ON", **detail)
            except Exception as e:  # S3 refused (e.g. a mode it will not change): reported, the rest goes on
                audit.record(who, "retention-extend", c.path, failure(e), **detail)
                failed.append(f"{c.path}: {error_code(e)}: {str(e)[:200]}")
    return failed
