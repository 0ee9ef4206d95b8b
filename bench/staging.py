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

--as-write: a write's open on an event loop, both ways in one run, call by call alternately (the same load for
both): through a thread hop (asyncio.to_thread(new_staging), how every upload took its staging file before
docs/benchmarks.md §28) and as Gateway._new_staging takes it now (spare_staging() on the loop; the hop only when no
spare is ready). Prints per way the wall time until the loop has the file, and the loop thread's own CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agent.store.cache import Cache

WARMUP = 50


def _settle(cache: Cache, blob: str, fd: int) -> None:
    os.pwrite(fd, b"x" * 4096, 0)
    cache.commit(blob, fd, "0" * 32, durable=False)
    os.close(fd)


async def as_write(cache: Cache, calls: int, every_ms: float) -> dict[str, list[tuple[float, float]]]:
    """→ per way, (wall seconds, loop-thread CPU seconds) of each call, the two ways alternating."""
    async def hop() -> tuple[str, int]:
        return await asyncio.to_thread(cache.new_staging)

    async def loop() -> tuple[str, int]:
        return cache.spare_staging() or await asyncio.to_thread(cache.new_staging)

    took: dict[str, list[tuple[float, float]]] = {"thread hop": [], "spare on the loop": []}
    for i in range(calls):
        name, way = ("thread hop", hop) if i % 2 else ("spare on the loop", loop)
        wall, cpu = time.perf_counter(), time.thread_time()
        blob, fd = await way()
        took[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
        _settle(cache, blob, fd)
        await asyncio.sleep(every_ms / 1000)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--every-ms", type=float, default=2.0)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the scratch cache directory goes")
    ap.add_argument("--as-write", action="store_true", help="a write's open on a loop: thread hop against spare")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pacsgw-staging-", dir=args.dir))
    try:
        cache = Cache(root)
        if args.as_write:
            for name, calls in asyncio.run(as_write(cache, args.calls, args.every_ms)).items():
                wall, cpu = sorted(c[0] for c in calls[WARMUP:]), [c[1] for c in calls[WARMUP:]]
                print(f"{name}: wall p50 {statistics.median(wall) * 1e6:.1f} us, mean {statistics.mean(wall) * 1e6:.1f}"
                      f" us, p99 {wall[int(len(wall) * 0.99)] * 1e6:.1f} us; loop CPU mean "
                      f"{statistics.mean(cpu) * 1e6:.1f} us ({len(wall)} calls), load {os.getloadavg()[0]:.1f}")
            return
        took = []
        for _ in range(args.calls):
            start = time.perf_counter()
            blob, fd = cache.new_staging()
            took.append(time.perf_counter() - start)
            _settle(cache, blob, fd)
            time.sleep(args.every_ms / 1000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    took = sorted(took[WARMUP:])
    print(f"new_staging on the caller: p50 {statistics.median(took) * 1e6:.1f} us, "
          f"mean {statistics.mean(took) * 1e6:.1f} us, p99 {took[int(len(took) * 0.99)] * 1e6:.1f} us "
          f"({len(took)} calls), load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
