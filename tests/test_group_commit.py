"""Group commit (issue 14, ingest per-file cost): stored files committed by concurrent sessions share one SQLite
transaction and fsync, and still none returns before its row is committed; a member that fails is rolled
back alone. Real SQLite; the catalog's group() is wrapped only to record the group sizes it ran."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from agent.store.catalog import AsyncCatalog, Catalog, outcome
from agent.store.errors import IsADirectory


async def commit_write(db: AsyncCatalog, *args, **kwargs) -> tuple[int, str | None]:
    """A stored file's row, queued into the next group commit as its seal queues it; its result once committed."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str | None]] = loop.create_future()
    db.queue_commit_write(done, loop, *args, **kwargs)
    return await outcome(done)


class Recording(Catalog):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.groups: list[int] = []

    def group(self, calls, durable=True):
        self.groups.append(len(calls))
        return super().group(calls, durable)


async def test_concurrent_commits_share_a_transaction_and_return_only_once_committed(tmp_path):
    path = tmp_path / "catalog.sqlite"
    db = AsyncCatalog(Recording(path))
    await db.mkdir("MR/dir.dcm")  # a directory where one writer wants a file
    reader = sqlite3.connect(str(path))  # another connection sees only committed rows

    async def store(i: int) -> int:
        name = "MR/dir.dcm" if i == 7 else f"MR/{i}.dcm"
        gen, _ = await commit_write(db, name, f"blob{i}", 100 + i, "0" * 64, time.time(), claim=i % 2 == 0)
        assert reader.execute("SELECT gen FROM entries WHERE path = ?", (name,)).fetchone() == (gen,)
        return gen

    results = await asyncio.gather(*(store(i) for i in range(60)), return_exceptions=True)
    assert isinstance(results[7], IsADirectory)
    gens = [g for i, g in enumerate(results) if i != 7]
    assert len(set(gens)) == 59 and all(isinstance(g, int) for g in gens)
    groups = db.catalog.groups
    assert sum(groups) == 60 and max(groups) > 1, groups  # several writes shared a commit
    assert (await db.totals()).files == 59
    assert (await db.get("MR/dir.dcm")).is_dir
    reader.close()
    db.shutdown()


async def test_rows_queued_by_other_threads_join_the_group_and_each_caller_gets_its_own_result(tmp_path):
    """A seal's thread queues its file's row itself (no turn of the event loop between the seal and the commit):
    such rows share a group commit with the loop's own, and each future gets its row's result once committed."""
    path = tmp_path / "catalog.sqlite"
    db = AsyncCatalog(Recording(path))
    await db.mkdir("CT/dir.dcm")
    loop = asyncio.get_running_loop()
    reader = sqlite3.connect(str(path))
    rows: list[asyncio.Future[tuple[int, str | None]]] = [loop.create_future() for _ in range(40)]

    def seal(i: int) -> None:  # as WriteHandle._seal does once the file is durable
        name = "CT/dir.dcm" if i == 3 else f"CT/{i}.dcm"
        db.queue_commit_write(rows[i], loop, name, f"blob{i}", size=10, sha256="0" * 64, mtime=time.time(),
                              claim=False)

    sealed = [loop.run_in_executor(None, seal, i) for i in range(40)]
    own = [commit_write(db, f"MR/{i}.dcm", f"own{i}", 10, "0" * 64, time.time(), claim=False) for i in range(20)]
    await asyncio.gather(*sealed)
    results = await asyncio.gather(*(outcome(r) for r in rows), *own, return_exceptions=True)
    assert isinstance(results[3], IsADirectory)
    done = [r for i, r in enumerate(results) if i != 3]
    assert all(isinstance(r, tuple) for r in done) and len({gen for gen, _ in done}) == 59, done
    stored = dict(reader.execute("SELECT path, blob FROM entries WHERE path LIKE 'CT/%' AND NOT is_dir").fetchall())
    assert stored == {f"CT/{i}.dcm": f"blob{i}" for i in range(40) if i != 3}
    groups = db.catalog.groups
    assert sum(groups) == 60 and max(groups) > 1, groups
    reader.close()
    db.shutdown()
