"""A cached FTP RETR's audit record (docs/benchmarks.md §42): written after the 150, off the way to the first byte,
and still before the 226; on a transfer that ends otherwise, before its reply, as when it was written at the open.

A PROT P data connection holds the transfer between the 150 and the first byte until the client's TLS handshake, so
the order is seen without timing anything."""

from __future__ import annotations

import ftplib
import socket

from test_audit import audit_records
from test_transport_security import ftps_session

from faultkit import ftp_put, payload


def _retrieved(agent, path: str) -> list[dict]:
    return [r for r in audit_records(agent) if r["op"] == "retrieve" and r["path"] == path]


def _retr_to_150(f: ftplib.FTP_TLS, path: str, rest: int | None = None) -> socket.socket:
    """PASV, the data connection in clear (no TLS handshake yet), RETR → the data socket, once the 150 came."""
    host, port = ftplib.parse227(f.sendcmd("PASV"))
    raw = socket.create_connection((host, port), 30)
    if rest is not None:
        f.sendcmd(f"REST {rest}")
    f.putcmd(f"RETR {path}")
    if not (reply := f.getresp()).startswith("150"):
        raw.close()
        raise ftplib.error_reply(reply)
    return raw


def test_the_retrieve_record_comes_after_the_150_and_before_the_226(agent_factory, tmp_path):
    agent, f, _ = ftps_session(agent_factory, tmp_path)
    data = payload("speed36", 300_000)
    assert ftp_put(f, "CT/a.dcm", data).startswith("226")
    raw = _retr_to_150(f, "CT/a.dcm")
    assert _retrieved(agent, "CT/a.dcm") == []  # the 150 left before the record: the agent waits for the handshake
    with f.context.wrap_socket(raw, server_hostname=f.host, session=f.sock.session) as conn:
        got = b""
        while block := conn.recv(1 << 16):
            got += block
    assert got == data
    assert f.voidresp().startswith("226")
    [record] = _retrieved(agent, "CT/a.dcm")
    assert (record["result"], record["bytes"], record["cached"], record["protocol"]) == ("ok", len(data), True, "ftps")
    f.quit()


def test_a_retr_ended_without_its_bytes_is_audited_before_its_reply(agent_factory, tmp_path):
    """A data connection gone before its TLS handshake (425 after the 150) and a REST past the end (554, no 150):
    each open is recorded once, before the reply, as it was at the open."""
    agent, f, _ = ftps_session(agent_factory, tmp_path)
    assert ftp_put(f, "CT/b.dcm", payload("b", 100_000)).startswith("226")
    _retr_to_150(f, "CT/b.dcm").close()
    try:
        f.voidresp()
        raise AssertionError("the transfer was answered as complete")
    except ftplib.error_temp as e:
        assert str(e).startswith("425")
    [record] = _retrieved(agent, "CT/b.dcm")
    assert (record["result"], record["bytes"]) == ("ok", 100_000)
    try:
        _retr_to_150(f, "CT/b.dcm", rest=100_001)
        raise AssertionError("no 554")
    except ftplib.error_perm as e:
        assert str(e).startswith("554")
    assert len(_retrieved(agent, "CT/b.dcm")) == 2
    f.quit()
