"""Where the default stack's misses are: per family and cache, the reads (post warm-up) that LRU and the
default stack miss, split by what a policy could know, with the bytes each class holds.

    .venv/bin/python bench/miss_analysis.py --traces /tmp/cachew --families cancer,teaching --caps 1.5GB,5GB

Classes: *compulsory* (the object's first request in the trace: a prior or tail study from the archive;
every demand policy misses it, Belady too), else by the time since the object's previous request
(< 1 h, 1 h–1 d, 1–5 d, 5–9 d (a weekly schedule), > 9 d), by study size (< 100 MB, 100 MB–1 GB, > 1 GB),
by whether the previous request was the write (a new study's first read) or a read (a re-read), and by
the read's weekday/hour repeating the study's previous session (±1 h, 7 d apart), and by whether the
patient has a newer study at the time of the read. One run per family and cache, of schemes A and the
default (`agent`); each ~10–60 s on 800 k requests.

`--prefetch` prints, instead, where the scheme's prefetched bytes went: read, never in the trace (the files
of a prior nobody opens: the replay's per-study phantom object), or evicted before their first read, by the
delay from the fetch to that read.

`--versus belady` sets the scheme against Belady instead of LRU (object-level, farthest next request first,
as libCacheSim's): which of Belady's hits the scheme misses, the gap the targets measure.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402
from agent.sim.workload import DAY  # noqa: E402

H = 3600.0


def hits_of(ta, scheme: str, capacity: int, **config: Any) -> np.ndarray:
    """Each request's hit (True) or miss under `scheme` (config: more ReplayConfig fields)."""
    return replay_hits(Replayer(ta, scheme, ReplayConfig(capacity=capacity, **config)))


def replay_hits(r: Replayer) -> np.ndarray:
    """Run a replayer; each request's hit (True) or miss."""
    out: dict[str, np.ndarray] = {}
    orig = r._result

    def keep(hit: np.ndarray):
        out["hit"] = hit
        return orig(hit)
    r._result = keep  # type: ignore[method-assign]
    r.run()
    return out["hit"]


