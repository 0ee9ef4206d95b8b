#!/usr/bin/env python3
"""Catalog commit ceiling: P processes, each with S concurrent sessions, commit new files into one catalog.

    .venv/bin/python bench/catalog_commits.py [--processes 1,2 --sessions 1,8 --commits 1000 --dir /var/cache/pacsgw]

Each commit is what a stored file costs the catalog (`AsyncCatalog.queue_commit_write`, awaited as the ack
path awaits it: BEGIN IMMEDIATE, a new catalog-wide gen, COMMIT with synchronous=FULL, i.e. an fsync of the WAL).
SQLite has one writer at a time. With one session per process every file is a transaction and an fsync of
its own; with several, the commits that arrive while one is being written share the next transaction (group
commit), so the ceiling rises with the number of sessions. Run it on the cache SSD (--dir): the figure is the
disk's fsync rate more than Python's. Prints commits/s, the process CPU per commit, and checks every gen is
unique.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.store.catalog import AsyncCatalog, Catalog, outcome


def commit(path: str, who: int, n: int, sessions: int, cpu: "multiprocessing.queues.Queue[float]") -> None:
    async def session(db: AsyncCatalog, s: int) -> None:
        for i in range(s, n, sessions):
            done: asyncio.Future[tuple[int, str | None]] = asyncio.get_running_loop().create_future()
            db.queue_commit_write(done, asyncio.get_running_loop(), f"p{who}/d{i // 100}/f{i}.dcm",
                                  f"{who:02d}{i:030d}", 524288, "0" * 64, time.time(), claim=True)
            await outcome(done)

    async def main() -> None:
        db = AsyncCatalog(Catalog(Path(path)))
        await asyncio.gather(*(session(db, s) for s in range(sessions)))
        db.shutdown()

    asyncio.run(main())
    cpu.put(time.process_time())


def run(directory: str, processes: int, n: int, sessions: int) -> dict:
    work = tempfile.mkdtemp(prefix="pacsgw-commits-", dir=directory)
    try:
        path = os.path.join(work, "catalog.sqlite")
        Catalog(Path(path)).close()
        spawn = multiprocessing.get_context("spawn")
        cpu = spawn.Queue()
        procs = [spawn.Process(target=commit, args=(path, k, n, sessions, cpu)) for k in range(processes)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        cpu_s = sum(cpu.get() for _ in procs)
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        catalog = Catalog(Path(path))
        gens = [g for (g,) in catalog.db.execute("SELECT gen FROM entries WHERE is_dir = 0")]
        catalog.close()
        return {"processes": processes, "sessions": sessions, "commits": processes * n, "seconds": round(wall, 2),
                "commits_per_s": round(processes * n / wall),
                "cpu_ms_per_commit": round(1000 * cpu_s / (processes * n), 3),
                "gens_unique": len(set(gens)) == len(gens) == processes * n, "load": f"{os.getloadavg()[0]:.2f}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--sessions", default="1,8", help="concurrent sessions per process (default 1,8)")
    ap.add_argument("--commits", type=int, default=1000, help="commits per process (default 1000)")
    ap.add_argument("--dir", default=None, help="where to put the catalog (default: the temporary directory)")
    args = ap.parse_args()
    for p in [int(x) for x in args.processes.split(",")]:
        for k in [int(x) for x in args.sessions.split(",")]:
            print(run(args.dir or tempfile.gettempdir(), p, args.commits, k), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
