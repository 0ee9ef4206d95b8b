"""Regression tests for issue 19 (hostile and careless clients), each the issue's own reproduction against a
live agent with real clients: the root, SFTP session ends and truncation, deleted files coming back,
per-user permissions, password guessing, the admin path and start-up failures."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncssh
import psutil
import pytest
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

from agent.serve.http import IDLE_SECONDS
from agent.serve.sftp import MAX_OPEN_FILES, MAX_READ
from devstack import free_port
from harness import BUCKET, PASSWORD, s3_objects, sha256


def ftp(agent, user: str = "pacs", password: str = PASSWORD) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login(user, password)
    return f


def put(f: ftplib.FTP, path: str, data: bytes, cmd: str = "STOR") -> str:
    return f.storbinary(f"{cmd} {path}", io.BytesIO(data))


def get(f: ftplib.FTP, path: str) -> bytes:
    buf = io.BytesIO()
    f.retrbinary(f"RETR {path}", buf.write)
    return buf.getvalue()


def sftp_session(agent, body, user: str = "pacs", password: str = PASSWORD):
    async def run():
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username=user, password=password,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            return await body(sftp)
    return asyncio.run(run())


def refused(code: str, call, *args) -> None:
    with pytest.raises(ftplib.error_perm) as err:
        call(*args)
    assert str(err.value).startswith(code), err.value


# --- 3 and 4: SFTP ----------------------------------------------------------------------------------


def test_sftp_session_ended_with_a_write_handle_open_discards_the_file(agent_factory):
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            sftp = await conn.start_sftp_client()
            f = await sftp.open("partial.dcm", "wb")
            await f.write(b"x" * 100_000)
            sftp.exit()  # leaves the SFTP subsystem without CLOSE; the SSH connection stays up
            await sftp.wait_closed()
            await asyncio.sleep(1.0)
            async with conn.start_sftp_client() as again:
                assert await again.listdir(".") == []
    asyncio.run(run())
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix) == {}
    assert "upload_aborted" in agent.log_path.read_text()


def test_sftp_ftruncate_and_setstat_size(agent_factory):
    agent = agent_factory().start()

    async def body(sftp):
        async with sftp.open("t.dcm", "wb") as f:
            await f.write(b"OLDCONTENT")
        async with sftp.open("t.dcm", "r+b") as f:
            await f.write(b"NEW", 0)
            await f.truncate(3)
        async with sftp.open("t.dcm", "rb") as f:
            assert await f.read() == b"NEW"
        await sftp.truncate("t.dcm", 2)  # setstat with a size
        assert (await sftp.stat("t.dcm")).size == 2
        async with sftp.open("t.dcm", "rb") as f:
            assert await f.read() == b"NE"
    sftp_session(agent, body)
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["t.dcm"]["sha256"] == sha256(b"NE")


def test_sftp_handles_reads_and_unread_replies_are_bounded(agent_factory):
    """One SFTP session may hold sftp.MAX_OPEN_FILES handles (each was a descriptor of the agent, without end);
    a READ of 4 GiB gets the announced maximum (it got the whole file in one reply); a client that sends READs
    but opens no window for the replies no longer makes the agent queue them all in memory (64 MiB here)."""
    agent = agent_factory().start()
    proc = psutil.Process(agent.proc.pid)
    data = os.urandom(MAX_READ + (1 << 20))

    class Raw(asyncssh.SSHClientSession[bytes]):
        """An SFTP channel spoken by hand: replies are collected while it reads, left unread once paused."""
        received = b""

        def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
            self.received += data

        async def replies(self, n: int) -> list[bytes]:
            """The first n replies (each without its length), once they are all here."""
            while True:
                out, buf = [], self.received
                while len(buf) >= 4 and len(buf) >= 4 + (size := int.from_bytes(buf[:4], "big")):
                    out.append(buf[4:4 + size])
                    buf = buf[4 + size:]
                if len(out) >= n:
                    return out
                await asyncio.sleep(0.05)

    def request(kind: int, request_id: int, *fields: bytes) -> bytes:
        body = bytes([kind]) + request_id.to_bytes(4, "big") + b"".join(fields)
        return len(body).to_bytes(4, "big") + body

    def read(request_id: int, handle: bytes, length: int) -> bytes:
        return request(5, request_id, handle, bytes(8), length.to_bytes(4, "big"))  # READ at offset 0

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("big.dcm", "wb") as f:
                    await f.write(data)
                files = [await sftp.open("big.dcm", "rb") for _ in range(MAX_OPEN_FILES)]
                with pytest.raises(asyncssh.SFTPFailure, match="too many open files"):
                    await sftp.open("big.dcm", "rb")
                await files.pop().close()
                files.append(await sftp.open("big.dcm", "rb"))
                for f in files:
                    await f.close()
            chan, raw = await conn.create_session(Raw, subsystem="sftp", encoding=None)
            chan.write(b"\0\0\0\5\1\0\0\0\3")  # INIT, version 3
            chan.write(request(3, 1, String("big.dcm"), (1).to_bytes(4, "big"), bytes(4)))  # OPEN for reading
            handle = (await raw.replies(2))[1][5:]  # HANDLE: type, id, the handle as an SSH string
            chan.write(read(2, handle, 0xFFFFFFFF))
            reply = (await raw.replies(3))[2]
            assert reply[0] == 103 and int.from_bytes(reply[5:9], "big") == MAX_READ  # DATA
            chan.pause_reading()
            rss = proc.memory_info().rss
            for i in range(64):
                chan.write(read(10 + i, handle, 1 << 20))
            await asyncio.sleep(3)
            assert proc.memory_info().rss - rss < 24 << 20
            async with conn.start_sftp_client() as sftp:  # that session is stalled, not the agent
                assert await sftp.listdir(".") == ["big.dcm"]
            chan.close()

    asyncio.run(run())


# --- 6: deleted files come back ---------------------------------------------------------------------


def test_pending_deletes_are_not_listed_again(tmp_path):
    """The catalog's side, deterministic: a listing that still has a deleted key does not bring it back."""
    from agent.store.catalog import Catalog, RemoteObject
    c = Catalog(tmp_path / "c.sqlite")
    c.commit_write("D/a", "blob", 1, "0" * 64, time.time(), claim=False)
    c.delete("D/a")
    c.rmdir("D")
    c.commit_write("D/b", "blob2", 1, "0" * 64, time.time(), claim=False)
    now = time.time()
    c.merge_listing("D", [RemoteObject("a", 1, now, None), RemoteObject("b", 1, now, None)], [], now)
    assert [e.name for e in c.children("D")] == ["b"]
    assert c.tombstones_under("D") and not c.tombstones_under("E")
    c.close()


