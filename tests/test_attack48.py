"""Attacks on a running agent (round 48): a client holding every descriptor (attack47's), and what the agent then
took a failed read for: the SMB watches' errors at every poll, no connection from an address over its SMB cap, the
login guard's live session slots gone, a WORM-retained file without its header, an active HA box without a role.
Each test reproduces one attack that worked and checks it no longer does. Real agent, real Samba, real SeaweedFS,
real clients (asyncssh, ftplib, smbprotocol)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ftplib
import os
import resource
import socket
import threading
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid
from smbprotocol.exceptions import SMBResponseException
from smbprotocol.open import CreateDisposition
from smbutil import Smb, create_for_write
from test_attack47 import _descriptors_taken
from test_smb_hostile import logged_in_tree

from agent.hahook import notify
from bench.dicomgen import ct_slice
from faultkit import ftp_get, ftp_login, ftp_put, wait_for
from harness import PASSWORD


def test_the_smb_watches_out_of_descriptors_log_once_a_minute(smb_agent):
    """Out of descriptors, the SMB login watch (Samba's authentication audit, polled every 0.25 s, and the bans it
    renders) and the smbd memory watch (every 2 s) logged an error at each poll: 48 smb_login_watch_failed and 6
    smbd_memory_watch_failed in 5 min of a client holding every descriptor, as many error lines in the journal. Each
    is now the descriptors_exhausted event, once a minute per place, as for the listeners and the FUSE requests; the
    failed SMB login made meanwhile is counted once the descriptors are back."""
    agent = smb_agent().start(timeout=180)
    Smb(agent).write("kept.dcm", b"k")

    def wrong_login() -> None:
        with contextlib.suppress(Exception):
            Smb(agent, password="not-the-password").listdir()

    async def scenario() -> None:
        async with _descriptors_taken(agent, hold=True):
            guesser = threading.Thread(target=wrong_login, daemon=True)
            guesser.start()
            await asyncio.to_thread(guesser.join, 30)
            await asyncio.sleep(6)  # three memory polls, two dozen login polls

    asyncio.run(scenario())
    wait_for(lambda: agent.events("login_failed"), 20, what="the failed SMB login counted")
    assert agent.events("smb_login_watch_failed") == agent.events("smbd_memory_watch_failed") == []
    places = [e["where"] for e in agent.events("descriptors_exhausted")]
    assert places.count("smbd_memory_watch_failed") == places.count("smb_login_watch_failed") == 1, places
    assert agent.proc.poll() is None


def test_smb_connections_are_not_counted_as_none_out_of_descriptors():
    """The SMB per-address cap counts each address's connections in /proc/net/tcp every 0.25 s, and denies one that
    holds the cap in smb.conf. Out of descriptors the table could not be opened, and that was taken for no connection
    at all: the next poll lifted the denial while the address still held every connection. It raises now (the poll
    fails, the denial stays). The process's own descriptor limit, lowered for a moment, is the fault."""
    from agent.serve.smb import connections_by_address
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    served = listener.accept()[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        assert connections_by_address(listener.getsockname()[1]) == {"127.0.0.1": 1}
        resource.setrlimit(resource.RLIMIT_NOFILE, (served.fileno() + 1, hard))
        with contextlib.suppress(OSError):
            for _ in range(served.fileno() + 1):  # the free descriptors below the limit, taken
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError) as raised:
            connections_by_address(listener.getsockname()[1])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in held:
            os.close(fd)
        for s in (served, client, listener):
            s.close()
    assert raised.value.errno == errno.EMFILE


def test_logins_out_of_descriptors_do_not_free_the_slots_of_live_sessions(agent_factory):
    """At a session cap the login guard frees the slots of serving processes that are gone (killed unreleased), by
    reading /proc/<pid>/stat. Out of descriptors that read failed, and a failure was taken for "gone": the slots of
    every live session of the user, this process's own included, were deleted and the login let in. A client holding
    the descriptors (attack47's SFTP session from 127.0.0.2) logged FTP control connections it had opened before in
    one after another, over ftp.max_sessions_per_user, and the cap stayed lifted by as many afterwards. A process
    that cannot be looked up now keeps its slots: the logins over the cap are refused, 421."""
    agent = agent_factory(**{"ftp.max_sessions_per_user": 2}).start()
    held = [ftp_login(agent) for _ in range(2)]
    waiting = [ftplib.FTP() for _ in range(2)]
    for ftp in waiting:
        ftp.connect("127.0.0.1", agent.ftp_port, timeout=30)
        ftp.sendcmd("USER pacs")
    answers: list[str] = []

    async def scenario() -> None:
        async with _descriptors_taken(agent):
            for ftp in waiting:
                try:
                    answers.append(await asyncio.to_thread(ftp.sendcmd, f"PASS {PASSWORD}"))
                except ftplib.Error as e:
                    answers.append(str(e))

    ftp_put(held[0], "kept.dcm", b"k")
    asyncio.run(scenario())
    assert [a[:3] for a in answers] == ["421", "421"], answers
    assert agent.events("session_slots_freed") == []
    for ftp in held:  # the cap holds after: the two live sessions still count
        ftp.voidcmd("NOOP")
    with pytest.raises(ftplib.error_temp, match="421"):
        ftp_login(agent)


