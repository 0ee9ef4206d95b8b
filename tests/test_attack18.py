"""Attacks on a running agent (round 18): hostile SFTP, SMB and HTTP clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time

import aiohttp
import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import SMBException
from smbutil import Smb

from agent.serve import http
from agent.serve.http import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS
from agent.serve.sftp import MAX_OPEN_FILES
from devstack import ObjectStore, free_port
from faultkit import sftp_put
from harness import BUCKET, PASSWORD, s3_objects

SMB_ERRORS = (OSError, SMBException)
IMAGE = bytes(range(256)) * 1024  # 256 KiB: one block of asyncssh's copy-data


def _connect(agent) -> asyncssh.connection._ConnectionContextManager:  # type: ignore[name-defined]
    return asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD, known_hosts=None)


def test_sftp_limits_name_the_handles_a_session_may_open(agent_factory):
    """limits@openssh.com told a client asyncssh's own figures: as many open handles as the process may open files
    (its descriptor limit less 5, here about a million), while a session gets MAX_OPEN_FILES. A client sizing its
    parallel transfers by it (OpenSSH's sftp does) met 'too many open files' at its 65th. It names MAX_OPEN_FILES
    now, and the session opens exactly that many."""
    agent = agent_factory().start()

    async def run() -> None:
        async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
            await sftp_put(sftp, "a.dcm", b"an image")
            reply = await sftp._handler._make_request(b"limits@openssh.com")  # the client keeps only two figures
            limits = asyncssh.sftp.SFTPLimits.decode(reply)
            assert limits.max_open_handles == MAX_OPEN_FILES
            files = [await sftp.open("a.dcm", "rb") for _ in range(limits.max_open_handles)]
            with pytest.raises(asyncssh.SFTPFailure, match="too many open files"):
                await sftp.open("a.dcm", "rb")
            for f in files:
                await f.close()

    asyncio.run(run())


def test_sftp_copy_data_from_a_file_onto_itself_is_refused(agent_factory):
    """copy-data (an SFTP extension asyncssh serves) from a file open "r+" to the same handle, to its end, read what
    it had just written: each block it copied (asyncssh copies 256 KiB at a time) was there to copy again. One
    request ran until the user's share for unfinished uploads was full (here 4 MB; the share is a quarter of the
    cache, so hundreds of GB of a real one). As OpenSSH does, a copy from a handle to itself (or to another handle
    of its path) is refused; a copy between two files works."""
    agent = agent_factory(**{"cache.max_bytes": "16MB"}).start()

    async def run() -> None:
        async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
            await sftp_put(sftp, "a.dcm", IMAGE)
            async with sftp.open("a.dcm", "r+b") as f:
                with pytest.raises(asyncssh.SFTPFailure, match="copy-data from a file to itself"):
                    await sftp.remote_copy(f, f, 0, 0, len(IMAGE))
                async with sftp.open("a.dcm", "rb") as stored:
                    with pytest.raises(asyncssh.SFTPFailure, match="copy-data from a file to itself"):
                        await sftp.remote_copy(stored, f, 0, 0, len(IMAGE))
            async with sftp.open("a.dcm", "rb") as f:
                assert await f.read() == IMAGE
            async with sftp.open("a.dcm", "rb") as src, sftp.open("b.dcm", "wb") as dst:
                await sftp.remote_copy(src, dst)
            async with sftp.open("b.dcm", "rb") as f:
                assert await f.read() == IMAGE

    asyncio.run(run())
    assert agent.events("unfinished_limit") == []


def test_two_exclusive_creates_of_one_new_name_do_not_both_succeed(agent_factory):
    """An exclusive create (SFTP's CREAT|EXCL, SMB's FILE_CREATE) was refused only for a name the catalog held: a
    new file is in the catalog at its commit, so two clients creating one name at once both had it, and the one
    that closed last replaced the other's file, which the protocol had promised it alone. The name is held from
    the create on: a second exclusive create of it is refused while the first is written, and after its commit."""
    agent = agent_factory().start()

    async def run() -> None:
        async with _connect(agent) as one, _connect(agent) as two, \
                one.start_sftp_client() as a, two.start_sftp_client() as b:
            first = await a.open("new.dcm", "xb")
            with pytest.raises(asyncssh.SFTPFailure):
                await b.open("new.dcm", "xb")
            await first.write(b"the first client's image")
            await first.close()
            with pytest.raises(asyncssh.SFTPFailure):
                await b.open("new.dcm", "xb")
            async with a.open("new.dcm", "rb") as f:
                assert await f.read() == b"the first client's image"

    asyncio.run(run())
    agent.wait_drained(60)
    assert list(s3_objects(agent.store, agent.prefix)) == ["new.dcm"]


def _status_line(s: socket.socket) -> bytes:
    """What the listener answers a GET /healthz on s with: its status line, or b'' when it closed s unanswered."""
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while b"\r\n" not in out and (chunk := s.recv(4096)):
            out += chunk
    except (BrokenPipeError, ConnectionResetError):
        return b""
    return out.split(b"\r\n", 1)[0]


def test_http_connections_are_capped_per_address_and_in_all(agent_factory):
    """The HTTP listener (/healthz, /status, /metrics: no login, and on the LAN where an HA peer asks it) took every
    connection offered: one address held 600 at once, each a descriptor of the agent's for IDLE_SECONDS, and a
    client connecting in a loop could take the process's last descriptors from its uploads. A listener now keeps
    MAX_CONNECTIONS_PER_ADDRESS from one address and MAX_CONNECTIONS in all; the others are closed unanswered."""
    agent = agent_factory().start()
    addresses = [f"127.0.0.{i}" for i in range(2, 11)]  # 9 x 32 connections would be more than MAX_CONNECTIONS
    assert len(addresses) * MAX_CONNECTIONS_PER_ADDRESS > MAX_CONNECTIONS
    conns: dict[str, list[socket.socket]] = {}
    for address in addresses:
        conns[address] = []
        for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 8):
            s = socket.socket()
            s.settimeout(20)
            s.bind((address, 0))
            s.connect(("127.0.0.1", agent.http_port))
            conns[address].append(s)
    answered = {address: sum(_status_line(s) == b"HTTP/1.1 200 OK" for s in socks) for address, socks in conns.items()}
    for socks in conns.values():
        for s in socks:
            s.close()
    assert max(answered.values()) == MAX_CONNECTIONS_PER_ADDRESS
    assert sum(answered.values()) == MAX_CONNECTIONS
    assert agent.events("http_refused")
    deadline = time.monotonic() + 30  # the agent sees the closed connections go
    while True:
        try:
            assert agent.health()["status"] == "ok"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def _own_address() -> str | None:
    """An address of this host that is not loopback (the one its default route leaves from), if there is one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the route's source address
        except OSError:
            return None
        return str(s.getsockname()[0])


