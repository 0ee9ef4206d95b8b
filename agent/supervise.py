"""Background loops that outlive an unexpected exception (docs/architecture.md, "Loops outlive exceptions").

A loop that raised used to end silently, its work stopped for ever while /healthz said ok (a catalog another
process held locked past its busy timeout). One that keeps crashing makes /healthz degraded (STEADY_SECONDS).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import structlog

from agent.metrics import Metrics

log = structlog.get_logger("pacsgw.loops")

RESTART_CAP = 60.0  # the longest wait before a loop that keeps crashing starts again
STEADY_SECONDS = 300.0  # a loop that ran this long before crashing starts again at once (its backoff resets)
CRASH_SHOWN_SECONDS = 3600.0  # /healthz names a loop's crash among its reasons this long


@dataclass
class LoopState:
    crashes: int = 0
    last_error: str = ""
    last_crash: float = 0.0  # time.time() of the last crash
    in_a_row: int = 0  # crashes each within STEADY_SECONDS of the restart before it


class Loops:
    """The background loops of one part of the agent, each started again after an unexpected exception."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.tasks: list[asyncio.Task[None]] = []
        self.state: dict[str, LoopState] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """loop() as a task named name: one that returns is done (a one-shot run), one that raises is called again."""
        task = asyncio.create_task(self._keep(name, loop), name=name)
        self.tasks = [t for t in self.tasks if not t.done()] + [task]  # one-shot runs (a takeover's unlist) end
        return task

    def every(self, name: str, seconds: float, call: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
        """start() a loop named name that awaits call() every `seconds`, the first time after one wait."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                await call()
        return self.start(name, loop)

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        state = self.state.setdefault(name, LoopState())
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except Exception as exc:  # anything but a cancel: the loop must go on, the crash must be seen
                state.in_a_row = 1 if time.monotonic() - started > STEADY_SECONDS else state.in_a_row + 1
                delay = min(RESTART_CAP, 2.0 ** (state.in_a_row - 2)) if state.in_a_row > 1 else 0.0  # 1, 2, 4 … s
                state.crashes += 1
                state.last_error, state.last_crash = f"{type(exc).__name__}: {exc}"[:300], time.time()
                self.metrics.loop_crashes.labels(name).inc()
                log.error("loop_crashed", loop=name, error=type(exc).__name__, detail=str(exc)[:300],
                          crashes=state.crashes, restart_in=round(delay, 2), exc_info=exc)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    def crash_looping(self) -> bool:
        """Some loop crashed again within STEADY_SECONDS of its restart, less than STEADY_SECONDS ago."""
        now = time.time()
        return any(s.in_a_row >= 2 and now - s.last_crash < STEADY_SECONDS for s in self.state.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """/healthz's `loops`: the loops that crashed at least once."""
        return {name: asdict(s) for name, s in self.state.items() if s.crashes}
