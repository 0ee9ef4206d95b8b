"""Staging files made ahead (agent.store.cache SPARES): a cold read's fetch makes its staging file on the event loop,
and an ext4 create under other processes' churn cost 132-444 µs of the loop there; a spare is made in data/<xx>
with a second link in spare/ and committed in place. Real files on the real disk."""

from __future__ import annotations

import os

import pytest

from agent.store.cache import _SPARE_MAKER, SPARES, Cache


def settled(cache: Cache) -> dict[int, str]:
    """inode → name of the spare files, once the maker thread has done what it was asked."""
    _SPARE_MAKER.submit(lambda: None).result()  # one thread, in order: every earlier top-up has finished
    return {e.inode(): e.name for e in os.scandir(cache.spare)}


def test_staging_files_are_spares_made_ahead_in_data_and_committed_in_place(tmp_path):
    cache = Cache(tmp_path)
    first, fd = cache.new_staging()  # the maker starts (this one is made in staging/, or is its first spare)
    os.close(fd)
    ready = settled(cache)
    assert SPARES - 1 <= len(ready) <= SPARES
    assert all(os.stat(cache.blob_file(name)).st_ino == ino for ino, name in ready.items())  # the same inode
    blob, fd = cache.new_staging()
    assert ready[os.fstat(fd).st_ino] == blob  # a spare itself, not a new inode
    assert set(os.listdir(cache.staging)) <= {first} and os.fstat(fd).st_nlink == 2
    os.write(fd, b"a fetched copy")
    cache.commit(blob, fd, durable=False)
    assert os.fstat(fd).st_nlink == 1 and blob not in os.listdir(cache.spare)  # a committed file, not a spare
    os.close(fd)
    with open(cache.blob_file(blob), "rb") as f:
        assert f.read() == b"a fetched copy"
    taken = dict(cache.new_staging() for _ in range(SPARES * 2))  # past the spares: each blob once
    for fd in taken.values():
        os.close(fd)
    assert len(taken) == SPARES * 2 and blob not in taken


def test_spares_are_cleared_at_start_and_made_only_by_its_owner(tmp_path):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])
    ready = settled(cache)
    assert ready
    worker = Cache(tmp_path, clear_staging=False)  # a serving worker, fsck: the owner's spares stay its own
    blob, fd = worker.new_staging()
    os.close(fd)
    assert settled(cache) == ready and blob in os.listdir(cache.staging)
    Cache(tmp_path)  # the owner starts again: unacknowledged writes and spares go, from spare/ and from data/
    assert os.listdir(tmp_path / "staging") == [] and os.listdir(tmp_path / "spare") == []
    assert not any(os.path.exists(cache.blob_file(name)) for name in ready.values())


def test_a_spare_s_mark_removed_by_hand_costs_nothing_and_its_file_removed_fails_the_commit(tmp_path):
    cache = Cache(tmp_path)
    os.close(cache.new_staging()[1])
    for name in settled(cache).values():
        os.unlink(cache.spare / name)
    blob, fd = cache.new_staging()
    os.write(fd, b"still written")
    cache.commit(blob, fd, durable=False)
    os.close(fd)
    with open(cache.blob_file(blob), "rb") as f:
        assert f.read() == b"still written"
    blob, fd = cache.new_staging()
    os.unlink(cache.blob_file(blob))  # an unlinked inode: acknowledged, it would be a row without a file
    os.write(fd, b"lost")
    with pytest.raises(FileNotFoundError):
        cache.commit(blob, fd)
    os.close(fd)


def test_spare_staging_hands_out_a_spare_or_nothing_and_never_makes_a_file(tmp_path):
    """What a write's open takes on the event loop (Gateway._open_write): a spare, else None (a thread makes one)."""
    worker = Cache(tmp_path, clear_staging=False)  # makes no spares: always None, nothing created
    assert worker.spare_staging() is None and os.listdir(worker.staging) == []
    assert not any(os.scandir(tmp_path / "data"))
    cache = Cache(tmp_path)
    taken = cache.spare_staging()  # starts the maker (maybe nothing ready yet)
    if taken is not None:
        os.close(taken[1])
    ready = settled(cache)
    blob, fd = cache.spare_staging() or (None, -1)
    assert blob is not None and ready[os.fstat(fd).st_ino] == blob
    os.close(fd)
    assert os.listdir(cache.staging) == []
