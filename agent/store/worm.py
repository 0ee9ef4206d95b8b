"""WORM policy by path: which files are retained, until when, and so which changes are refused (the uplink applies
the Object Lock, the gateway the refusals). Temporary upload names (x.dcm.part) are never retained, so the usual
upload-then-rename still works.
"""

from __future__ import annotations

import datetime

from agent.config import ComplianceConfig
from agent.records import Entry, Lock
from agent.store.errors import PermissionDenied

DAY = 86400


class WormPolicy:
    def __init__(self, cfg: ComplianceConfig) -> None:
        self.cfg = cfg
        # rules that select by DICOM attributes only lengthen these terms (agent.dicom.retention)
        self.rules = sorted((r for r in cfg.rules if not r.selects_dicom), key=lambda r: len(r.prefix), reverse=True)

    def _terms(self, path: str) -> tuple[int, bool]:
        for rule in self.rules:
            if path.startswith(rule.prefix):
                return rule.retention_days, rule.legal_hold
        return self.cfg.retention_days, self.cfg.legal_hold

    def retention_class(self, path: str) -> str:
        """The retention a lifecycle rule can select on (an object tag): '<days>d', or 'none' without WORM."""
        return f"{self._terms(path)[0]}d" if self.cfg.worm else "none"

    def lock_for(self, path: str, stored_at: float) -> Lock | None:
        if not self.cfg.worm or path.endswith(self.cfg.temp_suffixes):
            return None
        days, hold = self._terms(path)
        if days <= 0 and not hold:
            return None
        until = datetime.datetime.fromtimestamp(stored_at + days * DAY, tz=datetime.timezone.utc)
        return Lock(self.cfg.mode, until, hold)

    def check_mutable(self, e: Entry, now: float) -> None:
        """Refuse overwrite, rename and delete of a retained file (PermissionDenied names the date)."""
        if e.is_dir:
            if self.cfg.worm:
                raise PermissionDenied(e.path, "WORM: directories cannot be moved on a write-once archive")
            return
        refuse_if_retained(e.path, self.lock_for(e.path, e.mtime), now)


def refuse_if_retained(path: str, lock: Lock | None, now: float) -> None:
    """PermissionDenied (naming the date, or the hold) while `lock` keeps the file at path."""
    if lock is None:
        return
    if lock.legal_hold:
        raise PermissionDenied(path, "WORM: file is under legal hold")
    if now < lock.until.timestamp():
        raise PermissionDenied(path, f"WORM: file is retained until {lock.until:%Y-%m-%d}")
