"""A hostile SFTP client against a live agent (harden3): what one session can make the agent hold."""

from __future__ import annotations

import asyncio
import os
import resource
import struct
import time

import asyncssh
import psutil
import pytest

from agent.serve.sftp import MAX_OPEN_DIRS, MAX_OPEN_FILES
from faultkit import sftp_put, sftp_session, staging_files, wait_for
from harness import PASSWORD, s3_objects, sha256


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


def test_directory_handles_per_user_are_capped_over_all_sessions(agent_factory):
    """Directory handles were capped per SFTP session only (MAX_OPEN_FILES): one account could hold 64 listings per
    channel, 10 channels per connection and 32 connections (20 480 listings, 1.4 MB each for a 3 000-file
    directory). Now one user holds at most MAX_OPEN_DIRS over all its sessions; one more is refused until one is
    closed."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            sessions = [await conn.start_sftp_client() for _ in range(2)]
            await sftp_put(sessions[0], "CT/a.dcm", b"x")
            first, second = (s._handler for s in sessions)  # asyncssh's client keeps no directory handle open
            held = [(h, await h.opendir(b"CT")) for h in (first, second) for _ in range(MAX_OPEN_DIRS // 2)]
            for h, d in held:
                await h.readdir(d)  # the listing is in the agent now
            async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                        known_hosts=None) as other, other.start_sftp_client() as third:
                with pytest.raises(asyncssh.SFTPFailure, match="too many open directories"):
                    await third._handler.opendir(b"CT")
                await second.close(held.pop()[1])
                assert [n.filename for n in (await third._handler.readdir(await third._handler.opendir(b"CT")))[0]
                        ] == [b"a.dcm"]
            for s in sessions:
                s.exit()

    asyncio.run(run())


def test_the_agent_takes_every_descriptor_the_host_allows(agent_factory):
    """A systemd unit without LimitNOFILE starts the agent with a soft limit of 1 024 descriptors (the hard one is far
    higher): one SFTP account holding its 64 handles on 17 channels took them all (1 088), and every client's next store
    failed. The agent now raises its soft limit to the hard one at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the hard limit of descriptors here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the agent inherits, as from systemd
    try:
        agent = agent_factory().start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert psutil.Process(agent.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as one, asyncssh.connect(
                "127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD, known_hosts=None) as two:
            sessions = [await conn.start_sftp_client() for conn in (one, two) for _ in range(9)]
            spare = sessions.pop()
            await sftp_put(spare, "a.dcm", b"x")
            held = [await s.open("a.dcm", "rb") for s in sessions for _ in range(MAX_OPEN_FILES)]  # 1 088
            for f in held:
                assert await f.read(1) == b"x"
            await sftp_put(spare, "b.dcm", b"still stored")  # needs descriptors of its own
            for f in held:
                await f.close()

    asyncio.run(run())


def test_reads_at_absurd_offsets_are_end_of_file(agent_factory):
    """SFTP offsets are 64-bit: a READ at 2^63 or beyond (past any file) raised OverflowError inside pread, and the
    client got FX_FAILURE 'Uncaught exception: Python int too large…' instead of EOF."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as sftp:
            await sftp_put(sftp, "CT/a.dcm", b"hello")
            async with sftp.open("CT/a.dcm", "rb") as f:
                for offset in (5, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
                    assert await f.read(10, offset) == b"", offset  # asyncssh's client: b'' is FX_EOF
                assert await f.read(10, 0) == b"hello"

    asyncio.run(run())


def test_a_close_sent_before_the_clients_eof_stores_the_file(agent_factory):
    """A client that pipelines OPEN, WRITE, CLOSE and then ends its side of the channel (EOF, as `sftp.exit()` does)
    got OK for its CLOSE while the agent discarded the file: its EOF had arrived by the time the CLOSE was served,
    and the CLOSE was taken for asyncssh closing the handles of an ended session. 4 of 5 acknowledged uploads lost.
    Now only the handles asyncssh closes after the client's last request are discarded."""
    agent = agent_factory().start()

    async def run() -> list[str]:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            stored = []
            for i in range(5):
                raw = (await conn.start_sftp_client())._handler
                flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
                h = await raw.open(f"f{i}.dcm".encode(), flags, asyncssh.SFTPAttrs())
                write = asyncio.ensure_future(raw.write(h, 0, b"x" * 200_000))
                close = asyncio.ensure_future(raw.close(h))
                await asyncio.sleep(0)  # both requests sent, then the EOF right behind them
                raw._writer.write_eof()
                await write
                await close  # OK: an acknowledged upload
                stored.append(f"f{i}.dcm")
            async with conn.start_sftp_client() as sftp:
                assert sorted(await sftp.listdir(".")) == stored
            return stored

    stored = asyncio.run(run())
    agent.wait_drained()
    assert sorted(s3_objects(agent.store, agent.prefix)) == stored


def test_sparse_ranges_and_copy_data_requests_are_served(agent_factory, tmp_path):
    """asyncssh's server announces ranges@asyncssh.com and copy-data, and asyncssh's own client asks for ranges in
    every get(): the server answered it with 'Uncaught exception: ... no attribute seek' (SSH_FX_FAILURE), so an
    asyncssh client could download nothing. A stored file has no holes: its one range is all of it. A malformed
    extended request gets SSH_FX_BAD_MESSAGE, a ranges request on a closed handle an invalid-handle failure."""
    agent = agent_factory().start()
    body = os.urandom(300_000)

    async def run() -> None:
        async with sftp_session(agent) as sftp:
            await sftp.mkdir("CT")
            await sftp_put(sftp, "CT/a.dcm", body)
            await sftp.get("CT/a.dcm", str(tmp_path / "a.dcm"))  # sparse=True: ranges@asyncssh.com
            assert (tmp_path / "a.dcm").read_bytes() == body
            async with sftp.open("CT/a.dcm", "rb") as f:
                assert [r async for r in f.request_ranges(0, 10**9)] == [(0, len(body))]
                assert [r async for r in f.request_ranges(len(body), 10)] == []  # past the end: EOF
                handle = f.handle
            with pytest.raises(asyncssh.SFTPFailure, match="[Ii]nvalid file handle"):
                await sftp._handler.request_ranges(handle, 0, 10)
            with pytest.raises(asyncssh.SFTPBadMessage):
                await sftp._handler._make_request(b"ranges@asyncssh.com", b"\x00\x00")
            await sftp.copy("CT/a.dcm", "CT/b.dcm", remote_only=True)  # copy-data, served by the server
            async with sftp.open("CT/b.dcm", "rb") as f:
                assert await f.read() == body

    asyncio.run(run())
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["CT/b.dcm"]["size"] == len(body)


def test_a_client_that_reads_no_replies_cannot_pile_them_up(agent_factory):
    """Only READ waited for the replies before it to leave: any other request (here REALPATH of a long path, a
    2 KB answer to a 1 KB request, served without a catalog call) from a client that opens no window for the
    replies was answered into the channel's buffer without end, 2 bytes of the agent's memory for every byte
    sent. Now no request is read while earlier replies are still unread: the client's own sends stall."""
    agent = agent_factory().start()
    agent_proc = psutil.Process(agent.proc.pid)
    path = "/".join(["d" * 199] * 5)[:990].encode()
    request = struct.pack(">IBII", 1 + 4 + 4 + len(path), 16, 7, len(path)) + path  # SSH_FXP_REALPATH, id 7
    batch = request * 1000  # ~1 MB of REALPATH requests

    async def run() -> int:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp", encoding=None)
            chan.pause_reading()  # the client reads no reply: the agent's window for them closes
            chan.write(struct.pack(">IBI", 5, 1, 3))  # SSH_FXP_INIT, version 3
            before = agent_proc.memory_info().rss
            for _ in range(64):
                chan.write(batch)
                deadline = time.monotonic() + 3
                while chan.get_write_buffer_size() > 4 * len(batch) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if chan.get_write_buffer_size() > 4 * len(batch):
                    break  # the agent reads no more of them
            await asyncio.sleep(1)
            grown = agent_proc.memory_info().rss - before
            chan.abort()
            return grown

    grown = asyncio.run(run())
    assert grown < 40 * 1024 * 1024, f"the agent grew by {grown // 2**20} MiB"


@pytest.mark.parametrize("junk", [b"\x00\x00\x00\x01\x05", b"\xff\xff\xff\xff"], ids=["too-short", "too-long"])
def test_a_packet_that_cannot_be_framed_mid_upload_stores_nothing(agent_factory, junk):
    """A client replacing a stored file writes part of it, then sends a packet asyncssh cannot frame (shorter
    than a type and an id, or longer than it takes). asyncssh ends the SFTP session and closes the open files
    through the server's close, as if the client had sent CLOSE: the first 1 000 bytes were committed over the
    stored 100 000, which no client had closed. Now the upload is discarded and the stored file stays."""
    agent = agent_factory().start()
    stored = os.urandom(100_000)

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            async with conn.start_sftp_client() as sftp, sftp.open("x.dcm", "wb") as f:
                await f.write(stored)
            sftp = await conn.start_sftp_client()
            f = await sftp.open("x.dcm", "wb")
            await f.write(b"P" * 1000, 0)
            sftp._handler._writer.write(junk)  # raw bytes on the SFTP channel: asyncssh's client sends no such
            for _ in range(200):
                if agent.events("upload_aborted") or len(agent.events("stored")) > 1:
                    break
                await asyncio.sleep(0.05)
            conn.abort()

    asyncio.run(asyncio.wait_for(run(), 60))
    assert [e["reason"] for e in agent.events("upload_aborted")] == ["session ended before close"]
    assert [e["path"] for e in agent.events("stored")] == ["x.dcm"]  # the first upload only
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["x.dcm"]["sha256"] == sha256(stored)


def test_an_idle_connection_is_closed_and_its_unfinished_upload_dropped(agent_factory):
    """A logged-in SFTP connection that sent nothing stayed for as long as the client kept TCP up (SSH keepalives
    only prove the peer alive): its slots of max_sessions_per_user / _per_address and its unfinished upload's
    staging bytes were held without end, where FTP has idle_timeout and SMB deadtime. Now sftp.idle_timeout
    closes it (`sftp_idle_closed`); the half-written file is not stored and its staging file goes; a connection
    that keeps sending requests, slower than the timeout in all but each gap, stays."""
    agent = agent_factory(**{"sftp.idle_timeout": 2}).start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as busy, busy.start_sftp_client() as steady:
            async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                        known_hosts=None) as idle:
                sftp = await idle.start_sftp_client()
                f = await sftp.open("half.dcm", "wb")
                await f.write(b"x" * 1000)
                for _ in range(5):  # 5 s: the idle one is closed meanwhile, the one sending every second is not
                    await steady.stat("/")
                    await asyncio.sleep(1)
                await asyncio.wait_for(idle.wait_closed(), 5)
            await steady.stat("/")

    asyncio.run(asyncio.wait_for(run(), 60))
    [closed] = agent.events("sftp_idle_closed")
    assert closed["user"] == "pacs" and closed["seconds"] == 2
    wait_for(lambda: staging_files(agent) == [], 10, what="the unfinished upload's staging file to go")
    assert agent.events("stored") == [] and "half.dcm" not in s3_objects(agent.store, agent.prefix)