def test_deleted_file_does_not_come_back_over_ftp(agent_factory):
    agent = agent_factory().start()
    f = ftp(agent)
    for _ in range(3):
        put(f, "D/a", b"first")
        f.delete("D/a")
        f.rmd("D")
        put(f, "D/b", b"second")
        assert f.nlst("D") == ["b"]
        refused("550", get, f, "D/a")
        f.delete("D/b")
        f.rmd("D")
    # a directory whose only objects are pending deletes does not come back either
    put(f, "E/x/a", b"e")
    f.delete("E/x/a")
    f.rmd("E/x")
    f.rmd("E")
    put(f, "F", b"f")
    assert f.nlst() == ["F"]
    f.quit()
    agent.wait_drained()
    assert set(s3_objects(agent.store, agent.prefix)) == {"F"}


# --- 11: permissions --------------------------------------------------------------------------------


def test_permissions_per_user_over_ftp_and_sftp(agent_factory):
    agent = agent_factory(users=[{"name": "pacs", "password": PASSWORD, "permissions": ["read", "write", "rename"]},
                                 {"name": "viewer", "password": PASSWORD, "permissions": ["read"]},
                                 {"name": "admin", "password": PASSWORD}]).start()
    admin, pacs, viewer = ftp(agent, "admin"), ftp(agent, "pacs"), ftp(agent, "viewer")
    assert put(pacs, "CT/a.dcm", b"12345").startswith("226")
    assert put(pacs, "CT/a.dcm", b"678", "APPE").startswith("226")  # appending destroys nothing
    refused("550", put, pacs, "CT/a.dcm", b"other")                  # overwriting does
    refused("550", pacs.delete, "CT/a.dcm")
    refused("550", pacs.rmd, "CT")
    pacs.mkd("MR")
    refused("550", pacs.rmd, "MR")
    put(pacs, "CT/tmp.part", b"new")
    pacs.rename("CT/tmp.part", "CT/b.dcm")                         # rename to a new name: allowed
    put(pacs, "CT/c.part", b"c")
    refused("550", pacs.rename, "CT/c.part", "CT/a.dcm")           # rename over a file: a delete
    assert get(viewer, "CT/a.dcm") == b"12345678"
    refused("550", put, viewer, "CT/v.dcm", b"v")
    refused("550", viewer.mkd, "US")
    refused("550", viewer.rename, "CT/b.dcm", "CT/z.dcm")
    refused("550", viewer.delete, "CT/b.dcm")

    async def body(sftp):
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove("CT/a.dcm")
        f = await sftp.open("CT/a.dcm", "r+b")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await f.write(b"X", 0)                                  # changing stored bytes
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await f.close()                                         # that version is discarded
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.truncate("CT/a.dcm", 1)
    sftp_session(agent, body)
    admin.delete("CT/c.part")
    assert sorted(admin.nlst("CT")) == ["a.dcm", "b.dcm"]
    assert get(admin, "CT/a.dcm") == b"12345678"
    for f in (admin, pacs, viewer):
        f.quit()
    audit = (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text()
    assert "lacks the 'delete' permission" in audit


# --- 8: password guessing ---------------------------------------------------------------------------


def metric(agent, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_password_guessing_is_slowed_then_banned(agent_factory):
    agent = agent_factory(**{"login.delay_seconds": 0.2, "login.max_delay_seconds": 0.4, "login.max_failures": 4,
                             "login.ban_seconds": 3600}).start()
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(ftplib.error_perm):
            ftp(agent, password="wrong-guess")
    assert time.monotonic() - t0 >= 0.2 + 0.4 + 0.4  # backoff: 0.2, 0.4, then capped
    with pytest.raises(asyncssh.PermissionDenied):
        sftp_session(agent, lambda s: asyncio.sleep(0), password="wrong-guess")  # the 4th: shared count → ban
    # banned: even the right password is refused, over every protocol, without being checked
    with pytest.raises(ftplib.error_perm) as err:
        ftp(agent)
    assert "banned" in str(err.value)
    with pytest.raises(asyncssh.PermissionDenied):
        sftp_session(agent, lambda s: asyncio.sleep(0))
    assert metric(agent, "pacsgw_login_failures_total") == 4
    assert metric(agent, 'pacsgw_login_bans_total{scope="address"}') == 1
    assert metric(agent, 'pacsgw_login_banned{scope="address"}') == 1
    assert metric(agent, "pacsgw_login_refused_total") >= 2
    audit = (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text()
    assert "address banned for 3600 s" in audit and "refused: address temporarily banned" in audit
    assert '"event": "login_ban"' in agent.log_path.read_text()


async def test_locked_user_still_logs_in_from_its_known_address():
    """The per-user lock spares addresses that logged in as that user before (a guesser elsewhere on the
    network must not lock the PACS out); the clock is passed in, so this needs no waiting."""
    from agent.audit import AuditLog
    from agent.auth import LoginGuard
    from agent.config import LoginConfig
    from agent.metrics import Metrics
    g = LoginGuard(LoginConfig(max_failures=3, ban_seconds=60), Metrics(), AuditLog(None, 0, 1, False))
    await g.succeeded("pacs", "10.0.0.5", now=0)
    for i, addr in enumerate(["10.9.0.1", "10.9.0.2", "10.9.0.3"]):  # one guess from each of three addresses
        assert await g.refusal("pacs", addr, "ftp", now=i) == ""
        await g.failed("pacs", addr, "ftp", now=i)
    assert "user temporarily banned" in await g.refusal("pacs", "10.9.0.4", "ftp", now=5)
    assert await g.refusal("pacs", "10.0.0.5", "ftp", now=5) == ""
    assert await g.refusal("pacs", "10.9.0.4", "ftp", now=63) == ""  # the ban ends


def _hold_slots(path: str, n: int, ready) -> None:
    """In another process: take n session slots from the guard file, then wait to be killed."""
    from agent.audit import AuditLog
    from agent.auth import LoginGuard
    from agent.config import LoginConfig
    from agent.metrics import Metrics
    g = LoginGuard(LoginConfig(), Metrics(), AuditLog(None, 0, 1, False), Path(path))
    for _ in range(n):
        assert asyncio.run(g.take_session("address", "10.0.0.9", 3)) is not None
    ready.set()
    time.sleep(600)


async def test_login_guard_counts_are_shared_through_its_file(tmp_path):
    """Two guards on one file (two serving processes): failures and bans add up across them, a session cap
    holds for both, and the slots of a process killed with kill -9 are freed when the cap is reached."""
    import multiprocessing
    import os
    import signal

    from agent.audit import AuditLog
    from agent.auth import LoginGuard
    from agent.config import LoginConfig
    from agent.metrics import Metrics
    path = tmp_path / "logins.sqlite"
    cfg, off = LoginConfig(max_failures=4, ban_seconds=60), AuditLog(None, 0, 1, False)
    a, b = LoginGuard(cfg, Metrics(), off, path), LoginGuard(cfg, Metrics(), off, path)
    for i in range(3):
        await (a if i % 2 else b).failed("pacs", "10.9.0.1", "ftp", now=i)
    assert await a.refusal("pacs", "10.9.0.1", "sftp", now=3) == ""
    assert await b.refusal("pacs", "10.9.0.1", "ftp", now=3) == ""
    await a.failed("pacs", "10.9.0.1", "ftp", now=3)  # the 4th of the box: both refuse
    assert "address temporarily banned" in await b.refusal("pacs", "10.9.0.1", "ftp", now=4)
    assert await b.banned("address", now=4) == ["10.9.0.1"]
    assert await b.refusal("pacs", "10.9.0.1", "ftp", now=64) == ""  # the ban ends for both
    slots = [await (a, b, a)[i].take_session("user", "pacs", 3) for i in range(3)]
    assert None not in slots and await b.take_session("user", "pacs", 3) is None
    await asyncio.wrap_future(a.release_session(slots[0]))
    assert await b.take_session("user", "pacs", 3) is not None
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    holder = spawn.Process(target=_hold_slots, args=(str(path), 2, ready))
    holder.start()
    try:
        assert ready.wait(60)
        assert await a.take_session("address", "10.0.0.9", 3) is not None
        assert await b.take_session("address", "10.0.0.9", 3) is None  # 2 held by the other process + 1
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert await b.take_session("address", "10.0.0.9", 3) is not None  # the dead process's two are freed
        assert await b.take_session("address", "10.0.0.9", 3) is not None
        assert await a.take_session("address", "10.0.0.9", 3) is None
    finally:
        holder.kill()
    a.close()
    b.close()
    c = LoginGuard(cfg, Metrics(), off, path)  # a restarted agent of the same boot keeps what was counted
    assert await c.take_session("address", "10.0.0.9", 3) is None
    c.close()


async def test_login_guard_lets_logins_through_on_a_full_disk(tmp_path):
    """The guard's file shares the cache disk: when that is full, a good login and a new session are let
    through uncounted (the PACS must still read what is cached), and the file stays usable afterwards."""
    import os

    from agent.audit import AuditLog
    from agent.auth import LoginGuard
    from agent.config import LoginConfig
    from agent.metrics import Metrics
    from faultkit import tmpfs
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with tmpfs(tmp_path / "disk", "1m") as disk:
        g = LoginGuard(LoginConfig(max_failures=3), Metrics(), AuditLog(None, 0, 1, False), disk / "logins.sqlite")
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        slots = [await g.take_session("address", f"10.1.{i // 250}.{i % 250}", 2) for i in range(400)]
        for i in range(400):
            await g.succeeded("pacs", f"10.2.{i // 250}.{i % 250}")
        assert None not in slots and 0 in slots  # some could not be recorded: let through
        for slot in slots:
            g.release_session(slot)
        (disk / "filler").unlink()
        assert await g.take_session("address", "10.9.9.9", 1)
        assert await g.take_session("address", "10.9.9.9", 1) is None
        g.close()


async def test_login_guard_does_not_stall_on_a_locked_file(tmp_path):
    """Another process stuck inside a transaction of the guard's file (here: a second connection holding the
    write lock) must not stall logins for seconds: bans are still read, a good login and a session are let
    through uncounted, a failure gets the longest delay, and a slot released meanwhile is freed afterwards."""
    import sqlite3

    from agent.audit import AuditLog
    from agent.auth import LoginGuard
    from agent.config import LoginConfig
    from agent.metrics import Metrics
    path = tmp_path / "logins.sqlite"
    cfg = LoginConfig(max_failures=2, delay_seconds=0.1, max_delay_seconds=7)
    g = LoginGuard(cfg, Metrics(), AuditLog(None, 0, 1, False), path)
    for _ in range(2):
        await g.failed("guesser", "10.6.6.6", "sftp")
    slot = await g.take_session("address", "10.0.0.1", 1)
    stuck = sqlite3.connect(path, isolation_level=None)
    stuck.execute("BEGIN IMMEDIATE")
    t0 = time.monotonic()
    assert "banned" in await g.refusal("other", "10.6.6.6", "sftp")
    assert await g.refusal("pacs", "10.0.0.2", "sftp") == ""
    await g.succeeded("pacs", "10.0.0.2")
    assert await g.take_session("address", "10.0.0.3", 5) == 0  # uncounted
    assert await g.failed("pacs", "10.0.0.4", "sftp") == cfg.max_delay_seconds
    g.release_session(slot)
    assert time.monotonic() - t0 < 2.5  # each locked call waits BUSY_MS (0.2 s), not seconds
    stuck.execute("ROLLBACK")
    assert await g.take_session("address", "10.0.0.1", 1)  # the release is done once the lock is gone
    assert await g.take_session("address", "10.0.0.1", 1) is None
    g.close()


def test_sftp_session_caps_per_address_and_per_user(agent_factory):
    """SSH connections count against [sftp] max_sessions_per_address, logins against max_sessions_per_user; one
    more is disconnected (TOO_MANY_CONNECTIONS; over the address cap at its login request) and its slot is free
    again once a client leaves. FTP sessions from the same address count apart. Every refused client reads the
    reason, also one whose requests cross the DISCONNECT (the server closed at once: they met a reset)."""
    agent = agent_factory(**{"sftp.max_sessions_per_address": 3, "sftp.max_sessions_per_user": 2},
                          users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                                 {"name": "viewer", "password": PASSWORD, "root": "/"}]).start()

    class Client(asyncssh.SSHClient):
        ended: Exception | None = None

        def connection_lost(self, exc: Exception | None) -> None:
            self.ended = exc

    def connect(user: str = "pacs", source: str = "127.0.0.1"):
        return asyncssh.create_connection(Client, "127.0.0.1", agent.sftp_port, username=user, password=PASSWORD,
                                          known_hosts=None, local_addr=(source, 0))

    async def session(user: str = "pacs", source: str = "127.0.0.1") -> str:
        """One SFTP session → '' when it could list '/', else why the server disconnected."""
        try:
            conn, client = await connect(user, source)
        except asyncssh.DisconnectError as e:  # before the login
            assert e.code == asyncssh.DISC_TOO_MANY_CONNECTIONS, e
            return e.reason
        try:
            async with conn, conn.start_sftp_client() as sftp:
                await sftp.listdir("/")
                return ""
        except asyncssh.ChannelOpenError:  # the server disconnected right after the login
            return await reason(conn, client)

    async def reason(conn: asyncssh.SSHClientConnection, client: Client) -> str:
        await conn.wait_closed()
        assert isinstance(client.ended, asyncssh.DisconnectError), client.ended
        assert client.ended.code == asyncssh.DISC_TOO_MANY_CONNECTIONS
        return client.ended.reason

    async def crossing() -> tuple[bool, str]:
        """A login over the user cap whose client writes on after the DISCONNECT came, before reading it →
        (whether it could: the DISCONNECT may be read with the login's answer, the reason)."""
        conn, client = await connect()
        sock = conn.get_extra_info("socket")
        if sock is not None:
            select.select([sock], [], [], 30)  # the DISCONNECT is here (this loop is blocked: it stays unread)
            time.sleep(0.2)  # the server is done with its side
            conn.send_packet(MSG_IGNORE, String(b""))  # a closed socket answered this with a reset
            time.sleep(0.2)
            conn.send_packet(MSG_IGNORE, String(b""))  # and this write then failed: EPIPE, the reason never read
        return sock is not None, await reason(conn, client)

    async def until(user: str, outcome: str) -> None:
        deadline = time.monotonic() + 30
        while (got := await session(user)).split(" (")[0] != outcome:
            # the server counts a client out when it sees the connection end
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.2)

    async def run() -> None:
        (a, _), (b, _), (v, _) = [await connect(user) for user in ("pacs", "pacs", "viewer")]
        assert (await session("viewer")).startswith("too many sessions from your address (limit 3)")
        await asyncio.to_thread(lambda: ftp(agent).quit())  # FTP's own caps, not SFTP's
        v.close()
        await v.wait_closed()
        await until("pacs", "too many sessions for this user")  # the address has a slot again, pacs has none
        crossed = [await crossing() for _ in range(5)]
        assert any(wrote for wrote, _ in crossed)
        assert all(why.startswith("too many sessions for this user (limit 2)") for _, why in crossed)
        assert await session("viewer", "127.0.0.2") == ""  # the address cap is per address
        a.close()
        await a.wait_closed()
        await until("pacs", "")  # a slot of pacs is free again
        b.close()
        await b.wait_closed()

    asyncio.run(run())
    wait_for(lambda: not [c for c in psutil.Process(agent.proc.pid).net_connections("tcp")  # none lingers on
                          if c.laddr.port == agent.sftp_port and c.status != psutil.CONN_LISTEN], 10)
    refusals = [e for e in agent.events("session_refused") if e.get("protocol") == "sftp"]
    assert {r["reason"].split(" (")[0] for r in refusals} >= {"too many sessions from 127.0.0.1",
                                                               "too many sessions for user pacs"}


def test_sftp_connections_over_the_address_cap_are_held_within_a_bound(agent_factory):
    """A connection over the address cap is kept up to REFUSE_S (then LINGER_S) for its client to read why. An
    address opening connections over the cap as fast as it could piled them up, each a descriptor of the agent,
    until it had none left: at most HOLD_MAX are kept, the others are cut at once."""
    from agent.serve.sftp import _Auth
    agent = agent_factory(**{"sftp.max_sessions_per_address": 1}).start()
    first = socket.create_connection(("127.0.0.1", agent.sftp_port), timeout=30)
    assert first.recv(256).startswith(b"SSH-2.0-")  # connected and counted: every other connection is refused
    agent_proc = psutil.Process(agent.proc.pid)

    def held() -> int:
        return len([c for c in agent_proc.net_connections("tcp")
                    if c.laddr.port == agent.sftp_port and c.status != psutil.CONN_LISTEN])

    flood = [socket.create_connection(("127.0.0.1", agent.sftp_port), timeout=30) for _ in range(3 * _Auth.HOLD_MAX)]
    for s in flood:  # accepted: the server's version line came (or, cut already, the connection's end)
        with contextlib.suppress(OSError):
            s.recv(8)
    cut_by = time.monotonic() + _Auth.REFUSE_S * 0.75  # before the first held one's disconnect is due
    while (now := held()) > _Auth.HOLD_MAX + 1:
        assert time.monotonic() < cut_by, f"{now} connections held"
        time.sleep(0.05)
    for s in [first, *flood]:
        s.close()
    wait_for(lambda: held() == 0, 10)  # the held ones went too, and their places are free again
    sftp_session(agent, lambda sftp: sftp.listdir("."))  # served again (it raises if refused)


def test_a_wrong_login_costs_the_same_whatever_the_name(agent_factory):
    """User enumeration by timing: scrypt ran only for a name with a password_hash, so a wrong password for an
    unknown name or a plain-password user was answered ~50 ms sooner. Every check now runs scrypt once: the
    agent's CPU time per wrong login is about the same for the three, over FTP and SFTP."""
    from agent.auth import hash_password
    agent = agent_factory(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                                 {"name": "keeper", "password_hash": hash_password("a-long-secret"), "root": "/"}],
                          **{"login.delay_seconds": 0, "login.max_failures": 1000}).start()
    agent_proc = psutil.Process(agent.proc.pid)

    async def sftp_logins(name: str) -> None:
        for _ in range(4):
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect("127.0.0.1", agent.sftp_port, username=name, password="wrong-guess",
                                       known_hosts=None)

    def cpu_of_wrong_logins(name: str) -> float:
        before = sum(agent_proc.cpu_times()[:2])
        f = ftplib.FTP(timeout=30)
        f.connect("127.0.0.1", agent.ftp_port)
        for _ in range(6):
            with pytest.raises(ftplib.error_perm, match="530"):
                f.login(name, "wrong-guess")
        f.close()
        asyncio.run(sftp_logins(name))
        return sum(agent_proc.cpu_times()[:2]) - before

    hashed, unknown, plain = (cpu_of_wrong_logins(name) for name in ("keeper", "nobody-here", "pacs"))
    assert unknown > 0.5 * hashed and plain > 0.5 * hashed, (hashed, unknown, plain)


