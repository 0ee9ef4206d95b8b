"""The learned study hit-density eviction: a weekly schedule is learned, not coded; cold start says so."""

from __future__ import annotations

from agent.policy.learned import HitDensity, age_bucket
from agent.sim.replay import ReplayConfig, Replayer
from agent.sim.workload import DAY
from tests.sim_helpers import StudyTrace

FILES = 3


def weekly_board_trace(days: int = 42, one_shots: int = 6):
    """Every day one board case (written, read twice that morning, shown at the board 7 days later)
    and `one_shots` studies read once. A cache of ~2 days of writes (a week of board cases and a day's
    studies fit): LRU has dropped a case by its board; nothing in the policy knows about boards or weeks."""
    tr = StudyTrace(FILES)
    for day in range(days):
        board = tr.studies
        tr.add(day * DAY + 8 * 3600, board, True, "write")
        tr.add(day * DAY + 9 * 3600, board, False, "read")
        tr.add(day * DAY + 11 * 3600, board, False, "read")
        if day + 7 < days:
            tr.add((day + 7) * DAY + 14 * 3600, board, False, "board")
        for k in range(one_shots):
            s = board + 1 + k
            tr.add(day * DAY + 8 * 3600 + 60 * (k + 1), s, True, "write")
            tr.add(day * DAY + 10 * 3600 + 60 * k, s, False, "read")
        tr.studies += 1 + one_shots
    return tr.arrays(days=days)


def test_weekly_board_learned_where_lru_misses_it() -> None:
    ta, kind = weekly_board_trace()
    cap = 15 * FILES * 1000
    cfg = ReplayConfig(capacity=cap, warmup_days=14)
    lru = Replayer(ta, "A", cfg).run()
    policy = HitDensity()
    learned = Replayer(ta, "learned", cfg)
    learned.stack.policy = policy
    res = learned.run()
    boards = int(((kind == "board") & (ta.t >= 14 * DAY)).sum())
    # LRU cannot keep a week: every board read misses; the learned policy keeps the board cases
    assert lru.hits <= lru.reads - boards
    assert res.hits - lru.hits >= 0.8 * boards
    assert policy.status()["mode"] == "learned"


def test_cold_start_is_study_lru_and_says_so() -> None:
    p = HitDensity(warm_events=10**9)
    for s in range(3):
        p.on_insert(2 * s, 10, float(s), 0.0, s)
        p.on_insert(2 * s + 1, 10, float(s), 0.0, s)
    p.on_access(0, 10.0)                                  # study 0 is now the most recently used
    assert p.status()["mode"] == "cold start: study LRU"
    assert list(p.victims(15, 11.0)) == [2, 3]            # a whole study, the least recently used


def test_age_buckets_are_log_spaced() -> None:
    assert [age_bucket(a) for a in (0, 59, 60, 119, 120, 7 * DAY)] == [0, 0, 1, 1, 2, 14]


def test_adaptive_keeps_the_weekly_board_too() -> None:
    """The default eviction picks between study LRU and the hit density by shadow caches: on a weekly board,
    where LRU misses every board read, it runs the learned expert and keeps the cases."""
    ta, kind = weekly_board_trace()
    cfg = ReplayConfig(capacity=15 * FILES * 1000, warmup_days=14)
    lru = Replayer(ta, "A", cfg).run()
    r = Replayer(ta, "adaptive", cfg)
    res = r.run()
    boards = int(((kind == "board") & (ta.t >= 14 * DAY)).sum())
    assert res.hits - lru.hits >= 0.8 * boards
    assert r.stack.status()["mode"].startswith("expert: learned hit density")


def test_adaptive_ranks_with_its_shadows_model_only() -> None:
    """The real cache's learned index fits nothing of its own (its evictions are the mixed experts' choices,
    a biased sample): it ranks with the density its shadow learnt from an undisturbed run."""
    ta, _ = weekly_board_trace()
    r = Replayer(ta, "adaptive", ReplayConfig(capacity=15 * FILES * 1000, warmup_days=14))
    r.run()
    policy = r.stack.policy
    model = policy.shadows[1].policy
    assert policy.learned.events == 0 and not policy.learned.hits.any() and not policy.learned.evictions.any()
    assert model.events > 0 and policy.learned.density is model.density


