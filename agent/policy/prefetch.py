"""Prefetch planning: which directories (or studies) to fetch from S3 ahead of the reads.

`plan(candidates, budget)` takes candidates (a key, a predicted heat = expected reads in the horizon, and the bytes
still missing from the cache) and a `Budget` (space bytes, bandwidth in bytes/s, and the window the fetch must finish
in). It returns the ordered plan: best heat per byte first, greedily skipping a candidate that no longer fits and going
on with smaller ones. The plan's total never exceeds `budget.space_bytes` nor `budget.bandwidth_bps * budget.window_s`
(the bytes the line can carry in the window); the planner does no I/O, the agent's fetcher (or the simulator) executes
it in the returned order at the allowed rate.

Two callers:
  * scheme C: in the early-morning window, candidates are day-directories with the LSTM's predicted next-24-hour heat
    (see `agent.policy.predictor`);
  * ours: when the first file of a new study arrives, candidates are the patient's prior studies from the catalog
    (heat = how likely a radiologist opens it with the new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class Candidate:
    key: Hashable
    heat: float          # expected accesses in the horizon (any non-negative scale)
    size: int            # bytes to fetch (the part not already cached)


@dataclass(frozen=True)
class Budget:
    space_bytes: int          # cache space the plan may fill
    bandwidth_bps: float      # bytes per second the prefetch may use
    window_s: float           # seconds the plan must complete in

    @property
    def byte_limit(self) -> int:
        return int(max(0, min(self.space_bytes, self.bandwidth_bps * self.window_s)))


def plan(candidates: Sequence[Candidate], budget: Budget, min_heat: float = 0.0) -> list[Candidate]:
    """Best heat per byte first, within both budgets (greedy knapsack, stable for ties)."""
    limit = budget.byte_limit
    useful = [c for c in candidates if c.heat > min_heat and c.size > 0]
    # heat per byte, then the hotter, then the caller's order: deterministic for equal keys
    ranked = sorted(enumerate(useful), key=lambda ic: (-ic[1].heat / ic[1].size, -ic[1].heat, ic[0]))
    chosen: list[Candidate] = []
    total = 0
    for _, c in ranked:
        if total + c.size <= limit:
            chosen.append(c)
            total += c.size
    return chosen

