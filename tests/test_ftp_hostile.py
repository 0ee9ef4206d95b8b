"""The FTP front end against hostile and careless clients (issue 19): each test reproduces one attack or
mistake with a real client (ftplib or a raw socket) against a real agent and checks it is refused or handled."""

from __future__ import annotations

import ftplib
import io
import os

import pytest
from test_ftp import ftp, get

from harness import s3_objects, sha256


def test_rest_before_pasv_resumes_and_rest_past_end_is_refused(agent_factory):
    """REST 600, PASV, STOR resumes at byte 600 (it used to replace the file with the tail); REST beyond the
    end is refused with 554 for STOR and RETR and the file is left as it was."""
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
    with pytest.raises(ftplib.error_perm, match="501"):
        f.sendcmd("REST -5")
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["r.dcm"]["sha256"] == sha256(resumed)
