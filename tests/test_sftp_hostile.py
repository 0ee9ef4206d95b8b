"""A hostile SFTP client against a live agent (harden3): what one session can make the agent hold."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from agent.serve.sftp import MAX_OPEN_FILES
from harness import PASSWORD


def test_directory_handles_count_against_the_open_file_cap(agent_factory):
    """Each directory handle read once holds its whole listing in the agent until CLOSE (400 of them on a
    3 000-file directory held 565 MB), and they had no cap: now they count with the files in MAX_OPEN_FILES."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("CT/a.dcm", "wb") as f:
                await f.write(b"x")
            raw = sftp._handler  # asyncssh's client has no call that keeps a directory handle open
            files = [await sftp.open("CT/a.dcm", "rb") for _ in range(2)]
            dirs = [await raw.opendir(b"CT") for _ in range(MAX_OPEN_FILES - len(files))]
            for d in dirs:
                assert [n.filename for n in (await raw.readdir(d))[0]] == [b"a.dcm"]
            with pytest.raises(asyncssh.SFTPFailure, match="too many open files"):
                await raw.opendir(b"CT")
            with pytest.raises(asyncssh.SFTPFailure, match="too many open files"):
                await sftp.open("CT/a.dcm", "rb")
            await raw.close(dirs.pop())
            dirs.append(await raw.opendir(b"CT"))
            for d in dirs:
                await raw.close(d)
            for f in files:
                await f.close()
            assert await sftp.listdir("CT") == ["a.dcm"]

    asyncio.run(run())


def test_reads_at_absurd_offsets_are_end_of_file(agent_factory):
    """SFTP offsets are 64-bit: a READ at 2^63 or beyond (past any file) raised OverflowError inside pread, and the
    client got FX_FAILURE 'Uncaught exception: Python int too large…' instead of EOF."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("CT/a.dcm", "wb") as f:
                await f.write(b"hello")
            async with sftp.open("CT/a.dcm", "rb") as f:
                for offset in (5, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
                    assert await f.read(10, offset) == b"", offset  # asyncssh's client: b'' is FX_EOF
                assert await f.read(10, 0) == b"hello"

    asyncio.run(run())