# --- 14: the admin path -----------------------------------------------------------------------------


def test_admin_requests_need_the_token_and_json(agent_factory):
    agent = agent_factory().start()
    f = ftp(agent)
    for i in range(4):
        put(f, f"CT/{i}.dcm", b"x" * 1000)
    f.quit()
    agent.wait_drained()
    base = f"http://127.0.0.1:{agent.http_port}"
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    assert (agent.workdir / "cache" / "admin.token").stat().st_mode & 0o077 == 0

    def call(path: str, data: bytes | None = None, **headers: str) -> int:
        req = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            json.load(e)  # the refusal is JSON naming what is needed
            return e.code

    body = json.dumps({"path": "CT/x.dcm"}).encode()
    assert call("/admin/evict") == 401
    assert call("/admin/prefetch") == 401
    assert call("/admin/evict", body, **{"Content-Type": "text/plain"}) == 401
    assert call("/admin/evict", body, **{"Content-Type": "text/plain", "Authorization": f"Bearer {token}"}) == 415
    assert call("/admin/evict", body, **{"Content-Type": "application/json", "Authorization": "Bearer nope"}) == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert call("/admin/evict", **auth) == 200
    assert call("/admin/prefetch", **auth) == 200
    assert call("/admin/evict", body, **{"Content-Type": "application/json", **auth}) == 404  # no such file
    # the CLI on the box reads the token itself
    done = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(agent.config_path),
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_http_connections_without_a_whole_request_are_closed(agent_factory):
    """Slowloris on the status and the metrics listeners: a connection that sends nothing, or trickles header
    lines without ever ending them, is closed after http.IDLE_SECONDS (aiohttp's default kept it an hour) and
    leaves no descriptor behind; a real request on the listener is still served meanwhile."""
    scrape = free_port()
    agent = agent_factory(**{"http.metrics_listen": f"127.0.0.1:{scrape}"}).start()
    fds = psutil.Process(agent.proc.pid).num_fds()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30)
            for port in (agent.http_port, scrape) for _ in range(10)]
    trickling = slow[::2]
    for s in trickling:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: box\r\n")
    with urllib.request.urlopen(f"http://127.0.0.1:{scrape}/metrics", timeout=30) as r:
        assert r.status == 200
    deadline = time.monotonic() + IDLE_SECONDS + 10
    while slow:
        assert time.monotonic() < deadline, f"{len(slow)} slow connections still open"
        for s in set(trickling) & set(slow):
            with contextlib.suppress(OSError):
                s.sendall(b"X-Slow: 1\r\n")  # a header line a second
        readable, _, _ = select.select(slow, [], [], 1)
        for s in readable:
            with contextlib.suppress(OSError):
                assert s.recv(4096) == b""  # closed, with no answer
            s.close()
            slow.remove(s)
    wait_for(lambda: psutil.Process(agent.proc.pid).num_fds() <= fds, 10)


