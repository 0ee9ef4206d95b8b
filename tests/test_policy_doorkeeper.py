"""The doorkeeper: a study read on a miss goes first until its second session, so one-off reads (the archive tail,
a prior opened once, a follow-up of an evicted study) do not flush the cache (agent/policy/adaptive.py)."""

from __future__ import annotations

from agent.policy.adaptive import Adaptive
from agent.sim.workload import DAY

T = 10 * DAY


def test_a_one_off_read_goes_first_and_its_second_session_is_cached_as_usual() -> None:
    p = Adaptive()
    p.on_insert("n1", 100, T, T, "new", written=True)
    p.on_insert("o1", 100, T + 60, 0.0, "old")           # an old study read on a miss: on probation
    p.on_insert("o2", 100, T + 61, 0.0, "old")
    p.on_access("n1", T + 120)                           # the new study is read after it
    # the old study's files go first though read more recently, one at a time while it is read
    assert list(p.victims(100, T + 130)) == ["o1"]
    assert list(p.victims(100, T + 131)) == ["o2"]
    p.on_insert("o1", 100, T + DAY, 0.0, "old")          # its second session: known, cached like any study
    # a study acquired within the day and read on a miss (live: written, and read before the evictor's pass)
    p.on_insert("f1", 100, T + DAY, T + DAY - 3600, "fresh")
    assert not p.door.probation and list(p.victims(100, T + DAY + 1)) == ["n1"]    # study LRU (cold start)
    assert set(p.victims(200, T + DAY + 2)) == {"o1", "f1"}
