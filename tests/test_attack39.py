"""Attacks on a running agent (round 39): what rounds 37 and 38 found and left. One user's stores filling the disk
while the object store is down, the "disk full" reply that did not say why, and an SMB end-of-file past the user's
share (a directory made over a file being written: test_conformance, every protocol). Each test reproduces one attack
that worked and checks it no longer does. Real agent, real SeaweedFS, real clients (ftplib, smbprotocol, Samba)."""

from __future__ import annotations

import asyncio
import time

import pytest
import smbclient
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb
from test_fault_diskfull import ftp_store_expecting_refusal

from agent.store.catalog import Catalog
from faultkit import catalog_rows, ftp_login, payload, tmpfs
from harness import PASSWORD

MiB = 1024 * 1024
WRITERS = [{"name": name, "password": PASSWORD, "root": "/", "permissions": ["read", "write", "delete", "rename"]}
           for name in ("pacs", "router")]


def test_one_users_backlog_while_the_store_is_down_leaves_the_others_room(agent_factory, private_seaweed):
    """With the object store down, stored files wait on the disk and cannot be evicted: a router re-sending a
    backlog took 20 GiB of them on a box with max_bytes = 40MB, and every other user's store was then refused. With
    cache.max_dirty_per_user = 25 % it is refused "disk full" (452) past a quarter of the cache, logged with its user
    and bytes, also for files renamed into place (x.part → x); the other user still stores, and nothing acknowledged
    is dropped."""
    private_seaweed.stop()  # down from the start: every file stays dirty
    agent = agent_factory(private_seaweed, users=WRITERS, **{"cache.max_bytes": "40MB",
                                                              "cache.max_dirty_per_user": "25%"}).start()
    router = ftp_login(agent, "router")
    acked, refusal = [], ""
    for i in range(20):
        reply = ftp_store_expecting_refusal(router, f"bk/{i}.part", payload(i, MiB))
        if not reply.startswith("226"):
            refusal = reply
            break
        router.rename(f"bk/{i}.part", f"bk/{i}.dcm")
        acked.append(f"bk/{i}.dcm")
    assert refusal.startswith("452") and "max_dirty_per_user" in refusal, refusal
    assert len(acked) == 9  # a quarter of 40 MB in 1 MiB files
    [told] = agent.events("dirty_limit")[:1]
    assert told["user"] == "router" and told["dirty_bytes"] == len(acked) * MiB and told["limit"] == 10_000_000
    pacs = ftp_login(agent)
    assert ftp_store_expecting_refusal(pacs, "CT/x.dcm", payload("x", 4 * MiB)).startswith("226")
    assert ftp_store_expecting_refusal(router, "bk/late.dcm", payload("late", MiB)).startswith("452")
    assert sorted(router.nlst("bk")) == sorted(p.split("/")[1] for p in acked)  # acknowledged files all kept
    rows = catalog_rows(agent, "SELECT user, bytes FROM dirty_bytes ORDER BY user")
    assert rows == [("pacs", 4 * MiB), ("router", len(acked) * MiB)]
    pacs.quit()
    router.quit()


def test_a_catalog_from_before_the_writer_column_gets_it_and_counts_each_users_files_not_yet_uploaded(tmp_path):
    """entries.writer and the dirty_bytes totals come with round 39: a catalog without them gets them when opened,
    its files stored before count for nobody; each store, replacement, rename and upload after keeps the totals."""
    path = tmp_path / "c.sqlite"
    c = Catalog(path)
    c.db.executescript("DROP TRIGGER dirty_ins; DROP TRIGGER dirty_del; DROP TRIGGER dirty_upd; DROP TABLE dirty_bytes;"
                       "ALTER TABLE entries DROP COLUMN writer")  # as an earlier release left it
    c.db.execute("INSERT INTO entries (path, parent, name, is_dir, size, mtime, state, blob) "
                 "VALUES ('CT/old.dcm', 'CT', 'old.dcm', 0, 7, 1.0, 'dirty', 'b0')")
    c.close()
    c = Catalog(path)
    totals = lambda: dict(c.db.execute("SELECT user, bytes FROM dirty_bytes WHERE bytes != 0").fetchall())  # noqa
    try:
        gen, _ = c.commit_write("CT/a.part", "b1", 100, "ab" * 32, time.time(), claim=False, writer="router")
        c.commit_write("CT/b.dcm", "b2", 10, "ab" * 32, time.time(), claim=True, writer="pacs")
        assert totals() == {"router": 100, "pacs": 10}
        c.rename("CT/a.part", "CT/a.dcm")  # x.part → x: still the router's
        c.commit_write("CT/b.dcm", "b3", 30, "ab" * 32, time.time(), claim=False, writer="router")  # replaced
        assert totals() == {"router": 130}
        gen = c.get("CT/a.dcm").gen
        c.claim("CT/a.dcm", gen)
        c.mark_clean("CT/a.dcm", gen, "e1", None, "ab" * 32)
        c.delete("CT/b.dcm")
        c.delete("CT/old.dcm")
        assert totals() == {}
    finally:
        c.close()


@pytest.mark.skipif("os.geteuid() != 0", reason="needs root to mount a small tmpfs")
async def test_disk_full_while_the_store_is_down_says_why(agent_factory, private_seaweed):
    """The disk filled with files waiting for the unreachable store: FTP answered "452 cache disk full and nothing
    evictable" and the admin reading the PACS's log could not tell a failing SSD from an outage. The reply names the
    files waiting and since when the store is unreachable."""
    private_seaweed.stop()
    agent = agent_factory(private_seaweed, **{"cache.min_free_bytes": "4MB"})
    with tmpfs(agent.workdir / "cache", "32m"):
        try:
            await asyncio.to_thread(agent.start)
            ftp = await asyncio.to_thread(ftp_login, agent)
            reply, n = "", 0
            while not reply.startswith("452") and n < 100:
                reply = await asyncio.to_thread(ftp_store_expecting_refusal, ftp, f"CT/{n}.dcm",
                                                payload(n, 2 * MiB))
                n += 1
            assert reply.startswith("452 cache disk full and nothing evictable: "), reply
            assert f"{n - 1} files not yet in object storage: the object store is unreachable since 20" in reply
            await asyncio.to_thread(ftp.quit)
        finally:
            await asyncio.to_thread(agent.stop)


def test_smb_end_of_file_past_the_users_share_is_disk_full_and_the_file_intact(smb_agent):
    """An SMB client setting a file's end-of-file past its user's share for unfinished uploads: smbd's ftruncate
    was refused, it then wrote the last byte itself (Samba's fallback for file systems that cannot extend by
    ftruncate), that write failed, the handle was discarded and its close answered IO_DEVICE_ERROR. The set is
    DISK_FULL, the handle lives on, its close succeeds and the stored file is unchanged."""
    agent = smb_agent(**{"cache.max_bytes": "16MB"}).start(timeout=180)
    smb = Smb(agent)
    try:
        data = payload("eof", MiB)
        smb.write("f.dcm", data)
        f = smbclient.open_file(smb.p("f.dcm"), mode="r+b", **smb.kw)
        with pytest.raises(SMBOSError) as refused:
            f.truncate(12 * MiB)  # a quarter of 16 MB is the user's share
        assert refused.value.ntstatus == NtStatus.STATUS_DISK_FULL
        f.close()
        assert smb.read("f.dcm") == data
    finally:
        smb.close()
