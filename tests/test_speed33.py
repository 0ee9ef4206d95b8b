"""Write-back uploads wait while files are being stored (docs/benchmarks.md §39): a queued upload starts once its file
is STORING_HOLD old, or as soon as the last open write ends, never while a write is open and its file is younger.

The agent runs in this process (so that the hold can be shortened), over real FTP and a real SeaweedFS; the rows'
states are read from its catalog."""

from __future__ import annotations

import asyncio
import ftplib
import os
import time

from agent.config import load
from agent.daemon import Agent
from agent.uplink import uploader
from faultkit import catalog_rows, ftp_login, ftp_put


def state(a, path: str) -> str:
    return catalog_rows(a, "SELECT state FROM entries WHERE path = ?", (path,))[0][0]


def wait_clean(a, path: str, timeout: float) -> float:
    """→ seconds until path's row is clean (AssertionError after timeout)."""
    t0 = time.monotonic()
    while state(a, path) != "clean":
        assert time.monotonic() - t0 < timeout, f"{path} still {state(a, path)} after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def open_slow_write(a, path: str) -> tuple[ftplib.FTP, object]:
    """A STOR whose data connection stays open (a modality still sending): the agent has a write open."""
    ftp = ftp_login(a)
    data = ftp.transfercmd(f"STOR {path}")
    data.sendall(os.urandom(4096))
    return ftp, data


def finish(ftp: ftplib.FTP, data) -> None:
    data.close()
    assert ftp.voidresp().startswith("226")
    ftp.quit()


def run_agent(a, body) -> None:
    async def run() -> None:
        agent = Agent(load(a.config_path))
        await agent.start()
        try:
            await asyncio.to_thread(body)
        finally:
            await agent.stop()
    asyncio.run(run())


def test_an_upload_waits_for_its_hold_while_another_write_is_open(agent_factory, monkeypatch):
    hold = 4.0
    monkeypatch.setattr(uploader, "STORING_HOLD", hold)
    a = agent_factory(**{"uplink.write_mode": "back", "prefetch.enabled": False})

    def body() -> None:
        ftp, data = open_slow_write(a, "slow.dcm")
        other = ftp_login(a)
        assert ftp_put(other, "first.dcm", os.urandom(64 * 1024)).startswith("226")
        acked = time.monotonic()
        time.sleep(hold / 2)
        assert state(a, "first.dcm") == "dirty"  # held: a write is open and the file is younger than the hold
        wait_clean(a, "first.dcm", hold + 25)  # uploaded at its hold's end, the slow write still open
        assert time.monotonic() - acked >= hold * 0.9
        finish(ftp, data)
        other.quit()
        wait_clean(a, "slow.dcm", 30)  # the last write's end: uploaded at once, not a hold later

    run_agent(a, body)


def test_the_last_write_ending_starts_the_held_uploads_at_once(agent_factory, monkeypatch):
    # Longer than the test, as is the dispatcher's idle poll: only the end of the writes can start the uploads
    monkeypatch.setattr(uploader, "STORING_HOLD", 60.0)
    monkeypatch.setattr(uploader, "IDLE_POLL", 60.0)
    a = agent_factory(**{"uplink.write_mode": "back", "prefetch.enabled": False})

    def body() -> None:
        ftp, data = open_slow_write(a, "slow.dcm")
        other = ftp_login(a)
        for i in range(3):
            assert ftp_put(other, f"held/{i}.dcm", os.urandom(64 * 1024)).startswith("226")
        other.quit()
        time.sleep(1.0)
        assert {state(a, f"held/{i}.dcm") for i in range(3)} == {"dirty"}
        finish(ftp, data)
        for path in ("slow.dcm", *(f"held/{i}.dcm" for i in range(3))):
            wait_clean(a, path, 20)

    run_agent(a, body)
