"""Directory ranking for prefetch (agent/policy/dirheat.py) and the prefetch/eviction configuration keys."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest
from test_config import GOOD, write

from agent.config import ConfigError, load
from agent.policy.dirheat import acquisition_day, history, rank_by_model, rank_cold_start, window_bounds
from agent.policy.features import WINDOW
from agent.policy.predictor import HotnessPredictor


def test_acquisition_day_from_the_path():
    assert acquisition_day("CT/2026-11-23") == dt.date(2026, 11, 23)
    assert acquisition_day("MR/20261122") == dt.date(2026, 11, 22)
    assert acquisition_day("CT/2026-13-40") is None and acquisition_day("archive/misc") is None


def test_history_keeps_the_last_window_days_before_today():
    today = dt.date(2026, 11, 23)
    rows = [("CT/a", "2026-11-22", 5), ("CT/a", "2026-10-01", 9), ("MR/b", "2026-11-20", 2)]
    h = history(rows, {"CT/a": 10}, today)
    assert h.dirs == ["CT/a", "MR/b"] and h.first == today - dt.timedelta(days=WINDOW)
    assert h.counts[0, -1] == 5 and h.counts.sum() == 7      # 2026-10-01 is older than the window
    assert h.files.tolist() == [10, 0] and not h.empty


def test_model_ranks_a_daily_read_directory_above_a_forgotten_one():
    today = dt.date.today()
    rows = [("CT/2026-11-01", (today - dt.timedelta(days=d)).isoformat(), 50) for d in range(1, 15)]
    rows.append(("MR/2026-10-01", (today - dt.timedelta(days=29)).isoformat(), 1))
    ranked = rank_by_model(history(rows, {"CT/2026-11-01": 20, "MR/2026-10-01": 20}, today),
                           HotnessPredictor(), "test")
    assert [r.dir for r in ranked] == ["CT/2026-11-01", "MR/2026-10-01"]
    assert ranked[0].heat > ranked[1].heat >= 0 and "700 reads" in ranked[0].why


def test_cold_start_rule_ranks_recent_writes():
    ranked = rank_cold_start({"CT/2026-11-22": 40, "MR/2026-11-21": 100, "US/2026-11-20": 0}, 7)
    assert [r.dir for r in ranked] == ["MR/2026-11-21", "CT/2026-11-22"]
    assert ranked[0].why == "cold start: 100 files stored in the last 7 days"


def test_window_bounds_now_inside_and_outside():
    now = time.time()
    midnight = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    local = int(now - midnight)
    inside = ((local - 60) % 86400, (local + 60) % 86400)
    start, end = window_bounds(now, inside)
    assert start <= now < end and end - start == 120
    later = ((local + 3600) % 86400, (local + 7200) % 86400)
    start, end = window_bounds(now, later)
    assert now < start and end - start == 3600 and start - now <= 3601


@pytest.mark.parametrize("key, value, allowed", [
    ("cache.eviction", '"fifo"', "'lru', 'age', 'kmeans', 'study', 'learned' or 'adaptive'"),
    ("prefetch.window", '"25:00-07:00"', "'HH:MM-HH:MM'"),
    ("prefetch.window", '"05:00"', "'HH:MM-HH:MM'"),
    ("prefetch.window", '"05:00-05:00"', "'HH:MM-HH:MM'"),
    ("prefetch.max_bytes", '"lots"', "a size"),
    ("prefetch.study_depth", "2", "deeper than prefetch.dir_depth"),
])
def test_bad_prefetch_and_eviction_keys_are_named(tmp_path, key, value, allowed):
    section, name = key.split(".")
    text = GOOD.replace("[[users]]", f"[{section}]\n{name} = {value}\n\n[[users]]") if section != "cache" else \
        GOOD.replace('max_bytes = "800GB"', f'max_bytes = "800GB"\n{name} = {value}')
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert err.value.key == key and allowed in str(err.value)


def test_window_and_policy_defaults(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert cfg.prefetch.window == (5 * 3600, 7 * 3600 + 1800) and cfg.cache.eviction == "adaptive"
    assert np.isclose(cfg.cache.kmeans_refit_seconds, 3600)
