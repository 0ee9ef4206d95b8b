"""A protected segment for newly written studies until their first read, sized and timed by the box's own traffic.

Where the cache holds less than a day of writes, most of the LRU→Belady gap is a new study pushed out before its first
read, hours after the write (docs/replay.md, round 7): recency ranks a study written this morning below one re-read an
hour ago, and the report is read this afternoon. The segment keeps written, unread studies out of the experts' reach

* while younger than the *horizon*: the `QUANTILE` of the write → first-read delays this box has seen (a study still
  unread past it is unlikely to be read soon: it goes back to the experts, ranked by its write time), and
* while the segment holds at most `MAX_SHARE` of the cache. How much it holds is the box's own: the unread studies
  written within the horizon (an hour of writes where reports come within the hour, a day's where they are read the
  next morning). Over the ceiling, of the oldest and the newest member the one where the learnt delays' hit density is
  lower (least likely to be read soon for the space it takes) is released first.

Until `WARM` first reads have been seen the horizon is 0 and nothing is protected (cold start: the experts alone).
Memory: one record per unread written study (bounded by `MAX_STUDIES`) and 40 floats. Policies decide, never do I/O;
the segment only holds back studies, it never offers one for eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from agent.policy.learned import _LOW, N_AGE, age_bucket, hit_density

QUANTILE = 0.9          # the horizon: this share of the first reads seen came sooner after the write
WARM = 50               # first reads seen before the segment protects anything
HALF_LIFE = 2_000       # first reads after which the delay histogram's weight halves (follow the box's traffic)
MAX_SHARE = 0.7         # the segment's ceiling, a share of the cache (chosen on the tuning families: 0.5 / 0.7 / 0.9)
MAX_STUDIES = 200_000
# a study evicted within this of its first write was still being written (a pass cut its newest files): not how long
# the cache keeps an unread study (trauma's 0.5 MB slices: 40 MB of such cuts alone made the residency 0)
WRITING_S = 600.0


class FreshSegment:
    def __init__(self) -> None:
        self.delays = np.zeros(N_AGE)                           # write → first read, log2-minute buckets
        self.density = np.zeros(N_AGE)
        self.first_reads = 0
        self.horizon = 0.0
        self.capacity = 0
        self.unread: OrderedDict[Any, float] = OrderedDict()    # written, not read yet (cached or not) → write time
        self.members: OrderedDict[Any, int] = OrderedDict()     # protected now, in write order → bytes
        self.total = 0
        self.lost = np.zeros(N_AGE)     # bytes of unread studies evicted, by their age then: the cache's residency

    def holds(self, study: Any) -> bool:
        return study in self.members

    def written(self, study: Any, size: int, now: float, again: bool = False) -> None:
        """`again`: a prior fetched back for a new study waits anew (its first write's time released it at once)."""
        if again or study not in self.unread:
            self.unread[study] = now
            self.unread.move_to_end(study)
            if len(self.unread) > MAX_STUDIES:
                self.unread.popitem(last=False)
        if self.horizon > 0:
            self.members[study] = self.members.get(study, 0) + size
            self.total += size

    def read(self, study: Any, now: float) -> None:
        """A file of `study` was read (a hit, or a miss that fetches it again)."""
        if (t0 := self.unread.pop(study, None)) is not None:
            self._learn(now - t0)
            self.total -= self.members.pop(study, 0)

    def forget(self, study: Any) -> bool:
        """Stop waiting for a study's first read (not a read: nothing is learnt). → whether it was still unread."""
        if self.unread.pop(study, None) is None:
            return False
        self.total -= self.members.pop(study, 0)
        return True

    def _learn(self, delay: float) -> None:
        self.delays[age_bucket(delay)] += 1
        self.first_reads += 1
        if self.first_reads % HALF_LIFE == 0:
            self.delays *= 0.5
            self.lost *= 0.5
        if self.first_reads >= WARM:
            cum = np.cumsum(self.delays)
            b = int(np.searchsorted(cum, QUANTILE * cum[-1]))
            self.horizon = float(_LOW[b + 1]) if b + 1 < N_AGE else float("inf")
            # per age bucket a: Σ_{x≥a} H(x) / Σ_{x≥a} (x − a) H(x), as the learned policy's density
            self.density = hit_density(self.delays, self.delays)[0]

    def removed(self, study: Any, size: int) -> None:
        """A file of `study` left the cache."""
        if (held := self.members.get(study)) is not None:
            self.total -= min(size, held)
            if held > size:
                self.members[study] = held - size
            else:
                del self.members[study]

    def evicted(self, study: Any, size: int, now: float) -> None:
        """A file of `study` was evicted: if the study was unread, the cache kept it unread this long."""
        if (t0 := self.unread.get(study)) is not None and now - t0 >= WRITING_S:
            self.lost[age_bucket(now - t0)] += size

    def read_in_time(self) -> float:
        """The chance that a study written now is read before the cache would evict it unread: its write → first-read
        delay (learnt) below the age at which unread studies were evicted lately (byte-weighted; half within a bucket).
        1 while the delays are not learnt or no unread study was evicted (a cache that keeps them until read)."""
        n, lost = self.delays.sum(), self.lost.sum()
        if self.first_reads < WARM or not n or not lost:
            return 1.0
        return float(self.lost @ ((np.cumsum(self.delays) - self.delays / 2) / n) / lost)

    def release(self, now: float) -> list[Any]:
        """Hand back to the experts the members past the horizon, then, while the segment holds more than its
        ceiling, the member least likely to be read soon for the space it takes: of the oldest and the newest
        (the hit density of the delays learnt, P(read at ≥ age) / E[time left], is lowest at one end when the
        delays have one mode), the lower. → the studies released."""
        out: list[Any] = []
        ceiling = MAX_SHARE * self.capacity
        while self.members:
            oldest = next(iter(self.members))
            if now - self.unread.get(oldest, now) <= self.horizon:
                if self.total <= ceiling:
                    break
                newest = next(reversed(self.members))
                if self._density(newest, now) < self._density(oldest, now):
                    oldest = newest
            self.total -= self.members.pop(oldest)
            out.append(oldest)
        return out

    def _density(self, study: Any, now: float) -> float:
        return float(self.density[age_bucket(now - self.unread.get(study, now))])

    def status(self) -> dict[str, object]:
        return {"fresh_horizon_s": round(self.horizon), "fresh_bytes": self.total,
                "fresh_read_in_time": round(self.read_in_time(), 3),
                "fresh_mode": "learned" if self.first_reads >= WARM else "cold start: nothing held"}
