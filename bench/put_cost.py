#!/usr/bin/env python3
"""The S3 uplink's own CPU per single-request PUT and per GET, in process, against a loopback SeaweedFS.

    .venv/bin/python bench/put_cost.py [--puts 1000 --gets 1000 --size 524288 --rounds 3]

S3Uplink.put_file of one file (read and checked against its SHA-256, signed, sent), 8 at a time like the
uploader's default concurrency, in alternating batches of 50 with and without the DICOM object metadata and
tags the agent writes (nine `x-amz-meta-dicom-*` values of a real CT header, three tags): the client CPU ms per
PUT (time.process_time: every thread of this process; SeaweedFS is another process). Then, 8 at a time like a
burst of cold reads, over 64 objects of the same size: S3Uplink.get of a whole object (every chunk drained, as
agent.store.fetch streams it), get_range of 256 KiB at an offset (a cold read's ranged GET, If-Match its ETag)
and head: the client CPU ms per request. Everything it starts is stopped and its directory removed at the end.
For an A/B, run the same file with PYTHONPATH pointing at the other checkout (it puts that checkout's agent
first).
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
from typing import Awaitable, Callable

sys.path.insert(0, os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parent.parent))

import numpy as np

from agent.config import UplinkConfig
from agent.dicom.header import read_fd
from agent.dicom.objectmeta import ObjectMeta, object_meta
from agent.uplink.s3 import S3Uplink
from bench.common import BUCKET, load, table
from bench.dicomgen import series
from tests.devstack import ObjectStore

GET_KEYS = 64  # objects the GETs read in turn


def uplink(store: ObjectStore) -> S3Uplink:
    return S3Uplink(UplinkConfig(endpoint_url=store.endpoint_url, bucket=BUCKET, access_key_id=store.access_key,
                                 secret_access_key=store.secret_key))


async def rounds(store: ObjectStore, fd: int, size: int, sha: str, meta: ObjectMeta, puts: int) -> dict[str, float]:
    s3 = uplink(store)
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


async def get_rounds(store: ObjectStore, size: int, gets: int) -> dict[str, float]:
    s3 = uplink(store)
    await s3.start()
    gate = asyncio.Semaphore(8)
    etags: dict[str, str | None] = {}

    async def whole(i: int) -> None:
        path, n = f"get/{i % GET_KEYS}", 0
        async with s3.get(path, lambda etag, _rangeable: etags.__setitem__(path, etag)) as (length, _sha, chunks):
            async for data in chunks:
                n += len(data)
        assert n == length == size, (n, length)

    async def ranged(i: int) -> None:
        path = f"get/{i % GET_KEYS}"
        data = await s3.get_range(path, size // 4, 256 * 1024, etags[path])
        assert len(data) == min(256 * 1024, size - size // 4)

    async def head(i: int) -> None:
        assert await s3.head(f"get/{i % GET_KEYS}") is not None

    async def timed(op: Callable[[int], Awaitable[None]]) -> float:
        async def one(i: int) -> None:
            async with gate:
                await op(i)
        t0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(gets)))
        return round((time.process_time() - t0) / gets * 1000, 3)

    try:
        await asyncio.gather(*(whole(i) for i in range(GET_KEYS)))  # warm: connections, ETags
        return {"get_ms": await timed(whole), "range_ms": await timed(ranged), "head_ms": await timed(head)}
    finally:
        await s3.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--puts", type=int, default=1000, help="PUTs with and PUTs without metadata, per round")
    ap.add_argument("--gets", type=int, default=1000, help="GETs, ranged GETs and HEADs each, per round (0: none)")
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
        client = store.client()
        for i in range(GET_KEYS if args.gets else 0):
            client.put_object(Bucket=BUCKET, Key=f"get/{i}", Body=body, Metadata={"sha256": "0" * 64})
        for r in range(args.rounds):
            row: dict[str, object] = {"round": r + 1}
            if args.puts:
                ms = asyncio.run(rounds(store, fd, len(body), hashlib.sha256(body).hexdigest(), meta, args.puts))
                row |= {"with_meta_ms": ms["with"], "without_meta_ms": ms["without"],
                        "meta_adds_ms": round(ms["with"] - ms["without"], 3)}
            if args.gets:
                row |= asyncio.run(get_rounds(store, len(body), args.gets))
            rows.append(row | {"load": load()})
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{args.puts} PUTs of {len(body)} B each way, {args.gets} GETs, ranged GETs and HEADs per round, "
              "client CPU ms per request")
        print(table(rows, ["round", "with_meta_ms", "without_meta_ms", "meta_adds_ms", "get_ms", "range_ms",
                           "head_ms", "load"]))
        return 0
    finally:
        os.close(fd)
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
