"""Attacks on a running agent (round 39): what rounds 37 and 38 found and left. One user's stores filling the disk
while the object store is down, the "disk full" reply that did not say why, a directory made over a file being
written, and an SMB end-of-file past the user's share. Each test reproduces one attack that worked and checks it no
longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh, smbprotocol through real Samba)."""

from __future__ import annotations

import asyncio
import time

import asyncssh
import pytest
import smbclient
from clients import ClientError, FtpClient
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb
from test_fault_diskfull import ftp_store_expecting_refusal

from agent.store.catalog import Catalog
from faultkit import catalog_rows, ftp_login, payload, sftp_session, tmpfs
from harness import PASSWORD

MiB = 1024 * 1024
WRITERS = [{"name": name, "password": PASSWORD, "root": "/", "permissions": ["read", "write", "delete", "rename"]}
           for name in ("pacs", "router")]


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


def test_mkdir_over_a_file_being_written_is_refused(agent_factory):
    """mkdir of a name an FTP or SFTP upload was still writing succeeded (the file is in the catalog only from its
    commit on); the upload's close then failed "is a directory", the PACS's file lost. The name exists: FTP 550,
    SFTP a failure, and the upload stores."""
    agent = agent_factory().start()
    ftp = FtpClient(agent)

    async def run() -> None:
        async with sftp_session(agent) as writer, sftp_session(agent) as other:
            async with writer.open("CT/f.dcm", "wb") as f:
                await f.write(b"being written")
                with pytest.raises(asyncssh.SFTPError, match="being written"):
                    await other.mkdir("CT/f.dcm")
                with pytest.raises(ClientError, match="550 .*being written"):
                    ftp.mkdir("CT/f.dcm")
            assert await other.listdir("CT") == ["f.dcm"]
            async with other.open("CT/f.dcm", "rb") as f:
                assert await f.read() == b"being written"

    try:
        asyncio.run(run())
    finally:
        ftp.close()


def test_smb_mkdir_over_a_file_an_sftp_upload_is_writing_is_a_name_collision(smb_agent):
    """The same over SMB: smbd found no such name (the file is not stored yet) and made the directory."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)

    async def run() -> None:
        async with sftp_session(agent) as writer:
            async with writer.open("f.dcm", "wb") as f:
                await f.write(b"being written")
                with pytest.raises(SMBOSError) as refused:
                    await asyncio.to_thread(smbclient.mkdir, smb.p("f.dcm"), **smb.kw)
                assert refused.value.ntstatus == NtStatus.STATUS_OBJECT_NAME_COLLISION

    try:
        asyncio.run(run())
        assert smb.read("f.dcm") == b"being written"
    finally:
        smb.close()


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
