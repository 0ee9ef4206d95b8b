"""Attacks on a running agent (round 23): SFTP, SMB over the FUSE view, and what every front end logs of a refused
request. Real clients (asyncssh, ftplib, smbprotocol against the real Samba). Each test reproduces one attack that
worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import ftplib
import uuid

import asyncssh
import pytest
from smbprotocol import open as smb_open
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SharingViolation
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect
from smbutil import Smb, create_for_write
from test_frontend_hostile import _audit
from test_ftp import ftp
from test_smb_hostile import logged_in_tree, wait_for

from agent.serve.contract import SHOWN_PATH_BYTES
from agent.serve.sftp import MAX_OPEN_FILES
from harness import PASSWORD


def _shared_write(tree, name: str) -> smb_open.Open:
    """Open `name` to write, creating it, sharing it with other writers (two PACS threads on one name)."""
    f = smb_open.Open(tree, name)
    access = smb_open.FilePipePrinterAccessMask
    f.create(smb_open.ImpersonationLevel.Impersonation, access.GENERIC_READ | access.GENERIC_WRITE,
             smb_open.FileAttributes.FILE_ATTRIBUTE_NORMAL,
             smb_open.ShareAccess.FILE_SHARE_READ | smb_open.ShareAccess.FILE_SHARE_WRITE,
             smb_open.CreateDisposition.FILE_OPEN_IF, smb_open.CreateOptions.FILE_NON_DIRECTORY_FILE)
    return f


def test_a_writer_cut_short_does_not_hide_another_clients_upload_of_the_name(smb_agent):
    """Two clients write one new name; the first one's connection is cut. Its close (smbd's, for a client gone)
    discarded its upload and dropped the name's 'being written' entry whoever held it: the second client's
    upload, still open, vanished from every listing and stat until its close. A name being written now takes no
    second writer (test_attack35): the second client is refused while the first writes, and writes the name once
    the cut writer's upload is discarded."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    cut_conn, cut_tree = logged_in_tree(agent, smb)
    first = _shared_write(cut_tree, "two.dcm")
    first.write(b"a" * 4096, 0)
    conn, tree = logged_in_tree(agent, smb)  # another client: another smbd process
    with pytest.raises(SharingViolation):
        _shared_write(tree, "two.dcm")
    cut_conn.transport.close()  # no CLOSE: smbd closes `first` for its client, which is gone
    wait_for(lambda: agent.events("upload_aborted"), 20)
    second = _shared_write(tree, "two.dcm")
    second.write(b"b" * 10, 0)
    assert smb.listdir("") == ["two.dcm"] and smb.stat("two.dcm").st_size == 10
    second.close()
    assert smb.read("two.dcm") == b"b" * 10
    conn.disconnect()
    smb.close()


