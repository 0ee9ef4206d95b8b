"""Study-index deltas in the bucket: the index stays rebuildable fast between snapshots (docs/dicom.md, "The study
index in the bucket"). A row counts only for an object listed under its ETag: a bad delta costs HEADs, not a wrong row.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.config import Config
from agent.dicom.snapshot import GET_MAX, Row, bare_etag, decode_rows, delta_prefix, encode_rows
from agent.store.catalog import AsyncCatalog
from agent.uplink.s3 import S3Uplink, error_code

log = structlog.get_logger("pacsgw.dicom")

DELTA_ROWS = 5000     # rows per delta object (~200 KB gzip'd)
READ_AHEAD = 32       # delta objects fetched at once by a rebuild


async def ship(cfg: Config, db: AsyncCatalog, s3: S3Uplink, active: Callable[[], bool]) -> int:
    """Ship every queued study-index row to the bucket now, unless active() is False (an HA standby has none);
    → how many. A failure is logged and the rows stay queued."""
    shipped = 0
    if not active():
        return shipped
    while rows := await db.unshipped_index_rows(DELTA_ROWS):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        key = f"{delta_prefix(cfg)}{stamp}-{os.urandom(4).hex()}.json.gz"
        body = await asyncio.to_thread(encode_rows, rows)
        try:
            await s3.put_raw(key, body)
        except Exception as e:  # the line may be down: the next interval tries again
            log.warning("index_delta_failed", error=error_code(e), detail=str(e)[:300], rows=len(rows))
            break
        await db.index_rows_shipped([(str(r[0]), str(r[2])) for r in rows])
        shipped += len(rows)
        log.info("index_delta_written", key=key, rows=len(rows), bytes=len(body))
    return shipped


@dataclass
class Deltas:
    """Every delta's rows by path, then by ETag: what a rebuild matches listed objects against."""

    rows: dict[str, dict[str, Row]] = field(default_factory=dict)
    objects: int = 0
    skipped: list[str] = field(default_factory=list)   # damaged or unreadable delta objects (their rows HEADed)

    def match(self, path: str, etag: str | None) -> Row | None:
        """The index row (path, size, study, …) of this listed object if a delta holds it under its ETag."""
        r = self.rows.get(path, {}).get(bare_etag(etag)) if etag else None
        return (path, r[1], *r[3:]) if r is not None else None


async def read(cfg: Config, s3: S3Uplink) -> Deltas:
    """Every delta in the bucket (READ_AHEAD at a time); a damaged one is skipped, its objects HEADed."""
    deltas, gate = Deltas(), asyncio.Semaphore(READ_AHEAD)
    try:  # in key order, i.e. oldest first (their names start with the time they were written)
        keys = await s3.keys(delta_prefix(cfg))
    except Exception as e:
        log.warning("index_deltas_unusable", error=f"{type(e).__name__}: {str(e)[:300]}")
        return deltas

    async def one(key: str) -> list[Any] | None:
        async with gate:
            try:
                return await decode_rows(await s3.get_raw(key, GET_MAX))
            except Exception as e:
                log.warning("index_delta_skipped", key=key, error=f"{type(e).__name__}: {str(e)[:200]}",
                            fallback="its objects are HEADed")
                deltas.skipped.append(key)
                return None

    for rows in await asyncio.gather(*(one(k) for k in keys)):  # in key order: a later delta wins a tie
        if rows is not None:
            deltas.objects += 1
            for r in rows:
                deltas.rows.setdefault(r[0], {})[bare_etag(r[2])] = tuple(r)
    return deltas
