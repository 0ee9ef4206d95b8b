"""Attacks on a running agent (round 37): names across the three protocols, SFTP beyond plain transfers, and
renames or deletes of files whose upload is on the wire. Each test reproduces one attack that worked and checks it
no longer does. Real agent, real SeaweedFS, real clients (asyncssh, ftplib, smbprotocol through real Samba)."""

from __future__ import annotations

import asyncio
import threading
import time

import asyncssh
import pytest
from clients import BadName, FtpClient, SftpClient
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbutil import Smb
from test_smb_hostile import logged_in_tree

from agent.serve.sftp import MAX_CHANNELS_PER_USER
from faultkit import sftp_put, sftp_session
from harness import PASSWORD, s3_objects, sha256


def test_an_empty_write_past_the_end_does_not_give_the_file_a_size_it_has_no_bytes_for(agent_factory):
    """An SFTP WRITE of no bytes at an offset past the end (pwrite(2) of nothing: the file is not extended) set the
    file's size to that offset while its staging file kept its 3 bytes. The CLOSE was answered OK, then every read
    failed ('cached copy size mismatch and not yet in object storage') and every upload (ChecksumMismatch), retried
    for ever: an acknowledged file nobody could read. Such a write changes nothing now."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as sftp:
            async with sftp.open("CT/a.dcm", "wb") as f:
                await f.write(b"abc", 0)
                await f.write(b"", 1_000_000)
                assert (await f.stat()).size == 3
            assert (await sftp.stat("CT/a.dcm")).size == 3
            async with sftp.open("CT/a.dcm", "rb") as f:
                assert await f.read() == b"abc"

    asyncio.run(run())
    agent.wait_drained(30)
    objects = s3_objects(agent.store, agent.prefix)
    assert {k: (o["size"], o["sha256"]) for k, o in objects.items()} == {"CT/a.dcm": (3, sha256(b"abc"))}
    assert not agent.events("upload_failed")


def test_every_device_name_windows_reserves_is_refused(agent_factory):
    """Windows reads the superscripts ¹ ² ³ as digits in device names, and reserves the console's CONIN$ and
    CONOUT$ (CPython's ntpath.isreserved lists the same): 'COM¹.dcm', 'LPT³' and 'conin$' were stored over FTP and
    SFTP and listed over SMB, where no Windows client can open or delete them. They are refused like 'COM1' now."""
    agent = agent_factory().start()
    names = ["COM\u00b9.dcm", "lpt\u00b3", "conin$", "CONOUT$.txt"]
    ftp = FtpClient(agent)
    sftp = SftpClient(agent)
    try:
        for name in names:
            with pytest.raises(BadName):
                ftp.put(name, b"x")
            with pytest.raises(BadName):
                sftp.put(name, b"x")
            with pytest.raises(BadName):
                ftp.mkdir(name)
        ftp.put("COM10.dcm", b"x")  # not a device
        with pytest.raises(BadName):
            sftp.rename("COM10.dcm", names[0])
        assert ftp.list("") == ["COM10.dcm"]
    finally:
        ftp.close()
        sftp.close()


def test_channels_of_connections_dropped_while_opening_them_are_not_counted_for_ever(agent_factory):
    """A channel is counted against its user's MAX_CHANNELS_PER_USER when the client asks for it, and uncounted when
    its session ends. A connection that went while its channel opens were still being admitted never had those
    sessions (asyncssh drops such a channel unopened), so they were never uncounted: a client (or a PACS on a flaky
    link) that opened channels and dropped its connection 64 times locked its user out of SFTP ('too many channels
    for this user') until the agent restarted."""
    agent = agent_factory().start()

    async def dropped_while_opening(turns: int) -> None:
        conn = await asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                      known_hosts=None, client_keys=None)
        opening = [asyncio.ensure_future(conn.start_sftp_client()) for _ in range(10)]
        for _ in range(turns):  # the channel opens are sent, not yet answered
            await asyncio.sleep(0)
        conn.abort()
        await asyncio.gather(*opening, return_exceptions=True)

    async def run() -> None:
        for i in range(3 * MAX_CHANNELS_PER_USER // 10):
            await dropped_while_opening(1 + i % 4)
        async with sftp_session(agent) as sftp:
            await sftp_put(sftp, "CT/a.dcm", b"still served")

    asyncio.run(run())
    assert not [e for e in agent.events("session_refused") if "channels" in e.get("reason", "")]


def _closing(tree, name: str, size: int) -> threading.Thread:
    """Write `size` bytes to a new file `name`, sharing deletes (another client may rename or delete it), the last
    MiB first: out of order, so its close hashes all of it (the commit takes a while). → the thread sending its
    CLOSE, started."""
    f = Open(tree, name)
    f.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.GENERIC_WRITE, 0x80,
             ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE,
             CreateDisposition.FILE_CREATE, CreateOptions.FILE_NON_DIRECTORY_FILE)
    mib = 2**20
    f.write(b"z" * mib, size - mib)
    for off in range(0, size - mib, 4 * mib):
        f.write(b"y" * min(4 * mib, size - mib - off), off)
    closing = threading.Thread(target=f.close)
    closing.start()
    return closing


def _while_closing(act, closing: threading.Thread) -> None:
    """act() while a close commits the file: refused as a sharing violation until the file's row is in the catalog,
    then, while the close's upload still holds the file, as access denied ('being written by another upload', round
    40); done again once the close has ended, answered at once after it."""
    try:
        act()
    except SMBOSError as e:
        assert e.ntstatus in (NtStatus.STATUS_SHARING_VIOLATION, NtStatus.STATUS_ACCESS_DENIED)
        closing.join()
        act()
    closing.join()


def test_a_file_renamed_or_deleted_while_its_close_commits_it_stays_renamed_or_deleted(smb_agent):
    """Samba drops a closing open's share mode before its close(2), which commits the file (FUSE flush): the fsync,
    the catalog row and, in write-through, the PUT. Another client could rename or delete the file meanwhile; both
    were answered success. A rename before the row was in the catalog moved only the FUSE layer's view: the row was
    committed under the old name and its write-through upload went to the new one, found no row there and was
    skipped, so the CLOSE's ack came with the file in S3 under no name (its row claimed for an upload that never ran,
    until a restart), and the rename was lost. A delete then found no row and removed nothing: the file came back.
    Both are a sharing violation until the row is in (the client tries again), and act on the row after it."""
    agent = smb_agent().start(timeout=180)
    conn, tree = logged_in_tree(agent, Smb(agent))
    other = Smb(agent)
    size = 160 * 2**20
    try:
        closing = _closing(tree, "renamed.dcm", size)
        time.sleep(0.1)  # the CLOSE is being served: its commit hashes 160 MiB
        _while_closing(lambda: other.rename("renamed.dcm", "moved.dcm"), closing)
        closing = _closing(tree, "deleted.dcm", size)
        time.sleep(0.1)
        _while_closing(lambda: other.remove("deleted.dcm"), closing)
        assert other.listdir("") == ["moved.dcm"]
        agent.wait_drained(60)
        assert {k: o["size"] for k, o in s3_objects(agent.store, agent.prefix).items()} == {"moved.dcm": size}
    finally:
        other.close()
        conn.disconnect()
