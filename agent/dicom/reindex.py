"""Rebuild the study index (catalog dicom_objects) from the bucket alone: a replaced box, its SSD lost. Listings
carry no user metadata: a row comes from the snapshot or a delta under the ETag listed, else from a HEAD.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from tqdm import tqdm

from agent.config import Config
from agent.dicom import deltas, snapshot
from agent.dicom.objectmeta import checked_row
from agent.records import index_row
from agent.store.catalog import Catalog
from agent.store.paths import name_problem
from agent.uplink.encoding import Undecodable, logical_size
from agent.uplink.s3 import S3Uplink

BATCH = 1000
ATTEMPTS = 3


@dataclass
class RebuildReport:
    objects: int = 0
    indexed: int = 0
    failed: int = 0
    from_snapshot: int = 0   # objects whose row came from the index snapshot (no HEAD)
    from_deltas: int = 0     # objects whose row came from an index delta (no HEAD)
    deltas: int = 0          # index delta objects read
    deltas_skipped: list[str] = field(default_factory=list)  # damaged deltas (their objects HEADed)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.objects / self.seconds if self.seconds else 0.0


async def rebuild(cfg: Config, catalog: Catalog, concurrency: int, progress: bool, use_snapshot: bool) -> RebuildReport:
    report, rows = RebuildReport(), []
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=concurrency * 4)
    bar = tqdm(unit="obj", desc="index rebuild", disable=not progress)
    t0 = time.monotonic()

    def add(row: tuple[Any, ...] | None) -> None:
        """One object read, and its index row (None: nothing to index)."""
        report.objects += 1
        bar.update()
        # what an upload would index: a key no client could name (control characters: `pacsgw find` prints
        # paths to a terminal) or values object_meta would not write are another writer's, not indexed
        checked = None if row is None or any(name_problem(p) for p in row[0].split("/")) else checked_row(row)
        if checked is None:
            return
        rows.append(checked)
        if len(rows) >= BATCH:
            catalog.index_dicom(rows[:])
            rows.clear()

    async def worker() -> None:
        while (path := await queue.get()) is not None:
            if (head := await _head(s3, path)) is False:  # counted and reported; a rebuild can be run again
                report.failed += 1
            add(_row(path, head) if isinstance(head, dict) else None)

    use_snapshot = use_snapshot and bool(cfg.uplink.prefix)
    # HEADs on a pool with room for every one; the listing on its own (it never queues behind HEADs for a connection)
    async with S3Uplink(replace(cfg.uplink, max_concurrency=concurrency)) as s3, S3Uplink(cfg.uplink) as lister:
        cursor = snapshot.Cursor(snapshot.read(cfg, lister) if use_snapshot else None)
        try:
            delta = await deltas.read(cfg, lister) if use_snapshot else deltas.Deltas()
            report.deltas, report.deltas_skipped = delta.objects, delta.skipped
            catalog.clear_dicom_index()
            workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
            async for page in lister.walk(logical=False):  # the logical size of a compressed object: its HEAD
                for path, _size, _mtime, etag in page:
                    if (row := await cursor.match(path, etag)) is not None:
                        report.from_snapshot += 1
                    elif (row := delta.match(path, etag)) is not None:
                        report.from_deltas += 1
                    else:
                        await queue.put(path)
                        continue
                    add(row)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            catalog.index_dicom(rows)
        finally:
            bar.close()
            await cursor.aclose()
    report.seconds = time.monotonic() - t0
    report.indexed = catalog.dicom_index_size()
    return report


def _row(path: str, head: dict[str, Any]) -> tuple | None:
    """The index row of a HEADed object with the file's size; None for a compressed one without a valid size."""
    try:
        return index_row(path, logical_size(head), head.get("Metadata") or {})
    except Undecodable:
        return None


async def _head(s3: S3Uplink, path: str) -> dict[str, Any] | None | Literal[False]:
    """The object's HEAD (None: gone), tried ATTEMPTS times (a loaded server times out); False: every try failed."""
    for attempt in range(ATTEMPTS):
        try:
            return await s3.head(path)
        except Exception:
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(0.5 * 2 ** attempt)
    return False
