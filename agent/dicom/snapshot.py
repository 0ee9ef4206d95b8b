"""Study-index snapshots in the bucket, so a rebuild reads a few objects instead of HEADing every one
(docs/dicom.md). The manifest is written before the previous segments go: a reader always finds one whole snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import itertools
import json
import os
import sqlite3
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Iterable, Iterator

import structlog
from botocore.exceptions import ClientError

from agent.config import Config
from agent.uplink.s3 import S3Uplink, error_code

log = structlog.get_logger("pacsgw.dicom")

SEGMENT_ROWS = 50_000   # ~2 MB gzip'd: a handful of GETs per million objects
ROOT = "pacsgw-index/"
GET_MAX = 64 << 20          # an index object read whole: a segment is ~2 MB gzip'd (a larger one is not ours)
ROWS_MAX_BYTES = 256 << 20  # its JSON: 50 000 rows of ~400 bytes are 20 MB; 5 KiB a row at most
_PIECE = 16 << 20

Row = tuple[Any, ...]   # (path, size, etag, study, series, sop, modality, study_date, patient)


class NoPlace(ValueError):
    """Snapshots live beside the namespace: without uplink.prefix there is no 'beside'."""


def index_prefix(cfg: Config) -> str:
    if not cfg.uplink.prefix:
        raise NoPlace(f"{cfg.path}: index snapshots need uplink.prefix: they are kept beside the PACS namespace, "
                      f"under {ROOT}<prefix>, and with an empty prefix the whole bucket is the namespace")
    return ROOT + cfg.uplink.prefix


def delta_prefix(cfg: Config) -> str:
    """Where the index deltas (agent.dicom.deltas) are: the snapshot folds them in."""
    return index_prefix(cfg) + "deltas/"


def bare_etag(etag: object) -> str:
    return str(etag or "").strip('"')


def encode_rows(rows: list[Row]) -> bytes:
    """Index rows as a segment or delta object holds them: gzip'd JSON."""
    return gzip.compress(json.dumps(rows).encode(), 6)


