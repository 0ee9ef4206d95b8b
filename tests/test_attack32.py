"""attack32: hostile clients at scale (huge directories, foreign objects' bytes)."""

from __future__ import annotations

import asyncio
import ftplib
import hashlib
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import asyncssh
import pytest
from aiohttp import web
from s3fault import FaultProxy
from smbutil import Smb
from test_ftp import ftp, get

from harness import BUCKET, PASSWORD


def _fill(agent, directory: str, n: int) -> list[str]:
    """n remote-only files in `directory` (made by the agent), written straight into its catalog: as a listing of
    an archive's directory leaves them, without uploading a million objects. → their names."""
    names = [f"{i:09d}-1.2.840.10008.dcm" for i in range(n)]
    db = sqlite3.connect(agent.workdir / "cache" / "catalog.sqlite", timeout=60)
    with db:
        db.executemany("INSERT INTO entries (path, parent, name, is_dir, size, mtime, state, gen, etag) "
                       "VALUES (?, ?, ?, 0, 524288, 1.7e9, 'clean', 1, '\"x\"')",
                       ((f"{directory}/{name}", directory, name) for name in names))
    db.close()
    return names


def _listing_peak(agent, list_it) -> tuple[int, object]:
    """How far the agent's peak resident memory rose above its size before `list_it()` ran (the kernel's VmHWM,
    reset first) → (bytes, what list_it returned)."""
    pid = agent.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the current RSS

    def kib(field: str) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) * 1024

    before = kib("VmRSS:")
    result = list_it()
    return kib("VmHWM:") - before, result


N = 200_000
HELD = 60 * 2**20  # the whole listing (~98 MB at N: 488 MB per million rows) never comes near it


def test_a_huge_directory_is_listed_over_ftp_and_sftp_in_flat_memory(agent_factory):
    """A directory of N files cost one listing every row at once in the agent (Entry objects, then the whole LIST
    text): 488 MB at a million, per listing at the same time. Rows now come from the catalog a page at a time as
    the client reads them, over FTP (LIST, MLSD) and SFTP (readdir)."""
    agent = agent_factory().start()
    f = ftp(agent)
    f.mkd("big")
    names = _fill(agent, "big", N)
    f.nlst("big")  # the allocator's first large listing (its arenas) is not what is measured
    grown, lines = _listing_peak(agent, lambda: list(f.mlsd("big")))
    assert [name for name, _ in lines] == names
    assert grown < HELD, f"MLSD of {N} files grew the agent by {grown / 2**20:.1f} MB"
    grown, lines = _listing_peak(agent, lambda: f.nlst("big"))
    assert len(lines) == N and grown < HELD, f"NLST of {N} files grew the agent by {grown / 2**20:.1f} MB"
    f.quit()

    async def sftp_names() -> list[str]:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            return [n.filename for n in await s.readdir("big")]

    grown, got = _listing_peak(agent, lambda: asyncio.run(asyncio.wait_for(sftp_names(), 120)))
    assert sorted(got) == names
    assert grown < HELD, f"SFTP readdir of {N} files grew the agent by {grown / 2**20:.1f} MB"


def test_a_large_directory_is_listed_whole_and_once_over_smb_and_the_mount(smb_agent):
    """FUSE readdir now reads the catalog as the kernel asks: every name must still come exactly once, through smbd
    (which seeks back to an entry its reply had no room for) and through the mount, rewound and read again."""
    agent = smb_agent().start()
    smb = Smb(agent)
    smb.makedirs("wide")
    names = _fill(agent, "wide", 5000)
    assert smb.listdir("wide") == names
    mount = agent.overrides["smb.mountpoint"]
    with os.scandir(os.path.join(mount, "wide")) as it:
        assert sorted(e.name for e in it) == names
    fd = os.open(os.path.join(mount, "wide"), os.O_RDONLY | os.O_DIRECTORY)
    try:  # listdir(fd) reads it to its end, then rewinds it (offset 0) and reads it again: the listing anew
        assert sorted(os.listdir(fd)) == names and sorted(os.listdir(fd)) == names
    finally:
        os.close(fd)


class _Flipper(FaultProxy):
    """The fault proxy flipping one byte in the body of whole-object GETs of keys ending `flip`: a bit gone bad on
    the store's disk or the way, under an ETag still naming the right bytes (SeaweedFS checks its own needles'
    CRC, so it cannot be made to serve such an object)."""

    flip = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        resp = await super()._handle(request)
        if (self.flip and request.method == "GET" and request.path.endswith(self.flip)
                and "Range" not in request.headers and isinstance(resp, web.Response) and resp.body):
            body = bytearray(cast(bytes, resp.body))
            body[len(body) // 2] ^= 0x01
            resp.body = bytes(body)
        return resp


def test_another_writers_object_is_checked_against_its_etags_md5(agent_factory, seaweed):
    """An object another S3 writer put has no sha256 metadata: its bytes were checked for their size only, so a
    flipped byte was served and cached as the file. Its single-part ETag is their MD5: a fetch that does not match
    it now fails (no 226) and caches nothing; the right bytes then are served."""
    proxy = _Flipper(seaweed.endpoint_url).start()
    try:
        agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url}).start()
        data = os.urandom(3 * 2**20 + 17)
        put = seaweed.client().put_object(Bucket=BUCKET, Key=f"{agent.prefix}foreign/x.dcm", Body=data)
        assert put["ETag"].strip('"') == hashlib.md5(data).hexdigest()  # SeaweedFS tags it with its MD5
        f = ftp(agent)
        proxy.flip = "foreign/x.dcm"
        with pytest.raises(ftplib.Error):
            get(f, "foreign/x.dcm")
        assert agent.wait_events("fetch_failed")[0]["path"] == "foreign/x.dcm"
        proxy.flip = ""
        assert get(f, "foreign/x.dcm") == data
        f.quit()
    finally:
        proxy.stop()


def test_a_large_directory_another_writer_filled_is_listed_from_the_store_a_page_at_a_time(agent_factory, seaweed):
    """The first listing of a directory holds what the store lists: every object of it, and a HEAD's task for each
    (another writer's objects are sized by a HEAD), all at once: +18 MB for 10 000 objects (~1.8 GB for a
    million, if linear). It is merged a ListObjectsV2 page (1 000 keys) at a time now."""
    agent = agent_factory().start()
    s3 = seaweed.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=BUCKET, Key=f"{agent.prefix}arch/{i:08d}.dcm", Body=b"x"),
                      range(10_000)))
    f = ftp(agent)
    f.sock.settimeout(300)
    f.timeout = 300  # the data connection's too: 10 000 HEADs take ~15 s on a loaded box
    f.nlst("")
    grown, names = _listing_peak(agent, lambda: f.nlst("arch"))
    assert names == [f"{i:08d}.dcm" for i in range(10_000)]
    assert grown < 8 * 2**20, f"listing 10 000 objects from the store grew the agent by {grown / 2**20:.1f} MB"
    f.quit()
