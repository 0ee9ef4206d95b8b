"""The line to object storage as one part: is it up, how many transfers may use it at once (uploads and cold-read
fetches share its slots and bandwidth), how fast. It is called down only on sustained failure (FAILURES_TO_DOWN):
a down line degrades the box to write-back and moves an HA pair's address, so one S3 5xx or one dropped connection
is retried, not an outage; a server that only asks us to slow down (503 SlowDown, 429) is up (`patiently`).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import structlog

from agent.metrics import Metrics
from agent.supervise import Loops
from agent.uplink.ratelimit import Bandwidth
from agent.uplink.s3 import error_code, is_server_error, is_throttled, is_unreachable

log = structlog.get_logger("pacsgw.uplink")

PROBE_INTERVAL = 2.0
FAILURES_TO_DOWN = 3  # unreachable failures in a row (transfers and confirming probes) that make the line down
CONFIRM_INTERVAL = 0.5  # after a failure, probe this often until the line answers or is called down
CHECK_TIMEOUT = 3.0  # a pooled connection into a dead line waits the whole read timeout: a probe answers sooner
THROTTLE_RETRIES = 6  # about 0.2 + 0.4 + ... + 6.4 s (jittered) before the queue's own backoff takes over
SERVER_ERROR_RETRIES = 5  # a reader's GET answered 500/502/503/504: about 0.25 + 0.5 + 1 + 2 + 2 s, then "unavailable"
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


class Line:
    def __init__(self, probe: Callable[[], Awaitable[object]], metrics: Metrics, max_concurrency: int,
                 bandwidth: Bandwidth) -> None:
        self._probe_call, self.metrics, self.bandwidth = probe, metrics, bandwidth
        self.slots = Limiter(max_concurrency)
        self.health = UplinkHealth()
        self.up = asyncio.Event()  # set while the line is up: the upload loops wait on it
        self.up.set()
        self._watchers: list[Callable[[], None]] = []
        self.loops = Loops(metrics)  # the probe and the confirm loop: a crash is logged, shown, and restarted
        self._confirming: asyncio.Task[None] | None = None
        self.failures = 0  # unreachable failures since the last answer

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    def watch(self, on_up: Callable[[], None]) -> None:
        self._watchers.append(on_up)

    async def start(self) -> None:
        try:
            await self._probe_call()
        except Exception as e:  # any failure means 'not reachable yet'
            self.went_down(e)

    async def stop(self) -> None:
        await self.loops.stop()

    def failed(self, exc: BaseException) -> None:
        """A request failed as 'unreachable' (is_unreachable). One failure is not an outage: count it, and probe
        until the line answers (then it stays up) or FAILURES_TO_DOWN failures in a row make it down."""
        self.failures += 1
        if not self.health.reachable or self.failures >= FAILURES_TO_DOWN:  # already down: the newest reason kept
            self.went_down(exc)
            return
        log.info("uplink_failure", error=f"{error_code(exc)}: {exc}"[:300], in_a_row=self.failures,
                 down_at=FAILURES_TO_DOWN)
        if self._confirming is None or self._confirming.done():
            self._confirming = self.loops.start("uplink-confirm", self._confirm)

    async def _confirm(self) -> None:
        while self.health.reachable and self.failures:
            await asyncio.sleep(CONFIRM_INTERVAL)
            if self.health.reachable and self.failures:  # else a transfer answered meanwhile, or the line is down
                await self._probe_once()

    async def _probe_once(self) -> None:
        try:
            await asyncio.wait_for(self._probe_call(), CHECK_TIMEOUT)
        except Exception as e:  # only 'unreachable' counts; any other error is an answer (transfers report it)
            if is_unreachable(e):
                self.failed(e)
            else:
                self.failures = 0
            return
        self.answered()

    def went_down(self, exc: BaseException) -> None:
        """The line is down (sustained failure, or no answer at start): write-back until a probe answers."""
        self.health.last_error = f"{error_code(exc)}: {exc}"[:300]
        self.failures = 0
        if self.health.reachable:
            self.health.reachable, self.health.since = False, time.time()
            self.up.clear()
            self.metrics.uplink_up.set(0)
            log.warning("uplink_unreachable", error=self.health.last_error, mode="write-back")
            self.loops.start("uplink-probe", self._probe)

    def answered(self) -> None:
        """A request went through: the line is up."""
        self.failures = 0
        if not self.health.reachable:
            log.info("uplink_reachable", down_seconds=round(time.time() - self.health.since, 1))
            self.health.reachable, self.health.since, self.health.last_error = True, time.time(), ""
            self.up.set()
            for on_up in self._watchers:
                on_up()
        self.metrics.uplink_up.set(1)

    async def check(self) -> None:
        """Probe the line now, not only when a transfer fails: an HA box must give up the address on a dead
        line even when no upload is in flight (a failed check counts like a failed transfer)."""
        if self.health.reachable:  # else the probe loop runs until the line is back
            await self._probe_once()

    async def _probe(self) -> None:
        while not self.health.reachable:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._probe_call()
            except Exception as e:  # still down: keep the newest reason for /healthz
                self.health.last_error = f"{error_code(e)}: {e}"[:300]
                continue
            self.answered()

    async def patiently(self, call: Callable[[], Awaitable[T]], what: str, server_errors: int = 0) -> T:
        """call(), again after a jittered backoff while the server answers 'slow down'; up to server_errors
        times also after another 5xx it answered (a reader waits that out; the upload queue does not ask: it
        has its own retries, and those failures count towards calling the line down); other errors pass."""
        throttled = failed = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if is_throttled(exc) and throttled < THROTTLE_RETRIES:
                    delay, throttled = backoff(throttled, base=0.2, cap=10.0), throttled + 1
                    log.info("uplink_throttled", path=what, error=error_code(exc), retry_in=round(delay, 2))
                elif is_server_error(exc) and failed < server_errors:
                    delay, failed = backoff(failed, base=0.25, cap=2.0), failed + 1
                    log.info("uplink_server_error", path=what, error=error_code(exc), retry_in=round(delay, 2))
                else:
                    raise
                await asyncio.sleep(delay)