def _gunzip(data: bytes) -> bytes:
    """A segment's or delta's JSON, at most ROWS_MAX_BYTES: any S3 client may write a gzip bomb there."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing, one member as encode_rows writes
    parts: list[bytes] = []
    size, rest = 0, data
    while True:  # a piece at a time: a bomb is refused holding ROWS_MAX_BYTES, not twice that
        piece = d.decompress(rest, _PIECE)
        rest, size = d.unconsumed_tail, size + len(piece)
        parts.append(piece)
        if size > ROWS_MAX_BYTES:
            raise ValueError(f"decodes to more than {ROWS_MAX_BYTES} bytes")
        if d.eof or (not rest and len(piece) < _PIECE):
            break
    if not d.eof or d.unused_data:
        raise ValueError("not one whole gzip member")
    return b"".join(parts)


async def decode_rows(data: bytes | None) -> list[Any]:
    """A segment's or a delta's rows; ValueError (or a gzip/JSON error) when it is damaged."""
    rows = json.loads(await asyncio.to_thread(_gunzip, data or b""))
    if not isinstance(rows, list) or not all(valid_row(r) for r in rows):
        raise ValueError("not a list of index rows")
    return rows


def catalog_rows(catalog_path: Path) -> Iterator[Row]:
    """The box's study index, by path, of objects confirmed in S3 with their ETags; read-only (the agent runs)."""
    with contextlib.closing(sqlite3.connect(f"{catalog_path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
        yield from db.execute(
            "SELECT d.path, d.size, e.etag, d.study_uid, d.series_uid, d.sop_uid, d.modality, d.study_date, d.patient "
            "FROM dicom_objects d JOIN entries e ON e.path = d.path "
            "WHERE e.state = 'clean' AND e.etag IS NOT NULL AND e.size = d.size ORDER BY d.path")


async def write(cfg: Config, rows: Iterable[Row]) -> dict[str, Any]:
    """Write a snapshot of rows (sorted by path) and make it the current one; → its manifest."""
    prefix = index_prefix(cfg)
    # the rows come from SQLite: read on one thread of their own (a connection stays on its thread), so a
    # snapshot the agent writes never blocks its event loop
    reader, loop = ThreadPoolExecutor(1, thread_name_prefix="snapshot"), asyncio.get_running_loop()
    try:
        async with S3Uplink(cfg.uplink) as s3:
            old = await _manifest(s3, prefix)
            # the deltas written so far hold rows the catalog held before this read of it: the snapshot has them
            folded = await s3.keys(delta_prefix(cfg))
            snap = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{os.urandom(4).hex()}"
            segments, total = [], 0
            it = iter(rows)
            chunks = iter(lambda: list(itertools.islice(it, SEGMENT_ROWS)), [])
            while (chunk := await loop.run_in_executor(reader, next, chunks, None)) is not None:
                key = f"{prefix}{snap}/{len(segments):05d}.json.gz"
                await s3.put_raw(key, await asyncio.to_thread(encode_rows, chunk))
                segments.append(key)
                total += len(chunk)
            manifest = {"snapshot": snap, "rows": total, "segments": segments}
            await s3.put_raw(prefix + "manifest.json", json.dumps(manifest).encode())
            for key in (old or {}).get("segments", []):
                if key.startswith(prefix) and key not in segments:  # only ever our own keys
                    await s3.delete_raw(key)
            for key in folded:
                await s3.delete_raw(key)
            return manifest
    finally:
        if (close := getattr(rows, "close", None)) is not None:
            await loop.run_in_executor(reader, close)  # on the thread that opened the rows' connection
        reader.shutdown(wait=False)


async def scheduled(cfg: Config, active: Callable[[], bool]) -> None:
    """The agent's snapshot every `[dicom] snapshot_interval` (tried again at the next after a failure): written now
    unless active() is False (an HA standby's would replace a full snapshot with an empty one)."""
    if not active():
        log.info("index_snapshot_skipped", reason="HA standby: the active box writes the snapshot")
        return
    t0 = time.monotonic()
    try:
        manifest = await write(cfg, catalog_rows(cfg.catalog_path))
    except Exception as e:  # the line may be down: the next interval tries again
        log.error("index_snapshot_failed", error=error_code(e), detail=str(e)[:300],
                  retry_in=cfg.dicom.snapshot_interval)
        return
    log.info("index_snapshot_written", snapshot=manifest["snapshot"], rows=manifest["rows"],
             segments=len(manifest["segments"]), seconds=round(time.monotonic() - t0, 2))


async def _manifest(s3: S3Uplink, prefix: str) -> dict[str, Any] | None:
    if (data := await s3.get_raw(prefix + "manifest.json", GET_MAX)) is None:
        return None
    if not isinstance(manifest := json.loads(data), dict) or not all(isinstance(k, str) and k.startswith(prefix)
                                                                     for k in manifest.get("segments", [])):
        raise ValueError("manifest.json is not a snapshot manifest")
    return manifest


def valid_row(row: Any) -> bool:
    return (isinstance(row, list) and len(row) == 9 and isinstance(row[0], str) and type(row[1]) is int
            and all(v is None or isinstance(v, str) for v in row[2:]))


async def read(cfg: Config, s3: S3Uplink) -> AsyncGenerator[Row, None]:
    """The current snapshot's rows in path order, prefetching segments; on damage, the rows before it."""
    try:
        manifest = await _manifest(s3, index_prefix(cfg))
    except (NoPlace, ValueError, ClientError) as e:
        log.warning("index_snapshot_unusable", error=str(e)[:300])
        return
    keys = list((manifest or {}).get("segments", []))  # None: no snapshot yet
    nxt = asyncio.create_task(s3.get_raw(keys[0], GET_MAX)) if keys else None
    try:
        for i, key in enumerate(keys):
            assert nxt is not None
            data = await nxt
            nxt = asyncio.create_task(s3.get_raw(keys[i + 1], GET_MAX)) if i + 1 < len(keys) else None
            try:
                rows = await decode_rows(data)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
            for r in rows:
                yield tuple(r)
    except Exception as e:  # a damaged snapshot: the caller HEADs what it does not cover
        log.warning("index_snapshot_unusable", error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        if nxt is not None:
            nxt.cancel()


class Cursor:
    """A merge join of the snapshot's rows and the bucket listing, both in key order; rows None: matches nothing."""

    def __init__(self, rows: AsyncGenerator[Row, None] | None) -> None:
        self.rows, self.cur, self.started = rows, None, rows is None

    async def match(self, path: str, etag: str | None) -> Row | None:
        """The index row (path, size, study, …) of this listed object if the snapshot holds it unchanged."""
        if not self.started:
            self.cur, self.started = await anext(self.rows, None), True
        while self.cur is not None and self.cur[0] < path:
            self.cur = await anext(self.rows, None)
        c = self.cur
        # the ETag names the stored version; the listed size of a compressed object is not the file's, the
        # snapshot's (the catalog's) is
        if c is not None and c[0] == path and etag and bare_etag(c[2]) == bare_etag(etag):
            return (path, c[1], *c[3:])
        return None

    async def aclose(self) -> None:
        """Stop reading segments (the listing ended first): before the client they are read with closes."""
        if self.rows is not None:
            await self.rows.aclose()
