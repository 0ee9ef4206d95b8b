"""How well what the agent knows when a study is written predicts how long until it is first read (docs/replay.md,
round 24): per written study, the wait from its first write to its first read, against features known at the write
(department, modality, hour and weekday of the write, whether the patient's previous study was read within N hours
of its write). A feature set's predictor is the median log wait of its cell, fitted on the studies written in the
first half of the trace and scored on the second half (a cell unseen in the first half falls back to the
department's median, then the family's):

* R²: the share of the variance of the log wait (of studies read at all) the prediction explains;
* AUC of the predicted wait for "first read within H hours" (H = 4, 12: about the turnover of a 3 % cache and
  twice it; never-read studies count as not within), 0.5 = no information.

    .venv/bin/python bench/wait_features.py --traces /tmp/policy25/cachew --families general,oncology,outpatient

`--rule held|turn --w W` replays round 23's rule (a prior is fetched into a full cache only if its new study's
wait until its first read is at most a limit) with the wait `--wait`: `true` (from the trace: a bound on what any
predictor can buy), or the median of the last 64 write → first-read waits seen so far (first reads before the plan) of
the new study's `dept` or `dept-block` (department × 4-h block of the write; fewer than 8 seen: the department's, then
no cut). The limit is W × the cache's turnover (`Adaptive.turnover`); with `held`, the fresh segment's horizon
while the segment has room for the prior under its ceiling (it holds a linked prior until its new study's first
read). Prints bench/gap_share.py's lines (with --refs, --caps; the default stack):

    .venv/bin/python bench/wait_features.py --rule held --w 1 --wait true --families general,research,oncology

Tune on the tuning families only (agent.sim.workload.TUNING).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.policy import fresh  # noqa: E402
from agent.policy.stack import PolicyStack  # noqa: E402
from agent.sim import replay  # noqa: E402
from agent.sim.trace import TraceArrays, load_arrays  # noqa: E402
from agent.sim.workload import DAY  # noqa: E402
from bench import gap_share  # noqa: E402
from bench.prefetch_waste import next_read, next_reads  # noqa: E402

H = 3600.0
HISTORY_H = 24.0     # "the patient's previous study was read within this many hours of its write"


def studies(ta: TraceArrays) -> dict[str, np.ndarray]:
    """Per written study: its first write, its first read after that (inf: never), and the features."""
    n_st = len(ta.study_bytes)
    st = ta.obj_study[ta.obj]
    first_w = np.full(n_st, np.inf)
    np.minimum.at(first_w, st[ta.is_write], ta.t[ta.is_write])
    written = np.flatnonzero(np.isfinite(first_w))
    reads = ~ta.is_write & (ta.t >= first_w[st])
    first_r = np.full(n_st, np.inf)
    np.minimum.at(first_r, st[reads], ta.t[reads])
    tw = first_w[written]
    wait = first_r[written] - tw
    weekday0 = dt.date.fromisoformat(ta.meta["start"]).weekday()
    # the patient's previous written study (by write time): read within HISTORY_H of its write, and read before
    # this write (what the catalog could know); -1 no previous study, 0 not (yet), 1 yes
    history = np.full(written.size, -1)
    last_of: dict[int, int] = {}
    for i in np.argsort(tw, kind="stable").tolist():
        p = int(ta.study_patient[written[i]])
        j = last_of.get(p)
        if j is not None:
            seen = wait[j] <= HISTORY_H * H and tw[j] + wait[j] <= tw[i]
            history[i] = int(seen)
        last_of[p] = i
    return {"study": written, "t": tw, "wait": wait, "dept": ta.study_department[written].astype(np.int64),
            "mod": ta.study_modality[written].astype(np.int64), "hour": (tw % DAY // (4 * H)).astype(np.int64),
            "weekday": ((tw // DAY).astype(np.int64) + weekday0) % 7, "history": history}


FEATURES: dict[str, tuple[str, ...]] = {
    "department (round 23)": ("dept",),
    "modality": ("mod",),
    "department × modality": ("dept", "mod"),
    "department × 4-h block": ("dept", "hour"),
    "department × weekday": ("dept", "weekday"),
    "department × patient history": ("dept", "history"),
    "department × block × weekend": ("dept", "hour", "weekend"),
    "all of them": ("dept", "mod", "hour", "weekend", "history"),
}


def column(s: dict[str, np.ndarray], name: str) -> np.ndarray:
    return (s["weekday"] >= 5).astype(np.int64) if name == "weekend" else s[name]


def predictor(s: dict[str, np.ndarray], fit: np.ndarray, keys: tuple[str, ...]) -> Callable[[int], float]:
    """Median log wait per cell over the fitted studies (never read: a wait of 30 days), with fallbacks."""
    logw = np.log1p(np.minimum(s["wait"], 30 * DAY) / 60)
    cols = [column(s, k) for k in keys]
    cells: dict[tuple, list[float]] = defaultdict(list)
    dept: dict[int, list[float]] = defaultdict(list)
    for i in np.flatnonzero(fit).tolist():
        cells[tuple(int(c[i]) for c in cols)].append(logw[i])
        dept[int(s["dept"][i])].append(logw[i])
    med = {k: float(np.median(v)) for k, v in cells.items()}
    dmed = {k: float(np.median(v)) for k, v in dept.items()}
    overall = float(np.median(logw[fit]))
    return lambda i: med.get(tuple(int(c[i]) for c in cols), dmed.get(int(s["dept"][i]), overall))


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half (Mann-Whitney)."""
    pos, neg = score[positive], score[~positive]
    if not pos.size or not neg.size:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(order.size)
    allv = np.concatenate([pos, neg])[order]
    ranks[order] = np.arange(1, order.size + 1)
    for v in np.unique(allv):       # average ranks of ties
        m = np.concatenate([pos, neg]) == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


