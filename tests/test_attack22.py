"""Attacks on a running agent (round 22): hostile FTP and HTTP clients against real listeners. Each test reproduces
one attack that worked and checks it no longer does."""

from __future__ import annotations

import contextlib
import ftplib
import http.client
import os
import select
import socket
import ssl
import time

import pytest
from test_ftp import ftp
from test_transport_security import FtpsClient, make_ca_and_cert

from agent.serve.ftp import MAX_COMMAND_LINE
from agent.serve.http import IDLE_SECONDS, MAX_REQUESTS_PER_CONNECTION
from faultkit import wait_for
from harness import PASSWORD


def _fds(pid: int) -> int:
    """The descriptors a process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_data_connections_of_replaced_passive_listeners_are_closed_at_once(agent_factory, tmp_path):
    """A new PASV/EPSV replaces an unused passive listener: a data connection it had already accepted was left to the
    garbage collector (Session.take_passive marked it taken, so Passive.close spared it). Over PROT P its TLS
    transport stayed registered with the loop, so nothing collected it: a client looping PASV, connect and handshake
    held one descriptor of the agent's per loop (50 loops: 49 more). Now it is closed with its listener, and the
    session's end closes the last one."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key)}).start()
    f = FtpsClient(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    f.prot_p()
    f.voidcmd("TYPE I")
    assert f.nlst() == []
    before = _fds(agent.proc.pid)
    held = []
    for _ in range(50):
        port = f.makepasv()[1]
        held.append(f.context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                          server_hostname="127.0.0.1"))  # handshake done: never used
    assert f.sendcmd("NOOP").startswith("200")
    assert _fds(agent.proc.pid) <= before + 2  # the last PASV's data connection (and a spare)
    f.quit()
    wait_for(lambda: _fds(agent.proc.pid) <= before, 30, what="the last data connection to go with the session")
    for s in held:
        s.close()


def test_wrong_admin_tokens_are_logged_once_a_minute_not_each(agent_factory):
    """Every request with a wrong admin token wrote an admin_refused event: any process of the box could write
    thousands a second into the journal, from as many loopback addresses as it liked. Now one a minute in all,
    counting the others (refused_since); the right token is still served at once (the token is 256 random bits: not
    slowed like a password, see HttpServer.admin)."""
    agent = agent_factory().start()
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30, source_address=(source, 0))
        for i in range(100):
            conn.request("GET", "/admin/evict", headers={"Authorization": f"Bearer guess{i}"})
            response = conn.getresponse()
            response.read()
            assert response.status == 401
        conn.close()
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    conn.request("GET", "/admin/evict", headers={"Authorization": f"Bearer {token}"})
    assert conn.getresponse().status == 200
    conn.close()
    refused = agent.events("admin_refused")
    assert len(refused) == 1 and refused[0]["refused_since"] == 0, refused


def test_http_clients_trickling_headers_a_byte_a_second_are_closed_and_told(agent_factory):
    """Slowloris on /healthz and /metrics, headers sent a byte a second: aiohttp closed each connection after
    IDLE_SECONDS (tests/test_hardening.py), without a word in the log. Now such closes are one http_idle_closed
    event a minute per address (one here for 8 connections), and a real request is answered meanwhile."""
    agent = agent_factory().start()
    request = b"GET /metrics HTTP/1.1\r\nHost: box\r\nX-Slow: " + b"y" * 100
    slow = []
    for _ in range(8):
        s = socket.socket()
        s.settimeout(30)
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", agent.http_port))
        slow.append(s)
    assert agent.health()["status"] == "ok"
    deadline = time.monotonic() + IDLE_SECONDS + 10
    sent = 0
    while slow:
        assert time.monotonic() < deadline, f"{len(slow)} slow connections still open"
        for s in slow:
            with contextlib.suppress(OSError):
                s.sendall(request[sent % len(request):][:1])
        sent += 1
        for s in select.select(slow, [], [], 1)[0]:
            with contextlib.suppress(OSError):
                assert s.recv(4096) == b""  # closed, with no answer
            s.close()
            slow.remove(s)
    told = agent.wait_events("http_idle_closed")
    assert len(told) == 1 and told[0]["peer"] == "127.0.0.2", told
    assert agent.health()["status"] == "ok"  # answered: not told


def test_one_keep_alive_connection_is_answered_a_bounded_number_of_requests(agent_factory):
    """A keep-alive connection was answered for as long as its client asked within every IDLE_SECONDS: a slot of
    the listener's connection caps held for good. The MAX_REQUESTS_PER_CONNECTION-th answer now says Connection:
    close and the connection ends; the requests pipelined behind it are not answered."""
    agent = agent_factory().start()
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n\r\n" * (MAX_REQUESTS_PER_CONNECTION + 5))
        got = b""
        while chunk := s.recv(1 << 20):
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == MAX_REQUESTS_PER_CONNECTION
    assert got.count(b"Connection: close") == 1


def test_a_long_command_line_ends_the_session_before_it_is_logged(agent_factory):
    """A control connection's line could be 64 KiB (asyncio's limit): a path argument the checks refused was logged
    and audited whole, JSON-escaped (a 60 KB name of 'é' was a 180 KB journal line), for every command a logged-in
    client sent. Lines are held to MAX_COMMAND_LINE bytes now (8192): a longer one gets 500 and the session ends, once,
    with a short event; paths up to their own limit (MAX_PATH_BYTES) still fit and get their 553."""
    agent = agent_factory().start()
    f = ftp(agent)
    with pytest.raises(ftplib.error_perm, match="553"):  # a whole path over MAX_PATH_BYTES, in one line
        f.sendcmd("SIZE " + "/".join(["é" * 100] * 6))
    before = len(agent.log_path.read_text())
    with pytest.raises(ftplib.error_perm, match=f"500 command line too long \\(over {MAX_COMMAND_LINE} bytes\\)"):
        f.sendcmd("SIZE " + "é" * MAX_COMMAND_LINE)
    with pytest.raises((EOFError, OSError)):  # the session is over
        f.sendcmd("NOOP")
    assert ftp(agent).sendcmd("NOOP").startswith("200")  # others are served
    logged = agent.log_path.read_text()[before:].splitlines()
    assert max(map(len, logged)) < 1000, [line[:200] for line in logged]
    assert agent.events("ftp_session_closed")[0]["reason"] == "command line too long"
