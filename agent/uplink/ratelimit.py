"""Token buckets for the private line: the average rate never exceeds `rate` bytes per second."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


class TokenBucket:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = max(rate, 1)  # one second's worth
        self._tokens = float(self.capacity)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, n: int) -> None:
        """Wait until n bytes may be sent. Requests larger than the burst go into debt (average kept)."""
        if self.rate <= 0 or n <= 0:  # a rate of 0: unlimited
            return
        async with self._lock:  # FIFO: one waiter at a time keeps large transfers from starving
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


@dataclass(frozen=True)
class Bandwidth:
    """The line's rate, each way (0: unlimited)."""

    up: TokenBucket
    down: TokenBucket
