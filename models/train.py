"""Train the day-directory hotness LSTM and export `hotness.tflite` + its model card.

    python models/train.py --trace general.tsv --trace oncology.tsv \
        --val-trace general-val.tsv --val-trace oncology-val.tsv --out models/hotness.tflite

Needs the `train` extra (TensorFlow-CPU + Keras 3) in its own venv; the agent and the tests never
import TensorFlow. Inputs are `pacsgw gen-trace` outputs. Per trace, reads are aggregated into a
(day-directory × day) count matrix; every (directory, day) with the directory acquired in the previous
`WINDOW` days becomes one sample: the last `WINDOW` days of features (agent.policy.features) → the
directory's reads on that day per file (log1p, scaled; volume-independent). The model: LSTM(32) → LSTM(16) →
Dense(1), built with `unroll=True`
because converting an LSTM with an open batch dimension otherwise fails (TensorListReserve); the
unrolled graph has builtin ops only and its batch dimension stays resizable in LiteRT.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.policy.features import FEATURES, N_FEATURES, WINDOW, daily_counts, target, window_features  # noqa: E402
from agent.sim.trace import load_arrays, read_header  # noqa: E402


def samples(trace: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, day) for every candidate directory-day of one trace (as scheme C would see them)."""
    ta = load_arrays(trace)
    reads = ~ta.is_write
    n_days = ta.n_days
    counts = daily_counts(ta.t[reads], ta.obj_dir[ta.obj[reads]], len(ta.dir_names), n_days)
    dir_day, dir_mod = ta.dir_day(), ta.dir_modality()
    wd = dt.date.fromisoformat(ta.meta["start"]).weekday()
    files = np.bincount(ta.obj_dir, minlength=len(ta.dir_names))
    xs, ys, ds = [], [], []
    for day in range(1, n_days):
        dirs = np.flatnonzero((dir_day < day) & (dir_day >= day - WINDOW))
        if dirs.size == 0:
            continue
        xs.append(window_features(counts[dirs], day, dir_day[dirs], dir_mod[dirs], len(ta.modality_names), wd,
                                  files[dirs]))
        ys.append(target(counts[dirs, day], files[dirs]))
        ds.append(np.full(dirs.size, day))
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32), np.concatenate(ds)


def top_decile(pred: np.ndarray, true: np.ndarray, day: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the predicted top 10 % directories of each day against the hot ones
    (actual top 10 % of that day, ties included)."""
    tp = n_pred = n_hot = 0
    for d in np.unique(day):
        m = day == d
        k = max(1, int(round(0.1 * m.sum())))
        p, t = pred[m], true[m]
        chosen = np.argsort(-p, kind="stable")[:k]
        thresh = np.sort(t)[-k]
        hot = t >= max(thresh, 1e-9)
        tp += int(hot[chosen].sum())
        n_pred += k
        n_hot += int(hot.sum())
    return tp / max(n_pred, 1), tp / max(n_hot, 1)


def build(units: tuple[int, int] = (32, 16)):
    import keras
    inp = keras.Input(shape=(WINDOW, N_FEATURES), name="features")
    x = keras.layers.LSTM(units[0], return_sequences=True, unroll=True)(inp)
    x = keras.layers.LSTM(units[1], unroll=True)(x)
    out = keras.layers.Dense(1, name="log1p_reads_next_24h")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def export(model, out: Path) -> None:
    import tensorflow as tf
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]   # builtin ops only
    out.write_bytes(conv.convert())


def write_card_md(card: dict, path: Path) -> None:
    """The human-readable model card, from the same facts as the JSON one."""
    def data(rows: list[dict]) -> str:
        return "\n".join(f"| `{r['file']}` | {r['preset']} | {r['seed']} | {r['days']} | {r['monthly_tb']} |"
                         for r in rows)
    path.write_text(f"""# Model card: day-directory hotness LSTM (`hotness.tflite`)

- **version**: `{card['version']}` (sha256 prefix `{card['sha256_12']}`), trained with TensorFlow {card['tensorflow']}
- **what it predicts**: {card['target']}, for one day-directory ({card['unit']}); the agent multiplies back
  by the directory's file count to get expected reads (`agent.policy.predictor.HotnessPredictor.predict`).
- **input**: the last {card['window_days']} days × {len(card['features'])} features:
  {", ".join(f"`{f}`" for f in card['features'])}
  (definitions in `agent/policy/features.py`; reads are per file so the model does not depend on the site's
  volume).
- **architecture**: {card['architecture']}; exported with `unroll=True`, builtin TFLite ops only, batch resizable
  with `resize_tensor_input`. Runs on LiteRT (`ai-edge-litert`), falls back to `tflite_runtime`.
- **candidates**: directories acquired in the {card['window_days']} days before the predicted day (what scheme C
  considers).

## Data
Synthetic traces from `pacsgw gen-trace` (no patient data). Training:

| trace | preset | seed | days | TB/month |
|---|---|---|---|---|
{data(card['training_data'])}

Validation (different seeds, never trained on):

| trace | preset | seed | days | TB/month |
|---|---|---|---|---|
{data(card['validation_data'])}

{card['train_samples']:,} training and {card['validation_samples']:,} validation samples; {card['epochs']} epochs,
seed {card['seed']}.

## Validation
| metric | value |
|---|---|
| MSE (target units) | {card['validation_mse']} |
| MSE of "tomorrow = last day" (persistence baseline) | {card['validation_mse_persistence_baseline']} |
| top-10 % precision (predicted top decile per day that is in the actual top decile) | {card['top10_precision']:.1%} |
| top-10 % recall (actual top-decile directories found in the predicted top decile) | {card['top10_recall']:.1%} |

Recall is above precision because ties in the actual counts (many directories with the same per-file rate)
make the actual "hot" set larger than one decile.

## Limits
Trained on synthetic workloads only: retrain on the site's own access log aggregates before trusting it
for capacity decisions. It ranks recent day-directories; it knows nothing about individual patients (the
prior-study prefetcher in `agent/policy/priors.py` covers that).
""")


def validation_set(traces: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, day) of the validation traces; days of different traces are kept apart (+1000 per trace)."""
    parts = [samples(t) for t in traces]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] + 1000 * i for i, p in enumerate(parts)]))