MIN_SEEN, LAST = 8, 64


class Waits:
    """The wait of a new study until its first read: the trace's (`true`), or predicted from the waits seen so far."""

    def __init__(self, ta: TraceArrays, how: str) -> None:
        self.how, self.index = how, next_reads(ta)
        s = studies(ta)
        self.of = {int(st): i for i, st in enumerate(s["study"].tolist())}
        self.s = s
        self.cells: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}      # cell → (first-read times, waits) sorted
        for keys in (("dept",), ("dept", "hour")):
            by: dict[tuple, list[int]] = defaultdict(list)
            for i in np.flatnonzero(np.isfinite(s["wait"])).tolist():
                by[tuple(int(s[k][i]) for k in keys)].append(i)
            for cell, ix in by.items():
                tr = s["t"][ix] + s["wait"][ix]
                order = np.argsort(tr)
                self.cells[cell] = (tr[order], s["wait"][ix][order])

    def wait(self, new: int, now: float) -> float:
        if self.how == "true":
            nxt = next_read(self.index, new, now)
            return np.inf if nxt is None else nxt - now
        i = self.of.get(new)
        if i is None:
            return 0.0
        dept = (int(self.s["dept"][i]),)
        for cell in ((*dept, int(self.s["hour"][i])), dept) if self.how == "dept-block" else (dept,):
            tr, waits = self.cells.get(cell, (np.empty(0), np.empty(0)))
            j = int(np.searchsorted(tr, now, "right"))
            if j >= MIN_SEEN:
                return float(np.median(waits[max(0, j - LAST):j])) - (now - float(self.s["t"][i]))
        return 0.0


def wait_rule(mode: str, w: float, how: str) -> dict[str, int]:
    """Patch the replay so the prior planner cuts priors by their new study's wait (module state: a bench run only)."""
    counts = {"kept": 0, "cut": 0}
    waits: list[Waits] = []
    init, prior_plan = replay.Replayer.__init__, PolicyStack.prior_plan

    def replayer(self: replay.Replayer, ta: TraceArrays, *a: object, **k: object) -> None:
        init(self, ta, *a, **k)  # type: ignore[arg-type]
        waits[:] = [Waits(ta, how)]

    def plan(self: PolicyStack, new: int, ranked: list, budget: object, now: float) -> list:
        pol = self.policy
        if getattr(pol, "capacity", 0):
            wait = waits[0].wait(new, now)
            kept = []
            for r in ranked:
                seg = pol.fresh
                room = mode == "held" and seg.horizon > 0 and seg.total + r[3] <= fresh.MAX_SHARE * pol.capacity
                limit = seg.horizon if room else w * pol.turnover()
                cut = pol.used + r[3] > pol.capacity and wait > limit
                counts["cut" if cut else "kept"] += 1
                if not cut:
                    kept.append(r)
            ranked = kept
        return prior_plan(self, new, ranked, budget, now)  # type: ignore[arg-type]

    replay.Replayer.__init__ = replayer  # type: ignore[method-assign]
    PolicyStack.prior_plan = plan  # type: ignore[method-assign]
    return counts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="/tmp/policy25/cachew")
    ap.add_argument("--refs", default="/tmp/policy25/cachew/refs")
    ap.add_argument("--families", default="general,oncology,outpatient")
    ap.add_argument("--caps", default="1.5GB")
    ap.add_argument("--rule", choices=("held", "turn"), default=None)
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--wait", choices=("true", "dept", "dept-block"), default="true")
    args = ap.parse_args()
    if args.rule:
        counts = wait_rule(args.rule, args.w, args.wait)
        sys.argv = [sys.argv[0], "--traces", args.traces, "--refs", args.refs, "--families", args.families,
                    "--caps", args.caps]
        gap_share.main()
        print(f"rule {args.rule}, W = {args.w:g}, wait {args.wait}: priors kept {counts['kept']}, cut {counts['cut']}")
        return 0
    for fam in args.families.split(","):
        s = studies(load_arrays(f"{args.traces}/{fam}.tsv"))
        half = np.median(s["t"])
        fit, test = s["t"] < half, s["t"] >= half
        read = np.isfinite(s["wait"])
        q = np.percentile(s["wait"][read] / H, [25, 50, 75])
        print(f"\n{fam}: {s['t'].size} written studies, {read.mean():.0%} read; write → first read quartiles "
              f"{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f} h; scored on {int(test.sum())} (second half)")
        logw = np.log1p(np.minimum(s["wait"], 30 * DAY) / 60)
        print("| features | R² of log wait (read) | AUC read < 4 h | AUC read < 12 h |")
        print("|---|---|---|---|")
        for name, keys in FEATURES.items():
            p = predictor(s, fit, keys)
            pred = np.array([p(i) for i in range(s["t"].size)])
            tr = test & read
            r2 = 1 - np.sum((logw[tr] - pred[tr]) ** 2) / np.sum((logw[tr] - logw[tr].mean()) ** 2)
            a4 = auc(-pred[test], s["wait"][test] <= 4 * H)
            a12 = auc(-pred[test], s["wait"][test] <= 12 * H)
            print(f"| {name} | {r2:.2f} | {a4:.2f} | {a12:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
