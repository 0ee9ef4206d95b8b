"""A directory that is not a study (day directories, one flat directory, a patient's directory) is evicted in
insert bursts, not whole (agent/policy/groups.py; issue 13, docs/replay.md "Other path layouts")."""

from __future__ import annotations

import numpy as np
import pytest

from agent.policy import groups
from agent.policy.eviction import DAY
from agent.policy.groups import GAP_S, MIXED_S, Groups
from agent.policy.stack import CatalogRow, PolicyStack, StackSpec
from bench.miss_analysis import hits_of
from tests.sim_helpers import arrays

CASES, FILES, EVERY_S, READ_AFTER_S = 24, 5, 1800.0, 300.0


def day_directory_trace(written: bool = True):
    """One day directory (one 'study' to the importer) receives a 5-file case every 30 minutes for 12 hours;
    each case is read 5 minutes later. `written`: a day of the trace, each case written first; else a day of the
    archive (a month old), each case read on a miss first. The cache holds 6 cases. → the trace, the later reads."""
    obj, t, w, later = [], [], [], []
    for c in range(CASES):
        files = list(range(c * FILES, (c + 1) * FILES))
        obj += files + files
        t += [c * EVERY_S + i for i in range(FILES)] + [c * EVERY_S + READ_AFTER_S + i for i in range(FILES)]
        w += [written] * FILES + [False] * FILES
        later += [False] * FILES + [True] * FILES
    order = np.argsort(np.array(t), kind="stable")
    return (arrays(np.array(obj)[order], np.array(w)[order], t=np.array(t)[order],
                   obj_study=np.zeros(CASES * FILES, dtype=np.int32), study_day=[0 if written else -30]),
            np.array(later)[order])


@pytest.mark.parametrize("written", [True, False], ids=["written", "only-read"])
@pytest.mark.parametrize("scheme", ["agent", "adaptive", "learned", "study"])
def test_a_day_directory_is_not_evicted_whole(scheme, written) -> None:
    """A directory only ever read is split by read bursts too, once read into on misses for hours: kept whole, a
    busy old day was one group that every case read from it kept young until it went at once."""
    ta, later = day_directory_trace(written)
    hit = hits_of(ta, scheme, 6 * FILES * 1000, warmup_days=0)
    assert hit[later].all()      # LRU's result: each case is read again while it is among the 6 newest


def test_a_study_written_in_one_burst_keeps_its_name() -> None:
    g = Groups()
    assert [g.of("CT/2026-01-05/ST1", t, True) for t in (0.0, 1.0, 600.0)] == ["CT/2026-01-05/ST1"] * 3
    assert g.of("CT/2026-01-05/ST1", 30 * 86400.0, False) == "CT/2026-01-05/ST1"   # read on a miss a month later


def test_a_prior_read_in_one_session_or_prefetched_keeps_its_name() -> None:
    g = Groups()
    assert [g.of("CT/2025-12-01/ST1", t, False) for t in (0.0, 60.0, MIXED_S)] == ["CT/2025-12-01/ST1"] * 3
    assert g.of("CT/2025-12-01/ST1", 30 * 86400.0, False, prefetch=True) == "CT/2025-12-01/ST1"


def test_a_directory_written_for_hours_splits_by_burst() -> None:
    g = Groups()
    assert g.of("2026/01/05", 0.0, True) == "2026/01/05"
    late = MIXED_S + 1
    first = g.of("2026/01/05", late, True)
    assert g.of("2026/01/05", late + 1, True) == first                  # the same burst
    second = g.of("2026/01/05", late + GAP_S + 10, False)                # a read on a miss after a pause
    assert second != first and Groups.directory(second) == Groups.directory(first) == "2026/01/05"


def test_a_directory_read_into_for_hours_splits_by_burst() -> None:
    g = Groups()
    assert g.of("2025/12/01", 0.0, False) == "2025/12/01"
    first = g.of("2025/12/01", MIXED_S + 1, False)
    second = g.of("2025/12/01", MIXED_S + GAP_S + 10, False)
    assert first != second and Groups.directory(second) == "2025/12/01"


def test_sync_groups_as_the_simulator_does() -> None:
    """The live agent's way in (`sync`) maps inserts through the same groups."""
    stack = PolicyStack(StackSpec("study"))
    rows = [CatalogRow(f"d/{i}.dcm", 1, i * 3600.0, 0, i * 3600.0, "d", i * 3600.0, "write") for i in range(4)]
    stack.sync(rows, 4 * 3600.0)
    assert list(stack.victims(1, 4 * 3600.0, lambda: (None, []))) == ["d/0.dcm", "d/1.dcm", "d/2.dcm"]


PATIENTS, EVERY_S, AGAIN_S = 24, 7200.0, 12 * 3600.0


