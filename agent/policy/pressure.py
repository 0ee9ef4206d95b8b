"""Memory and disk pressure: readings against watermarks → a level and its reasons. Decides; does no I/O.

normal   — everything runs.
high     — prefetch pauses, in-memory caches shrink, uploads and fetches run at reduced concurrency.
critical — no new prefetch and no new fetches from S3 (reads of cached files and all writes go on):
           the box must not swap or be killed, and an acknowledged write must never be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Level(IntEnum):
    NORMAL = 0
    HIGH = 1
    CRITICAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Readings:
    disk_used: float          # fraction of the cache budget in use (max of catalog bytes and filesystem use)
    mem_available: int        # bytes the system can still give without swapping
    rss: int                  # the agent's own resident memory


@dataclass(frozen=True)
class Watermarks:
    disk_high: float
    disk_critical: float
    mem_available_high: int   # less available than this → high
    mem_available_critical: int
    rss_high: int             # agent bigger than this → high (0: no limit)
    rss_critical: int


@dataclass(frozen=True)
class Pressure:
    level: Level
    reasons: tuple[str, ...]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def assess(r: Readings, w: Watermarks) -> Pressure:
    """The worst level any reading reaches, with one reason per reading past a watermark."""
    found: list[tuple[Level, str]] = []
    if r.disk_used >= w.disk_critical:
        found.append((Level.CRITICAL, f"cache disk {r.disk_used:.0%} used (critical at {w.disk_critical:.0%})"))
    elif r.disk_used >= w.disk_high:
        found.append((Level.HIGH, f"cache disk {r.disk_used:.0%} used (high at {w.disk_high:.0%})"))
    if r.mem_available <= w.mem_available_critical:
        found.append((Level.CRITICAL, f"system memory available {_gib(r.mem_available)} "
                                      f"(critical below {_gib(w.mem_available_critical)})"))
    elif r.mem_available <= w.mem_available_high:
        found.append((Level.HIGH, f"system memory available {_gib(r.mem_available)} "
                                  f"(high below {_gib(w.mem_available_high)})"))
    if w.rss_critical and r.rss >= w.rss_critical:
        found.append((Level.CRITICAL, f"agent memory {_gib(r.rss)} (critical at {_gib(w.rss_critical)})"))
    elif w.rss_high and r.rss >= w.rss_high:
        found.append((Level.HIGH, f"agent memory {_gib(r.rss)} (high at {_gib(w.rss_high)})"))
    level = max((lvl for lvl, _ in found), default=Level.NORMAL)
    return Pressure(level, tuple(reason for _, reason in found))


def concurrency_at(level: Level, configured: int) -> int:
    """Transfers allowed at a level: all at normal, half at high (at least one), one at critical."""
    return {Level.NORMAL: configured, Level.HIGH: max(1, configured // 2), Level.CRITICAL: 1}[level]
