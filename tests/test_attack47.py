"""Attacks on a running agent (round 47): an SFTP client that vanishes without a word mid-upload, then a fresh probe.
Each test reproduces one attack that worked and checks it no longer does. Real agent, real SeaweedFS, real clients
(asyncssh); nft drops the vanished client's packets (a table of the test's own, matching only its connection)."""

from __future__ import annotations

import asyncio
import os
import time

import asyncssh
from halib import run
from test_attack45 import _drop
from test_attack46 import _connected

from faultkit import catalog_rows, sftp_put, sftp_session, wait_for
from harness import PASSWORD


def test_an_sftp_client_gone_without_a_word_frees_its_unfinished_upload(agent_factory):
    """A client gone mid-upload without closing its connection (a power cut: no FIN, no reset reaches the box) held its
    upload (the staging file, the name's write mark) and its session slot until asyncssh's keepalive gave up on it:
    four 30 s rounds unanswered, 120 s. The SSH socket now has FTP's and SMB's TCP keepalive and user timeout: cut after
    30 s of silence, its upload discarded. A live client pausing as long mid-upload answers the probes from its kernel
    and stores its file whole, and one whose reads are not taken for as long (the channel window closes, not TCP's)
    gets its file whole."""
    agent = agent_factory(**{"sftp.max_sessions_per_user": 3}).start()
    big = os.urandom(8 << 20)  # more than a channel window (2 MiB)
    table = f"pacsgw_a47_{os.getpid()}"

    async def connect() -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        conn = await asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                      known_hosts=None, client_keys=None, agent_path=None)
        return conn, await conn.start_sftp_client()

    async def scenario() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/big.dcm", big)
        clients = [await connect() for _ in range(3)]
        (reader_conn, reader), (gone_conn, gone), (_, paused) = clients
        stalled = await reader.open("CT/big.dcm", "rb")
        gone_file, paused_file = await gone.open("CT/gone.dcm", "wb"), await paused.open("CT/paused.dcm", "wb")
        for f in (gone_file, paused_file):
            await f.write(b"x" * 2**20)
        channel = reader._handler._writer.channel
        channel.pause_reading()  # the reading client takes nothing more in: the channel window closes
        reading = asyncio.ensure_future(stalled.read())
        port = gone_conn.get_extra_info("sockname")[1]
        run("nft", "add", "table", "inet", table)
        run("nft", "add", "chain", "inet", table, "input", "{ type filter hook input priority -10 ; }")
        _drop(table, port, agent.sftp_port)
        _drop(table, agent.sftp_port, port)
        silent = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: agent.events("upload_aborted"), 150, interval=1,
                                what="the vanished client's upload dropped")
        await asyncio.to_thread(wait_for, lambda: not _connected(agent.sftp_port, port), 30, interval=1,
                                what="the vanished client's connection closed")
        print("held", time.monotonic() - silent)
        assert time.monotonic() - silent < 50
        [aborted] = agent.events("upload_aborted")
        assert aborted["path"] == "CT/gone.dcm"
        async with sftp_session(agent) as again:  # its session slot is free: a third login is let in
            assert (await again.stat("CT/big.dcm")).size == len(big)
        await paused_file.write(b"y", 2**20)
        await paused_file.close()
        assert (await paused.stat("CT/paused.dcm")).size == 2**20 + 1
        channel.resume_reading()
        assert await reading == big
        gone_conn.abort()
        for conn, _ in clients:
            conn.close()

    try:
        asyncio.run(scenario())
    finally:
        run("nft", "delete", "table", "inet", table, check=False)
    assert catalog_rows(agent, "SELECT path, size FROM entries WHERE path LIKE 'CT/%' ORDER BY path") == [
        ("CT/big.dcm", len(big)), ("CT/paused.dcm", 2**20 + 1)]
