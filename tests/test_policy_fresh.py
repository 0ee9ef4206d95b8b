"""New studies kept until their first read: the horizon is learnt from the box's own write → first-read delays."""

from __future__ import annotations

import numpy as np

from agent.policy.fresh import FreshSegment
from agent.sim.replay import ReplayConfig, Replayer
from agent.sim.workload import DAY
from tests.sim_helpers import arrays

FILES = 3
H = 3600.0


def report_trace(hours: int = 24 * 8, reported: float = 0.8, archive: int = 3, seed: int = 1):
    """Every hour one study is written and `reported` of them are read 4 hours later (the report); `archive`
    studies an hour are read from the archive and again three times over the next hours (comparisons,
    consults). The cache holds ~2.5 hours of what lands: LRU has pushed every new study out before its report,
    and the learned expert, which sees studies come back within the hour, drops a third of them too."""
    rng = np.random.default_rng(seed)
    t, obj, w, kind = [], [], [], []
    n_study = 0

    def add(ts: float, s: int, write: bool, k: str) -> None:
        for f in range(FILES):
            t.append(ts + f)
            obj.append(s * FILES + f)
            w.append(write)
            kind.append(k)

    for h in range(hours):
        new = n_study
        add(h * H, new, True, "write")
        if rng.random() < reported and h + 4 < hours:
            add((h + 4) * H, new, False, "report")
        for k in range(archive):
            s = new + 1 + k
            add(h * H + 600 * (k + 1), s, False, "archive")
            for j in range(3):
                add(h * H + 600 * (k + 1) + (j + 1) * H * rng.uniform(0.5, 1.5), s, False, "again")
        n_study += 1 + archive
    order = np.argsort(np.array(t), kind="stable")
    ta = arrays(np.array(obj)[order], np.array(w)[order], t=np.array(t, dtype=float)[order],
                size=np.full(n_study * FILES, 1000), obj_study=np.arange(n_study * FILES) // FILES,
                days=int(hours * H // DAY))
    return ta, np.array(kind)[order]


def hits_of(ta, scheme: str, cap: int) -> np.ndarray:
    r = Replayer(ta, scheme, ReplayConfig(capacity=cap, warmup_days=0))
    out: dict[str, np.ndarray] = {}
    orig = r._result

    def keep(hit: np.ndarray):
        out["hit"] = hit
        return orig(hit)
    r._result = keep  # type: ignore[method-assign]
    r.run()
    return out["hit"]


def test_a_new_study_is_kept_until_its_report_where_lru_drops_it() -> None:
    ta, kind = report_trace()
    cap = 10 * FILES * 1000                          # 10 studies: ~2.5 hours of 4 studies an hour
    report = (kind == "report") & (ta.t >= 3 * DAY)  # after the horizon has been learnt
    lru, ours = hits_of(ta, "A", cap), hits_of(ta, "adaptive", cap)
    assert not lru[report].any()                     # LRU: every report misses
    assert ours[report].mean() > 0.85                # held until the report (without the segment: 65 %)


def test_horizon_is_learnt_and_cold_start_holds_nothing() -> None:
    seg = FreshSegment()
    seg.capacity = 100
    seg.written("a", 10, 0.0)
    assert not seg.holds("a") and seg.status()["fresh_mode"] == "cold start: nothing held"
    for s in range(60):                              # first reads 3 hours after the write
        seg.written(s, 10, s * 60.0)
        seg.read(s, s * 60.0 + 3 * H)
    assert 3 * H <= seg.horizon <= 8 * H and seg.status()["fresh_mode"] == "learned"
    seg.written("b", 10, 0.0)
    assert seg.holds("b") and seg.release(H) == []
    assert seg.release(seg.horizon + 1) == ["b"] and not seg.holds("b")      # past the horizon: back to the experts
    for s in "cdefghi":
        seg.written(s, 10, 0.0)
    seg.written("j", 10, 2.5 * H)                     # over the ceiling (70 of 100 bytes): the newest goes, its
    assert seg.release(2.5 * H + 60) == ["j"] and seg.total == 70       # report is farthest off
    seg.read("c", H)                                  # read: an ordinary study
    seg.removed("d", 10)                              # dropped
    assert not seg.holds("c") and not seg.holds("d") and seg.total == 50
