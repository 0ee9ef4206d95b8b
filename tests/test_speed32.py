"""A write-back ack without a directory fsync (issue 14, docs/benchmarks.md §38): a spare is made in data/<xx> with
its directory entry fsynced ahead, a batch at a time off the ack's path, and a second link in spare/ that marks it
unused; its commit is the file's stamp and fsync, in place. What must hold: a spare is durable in data/ before any
write takes it; an acknowledged file is never taken for an unused spare, at start-up after a crash or by
`fsck --repair`; an unused spare is never taken for an orphan. Real files, real SQLite; a power cut cannot be
produced here, so the fsyncs are recorded (a spy on os.fsync)."""

from __future__ import annotations

import os
import time

import agent.fsck
from agent.fsck import Fsck
from agent.store.cache import _SPARE_MAKER, Cache
from agent.store.catalog import AsyncCatalog, Catalog


def commit(cache: Cache, data: bytes) -> str:
    """A file written and committed through the cache → its blob."""
    blob, fd = cache.new_staging()
    os.write(fd, data)
    cache.commit(blob, fd)
    os.close(fd)
    return blob


def settled(cache: Cache) -> dict[int, str]:
    """inode → name of the spare files, once the maker thread has done what it was asked."""
    _SPARE_MAKER.submit(lambda: None).result()
    return {e.inode(): e.name for e in os.scandir(cache.spare)}


def test_a_spare_s_entry_is_durable_before_it_is_taken_and_its_commit_flushes_the_file_only(tmp_path, synced):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])  # starts the maker
    ready = settled(cache)
    parents = {os.path.dirname(cache.blob_file(name)) for name in ready.values()}
    assert parents <= set(synced) and str(tmp_path / "data") in synced  # each data/<xx> new: data/ too
    dir_syncs = [p for p in synced if p in parents]
    assert len(dir_syncs) == len(parents) < len(ready)  # a batch's spares share one data/<xx> and one fsync
    synced.clear()
    blob, fd = cache.new_staging()
    assert blob in ready.values()
    os.write(fd, b"an acknowledged file")
    spare_link = cache.spare / blob
    cache.commit(blob, fd)
    assert synced == [f"{cache.spare}/{blob} (deleted)"], synced  # no directory: the file's own fsync, its link gone
    assert not spare_link.exists() and os.fstat(fd).st_nlink == 1
    os.close(fd)
    with open(cache.blob_file(blob), "rb") as f:
        assert f.read() == b"an acknowledged file"


def test_start_up_keeps_a_committed_spare_a_crash_left_marked_and_drops_unused_and_unfinished_ones(tmp_path):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])
    ready = settled(cache)
    acked = commit(cache, b"acknowledged")
    os.link(cache.blob_file(acked), cache.spare / acked)  # the crash came before its spare/ link's removal was durable
    unfinished, fd = cache.new_staging()
    os.write(fd, b"half a file, never acknowledged")
    os.close(fd)
    Cache(tmp_path)  # the agent starts again
    assert os.listdir(tmp_path / "spare") == []
    with open(cache.blob_file(acked), "rb") as f:
        assert f.read() == b"acknowledged"
    gone = [name for name in ready.values() if name != acked]
    assert unfinished in gone and not any(os.path.exists(cache.blob_file(name)) for name in gone)


async def test_fsck_repair_leaves_spares_and_removes_only_orphans(tmp_path, monkeypatch):
    monkeypatch.setattr(agent.fsck, "ORPHAN_AGE_SECONDS", -60)  # every file counts as old: only the checks decide
    cache = Cache(tmp_path / "cache")
    os.close(cache.new_staging()[1])
    ready = settled(cache)
    stored = commit(cache, b"stored")
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.commit_write("MR/a.dcm", stored, 6, "0" * 64, time.time(), claim=False)
    orphan = "ab" + "0" * 30
    os.makedirs(os.path.dirname(cache.blob_file(orphan)), exist_ok=True)
    open(cache.blob_file(orphan), "wb").close()
    fsck = Fsck(None, remote=False, repair=True, progress=False)  # type: ignore[arg-type]
    fsck.db, fsck.cache = AsyncCatalog(catalog), cache
    try:
        await fsck._orphans()
    finally:
        fsck.db.shutdown()
    assert fsck.report.orphans == 1 and not os.path.exists(cache.blob_file(orphan))
    assert os.path.exists(cache.blob_file(stored))
    unused = [name for name in ready.values() if name != stored]
    assert unused and all(os.path.exists(cache.blob_file(name)) for name in unused)
