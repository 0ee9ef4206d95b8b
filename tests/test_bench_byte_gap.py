"""bench/byte_gap.py tells which part of the adaptive stack evicted each file a read misses."""

from __future__ import annotations

import numpy as np

from bench.byte_gap import hits_and_evictions
from bench.miss_analysis import hits_of
from tests.test_policy_fresh import FILES, report_trace


def test_every_miss_of_a_file_cached_before_has_its_eviction_named() -> None:
    ta, kind = report_trace(hours=24 * 4)
    cap = 10 * FILES * 1000
    hit, by, names = hits_and_evictions(ta, "adaptive", cap)
    assert np.array_equal(hit, hits_of(ta, "adaptive", cap, warmup_days=0))     # instrumentation only
    seen = np.zeros(ta.n, dtype=bool)       # the object was requested (so cached) before this request
    order = np.lexsort((np.arange(ta.n), ta.obj))
    seen[order[1:][ta.obj[order[1:]] == ta.obj[order[:-1]]]] = True
    missed_again = ~hit & seen & ~ta.is_write
    assert missed_again.any() and (by[missed_again] >= 0).all()
    # archive studies read on a miss go through the doorkeeper's probation; new studies leave by the experts
    named = {names[i] for i in by[missed_again].tolist()}
    assert "door" in named and named & {"learned", "study"}
