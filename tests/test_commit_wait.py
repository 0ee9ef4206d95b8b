"""The wait of a commit (WriteHandle.commit): its durable part runs as a task of its own, so a client gone mid-commit
cancels only the wait, never the fsync or the catalog commit, and the waiter wakes in the same turn of the event loop
as if it awaited that task itself (asyncio.shield cost one turn more per acknowledged file). Turns are counted, not
timed: a callback that reschedules itself once per turn."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Coroutine

from agent.store.gateway import _detached

Wait = Callable[[Coroutine[object, object, int]], Awaitable[int]]


async def _plain(work: Coroutine[object, object, int]) -> int:
    return await asyncio.ensure_future(work)


async def _shielded(work: Coroutine[object, object, int]) -> int:
    return await asyncio.shield(asyncio.ensure_future(work))


async def _detached_wait(work: Coroutine[object, object, int]) -> int:
    out: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    _detached(work, out)
    return await out


async def _awaited(out: asyncio.Future[int]) -> int:
    return await out


async def _turns_to_wake(wait: Wait) -> int:
    """Turns of the loop from the work's last step to the wake-up of the task waiting for it through wait(work)."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    turns = 0

    def tick() -> None:
        nonlocal turns
        turns += 1
        loop.call_soon(tick)

    async def work() -> int:
        await gate
        loop.call_soon(tick)
        return 7

    async def waiter() -> int:
        assert await wait(work()) == 7
        return turns

    waiting = asyncio.ensure_future(waiter())
    for _ in range(3):
        await asyncio.sleep(0)
    gate.set_result(None)
    return await waiting


async def test_the_waiter_wakes_in_the_turn_a_plain_await_would_one_before_the_shields():
    direct = await _turns_to_wake(_plain)
    assert await _turns_to_wake(_shielded) == direct + 1
    assert await _turns_to_wake(_detached_wait) == direct


async def test_a_cancelled_waiter_leaves_the_work_to_finish_and_its_failure_unreported():
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    gate: asyncio.Future[None] = loop.create_future()
    done: list[str] = []

    async def work(fail: bool) -> int:
        await gate
        done.append("failed" if fail else "finished")
        if fail:
            raise OSError("the disk went away")
        return 7

    outs = [loop.create_future() for _ in range(2)]
    tasks = [_detached(work(fail), out) for fail, out in zip((False, True), outs, strict=True)]
    waiters = [asyncio.ensure_future(_awaited(out)) for out in outs]
    await asyncio.sleep(0)
    for w in waiters:
        w.cancel()  # the client went away mid-commit
    await asyncio.gather(*waiters, return_exceptions=True)
    assert not gate.done() and not any(t.done() for t in tasks)  # the work was not cancelled with its waiter
    gate.set_result(None)
    await asyncio.gather(*tasks)
    assert done == ["finished", "failed"] and all(out.cancelled() for out in outs)
    del tasks, outs
    gc.collect()
    assert reported == []  # no "exception never retrieved" for a failure nobody waits for any more


async def test_the_works_failure_and_its_cancellation_reach_the_waiter():
    loop = asyncio.get_running_loop()

    async def fails() -> int:
        raise OSError("no space")

    out: asyncio.Future[int] = loop.create_future()
    _detached(fails(), out)
    try:
        await out
    except OSError as e:
        assert str(e) == "no space"
    else:
        raise AssertionError("the failure was lost")

    blocked: asyncio.Future[None] = loop.create_future()

    async def stopped() -> int:
        await blocked
        return 1

    out = loop.create_future()
    task = _detached(stopped(), out)
    await asyncio.sleep(0)
    task.cancel()  # the agent stopping: the work itself is cancelled, so is its waiter's future
    await asyncio.gather(task, return_exceptions=True)
    assert out.cancelled()
