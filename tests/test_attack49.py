"""Attacks on a running agent (round 49): exhaustion of the box's own resources. A cache file system out of inodes
with bytes free. Each test reproduces one attack that worked and checks it no longer does. Real agent, real
SeaweedFS, real clients (ftplib, asyncssh); the cache is an ext4 of the test's own with few inodes."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_fault_diskfull import ftp_store_expecting_refusal

from faultkit import catalog_rows, ext4, ftp_get, ftp_login, payload, sftp_put, sftp_session, sha256
from harness import s3_objects

SMALL = 4096


@pytest.mark.slow
async def test_a_cache_out_of_inodes_evicts_clean_files_to_store_more(agent_factory, seaweed):
    """The cache's room was counted in bytes only: out of inodes with bytes free, a create failed (ENOSPC) and every
    upload was refused "cache disk full and nothing evictable" for ever, with hundreds of clean (evictable) files on
    the disk, since nothing was evicted while bytes were free. Now a create that finds no inode evicts clean files
    and tries again; with nothing evictable the refusal stands (452 / SFTP no space)."""
    a = agent_factory(seaweed, **{"cache.min_free_bytes": "1MB"})
    with ext4(a.workdir / "cache", "64M", inodes=200) as cache_dir:
        try:
            await asyncio.to_thread(a.start)
            ftp = await asyncio.to_thread(ftp_login, a)
            acked: dict[str, str] = {}
            for i in range(400):  # 200 inodes: more files than the disk can name
                path = f"CT/inodes/{i}.dcm"
                data = payload(path, SMALL)
                reply = await asyncio.to_thread(ftp_store_expecting_refusal, ftp, path, data)
                assert reply.startswith("226"), (i, reply, os.statvfs(cache_dir))
                acked[path] = sha256(data)
                if i % 50 == 49:  # stored files clean (in S3): evictable
                    await asyncio.to_thread(a.wait_drained, 60)
            assert os.statvfs(cache_dir).f_bavail * os.statvfs(cache_dir).f_bsize > 32 << 20  # bytes were never short
            async with sftp_session(a) as sftp:
                data = payload("sftp", SMALL)
                await sftp_put(sftp, "/CT/inodes/sftp.dcm", data)
                acked["CT/inodes/sftp.dcm"] = sha256(data)
            await asyncio.to_thread(a.wait_drained, 60)
            assert a.events("eviction_pass") or a.events("evicted")
            objects = await asyncio.to_thread(s3_objects, seaweed, a.prefix)
            assert {p: o["sha256"] for p, o in objects.items()} == acked
            first = next(iter(acked))  # evicted: read back from S3 (its fetch needs an inode too)
            assert sha256(await asyncio.to_thread(ftp_get, ftp, first)) == acked[first]
            assert {state for _, state, _, _, _ in catalog_rows(a)} == {"clean"}
            ftp.quit()
        finally:
            a.stop()
