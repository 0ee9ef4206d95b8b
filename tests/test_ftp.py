"""FTP beyond the common scenarios of tests/test_conformance.py: its own commands and replies, aioftp's client."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import threading
import time

import aioftp
import pytest

from harness import PASSWORD, s3_objects, sha256


def ftp(agent, user: str = "pacs", password: str = PASSWORD, address: str = "127.0.0.1") -> ftplib.FTP:
    """A logged-in session from a loopback address (its data connections come from it too)."""
    f = ftplib.FTP(timeout=30, source_address=(address, 0))
    f.connect("127.0.0.1", agent.ftp_port)
    f.login(user, password)
    return f


def get(f: ftplib.FTP, path: str, rest: int | None = None) -> bytes:
    buf = io.BytesIO()
    f.retrbinary(f"RETR {path}", buf.write, rest=rest)
    return buf.getvalue()


def test_size_mdtm_mlsd_list_and_rest_retr(agent_factory):
    """FTP's own commands around the common interface (tests/test_conformance.py has the round trips)."""
    agent = agent_factory().start()
    f = ftp(agent)
    data = os.urandom(2007)
    f.storbinary("STOR CT/2026-11-23/2.dcm", io.BytesIO(data))
    assert f.size("CT/2026-11-23/2.dcm") == 2007
    assert f.sendcmd("MDTM CT/2026-11-23/2.dcm").startswith("213 2")
    facts = dict(f.mlsd("CT/2026-11-23"))
    assert facts["2.dcm"]["type"] == "file" and facts["2.dcm"]["size"] == "2007"
    lines: list[str] = []
    f.retrlines("LIST CT/2026-11-23", lines.append)
    assert len(lines) == 1 and lines[0].split()[4] == "2007" and lines[0].endswith(" 2.dcm"), lines
    # ls options, as many clients send them (`ls -l` in Windows ftp.exe, scripts' `LIST -la`): ignored, as vsftpd
    # and proftpd do; the path after them is listed.
    with_options: list[str] = []
    f.retrlines("LIST -la CT/2026-11-23", with_options.append)
    assert with_options == lines
    f.cwd("CT/2026-11-23")
    assert f.nlst("-a") == ["2.dcm"]
    f.retrlines("LIST -al", with_options.append)
    assert with_options == lines * 2
    f.cwd("/")
    assert get(f, "CT/2026-11-23/2.dcm", rest=7) == data[7:]  # REST + RETR: a download resumed
    f.quit()


def test_errors_only_ftp_has(agent_factory):
    """Replies for what the other protocols cannot send: SIZE, CWD, a backslash in a name (a separator in SMB)."""
    agent = agent_factory().start()
    f = ftp(agent)
    with pytest.raises(ftplib.error_perm, match="550"):
        f.size("missing.dcm")
    with pytest.raises(ftplib.error_perm, match="550 path escapes"):
        f.cwd("../..")
    with pytest.raises(ftplib.error_perm, match="553"):
        f.storbinary("STOR " + "n/" * 600 + "x.dcm", io.BytesIO(b"x"))  # a path over 1000 bytes
    with pytest.raises(ftplib.error_perm, match="553"):
        f.storbinary("STOR a\\b.dcm", io.BytesIO(b"x"))
    assert f.pwd() == "/"
    assert f.nlst() == []
    f.quit()
    assert s3_objects(agent.store, agent.prefix) == {}


def test_rfc_959_minimum_commands_in_every_spelling(agent_factory):
    """RFC 959 5.1's minimum implementation: TYPE A N, MODE S, STRU F (what a client may send before any transfer)
    got 502 'not implemented', and ALLO too: a client that checks the reply stopped there. They answer 200 (ALLO
    202, nothing to set aside) and the upload and download after them are byte for byte; forms the server does
    not have get 504 (RFC 959: not implemented for that parameter); before a login each is 503, as others."""
    agent = agent_factory().start()
    s = ftplib.FTP(timeout=30)
    s.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm, match="^503.*not logged in"):
        s.sendcmd("MODE S")
    s.login("pacs", PASSWORD)
    for cmd in ("TYPE A N", "type a", "TYPE L 8", "MODE S", "STRU F", "TYPE I"):
        assert s.sendcmd(cmd).startswith("200"), cmd
    assert s.sendcmd("ALLO 2007").startswith("202")
    for cmd in ("TYPE E", "TYPE L 7", "MODE B", "MODE C", "STRU R", "STRU P"):
        with pytest.raises(ftplib.error_perm, match="^504"):
            s.sendcmd(cmd)
    data = os.urandom(2007) + b"\r\n\n\r"
    s.sendcmd("MODE S")
    s.storbinary("STOR m.dcm", io.BytesIO(data))
    assert get(s, "m.dcm") == data
    s.quit()


def test_aioftp_client_round_trip(agent_factory):
    agent = agent_factory().start()
    data = os.urandom(200_000)

    async def session() -> bytes:
        async with aioftp.Client.context("127.0.0.1", agent.ftp_port, "pacs", PASSWORD) as client:
            await client.make_directory("US/2026-11-23")
            async with client.upload_stream("US/2026-11-23/echo.dcm") as stream:
                await stream.write(data)
            names = [str(p) for p, info in await client.list("US/2026-11-23")]
            assert names == ["US/2026-11-23/echo.dcm"]
            async with client.download_stream("US/2026-11-23/echo.dcm") as stream:
                return await stream.read()

    assert asyncio.run(session()) == data
    assert s3_objects(agent.store, agent.prefix)["US/2026-11-23/echo.dcm"]["sha256"] == sha256(data)


