"""Operations: /healthz, /metrics, /status, `pacsgw status`, write-back mode, SIGTERM drain."""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from harness import PASSWORD, s3_objects, sha256


def fetch(agent, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def test_health_metrics_status(agent_factory):
    agent = agent_factory().start()
    h = agent.health()
    assert h["status"] == "ok" and h["uplink"]["reachable"] is True
    for key in ("version", "queue_depth", "oldest_dirty_seconds", "cache", "memory", "write_mode"):
        assert key in h
    assert h["memory"]["rss"] > 0 and h["cache"]["disk_total"] > 0
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    f.storbinary("STOR a.dcm", io.BytesIO(b"x" * 1000))
    f.retrbinary("RETR a.dcm", io.BytesIO().write)
    f.quit()
    status, text = fetch(agent, "/metrics")
    assert status == 200
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert metrics["pacsgw_cache_hits_total"] == 1
    assert metrics['pacsgw_bytes_received_total{protocol="ftp"}'] == 1000
    assert metrics['pacsgw_uploads_total{result="ok"}'] == 1
    assert metrics["pacsgw_upload_seconds_count"] == 1
    assert metrics["pacsgw_upload_queue_files"] == 0 and metrics["pacsgw_uplink_up"] == 1
    status, page = fetch(agent, "/status")
    assert status == 200 and "pacsgw" in page and "ok" in page and agent.store.endpoint_url in page
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--url", f"http://127.0.0.1:{agent.http_port}"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "object storage" in out.stdout and "reachable" in out.stdout
    ev = agent.events("uploaded")[0]
    assert ev["path"] == "a.dcm" and ev["bytes"] == 1000 and "seconds" in ev


def test_status_cli_without_agent(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True)
    assert out.returncode == 3 and "cannot reach the agent" in out.stderr


def test_a_session_told_a_passive_port_before_sigterm_hears_421_not_a_refused_connection(agent_factory):
    """The fleet's key rotation saw it: a PACS that got its PASV answer just before the agent stopped found the
    data port closed (ConnectionRefusedError: to a PACS, a failed transfer). Its data connection is taken and its
    STOR answered 421, the drain's word for "try again later"; nothing is stored."""
    import socket

    from faultkit import ftp_login

    agent = agent_factory().start()
    f = ftp_login(agent, timeout=30)
    f.voidcmd("TYPE I")
    host, port = ftplib.parse227(f.sendcmd("PASV"))
    agent.proc.send_signal(15)
    time.sleep(0.5)  # no transfer to wait for: the agent is closing its sessions now
    with socket.create_connection((host, port), timeout=10) as data:
        f.putcmd("STOR late.dcm")
        with pytest.raises(ftplib.error_temp, match="^421"):
            f.getresp()
        data.close()
    f.close()
    assert agent.proc.wait(60) == 0
    assert "late.dcm" not in s3_objects(agent.store, agent.prefix)


def test_write_back_mode_acks_first_then_drains(agent_factory):
    agent = agent_factory(**{"uplink.write_mode": "back"}).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    files = {f"d/{i}.dcm": os.urandom(20_000) for i in range(20)}
    for path, data in files.items():
        f.storbinary(f"STOR {path}", io.BytesIO(data))
    f.quit()
    agent.wait_drained()
    assert {p: r["sha256"] for p, r in s3_objects(agent.store, agent.prefix).items()} == \
        {p: sha256(d) for p, d in files.items()}
    assert all(not e["write_through"] for e in agent.events("stored"))


def test_sigterm_drains_in_flight_upload(agent_factory):
    """SIGTERM during a transfer: the transfer completes and is acknowledged, then the agent exits cleanly."""
    agent = agent_factory().start()
    data = os.urandom(4 * 1024 * 1024)
    result: dict = {}

    def slow_upload() -> None:
        f = ftplib.FTP(timeout=60)
        f.connect("127.0.0.1", agent.ftp_port)
        f.login("pacs", PASSWORD)
        f.voidcmd("TYPE I")
        with f.transfercmd("STOR slow.dcm") as conn:
            for i in range(0, len(data), 256 * 1024):
                conn.sendall(data[i:i + 256 * 1024])
                if i == 0:
                    result["started"] = time.monotonic()
                    time.sleep(1.5)  # SIGTERM arrives while the file is half sent
        result["reply"] = f.voidresp()
        f.close()  # the draining agent ends the session itself

    t = threading.Thread(target=slow_upload)
    t.start()
    while "started" not in result:
        time.sleep(0.05)
    time.sleep(0.3)
    idle = ftplib.FTP(timeout=30)  # logged in, between transfers
    idle.connect("127.0.0.1", agent.ftp_port)
    idle.login("pacs", PASSWORD)
    agent.proc.send_signal(15)
    t.join(60)
    assert result["reply"].startswith("226")
    assert agent.proc.wait(60) == 0
    with pytest.raises(ftplib.error_temp, match="^421"):  # told why its session ends, not just cut off
        idle.getresp()
    idle.close()
    stopped = agent.events("stopped")[0]
    assert stopped["drained"] is True and stopped["queued_files"] == 0
    assert s3_objects(agent.store, agent.prefix)["slow.dcm"]["sha256"] == sha256(data)
    # and no new sessions were accepted while draining / after
    try:
        ftplib.FTP().connect("127.0.0.1", agent.ftp_port, timeout=2)
        raise AssertionError("agent still accepting after SIGTERM")
    except OSError:
        pass
