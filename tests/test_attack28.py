"""Attacks on a running agent (round 28): hostile HTTP, SFTP and SMB clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import socket

from agent.serve.http import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS


def test_the_health_check_is_answered_while_the_admin_network_holds_every_connection(agent_factory):
    """keepalived's check (agent.hahook, from 127.0.0.1) counted against the listener's MAX_CONNECTIONS like any
    address: eight addresses of the admin network (here 127.0.0.2-9) each holding MAX_CONNECTIONS_PER_ADDRESS idle
    connections had it refused, and the HA pair failed over. The box's own addresses are not counted in the total."""
    agent = agent_factory().start()
    attackers = [f"127.0.0.{i}" for i in range(2, 2 + MAX_CONNECTIONS // MAX_CONNECTIONS_PER_ADDRESS)]
    held: list[socket.socket] = []
    try:
        for address in attackers:
            for _ in range(MAX_CONNECTIONS_PER_ADDRESS):
                s = socket.socket()
                s.bind((address, 0))
                s.connect(("127.0.0.1", agent.http_port))
                held.append(s)
        # accepted in the order they came: the attackers' connections are all counted before this one, the
        # request agent.hahook's check makes (urllib, GET /healthz from 127.0.0.1)
        assert agent.health()["status"] == "ok"
        late = socket.create_connection(("127.0.0.1", agent.http_port), timeout=5, source_address=("127.0.0.10", 0))
        held.append(late)
        try:
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = late.recv(64)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # the total still holds for every other address
    finally:
        for s in held:
            s.close()
