"""A flipped bit on the SSD is never served: cached copies are verified before every read."""

from __future__ import annotations

import ftplib
import io
import os
import sqlite3
import threading
import time

import pytest

from devstack import free_port
from harness import BUCKET, PASSWORD


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
    assert [e["path"] for e in agent.wait_events("fetched")] == ["CT/a.dcm"]  # logged once the copy is cached
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


def fsck(agent, *args: str) -> tuple[int, dict]:
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fsck", "--config", str(agent.config_path), "--json",
                          *args], capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def test_fsck_finds_and_repairs(agent_factory):
    from harness import s3_objects, sha256
    agent = agent_factory().start()
    files = {f"CT/{i}.dcm": os.urandom(30_000 + i) for i in range(6)}
    f = ftp(agent)
    for path, data in files.items():
        f.storbinary(f"STOR {path}", io.BytesIO(data))
    f.quit()
    agent.wait_drained()
    assert fsck(agent, "--remote")[0] == 0
    flip_a_byte(agent, "CT/1.dcm")
    agent.store.client().delete_object(Bucket=BUCKET, Key=agent.prefix + "CT/4.dcm")  # behind the agent's back

    code, report = fsck(agent, "--remote")
    assert code == 1
    assert report["corrupt"] == ["CT/1.dcm"] and report["remote_missing"] == ["CT/4.dcm"]
    assert report["refetched"] == [] and report["requeued"] == []  # without --repair nothing changes

    code, report = fsck(agent, "--remote", "--repair")
    assert report["refetched"] == ["CT/1.dcm"] and report["requeued"] == ["CT/4.dcm"] and report["lost"] == []
    agent.wait_drained()  # the running agent uploads the re-queued file
    assert fsck(agent, "--remote")[0] == 0
    assert {p: o["sha256"] for p, o in s3_objects(agent.store, agent.prefix).items()} == \
        {p: sha256(d) for p, d in files.items()}
    f = ftp(agent)
    buf = io.BytesIO()
    f.retrbinary("RETR CT/1.dcm", buf.write)
    assert buf.getvalue() == files["CT/1.dcm"] and agent.events("cache_copy_corrupt") == []  # repaired before read
    f.quit()


def test_fsck_reports_lost_data(agent_factory):
    agent = agent_factory(**{"uplink.endpoint_url": f"http://127.0.0.1:{free_port()}"}).start()
    f = ftp(agent)
    f.storbinary("STOR only-here.dcm", io.BytesIO(os.urandom(10_000)))
    f.quit()
    flip_a_byte(agent, "only-here.dcm")
    code, report = fsck(agent)
    assert code == 2 and report["lost"] == ["only-here.dcm"]


def test_background_scrub_drops_a_bad_copy(agent_factory):
    agent = agent_factory(**{"scrub.pause_seconds": 1, "scrub.rate": "50MB"}).start()
    data = os.urandom(40_000)
    f = ftp(agent)
    f.storbinary("STOR MG/a.dcm", io.BytesIO(data))
    agent.wait_drained()
    flip_a_byte(agent, "MG/a.dcm")
    deadline = time.monotonic() + 30
    while not agent.events("cache_copy_corrupt") and time.monotonic() < deadline:
        time.sleep(0.2)
    [event] = agent.events("cache_copy_corrupt")
    assert event["found_by"] == "scrub" and event["path"] == "MG/a.dcm"
    assert agent.health()["cache"]["cached_files"] == 0
    buf = io.BytesIO()
    f.retrbinary("RETR MG/a.dcm", buf.write)
    assert buf.getvalue() == data
    f.quit()


