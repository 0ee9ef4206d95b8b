"""Attacks on a running agent (round 33): hostile FTP, SFTP and HTTP clients against real listeners, and what a
connection leaves behind when it dies half-way. Each test reproduces one attack that worked and checks it no longer
does."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import threading
import time
import urllib.request

import asyncssh
import psutil
from test_attack22 import _fds
from test_transport_security import ftps_session

from agent.serve.http import STALLED_SECONDS
from faultkit import ftp_login, wait_for
from harness import PASSWORD


def test_ftps_transfers_whose_close_notify_is_never_answered_do_not_pile_up(agent_factory, tmp_path):
    """Over PROT P a data connection's close sends the agent's close_notify and waits for the client's (asyncio's TLS
    shutdown, up to 30 s). A logged-in client that read each listing to its end and never answered, keeping the
    socket open, held one descriptor of the agent per transfer for those 30 s: 100 NLSTs a second over one session
    held 3 000, and nothing counted them (the agent takes every descriptor the host allows; its uploads need them).
    Now a session's next transfer waits for its last one's close (cut after SOCKET_TIMEOUT): one at most per
    session. A client that answers, as ftplib does, is not slowed."""
    agent, f, _ = ftps_session(agent_factory, tmp_path)
    f.voidcmd("TYPE I")
    assert f.nlst() == []
    before = _fds(agent.proc.pid)
    held: list = []
    stop = threading.Event()

    def listings() -> None:
        while not stop.is_set():
            conn, _ = f.ntransfercmd("NLST")
            while conn.recv(4096):
                pass  # up to the agent's close_notify, never answered: the socket stays open
            held.append(conn)
            f.voidresp()

    worker = threading.Thread(target=listings, daemon=True)
    worker.start()
    time.sleep(5)
    grown = _fds(agent.proc.pid) - before
    stop.set()
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:  # a transfer waiting for the last close goes on after it
        for conn in list(held):
            conn.close()
        worker.join(0.2)
    assert not worker.is_alive()
    for conn in held:
        conn.close()
    assert grown <= 3, f"{len(held)} listings left the agent {grown} more descriptors"
    t0 = time.monotonic()
    for _ in range(20):
        assert f.nlst() == []
    assert time.monotonic() - t0 < 10
    f.quit()


def test_http_clients_pipelining_requests_and_reading_no_answer_are_closed(agent_factory):
    """A connection that had sent a whole request was never timed out again: a client pipelining requests for /metrics
    and reading none of the answers held it for ever (the agent waiting to send the next answer), one of the 32 per
    address and 256 in all its listener keeps. Eight addresses of the admin network kept every other client of it
    out for as long as they liked. Now a connection whose client takes no byte of its answers for STALLED_SECONDS is
    closed, and logged once a minute per address."""
    agent = agent_factory().start()
    proc = psutil.Process(agent.proc.pid)

    def connections() -> int:  # the agent's, on its HTTP port
        return sum(c.laddr.port == agent.http_port and c.status == "ESTABLISHED" for c in proc.net_connections("tcp"))

    held = []
    for _ in range(4):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answers fill the kernel's buffers soon
        s.connect(("127.0.0.1", agent.http_port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: pacsgw\r\n\r\n" * 900)
        held.append(s)
    time.sleep(3)
    assert connections() == 4
    wait_for(lambda: connections() == 0, 2 * STALLED_SECONDS + 15, what="the stalled connections to close")
    assert len(agent.events("http_stalled_closed")) == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/healthz", timeout=10) as answer:
        assert answer.status == 200
    for s in held:
        s.close()


def test_an_sftp_client_granting_a_huge_window_and_reading_nothing_cannot_fill_the_agent(agent_factory):
    """The SFTP loop read the next request once the channel's replies had left asyncssh's queue, which only holds
    what the client's window does not take. A client granting a window of 2 GiB and reading nothing from the socket
    had every READ answered into the connection's send buffer: 200 READs of 4 MiB (6 KB sent) grew the agent by
    813 MiB, over one channel of one connection. Now no request is read while the connection's unsent bytes are over
    asyncio's high-water mark."""
    agent = agent_factory().start()
    f = ftp_login(agent)
    f.storbinary("STOR big.dcm", io.BytesIO(os.urandom(4 << 20)))
    f.quit()
    proc = psutil.Process(agent.proc.pid)

    class Replies(asyncssh.SSHClientSession):
        def __init__(self) -> None:
            self.got = b""

        def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
            self.got += data

    def packet(kind: int, *fields: bytes) -> bytes:
        body = bytes([kind]) + b"".join(fields)
        return struct.pack(">I", len(body)) + body

    async def run() -> int:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            chan, replies = await conn.create_session(Replies, subsystem="sftp", encoding=None, window=2**31 - 1)
            chan.write(packet(1, struct.pack(">I", 3)))  # INIT, version 3
            chan.write(packet(3, struct.pack(">II", 1, 7), b"big.dcm", struct.pack(">II", 1, 0)))  # OPEN for reading
            await wait_async(lambda: len(replies.got) > 9 + 13 and replies.got.rfind(b"\x66\x00\x00\x00\x01") > 0)
            handle = replies.got[replies.got.rfind(b"\x66\x00\x00\x00\x01") + 9:][:4]
            before = proc.memory_info().rss
            conn._transport.pause_reading()  # the client reads nothing more from its socket
            read = struct.pack(">I", len(handle)) + handle + struct.pack(">QI", 0, 4 << 20)
            chan.write(b"".join(packet(5, struct.pack(">I", 100 + i), read) for i in range(100)))  # READs of 4 MiB
            await asyncio.sleep(8)
            grown = proc.memory_info().rss - before
            conn._transport.abort()
            return grown

    grown = asyncio.run(asyncio.wait_for(run(), 60))
    assert grown < 64 << 20, f"the agent grew by {grown >> 20} MiB"
    assert ftp_login(agent).size("big.dcm") == 4 << 20  # and it serves


async def wait_async(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "no answer"
        await asyncio.sleep(0.05)
