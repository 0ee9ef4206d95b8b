"""Files open for reading (attack 20): a copy a reader holds open keeps its disk space even once evicted, so the
evictor leaves it (a read pin, seen by every serving process), and the files readers hold open are bounded
(cache.max_open_for_reading) so that readers can never pin the room the PACS's stores need."""

from __future__ import annotations

import asyncio
import ftplib
import multiprocessing
from pathlib import Path

import asyncssh
import pytest

from agent.store.writing import ReadPins
from faultkit import ftp_get, ftp_login, ftp_put, payload, sftp_session

MiB = 1024 * 1024


def _pin_and_report(lock: str, ready, leave) -> None:
    """Another serving process's reader: pins a.dcm, says so, then exits (or is killed) holding it."""
    pins = ReadPins(Path(lock))
    ready.put(pins.pin("a.dcm"))
    leave.wait()


def test_a_pin_of_any_process_keeps_the_copy_until_it_is_let_go(tmp_path):
    """An eviction is refused while any reader, of this process or another, holds the file open; a reader opening
    the file while its eviction runs is refused the pin (the copy is about to be gone: it fetches it instead); a
    process that dies lets its pins go with it."""
    lock = tmp_path / "reading.lock"
    mine, evictor = ReadPins(lock), ReadPins(lock)  # this process's readers, and the owner's evictor
    assert mine.pin("a.dcm") and mine.pin("a.dcm")  # two readers of one file
    with evictor.evicting("a.dcm") as may:
        assert not may
    mine.unpin("a.dcm")
    with evictor.evicting("a.dcm") as may:
        assert not may  # the second reader still has it open
    mine.unpin("a.dcm")
    with evictor.evicting("a.dcm") as may:
        assert may
        assert not mine.pin("a.dcm") and not evictor.pin("a.dcm")  # the eviction's own process's readers too
    assert mine.pin("a.dcm")  # once the eviction is over
    mine.unpin("a.dcm")

    ctx = multiprocessing.get_context("fork")
    ready, leave = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_pin_and_report, args=(str(lock), ready, leave))
    child.start()
    try:
        assert ready.get(timeout=60)
        with evictor.evicting("a.dcm") as may:
            assert not may
        with evictor.evicting("b.dcm") as may:
            assert may  # only what is pinned is kept
    finally:
        child.kill()
        child.join(60)
    with evictor.evicting("a.dcm") as may:
        assert may


def test_files_open_for_reading_are_bounded_and_one_is_always_let_in(agent_factory):
    """Readers together hold at most cache.max_open_for_reading of the cache (here 25% of 10 MB, 2.5 MB): the open
    of a file past it is refused (SFTP failure, FTP 451) until a reader closes one; a file larger than the whole
    bound is read when nothing else is open."""
    agent = agent_factory(**{"cache.max_bytes": "10MB", "cache.max_open_for_reading": 0.25,
                             "cache.max_unfinished_per_user": 0.5}).start()  # the 3 MiB file is stored
    f = ftp_login(agent)
    for i in range(3):
        ftp_put(f, f"r/{i}.dcm", payload(i, MiB))
    ftp_put(f, "r/big.dcm", payload("big", 3 * MiB))

    async def read_while_holding() -> tuple[str, bytes, bytes]:
        async with sftp_session(agent) as sftp:
            held = [await sftp.open(f"r/{i}.dcm", "rb") for i in range(2)]
            for path in ("r/2.dcm", "r/big.dcm"):
                with pytest.raises(asyncssh.SFTPFailure, match="open for reading"):
                    await sftp.open(path, "rb")
            with pytest.raises(ftplib.error_temp) as refused:
                await asyncio.to_thread(ftp_get, f, "r/2.dcm")
            await held[0].close()
            async with await sftp.open("r/2.dcm", "rb") as third:
                data = await third.read()
            await held[1].close()
            async with await sftp.open("r/big.dcm", "rb") as big:
                return str(refused.value), data, await big.read()

    refused, data, big = asyncio.run(read_while_holding())
    assert refused.startswith("451") and "open for reading" in refused
    assert data == payload(2, MiB)
    assert big == payload("big", 3 * MiB)
    assert agent.events("open_for_reading_limit")
    f.quit()
