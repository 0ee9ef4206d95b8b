"""A directory only ever read (an old day directory whose studies come back as priors, or are read on a miss) is
split into read bursts too once it has been read into for hours: kept whole, a busy old day is one group that every
case's reads keep young until it goes whole (agent/policy/groups.py; docs/replay.md "round 18 — layouts")."""

from __future__ import annotations

import numpy as np
import pytest

from agent.policy.groups import GAP_S, MIXED_S, Groups
from bench.miss_analysis import hits_of
from tests.sim_helpers import arrays

CASES, FILES, EVERY_S, AGAIN_S = 24, 5, 1800.0, 300.0


def old_day_directory_trace():
    """One day directory of the archive (written a month before the trace): a 5-file case of it is read every
    30 minutes for 12 hours and read again 5 minutes later. The cache holds 6 cases."""
    obj, t, again = [], [], []
    for c in range(CASES):
        files = list(range(c * FILES, (c + 1) * FILES))
        obj += files + files
        t += [c * EVERY_S + i for i in range(FILES)] + [c * EVERY_S + AGAIN_S + i for i in range(FILES)]
        again += [False] * FILES + [True] * FILES
    order = np.argsort(np.array(t), kind="stable")
    return (arrays(np.array(obj)[order], np.zeros(len(obj), dtype=bool), t=np.array(t)[order],
                   obj_study=np.zeros(CASES * FILES, dtype=np.int32), study_day=[-30]), np.array(again)[order])


@pytest.mark.parametrize("scheme", ["agent", "adaptive", "learned", "study"])
def test_an_old_day_directory_is_not_evicted_whole(scheme) -> None:
    ta, again = old_day_directory_trace()
    hit = hits_of(ta, scheme, 6 * FILES * 1000, warmup_days=0)
    assert hit[again].all()      # LRU's result: each case is read again while it is among the 6 last read


def test_a_prior_read_in_one_session_keeps_its_name() -> None:
    g = Groups()
    assert [g.of("CT/2025-12-01/ST1", t, False) for t in (0.0, 60.0, MIXED_S)] == ["CT/2025-12-01/ST1"] * 3


def test_a_directory_read_into_for_hours_splits_by_burst() -> None:
    g = Groups()
    assert g.of("2025/12/01", 0.0, False) == "2025/12/01"
    late = MIXED_S + 1
    first = g.of("2025/12/01", late, False)
    assert g.of("2025/12/01", late + 1, False) == first
    second = g.of("2025/12/01", late + GAP_S + 10, False)
    assert second != first and Groups.directory(second) == "2025/12/01"
