#!/usr/bin/env python3
"""The S3 uplink's own CPU per single-request PUT, in process, against a loopback SeaweedFS.

    .venv/bin/python bench/put_cost.py [--puts 1000 --size 524288 --rounds 3]

S3Uplink.put_file of one file (read and checked against its SHA-256, signed, sent), 8 at a time like the
uploader's default concurrency, in alternating batches of 50 with and without the DICOM object metadata and
tags the agent writes (nine `x-amz-meta-dicom-*` values of a real CT header, three tags): the client CPU ms per
PUT (time.process_time: every thread of this process; SeaweedFS is another process). Everything it starts is
stopped and its directory removed at the end. For an A/B, run the same file with PYTHONPATH pointing at the
other checkout (it puts that checkout's agent first).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parent.parent))

import numpy as np

from agent.config import UplinkConfig
from agent.dicom.header import read_fd
from agent.dicom.objectmeta import ObjectMeta, object_meta
from agent.uplink.s3 import S3Uplink
from bench.common import BUCKET, load, table
from bench.dicomgen import series
from tests.devstack import ObjectStore


async def rounds(store: ObjectStore, fd: int, size: int, sha: str, meta: ObjectMeta, puts: int) -> dict[str, float]:
    s3 = S3Uplink(UplinkConfig(endpoint_url=store.endpoint_url, bucket=BUCKET, access_key_id=store.access_key,
                               secret_access_key=store.secret_key))
    await s3.start()
    gate = asyncio.Semaphore(8)
    cpu = {"with": 0.0, "without": 0.0}

    async def put(key: str, with_meta: bool) -> None:
        async with gate:
            await s3.put_file(key, fd, size, sha, meta=meta if with_meta else None)

    try:
        await asyncio.gather(*(put(f"put/warm-{j}", True) for j in range(50)))
        for i in range(2 * puts // 50):
            label = "with" if i % 2 == 0 else "without"
            t0 = time.process_time()
            await asyncio.gather(*(put(f"put/{label}/{i}-{j}", label == "with") for j in range(50)))
            cpu[label] += time.process_time() - t0
    finally:
        await s3.close()
    return {k: round(v / puts * 1000, 3) for k, v in cpu.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--puts", type=int, default=1000, help="PUTs with and PUTs without metadata, per round")
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per file (default 524288)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsgw-putcost-"))
    store = ObjectStore("seaweedfs", work / "s3")
    slice_ = series(np.random.default_rng(6), 1)[0]
    body = (slice_ * (args.size // len(slice_) + 1))[:args.size]  # a CT slice's header, then pixels
    path = work / "file.dcm"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    meta = object_meta(read_fd(fd, len(body)), os.urandom(32), "default")
    rows = []
    try:
        store.start()
        store.create_bucket(BUCKET)
        for r in range(args.rounds):
            ms = asyncio.run(rounds(store, fd, len(body), hashlib.sha256(body).hexdigest(), meta, args.puts))
            rows.append({"round": r + 1, "with_meta_ms": ms["with"], "without_meta_ms": ms["without"],
                         "meta_adds_ms": round(ms["with"] - ms["without"], 3), "load": load()})
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{args.puts} PUTs of {len(body)} B each way per round, client CPU ms per PUT")
        print(table(rows, ["round", "with_meta_ms", "without_meta_ms", "meta_adds_ms", "load"]))
        return 0
    finally:
        os.close(fd)
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
