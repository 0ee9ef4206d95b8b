"""agent/supervise.Loops: a loop that raised starts again; one that keeps crashing is told apart from one that
crashed once (/healthz is degraded only for the first)."""

from __future__ import annotations

import asyncio

from agent.metrics import Metrics
from agent.supervise import Loops


def test_a_loop_that_keeps_crashing_is_crash_looping_one_that_crashed_once_is_not():
    async def main() -> tuple[bool, bool, int]:
        loops, calls = Loops(Metrics()), {"once": 0, "always": 0}

        async def once() -> None:
            calls["once"] += 1
            if calls["once"] == 1:
                raise RuntimeError("a one-off")
            await asyncio.Event().wait()

        async def always() -> None:
            calls["always"] += 1
            raise OSError("database is locked")

        loops.start("once", once)
        await asyncio.sleep(0.2)
        after_one_crash = loops.crash_looping()
        loops.start("always", always)
        await asyncio.sleep(1.5)  # crashes at once, again at once, then 1 s later
        crash_looping = loops.crash_looping()
        status = loops.status()
        await loops.stop()
        assert status["once"]["crashes"] == 1 and status["always"]["crashes"] >= 2, status
        return after_one_crash, crash_looping, calls["once"]

    after_one_crash, crash_looping, once_calls = asyncio.run(main())
    assert not after_one_crash and crash_looping
    assert once_calls == 2, "a loop that crashed starts again"
