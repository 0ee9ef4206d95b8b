"""Attacks on a running agent (round 37): names across the three protocols, SFTP beyond plain transfers, and
renames or deletes of files whose upload is on the wire. Each test reproduces one attack that worked and checks it
no longer does. Real agent, real SeaweedFS, real clients (asyncssh, ftplib, smbprotocol through real Samba)."""

from __future__ import annotations

import asyncio

import pytest
from clients import BadName, FtpClient, SftpClient
from faultkit import sftp_session
from harness import s3_objects, sha256


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
