"""Cold reads: a file evicted from the cache comes back from S3 intact; concurrent readers share one fetch.

Eviction goes through the running agent's admin path (`pacsgw evict`, which POSTs to /admin/evict on the
HTTP listener): it drops only cached copies of files that are clean (confirmed in S3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from faultkit import ftp_get, ftp_login, ftp_put, metric, payload, sftp_session, sha256
from harness import s3_objects

BIG = 24 * 1024 * 1024


def evict_cli(agent, *paths: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(agent.config_path), *paths],
                          capture_output=True, text=True, timeout=60)


def blob_of(agent, path: str):
    from faultkit import catalog_rows
    return catalog_rows(agent, "SELECT blob FROM entries WHERE path = ?", (path,))[0][0]


async def test_evicted_file_reads_back_from_s3(agent_factory, seaweed):
    a = agent_factory().start()
    path = "CT/2026-11-23/1.2.3/1/cold.dcm"
    data = payload(path, 3 * 1024 * 1024 + 17)
    ftp = ftp_login(a)
    assert ftp_put(ftp, path, data).startswith("226")  # write-through: clean once acknowledged
    blob = blob_of(a, path)
    assert blob is not None

    done = evict_cli(a, path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "evicted" in done.stdout
    assert blob_of(a, path) is None
    assert not (a.workdir / "cache" / "data" / blob[:2] / blob).exists()
    assert [e for e in a.events("evicted") if e["path"] == path]

    # Cold read over FTP: fetched from S3, verified, and cached again.
    assert sha256(ftp_get(ftp, path)) == sha256(data)
    assert [e for e in a.wait_events("fetched") if e["path"] == path]  # logged once the copy is cached
    assert blob_of(a, path) is not None
    # ... evicted again, and read over SFTP.
    assert evict_cli(a, path).returncode == 0
    async with sftp_session(a) as sftp:
        async with sftp.open("/" + path, "rb") as f:
            assert sha256(await f.read()) == sha256(data)
    assert len([e for e in a.wait_events("fetched", 2) if e["path"] == path]) == 2
    assert s3_objects(seaweed, a.prefix)[path]["sha256"] == sha256(data)
    ftp.quit()


def test_evict_refuses_what_is_not_safe_in_s3(agent_factory, private_seaweed):
    """A dirty file (only on the SSD) is never evicted; unknown and escaping paths get clear errors."""
    store = private_seaweed
    a = agent_factory(store).start()
    store.stop()  # the line goes down: the next file stays dirty
    ftp = ftp_login(a)
    assert ftp_put(ftp, "CT/dirty.dcm", b"only here").startswith("226")
    done = evict_cli(a, "CT/dirty.dcm", "CT/missing.dcm", "../etc/passwd")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("CT/dirty.dcm: not evicted") and "not yet in object storage" in lines[0]
    assert lines[1].startswith("CT/missing.dcm: not evicted")
    assert lines[2].startswith("../etc/passwd: not evicted") and "escapes" in lines[2]
    assert blob_of(a, "CT/dirty.dcm") is not None
    assert ftp_get(ftp, "CT/dirty.dcm") == b"only here"
    # The admin path takes JSON only, from loopback only, with the agent's token.
    token = (a.workdir / "cache" / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{a.http_port}/admin/evict", data=b"not json", method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "path" in json.load(err.value)["error"]
    store.start()
    a.wait_drained(60)
    assert evict_cli(a, "CT/dirty.dcm").returncode == 0  # clean now: evictable
    ftp.quit()


def test_concurrent_cold_readers_share_one_fetch(agent_factory, seaweed):
    """Two clients open the same evicted file at once: both miss the cache, one GET serves both.

    The download line is limited (uplink.bwlimit) so the fetch lasts ~2 s and both readers are really
    waiting on it at the same time; both count as cache misses, yet there is one `fetched` event.
    """
    a = agent_factory(**{"uplink.bwlimit": "8MB", "uplink.through_timeout": 60}).start()
    path = "CT/2026-11-23/1.2.3/1/big.dcm"
    data = payload(path, BIG)
    ftp = ftp_login(a)
    assert ftp_put(ftp, path, data).startswith("226")
    ftp.quit()
    assert evict_cli(a, path).returncode == 0
    misses_before = metric(a, "pacsgw_cache_misses_total")

    results: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def reader(name: str) -> None:
        client = ftp_login(a)
        barrier.wait()
        results[name] = sha256(ftp_get(client, path))
        client.quit()

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"r1": sha256(data), "r2": sha256(data)}
    assert metric(a, "pacsgw_cache_misses_total") - misses_before == 2
    assert len([e for e in a.wait_events("fetched") if e["path"] == path]) == 1  # logged once cached
