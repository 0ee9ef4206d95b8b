"""Where a demand-only scheme loses byte hits against Belady: the read bytes Belady hits and the scheme misses (and
those the scheme hits and Belady misses), after a warm-up, by file size, the time since the file's previous request,
whether that request was its write, modality, department, study size, whether the file's study was written in the
trace, how old the study is at the read, the file's read count so far, and (`adaptive`, `agent`) which part of the
stack evicted the file last before the read (the doorkeeper's probation, the second door, the known studies' door, the
priors their session passed by unopened, or the expert in charge: `learned` or `study`):

    .venv/bin/python bench/byte_gap.py --traces /tmp/p12/traces --families outpatient,general --caps 5GB

Belady is object-level (bench/miss_analysis.py `belady_hits`: farthest next request first). One replay of the
scheme and one Belady pass per family and cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from miss_analysis import belady_hits, replay_hits  # noqa: E402

from agent.policy.adaptive import Adaptive  # noqa: E402
from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402
from agent.sim.workload import DAY  # noqa: E402

H = 3600.0
MB = 1e6


def request_context(ta) -> dict[str, np.ndarray]:
    """Per request: seconds since the object's previous request (nan: first), whether that one was the write,
    and the object's reads so far."""
    n = ta.n
    order = np.lexsort((np.arange(n), ta.obj))
    prev = np.full(n, np.nan)
    after_write = np.zeros(n, dtype=bool)
    same = ta.obj[order[1:]] == ta.obj[order[:-1]]
    cur, pre = order[1:][same], order[:-1][same]
    prev[cur] = ta.t[cur] - ta.t[pre]
    after_write[cur] = ta.is_write[pre]
    reads = np.zeros(n, dtype=np.int64)
    ro = ta.obj[order]
    start = np.r_[True, ro[1:] != ro[:-1]]
    isr = (~ta.is_write[order]).astype(np.int64)
    cum = np.cumsum(isr)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    reads[order] = cum - isr - (cum[first] - isr[first])     # reads of the object before this request
    return {"prev": prev, "after_write": after_write, "reads_before": reads}


def hits_and_evictions(ta, scheme: str, capacity: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each request's hit under `scheme`, and the mechanism that last evicted its object before the request (an
    index into the returned names; -1: never evicted before it, or not an `adaptive` stack). The mechanisms are told
    apart by wrapping the victim walks of the real cache's parts (instrumentation only: the replay is unchanged)."""
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    names = ["door", "second door", "unopened prior", "learned", "study", "known door"]
    events: list[tuple[int, float, int]] = []      # (object, time, mechanism)
    clock = [0.0]

    def tagged(walk, code: int | None):
        def victims(*args):
            now = args[-1] if args else clock[0]
            for key in walk(*args):
                events.append((key, now, code if code is not None else names.index(walk.__self__.name)))
                yield key
        return victims
    p = r.stack.policy
    if isinstance(p, Adaptive):
        outer = p.victims

        def victims(bytes_to_free: int, now: float):
            clock[0] = now
            return outer(bytes_to_free, now)
        p.victims = victims  # type: ignore[method-assign]
        for part, code in ((p.door, 0), (p.door2, 1), (p.door_known, 5), (p.learned, None), (p.lru, None)):
            if part is not None:
                part.victims = tagged(part.victims, code)  # type: ignore[method-assign]
        p._unopened_files = tagged(p._unopened_files, 2)  # type: ignore[method-assign]
    hit = replay_hits(r).astype(bool)
    by = np.full(ta.n, -1, dtype=np.int64)
    if events:
        eo, et, ec = (np.array(x) for x in zip(*events, strict=True))
        order = np.lexsort((et, eo))
        eo, et, ec = eo[order], et[order], ec[order]
        # the last eviction of the request's object at or before the request: search (object, time) pairs
        i = np.searchsorted(eo * 1e7 + et, ta.obj.astype(np.float64) * 1e7 + ta.t, side="right") - 1
        ok = (i >= 0) & (eo[np.maximum(i, 0)] == ta.obj)
        by[ok] = ec[i[ok]]
    return hit, by, names


