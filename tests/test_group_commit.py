"""Group commit (issue 14, ingest per-file cost): stored files committed by concurrent sessions share one SQLite
transaction and fsync, and still none returns before its row is committed; a member that fails is rolled
back alone. Real SQLite; the catalog's group() is wrapped only to record the group sizes it ran."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.errors import IsADirectory


class Recording(Catalog):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.groups: list[int] = []

    def group(self, calls):
        self.groups.append(len(calls))
        return super().group(calls)


async def test_concurrent_commits_share_a_transaction_and_return_only_once_committed(tmp_path):
    path = tmp_path / "catalog.sqlite"
    db = AsyncCatalog(Recording(path))
    await db.mkdir("MR/dir.dcm")  # a directory where one writer wants a file
    reader = sqlite3.connect(str(path))  # another connection sees only committed rows

    async def store(i: int) -> int:
        name = "MR/dir.dcm" if i == 7 else f"MR/{i}.dcm"
        gen, _ = await db.commit_write(name, f"blob{i}", 100 + i, "0" * 64, time.time(), claim=i % 2 == 0)
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