# --- 12: configuration and start-up -----------------------------------------------------------------


def test_run_turns_start_up_failures_into_config_messages(agent_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = agent_factory()
        agent.overrides["ftp.listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        agent.write_config()
        done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(agent.config_path)],
                              capture_output=True, text=True, timeout=120, cwd=agent.workdir)
    assert done.returncode == 2
    assert "ftp.listen" in done.stderr and "Traceback" not in done.stderr + done.stdout, done.stderr
    broken = agent_factory()
    (broken.workdir / "cache" / "catalog.sqlite").mkdir(parents=True)  # cache.dir that cannot hold a catalog
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(broken.config_path)],
                          capture_output=True, text=True, timeout=120, cwd=broken.workdir)
    assert done.returncode == 2
    assert "cache.dir" in done.stderr and "Traceback" not in done.stderr + done.stdout, done.stderr


def test_smb_permissions_and_password_guessing(smb_agent):
    """SMB goes through the gateway (FUSE) too, so [[users]] permissions hold; and SMB passwords are checked by
    Samba, whose account policy, set from [login], locks the user."""
    from smbprotocol.exceptions import SMBException
    from smbutil import Smb
    errors = (OSError, SMBException)
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "permissions": ["read", "write", "rename"]}],
                      **{"login.max_failures": 3, "login.ban_seconds": 600}).start(timeout=180)
    smb = Smb(agent)
    smb.makedirs("CT")
    smb.write("CT/a.dcm", b"stored")
    with pytest.raises(errors):
        smb.remove("CT/a.dcm")
    with pytest.raises(errors):
        smb.write("CT/a.dcm", b"overwrite")
    with pytest.raises(errors):
        smb.rmdir("CT")
    smb.rename("CT/a.dcm", "CT/b.dcm")
    assert smb.listdir("CT") == ["b.dcm"] and smb.read("CT/b.dcm") == b"stored"
    smb.close()
    for _ in range(3):
        with pytest.raises(errors):
            Smb(agent, password="wrong-guess").listdir("")
    with pytest.raises(errors) as err:
        Smb(agent).listdir("")  # the right password, but the account is locked
    assert "LOCKED" in str(err.value).upper() or "0xc0000234" in str(err.value).lower(), err.value


