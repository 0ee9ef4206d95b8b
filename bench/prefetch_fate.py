"""What became of the prior-study planner's prefetches: read, evicted before the read that came later, or never read,
and how long after the fetch each was evicted or first read (docs/replay.md, round 13):

    .venv/bin/python bench/prefetch_fate.py --traces /tmp/p12/traces --families general,oncology --caps 1.5GB

Replays the scheme with the simulator's own classes and only watches: the prefetched studies and the eviction passes.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import TraceArrays, load_arrays  # noqa: E402

H = 3600.0


def next_reads(ta: TraceArrays) -> tuple[np.ndarray, np.ndarray]:
    """Read times sorted by (study, time): the arrays `next_read` searches."""
    reads = ~ta.is_write
    study, t = ta.obj_study[ta.obj[reads]], ta.t[reads]
    order = np.lexsort((t, study))
    return study[order], t[order]


def next_read(index: tuple[np.ndarray, np.ndarray], study: int, after: float) -> float | None:
    studies, times = index
    ts = times[np.searchsorted(studies, study, "left"):np.searchsorted(studies, study, "right")]
    j = int(np.searchsorted(ts, after, "right"))
    return float(ts[j]) if j < ts.size else None


def fate(ta: TraceArrays, scheme: str, capacity: int) -> str:
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    fetched: dict[int, tuple[float, int]] = {}      # prefetched study → (fetch time, bytes)
    evicted: dict[int, tuple[float, str]] = {}      # → (when, by which path) the first of its files went unread
    fetch_plan, victims = r._fetch_plan, r.stack.victims

    def watch_fetch(objs: list[int], t: float) -> None:
        if objs:
            fetched.setdefault(int(r.study[objs[0]]), (t, int(r.size[objs].sum())))
        fetch_plan(objs, t)

    def watch_victims(want: int, now: float, table: Any) -> Iterator[Any]:
        pol = r.stack.policy
        fresh = getattr(pol, "fresh", None)
        for key in victims(want, now, table):
            st = int(r.study[key])
            if r.prefetched[key] and st not in evicted:
                held = "held" if fresh is not None and fresh.holds(st) else "not held"
                expert = "learned" if getattr(pol, "use_learned", False) else "study LRU"
                evicted[st] = (now, f"{expert}, {held}")
            yield key

    r._fetch_plan = watch_fetch                     # type: ignore[method-assign]
    r.stack.victims = watch_victims                 # type: ignore[method-assign]
    res = r.run()
    index = next_reads(ta)
    gb: Counter[str] = Counter()
    waits: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    for st, (t, size) in fetched.items():
        later = next_read(index, st, t)
        gone = evicted.get(st)
        if gone is None or (later is not None and later <= gone[0]):
            kind = "read" if later is not None else "never read"
        else:
            kind = f"evicted before its read ({gone[1]})" if later is not None else "evicted, never read"
        gb[kind] += size
        if gone is not None and later is not None and later > gone[0]:
            waits[kind].append(((gone[0] - t) / H, (later - t) / H))
    total = max(sum(gb.values()), 1)
    lines = [f"{scheme}: hit {res.hit_ratio:.1%} / {res.byte_hit_ratio:.1%}, "
             f"prefetched {res.prefetch_bytes / 1e9:.1f} GB ({len(fetched)} studies), "
             f"read {res.prefetch_used_bytes / max(res.prefetch_bytes, 1):.1%}"]
    for kind, b in gb.most_common():
        w = np.array(waits[kind]) if waits[kind] else None
        when = "" if w is None else (f"; median {np.median(w[:, 0]):.1f} h fetch → eviction, "
                                     f"{np.median(w[:, 1]):.1f} h fetch → read")
        lines.append(f"  {kind}: {b / 1e9:.2f} GB ({b / total:.0%}){when}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/p12/traces")
    ap.add_argument("--families", default="general,oncology,outpatient,research")
    ap.add_argument("--caps", default="1.5GB,5GB")
    ap.add_argument("--scheme", default="agent")
    args = ap.parse_args()
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        for cap in args.caps.split(","):
            print(f"{fam} {cap} {fate(ta, args.scheme, int(float(cap[:-2]) * 1e9))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
