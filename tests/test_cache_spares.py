"""Staging files made ahead (agent.store.cache SPARES): a cold read's fetch makes its staging file on the event loop,
and an ext4 create under other processes' churn cost 10-100 µs of the loop there; a spare is renamed into staging/.
Real files on the real disk."""

from __future__ import annotations

import os
import time

from agent.store.cache import SPARES, Cache


def spares(cache: Cache, at_least: int) -> dict[int, str]:
    """inode → name of the spare files, once at least `at_least` are there (the maker thread makes them)."""
    deadline = time.monotonic() + 30
    while True:
        found = {e.inode(): e.name for e in os.scandir(cache.spare)}
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_staging_files_are_spares_made_ahead_renamed_into_staging(tmp_path):
    cache = Cache(tmp_path)
    first, fd = cache.new_staging()  # none ready yet: made in place, and the maker starts
    os.close(fd)
    ready = spares(cache, SPARES)
    assert len(ready) == SPARES
    blob, fd = cache.new_staging()
    ino = os.fstat(fd).st_ino
    assert ready[ino] == blob  # the spare itself, not a new inode
    assert set(os.listdir(cache.staging)) == {first, blob}
    assert blob not in os.listdir(cache.spare)
    os.write(fd, b"a fetched copy")
    cache.commit(blob, fd, durable=False)
    os.close(fd)
    with open(cache.blob_file(blob), "rb") as f:
        assert f.read() == b"a fetched copy"
    taken = {cache.new_staging()[0] for _ in range(SPARES * 2)}  # past the spares: each blob once, all in staging
    assert len(taken) == SPARES * 2 and taken <= set(os.listdir(cache.staging))


def test_spares_are_cleared_with_staging_at_start_and_made_only_by_its_owner(tmp_path):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])
    assert spares(cache, SPARES)
    worker = Cache(tmp_path, clear_staging=False)  # a serving worker, fsck: the owner's spares stay its own
    blob, fd = worker.new_staging()
    os.close(fd)
    assert len(os.listdir(cache.spare)) == SPARES and blob in os.listdir(cache.staging)
    Cache(tmp_path)  # the owner starts again: unacknowledged writes and spares go
    assert os.listdir(tmp_path / "staging") == [] and os.listdir(tmp_path / "spare") == []


def test_a_spare_removed_by_hand_costs_nothing_but_the_spare(tmp_path):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])
    for name in spares(cache, SPARES).values():
        os.unlink(cache.spare / name)
    blob, fd = cache.new_staging()  # made in place instead
    os.write(fd, b"still written")
    cache.commit(blob, fd, durable=False)
    os.close(fd)
    with open(cache.blob_file(blob), "rb") as f:
        assert f.read() == b"still written"
