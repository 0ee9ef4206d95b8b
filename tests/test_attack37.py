"""Attacks on a running agent (round 37): names across the three protocols, SFTP beyond plain transfers, and
renames or deletes of files whose upload is on the wire. Each test reproduces one attack that worked and checks it
no longer does. Real agent, real SeaweedFS, real clients (asyncssh, ftplib, smbprotocol through real Samba)."""

from __future__ import annotations

import asyncio

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
