"""Reads are counted per directory per day in the catalog, and the counts survive restarts."""

from __future__ import annotations

import ftplib
import io
import sqlite3
import time

from agent.store.access import AccessStats
from harness import PASSWORD


def test_directory_key_and_drain():
    stats = AccessStats(dir_depth=2)
    assert stats.heat_dir("CT/2026-11-23/1.2.3/4/5.dcm") == "CT/2026-11-23"
    assert stats.heat_dir("top.dcm") == ""
    stats.note("CT/2026-11-23/s/1.dcm", 100, hit=True)
    stats.note("CT/2026-11-23/s/1.dcm", 100, hit=False)
    stats.note("MR/2026-11-22/s/2.dcm", 7, hit=False)
    files, heat = stats.drain()
    assert sorted((p, n) for p, _, n in files) == [("CT/2026-11-23/s/1.dcm", 2), ("MR/2026-11-22/s/2.dcm", 1)]
    today = time.strftime("%Y-%m-%d")
    assert sorted(heat) == [("CT/2026-11-23", today, 2, 1, 200), ("MR/2026-11-22", today, 1, 1, 7)]
    assert stats.drain() == ([], [])


def heat(agent) -> dict[str, tuple[int, int, int]]:
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT dir, reads, misses, bytes FROM heat").fetchall()
    db.close()
    return {d: (r, m, b) for d, r, m, b in rows}


def read_all(agent, paths: list[str]) -> None:
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    for p in paths:
        f.retrbinary(f"RETR {p}", io.BytesIO().write)
    f.quit()


def test_heat_survives_restart(agent_factory):
    agent = agent_factory().start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    for p in ("CT/2026-11-23/s1/1.dcm", "CT/2026-11-23/s2/1.dcm", "MR/2026-11-20/s3/1.dcm"):
        f.storbinary(f"STOR {p}", io.BytesIO(b"x" * 10))
    f.quit()
    read_all(agent, ["CT/2026-11-23/s1/1.dcm", "CT/2026-11-23/s2/1.dcm", "MR/2026-11-20/s3/1.dcm"])
    agent.stop()  # the drain flushes what is buffered
    assert heat(agent) == {"CT/2026-11-23": (2, 0, 20), "MR/2026-11-20": (1, 0, 10)}
    agent.start()
    read_all(agent, ["CT/2026-11-23/s1/1.dcm"])
    agent.stop()
    assert heat(agent)["CT/2026-11-23"] == (3, 0, 30)
    db = sqlite3.connect(agent.workdir / "cache" / "catalog.sqlite")
    assert db.execute("SELECT access_count FROM entries WHERE path = 'CT/2026-11-23/s1/1.dcm'").fetchone() == (2,)
