#!/usr/bin/env python3
"""The S3 uplink's own CPU per GET, in process, against a loopback SeaweedFS.

    .venv/bin/python bench/get_cost.py [--gets 1000 --size 524288 --rounds 3]

Per round, 8 at a time like a burst of cold reads: S3Uplink.get of a whole object (every chunk drained, as
agent.store.fetch streams it), get_range of 256 KiB at an offset (a cold read's ranged GET, If-Match its
ETag) and head: the client CPU ms per request (time.process_time: every thread of this process; SeaweedFS is
another process). Everything it starts is stopped and its directory removed at the end. For an A/B, run the
same file with PYTHONPATH pointing at the other checkout (it puts that checkout's agent first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parent.parent))

from agent.config import UplinkConfig
from agent.uplink.s3 import S3Uplink
from bench.common import BUCKET, load, table
from tests.devstack import ObjectStore

KEYS = 64  # objects read in turn (the server's own cache is warm for all of them either way)


async def rounds(store: ObjectStore, size: int, gets: int) -> dict[str, float]:
    s3 = S3Uplink(UplinkConfig(endpoint_url=store.endpoint_url, bucket=BUCKET, access_key_id=store.access_key,
                               secret_access_key=store.secret_key))
    await s3.start()
    gate = asyncio.Semaphore(8)
    etags: dict[str, str | None] = {}

    async def whole(i: int) -> None:
        path = f"get/{i % KEYS}"
        n = 0
        async with s3.get(path, lambda etag, _rangeable: etags.__setitem__(path, etag)) as (length, _sha, chunks):
            async for data in chunks:
                n += len(data)
        assert n == length == size, (n, length)

    async def ranged(i: int) -> None:
        path = f"get/{i % KEYS}"
        data = await s3.get_range(path, size // 4, 256 * 1024, etags[path])
        assert len(data) == min(256 * 1024, size - size // 4)

    async def head(i: int) -> None:
        assert await s3.head(f"get/{i % KEYS}") is not None

    async def timed(op: Callable[[int], Awaitable[None]]) -> float:
        async def one(i: int) -> None:
            async with gate:
                await op(i)
        t0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(gets)))
        return round((time.process_time() - t0) / gets * 1000, 3)

    try:
        await asyncio.gather(*(whole(i) for i in range(KEYS)))  # warm: connections, ETags
        return {"get_ms": await timed(whole), "range_ms": await timed(ranged), "head_ms": await timed(head)}
    finally:
        await s3.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gets", type=int, default=1000, help="requests of each kind per round")
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per object (default 524288)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsgw-getcost-"))
    store = ObjectStore("seaweedfs", work / "s3")
    rows = []
    try:
        store.start()
        store.create_bucket(BUCKET)
        client = store.client()
        for i in range(KEYS):
            client.put_object(Bucket=BUCKET, Key=f"get/{i}", Body=os.urandom(args.size), Metadata={"sha256": "0" * 64})
        for r in range(args.rounds):
            ms = asyncio.run(rounds(store, args.size, args.gets))
            rows.append({"round": r + 1, **ms, "load": load()})
            print(json.dumps(rows[-1]), flush=True)
        print(f"\n{args.gets} requests of each kind per round on {args.size} B objects, client CPU ms per request")
        print(table(rows, ["round", "get_ms", "range_ms", "head_ms", "load"]))
        return 0
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
