"""Attacks on a running agent (round 43): what round 42 left. A size set to the size a file already has (a PACS or
an rsync-like client sets size and times after every upload), a session renaming its own upload while another
session writes the same file, and a remove of its own upload by a user who may not delete. Each test reproduces one
attack that worked and checks it no longer does. Real agent, real SeaweedFS, real clients (asyncssh, smbprotocol)."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
import smbclient
from clients import sftp_upload_held
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb

from faultkit import catalog_rows, sftp_put, sftp_session
from harness import PASSWORD

GEN = "SELECT gen, size FROM entries WHERE path = ?"


def test_a_size_the_file_already_has_changes_nothing(smb_agent):
    """An SFTP setstat (or fsetstat on a handle opened "r+") to the file's current size committed a new version: a
    new gen, uploaded again, fetched from S3 first if its copy was evicted. OpenSSH's server does nothing (truncate(2)
    to the same size). Now nothing changes; a real cut still makes a new version. SMB's end-of-file set to the same
    size ends the same way (smbd answers it itself: this part passed before too, and guards it)."""
    agent = smb_agent().start(timeout=180)

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/f.dcm", b"0123456789")
            [before] = catalog_rows(agent, GEN, ("CT/f.dcm",))
            await s.setstat("CT/f.dcm", asyncssh.SFTPAttrs(size=10, mtime=1, atime=1))
            async with s.open("CT/f.dcm", "r+b") as f:
                await f.setstat(asyncssh.SFTPAttrs(size=10))
            assert catalog_rows(agent, GEN, ("CT/f.dcm",)) == [before]
            await s.setstat("CT/f.dcm", asyncssh.SFTPAttrs(size=4))
            assert catalog_rows(agent, GEN, ("CT/f.dcm",)) == [(before[0] + 1, 4)]

    asyncio.run(run())
    smb = Smb(agent)
    try:
        [before] = catalog_rows(agent, GEN, ("CT/f.dcm",))
        with smbclient.open_file(smb.p("CT/f.dcm"), mode="r+b", **smb.kw) as f:
            f.truncate(4)
        assert catalog_rows(agent, GEN, ("CT/f.dcm",)) == [before]
        assert smb.read("CT/f.dcm") == b"0123"
    finally:
        smb.close()


def test_a_session_does_not_rename_its_upload_while_another_session_writes_the_file(agent_factory):
    """A session renaming its own upload (SFTP since round 42) skipped the "being written by another upload" check:
    a second session writing the same file then stored it again under the old name at its close, the rename silently
    undone. It is refused while another upload writes the name; once that one is stored, it is done. A remove of the
stored file is refused too, and its own upload kept (it was dropped first)."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s, sftp_session(agent) as other:
            await sftp_put(s, "CT/old.dcm", b"old")
            for name in ("CT/old.dcm", "CT/new.dcm"):  # a stored file being rewritten, a new one
                async with s.open(name, "wb") as f:
                    await f.write(b"mine")
                    async with other.open(name, "wb") as theirs:
                        await theirs.write(b"theirs")
                        with pytest.raises(asyncssh.SFTPPermissionDenied, match="being written by another upload"):
                            await s.posix_rename(name, "CT/moved.dcm")
                        if name == "CT/old.dcm":  # a stored file's remove is refused too, before its upload is dropped
                            with pytest.raises(asyncssh.SFTPPermissionDenied, match="being written by another"):
                                await s.remove(name)
                    await s.posix_rename(name, "CT/moved.dcm")
                assert await s.listdir("CT") == ["moved.dcm"]
                async with s.open("CT/moved.dcm", "rb") as f:
                    assert await f.read() == b"mine"

    asyncio.run(run())


def test_an_smb_rename_of_its_own_upload_waits_for_another_sessions_upload(smb_agent):
    """The same over SMB (a client renames the file it has open, as Windows does; its upload moves with it): an SFTP
    session also writing the file stored it again under the old name at its close. Refused (ACCESS_DENIED) until
    that upload is stored."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    try:
        smb.write("f.dcm", b"old")
        with smbclient.open_file(smb.p("f.dcm"), mode="wb", share_access="rwd", **smb.kw) as f:
            f.write(b"mine")
            f.flush()
            with sftp_upload_held(agent, "f.dcm", b"theirs"):
                with pytest.raises(SMBOSError) as refused:
                    smbclient.replace(smb.p("f.dcm"), smb.p("moved.dcm"), **smb.kw)
                assert refused.value.ntstatus == NtStatus.STATUS_ACCESS_DENIED
            smbclient.replace(smb.p("f.dcm"), smb.p("moved.dcm"), **smb.kw)
        assert smb.listdir() == ["moved.dcm"]
        assert smb.read("moved.dcm") == b"mine"
    finally:
        smb.close()


def test_a_refused_remove_of_the_sessions_own_upload_keeps_it(agent_factory):
    """An SFTP remove of its own upload of a stored file by a user without the `delete` right dropped the upload, then
    the delete was refused: permission denied, and the upload lost. The right is checked first: the upload goes on
    and its close stores it."""
    users = [{"name": "pacs", "password": PASSWORD, "root": "/", "permissions": ["read", "write"]}]
    agent = agent_factory(users=users).start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/f.dcm", b"old")
            async with s.open("CT/f.dcm", "ab") as f:
                await f.write(b" and more")
                with pytest.raises(asyncssh.SFTPPermissionDenied, match="lacks the 'delete' permission"):
                    await s.remove("CT/f.dcm")
                await f.write(b" kept")
            async with s.open("CT/f.dcm", "rb") as f:
                assert await f.read() == b"old and more kept"

    asyncio.run(run())
