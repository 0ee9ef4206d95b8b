"""Attacks on a running agent (round 46): what rounds 44 and 45 left. An FTP client that vanishes without a word
mid-upload, and a size set by name on a file another session is writing. Each test reproduces one attack that worked
and checks it no longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh); nft drops the vanished
client's packets (a table of the test's own, matching only its connections)."""

from __future__ import annotations

import os
import time

from halib import run
from test_attack45 import _drop

from faultkit import ftp_login, wait_for


def test_an_ftp_client_gone_without_a_word_frees_its_unfinished_upload(agent_factory):
    """A client gone mid-STOR without closing its connections (a power cut: no FIN, no reset reaches the box) held its
    upload (the staging file, the name's write mark, the data port) for SOCKET_TIMEOUT (120 s) and its session slot for
    the idle timeout (600 s). Both connections now have TCP keepalive and a user timeout, as smbd's: the dead client
    is cut after 30 s of silence, its upload discarded. A live client pausing as long mid-upload (a slow modality)
    answers the probes from its kernel and stores its file whole."""
    agent = agent_factory().start()
    clients = []
    for name in ("gone.dcm", "paused.dcm"):
        ftp = ftp_login(agent)
        data = ftp.transfercmd(f"STOR CT/{name}")
        data.sendall(b"x" * 2**20)
        clients.append((ftp, data))
    (gone, gone_data), (paused, paused_data) = clients
    table = f"pacsgw_a46_{os.getpid()}"
    run("nft", "add", "table", "inet", table)
    try:
        run("nft", "add", "chain", "inet", table, "input", "{ type filter hook input priority -10 ; }")
        for sock in (gone.sock, gone_data):
            port = sock.getsockname()[1]
            server = sock.getpeername()[1]
            _drop(table, port, server)
            _drop(table, server, port)
        silent = time.monotonic()
        wait_for(lambda: agent.events("upload_aborted"), 60, interval=1, what="the vanished client's upload dropped")
        assert time.monotonic() - silent < 50
        [aborted] = agent.events("upload_aborted")
        assert aborted["path"] == "CT/gone.dcm"
        paused_data.sendall(b"y")
        paused_data.close()
        assert paused.voidresp().startswith("226")
        assert paused.size("CT/paused.dcm") == 2**20 + 1
    finally:
        run("nft", "delete", "table", "inet", table, check=False)
        for ftp, data in clients:
            data.close()
            ftp.close()