def test_fetched_copy_a_crash_tore_is_fetched_again(agent_factory):
    """A copy fetched from S3 is committed without fsyncs (agent/store/fetch.py: S3 holds the object). What a
    crash can leave of it while the catalog row still names it — a shorter file, an empty one, none — fails the
    next read's checks, and that read gets the right bytes from S3 and caches them again."""
    from test_conformance import evict, wait_fetched
    agent = agent_factory().start()
    files = {f"CR/{name}.dcm": os.urandom(150_000 + i) for i, name in enumerate(("short", "empty", "gone"))}
    f = ftp(agent)
    for path, data in files.items():
        f.storbinary(f"STOR {path}", io.BytesIO(data))
    agent.wait_drained()
    for path in files:
        assert evict(agent, path)["evicted"]
        f.retrbinary(f"RETR {path}", io.BytesIO().write)  # fetched from S3 into the cache
    wait_fetched(agent, *files)
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    blobs = {p: agent.workdir / "cache" / "data" / b[:2] / b
             for p, b in db.execute("SELECT path, blob FROM entries WHERE path LIKE 'CR/%'")}
    db.close()
    os.truncate(blobs["CR/short.dcm"], 100_000)
    os.truncate(blobs["CR/empty.dcm"], 0)
    blobs["CR/gone.dcm"].unlink()
    for path, data in files.items():
        buf = io.BytesIO()
        f.retrbinary(f"RETR {path}", buf.write)
        assert buf.getvalue() == data, path
    f.quit()
    problems = {e["path"]: e["problem"] for e in agent.events("cache_copy_corrupt")}
    assert problems == {"CR/short.dcm": "size mismatch", "CR/empty.dcm": "size mismatch", "CR/gone.dcm": "missing"}
    deadline = time.monotonic() + 10
    while len(agent.events("fetched")) < 6:  # each fetched twice: after the eviction and after the tear
        assert time.monotonic() < deadline, agent.events("fetched")
        time.sleep(0.1)


# --- bit rot found while sending (issue 14): the copy's stamp is still valid, its bytes are not ---------

