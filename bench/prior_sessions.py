"""Which prefetched priors are read, and why the others are not (docs/replay.md, round 19): per family and cache,
every prior fetch of the scheme by the planner's rank of the prior, the kind of prior, the new study's department
and the 6-hour block of the fetch, sorted by what became of it: read; evicted before its new study's session (the
prior's next read is that session's); evicted before a later read; never read. Then the fetch → session delay against
the cache's turnover at the fetch (`Adaptive.turnover`).

    .venv/bin/python bench/prior_sessions.py --traces /tmp/p12/traces --families oncology,general --caps 1.5GB

Tune on the tuning families only (agent.sim.workload.TUNING). bench/prefetch_waste.py splits the same bytes by the
eviction's expert and hold.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402
from agent.sim.workload import TUNING  # noqa: E402
from bench.prefetch_waste import H, next_read, next_reads  # noqa: E402

SESSION_S = 600.0


@dataclass
class Fetch:
    prior: int
    new: int
    cell: int
    t: float
    bytes: int
    turnover: float
    read: int = 0
    evicted_at: float | None = None


def watch(r: Replayer) -> list[Fetch]:
    """Record every prior fetch of the replay and what became of its files."""
    fetches: list[Fetch] = []
    last: dict[int, Fetch] = {}
    pending: dict[str, tuple[int, int, int]] = {}
    clock = {"now": 0.0}
    fetched, fetch_plan, feedback, evict = r.stack.prior_fetched, r._fetch_plan, r._prefetch_feedback, r._evict
    turnover: Callable[[], float] = getattr(r.stack.policy, "turnover", lambda: float("inf"))

    def on_fetched(prior: Hashable, new: Hashable, heat: float, cell: int, now: float) -> None:
        pending["x"] = (int(prior), int(new), r.pf_cell.get(int(prior), -1))   # type: ignore[call-overload]
        fetched(prior, new, heat, cell, now)

    def on_fetch_plan(objs: list[int], t: float) -> None:
        if "x" in pending:
            prior, new, cell = pending.pop("x")
            last[prior] = f = Fetch(prior, new, cell, t, int(r.size[objs].sum()), turnover())
            fetches.append(f)
        fetch_plan(objs, t)

    def on_feedback(o: int, used: bool) -> None:
        f = last.get(int(r.study[o]))
        if f is not None:
            if used:
                f.read += int(r.size[o])
            elif f.evicted_at is None:
                f.evicted_at = clock["now"]
        feedback(o, used)

    def on_evict(t: float) -> None:
        clock["now"] = t
        evict(t)

    r.stack.prior_fetched = on_fetched          # type: ignore[method-assign]
    r._fetch_plan = on_fetch_plan               # type: ignore[method-assign]
    r._prefetch_feedback = on_feedback          # type: ignore[method-assign]
    r._evict = on_evict                         # type: ignore[method-assign]
    return fetches


def fate(f: Fetch, later: float | None, session: float | None) -> str:
    if f.read:
        return "read"
    if later is None:
        return "never read"
    if f.evicted_at is not None and f.evicted_at <= later:
        return "evicted before its session" if session is not None and abs(later - session) < SESSION_S \
            else "evicted before a later read"
    return "read after a re-fetch"


def report(fam: str, cap: str, traces: Path, scheme: str) -> str:
    ta = load_arrays(traces / f"{fam}.tsv")
    r = Replayer(ta, scheme, ReplayConfig(capacity=int(float(cap[:-2]) * 1e9)))
    fetches = watch(r)
    res = r.run()
    index = next_reads(ta)
    k = r.stack.priors.k if r.stack.priors is not None else 1
    rows: list[tuple[dict[str, Any], str, Fetch, float | None]] = []
    for f in fetches:
        later, session = next_read(index, f.prior, f.t), next_read(index, f.new, f.t)
        dept = ta.department_names[ta.study_department[f.new]] if ta.department_names else "?"
        keys = {"rank": f.cell % k, "kind": f.cell // k, "dept": dept, "block6h": int(f.t % 86400 // 21600)}
        rows.append((keys, fate(f, later, session), f, session))
    total = sum(f.bytes for _, _, f, _ in rows) or 1
    read = res.prefetch_used_bytes / max(res.prefetch_bytes, 1)
    out = [f"== {fam} {cap} {scheme}: hit {res.hit_ratio:.1%} / {res.byte_hit_ratio:.1%}, prefetched "
           f"{res.prefetch_bytes / 1e9:.2f} GB in {len(rows)} fetches, read {read:.1%}"]
    for name in ("rank", "kind", "dept", "block6h"):
        groups: defaultdict[Any, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        for keys, kind, f, _ in rows:
            groups[keys[name]][kind] += f.bytes
        for value, d in sorted(groups.items()):
            b = sum(d.values())
            parts = ", ".join(f"{kind} {v / b:.0%}" for kind, v in sorted(d.items()))
            out.append(f"  {name} {value}: {b / 1e9:.2f} GB ({b / total:.0%}): {parts}")
    waits = [(s - f.t) / H for _, _, f, s in rows if s is not None]
    if waits:
        out.append(f"  fetch → session: median {np.median(waits):.1f} h (quartiles {np.quantile(waits, 0.25):.1f} / "
                   f"{np.quantile(waits, 0.75):.1f} h)")
    late: defaultdict[bool, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _, kind, f, s in rows:
        if s is not None and np.isfinite(f.turnover):
            late[s - f.t > f.turnover][kind] += f.bytes
    for is_late, d in sorted(late.items()):
        b = sum(d.values())
        out.append(f"  session {'after' if is_late else 'within'} the turnover at the fetch: {b / 1e9:.2f} GB: "
                   + ", ".join(f"{kind} {v / b:.0%}" for kind, v in sorted(d.items())))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("--traces", "/tmp/p12/traces"), ("--families", ",".join(TUNING)), ("--caps", "1.5GB,5GB"),
                          ("--scheme", "agent")):
        ap.add_argument(flag, default=default)
    args = ap.parse_args()
    for fam, cap in itertools.product(args.families.split(","), args.caps.split(",")):
        print(report(fam, cap, Path(args.traces), args.scheme), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
