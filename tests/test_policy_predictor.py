"""The shipped model loads and predicts with LiteRT, without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.policy.features import FEATURES, N_FEATURES, WINDOW, window_features
from agent.policy.predictor import DEFAULT_MODEL, HotnessPredictor, load_card


def test_card_describes_the_model() -> None:
    card = load_card(DEFAULT_MODEL)
    assert card["features"] == FEATURES and card["window_days"] == 30 == WINDOW
    assert card["version"]
    for key in ("validation_mse", "top10_precision", "top10_recall", "training_data"):
        assert key in card
    assert card["validation_mse"] < card["validation_mse_persistence_baseline"], "beats 'tomorrow = today'"


def test_predicts_with_litert_only_and_resizes_batches() -> None:
    code = r"""
import importlib.abc, sys, json

class NoTensorFlow(importlib.abc.MetaPathFinder):
    # as on the box: importing TensorFlow or Keras fails, even where this machine has them installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name}: not installed on the box")

sys.meta_path.insert(0, NoTensorFlow())
import numpy as np
from agent.policy.predictor import HotnessPredictor
from agent.policy.features import window_features
p = HotnessPredictor()
counts = np.zeros((4, 40), dtype=np.float32)
files = np.array([2000, 2000, 500, 800])
counts[0, 38:40] = [4000, 600]  # yesterday's directory: written and read the day before, re-read since
counts[1, 14:16] = [4000, 600]  # the same, but 25 days old and quiet for three weeks
counts[2, 20:22] = [900, 100]
dir_day = np.array([38, 14, 20, 12]); mod = np.array([0, 0, 1, 3])
x = window_features(counts, 40, dir_day, mod, 8, 0, files)
a = p.predict(x, files); b = p.predict(x[:1], files[:1])
c = p.predict(np.tile(x, (257, 1, 1)), np.tile(files, 257))
print(json.dumps({"a": a.tolist(), "b": b.tolist(), "c0": c[:4].tolist(), "n": len(c),
                  "tf": [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")],
                  "version": p.version}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["tf"] == [], "the predictor must not import TensorFlow"
    a = np.array(r["a"])
    assert a.shape == (4,) and np.all(np.isfinite(a)) and np.all(a >= 0)
    assert np.allclose(r["b"][0], a[0], rtol=1e-4) and np.allclose(r["c0"], a, rtol=1e-4) and r["n"] == 1028
    assert a[0] > 3 * max(a[1], a[2], a[3]), "a fresh busy directory is hotter than quiet old ones"
    assert r["version"] == load_card(DEFAULT_MODEL)["version"]


def test_wrong_shape_is_refused() -> None:
    p = HotnessPredictor()
    try:
        p.predict(np.zeros((2, WINDOW, N_FEATURES + 1), dtype=np.float32), np.ones(2))
    except ValueError as e:
        assert "expected" in str(e)
    else:
        raise AssertionError("a wrong feature count must be refused")
    assert p.predict(np.zeros((0, WINDOW, N_FEATURES), dtype=np.float32), np.zeros(0)).size == 0
    x = window_features(np.ones((3, 5)), 5, np.zeros(3, int), np.zeros(3, int), 1, 0, np.full(3, 10))
    assert x.shape == (3, WINDOW, N_FEATURES)
    assert np.allclose(x[:, -5:, 0], np.log1p(1.0)), "one read per ten files"


def test_shipped_model_beats_persistence_on_a_held_out_trace(tmp_path) -> None:
    """`models/train.py --evaluate` scores the shipped model with LiteRT on gen-trace output it never saw."""
    import importlib.util

    from agent.sim.trace import write_trace
    from agent.sim.workload import generate, preset

    spec = importlib.util.spec_from_file_location("pacsgw_train", Path(__file__).parents[1] / "models" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    trace = tmp_path / "oncology.tsv"
    write_trace(generate(preset("oncology", seed=4242, days=21, monthly_tb=0.1)), trace)
    figures = train.evaluate(DEFAULT_MODEL, [str(trace)])
    assert figures["validation_mse"] < 0.7 * figures["validation_mse_persistence_baseline"]
    assert figures["top10_recall"] > 0.2
