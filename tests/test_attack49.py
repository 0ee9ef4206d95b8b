"""Attacks on a running agent (round 49): the box's own resources run out, and a lying object store. A cache file
system out of inodes with bytes free (stores and cold reads refused for good, clean files left; /healthz not failing),
one turned read-only (every store an internal error, /healthz ok), and a listing whose continuation tokens go round
(a LIST never answered). Each test reproduces one attack that worked and checks it no longer does. Real agent, real
SeaweedFS (behind the fault proxy for the listing), real clients (ftplib, asyncssh); the cache is an ext4 of the
test's own, a loop device's, with few inodes."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import asyncssh
import pytest
from test_fault_coldread import evict_cli
from test_fault_diskfull import ftp_store_expecting_refusal

import faultkit
from agent.store.cache import SPARES
from faultkit import ext4, ftp_get, ftp_login, ftp_put, payload, sftp_put, sftp_session, sha256
from harness import BUCKET, s3_objects

SMALL = 4096


def test_a_listing_whose_continuation_tokens_loop_ends(proxied_agent, proxy, seaweed):
    """A store whose listing never ends (its continuation tokens going round: a bug, a proxy between) held an FTP LIST
    of a directory not yet listed for ever, and every later LIST of it joined the same listing: botocore's paginator
    stops only at a token received twice in a row. A token the listing gave before ends it now as a failed listing:
    the LIST answers what the catalog knows, and lists the directory again once the store answers straight."""
    a = proxied_agent(prefix="t49loop/")
    for i in range(3):
        seaweed.client().put_object(Bucket=BUCKET, Key=f"t49loop/CT/old/{i}.dcm", Body=b"stored before")
    proxy.loop_listings = True
    ftp = ftp_login(a)
    ftp.sock.settimeout(60)  # main: no answer in 60 s (nor ever)
    names = ftp.nlst("CT/old")
    assert set(names) <= {f"{i}.dcm" for i in range(3)}  # its pages before the loop showed: merged
    assert a.events("remote_list_failed")
    proxy.loop_listings = False
    assert sorted(ftp.nlst("CT/old")) == [f"{i}.dcm" for i in range(3)]
    ftp.quit()


def test_a_cache_disk_turned_read_only_says_so_on_healthz(agent_factory, seaweed):
    """The cache's file system turned read-only under the agent (ext4's errors=remount-ro after an I/O error, made
    here by the kernel's own trigger_fs_error): every store and LIST was refused "451 internal error", a traceback
    logged each time (the catalog cannot commit), and /healthz said "ok". It says "failing" now, with the catalog's
    error; a store is refused saying why, none is acknowledged, and a cached file still reads."""
    a = agent_factory(seaweed)
    with ext4(a.workdir / "cache", "64M", inodes=2000) as cache_dir:
        try:
            a.start()
            ftp = ftp_login(a)
            data = payload("kept", SMALL)
            assert ftp_put(ftp, "CT/ro/kept.dcm", data).startswith("226")
            device = subprocess.run(["findmnt", "-no", "SOURCE", str(cache_dir)], capture_output=True, text=True,
                                    check=True).stdout.strip()
            Path(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error").write_text("test")
            with pytest.raises(OSError):  # EROFS
                (cache_dir / "probe").write_text("x")
            refused = ftp_store_expecting_refusal(ftp, "CT/ro/new.dcm", payload("new", SMALL))
            assert refused.startswith("451") and "cache disk cannot be written" in refused, refused
            assert sha256(ftp_get(ftp, "CT/ro/kept.dcm")) == sha256(data)
            h = a.health()
            assert h["status"] == "failing", h["reasons"]
            assert any("catalog cannot be written" in r for r in h["reasons"]), h["reasons"]
        finally:
            a.stop()


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
            assert {state for _, state, _, _, _ in faultkit.catalog_rows(a)} == {"clean"}
            ftp.quit()
        finally:
            a.stop()


@pytest.mark.slow
async def test_a_cache_out_of_inodes_with_nothing_evictable_is_failing(agent_factory, private_seaweed):
    """Out of inodes with the store down (every file waiting for it: nothing evictable), stores are refused as on a
    full disk (FTP 452, SFTP no space), and /healthz said "degraded" (the store down) with 80 % of the bytes free: it
    says "failing", no inodes left, as a full disk does. Nothing half-written is left; once the store is back and the
    files are in it, stores are taken again."""
    private_seaweed.stop()
    a = agent_factory(private_seaweed, **{"cache.min_free_bytes": "1MB"})
    with ext4(a.workdir / "cache", "64M", inodes=200):
        try:
            await asyncio.to_thread(a.start)
            ftp = await asyncio.to_thread(ftp_login, a)
            for i in range(300):  # 200 inodes
                reply = await asyncio.to_thread(ftp_store_expecting_refusal, ftp, f"CT/down/{i}.dcm",
                                                payload(str(i), SMALL))
                if not reply.startswith("226"):
                    break
            assert reply.startswith("452") and "nothing evictable" in reply, reply
            async with sftp_session(a) as sftp:
                with pytest.raises(asyncssh.SFTPError) as refused:
                    await sftp_put(sftp, "/CT/down/sftp.dcm", payload("sftp", SMALL))
                assert refused.value.code in (asyncssh.FX_FAILURE, asyncssh.FX_NO_SPACE_ON_FILESYSTEM)
            h = a.health()
            assert h["status"] == "failing" and h["cache"]["inodes_free"] == 0, h["reasons"]
            assert any("no inodes left" in r for r in h["reasons"]), h["reasons"]
            assert faultkit.staging_files(a) == [] and faultkit.orphan_blobs(a) == set()
            await asyncio.to_thread(private_seaweed.start)
            await asyncio.to_thread(a.wait_drained, 120)
            assert (await asyncio.to_thread(ftp_put, ftp, "CT/down/after.dcm", payload("after", SMALL))
                    ).startswith("226")
            assert a.health()["status"] != "failing"
        finally:
            a.stop()


def test_a_cold_read_out_of_inodes_evicts_clean_files(agent_factory, seaweed):
    """Out of inodes (another writer on the cache's file system took the rest) with the spares made ahead used up, a
    cold read's fetch could not make its file and the read failed "cache disk full", clean cached files on the disk
    left alone. It evicts them now, as a store does, and the read gets its file."""
    a = agent_factory(seaweed)
    with ext4(a.workdir / "cache", "64M", inodes=400) as cache_dir:
        try:
            a.start()
            ftp = ftp_login(a)
            files = {f"CT/cold/{i}.dcm": payload(str(i), SMALL) for i in range(60)}
            for path, data in files.items():
                assert ftp_put(ftp, path, data).startswith("226")
            a.wait_drained(60)
            cold = list(files)[:SPARES + 4]
            assert evict_cli(a, *cold).returncode == 0
            (cache_dir / "other").mkdir()
            with pytest.raises(OSError):  # the other writer: every inode left
                for i in range(1000):
                    (cache_dir / "other" / str(i)).touch()
            for path in cold:  # the spares go first, then a file of its own each
                assert sha256(ftp_get(ftp, path)) == sha256(files[path]), path
        finally:
            a.stop()
