"""Where the default stack's misses are: per family and cache, the reads (post warm-up) that LRU and the
default stack miss, split by what a policy could know, with the bytes each class holds.

    .venv/bin/python bench/miss_analysis.py --traces /tmp/cachew --families cancer,teaching --caps 1.5GB,5GB

Classes: *compulsory* (the object's first request in the trace: a prior or tail study from the archive;
every demand policy misses it, Belady too), else by the time since the object's previous request
(< 1 h, 1 h–1 d, 1–5 d, 5–9 d (a weekly schedule), > 9 d), by study size (< 100 MB, 100 MB–1 GB, > 1 GB),
by the read's weekday/hour repeating the study's previous session (±1 h, 7 d apart), and by whether the
patient has a newer study at the time of the read. One run per family and cache, of schemes A and the
default (`agent`); each ~10–60 s on 800 k requests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402
from agent.sim.workload import DAY  # noqa: E402

H = 3600.0


def hits_of(ta, scheme: str, capacity: int) -> np.ndarray:
    out: dict[str, np.ndarray] = {}
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    orig = r._result

    def keep(hit: np.ndarray):
        out["hit"] = hit
        return orig(hit)
    r._result = keep  # type: ignore[method-assign]
    r.run()
    return out["hit"]


def classes(ta) -> dict[str, np.ndarray]:
    n = ta.n
    prev = np.full(n, np.nan)
    last: dict[int, float] = {}
    st_prev_session = np.full(n, np.nan)
    st_last: dict[int, float] = {}
    st_sess: dict[int, float] = {}
    st_count: dict[int, int] = {}           # study → sessions so far (reads > 10 min apart)
    sessions = np.zeros(n, dtype=np.int64)
    newer = np.zeros(n, dtype=bool)
    # patient → newest study day written so far in the trace
    newest: dict[int, int] = {}
    obj_study = ta.obj_study
    ts, objs, writes = ta.t.tolist(), ta.obj.tolist(), ta.is_write.tolist()
    for i in range(n):
        o, t = objs[i], ts[i]
        s = int(obj_study[o])
        p = int(ta.study_patient[s])
        if o in last:
            prev[i] = t - last[o]
        last[o] = t
        if writes[i]:
            d = int(ta.study_day[s])
            if d > newest.get(p, -10**9):
                newest[p] = d
        else:
            newer[i] = newest.get(p, -10**9) > int(ta.study_day[s])
            lt = st_last.get(s)
            if lt is None or t - lt > 600:
                if lt is not None:
                    st_sess[s] = lt
                st_count[s] = st_count.get(s, 0) + 1
            sessions[i] = st_count[s] - 1
            if s in st_sess:
                st_prev_session[i] = t - st_sess[s]
            st_last[s] = t
    sbytes = ta.study_bytes[obj_study[ta.obj]]
    rem = np.mod(st_prev_session, 7 * DAY)
    weekly = (st_prev_session > 5 * DAY) & ((rem < 2 * H) | (rem > 7 * DAY - 2 * H))
    comp = np.isnan(prev)
    c = {"compulsory (1st request)": comp}
    for lo, hi, name in ((0, H, "< 1 h"), (H, DAY, "1 h-1 d"), (DAY, 5 * DAY, "1-5 d"),
                         (5 * DAY, 9 * DAY, "5-9 d"), (9 * DAY, np.inf, "> 9 d")):
        c[f"re-request {name}"] = ~comp & (prev >= lo) & (prev < hi)
    for lo, hi, name in ((0, 1e8, "< 100 MB"), (1e8, 1e9, "100 MB-1 GB"), (1e9, np.inf, "> 1 GB")):
        c[f"non-compulsory, study {name}"] = ~comp & (sbytes >= lo) & (sbytes < hi)
    c["non-compulsory, same weekday+hour as last session"] = ~comp & weekly
    for lo, hi, name in ((0, 1, "none"), (1, 4, "1-3"), (4, 8, "4-7"), (8, 1 << 62, "8+")):
        c[f"non-compulsory, study's earlier sessions {name}"] = ~comp & (sessions >= lo) & (sessions < hi)
    c["non-compulsory, patient has a newer study"] = ~comp & newer
    c["non-compulsory, prior study (acquired before the trace)"] = ~comp & (ta.study_day[obj_study[ta.obj]] < 0)
    return c


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/cachew")
    ap.add_argument("--families", default="general,oncology,outpatient,cancer,teaching")
    ap.add_argument("--caps", default="1.5GB,5GB")
    ap.add_argument("--warmup-days", type=float, default=3.0)
    ap.add_argument("--scheme", default="agent", help="the scheme set against LRU (agent: the default stack)")
    args = ap.parse_args()
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        reads = ~ta.is_write & (ta.t >= args.warmup_days * DAY)
        size = ta.size.astype(np.float64)
        rb = size[reads].sum()
        cls = classes(ta)
        for cap in args.caps.split(","):
            capacity = int(float(cap[:-2]) * 1e9)
            lru, dflt = hits_of(ta, "A", capacity), hits_of(ta, args.scheme, capacity)
            print(f"\n## {fam} {cap}: reads {reads.sum():,} ({rb / 1e9:.1f} GB); byte hit LRU "
                  f"{size[reads & lru].sum() / rb:.1%}, {args.scheme} {size[reads & dflt].sum() / rb:.1%}")
            print("| class | reads | read bytes | LRU miss bytes | default miss bytes | default hit bytes in class |")
            print("|---|---|---|---|---|---|")
            for name, m in cls.items():
                r = reads & m
                b = size[r].sum()
                lm, dm = size[r & ~lru].sum(), size[r & ~dflt].sum()
                print(f"| {name} | {r.sum() / reads.sum():.1%} | {b / rb:.1%} | {lm / rb:.1%} | {dm / rb:.1%} "
                      f"| {1 - dm / b if b else 0:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
