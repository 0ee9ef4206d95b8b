"""Replay benchmark: the paper-style table for both presets, with wall times.

    .venv/bin/python bench/replay.py                       # general (1 TB cache) and oncology (0.5 TB)
    .venv/bin/python bench/replay.py --seed 9001 --days 14 --out bench/results

For each preset: `pacsgw gen-trace` (if the trace is missing), then `pacsgw simulate` with schemes A, B,
C, ours and libCacheSim at the same capacity. The report (`<out>/<preset>-s<seed>/report.md`) ends with
the wall time of every step (the issue asks for 10 M requests in minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.commands import main as pacsgw_sim  # noqa: E402

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
        if not trace.exists():
            t0 = time.monotonic()
            pacsgw_sim(["gen-trace", str(trace), "--preset", name, "--seed", str(args.seed),
                        "--days", str(args.days)])
            print(f"gen-trace {name}: {time.monotonic() - t0:.0f} s")
        pacsgw_sim(["simulate", str(trace), "--capacity", CAPACITY[name], "--schemes", args.schemes,
                    "--out", str(Path(args.out) / f"{name}-s{args.seed}"),
                    "--title", f"{name}, seed {args.seed}, cache {CAPACITY[name]}"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
