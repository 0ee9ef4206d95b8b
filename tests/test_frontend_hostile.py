"""FTP and SFTP against sessions that race each other and clients that send what a careful one would not: a
rename over a file another session is still writing, paths that end in '/' naming files, commands between RNFR
and RNTO, read+write SFTP handles. Real clients (ftplib, asyncssh) against a real agent."""

from __future__ import annotations

import asyncio
import base64
import ftplib
import http.client
import io
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import asyncssh
import pytest
from test_ftp import ftp, get
from test_sftp import connect

from agent.auth import hash_password
from devstack import free_port
from harness import PASSWORD, s3_objects, sha256


def open_upload(session: ftplib.FTP, path: str) -> socket.socket:
    """STOR path, its first 1000 bytes ('A') sent, left open (150: the file is open at the gateway)."""
    session.voidcmd("TYPE I")
    upload = session.transfercmd(f"STOR {path}")
    upload.sendall(b"A" * 1000)
    return upload


def rename_refused(session: ftplib.FTP, src: str, dst: str) -> None:
    """RNFR src, RNTO dst: 550, the target being written."""
    session.sendcmd(f"RNFR {src}")
    with pytest.raises(ftplib.error_perm, match="^550.*being written"):
        session.sendcmd(f"RNTO {dst}")


async def sftp_rename_refused(agent, src: str, dst: str) -> None:
    async with connect(agent) as conn, conn.start_sftp_client() as sftp:
        with pytest.raises(asyncssh.SFTPError, match="being written"):
            await sftp.posix_rename(src, dst)


def test_a_rename_over_a_file_another_session_is_writing_is_refused(agent_factory):
    """Session A uploads x; session B (with `delete`) renames y over x. It was acknowledged, then A's close
    stored over it: B's file was gone under both names. As SMB does (Windows: a file open for writing cannot be
    replaced), B's rename is refused while A writes, in FTP (550) and SFTP (a failure status), whichever
    protocol A writes with; A's upload and B's file are both kept."""
    agent = agent_factory().start()
    a, b = ftp(agent), ftp(agent)
    b.storbinary("STOR y.dcm", io.BytesIO(b"B" * 100))
    upload = open_upload(a, "x.dcm")
    rename_refused(b, "y.dcm", "x.dcm")

    asyncio.run(sftp_rename_refused(agent, "y.dcm", "x.dcm"))

    async def sftp_writes() -> None:  # SFTP writes, FTP renames
        async with connect(agent) as conn, conn.start_sftp_client() as sftp, sftp.open("z.dcm", "wb") as f:
            await f.write(b"Z" * 10)
            with pytest.raises(ftplib.error_perm, match="^550.*being written"):
                b.rename("y.dcm", "z.dcm")

    asyncio.run(sftp_writes())
    upload.close()
    assert a.voidresp().startswith("226")
    assert get(b, "x.dcm") == b"A" * 1000 and get(b, "y.dcm") == b"B" * 100 and get(b, "z.dcm") == b"Z" * 10
    b.rename("y.dcm", "x.dcm")  # nothing writes x now: the rename replaces it
    assert get(b, "x.dcm") == b"B" * 100
    agent.wait_drained()
    assert {p: r["sha256"] for p, r in s3_objects(agent.store, agent.prefix).items()} == {
        "x.dcm": sha256(b"B" * 100), "z.dcm": sha256(b"Z" * 10)}


@pytest.mark.parametrize("upload_to, rename_to, after", [
    ("t/x.dcm", "t", {"t/x.dcm": b"A" * 1000, "u/x.dcm": b"B" * 100}),
    ("s/sub/x.dcm", "u", {"u/sub/x.dcm": b"A" * 1000, "u/x.dcm": b"B" * 100})], ids=["into-target", "below-source"])
def test_a_directory_rename_with_an_upload_at_either_end_is_refused(agent_factory, upload_to, rename_to, after):
    """Session B renames its directory s (holding x.dcm) while session A uploads. Into-target: A writes t/x.dcm into
    a directory t that does not exist yet and B renames s to t; the rename was acknowledged, then A's close stored
    over t/x.dcm: B's file was gone under both names. Below-source: A writes s/sub/x.dcm and B renames s to u; A's
    commit then brought s back with the new file in it. The rename is refused while anything below its target or
    its source is being written (FTP 550, SFTP a failure; Windows and Samba refuse to rename a folder with a file
    open in it too); after A's close, s moves to a free name u and A's file is where it belongs."""
    agent = agent_factory().start()
    a, b = ftp(agent), ftp(agent)
    b.mkd("s")
    b.storbinary("STOR s/x.dcm", io.BytesIO(b"B" * 100))
    upload = open_upload(a, upload_to)
    rename_refused(b, "s", rename_to)
    asyncio.run(sftp_rename_refused(agent, "s", rename_to))
    upload.close()
    assert a.voidresp().startswith("226")
    b.rename("s", "u")
    assert "s" not in b.nlst("/")
    for path, data in after.items():
        assert get(b, path) == data


