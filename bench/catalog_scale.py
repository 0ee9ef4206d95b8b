#!/usr/bin/env python3
"""Catalog scale benchmark: agent memory and metadata latency at 1 M, 10 M and 50 M files, beside rclone.

    .venv/bin/python bench/catalog_scale.py --dir /work/bench-catalogs [--sizes 1000000,10000000,50000000]
        [--stats 1000 --lists 200 --reads 50] [--no-walk]

For every size it builds (once; kept in --dir for later runs) a catalog shaped like a PACS archive
(`archive_listing`: MODALITY/YYYY-MM-DD/study/series/instance.dcm with the general
preset's modality mix and study shapes) through `import_inventory`, starts the agent on it
against a loopback `rclone serve s3` whose folder holds only a small sample of real objects, and over
one FTP session measures: SIZE and MDTM of random files, LIST of random day and series directories,
and RETR of sampled objects (first byte cold from S3, then again from the cache). It prints agent RSS
(after start and after the operations; peak), the catalog's size on disk and p50/p99 of every operation.

Beside it, at the smallest size (the same tree as zero-byte objects written straight into the S3
server's folder: populating S3 by PUTs is too slow at this scale), it walks the whole tree over FTP
(LIST of every directory) on our agent and on `rclone serve ftp --vfs-cache-mode full`, and prints both
RSS after the walk and GB of RSS per million files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import psutil

from agent.sim.workload import SHAPES, Generator, WorkloadParams, draw_instances
from agent.store.catalog import Catalog
from agent.store.paths import ancestors, name_of, parent_of
from bench.common import BUCKET, ftp_login, load, pct, ratio, retr, start_agent, start_rclone, table
from tests.devstack import ObjectStore

PREFIX = "archive/"
MAX_READ_BYTES = 2 * 2**20  # sampled objects are at most this large (CR/DX/MG instances are tens of MB)


# --- building ---------------------------------------------------------------------------------------------


def expected_files_per_study(g: Generator) -> float:
    """E[instances per study] under the modality mix."""
    total = 0.0
    for m, pm in zip(g.modalities, g.mod_p, strict=True):
        s = SHAPES[m]
        total += pm * (s.series[0] + s.series[1]) / 2 * max(1.0, s.images_median * np.exp(s.images_sigma**2 / 2))
    return total


def archive_listing(params: WorkloadParams, n_files: int) -> Iterator[tuple[str, int, float]]:
    """(path, size, mtime) of an archive of about n_files before `start`, in path order, a study at a time."""
    g = Generator(params)
    per_study = expected_files_per_study(g)
    dates = [g.start - dt.timedelta(days=1)]
    while sum(g.studies_per_day(d.weekday()) for d in dates) * per_study < n_files:
        dates.append(dates[-1] - dt.timedelta(days=1))
    # the oldest day is partly filled: spread the remainder, so the count is about n_files
    rate = n_files / (sum(g.studies_per_day(d.weekday()) for d in dates) * per_study)
    rng, study = g.rng, 0
    for m, pm in sorted(zip(g.modalities, g.mod_p, strict=True)):
        shape = SHAPES[m]
        for date in reversed(dates):
            mtime = dt.datetime.combine(date, dt.time(12)).timestamp()
            for _ in range(int(rng.poisson(g.studies_per_day(date.weekday()) * pm * rate))):
                sizes, starts = draw_instances(rng, shape)
                for se in range(len(starts) - 1):
                    prefix = f"{m}/{date.isoformat()}/ST{study:08d}/SE{se + 1:03d}/"
                    for k, size in enumerate(sizes[starts[se]:starts[se + 1]].tolist()):
                        yield f"{prefix}{k + 1:05d}.dcm", size, mtime
                study += 1


def import_inventory(cat: Catalog, files: Iterable[tuple[str, int, float]], batch: int = 200_000) -> int:
    """Record a complete S3 inventory (path order) in the catalog as clean, uncached files, their directories as
    listed, keeping rows that are there → files added (the catalog's own schema, indexes and triggers)."""
    added, rows = 0, iter(files)
    while chunk := list(itertools.islice(rows, batch)):
        dirs = {d for p in {parent_of(f[0]) for f in chunk} for d in ancestors(p + "/x")[1:]}
        with cat._tx(durable=False):
            cat.db.executemany(
                "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, mtime, listed) "
                "VALUES (?, ?, ?, 1, ?, 1)",
                ((d, parent_of(d), name_of(d), chunk[0][2]) for d in sorted(dirs)))
            cat.db.execute("UPDATE entries SET listed = 1 WHERE path = ''")
            added += cat.db.executemany(
                "INSERT OR IGNORE INTO entries (path, parent, name, is_dir, size, mtime, state, gen) "
                "VALUES (?, ?, ?, 0, ?, ?, 'clean', 1)",
                ((p, parent_of(p), name_of(p), size, mtime) for p, size, mtime in chunk)).rowcount
    return added


def build(cache_dir: Path, n: int, seed: int) -> dict:
    """The catalog of about n files in cache_dir/catalog.sqlite, built once. → {'files', 'seconds'}."""
    marker = cache_dir / "built.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cat = Catalog(cache_dir / "catalog.sqlite")
    files = import_inventory(cat, archive_listing(WorkloadParams(seed=seed), n))
    cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()
    info = {"files": files, "build_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info))
    return info


def catalog_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.glob("catalog.sqlite*"))


# --- sampling (read-only, before the agent starts) ----------------------------------------------------------


def random_descent(cat: Catalog, rng: random.Random, depth: int) -> str:
    """A random path `depth` levels down the tree, one children() query per level."""
    path = ""
    for _ in range(depth):
        kids = cat.children(path)
        path = rng.choice(kids).path
    return path


def sample(cache_dir: Path, stats: int, lists: int, reads: int, seed: int) -> dict[str, list]:
    """Random files (for SIZE/MDTM), day and series directories (for LIST), small files to read (path, size)."""
    rng, cat = random.Random(seed), Catalog(cache_dir / "catalog.sqlite")
    try:
        files = [cat.get(random_descent(cat, rng, 5)) for _ in range(stats)]
        small = [(e.path, e.size) for e in files if e.size <= MAX_READ_BYTES][:reads]
        return {"files": [e.path for e in files], "days": [random_descent(cat, rng, 2) for _ in range(lists)],
                "series": [random_descent(cat, rng, 4) for _ in range(lists)], "reads": small}
    finally:
        cat.close()


def put_objects(store: ObjectStore, items: list[tuple[str, int]], seed: int) -> None:
    """Real objects of the catalog's sizes, written into the folder `rclone serve s3` serves."""
    rng = random.Random(seed)
    for path, size in items:
        dest = store.data_dir / "data" / BUCKET / PREFIX / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(rng.randbytes(size))


# --- FTP operations -------------------------------------------------------------------------------------


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def operations(port: int, picks: dict[str, list]) -> dict[str, list[float]]:
    ftp = ftp_login(port)
    try:
        out: dict[str, list[float]] = {
            "size": [timed(ftp.size, "/" + p) for p in picks["files"]],
            "mdtm": [timed(ftp.voidcmd, f"MDTM /{p}") for p in picks["files"]],
            "list_day": [timed(ftp.retrlines, f"LIST /{d}", lambda _: None) for d in picks["days"]],
            "list_series": [timed(ftp.retrlines, f"LIST /{d}", lambda _: None) for d in picks["series"]],
        }
        for label in ("open_cold", "open_cached"):
            out[label] = []
            for path, size in picks["reads"]:
                seconds, got = retr(ftp, path)
                if got != size:
                    raise RuntimeError(f"{path}: read {got} bytes, expected {size}")
                out[label].append(seconds)
        return out
    finally:
        ftp.quit()


def walk(port: int) -> tuple[int, int, float]:
    """LIST every directory from the root over FTP → (files, directories, seconds)."""
    ftp, t0 = ftp_login(port), time.perf_counter()
    files, dirs, todo = 0, 0, ["/"]
    while todo:
        d = todo.pop()
        lines: list[str] = []
        ftp.retrlines(f"LIST {d}", lines.append)
        for line in lines:
            name = line.split(None, 8)[-1]
            if line.startswith("d"):
                todo.append(f"{d.rstrip('/')}/{name}")
                dirs += 1
            else:
                files += 1
    ftp.quit()
    return files, dirs, time.perf_counter() - t0


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def mb(n: int) -> float:
    return round(n / 2**20, 1)


# --- runs ------------------------------------------------------------------------------------------------


def run_size(args: argparse.Namespace, store: ObjectStore, n: int) -> dict:
    cache_dir = args.dir / f"cat-{n}"
    info = build(cache_dir, n, args.seed)
    picks = sample(cache_dir, args.stats, args.lists, args.reads, args.seed)
    put_objects(store, picks["reads"], args.seed)
    shutil.rmtree(cache_dir / "data", ignore_errors=True)  # every read starts cold
    t0 = time.perf_counter()
    agent = start_agent(args.work / f"agent-{n}", store, PREFIX, **{"cache.dir": str(cache_dir)})
    try:
        row = {"files": info["files"], "build_s": info["build_s"], "start_s": round(time.perf_counter() - t0, 2),
               "catalog_MB": mb(catalog_bytes(cache_dir)), "rss_start_MB": mb(agent.rss()), "load": load()}
        lat = operations(agent.ftp_port, picks)
        row.update({f"{k}_p{q}_ms": pct(v, q / 100) for k, v in lat.items() for q in (50, 99)})
        row.update(rss_after_MB=mb(agent.rss()), rss_peak_MB=mb(peak_rss(agent.proc.pid)), load_after=load())
        return row
    finally:
        agent.stop()


def populate_tree(store: ObjectStore, cache_dir: Path) -> int:
    """Every file of the catalog as a zero-byte object under tree/ in the S3 server's folder. → files written."""
    cat, root, written = Catalog(cache_dir / "catalog.sqlite"), store.data_dir / "data" / BUCKET / "tree", 0
    try:
        for e in cat.walk_files(batch=10_000):
            dest = root / e.path
            if not dest.parent.is_dir():
                dest.parent.mkdir(parents=True)
            dest.touch()
            written += 1
    finally:
        cat.close()
    return written


def prepare_walk(args: argparse.Namespace, store: ObjectStore) -> int:
    """Write the tree before the S3 server starts: `rclone serve s3` caches directory listings (5 min), so
    files written under a directory it has listed stay invisible for a while. → files written."""
    n = min(args.sizes)
    build(args.dir / f"cat-{n}", n, args.seed)
    t0 = time.perf_counter()
    written = populate_tree(store, args.dir / f"cat-{n}")
    print(f"  {written} zero-byte objects written into the S3 folder in {time.perf_counter() - t0:.0f} s", flush=True)
    return written


def run_walks(args: argparse.Namespace, store: ObjectStore, written: int) -> list[dict]:
    """Walk the smallest archive over FTP on our agent (its catalog) and on rclone (the same tree in S3)."""
    source = args.dir / f"cat-{min(args.sizes)}"
    rows = []
    agent = start_agent(args.work / "agent-walk", store, "tree/", **{"cache.dir": str(source)})
    try:
        rows.append(walk_row("pacsgw", agent.ftp_port, agent.rss, agent.proc.pid, written))
    finally:
        agent.stop()
    peer = start_rclone("ftp", args.work / "rclone-walk", store, "tree", cache_mode="full")
    try:
        rows.append(walk_row("rclone", peer.port, peer.rss, peer.proc.pid, written))
    finally:
        peer.stop()
    rows.append({"target": "ours/rclone", **{k: ratio(rows[0][k], rows[1][k])
                                              for k in ("walk_s", "rss_after_MB", "GB_per_M_files")}})
    return rows


def walk_row(target: str, port: int, rss: Callable[[], int], pid: int, expected: int) -> dict:
    before, at = rss(), load()
    files, dirs, seconds = walk(port)
    if files != expected:
        raise RuntimeError(f"{target}: walk found {files} files, expected {expected}")
    after = rss()
    return {"target": target, "files": files, "dirs": dirs, "walk_s": round(seconds, 1),
            "rss_before_MB": mb(before), "rss_after_MB": mb(after), "rss_peak_MB": mb(peak_rss(pid)),
            "GB_per_M_files": round(after / 1e9 / (files / 1e6), 3), "load": at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where catalogs are built and kept between runs")
    ap.add_argument("--sizes", default="1000000,10000000,50000000")
    ap.add_argument("--no-walk", action="store_true", help="skip the full-tree walk beside rclone")
    ap.add_argument("--stats", type=int, default=1000)
    ap.add_argument("--lists", type=int, default=200)
    ap.add_argument("--reads", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.dir.mkdir(parents=True, exist_ok=True)
    args.work = args.dir / f"run-{os.getpid()}"
    if args.build_only:
        for n in args.sizes:
            print(n, build(args.dir / f"cat-{n}", n, args.seed), flush=True)
        return 0
    shutil.rmtree(args.work, ignore_errors=True)
    store = ObjectStore("rclone", args.work / "s3")
    try:
        written = 0 if args.no_walk else prepare_walk(args, store)
        store.start()
        store.create_bucket(BUCKET)
        print(f"catalog scale bench: sizes {args.sizes}, {psutil.cpu_count()} CPUs, load {load()}", flush=True)
        rows = []
        for n in args.sizes:
            rows.append(run_size(args, store, n))
            print(json.dumps(rows[-1]), flush=True)
        cols = list(rows[0])
        for group in (cols[:7], ["files"] + cols[7:]):
            print()
            print(table(rows, group))
        if not args.no_walk:
            walks = run_walks(args, store, written)
            print()
            print(table(walks, ["target", "files", "dirs", "walk_s", "rss_before_MB", "rss_after_MB", "rss_peak_MB",
                                "GB_per_M_files", "load"]))
        return 0
    finally:
        store.stop()
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
