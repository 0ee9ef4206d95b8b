"""One write-capable account holding the cache disk with uploads it never finishes (harden4), against a live
agent with real clients: files opened for write, written, never closed. Their staging bytes stay on the disk,
clean files were evicted for them, and then every other user's store failed "disk full". Now one user's
unfinished uploads hold at most cache.max_unfinished_per_user of the cache; a session that ends mid-write
gives its share back."""

from __future__ import annotations

import asyncio
import ftplib

import asyncssh
import pytest

from faultkit import (
    ftp_get,
    ftp_login,
    ftp_put,
    ftp_raw_stor,
    payload,
    reset_close,
    sftp_put,
    sftp_session,
    staging_files,
    tmpfs,
    wait_for,
)
from harness import PASSWORD

MiB = 1024 * 1024
WRITERS = [{"name": name, "password": PASSWORD, "root": "/", "permissions": ["read", "write"]}
           for name in ("pacs", "ct")]


async def hold_open(sftp: asyncssh.SFTPClient, files: int, size: int) -> tuple[list[asyncssh.SFTPClientFile], str]:
    """Open `files` new files and write `size` bytes to each, closing none; → the handles, and the reason the
    server refused a write (\"\" if it took everything)."""
    handles = []
    for i in range(files):
        h = await sftp.open(f"CT/held/{i}.dcm", "wb")
        handles.append(h)
        for pos in range(0, size, MiB):
            try:
                await h.write(payload(f"held{i}", MiB), pos)
            except asyncssh.SFTPError as e:
                return handles, e.reason
    return handles, ""


@pytest.mark.skipif("os.geteuid() != 0", reason="needs root to mount a small tmpfs")
async def test_unfinished_uploads_of_one_user_leave_the_disk_to_the_others(agent_factory):
    """On a 32 MB cache disk (4 MB reserve) one account opens files and writes 24 MB it never closes. Before, it
    got all of it (its own stored file was evicted for it) and the other account's 4 MB store then failed 452.
    Now it is refused past a quarter of the 28 MB with a clear "disk full" reason, logged; the other account
    stores; the first account's stored file is untouched."""
    a = agent_factory(users=WRITERS, **{"cache.min_free_bytes": "4MB"})
    with tmpfs(a.workdir / "cache", "32m"):
        try:
            await asyncio.to_thread(a.start)
            await fill_and_store(a)
        finally:
            a.stop()  # before the unmount
    [event] = a.events("unfinished_limit")
    assert event["user"] == "pacs" and event["limit"] == (32 * MiB - 4 * 10**6) // 4


async def fill_and_store(a) -> None:
    """The attack, and what the other user and the stored file see."""
    kept = payload("kept", 2 * MiB)
    async with sftp_session(a, "pacs") as sftp:
        await sftp_put(sftp, "CT/kept.dcm", kept)
        handles, refused = await hold_open(sftp, 6, 4 * MiB)
        ftp = await asyncio.to_thread(ftp_login, a, "ct")
        reply = await asyncio.to_thread(ftp_put, ftp, "MR/other.dcm", payload("other", 4 * MiB))
        assert reply.startswith("226"), reply
        assert "unfinished uploads" in refused, refused
        assert await asyncio.to_thread(ftp_get, ftp, "CT/kept.dcm") == kept
        ftp.quit()
        for h in handles[:-1]:  # the refused file is discarded; the others are still the user's to finish
            await h.close()


def test_a_session_cut_mid_write_gives_its_share_back(agent_factory):
    """An SFTP connection dropped mid-write and an FTP data connection reset mid-STOR leave no staging file,
    and their bytes no longer count against the user: a file as large again still fits under the limit
    (cache.max_bytes 16 MB: 4 MB per user)."""
    a = agent_factory(users=WRITERS, **{"cache.max_bytes": "16MB"}).start()

    async def sftp_cut() -> None:
        async with sftp_session(a, "pacs") as sftp:
            with pytest.raises(asyncssh.SFTPFailure, match="unfinished uploads"):
                await sftp_put(sftp, "CT/big.dcm", payload("big", 5 * MiB))
        conn = await asyncssh.connect("127.0.0.1", a.sftp_port, username="pacs", password=PASSWORD,
                                      known_hosts=None, client_keys=None, agent_path=None)
        sftp = await conn.start_sftp_client()
        f = await sftp.open("CT/cut.dcm", "wb")
        await f.write(payload("cut", 3 * MiB))
        conn.abort()  # gone without a CLOSE
        await conn.wait_closed()

    asyncio.run(sftp_cut())
    wait_for(lambda: staging_files(a) == [], 10, what="staging to be cleaned up")

    ftp = ftp_login(a)
    data = ftp_raw_stor(ftp, "CT/cut2.dcm")
    data.sendall(payload("cut2", 3 * MiB))
    reset_close(data)
    with pytest.raises(ftplib.error_temp):
        ftp.voidresp()
    wait_for(lambda: staging_files(a) == [], 10, what="staging to be cleaned up")
    assert ftp_put(ftp, "CT/after.dcm", payload("after", 3 * MiB)).startswith("226")
    ftp.quit()

    async def sftp_after() -> None:
        async with sftp_session(a, "pacs") as sftp:
            await sftp_put(sftp, "CT/after2.dcm", payload("after2", 3 * MiB))

    asyncio.run(sftp_after())
