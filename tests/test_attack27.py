"""Attacks on a running agent (round 27): hostile clients against real listeners (ftplib, asyncssh). Each test
reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import asyncio
import ftplib
import io
import json
import socket
import ssl
import threading

import asyncssh
import pytest
from test_transport_security import ftps_session

from faultkit import ftp_get, ftp_login, ftp_put, payload, sftp_session
from harness import PASSWORD

MiB = 1024 * 1024
VIEWER = {"name": "viewer", "password": PASSWORD, "root": "/"}


def test_one_reader_cannot_hold_every_file_open_for_reading(agent_factory):
    """max_open_for_reading was one count for every user: a viewer's account opening files over SFTP and never
    closing them held all of it (here 75 % of 10 MB), and every open of the PACS was refused (FTP 451) until the
    viewer let go. One user now holds at most max_open_for_reading_per_user (25 %): the PACS still reads."""
    agent = agent_factory(**{"cache.max_bytes": "10MB"},
                          users=[{"name": "pacs", "password": PASSWORD, "root": "/"}, VIEWER]).start()
    f = ftp_login(agent)
    for i in range(8):
        ftp_put(f, f"r/{i}.dcm", payload(i, MiB))

    async def hoard() -> tuple[int, str]:
        async with sftp_session(agent, user="viewer") as sftp:
            held = []
            try:
                for i in range(7):
                    held.append(await sftp.open(f"r/{i}.dcm", "rb"))
            except asyncssh.SFTPFailure as e:
                refused = str(e)
            else:
                refused = ""
            data = await asyncio.to_thread(ftp_get, f, "r/7.dcm")  # before: 451 files open for reading …
            assert data == payload(7, MiB)
            return len(held), refused

    held, refused = asyncio.run(hoard())
    assert held == 2 and "this user's files open for reading" in refused
    f.quit()


def test_a_login_name_cannot_split_or_reverse_an_audit_record(agent_factory):
    """A failed FTP login's user name went into the audit trail as sent but for C0 controls: a line separator
    (U+2028) or NEL (U+0085, a C1 control) cut the record in two for a reader splitting lines (Python's
    splitlines, as these tests read the trail), and a U+202E showed the rest of the line reversed on a terminal.
    They are written as JSON escapes now, as in the operational log; the record still says the name as sent."""
    agent = agent_factory().start()
    name = "x\u2028{}\x85y\u202e"
    f = ftplib.FTP()
    f.encoding = "utf-8"
    f.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm, match="^530"):
        f.login(name, "wrong")
    f.close()
    trail = (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text()
    records = [json.loads(line) for line in trail.splitlines()]  # before: JSONDecodeError at the cut
    assert [r["user"] for r in records if r["op"] == "login"] == [name]
    assert trail.isascii()


def _take(port: int, client: ftplib.FTP_TLS, session: ssl.SSLSession | None, got: list[bytes]) -> None:
    """Another client of the same address on a session's passive port first, with a TLS handshake of its own
    (resuming `session`, one of its own), then reading what comes."""
    data = b""
    try:
        with client.context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                        server_hostname="127.0.0.1", session=session) as s:
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        pass
    got.append(data)


def test_another_client_of_the_address_cannot_take_a_protected_data_connection(agent_factory, tmp_path):
    """PROT P data connections were checked only for their address: another client of it (a NAT's other modality,
    another process of the PACS host) connecting to the session's passive port first, with a TLS handshake of its
    own, was sent the RETR's file (a STOR would have stored its bytes under the session's user). A data connection
    must now resume the control connection's TLS session, which only its client holds (vsftpd's
    require_ssl_reuse): a fresh handshake, or one resuming a session of the thief's own control connection (AUTH
    TLS needs no login), gets nothing and the transfer 425; the session's own client resumes and is served."""
    agent, f, ca = ftps_session(agent_factory, tmp_path, **{"ftp.require_tls": True})
    secret = b"patient" * 10_000
    f.storbinary("STOR secret.dcm", io.BytesIO(secret))
    thief = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    thief.connect("127.0.0.1", agent.ftp_port)
    thief.auth()
    thief.voidcmd("NOOP")  # its session's tickets are read
    f.voidcmd("TYPE I")
    for session in (None, thief.sock.session):
        port = int(f.sendcmd("EPSV").split("|")[3])
        got: list[bytes] = []
        taking = threading.Thread(target=_take, args=(port, thief, session, got))
        taking.start()
        with pytest.raises(ftplib.error_temp, match="^425 .*resume"):
            f.sendcmd("RETR secret.dcm")
            f.voidresp()  # before: 226, the file sent to the thief
        taking.join(30)
        assert got == [b""]
    buf = io.BytesIO()
    f.retrbinary("RETR secret.dcm", buf.write)
    assert buf.getvalue() == secret
    f.quit()
    thief.close()
