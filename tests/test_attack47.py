"""Attacks on a running agent (round 47): an SFTP client that vanishes without a word mid-upload, one that takes every
descriptor, then a fresh probe.
Each test reproduces one attack that worked and checks it no longer does. Real agent, real SeaweedFS, real clients
(asyncssh); nft drops the vanished client's packets (a table of the test's own, matching only its connection)."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import os
import threading
import time
from typing import AsyncIterator

import asyncssh
import psutil
import pytest
from halib import run
from smbutil import Smb
from test_attack45 import _drop
from test_attack46 import _connected

from faultkit import catalog_rows, ftp_login, ftp_put, sftp_put, sftp_session, wait_for
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


@contextlib.asynccontextmanager
async def _descriptors_left(agent, spare: int) -> AsyncIterator[asyncssh.SFTPClient]:
    """An SFTP session from 127.0.0.2 (its own per-address caps), then the agent's descriptor limit set to what it
    holds and `spare` more (prlimit, hard and soft)."""
    pid = agent.proc.pid
    async with asyncssh.connect("127.0.0.1", agent.sftp_port, local_addr=("127.0.0.2", 0), username="pacs",
                                password=PASSWORD, known_hosts=None, client_keys=None, agent_path=None) as conn:
        sftp = await conn.start_sftp_client()
        held = len(os.listdir(f"/proc/{pid}/fd")) + spare
        run("prlimit", f"--pid={pid}", f"--nofile={held}:{held}")
        yield sftp


@contextlib.asynccontextmanager
async def _descriptors_taken(agent, *, hold: bool = False) -> AsyncIterator[None]:
    """_descriptors_left(agent, 20), then the rest taken: kept.dcm opened over SFTP until three opens are refused.
    hold: and one freed meanwhile taken again, every 0.1 s (a brief open of the agent's own, under way at the third
    refusal, left one free for good: on a loaded machine the watches then never failed)."""
    async with _descriptors_left(agent, 20) as sftp:
        async def take(refusals: int, pause: float) -> None:
            refused = 0
            while refused < refusals:  # the agent's own brief opens free one now and then: taken too
                try:
                    await sftp.open("kept.dcm", "rb")
                except asyncssh.SFTPFailure:
                    refused += 1
                    await asyncio.sleep(pause)

        await take(3, 0)
        holding = asyncio.ensure_future(take(10**9, 0.1)) if hold else None
        try:
            yield
        finally:
            if holding is not None:
                holding.cancel()
                await asyncio.gather(holding, return_exceptions=True)


def test_a_client_holding_every_descriptor_leaves_the_others_a_refusal_and_a_quiet_log(agent_factory):
    """An SFTP client within its caps (one connection from 127.0.0.2, its handles under 64) opened files until the
    agent ran out of descriptors (a hard limit of 40 more than it held). asyncio then logged every failed accept of
    each listener, up to 100 a tick (30 000 lines in 10 s, each a "Logging error" traceback, half a core), and a new
    FTP client waited unanswered in the backlog; a PASV got "451 internal error" and a traceback. Now the new client
    is refused at once (a descriptor kept spare accepts and closes it), the PASV gets a 425, the log has one
    descriptors_exhausted event per place, and all is served again once the client lets go."""
    agent = agent_factory().start()
    ftp = ftp_login(agent)
    ftp_put(ftp, "CT/kept.dcm", b"k" * 1000)
    pid = agent.proc.pid

    async def scenario() -> None:
        async with _descriptors_left(agent, 40) as sftp:
            with pytest.raises(asyncssh.SFTPFailure, match="Too many open files"):
                for _ in range(64):
                    await sftp.open("CT/kept.dcm", "rb")
            cpu = psutil.Process(pid)
            cpu.cpu_percent()
            started = time.monotonic()
            with pytest.raises((EOFError, ConnectionError)):
                await asyncio.to_thread(ftp_login, agent, timeout=10)
            assert time.monotonic() - started < 5  # refused, not left waiting
            with pytest.raises(ftplib.error_temp, match="425"):
                await asyncio.to_thread(ftp_put, ftp, "CT/refused.dcm", b"r")
            await asyncio.sleep(3)
            assert cpu.cpu_percent() < 20
        await asyncio.sleep(1)
        ftp_put(ftp_login(agent), "CT/after.dcm", b"a")
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/after2.dcm", b"b")

    try:
        asyncio.run(scenario())
    finally:
        ftp.close()
    log = agent.log_path.read_text()
    assert log.count("Too many open files") < 10
    assert {e["where"] for e in agent.events("descriptors_exhausted")} >= {"ftp passive"}
    assert agent.proc.poll() is None
    assert catalog_rows(agent, "SELECT path, state FROM entries WHERE is_dir = 0 ORDER BY path") == [
        ("CT/after.dcm", "clean"), ("CT/after2.dcm", "clean"), ("CT/kept.dcm", "clean")]


def test_an_smb_open_without_a_descriptor_is_refused_and_smb_serves_on(smb_agent):
    """Out of descriptors, an SMB client's create raised OSError (EMFILE), which is no FUSE error: it ended
    pyfuse3's loop. That request and every SMB request after it waited for ever
    (smbd in request_wait_answer), after the descriptors came back too, and the agent's stop with them; so did the
    lookup of the request's client address (psutil reading /proc). Now smbd is answered EMFILE
    (STATUS_TOO_MANY_OPENED_FILES), for a lookup of the address too (attack48), and SMB serves on once the holder lets
    go."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    smb.write("kept.dcm", b"k" * 1000)
    answers: list[object] = []

    def create() -> None:
        try:
            smb.write("refused.dcm", b"r")
            answers.append("stored")
        except OSError as e:
            answers.append(e)

    async def scenario() -> None:
        async with _descriptors_taken(agent):
            writer = threading.Thread(target=create, daemon=True)
            writer.start()
            await asyncio.to_thread(writer.join, 30)

    try:
        asyncio.run(scenario())
        assert answers, "the SMB create was not answered"
        assert smb.read("kept.dcm") == b"k" * 1000
        smb.write("after.dcm", b"a")
        assert smb.read("after.dcm") == b"a"
    finally:
        smb.close()


async def test_every_smb_request_answers_an_unexpected_error_and_the_loop_lives():
    """Any exception but FUSEError ends pyfuse3's request loop: SMB then hangs for good (the EMFILE of the test above
    did). Every handler GatewayFS overrides is answered through one guard: an OSError with its errno, anything else
    EIO, logged. A bug's exception cannot be made with the real gateway, so the handler here is a stand-in that raises
    (the guard is what is tested)."""
    import errno

    import pyfuse3

    from agent.serve.fuse import GatewayFS, _answered
    overridden = [n for n in vars(pyfuse3.Operations) if callable(vars(GatewayFS).get(n)) and not n.startswith("_")]
    assert {"lookup", "create", "open", "read", "write", "release", "readdir", "rename"} <= set(overridden)
    assert all(hasattr(vars(GatewayFS)[n], "__wrapped__") for n in overridden), "a handler without the guard"

    async def failing(exc: BaseException) -> None:
        raise exc
    for exc, code in ((RuntimeError("a bug"), errno.EIO), (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
                      (OSError(errno.EMFILE, "no descriptor"), errno.EMFILE)):
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await _answered(failing)(exc)
        assert raised.value.errno == code
    with pytest.raises(pyfuse3.FUSEError) as raised:  # the handlers' own answers pass as they are
        await _answered(failing)(pyfuse3.FUSEError(errno.ENOENT))
    assert raised.value.errno == errno.ENOENT
