"""Next-24-hour heat of day-directories with the shipped LSTM (`models/hotness.tflite`, package data) on LiteRT.

Never imports TensorFlow: the box runs `ai_edge_litert` (falling back to `tflite_runtime`). The model
was exported with `unroll=True`, so it has builtin ops only and its batch dimension can be resized per
call with `resize_tensor_input`. Its model card (`models/hotness.card.json`) names the version, the
feature list and the window; the predictor refuses a model whose card does not match `features.py`.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from agent.policy.features import FEATURES, WINDOW, reads_from_target

# Package data (linked to models/ in the source tree); wheels install as files, so this is a real path.
DEFAULT_MODEL = Path(str(files("agent.policy") / "model" / "hotness.tflite"))


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older boxes: the standalone runtime
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def load_card(model: Path = DEFAULT_MODEL) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(model.with_suffix(".card.json").read_text())
    return card


class HotnessPredictor:
    def __init__(self, model: str | Path = DEFAULT_MODEL, threads: int = 2) -> None:
        self.path = Path(model)
        self.card = load_card(self.path)
        if self.card.get("features") != FEATURES or self.card.get("window_days") != WINDOW:
            raise ValueError(f"{self.path}: model card features/window do not match agent.policy.features")
        self.version = str(self.card["version"])
        self._interp = _interpreter_class()(model_path=str(self.path), num_threads=threads)
        self._in = self._interp.get_input_details()[0]["index"]
        self._out = self._interp.get_output_details()[0]["index"]
        self._batch = -1

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        """The model's output, log1p(READ_SCALE * reads next 24 h / files), for x (n, WINDOW, F)."""
        if x.ndim != 3 or x.shape[1:] != (WINDOW, len(FEATURES)):
            raise ValueError(f"expected (n, {WINDOW}, {len(FEATURES)}), got {x.shape}")
        n = x.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        if n != self._batch:
            self._interp.resize_tensor_input(self._in, [n, WINDOW, len(FEATURES)])
            self._interp.allocate_tensors()
            self._batch = n
        self._interp.set_tensor(self._in, np.ascontiguousarray(x, dtype=np.float32))
        self._interp.invoke()
        y: np.ndarray = self._interp.get_tensor(self._out).reshape(n).copy()
        return y

    def predict(self, x: np.ndarray, dir_files: np.ndarray) -> np.ndarray:
        """Expected reads of each directory in the next 24 h (>= 0)."""
        return reads_from_target(self.predict_log(x), dir_files)
