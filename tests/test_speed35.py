"""A write-back backlog is dispatched in batches (docs/benchmarks.md §41): the dispatcher refills the upload queue once
no more than a slot's worth of transfers is left, not after every finished upload, so its catalog queries (due_uploads,
next_due) come per batch, not per file; every file is still uploaded.

The agent runs in this process (so that the hold can be made longer than the test and the catalog's calls counted),
over real FTP and a real SeaweedFS."""

from __future__ import annotations

import os
import time
from collections import Counter

from test_speed33 import finish, open_slow_write, run_agent, wait_clean

from agent.store.catalog import AsyncCatalog
from agent.uplink import uploader
from faultkit import ftp_login, ftp_put

FILES = 32
CONCURRENCY = 4


def test_a_backlog_is_dispatched_in_batches(agent_factory, monkeypatch):
    # Every file is held until the slow write ends: then all FILES are due at once, 2 × CONCURRENCY fit the queue
    monkeypatch.setattr(uploader, "STORING_HOLD", 600.0)
    monkeypatch.setattr(uploader, "IDLE_POLL", 600.0)
    calls: Counter[str] = Counter()

    def counting(name: str):
        real = getattr(AsyncCatalog, name)

        def counted(self, *args, **kwargs):
            calls[name] += 1
            return real(self, *args, **kwargs)
        return counted

    for name in ("claim_due", "next_due"):
        monkeypatch.setattr(AsyncCatalog, name, counting(name))
    claimed: Counter[str] = Counter()
    claim_due = AsyncCatalog.claim_due  # counted

    async def claiming(self, *args, **kwargs):
        rows = await claim_due(self, *args, **kwargs)
        claimed.update(e.path for e in rows)
        return rows
    monkeypatch.setattr(AsyncCatalog, "claim_due", claiming)
    a = agent_factory(**{"uplink.write_mode": "back", "uplink.max_concurrency": CONCURRENCY,
                         "prefetch.enabled": False})
    paths = [f"batch/{i}.dcm" for i in range(FILES)]

    def body() -> None:
        ftp, data = open_slow_write(a, "slow.dcm")
        other = ftp_login(a)
        for path in paths:
            assert ftp_put(other, path, os.urandom(64 * 1024)).startswith("226")
        other.quit()
        time.sleep(0.5)
        calls.clear()
        finish(ftp, data)
        for path in ("slow.dcm", *paths):
            wait_clean(a, path, 60)

    run_agent(a, body)
    assert claimed == Counter(["slow.dcm", *paths])  # each row claimed once
    # A refill per CONCURRENCY finished uploads, and the last look (12 here); a refill per finished upload, with a
    # next_due behind many of them, before (31)
    assert calls["claim_due"] + calls["next_due"] <= FILES // 2, calls
