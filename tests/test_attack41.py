"""Attacks on a running agent (round 41): what round 40 left. A delete of a file another session is writing, and a
login with a user name of thousands of characters. Each test reproduces one attack that worked and checks it no
longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh, smbprotocol)."""

from __future__ import annotations

import asyncio
import ftplib
import json
import sqlite3

import asyncssh
import pytest
import smbclient
from clients import ClientError, FtpClient
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb
from test_audit import audit_records

from faultkit import catalog_rows, sftp_put, sftp_session
from harness import PASSWORD


def test_a_file_another_session_is_writing_is_not_deleted(agent_factory):
    """FTP DELE or an SFTP remove of a stored file an SFTP (or FTP) upload was rewriting succeeded, and the upload's
    close then stored the file again: the delete silently undone. Refused while the file is being written (FTP 550,
    SFTP permission denied), as a rename is (round 40); once stored, it deletes."""
    agent = agent_factory().start()
    ftp = FtpClient(agent)

    async def run() -> None:
        async with sftp_session(agent) as writer, sftp_session(agent) as other:
            await sftp_put(writer, "CT/f.dcm", b"old")
            async with writer.open("CT/f.dcm", "wb") as f:
                await f.write(b"new version")
                with pytest.raises(ClientError, match="550 .*being written by another upload"):
                    ftp.delete("CT/f.dcm")
                with pytest.raises(asyncssh.SFTPError, match="being written by another upload") as refused:
                    await other.remove("CT/f.dcm")
                assert refused.value.code == asyncssh.FX_PERMISSION_DENIED
            async with other.open("CT/f.dcm", "rb") as f:
                assert await f.read() == b"new version"
            ftp.delete("CT/f.dcm")

            await sftp_put(other, "CT/g.dcm", b"old")
            upload = ftp.f.transfercmd("STOR CT/g.dcm")  # 150: the file is open for writing
            upload.sendall(b"new by FTP")
            with pytest.raises(asyncssh.SFTPError, match="being written by another upload"):
                await other.remove("CT/g.dcm")
            upload.close()
            assert ftp.f.voidresp().startswith("226")
            async with other.open("CT/g.dcm", "rb") as f:
                assert await f.read() == b"new by FTP"
            await other.remove("CT/g.dcm")
            assert await other.listdir("CT") == []

    try:
        asyncio.run(run())
    finally:
        ftp.close()
    agent.wait_drained()
    assert catalog_rows(agent, "SELECT path FROM entries WHERE is_dir = 0") == []  # no commit brought one back


def test_smb_delete_of_a_file_an_sftp_upload_writes_is_denied_and_of_its_own_upload_is_done(smb_agent):
    """The same over SMB (ACCESS_DENIED); a client deleting the file it is itself writing (delete-on-close, done at
    its last close) still drops its upload and the file, as Windows does."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)

    async def run() -> None:
        async with sftp_session(agent) as writer:
            await sftp_put(writer, "f.dcm", b"old")
            async with writer.open("f.dcm", "wb") as f:
                await f.write(b"new version")
                with pytest.raises(SMBOSError) as refused:
                    await asyncio.to_thread(smb.remove, "f.dcm")
                assert refused.value.ntstatus == NtStatus.STATUS_ACCESS_DENIED

    try:
        asyncio.run(run())
        assert smb.read("f.dcm") == b"new version"
        with smbclient.open_file(smb.p("f.dcm"), mode="wb", share_access="rwd", **smb.kw) as f:
            f.write(b"rewritten, then deleted")
            f.flush()
            smb.remove("f.dcm")  # marked delete-on-close: done at the writer's close
        assert smb.listdir() == []
        agent.wait_drained()
        assert smb.listdir() == []
    finally:
        smb.close()


def guard_keys(agent) -> list[str]:
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'logins.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return [key for (key,) in db.execute("SELECT key FROM failures WHERE scope = 'user' ORDER BY rowid")]
    finally:
        db.close()


def test_a_user_name_longer_than_any_configured_is_cut_in_the_guard_logs_and_audit(agent_factory):
    """A failed login's user name was logged, audited and the login guard's key whole: an FTP USER of 8 000
    characters made an 8 KB audit record, log line and guard row each time. A name longer than 64 characters (a
    configured one has 32 at most) is kept as its first 32 and its length; the login fails as any unknown name's.
    SFTP: asyncssh's server disconnects a name of 1 024 bytes or more itself; one of 1 000 reached the guard whole."""
    agent = agent_factory().start()
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm, match="530"):
        f.login("u" * 8000, "guess")
    f.close()

    async def sftp_login() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            async with sftp_session(agent, user="s" * 1000, password=PASSWORD):
                pass

    asyncio.run(sftp_login())
    cut = ["u" * 32 + "…(8000 characters)", "s" * 32 + "…(1000 characters)"]
    assert guard_keys(agent) == cut
    failed = [r for r in audit_records(agent) if r["op"] == "login"]
    assert [r["user"] for r in failed] == cut and all(len(json.dumps(r)) < 400 for r in failed)
    assert [e["user"] for e in agent.events("login_failed")] == cut