def rot_a_byte(agent, path: str, at: int) -> None:
    """Flip one bit in place the way a failing SSD does: same inode, size and mtime (the cheap checks on
    open pass), so only the digest checked while sending can find it."""
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    (blob,) = db.execute("SELECT blob FROM entries WHERE path = ?", (path,)).fetchone()
    db.close()
    blob_path = agent.workdir / "cache" / "data" / blob[:2] / blob
    st = os.stat(blob_path)
    with open(blob_path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    os.utime(blob_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(blob_path).st_mtime_ns == st.st_mtime_ns and os.stat(blob_path).st_ino == st.st_ino


def test_rotten_copy_never_completes_a_transfer_and_is_fetched_again(smb_agent):
    import asyncio

    import asyncssh
    import smbclient
    from smbprotocol.exceptions import SMBResponseException
    from smbutil import Smb
    agent = smb_agent().start()
    big = 4 * 1024 * 1024 + 12_345  # larger than VERIFY_AHEAD: checked while it is sent
    files = {"CT/ftp.dcm": os.urandom(big), "CT/sftp.dcm": os.urandom(big), "CT/smb.dcm": os.urandom(big),
             "CT/small.dcm": os.urandom(300_000)}
    f = ftp(agent)
    for path, data in files.items():
        f.storbinary(f"STOR {path}", io.BytesIO(data))
    agent.wait_drained()
    for path, data in files.items():
        rot_a_byte(agent, path, len(data) - 5000)

    # a small copy is checked whole before its first byte: the read gets the right bytes, from S3
    buf = io.BytesIO()
    f.retrbinary("RETR CT/small.dcm", buf.write)
    assert buf.getvalue() == files["CT/small.dcm"]

    # FTP: the bytes before the damage may have gone out, but the transfer ends in 451, not 226
    buf = io.BytesIO()
    with pytest.raises(ftplib.error_temp, match="^451"):
        f.retrbinary("RETR CT/ftp.dcm", buf.write)
    assert len(buf.getvalue()) < big

    # SFTP: the read that reaches the damaged end fails with an SFTP failure status
    async def sftp_read() -> bytes:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("CT/sftp.dcm", "rb") as fh:
                return await fh.read()
    with pytest.raises(asyncssh.SFTPFailure):
        asyncio.run(sftp_read())

    # SMB (Samba over the FUSE view): the read fails with STATUS_IO_DEVICE_ERROR (the FUSE view's EIO)
    smb = Smb(agent)
    with pytest.raises(SMBResponseException) as failed:
        with smbclient.open_file(smb.p("CT/smb.dcm"), mode="rb", **smb.kw) as fh:
            fh.read()
    assert failed.value.status == 0xC0000185

    corrupt = {e["path"]: e for e in agent.events("cache_copy_corrupt")}
    assert set(corrupt) == set(files)
    assert {corrupt[p]["found_by"] for p in ("CT/ftp.dcm", "CT/sftp.dcm", "CT/smb.dcm")} == {"read"}
    assert corrupt["CT/small.dcm"]["found_by"] == "open"

    # each bad copy was dropped: the next read fetches the object again and gets the right bytes
    buf = io.BytesIO()
    f.retrbinary("RETR CT/ftp.dcm", buf.write)
    assert buf.getvalue() == files["CT/ftp.dcm"]
    f.quit()
    assert asyncio.run(sftp_read()) == files["CT/sftp.dcm"]
    assert smb.read("CT/smb.dcm") == files["CT/smb.dcm"]
    smb.close()
    assert {e["path"] for e in agent.wait_events("fetched", 4)} == set(files)


def test_write_through_sends_the_bytes_it_received_whatever_the_copy_became(seaweed, proxied_agent, proxy):
    """A write-through file small enough for one PUT is uploaded from the bytes hashed as they came, not read
    back from the cached copy (issue 14): its copy rotting on the SSD before the upload starts changes nothing
    in S3, and the rot is still found by the copy's own check when it is read."""
    from faultkit import ftp_get, ftp_login, ftp_put, payload, wait_for

    agent = proxied_agent(**{"uplink.max_concurrency": 1})
    first, data = payload("first", 200_000), payload("second", 300_000)
    proxy.hold_puts.set()  # the first upload holds the only transfer slot until cleared
    stored = threading.Thread(target=lambda: ftp_put(ftp_login(agent), "CT/first.dcm", first))
    stored.start()
    wait_for(lambda: proxy.puts_held == 1, 30, what="the first PUT")
    second = threading.Thread(target=lambda: ftp_put(ftp_login(agent), "CT/second.dcm", data))
    second.start()
    wait_for(lambda: _state(agent, "CT/second.dcm") == "uploading", 30, what="the second file committed")
    rot_a_byte(agent, "CT/second.dcm", 1000)  # durable, acknowledged soon, its upload not yet started
    proxy.hold_puts.clear()
    stored.join(60)
    second.join(60)
    agent.wait_drained()
    got = seaweed.client().get_object(Bucket=BUCKET, Key=agent.prefix + "CT/second.dcm")["Body"].read()
    assert got == data
    f = ftp_login(agent)
    assert ftp_get(f, "CT/second.dcm") == data  # the rotten copy fails its check: fetched from S3 again
    f.quit()
    assert [e["path"] for e in agent.events("cache_copy_corrupt")] == ["CT/second.dcm"]


def _state(agent, path: str) -> str | None:
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT state FROM entries WHERE path = ?", (path,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def test_fsck_prints_catalog_paths_escaped(agent_factory):
    """The catalog holds the keys another S3 client wrote (merged from listings), and fsck printed the paths it
    found damaged as they were: a key holding an escape sequence reached the admin's terminal and could clear
    or rewrite it. Now printed with control characters escaped (\\x1b); --json was already escaped by JSON."""
    import subprocess
    import sys
    agent = agent_factory().start()
    evil = "evil\x1b[2J\x1b]0;owned\x07.dcm"
    client = agent.store.client()
    client.put_object(Bucket=BUCKET, Key=agent.prefix + evil, Body=b"written elsewhere")
    f = ftp(agent)
    f.nlst()  # the listing merges the bucket's keys into the catalog
    f.quit()
    client.delete_object(Bucket=BUCKET, Key=agent.prefix + evil)  # then gone, behind the agent's back
    r = subprocess.run([sys.executable, "-m", "agent.cli", "fsck", "--remote", "--config", str(agent.config_path)],
                       capture_output=True, text=True, timeout=120)
    assert "evil" in r.stdout, r.stdout + r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
    assert "  evil\\x1b[2J\\x1b]0;owned\\x07.dcm\n" in r.stdout, r.stdout
