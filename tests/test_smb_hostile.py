"""SMB against hostile clients and local accounts: real smbd over the agent's FUSE view, smbprotocol as the
attacker. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import ftplib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest
import smbclient
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBException, SMBResponseException
from smbprotocol.file_info import FileInformationClass
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect
from smbutil import Smb, create_for_write
from test_ftp import ftp

from agent.serve.fuse import MAX_OPEN_DIRS, MAX_OPEN_FILES
from harness import PASSWORD

ERRORS = (OSError, SMBException)


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def logged_in_tree(agent, smb: Smb) -> tuple[Connection, TreeConnect]:
    """A raw smbprotocol connection of `pacs` to its share: the test decides how it ends."""
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
    conn.connect(timeout=15)
    session = Session(conn, "pacs", PASSWORD)
    session.connect()
    tree = TreeConnect(session, smb.root)
    tree.connect()
    return conn, tree


def test_a_banned_address_loses_the_smb_connections_it_has_open(smb_agent):
    """The ban denies the address in smb.conf, which keeps out new connections only: a guesser that kept its
    connection open went on guessing after the ban, one SESSION_SETUP after another (and in the end logged in).
    The agent now has smbd drop the banned address's connections."""
    agent = smb_agent(**{"login.max_failures": 3, "login.ban_seconds": 60}).start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
    conn.connect(timeout=15)
    for _ in range(3):  # a name that does not exist: Samba's own per-user lockout plays no part
        with pytest.raises(ERRORS):
            Session(conn, "intruder", "guess").connect()
    wait_for(lambda: agent.events("smb_hosts_denied"), 20)
    wait_for(lambda: not conn.transport.connected, 10)
    with pytest.raises(ERRORS):
        Session(conn, "pacs", PASSWORD).connect()


def test_other_local_accounts_cannot_use_the_fuse_mount(smb_agent):
    """smbd reaches the namespace through the agent's FUSE mount (allow_other). Its files were 0664 and nothing
    checked the caller: any local account of the box (nobody) read every stored file there and wrote new ones,
    outside [[users]] permissions and roots. The mount now keeps out whoever is not in the service group."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    smb.write("secret.dcm", b"patient data")
    mount = Path(agent.overrides["smb.mountpoint"])
    for command in (["cat", str(mount / "secret.dcm")], ["ls", str(mount)], ["touch", str(mount / "planted.dcm")],
                    ["rm", str(mount / "secret.dcm")]):
        done = subprocess.run(command, user="nobody", capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (command, done)
    assert smb.listdir("") == ["secret.dcm"] and smb.read("secret.dcm") == b"patient data"
    smb.close()


def test_smb_connections_from_one_address_are_capped(smb_agent):
    """Samba has no per-client cap, and each connection is an smbd process of its own: one address opened them
    without end (FTP and SFTP refuse one over max_sessions_per_address). While an address holds
    [smb] max_sessions_per_address connections it is now denied in smb.conf, until one of them ends."""
    agent = smb_agent(**{"smb.max_sessions_per_address": 3}).start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    held = []
    for _ in range(3):  # negotiated, never logged in
        held.append(Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True))
        held[-1].connect(timeout=15)
    wait_for(lambda: agent.events("session_refused"), 10)
    with pytest.raises(ERRORS):
        Smb(agent).listdir("")
    held.pop().disconnect()
    wait_for(lambda: len(agent.events("smb_hosts_denied")) >= 2, 10)  # below the cap: allowed again
    assert Smb(agent).listdir("") == []
    assert agent.events("session_refused")[0]["reason"] == "too many connections from 127.0.0.1 (limit 3)"
    for conn in held:
        conn.disconnect()


def test_the_share_root_is_the_logged_in_accounts(smb_agent):
    """Samba matches user names without case, and the share's path named the root link by the name the client
    typed (%U): of the users 'pacs' (root /CT) and 'PACS' (root /), PACS logging in with its own password got
    the root of pacs. The path now names the Unix account that logged in (%u)."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/CT"},
                             {"name": "PACS", "password": PASSWORD + "-upper", "root": "/"}]).start(timeout=180)
    upper = Smb(agent, user="PACS", password=PASSWORD + "-upper")
    upper.write("top.dcm", b"top")
    assert upper.listdir("") == ["CT", "top.dcm"]
    upper.close()


