"""Attacks on a running agent (round 28): hostile HTTP, SFTP and SMB clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import socket

import asyncssh
import pytest

from agent.serve.http import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS
from agent.serve.sftp import MAX_CHANNELS_PER_USER
from harness import PASSWORD


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


def test_sftp_channels_per_user_are_capped_over_its_connections(agent_factory):
    """A user's SFTP channels were capped per connection only (max_channels_per_connection, 10): over its 32
    connections one account held 320, and each not reading its replies held one READ reply (up to 4 MiB) and its
    window of requests in the agent (about 2 GB for the 320). A user now holds MAX_CHANNELS_PER_USER over all its
    connections; one more is refused (the connection stays), and a closed one gives its place back."""
    agent = agent_factory().start()
    per_connection = 10
    connections = -(-MAX_CHANNELS_PER_USER // per_connection) + 1

    async def run() -> None:
        conns = [await asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                        known_hosts=None) for _ in range(connections)]
        try:
            opened: list[asyncssh.SFTPClient] = []
            refused = 0
            for conn in conns:
                for _ in range(per_connection):
                    try:
                        opened.append(await conn.start_sftp_client())
                    except asyncssh.ChannelOpenError as e:
                        assert "for this user" in e.reason
                        refused += 1
            assert len(opened) == MAX_CHANNELS_PER_USER and refused == connections * per_connection - len(opened)
            assert await opened[0].listdir(".") == []  # the connections stay
            opened.pop().exit()
            for _ in range(100):  # until the agent has seen the channel close
                try:
                    await conns[-1].start_sftp_client()
                    break
                except asyncssh.ChannelOpenError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("a closed channel's place was not given back")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conns[-1].start_sftp_client()
        finally:
            for conn in conns:
                conn.close()

    asyncio.run(run())
