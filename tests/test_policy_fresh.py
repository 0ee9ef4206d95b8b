"""New studies kept until their first read: the horizon is learnt from the box's own write → first-read delays."""

from __future__ import annotations

import numpy as np

from agent.policy.adaptive import Adaptive
from agent.policy.fresh import FreshSegment
from agent.sim.workload import DAY
from bench.miss_analysis import hits_of
from tests.sim_helpers import StudyTrace

FILES = 3
H = 3600.0


def report_trace(hours: int = 24 * 8, reported: float = 0.8, archive: int = 3, seed: int = 1):
    """Every hour one study is written and `reported` of them are read 4 hours later (the report); `archive`
    studies an hour are read from the archive and again three times over the next hours (comparisons,
    consults). The cache holds ~2.5 hours of what lands: LRU has pushed every new study out before its report,
    and the learned expert, which sees studies come back within the hour, drops a third of them too."""
    rng = np.random.default_rng(seed)
    tr = StudyTrace(FILES)
    for h in range(hours):
        new = tr.studies
        tr.add(h * H, new, True, "write")
        if rng.random() < reported and h + 4 < hours:
            tr.add((h + 4) * H, new, False, "report")
        for k in range(archive):
            s = new + 1 + k
            tr.add(h * H + 600 * (k + 1), s, False, "archive")
            for j in range(3):
                tr.add(h * H + 600 * (k + 1) + (j + 1) * H * rng.uniform(0.5, 1.5), s, False, "again")
        tr.studies += 1 + archive
    return tr.arrays(days=int(hours * H // DAY))


def test_a_new_study_is_kept_until_its_report_where_lru_drops_it() -> None:
    ta, kind = report_trace()
    cap = 10 * FILES * 1000                          # 10 studies: ~2.5 hours of 4 studies an hour
    report = (kind == "report") & (ta.t >= 3 * DAY)  # after the horizon has been learnt
    lru, ours = hits_of(ta, "A", cap, warmup_days=0), hits_of(ta, "adaptive", cap, warmup_days=0)
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


def horizon_learnt() -> Adaptive:
    """An adaptive policy whose fresh segment has learnt its horizon: first reads 3 hours after the write."""
    p = Adaptive()
    for s in range(60):
        p.on_insert(("w", s), 1, s * 60.0, s * 60.0, ("w", s), written=True)
        p.on_access(("w", s), s * 60.0 + 3 * H)
        p.on_remove(("w", s))
    return p


def test_a_prefetched_prior_is_held_beside_its_new_study_until_its_first_read() -> None:
    p = horizon_learnt()
    t = 4 * H
    p.link("prior", "new", 0.5)                      # the planner fetches a prior for a new study
    p.on_insert("p1", 100, t, 0.0, "prior", prefetch=True)
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("r1", 400, t + 60, t - H, "recent")  # read since: without the hold the prior goes first
    assert list(p.victims(100, t + 120)) == ["r1"]
    p.on_access("p1", t + 200)                       # opened: an ordinary study, the unread new one stays held
    assert list(p.victims(100, t + 300)) == ["p1"]


def test_a_prior_its_new_studys_session_did_not_open_goes_first_once_the_session_is_over() -> None:
    p = horizon_learnt()
    t = 4 * H
    for prior in ("opened", "passed"):               # the planner fetches two priors for a new study
        p.link(prior, "new", 0.5)
        p.on_insert(prior + "1", 100, t, 0.0, prior, prefetch=True)
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("r1", 100, t + 60, t - H, "recent")  # read on a miss since
    session = t + 3 * H                               # the viewer hangs one prior, then the new study
    p.on_access("opened1", session)
    p.on_access("n1", session + 10)
    first = list(p.victims(100, session + 60))
    assert first and "passed1" not in first          # in the session: the unopened prior is still held
    p.on_insert("r2", 100, session + 120, t - H, "recent")
    # the session is over and did not open it: it is not waiting for anything (without the release it stays held
    # until the horizon, and a study read minutes ago goes in its place)
    assert list(p.victims(100, session + 700)) == ["passed1"]


def test_a_prior_opened_in_its_session_is_a_one_off_read_on_probation_once_the_session_is_over() -> None:
    p = horizon_learnt()
    t = 4 * H
    p.link("prior", "new", 0.5)
    p.on_insert("p1", 100, t, t - 2 * DAY, "prior", prefetch=True)
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("w1", 100, t + 60, t, "written", written=True)
    p.on_access("w1", t + 120)                       # another new study, read before the session
    session = t + 3 * H
    p.on_access("p1", session)                       # the viewer hangs the prior, then the new study
    p.on_access("n1", session + 10)
    # the session is over: the prior was opened beside its new study, as a study read on a miss is opened once; it
    # goes first until a second session (without probation the study read longest ago, w1, goes)
    assert list(p.victims(100, session + 700)) == ["p1"]


def test_a_prior_fetched_back_waits_from_its_fetch_not_from_its_first_write() -> None:
    """A prior written here once and never read, evicted, then fetched back for a new study past the horizon: it is
    held from its fetch. (It kept its first write's time, was released at once, and the live test of the link failed
    whenever the machine was slow enough to pass the 60 s horizon it learnt.)"""
    p = horizon_learnt()
    written = 4 * H
    p.on_insert("p1", 100, written, written, "prior", written=True)
    p.on_remove("p1")                                # evicted unread
    t = written + 20 * H                             # well past the horizon
    p.link("prior", "new", 0.5)
    p.on_insert("p1", 100, t, written, "prior", prefetch=True)
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("r1", 400, t + 60, t - H, "recent")
    assert list(p.victims(100, t + 120)) == ["r1"]


def test_a_study_joining_the_segment_counts_the_files_it_has_cached_already() -> None:
    """The segment holds all of a joining study's cached files (the experts skip a held study whole), so its size cap
    counts them: it counted only the bytes inserted from the join on (docs/replay.md round 35: at oncology 1.5 GB its
    members held all 1 500 MB of the cache counted as 850 MB, and the 0.7 ceiling never bound)."""
    p = horizon_learnt()
    t = 4 * H
    p.on_insert("a1", 300, t, t - 2 * DAY, "prior")     # read on a miss: cached, not held
    assert not p.fresh.holds("prior")
    p.link("prior", "new", 0.5)
    p.on_insert("a2", 100, t + 60, t - 2 * DAY, "prior", prefetch=True)   # the planner fetches the rest for a new study
    assert p.fresh.holds("prior") and p.fresh.members["prior"] == 400 and p.fresh.total == 400
    p.on_insert("a3", 50, t + 120, t - 2 * DAY, "prior", prefetch=True)   # a member already: only the new bytes
    assert p.fresh.total == 450


def test_a_prior_the_cache_would_evict_before_its_read_is_not_fetched_into_a_full_cache() -> None:
    """A prefetch is worth its bytes only if it is read before the cache evicts it (docs/replay.md, round 39). The cache
    measures how long it keeps a study unread (the ages of unread studies at their eviction) and the fresh segment has
    learnt when new studies are read after their write: a cache that evicts unread studies after an hour, whose new
    studies are read 10 h after the write, is not sent a prior for one, though the prior's kind is opened half the time
    and ranks above what the cache evicts (main fetched it, and the cache evicted it unread). A cache that evicted no
    unread study (a big one) fetches it as before, and so does one that only cut studies still being written (a pass
    taking a study's newest files minutes after its first write says nothing of how long the cache keeps it)."""
    from agent.policy.learned import HitDensity
    from agent.policy.prefetch import Budget
    from agent.policy.stack import PolicyStack, StackSpec

    def plan(evict_at: float | None) -> tuple[list[object], float]:
        """→ what is planned, P; the cache evicted 10 written studies unread `evict_at` seconds after their write."""
        stack = PolicyStack(StackSpec("adaptive", ("priors",)))
        p = stack.policy
        assert isinstance(p, Adaptive)
        if evict_at is not None:
            for s in range(10):
                stack.inserted(1000 + s, 100, s, s, s, written=True)
            assert len(list(stack.victims(1000, evict_at + 9, lambda: (None, [])))) == 10
        for s in range(100, 160):                   # new studies read 10 h after their write
            stack.inserted(1000 + s, 100, 2 * H + s, 2 * H + s, s, written=True)
            stack.accessed(1000 + s, 12 * H + s)
        p.capacity = p.used                         # full: a prior pushes something out
        shadow = p.shadows[1].policy
        assert isinstance(shadow, HitDensity)
        shadow.fitted, shadow.boundary = True, 1e-9
        shadow.density[:] = 1.0
        ranked = [(0, "prior", 0.5, 100, 1)]        # (cell, prior, heat, bytes, files)
        chosen = stack.prior_plan("new", ranked, Budget(10**6, 1e9, H), 13 * H)
        return [key for key, _, _, _ in chosen], p.fresh.read_in_time()

    assert plan(evict_at=H) == ([], 0.0)
    assert plan(evict_at=None) == (["prior"], 1.0)
    assert plan(evict_at=300.0) == (["prior"], 1.0)
