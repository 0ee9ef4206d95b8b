#!/usr/bin/env python3
"""Time a staging file's creation on the calling thread: what a cold read's fetch costs the event loop before it
asks S3 for a byte (docs/benchmarks.md §27).

    .venv/bin/python bench/staging.py [--calls 2000 --every-ms 2 --dir /var/tmp]

Cache.new_staging() in a fresh cache directory under --dir (on the disk to measure), one call every --every-ms as a
cold pass at ~250 files/s makes them, each file then written 4 KiB and committed as a fetch commits
(durable=False). Prints the p50 / mean / p99 of the call's time on this thread (the first 50 calls, while the
spares are first made, left out) and the load average. For an A/B, run it with PYTHONPATH pointing at the other
checkout; other processes' disk churn is what makes a create slow (ext4 inode allocation), so run A and B
alternately under the same load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agent.store.cache import Cache

WARMUP = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the scratch cache directory goes")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pacsgw-staging-", dir=args.dir))
    try:
        cache = Cache(root)
        took = []
        for _ in range(args.calls):
            start = time.perf_counter()
            blob, fd = cache.new_staging()
            took.append(time.perf_counter() - start)
            os.pwrite(fd, b"x" * 4096, 0)
            cache.commit(blob, fd, "0" * 32, durable=False)
            os.close(fd)
            time.sleep(args.every_ms / 1000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    took = sorted(took[WARMUP:])
    print(f"new_staging on the caller: p50 {statistics.median(took) * 1e6:.1f} us, "
          f"mean {statistics.mean(took) * 1e6:.1f} us, p99 {took[int(len(took) * 0.99)] * 1e6:.1f} us "
          f"({len(took)} calls), load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
