"""A committed (acknowledged) file's cached copy survives a power cut: the file, its directory data/<xx> and that
directory's own entry in data/ are fsynced before commit returns. A power cut cannot be produced here: the test
records which files and directories are fsynced (a spy on os.fsync), on a real Cache on the real disk."""

from __future__ import annotations

import os

from agent.store.cache import Cache


def test_a_commit_into_a_new_data_directory_fsyncs_that_directorys_entry(tmp_path, synced):
    cache = Cache(tmp_path, clear_staging=False)  # no spares (a serving worker's): staged, renamed at the commit
    blob, fd = cache.new_staging()
    os.write(fd, b"an acknowledged file")
    cache.commit(blob, fd)
    os.close(fd)
    data = str(tmp_path / "data")
    target = cache.blob_file(blob)
    assert cache.staging_path(blob) in synced and os.path.dirname(target) in synced, synced  # renamed after its fsync
    assert data in synced, "data/<xx> was new: its entry in data/ must be durable too"
    synced.clear()
    blob2 = blob[:2] + "0" * 30  # the same data/<xx>: its entry is durable already, one fsync fewer per file
    fd = os.open(cache.staging_path(blob2), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"another")
    cache.commit(blob2, fd)
    os.close(fd)
    assert data not in synced and os.path.dirname(target) in synced, synced
