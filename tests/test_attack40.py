"""Attacks on a running agent (round 40): what rounds 37 to 39 left. Parallel uploads of one user past its share of
files not yet uploaded, a listing of a file audited as a failure, the SSH login timeout and the passive ports one user
holds (a rename of a file another session is writing: test_conformance, every protocol). Each test reproduces one
attack that worked and checks it no longer does. Real agent, real SeaweedFS, real clients (ftplib, asyncssh)."""

from __future__ import annotations

import asyncio
import ftplib
import io
import socket
import time

import asyncssh
import pytest
from test_audit import audit_records
from test_ftp import ftp
from test_ftp_hostile import port_range

from faultkit import catalog_rows, ftp_login, payload, sftp_session
from harness import PASSWORD

MiB = 1024 * 1024


def test_parallel_uploads_of_one_user_stop_at_its_share_of_files_not_yet_uploaded(agent_factory, private_seaweed):
    """cache.max_dirty_per_user was checked against the user's total read at each upload's open: uploads opened
    together each counted none of the files the others stored meanwhile, and 14 of 1 MiB opened at once were all
    stored past a share of 10 MB (with the store down they cannot be evicted). The 10th is refused now."""
    private_seaweed.stop()  # every stored file stays on the disk
    agent = agent_factory(private_seaweed, **{"cache.max_bytes": "40MB", "cache.max_dirty_per_user": "25%"}).start()

    async def run() -> list[int]:
        stored = []
        async with sftp_session(agent) as s:
            files = [await s.open(f"p/{i}.dcm", "wb") for i in range(14)]  # all open before any is stored
            for i, f in enumerate(files):
                try:
                    await f.write(payload(i, MiB))
                    await f.close()
                    stored.append(i)
                except asyncssh.SFTPError as e:
                    assert e.code == asyncssh.FX_FAILURE and "max_dirty_per_user" in e.reason, e
                    with pytest.raises(asyncssh.SFTPError, match="file discarded"):
                        await f.close()  # a write failed: nothing stored
        return stored

    assert asyncio.run(run()) == list(range(9))  # a quarter of 40 MB in 1 MiB files
    assert catalog_rows(agent, "SELECT user, bytes FROM dirty_bytes") == [("pacs", 9 * MiB)]


def test_a_listing_of_a_file_is_audited_as_a_listing(agent_factory):
    """LIST and NLST of a file list it (round 38), but the audit trail first recorded the listing as failed ("error:
    NotADirectory"): a false failure an auditor would chase. It is one listing, recorded ok; a listing below a file
    is still a failure."""
    agent = agent_factory().start()
    f = ftp_login(agent)
    f.storbinary("STOR d/x.dcm", io.BytesIO(b"12345"))
    assert f.nlst("d/x.dcm") == ["d/x.dcm"]
    with pytest.raises(ftplib.error_perm, match="550"):
        f.nlst("d/x.dcm/y")
    f.quit()
    listed = [(r["path"], r["result"]) for r in audit_records(agent) if r["op"] == "list"]
    assert listed == [("d/x.dcm", "ok"), ("d/x.dcm/y", "error: NotADirectory: not a directory")]


def test_an_ssh_login_left_half_open_ends_at_sftp_login_timeout(agent_factory):
    """asyncssh's login timeout was fixed at 60 s: a hospital could not shorten how long a connection that never
    logs in holds its slot of sftp.max_unauthenticated and of the address's sessions. sftp.login_timeout sets it."""
    agent = agent_factory(**{"sftp.login_timeout": 2}).start()
    sock = socket.create_connection(("127.0.0.1", agent.sftp_port), timeout=30)
    sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")  # then nothing: no key exchange, no login
    t0, got = time.monotonic(), b""
    while chunk := sock.recv(65536):  # the server's banner and key exchange offer, then its close
        got += chunk
    assert got.startswith(b"SSH-2.0-") and 1.5 < time.monotonic() - t0 < 15
    sock.close()


def test_one_user_or_address_holds_half_the_passive_range_at_most(agent_factory):
    """Each PASV holds a port of the range until its data connection comes or passive_timeout: one user's sessions
    (32 by max_sessions_per_user), sending PASV and never connecting, held a range of 10 ports, and every other
    user's transfers got 425. One user, and one address, hold half the range at most: the next PASV gets 425."""
    low, high = port_range(4)
    users = [{"name": name, "password": PASSWORD, "root": "/"} for name in ("pacs", "other")]
    agent = agent_factory(users=users, **{"ftp.passive_ports": f"{low}-{high}"}).start()
    pacs = [ftp(agent) for _ in range(3)]
    for f in pacs[:2]:
        assert f.sendcmd("PASV").startswith("227")  # and never connect
    with pytest.raises(ftplib.error_temp, match="425 this user holds 2 passive ports"):
        pacs[2].sendcmd("PASV")
    with pytest.raises(ftplib.error_temp, match="425 this address holds 2 passive ports"):
        ftp(agent, "other").sendcmd("PASV")
    other = ftp(agent, "other", address="127.0.0.2")
    assert other.nlst() == []  # the rest of the range serves the others
    assert pacs[0].nlst() == []  # its listener replaced, then connected: it holds none now
    assert pacs[2].nlst() == []
    [told] = agent.events("passive_ports_held")[:1]
    assert told["user"] == "pacs" and told["held_by"] == "user" and told["limit"] == 2
    for f in (*pacs, other):
        f.quit()