def test_a_cut_connection_leaves_no_half_written_file(smb_agent):
    """A client whose connection is cut mid-upload (a crash, a pulled cable) never sent CLOSE; smbd closes what it
    left open and that close committed the bytes so far as a complete file (1 MiB of an unfinished upload stored
    and uploaded). A close from an smbd whose client is gone now discards the upload; a file the client closes
    is stored as before."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    conn, tree = logged_in_tree(agent, smb)
    create_for_write(tree, "cut.dcm").write(b"x" * 2**20, 0)
    conn.transport.close()  # no CLOSE, no LOGOFF: the connection is gone
    wait_for(lambda: agent.events("upload_aborted"), 20)
    assert "the client's connection ended" in agent.events("upload_aborted")[0]["reason"]
    smb.write("whole.dcm", b"closed by its client")
    assert smb.listdir("") == ["whole.dcm"]
    agent.wait_drained(30)
    assert agent.events("stored")[-1]["path"] == "whole.dcm" and len(agent.events("stored")) == 1
    smb.close()


def test_a_file_being_written_is_read_only_with_the_read_right(smb_agent):
    """Over SMB a file still being written is read from its writer's staging file. That path skipped the `read`
    permission: a write-only account read another user's upload in progress (and its own), which FTP and SFTP
    refuse it. Now it is refused the same way."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "drop", "password": PASSWORD, "root": "/", "permissions": ["write"]}]
                      ).start(timeout=180)
    pacs, drop = Smb(agent), Smb(agent, user="drop")
    pacs.makedirs("CT")
    with smbclient.open_file(pacs.p("CT/x.dcm"), mode="wb", share_access="rw", **pacs.kw) as f:
        f.write(b"patient data, not yet stored")
        f.flush()
        with smbclient.open_file(pacs.p("CT/x.dcm"), mode="rb", share_access="rw", **pacs.kw) as g:
            assert g.read() == b"patient data, not yet stored"  # the writer's own account reads it back
        with smbclient.open_file(drop.p("CT/x.dcm"), mode="rb", share_access="rw", **drop.kw) as g:
            with pytest.raises(ERRORS):
                g.read()
    with pytest.raises(ERRORS):  # stored: open_read refuses it, as before
        drop.read("CT/x.dcm")
    assert pacs.read("CT/x.dcm") == b"patient data, not yet stored"
    pacs.close()
    drop.close()


def test_directory_handles_per_user_are_capped(smb_agent):
    """Each SMB directory handle smbd opens on the mount holds its directory's whole listing in the agent until it
    is closed, and smbd allows thousands per connection (300 handles of a 3 000-file directory held 265 MB): one
    user may hold fuse.MAX_OPEN_DIRS; one more is refused (too many open files) until one is closed."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    smb.makedirs("CT")
    smb.write("CT/a.dcm", b"x")
    session = smbclient.register_session("127.0.0.1", username="pacs", password=PASSWORD, port=smb.port,
                                         connection_cache=smb.kw["connection_cache"])
    tree = TreeConnect(session, smb.root)
    tree.connect()

    def listed() -> Open:
        d = Open(tree, "CT")
        d.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.GENERIC_READ,
                 FileAttributes.FILE_ATTRIBUTE_DIRECTORY, ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
                 CreateDisposition.FILE_OPEN, CreateOptions.FILE_DIRECTORY_FILE)
        d.query_directory("*", FileInformationClass.FILE_NAMES_INFORMATION)  # smbd opens it on the mount
        return d

    held = [listed() for _ in range(MAX_OPEN_DIRS)]
    with pytest.raises(SMBResponseException) as refused:
        listed()
    assert refused.value.status == 0xC000011F, hex(refused.value.status)  # STATUS_TOO_MANY_OPENED_FILES
    held.pop().close()
    held.append(listed())
    for d in held:
        d.close()
    assert smb.listdir("CT") == ["a.dcm"]
    smb.close()


def test_open_files_per_user_are_capped(smb_agent):
    """Only directory handles were capped: one SMB client could open files without closing them, thousands per
    connection (smbd allows ~16 000) and 64 connections per address, each open file read once holding a descriptor
    of the agent's, until the agent ran out of descriptors and every protocol's stores failed. One user may now hold
    fuse.MAX_OPEN_FILES; one more is refused (STATUS_TOO_MANY_OPENED_FILES) until one is closed."""
    import psutil

    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    smb.write("a.dcm", b"xy")
    session = smbclient.register_session("127.0.0.1", username="pacs", password=PASSWORD, port=smb.port,
                                         connection_cache=smb.kw["connection_cache"])
    tree = TreeConnect(session, smb.root)
    tree.connect()
    fds = psutil.Process(agent.proc.pid).num_fds()

    def opened() -> Open:
        f = Open(tree, "a.dcm")
        f.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.GENERIC_READ,
                 FileAttributes.FILE_ATTRIBUTE_NORMAL, ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE,
                 CreateDisposition.FILE_OPEN, CreateOptions.FILE_NON_DIRECTORY_FILE)
        assert f.read(0, 1) == b"x"  # the agent opens the cached copy
        return f

    held = [opened() for _ in range(MAX_OPEN_FILES)]
    with pytest.raises(SMBResponseException) as refused:
        opened()
    assert refused.value.status == 0xC000011F, hex(refused.value.status)  # STATUS_TOO_MANY_OPENED_FILES
    assert psutil.Process(agent.proc.pid).num_fds() <= fds + MAX_OPEN_FILES + 16
    held.pop().close()
    held.append(opened())
    for f in held:
        f.close()
    wait_for(lambda: psutil.Process(agent.proc.pid).num_fds() <= fds + 16, 10)  # every descriptor given back
    assert smb.read("a.dcm") == b"xy"
    smb.close()


def test_a_file_being_written_is_deleted_or_renamed_only_with_the_right(smb_agent):
    """A file still being written (not yet in the catalog) was unlinked or renamed by the FUSE layer alone. A
    read-only account's delete (Samba unlinks at the last close, before the file's own close) made the PACS's
    upload vanish while the PACS's CLOSE answered success; its rename moved the upload to a name of its choosing.
    Another user now needs `delete` / `rename`, as for stored files: the upload is stored, and the PACS's CLOSE
    reports the refused delete."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "viewer", "password": PASSWORD, "root": "/", "permissions": ["read"]}]
                      ).start(timeout=180)
    pacs, viewer = Smb(agent), Smb(agent, user="viewer")
    pacs.makedirs("CT")
    with pytest.raises(ERRORS, match="ACCESS_DENIED"):
        with smbclient.open_file(pacs.p("CT/x.dcm"), mode="wb", share_access="rwd", **pacs.kw) as f:
            f.write(b"the PACS's image")
            f.flush()
            viewer.remove("CT/x.dcm")  # only marked delete-on-close here
    with smbclient.open_file(pacs.p("CT/y.dcm"), mode="wb", share_access="rwd", **pacs.kw) as f:
        f.write(b"another image")
        f.flush()
        with pytest.raises(ERRORS):
            viewer.rename("CT/y.dcm", "CT/elsewhere.dcm")
    assert pacs.listdir("CT") == ["x.dcm", "y.dcm"] and pacs.read("CT/x.dcm") == b"the PACS's image"
    assert [e["path"] for e in agent.events("stored")] == ["CT/x.dcm", "CT/y.dcm"]
    pacs.close()
    viewer.close()


