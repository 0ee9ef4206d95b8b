"""Attacks on a running agent (round 15): each test is one hostile client against a real agent, with real client
libraries or raw sockets, and checks the attack is refused or leaves nothing behind."""

from __future__ import annotations

import ftplib
import io
import socket
import ssl
import time
import urllib.request

from test_frontend_hostile import _audit
from test_ftp import ftp
from test_ftp_hostile import dropped, line, recv_all, stranger
from test_transport_security import make_ca_and_cert

from harness import PASSWORD


def test_user_commands_with_new_names_do_not_grow_the_agent(agent_factory):
    """USER with a name nobody has, again and again on a connection that never logs in, kept a throttle per name
    for the process's life (aioftp's throttle_per_user, keyed by a User object made afresh for each unknown name):
    ~100 000 lines grew the agent by tens of MB, and nothing bounds how often a client sends them."""
    agent = agent_factory(**{"ftp.login_timeout": 600}).start()
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    s.settimeout(30)
    assert s.recv(1024).startswith(b"220")

    def send_users(count: int, start: int) -> None:
        batch = 2000
        for base in range(start, start + count, batch):
            s.sendall(b"".join(f"USER n{i:07d}\r\n".encode() for i in range(base, base + batch)))
            got = b""
            while got.count(b"\r\n") < batch:
                chunk = s.recv(1 << 16)
                assert chunk, "the agent closed the connection"
                got += chunk
            assert got.count(b"331 ") == batch

    send_users(20_000, 0)  # the process's allocator reaches its steady state
    before = agent.rss()
    send_users(100_000, 20_000)
    grown = agent.rss() - before
    assert grown < 8 * 2**20, f"the agent grew by {grown / 2**20:.1f} MB for 100 000 USER commands"
    s.close()
    ftp(agent).quit()  # and it still serves



def test_a_stranger_knocking_on_a_passive_port_again_and_again_fills_neither_journal_nor_audit(agent_factory):
    """Each connection to a passive port from another address than the session's was logged and audited: a
    stranger connecting in a loop while the port waited for its transfer (ftp.passive_timeout, 30 s) wrote an
    event and an audit record each, thousands a second, and rotated the audit trail away. One per stranger and
    port now, with the metric counting every one."""
    agent = agent_factory().start()
    f = ftp(agent)
    port = f.makepasv()[1]
    for _ in range(200):
        assert dropped(stranger(port))
    victim = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert f.sendcmd("NLST").startswith("150")
    assert recv_all(victim) == b""
    assert f.voidresp().startswith("226")
    f.quit()
    assert len(agent.events("data_connection_refused")) == 1
    assert len([r for r in _audit(agent) if r["op"] == "data-connection"]) == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        counted = [row for row in r.read().decode().splitlines()
                   if row.startswith('pacsgw_errors_total{') and 'kind="DataConnectionRefused"' in row]
    assert counted and float(counted[0].split()[-1]) == 200


def test_plain_text_logins_refused_for_tls_fill_neither_journal_nor_audit(agent_factory, tmp_path):
    """With ftp.require_tls, each USER sent in clear was logged (login_refused) and audited: a client that never
    logs in pipelined USER lines over one connection and wrote an event and an audit record per line. Once a
    minute per address now, with how many since; every one is still answered 530."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key), "ftp.require_tls": True}).start()
    with socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=60) as s:
        assert s.recv(1024).startswith(b"220")
        s.sendall(b"USER pacs\r\n" * 300)
        replies = b""
        while replies.count(b"530 TLS required") < 300:
            data = s.recv(65536)
            assert data, replies[-300:]
            replies += data
    assert len(agent.events("login_refused")) == 1
    assert len([r for r in _audit(agent) if r["result"] == "refused: TLS required"]) == 1


def test_a_failed_tls_handshake_on_the_control_connection_is_no_internal_error(agent_factory, tmp_path):
    """AUTH TLS, then no TLS (a port scanner's probe, a client that rejects the certificate or shares no
    protocol version) was logged as ftp_command_failed at error level with a 3 KB traceback, as a bug of the
    agent: anyone reaching the port wrote one per connection. It is the client's failure: counted each
    (pacsgw_errors_total{kind="TLSHandshakeFailed"}), logged once a minute per address without a traceback,
    and the connection is closed; a real client still logs in over TLS."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key)}).start()
    for junk in [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x15\x03\x03\x00\x02\x02\x28"] * 10:
        with socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30) as s:
            assert line(s).startswith(b"220")
            s.sendall(b"AUTH TLS\r\n")
            assert line(s).startswith(b"234")
            s.sendall(junk)
            assert recv_all(s) == b""  # closed, not answered in clear
    tls = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    tls.connect("127.0.0.1", agent.ftp_port)
    tls.login("pacs", PASSWORD)
    tls.quit()
    assert agent.events("ftp_command_failed") == []
    assert len(agent.events("ftp_tls_failed")) == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        counted = [row for row in r.read().decode().splitlines()
                   if row.startswith('pacsgw_errors_total{') and 'kind="TLSHandshakeFailed"' in row]
    assert counted and float(counted[0].split()[-1]) == 30


def test_a_logged_in_session_cannot_log_out_into_an_unlimited_one(agent_factory):
    """USER after a login ended the login and left a session that was not logged in, that ftp.login_timeout no
    longer ended (its clock had run) and ftp.max_unauthenticated no longer counted (its slot was given back at
    the login): any account's holder could keep as many such connections as the address cap allowed, guessing
    other accounts' passwords from each, for ever. USER after a login is refused (530, as vsftpd does); a new
    connection logs in as another user."""
    agent = agent_factory(**{"ftp.login_timeout": 1}).start()
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    assert line(s).startswith(b"220")
    s.sendall(f"USER pacs\r\nPASS {PASSWORD}\r\n".encode())
    assert line(s).startswith(b"331") and line(s).startswith(b"230")
    time.sleep(1.5)  # past login_timeout
    s.sendall(b"USER nobody\r\n")
    assert line(s).startswith(b"530")
    s.sendall(b"PWD\r\n")
    assert line(s).startswith(b"257")  # still logged in as pacs
    s.sendall(b"QUIT\r\n")
    assert line(s).startswith(b"221")
    s.close()
    ftp(agent).quit()


def test_abor_pipelined_behind_a_command_that_is_no_transfer_is_answered_after_it(agent_factory):
    """ABOR runs beside a transfer (to abort it), but it ran beside any command: pipelined behind PASS or DELE its
    reply came first, and a client took `503 not logged in` for the answer to its PASS, `226` for its DELE's.
    Behind a command that is no transfer, ABOR now waits its turn (RFC 959: replies in the order of the commands)."""
    agent = agent_factory().start()
    f = ftp(agent)
    for i in range(3):
        f.storbinary(f"STOR x{i}.dcm", io.BytesIO(b"x"))
    f.quit()
    with socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30) as s:
        assert line(s).startswith(b"220")
        s.sendall(f"USER pacs\r\nPASS {PASSWORD}\r\nABOR\r\n".encode()
                  + b"".join(f"DELE x{i}.dcm\r\nABOR\r\n".encode() for i in range(3)))
        replies = [line(s)[:3] for _ in range(9)]
    assert replies == [b"331", b"230", b"226"] + [b"250", b"226"] * 3
