"""Attacks on a running agent (round 17): hostile SFTP, SMB and HTTP clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

import asyncssh
import pytest
import smbclient
from asyncssh.packet import Boolean, String
from smbprotocol.exceptions import SMBException
from smbutil import Smb

from agent.auth import hash_password
from agent.serve.sftp import MAX_AUTH_TRIES
from faultkit import sftp_put
from harness import PASSWORD, s3_objects

SMB_ERRORS = (OSError, SMBException)


def test_an_smb_file_renamed_before_its_close_gets_no_name_a_client_could_not_create(smb_agent):
    """A new file an SMB client still has open is not in the catalog yet: its rename was judged by the FUSE layer
    alone, and the name rules of every new name (Windows device names, a trailing dot, text-direction controls)
    and a stored file's protection were never asked. Created as new.dcm and renamed to CON, aux.txt, x. or
    report-\u202eexe.dcm before its CLOSE, it was stored under that name: in S3, and listed to SMB clients under a
    mangled name they can neither open nor delete. A user without `delete` renamed its new file over a stored one:
    the rename answered success, and the CLOSE then failed and dropped the file. Both renames are refused now, as
    the rename of a stored file is, and the CLOSE stores the file under its own name."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "modality", "password": PASSWORD, "root": "/",
                              "permissions": ["read", "write", "rename"]}]).start(timeout=180)
    smb, modality = Smb(agent), Smb(agent, user="modality")
    modality.write("stored.dcm", b"the stored image")
    cases = [(smb, bad, "INVALID_PARAMETER") for bad in ("CON", "aux.txt", "x.", "report-\u202eexe.dcm")]
    cases.append((modality, "stored.dcm", "ACCESS_DENIED"))
    for i, (client, bad, status) in enumerate(cases):
        with smbclient.open_file(client.p(f"new{i}.dcm"), mode="wb", share_access="rwd", **client.kw) as f:
            f.write(b"image %d" % i)
            f.flush()  # the bytes reach the agent: the file is being written
            with pytest.raises(SMB_ERRORS, match=status):
                smbclient.replace(client.p(f"new{i}.dcm"), client.p(bad), **client.kw)
    names = [f"new{i}.dcm" for i in range(len(cases))]
    assert smb.listdir() == sorted([*names, "stored.dcm"])
    assert [smb.read(name) for name in names] == [b"image %d" % i for i in range(len(cases))]
    assert smb.read("stored.dcm") == b"the stored image"
    agent.wait_drained(60)
    assert sorted(s3_objects(agent.store, agent.prefix)) == sorted([*names, "stored.dcm"])
    smb.close()
    modality.close()


def _errors_counted(agent, kind: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        rows = [row for row in r.read().decode().splitlines()
                if row.startswith("pacsgw_errors_total{") and f'kind="{kind}"' in row]
    return sum(float(row.split()[-1]) for row in rows)


def test_one_ssh_connection_cannot_try_logins_without_end(agent_factory, tmp_path):
    """asyncssh takes any number of authentication requests on one connection, and a public key it does not know
    cost the client one request: one connection offered 3 000 keys in 7 s, each for a new user name, taking 3 s of
    the agent's CPU, with nothing logged, slowed or banned (only password guesses meet the LoginGuard). As with
    OpenSSH, a connection now ends at its MAX_AUTH_TRIES-th failed login (keys and passwords together), and names
    one user: another name on it ends it too. A client whose right key comes after a few wrong ones logs in."""
    good = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "modality.keys").write_bytes(good.export_public_key())
    agent = agent_factory(users=[{"name": "modality", "authorized_keys": str(tmp_path / "modality.keys")},
                                 {"name": "pacs", "password": PASSWORD}]).start()
    wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(MAX_AUTH_TRIES)]

    class Offers(asyncssh.SSHClient):
        """Offers keys without end; `switch`: each for another user name."""

        offered = 0
        switch = False

        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self.conn = conn

        def public_key_auth_requested(self) -> asyncssh.SSHKey | None:
            Offers.offered += 1
            if self.switch:
                self.conn._username = f"guess{Offers.offered}"  # asyncssh's client has no call for it
            return wrong[Offers.offered % len(wrong)] if Offers.offered < 3000 else None

    async def offer(switch: bool) -> str:
        Offers.offered, Offers.switch = 0, switch
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)) as ended:
            await asyncssh.create_connection(Offers, "127.0.0.1", agent.sftp_port, username="pacs", known_hosts=None,
                                             client_keys=None, password=None, preferred_auth="publickey")
        return ended.value.reason

    async def run() -> None:
        assert await offer(switch=False) == "too many authentication failures"
        assert Offers.offered == MAX_AUTH_TRIES
        assert await offer(switch=True) == "change of username not allowed"
        assert Offers.offered == 1  # its first request ("none", to learn the methods) named pacs
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="modality", known_hosts=None,
                                    client_keys=[*wrong[:MAX_AUTH_TRIES - 1], good], password=None) as conn:
            async with conn.start_sftp_client() as sftp:
                assert await sftp.listdir("/") == []

    asyncio.run(run())
    assert {e["reason"] for e in agent.events("session_refused")} == {
        f"too many authentication failures on one connection (limit {MAX_AUTH_TRIES})",
        "change of username on one connection"}
    assert _errors_counted(agent, "AuthTries") == 2


