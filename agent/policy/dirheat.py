"""Which day-directories will be read tomorrow: the heat model over the catalog's read history, or the
cold-start rule when there is no history yet. Decides; does no I/O (the agent passes the history in).

History: the catalog's `heat` table, reads per directory per local day. For a run on day D the model sees
days D-WINDOW … D-1 (today's partial day is left out, as in training) and predicts D's reads.

Cold-start rule (a new box: no reads recorded in the last WINDOW days): a directory's heat is the number of
files stored into it in the last `cold_start_days` days. New acquisitions are what radiologists report and
clinicians review the next days, and a busy modality's directories weigh in proportion to its files: this is
the recent days × modality mix of the site, as far as the box has seen it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.policy.features import WINDOW, window_features

_DAY_RE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


class Predictor(Protocol):
    def predict(self, x: np.ndarray, dir_files: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RankedDir:
    dir: str
    heat: float      # expected reads of the directory in the next 24 hours
    why: str         # how the heat was found, for `pacsgw prefetch --dry-run`


@dataclass(frozen=True)
class History:
    dirs: list[str]
    counts: np.ndarray        # (n_dirs, WINDOW) reads; column 0 is day `first`, the last column yesterday
    files: np.ndarray         # files the catalog knows in each directory
    first: dt.date

    @property
    def empty(self) -> bool:
        return not self.dirs or not self.counts.any()


def acquisition_day(directory: str) -> dt.date | None:
    """The day a directory holds, from a path part such as 2026-11-23 or 20261123; None if none."""
    for part in reversed(directory.split("/")):
        if m := _DAY_RE.match(part):
            with contextlib.suppress(ValueError):  # no such day: the next part may name one
                return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return None


def history(rows: list[tuple[str, str, int]], files: dict[str, int], today: dt.date) -> History:
    """Heat-table rows (dir, YYYY-MM-DD, reads) of the last WINDOW days before today → a History."""
    first = today - dt.timedelta(days=WINDOW)
    dirs = sorted({d for d, _, _ in rows})
    index = {d: i for i, d in enumerate(dirs)}
    counts = np.zeros((len(dirs), WINDOW), dtype=np.float32)
    for d, day, reads in rows:
        col = (dt.date.fromisoformat(day) - first).days
        if 0 <= col < WINDOW:
            counts[index[d], col] += reads
    return History(dirs, counts, np.array([files.get(d, 0) for d in dirs], dtype=np.int64), first)


def rank_by_model(h: History, predictor: Predictor, version: str) -> list[RankedDir]:
    """Predicted reads for today of every directory in the history, hottest first."""
    if not h.dirs:
        return []
    first_read = np.argmax(h.counts > 0, axis=1)
    acq = [acquisition_day(d) for d in h.dirs]
    # a directory without a day in its name counts as acquired on its first recorded read
    dir_day = np.array([(a - h.first).days if a else int(f) for a, f in zip(acq, first_read, strict=True)])
    modalities = sorted({d.split("/")[0] for d in h.dirs})
    dir_mod = np.array([modalities.index(d.split("/")[0]) for d in h.dirs])
    x = window_features(h.counts, WINDOW, dir_day, dir_mod, len(modalities), h.first.weekday(), np.maximum(h.files, 1))
    heat = predictor.predict(x, np.maximum(h.files, 1))
    reads = h.counts.sum(axis=1)
    ranked = [RankedDir(d, round(float(p), 3), f"model {version}: {int(r)} reads in the last {WINDOW} days")
              for d, p, r in zip(h.dirs, heat.tolist(), reads.tolist(), strict=True)]
    return sorted(ranked, key=lambda r: (-r.heat, r.dir))


def rank_cold_start(recent_writes: dict[str, int], days: int) -> list[RankedDir]:
    """The cold-start rule: files stored per directory in the last `days` days, most first."""
    ranked = [RankedDir(d, float(n), f"cold start: {n} files stored in the last {days} days")
              for d, n in recent_writes.items() if n > 0]
    return sorted(ranked, key=lambda r: (-r.heat, r.dir))


def window_bounds(now: float, window: tuple[int, int]) -> tuple[float, float]:
    """(start, end) epoch seconds of the prefetch window that `now` is in, or else of the next one.

    window: seconds after local midnight; an end before the start runs past midnight."""
    local = dt.datetime.fromtimestamp(now).astimezone()
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    start_s, end_s = window
    length = (end_s - start_s) % 86400
    for day in (-1, 0, 1):
        start = (midnight + dt.timedelta(days=day, seconds=start_s)).timestamp()
        if now < start + length:
            return start, start + length
    raise AssertionError("unreachable: tomorrow's window always ends after now")
