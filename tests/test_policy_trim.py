"""The last victim study of a pass gives up only the files the pass needs, its last ones first
(agent/policy/eviction.py `trim`, adaptive.TRIM), instead of leaving whole."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import adaptive
from agent.policy.eviction import StudyLRU
from agent.policy.learned import HitDensity
from agent.policy.stack import CatalogRow, PolicyStack, StackSpec
from bench.miss_analysis import hits_of
from tests.sim_helpers import arrays

BIG, SMALL, N_SMALL = 60, 3, 20


def big_study_trace():
    """A 60-file study is written, then every 10 minutes a 3-file study is written and read 2 minutes later;
    the big study is read after the twentieth. The cache holds 100 files: from the fourteenth small study on,
    each one pushes the big study (the least recently used) out — whole, or 3 of its files at a time."""
    obj, t, w = list(range(BIG)), [float(i) for i in range(BIG)], [True] * BIG
    study = [0] * BIG
    for k in range(1, N_SMALL + 1):
        files = list(range(BIG + (k - 1) * SMALL, BIG + k * SMALL))
        study += [k] * SMALL
        obj += files + files
        t += [k * 600.0 + i for i in range(SMALL)] + [k * 600.0 + 120 + i for i in range(SMALL)]
        w += [True] * SMALL + [False] * SMALL
    obj += list(range(BIG))
    t += [(N_SMALL + 1) * 600.0 + i for i in range(BIG)]
    w += [False] * BIG
    order = np.argsort(np.array(t), kind="stable")
    ta = arrays(np.array(obj)[order], np.array(w)[order], t=np.array(t)[order], obj_study=study)
    return ta, np.array(obj)[order] < BIG


@pytest.mark.parametrize("trim", [True, False])
def test_a_big_study_keeps_the_files_read_soonest_where_whole_study_eviction_drops_it(monkeypatch, trim) -> None:
    monkeypatch.setattr(adaptive, "TRIM", trim)
    monkeypatch.setattr(adaptive, "SECOND_DOOR", False)     # the cut alone (the second door frees read studies first)
    ta, big = big_study_trace()
    hit = hits_of(ta, "adaptive", 100 * 1000, warmup_days=0)
    read = hit[big & ~ta.is_write]
    if trim:    # 20 files went (2, then 3 per small study), the last ones: the first 40 are read from the cache
        assert read[:40].all() and not read[40:].any()
    else:       # evicted whole at the first overflow
        assert not read.any()
    assert hit[~big & ~ta.is_write].all()       # the small studies are read while cached, either way


@pytest.mark.parametrize("expert", [StudyLRU, HitDensity])
def test_each_expert_trims_a_big_study_from_its_end(expert) -> None:
    p = expert()
    p.cut = 0
    for i in range(10):
        p.on_insert(("big", i), 1, 0.0, 0.0, "big")
    p.on_insert("small", 1, 1.0, 0.0, "small")
    assert list(p.victims(3, 2.0)) == [("big", 9), ("big", 8), ("big", 7)]     # the files read last
    assert list(p.victims(1, 2.0)) == [("big", 6)]                             # still the victim, still trimmed
    p.on_access(("big", 0), 700.0)                                              # read: no longer the victim
    assert list(p.victims(1, 800.0)) == ["small"]
    p.cut = None
    assert list(p.victims(1, 900.0)) == [("big", i) for i in range(6)]         # whole: the rest of it


def no_table() -> tuple:
    raise AssertionError("an online policy answers from its index")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4_000), st.booleans()), min_size=1, max_size=80),
       st.lists(st.integers(1, 20_000), min_size=1, max_size=10), st.booleans(), st.sampled_from([0.0, 0.02, 0.5]))
def test_trimmed_passes_free_just_enough_and_only_clean_cached_files(
        files: list[tuple[int, int, bool]], needs: list[int], trim: bool, min_cut: float) -> None:
    """The live way in (`sync` of the catalog's clean rows): a file not yet in S3 (`dirty`) is never offered, so
    never a victim; a pass frees what it asks for (or everything), and one that trims stops at the first file that
    makes it enough (what the pass asks for, or the least a cut frees: `MIN_CUT` of the cache)."""
    old = adaptive.TRIM, adaptive.MIN_CUT
    adaptive.TRIM, adaptive.MIN_CUT = trim, min_cut
    try:
        stack = PolicyStack(StackSpec("adaptive"))
        rows = {f"s{s}/{i}": CatalogRow(f"s{s}/{i}", size, 100.0 + i, 0, 0.0, f"s{s}")
                for i, (s, size, dirty) in enumerate(files) if not dirty}
        dirty = {f"s{s}/{i}" for i, (s, _, d) in enumerate(files) if d}
        stack.sync(rows.values(), 200.0)
        capacity = 0
        for k, need in enumerate(needs):
            now = 300.0 + k
            capacity = max(capacity, sum(r.size for r in rows.values()) - need)     # as the policy learns it
            out = list(stack.victims(need, now, no_table))
            assert len(set(out)) == len(out) and set(out) <= set(rows) and not set(out) & dirty
            freed = sum(rows[key].size for key in out)
            assert freed >= need or not set(rows) - set(out)
            last = out[-1] if out else None
            if last is not None and any(r.study == rows[last].study for key, r in rows.items() if key not in out):
                # a study left part cached: its cut (the run of its files that ends the pass) took not a file more
                # than what the pass still needed after the whole studies before it, or the least a cut frees
                cut_bytes = 0
                for key in reversed(out):
                    if rows[key].study != rows[last].study:
                        break
                    cut_bytes += rows[key].size
                assert cut_bytes - rows[last].size < max(need - (freed - cut_bytes), int(min_cut * capacity))
            for key in out:
                del rows[key]
            stack.sync(rows.values(), now)
    finally:
        adaptive.TRIM, adaptive.MIN_CUT = old