# --- control characters in S3 keys (10), offsets past the end (9); names Windows cannot use (13) are refused on
# every protocol in tests/test_conformance.py::test_bad_names_are_refused ---

CONTROL_KEYS = ("evil\r\n226 forged.dcm", "esc\x1b[2Jcleared.dcm", "nl\nname.dcm")


def put_control_keys(agent) -> None:
    """Keys another S3 client wrote under ext/ before the agent first lists it."""
    s3 = agent.store.client()
    for name in ("fine.dcm", *CONTROL_KEYS):
        s3.put_object(Bucket=BUCKET, Key=f"{agent.prefix}ext/{name}", Body=b"x")


def hidden_names(agent) -> set[str]:
    return {e["name"] for e in agent.events("listing_name_hidden") if e["directory"].endswith("ext")}


def test_sftp_names_control_keys_and_far_offsets(agent_factory):
    """The gateway hides S3 keys with control characters from SFTP listings, and refuses a write past the end only
    when its hole cannot fit on the cache disk (out-of-order writes, as SFTP clients send them, still work)."""
    agent = agent_factory()
    put_control_keys(agent)
    agent.start()

    async def body(sftp):
        async with sftp.open("ok.dcm", "wb") as f:
            await f.write(b"ok")
        assert sorted(await sftp.listdir("ext")) == ["fine.dcm"]
        async with sftp.open("holes.dcm", "wb") as f:  # out of order: the hole is filled before the close
            await f.write(b"B", 4)
            await f.write(b"AAAA", 0)
        async with sftp.open("holes.dcm", "rb") as f:
            assert await f.read() == b"AAAAB"
        f = await sftp.open("far.dcm", "wb")
        await f.write(b"start", 0)
        with pytest.raises(asyncssh.SFTPError) as err:
            await f.write(b"end", 1 << 50)  # a 1 PiB hole: real zeros in S3, and never fits the cache disk
        assert err.value.code in (asyncssh.FX_NO_SPACE_ON_FILESYSTEM, asyncssh.FX_FAILURE), err.value
        with pytest.raises(asyncssh.SFTPError):
            await f.close()  # a file with a refused write is discarded, not committed
        with pytest.raises(asyncssh.SFTPError):
            await sftp.truncate("ok.dcm", 1 << 50)
        return sorted(await sftp.listdir("."))
    assert sftp_session(agent, body) == ["ext", "holes.dcm", "ok.dcm"]
    assert hidden_names(agent) == {repr(n) for n in CONTROL_KEYS}
    agent.wait_drained()
    objects = s3_objects(agent.store, agent.prefix)
    assert {k for k in objects if not k.startswith("ext/")} == {"ok.dcm", "holes.dcm"}
    assert objects["ok.dcm"]["size"] == 2


