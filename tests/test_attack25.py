"""Attacks on a running agent (round 25): hostile SMB and FTP clients against real listeners (the real Samba over the
FUSE view, smbprotocol, raw FTP sockets). Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import uuid

import pytest
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBException
from smbprotocol.session import Session
from test_hardening import metric, wait_for



def test_a_failed_smb_login_from_a_workstation_named_with_a_line_separator_is_counted(smb_agent, monkeypatch):
    """Failed SMB logins reach the login guard through Samba's JSON authentication audit, one record a line. Samba
    writes the NTLM workstation name the client chose raw, and the agent cut the file at every splitlines() break:
    a workstation holding U+2028 split each record in two unreadable halves. Such a client guessed passwords without
    end: never logged, audited, counted or banned."""
    agent = smb_agent(**{"login.max_failures": 3, "login.ban_seconds": 60}).start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    monkeypatch.setenv("NETBIOS_COMPUTER_NAME", "WS\u2028X")  # pyspnego's NTLM workstation name
    for _ in range(3):
        conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
        conn.connect(timeout=15)
        with pytest.raises(SMBException):
            Session(conn, "intruder", "guess").connect()
        conn.disconnect()
    wait_for(lambda: agent.events("smb_hosts_denied"), 20)
    assert len(agent.events("login_failed")) == 3
    assert metric(agent, 'pacsgw_login_bans_total{scope="address"}') == 1
