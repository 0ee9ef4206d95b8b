"""Attacks on a running agent (round 42): what rounds 40 and 41 left. An SFTP session removing or renaming the file
it is itself uploading, user names of hundreds of characters in the metrics listener's and the SSH refusals' logs,
and renames of a directory into itself or to a directory that does not exist. Each test reproduces one attack that
worked and checks it no longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh, urllib)."""

from __future__ import annotations

import asyncio
import base64
import urllib.error
import urllib.request

import asyncssh
import pytest
from clients import ClientError, FtpClient
from test_audit import audit_records

from agent.auth import hash_password
from agent.serve.sftp import MAX_AUTH_TRIES
from devstack import free_port
from faultkit import catalog_rows, sftp_put, sftp_session
from harness import PASSWORD


def test_an_sftp_session_removes_and_renames_the_file_it_is_uploading(agent_factory):
    """An SFTP session removing (or renaming) the file it held open for writing got "being written by another
    upload" (round 41's refusal of another session's delete), and a new file it removed was "no such file", then
    stored at its close. As unlink(2) and rename(2) of a file a process holds open (OpenSSH's server), and as SMB's
    own delete: a remove drops the upload and the stored file (a later write gets no such file, the close is OK);
    a rename moves the upload, which its close stores under the new name."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/f.dcm", b"old")
            for name in ("CT/f.dcm", "CT/new.dcm"):  # a stored file being rewritten, a new one
                async with s.open(name, "wb") as f:
                    await f.write(b"to be removed")
                    await s.remove(name)
                    with pytest.raises(asyncssh.SFTPNoSuchFile, match="removed while open"):
                        await f.write(b"more")
            assert await s.listdir("CT") == []

            await sftp_put(s, "CT/c.dcm", b"old")
            for src, dst in (("CT/a.dcm", "CT/b.dcm"), ("CT/c.dcm", "CT/d.dcm")):
                async with s.open(src, "wb") as f:
                    await f.write(b"first ")
                    await s.posix_rename(src, dst)
                    await f.write(b"second")
            assert sorted(await s.listdir("CT")) == ["b.dcm", "d.dcm"]
            await s.mkdir("CT/dir")
            async with s.open("CT/e.dcm", "wb") as f:  # its close would have failed: "is a directory"
                await f.write(b"kept")
                with pytest.raises(asyncssh.SFTPFailure, match="a directory of this name exists"):
                    await s.posix_rename("CT/e.dcm", "CT/dir")
            await s.rmdir("CT/dir")
            await s.remove("CT/e.dcm")
            for name in ("CT/b.dcm", "CT/d.dcm"):
                async with s.open(name, "rb") as f:
                    assert await f.read() == b"first second"

    asyncio.run(run())
    agent.wait_drained()
    assert sorted(catalog_rows(agent, "SELECT path FROM entries WHERE is_dir = 0")) == [("CT/b.dcm",), ("CT/d.dcm",)]


def test_a_name_no_config_holds_is_logged_cut_by_the_metrics_listener_and_ssh_refusals(agent_factory):
    """Round 41 cut a long user name in the login guard and the FTP/SFTP login events; the metrics listener's failed
    basic auth still logged the name sent whole (6 000 characters), and so did an SSH connection refused before its
    login (its failed key offers, logged and audited as `session_refused`; asyncssh takes names up to 1 023
    bytes). Both are cut now as auth.login_name does: the first 32 characters and the length."""
    port = free_port()
    agent = agent_factory(**{"http.metrics_listen": f"127.0.0.1:{port}", "http.metrics_user": "prometheus",
                             "http.metrics_password_hash": hash_password(PASSWORD)}).start()
    basic = base64.b64encode(("m" * 6000 + ":guess").encode()).decode()
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                                      headers={"Authorization": f"Basic {basic}"}), timeout=60)
    wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(MAX_AUTH_TRIES)]

    async def offer_keys() -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            await asyncssh.connect("127.0.0.1", agent.sftp_port, username="s" * 1000, known_hosts=None,
                                   client_keys=wrong, password=None, preferred_auth="publickey")

    asyncio.run(offer_keys())
    assert [e["user"] for e in agent.events("login_failed")] == ["m" * 32 + "…(6000 characters)"]
    [refused] = agent.events("session_refused")
    assert refused["user"] == "s" * 32 + "…(1000 characters)"
    assert [r["user"] for r in audit_records(agent) if r["op"] == "login"] == ["s" * 32 + "…(1000 characters)"]


def test_a_rename_into_itself_or_to_a_missing_directory_is_refused_as_rename_2_does(agent_factory):
    """A directory renamed into itself (`a` → `a/b`) answered SFTP "no such file" (FTP 550): EINVAL now, as
    rename(2), FTP 553 and SFTP failure "cannot move a directory into itself". A rename to `nodir/x/y.dcm` made
    both directories, where rename(2), OpenSSH's server, vsftpd and SMB refuse it (no such file): it is refused now
    (FTP 550, SFTP no such file); a store still makes the directories it needs."""
    agent = agent_factory().start()
    ftp = FtpClient(agent)

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "a/x.dcm", b"x")
            for rename in (s.rename, s.posix_rename):
                with pytest.raises(asyncssh.SFTPFailure, match="cannot move a directory into itself"):
                    await rename("a", "a/b")
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await rename("a/x.dcm", "nodir/x/y.dcm")
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await rename("a/x.dcm", "a/x.dcm/y.dcm")  # below a file
            with pytest.raises(ClientError, match="553 .*cannot move a directory into itself"):
                ftp.rename("a", "a/b")
            with pytest.raises(ClientError, match="550"):
                ftp.rename("a/x.dcm", "nodir/x/y.dcm")
            assert await s.listdir(".") == ["a"]
            await s.mkdir("b")
            await s.posix_rename("a/x.dcm", "b/x.dcm")
            await s.posix_rename("a", "b/a")
            assert sorted(await s.listdir("b")) == ["a", "x.dcm"]

    try:
        asyncio.run(run())
    finally:
        ftp.close()