def test_smb_names_control_keys_and_far_offsets(smb_agent):
    """The same over SMB (Samba over the FUSE view of the gateway): S3 keys with control characters are not listed,
    a write whose hole can never fit is refused and the file discarded."""
    from smbprotocol.exceptions import SMBException, SMBOSError
    from smbutil import Smb
    agent = smb_agent()
    put_control_keys(agent)
    agent.start(timeout=180)
    smb = Smb(agent)
    smb.write("ok.dcm", b"ok")
    assert smb.listdir("ext") == ["fine.dcm"]
    f = smbclient_open(smb, "far.dcm")
    f.write(b"start")
    f.seek(1 << 40)  # a 1 TiB hole: never fits the cache disk
    with pytest.raises((SMBOSError, SMBException)) as err:
        f.write(b"end")
    assert "0xc000007f" in str(err.value).lower(), err.value  # STATUS_DISK_FULL
    with pytest.raises((SMBOSError, SMBException)):
        f.close()  # the file with the refused write is discarded (STATUS_IO_DEVICE_ERROR)
    assert smb.listdir("") == ["ext", "ok.dcm"]
    smb.close()
    assert hidden_names(agent) == {repr(n) for n in CONTROL_KEYS}
    agent.wait_drained()
    assert {k for k in s3_objects(agent.store, agent.prefix) if not k.startswith("ext/")} == {"ok.dcm"}


