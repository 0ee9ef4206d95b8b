#!/usr/bin/env python3
"""Catalog commit ceiling: P processes each commit N new files into one catalog at once.

    .venv/bin/python bench/catalog_commits.py [--processes 1,2 --commits 1000 --dir /var/cache/pacsgw]

Each commit is what a stored file costs the catalog (`Catalog.commit_write`: BEGIN IMMEDIATE, a new
catalog-wide gen, COMMIT with synchronous=FULL, i.e. an fsync of the WAL). SQLite has one writer at a time,
so this rate is the box's ceiling for files acknowledged per second, however many serving processes
([server] workers) share the catalog (docs/workers.md). Run it on the cache SSD (--dir): the figure is the
disk's fsync rate more than Python's. Prints commits/s per process count and checks every gen is unique.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.store.catalog import Catalog


def commit(path: str, who: int, n: int) -> None:
    catalog = Catalog(Path(path))
    for i in range(n):
        catalog.commit_write(f"p{who}/d{i // 100}/f{i}.dcm", f"{who:02d}{i:030d}", 524288, "0" * 64, time.time(),
                             claim=True)
    catalog.close()


def run(directory: str, processes: int, n: int) -> dict:
    work = tempfile.mkdtemp(prefix="pacsgw-commits-", dir=directory)
    try:
        path = os.path.join(work, "catalog.sqlite")
        Catalog(Path(path)).close()
        spawn = multiprocessing.get_context("spawn")
        procs = [spawn.Process(target=commit, args=(path, k, n)) for k in range(processes)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        catalog = Catalog(Path(path))
        gens = [g for (g,) in catalog.db.execute("SELECT gen FROM entries WHERE is_dir = 0")]
        catalog.close()
        return {"processes": processes, "commits": processes * n, "seconds": round(wall, 2),
                "commits_per_s": round(processes * n / wall),
                "gens_unique": len(set(gens)) == len(gens) == processes * n, "load": f"{os.getloadavg()[0]:.2f}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--commits", type=int, default=1000, help="commits per process (default 1000)")
    ap.add_argument("--dir", default=None, help="where to put the catalog (default: the temporary directory)")
    args = ap.parse_args()
    for p in [int(x) for x in args.processes.split(",")]:
        print(run(args.dir or tempfile.gettempdir(), p, args.commits), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
