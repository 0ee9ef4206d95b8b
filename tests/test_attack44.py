"""Attacks on a running agent (round 44): what round 43 left. An SFTP size set by name on the file the session is
itself writing, an SMB delete of its own upload of a stored file by a user who may not delete, an SFTP session
renaming a file it writes through two handles, a rename meeting another serving process's claim of its target,
renames to the same name and a READ at an offset past 2^63. Each test reproduces one attack that worked and checks
it no longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh, smbprotocol)."""

from __future__ import annotations

import asyncio
import fcntl
import threading
import time

import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import AccessDenied
from smbutil import Smb

from agent.store.writing import WriteMarks
from faultkit import catalog_rows, ftp_login, sftp_put, sftp_session
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


def test_a_session_renames_a_file_it_writes_through_two_handles(agent_factory):
    """An SFTP session with two of its own handles writing one file had its rename refused, "being written by another
    upload": only one of its uploads was counted as its own. Both move with the rename; each close stores the
    file under the new name."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/old.dcm", b"old")
            for name in ("CT/old.dcm", "CT/new.dcm"):  # a stored file being rewritten, a new one
                async with s.open(name, "wb") as f:
                    async with s.open(name, "wb") as g:
                        await f.write(b"one")
                        await g.write(b"two")
                        await s.posix_rename(name, "CT/moved.dcm")
                    async with s.open("CT/moved.dcm", "rb") as r:
                        assert await r.read() == b"two"
                async with s.open("CT/moved.dcm", "rb") as r:
                    assert await r.read() == b"one"
                assert await s.listdir("CT") == ["moved.dcm"]
                await s.remove("CT/moved.dcm")

    asyncio.run(run())


def test_a_rename_meeting_another_process_claiming_its_target_is_refused_cleanly(agent_factory):
    """With [server] workers > 1, another serving process claims a name (an exclusive create) by holding its mark's
    write lock for an instant. An SFTP session renaming its own upload of a stored file moved the upload's mark
    after the catalog's rename: meeting that instant it raised, the file renamed in the catalog while the client was
    told it failed, and the upload, left under the old name, was refused at its close (lost). The target is now marked
    first: the rename is refused (permission denied) having changed nothing, or done. Here the test holds the
    write lock on and off, as that process would, while the session renames its file back and forth."""
    agent = agent_factory().start()
    lock, stop = agent.workdir / "cache" / "writing.lock", threading.Event()

    def claiming() -> None:
        other = WriteMarks(lock)
        while not stop.is_set():
            if other._try(fcntl.F_WRLCK, "CT/b.dcm"):
                time.sleep(0.003)
                other._lock(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, "CT/b.dcm")
            time.sleep(0.003)

    async def run() -> tuple[str, int]:
        names, refused = ["CT/a.dcm", "CT/b.dcm"], 0
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/a.dcm", b"old")
            async with s.open("CT/a.dcm", "r+b") as f:
                await f.write(b"new")
                for _ in range(60):
                    try:
                        await s.posix_rename(names[0], names[1])
                        names.reverse()
                    except asyncssh.SFTPPermissionDenied:
                        refused += 1
            assert await s.listdir("CT") == [names[0].split("/")[1]]
            async with s.open(names[0], "rb") as f:
                assert await f.read() == b"new"
        return names[0], refused

    thread = threading.Thread(target=claiming)
    thread.start()
    try:
        name, refused = asyncio.run(run())
    finally:
        stop.set()
        thread.join()
    assert refused  # the claims were met
    marks = WriteMarks(lock)
    assert not marks.busy("CT/a.dcm") and not marks.busy("CT/b.dcm")  # no mark left behind


def test_a_rename_to_itself_changes_nothing(agent_factory):
    """rename(2) of a file or directory to its own name succeeds and changes nothing (OpenSSH's posix-rename, vsftpd's
    RNTO). A directory's was refused, "a directory of this name exists" (FTP 550, SFTP failure), and so was a
    session's own upload's, "being written by another upload", while a stored file's was done. Now each is done; the
    upload goes on. An SFTPv3 rename, which never replaces, still finds its target there (as OpenSSH's link(2))."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await s.mkdir("D")
            await s.posix_rename("D", "D")
            for mode, data in (("wb", b"kept "), ("ab", b"whole")):  # a new file, then the stored one
                async with s.open("CT/f.dcm", mode) as f:
                    await f.write(data[:2])
                    await s.posix_rename("CT/f.dcm", "CT/f.dcm")
                    await f.write(data[2:])
            with pytest.raises(asyncssh.SFTPFailure, match="does not replace"):
                await s.rename("CT/f.dcm", "CT/f.dcm")
            async with s.open("CT/f.dcm", "rb") as f:
                assert await f.read() == b"kept whole"
            assert sorted(await s.listdir("/")) == ["CT", "D"]

    asyncio.run(run())
    ftp = ftp_login(agent)
    try:
        assert ftp.sendcmd("RNFR D").startswith("350")
        assert ftp.sendcmd("RNTO D").startswith("250")
        assert sorted(ftp.nlst()) == ["CT", "D"]
    finally:
        ftp.close()


def test_a_read_past_2_63_of_a_file_open_for_writing_is_its_end(agent_factory):
    """An SFTP READ at an offset of 2^63 or more on a handle opened "r+" was answered "Uncaught exception: Python int
    too large to convert to C long" (pread(2) takes no such offset). It is the end of the file (EOF), as on a handle
    opened for reading."""
    agent = agent_factory().start()

    async def run() -> None:
        async with sftp_session(agent) as s:
            await sftp_put(s, "CT/f.dcm", b"stored")
            for mode in ("rb", "r+b"):
                async with s.open("CT/f.dcm", mode) as f:
                    for offset in (2**63, 2**64 - 1):
                        assert await f.read(10, offset) == b""
                    assert await f.read(10, 0) == b"stored"

    asyncio.run(run())