def smbclient_open(smb, path: str):
    import smbclient
    return smbclient.open_file(smb.p(path), mode="wb", buffering=0, **smb.kw)


def test_smb_password_guessing_bans_the_address(smb_agent):
    """Item 8 for SMB: Samba's authentication audit feeds the agent's LoginGuard (shared with FTP and SFTP), which
    bans the guessing address in smb.conf: no SMB connection from it, even with the right password, until the ban
    ends. Logged, audited and counted in /metrics like the other front ends' bans."""
    from smbprotocol.exceptions import SMBException
    from smbutil import Smb
    errors = (OSError, SMBException)
    agent = smb_agent(**{"login.max_failures": 3, "login.ban_seconds": 6}).start(timeout=180)
    assert Smb(agent).listdir("") == []
    for _ in range(3):  # a user that does not exist: Samba's own per-user lockout plays no part
        with pytest.raises(errors):
            Smb(agent, user="intruder", password="guess").listdir("")
    wait_for(lambda: agent.events("smb_hosts_denied"), 20)
    with pytest.raises(errors):
        Smb(agent).listdir("")  # the right password, from the banned address
    assert metric(agent, 'pacsgw_login_failures_total{protocol="smb"}') == 3
    assert metric(agent, 'pacsgw_login_bans_total{scope="address"}') == 1
    audit = (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text()
    assert '"protocol": "smb"' in audit and "address banned for 6 s after 3 failed logins" in audit, audit[-2000:]
    assert agent.events("login_ban") and len(agent.events("login_failed")) == 3
    wait_for(lambda: len(agent.events("smb_hosts_denied")) >= 2, 30)  # the ban ended: the address is allowed again
    assert Smb(agent).listdir("") == []
    assert metric(agent, 'pacsgw_login_banned{scope="address"}') == 0


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_samba_auth_audit_lines_and_ban_rendering():
    """The pure parts of the SMB ban: reading Samba's JSON authentication audit, and the smb.conf lines."""
    from types import SimpleNamespace

    from agent.serve.smb import auth_event, render_bans
    line = ('  {"timestamp": "2026-12-01T03:09:42.528773+0000", "type": "Authentication", "Authentication": '
            '{"status": "NT_STATUS_NO_SUCH_USER", "remoteAddress": "ipv4:10.1.2.3:42880", "clientAccount": "x"}}')
    assert auth_event(line) == ("x", "10.1.2.3", False)
    assert auth_event(line.replace("NT_STATUS_NO_SUCH_USER", "NT_STATUS_OK").replace("ipv4:10.1.2.3", "ipv6:fe80::1")) \
        == ("x", "fe80::1", True)
    assert auth_event(line.replace("ipv4:10.1.2.3", "ipv6:::ffff:10.1.2.3"))[1] == "10.1.2.3"  # as the guard keys it
    for other in ("", "not json {", '{"type": "Authorization", "Authorization": {}}', '{"Authentication": 3}'):
        assert auth_event(other) is None
    cfg = SimpleNamespace(smb=SimpleNamespace(hosts_allow=[]))
    assert render_bans(cfg, ["10.1.2.3"]) == "hosts deny = 10.1.2.3\n"
    assert "hosts" not in render_bans(cfg, [])
    cfg.smb.hosts_allow = ["10.1.0.0/16"]  # Samba lets an allowed host in whatever hosts deny says
    assert render_bans(cfg, ["10.1.2.3", "10.1.2.4"]) == "hosts allow = 10.1.0.0/16 EXCEPT 10.1.2.3 10.1.2.4\n"


def test_a_path_whose_object_key_would_be_too_long_is_refused(agent_factory):
    """Paths were checked against 1000 bytes, room for an uplink.prefix of 24 bytes in S3's 1024-byte keys, but
    the prefix may be longer ('hospital-saint-elisabeth-north/', 31): a client's 1000-byte path was stored and
    acknowledged (226), then every upload failed (KeyTooLongError) for good, the file kept on the SSD, never
    evictable, /status still ok. Now a name whose key would not fit is refused before anything is stored (FTP
    553), over every protocol; one that fits is stored and uploaded."""
    prefix = "hospital-saint-elisabeth-north/"
    agent = agent_factory(**{"uplink.prefix": prefix}).start()
    f = ftp(agent)
    top = "/".join(["d" * 199] * 4)
    for depth in range(1, 5):
        f.mkd("/".join(["d" * 199] * depth))
    fits = f"{top}/{'f' * (1024 - len(prefix) - len(top) - 1)}"
    too_long = fits + "x"
    with pytest.raises(ftplib.error_perm, match="553.*longer than"):
        put(f, too_long, b"never stored")
    with pytest.raises(ftplib.error_perm, match="553.*longer than"):
        f.mkd(too_long)
    assert put(f, fits, b"stored").startswith("226")
    with pytest.raises(ftplib.error_perm, match="553.*longer than"):
        f.rename(fits, too_long)

    async def over_sftp(sftp: asyncssh.SFTPClient) -> None:
        with pytest.raises(asyncssh.SFTPError, match="path longer than"):  # SFTPv3: a failure, with the reason
            async with sftp.open(too_long, "wb") as w:
                await w.write(b"never stored")

    sftp_session(agent, over_sftp)
    f.quit()
    agent.wait_drained()
    assert agent.health()["queue_depth"] == 0 and not agent.events("upload_failed")
    objects = s3_objects(agent.store, prefix)
    assert set(objects) == {fits}


def test_console_logs_escape_what_a_client_sends(agent_factory):
    """The console log format (a terminal, `make run`) printed string values raw: a login name holding terminal
    escapes (retitle the window, clear the line) or text-direction controls reached the admin's terminal as
    sent. Now every control or bidi character a value holds is written escaped (\\x1b, \\u202e)."""
    agent = agent_factory(**{"log.format": "console", "login.delay_seconds": 0}).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm, match="530"):
        f.login("\x1b]0;owned\x07\x1b[2Kroot\u202etxt.exe", "wrong-guess")
    f.close()
    wait_for(lambda: "owned" in agent.log_path.read_text(), 10)
    text = agent.log_path.read_text()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text[-2000:]
    assert "\\x1b]0;owned\\x07\\x1b[2Kroot\\u202etxt.exe" in text


