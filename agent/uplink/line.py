"""The line to object storage as one part: is it up, how many transfers may use it at once, how fast.

Uploads and cold-read fetches share its slots (memory pressure resizes them) and its bandwidth. A transfer
that fails because the line or the server is down marks the line down; a probe marks it up again. A server
that only asks us to slow down (503 SlowDown, 429) is up: `patiently` retries those calls with backoff.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import structlog

from agent.metrics import Metrics
from agent.uplink.ratelimit import Bandwidth
from agent.uplink.s3 import error_code, is_throttled, is_unreachable

log = structlog.get_logger("pacsgw.uplink")

PROBE_INTERVAL = 2.0
CHECK_TIMEOUT = 3.0  # a pooled connection into a dead line waits the whole read timeout: a probe answers sooner
THROTTLE_RETRIES = 6  # about 0.2 + 0.4 + ... + 6.4 s (jittered) before the queue's own backoff takes over
T = TypeVar("T")


def backoff(attempts: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) of the nominal delay."""
    return min(cap, base * 2.0 ** min(attempts, 16)) * random.uniform(0.5, 1.5)


class Limiter:
    """A semaphore whose limit can change while it is in use (memory pressure lowers it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._cond = asyncio.Condition()

    async def set_limit(self, limit: int) -> None:
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()


@dataclass
class UplinkHealth:
    reachable: bool = True
    last_error: str = ""
    since: float = field(default_factory=time.time)
    throttled: int = 0  # requests the server asked us to slow down on, since start


class Line:
    def __init__(self, probe: Callable[[], Awaitable[object]], metrics: Metrics, max_concurrency: int,
                 bandwidth: Bandwidth) -> None:
        self._probe_call, self.metrics, self.bandwidth = probe, metrics, bandwidth
        self.slots = Limiter(max_concurrency)
        self.health = UplinkHealth()
        self._up = asyncio.Event()
        self._up.set()
        self._watchers: list[Callable[[], None]] = []
        self._probing: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    def watch(self, on_up: Callable[[], None]) -> None:
        """Call on_up whenever the line comes back."""
        self._watchers.append(on_up)

    async def wait_up(self) -> None:
        await self._up.wait()

    async def start(self) -> None:
        try:
            await self._probe_call()
        except Exception as e:  # any failure means 'not reachable yet'
            self.went_down(e)

    async def stop(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)

    def went_down(self, exc: BaseException) -> None:
        self.health.last_error = f"{error_code(exc)}: {exc}"[:300]
        if self.health.reachable:
            self.health.reachable, self.health.since = False, time.time()
            self._up.clear()
            self.metrics.uplink_up.set(0)
            log.warning("uplink_unreachable", error=self.health.last_error, mode="write-back")
            self._probing = asyncio.create_task(self._probe(), name="uplink-probe")

    def answered(self) -> None:
        """A request went through: the line is up."""
        if not self.health.reachable:
            log.info("uplink_reachable", down_seconds=round(time.time() - self.health.since, 1))
            self.health.reachable, self.health.since, self.health.last_error = True, time.time(), ""
            self._up.set()
            for on_up in self._watchers:
                on_up()
        self.metrics.uplink_up.set(1)

    async def check(self) -> None:
        """Probe the line now, not only when a transfer fails: an HA box must give up the address on a dead
        line even when no upload is in flight."""
        if not self.health.reachable:
            return  # the probe loop runs until the line is back
        try:
            await asyncio.wait_for(self._probe_call(), CHECK_TIMEOUT)
        except Exception as e:  # only 'unreachable' matters here; transfers report the rest
            if is_unreachable(e):
                self.went_down(e)

    async def _probe(self) -> None:
        while not self.health.reachable:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._probe_call()
            except Exception as e:  # still down: keep the newest reason for /healthz
                self.health.last_error = f"{error_code(e)}: {e}"[:300]
                continue
            self.answered()

    async def patiently(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """call(), again after a jittered backoff while the server answers 'slow down'; other errors pass."""
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_throttled(exc) or attempt == THROTTLE_RETRIES:
                    raise
                self.health.throttled += 1
                delay = backoff(attempt, base=0.2, cap=10.0)
                log.info("uplink_throttled", path=what, error=error_code(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                attempt += 1
