"""The HTTP listeners against a hostile host on the LAN (harden3), a real agent process."""

from __future__ import annotations

import base64
import select
import socket
import time

from test_metrics_listener import _make_tls

from agent.auth import hash_password
from agent.serve.http import IDLE_SECONDS
from devstack import free_port
from harness import PASSWORD


def test_a_silent_connection_to_the_tls_metrics_listener_goes_after_idle_seconds(agent_factory, tmp_path):
    """metrics_listen faces the monitoring network, over TLS. A connection that never sent its ClientHello was kept
    for asyncio's handshake timeout (60 s), not the listener's IDLE_SECONDS: 12 times the connections for a host
    holding as many as it can. Now the handshake has IDLE_SECONDS too."""
    cert, key, _ = _make_tls(tmp_path)
    port = free_port()
    agent_factory(**{"http.metrics_listen": f"127.0.0.1:{port}", "http.metrics_tls_cert": str(cert),
                     "http.metrics_tls_key": str(key)}).start()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(5)]
    deadline = time.monotonic() + IDLE_SECONDS + 10
    while silent:
        assert time.monotonic() < deadline, f"{len(silent)} silent connections still open"
        for s in select.select(silent, [], [], 1)[0]:
            try:
                assert s.recv(4096) == b""  # closed, nothing sent
            except ConnectionResetError:
                pass
            s.close()
            silent.remove(s)


def _ask(port: int, authorization: bytes, path: bytes) -> bytes:
    """The status line of a GET with this raw Authorization header (bytes no HTTP client library would send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization
                  + b"\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.split(b"\r\n", 1)[0]


def test_authorization_headers_that_are_not_utf8_or_ascii_are_refused_not_500(agent_factory):
    """The basic-auth header of the metrics listener (on the monitoring network) and the admin token header: an
    Authorization value that is not ASCII base64 ('Basic é') or not UTF-8 at all (bytes ff fe) was an unhandled
    ValueError / UnicodeEncodeError: HTTP 500 and a traceback in the log, for anyone who can reach the port. Now
    401 (metrics_refused / admin_refused), and the right password still scrapes."""
    port = free_port()
    a = agent_factory(**{"http.metrics_listen": f"127.0.0.1:{port}", "http.metrics_user": "prometheus",
                         "http.metrics_password_hash": hash_password(PASSWORD)}).start()
    good = b"Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode())
    assert _ask(port, good, b"/metrics") == b"HTTP/1.1 200 OK"  # verified once: later headers are compared first
    for hostile in (b"Basic \xc3\xa9", b"Basic \xff\xfe", b"\xff\xfe"):
        assert _ask(port, hostile, b"/metrics") == b"HTTP/1.1 401 Unauthorized", hostile
        assert _ask(a.http_port, b"Bearer " + hostile, b"/admin/evict") == b"HTTP/1.1 401 Unauthorized", hostile
    assert _ask(port, good, b"/metrics") == b"HTTP/1.1 200 OK"
    assert "Traceback" not in a.log_path.read_text()
