"""FTP and SFTP against sessions that race each other and clients that send what a careful one would not: a
rename over a file another session is still writing, paths that end in '/' naming files, commands between RNFR
and RNTO, read+write SFTP handles. Real clients (ftplib, asyncssh) against a real agent."""

from __future__ import annotations

import asyncio
import ftplib
import io

import asyncssh
import pytest
from test_ftp import ftp, get
from test_sftp import connect

from harness import s3_objects, sha256


def test_a_rename_over_a_file_another_session_is_writing_is_refused(agent_factory):
    """Session A uploads x; session B (with `delete`) renames y over x. It was acknowledged, then A's close
    stored over it: B's file was gone under both names. As SMB does (Windows: a file open for writing cannot be
    replaced), B's rename is refused while A writes, in FTP (550) and SFTP (a failure status), whichever
    protocol A writes with; A's upload and B's file are both kept."""
    agent = agent_factory().start()
    a, b = ftp(agent), ftp(agent)
    b.storbinary("STOR y.dcm", io.BytesIO(b"B" * 100))
    a.voidcmd("TYPE I")
    upload = a.transfercmd("STOR x.dcm")  # 150: the file is open at the gateway
    upload.sendall(b"A" * 1000)
    b.sendcmd("RNFR y.dcm")
    with pytest.raises(ftplib.error_perm, match="^550.*being written"):
        b.sendcmd("RNTO x.dcm")

    async def sftp_renames() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPError, match="being written"):
                await sftp.posix_rename("y.dcm", "x.dcm")
            async with sftp.open("z.dcm", "wb") as f:  # SFTP writes, FTP renames
                await f.write(b"Z" * 10)
                with pytest.raises(ftplib.error_perm, match="^550.*being written"):
                    b.rename("y.dcm", "z.dcm")

    asyncio.run(sftp_renames())
    upload.close()
    assert a.voidresp().startswith("226")
    assert get(b, "x.dcm") == b"A" * 1000 and get(b, "y.dcm") == b"B" * 100 and get(b, "z.dcm") == b"Z" * 10
    b.rename("y.dcm", "x.dcm")  # nothing writes x now: the rename replaces it
    assert get(b, "x.dcm") == b"B" * 100
    agent.wait_drained()
    assert {p: r["sha256"] for p, r in s3_objects(agent.store, agent.prefix).items()} == {
        "x.dcm": sha256(b"B" * 100), "z.dcm": sha256(b"Z" * 10)}


def test_a_path_ending_in_a_slash_names_a_directory(agent_factory):
    """`STOR new/` stored `new`, `SIZE f/` and SFTP stat('f/') answered for the file f: a path ending in '/'
    names a directory (POSIX), so a file is not found by it and none is created by it; directories still work."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR f.dcm", io.BytesIO(b"data"))
    for cmd in ("STOR new/", "APPE new/", "STOR f.dcm/"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            f.storbinary(cmd, io.BytesIO(b"x"))
    for cmd in ("SIZE f.dcm/", "MDTM f.dcm/", "DELE f.dcm/", "RETR f.dcm/", "RNFR f.dcm/"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            f.sendcmd(cmd)
    f.sendcmd("RNFR f.dcm")
    with pytest.raises(ftplib.error_perm, match="^550"):
        f.sendcmd("RNTO g.dcm/")
    f.mkd("d/")
    f.storbinary("STOR d/in.dcm", io.BytesIO(b"in"))
    assert f.nlst("d/") == ["in.dcm"]
    f.rename("d/", "e/")  # rename(2) takes a directory with a trailing slash
    f.cwd("e/")

    async def sftp_session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            for call in (sftp.stat("f.dcm/"), sftp.open("f.dcm/", "rb"), sftp.open("new/", "wb"),
                         sftp.remove("f.dcm/"), sftp.posix_rename("f.dcm", "h.dcm/")):
                with pytest.raises(asyncssh.SFTPError):
                    await call
            assert (await sftp.stat("e/")).type == asyncssh.FILEXFER_TYPE_DIRECTORY
            await sftp.mkdir("k/")
            assert sorted(await sftp.listdir("/")) == ["e", "f.dcm", "k"]

    asyncio.run(sftp_session())
    assert sorted(f.nlst("/")) == ["e", "f.dcm", "k"]


def test_rnto_must_follow_rnfr_at_once(agent_factory):
    """RFC 959: RNTO must come right after RNFR; any other command in between clears the RNFR (RNTO then
    gets 503). It was kept, so an RNTO long after (and after other commands) renamed the file."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR a.dcm", io.BytesIO(b"a"))
    for between in ("NOOP", "PWD", "SIZE a.dcm"):
        f.sendcmd("RNFR a.dcm")
        f.sendcmd(between)
        with pytest.raises(ftplib.error_perm, match="^503"):
            f.sendcmd("RNTO b.dcm")
    f.rename("a.dcm", "b.dcm")
    assert f.nlst() == ["b.dcm"]


def test_an_sftp_read_write_handle_reads_what_the_file_holds(agent_factory):
    """open('r+'): a PACS tool that patches a header reads it first. Reads on such a handle were refused
    ('file not opened for reading'); now they answer what the file holds, the bytes written so far included. A
    handle opened for writing only still refuses reads, and r+ needs the 'read' right like any read."""
    agent = agent_factory().start()

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("h.dcm", "wb") as f:
                await f.write(b"0123456789")
            async with sftp.open("h.dcm", "r+b") as f:
                assert await f.read(4) == b"0123"
                await f.write(b"AB", 2)
                await f.seek(0)
                assert await f.read() == b"01AB456789"
            async with sftp.open("h.dcm", "wb") as f:
                await f.write(b"new")
                with pytest.raises(asyncssh.SFTPError):
                    await f.read(1, 0)
            async with sftp.open("h.dcm", "rb") as f:
                assert await f.read() == b"new"

    asyncio.run(session())
