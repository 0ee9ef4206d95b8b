"""bench/session_gap.py: when a new study's priors are read against its first read, and what a fetch started then
could have landed in time."""

from __future__ import annotations

import numpy as np

from bench.session_gap import session_reads
from tests.sim_helpers import arrays

RATE = 1000.0       # bytes/s: a 1 000-byte file lands a second after its fetch starts


def test_a_prior_opened_before_its_new_study_cannot_be_fetched_in_time_and_one_opened_later_can() -> None:
    # patient 0: prior (study 0, files 0-1) opened 10 s before its new study (study 1, file 2), as gen-trace's viewer
    # hangs them; patient 1: the new study (study 3, file 5) opened first, its prior (study 2, files 3-4) an hour later
    obj = [2, 5, 0, 1, 2, 5, 3, 4]
    t = [0, 1, 990, 991, 1000, 2000, 5600, 5601]
    ta = arrays(obj, [True, True, False, False, False, False, False, False], t=t,
                obj_study=[0, 0, 1, 2, 2, 3], study_day=[-100, 0, -100, 0], study_patient=[0, 0, 1, 1])
    sr = session_reads(ta, 0.0, RATE)
    assert np.array_equal(np.sort(sr.gaps), [-10.0, 3600.0])
    assert sr.read == 4000 and sr.before == 2000 and sr.late == 2000
    assert sr.at_read == 2000      # only the prior read an hour later: both its files landed 2 s after the read
    assert sr.at_first == 2000     # patient 0's session starts at its prior's read: still no file there in time