def test_gap_factor_learns_that_studies_back_after_a_week_come_back_again() -> None:
    """Studies read, then again a week later, then again (a board) against studies read once: the factor of
    "came back after 3–10 days" rises above 1, that of "not back yet" falls below, from the traffic alone."""
    from agent.policy.learned import gap_bucket
    p = HitDensity(refit_events=50, warm_events=0)
    t = 0.0
    for study in range(400):
        t += 600.0
        p.on_insert(study, 1, t, t, study)
    for week in range(1, 5):                # the even studies come back every week (four boards), odd never
        for study in range(0, 400, 2):
            p.on_access(study, week * 7 * DAY + study)
    list(p.victims(400, 29 * DAY))           # then all are evicted
    p.refit()
    gap = p.factor[p.factors.index("gap")]
    assert gap[gap_bucket(7 * DAY)] > 1.0 > gap[0]


def test_study_features_reach_the_policy_as_factors() -> None:
    """Priors of a patient with a newer study come back (a board shows them beside the new one), the rest
    not: told through the stack's `describe` (what the prefetcher learns from the catalog's study index
    and the simulator from the trace), the "newer" factor learns it; a modality learns nothing it should not."""
    from agent.policy.stack import PolicyStack, StackSpec
    stack = PolicyStack(StackSpec("lru"))          # the describer; the policy under test reads its features
    p = HitDensity(factors=("newer", "modality"), attrs=stack.attrs_of, refit_events=50, warm_events=0)
    t = 0.0
    for study in range(400):
        t += 600.0
        stack.describe(study, "CT", "oncology", newer=study % 2 == 0)
        p.on_insert(study, 1, t, t, study)
    assert stack.attrs_of(0) == (1, 2, 1) and stack.attrs_of(1) == (1, 2, 0) and stack.attrs_of(999) == (0, 0, 0)
    for study in range(0, 400, 2):
        p.on_access(study, 3 * DAY + study)
    list(p.victims(400, 10 * DAY))
    p.refit()
    newer, modality = p.factor
    assert newer[1] > 1.0 > newer[0]
    assert abs(modality[1] - 1.0) < 0.05           # every study is CT: the factor stays neutral
    stack.describe(1, None, None, newer=True)        # a later call keeps what was known
    assert stack.attrs_of(1) == (1, 2, 1)


def test_modality_codes_are_bounded_whatever_the_headers_say() -> None:
    """The stack kept a code per distinct Modality value for the process's life, and a header's Modality is any
    valid 16-character code string: one hostile client writing studies with 200 000 made-up modalities grew it by
    200 000 entries. Now MAX_CODES modalities (and departments) have codes of their own and the rest share one."""
    from agent.policy.stack import PolicyStack, StackSpec
    stack = PolicyStack(StackSpec("learned", ("priors",)))
    stack.describe("ct", "CT", "radiology", newer=False)
    for i in range(200_000):
        stack.describe(i, f"X{i:015d}", f"dept{i}", newer=False)
    limit = getattr(PolicyStack, "MAX_CODES", 256)
    assert len(stack._codes) <= 2 * (limit + 1)  # was 400 002
    ct, radiology, _ = stack.attrs_of("ct")
    stack.describe("ct2", "CT", "radiology", newer=True)
    assert stack.attrs_of("ct2") == (ct, radiology, 1)              # a known name keeps its code
    assert len({stack.attrs_of(i)[0] for i in range(200_000)}) == limit  # 255 own, 1 shared
    assert stack.attrs_of(199_999)[:2] == stack.attrs_of(100_000)[:2] != stack.attrs_of(0)[:2]


def test_the_simulator_describes_each_new_study_and_marks_the_patients_earlier_ones() -> None:
    """The replay tells the stack what the agent's prefetcher tells it from the catalog: a new study's
    modality and department, and that the patient's earlier studies (an archive prior included) now have a
    newer one; another patient's study is left alone."""
    from tests.sim_helpers import arrays
    # studies: 0 = patient 0's archive prior (day -400), 1 = patient 0's new study, 2 = patient 1's study
    ta = arrays(obj=[1, 2, 0], is_write=[True, True, False], t=[0.0, 1.0, 2.0], obj_study=[0, 1, 2],
                study_day=[-400, 0, 0], study_patient=[0, 0, 1])
    r = Replayer(ta, "adaptive", ReplayConfig(capacity=10_000, warmup_days=0))
    r.run()
    ct, ed = r.stack.attrs_of(1)[:2]
    assert ct > 0 and ed > 0
    assert r.stack.attrs_of(1) == (ct, ed, 0) and r.stack.attrs_of(0) == (ct, ed, 1)
    assert r.stack.attrs_of(2) == (ct, ed, 0)


