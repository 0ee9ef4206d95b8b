"""Attacks on a running agent (round 45): SMB, HTTP and names across protocols. A PACS that vanishes without a word
(power cut, pulled cable) in the middle of an SMB upload. Each test reproduces one attack that worked and checks it no
longer does. Real agent, real Samba, real SeaweedFS, real clients (smbprotocol); nft drops the vanished clients'
packets (a table of the test's own, matching only their connections)."""

from __future__ import annotations

import os
import time

import pytest
from halib import run
from smbprotocol.connection import SMB2Echo
from smbprotocol.exceptions import SMBException
from smbutil import Smb, create_for_write
from test_smb_hostile import logged_in_tree

from faultkit import wait_for
from harness import PASSWORD


def _drop(table: str, sport: int, dport: int) -> None:
    """Drop the packets from sport to dport (loopback packets pass the input hook whichever way they go)."""
    run("nft", "add", "rule", "inet", table, "input", "tcp", "sport", str(sport), "tcp", "dport", str(dport), "drop")


def test_an_smb_client_gone_without_a_word_frees_its_unfinished_upload(smb_agent):
    """A client gone mid-upload without closing its connection (a power cut: no FIN, no reset reaches the box) left
    smbd waiting on a connection Linux gives up on after 2 h 11 min (keepalive), or 15 min when an answer of smbd's
    was not yet acknowledged: all that time its unfinished upload held the name (the PACS sending it again after its
    reboot got STATUS_SHARING_VIOLATION), its smbd process and its place under max_sessions_per_address. smbd sends
    no SMB2 echo; smb.conf sets TCP's keepalive and user timeout to drop a peer silent for 30 s, and the upload is
    discarded as a cut connection's. Two clients: one idle when it goes, one with an answer on its way."""
    agent = smb_agent().start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    smb = Smb(agent)
    conns = []
    for name in ("idle.dcm", "answered.dcm"):
        conn, tree = logged_in_tree(agent, smb)
        create_for_write(tree, name).write(b"x" * 2**20, 0)
        conns.append((conn, tree.session, conn.transport._sock.getsockname()[1]))
    table = f"pacsgw_a45_{os.getpid()}"
    run("nft", "add", "table", "inet", table)
    try:
        run("nft", "add", "chain", "inet", table, "input", "{ type filter hook input priority -10 ; }")
        (_, _, idle), (answered, session, talking) = conns
        _drop(table, idle, port)
        _drop(table, port, idle)
        _drop(table, port, talking)  # smbd's answer to this echo is never acknowledged, then the client is silent
        answered.send(SMB2Echo(), sid=session.session_id)
        time.sleep(1)
        _drop(table, talking, port)
        silent = time.monotonic()
        with pytest.raises(SMBException):  # the name is held while smbd thinks its writer is there
            smb.write("idle.dcm", b"sent again")
        wait_for(lambda: len(agent.events("upload_aborted")) == 2, 60, interval=1, what="both uploads dropped")
        assert time.monotonic() - silent < 50
        assert all("the client's connection ended" in e["reason"] for e in agent.events("upload_aborted"))
        for name in ("idle.dcm", "answered.dcm"):
            smb.write(name, b"sent again")
            assert smb.read(name) == b"sent again"
    finally:
        run("nft", "delete", "table", "inet", table, check=False)
        for conn, _, _ in conns:
            conn.transport.close()
        smb.close()


def test_smb_errors_in_the_journal_name_the_user(smb_agent):
    """A gateway error on an SMB request was logged as smb_error with user null (the audit record named the user):
    a client refused again and again (an overwrite without the delete right, a rename over a stored file) could not be
    told apart in the journal from the box's other SMB users. The event names the request's user now."""
    users = [{"name": "pacs", "password": PASSWORD, "root": "/"},
             {"name": "nodel", "password": PASSWORD, "root": "/", "permissions": ["read", "write", "rename"]}]
    agent = smb_agent(users=users).start(timeout=180)
    pacs, nodel = Smb(agent), Smb(agent, user="nodel")
    try:
        pacs.write("a.dcm", b"stored")
        pacs.write("b.dcm", b"stored too")
        with pytest.raises(SMBException):
            nodel.write("a.dcm", b"overwritten")
        with pytest.raises(SMBException):
            nodel.replace("b.dcm", "a.dcm")
        errors = wait_for(lambda: agent.events("smb_error")[1:] and agent.events("smb_error"), 10)
        assert [(e["user"], e["path"]) for e in errors] == [("nodel", "a.dcm")] * len(errors)
        assert pacs.read("a.dcm") == b"stored"
    finally:
        pacs.close()
        nodel.close()
