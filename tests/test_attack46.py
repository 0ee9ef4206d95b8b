"""Attacks on a running agent (round 46): what rounds 44 and 45 left, then a fresh probe. An FTP client that vanishes
without a word mid-upload, a size set by name on a file another session is writing, another S3 writer's keys too long
to name. Each test reproduces one attack that worked and checks it no longer does. Real agent, real SeaweedFS, real
clients (ftplib, asyncssh, smbclient); nft drops the vanished client's packets (a table of the test's own, matching
only its connections)."""

from __future__ import annotations

import asyncio
import os
import time

import asyncssh
import pytest
import smbclient
from halib import run
from smbutil import Smb
from test_attack45 import _drop

from faultkit import catalog_rows, ftp_login, ftp_put, sftp_put, sftp_session, wait_for
from harness import BUCKET


def _connected(port: int, peer: int) -> bool:
    """Whether the box still holds the TCP connection from the client's port `peer` to its `port`."""
    return bool(run("ss", "-tnH", "state", "established", f"( sport = :{port} and dport = :{peer} )").stdout.strip())


def test_an_ftp_client_gone_without_a_word_frees_its_unfinished_upload(agent_factory):
    """A client gone mid-STOR without closing its connections (a power cut: no FIN, no reset reaches the box) held its
    upload (the staging file, the name's write mark, the data connection) for SOCKET_TIMEOUT (120 s) and its session
    slot for the idle timeout (600 s). Both connections now have TCP keepalive, as smbd's, and the control connection a
    user timeout (its 426 is never acknowledged): the dead client is cut after 30 s of silence, its upload discarded. A
    live client pausing as long mid-STOR (a slow modality) answers the probes from its kernel and stores its file
    whole, and one reading nothing of a RETR that long (a zero window, which a user timeout would cut) gets it whole."""
    agent = agent_factory().start()
    big = os.urandom(16 << 20)  # more than the loopback connection holds in flight
    reader = ftp_login(agent)
    ftp_put(reader, "CT/big.dcm", big)
    clients = [(reader, reader.transfercmd("RETR CT/big.dcm"))]
    for name in ("gone.dcm", "paused.dcm"):
        ftp = ftp_login(agent)
        data = ftp.transfercmd(f"STOR CT/{name}")
        data.sendall(b"x" * 2**20)
        clients.append((ftp, data))
    (_, reading), (gone, gone_data), (paused, paused_data) = clients
    table = f"pacsgw_a46_{os.getpid()}"
    run("nft", "add", "table", "inet", table)
    try:
        run("nft", "add", "chain", "inet", table, "input", "{ type filter hook input priority -10 ; }")
        for sock in (gone.sock, gone_data):
            port, server = sock.getsockname()[1], sock.getpeername()[1]
            _drop(table, port, server)
            _drop(table, server, port)
        silent = time.monotonic()
        wait_for(lambda: agent.events("upload_aborted"), 60, interval=1, what="the vanished client's upload dropped")
        wait_for(lambda: not _connected(agent.ftp_port, gone.sock.getsockname()[1]), 30, interval=1,
                 what="the vanished client's control connection closed")
        assert time.monotonic() - silent < 50
        [aborted] = agent.events("upload_aborted")
        assert aborted["path"] == "CT/gone.dcm"
        paused_data.sendall(b"y")
        paused_data.close()
        assert paused.voidresp().startswith("226")
        assert paused.size("CT/paused.dcm") == 2**20 + 1
        got = bytearray()
        while chunk := reading.recv(1 << 20):
            got += chunk
        reading.close()
        assert reader.voidresp().startswith("226") and got == big
    finally:
        run("nft", "delete", "table", "inet", table, check=False)
        for ftp, data in clients:
            data.close()
            ftp.close()