def test_healthz_for_a_client_off_the_box_is_computed_once_per_fresh_seconds(monkeypatch):
    """/healthz and /status ran the agent's health (catalog queries, process, disk and clock figures: 0.8 ms of CPU
    here, four times a refused request) for every request of anyone reaching the port, and /metrics its own. Asked
    at once, they are computed once for all; a client off the box gets an answer up to FRESH_SECONDS old, the box's
    own tools (loopback) a fresh one."""
    address = _own_address()
    if address is None or ipaddress.ip_address(address).is_loopback:
        pytest.skip("this host has no address besides loopback")
    monkeypatch.setattr(http, "FRESH_SECONDS", 3600.0)  # no request here waits long enough to see it expire
    computed = 0
    release = asyncio.Event()

    async def health() -> dict:
        nonlocal computed
        computed += 1
        await release.wait()
        return {"status": "ok", "computed": computed}

    async def metrics() -> bytes:
        return b""

    async def run() -> None:
        server = http.HttpServer("0.0.0.0", free_port(), health, metrics)
        await server.start()
        try:
            async with aiohttp.ClientSession() as client:
                async def ask(host: str) -> str:
                    async with client.get(f"http://{host}:{server.port}/healthz") as r:
                        return await r.text()

                asked = [asyncio.ensure_future(ask(address)) for _ in range(MAX_CONNECTIONS_PER_ADDRESS)]
                await asyncio.sleep(0.2)  # most of them wait for the first one's answer; the others get it kept
                release.set()
                answers = [json.loads(a)["computed"] for a in await asyncio.gather(*asked)]
                assert answers == [1] * MAX_CONNECTIONS_PER_ADDRESS
                assert json.loads(await ask("127.0.0.1"))["computed"] == 2
                assert json.loads(await ask(address))["computed"] == 2
                assert computed == 2
        finally:
            await server.close()

    asyncio.run(run())


class _MemoryStore(ObjectStore):
    """`rclone serve s3` over its memory backend: keys with name segments over 255 bytes, as AWS S3 and Ceph take
    them (SeaweedFS and a local disk refuse them)."""

    def _rclone_cmd(self) -> list[str]:
        cmd = super()._rclone_cmd()
        cmd[cmd.index(str(self.data_dir / "data"))] = ":memory:"
        return cmd


def test_names_too_long_to_look_up_are_not_listed(agent_factory, tmp_path):
    """Another S3 writer stored files whose names are longer than the 255 bytes a client may look up: SFTP and FTP
    listed them, and refused every use of them (open, stat, delete, rename: "name longer than 255 bytes"), while
    SMB clients never saw them. They are left out of listings now, as names with control characters are
    (listing_name_hidden), and the other files of their directory are served."""
    store = _MemoryStore("rclone", tmp_path / "memory").start()
    try:
        store.create_bucket(BUCKET)
        agent = agent_factory(store)
        client = store.client()
        long_names = ["b" * 300 + ".dcm", "\u00e9" * 150 + ".dcm", "\u8a9e" * 100 + ".dcm", "c" * 900]
        for name in [*long_names, "ok.dcm"]:
            client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}dir/{name}", Body=b"an image")
        client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}{'d' * 300}/x.dcm", Body=b"an image")
        agent.start()

        async def run() -> None:
            async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
                assert await sftp.listdir("/") == ["dir"]
                assert await sftp.listdir("dir") == ["ok.dcm"]
                async with sftp.open("dir/ok.dcm", "rb") as f:
                    assert await f.read() == b"an image"

        asyncio.run(run())
        assert {e["name"] for e in agent.events("listing_name_hidden")} == {repr(n) for n in [*long_names, "d" * 300]}
        agent.stop()
    finally:
        store.stop()


def test_an_smb_exclusive_create_of_a_name_an_sftp_client_writes_is_refused(smb_agent):
    """The SMB side of the exclusive create: FILE_CREATE of a name that an SFTP client was writing succeeded (the
    SMB layer knew only its own uploads), and whichever client closed last replaced the other's file."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)

    async def run() -> None:
        async with _connect(agent) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("new.dcm", "wb") as f:
                await f.write(b"the SFTP client's image")
                with pytest.raises(SMB_ERRORS, match="0xc0000035"):
                    with smbclient.open_file(smb.p("new.dcm"), mode="xb", **smb.kw) as g:
                        g.write(b"the SMB client's image")

    asyncio.run(run())
    assert smb.read("new.dcm") == b"the SFTP client's image"
    smb.close()
