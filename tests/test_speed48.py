"""A small cached copy is checked after the open (docs/benchmarks.md §48): FTP's 150 leaves before the copy is hashed,
the hash still comes before the first byte, and a copy that fails it is dropped and the reader gets the object's bytes,
as when it was checked at the open (tests/test_integrity.py has the protocols' cases).

A PROT P data connection holds the transfer between the 150 and the first byte until the client's TLS handshake, so
the order is seen without timing anything."""

from __future__ import annotations

import ftplib
import io
import sqlite3

import pytest
from test_integrity import ftp, rot_a_byte
from test_speed36 import _retr_to_150, _retrieved
from test_transport_security import ftps_session

from devstack import free_port
from faultkit import ftp_put, payload


def _blob(agent, path: str) -> str | None:
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        (blob,) = db.execute("SELECT blob FROM entries WHERE path = ?", (path,)).fetchone()
    finally:
        db.close()
    return blob


def test_a_small_copy_is_checked_after_the_150_and_before_its_first_byte(agent_factory, tmp_path):
    agent, f, _ = ftps_session(agent_factory, tmp_path)
    data = payload("speed48", 300_000)
    assert ftp_put(f, "CT/a.dcm", data).startswith("226")
    agent.wait_drained()  # in S3: a bad copy can be fetched again
    blob = _blob(agent, "CT/a.dcm")
    rot_a_byte(agent, "CT/a.dcm", 1000)  # size, mtime and inode kept: only the digest finds it
    raw = _retr_to_150(f, "CT/a.dcm")
    assert _blob(agent, "CT/a.dcm") == blob  # the 150 came before the check: the copy is still the catalog's
    with f.context.wrap_socket(raw, server_hostname=f.host, session=f.sock.session) as conn:
        got = b""
        while block := conn.recv(1 << 16):
            got += block
    assert got == data  # the object's bytes, not one of the bad copy's
    assert f.voidresp().startswith("226")
    assert _blob(agent, "CT/a.dcm") != blob
    [event] = agent.events("cache_copy_corrupt")
    assert (event["path"], event["problem"], event["found_by"]) == ("CT/a.dcm", "checksum mismatch", "open")
    [record] = _retrieved(agent, "CT/a.dcm")
    assert (record["result"], record["bytes"], record["cached"]) == ("ok", len(data), False)
    f.quit()


def test_a_small_copy_not_yet_in_s3_failing_its_check_is_an_error_not_bad_data(agent_factory):
    """The copy is the only one: no byte of it leaves, the read fails (451 after the 150), and so does the next."""
    agent = agent_factory(**{"uplink.endpoint_url": f"http://127.0.0.1:{free_port()}"}).start()
    f = ftp(agent)
    f.storbinary("STOR only-here.dcm", io.BytesIO(payload("only", 50_000)))  # acknowledged as write-back
    rot_a_byte(agent, "only-here.dcm", 25_000)
    for _ in range(2):
        got = io.BytesIO()
        with pytest.raises(ftplib.error_temp, match="^451"):
            f.retrbinary("RETR only-here.dcm", got.write)
        assert got.getvalue() == b""
    assert agent.events("cache_copy_lost")[0]["path"] == "only-here.dcm"
    f.quit()