def test_a_size_set_by_name_on_a_file_another_session_writes_is_refused(agent_factory):
    """An SFTP setstat by name with another size, on a file another session (FTP or SFTP) was writing, committed the
    cut file as a version of its own, which the writer's close then replaced: the cut acknowledged, then lost (and
    uploaded twice). Refused now (permission denied), as a delete or rename of that file is: the writer's close would
    store over it. SMB's end-of-file: see the next test."""
    agent = agent_factory().start()
    ftp = ftp_login(agent)
    ftp_put(ftp, "CT/f.dcm", b"stored----")

    async def run() -> None:
        async with sftp_session(agent) as writer, sftp_session(agent) as other:
            async with writer.open("CT/s.dcm", "wb") as f:
                await f.write(b"sftp upload")
                data = ftp.transfercmd("STOR CT/f.dcm")
                data.sendall(b"ftp upload")
                for name in ("CT/f.dcm", "CT/s.dcm"):
                    await asyncio.sleep(0.5)  # the STOR's 150 and first bytes are in
                    with pytest.raises(asyncssh.SFTPPermissionDenied, match="being written"):
                        await other.setstat(name, asyncssh.SFTPAttrs(size=3))
                data.close()
                assert ftp.voidresp().startswith("226")
            await sftp_put(other, "CT/n.dcm", b"0123456789")
            await other.setstat("CT/n.dcm", asyncssh.SFTPAttrs(size=3))  # nobody writes it: cut
            async with other.open("CT/n.dcm", "rb") as f:
                assert await f.read() == b"012"

    try:
        asyncio.run(run())
    finally:
        ftp.close()
    assert catalog_rows(agent, "SELECT path, size FROM entries WHERE path LIKE 'CT/_.dcm' ORDER BY path") == [
        ("CT/f.dcm", 10), ("CT/n.dcm", 3), ("CT/s.dcm", 11)]
    assert not agent.events("upload_aborted")


def test_an_smb_open_for_writing_a_file_an_ftp_upload_writes_is_refused(smb_agent):
    """SMB's one writer per file held among SMB opens only: a client could open a file an FTP (or SFTP) upload was
    writing and set its end of file, and its CLOSE committed the cut file, which the upload's close then replaced (a
    second writer, last close wins). Refused with STATUS_SHARING_VIOLATION as for another SMB open's upload; an
    exclusive create of the name still finds it taken (OBJECT_NAME_COLLISION, test_attack18)."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    ftp = ftp_login(agent)
    try:
        ftp_put(ftp, "f.dcm", b"stored----")
        [(gen,)] = catalog_rows(agent, "SELECT gen FROM entries WHERE path = 'f.dcm'")
        data = ftp.transfercmd("STOR f.dcm")
        data.sendall(b"ftp upload")
        time.sleep(0.5)  # the STOR's first bytes are in
        for mode in ("r+b", "wb"):  # set end of file, overwrite
            with pytest.raises(OSError, match="0xc0000043"):  # STATUS_SHARING_VIOLATION
                with smbclient.open_file(smb.p("f.dcm"), mode=mode, share_access="rwd", **smb.kw) as f:
                    f.truncate(3)
        assert smb.read("f.dcm") == b"stored----"  # opens for reading are not refused
        data.close()
        assert ftp.voidresp().startswith("226")
        assert smb.read("f.dcm") == b"ftp upload"
        # the upload's version only
        assert catalog_rows(agent, "SELECT gen FROM entries WHERE path = 'f.dcm'") == [(gen + 1,)]
    finally:
        ftp.close()
        smb.close()


def test_keys_whose_paths_are_too_long_to_look_up_are_not_listed(agent_factory, seaweed):
    """Another S3 writer's key whose names each fit (255 bytes) but whose path is longer than the 1000 bytes a client
    may name (S3 takes 1 024) was listed over FTP and SFTP (and SMB), then refused at every use, its rename to a
    shorter name too ("path longer than 1000 bytes"). It is left out like a name too long (listing_name_hidden)."""
    agent = agent_factory(prefix="t46/")
    deep = "/".join(c * 200 for c in "abcd")
    too_long = "e" * (1001 - len(deep) - 1)
    for key in (f"{deep}/{too_long}", f"{deep}/ok.dcm"):
        seaweed.client().put_object(Bucket=BUCKET, Key=f"t46/{key}", Body=b"another writer's image")
    agent.start()
    ftp = ftp_login(agent)
    try:
        assert [n.rsplit("/", 1)[-1] for n in ftp.nlst(deep)] == ["ok.dcm"]
    finally:
        ftp.close()

    async def run() -> None:
        async with sftp_session(agent) as s:
            assert await s.listdir(deep) == ["ok.dcm"]

    asyncio.run(run())
    assert {(e["name"], e["reason"]) for e in agent.events("listing_name_hidden")} == {
        (repr(too_long), "path longer than 1000 bytes")}
