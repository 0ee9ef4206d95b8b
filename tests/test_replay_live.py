"""The simulator tells the truth about the stack the box runs: a generated trace replayed through the live
agent with its default policy stack (FTP stores and reads in trace order, object sizes scaled down together
with the cache) gives the hit ratio `pacsgw simulate` gives for the same requests, stack and capacity.

The live replay compresses two days into a minute or two, and the default eviction (`adaptive`: study LRU
or the learned hit density) is driven by time (sessions, ages): the simulator is given the times at which
the live agent saw each request, so both run the same policy on the same inputs. The prior-study planner
is not exercised here (the payloads are not DICOM, and the archive's studies are not in a new box's
catalog); tests/test_priors_live.py covers it."""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pytest

from agent.config import CacheConfig
from agent.sim.commands import main as sim
from agent.sim.replay import ReplayConfig, replay
from agent.sim.trace import iter_requests, load_arrays
from faultkit import ftp_login, metric, payload
from harness import BUCKET

SCALE = 1000          # live bytes = trace bytes / SCALE: the same cache decisions, a thousandth of the I/O
SHARES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)    # cache sizes considered, as shares of the bytes the trace touches
STEP = 0.02
TOLERANCE = 0.01      # the bar: within 1 point


def away_from_a_cliff(ta, touched: int) -> float:
    """The share where the simulated hit ratio changes least with ±STEP of capacity (a small trace has steep
    cliffs where one big study fits or not; parity there would hang on a few bytes of accounting), among
    those where neither everything nor nothing fits."""
    def ratio(share: float) -> float:
        return replay(ta, "adaptive", ReplayConfig(capacity=int(share * touched), warmup_days=0)).hit_ratio
    slopes = {}
    for s in SHARES:
        r = ratio(s)
        if 0.1 < r < 0.9:
            slopes[s] = abs(ratio(s + STEP) - ratio(s - STEP))
    return min(slopes, key=slopes.__getitem__)


@pytest.mark.slow
def test_live_default_stack_matches_the_simulator(agent_factory, seaweed, tmp_path):
    assert CacheConfig.__dataclass_fields__["eviction"].default == "adaptive"
    trace = tmp_path / "day.tsv"
    assert sim(["gen-trace", str(trace), "--days", "2", "--monthly-tb", "0.008", "--seed", "4",
                "--no-progress"]) == 0
    requests = list(iter_requests(trace))
    touched = {r.path: r.size for r in requests}
    ta = load_arrays(trace, cache=False)
    share = away_from_a_cliff(ta, sum(touched.values()))
    capacity = int(share * sum(touched.values()))

    # the agent's defaults, but for the cache's size, tight watermarks and a fast pass (like the
    # simulator's evict-on-overflow), and no prior planner (see the module docstring)
    a = agent_factory(prefix="replay/", **{
        "cache.max_bytes": capacity // SCALE, "cache.high_watermark": 0.99, "cache.low_watermark": 0.97,
        "cache.evict_interval_seconds": 0.1, "pressure.disk_critical": 1.0,
        "prefetch.priors": False, "scrub.enabled": False})
    # Files the trace reads before (or without) writing them are the archive: already in the bucket.
    written: set[str] = set()
    client = seaweed.client()
    for r in requests:
        if r.op == "W":
            written.add(r.path)
        elif r.path not in written:
            client.put_object(Bucket=BUCKET, Key=a.prefix + r.path, Body=payload(r.path, max(1, r.size // SCALE)))
            written.add(r.path)
    a.start()
    assert a.health()["eviction"]["stack"] == "adaptive"
    ftp = ftp_login(a)
    seen = []
    for r in requests:
        seen.append(time.time())
        if r.op == "W":
            ftp.storbinary(f"STOR {r.path}", io.BytesIO(payload(r.path, max(1, r.size // SCALE))))
        else:
            ftp.retrbinary(f"RETR {r.path}", io.BytesIO().write)
    ftp.quit()
    hits, misses = metric(a, "pacsgw_cache_hits_total"), metric(a, "pacsgw_cache_misses_total")
    live = hits / (hits + misses)

    # the same requests at the times the agent saw them; every study acquired at the start (as on the box,
    # where the archive was put just before and the rest is written during the replay)
    t = np.array(seen) - seen[0]
    same = dataclasses.replace(ta, t=t, study_day=np.zeros_like(ta.study_day))
    simulated = replay(same, "adaptive", ReplayConfig(capacity=capacity, warmup_days=0))
    on_trace_time = replay(ta, "adaptive", ReplayConfig(capacity=capacity, warmup_days=0))
    print(f"\nreads {simulated.reads}, cache {share:.0%} of the bytes touched: hit ratio simulated "
          f"{simulated.hit_ratio:.3f} (on the trace's own times {on_trace_time.hit_ratio:.3f}), live {live:.3f}")
    assert hits + misses == simulated.reads == sum(r.op == "R" for r in requests)
    assert 0.1 < simulated.hit_ratio < 0.9            # neither everything nor nothing fits
    assert abs(live - simulated.hit_ratio) <= TOLERANCE
    assert metric(a, "pacsgw_evictions_total") > 0      # the cache really was full and evicting
