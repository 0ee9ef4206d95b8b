"""Where the prior planner's prefetched bytes go: per family and cache, every prior fetch of the scheme (default: the
agent's stack), sorted by what became of its study: read while cached; evicted before the read that came later (by
which expert, and whether the fresh segment held it then; round 13), with the median hours from the fetch to the
eviction and to the read; evicted and never read; never read.

    .venv/bin/python bench/prefetch_waste.py --traces /tmp/p12/traces --families general,oncology --caps 1.5GB

One replay per family and cache (~10–60 s each on 800 k requests); it only watches the prefetches and the eviction
passes. Tune on the tuning families only.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer, SchemeResult  # noqa: E402
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


@dataclass
class Fate:
    result: SchemeResult
    fetches: int
    bytes: Counter[str] = field(default_factory=Counter)                          # kind → prefetched bytes
    waits: defaultdict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))

    def __str__(self) -> str:
        res, total = self.result, max(sum(self.bytes.values()), 1)
        lines = [f"hit {res.hit_ratio:.1%} / {res.byte_hit_ratio:.1%}, prefetched {res.prefetch_bytes / 1e9:.1f} GB "
                 f"({self.fetches} fetches), read {res.prefetch_used_bytes / max(res.prefetch_bytes, 1):.1%}"]
        for kind, b in self.bytes.most_common():
            w = np.array(self.waits[kind]) if self.waits[kind] else None
            when = "" if w is None else (f"; median {np.median(w[:, 0]):.1f} h fetch → eviction, "
                                         f"{np.median(w[:, 1]):.1f} h fetch → read")
            lines.append(f"  {kind}: {b / 1e9:.2f} GB ({b / total:.0%}){when}")
        return "\n".join(lines)


def fate(ta: TraceArrays, scheme: str, capacity: int) -> Fate:
    """Replay `scheme` and sort every prior fetch's bytes by what became of the study: read (before any eviction),
    evicted before the read that came later (by which expert, held or not by the fresh segment), or never read."""
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    fetches: list[tuple[int, float, int]] = []                   # (study, fetch time, bytes)
    evicted: defaultdict[int, list[tuple[float, str]]] = defaultdict(list)   # study → unread prefetched files gone
    fetch_plan, victims = r._fetch_plan, r.stack.victims

    def watch_fetch(objs: list[int], t: float) -> None:
        if objs:
            fetches.append((int(r.study[objs[0]]), t, int(r.size[objs].sum())))
        fetch_plan(objs, t)

    def watch_victims(want: int, now: float, table: Any) -> Iterator[Any]:
        pol = r.stack.policy
        fresh = getattr(pol, "fresh", None)
        for key in victims(want, now, table):
            if r.prefetched[key]:
                st = int(r.study[key])
                held = "held" if fresh is not None and fresh.holds(st) else "not held"
                evicted[st].append((now, f"{'learned' if getattr(pol, 'use_learned', False) else 'study LRU'}, {held}"))
            yield key

    r._fetch_plan = watch_fetch                     # type: ignore[method-assign]
    r.stack.victims = watch_victims                 # type: ignore[method-assign]
    out = Fate(r.run(), len(fetches))
    index = next_reads(ta)
    for st, t, size in fetches:
        later = next_read(index, st, t)
        gone = next((e for e in evicted[st] if e[0] >= t), None)
        if gone is None or (later is not None and later <= gone[0]):
            kind = "read" if later is not None else "never read"
        else:
            kind = f"evicted before its read ({gone[1]})" if later is not None else "evicted, never read"
            if later is not None:
                out.waits[kind].append(((gone[0] - t) / H, (later - t) / H))
        out.bytes[kind] += size
    return out


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
            print(f"{fam} {cap} {args.scheme}: {fate(ta, args.scheme, int(float(cap[:-2]) * 1e9))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
