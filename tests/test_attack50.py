"""Attacks on a running agent (round 50): what round 49 left. A listing that starts again from its first page with
a fresh continuation token each time (a LIST never answered: only a token seen before ended a listing); an agent
stopped with its cache disk read-only (a traceback); many large SMB READs outstanding (probed, sound). Real agent,
real SeaweedFS (behind tests/s3fault.py's proxy for the listing), real Samba, real clients (ftplib, smbprotocol)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from smbprotocol.exceptions import SMBException
from smbutil import Smb, open_for_read
from test_smb_hostile import logged_in_tree

from faultkit import ext4, ftp_get, ftp_login, ftp_put, payload
from harness import BUCKET


def test_a_listing_restarting_with_fresh_tokens_ends(proxied_agent, proxy, seaweed):
    """A listing whose every page was its first page again, each with a new continuation token, went on for ever:
    a LIST of its directory (and every later one, joining it) never answered. S3 lists a listing's keys and common
    prefixes in ascending order across its pages, so a page that does not go on past the last one ends it as a
    failed listing: the LIST answers what the catalog knows, and lists the store again once it answers straight."""
    a = proxied_agent(prefix="t50restart/")
    for key in ("CT/old/0.dcm", "CT/old/1.dcm", "CT/old/sub/2.dcm"):
        seaweed.client().put_object(Bucket=BUCKET, Key=f"t50restart/{key}", Body=b"stored before")
    proxy.restart_listings = True
    ftp = ftp_login(a)
    ftp.sock.settimeout(60)  # main: no answer in 60 s (nor ever)
    assert set(ftp.nlst("CT/old")) <= {"0.dcm", "1.dcm", "sub"}  # its first page showed: merged
    assert a.events("remote_list_failed")
    proxy.restart_listings = False
    assert sorted(ftp.nlst("CT/old")) == ["0.dcm", "1.dcm", "sub"]
    ftp.quit()


async def test_a_listing_of_names_around_slash_over_many_pages_is_whole(seaweed):
    """The end above is no order check: SeaweedFS lists in a tree walk's order ('a/x' before 'a b', where S3's binary
    order has 'a b' first), so a page "going back" is a listing that is right. Every key and common prefix, names
    sorting around '/' and non-ASCII ones included, comes through S3Uplink.pages in pages of two, none twice."""
    from agent.config import UplinkConfig
    from agent.uplink.s3 import S3Uplink

    names = ["a", "a b", "a-", "a.1/x", "a/x", "a/y/z", "a0", "b/y", "é", "z", "ü/q", "日本"]
    for name in names:
        seaweed.client().put_object(Bucket=BUCKET, Key=f"t50order/{name}", Body=b"x")
    s3 = S3Uplink(UplinkConfig(endpoint_url=seaweed.endpoint_url, bucket=BUCKET,
                               access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key))
    await s3.start()
    try:
        for args, expected in (({}, names), ({"Delimiter": "/"}, sorted({n.split("/")[0] + "/" * ("/" in n)
                                                                          for n in names}))):
            listed = [name[len("t50order/"):] async for page in s3.pages(
                          "t50order/", PaginationConfig={"PageSize": 2}, **args)  # type: ignore[arg-type]
                      for name in [o["Key"] for o in page.get("Contents", [])] +
                      [p["Prefix"] for p in page.get("CommonPrefixes", [])]]
            assert sorted(listed) == sorted(expected), args
    finally:
        await s3.close()


def test_an_agent_stopped_with_its_cache_disk_read_only_stops_clean(agent_factory, seaweed):
    """Stopped (SIGTERM) after its cache's file system turned read-only (ext4's errors=remount-ro, made by the kernel's
    trigger_fs_error), the agent could not flush its access counts into the catalog and exited with a traceback.
    It stops clean now: one warning saying what could not be saved, exit code 0 (what it held is on the disk as
    the disk was; the next start's fsck is the disk's business)."""
    a = agent_factory(seaweed)
    with ext4(a.workdir / "cache", "64M", inodes=2000) as cache_dir:
        try:
            a.start()
            ftp = ftp_login(a)
            data = payload("kept", 4096)
            assert ftp_put(ftp, "CT/ro/kept.dcm", data).startswith("226")
            assert ftp_get(ftp, "CT/ro/kept.dcm") == data  # an access count, not yet flushed
            ftp.quit()
            device = subprocess.run(["findmnt", "-no", "SOURCE", str(cache_dir)], capture_output=True, text=True,
                                    check=True).stdout.strip()
            Path(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error").write_text("test")
            code = a.stop()
        finally:
            a.stop()
    log = a.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert code == 0, log[-3000:]
    assert len(a.events("stop_unsaved")) == 1, log[-3000:]


def test_many_large_smb_reads_never_read_grow_no_memory_of_the_agent(smb_agent):
    """Probe, found sound: SMB clients with many large READs outstanding (opens of their own, 1 MiB each, sent as
    fast as smbd's credits allow, never asked for: smbprotocol's own thread takes them off the socket). The agent
    answers FUSE reads, at most pyfuse3's 64 tasks at a time of the kernel's max_read each, whatever smbd has been
    asked: its memory stays bounded (smbd's own is [smb] max_process_memory's). Four connections, 8 opens each,
    32 READs each open."""
    agent = smb_agent().start(timeout=180)
    smb = Smb(agent)
    size = 16 << 20
    smb.write("big.dcm", os.urandom(size))
    base = agent.rss()
    conns = []
    sent = 0
    for _ in range(4):
        conn, tree = logged_in_tree(agent, smb)
        conns.append(conn)
        opens = []
        for _ in range(8):
            opens.append(open_for_read(tree, "big.dcm"))
        for i in range(32):
            for f in opens:  # sent, its answer never asked for (smbprotocol's own thread takes it off the socket)
                msg, _ = f.read((i << 20) % size, 1 << 20, send=False)
                for _ in range(100):  # bounded: out of credits, smbd grants more as it answers
                    try:
                        conn.send(msg, sid=tree.session.session_id, tid=tree.tree_connect_id)
                        sent += 1
                        break
                    except SMBException:
                        time.sleep(0.05)
    grown = []
    for _ in range(10):  # bounded: 10 s of smbd answering into full sockets
        time.sleep(1)
        grown.append(agent.rss() - base)
    for conn in conns:
        conn.disconnect(close=False)
    assert sent == 4 * 8 * 32 and max(grown) < 256 << 20, (sent, grown)