def test_unfinished_uploads_per_user_are_bounded_and_given_back_when_cut(smb_agent):
    """Files one account writes and never closes hold the cache disk (staging) until they end: one account could
    take the whole disk from every other. Past a quarter of the cache (cache.max_bytes 16 MB: 4 MB) its writes
    are refused with STATUS_DISK_FULL; when its connection is cut, its unfinished files stop counting."""
    agent = smb_agent(**{"cache.max_bytes": "16MB"}).start(timeout=180)
    smb = Smb(agent)
    conn, tree = logged_in_tree(agent, smb)
    held = create_for_write(tree, "held.dcm")
    for i in range(3):
        held.write(b"x" * 2**20, i * 2**20)
    more = create_for_write(tree, "more.dcm")
    with pytest.raises(SMBResponseException, match="STATUS_DISK_FULL"):
        more.write(b"y" * 2**20, 0)
    assert agent.events("unfinished_limit")[0]["user"] == "pacs"
    conn.transport.close()  # no CLOSE: the connection is gone
    wait_for(lambda: len(agent.events("upload_aborted")) == 2, 20)
    smb.write("after.dcm", b"z" * 3 * 2**20)
    assert smb.read("after.dcm") == b"z" * 3 * 2**20
    smb.close()


def test_a_rename_over_a_file_another_client_is_writing_is_refused(smb_agent):
    """One client writes dst (a stored file it replaces, or a new one); another renames a stored file over dst
    (replace_if_exists). Samba refuses that itself (ACCESS_DENIED, as Windows does) only when both opens are
    in one smbd: from a second client (another smbd) the rename answered success, then the writer's close
    stored its file over the renamed one, whose content was gone under both names. Now refused for both."""
    agent = smb_agent().start(timeout=180)
    writer, renamer = Smb(agent), Smb(agent)  # two clients: two smbd processes
    for dst in ("stored.dcm", "new.dcm"):
        writer.write("report.dcm", b"the stored report")
        if dst == "stored.dcm":
            writer.write(dst, b"the old image")
        with smbclient.open_file(writer.p(dst), mode="wb", share_access="r", **writer.kw) as f:
            f.write(b"the image being written")
            f.flush()
            with pytest.raises(ERRORS, match="ACCESS_DENIED"):
                renamer.replace("report.dcm", dst)
            with pytest.raises(ftplib.error_perm, match="^550"):  # FTP (and SFTP) too: the gateway refuses it
                ftp(agent).rename("report.dcm", dst)
        assert writer.read(dst) == b"the image being written"
        assert writer.read("report.dcm") == b"the stored report"
    renamer.replace("report.dcm", "new.dcm")  # closed: replaced as before
    assert writer.read("new.dcm") == b"the stored report" and "report.dcm" not in writer.listdir()
    writer.close()
    renamer.close()


