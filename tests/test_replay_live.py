"""The simulator tells the truth: a generated trace replayed through the live agent (FTP stores and reads in
trace order, object sizes scaled down together with the cache) gives the hit ratio `pacsgw simulate` gives
for the same trace, policy and capacity."""

from __future__ import annotations

import io

import pytest

from agent.sim.commands import main as sim
from agent.sim.replay import ReplayConfig, replay
from agent.sim.trace import iter_requests, load_arrays
from faultkit import ftp_login, metric, payload
from harness import BUCKET

SCALE = 1000          # live bytes = trace bytes / SCALE: the same cache decisions, a thousandth of the I/O
# Of the bytes the trace touches. This small trace (2 days, 2556 requests) has a steep hit-ratio cliff between
# 11 % and 14 % (one big study either fits or not); 20 % is past it, where the re-reads fit and first reads miss.
CAPACITY_SHARE = 0.2


@pytest.mark.slow
def test_live_hit_ratio_matches_the_simulator(agent_factory, seaweed, tmp_path):
    trace = tmp_path / "day.tsv"
    assert sim(["gen-trace", str(trace), "--days", "2", "--monthly-tb", "0.008", "--seed", "4",
                "--no-progress"]) == 0
    requests = list(iter_requests(trace))
    touched = {r.path: r.size for r in requests}
    capacity = int(CAPACITY_SHARE * sum(touched.values()))
    simulated = replay(load_arrays(trace, cache=False), "A", ReplayConfig(capacity=capacity, warmup_days=0))

    a = agent_factory(prefix="replay/", **{
        "cache.max_bytes": capacity // SCALE, "cache.high_watermark": 0.99, "cache.low_watermark": 0.97,
        "cache.eviction": "lru", "cache.evict_interval_seconds": 0.1, "pressure.disk_critical": 1.0,
        "prefetch.enabled": False, "prefetch.priors": False, "scrub.enabled": False})
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
    ftp = ftp_login(a)
    for r in requests:
        if r.op == "W":
            ftp.storbinary(f"STOR {r.path}", io.BytesIO(payload(r.path, max(1, r.size // SCALE))))
        else:
            ftp.retrbinary(f"RETR {r.path}", io.BytesIO().write)
    ftp.quit()
    hits, misses = metric(a, "pacsgw_cache_hits_total"), metric(a, "pacsgw_cache_misses_total")
    assert hits + misses == simulated.reads == sum(r.op == "R" for r in requests)
    live = hits / (hits + misses)
    print(f"\nreads {simulated.reads}: hit ratio simulated {simulated.hit_ratio:.3f}, live agent {live:.3f}")
    assert 0.05 < simulated.hit_ratio < 0.95            # neither everything nor nothing fits
    assert abs(live - simulated.hit_ratio) <= 0.03
    assert metric(a, "pacsgw_evictions_total") > 0      # the cache really was full and evicting
