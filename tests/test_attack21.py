"""Attacks on a running agent (round 21): hostile clients, a failing object store and an admin against real
listeners and real client libraries. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections import Counter
from types import SimpleNamespace

import asyncssh
import pytest
from aiohttp import web
from halib import enter_netns, in_netns
from s3fault import ERROR_BODY, FaultProxy
from smbprotocol.connection import Connection
from test_attack19 import SLASH64, ipv6_lan  # noqa: F401  (a fixture)
from test_ftp import ftp

from agent.audit import AuditLog
from agent.auth import LoginGuard
from agent.config import LoginConfig
from agent.metrics import Metrics
from agent.serve.smb import connections_by_address, per_group, render_bans
from devstack import free_port
from faultkit import wait_for
from harness import BUCKET, PASSWORD

OTHER64 = "fd00:19:0:2"  # another client's /64, on the loopback of ipv6_lan too


def test_failed_logins_from_one_ipv6_64_are_counted_and_banned_together(tmp_path):
    """Failed logins were counted, and bans made, per IPv6 address: a client given a /64 tried max_failures
    passwords from each of its 2^64 addresses, never banned. They count per /64 now (agent.auth.address_group): a
    ban earned from some addresses holds for the others, not for another /64, nor for an address of the /64 the user
    logged in from before (the PACS, when another host of its LAN guesses); and a success there does not reset the
    /64's count."""
    guard = LoginGuard(LoginConfig(max_failures=3), Metrics(), AuditLog(None, 0, 1, False), tmp_path / "logins.sqlite")

    async def attack() -> list[str]:
        await guard.succeeded("pacs", f"{SLASH64}::1")  # the PACS, on the /64
        for i in range(2):
            await guard.failed(f"guess{i}", f"{SLASH64}:{i}::9", "ftp")  # a user each: no user's ban
        await guard.succeeded("pacs", f"{SLASH64}::1")  # resets nothing of the /64
        await guard.failed("guess2", f"{SLASH64}:2::9", "ftp")
        return [await guard.refusal("guess3", f"{SLASH64}:3::9", "ftp"),
                await guard.refusal("guess3", "::ffff:10.0.0.1", "ftp"),
                await guard.refusal("guess3", f"{OTHER64}::1", "ftp"),
                await guard.refusal("pacs", f"{SLASH64}::1", "ftp"),
                await guard.refusal("guess3", f"{SLASH64}::1", "ftp")]

    fresh_address, ipv4, other_64, pacs, pacs_host_other_user = asyncio.run(attack())
    assert fresh_address == "too many failed logins: address temporarily banned"
    assert (ipv4, other_64, pacs) == ("", "", "")
    assert pacs_host_other_user == fresh_address  # trusted for its user only
    guard.close()


def test_a_host_guessing_from_the_pacs_64_does_not_hold_the_pacs_logins_back(tmp_path):
    """Password checks under way are bounded per address (LoginGuard.attempt: no more at once than the failures
    left before a ban). Per /64, a host of the PACS's LAN holding that many checks (slow wrong passwords, each
    answered after its growing delay) made the PACS's own logins wait their turn, then refused ('too many logins at
    once'). An address the user logged in from before is held to its own checks now, as it is spared the /64's ban."""
    guard = LoginGuard(LoginConfig(max_failures=3), Metrics(), AuditLog(None, 0, 1, False), tmp_path / "logins.sqlite")
    guard.ATTEMPT_WAIT = 1.0  # refused after this long (10 s) when no slot comes free

    async def attack() -> tuple[str, str]:
        await guard.succeeded("pacs", f"{SLASH64}::1")
        async with contextlib.AsyncExitStack() as held:
            for i in range(3):
                assert await held.enter_async_context(guard.attempt(f"guess{i}", f"{SLASH64}::9", "ftp")) == ""
            async with guard.attempt("pacs", f"{SLASH64}::1", "ftp") as pacs:
                pass
            async with guard.attempt("guess3", f"{SLASH64}::8", "ftp") as neighbour:
                return pacs, neighbour

    pacs, neighbour = asyncio.run(attack())
    assert pacs == ""
    assert neighbour.startswith("too many logins at once")
    guard.close()


def _hold_connections(port: int) -> Counter[str]:
    """Inside the namespace: a listener, two connections from SLASH64::2 and one from ::3 and OTHER64::1 each →
    the established connections per address group, as the SMB front end counts them for its per-address cap."""
    server = socket.create_server(("::", port), family=socket.AF_INET6, backlog=8)
    clients = [socket.create_connection((f"{SLASH64}::1", port), source_address=(source, 0))
               for source in (f"{SLASH64}::2", f"{SLASH64}::2", f"{SLASH64}::3", f"{OTHER64}::1")]
    accepted = [server.accept()[0] for _ in clients]
    try:
        return per_group(connections_by_address(port))
    finally:
        for s in [*clients, *accepted, server]:
            s.close()


