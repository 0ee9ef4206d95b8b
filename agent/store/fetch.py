"""Bring one object from S3 into the cache, verified: shared by the read path and `pacsgw fsck`.

A compressed object arrives decoded (agent.uplink.s3 decodes while it streams), so what lands here and is
hashed is the file the PACS wrote; an object that does not decode is Corrupt like one whose hash differs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from typing import Awaitable, Callable

from agent.records import Entry
from agent.store.cache import Cache, fast_hash
from agent.store.errors import Corrupt
from agent.uplink.encoding import Undecodable
from agent.uplink.s3 import S3Uplink


async def download(s3: S3Uplink, cache: Cache, e: Entry, blob: str, fd: int,
                   on_data: Callable[[int], Awaitable[None]] | None = None,
                   on_verified: Callable[[], Awaitable[None]] | None = None,
                   on_start: Callable[[str | None, bool], None] | None = None,
                   lock: asyncio.Lock | None = None) -> str:
    """Stream e's object into the staging file fd, check its size and SHA-256, commit it as blob (without
    fsyncs: S3 holds the object, and a copy a crash tore fails its checks and is fetched again). → sha256.

    on_start(ETag, whether ranged GETs may read it) runs once the object answered; on_data(bytes so far) after every
    chunk (readers waiting on a fetch, progress bars), inside `lock` with the chunk's write (ranged reads ahead of the
    stream write under it too, so the stream's bytes are the ones that stay); on_verified() once the bytes matched,
    before the commit (readers may then have the end of the file). Chunks are written and hashed on the loop, the copy
    committed there: a thread hop cost more CPU than the work it carried (docs/benchmarks.md §32).
    Raises Corrupt when the bytes are not the ones the catalog (or the object's metadata, or for another writer's
    object a single-part ETag's MD5) recorded."""
    h, fast, md5 = hashlib.sha256(), fast_hash(), hashlib.md5(usedforsecurity=False)
    written = 0
    try:
        async with s3.get(e.object_key, on_start, e.sha256) as (_, meta_sha, etag_md5, chunks):
            async for data in chunks:
                if written + len(data) > e.size:  # a key written again larger: streamed whole, it filled the disk
                    raise Corrupt(e.path, f"the object goes on past its size, {e.size} bytes")
                async with lock or contextlib.nullcontext():
                    os.pwrite(fd, data, written)
                    h.update(data)
                    fast.update(data)
                    if etag_md5:
                        md5.update(data)
                    written += len(data)
                    if on_data is not None:
                        await on_data(written)
    except Undecodable as exc:
        raise Corrupt(e.path, f"object does not decode: {exc}") from exc
    expected = e.sha256 or meta_sha
    if written != e.size or (expected and h.hexdigest() != expected):
        raise Corrupt(e.path, f"fetched {written} bytes sha256 {h.hexdigest()}, "
                              f"expected {e.size} bytes sha256 {expected}")
    if etag_md5 and md5.hexdigest() != etag_md5:  # another writer's object: its ETag is all that names its bytes
        raise Corrupt(e.path, f"fetched {written} bytes MD5 {md5.hexdigest()}, its ETag says {etag_md5}")
    if on_verified is not None:
        await on_verified()
    cache.commit(blob, fd, fast.hexdigest(), durable=False)
    return h.hexdigest()
