#!/usr/bin/env python3
"""DICOM metadata benchmark: the per-file cost of the header parse + metadata on the upload path, and the
study-index rebuild rate from the bucket against a loopback SeaweedFS: one HEAD per object, and from an index
snapshot (agent.dicom.snapshot) covering all or part of the objects (the rest HEADed).

    .venv/bin/python bench/dicom_index.py [--objects 20000 --concurrency 32,64,128 --coverage 1.0,0.9]

The objects are put directly (untimed, 16 threads), each with the user metadata the agent writes; then
`agent.dicom.reindex.rebuild` runs against them at each concurrency (HEADs only), then a snapshot of the first
coverage fraction of them is written (timed) and the rebuild runs with it; each prints objects/s and the time
per million objects. Everything it starts is stopped and its directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
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
        from agent.dicom import snapshot
        from agent.dicom.reindex import rebuild
        rows = []

        def run(c: int, label: str, use_snapshot: bool) -> None:
            catalog = Catalog(work / f"catalog-{label}-{c}.sqlite")
            r = asyncio.run(rebuild(cfg, catalog, c, progress=False, use_snapshot=use_snapshot))
            catalog.close()
            rows.append({"rebuild": label, "concurrency": c, "objects": r.objects, "indexed": r.indexed,
                         "from_snapshot": r.from_snapshot, "seconds": round(r.seconds, 2),
                         "objects_per_s": round(r.per_second), "min_per_million": round(1e6 / r.per_second / 60, 1),
                         "load": load()})

        for c in (int(x) for x in args.concurrency.split(",")):
            run(c, "HEAD each", False)
        for coverage in (float(x) for x in args.coverage.split(",")):
            held = [r for i, r in enumerate(known) if i % 100 < round(coverage * 100)]  # the rest: new since
            t0 = time.perf_counter()
            asyncio.run(snapshot.write(cfg, held))
            print(f"snapshot of {coverage:.0%} of {len(known)} objects written in {time.perf_counter() - t0:.2f} s")
            run(64, f"snapshot {coverage:.0%}", True)
        print(table(rows, ["rebuild", "concurrency", "objects", "indexed", "from_snapshot", "seconds",
                           "objects_per_s", "min_per_million", "load"]))
        return 0
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