def test_a_path_ending_in_a_slash_names_a_directory(agent_factory):
    """`STOR new/` stored `new`, `SIZE f/` and SFTP stat('f/') answered for the file f: a path ending in '/'
    names a directory (POSIX), so a file is not found by it and none is created by it; directories still work."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR f.dcm", io.BytesIO(b"data"))
    for cmd in ("STOR new/", "APPE new/", "STOR f.dcm/"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            f.storbinary(cmd, io.BytesIO(b"x"))
    for cmd in ("SIZE f.dcm/", "MDTM f.dcm/", "DELE f.dcm/", "RETR f.dcm/", "RNFR f.dcm/"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            f.sendcmd(cmd)
    f.sendcmd("RNFR f.dcm")
    with pytest.raises(ftplib.error_perm, match="^550"):
        f.sendcmd("RNTO g.dcm/")
    f.mkd("d/")
    f.storbinary("STOR d/in.dcm", io.BytesIO(b"in"))
    assert f.nlst("d/") == ["in.dcm"]
    f.rename("d/", "e/")  # rename(2) takes a directory with a trailing slash
    listed: list[str] = []
    f.retrlines("LIST -la e/", listed.append)  # ls options before the path, as clients send them
    assert [line.split()[-1] for line in listed] == ["in.dcm"]
    f.cwd("e/")

    async def sftp_session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            for call in (sftp.stat("f.dcm/"), sftp.open("f.dcm/", "rb"), sftp.open("new/", "wb"),
                         sftp.remove("f.dcm/"), sftp.posix_rename("f.dcm", "h.dcm/")):
                with pytest.raises(asyncssh.SFTPError):
                    await call
            assert (await sftp.stat("e/")).type == asyncssh.FILEXFER_TYPE_DIRECTORY
            await sftp.mkdir("k/")
            assert sorted(await sftp.listdir("/")) == ["e", "f.dcm", "k"]

    asyncio.run(sftp_session())
    assert sorted(f.nlst("/")) == ["e", "f.dcm", "k"]


def test_rnto_must_follow_rnfr_at_once(agent_factory):
    """RFC 959: RNTO must come right after RNFR; any other command in between clears the RNFR (RNTO then
    gets 503). It was kept, so an RNTO long after (and after other commands) renamed the file."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR a.dcm", io.BytesIO(b"a"))
    for between in ("NOOP", "PWD", "SIZE a.dcm"):
        f.sendcmd("RNFR a.dcm")
        f.sendcmd(between)
        with pytest.raises(ftplib.error_perm, match="^503"):
            f.sendcmd("RNTO b.dcm")
    f.rename("a.dcm", "b.dcm")
    assert f.nlst() == ["b.dcm"]


def test_an_sftp_read_write_handle_reads_what_the_file_holds(agent_factory):
    """open('r+'): a PACS tool that patches a header reads it first. Reads on such a handle were refused
    ('file not opened for reading'); now they answer what the file holds, the bytes written so far included. A
    handle opened for writing only still refuses reads, and r+ needs the 'read' right like any read."""
    agent = agent_factory().start()

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("h.dcm", "wb") as f:
                await f.write(b"0123456789")
            async with sftp.open("h.dcm", "r+b") as f:
                assert await f.read(4) == b"0123"
                await f.write(b"AB", 2)
                await f.seek(0)
                assert await f.read() == b"01AB456789"
            async with sftp.open("h.dcm", "wb") as f:
                await f.write(b"new")
                with pytest.raises(asyncssh.SFTPError):
                    await f.read(1, 0)
            async with sftp.open("h.dcm", "rb") as f:
                assert await f.read() == b"new"
            async with sftp.open("h.dcm", "r+b") as f:  # read, nothing written: the stored file stays as it is
                assert await f.read() == b"new"

    asyncio.run(session())
    # each version stored was uploaded again (write-through waits for it): an r+ that only read re-stored the file
    assert len([e for e in agent.events("stored") if e["path"] == "h.dcm"]) == 3