def patient_directory_trace():
    """A patient directory (one 'study' to the importer) per patient, one every 2 hours: a new study written, read
    10 minutes later beside a prior of the same directory that the trace never writes (read once, on a miss), and
    the new study read again 12 hours later. → the trace, the second reads of the new studies."""
    obj, t, w, again = [], [], [], []
    for p in range(PATIENTS):
        new, prior = range(2 * p * FILES, (2 * p + 1) * FILES), range((2 * p + 1) * FILES, (2 * p + 2) * FILES)
        t0 = p * EVERY_S
        obj += [*new, *new, *prior, *new]
        t += [t0 + at + i for at in (0.0, 600.0, 700.0, AGAIN_S) for i in range(FILES)]
        w += [True] * FILES + [False] * 3 * FILES
        again += [False] * 3 * FILES + [True] * FILES
    order = np.argsort(np.array(t), kind="stable")
    return (arrays(np.array(obj)[order], np.array(w)[order], t=np.array(t)[order], days=3,
                   obj_study=np.arange(2 * PATIENTS * FILES) // (2 * FILES), study_day=[0] * PATIENTS),
            np.array(again)[order])


def test_a_prior_in_a_new_studys_directory_is_old() -> None:
    """A file the trace never writes existed before it (the live catalog's mtime): read on a miss in the directory a
    new study was just written into, it is an old one-off read that the doorkeeper puts on probation, and the new
    studies are kept for their second read. Dated by its directory's new study, it looked new: the default kept
    the patients whole and hit 9 of the 120 second reads, LRU 26."""
    ta, again = patient_directory_trace()
    capacity = 13 * FILES * 1000
    kept, lru = (hits_of(ta, scheme, capacity, warmup_days=0)[again].sum() for scheme in ("agent", "A"))
    assert kept > lru


def test_a_file_read_again_rejoins_the_group_it_was_first_read_into() -> None:
    """In a directory only read, the split tells read bursts apart, and a file read again on a miss goes back to the
    burst it was first read into: one case read in two sessions is one group, two cases are two."""
    g = Groups()
    first = g.of("2025/12/01", 0.0, False, key="a")
    assert g.of("2025/12/01", MIXED_S + 1, False, key="b") != first               # another case, hours later
    assert g.of("2025/12/01", MIXED_S + GAP_S + 10, False, key="a") == first      # the first case again
    assert g.of("2026/01/05", 0.0, True, key="c") == g.of("2026/01/05", 1.0, False, key="c")   # written: as before


def test_a_file_written_into_a_mixed_directory_and_read_again_rejoins_its_burst() -> None:
    """A directory written on several days (a patient's, `<patient>/<accession>` without a study column) is split by
    write bursts; a file of it evicted and read on a miss days later goes back to the burst it was written in, so the
    learned expert finds its ghost (it came back) and the doorkeeper sees a study return, not a new one-off. It
    started a new burst: docs/replay.md round 36, the Zipf tail without labels, byte hit ratio below LRU's."""
    g = Groups()
    g.of("P1", 0.0, True, key="a")                                  # the directory's first study
    written = g.of("P1", DAY, True, key="b")                         # a day later: mixed, a burst of its own
    assert written != "P1"
    assert g.of("P1", 5 * DAY, False, key="b") == written           # read again on a miss: its burst
    assert g.of("P1", 5 * DAY + 1, False, key="x") != written       # a file not seen here: a new burst, as before


def test_a_directory_written_hours_after_it_was_first_read_into_is_mixed() -> None:
    """A patient's directory read into on a miss (an archive study) and written days later (a new study) is two
    groups: the write's group was the read's, so a remembered (evicted) read group took the write for its return, and
    the new study got the old one-off's class and went before its first read (docs/replay.md, round 36)."""
    g = Groups()
    read = g.of("P1", 0.0, False, key="a")
    assert g.of("P1", 60.0, True, key="n") == read                  # written within the burst: one group, as before
    g = Groups()
    read = g.of("P1", 0.0, False, key="a")
    assert g.of("P1", DAY, True, key="b") != read


def test_past_its_bound_the_least_recently_read_file_is_forgotten(monkeypatch) -> None:
    """Files are remembered up to `MAX_FILES`; a forgotten one read again starts a burst as before the rule."""
    monkeypatch.setattr(groups, "MAX_FILES", 1)
    g = Groups()
    first = g.of("2025/12/01", 0.0, False, key="a")
    g.of("2025/12/01", MIXED_S + 1, False, key="b")                           # "a" forgotten
    assert g.of("2025/12/01", MIXED_S + GAP_S + 10, False, key="a") != first


RETURNING, ONE_OFFS, SESSION_S, TAIL_S = 3, 150, 3 * 3600.0, 900.0


def returning_case_trace():
    """An oncology centre's archive (nothing here written by the trace): every 15 minutes a one-off prior is read
    (a study the trace never writes, read once on a miss), and 3 cases are read in full every 3 hours, each
    session longer after the first than the read-only split's 2 h (a prior of several new studies, a board's
    case). → the trace, the reads of the cases after their second session."""
    obj, t, again = [], [], []
    for s in range(ONE_OFFS):
        obj += [RETURNING * FILES + s * FILES + i for i in range(FILES)]
        t += [s * TAIL_S + i for i in range(FILES)]
        again += [False] * FILES
    for session in range(int(ONE_OFFS * TAIL_S // SESSION_S)):
        for c in range(RETURNING):
            obj += [c * FILES + i for i in range(FILES)]
            t += [session * SESSION_S + 60.0 * (c + 1) + i for i in range(FILES)]
            again += [session >= 2] * FILES
    order = np.argsort(np.array(t), kind="stable")
    n = (RETURNING + ONE_OFFS) * FILES
    return (arrays(np.array(obj)[order], np.zeros(len(obj), dtype=bool), t=np.array(t)[order], days=2,
                   obj_study=np.arange(n) // FILES, study_day=[-30] * (RETURNING + ONE_OFFS)),
            np.array(again)[order])


@pytest.mark.parametrize("scheme", ["agent", "adaptive"])
def test_a_case_read_session_after_session_is_kept_as_one_group(scheme) -> None:
    """A case read every 3 hours came back as a new read burst each session, which the doorkeeper put on probation
    as a new one-off read, and it went before the one-offs read since. One group again, its second session takes it
    off probation: with room for the 3 cases and 3 one-offs the cases are hit from their third session on."""
    ta, again = returning_case_trace()
    hit = hits_of(ta, scheme, 6 * FILES * 1000, warmup_days=0)
    assert hit[again].all()
