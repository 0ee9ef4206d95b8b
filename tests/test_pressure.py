"""Memory and disk pressure: the policy's levels, and a real agent pushed past its real RSS."""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
import sys
import time

from agent.policy.pressure import Level, Readings, Watermarks, assess, concurrency_at
from faultkit import ftp_login
from harness import s3_objects, sha256

W = Watermarks(disk_high=0.75, disk_critical=0.95, mem_available_high=8 << 30, mem_available_critical=2 << 30,
               rss_high=16 << 30, rss_critical=32 << 30)


def test_levels_and_reasons():
    assert assess(Readings(0.5, 20 << 30, 1 << 30), W).level is Level.NORMAL
    p = assess(Readings(0.8, 20 << 30, 1 << 30), W)
    assert p.level is Level.HIGH and "cache disk 80%" in p.reasons[0]
    p = assess(Readings(0.5, 1 << 30, 20 << 30), W)
    assert p.level is Level.CRITICAL and len(p.reasons) == 2  # memory critical, RSS high: both said
    assert assess(Readings(0.96, 20 << 30, 0), W).level is Level.CRITICAL
    assert assess(Readings(0.5, 20 << 30, 40 << 30), W).level is Level.CRITICAL
    no_rss_limit = Watermarks(0.75, 0.95, 8 << 30, 2 << 30, 0, 0)
    assert assess(Readings(0.5, 20 << 30, 1 << 40), no_rss_limit).level is Level.NORMAL


def test_concurrency_shrinks_with_pressure():
    assert [concurrency_at(lvl, 8) for lvl in Level] == [8, 4, 1]
    assert concurrency_at(Level.HIGH, 1) == 1


def wait_for(agent, level: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = agent.health()
        if h["pressure"]["level"] == level:
            return h
        assert time.monotonic() < deadline, h["pressure"]
        time.sleep(0.2)


def test_agent_under_memory_pressure_keeps_serving(agent_factory):
    """Watermarks below the agent's real RSS: critical, said on /healthz; writes, uploads and cached reads go on,
    fetches from S3 are refused with the reason."""
    prep = agent_factory(prefix="pressure/").start()  # an object that is only in S3
    f = ftp_login(prep)
    f.storbinary("STOR remote-only.dcm", io.BytesIO(b"in s3"))
    f.quit()
    prep.stop()

    agent = agent_factory(prefix="pressure/", **{"pressure.rss_high": "1MB", "pressure.rss_critical": "2MB",
                                                 "pressure.interval_seconds": 0.5,
                                                 "prefetch.enabled": True}).start()  # off by default
    h = wait_for(agent, "critical")
    assert h["status"] == "degraded" and any("agent memory" in r for r in h["pressure"]["reasons"])
    assert any("fetches from object storage refused" in r for r in h["reasons"])
    assert h["prefetch"]["state"] == "paused: pressure critical"
    refused = subprocess.run([sys.executable, "-m", "agent.cli", "prefetch", "--config", str(agent.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "prefetch paused: pressure critical" in refused.stderr
    f = ftp_login(agent)
    data = os.urandom(100_000)
    assert f.storbinary("STOR new.dcm", io.BytesIO(data)).startswith("226")
    buf = io.BytesIO()
    f.retrbinary("RETR new.dcm", buf.write)  # cached: served
    assert buf.getvalue() == data
    try:
        f.retrbinary("RETR remote-only.dcm", io.BytesIO().write)
        raise AssertionError("a fetch from S3 was allowed under critical pressure")
    except ftplib.error_temp as e:
        assert "451" in str(e) and "pressure critical" in str(e)
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["new.dcm"]["sha256"] == sha256(data)
    assert agent.events("pressure")[0]["now"] in ("high", "critical")
    metrics = urllib_get(agent, "/metrics")
    assert "pacsgw_pressure_level 2.0" in metrics


def test_high_memory_pressure_pauses_prefetch_and_keeps_serving(agent_factory):
    """Only the high RSS watermark is below the agent's real RSS: prefetch pauses in its window (said on
    /healthz), while stores, uploads and fetches from S3 go on at reduced concurrency."""
    prep = agent_factory(prefix="pressure-high/", **{"prefetch.enabled": False}).start()
    f = ftp_login(prep)
    f.storbinary("STOR CT/2026-11-20/s/remote-only.dcm", io.BytesIO(b"in s3"))
    f.quit()
    prep.stop()
    now = time.time()
    window = "-".join(time.strftime("%H:%M:%S", time.localtime(t)) for t in (now - 60, now + 600))
    agent = agent_factory(prefix="pressure-high/", **{
        "pressure.rss_high": "1MB", "pressure.rss_critical": 0, "pressure.interval_seconds": 0.5,
        "prefetch.enabled": True, "prefetch.window": window, "prefetch.check_seconds": 0.2}).start()
    h = wait_for(agent, "high")
    assert h["prefetch"]["state"] == "paused: pressure high" and h["status"] == "degraded"
    f = ftp_login(agent)
    data = os.urandom(50_000)
    assert f.storbinary("STOR new.dcm", io.BytesIO(data)).startswith("226")
    buf = io.BytesIO()
    f.retrbinary("RETR CT/2026-11-20/s/remote-only.dcm", buf.write)  # high pressure still fetches
    assert buf.getvalue() == b"in s3"
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["new.dcm"]["sha256"] == sha256(data)
    time.sleep(1.0)  # several prefetch checks inside the window
    assert not agent.events("prefetch_start")


def urllib_get(agent, path: str) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}{path}", timeout=10) as r:
        return r.read().decode()