def test_a_connection_naming_a_clients_guid_does_not_make_its_cut_upload_complete(smb_agent):
    """A close from an smbd whose client is gone discards the upload (tests/test_smb_hostile.py), judged by whether
    that smbd process still has a connection. Samba handed a new connection naming a ClientGUID already connected
    (multi-channel) to that client's process, before any login: anyone who read a PACS's GUID off the wire kept
    its process 'connected' with one NEGOTIATE, and the PACS's upload cut short was stored as a whole file (1 MiB
    of an unfinished upload, stored and uploaded). Multi-channel is off now: each connection is a process of its
    own, and the cut upload is discarded."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    guid = uuid.uuid4()
    pacs = Connection(guid, "127.0.0.1", smb.port, require_signing=True)
    pacs.connect(timeout=15)
    session = Session(pacs, "pacs", PASSWORD)
    session.connect()
    tree = TreeConnect(session, smb.root)
    tree.connect()
    create_for_write(tree, "half.dcm").write(b"x" * 2**20, 0)
    stranger = Connection(guid, "127.0.0.1", smb.port, require_signing=True)  # the PACS's GUID, no login
    stranger.connect(timeout=15)
    pacs.transport.close()  # no CLOSE: the PACS's connection is gone mid-upload
    wait_for(lambda: agent.events("upload_aborted") or agent.events("stored"), 20)
    assert agent.events("stored") == [] and smb.listdir("") == []
    assert "the client's connection ended" in agent.events("upload_aborted")[0]["reason"]
    stranger.disconnect()
    smb.close()


def _grown(agent, act, *args) -> tuple[int, int]:
    """The journal and audit-trail bytes `act(*args)` adds."""
    audit = agent.workdir / "cache" / "audit" / "audit.jsonl"
    log, trail = agent.log_path.stat().st_size, audit.stat().st_size
    act(*args)
    return agent.log_path.stat().st_size - log, audit.stat().st_size - trail


def test_a_refused_path_is_logged_and_audited_cut_short_by_every_front_end(agent_factory):
    """A refused request's path was logged and audited whole, JSON-escaped: a control character is 6 bytes there
    (\\u0001), so a logged-in client wrote up to 6x each request's bytes twice, into the journal and the audit trail
    (SFTP: a 250 KB path wrote 1.5 MB of each per request). The path is now cut to SHOWN_PATH_BYTES escaped, and
    the event and the record say it was cut and how long it was."""
    agent = agent_factory().start()
    hostile = "\x01" * 7000

    def sftp_stat(path: str) -> None:
        async def run() -> None:
            async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                        known_hosts=None) as conn, conn.start_sftp_client() as s:
                with pytest.raises(asyncssh.SFTPFailure, match="control characters"):
                    await s.stat(path)
        asyncio.run(run())

    f = ftp(agent)

    def ftp_size(path: str) -> None:
        with pytest.raises(ftplib.error_perm, match="553"):
            f.sendcmd("SIZE " + path)

    sftp_stat("\x01")  # asyncssh warmed up: only the request below is counted
    for protocol, refuse, path in (("sftp", sftp_stat, hostile * 30), ("ftp", ftp_size, hostile)):
        log, trail = _grown(agent, refuse, path)
        assert log < SHOWN_PATH_BYTES + 3000 and trail < SHOWN_PATH_BYTES + 500, (protocol, log, trail)
        record = _audit(agent)[-1]
        assert record["op"] == "refused" and record["path"] == "\x01" * (SHOWN_PATH_BYTES // 6)
        assert record["result"].endswith(f"(path cut from {len(path)} characters)")
        event = agent.events(f"{protocol}_error")[-1]
        assert event["path"] == record["path"] and event["path_chars"] == len(path)
    with pytest.raises(ftplib.error_perm, match="553"):  # a short path is logged whole, as before
        f.sendcmd("SIZE a\x01b")
    assert _audit(agent)[-1]["path"] == "a\x01b" and "cut" not in _audit(agent)[-1]["result"]
    assert "path_chars" not in agent.events("ftp_error")[-1]


def test_a_handle_refused_at_a_cap_logs_its_path_cut_short(agent_factory):
    """OPENDIR is refused at the session's handle cap before its path is read, and the refusal logged the path as the
    client sent it: a client holding its 64 handles made each further OPENDIR of 210 000 control characters a
    1.26 MB journal line. The path is cut as every other refused path is."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            for _ in range(MAX_OPEN_FILES):
                await s._handler.opendir(b"/")
            before = agent.log_path.stat().st_size
            with pytest.raises(asyncssh.SFTPFailure, match="too many open files in this session"):
                await s._handler.opendir(b"\x01" * 210_000)
            assert agent.log_path.stat().st_size - before < SHOWN_PATH_BYTES + 1000

    asyncio.run(run())
    event = agent.events("sftp_refused")[-1]
    assert event["path"] == "\x01" * (SHOWN_PATH_BYTES // 6) and event["path_bytes"] == 210_000



def test_a_refused_size_stores_no_copy_of_the_file(agent_factory):
    """An SFTP client opens a stored file "r+" (a writer on a copy of it) and sets a size past its user's share for
    unfinished uploads: refused, but the handle counted as changed from then on, and its CLOSE committed the copy, a
    new version with the same bytes, uploaded again whole, for three requests and with the write right alone. A
    refused size changes nothing now: the close stores nothing, as for a handle never written."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            async with s.open("big.dcm", "wb") as f:
                await f.write(b"d" * 2**20)
            async with s.open("big.dcm", "r+b") as f:
                with pytest.raises(asyncssh.SFTPFailure, match="unfinished uploads"):
                    await f.truncate(2**50)
            async with s.open("after.dcm", "wb") as f:
                await f.write(b"later")

    asyncio.run(run())
    agent.wait_drained(30)
    assert [e["path"] for e in agent.events("stored")] == ["big.dcm", "after.dcm"]
