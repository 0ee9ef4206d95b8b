"""Attacks on a running agent (round 44): what round 43 left. An SFTP size set by name on the file the session is
itself writing, and an SMB delete of its own upload of a stored file by a user who may not delete. Each test
reproduces one attack that worked and checks it no longer does. Real agent, real SeaweedFS, real clients (asyncssh,
smbprotocol)."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import AccessDenied
from smbutil import Smb

from faultkit import catalog_rows, sftp_put, sftp_session
from harness import PASSWORD

GEN = "SELECT gen, size FROM entries WHERE path = ?"
NO_DELETE = [{"name": "pacs", "password": PASSWORD, "root": "/", "permissions": ["read", "write"]}]


def test_a_size_set_by_name_cuts_the_file_the_session_writes(agent_factory):
    """An SFTP setstat by name with another size, on a file the session had open for writing, opened a second upload
    of it: a stored file was cut and committed as a version of its own (then replaced by the session's close, the
    cut lost: 012345AB89), a new one was "no such file". As truncate(2) of a file the process holds open (OpenSSH's
    server), the size now cuts the session's own upload; nothing is committed before its close."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/f.dcm", b"stored----")
            [before] = catalog_rows(agent, GEN, ("CT/f.dcm",))
            for name in ("CT/f.dcm", "CT/n.dcm"):  # a stored file being rewritten, a new one
                async with s.open(name, "wb") as f:
                    await f.write(b"0123456789")
                    await s.setstat(name, asyncssh.SFTPAttrs(size=4))
                    assert (await f.stat()).size == 4
                    await f.write(b"AB", 6)
                async with s.open(name, "rb") as f:
                    assert await f.read() == b"0123\0\0AB"
            assert catalog_rows(agent, GEN, ("CT/f.dcm",)) == [(before[0] + 1, 8)]  # the close's version only

    asyncio.run(run())


def test_a_refused_smb_delete_of_its_own_upload_keeps_it(smb_agent):
    """One rule over SFTP and SMB: a session's own upload of a new file is dropped by its delete without the `delete`
    right (nothing stored is lost), a stored file's delete needs it and is judged before the upload is dropped.
    Over SMB a user without `delete` appending to a stored file and deleting it (delete-on-close) lost the appended
    bytes: the upload was dropped, then the delete refused. The CLOSE still reports ACCESS_DENIED; the file is
    stored whole."""
    agent = smb_agent(users=NO_DELETE).start(timeout=180)
    smb = Smb(agent)
    try:
        with smbclient.open_file(smb.p("new.dcm"), mode="wb", share_access="rwd", **smb.kw) as f:
            f.write(b"new")
            f.flush()
            smb.remove("new.dcm")
        smb.write("f.dcm", b"old")
        with pytest.raises(AccessDenied):
            with smbclient.open_file(smb.p("f.dcm"), mode="ab", share_access="rwd", **smb.kw) as f:
                f.write(b" and more")
                f.flush()
                smb.remove("f.dcm")  # delete-on-close: judged at the close
        assert smb.listdir() == ["f.dcm"]
        assert smb.read("f.dcm") == b"old and more"
    finally:
        smb.close()
