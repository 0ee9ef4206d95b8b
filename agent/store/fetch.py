"""Bring one object from S3 into the cache, verified: shared by the read path and `pacsgw fsck`."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Awaitable, Callable

from agent.records import Entry
from agent.store.cache import Cache
from agent.store.errors import Corrupt
from agent.uplink.s3 import S3Uplink


def _land(fd: int, h: "hashlib._Hash", data: bytes, offset: int) -> None:
    """Write one chunk at offset and add it to the running hash. Blocking: one thread hop does both."""
    os.pwrite(fd, data, offset)
    h.update(data)


async def download(s3: S3Uplink, cache: Cache, e: Entry, blob: str, fd: int,
                   on_data: Callable[[int], Awaitable[None]] | None = None,
                   on_verified: Callable[[], Awaitable[None]] | None = None) -> str:
    """Stream e's object into the staging file fd, check its size and SHA-256, commit it as blob. → sha256.

    on_data(bytes so far) runs after every chunk (readers waiting on a fetch, progress bars); on_verified()
    once the bytes matched, before the commit's fsyncs (readers may then have the end of the file).
    Raises Corrupt when the bytes are not the ones the catalog (or the object's metadata) recorded.
    """
    h = hashlib.sha256()
    written = 0
    async with s3.get(e.path) as (_, meta_sha, chunks):
        async for data in chunks:
            await asyncio.to_thread(_land, fd, h, data, written)
            written += len(data)
            if on_data is not None:
                await on_data(written)
    expected = e.sha256 or meta_sha
    if written != e.size or (expected and h.hexdigest() != expected):
        raise Corrupt(e.path, f"fetched {written} bytes sha256 {h.hexdigest()}, "
                              f"expected {e.size} bytes sha256 {expected}")
    if on_verified is not None:
        await on_verified()
    await asyncio.to_thread(cache.commit, blob, fd)
    return h.hexdigest()
