"""How long after a new study's first read (its session) are its priors first read, and how much of the priors' read
bytes a fetch started then could have in the cache in time (docs/replay.md, round 30):

    .venv/bin/python bench/session_gap.py --traces /tmp/cachew --families general,research,oncology,outpatient

Per study written in the trace and first read after the warm-up (at R): its priors are the patient's studies of an
earlier day; a prior's session read is its first read at or after R - 10 min (a viewer opens the priors first), up to
3 days after R. "In time": a prior's read after R of a file that a fetch at the prefetch rate, of the prior's files in
the trace's order, one prior after another in the order they are opened, started at R (or at the session's first read,
the first prior opened) has landed by then. An upper bound: nothing queued before, nothing evicted, and files cached
anyway counted too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.trace import load_arrays  # noqa: E402
from agent.sim.workload import DAY  # noqa: E402

SESSION_S, AFTER_S = 600.0, 3 * DAY


def in_time(ta, sessions: list[tuple[int, np.ndarray]], start: float, rate: float) -> int:
    """Bytes of the priors' reads (at or after `start`) whose file a fetch started at `start` landed before."""
    free, caught = start, 0
    for p, reads in sessions:
        objs = np.flatnonzero(ta.obj_study == p)
        landed = dict(zip(objs.tolist(), (free + np.cumsum(ta.obj_size[objs]) / rate).tolist(), strict=True))
        free = max(landed.values(), default=free)
        caught += sum(int(ta.size[i]) for i in reads.tolist()
                      if ta.t[i] >= start and ta.t[i] >= landed.get(int(ta.obj[i]), np.inf))
    return caught


@dataclass
class SessionReads:
    gaps: np.ndarray            # per prior read with its new study: its first read - the new study's first read, s
    read: int = 0               # bytes of those priors' reads (from 10 min before to 3 days after the new study's)
    before: int = 0             # ... read before the new study's first read
    late: int = 0               # ... read over 10 min after it
    at_read: int = 0            # ... in time for a fetch started at the new study's first read
    at_first: int = 0           # ... started at the session's first read (the first prior opened)


def session_reads(ta, warmup_s: float, rate: float) -> SessionReads:
    study = ta.obj_study[ta.obj]
    reads = np.flatnonzero(~ta.is_write)
    by_study = np.argsort(study[reads], kind="stable")
    bounds = np.searchsorted(study[reads][by_study], np.arange(len(ta.study_bytes) + 1))
    of_patient: dict[int, list[int]] = {}
    for s, p in enumerate(ta.study_patient.tolist()):
        of_patient.setdefault(p, []).append(s)
    out, gaps = SessionReads(np.zeros(0)), []
    for s in np.unique(study[ta.is_write]).tolist():
        mine = reads[by_study[bounds[s]:bounds[s + 1]]]
        if not mine.size or (r := float(ta.t[mine[0]])) < warmup_s:
            continue
        sessions = []
        for p in of_patient[int(ta.study_patient[s])]:
            if ta.study_day[p] < ta.study_day[s]:
                pr = reads[by_study[bounds[p]:bounds[p + 1]]]
                if (pr := pr[(ta.t[pr] >= r - SESSION_S) & (ta.t[pr] <= r + AFTER_S)]).size:
                    sessions.append((float(ta.t[pr[0]]), p, pr))
        sessions.sort()
        for t0, _, pr in sessions:
            gaps.append(t0 - r)
            b = ta.size[pr]
            out.read += int(b.sum())
            out.before += int(b[ta.t[pr] < r].sum())
            out.late += int(b[ta.t[pr] > r + SESSION_S].sum())
        pairs = [(p, pr) for _, p, pr in sessions]
        out.at_read += in_time(ta, pairs, r, rate)
        out.at_first += in_time(ta, pairs, min([r] + [t0 for t0, _, _ in sessions]), rate)
    out.gaps = np.array(gaps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/cachew")
    ap.add_argument("--families", default="general,research,oncology,outpatient")
    ap.add_argument("--warmup-days", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=5e6, help="the prefetch rate, bytes/s (the replay's prefetch_bps)")
    args = ap.parse_args()
    for fam in args.families.split(","):
        sr = session_reads(load_arrays(Path(args.traces) / f"{fam}.tsv"), args.warmup_days * DAY, args.rate)
        if not (g := sr.gaps).size:
            print(f"{fam}: no prior read within a session")
            continue
        q = " / ".join(f"{x:.0f}" for x in np.percentile(g, [10, 50, 90]))
        print(f"{fam}: {g.size} priors read with their new study; first prior read - new study's first read "
              f"p10 / p50 / p90 {q} s, before it {np.mean(g < 0):.1%}, over 10 min after {np.mean(g > SESSION_S):.1%}; "
              f"prior read bytes {sr.read / 1e9:.2f} GB: read before the new study's first read "
              f"{sr.before / sr.read:.1%}, over 10 min after it {sr.late / sr.read:.1%}; in time for a "
              f"{args.rate / 1e6:g} MB/s fetch started at it {sr.at_read / sr.read:.1%}, at the session's first read "
              f"{sr.at_first / sr.read:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
