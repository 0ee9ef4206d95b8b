"""A small cached copy rotten in place (size, mtime and inode kept, so only its digest can find it) that is the only
copy — acknowledged in write-back, not yet in S3 — is never served: the read ends in 451 with no byte of it, again on
the next read, and the loss is logged (docs/benchmarks.md §48 tried checking such a copy after FTP's 150; this is the
case that must not change whichever way it is checked). tests/test_integrity.py has the clean and the large cases."""

from __future__ import annotations

import ftplib
import io

import pytest
from test_integrity import ftp, rot_a_byte

from devstack import free_port
from faultkit import payload


def test_a_small_rotten_copy_not_yet_in_s3_is_an_error_not_bad_data(agent_factory):
    agent = agent_factory(**{"uplink.endpoint_url": f"http://127.0.0.1:{free_port()}"}).start()
    f = ftp(agent)
    f.storbinary("STOR only-here.dcm", io.BytesIO(payload("only", 50_000)))  # acknowledged as write-back
    rot_a_byte(agent, "only-here.dcm", 25_000)
    for _ in range(2):
        got = io.BytesIO()
        with pytest.raises(ftplib.error_temp, match="^451"):
            f.retrbinary("RETR only-here.dcm", got.write)
        assert got.getvalue() == b""
    assert [e["path"] for e in agent.events("cache_copy_lost")][:1] == ["only-here.dcm"]
    f.quit()
