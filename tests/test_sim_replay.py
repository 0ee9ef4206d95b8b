"""Replay: the simulator agrees with libCacheSim, Belady bounds every online policy, budgets hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sim.reference import ALGORITHMS, ReferenceResult, next_access, run_arrays, run_reference
from agent.sim.replay import ReplayConfig, Replayer, replay, spread_per_minute
from agent.sim.report import gaps, write_report
from agent.sim.trace import load_arrays, write_trace
from agent.sim.workload import DAY, generate, preset
from tests.sim_helpers import arrays, write_first

KIB = 1024


def demand_misses(ta, scheme: str, capacity: int) -> int:
    r = Replayer(ta, scheme, ReplayConfig(capacity=capacity, warmup_days=0)).run()
    return r.reads - r.hits


# (seed, requests, objects, cache slots, share of objects written) — S3FIFO needs >= 10 slots
traces = st.tuples(st.integers(0, 2**32 - 1), st.integers(20, 400), st.integers(12, 80), st.integers(10, 30),
                   st.floats(0.0, 1.0))


def random_trace(seed: int, n: int, n_obj: int, skew: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_obj + 1) ** skew
    obj = rng.choice(n_obj, size=n, p=p / p.sum())
    return obj, rng


@settings(max_examples=40, deadline=None)
@given(traces)
def test_belady_bounds_every_online_policy(params: tuple) -> None:
    seed, n, n_obj, slots, write_share = params
    obj, rng = random_trace(seed, n, n_obj, 0.8)
    obj = np.unique(obj, return_inverse=True)[1]          # dense ids
    w = write_first(obj, write_share, rng)
    ta = arrays(obj, w, size=np.full(obj.max() + 1, KIB))
    cap = slots * KIB
    ref = {r.algorithm: r for r in run_arrays(ta.obj, ta.size, ta.t, ta.is_write, cap)}
    belady = ref["Belady"].reads - ref["Belady"].hits
    for name in (a for a in ALGORITHMS if not a.startswith("Belady")):
        assert belady <= ref[name].reads - ref[name].hits, name
    for scheme in ("A", "B", "study", "kmeans", "learned", "adaptive"):
        assert belady <= demand_misses(ta, scheme, cap), scheme


@settings(max_examples=30, deadline=None)
@given(traces)
def test_our_lru_is_libcachesim_lru(params: tuple) -> None:
    seed, n, n_obj, slots, write_share = params
    obj, rng = random_trace(seed, n, n_obj, 1.0)
    obj = np.unique(obj, return_inverse=True)[1]
    w = write_first(obj, write_share, rng)
    ta = arrays(obj, w, size=np.full(obj.max() + 1, KIB))
    ref = run_arrays(ta.obj, ta.size, ta.t, ta.is_write, slots * KIB, algorithms=("LRU",))[0]
    assert ref.reads - ref.hits == demand_misses(ta, "A", slots * KIB)


def test_next_access_index() -> None:
    assert next_access(np.array([3, 1, 3, 3, 1, 2])).tolist() == [2, 4, 3, -1, -1, -1]


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "general.tsv"
    write_trace(generate(preset("general", seed=42, days=8, monthly_tb=0.15)), path)
    return load_arrays(path)


def test_prefetch_respects_its_bandwidth(small_trace) -> None:
    written = int(small_trace.size[small_trace.is_write].sum())
    cfg = ReplayConfig(capacity=written // 3, warmup_days=2, prefetch_bps=2e6)
    r = Replayer(small_trace, "ours", cfg)
    res = r.run()
    assert res.prefetch_bytes > 0
    t = np.array(r.pf_times)
    s = np.array(r.pf_sizes, dtype=np.float64)
    assert np.all(np.diff(t) >= -1e-6), "fetched one after another"
    # between any two arrivals no more than rate x elapsed time was delivered
    cum = np.cumsum(s)
    for i in range(0, t.size, max(1, t.size // 200)):
        j = np.arange(i + 1, t.size)
        assert np.all(cum[j] - cum[i] <= cfg.prefetch_bps * (t[j] - t[i]) + 1.0)


def test_schemes_on_a_generated_trace(small_trace, tmp_path) -> None:
    written = int(small_trace.size[small_trace.is_write].sum())
    cfg = ReplayConfig(capacity=written // 3, warmup_days=2)
    res = {s: replay(small_trace, s, cfg) for s in ("A", "B", "ours")}
    for r in res.values():
        assert 0 < r.hits <= r.reads and 0 < r.hit_bytes <= r.read_bytes
        assert r.p95_latency_s >= r.mean_latency_s * 0.5 > 0
    # prior-study prefetch turns the comparison reads of priors into hits: a large, not marginal, gain
    assert res["ours"].hit_ratio > res["A"].hit_ratio + 0.1
    assert res["ours"].mean_latency_s < res["A"].mean_latency_s
    refs = run_reference(small_trace, cfg.capacity, cfg.warmup_days)
    assert [r.algorithm for r in refs] == list(ALGORITHMS)
    lru = next(r for r in refs if r.algorithm == "LRU")
    assert lru.reads == res["A"].reads
    assert abs(lru.hit_ratio - res["A"].hit_ratio) < 0.01    # KiB rounding of sizes only
    text = write_report(small_trace, cfg, list(res.values()), refs, tmp_path)
    assert "libCacheSim Belady" in text and "ours" in text
    assert (tmp_path / "hit_ratio_per_day.png").stat().st_size > 1000
    assert (tmp_path / "egress.png").stat().st_size > 1000


def test_warmup_is_not_counted(small_trace) -> None:
    cap = int(small_trace.size.sum())     # everything fits: only compulsory misses remain
    r0 = replay(small_trace, "A", ReplayConfig(capacity=cap, warmup_days=0))
    r2 = replay(small_trace, "A", ReplayConfig(capacity=cap, warmup_days=2))
    reads = ~small_trace.is_write
    assert r0.reads == int(reads.sum())
    assert r2.reads == int((reads & (small_trace.t >= 2 * DAY)).sum())
    first = np.zeros(small_trace.n, dtype=bool)
    first[np.unique(small_trace.obj, return_index=True)[1]] = True
    assert r0.reads - r0.hits == int((reads & first).sum())


def test_prefetched_bytes_read_are_also_counted_for_the_fetches_after_the_warm_up(small_trace) -> None:
    """The hit ratios count no warm-up, and the prior planner's cold start falls in it: a planner that fetched at a 2 %
    read share in its first two days and nothing after showed 2 % (docs/replay.md, round 29). The replay counts the
    bytes fetched after the warm-up, and of them those read, apart: with no warm-up they are all of them."""
    written = int(small_trace.size[small_trace.is_write].sum())
    whole = Replayer(small_trace, "ours", ReplayConfig(capacity=written // 3, warmup_days=0))
    r0 = whole.run()
    assert r0.prefetch_bytes > 0 and r0.prefetch_used_bytes > 0
    assert (whole.pf_after, whole.pf_used_after) == (r0.prefetch_bytes, r0.prefetch_used_bytes)
    part = Replayer(small_trace, "ours", ReplayConfig(capacity=written // 3, warmup_days=3))
    r3 = part.run()
    assert (r3.prefetch_bytes, r3.prefetch_used_bytes) == (r0.prefetch_bytes, r0.prefetch_used_bytes)
    before = sum(s for t, s in zip(whole.pf_times, whole.pf_sizes, strict=True) if t < 3 * DAY)
    assert 0 < part.pf_after <= r0.prefetch_bytes - before     # a fetch queued in the warm-up may arrive after it
    assert 0 < part.pf_used_after < r3.prefetch_used_bytes


def test_line_queue_serialises_bursts() -> None:
    from agent.sim.replay import LatencyModel
    lm = LatencyModel(line_bps=10.0)
    t = np.array([0.0, 0.0, 0.0, 100.0, 100.5])
    s = np.array([10.0, 10.0, 10.0, 10.0, 10.0])
    assert lm.line_queue(t, s).tolist() == [1.0, 2.0, 3.0, 101.0, 102.0]


def test_prefetch_egress_is_spread_over_the_transfer() -> None:
    # 1200 bytes at 10 B/s end at t=150 s: on the line from 30 s to 150 s → 300, 600, 300 bytes
    out = spread_per_minute(np.array([150.0, 61.0]), np.array([1200.0, 10.0]), 10.0, 0.0, 4)
    assert out.tolist() == [300.0, 610.0, 300.0, 0.0]
    assert out.sum() == 1210.0


def test_egress_of_long_transfers_alone_is_spread() -> None:
    """No transfer after the warm-up within one minute (a cache that misses nothing then, a prior fetched over minutes):
    the series was bincount's int64 of nothing, and adding a long transfer's bytes (or the prefetch series) to it
    failed: `simulate` stopped after the trauma family's 10 GB replays (docs/replay.md, round 36)."""
    out = spread_per_minute(np.array([130.0]), np.array([100e6]), 1e6, 0.0, 3)
    assert out.dtype == np.float64 and out.sum() == pytest.approx(100e6)
    assert spread_per_minute(np.array([]), np.array([]), 1e6, 0.0, 3).dtype == np.float64


