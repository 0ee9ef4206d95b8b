"""Full cache disk: a 32 MB tmpfs as the cache, and the object store down so nothing is evictable.

DESIGN.md: never refuse a PACS store because the cloud is down, *until the disk is full*; dirty data
never leaves the SSD except to S3. So once the tmpfs is full of dirty files, further uploads must get a
clear, protocol-correct error (FTP 452, SFTP no-space/failure), the files acknowledged before must
survive and reach S3 when the line is back, the agent must keep running, and once those files are clean
(evictable) it must accept writes again. The tmpfs is really mounted (root) and unmounted in teardown.
"""

from __future__ import annotations

import asyncio
import ftplib
import os

import asyncssh
import pytest

from faultkit import (
    catalog_rows,
    ftp_get,
    ftp_login,
    ftp_put,
    orphan_blobs,
    payload,
    sftp_put,
    sftp_session,
    sha256,
    staging_files,
    tmpfs,
)
from harness import s3_objects

FILE = 512 * 1024


def ftp_store_expecting_refusal(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    """STOR that the server may refuse mid-transfer; → the final reply, whichever way it arrives.

    When the server refuses, it stops reading and closes the data connection, so the client may see a
    broken pipe / reset while still sending; the 4xx reply is then waiting on the control connection.
    """
    try:
        return ftp_put(ftp, path, data)
    except ftplib.error_temp as e:
        return str(e)
    except OSError as broken:
        try:
            ftp.voidresp()
        except ftplib.error_temp as e:
            return str(e)
        raise AssertionError("the data connection broke but the server did not refuse the file") from broken


@pytest.mark.slow
async def test_full_cache_disk_with_uplink_down(agent_factory, private_seaweed):
    store = private_seaweed
    store.stop()  # the line is down from the start: every file stays dirty, nothing can be evicted
    a = agent_factory(store, **{"cache.min_free_bytes": "4MB"})
    with tmpfs(a.workdir / "cache", "32m") as cache_dir:
        try:
            await asyncio.to_thread(a.start)
            h = a.health()
            assert h["uplink"]["reachable"] is False and h["status"] == "degraded"

            # Fill the disk over FTP until the gateway refuses.
            ftp = await asyncio.to_thread(ftp_login, a)
            acked: dict[str, str] = {}
            refusal = None
            for i in range(200):
                path = f"CT/full/{i}.dcm"
                data = payload(path, FILE)
                reply = await asyncio.to_thread(ftp_store_expecting_refusal, ftp, path, data)
                if reply.startswith("226"):
                    acked[path] = sha256(data)
                    continue
                refusal = (path, reply)
                break
            assert refusal is not None, "a 32 MB disk took 100 MB"
            assert refusal[1].startswith("452"), refusal
            assert "full" in refusal[1]
            assert 20 <= len(acked) < 64
            # The refused file is nowhere; the session is still usable and says the same again.
            assert await asyncio.to_thread(ftp.sendcmd, "NOOP")
            assert catalog_rows(a, "SELECT path FROM entries WHERE path = ?", (refusal[0],)) == []
            again = await asyncio.to_thread(ftp_store_expecting_refusal, ftp, "CT/full/again.dcm",
                                            payload("again", FILE))
            assert again.startswith("452"), again

            # SFTP refuses too, with an SFTP error (no-space, or failure for v3 clients).
            async with sftp_session(a) as sftp:
                with pytest.raises(asyncssh.SFTPError) as err:
                    await sftp_put(sftp, "/CT/full/sftp.dcm", payload("sftp", FILE))
                assert err.value.code in (asyncssh.FX_FAILURE, asyncssh.FX_NO_SPACE_ON_FILESYSTEM)
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.stat("/CT/full/sftp.dcm")

            # The agent runs on and says why; nothing half-written is left; acknowledged files are intact.
            assert a.proc.poll() is None
            h = a.health()
            assert h["status"] in ("degraded", "failing") and h["queue_depth"] == len(acked)
            assert staging_files(a) == [] and orphan_blobs(a) == set()
            rows = {p: (state, size) for p, state, size, _, _ in catalog_rows(a)}
            assert rows == {p: ("dirty", FILE) for p in acked}
            for p in list(acked)[:3] + list(acked)[-3:]:
                assert sha256(await asyncio.to_thread(ftp_get, ftp, p)) == acked[p]

            # The line comes back: everything acknowledged reaches S3, with the right bytes.
            await asyncio.to_thread(store.start)
            await asyncio.to_thread(a.wait_drained, 120)
            objects = await asyncio.to_thread(s3_objects, store, a.prefix)
            assert {p: o["sha256"] for p, o in objects.items()} == acked

            # Clean files are evictable now: the gateway makes room and takes new files again.
            for i in range(8):
                path = f"CT/after/{i}.dcm"
                data = payload(path, FILE)
                assert (await asyncio.to_thread(ftp_put, ftp, path, data)).startswith("226")
                acked[path] = sha256(data)
            async with sftp_session(a) as sftp:
                data = payload("after-sftp", FILE)
                await sftp_put(sftp, "/CT/after/sftp.dcm", data)
                acked["CT/after/sftp.dcm"] = sha256(data)
            await asyncio.to_thread(a.wait_drained, 60)
            assert a.events("eviction_pass")
            objects = await asyncio.to_thread(s3_objects, store, a.prefix)
            assert {p: o["sha256"] for p, o in objects.items()} == acked
            # An evicted file still reads back whole (from S3).
            first = next(iter(acked))
            assert sha256(await asyncio.to_thread(ftp_get, ftp, first)) == acked[first]
            ftp.quit()
            assert os.statvfs(cache_dir).f_bavail > 0
        finally:
            a.stop()
