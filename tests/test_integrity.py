"""A flipped bit on the SSD is never served: cached copies are verified before every read."""

from __future__ import annotations

import ftplib
import io
import os
import sqlite3

import pytest

from agent.devstack import free_port
from conftest import PASSWORD


def ftp(agent) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    return f


def flip_a_byte(agent, path: str) -> None:
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    (blob,) = db.execute("SELECT blob FROM entries WHERE path = ?", (path,)).fetchone()
    db.close()
    blob_path = agent.workdir / "cache" / "data" / blob[:2] / blob
    raw = bytearray(blob_path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob_path.write_bytes(bytes(raw))


def test_corrupt_clean_copy_is_fetched_again(agent_factory):
    agent = agent_factory().start()
    data = os.urandom(100_000)
    f = ftp(agent)
    f.storbinary("STOR CT/a.dcm", io.BytesIO(data))
    agent.wait_drained()
    flip_a_byte(agent, "CT/a.dcm")
    buf = io.BytesIO()
    f.retrbinary("RETR CT/a.dcm", buf.write)
    assert buf.getvalue() == data  # the right bytes, from S3
    [event] = agent.events("cache_copy_corrupt")
    assert event["path"] == "CT/a.dcm" and event["problem"] == "checksum mismatch"
    assert [e["path"] for e in agent.events("fetched")] == ["CT/a.dcm"]
    buf = io.BytesIO()
    f.retrbinary("RETR CT/a.dcm", buf.write)  # the re-fetched copy is good and cached again
    assert buf.getvalue() == data and len(agent.events("fetched")) == 1
    f.quit()


def test_corrupt_copy_not_yet_in_s3_is_an_error_not_bad_data(agent_factory):
    agent = agent_factory(**{"uplink.endpoint_url": f"http://127.0.0.1:{free_port()}"}).start()
    f = ftp(agent)
    f.storbinary("STOR only-here.dcm", io.BytesIO(os.urandom(50_000)))  # acknowledged as write-back
    flip_a_byte(agent, "only-here.dcm")
    with pytest.raises(ftplib.error_temp, match="451"):
        f.retrbinary("RETR only-here.dcm", io.BytesIO().write)
    assert agent.events("cache_copy_lost")[0]["path"] == "only-here.dcm"
    f.quit()
