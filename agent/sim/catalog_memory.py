"""Measured catalog memory for the replay report: the agent's own SQLite catalog filled with a trace's files the
way the box fills it (`merge_listing`, `mark_clean`, batched `record_access`), in a fresh interpreter (a spawned
child process) so the replay's arrays do not blur it. It reports bytes per
row on the SSD (after a checkpoint) and the child's resident-memory growth after half and all of the rows, each
followed by a walk and random lookups: with SQLite's page cache capped, RAM stays flat as the rows double.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import tempfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import psutil

from agent.records import RemoteObject
from agent.sim.trace import iter_requests
from agent.store.catalog import Catalog
from agent.store.paths import name_of, parent_of

BATCH = 10_000
LOOKUPS = 20_000


@dataclass(frozen=True)
class CatalogMemory:
    rows: int
    disk_bytes: int          # database + WAL after a checkpoint
    rss_half_bytes: int      # resident-memory growth with half of the rows (after a lookup sweep)
    rss_full_bytes: int      # …with all of them

    @property
    def bytes_per_row(self) -> float:
        return self.disk_bytes / max(self.rows, 1)


def trace_files(trace: str | Path, max_rows: int) -> list[tuple[str, int]]:
    """The first `max_rows` distinct files of a trace, as (path, size)."""
    files: dict[str, int] = {}
    for r in iter_requests(trace):
        if len(files) >= max_rows:
            break
        files.setdefault(r.path, r.size)
    return list(files.items())


def fill(catalog: Catalog, files: list[tuple[str, int]]) -> None:
    """Add the files as the box would: listed per directory, marked clean with a checksum, then read once."""
    files = sorted(files)
    for parent, group in groupby(files, key=lambda f: parent_of(f[0])):
        objs = [RemoteObject(name_of(p), size, 0.0, hashlib.md5(p.encode()).hexdigest()) for p, size in group]
        catalog.merge_listing(parent, objs, [], 0.0)
    for path, _ in files:
        catalog.mark_clean(path, 1, None, None, hashlib.sha256(path.encode()).hexdigest())
    for i in range(0, len(files), BATCH):
        catalog.record_access([(p, 1.0, 1) for p, _ in files[i:i + BATCH]])


def read_back(catalog: Catalog, files: list[tuple[str, int]], seed: int) -> None:
    """Walk every file row (as `pacsgw fsck` and eviction scans do), then look up a random sample by path."""
    if (rows := sum(1 for _ in catalog.walk_files())) != len(files):
        raise RuntimeError(f"catalog holds {rows} files, {len(files)} were added")
    for path, _ in random.Random(seed).sample(files, min(LOOKUPS, len(files))):
        if catalog.get(path) is None:
            raise RuntimeError(f"catalog lost {path}")


def measure(files: list[tuple[str, int]], workdir: Path) -> CatalogMemory:
    """Fill a fresh catalog in `workdir` in two halves; RSS growth is measured in this process."""
    proc = psutil.Process()
    catalog = Catalog(workdir / "catalog.sqlite")
    base = proc.memory_info().rss
    half = len(files) // 2
    fill(catalog, files[:half])
    read_back(catalog, files[:half], seed=1)
    rss_half = proc.memory_info().rss - base
    fill(catalog, files[half:])
    read_back(catalog, files, seed=2)
    rss_full = proc.memory_info().rss - base
    catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    catalog.close()
    disk = sum(f.stat().st_size for f in workdir.iterdir() if f.name.startswith("catalog.sqlite"))
    return CatalogMemory(len(files), disk, rss_half, rss_full)


def _measure_trace(trace: str, max_rows: int) -> CatalogMemory:
    """`measure` over the trace's first max_rows files, on tmpfs: the same bytes and the same process RSS as on an SSD
    (SQLite reads with read(), not mmap), without the fsync waits of a disk shared with other jobs."""
    with tempfile.TemporaryDirectory(prefix="pacsgw-catalog-", dir="/dev/shm") as tmp:
        return measure(trace_files(trace, max_rows), Path(tmp))


def measure_trace(trace: str | Path, max_rows: int) -> CatalogMemory:
    """`measure` over a trace's files, in a fresh interpreter (see the module docstring)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_trace, (str(trace), max_rows))
