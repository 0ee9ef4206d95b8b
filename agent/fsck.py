"""`pacsgw fsck` (README, "Checking everything"): the cache, and with --remote S3, against the catalog; --repair.

Safe while the agent runs: its own catalog connection, the agent's conditional updates (a row changed meanwhile
is left alone), and only orphan cache files older than an hour are removed. A damaged copy of a file not yet in
S3 is LOST; a compressed object is read whole and decoded, and one recorded with its stored size gets the file's.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import structlog
from tqdm import tqdm

from agent.config import Config
from agent.records import Entry
from agent.store.cache import Cache
from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.fetch import download
from agent.uplink.encoding import Undecodable, encoding_of, logical_size
from agent.uplink.s3 import S3Uplink, meta_sha

log = structlog.get_logger("pacsgw.fsck")

ORPHAN_AGE_SECONDS = 3600
PAGE = 500


@dataclass
class FsckReport:
    files: int = 0
    verified_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)
    remote_missing: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)  # a compressed object's listed size in the catalog
    resized: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    orphans: int = 0

    @property
    def exit_code(self) -> int:
        """0 all good, 1 problems found (repaired or repairable), 2 data that cannot be recovered here."""
        if self.lost:
            return 2
        return 1 if self.corrupt or self.remote_missing or self.wrong_size or self.orphans else 0


class Fsck:
    def __init__(self, cfg: Config, *, remote: bool, repair: bool, progress: bool = True) -> None:
        self.cfg, self.remote, self.repair, self.progress = cfg, remote, repair, progress
        self.report = FsckReport()

    async def run(self) -> FsckReport:
        self.db = AsyncCatalog(await asyncio.to_thread(Catalog, self.cfg.catalog_path))
        self.cache = Cache(self.cfg.cache.dir, clear_staging=False)
        try:
            async with S3Uplink(self.cfg.uplink) as self.s3:
                totals = await self.db.totals()
                with tqdm(total=totals.files, unit="file", disable=not self.progress, desc="fsck") as bar:
                    last = ""
                    while page := await self.db.files_after(last, PAGE):
                        for e in page:
                            self.report.files += 1
                            good_copy = e.blob is not None and await self._verify_cached(e)
                            if self.remote and e.state == "clean":
                                await self._verify_remote(e, good_copy)
                            bar.update(1)
                        last = page[-1].path
                await self._orphans()
        finally:
            await asyncio.to_thread(self.db.shutdown)
        return self.report

    async def _verify_cached(self, e: Entry) -> bool:
        fd, problem = await asyncio.to_thread(self.cache.open_verified, e.blob, e.sha256)
        if fd is not None:
            os.close(fd)
            self.report.verified_bytes += e.size
            return True
        self.report.corrupt.append(e.path)
        if e.state != "clean":
            self.report.lost.append(e.path)
            log.critical("fsck_lost", path=e.path, problem=problem, state=e.state,
                         detail="the only copy is damaged and it never reached object storage")
            return False
        log.error("fsck_corrupt_copy", path=e.path, problem=problem, repair=self.repair)
        if self.repair and await self.db.drop_corrupt(e.path, e.blob):
            self.cache.remove(e.blob)
            await self._refetch(e)
        return False

    async def _refetch(self, e: Entry) -> None:
        blob, fd = self.cache.new_staging()
        try:
            sha = await download(self.s3, self.cache, e, blob, fd)
        except Exception as exc:  # reported; the next read fetches it again anyway
            self.cache.discard_staging(blob)
            log.error("fsck_refetch_failed", path=e.path, error=str(exc)[:300])
            return
        finally:
            os.close(fd)
        if await self.db.set_cached(e.path, e.gen, blob, sha):
            self.report.refetched.append(e.path)
        else:
            self.cache.remove(blob)

    async def _verify_remote(self, e: Entry, good_copy: bool) -> None:
        head = await self.s3.head(e.path)
        problem = "missing" if head is None else "different"
        if head is not None:
            try:
                remote_sha, size = meta_sha(head.get("Metadata")), logical_size(head)
                if encoding_of(head.get("Metadata")) is not None and e.size in (size, head["ContentLength"]):
                    listed, (size, remote_sha) = e.size != size, await self.s3.decoded_sha256(e.path)
                    if listed and remote_sha == (e.sha256 or meta_sha(head.get("Metadata"))):
                        await self._listed_size(e, size)
                        return
            except Undecodable as exc:
                size, remote_sha, problem = -1, None, f"undecodable ({exc})"
            if size == e.size and (not remote_sha or not e.sha256 or remote_sha == e.sha256):
                return
        self.report.remote_missing.append(e.path)
        if not good_copy:
            self.report.lost.append(e.path)
            log.critical("fsck_lost", path=e.path, problem=f"object {problem} in S3 and not in the cache")
            return
        log.error("fsck_remote_bad", path=e.path, problem=problem, repair=self.repair)
        if self.repair and await self.db.requeue(e.path, e.gen, head.get("ETag") if head else None):
            self.report.requeued.append(e.path)

    async def _listed_size(self, e: Entry, size: int) -> None:
        """The catalog holds a sound compressed object's stored size: reads fail until the row takes the file's."""
        self.report.wrong_size.append(e.path)
        log.error("fsck_listed_size", path=e.path, recorded=e.size, size=size, repair=self.repair)
        if self.repair and await self.db.correct_size(e.path, e.gen, e.size, size):
            self.report.resized.append(e.path)

    async def _orphans(self) -> None:
        cutoff = time.time() - ORPHAN_AGE_SECONDS
        for blob in self.cache.iter_blobs():
            if await self.db.blob_referenced(blob):
                continue
            try:
                st = os.stat(self.cache.blob_file(blob))
                # A spare (linked in spare/ too), or perhaps being committed right now: a write, its stamp or its spare/
                # link's removal sets ctime (an empty file's mtime is its spare's making, maybe hours ago)
                if st.st_nlink > 1 or st.st_ctime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            self.report.orphans += 1
            if self.repair:
                self.cache.remove(blob)