def test_a_retained_file_is_not_released_on_a_copy_that_could_not_be_read(agent_factory, private_seaweed):
    """WORM: a file not in object storage yet is judged by its cached copy's DICOM header (a rule keeps MG for ten
    years). Out of descriptors that copy could not be opened, which was taken for "evicted meanwhile": no header, the
    path rules alone (which keep nothing here), and the delete went through, the mammogram gone before its upload.
    The copy that cannot be read now is no answer: the delete is refused as unavailable (FTP 451), the file kept."""
    private_seaweed.create_bucket("locked-a48", object_lock=True)
    agent = agent_factory(private_seaweed, **{"uplink.bucket": "locked-a48", "compliance.worm": True,
                                              "compliance.retention_days": 0,
                                              "compliance.rules": [{"modality": ["MG"], "retention_days": 3653}]})
    agent.start()
    private_seaweed.stop()  # not uploaded: its cached header is what says it is retained
    ftp = ftp_login(agent)
    mammogram = ct_slice(np.random.default_rng(1), patient="P", modality="MG", rows=16, cols=16,
                         study_uid=generate_uid(), series_uid=generate_uid())
    ftp_put(ftp, "MG.dcm", mammogram)
    ftp_put(ftp, "kept.dcm", b"k")
    answers: list[str] = []

    async def scenario() -> None:
        async with _descriptors_taken(agent):
            try:
                answers.append(await asyncio.to_thread(ftp.sendcmd, "DELE MG.dcm"))
            except ftplib.Error as e:
                answers.append(str(e))

    asyncio.run(scenario())
    assert answers[0].startswith("451"), answers
    assert ftp_get(ftp, "MG.dcm") == mammogram
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        ftp.delete("MG.dcm")


def test_the_active_box_out_of_descriptors_stays_active(agent_factory, tmp_path):
    """keepalived's notify hook writes this box's state to the role file, read every 0.2 s. Out of descriptors the
    read failed and that was taken for no state at all: the active box became the standby (every store refused,
    ha_standby logged and audited), then took over again once a descriptor was free, each time counted as a
    take-over and every directory forgotten to be listed again from the bucket. A file that cannot be read now is
    no news: the role stays."""
    role = tmp_path / "ha-role"
    assert notify(str(role), "MASTER") == 0
    agent = agent_factory(**{"ha.enabled": True, "ha.role_file": str(role)}).start()
    ftp = ftp_login(agent)
    ftp_put(ftp, "kept.dcm", b"k")

    async def scenario() -> None:
        async with _descriptors_taken(agent):
            await asyncio.sleep(2)  # ten reads of the role file

    asyncio.run(scenario())
    time.sleep(1)
    assert agent.events("ha_standby") == []
    ha = agent.health()["ha"]
    assert (ha["role"], ha["takeovers"]) == ("active", 1), ha
    ftp_put(ftp, "after.dcm", b"a")


def test_an_smb_file_opened_out_of_descriptors_is_not_stored_whole_when_its_client_is_cut(smb_agent):
    """An SMB close is the client's only while its smbd still has the client's connection and acts as its user: one
    smbd makes itself, for a client cut mid-upload, discards the upload (attack23, 35, 45). Both checks need the
    request's client address, looked up in /proc at each request; out of descriptors the lookup failed and the address
    was left unknown, which skips the checks. A stored file opened for writing then, written to once descriptors were
    back and cut off with its client, was stored with the cut write in it as a complete version. A request whose
    client cannot be looked up is refused now (STATUS_TOO_MANY_OPENED_FILES), and the file stays as it was."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    smb.write("kept.dcm", b"k")
    smb.write("x.dcm", b"a" * 4096)
    conn, tree = logged_in_tree(agent, smb)
    opened: list = []

    async def scenario() -> None:
        async with _descriptors_taken(agent):
            with contextlib.suppress(SMBResponseException):
                opened.append(await asyncio.to_thread(create_for_write, tree, "x.dcm", CreateDisposition.FILE_OPEN))

    asyncio.run(scenario())
    if opened:  # main: opened with its client unknown; written once descriptors are back
        opened[0].write(b"b" * 100, 0)
    conn.transport.close()  # no CLOSE: the connection is gone
    time.sleep(3)
    assert smb.read("x.dcm") == b"a" * 4096
    assert not opened, "opened with no client known"
    smb.close()