@pytest.mark.parametrize("request_sent", ["signal", "break", "window-change"])
def test_a_signal_on_an_sftp_channel_leaves_its_session_and_uploads_whole(agent_factory, request_sent):
    """A "signal", "break" or "window-change" request on an SFTP channel (SSH lets a client send them on any
    session) was queued by asyncssh for the SFTP loop to raise: the loop ended, and the upload the client had open
    was never closed nor aborted. Its path stayed 'being written' (a rename over it refused) until the agent
    stopped, and its descriptor, staging file and share of the user's unfinished uploads stayed held. The request
    is ignored now: the session goes on and its upload is stored when the client closes it."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            f = await sftp.open("a.dcm", "wb")
            await f.write(b"half of an image, ")
            channel = sftp._handler._writer.channel  # asyncssh's SFTP client keeps its channel to itself
            {"signal": lambda: channel.send_signal("TERM"), "break": lambda: channel.send_break(100),
             "window-change": lambda: channel.change_terminal_size(80, 24)}[request_sent]()
            assert await sftp.listdir("/") == []  # the session answers (a file being written is not listed)
            await f.write(b"then the rest")
            await f.close()
            await sftp_put(sftp, "b.dcm", b"another image")
            await sftp.posix_rename("b.dcm", "a.dcm")  # a.dcm is no longer being written
            async with sftp.open("a.dcm", "rb") as f:
                assert await f.read() == b"another image"

    asyncio.run(run())
    assert agent.events("upload_aborted") == []


def test_ssh_environment_variables_are_refused_not_kept(agent_factory):
    """asyncssh kept every "env" request of a channel for the channel's life, without a limit: one logged-in
    client sent 1 000 variables of 30 KB on each of its 10 channels and the agent grew by 287 MB, and a channel
    took more without end (here 5 channels of 30 MB each grew it by about 150 MB). They are refused now, as
    OpenSSH refuses those outside its AcceptEnv (the agent runs no command); the channels' SFTP sessions work."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp_put(sftp, "a.dcm", b"an image")
            value = "x" * 30_000
            held = [await conn.start_sftp_client(env={f"V0_{i}": value for i in range(1000)})]  # the heap's size
            before = agent.rss()
            for batch in range(1, 6):  # 150 MB more, for channels that stay open
                held.append(await conn.start_sftp_client(env={f"V{batch}_{i}": value for i in range(1000)}))
            grown = agent.rss() - before
            assert grown < 32 * 2**20, f"the agent grew by {grown / 2**20:.0f} MB for 150 MB of environment"
            assert [await sftp.listdir("/") for sftp in held] == [["a.dcm"]] * 6
            for sftp in held:
                sftp.exit()

    asyncio.run(run())


def test_password_requests_sent_back_to_back_are_each_checked_and_counted(agent_factory):
    """asyncssh cancels a password check still under way when the client sends its next request: the check's
    scrypt (a password_hash user, or the decoy every other name costs) ran on in the agent's threads, but its
    failure was never recorded nor slowed and its LoginGuard slots were freed at once. A client sending password
    requests 10 ms apart had 50 of them taken, none recorded, no delay, no ban, no end, while each it timed right
    cost the agent 0.1 s of a thread. Checks now run one at a time per connection, each to its end, and count:
    the connection ends at its MAX_AUTH_TRIES-th failure, every one of them logged."""
    agent = agent_factory(users=[{"name": "pacs", "password": PASSWORD},
                                 {"name": "hashed", "password_hash": hash_password("the right one")}],
                          **{"login.delay_seconds": 0.05, "login.max_delay_seconds": 0.1}).start()

    class BackToBack(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self.conn = conn

        async def password_auth_requested(self) -> None:
            for i in range(300):  # asyncssh's client waits for each answer: these are sent without
                await self.conn.send_userauth_request(b"password", Boolean(False), String(f"guess{i}"))
                await asyncio.sleep(0.01)

    async def run() -> None:
        with pytest.raises(asyncssh.DisconnectError) as ended:
            await asyncssh.create_connection(BackToBack, "127.0.0.1", agent.sftp_port, username="hashed",
                                             known_hosts=None, client_keys=None, preferred_auth="password")
        assert ended.value.reason == "too many authentication failures"

    asyncio.run(run())
    assert len(agent.events("login_failed")) == MAX_AUTH_TRIES


def test_healthz_names_no_login(agent_factory):
    """/healthz has no authentication and showed the last `pacsgw selfcheck`, with the user it logged in as: a valid
    login name for anyone reaching the port, which the password checks take care never to tell (a wrong name costs
    the same as a wrong password). The result is shown without it."""
    agent = agent_factory(users=[{"name": "radiology-pacs", "password": PASSWORD}]).start()
    done = subprocess.run([sys.executable, "-m", "agent.cli", "selfcheck", "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = agent.health()["selfcheck"]
    assert shown["ok"] is True and set(shown["results"]) == {"ftp", "sftp"}
    assert "radiology-pacs" not in json.dumps(shown)
