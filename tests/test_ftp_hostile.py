"""The FTP front end against hostile and careless clients (issue 19): each test reproduces one attack or
mistake with a real client (ftplib or a raw socket) against a real agent and checks it is refused or handled."""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import random
import socket
import ssl
import struct
import threading
import time

import psutil
import pytest
from test_config import GOOD
from test_ftp import ftp, get
from test_transport_security import ftps_session, make_ca_and_cert

from agent.config import ConfigError, load
from agent.store.paths import creatable_problem, name_problem
from faultkit import catalog_rows, reset_close
from faultkit import wait_for as poll
from harness import BUCKET, PASSWORD, s3_objects, sha256


def test_rest_before_pasv_resumes_and_rest_past_end_is_refused(agent_factory):
    """REST 600, PASV, STOR resumes at byte 600 (it used to replace the file with the tail); REST beyond the
    end is refused with 554 for STOR and RETR and the file is left as it was; a marker that is no byte offset
    gets 501 (a superscript digit or 5 000 digits raised inside int(): 451 internal error, a logged traceback)."""
    agent = agent_factory().start()
    f = ftp(agent)
    original = os.urandom(1000)
    f.storbinary("STOR r.dcm", io.BytesIO(original))
    f.voidcmd("TYPE I")
    assert f.sendcmd("REST 600").startswith("350")
    conn = f.transfercmd("STOR r.dcm")  # ftplib sends PASV here, after the REST
    conn.sendall(b"T" * 500)
    conn.close()
    assert f.voidresp().startswith("226")
    resumed = original[:600] + b"T" * 500
    assert get(f, "r.dcm") == resumed

    for cmd in ("STOR r.dcm", "RETR r.dcm", "APPE r.dcm"):
        f.sendcmd("REST 5000")
        if cmd.startswith("APPE"):  # APPE appends at the end whatever the marker said
            conn = f.transfercmd(cmd)
            conn.close()
            assert f.voidresp().startswith("226")
            continue
        with pytest.raises(ftplib.error_perm, match="554"):
            f.transfercmd(cmd)
    assert get(f, "r.dcm") == resumed  # the refused resumes changed nothing, and the marker was consumed
    for marker in ("-5", "\u00b2", "9" * 5000):  # a digit int() does not take, more digits than it takes: not 451
        with pytest.raises(ftplib.error_perm, match="501"):
            f.sendcmd(f"REST {marker}")
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["r.dcm"]["sha256"] == sha256(resumed)


# --- passive data connections: theft (item 2), pool exhaustion (item 7), leaks on 425 (item 5) ---------------

def port_range(n: int) -> tuple[int, int]:
    """n consecutive loopback ports free right now, for a passive range this test alone uses."""
    rng = random.Random()
    for _ in range(200):
        base, socks = rng.randint(40000, 60000 - n), []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base, base + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def stranger(port: int) -> socket.socket:
    """A connection to the passive port from another loopback address than the session's (127.0.0.1)."""
    s = socket.socket()
    s.settimeout(30)
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", port))
    return s