def metrics(pred: np.ndarray, vx: np.ndarray, vy: np.ndarray, vday: np.ndarray) -> dict[str, float]:
    """The model card's validation figures for predictions `pred` of the targets `vy`."""
    precision, recall = top_decile(pred, vy, vday)
    return {"validation_mse": round(float(np.mean((pred - vy) ** 2)), 5),
            # "tomorrow = today" in log space
            "validation_mse_persistence_baseline": round(float(np.mean((vx[:, -1, 0] - vy) ** 2)), 5),
            "top10_precision": round(precision, 4), "top10_recall": round(recall, 4)}


def evaluate(model: Path, val_traces: list[str]) -> dict[str, float]:
    """A shipped .tflite on validation traces, with LiteRT (no TensorFlow): checks a card's figures."""
    from agent.policy.predictor import HotnessPredictor
    vx, vy, vday = validation_set(val_traces)
    return metrics(HotnessPredictor(model).predict_log(vx), vx, vy, vday)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", action="append", default=[], help="training trace (repeatable)")
    ap.add_argument("--val-trace", action="append", required=True, help="validation trace (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "models" / "hotness.tflite"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--version", default=None, help="model version (default: date + data hash)")
    ap.add_argument("--evaluate", default=None, metavar="TFLITE",
                    help="do not train: print this model's validation figures (LiteRT only, no TensorFlow)")
    args = ap.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate(Path(args.evaluate), args.val_trace), indent=2))
        return 0
    if not args.trace:
        ap.error("--trace is required for training")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    parts = [samples(t) for t in args.trace]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    vx, vy, vday = validation_set(args.val_trace)
    print(f"train {x.shape}, validation {vx.shape}")

    model = build()
    model.fit(x, y, epochs=args.epochs, batch_size=128, shuffle=True, verbose=2, validation_data=(vx, vy))
    figures = metrics(model.predict(vx, batch_size=4096, verbose=0).reshape(-1), vx, vy, vday)

    out = Path(args.out)
    export(model, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:12]
    data_ids = []
    for t in args.trace + args.val_trace:
        h = read_header(t)
        data_ids.append({"file": Path(t).name, "preset": h["preset"], "seed": h["seed"], "days": h["days"],
                         "monthly_tb": h["monthly_tb"]})
    card = {
        "version": args.version or f"{dt.date.today().isoformat()}-{digest}",
        "sha256_12": digest,
        "features": FEATURES,
        "window_days": WINDOW,
        "unit": "day-directory (MODALITY/YYYY-MM-DD)",
        "target": "log1p(10 * reads of the directory's files in the next 24 h / files in the directory)",
        "architecture": "LSTM(32, return_sequences, unroll) -> LSTM(16, unroll) -> Dense(1)",
        "runtime": "LiteRT (ai-edge-litert), builtin ops only, batch resizable",
        "training_data": data_ids[:len(args.trace)],
        "validation_data": data_ids[len(args.trace):],
        "train_samples": int(x.shape[0]),
        "validation_samples": int(vx.shape[0]),
        "epochs": args.epochs,
        "seed": args.seed,
        **figures,
        "tensorflow": tf.__version__,
    }
    out.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    write_card_md(card, out.with_suffix(".md"))
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
