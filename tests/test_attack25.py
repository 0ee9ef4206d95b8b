"""Attacks on a running agent (round 25): hostile SMB and FTP clients against real listeners (the real Samba over the
FUSE view, smbprotocol, ftplib). Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import time
import uuid

import pytest
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBException
from smbprotocol.session import Session
from test_ftp import ftp
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


def test_abor_during_the_commit_of_a_whole_upload_says_it_was_stored(proxied_agent, proxy):
    """ABOR after an upload's last byte, while its commit waited for S3 (write-through): the file was stored (the
    commit's durable part runs to its end whatever happens) and uploaded, yet the client was told "426 transfer
    aborted" and took it for not stored. The transfer was complete: RFC 959 answers its 226, then ABOR's."""
    agent = proxied_agent()
    f = ftp(agent)
    proxy.hold_puts.set()  # the commit's write-through wait: S3 does not answer yet
    data = f.transfercmd("STOR whole.dcm")
    data.sendall(b"x" * 100_000)
    data.close()
    wait_for(lambda: agent.events("stored") and proxy.puts_held, 10)
    f.sock.sendall(b"ABOR\r\n")
    time.sleep(0.5)  # ABOR reaches the agent while the PUT is held
    proxy.hold_puts.clear()
    assert f.getresp().startswith("226") and f.getresp().startswith("226")  # STOR's, then ABOR's
    assert f.size("whole.dcm") == 100_000 and agent.wait_events("uploaded")
    f.quit()


def test_failed_smb_logins_under_another_case_of_a_name_count_for_that_user(smb_agent):
    """Samba takes 'PACS' for the account 'pacs', but the guard counted the name as typed: failed SMB logins spread
    over case variants never added up to the user's ban, which the user's FTP and SFTP logins share."""
    agent = smb_agent(**{"login.max_failures": 3, "login.ban_seconds": 60}).start(timeout=180)
    port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
    for name in ("PACS", "Pacs", "pAcs"):
        conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
        conn.connect(timeout=15)
        with pytest.raises(SMBException):
            Session(conn, name, "guess").connect()
        conn.disconnect()
    wait_for(lambda: [e for e in agent.events("login_ban") if e.get("scope") == "user"], 20)
    assert [e["key"] for e in agent.events("login_ban") if e.get("scope") == "user"] == ["pacs"]