def test_retr_to_a_slow_reader_and_replies_left_unread(agent_factory):
    """A RETR leaves by sendfile(2) on the bare data socket: a reader that waits before reading (the socket
    buffer fills, the sender waits for room) still gets every byte, from a REST offset too. A client that
    pipelines commands without reading their replies gets every reply, in order (the session stops reading
    commands while 64 KiB of replies are unread, instead of queueing them without bound)."""
    agent = agent_factory().start()
    data = os.urandom(12 * 2**20)  # well over a loopback socket's buffer
    f = ftp(agent)
    f.storbinary("STOR XA/big.dcm", io.BytesIO(data))
    for rest in (None, 5_000_001):
        conn = f.transfercmd("RETR XA/big.dcm", rest=rest)
        time.sleep(1.0)  # nothing read yet: the agent's sendfile meets a full socket
        got = bytearray()
        while chunk := conn.recv(1 << 16):
            got += chunk
        conn.close()
        assert f.voidresp().startswith("226")
        assert bytes(got) == data[rest or 0:]
    f.quit()

    f = ftp(agent)
    f.sock.sendall(b"NOOP\r\n" * 20_000 + b"QUIT\r\n")
    time.sleep(1.0)  # ~160 KB of replies wait for the client to read them
    replies = b""
    while chunk := f.sock.recv(1 << 16):
        replies += chunk
    f.close()
    lines = replies.decode().splitlines()
    assert lines[:-1] == ["200 ok"] * 20_000 and lines[-1].startswith("221"), lines[-3:]


class _Endless(io.RawIOBase):
    """`total` bytes of one repeated block, read as fast as the client can send them (no payload in memory)."""

    def __init__(self, total: int, block: int = 1024 * 1024) -> None:
        self.left, self.block = total, os.urandom(block)
        self.started = threading.Event()

    def read(self, n: int = -1) -> bytes:
        self.started.set()
        chunk = self.block[:min(self.left, len(self.block), n if n > 0 else len(self.block))]
        self.left -= len(chunk)
        return chunk


def test_a_fast_upload_leaves_the_loop_to_the_other_sessions(agent_factory):
    """A client that sends faster than the box stores keeps its data socket readable all the time: the upload
    must still give up the event loop between blocks, or every other session waits until that file ends (the
    receive loop reading the socket directly never awaited). Another session's NOOPs are answered meanwhile."""
    agent = agent_factory().start()
    other = ftp(agent)
    source = _Endless(256 * 1024 * 1024)
    upload = threading.Thread(target=lambda: ftp(agent).storbinary("STOR big.bin", source, blocksize=1024 * 1024))
    upload.start()
    assert source.started.wait(60)
    answered = 0
    while source.left:  # the client is still sending
        other.voidcmd("NOOP")
        answered += source.left > 0
    upload.join(300)
    assert answered >= 3, f"only {answered} NOOPs answered while 256 MiB were being sent"
    other.quit()


def test_the_idle_timer_ends_a_silent_reader_only():
    """The session's idle timeout is one timer (agent.serve.contract.Idle), not a timeout per command line: a reader
    touched every 0.1 s outlives a 0.3 s idle timeout; left waiting, it is cancelled once 0.3 s have passed
    since its last touch (expired, so the session ends as idle, not as shut down)."""
    from agent.serve.contract import Idle

    async def reader() -> tuple[float, float]:
        idle = Idle(0.3)
        loop = asyncio.get_running_loop()
        for _ in range(8):  # 0.8 s of lines coming
            await asyncio.sleep(0.1)
            idle.touch()
        last = loop.time()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            assert idle.expired
            return last, loop.time()
        finally:
            idle.cancel()
        raise AssertionError("an idle reader was never ended")

    last, ended = asyncio.run(reader())
    assert 0.3 <= ended - last < 5


def test_a_transfer_longer_than_the_idle_timeout_completes(agent_factory):
    """A client that sends no command while its download runs longer than ftp.idle_timeout (a large study over
    a slow line) gets the whole file and its 226: the session ended mid-transfer (the timer counted only
    command lines). A session silent with nothing running still ends."""
    agent = agent_factory(**{"ftp.idle_timeout": 1}).start()
    body = os.urandom(8 * 2**20)
    f = ftp(agent)
    f.storbinary("STOR slow.bin", io.BytesIO(body))
    f.voidcmd("TYPE I")
    got = bytearray()
    with f.transfercmd("RETR slow.bin") as data:
        while chunk := data.recv(256 * 1024):
            got += chunk
            time.sleep(0.1)   # 32 chunks: ~3 s, three idle timeouts
    assert f.voidresp().startswith("226") and got == body
    time.sleep(2.5)
    with pytest.raises((EOFError, ConnectionError, ftplib.Error)):
        f.sendcmd("NOOP")
