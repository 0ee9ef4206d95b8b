"""bench/replay.py's `bars` column: which of issue 13's bars a default-stack row of the families table meets."""

from __future__ import annotations

from bench.replay import bars


def test_demand_only_needs_half_of_both_gaps():
    # teaching at 10 % of a month (docs/replay.md): the object gap is met, the byte gap is not
    assert bars("adaptive", {"object": 0.518, "byte": 0.476}, None) == "≥ 50 %: **no**"
    assert bars("adaptive", {"object": 0.50, "byte": 0.50}, None) == "≥ 50 %: yes"


def test_prefetch_needs_three_quarters_of_both_gaps_and_most_prefetched_bytes_read():
    assert bars("agent", {"object": 1.44, "byte": 1.23}, 0.658) == "≥ 75 %: yes; read ≥ 60 %: yes"
    assert bars("agent", {"object": 1.68, "byte": 1.61}, 0.592) == "≥ 75 %: yes; read ≥ 60 %: **no**"
    assert bars("agent", {"object": 0.80, "byte": 0.74}, 0.9) == "≥ 75 %: **no**; read ≥ 60 %: yes"
    # nothing prefetched: nothing read
    assert bars("agent", {"object": 0.9, "byte": 0.9}, None) == "≥ 75 %: yes; read ≥ 60 %: **no**"


def test_other_schemes_are_not_measured_against_the_bars():
    assert bars("ours", {"object": 2.0, "byte": 2.0}, 1.0) == ""


def test_where_lru_is_already_optimal_there_is_no_gap_to_close():
    # trauma at 10 GB (round 36): every miss compulsory, the report shows "–" for both gaps
    assert bars("adaptive", {"object": None, "byte": None}, None) == "≥ 50 %: no gap"
    assert bars("agent", {"object": None, "byte": None}, 0.817) == "≥ 75 %: no gap; read ≥ 60 %: yes"
    assert bars("adaptive", {"object": None, "byte": 0.3}, None) == "≥ 50 %: **no**"
