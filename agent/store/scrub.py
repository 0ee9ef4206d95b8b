"""Background scrub (README, `[scrub]`): every cached copy against its SHA-256, slowly, forever, at most `rate`
bytes a second: damage on files nobody reads is found while the SSD can still be replaced.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import cast

import structlog

from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog
from agent.uplink.ratelimit import TokenBucket

log = structlog.get_logger("pacsgw.scrub")

PAGE = 200


class Scrubber:
    def __init__(self, db: AsyncCatalog, cache: Cache, rate: int, pause_seconds: float) -> None:
        self.db, self.cache, self.pause_seconds = db, cache, pause_seconds
        self.bucket = TokenBucket(rate)
        self.passes = 0
        self.last_pass_end = 0.0

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            checked, bad = await self.scrub_pass()
            self.passes += 1
            self.last_pass_end = time.time()
            log.info("scrub_pass_done", files=checked, bad=bad, seconds=round(time.monotonic() - t0, 1))
            await asyncio.sleep(self.pause_seconds)

    async def scrub_pass(self) -> tuple[int, int]:
        checked = bad = 0
        last = ""
        while page := await self.db.cached_after(last, PAGE):
            for e in page:
                blob = cast(str, e.blob)  # cached_after yields cached rows only
                await self.bucket.acquire(e.size)
                fd, problem = await asyncio.to_thread(self.cache.open_verified, blob, e.sha256)
                checked += 1
                if fd is not None:
                    os.close(fd)
                    continue
                bad += 1
                if e.state != "clean":
                    log.critical("cache_copy_lost", path=e.path, blob=blob, problem=problem, state=e.state,
                                 found_by="scrub")
                elif await self.db.drop_corrupt(e.path, blob):
                    self.cache.remove(blob)
                    log.error("cache_copy_corrupt", path=e.path, blob=blob, problem=problem,
                              action="dropped; the next read fetches it again", found_by="scrub")
            last = blob
        return checked, bad
