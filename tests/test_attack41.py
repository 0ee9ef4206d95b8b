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
from clients import FtpClient, Refused, SftpClient
from smbutil import Smb
from test_audit import audit_records

from faultkit import catalog_rows, sftp_session
from harness import PASSWORD


def test_a_file_an_ftp_upload_is_writing_is_not_deleted(agent_factory):
    """FTP DELE or an SFTP remove of a stored file an upload was rewriting succeeded, and the upload's close then
    stored the file again: the delete silently undone. Refused while the file is being written, as a rename is
    (round 40); once stored, it deletes. Here the writer is an FTP STOR (an SFTP upload against each protocol's
    delete: test_conformance)."""
    agent = agent_factory().start()
    ftp, sftp = FtpClient(agent), SftpClient(agent)
    try:
        sftp.put("CT/g.dcm", b"old")
        ftp.begin_put("CT/g.dcm", b"new by FTP")  # 150: the file is open for writing
        with pytest.raises(Refused):
            sftp.delete("CT/g.dcm")
        ftp.cut.close()
        assert ftp.f.voidresp().startswith("226")
        assert sftp.get("CT/g.dcm") == b"new by FTP"
        sftp.delete("CT/g.dcm")
        assert sftp.list("CT") == []
    finally:
        ftp.close()
        sftp.close()
    agent.wait_drained()
    assert catalog_rows(agent, "SELECT path FROM entries WHERE is_dir = 0") == []  # no commit brought one back


def test_smb_delete_of_the_file_its_own_upload_writes_is_done_at_its_close(smb_agent):
    """A client deleting the file it is itself writing (delete-on-close, done at its last close) drops its upload
    and the file, as Windows does; another session's upload is not deleted (test_conformance)."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    try:
        smb.write("f.dcm", b"stored")
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