def test_metrics_password_guessing_is_backed_off_and_banned(agent_factory):
    """http.metrics_listen with basic auth: wrong passwords were answered after one scrypt each, in one queue,
    with no backoff and no ban, so a guesser could try forever and held a right password up behind its guesses.
    Now the LoginGuard of the other listeners applies: after login.max_failures the guessing address is refused
    at once, without a password check (the right password too), while Prometheus's address still scrapes."""
    port = free_port()
    agent = agent_factory(**{"http.metrics_listen": f"127.0.0.1:{port}", "http.metrics_user": "prometheus",
                             "http.metrics_password_hash": hash_password(PASSWORD), "login.max_failures": 3,
                             "login.delay_seconds": 0.1, "login.max_delay_seconds": 0.2,
                             "login.ban_seconds": 3600}).start()

    def scrape(source: str, password: str, scheme: str = "Basic") -> tuple[int, float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        token = base64.b64encode(f"prometheus:{password}".encode()).decode()
        t0 = time.monotonic()
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"{scheme} {token}"})
            return conn.getresponse().status, time.monotonic() - t0
        finally:
            conn.close()

    assert scrape("127.0.0.1", PASSWORD)[0] == 200  # Prometheus: its address is known from now on
    for _ in range(3):
        assert scrape("127.0.0.2", "guess")[0] == 401
    assert scrape("127.0.0.2", PASSWORD)[0] == 401  # banned: not even the right password is checked
    with ThreadPoolExecutor(30) as pool:  # 30 guesses at once were 30 scrypts in one queue (~0.2 s each)
        guesses = list(pool.map(lambda _: scrape("127.0.0.2", "guess"), range(30)))
    assert {status for status, _ in guesses} == {401} and max(t for _, t in guesses) < 2.0
    status, took = scrape("127.0.0.1", PASSWORD, scheme="basic")  # not the header seen before: checked again
    assert status == 200 and took < 2.0
    assert [e["key"] for e in agent.events("login_ban") if e["scope"] == "address"] == ["127.0.0.2"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=("127.0.0.3", 0))
    for _ in range(300):  # no password at all, over one keep-alive: one event a minute, not one per request
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 401
        response.read()
    conn.close()
    assert len([e for e in agent.events("metrics_refused") if e["peer"] == "127.0.0.3"]) == 1


def test_a_banned_client_repeating_logins_fills_neither_the_journal_nor_the_audit_trail(agent_factory):
    """A banned address's login is refused without a password check, at once: each refusal was logged and audited,
    so a client pipelining USER/PASS pairs over one FTP connection (or basic-auth requests over one HTTP
    keep-alive) wrote thousands of events and audit records a second and rotated the audit trail away. Now one
    per address (or user) and minute, with how many were refused since; the metric counts every one."""
    agent = agent_factory(**{"login.max_failures": 2, "login.delay_seconds": 0.05, "login.max_delay_seconds": 0.1,
                             "login.ban_seconds": 3600}).start()
    for _ in range(2):
        with pytest.raises(ftplib.error_perm, match="530"):
            ftp(agent, password="wrong")
    with socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=60) as s:
        s.sendall(b"USER pacs\r\nPASS wrong\r\n" * 300)
        replies = b""
        while replies.count(b"\r\n530 ") + replies.startswith(b"530 ") < 300:
            data = s.recv(65536)
            assert data, replies[-300:]
            replies += data
    refused = [r for r in _audit(agent) if r["result"].startswith("refused:")]
    assert len(refused) == 1 and len(agent.events("login_refused")) == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=10) as r:
        counted = [line for line in r.read().decode().splitlines()
                   if line.startswith('pacsgw_login_refused_total{protocol="ftp",scope="address"}')]
    assert counted and float(counted[0].split()[-1]) == 300


def _audit(agent) -> list[dict]:
    path = agent.workdir / "cache" / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_path_commands_without_a_path_get_501(agent_factory):
    """`RMD`, `DELE`, `RNFR`, `SIZE`… with no argument acted on the current directory: a bare `RMD` removed the
    directory the session was in, `RNFR` + `RNTO x` renamed it. RFC 959 gives them a pathname: 501 now."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.mkd("d")
    f.cwd("d")
    for cmd in ("RMD", "DELE", "RNFR", "RNTO", "SIZE", "MDTM", "MKD", "RETR", "STOR", "APPE"):
        with pytest.raises(ftplib.error_perm, match="^501"):
            f.sendcmd(cmd)
    f.cwd("/")
    assert f.nlst() == ["d"]
