"""A failure after a stored file's catalog row is committed leaves the file stored: its row and its cached copy both
stay, it reaches S3, a read returns it, fsck finds nothing wrong, and the client is told OK.

What runs after the row's commit is Gateway.stored: the removal of the version it replaced, the prior planner's and the
upload's header bookkeeping, an HA pair's read of the row, the start of the write-through upload. The copy there was
removed when any of it raised, and the committed row (dirty, or claimed for its upload: 'uploading') named a file that
no longer existed: its upload failed for ever, a read answered 'cached copy missing', fsck reported it lost.

The fault is injected by monkeypatching Gateway.stored to raise once, for one path, before any of its work: nothing
real can be made to fail there on demand. That is the only patch. The agent runs in this process (so that the patch
reaches it), over real SFTP and a real SeaweedFS; fsck runs as its own process once the agent has stopped.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncssh
import pytest

from agent.config import load
from agent.daemon import Agent
from agent.store.gateway import Gateway
from faultkit import catalog_rows, payload, sftp_put, sftp_session
from harness import s3_objects, sha256

PATH = "CT/2026-12-05/1.2.840.9/1/faulted.dcm"


def fsck(a) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fsck", "--config", str(a.config_path), "--json",
                          "--remote"], capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


@pytest.mark.parametrize("write_mode", ["through", "back"])
def test_a_failure_after_the_rows_commit_keeps_the_file(agent_factory, monkeypatch, write_mode):
    a = agent_factory(**{"uplink.write_mode": write_mode, "prefetch.enabled": False})
    data = payload(PATH, 300_000)
    armed = [PATH]
    stored = Gateway.stored

    def failing(self, path, *args):  # once, for PATH: the row is committed when stored runs
        if path in armed:
            armed.remove(path)
            raise RuntimeError("injected: a failure after the row's commit")
        return stored(self, path, *args)

    monkeypatch.setattr(Gateway, "stored", failing)

    async def run() -> None:
        agent = Agent(load(a.config_path))
        await agent.start()
        try:
            async with sftp_session(a) as sftp:
                told: Exception | None = None
                try:
                    await sftp_put(sftp, PATH, data)
                except asyncssh.SFTPError as e:
                    told = e
                assert armed == [], "the fault did not fire"
                (state, blob), = catalog_rows(a, "SELECT state, blob FROM entries WHERE path = ?", (PATH,))
                assert (a.workdir / "cache" / "data" / blob[:2] / blob).is_file(), \
                    f"the committed row ({state}) names a cached copy that was removed"
                # The file is durable and queued for its upload: the ack's condition (DESIGN.md, the durability
                # contract), as a write-through upload that failed is acknowledged
                assert told is None, f"told {told!r} for a stored file"
                await asyncio.to_thread(a.wait_drained, 30)  # the fault lifted: the upload runs from the queue
                async with sftp.open(PATH, "rb") as f:
                    assert await f.read() == data
        finally:
            await agent.stop()

    asyncio.run(run())
    assert catalog_rows(a, "SELECT state FROM entries WHERE path = ?", (PATH,)) == [("clean",)]
    assert s3_objects(a.store, a.prefix)[PATH]["sha256"] == sha256(data)
    code, report = fsck(a)
    assert (code, report["lost"], report["corrupt"], report["orphans"]) == (0, [], [], 0), report
