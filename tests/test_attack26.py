"""Attacks on a running agent (round 26): hostile clients against real listeners (ftplib, asyncssh). Each test
reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import ftplib
import io

import pytest
from test_ftp import ftp, get


def _attempt(f: ftplib.FTP, command: str) -> None:
    """A transfer command that the agent refuses (or, LIST, serves) without using a REST marker."""
    try:
        f.retrlines(command, lambda _: None)
    except ftplib.error_perm:
        pass


@pytest.mark.parametrize("command", ["RETR ../../etc/passwd", "STOR sub/", "RETR", "LIST"])
def test_a_rest_marker_goes_with_the_transfer_command_after_it(agent_factory, command):
    """REST, then a transfer command refused before it ran (a path outside the root, a file named as a directory,
    no path) or a listing (which has no use for it): the marker stayed for the next transfer, so a plain STOR over a
    file kept the old file's head under the new bytes, and a plain RETR sent the file short, each answered 226."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR v.dcm", io.BytesIO(b"A" * 5000))
    f.sendcmd("REST 1000")
    _attempt(f, command)
    f.storbinary("STOR v.dcm", io.BytesIO(b"B" * 500))  # before: 1 500 bytes, A * 1000 + B * 500
    f.sendcmd("REST 100")
    _attempt(f, command)
    assert get(f, "v.dcm") == b"B" * 500  # before: 400 bytes
    f.quit()