def dropped(s: socket.socket) -> bool:
    """The server closed the connection without a byte (a timeout here means it kept it: the old bug)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)


def wait_for(fn, timeout: float = 60.0):  # retries fn until it stops raising
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (ftplib.Error, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_stranger_on_the_passive_port_never_gets_or_gives_data(agent_factory):
    agent = agent_factory().start()
    f = ftp(agent)
    secret, genuine = os.urandom(300_000), os.urandom(200_000)
    f.storbinary("STOR secret.dcm", io.BytesIO(secret))
    f.voidcmd("TYPE I")

    # RETR: the stranger connects first; it is dropped, the session's own connection gets the file
    port = f.makepasv()[1]
    assert dropped(stranger(port))
    victim = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert f.sendcmd("RETR secret.dcm").startswith("150")
    with pytest.raises(ConnectionRefusedError):  # one connection accepted, then the listener is gone
        socket.create_connection(("127.0.0.1", port), timeout=30)
    assert recv_all(victim) == secret
    assert f.voidresp().startswith("226")

    # STOR: the stranger's bytes never land; the session's do
    port = f.makepasv()[1]
    thief = stranger(port)
    with contextlib.suppress(OSError):
        thief.sendall(b"forged body")
    assert dropped(thief)
    victim = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert f.sendcmd("STOR upload.dcm").startswith("150")
    victim.sendall(genuine)
    victim.close()
    assert f.voidresp().startswith("226")
    assert get(f, "upload.dcm") == genuine

    # ports are drawn at random from the range (they were handed out lowest first, and kept)
    assert len({f.makepasv()[1] for _ in range(8)}) > 1
    f.quit()
    refused = agent.events("data_connection_refused")  # once a minute per address (tests/test_attack15.py)
    assert len(refused) == 1 and refused[0]["peer"].startswith("127.0.0.2:")
    assert s3_objects(agent.store, agent.prefix)["upload.dcm"]["sha256"] == sha256(genuine)


def test_stranger_on_the_passive_port_with_tls_and_prot_p(agent_factory, tmp_path):
    agent, f, _ = ftps_session(agent_factory, tmp_path, **{"ftp.require_tls": True})
    secret = os.urandom(100_000)
    f.storbinary("STOR secret.dcm", io.BytesIO(secret))
    f.voidcmd("TYPE I")
    port = f.makepasv()[1]
    thief = ssl.create_default_context()
    thief.check_hostname, thief.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(OSError):  # dropped before any TLS handshake: no session of its own
        thief.wrap_socket(stranger(port)).recv(1)
    victim = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert f.sendcmd("RETR secret.dcm").startswith("150")
    assert recv_all(f.context.wrap_socket(victim, server_hostname="127.0.0.1", session=f.sock.session)) == secret
    assert f.voidresp().startswith("226")
    f.quit()
    assert agent.events("data_connection_refused")


def test_passive_ports_live_for_one_transfer_only(agent_factory):
    """Two idle sessions that have transferred once hold no port; an unused PASV holds one only for
    passive_timeout; with every port busy PASV answers 425 and the session goes on (it got 421 and was
    dropped)."""
    lo, hi = port_range(2)
    users = [{"name": name, "password": PASSWORD, "root": "/"} for name in ("pacs", "ct", "mr")]
    agent = agent_factory(users=users, **{"ftp.passive_ports": f"{lo}-{hi}", "ftp.passive_timeout": 2}).start()
    # one a user and address: each holds half the range (FtpServer.passive_share)
    idle = [ftp(agent, user, address=f"127.0.0.{i}") for i, user in ((2, "ct"), (3, "mr"))]
    for f in idle:
        assert f.nlst() == []
    third = ftp(agent)
    assert third.nlst() == []
    for f in idle:
        assert f.sendcmd("PASV").startswith("227")  # and never connect
    with pytest.raises(ftplib.error_temp, match="425 no free passive port"):
        third.sendcmd("PASV")
    assert third.sendcmd("NOOP").startswith("200")
    assert wait_for(third.nlst) == []  # the unused listeners closed after passive_timeout
    for f in (*idle, third):
        f.quit()
    assert agent.events("passive_ports_exhausted")


def test_a_transfer_without_data_connection_leaves_nothing_behind(agent_factory):
    """425 frees everything (a descriptor, a staging file and a write count leaked); so do ABOR and QUIT; and a
    SIGTERM then drains at once (it waited the whole drain)."""
    agent = agent_factory(**{"ftp.passive_timeout": 2}).start()
    f = ftp(agent)
    f.storbinary("STOR keep.dcm", io.BytesIO(b"kept"))
    staging = agent.workdir / "cache" / "staging"

    def held() -> list[str]:
        return [p.path for p in psutil.Process(agent.proc.pid).open_files() if "staging" in p.path]

    for cmd in ("STOR a.dcm", "APPE keep.dcm", "RETR keep.dcm", "LIST"):
        f.sendcmd("PASV")  # and never connect
        f.putcmd(cmd)
        with pytest.raises(ftplib.error_temp, match="425"):
            f.getresp()
        assert list(staging.iterdir()) == [] and held() == []
    with pytest.raises(ftplib.error_temp, match="425"):
        f.sendcmd("STOR b.dcm")  # no PASV at all
    f.sendcmd("PASV")
    f.putcmd("STOR e.dcm")  # waiting for its data connection: ABOR (aioftp's) cancels the transfer
    f.putcmd("ABOR")
    assert f.getmultiline().startswith("426") and f.getresp().startswith("226")
    f.sock.settimeout(10)
    for _ in range(10):  # and mid-upload, ABOR right behind the bytes: its cancellation was lost in 23 of 30
        conn = f.transfercmd("STOR e.dcm")  # tries (the read took the block), and the upload was then stored
        conn.sendall(b"x" * 1000)
        f.putcmd("ABOR")
        assert f.getmultiline().startswith("426") and f.getresp().startswith("226")
        conn.close()
    assert list(staging.iterdir()) == [] and held() == [] and "e.dcm" not in f.nlst()
    f.sendcmd("PASV")
    f.putcmd("STOR c.dcm")
    f.putcmd("QUIT")  # the transfer ends first (RFC 959): its 425 after ftp.passive_timeout, then 221
    assert f.getmultiline().startswith("425") and f.getmultiline().startswith("221")
    g = ftp(agent)
    g.sendcmd("PASV")
    g.putcmd("STOR d.dcm")  # still waiting for its data connection when the agent is stopped
    time.sleep(0.5)  # read by then (a NOOP would now wait for the STOR's reply: commands run one at a time)
    agent.stop()
    assert agent.events("stopped")[0]["drained"] is True
    assert list(staging.iterdir()) == []


def test_abor_of_a_listing_is_answered(agent_factory):
    """ABOR while a listing is being written: 426 then 226 (or 226 twice when the listing was done first).
    aioftp's write (asyncio.wait_for, Python 3.11) returned with the cancellation dropped, and the listing ended
    with its own 226 only: the ABOR was never answered and the client hung (5 of 10 tries, 10 of 20)."""
    agent = agent_factory().start()
    f = ftp(agent)
    n = 2000  # 560 KB of LIST lines: several writes, each one the ABOR can come during
    f.sock.sendall("".join(f"MKD {i:04d}{'x' * 230}\r\n" for i in range(n)).encode())
    assert all(f.getmultiline().startswith("257") for _ in range(n))
    f.sock.settimeout(10)
    for _ in range(10):
        data = f.transfercmd("LIST")

        def abort_at_the_first_bytes(data: socket.socket) -> None:
            data.recv(65536)
            f.sock.sendall(b"ABOR\r\n")
            with contextlib.suppress(OSError):
                while data.recv(65536):
                    pass

        reader = threading.Thread(target=abort_at_the_first_bytes, args=(data,))
        reader.start()
        replies = [f.getmultiline()[:3], f.getmultiline()[:3]]  # TimeoutError: one reply never came
        reader.join()
        data.close()
        assert replies in (["426", "226"], ["226", "226"])
    assert f.sendcmd("NOOP").startswith("200")


def test_a_command_line_without_end_is_answered_then_closed(agent_factory):
    """A command line longer than the reader's limit (64 KiB) with no line end ends the session with 500 and a
    logged reason (it was closed without a word)."""
    agent = agent_factory().start()
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    assert s.recv(1024).startswith(b"220")
    with contextlib.suppress(OSError):  # the agent may close before it has read all of it
        s.sendall(b"USER " + b"a" * 100_000)
    assert s.recv(1024).startswith(b"500 command line too long")
    s.close()
    assert agent.events("ftp_session_closed")[0]["reason"] == "command line too long"


def line(s: socket.socket) -> bytes:
    """One reply line, read a byte at a time: nothing after it (a TLS handshake) is taken off the socket."""
    got = b""
    while not got.endswith(b"\r\n"):
        got += s.recv(1) or b"\r\n"
    return got


def test_a_connection_that_never_logs_in_goes_after_login_timeout(agent_factory):
    """A connection that has not logged in within ftp.login_timeout gets 421 and is closed, whatever it sends
    meanwhile, and its slot of the address cap is free again (it held it for the 600 s idle timeout); a
    logged-in session stays."""
    agent = agent_factory(**{"ftp.login_timeout": 2, "ftp.max_sessions_per_address": 2}).start()
    f = ftp(agent)
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    assert line(s).startswith(b"220")
    for command, reply in ((b"USER pacs", b"331"), (b"NOOP", b"200")):  # busy, but no login
        s.sendall(command + b"\r\n")
        assert line(s).startswith(reply)
        time.sleep(0.5)
    assert recv_all(s).startswith(b"421 no login in time")
    wait_for(lambda: ftp(agent).quit())  # the address has its slot back (cap 2: f and this one)
    assert f.sendcmd("NOOP").startswith("200")  # logged in longer than login_timeout, and still served
    f.quit()
    assert agent.events("ftp_session_closed")[0]["reason"] == "no login within login_timeout"


def test_commands_pipelined_behind_auth_tls_are_dropped(agent_factory, tmp_path):
    """STARTTLS command injection (CVE-2011-0411): commands sent in clear in the same packet as AUTH TLS ran,
    before the handshake or after it as if they had come protected. They are dropped: the session is not
    logged in after the handshake, and logs in over TLS as usual."""
    ca, cert, key = make_ca_and_cert(tmp_path)
    agent = agent_factory(**{"ftp.tls_cert": str(cert), "ftp.tls_key": str(key)}).start()
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    assert line(s).startswith(b"220")
    s.sendall(f"AUTH TLS\r\nUSER pacs\r\nPASS {PASSWORD}\r\nMKD injected\r\n".encode())
    assert line(s).startswith(b"234")
    tls = ssl.create_default_context(cafile=str(ca)).wrap_socket(s, server_hostname="127.0.0.1")
    tls.sendall(b"PWD\r\n")
    assert line(tls).startswith(b"503 bad sequence of commands (not logged in)")
    for command, reply in ((b"USER pacs", b"331"), (f"PASS {PASSWORD}".encode(), b"230")):
        tls.sendall(command + b"\r\n")
        assert line(tls).startswith(reply)
    tls.close()
    assert [e["bytes"] for e in agent.events("ftp_pipelined_before_tls_dropped")] == [len(PASSWORD) + 32]
    f = ftp(agent)
    assert f.nlst() == []  # the injected MKD never ran
    f.quit()


def test_session_caps_per_address_and_per_user(agent_factory):
    agent = agent_factory(**{"ftp.max_sessions_per_address": 3, "ftp.max_sessions_per_user": 2},
                          users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                                 {"name": "viewer", "password": PASSWORD, "root": "/"}]).start()
    a, b, v = ftp(agent), ftp(agent), ftp(agent, "viewer")
    with pytest.raises(ftplib.error_temp, match="421 too many sessions from your address"):
        ftplib.FTP(timeout=30).connect("127.0.0.1", agent.ftp_port)
    v.quit()

    def third_pacs() -> ftplib.FTP:
        c = ftplib.FTP(timeout=30)
        c.connect("127.0.0.1", agent.ftp_port)
        return c

    c = wait_for(third_pacs)  # once the server has counted v out
    with pytest.raises(ftplib.error_temp, match="421 too many sessions for this user"):
        c.login("pacs", PASSWORD)
    other = ftplib.FTP(timeout=30, source_address=("127.0.0.2", 0))  # the address cap is per address
    other.connect("127.0.0.1", agent.ftp_port)
    other.login("viewer", PASSWORD)
    other.quit()
    a.quit()
    wait_for(lambda: ftp(agent).quit())  # a slot of pacs is free again
    b.quit()
    assert len(agent.events("session_refused")) >= 2


def test_connections_over_a_cap_are_counted_each_but_logged_and_audited_once(agent_factory):
    """A client opening connections over its address cap as fast as it can: each got its 421 and was counted,
    and each also wrote a session_refused event and an audit record, filling the journal and rotating the audit
    trail (the client's own earlier records too) away. Now one event and one record per reason a minute."""
    from test_audit import audit_records
    from test_startups_hostile import metric
    agent = agent_factory(**{"ftp.max_sessions_per_address": 2}).start()
    held = [ftp(agent), ftp(agent)]
    for _ in range(40):
        with pytest.raises(ftplib.error_temp, match="421 too many sessions from your address"):
            ftplib.FTP(timeout=30).connect("127.0.0.1", agent.ftp_port)
    assert metric(agent, "ftp", "SessionLimit") == 40
    assert len(agent.events("session_refused")) == 1
    assert len([r for r in audit_records(agent) if "too many sessions" in r["result"]]) == 1
    for f in held:
        f.quit()


# --- names: S3 keys with control characters (item 10), RFC 2428 / 959 details and Windows names (item 13) ------

def test_s3_keys_with_control_characters_never_forge_listing_lines(agent_factory):
    agent = agent_factory()
    s3 = agent.store.client()
    evil = ["evil\r\n226 forged reply.dcm", "esc\x1b[2Jcleared.dcm", "nl\nname.dcm"]
    for name in ["fine.dcm", *evil]:  # written by another S3 client, before the agent first lists ext/
        s3.put_object(Bucket=BUCKET, Key=f"{agent.prefix}ext/{name}", Body=b"x")
    agent.start()
    f = ftp(agent)
    assert f.nlst("ext") == ["fine.dcm"]
    lines: list[str] = []
    f.retrlines("LIST ext", lines.append)
    assert len(lines) == 1 and lines[0].endswith(" fine.dcm")
    assert [name for name, _ in f.mlsd("ext")] == ["fine.dcm"]
    assert f.sendcmd("NOOP").startswith("200")  # no forged reply is waiting on the control connection
    f.quit()
    hidden = agent.events("listing_name_hidden")
    assert {e["name"] for e in hidden if e["directory"].endswith("ext")} == {repr(n) for n in evil}


def test_epsv_all_and_epsv_with_a_protocol_keep_the_session(agent_factory):
    agent = agent_factory().start()
    f = ftp(agent)
    with pytest.raises(ftplib.error_perm, match=r"522 .*\(1\)"):
        f.sendcmd("EPSV 2")  # IPv6 asked on an IPv4 connection: RFC 2428 names the usable one
    with pytest.raises(ftplib.error_perm, match="501"):
        f.sendcmd("EPSV x")
    assert f.sendcmd("EPSV 1").startswith("229")
    assert f.sendcmd("EPSV ALL").startswith("200")
    with pytest.raises(ftplib.error_perm, match="503"):
        f.sendcmd("PASV")  # refused after EPSV ALL
    port = ftplib.parse229(f.sendcmd("EPSV"), ("127.0.0.1", agent.ftp_port))[1]
    data = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert f.sendcmd("NLST").startswith("150")
    assert recv_all(data) == b""
    assert f.voidresp().startswith("226")
    assert f.sendcmd("NOOP").startswith("200")
    f.quit()


def test_quotes_trailing_spaces_and_windows_names(agent_factory):
    agent = agent_factory().start()
    agent.store.client().put_object(Bucket=BUCKET, Key=agent.prefix + 'a"b/x.dcm', Body=b"x")  # another S3 client's
    f = ftp(agent)
    with pytest.raises(ftplib.error_perm, match="553"):
        f.mkd('c"d')  # Windows (SMB) clients could not use it
    f.cwd('a"b')
    assert f.sendcmd("PWD").startswith('257 "/a""b"') and f.pwd() == '/a"b'
    f.cwd("/")
    f.storbinary("STOR ok.dcm", io.BytesIO(b"ok"))
    for bad in ("CON", "aux", "con.txt", "LPT1.dcm", "x.", "x ", "dir./y.dcm"):
        with pytest.raises(ftplib.error_perm, match="553"):
            f.storbinary(f"STOR {bad}", io.BytesIO(b"x"))
        with pytest.raises(ftplib.error_perm, match="553"):
            f.mkd(bad)
        with pytest.raises(ftplib.error_perm, match="553"):
            f.rename("ok.dcm", bad)
    with pytest.raises(ftplib.error_perm, match="550"):
        get(f, "ok.dcm ")  # the trailing space is part of the name, not stripped into "ok.dcm"
    assert sorted(f.nlst()) == ['a"b', "ok.dcm"]
    f.quit()
    agent.wait_drained()
    assert set(s3_objects(agent.store, agent.prefix)) == {"ok.dcm", 'a"b/x.dcm'}


@pytest.mark.parametrize("section,key,value", [
    ("ftp", "max_sessions_per_user", "0"), ("ftp", "max_sessions_per_address", "-1"),
    ("ftp", "max_sessions_per_address", '"many"'), ("ftp", "passive_timeout", "0"),
    ("sftp", "max_sessions_per_user", "0"), ("sftp", "max_sessions_per_address", "10001"),
    ("sftp", "max_sessions_per_address", '"many"'), ("ftp", "max_unauthenticated", "0"),
    ("sftp", "max_unauthenticated", "100001")])
def test_session_limit_keys_are_checked(tmp_path, section, key, value):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.replace("[[users]]", f"[{section}]\n{key} = {value}\n[[users]]", 1))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == f"{section}.{key}" and str(path) in str(err.value)
    path.write_text(GOOD)
    cfg = load(path)  # the documented defaults, the same for FTP and SFTP
    assert (cfg.ftp.max_sessions_per_user, cfg.ftp.max_sessions_per_address, cfg.ftp.passive_timeout) == (32, 64, 30)
    assert (cfg.sftp.max_sessions_per_user, cfg.sftp.max_sessions_per_address) == (32, 64)
    assert cfg.ftp.max_unauthenticated == cfg.sftp.max_unauthenticated == 256


