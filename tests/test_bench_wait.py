"""bench/wait_features.py (docs/replay.md, round 24): the wait a box could learn uses only first reads seen before the
plan; the true wait is the trace's."""

from __future__ import annotations

import numpy as np
import pytest

from bench.wait_features import MIN_SEEN, Waits, auc
from tests.sim_helpers import arrays

H = 3600.0


def test_a_learnt_wait_sees_only_first_reads_before_the_plan() -> None:
    n = 10          # study i written at i s, first read (i + 1) h later; the last one never read
    t = [float(i) for i in range(n)] + [i + (i + 1) * H for i in range(n - 1)]
    ta = arrays(list(range(n)) + list(range(n - 1)), [True] * n + [False] * (n - 1), t=t)
    waits = [(i + 1) * H for i in range(n)]
    for how in ("dept", "dept-block"):
        w = Waits(ta, how)
        assert w.wait(9, 5.5 * H) == 0.0                         # 5 first reads seen (< MIN_SEEN): no prediction
        now = (MIN_SEEN + 0.5) * H                               # the first MIN_SEEN seen, not the later ones
        assert w.wait(9, now) == pytest.approx(np.median(waits[:MIN_SEEN]) - (now - 9))
    true = Waits(ta, "true")
    assert true.wait(3, 2 * H) == pytest.approx(3 + 4 * H - 2 * H)
    assert true.wait(9, 2 * H) == np.inf


def test_auc_counts_ties_half() -> None:
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([True, False, False])) == 1.0
    assert auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert auc(np.array([1.0, 2.0, 3.0, 4.0]), np.array([True, False, True, False])) == 0.25
