"""The login guard off the event loop, its cheap gauge, and the SFTP limits an authenticated or banned client
meets: channels per connection, and bans that hold for public-key logins too (a real agent, asyncssh)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import asyncssh
import pytest

from agent.audit import AuditLog
from agent.auth import LoginGuard
from agent.config import LoginConfig
from agent.metrics import Metrics
from harness import PASSWORD


class SlowGuard(LoginGuard):
    BUSY_MS = 1000  # each call on a locked file waits a full second: a stall of the loop could not hide


async def test_a_locked_guard_file_does_not_stall_the_event_loop(tmp_path):
    """Another process holds the guard's file locked: logins wait for it on the guard's thread, while the
    event loop keeps serving other sessions (here a ticker standing for their I/O) without a pause."""
    path = tmp_path / "logins.sqlite"
    g = SlowGuard(LoginConfig(), Metrics(), AuditLog(None, 0, 1, False), path)
    stuck = sqlite3.connect(path, isolation_level=None)
    stuck.execute("BEGIN IMMEDIATE")
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    t0 = time.monotonic()
    answers = await asyncio.gather(g.take_session("address", "10.0.0.1", 5), g.succeeded("pacs", "10.0.0.2"),
                                   g.failed("pacs", "10.0.0.3", "sftp"))
    waited = time.monotonic() - t0
    ticker.cancel()
    stuck.execute("ROLLBACK")
    assert answers == [0, None, LoginConfig().max_delay_seconds]  # let through uncounted, the longest delay
    assert waited >= 2.5  # the three calls really waited for the lock, one after the other
    assert len(gaps) > 50 and max(gaps) < 0.5, (len(gaps), max(gaps, default=None))  # the loop ran on meanwhile
    assert await g.take_session("address", "10.0.0.1", 1)  # usable again once the lock is gone
    g.close()


async def test_the_banned_gauge_is_counted_at_most_once_a_second():
    """Each login asks whether it is banned; the pacsgw_login_banned gauge is not counted again for each."""
    metrics = Metrics()
    g = LoginGuard(LoginConfig(max_failures=2, ban_seconds=60), metrics, AuditLog(None, 0, 1, False))
    counts: list[str] = []
    g.db.set_trace_callback(lambda sql: counts.append(sql) if "COUNT(*) FROM bans" in sql else None)
    for i in range(100):
        assert await g.refusal("pacs", f"10.0.0.{i}", "sftp", now=10 + i / 1000) == ""
    assert len(counts) == 2  # address and user, once
    for _ in range(2):
        await g.failed("guesser", "10.6.6.6", "sftp", now=10.2)  # a new ban shows at once
    banned = metrics.login_banned.labels("address")._value.get()
    assert banned == 1 and len(counts) == 4
    assert "banned" in await g.refusal("x", "10.6.6.6", "sftp", now=10.3) and len(counts) == 4
    await g.refusal("x", "10.0.0.9", "sftp", now=71)  # a second later, the ban has ended: counted again
    assert metrics.login_banned.labels("address")._value.get() == 0 and len(counts) == 6
    g.close()


def _key_user(tmp_path: Path, name: str) -> tuple[asyncssh.SSHKey, dict[str, str]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / f"{name}.keys").write_bytes(key.export_public_key())
    return key, {"name": name, "authorized_keys": str(tmp_path / f"{name}.keys"), "root": "/"}


def test_sftp_channels_are_capped_and_bans_hold_for_key_logins(agent_factory, tmp_path):
    key, modality = _key_user(tmp_path, "modality")
    agent = agent_factory(**{"sftp.max_channels_per_connection": 3, "login.max_failures": 3,
                             "login.ban_seconds": 3600, "login.delay_seconds": 0.05,
                             "login.max_delay_seconds": 0.1},
                          users=[modality, {"name": "pacs", "password": PASSWORD, "root": "/"}]).start()

    def connect(user: str, source: str, **auth: object):
        auth = auth or {"client_keys": [key], "password": None}
        return asyncssh.connect("127.0.0.1", agent.sftp_port, username=user, known_hosts=None,
                                local_addr=(source, 0), **auth)

    async def guess(user: str, source: str) -> None:
        for _ in range(3):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(user, source, password="wrong", client_keys=None)

    async def run() -> None:
        async with connect("modality", "127.0.0.2") as conn:  # a key login: its address is trusted from now on
            clients = [await conn.start_sftp_client() for _ in range(3)]
            with pytest.raises(asyncssh.ChannelOpenError) as refused:
                await conn.start_sftp_client()
            assert refused.value.code == asyncssh.OPEN_RESOURCE_SHORTAGE
            assert "limit 3" in refused.value.reason
            clients[0].exit()
            await clients[0].wait_closed()
            for _ in range(200):  # the server counts the channel out when it has closed on both sides
                try:
                    clients[0] = await conn.start_sftp_client()
                    break
                except asyncssh.ChannelOpenError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("a closed channel was never counted out")
            assert [await c.listdir("/") is not None for c in clients] == [True] * 3  # the connection stays

        await guess("pacs", "127.0.0.1")  # the address 127.0.0.1 is banned
        with pytest.raises(asyncssh.PermissionDenied):
            await connect("modality", "127.0.0.1")
        await guess("modality", "127.0.0.3")  # the user modality is locked
        with pytest.raises(asyncssh.PermissionDenied):
            await connect("modality", "127.0.0.4")
        async with connect("modality", "127.0.0.2") as conn:  # but not from its known address
            async with conn.start_sftp_client() as sftp:
                await sftp.listdir("/")

    asyncio.run(run())
    refusals = [e for e in agent.events("session_refused") if e.get("protocol") == "sftp"]
    assert refusals and {r["reason"] for r in refusals} == {"too many channels on one connection (limit 3)"}
    assert {e["reason"] for e in agent.events("login_refused")} == {"address banned", "user banned"}


async def test_an_ipv4_mapped_address_is_one_key_for_bans_trust_and_slots():
    """An IPv4 client seen through a dual-stack IPv6 socket is ::ffff:a.b.c.d (asyncio's own listeners are
    IPv6-only, Samba's audit or a dual-stack socket need not be): the guard keys both forms as a.b.c.d, so a ban,
    a trusted address and a session cap made under one form hold under the other."""
    audit = AuditLog(None, 0, 1, False)
    records: list[str] = []
    audit.record = lambda who, *rest: records.append(who.peer)  # type: ignore[method-assign]
    g = LoginGuard(LoginConfig(max_failures=2, ban_seconds=60), Metrics(), audit)
    for _ in range(2):
        await g.failed("guesser", "::ffff:10.6.6.6", "sftp", now=10)
    assert "address temporarily banned" in await g.refusal("pacs", "10.6.6.6", "ftp", now=11)
    assert await g.banned("address", now=11) == ["10.6.6.6"]  # the form smb.conf denies
    assert set(records) == {"10.6.6.6"}
    assert await g.take_session("sftp address", "::ffff:10.0.0.1", 1)
    assert await g.take_session("sftp address", "10.0.0.1", 1) is None
    await g.succeeded("pacs", "::ffff:10.0.0.2", now=12)
    for _ in range(2):
        await g.failed("pacs", "10.9.9.9", "ftp", now=13)  # the user is locked, but not from its known address
    assert await g.refusal("pacs", "10.0.0.2", "ftp", now=14) == ""
    g.close()

