"""Small mends left by hardening round 48: each test reproduces one finding against real parts."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
import time
from collections.abc import Callable

import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import SMBResponseException
from smbutil import Smb
from structlog.testing import capture_logs
from test_attack21 import _evict
from test_ftp import ftp

from agent.serve import contract
from harness import PASSWORD


@pytest.mark.parametrize(("src", "dst", "old", "new"), [("ren.dcm", "ren2.dcm", "ren.dcm", "ren2.dcm"),
                                                        ("d", "e", "d/ren.dcm", "e/ren.dcm")])
def test_a_file_renamed_during_its_cold_read_is_fetched_once(proxied_agent, proxy, src, dst, old, new):
    """A reader began on a cold file, the file was renamed meanwhile and a second reader opened the new name: the
    object was fetched from S3 twice (`fetched ren.dcm`, then `fetched ren2.dcm`), the first copy thrown away as its
    row had moved. The fetch under way moves with its file: the new name's reader joins it and its copy lands there
    (a third read is a hit); so does a fetch below a directory renamed. A rename never gives a reader other bytes: the
    old name stored again reads its own."""
    agent = proxied_agent(**{"uplink.read_timeout": 30})  # the held answer is no timeout
    body, other = os.urandom(400_000), os.urandom(1000)
    f = ftp(agent)
    f.storbinary(f"STOR {old}", io.BytesIO(body))
    f.quit()
    agent.wait_drained(60)
    assert _evict(agent, old)[0] == 200

    def session() -> asyncssh.SSHClientConnection:  # awaited or entered
        return asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD, known_hosts=None)

    async def read(name: str) -> bytes:  # a session of its own: the open waits for the fetch's first bytes
        async with session() as conn, conn.start_sftp_client() as sftp, await sftp.open(name, "rb") as f:
            return await f.read()

    async def read_renamed() -> list[bytes]:
        async with session() as conn, conn.start_sftp_client() as sftp:

            async def until(done: Callable[[], bool]) -> None:
                for _ in range(40):
                    if done():
                        return
                    await asyncio.sleep(0.05)

            proxy.hold_replies_to, proxy.hold_replies_method = "/ren.dcm", "GET"  # the object's answer waits
            try:
                first = asyncio.ensure_future(read(old))
                await until(lambda: proxy.replies_held == 1)
                assert proxy.replies_held == 1
                await sftp.rename(src, dst)
                second = asyncio.ensure_future(read(new))
                await until(lambda: second.done() or proxy.replies_held > 1)  # a fetch of its own: done or held
            finally:
                proxy.hold_replies_to = ""
            return [await first, await second]

    assert asyncio.run(read_renamed()) == [body, body]
    f = ftp(agent)
    f.storbinary(f"STOR {old}", io.BytesIO(other))
    again, old_name = io.BytesIO(), io.BytesIO()
    f.retrbinary(f"RETR {new}", again.write)
    f.retrbinary(f"RETR {old}", old_name.write)
    f.quit()
    assert again.getvalue() == body and old_name.getvalue() == other
    time.sleep(0.5)
    assert [e["path"] for e in agent.events("fetched")] == [new]


def test_an_accept_out_of_descriptors_is_known_by_its_errno_not_asyncio_s_words():
    """contract's loop handler knew asyncio's failed accept by its message ("socket.accept() out of system
    resource"): reworded by a later Python, the client waiting in the backlog was left hanging and every retry an
    error. It is known by the context's exception now (EMFILE/ENFILE) and its listening socket. The context is built
    here (asyncio's, with other words: a Python that words it so is not at hand); the sockets are real."""
    loop = asyncio.new_event_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=5) as client, capture_logs() as logs:
        contract.watch_descriptors(loop)
        try:
            loop.call_exception_handler({"message": "accept() failed: out of resources", "socket": listener,
                                         "exception": OSError(errno.EMFILE, os.strerror(errno.EMFILE))})
        finally:
            loop.close()
            os.close(contract._spare.pop())
        assert client.recv(1) == b""  # accepted and closed: refused at once, not left in the backlog
    assert [e["event"] for e in logs] == ["descriptors_exhausted"]


def test_an_smb_read_over_the_user_s_reading_share_logs_its_refusal_once(smb_agent):
    """One SMB read of a file over the user's share of the files open for reading logged open_for_reading_limit
    twice (and counted two errors): the kernel's readahead of 128 KiB was refused, and the kernel read its first page
    again, a second open of the reader refused. That page's read is answered with the refusal it is part of now:
    logged once; once the other file is closed the file is read, and closed it leaves no reader behind."""
    agent = smb_agent(**{"cache.max_bytes": "10MB", "cache.max_open_for_reading_per_user": 0.25}).start(timeout=180)
    held_body, body = os.urandom(2 << 20), os.urandom(2 << 20)
    smb = Smb(agent)
    smb.write("held.dcm", held_body)
    smb.write("over.dcm", body)
    agent.wait_drained(60)
    with smbclient.open_file(smb.p("held.dcm"), mode="rb", **smb.kw) as held:
        assert held.read(1000) == held_body[:1000]  # 2 MiB of this user's 2.5 MB held
        with pytest.raises(SMBResponseException):
            smb.read("over.dcm")
    assert len(agent.events("open_for_reading_limit")) == 1
    assert smb.read("over.dcm") == body
    assert _evict(agent, "over.dcm") == (200, {"path": "over.dcm", "evicted": True})  # its readers all closed
    smb.close()
