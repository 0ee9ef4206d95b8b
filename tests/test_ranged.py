"""A cold read at an offset gets its bytes by a ranged GET, not after the whole object streamed in (issue 14).

The line is limited to 4 MB/s (uplink.bwlimit) so the fetch's stream needs seconds to reach the offset:
the `ranged_get` events say where the stream was when the ranged bytes landed.
"""

from __future__ import annotations

import asyncio
import ftplib
import itertools
import os

import asyncssh

from harness import BUCKET, PASSWORD, sha256

MiB = 1024 * 1024


def test_cold_reads_at_an_offset_use_ranged_gets(agent_factory, seaweed):
    prefix = f"ranged{os.getpid()}/"
    objects = {"CT/sftp.dcm": os.urandom(24 * MiB), "CT/ftp.dcm": os.urandom(16 * MiB)}
    client = seaweed.client()
    for path, data in objects.items():  # already in the bucket, as another box wrote them
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=data, Metadata={"sha256": sha256(data)})
    agent = agent_factory(seaweed, prefix=prefix, **{"uplink.bwlimit": "4MB"}).start()

    # SFTP: 5 MiB read sequentially from 12 MiB, as a viewer seeking into a multi-frame object does
    data = objects["CT/sftp.dcm"]
    start, length, block = 12 * MiB, 5 * MiB, 256 * 1024

    async def sftp_read() -> bytes:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("CT/sftp.dcm", "rb") as fh:
                parts = []
                for pos in range(start, start + length, block):
                    await fh.seek(pos)
                    parts.append(await fh.read(block))
                return b"".join(parts)

    got = asyncio.run(sftp_read())
    assert got == data[start:start + length]
    assert "CT/sftp.dcm" not in {e["path"] for e in agent.events("fetched")}  # the whole object had not landed
    ranged = [e for e in agent.events("ranged_get") if e["path"] == "CT/sftp.dcm"]
    assert ranged[0]["offset"] == start and ranged[0]["stream_at"] < start
    # read-ahead: each next ranged GET starts where the last ended, and they grow
    assert len(ranged) >= 2
    assert all(b["offset"] == a["offset"] + a["bytes"] for a, b in itertools.pairwise(ranged))
    assert ranged[1]["bytes"] > ranged[0]["bytes"]

    # FTP REST: the transfer from the offset starts on a ranged GET; its end (and 226) after the whole
    # object was verified
    data = objects["CT/ftp.dcm"]
    offset = 12 * MiB + 7
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    parts: list[bytes] = []
    f.retrbinary("RETR CT/ftp.dcm", parts.append, rest=offset)
    f.quit()
    assert b"".join(parts) == data[offset:]
    ranged = [e for e in agent.events("ranged_get") if e["path"] == "CT/ftp.dcm"]
    assert ranged and ranged[0]["offset"] == offset and ranged[0]["stream_at"] < offset

    # both copies were verified and cached from the stream: the cache holds the objects' exact bytes
    assert {e["path"] for e in agent.wait_events("fetched", 2)} == set(objects)
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    for path, whole in objects.items():
        parts = []
        f.retrbinary(f"RETR {path}", parts.append)
        assert b"".join(parts) == whole
    f.quit()
    assert len(agent.events("fetched")) == 2
