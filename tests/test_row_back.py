"""A stored file's row handed back to a callable (issue 14, the write-back ack): the seal's thread queues the row with
a callable instead of a future, and the catalog runs it on the caller's loop with the row's result, or its failure,
in the turn that result arrives, so the rest of the commit (WriteHandle._row_back) and the wake-up of the client's
ack are one turn of the loop instead of two. Real SQLite; turns are counted, not timed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

from agent.store.catalog import AsyncCatalog, Catalog, failure
from agent.store.errors import IsADirectory, NoSpace


async def test_a_rows_callable_runs_on_the_loop_once_committed_and_its_waiter_wakes_the_next_turn(tmp_path):
    path = tmp_path / "catalog.sqlite"
    db = AsyncCatalog(Catalog(path))
    await db.mkdir("CT/dir.dcm")  # a directory where one writer wants a file
    loop = asyncio.get_running_loop()
    reader = sqlite3.connect(str(path))
    turns = 0

    def tick() -> None:
        nonlocal turns
        turns += 1
        loop.call_soon(tick)

    seen: dict[str, tuple[int, object, bool, bool]] = {}
    made = {name: loop.create_future() for name in ("CT/a.dcm", "CT/dir.dcm")}

    def then(name: str, result: object) -> None:  # as WriteHandle._row_back: the rest of the commit, then the ack
        committed = reader.execute("SELECT 1 FROM entries WHERE path = ? AND NOT is_dir", (name,)).fetchone()
        seen[name] = (turns, result, threading.current_thread() is threading.main_thread(), committed is not None)
        made[name].set_result(None)

    def seal(name: str) -> None:
        db.queue_commit_write(lambda result: then(name, result), loop, name, "blob-" + name[3], size=10,
                              sha256="0" * 64, mtime=time.time(), claim=False)

    async def ack(name: str) -> int:  # the client's ack waiting for the commit: the turn it wakes in
        await made[name]
        return turns

    acks = {name: asyncio.ensure_future(ack(name)) for name in made}
    loop.call_soon(tick)
    await asyncio.gather(*(loop.run_in_executor(None, seal, name) for name in made))
    woke = {name: await asyncio.wait_for(task, 30) for name, task in acks.items()}  # a lost result: fail, not hang
    for name, (ran, result, on_loop, committed) in seen.items():
        assert on_loop and woke[name] == ran + 1, (woke, seen)
        if name == "CT/a.dcm":
            assert isinstance(result, tuple) and committed  # (gen, replaced blob), after the COMMIT
        else:
            assert isinstance(result, IsADirectory) and not committed  # a failure comes as the exception
    assert set(seen) == set(made)
    reader.close()
    db.shutdown()


def test_failure_is_what_an_awaiting_caller_would_see():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    seen = failure(full)
    assert isinstance(seen, NoSpace) and seen.__cause__ is full
    other = IsADirectory("CT/dir.dcm")
    assert failure(other) is other
