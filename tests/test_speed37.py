"""The ingest's per-file catalog statements (docs/benchmarks.md §43), counted by an sqlite3 trace callback on the real
catalog: a stored file's ancestors are read in one statement; the dispatcher's due rows are claimed in one
transaction, each by one claimer even with two processes' connections claiming at once; finished uploads that wait
for the catalog thread together are marked clean in one transaction."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.errors import NotADirectory


def store(cat: Catalog, path: str) -> int:
    return cat.commit_write(path, f"blob-{path}", 10, "ab" * 32, time.time(), claim=False)[0]


def test_a_stored_files_ancestors_are_read_in_one_statement(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    store(cat, "CT/2026/s1/a.dcm")
    statements: list[str] = []
    cat.db.set_trace_callback(statements.append)
    store(cat, "CT/2026/s1/b.dcm")
    store(cat, "CT/2026/s2/c.dcm")  # one ancestor new
    reads = [s for s in statements if s.startswith("SELECT") and "FROM entries WHERE path IN" in s]
    assert len(reads) == 2, statements
    assert not [s for s in statements if s.startswith("SELECT is_dir")], statements
    assert cat.get("CT/2026/s2").is_dir
    with pytest.raises(NotADirectory):
        store(cat, "CT/2026/s1/a.dcm/x.dcm")  # a file among the ancestors still refuses
    cat.close()


def test_due_rows_are_claimed_in_one_transaction_each_by_one_claimer(tmp_path):
    path = tmp_path / "catalog.sqlite"
    first, second = Catalog(path), Catalog(path)  # two processes' connections to one catalog
    names = [f"MR/{i}.dcm" for i in range(120)]
    for name in names:
        store(first, name)
    begins = [0, 0]
    for i, cat in enumerate((first, second)):
        cat.db.set_trace_callback(lambda s, i=i: begins.__setitem__(i, begins[i] + (s == "BEGIN IMMEDIATE")))
    claimed: list[Counter[str]] = [Counter(), Counter()]
    batches = [0, 0]

    def claimer(i: int, cat: Catalog) -> None:
        while rows := cat.claim_due(time.time(), 7):
            assert all(e.state == "uploading" for e in rows)
            claimed[i].update(e.path for e in rows)
            batches[i] += 1

    threads = [threading.Thread(target=claimer, args=(i, cat)) for i, cat in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert claimed[0] + claimed[1] == Counter(names)  # every row once, by one of the two
    assert begins == [b + 1 for b in batches]  # one transaction per batch (and the last, empty, look)
    assert not first.due_uploads(time.time(), 10)
    first.close()
    second.close()


async def test_finished_uploads_waiting_together_are_marked_clean_in_one_transaction(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    names = [f"CT/{i}.dcm" for i in range(8)]
    gens = {name: store(cat, name) for name in names}
    assert all(cat.claim(name, gen) for name, gen in gens.items())
    db = AsyncCatalog(cat)
    try:
        loop = asyncio.get_running_loop()
        busy, release = threading.Event(), threading.Event()
        held = loop.create_future()
        db.join_group(lambda: busy.set() or release.wait(10), held, loop)  # the catalog thread is busy (an fsync)
        assert await asyncio.to_thread(busy.wait, 10)
        statements: list[str] = []
        cat.db.set_trace_callback(statements.append)
        marks = [asyncio.ensure_future(db.mark_clean(name, gen, f'"{name}"', None, "ab" * 32, ()))
                 for name, gen in gens.items()]
        await asyncio.sleep(0)  # each has joined the batch
        release.set()
        assert await asyncio.gather(*marks) == [True] * len(names)
        assert statements.count("BEGIN IMMEDIATE") == 1, statements
        assert statements.count("PRAGMA synchronous=FULL") == 0  # not a durable group: no fsync to wait for
        assert {db.row(n).state for n in names} == {"clean"}
        # a row written again meanwhile (another gen) is not marked
        gen = store(cat, names[0])
        assert await db.mark_clean(names[0], gen - 1, '"old"', None, "ab" * 32, ()) is False
        assert db.row(names[0]).state == "dirty"
    finally:
        release.set()
        db.shutdown()
