"""Attacks on a running agent (round 26): hostile clients against real listeners (ftplib, asyncssh). Each test
reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import ftplib
import io
import unicodedata

import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import SMBException
from smbutil import Smb
from test_ftp import ftp, get

from harness import BUCKET, PASSWORD

COMPOSED, DECOMPOSED = unicodedata.normalize("NFC", "Müller.dcm"), unicodedata.normalize("NFD", "Müller.dcm")


def _attempt(f: ftplib.FTP, command: str) -> None:
    """A transfer command that the agent refuses (or, LIST, serves) without using a REST marker."""
    try:
        f.retrlines(command, lambda _: None)
    except ftplib.error_perm:
        pass


@pytest.mark.parametrize("command", ["RETR ../../etc/passwd", "STOR sub/", "RETR", "LIST"])
def test_a_rest_marker_goes_with_the_transfer_command_after_it(agent_factory, command):
    """REST, then a transfer command refused before it ran (a path outside the root, a file named as a directory,
    no path) or a listing (which has no use for it): the marker stayed for the next transfer, so a plain STOR over a
    file kept the old file's head under the new bytes, and a plain RETR sent the file short, each answered 226."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR v.dcm", io.BytesIO(b"A" * 5000))
    f.sendcmd("REST 1000")
    _attempt(f, command)
    f.storbinary("STOR v.dcm", io.BytesIO(b"B" * 500))  # before: 1 500 bytes, A * 1000 + B * 500
    f.sendcmd("REST 100")
    _attempt(f, command)
    assert get(f, "v.dcm") == b"B" * 500  # before: 400 bytes
    f.quit()


def test_a_new_name_that_would_display_as_another_is_refused(agent_factory):
    """One name shown, one file: a decomposed 'Mu\u0308ller.dcm' beside the composed 'M\xfcller.dcm', 'a\u200bb.dcm'
    beside 'ab.dcm' (a zero-width space), or an Arabic letter mark (a text-direction control the list of them
    lacked) were each stored as a file of its own, listed as the same name over every protocol. A name stored before
    (or by another S3 client) stays readable, and can be renamed to its composed form."""
    agent = agent_factory().start()
    agent.store.client().put_object(Bucket=BUCKET, Key=f"{agent.prefix}old/{DECOMPOSED}", Body=b"old")
    f = ftp(agent)
    f.encoding = "utf-8"
    f.storbinary(f"STOR new/{COMPOSED}", io.BytesIO(b"new"))
    for name in (DECOMPOSED, "a\u200bb.dcm", "x\u061cy.dcm", "\ufeffz.dcm"):
        with pytest.raises(ftplib.error_perm, match="^553"):
            f.storbinary(f"STOR new/{name}", io.BytesIO(b"x"))
        with pytest.raises(ftplib.error_perm, match="^553"):
            f.mkd(f"new/{name}")

    async def sftp() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            with pytest.raises(asyncssh.SFTPError):
                async with s.open(f"new/{DECOMPOSED}", "wb") as fh:
                    await fh.write(b"x")
            with pytest.raises(asyncssh.SFTPError):
                await s.posix_rename(f"new/{COMPOSED}", f"new/{DECOMPOSED}")
            assert await s.listdir("new") == [COMPOSED]
            async with s.open(f"old/{DECOMPOSED}", "rb") as fh:
                assert await fh.read() == b"old"
            await s.posix_rename(f"old/{DECOMPOSED}", f"old/{COMPOSED}")

    asyncio.run(sftp())
    assert f.nlst("old") == [COMPOSED] and get(f, f"old/{COMPOSED}") == b"old"
    f.quit()


def _answer(f: ftplib.FTP) -> str:
    try:
        return f.voidresp()
    except ftplib.error_perm as e:
        return str(e)


@pytest.mark.parametrize("meanwhile", ["STOR", "APPE", "DELE", "RNFR"])
def test_an_append_does_not_undo_what_another_session_did_to_the_file_meanwhile(agent_factory, meanwhile):
    """An APPE copies the stored file, then adds its bytes. Another session stored the file meanwhile, appended to it,
    deleted it or renamed it away: the APPE's commit then put back the old bytes plus its own, each answered 226, so
    that session's store or append was lost, or the deleted file came back. Now the APPE is refused (550) after a
    store or append; a delete or rename of the file being appended to is refused itself (rounds 40 and 41), and the
    APPE is stored."""
    agent = agent_factory().start()
    a, b = ftp(agent), ftp(agent)
    a.storbinary("STOR x.dcm", io.BytesIO(b"O" * 100))
    data = a.transfercmd("APPE x.dcm")
    data.sendall(b"A" * 10)
    if meanwhile in ("STOR", "APPE"):
        b.storbinary(f"{meanwhile} x.dcm", io.BytesIO(b"B" * 50))
    else:
        with pytest.raises(ftplib.error_perm, match="550 being written by another upload"):
            b.sendcmd("DELE x.dcm") if meanwhile == "DELE" else b.sendcmd("RNFR x.dcm") and b.sendcmd("RNTO y.dcm")
    data.sendall(b"A" * 10)
    data.close()
    if meanwhile in ("STOR", "APPE"):
        assert _answer(a).startswith("550 changed by another session")
        assert get(a, "x.dcm") == (b"O" * 100 if meanwhile == "APPE" else b"") + b"B" * 50
    else:
        assert _answer(a).startswith("226")
        assert get(a, "x.dcm") == b"O" * 100 + b"A" * 20 and "y.dcm" not in a.nlst()
    a.storbinary("APPE x.dcm", io.BytesIO(b"C"))  # an append that meets no other change is stored
    a.quit()
    b.quit()


def test_an_smb_append_follows_its_file_renamed_but_not_over_another_store(smb_agent):
    """The same rule over SMB: a file appended to while an FTP client stored it is refused at its CLOSE (access
    denied) and the FTP store stays. A rename of the file being appended to (by its own client: Windows renames an
    open file) moves the append with it, and its CLOSE stores it under the new name."""
    agent = smb_agent().start(timeout=180)
    smb, f = Smb(agent), ftp(agent)
    smb.write("race.dcm", b"O" * 100)
    with pytest.raises(SMBException, match="ACCESS_DENIED"):
        with smbclient.open_file(smb.p("race.dcm"), mode="ab", **smb.kw) as fh:
            fh.write(b"A" * 10)
            fh.flush()
            f.storbinary("STOR race.dcm", io.BytesIO(b"N" * 50))
    assert smb.read("race.dcm") == b"N" * 50  # before: O * 100 + A * 10
    with smbclient.open_file(smb.p("race.dcm"), mode="ab", share_access="rwd", **smb.kw) as fh:
        fh.write(b"A" * 10)
        fh.flush()
        smbclient.replace(smb.p("race.dcm"), smb.p("moved.dcm"), **smb.kw)
        fh.write(b"B" * 10)
    assert smb.read("moved.dcm") == b"N" * 50 + b"A" * 10 + b"B" * 10
    assert "race.dcm" not in smb.listdir()
    f.quit()
    smb.close()
