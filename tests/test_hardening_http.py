"""The HTTP listeners against a hostile host on the LAN (harden3), a real agent process."""

from __future__ import annotations

import select
import socket
import time

from test_metrics_listener import _make_tls

from agent.serve.http import IDLE_SECONDS
from devstack import free_port


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
