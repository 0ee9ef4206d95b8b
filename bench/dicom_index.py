#!/usr/bin/env python3
"""DICOM metadata benchmark: the per-file cost of the header parse + metadata on the upload path, and the
study-index rebuild rate from the bucket against a loopback SeaweedFS: one HEAD per object, and from an index
snapshot (agent.dicom.snapshot) and index deltas (agent.dicom.deltas) covering all or part of the objects (the
rest HEADed).

    .venv/bin/python bench/dicom_index.py [--objects 20000 --concurrency 32,64,128 --coverage 1.0,0.9]

The objects are put directly (untimed, 16 threads), each with the user metadata the agent writes; then
`agent.dicom.reindex.rebuild` runs against them at each concurrency (HEADs only); then, for each coverage
fraction c, a snapshot of c of them is written (timed) and the rebuild runs with it (the rest HEADed: a
snapshot with no deltas since, e.g. a lost or a damaged delta), and again with the rest in index deltas
(written by agent.dicom.deltas.ship, timed); with c = 0 there is no snapshot, deltas only. Each
rebuild prints objects/s, the time per million objects, and the rebuild's own CPU seconds per 1000 objects
(the client's share of the cost). Last, the S3 client's CPU per PUT with and without the DICOM metadata and
tags. Everything it starts is stopped and its directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from agent.config import load as load_config
from agent.dicom.header import read_fd
from agent.dicom.objectmeta import object_meta
from agent.store.catalog import Catalog
from bench.common import BUCKET, PASSWORD, USER, load, table
from bench.dicomgen import series
from tests.devstack import AgentProc, ObjectStore


def parse_cost(work: Path, n: int = 200) -> dict:
    """ms per file of read_fd + object_meta on 512x512 CT slices (what the uploader adds per file)."""
    files = series(np.random.default_rng(5), 8)
    paths = []
    for i, data in enumerate(files):
        p = work / f"{i}.dcm"
        p.write_bytes(data)
        paths.append(p)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    t0 = time.perf_counter()
    for i in range(n):
        fd = fds[i % len(fds)]
        object_meta(read_fd(fd, len(files[0])), b"k" * 32, "none")
    ms = (time.perf_counter() - t0) / n * 1000
    for fd in fds:
        os.close(fd)
    return {"test": "header parse + metadata", "per_file_ms": round(ms, 2), "files_per_s_one_core": round(1000 / ms),
            "file_bytes": len(files[0]), "load": load()}


def put_cost(cfg, work: Path, n: int = 1000) -> dict:
    """Client CPU ms per PUT (S3Uplink.put_file of a 64x64 CT slice, 50 at a time) with the DICOM object
    metadata and tags and without, in alternating batches: what the metadata adds on the S3 client's side."""
    from agent.uplink.s3 import S3Uplink
    data = series(np.random.default_rng(6), 1, rows=64, cols=64)[0]
    p = work / "put.dcm"
    p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    fd = os.open(p, os.O_RDONLY)
    meta = object_meta(read_fd(fd, len(data)), b"k" * 32, "none")
    cpu = {"with": 0.0, "without": 0.0}

    async def go() -> None:
        s3 = S3Uplink(cfg.uplink)
        await s3.start()
        try:
            await asyncio.gather(*(s3.put_file(f"put/warm-{j}.dcm", fd, len(data), sha) for j in range(50)))
            for i in range(2 * n // 50):
                label = "with" if i % 2 == 0 else "without"
                t0 = time.process_time()
                await asyncio.gather(*(s3.put_file(f"put/{label}/{i}-{j}.dcm", fd, len(data), sha,
                                                   meta=meta if label == "with" else None) for j in range(50)))
                cpu[label] += time.process_time() - t0
        finally:
            await s3.close()

    asyncio.run(go())
    os.close(fd)
    return {"test": "PUT client CPU, with / without metadata", "with_ms": round(cpu["with"] / n * 1000, 3),
            "without_ms": round(cpu["without"] / n * 1000, 3), "puts_each": n, "load": load()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=20000)
    ap.add_argument("--concurrency", default="32,64,128", help="of the HEAD-each rebuild")
    ap.add_argument("--coverage", default="1.0,0.9", help="fractions of the objects the snapshot holds")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsgw-bench-dicom-"))
    store = ObjectStore("seaweedfs", work / "s3")
    try:
        print(table([parse_cost(work)], ["test", "per_file_ms", "files_per_s_one_core", "file_bytes", "load"]))
        store.start()
        store.create_bucket(BUCKET)
        client = store.client()
        meta = {"sha256": "0" * 64, "dicom-study": "1.2.3.4", "dicom-series": "1.2.3.4.5", "dicom-sop": "1.2.3.4.5.6",
                "dicom-modality": "CT", "dicom-study-date": "20190315", "dicom-ts": "1.2.840.10008.1.2.1",
                "dicom-patient": "ab" * 16}

        def put(i: int) -> tuple:
            path, sop = f"CT/{i // 1000}/{i}.dcm", f"1.2.3.4.5.{i}"
            etag = client.put_object(Bucket=BUCKET, Key=f"idx/{path}", Body=b"x" * 100,
                                     Metadata={**meta, "dicom-sop": sop})["ETag"]
            return (path, 100, etag, meta["dicom-study"], meta["dicom-series"], sop, "CT", "20190315",
                    meta["dicom-patient"])

        with ThreadPoolExecutor(16) as pool:
            known = sorted(pool.map(put, range(args.objects)))
        (work / "cfg").mkdir()
        agent = AgentProc(work / "cfg", store, "idx/", {}, [{"name": USER, "password": PASSWORD, "root": "/"}],
                          bucket=BUCKET)  # only its config file: the rebuild needs [uplink]
        cfg = load_config(agent.config_path)
        from agent.dicom import deltas, snapshot
        from agent.dicom.reindex import rebuild
        from agent.uplink.s3 import S3Uplink
        rows = []

        class Queue:
            """The rows an agent's catalog would have queued for its deltas (deltas.ship reads them from it)."""

            def __init__(self, queued: list[tuple]) -> None:
                self.queued = queued

            async def unshipped_index_rows(self, limit: int) -> list[tuple]:
                return self.queued[:limit]

            async def index_rows_shipped(self, shipped: list[tuple[str, str]]) -> None:
                self.queued = self.queued[len(shipped):]

        async def ship(queued: list[tuple]) -> int:
            s3 = S3Uplink(cfg.uplink)
            await s3.start()
            try:
                return await deltas.ship(cfg, Queue(queued), s3, lambda: True)
            finally:
                await s3.close()

        async def clear_index() -> None:
            """No snapshot, no deltas: the next round starts from nothing."""
            s3 = S3Uplink(cfg.uplink)
            await s3.start()
            try:
                for key in await s3.keys(snapshot.index_prefix(cfg)):
                    await s3.delete_raw(key)
            finally:
                await s3.close()

        def run(c: int, label: str, use_snapshot: bool) -> None:
            catalog = Catalog(work / f"catalog-{label}-{c}.sqlite")
            cpu0 = time.process_time()
            r = asyncio.run(rebuild(cfg, catalog, c, progress=False, use_snapshot=use_snapshot))
            cpu = time.process_time() - cpu0
            catalog.close()
            rows.append({"rebuild": label, "concurrency": c, "objects": r.objects, "indexed": r.indexed,
                         "from_snapshot": r.from_snapshot, "from_deltas": r.from_deltas, "deltas": r.deltas,
                         "seconds": round(r.seconds, 2), "objects_per_s": round(r.per_second),
                         "min_per_million": round(1e6 / r.per_second / 60, 1),
                         "cpu_s_per_1000": round(cpu * 1000 / r.objects, 2), "load": load()})

        for c in (int(x) for x in args.concurrency.split(",")):
            run(c, "HEAD each", False)
        for coverage in (float(x) for x in args.coverage.split(",")):
            held = [r for i, r in enumerate(known) if i % 100 < round(coverage * 100)]  # the rest: new since
            asyncio.run(clear_index())
            if held:
                t0 = time.perf_counter()
                asyncio.run(snapshot.write(cfg, held))
                print(f"snapshot of {coverage:.0%} of {len(known)} objects written in "
                      f"{time.perf_counter() - t0:.2f} s", flush=True)
                run(64, f"snapshot {coverage:.0%}", True)
            if coverage < 1:
                t0 = time.perf_counter()
                shipped = asyncio.run(ship([r for i, r in enumerate(known) if i % 100 >= round(coverage * 100)]))
                print(f"deltas of {shipped} rows written in {time.perf_counter() - t0:.2f} s", flush=True)
                run(64, f"snapshot {coverage:.0%} + deltas" if held else "deltas only", True)
        print(table(rows, ["rebuild", "concurrency", "objects", "indexed", "from_snapshot", "from_deltas", "deltas",
                           "seconds", "objects_per_s", "min_per_million", "cpu_s_per_1000", "load"]))
        # last: its objects land in the namespace the rebuilds list
        print(table([put_cost(cfg, work)], ["test", "with_ms", "without_ms", "puts_each", "load"]))
        return 0
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
