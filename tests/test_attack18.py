"""Attacks on a running agent (round 18): hostile SFTP, SMB and HTTP clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from agent.serve.sftp import MAX_OPEN_FILES
from faultkit import sftp_put
from harness import PASSWORD, s3_objects

IMAGE = bytes(range(256)) * 1024  # 256 KiB: one block of asyncssh's copy-data


def _connect(agent) -> asyncssh.connection._ConnectionContextManager:  # type: ignore[name-defined]
    return asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD, known_hosts=None)


def test_sftp_limits_name_the_handles_a_session_may_open(agent_factory):
    """limits@openssh.com told a client asyncssh's own figures: as many open handles as the process may open files
    (its descriptor limit less 5, here about a million), while a session gets MAX_OPEN_FILES. A client sizing its
    parallel transfers by it (OpenSSH's sftp does) met 'too many open files' at its 65th. It names MAX_OPEN_FILES
    now, and the session opens exactly that many."""
    agent = agent_factory().start()

    async def run() -> None:
        async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
            await sftp_put(sftp, "a.dcm", b"an image")
            reply = await sftp._handler._make_request(b"limits@openssh.com")  # the client keeps only two figures
            limits = asyncssh.sftp.SFTPLimits.decode(reply)
            assert limits.max_open_handles == MAX_OPEN_FILES
            files = [await sftp.open("a.dcm", "rb") for _ in range(limits.max_open_handles)]
            with pytest.raises(asyncssh.SFTPFailure, match="too many open files"):
                await sftp.open("a.dcm", "rb")
            for f in files:
                await f.close()

    asyncio.run(run())


def test_sftp_copy_data_from_a_file_onto_itself_is_refused(agent_factory):
    """copy-data (an SFTP extension asyncssh serves) from a file open "r+" to the same handle, to its end, read what
    it had just written: each block it copied (asyncssh copies 256 KiB at a time) was there to copy again. One
    request ran until the user's share for unfinished uploads was full (here 4 MB; the share is a quarter of the
    cache, so hundreds of GB of a real one). As OpenSSH does, a copy from a handle to itself (or to another handle
    of its path) is refused; a copy between two files works."""
    agent = agent_factory(**{"cache.max_bytes": "16MB"}).start()

    async def run() -> None:
        async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
            await sftp_put(sftp, "a.dcm", IMAGE)
            async with sftp.open("a.dcm", "r+b") as f:
                with pytest.raises(asyncssh.SFTPFailure, match="copy-data from a file to itself"):
                    await sftp.remote_copy(f, f, 0, 0, len(IMAGE))
                async with sftp.open("a.dcm", "rb") as stored:
                    with pytest.raises(asyncssh.SFTPFailure, match="copy-data from a file to itself"):
                        await sftp.remote_copy(stored, f, 0, 0, len(IMAGE))
            async with sftp.open("a.dcm", "rb") as f:
                assert await f.read() == IMAGE
            async with sftp.open("a.dcm", "rb") as src, sftp.open("b.dcm", "wb") as dst:
                await sftp.remote_copy(src, dst)
            async with sftp.open("b.dcm", "rb") as f:
                assert await f.read() == IMAGE

    asyncio.run(run())
    assert agent.events("unfinished_limit") == []


def test_two_exclusive_creates_of_one_new_name_do_not_both_succeed(agent_factory):
    """An exclusive create (SFTP's CREAT|EXCL, SMB's FILE_CREATE) was refused only for a name the catalog held: a
    new file is in the catalog at its commit, so two clients creating one name at once both had it, and the one
    that closed last replaced the other's file, which the protocol had promised it alone. The name is held from
    the create on: a second exclusive create of it is refused while the first is written, and after its commit."""
    agent = agent_factory().start()

    async def run() -> None:
        async with _connect(agent) as one, _connect(agent) as two, \
                one.start_sftp_client() as a, two.start_sftp_client() as b:
            first = await a.open("new.dcm", "xb")
            with pytest.raises(asyncssh.SFTPFailure):
                await b.open("new.dcm", "xb")
            await first.write(b"the first client's image")
            await first.close()
            with pytest.raises(asyncssh.SFTPFailure):
                await b.open("new.dcm", "xb")
            async with a.open("new.dcm", "rb") as f:
                assert await f.read() == b"the first client's image"

    asyncio.run(run())
    agent.wait_drained(60)
    assert list(s3_objects(agent.store, agent.prefix)) == ["new.dcm"]
