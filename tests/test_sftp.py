"""SFTP beyond the common scenarios of tests/test_conformance.py: public keys, v3 rename, random-access writes."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE

from harness import PASSWORD, s3_objects, sha256


def connect(agent, user: str = "pacs", **kw):
    opts = {"password": PASSWORD} if not kw else kw
    return asyncssh.connect("127.0.0.1", agent.sftp_port, username=user, known_hosts=None, **opts)


def run(coro):
    return asyncio.run(coro)


def test_realpath_v3_rename_and_sftp_only_paths(agent_factory):
    """SFTP beyond the common scenarios: realpath, the v3 rename that never replaces (posix-rename does, as in
    tests/test_conformance.py), a listing above the root, a backslash in a name (a separator in SMB)."""
    agent = agent_factory().start()

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.realpath(".") == "/"
            for name, data in (("a.dcm", b"first"), ("b.dcm", b"other")):
                async with sftp.open(name, "wb") as f:
                    await f.write(data)
            with pytest.raises(asyncssh.SFTPError):
                await sftp.rename("b.dcm", "a.dcm")  # v3 rename never replaces
            with pytest.raises(asyncssh.SFTPError):
                await sftp.listdir("/..")
            with pytest.raises(asyncssh.SFTPError):
                async with sftp.open("a\\b.dcm", "wb") as f:
                    await f.write(b"x")
            assert sorted(await sftp.listdir("/")) == ["a.dcm", "b.dcm"]

    run(session())
    remote = s3_objects(agent.store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == {"a.dcm": sha256(b"first"), "b.dcm": sha256(b"other")}


def test_random_access_writes_are_hashed_at_commit(agent_factory):
    agent = agent_factory().start()
    data = os.urandom(300_000)

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("x.dcm", "wb") as f:
                await f.write(data[150_000:], 150_000)  # second half first
                await f.write(data[:150_000], 0)
            async with sftp.open("x.dcm", "rb") as f:
                await f.seek(100_000)
                assert await f.read(10) == data[100_000:100_010]

    run(session())
    assert s3_objects(agent.store, agent.prefix)["x.dcm"]["sha256"] == sha256(data)


def test_an_upload_costs_few_ssh_packets(agent_factory, monkeypatch):
    """Every SSH packet costs the agent a decrypt, a parse and a dispatch in Python: a 512 KiB WRITE comes in
    256 KiB packets (asyncssh's default of 32 KiB made 17 of it), and no reply is preceded by an empty IGNORE
    packet (a CBC countermeasure asyncssh sends before every packet, whatever the cipher: here chacha20-poly1305)."""
    agent = agent_factory().start()
    data = os.urandom(512 * 1024)
    sent: Counter[int] = Counter()  # by this client, per SSH message type
    send = asyncssh.connection.SSHConnection.send_packet

    def counted(self, pkttype, *args, **kwargs):
        sent[pkttype] += 1
        return send(self, pkttype, *args, **kwargs)

    handlers = asyncssh.connection.SSHConnection._packet_handlers
    ignore = handlers[MSG_IGNORE]

    def received_ignore(self, *args):
        sent[-MSG_IGNORE] += 1
        return ignore(self, *args)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "send_packet", counted)
    monkeypatch.setitem(handlers, MSG_IGNORE, received_ignore)

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            assert conn.get_extra_info("send_cipher") == "chacha20-poly1305@openssh.com"
            sent.clear()
            async with sftp.open("big.dcm", "wb") as f:
                await f.write(data)

    run(session())
    assert sent[MSG_CHANNEL_DATA] == 5  # OPEN, the WRITE in 3, CLOSE
    assert sent[-MSG_IGNORE] == 0  # received: none before the three replies
    assert s3_objects(agent.store, agent.prefix)["big.dcm"]["sha256"] == sha256(data)


def test_replies_to_pipelined_writes_share_a_packet(agent_factory, monkeypatch):
    """The replies the SFTP loop writes in one turn of the event loop leave in one SSH packet: 16 WRITEs that arrive
    together (OpenSSH's sftp pipelines its 32 KiB writes so) are answered in one CHANNEL_DATA packet, not 16."""
    agent = agent_factory().start()
    received: list[int] = []  # CHANNEL_DATA packets this client received
    handlers = asyncssh.channel.SSHChannel._packet_handlers
    data_handler = handlers[MSG_CHANNEL_DATA]

    def counted(self, *args):
        received.append(1)
        return data_handler(self, *args)

    monkeypatch.setitem(handlers, MSG_CHANNEL_DATA, counted)

    def u32(n: int) -> bytes:
        return n.to_bytes(4, "big")

    def string(b: bytes) -> bytes:
        return u32(len(b)) + b

    def packet(kind: int, *fields: bytes) -> bytes:
        return string(bytes([kind]) + b"".join(fields))

    async def reply(reader) -> bytes:
        return await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))

    block = os.urandom(1024)

    async def session() -> None:
        async with connect(agent) as conn:
            writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
            writer.write(packet(1, u32(3)))  # INIT → VERSION
            await reply(reader)
            pflags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
            writer.write(packet(3, u32(1), string(b"/piped.dcm"), u32(pflags), u32(0)))  # OPEN → HANDLE
            opened = await reply(reader)
            handle = opened[9:9 + int.from_bytes(opened[5:9], "big")]
            received.clear()
            writer.write(b"".join(packet(6, u32(10 + i), string(handle), (i * len(block)).to_bytes(8, "big"),
                                         string(block)) for i in range(16)))
            statuses = [await reply(reader) for _ in range(16)]
            assert [(s[0], s[1:5], s[5:9]) for s in statuses] == [(101, u32(10 + i), u32(0)) for i in range(16)]
            assert len(received) == 1
            writer.write(packet(4, u32(99), string(handle)))  # CLOSE → STATUS OK
            assert (await reply(reader))[5:9] == u32(0)

    run(session())
    assert s3_objects(agent.store, agent.prefix)["piped.dcm"]["sha256"] == sha256(block * 16)


def test_public_key_auth_and_wrong_password(agent_factory, tmp_path):
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(key.export_public_key())
    agent = agent_factory(users=[{"name": "modality", "authorized_keys": str(tmp_path / "authorized_keys"),
                                  "root": "/US"},
                                 {"name": "pacs", "password": PASSWORD, "root": "/"}]).start()

    async def session() -> None:
        async with connect(agent, "modality", client_keys=[key], password=None) as conn, \
                conn.start_sftp_client() as sftp:
            async with sftp.open("/probe.dcm", "wb") as f:
                await f.write(b"us")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.stat("../probe.dcm")
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, "pacs", password="wrong", client_keys=None)
        with pytest.raises(asyncssh.PermissionDenied):  # key users have no password
            await connect(agent, "modality", password="", client_keys=None)
        other = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, "modality", client_keys=[other], password=None)

    run(session())
    assert set(s3_objects(agent.store, agent.prefix)) == {"US/probe.dcm"}
    assert [e["user"] for e in agent.events("login_failed")].count("pacs") >= 1
