"""The doorkeeper: a study read on a miss goes first until its second session, so one-off reads (the archive tail,
a prior opened once, a follow-up of an evicted study) do not flush the cache; on only where such studies do not
come back (agent/policy/adaptive.py `_Doorkeeper`)."""

from __future__ import annotations

from agent.policy.adaptive import WARM, Adaptive
from agent.sim.workload import DAY

T = 10 * DAY


def through_the_door(p: Adaptive, n: int, back: bool, t0: float) -> float:
    """n old studies read on a miss (and again an hour later if `back`), evicted between; → the time after."""
    for i in range(n):
        t = t0 + i * 7200
        p.on_insert(("x", t), 1, t, 0.0, ("x", t))
        if back:
            p.on_insert(("x", t), 1, t + 3600, 0.0, ("x", t))
        p.on_remove(("x", t))
    return t0 + n * 7200


def test_a_one_off_read_goes_first_and_its_second_session_is_cached_as_usual() -> None:
    p = Adaptive()
    assert p.status()["doorkeeper"] == "cold start: on"
    t = through_the_door(p, WARM, False, T)
    assert p.status()["doorkeeper"] == "on"
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("o1", 100, t + 60, 0.0, "old")           # an old study read on a miss: on probation
    p.on_insert("o2", 100, t + 61, 0.0, "old")
    p.on_access("n1", t + 120)                           # the new study is read after it
    # the old study's files go first though read more recently, one at a time while it is read
    assert list(p.victims(100, t + 130)) == ["o1"]
    assert list(p.victims(100, t + 131)) == ["o2"]
    p.on_insert("o1", 100, t + DAY, 0.0, "old")          # its second session: known, cached like any study
    # a study acquired within the day and read on a miss (live: written, and read before the evictor's pass)
    p.on_insert("f1", 100, t + DAY, t + DAY - 3600, "fresh")
    assert not p.door.probation and list(p.victims(100, t + DAY + 1)) == ["n1"]    # study LRU (cold start)
    assert set(p.victims(200, t + DAY + 2)) == {"o1", "f1"}


def test_the_doorkeeper_stays_off_where_studies_read_on_a_miss_come_back() -> None:
    p = Adaptive()
    t = through_the_door(p, 2 * WARM, True, T)
    assert p.status()["doorkeeper"] == "off (studies come back)"
    p.on_insert("n1", 100, t, t, "new", written=True)
    p.on_insert("o1", 100, t + 60, 0.0, "old")
    assert not p.door.probation and list(p.victims(100, t + 130)) == ["n1"]


def test_a_once_read_new_study_makes_room_first_where_the_cache_turns_over_sooner_than_studies_come_back() -> None:
    """The second door (round 14): a cache that turns over in hours cannot keep a study read once until it comes back
    days later; its space goes first, before a study read in two sessions that study LRU would take (read longer
    ago). Where the cache holds the returns, it stays shut and study LRU decides."""
    for capacity, victim in ((300, "b1"), (10**9, "a1")):
        p = Adaptive()
        p.on_insert("a1", 100, T, T, "A", written=True)
        p.on_insert("b1", 100, T, T, "B", written=True)
        p.on_access("a1", T + 600)                      # A: read, and read again in a second session
        p.on_access("a1", T + 3600)
        p.on_access("b1", T + 7200)                     # B: read once, last
        p.on_insert("c1", 100, T + 8000, T + 8000, "C", written=True)
        list(p.victims(0, T + 8001))                    # the capacity is learnt from the passes
        p.capacity = capacity
        p.on_insert("d1", 100, T + 9000, T + 9000, "D", written=True)
        assert next(iter(p.victims(100, T + 9001))) == victim
        assert p.status()["second_door"] is (victim == "b1")


def test_a_written_study_that_came_back_has_a_door_of_its_own_walked_after_the_first() -> None:
    """Round 32: a study written here and read in two sessions (the second door's book) is a re-read study, not a
    one-off; evicted and read on a miss days later it goes through a door of its own (its own count of returns; on in
    its cold start), whose probation goes after the first door's, where one read in a single session is (outpatient's
    follow-ups: the first door's probation evicted most of its lost re-read bytes at 10 %, round 28)."""
    p = Adaptive()
    t = through_the_door(p, WARM, False, T)
    assert p.status()["doorkeeper"] == "on"
    p.on_insert("a1", 100, t, t, "A", written=True)
    p.on_insert("b1", 100, t, t, "B", written=True)
    p.on_access("a1", t + 600)
    p.on_access("b1", t + 600)
    p.on_access("a1", t + 3 * 3600)                      # A comes back for a second session, B does not
    p.on_remove("a1")
    p.on_remove("b1")
    t2 = t + 5 * DAY
    p.on_insert("n1", 100, t2, t2, "new", written=True)
    p.on_insert("a1", 100, t2 + 60, t, "A")              # both read on a miss again, A first
    p.on_insert("b1", 100, t2 + 61, t, "B")
    p.on_access("n1", t2 + 120)
    assert "A" not in p.door.probation and "B" in p.door.probation
    assert p.door_known is not None and "A" in p.door_known.probation
    assert p.status()["known_doorkeeper"] == "cold start: on"
    assert list(p.victims(100, t2 + 130)) == ["b1"]
    assert list(p.victims(100, t2 + 131)) == ["a1"]


def test_a_study_read_again_after_the_door_forgot_it_keeps_its_files_on_probation() -> None:
    """A study on probation that `seen` forgot (its book is bounded) and that is read on a miss again joins probation
    anew; its files still cached stay on it (they went first before, and the study is no better known now), and no
    file is lost from every part's view: each cached file is evicted by someone."""
    p = Adaptive()
    assert p.door is not None and p.door.on               # cold start: on
    p.door.max_seen = 2
    p.on_insert("n1", 100, T, T, "new", written=True)
    p.on_insert("o1", 100, T + 60, 0.0, "old")           # on probation
    p.on_insert("o2", 100, T + 61, 0.0, "old")
    p.on_insert("x1", 100, T + 120, 0.0, "X")
    p.on_access("x1", T + 900)                           # X's second session: off probation, still in `seen`
    p.on_insert("y1", 100, T + 960, 0.0, "Y")            # `seen` forgets "old"
    assert "old" not in p.door.seen and "old" in p.door.probation
    p.on_insert("o3", 100, T + 1000, 0.0, "old")         # read on a miss again
    assert p.door.probation["old"] == {"o1": 100, "o2": 100, "o3": 100}
    assert list(p.victims(300, T + 1010)) == ["o1", "o2", "o3"]
    assert set(p.victims(10**6, T + 1020)) == {"n1", "x1", "y1"}
    assert not p._meta