def belady_hits(ta, capacity: int) -> np.ndarray:
    """Per request: a read hit under Belady (evict the object requested farthest in the future; one never
    requested again first, the one just requested too if it is the farthest: not admitted)."""
    n = ta.n
    order = np.lexsort((np.arange(n), ta.obj))
    nxt = np.full(n, n, dtype=np.int64)
    same = ta.obj[order[1:]] == ta.obj[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    nx, objs, writes, osize = nxt.tolist(), ta.obj.tolist(), ta.is_write.tolist(), ta.obj_size.tolist()
    hit = bytearray(n)
    cached: dict[int, int] = {}             # object → index of its next request
    heap: list[tuple[int, int]] = []        # (−next request, object), lazily invalidated
    used = 0
    for i in range(n):
        o = objs[i]
        if o in cached:
            hit[i] = not writes[i]
        else:
            used += osize[o]
        cached[o] = nx[i]
        heapq.heappush(heap, (-nx[i], o))
        while used > capacity:
            neg, v = heapq.heappop(heap)
            if cached.get(v) == -neg:
                del cached[v]
                used -= osize[v]
    return np.frombuffer(hit, dtype=np.uint8).astype(bool)


def prefetch_waste(ta, scheme: str, capacity: int) -> None:
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    fetched: list[tuple[int, float]] = []
    unread: set[int] = set()
    fetch, feedback = r._fetch_plan, r._prefetch_feedback

    def fetch_plan(objs: list[int], t: float) -> None:
        fetched.extend((o, t) for o in objs)
        fetch(objs, t)

    def prefetch_feedback(o: int, used: bool) -> None:
        if not used:
            unread.add(o)
        feedback(o, used)
    r._fetch_plan, r._prefetch_feedback = fetch_plan, prefetch_feedback  # type: ignore[method-assign]
    res = r.run()
    if not fetched:
        print("nothing prefetched")
        return
    objs = np.array([o for o, _ in fetched])
    ts = np.array([t for _, t in fetched])
    size = r.size[objs].astype(np.float64)
    total = size.sum()
    phantom = objs >= r.n_obj
    reads = ~ta.is_write
    order = np.lexsort((ta.t[reads], ta.obj[reads]))
    ro, rt = ta.obj[reads][order], ta.t[reads][order]
    delay = np.full(objs.size, np.inf)
    for j in np.flatnonzero(~phantom).tolist():
        lo, hi = np.searchsorted(ro, objs[j], "left"), np.searchsorted(ro, objs[j], "right")
        k = lo + int(np.searchsorted(rt[lo:hi], ts[j], "left"))
        if k < hi:
            delay[j] = rt[k] - ts[j]
    evicted = np.array([o in unread for o in objs.tolist()])
    print(f"prefetched {total / 1e9:.1f} GB, read {res.prefetch_used_bytes / total:.1%}; "
          f"never in the trace {size[phantom].sum() / total:.1%}; not read after the fetch "
          f"{size[~phantom & np.isinf(delay)].sum() / total:.1%}")
    print("| first read after the fetch | prefetched bytes | of them evicted before that read |")
    print("|---|---|---|")
    for lo, hi, name in ((0, H, "< 1 h"), (H, 6 * H, "1-6 h"), (6 * H, DAY, "6-24 h"), (DAY, 3 * DAY, "1-3 d"),
                         (3 * DAY, np.inf, "> 3 d")):
        m = (delay >= lo) & (delay < hi)
        print(f"| {name} | {size[m].sum() / total:.1%} | {size[m & evicted].sum() / total:.1%} |")


def classes(ta) -> dict[str, np.ndarray]:
    n = ta.n
    prev = np.full(n, np.nan)
    after_write = np.zeros(n, dtype=bool)   # the object's previous request was its write
    last: dict[int, float] = {}
    written: set[int] = set()
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
            after_write[i] = o in written
        last[o] = t
        if writes[i]:
            written.add(o)
        else:
            written.discard(o)
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
    for lo, hi, name in ((0, H, "< 1 h"), (H, 6 * H, "1-6 h"), (6 * H, DAY, "6-24 h"), (DAY, np.inf, "> 1 d")):
        c[f"first read of a written file, {name} after the write"] = after_write & (prev >= lo) & (prev < hi)
        c[f"re-read (previous request a read) {name} later"] = ~comp & ~after_write & (prev >= lo) & (prev < hi)
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
    ap.add_argument("--prefetch", action="store_true", help="where the prefetched bytes went instead")
    ap.add_argument("--versus", choices=("lru", "belady"), default="lru", help="the other side of the table")
    args = ap.parse_args()
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        if args.prefetch:
            for cap in args.caps.split(","):
                print(f"\n## {fam} {cap} {args.scheme}")
                prefetch_waste(ta, args.scheme, int(float(cap[:-2]) * 1e9))
            continue
        reads = ~ta.is_write & (ta.t >= args.warmup_days * DAY)
        size = ta.size.astype(np.float64)
        rb = size[reads].sum()
        cls = classes(ta)
        for cap in args.caps.split(","):
            capacity = int(float(cap[:-2]) * 1e9)
            other = belady_hits(ta, capacity) if args.versus == "belady" else hits_of(ta, "A", capacity)
            dflt = hits_of(ta, args.scheme, capacity)
            vs = "Belady" if args.versus == "belady" else "LRU"
            print(f"\n## {fam} {cap}: reads {reads.sum():,} ({rb / 1e9:.1f} GB); byte hit {vs} "
                  f"{size[reads & other].sum() / rb:.1%}, {args.scheme} {size[reads & dflt].sum() / rb:.1%}; "
                  f"object hit {vs} {(reads & other).sum() / reads.sum():.1%}, "
                  f"{args.scheme} {(reads & dflt).sum() / reads.sum():.1%}")
            print(f"| class | reads | read bytes | {vs} miss bytes | {args.scheme} miss bytes "
                  f"| {args.scheme} hit bytes in class | {vs} hits {args.scheme} misses: reads / bytes |")
            print("|---|---|---|---|---|---|---|")
            for name, m in cls.items():
                r = reads & m
                b = size[r].sum()
                lm, dm = size[r & ~other].sum(), size[r & ~dflt].sum()
                lost = r & other & ~dflt
                print(f"| {name} | {r.sum() / reads.sum():.1%} | {b / rb:.1%} | {lm / rb:.1%} | {dm / rb:.1%} "
                      f"| {1 - dm / b if b else 0:.0%} | {lost.sum() / reads.sum():.1%} / "
                      f"{size[lost].sum() / rb:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
