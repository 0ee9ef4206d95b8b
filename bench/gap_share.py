"""Share of the LRU→Belady gap one scheme closes on the family traces, against stored reference runs
(LRU and Belady / BeladySize come from an earlier `pacsgw simulate --reference ...` of the same trace and
capacity, so trying a policy variant costs one replay, not a libCacheSim run):

    .venv/bin/python bench/gap_share.py --traces /tmp/cachew --refs /tmp/cachew/refs \\
        --families general,oncology,outpatient --scheme agent

`<refs>/<family>-<cap>/results.json` must hold scheme A and the reference rows Belady and BeladySize.
Tune on the tuning families only (agent.sim.workload.TUNING); report the held-out ones after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.policy import adaptive, groups, learned, priors  # noqa: E402
from agent.sim.replay import ReplayConfig, Replayer  # noqa: E402
from agent.sim.report import gap_share  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402


def fates(rep: Replayer) -> Callable[[], tuple[dict[str, int], dict[str, list[int]]]]:
    """Hook a replayer before its run; the returned function then tells where its prefetched bytes went: bytes by fate
    (read while cached; evicted unread, by the part of the stack that took them (a door, an expert, `unopened`: the
    priors their session passed by), before or after their new study's first read, and whether the trace reads them
    later; cached unread at the end), and [bytes, read bytes] by the kind of prior at planning time (rank and kind,
    agent/policy/priors.py `cell`, `cold`: not judged yet) and by the planner's heat then. The replay is unchanged."""
    p, pp = rep.stack.policy, rep.stack.priors
    last: dict[int, list[Any]] = {}     # object → [object, bytes, cell, heat, cold, new study, fate] of its last fetch
    closed: list[list[Any]] = []
    plan: list[Any] = [None, 0.0, False, None]      # the prior being fetched: cell, heat, cold, new study
    now: list[Any] = [0.0, "?"]                     # the pass's time, the part whose walk gave the last victim

    def tagged(walk: Callable[..., Iterator[Any]], name: str) -> Callable[..., Iterator[Any]]:
        def victims(*args: Any) -> Iterator[Any]:
            for key in walk(*args):
                now[1] = name
                yield key
        return victims
    if isinstance(p, adaptive.Adaptive):
        for part, name in ((p.door, "door"), (p.door_known, "known door"), (p.door2, "second door"),
                           (p.learned, "learned"), (p.lru, "study LRU")):
            if part is not None:
                part.victims = tagged(part.victims, name)  # type: ignore[method-assign]
        p._unopened_files = tagged(p._unopened_files, "unopened")  # type: ignore[method-assign]
    prior_fetched, fetch_plan, evicted_unread, evict = (rep.stack.prior_fetched, rep._fetch_plan, rep._evicted_unread,
                                                        rep._evict)

    def on_prior(prior: Any, new: Any, heat: float, cell: int, t: float) -> None:
        plan[:] = [cell, heat, pp is not None and pp.cold(cell), new]
        prior_fetched(prior, new, heat, cell, t)

    def on_fetch(objs: list[int], t: float) -> None:
        for o in objs:
            if o in last:       # fetched again: the last fetch was read (an unread one was closed at its eviction)
                closed.append(last.pop(o))
            last[o] = [o, rep.size.item(o), *plan, None]
        fetch_plan(objs, t)

    def on_evict(t: float) -> None:
        now[0] = t
        evict(t)

    def on_evicted(o: int) -> None:
        if (f := last.pop(o, None)) is not None:
            before = isinstance(p, adaptive.Adaptive) and f[5] in p.waiting
            f[6] = (now[1], "before" if before else "after", now[0])
            closed.append(f)
        evicted_unread(o)
    rep.stack.prior_fetched, rep._fetch_plan = on_prior, on_fetch  # type: ignore[method-assign]
    rep._evicted_unread, rep._evict = on_evicted, on_evict  # type: ignore[method-assign]

    def split() -> tuple[dict[str, int], dict[str, list[int]]]:
        ta = rep.ta
        reads = ~ta.is_write
        later = np.sort(ta.obj[reads] * 1e7 + ta.t[reads])     # (object, time) of every read, in order
        out: dict[str, int] = {}
        kinds: dict[str, list[int]] = {}
        for o, size, cell, heat, cold, _, fate in closed + list(last.values()):
            if fate is None:
                name = "cached unread at the end" if rep.prefetched[o] else "read"
            else:
                i = int(np.searchsorted(later, o * 1e7 + fate[2], side="right"))
                again = i < later.size and int(later[i] // 1e7) == o
                name = f"evicted unread by {fate[0]}, {fate[1]} its session, {'read' if again else 'never read'} later"
            out[name] = out.get(name, 0) + size
            if pp is not None and cell is not None:
                for k in (f"{'cold ' * cold}rank {cell % pp.k} kind {cell // pp.k}", f"heat {min(heat, 0.99):.1f}"):
                    v = kinds.setdefault(k, [0, 0])
                    v[0] += size
                    v[1] += size * (name == "read")
        return out, kinds
    return split


def _shown(share: float | None) -> str:
    return "–" if share is None else f"{share:.0%}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/cachew")
    ap.add_argument("--refs", default="/tmp/cachew/refs")
    ap.add_argument("--families", default="general,oncology,outpatient")
    ap.add_argument("--caps", default="1.5GB,5GB")
    ap.add_argument("--scheme", default="agent")
    ap.add_argument("--factors", default=None,
                    help="the learned policy's factors, e.g. gap,size,newer (default: learned.DEFAULT_FACTORS)")
    ap.add_argument("--priors-space", type=float, default=None,
                    help="ReplayConfig.priors_space: the share of the cache one prior plan may fill")
    ap.add_argument("--byte-weight", type=float, default=None, help="learned.BYTE_WEIGHT")
    ap.add_argument("--admit", choices=("on", "off"), default=None,
                    help="learned.ADMIT_PRIORS: admit a prefetched prior only above the eviction boundary")
    ap.add_argument("--admit-margin", type=float, default=None,
                    help="learned.ADMIT_MARGIN: a prior is admitted at this multiple of the eviction boundary")
    ap.add_argument("--min-heat", type=float, default=None, help="priors.MIN_HEAT: the open-rate floor of a prior")
    ap.add_argument("--doorkeeper", choices=("on", "off"), default=None,
                    help="adaptive.DOORKEEPER: old one-off reads on probation (evicted first) until a second session")
    ap.add_argument("--hold-priors", choices=("on", "off"), default=None,
                    help="adaptive.HOLD_PRIORS: a prefetched prior held like a written study until its first read")
    ap.add_argument("--trim", choices=("on", "off"), default=None,
                    help="adaptive.TRIM: the last victim study of a pass gives up only the files needed")
    ap.add_argument("--min-cut", type=float, default=None,
                    help="adaptive.MIN_CUT: the least share of the cache a cut frees")
    ap.add_argument("--second-door", choices=("on", "off"), default=None,
                    help="adaptive.SECOND_DOOR: a written study after its first session on probation while the cache "
                         "turns over sooner than studies come back")
    ap.add_argument("--unopened", choices=("off", "release", "drop"), default=None,
                    help="adaptive.RELEASE_UNOPENED / DROP_UNOPENED: a linked prior its new study's first session did "
                         "not open leaves the fresh segment (release), and its files go first (drop)")
    ap.add_argument("--probation-opened", choices=("on", "off"), default=None,
                    help="adaptive.PROBATION_OPENED: a linked prior opened in its new study's session is on the "
                         "doorkeeper's probation once the session is over")
    ap.add_argument("--explore", type=int, default=None,
                    help="priors.EXPLORE: a prior cell below the floor is fetched once in this many chances")
    ap.add_argument("--cold", default=None, metavar="OUTCOMES,TTL_H",
                    help="priors.COLD_OUTCOMES / COLD_TTL_S (hours): a prior cell with fewer outcomes has one fetch "
                         "unsettled at a time (0: no cold start)")
    ap.add_argument("--open-target", type=float, default=None,
                    help="priors.OPEN_TARGET: a plan's space budget scales with the open rate of past prefetches")
    ap.add_argument("--open-floor", type=float, default=None, help="priors.OPEN_FLOOR")
    ap.add_argument("--old-s", type=float, default=None, help="adaptive.OLD_S in hours")
    ap.add_argument("--group", default=None, metavar="MIXED_H,GAP_MIN,SPAN_MIN",
                    help="agent.policy.groups: a directory written over MIXED_H hours is split into insert bursts "
                         "GAP_MIN minutes apart, each at most SPAN_MIN long")
    ap.add_argument("--known-back", choices=("on", "off"), default=None,
                    help="adaptive.KNOWN_BACK: a written study that came back for a second session and is read on a "
                         "miss again goes through a doorkeeper of its own")
    ap.add_argument("--fates", action="store_true", help="also where the prefetched bytes went (`fates`)")
    ap.add_argument("--in-time-power", type=float, default=None,
                    help="adaptive.IN_TIME_POWER: a prior into a full cache is weighed at heat × P(read before evicted "
                         "unread) ** this (0: the heat alone)")
    args = ap.parse_args()
    if args.in_time_power is not None:
        adaptive.IN_TIME_POWER = args.in_time_power
    if args.known_back is not None:
        adaptive.KNOWN_BACK = args.known_back == "on"
    if args.group is not None:
        mixed_h, gap_min, span_min = (float(x) for x in args.group.split(","))
        groups.MIXED_S, groups.GAP_S, groups.SPAN_S = mixed_h * 3600, gap_min * 60, span_min * 60
    if args.cold is not None:
        outcomes, ttl_h = args.cold.split(",")
        priors.COLD_OUTCOMES, priors.COLD_TTL_S = int(outcomes), float(ttl_h) * 3600
    if args.open_target is not None:
        priors.OPEN_TARGET = args.open_target
    if args.open_floor is not None:
        priors.OPEN_FLOOR = args.open_floor
    if args.probation_opened is not None:
        adaptive.PROBATION_OPENED = args.probation_opened == "on"
    if args.unopened is not None:
        adaptive.RELEASE_UNOPENED, adaptive.DROP_UNOPENED = args.unopened != "off", args.unopened == "drop"
    if args.explore is not None:
        priors.EXPLORE = args.explore
    if args.old_s is not None:
        adaptive.OLD_S = args.old_s * 3600
    if args.second_door is not None:
        adaptive.SECOND_DOOR = args.second_door == "on"
    if args.min_cut is not None:
        adaptive.MIN_CUT = args.min_cut
    if args.trim is not None:
        adaptive.TRIM = args.trim == "on"
    if args.hold_priors is not None:
        adaptive.HOLD_PRIORS = args.hold_priors == "on"
    if args.doorkeeper is not None:
        adaptive.DOORKEEPER = args.doorkeeper == "on"
    if args.min_heat is not None:
        priors.MIN_HEAT = args.min_heat
    if args.admit is not None:
        learned.ADMIT_PRIORS = args.admit == "on"
    if args.admit_margin is not None:
        learned.ADMIT_MARGIN = args.admit_margin
    if args.byte_weight is not None:
        learned.BYTE_WEIGHT = args.byte_weight
    if args.factors is not None:
        learned.DEFAULT_FACTORS = tuple(f for f in args.factors.split(",") if f)
    space = {} if args.priors_space is None else {"priors_space": args.priors_space}
    total = worst = 0.0
    for fam in args.families.split(","):
        ta = load_arrays(Path(args.traces) / f"{fam}.tsv")
        for cap in args.caps.split(","):
            ref = json.loads((Path(args.refs) / f"{fam}-{cap}" / "results.json").read_text())
            lru = next(s for s in ref["schemes"] if s["scheme"] == "A")
            refs = {r["algorithm"]: r for r in ref["reference"]}
            bo = refs["Belady"]["hit_ratio"]
            bb = max(refs["Belady"]["byte_hit_ratio"], refs["BeladySize"]["byte_hit_ratio"])
            rep = Replayer(ta, args.scheme, ReplayConfig(capacity=int(float(cap[:-2]) * 1e9), **space))
            report = fates(rep) if args.fates else None
            res = rep.run()
            # a cell where LRU is already optimal (no gap, as trauma at 10 GB: round 36) adds nothing to the sums
            go = gap_share(res.hit_ratio, lru["hit_ratio"], bo)
            gb = gap_share(res.byte_hit_ratio, lru["byte_hit_ratio"], bb)
            total += (go or 0) + (gb or 0)
            worst += min(go or 0, gb or 0)
            pf = f"{res.prefetch_used_bytes / res.prefetch_bytes:.1%}" if res.prefetch_bytes else "–"
            # the hit ratios count no warm-up; the planner's cold start falls in it (docs/replay.md, round 29)
            after = (f"{rep.pf_used_after / rep.pf_after:.1%} of {rep.pf_after / 1e9:.2f} GB" if rep.pf_after
                     else "– (none fetched)")
            print(f"{fam} {cap} {args.scheme}: hit {res.hit_ratio:.1%} / {res.byte_hit_ratio:.1%} "
                  f"(LRU {lru['hit_ratio']:.1%} / {lru['byte_hit_ratio']:.1%}, Belady {bo:.1%} / {bb:.1%}), "
                  f"gap closed {_shown(go)} / {_shown(gb)}, prefetched bytes read {pf} "
                  f"(fetched after the warm-up: {after})",
                  flush=True)
            if report is not None:
                by_fate, by_kind = report()
                print("    fates: " + "; ".join(f"{n} {b / res.prefetch_bytes:.1%}" for n, b in
                                                sorted(by_fate.items(), key=lambda x: -x[1])))
                print("    by kind / heat: " + "; ".join(f"{k} {b / 1e9:.2f} GB read {r / b:.0%}" for k, (b, r) in
                                                         sorted(by_kind.items())))
    print(f"sum of the object and byte gap shares: {total:.0%}, of the lower of the two: {worst:.0%} "
          f"({args.scheme}, factors "
          f"{','.join(learned.DEFAULT_FACTORS)}, byte weight {learned.BYTE_WEIGHT:g}, "
          f"prior admission {f'at {learned.ADMIT_MARGIN:g}x' if learned.ADMIT_PRIORS else 'off'}, "
          f"doorkeeper {'on' if adaptive.DOORKEEPER else 'off'}, "
          f"priors held {'on' if adaptive.HOLD_PRIORS else 'off'}, "
          f"unopened {('drop' if adaptive.DROP_UNOPENED else 'release') if adaptive.RELEASE_UNOPENED else 'off'}, "
          f"opened on probation {'on' if adaptive.PROBATION_OPENED and adaptive.RELEASE_UNOPENED else 'off'}, "
          f"trim {'on' if adaptive.TRIM else 'off'}, "
          f"min cut {adaptive.MIN_CUT:g}, second door {'on' if adaptive.SECOND_DOOR else 'off'}, "
          f"known back {'on' if adaptive.KNOWN_BACK else 'off'}, in-time power {adaptive.IN_TIME_POWER:g}, "
          f"explore {priors.EXPLORE}, open target {priors.OPEN_TARGET:g}, "
          f"cold start {priors.COLD_OUTCOMES} outcomes, {priors.COLD_TTL_S / 3600:g} h, "
          f"old {adaptive.OLD_S / 3600:g} h, groups {groups.MIXED_S / 3600:g} h / "
          f"{groups.GAP_S / 60:g} / {groups.SPAN_S / 60:g} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
