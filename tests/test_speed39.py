"""A write-back STOR's ack without the loop turns that were not the contract (docs/benchmarks.md §45): the upload's end
is read at once after its last block, and the 226 goes in the turn of the loop that learned the row is committed,
still after the file's fsync and the catalog's COMMIT.

The agent runs in this process, over real FTP and a real SeaweedFS; the turns of its loop are counted by a callback
that schedules itself once a turn, the catalog's COMMITs by an sqlite3 trace callback on its real connection, the data
file's fsync by a spy on os.fsync."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading

from agent.config import load
from agent.daemon import Agent
from agent.store import gateway
from faultkit import ftp_login


def test_a_write_back_stor_is_acked_in_the_turn_its_row_came_back(agent_factory, monkeypatch):
    a = agent_factory(**{"uplink.write_mode": "back", "prefetch.enabled": False})
    seq = itertools.count()
    events: list[tuple[int, str, int]] = []  # (order, what, the loop's turn)
    turn = 0

    def note(what: str) -> None:
        events.append((next(seq), what, turn))

    real_write, real_commit, real_row_back = (gateway.WriteHandle.write, gateway.WriteHandle.commit,
                                              gateway.WriteHandle._row_back)

    async def write(self, data, offset=None):
        await real_write(self, data, offset)
        note("block")

    files: set[int] = set()  # the fds of the files being committed

    async def commit(self, *args):
        note("commit")
        files.add(self.fd)
        await real_commit(self, *args)

    def row_back(self, *args):
        note("row")
        files.discard(self.fd)
        real_row_back(self, *args)

    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        if fd in files:
            note("fsync")

    real_stream_write = asyncio.StreamWriter.write

    def stream_write(self, data):
        if bytes(data[:4]) == b"226 ":
            note("226")
        real_stream_write(self, data)

    monkeypatch.setattr(gateway.WriteHandle, "write", write)
    monkeypatch.setattr(gateway.WriteHandle, "commit", commit)
    monkeypatch.setattr(gateway.WriteHandle, "_row_back", row_back)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(asyncio.StreamWriter, "write", stream_write)

    async def run() -> None:
        nonlocal turn
        loop = asyncio.get_running_loop()
        agent = Agent(load(a.config_path))
        await agent.start()
        agent.db.catalog.db.set_trace_callback(lambda sql: sql == "COMMIT" and note("COMMIT"))
        counting = True
        sent = threading.Event()

        def tick() -> None:  # once a turn: call_soon from a callback runs in the next turn
            nonlocal turn
            turn += 1
            if counting:
                loop.call_soon(tick)

        def stor() -> str:
            ftp = ftp_login(a)
            try:
                ftp.sendcmd("TYPE I")
                data = ftp.transfercmd("STOR one.dcm")  # the 150 is in: the agent reads the data connection
                # The loop stands still until the file and its end are all in the socket: the agent finds both at once
                # (until this thread has sent them, not for a fixed time: on a loaded machine 0.5 s was not enough)
                loop.call_soon_threadsafe(sent.wait, 30)
                try:
                    data.sendall(os.urandom(96 * 1024))
                    data.close()
                finally:
                    sent.set()
                return ftp.voidresp()
            finally:
                ftp.quit()

        try:
            events.clear()
            tick()
            reply = await asyncio.to_thread(stor)
        finally:
            counting = False
            await agent.stop()
        assert reply.startswith("226")

    asyncio.run(run())
    whats = [w for _, w, _ in events]
    assert whats.count("226") == 1 and whats.count("fsync") == 1 and whats.count("row") == 1, events
    at = {w: (i, t) for i, w, t in events}  # the last of each
    # acknowledged = durable: the data file's fsync, then the row's COMMIT, then the row's result, then the 226
    assert [w for i, w, _ in events if at["fsync"][0] < i < at["row"][0]].count("COMMIT") >= 1, events
    assert at["fsync"][0] < at["row"][0] < at["226"][0], events
    # No turn of the loop between the last block and the commit (main: one, the receive's turn before each read)...
    assert at["commit"][1] == at["block"][1], events
    # ...nor between the row's result and the 226 (main: one, the commit's task waking up)
    assert at["226"][1] == at["row"][1], events