def test_library_log_lines_are_one_escaped_line():
    """Libraries (asyncssh, aioftp, botocore) log through stdlib logging in plain text, also beside JSON logs: a
    client's bytes in such a message (a newline, an escape) could forge a log line or reach a terminal raw."""
    code = ("import logging; from agent import logs; logs.configure('info', 'json'); "
            "logging.getLogger('asyncssh').warning('peer said %s', 'x\\n{\"event\": \"forged\"}\\x1b[2J')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "\x1b" not in out.stderr, out.stderr
    assert lines[0].endswith('peer said x\\n{"event": "forged"}\\x1b[2J'), lines


def test_log_lines_of_processes_sharing_a_log_stay_whole(tmp_path):
    """With [server] workers > 1 the owner and its workers write to one log (their inherited stderr: the journal, or
    a file). A line went out as two writes (the event, then its newline), so another process's line could land
    between them: a worker's `draining` and the new owner's `worker_retired` were one unreadable line in a CI run
    of tests/test_workers.py::test_kill9_owner_during_ingest."""
    code = ("from agent import logs; import structlog; logs.configure('info', 'json'); log = structlog.get_logger(); "
            "[log.info('tick', n=n, pad='x' * 200) for n in range(3000)]")
    path = tmp_path / "shared.log"
    with open(path, "ab") as f:
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=f) for _ in range(4)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 4 * 3000
    assert all(json.loads(line)["event"] == "tick" for line in lines)