def _counted_in(ns: str, port: int, counted) -> None:
    enter_netns(ns)
    counted.put(_hold_connections(port))


def _negotiates(host: str, port: int) -> bool:
    """Whether smbd answers an SMB2 NEGOTIATE on a connection to host (from host itself: on lo, the kernel gives a
    connection to a local address that address as its source)."""
    conn = Connection(uuid.uuid4(), host, port, require_signing=True)
    try:
        conn.connect(timeout=10)
    except Exception:  # smbd closed it unanswered: denied
        return False
    conn.disconnect()
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("smbd"), reason="needs root and smbd")
def test_smb_caps_and_bans_count_an_ipv6_64_as_one_address(ipv6_lan, tmp_path):  # noqa: F811
    """smb.max_sessions_per_address counted each IPv6 address apart (connections_by_address): a client of one /64
    held as many SMB connections (each an smbd process) as it took addresses. They are counted per /64 now, and the
    /64 is denied as such in bans.conf: Samba reads a network and its prefix length there (checked here on a real
    smbd: another address of the /64 is closed unanswered, another /64 negotiates)."""
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    counted = ctx.Queue()
    child = ctx.Process(target=_counted_in, args=(ipv6_lan, port, counted))  # /proc/net is the process's netns
    child.start()
    assert counted.get(timeout=60) == {f"{SLASH64}::/64": 3, f"{OTHER64}::/64": 1}
    child.join(60)

    state = tmp_path / "smb"
    for d in ("private", "lock", "state", "cache", "run", "log"):
        (state / d).mkdir(parents=True)
    (state / "bans.conf").write_text(render_bans(SimpleNamespace(smb=SimpleNamespace(hosts_allow=[])),
                                                 [f"{SLASH64}::/64"]))
    conf = state / "smb.conf"
    conf.write_text("\n".join([
        "[global]", "server role = standalone server", f"smb ports = {port}", "bind interfaces only = no",
        "disable netbios = yes", *(f"{d} directory = {state}/{d}" for d in ("lock", "state", "cache", "pid")),
        f"private dir = {state}/private", f"ncalrpc dir = {state}/run/ncalrpc", f"log file = {state}/log/smbd.log",
        f"include = {state}/bans.conf", ""]))

    def against_smbd() -> tuple[bool, bool]:
        smbd = subprocess.Popen(["smbd", "--foreground", "--no-process-group", "-s", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: _listening(f"{OTHER64}::1", port), 30, what="smbd listening")
            return _negotiates(f"{SLASH64}::3", port), _negotiates(f"{OTHER64}::1", port)
        finally:
            smbd.terminate()
            smbd.wait(30)

    assert in_netns(ipv6_lan, against_smbd) == (False, True)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


class _FailingHeads(FaultProxy):
    """The fault proxy, answering a HEAD of d/broken.dcm with 500 while `failing` (a store failing one object:
    a damaged volume, a SeaweedFS filer error), counting the HEADs of objects below d/ by path."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.failing = True
        self.heads: Counter[str] = Counter()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD" and "/d/" in request.path:
            path = request.path.split("/d/", 1)[1]
            self.heads[path] += 1
            if self.failing and path == "broken.dcm":
                return web.Response(status=500, body=ERROR_BODY, content_type="application/xml")
        return await super()._handle(request)


@pytest.fixture
def failing_heads(seaweed):
    proxy = _FailingHeads(seaweed.endpoint_url).start()
    yield proxy
    proxy.hold_deletes.clear()
    proxy.stop()


def test_one_object_failing_its_head_neither_empties_its_directory_nor_repeats_every_head(agent_factory, seaweed,
                                                                                         failing_heads):
    """A 5xx (or no answer) to the HEAD of one object of a directory failed its whole listing: clients saw it empty,
    and every LIST sent a HEAD to each of its objects again (here 4 LISTs, 124 HEADs for 31 objects). The rest is
    listed now; the object the store did not size is left out (no size shown that might be wrong) and the directory
    is listed again at its next use, asking only that object, until the store answers: then it is listed whole."""
    proxy = failing_heads
    agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url})
    client = seaweed.client()
    names = [f"x{i}.dcm" for i in range(30)]
    for name in names:
        client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/{name}", Body=b"another writer's image")
    client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/broken.dcm", Body=b"an image the store fails to HEAD")
    agent.start()
    f = ftp(agent)
    listings = [sorted(n.rsplit("/", 1)[-1] for n in f.nlst("d")) for _ in range(4)]
    assert listings == [sorted(names)] * 4
    assert proxy.heads == Counter({**{n: 1 for n in names}, "broken.dcm": 4})
    assert agent.events("remote_objects_unsized")
    proxy.failing = False
    assert sorted(n.rsplit("/", 1)[-1] for n in f.nlst("d")) == sorted([*names, "broken.dcm"])
    assert f.size("d/broken.dcm") == len(b"an image the store fails to HEAD")
    f.nlst("d")  # listed whole now: no HEAD again
    assert proxy.heads == Counter({**{n: 1 for n in names}, "broken.dcm": 5})
    f.quit()


def test_a_listing_checking_a_directory_for_pending_deletes_sends_no_head(agent_factory, seaweed, failing_heads):
    """A directory below which a delete is still queued is checked, when its parent is listed, for an object that
    is no pending delete (else a deleted directory came back): that check listed it with the logical size of each
    object, a HEAD per object the catalog did not know, none of which it used. Here 21 HEADs per listing of d, sent
    again at each LIST while d was listed again (an object failing its HEAD, above). It lists names only now."""
    proxy = failing_heads
    agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url})
    client = seaweed.client()
    client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/broken.dcm", Body=b"d is listed at each use")
    client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/sub/old.dcm", Body=b"deleted by the PACS")
    agent.start()
    f = ftp(agent)
    proxy.hold_deletes.set()
    f.delete("d/sub/old.dcm")
    wait_for(lambda: proxy.deletes_held >= 1, 60, what="the queued DELETE")
    for i in range(20):  # another writer's, in the directory of the pending delete
        client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/sub/x{i}.dcm", Body=b"another writer's image")
    below = sum(n for path, n in proxy.heads.items() if path.startswith("sub/"))
    for _ in range(3):
        assert "sub" in [n.rsplit("/", 1)[-1] for n in f.nlst("d")]
    assert sum(n for path, n in proxy.heads.items() if path.startswith("sub/")) == below
    f.quit()


def _evict(agent, path: str) -> tuple[int, dict]:
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/admin/evict", method="POST",
                                 data=json.dumps({"path": path}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_an_admin_evict_leaves_a_copy_a_reader_holds_open_and_says_why(agent_factory):
    """`pacsgw evict` (POST /admin/evict) dropped the copy of a file a reader held open: the evictor leaves those
    (read pins), the admin path did not, and answered 'evicted' for space that came back only at the reader's
    close. It is refused now (409, 'open for reading'), not the misleading 'not cached, or not yet in object
    storage'; once the reader closed the file it is evicted."""
    agent = agent_factory().start()
    body = os.urandom(300_000)
    f = ftp(agent)
    f.storbinary("STOR held.dcm", io.BytesIO(body))
    f.quit()
    agent.wait_drained(60)

    async def evict_while_read() -> tuple[int, dict, bytes]:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with await sftp.open("held.dcm", "rb") as held:
                first = await held.read(1000)
                status, answer = await asyncio.to_thread(_evict, agent, "held.dcm")
                return status, answer, first + await held.read()

    status, answer, read = asyncio.run(evict_while_read())
    assert status == 409 and "open for reading" in answer["error"]
    assert read == body
    assert _evict(agent, "held.dcm") == (200, {"path": "held.dcm", "evicted": True})


def test_an_object_whose_head_gets_no_answer_is_not_waited_for_at_each_list(agent_factory, seaweed, failing_heads):
    """An object whose HEAD the store never answers: its directory's listing waited uplink.read_timeout for it, and
    as the directory stays unlisted while an object is unsized, so did every LIST of it (and every store into it).
    It is left out without a HEAD for a while now (UNANSWERED_RETRY_S): one HEAD for 3 LISTs, the rest listed."""
    proxy = failing_heads
    proxy.failing = False
    agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url, "uplink.read_timeout": 2})
    client = seaweed.client()
    names = [f"x{i}.dcm" for i in range(5)]
    for name in [*names, "slow.dcm"]:
        client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/{name}", Body=b"another writer's image")
    agent.start()
    proxy.hold_replies_to, proxy.hold_replies_method = "/d/slow.dcm", "HEAD"
    try:
        f = ftp(agent)
        listings = [sorted(n.rsplit("/", 1)[-1] for n in f.nlst("d")) for _ in range(3)]
        f.quit()
    finally:
        proxy.hold_replies_to = ""
    assert listings == [names] * 3
    assert proxy.heads["slow.dcm"] == 1