def test_creatable_and_listable_names():
    """The pure name rules in agent.store.paths that every front end can use."""
    for name in ("CON", "aux", "Nul.txt", "com1", "LPT9.tar.gz", "a.", "a ", "..."):
        assert creatable_problem(name), name
    for name in ("COM10", "console", "a.dcm", "CON_x", ".hidden", "a b"):
        assert creatable_problem(name) is None, name
    for name in ("a\rb", "a\nb", "\x1b[2J", "a\x7fb", "a\x85b"):
        assert name_problem(name), repr(name)
    assert name_problem("études ünd 医学.dcm") is None


def test_quit_behind_a_transfer_lets_it_finish(agent_factory):
    """RFC 959: QUIT while a transfer is in progress keeps the connection open for the transfer's reply, then
    closes it. A QUIT pipelined behind STOR ran at once: 221, the session ended and the upload being sent was
    discarded (never a 226, the client's file lost). Now the STOR ends first (226, stored), then 221."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.sock.settimeout(30)
    for i in range(3):
        g = ftp(agent) if i else f
        host, port = ftplib.parse227(g.sendcmd("PASV"))
        g.sock.sendall(f"STOR q{i}.dcm\r\nQUIT\r\n".encode())  # a client that pipelines its last commands
        data = socket.create_connection((host, port), timeout=30)
        assert g.getresp().startswith("150")
        data.sendall(b"q" * 300_000)
        data.close()
        assert [g.getresp()[:3], g.getresp()[:3]] == ["226", "221"]
        assert g.sock.recv(10) == b""  # and then the connection closes
    h = ftp(agent)
    assert sorted(h.nlst()) == ["q0.dcm", "q1.dcm", "q2.dcm"]
    assert get(h, "q2.dcm") == b"q" * 300_000


def test_pipelined_logins_take_one_user_slot(agent_factory):
    """PASS commands pipelined in one session ran side by side: each passed the 'already logged in' check while the
    first was still checking its password, each took a slot of ftp.max_sessions_per_user and only the last was
    kept. The others were never given back: two such sessions locked the user out until the agent restarted."""
    agent = agent_factory(**{"ftp.max_sessions_per_user": 2}).start()
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
        s.sendall(b"USER pacs\r\n" + f"PASS {PASSWORD}\r\n".encode() * 3 + b"QUIT\r\n")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        s.close()
        assert got.count(b"230 ") == 1 and got.count(b"503 already logged in") == 2 and b"221 " in got, got
    wait_for(lambda: [ftp(agent), ftp(agent)])  # both slots free again


def test_pipelined_commands_run_one_at_a_time_in_order(agent_factory):
    """Commands sent without waiting for replies ran side by side: RNTO ran before its RNFR had set the name (503),
    RMD before the MKD it follows (550), DELE before the rename, and the replies came out of order (NOOP's 200 before
    MKD's 257), so a client pairing replies with its commands took one result for another. A pipelined RNFR a,
    RNTO b, RNFR c, RNTO d could rename c to b. Each command now ends before the next is read; ABOR still runs
    beside a transfer."""
    agent = agent_factory().start()
    f = ftp(agent)
    for name in ("a.dcm", "c.dcm"):
        f.storbinary(f"STOR {name}", io.BytesIO(name.encode()))
    s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
    cmds = ["USER pacs", f"PASS {PASSWORD}", "MKD d1", "NOOP", "RNFR a.dcm", "RNTO b.dcm", "RNFR c.dcm", "RNTO d.dcm",
            "SIZE b.dcm", "DELE d.dcm", "MKD d2", "RMD d2", "PWD", "QUIT"]
    s.sendall("".join(f"{c}\r\n" for c in cmds).encode())
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    s.close()
    assert [line[:3] for line in got.decode().splitlines()] == [
        "220", "331", "230", "257", "200", "350", "250", "350", "250", "213", "250", "257", "250", "257", "221"], got
    assert sorted(f.nlst()) == ["b.dcm", "d1"] and get(f, "b.dcm") == b"a.dcm"


def test_connections_reset_during_login_give_their_user_slot_back(agent_factory):
    """A connection reset while its PASS was taking a slot of ftp.max_sessions_per_user: the session's end cancelled
    the PASS, the slot was taken all the same on the guard's thread, and nobody gave it back. A client whose logins
    get cut (a reconnect storm, a hostile client with the password) locked the user out until the agent restarted."""
    agent = agent_factory(**{"ftp.max_sessions_per_user": 2}).start()
    started = time.monotonic()
    ftp(agent).quit()
    login = time.monotonic() - started
    rng = random.Random(7)
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
        s.recv(100)
        s.sendall(f"USER pacs\r\nPASS {PASSWORD}\r\n".encode())
        time.sleep(rng.uniform(0, login * 1.2))  # the reset lands somewhere in the login
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    sessions = wait_for(lambda: [ftp(agent), ftp(agent)])  # both slots free again
    for f in sessions:
        f.quit()


def test_retr_cut_while_the_file_is_opened_leaks_no_descriptor(agent_factory):
    """A RETR whose session ends while the gateway opens the file in a thread (a copy not in the page cache, or
    one that needs its full SHA-256 check): the session's end cancelled the wait, the thread opened the file all
    the same and nobody closed it. Each such cut leaked a descriptor until the agent ran out of them."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR big.dcm", io.BytesIO(os.urandom(32 * 1024 * 1024)))
    f.quit()
    (blob,), = catalog_rows(agent, "SELECT blob FROM entries WHERE path = 'big.dcm'")
    copy = agent.workdir / "cache" / "data" / blob[:2] / blob
    proc = psutil.Process(agent.proc.pid)

    def unchecked() -> None:
        """The copy's stamp no longer matches (a new mtime) and it is out of the page cache: opening it takes a
        full SHA-256 pass from the disk, in a thread."""
        st = os.stat(copy)
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        fd = os.open(copy, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def retr_cut(delay: float) -> None:
        s = socket.create_connection(("127.0.0.1", agent.ftp_port), timeout=30)
        reader = s.makefile("rb")
        reader.readline()
        s.sendall(f"USER pacs\r\nPASS {PASSWORD}\r\nTYPE I\r\nEPSV\r\n".encode())
        while not (reply := reader.readline()).startswith(b"229"):
            assert reply[:1] in (b"2", b"3"), reply
        data = socket.create_connection(("127.0.0.1", int(reply.split(b"|")[3])), timeout=30)
        s.sendall(b"RETR big.dcm\r\n")
        time.sleep(delay)  # the session ends while the file is being opened and checked
        reset_close(s)
        data.close()

    def open_on_the_copy() -> int:
        """Descriptors of the agent on the cached copy once the cut sessions have ended and their threads too."""
        poll(lambda: not [c for c in proc.net_connections("tcp") if c.laddr.port == agent.ftp_port
                          and c.status == psutil.CONN_ESTABLISHED], 60, what="the cut sessions to end")
        time.sleep(1)
        return sum(1 for link in os.listdir(f"/proc/{proc.pid}/fd")
                   if os.path.realpath(f"/proc/{proc.pid}/fd/{link}") == str(copy.resolve()))

    def timed_get() -> float:
        f, started = ftp(agent), time.monotonic()
        assert len(get(f, "big.dcm")) == 32 * 1024 * 1024
        f.quit()
        return time.monotonic() - started

    unchecked()
    opening = timed_get()  # about how long an unchecked open takes
    rng = random.Random(4)
    for _ in range(30):
        unchecked()
        retr_cut(rng.uniform(0.005, max(opening, 0.05)))
    assert open_on_the_copy() == 0
    unchecked()
    timed_get()


def _ftps_store_ending_in_a_bare_fin(agent_factory, tmp_path, name: str, data: bytes, **settings):
    """An FTPS agent (PROT P), and a STOR of data whose TLS data connection ends in a TCP FIN without
    close_notify (ssl.SSLSocket.shutdown; unwrap() would send it) → (the agent, the session awaiting the reply)."""
    agent, f, _ = ftps_session(agent_factory, tmp_path, **settings)
    f.voidcmd("TYPE I")
    conn = f.transfercmd(f"STOR {name}")
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    # Read to the agent's close before closing: what the agent sent unread here (TLS 1.3 session tickets) would
    # turn the close into a TCP RST, a connection reset rather than the bare FIN under test.
    conn.settimeout(30)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass
    conn.close()
    return agent, f


def test_ftps_upload_cut_without_close_notify_is_not_stored(agent_factory, tmp_path):
    """An FTPS upload's end is the client's TLS close_notify (RFC 4217 section 9, as vsftpd's strict_ssl_read_eof):
    a data connection whose TCP stream ends without one was cut (an attacker's forged FIN truncates the file, a
    client died mid-send) and is answered 426, nothing stored. It used to be taken for the file's end: 226 and
    the first part of the file stored as the whole."""
    whole = os.urandom(300_000)
    agent, f = _ftps_store_ending_in_a_bare_fin(agent_factory, tmp_path, "cut.dcm", whole[:100_000])
    with pytest.raises(ftplib.error_temp, match="426"):
        f.voidresp()
    assert "cut.dcm" not in f.nlst()
    assert agent.events("upload_aborted") and any("close_notify" in e.get("reason", "")
                                                  for e in agent.events("ftp_error"))
    assert f.storbinary("STOR whole.dcm", io.BytesIO(whole)).startswith("226")  # ftplib ends with unwrap()
    f.quit()
    agent.wait_drained()
    objects = s3_objects(agent.store, agent.prefix)
    assert "cut.dcm" not in objects and objects["whole.dcm"]["sha256"] == sha256(whole)


def test_ftps_uploads_without_close_notify_are_taken_when_the_admin_allows_it(agent_factory, tmp_path):
    """Some FTPS clients never send close_notify (vsftpd leaves strict_ssl_read_eof off for them):
    `ftp.tls_close_notify = false` takes the end of their TCP stream for the end of the file, as before."""
    data = os.urandom(100_000)
    agent, f = _ftps_store_ending_in_a_bare_fin(agent_factory, tmp_path, "bare-fin.dcm", data,
                                                **{"ftp.tls_close_notify": False})
    assert f.voidresp().startswith("226")
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["bare-fin.dcm"]["sha256"] == sha256(data)
