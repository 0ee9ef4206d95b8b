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


def _raw_request(port: int, request: bytes) -> bytes:
    """The status line the listener answers these raw bytes with (b'' when it just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # it may answer and close before reading it all
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out.split(b"\r\n", 1)[0]


def test_malformed_requests_are_one_bounded_event_not_a_traceback_each(agent_factory):
    """aiohttp logged 'Error handling request' with a plain-text traceback (about 20 lines) for every malformed
    request on the agent's HTTP listener (request line too long, too many or too long headers, a bad method
    after a good request): anyone who can reach the port could fill the journal. Now the client still gets 400,
    and the log has one http_bad_request key-value event per minute, counting the others (suppressed)."""
    a = agent_factory().start()
    hostile = [b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(40000)) + b"\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"\x1b[2J" * 5000 + b"\r\n\r\n",
               b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"]
    before = len(a.log_path.read_text().splitlines())
    for _ in range(10):
        for request in hostile:
            assert _raw_request(a.http_port, request)[9:12] == b"400", request[:40]
        with socket.create_connection(("127.0.0.1", a.http_port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            out = s.recv(65536)  # the answer, on a connection kept alive: then a bad method (an error, not debug)
            s.sendall(b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n")
            while chunk := s.recv(65536):
                out += chunk
        assert out.startswith(b"HTTP/1.1 200") and b" 400 Bad Request" in out
    assert _raw_request(a.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") \
        == b"HTTP/1.1 200 OK"
    time.sleep(0.5)
    lines = a.log_path.read_text().splitlines()[before:]
    assert "Traceback" not in "\n".join(lines) and "\x1b" not in "\n".join(lines)
    bad = [line for line in lines if '"http_bad_request"' in line]
    assert len(bad) == 1 and len(bad[0]) < 1000, bad
    assert len(lines) <= 3, lines
