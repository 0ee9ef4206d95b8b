"""Attacks on a running agent (round 38): FTP commands as real clients send them beside a transfer, and the admin
HTTP routes under every method aiohttp gives them. Each test reproduces one attack (or client) that failed and checks
it no longer does."""

from __future__ import annotations

import ftplib
import io
import socket
import time
import urllib.error
import urllib.request

import pytest
from test_ftp import ftp, get
from test_ftp_hostile import port_range

from harness import PASSWORD


def test_abor_sent_as_urgent_data_or_after_telnet_ip_and_synch_is_answered(agent_factory):
    """RFC 959 4.1.3: a client aborts a transfer with Telnet IP and Synch (urgent data, TCP's out-of-band byte),
    then ABOR: BSD ftp and Windows ftp.exe send IAC IP IAC as urgent data and DM ABOR; Python's ftplib.abort() sends
    the line 'ABOR' itself as urgent data. The kernel took each urgent byte out of the command stream: ftplib's ABOR
    lost its line end (never read as a command) and BSD's was read as '\\xff\\xf4\\xf2ABOR', answered 502; either
    way the upload went on, the client waited for a 426 that never came, and its timeout ended the session."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.sock.settimeout(15)
    for name, abort in (("ftplib.dcm", f.abort),
                        ("bsd.dcm", lambda: (f.sock.send(b"\xff\xf4\xff", socket.MSG_OOB),
                                             f.sock.sendall(b"\xf2ABOR\r\n"), f.getmultiline())[-1])):
        conn = f.transfercmd(f"STOR {name}")
        conn.sendall(b"x" * 100_000)  # and the upload is not over: the data connection stays open
        assert abort().startswith("426")
        assert f.getresp().startswith("226")
        conn.close()
        with pytest.raises(ftplib.error_perm, match="550"):  # the aborted upload was not stored
            f.size(name)
    assert f.sendcmd("NOOP").startswith("200")  # and the session goes on
    f.quit()



def test_list_and_nlst_of_a_file_list_that_file(agent_factory):
    """RFC 959: LIST of a file sends that file's line, and ls names a file argument as given (vsftpd, proftpd and IIS
    answer so). Both were '550 not a directory': Windows ftp.exe's `ls d/x.dcm` (NLST) and a PACS script checking
    for the file it stored took it for missing. MLSD still lists directories only (RFC 3659)."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR d/x.dcm", io.BytesIO(b"12345"))
    assert f.nlst("d/x.dcm") == ["d/x.dcm"]
    assert f.nlst("d") == ["x.dcm"]
    f.cwd("d")
    listed: list[str] = []
    f.retrlines("LIST -l x.dcm", listed.append)
    [row] = listed
    assert row.startswith("-") and row.split()[4] == "5" and row.endswith(" x.dcm")
    for cmd in ("NLST missing.dcm", "MLSD x.dcm", "LIST x.dcm/y"):
        with pytest.raises(ftplib.error_perm, match="550"):
            f.retrlines(cmd, listed.append)
    assert f.sendcmd("NOOP").startswith("200")
    f.quit()


def test_pasv_on_a_full_passive_range_is_counted_each_but_logged_once(agent_factory):
    """With every passive port held (here a 2-port range, two sessions told one each), a logged-in client pipelining
    PASV got its 425 each, and each also wrote a passive_ports_exhausted warning: 3 500 events a second, 140 bytes
    each, into the journal. Each is counted in pacsgw_errors_total now, and logged once a minute per user."""
    low, high = port_range(2)
    users = [{"name": name, "password": PASSWORD, "root": "/"} for name in ("pacs", "ct", "mr")]
    agent = agent_factory(users=users, **{"ftp.passive_ports": f"{low}-{high}"}).start()
    # one a user and address: each holds half the range (FtpServer.passive_share)
    holders = [ftp(agent, user, address=f"127.0.0.{i}") for i, user in ((2, "ct"), (3, "mr"))]
    for f in holders:
        assert f.sendcmd("PASV").startswith("227")
    f = ftp(agent)
    n = 3000
    f.sock.sendall(b"PASV\r\n" * n)
    assert [f.getline()[:4] for _ in range(n)] == ["425 "] * n
    assert f.sendcmd("NOOP").startswith("200")  # the session goes on
    [told] = agent.events("passive_ports_exhausted")
    assert told["user"] == "pacs" and told["range"] == f"{low}-{high}"
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=30) as r:
        assert f'pacsgw_errors_total{{kind="PassivePortsExhausted",protocol="ftp"}} {n}.0' in r.read().decode()
    for session in (*holders, f):
        session.quit()


def test_an_upload_trickled_a_byte_per_segment_costs_the_agent_its_bytes_only(agent_factory):
    """A logged-in client sending its uploads a byte per TCP segment: each read was handed to the gateway as a block
    of its own, a bytes object that a write-through file holds until its upload, read into a 1 MiB buffer cut down to
    it. 8 such uploads grew the agent by 84 bytes per byte sent (6 MiB for 74 KB in 15 s at load 10); a bare loop of
    such reads holds 2.7 KB per byte, and the gateway holds up to 64 MiB of bytes in write-through files. Blocks under
    4 KiB are joined now, and a short read asks for no 1 MiB: the agent grows by about what it holds."""
    agent = agent_factory().start()
    sessions = [ftp(agent) for _ in range(8)]
    conns = [f.transfercmd(f"STOR t{i}.dcm") for i, f in enumerate(sessions)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    time.sleep(0.5)
    before, sent = agent.rss(), bytearray()
    start = time.monotonic()
    while time.monotonic() - start < 12:
        byte = bytes([len(sent) % 251])
        for c in conns:
            c.send(byte)
        sent += byte
        time.sleep(0.001)
    time.sleep(1)
    grown = agent.rss() - before
    for c in conns:
        c.close()
    assert [f.voidresp()[:3] for f in sessions] == ["226"] * 8
    assert grown < 2 * 2**20, f"{grown} bytes more for {8 * len(sent)} bytes sent"
    assert get(sessions[0], "t0.dcm") == get(sessions[7], "t7.dcm") == sent  # every byte, in order

def test_head_on_an_admin_route_is_answered_as_its_get(agent_factory):
    """aiohttp answers HEAD on every GET route (RFC 9110). The admin handler looked its route up by method: HEAD
    /admin/evict and /admin/prefetch with the token were a KeyError, '500 Internal Server Error' and a traceback in the
    journal each. HEAD gets GET's status now, without its body."""
    agent = agent_factory().start()
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    for path in ("/admin/evict", "/admin/prefetch"):
        url = f"http://127.0.0.1:{agent.http_port}{path}"
        head = urllib.request.Request(url, method="HEAD", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(head, timeout=30) as r:
            assert r.status == 200 and r.read() == b""
    with pytest.raises(urllib.error.HTTPError, match="401"):  # and the token is still needed
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30)
    assert "Traceback" not in agent.log_path.read_text()