def table(title: str, size: np.ndarray, rb: float, masks: dict[str, np.ndarray], lost: np.ndarray,
          won: np.ndarray) -> None:
    print(f"\n{title}\n| class | read bytes | Belady hits, scheme misses | scheme hits, Belady misses | net |")
    print("|---|---|---|---|---|")
    for name, m in masks.items():
        a, b = size[lost & m].sum() / rb, size[won & m].sum() / rb
        print(f"| {name} | {size[m].sum() / rb:.1%} | {a:.1%} | {b:.1%} | {a - b:+.1%} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/p12/traces")
    ap.add_argument("--families", default="outpatient,general")
    ap.add_argument("--caps", default="5GB")
    ap.add_argument("--scheme", default="adaptive")
    ap.add_argument("--warmup-days", type=float, default=3.0)
    args = ap.parse_args()
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        ctx = request_context(ta)
        reads = ~ta.is_write & (ta.t >= args.warmup_days * DAY)
        size = ta.size.astype(np.float64)
        rb = size[reads].sum()
        written_study = np.zeros(ta.study_bytes.size, dtype=bool)
        written_study[ta.obj_study[ta.obj[ta.is_write]]] = True
        st = ta.obj_study[ta.obj]
        age = ta.t - ta.study_day[st] * DAY
        sbytes = ta.study_bytes[st]
        prev, aw, rbf = ctx["prev"], ctx["after_write"], ctx["reads_before"]
        for cap in args.caps.split(","):
            capacity = int(float(cap[:-2]) * 1e9)
            bel = belady_hits(ta, capacity)
            sch, by, names = hits_and_evictions(ta, args.scheme, capacity)
            lost, won = reads & bel & ~sch, reads & sch & ~bel
            print(f"\n## {fam} {cap} {args.scheme}: byte hit Belady {size[reads & bel].sum() / rb:.1%}, "
                  f"{args.scheme} {size[reads & sch].sum() / rb:.1%}; object hit Belady "
                  f"{(reads & bel).sum() / reads.sum():.1%}, {args.scheme} {(reads & sch).sum() / reads.sum():.1%}")
            sets = {
                "file size": {f"{lo / MB:g}-{hi / MB:g} MB": reads & (size >= lo) & (size < hi)
                              for lo, hi in ((0, 1e6), (1e6, 1e7), (1e7, 1e8), (1e8, np.inf))},
                "since the file's previous request": {
                    **{f"{'after write' if w else 'after read'} {name}": reads & (aw == w) & (prev >= lo) & (prev < hi)
                       for w in (True, False)
                       for lo, hi, name in ((0, H, "< 1 h"), (H, 6 * H, "1-6 h"), (6 * H, DAY, "6-24 h"),
                                            (DAY, 3 * DAY, "1-3 d"), (3 * DAY, np.inf, "> 3 d"))},
                    "first request": reads & np.isnan(prev)},
                "modality": {m: reads & (ta.study_modality[st] == i) for i, m in enumerate(ta.modality_names)},
                "department": {d: reads & (ta.study_department[st] == i) for i, d in enumerate(ta.department_names)},
                "study size": {f"{lo / MB:g}-{hi / MB:g} MB": reads & (sbytes >= lo) & (sbytes < hi)
                               for lo, hi in ((0, 3e7), (3e7, 1e8), (1e8, 3e8), (3e8, np.inf))},
                "study": {"written in the trace": reads & written_study[st],
                          "archive (read only)": reads & ~written_study[st]},
                "study age at the read": {name: reads & (age >= lo) & (age < hi) for lo, hi, name in (
                    (-np.inf, DAY, "< 1 d"), (DAY, 7 * DAY, "1-7 d"), (7 * DAY, 30 * DAY, "7-30 d"),
                    (30 * DAY, np.inf, "> 30 d"))},
                "evicted last by": {**{name: reads & (by == i) for i, name in enumerate(names)},
                                    "no eviction recorded": reads & (by < 0)},
                "file's reads before": {name: reads & (rbf >= lo) & (rbf < hi) for lo, hi, name in (
                    (0, 1, "0"), (1, 2, "1"), (2, 4, "2-3"), (4, 1 << 62, "4+"))},
            }
            for title, masks in sets.items():
                table(f"### {title}", size, rb, masks, lost, won)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
