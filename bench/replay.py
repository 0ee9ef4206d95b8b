"""Replay benchmark: the paper-style table for both presets, with timings.

    .venv/bin/python bench/replay.py                  # general (1 TB cache) and oncology (0.5 TB)
    .venv/bin/python bench/replay.py --seed 7 --days 14 --out bench/results

Generates each trace if missing (`pacsgw gen-trace`), replays schemes A, B, C, ours and libCacheSim at
the same capacity (`pacsgw simulate`), prints the markdown tables and how long each step took
(the issue asks for 10 M requests in minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import parse_size  # noqa: E402
from agent.sim.commands import main as sim  # noqa: E402
from agent.sim.reference import run_reference  # noqa: E402
from agent.sim.replay import ReplayConfig, replay  # noqa: E402
from agent.sim.report import write_report  # noqa: E402
from agent.sim.trace import load_arrays  # noqa: E402

CAPACITY = {"general": "1TB", "oncology": "0.5TB"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="general,oncology")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--work", default="/tmp/pacsgw-bench", help="where traces go (GBs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--schemes", default="A,B,C,ours")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.presets.split(","):
        trace = work / f"{name}-s{args.seed}-d{args.days}.tsv"
        timings = []
        if not trace.exists():
            t0 = time.monotonic()
            sim(["gen-trace", str(trace), "--preset", name, "--seed", str(args.seed), "--days", str(args.days)])
            timings.append(("gen-trace", time.monotonic() - t0))
        t0 = time.monotonic()
        ta = load_arrays(trace, progress=True)
        timings.append(("parse (cached after the first run)", time.monotonic() - t0))
        cfg = ReplayConfig(capacity=parse_size(CAPACITY[name]))
        results = []
        for s in args.schemes.split(","):
            t0 = time.monotonic()
            results.append(replay(ta, s, cfg, progress=True))
            timings.append((f"replay {s}", time.monotonic() - t0))
        t0 = time.monotonic()
        refs = run_reference(ta, cfg.capacity, cfg.warmup_days)
        timings.append(("libCacheSim (6 algorithms)", time.monotonic() - t0))
        text = write_report(ta, cfg, results, refs, Path(args.out) / f"{name}-s{args.seed}",
                            title=f"{name}, seed {args.seed}, cache {CAPACITY[name]}")
        print(text)
        print(f"{ta.n:,} requests; " + "; ".join(f"{k}: {v:.0f} s" for k, v in timings))
        with open(Path(args.out) / f"{name}-s{args.seed}" / "report.md", "a") as f:
            f.write(f"\nTimings on this machine ({ta.n:,} requests): "
                    + "; ".join(f"{k} {v:.0f} s" for k, v in timings) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
