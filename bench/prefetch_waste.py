"""Where the prior planner's unread prefetched bytes go: per family and cache, the studies the default stack
(`agent`) prefetched, split into those opened while cached, those never read again in the trace, and
those read again only after the cache had evicted them (fetched too early for this cache), with the
delay from the fetch to that read.

    .venv/bin/python bench/prefetch_waste.py --traces /tmp/cachew --families general,oncology,outpatient

One replay per family and cache (~10–60 s each on 800 k requests). Tune on the tuning families only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402

H = 3600.0


def waste(ta, scheme: str, capacity: int) -> str:
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity))
    fetched: dict[int, int] = defaultdict(int)     # study → bytes prefetched
    fetched_at: dict[int, float] = {}
    opened: set[int] = set()
    fetch_plan, feedback = r._fetch_plan, r._prefetch_feedback

    def on_fetch(objs: list[int], t: float) -> None:
        for o in objs:
            fetched[int(r.study[o])] += int(r.size[o])
            fetched_at.setdefault(int(r.study[o]), t)
        fetch_plan(objs, t)

    def on_feedback(o: int, used: bool) -> None:
        if used:
            opened.add(int(r.study[o]))
        feedback(o, used)

    r._fetch_plan = on_fetch            # type: ignore[method-assign]
    r._prefetch_feedback = on_feedback  # type: ignore[method-assign]
    res = r.run()
    if not fetched:
        return "nothing prefetched"
    reads = ~ta.is_write
    order = np.argsort(ta.t[reads], kind="stable")
    first_read: dict[int, float] = {}
    for st, t in zip(ta.obj_study[ta.obj[reads]][order].tolist(), ta.t[reads][order].tolist(), strict=True):
        if st in fetched_at and t >= fetched_at[st] and st not in first_read:
            first_read[st] = t
    total = sum(fetched.values())
    late = [s for s in fetched if s not in opened and s in first_read]
    never = [s for s in fetched if s not in opened and s not in first_read]
    delay = np.array([first_read[s] - fetched_at[s] for s in late]) / H

    def share(group: list[int]) -> str:
        return f"{len(group)} studies, {sum(fetched[s] for s in group) / total:.0%} of the bytes"
    q = np.percentile(delay, [10, 50, 90]).round(1).tolist() if delay.size else "–"
    return (f"prefetched {total / 1e9:.2f} GB, {res.prefetch_used_bytes / total:.0%} read; opened while cached: "
            f"{share(sorted(opened & set(fetched)))}; never read again: {share(never)}; read only after its "
            f"eviction: {share(late)}, fetch → read 10/50/90 % {q} h")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/cachew")
    ap.add_argument("--families", default="general,oncology,outpatient")
    ap.add_argument("--caps", default="1.5GB,5GB")
    ap.add_argument("--scheme", default="agent")
    args = ap.parse_args()
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        for cap in args.caps.split(","):
            print(f"{fam} {cap}: {waste(ta, args.scheme, int(float(cap[:-2]) * 1e9))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
