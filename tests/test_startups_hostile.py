"""A flood of connections that never log in, from many addresses ([ftp]/[sftp] max_unauthenticated, OpenSSH's
MaxStartups): max_sessions_per_address bounds one address only, and 127.0.0.0/8 (or an IPv6 /64) gives a client
as many as it likes. Real clients (raw sockets, ftplib, asyncssh) from several 127.0.0.x source addresses."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import socket
import urllib.request

import asyncssh
import pytest
from test_ftp_hostile import wait_for

from harness import PASSWORD

CAP = 4


def _held_ftp(port: int, source: str) -> socket.socket:
    """A control connection that got its 220 and never logs in."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    assert s.recv(1024).startswith(b"220")
    return s


def _connect_ftp(port: int, source: str) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30, source_address=(source, 0))
    f.connect("127.0.0.1", port)
    return f


def _held_ssh(port: int, source: str) -> socket.socket:
    """An SSH connection that sent its version and stays in the key exchange, never logging in."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    s.sendall(b"SSH-2.0-flood\r\n")
    assert s.recv(256).startswith(b"SSH-2.0-")
    return s


async def _login_ssh(port: int, source: str) -> asyncssh.SSHClientConnection | None:
    """A logged-in connection, or None when the server closed it before the login."""
    try:
        return await asyncio.wait_for(asyncssh.connect("127.0.0.1", port, username="pacs", password=PASSWORD,
                                                       known_hosts=None, local_addr=(source, 0)), 30)
    except (asyncssh.Error, OSError):
        return None


async def _until_refused(port: int, source: str) -> None:
    """The held connections' slots are taken on the guard's thread, a moment after the accept: a probe from
    source is refused soon."""
    for _ in range(100):
        conn = await _login_ssh(port, source)
        if conn is None:
            return
        conn.close()
        await asyncio.sleep(0.1)
    raise AssertionError("connections over sftp.max_unauthenticated were served")


def metric(agent, protocol: str, kind: str = "UnauthenticatedLimit") -> float:
    """pacsgw_errors_total{protocol, kind} of a running agent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pacsgw_errors_total{") and f'protocol="{protocol}"' in line \
                    and f'kind="{kind}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_ftp_connections_not_logged_in_are_capped_box_wide(agent_factory):
    """Connections from many addresses, none over its address cap, that never log in: the one beyond
    ftp.max_unauthenticated hears 421 at once; a login frees its connection's slot, so logged-in sessions never
    count; a closed connection frees its slot. The refusals are counted, logged once (not once each)."""
    agent = agent_factory(**{"ftp.max_unauthenticated": CAP}).start()
    held = [_held_ftp(agent.ftp_port, f"127.0.0.{2 + i}") for i in range(CAP)]
    for i in range(3):
        try:
            with _connect_ftp(agent.ftp_port, f"127.0.1.{i + 1}"):
                raise AssertionError("a connection over the cap was served")
        except ftplib.error_temp as e:
            assert str(e).startswith("421") and "not logged in" in str(e)
    assert metric(agent, "ftp") == 3
    refused = agent.wait_events("session_refused")
    assert len(refused) == 1 and "not logged in" in refused[0]["reason"]  # once per interval, not per connection

    # one held connection logs in: its slot is free, and a new connection (which logs in too) gets it
    f = held.pop()
    f.sendall(f"USER pacs\r\nPASS {PASSWORD}\r\n".encode())
    buf = b""
    while b"230" not in buf:
        chunk = f.recv(1024)
        assert chunk, buf
        buf += chunk
    logged_in = [f]
    for _ in range(3):  # logged-in sessions never count against the cap
        g = wait_for(lambda: _connect_ftp(agent.ftp_port, "127.0.2.1"))
        g.login("pacs", PASSWORD)
        logged_in.append(g)
    # a closed connection frees its slot too
    held.pop().close()
    wait_for(lambda: _connect_ftp(agent.ftp_port, "127.0.3.1")).quit()
    for s in held + logged_in:
        s.close()
    assert metric(agent, "ftp") >= 3
    assert len(agent.events("session_refused")) == 1


def test_ssh_connections_not_logged_in_are_capped_box_wide(agent_factory):
    """The same for SSH: connections over sftp.max_unauthenticated are closed before any login; once the
    held ones go, or log in, clients are served again."""
    agent = agent_factory(**{"sftp.max_unauthenticated": CAP}).start()

    async def held(source: str) -> socket.socket:
        return _held_ssh(agent.sftp_port, source)

    async def login(source: str) -> asyncssh.SSHClientConnection | None:
        return await _login_ssh(agent.sftp_port, source)

    async def run() -> None:
        holds = [await held(f"127.0.0.{2 + i}") for i in range(CAP)]
        await _until_refused(agent.sftp_port, "127.0.1.1")
        assert await login("127.0.1.2") is None
        assert metric(agent, "sftp") >= 2
        assert sum("not logged in" in e["reason"] for e in agent.events("session_refused")) == 1

        holds.pop().close()  # one slot free: logged-in connections then never count
        conns = []
        for i in range(CAP + 2):
            for _ in range(100):
                conn = await login(f"127.0.2.{i + 1}")
                if conn is not None:
                    break
                await asyncio.sleep(0.1)
            assert conn is not None
            conns.append(conn)
        async with conns[-1].start_sftp_client() as sftp:
            await sftp.listdir("/")
        for c in conns:
            c.close()
        for s in holds:
            s.close()

    asyncio.run(asyncio.wait_for(run(), 120))
    with contextlib.suppress(Exception):
        agent.stop()


def test_an_address_that_logged_in_before_is_let_in_over_the_cap(agent_factory):
    """A full max_unauthenticated keeps every new connection out, the PACS's too: CAP connections held from a
    few addresses locked the PACS out of new sessions for as long as they were renewed. An address some user
    has logged in from before (since boot, over any protocol) is let in even then."""
    agent = agent_factory(**{"ftp.max_unauthenticated": CAP, "sftp.max_unauthenticated": CAP}).start()
    pacs = "127.0.9.1"
    _connect_ftp(agent.ftp_port, pacs).login("pacs", PASSWORD)  # once, over FTP; left open: it logged in
    held = [_held_ftp(agent.ftp_port, f"127.0.0.{2 + i}") for i in range(CAP)]
    with pytest.raises(ftplib.error_temp, match="421"):
        _connect_ftp(agent.ftp_port, "127.0.1.1")
    f = _connect_ftp(agent.ftp_port, pacs)
    f.login("pacs", PASSWORD)
    f.quit()

    async def run() -> None:
        holds = [_held_ssh(agent.sftp_port, f"127.0.0.{2 + i}") for i in range(CAP)]
        await _until_refused(agent.sftp_port, "127.0.1.1")
        conn = await _login_ssh(agent.sftp_port, pacs)
        assert conn is not None
        async with conn, conn.start_sftp_client() as sftp:
            await sftp.listdir("/")
        for s in holds:
            s.close()

    asyncio.run(asyncio.wait_for(run(), 120))
    for s in held:
        s.close()
