"""Retention: which files are retained, until when, and so which changes are refused (the uplink applies the Object
Lock, the gateway the refusals). The path rules ([compliance] and the [[compliance.rules]] by prefix) give a file its
terms; a DICOM rule (by modality, SOP class, study date or patient age) that matches only ever lengthens them;
`until_age` counts from the header's birth date, read from the file (it never leaves the box). Temporary upload names
(x.dcm.part) are never retained, so the usual upload-then-rename still works.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from dataclasses import dataclass
from typing import Any, Mapping

import structlog

from agent.config import ComplianceConfig, RetentionRule
from agent.dicom.header import read_fd
from agent.records import DICOM_PREFIX as PREFIX
from agent.records import Entry, Header, Lock
from agent.store.cache import Cache
from agent.store.errors import PermissionDenied, Unavailable
from agent.uplink.s3 import S3Uplink, error_code

log = structlog.get_logger("pacsgw.worm")

UTC = datetime.timezone.utc
DAY = 86400


@dataclass(frozen=True)
class Decision:
    lock: Lock | None    # what the object should carry; None: not retained
    reason: str          # which rule gave the retain-until (and the hold), for `retention apply` and the log
    retention: str       # the object tag lifecycle rules select on: '<days>d', 'age<N>' or 'none'


def _birth(h: Header, stored: datetime.datetime) -> datetime.datetime | None:
    """The header's birth date; None without one, or after the file was stored (a day's slack: the modality's
    local day): the client writes it, and 2999 locked the object for ever, 9999 was past datetime's last year."""
    try:
        born = datetime.datetime.strptime(h.birth_date or "", "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    return born if born <= stored + datetime.timedelta(days=1) else None


def _plus_years(t: datetime.datetime, years: int) -> datetime.datetime:
    try:
        return t.replace(year=t.year + years)
    except ValueError:  # 29 February
        return t.replace(year=t.year + years, day=28)


def header_from_meta(metadata: Mapping[str, str]) -> Header | None:
    """What the DICOM rules select on, from an object's user metadata (no birth date: it is never there)."""
    if PREFIX + "study" not in (m := {k.lower(): v for k, v in metadata.items()}):
        return None
    return Header(dicom=True, sop_class=m.get(PREFIX + "sop-class"), modality=m.get(PREFIX + "modality"),
                  study_date=m.get(PREFIX + "study-date"), transfer_syntax=m.get(PREFIX + "ts"))


def describe(rule: RetentionRule, index: int) -> str:
    what = [f"modality {'/'.join(rule.modality)}"] if rule.modality else []
    what += [f"SOP class {'/'.join(rule.sop_class)}"] if rule.sop_class else []
    what += [f"study {rule.study_from or '…'}-{rule.study_to or '…'}"] if rule.study_from or rule.study_to else []
    what += [f"under {rule.prefix}"] if rule.prefix else []
    return f"compliance.rules[{index}] ({', '.join(what) or 'every file'})"


def matches(rule: RetentionRule, path: str, h: Header) -> bool:
    """Does a DICOM rule select this file (header h)? Every selector it sets must match."""
    if not h.dicom or not path.startswith(rule.prefix):
        return False
    if rule.modality and (h.modality or "").strip().upper() not in rule.modality:
        return False
    if rule.sop_class and h.sop_class not in rule.sop_class:
        return False
    if rule.study_from or rule.study_to:
        if len(date := h.study_date or "") != 8 or not date.isdigit():
            return False
        if (rule.study_from and date < rule.study_from) or (rule.study_to and date > rule.study_to):
            return False
    return True


class DicomRetention:
    """The Object Lock of a file from its path and its DICOM header (the uploader's LockPolicy)."""

    def __init__(self, cfg: ComplianceConfig) -> None:
        self.cfg = cfg
        # the path rules, the longest prefix first; the DICOM rules, with their index in [[compliance.rules]]
        self.path_rules = sorted((r for r in cfg.rules if not r.selects_dicom), key=lambda r: len(r.prefix),
                                 reverse=True)
        self.rules = [(i, r) for i, r in enumerate(cfg.rules) if r.selects_dicom]

    @property
    def needs_birth_date(self) -> bool:
        return any(r.until_age for _, r in self.rules)

    def _path_terms(self, path: str) -> tuple[int, bool]:
        """(retention days, legal hold) by the path rules."""
        for rule in self.path_rules:
            if path.startswith(rule.prefix):
                return rule.retention_days, rule.legal_hold
        return self.cfg.retention_days, self.cfg.legal_hold

    def path_lock(self, path: str, stored_at: float) -> Lock | None:
        """The Object Lock the path rules alone give a file stored at stored_at (None: not retained by them)."""
        if not self.cfg.worm or path.endswith(self.cfg.temp_suffixes):
            return None
        days, hold = self._path_terms(path)
        if days <= 0 and not hold:
            return None
        return Lock(self.cfg.mode, datetime.datetime.fromtimestamp(stored_at + days * DAY, tz=UTC), hold)

    def decide(self, path: str, stored_at: float, h: Header | None) -> Decision:
        base = self.path_lock(path, stored_at)
        if not self.cfg.worm or path.endswith(self.cfg.temp_suffixes):
            return Decision(None, "not retained (WORM off, or a temporary upload name)", "none")
        tag = f"{self._path_terms(path)[0]}d"
        until, reason = (base.until, f"path rules: {tag[:-1]} days") if base else (None, "")
        hold, hold_reason = (True, "path rules") if base and base.legal_hold else (False, "")
        stored = datetime.datetime.fromtimestamp(stored_at, tz=UTC)
        for i, rule in self.rules if h is not None else ():
            if not matches(rule, path, h):
                continue
            name = describe(rule, i)
            terms = []
            if rule.retention_days:
                terms.append((stored + datetime.timedelta(seconds=rule.retention_days * DAY),
                              f"{name}: {rule.retention_days} days", f"{rule.retention_days}d"))
            if rule.until_age and (born := _birth(h, stored)) is not None:
                terms.append((_plus_years(born, rule.until_age), f"{name}: until age {rule.until_age}",
                              f"age{rule.until_age}"))
            for t, why, cls in terms:
                if until is None or t > until:
                    until, reason, tag = t, why, cls
            if rule.legal_hold and not hold:
                hold, hold_reason = True, name
        if base is not None and (until, hold) == (base.until, base.legal_hold):
            return Decision(base, reason + ("; legal hold: path rules" if hold else ""), tag)
        if until is None and hold:
            until = stored  # held without a period, as the path rules do it
        if until is None or (until <= datetime.datetime.now(UTC) and not hold):
            return Decision(None, "not retained by any rule (or its date has passed)", tag)
        if hold_reason:
            reason = f"{reason}; legal hold: {hold_reason}" if reason else f"legal hold: {hold_reason}"
        return Decision(Lock(self.cfg.mode, until, hold), reason, tag)

    def lock_for(self, path: str, stored_at: float, header: Header | None = None) -> Lock | None:
        return self.decide(path, stored_at, header).lock

    def retention_class(self, path: str, header: Header | None = None) -> str:
        """The retention tag of a file stored now; a temporary name gets its final name's (a copy keeps the tags)."""
        for suffix in self.cfg.temp_suffixes:
            path = path.removesuffix(suffix)
        return self.decide(path, time.time(), header).retention


class RetentionGuard:
    """The gateway's refusal to change a retained file: by the path rules, then its cached header or one HEAD
    (whichever keeps it longer); without the line it is Unavailable: never released on a guess (docs/dicom.md)."""

    def __init__(self, retention: DicomRetention, cache: Cache, s3: S3Uplink) -> None:
        self.retention, self.cache, self.s3 = retention, cache, s3

    async def check_mutable(self, e: Entry, now: float) -> None:
        """Refuse overwrite, rename and delete of a retained file (PermissionDenied names the date)."""
        if e.is_dir:
            if self.retention.cfg.worm:
                raise PermissionDenied(e.path, "WORM: directories cannot be moved on a write-once archive")
            return
        refuse_if_retained(e.path, self.retention.path_lock(e.path, e.mtime), now)
        if not self.retention.rules or not self.retention.cfg.worm:
            return
        try:
            header = None if e.blob is None else await asyncio.to_thread(  # the cached copy's (None: evicted meanwhile)
                self.cache.read_blob, e.blob, lambda fd: read_fd(fd, e.size))
        except OSError as exc:  # out of descriptors: the header cannot be known now, and no guess releases a file
            raise Unavailable(e.path, f"the file's retention cannot be checked now: {exc.strerror}") from exc
        if header is not None or e.state != "clean":  # not in S3 yet: its header decides its upload's lock
            refuse_if_retained(e.path, self.retention.lock_for(e.path, e.mtime, header), now)
            return
        try:
            head = await self.s3.head(e.path)
        except Exception as exc:  # the line is down, S3 refused: the file's terms cannot be known now
            log.warning("retention_unchecked", path=e.path, error=error_code(exc), detail=str(exc)[:200])
            raise Unavailable(e.path, "object storage unavailable: the file's retention cannot be checked") from exc
        if head is not None:
            refuse_if_retained(e.path, self.retention.lock_for(
                e.path, e.mtime, header_from_meta(head.get("Metadata") or {})), now)
            refuse_if_retained(e.path, _object_lock(self.retention.cfg.mode, head), now)


def refuse_if_retained(path: str, lock: Lock | None, now: float) -> None:
    """PermissionDenied (naming the date, or the hold) while `lock` keeps the file at path."""
    if lock is None:
        return
    if lock.legal_hold:
        raise PermissionDenied(path, "WORM: file is under legal hold")
    if now < lock.until.timestamp():
        raise PermissionDenied(path, f"WORM: file is retained until {lock.until:%Y-%m-%d}")


def _object_lock(mode: str, head: dict[str, Any]) -> Lock | None:
    """The Object Lock an object's HEAD shows (retain-until, legal hold), or None."""
    until, held = head.get("ObjectLockRetainUntilDate"), head.get("ObjectLockLegalHoldStatus") == "ON"
    if until is None and not held:
        return None
    return Lock(head.get("ObjectLockMode") or mode, until or datetime.datetime.fromtimestamp(0, UTC), held)
