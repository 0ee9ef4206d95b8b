"""Hostile clients racing the gateway's own checks (harden3), against a live agent with real clients."""

from __future__ import annotations

import asyncio
import ftplib
import io

import asyncssh
import pytest

from harness import PASSWORD


@pytest.mark.parametrize("guard", ["no delete right", "worm"])
def test_a_writer_cannot_replace_what_another_session_stored_meanwhile(agent_factory, request, guard):
    """A PACS account (no `delete`) may not overwrite a stored file, nobody a WORM-retained one. A client opened a
    new name for writing over SFTP, stored the same name over FTP, then closed the SFTP handle: that commit
    replaced the stored file (the right to replace was checked while the name was still free). Now it is refused
    and the stored file stays, in the namespace and in S3."""
    if guard == "worm":
        bucket = request.getfixturevalue("locked_bucket")
        agent = agent_factory(**{"uplink.bucket": bucket, "compliance.worm": True}).start()
    else:
        agent = agent_factory(users=[{"name": "pacs", "password": PASSWORD,
                                      "permissions": ["read", "write", "rename"]}]).start()
        bucket = agent.bucket

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            early = await sftp.open("CT/a.dcm", "wb")   # the name is free: allowed
            f = ftplib.FTP(timeout=30)
            f.connect("127.0.0.1", agent.ftp_port)
            f.login("pacs", PASSWORD)
            assert f.storbinary("STOR CT/a.dcm", io.BytesIO(b"the stored image")).startswith("226")
            f.quit()
            await early.write(b"forged")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await early.close()
            async with sftp.open("CT/a.dcm", "rb") as r:
                assert await r.read() == b"the stored image"

    asyncio.run(run())
    agent.wait_drained()
    got = agent.store.client().get_object(Bucket=bucket, Key=agent.prefix + "CT/a.dcm")
    assert got["Body"].read() == b"the stored image"
