"""Attacks on a running agent (round 35): SSH beyond the SFTP subsystem, and SMB through the real Samba over the FUSE
view. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
from asyncssh.constants import MSG_GLOBAL_REQUEST
from asyncssh.packet import Boolean, String
from smbprotocol.exceptions import SharingViolation
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.tree import TreeConnect
from smbutil import Smb, create_for_write
from test_smb_hostile import logged_in_tree, wait_for

from harness import PASSWORD

MiB = 1024 * 1024


def test_ssh_requests_are_not_read_while_their_answers_cannot_be_sent(agent_factory):
    """asyncssh answers every SSH request outside SFTP at once (a global request such as keepalive@openssh.com, a
    refused channel open or channel request), and the agent read the client's requests however many answers waited
    unsent: SFTP waited for its replies to leave (_Session.read), these did not. A logged-in client sending keepalives
    without reading had each answer queued in the agent (400 000 grew it by 9 MB, on without end until the idle
    timeout). Past asyncio's high-water mark the agent reads nothing more from the connection: once the kernel's
    buffers are full, the requests wait in the client."""
    agent = agent_factory().start()

    async def run() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn:
            before = agent.rss()
            transport = conn._transport  # the client's socket: it reads nothing from now on
            transport.pause_reading()
            sent = grew = 0
            while sent < 600_000 and transport.get_write_buffer_size() < 4 * MiB and not transport.is_closing():
                for _ in range(2000):
                    conn.send_packet(MSG_GLOBAL_REQUEST, String(b"keepalive@openssh.com"), Boolean(True))
                sent += 2000
                grew = max(grew, agent.rss() - before)
                await asyncio.sleep(0.01)
            # On a loaded machine the kernels' buffers may not fill before the agent cuts a peer that acknowledged
            # nothing for 30 s (DEAD_PEER_S): bounded too, provided the agent did not hold the answers meanwhile
            assert transport.get_write_buffer_size() >= 4 * MiB or transport.is_closing() and grew < 2 * MiB, (
                f"the agent read all {sent} requests and grew by {grew / MiB:.0f} MB")
            conn.abort()  # a close would wait for the client's unsent requests
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.listdir("/") == []

    asyncio.run(run())


def test_a_session_or_tree_connect_ended_mid_upload_leaves_no_half_written_file(smb_agent):
    """A client that ends its session (LOGOFF) or its tree connect (TREE_DISCONNECT) with a file open for writing
    never sent CLOSE: smbd closes what it left open, and that close committed the bytes so far as a complete file
    (1 MiB of an unfinished upload stored and uploaded; the connection was not cut, so its check did not see it).
    smbd does those closes as root, a client's CLOSE as its user's account: the upload is discarded now, and a
    file its client closes is stored as before, also on a connection that logs off afterwards."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    conn, tree = logged_in_tree(agent, smb)
    create_for_write(tree, "tree.dcm").write(b"x" * 2**20, 0)
    tree.disconnect()  # TREE_DISCONNECT, no CLOSE: the session stays
    tree = TreeConnect(tree.session, smb.root)
    tree.connect()
    whole = create_for_write(tree, "whole.dcm")
    whole.write(b"closed by its client", 0)
    whole.close()
    create_for_write(tree, "session.dcm").write(b"y" * 2**20, 0)
    tree.session.disconnect(close=False)  # LOGOFF, no CLOSE: the connection stays
    wait_for(lambda: len(agent.events("upload_aborted")) == 2, 20)
    assert {e["path"] for e in agent.events("upload_aborted")} == {"tree.dcm", "session.dcm"}
    assert all("the client's session ended" in e["reason"] for e in agent.events("upload_aborted"))
    assert smb.listdir("") == ["whole.dcm"]
    agent.wait_drained(30)
    assert [e["path"] for e in agent.events("stored")] == ["whole.dcm"]
    conn.disconnect()
    smb.close()


READ_WRITE = FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE


def _shared_open(tree: TreeConnect, name: str, disposition: int, access: int = READ_WRITE) -> Open:
    """An open that lets other opens read, write and delete the file meanwhile (smbclient's opens share nothing)."""
    f = Open(tree, name)
    f.create(ImpersonationLevel.Impersonation, access, 0x80,
             ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE,
             disposition, CreateOptions.FILE_NON_DIRECTORY_FILE)
    return f


def test_a_file_being_written_takes_no_second_writer_even_when_its_open_shares_writes(smb_agent):
    """An open that shares writes lets Samba grant a second open for writing, in the same client or another. Each
    wrote a version of its own (the gateway's file being written is one open's), and the last one closed replaced
    the other's: a client's acknowledged 1 MiB upload became the second handle's 10 bytes, or 1 MiB of zeros ending
    in them when written at the end. The second writer is refused (a sharing violation, as if the first open
    shared nothing) until the first is closed; a reader is not, and sees the bytes written so far."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    conn, tree = logged_in_tree(agent, smb)
    conn2, tree2 = logged_in_tree(agent, smb)
    first = _shared_open(tree, "a.dcm", CreateDisposition.FILE_OVERWRITE_IF)
    first.write(b"a" * 2**20, 0)
    for other in (tree, tree2):  # the same client's second handle, another client's
        for disposition in (CreateDisposition.FILE_OPEN, CreateDisposition.FILE_OVERWRITE_IF):
            with pytest.raises(SharingViolation):
                _shared_open(other, "a.dcm", disposition)
    reader = _shared_open(tree2, "a.dcm", CreateDisposition.FILE_OPEN, FilePipePrinterAccessMask.GENERIC_READ)
    assert reader.read(0, 4) == b"aaaa"
    reader.close()
    first.close()
    second = _shared_open(tree2, "a.dcm", CreateDisposition.FILE_OPEN)
    second.write(b"b" * 10, 0)
    second.close()
    assert smb.read("a.dcm") == b"b" * 10 + b"a" * (2**20 - 10)
    conn.disconnect()
    conn2.disconnect()
    smb.close()