def test_egress_conserves_bytes_and_respects_the_rates(small_trace) -> None:
    written = int(small_trace.size[small_trace.is_write].sum())
    cfg = ReplayConfig(capacity=written // 3, warmup_days=0)
    r = Replayer(small_trace, "ours", cfg)
    res = r.run()
    demand = res.read_bytes - res.hit_bytes       # no warm-up: every read miss crossed the line
    assert res.prefetch_bytes > 0
    assert abs(res.egress_per_min.sum() - (demand + res.prefetch_bytes)) < 1e-6 * res.egress_per_min.sum()
    assert res.egress_per_min.max() <= (cfg.latency.line_bps + cfg.prefetch_bps) * 60 * (1 + 1e-9)


def test_transfers_queued_at_the_end_are_counted_after_it() -> None:
    from agent.sim.replay import LatencyModel
    # one 1.2 GB miss a minute before the end of a one-day trace: 120 s on a 10 MB/s line
    ta = arrays([0, 1], [False, False], t=[10.0, DAY - 60.0], size=[1000, 1_200_000_000])
    res = Replayer(ta, "A", ReplayConfig(capacity=10**10, warmup_days=0, latency=LatencyModel(line_bps=10e6))).run()
    assert res.egress_per_min.sum() == 1_200_000_000 + 1000
    assert res.egress_per_min.size > DAY / 60 + 1, "the series runs on past the trace's last minute"
    assert res.egress_peak_mbps == pytest.approx(80.0)


def test_a_day_without_reads_has_no_hit_ratio() -> None:
    # day 0: a write and its read; day 1: a write only (a weekend without an ED); day 2: a read
    ta = arrays([0, 0, 1, 1], [True, False, True, False], t=[10.0, 20.0, DAY + 10, 2 * DAY + 10], days=3)
    res = Replayer(ta, "A", ReplayConfig(capacity=10**6, warmup_days=0)).run()
    assert res.daily_hit_ratio == [1.0, None, 1.0]


def test_prefetch_fate_sorts_every_prefetched_byte(small_trace) -> None:
    """bench/prefetch_waste.py (docs/replay.md, round 13) accounts for each prior fetch once: its kinds add up to the
    replay's prefetched bytes."""
    from bench.prefetch_waste import fate
    written = int(small_trace.size[small_trace.is_write].sum())
    f = fate(small_trace, "agent", written // 10)
    assert f.fetches > 0 and sum(f.bytes.values()) == f.result.prefetch_bytes
    assert f.bytes["read"] > 0 and set(f.bytes) <= {"read", "never read", "evicted, never read"} | {
        k for k in f.bytes if k.startswith("evicted before its read (")}
    assert "prefetched" in str(f)


def test_gap_share_fates_account_for_every_prefetched_byte_without_changing_the_replay(small_trace) -> None:
    """bench/gap_share.py --fates (docs/replay.md, round 35) puts each prefetched byte under one fate: read, evicted
    unread by a part of the stack, or cached unread at the end; its hooks leave the replay's figures as they were."""
    from bench.gap_share import fates
    written = int(small_trace.size[small_trace.is_write].sum())
    cfg = ReplayConfig(capacity=written // 10)
    plain = Replayer(small_trace, "agent", cfg).run()
    rep = Replayer(small_trace, "agent", cfg)
    split = fates(rep)
    res = rep.run()
    assert (res.hits, res.hit_bytes, res.prefetch_bytes) == (plain.hits, plain.hit_bytes, plain.prefetch_bytes)
    by_fate, by_kind = split()
    assert sum(by_fate.values()) == res.prefetch_bytes > 0
    assert by_fate["read"] == res.prefetch_used_bytes > 0
    evicted = [k for k in by_fate if k.startswith("evicted unread by ")]
    assert evicted and all(k.split(" by ")[1].split(",")[0] in {
        "door", "known door", "second door", "learned", "study LRU", "unopened"} for k in evicted)
    heat = {k: v for k, v in by_kind.items() if k.startswith("heat ")}
    assert [sum(v[i] for v in heat.values()) for i in (0, 1)] == [res.prefetch_bytes, res.prefetch_used_bytes]


def test_a_prior_cut_before_its_session_is_settled_as_the_live_catalog_settles_it(small_trace) -> None:
    """A prefetched prior is unused once none of its files is cached and opened once one is read, as the live agent's
    catalog settles it (`settle_prior_fetches`): a prior whose last files a pass cut before its session, and whose
    first file its session then read, was opened. The replay settled it unused at its first evicted file, so the
    simulated planner learnt less of such priors than the live one (docs/replay.md, round 21)."""
    r = Replayer(small_trace, "agent", ReplayConfig(capacity=10**12))
    outcomes: list[tuple[int, bool]] = []
    r.stack.prior_outcome = lambda cell, used: outcomes.append((cell, used))     # type: ignore[method-assign]
    big = (s for s in range(len(small_trace.study_bytes)) if (small_trace.obj_study == s).sum() >= 3)
    opened, dropped = next(big), next(big)
    files = {s: np.flatnonzero(small_trace.obj_study == s).tolist() for s in (opened, dropped)}
    for cell, s in enumerate((opened, dropped)):
        r.pf_cell[s] = cell
        r._fetch_plan(files[s], 0.0)
    victims: list[int] = []
    r.stack.victims = lambda want, now, table: iter(victims)                     # type: ignore[method-assign]
    victims[:] = files[opened][1:] + files[dropped][:-1]        # a pass cuts both priors' last files
    r._evict(60.0)
    assert outcomes == []
    r._prefetch_feedback(files[opened][0], True)                # the session reads the first file left
    victims[:] = files[dropped][-1:]                            # the other prior's last file goes unread
    r._evict(120.0)
    assert outcomes == [(0, True), (1, False)]


def test_a_file_is_dated_no_earlier_than_the_day_it_was_written() -> None:
    """An imported trace without a study column takes a directory for a study (`<patient>/<accession>`) and dates it
    by its first write; a study written into the directory 10 days later is 10 days old to the policies only if its
    files are dated by that directory. The live evictor's `created` is the catalog's mtime, the file's own write: a
    file the trace writes is dated no earlier than its write's day (docs/replay.md, round 36: the learned expert took
    such studies for weeks-old ones and evicted them before their first read)."""
    ta = arrays(obj=[0, 1, 1], is_write=[True, True, False], t=[3600.0, 10 * DAY + 3600, 10 * DAY + 7200],
                obj_study=[0, 0], study_day=[0], days=11)
    created = Replayer(ta, "agent", ReplayConfig(capacity=10**9)).created
    assert created[0] == 0 and created[1] == 10 * DAY


def test_a_gap_of_kib_rounding_is_no_gap() -> None:
    """Where LRU is already optimal (every miss compulsory), libCacheSim's Belady, which counts whole KiB, differs from
    our LRU only in the 6th digit of the byte hit ratio: that is no gap to close ("–"), not 1,878,769 % of one."""
    ta = arrays(obj=[0, 1, 0, 1], is_write=[True, False, False, False], size=[10**8 + 1, 3 * 10**8 + 7], days=1)
    results = [Replayer(ta, s, ReplayConfig(capacity=10**12, warmup_days=0)).run() for s in ("A", "agent")]
    # libCacheSim's Belady: the same hits, sizes in KiB rounded up
    belady = ReferenceResult("Belady", reads=3, hits=2, read_kib=2 * 292_969 + 97_657, hit_kib=292_969 + 97_657)
    assert results[0].byte_hit_ratio != belady.byte_hit_ratio
    assert gaps(results, [belady]) == {"A": (None, None), "agent": (None, None)}