def test_a_new_file_renamed_over_one_an_ftp_upload_writes_is_refused(smb_agent):
    """An SMB client renames a file it is still writing (new: not stored yet) to a name an FTP upload is writing.
    That rename was the FUSE layer's alone (the file is only committed at its close, under the new name), so the
    gateway's check for files being written never ran: 'success', then the two closes stored over each other
    under one name. Now ACCESS_DENIED, as a rename of a stored file over it is; after the upload, it goes."""
    agent = smb_agent().start(timeout=180)
    smb, f = Smb(agent), ftp(agent)
    f.voidcmd("TYPE I")
    upload = f.transfercmd("STOR x.dcm")
    upload.sendall(b"F" * 1000)
    with smbclient.open_file(smb.p("a.tmp"), mode="wb", share_access="rwd", **smb.kw) as new:
        new.write(b"the image being written over SMB")
        with pytest.raises(ERRORS, match="ACCESS_DENIED"):
            smb.replace("a.tmp", "x.dcm")
        upload.close()
        assert f.voidresp().startswith("226")
        smb.replace("a.tmp", "b.dcm")
    assert smb.read("x.dcm") == b"F" * 1000 and smb.read("b.dcm") == b"the image being written over SMB"
    smb.close()


def test_a_rename_over_a_file_another_client_is_reading_is_refused(smb_agent):
    """Windows refuses to replace a file another open holds without FILE_SHARE_DELETE; Samba refused it only when
    both opens were in one smbd: from a second client the rename went through under the reader's feet. Now it is
    ACCESS_DENIED while the other client has the file open; once closed, the rename replaces it."""
    agent = smb_agent().start(timeout=180)
    reader, renamer = Smb(agent), Smb(agent)  # two clients: two smbd processes
    reader.write("image.dcm", b"the image being read")
    reader.write("report.dcm", b"the stored report")
    with smbclient.open_file(reader.p("image.dcm"), mode="rb", share_access="r", **reader.kw) as f:
        assert f.read(4) == b"the "
        with pytest.raises(ERRORS, match="ACCESS_DENIED"):
            renamer.replace("report.dcm", "image.dcm")
        assert f.read() == b"image being read"
    assert reader.read("image.dcm") == b"the image being read"
    renamer.replace("report.dcm", "image.dcm")  # closed: replaced as before
    assert reader.read("image.dcm") == b"the stored report"
    reader.close()
    renamer.close()


def test_smb_connections_from_many_addresses_are_capped_box_wide(smb_agent):
    """Connections that never log in, from many addresses (each under max_sessions_per_address): smbd forked a
    process for each (300 held 300 processes, for the 10-minute deadtime) without end. [smb] max_connections
    now bounds them all together: one more is closed at once; once some end, clients get in again."""
    cap = 6
    agent = smb_agent(**{"smb.max_connections": cap}).start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])

    def smbds() -> int:
        return sum(1 for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "smbd"
                   and any(agent.overrides["smb.state_dir"] in c for c in p.info["cmdline"] or []))

    idle = smbds()  # the parent and its helpers (notifyd, cleanupd)
    held = [socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(f"127.0.5.{i + 1}", 0))
            for i in range(cap + 4)]

    def served() -> bool:
        """Whether smbd answers a NEGOTIATE on a new connection (closed unanswered when refused)."""
        conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
        try:
            conn.connect(timeout=5)
        except ERRORS:
            return False
        conn.disconnect()
        return True

    wait_for(lambda: not served(), 20)
    assert smbds() <= idle + cap  # the capped children beside the parent and its helpers
    for s in held:
        s.close()
    # every held connection's process gone (a probe let in while some were still ending left the next client
    # refused under load), then clients get in again
    wait_for(lambda: smbds() <= idle, 60)
    wait_for(served, 20)
    smb = Smb(agent)
    smb.write("after.dcm", b"in again")
    assert smb.read("after.dcm") == b"in again"
    smb.close()
