"""Attacks on a running agent (round 22): hostile FTP and HTTP clients against real listeners. Each test reproduces
one attack that worked and checks it no longer does."""

from __future__ import annotations

import ftplib
import http.client
import os
import socket
import ssl

from test_ftp_hostile import wait_for
from test_transport_security import make_ca_and_cert

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
    f = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
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
    wait_for(lambda: _fds(agent.proc.pid) < before or int(""))  # the control connection and the last data one
    for s in held:
        s.close()


def test_wrong_admin_tokens_are_logged_once_a_minute_not_each(agent_factory):
    """Every request with a wrong admin token wrote an admin_refused event: any process of the box could write
    thousands a second into the journal. Now one a minute per address, counting the others (refused_since); the
    right token is still served at once (the token is 256 random bits: not slowed like a password, see
    HttpServer.admin)."""
    agent = agent_factory().start()
    conn = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)
    for i in range(300):
        conn.request("GET", "/admin/evict", headers={"Authorization": f"Bearer guess{i}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 401
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    conn.request("GET", "/admin/evict", headers={"Authorization": f"Bearer {token}"})
    assert conn.getresponse().status == 200
    conn.close()
    refused = agent.events("admin_refused")
    assert len(refused) == 1 and refused[0]["refused_since"] == 0, refused