def test_a_prefetched_prior_stays_beside_its_unread_new_study() -> None:
    """A prior fetched for a new study is opened with it at the report, hours later: until then it is worth
    its heat × the new study's density (its own class, an old study read never, is worth little), so it is
    not the first victim; once the new study has been read it is ranked on its own again."""
    from agent.policy.stack import PolicyStack, StackSpec
    stack = PolicyStack(StackSpec("learned", ("priors",)))
    p = stack.policy
    assert isinstance(p, HitDensity)
    p.learn, p.fitted = False, True
    p.density[:] = 0.1                  # studies read before
    p.density[0, 0, :] = 1.0            # a new study not read yet: what its report will read
    p.density[0, 3, :] = 0.01           # an old study never read in the cache
    new, prior, others = 0, 1, (2, 3)

    def fill(heat: float) -> None:
        for key in list(p._study_of):
            p.on_remove(key)
        stack.inserted(new, 10, 0.0, 0.0, new)
        for s in others:
            stack.inserted(s, 10, 0.0, 0.0, s)
            stack.accessed(s, 700.0)
        stack.prior_fetched(prior, new, heat, 0, 800.0)
        stack.inserted(prior, 10, 800.0, -400 * DAY, prior, prefetch=True)

    fill(0.5)
    assert list(stack.victims(10, 900.0, lambda: (None, []))) in ([2], [3])     # not the prior
    stack.accessed(new, 2 * 3600.0)                                              # the report: new is read
    assert list(stack.victims(10, 2 * 3600.0 + 60, lambda: (None, []))) == [prior]
    fill(0.05)                          # a prior rarely opened is not worth keeping for it
    assert list(stack.victims(10, 900.0, lambda: (None, []))) == [prior]


def test_a_prior_is_admitted_only_above_the_eviction_boundary() -> None:
    """Into a full cache a prior is fetched only if, kept beside its new study, it ranks above what the cache
    has been evicting lately: a rarely opened prior would push out a study worth more and be the next victim
    itself. Cold (nothing evicted by rank yet), or with free space (adaptive), everything is admitted."""
    from agent.policy.adaptive import Adaptive
    from agent.policy.prefetch import Budget
    from agent.policy.stack import PolicyStack, StackSpec
    stack = PolicyStack(StackSpec("learned", ("priors",)))
    p = stack.policy
    assert isinstance(p, HitDensity)
    ranked = [(0, 10, 0.9, 100, 10), (1, 11, 0.02, 100, 10)]    # (cell, prior, heat, bytes, files)
    budget = Budget(10**9, 1e9, 3600.0)
    assert [k for k, _, _, _ in stack.prior_plan(0, ranked, budget, 0.0)] == [10, 11]   # cold: both
    p.learn, p.fitted = False, True
    p.density[:] = 0.1
    p.density[0, 0, :] = 1.0            # a new study not read yet
    for s in range(1, 5):
        stack.inserted(s, 10, 0.0, 0.0, s)
        stack.accessed(s, 700.0)
    list(stack.victims(20, 800.0, lambda: (None, [])))     # two victims set the boundary at their rank
    assert p.boundary > 0
    assert [k for k, _, _, _ in stack.prior_plan(0, ranked, budget, 900.0)] == [10]
    # adaptive admits into free space, and asks its learned shadow's boundary when the cache is full
    a = Adaptive()
    a.capacity, a.used = 1000, 500
    assert a.admit(0, 0.0, 1, 100, 0.0)
    a.used = 950
    shadow = a.shadows[1].policy
    assert isinstance(shadow, HitDensity)
    shadow.fitted, shadow.boundary = True, 1e9
    assert not a.admit(0, 0.5, 1, 100, 0.0)


def test_a_prior_is_admitted_only_well_above_the_eviction_boundary() -> None:
    """A prior's rank is taken beside a new study just written and has to last until its session: one that ranks
    just above the boundary (between it and `ADMIT_MARGIN` times it) is not fetched into a full cache; one above the
    margin is."""
    from agent.policy import learned
    p = HitDensity()
    p.fitted = True
    p.density[:] = 1.0
    rank = 0.5 * 1.0 * p.byte_weight    # heat × the new study's worth × the bytes term (nothing cached: the weight)
    p.boundary = rank / (1 + learned.ADMIT_MARGIN) * 2      # the rank is between 1x and the margin above it
    assert rank > p.boundary
    assert not p.admit(0, 0.5, 1, 100, 0.0)
    p.boundary = rank / learned.ADMIT_MARGIN
    assert p.admit(0, 0.5, 1, 100, 0.0)
