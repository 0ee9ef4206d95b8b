"""`adaptive`: whole-study eviction by whichever of two experts serves this box's traffic better now.

The experts are study LRU (`StudyLRU`: recency, right where re-reads come within days) and the learned hit density
(`HitDensity`: right where the cache holds less than the re-read interval, or reads follow a schedule). Each has a
*shadow*: a metadata-only cache of the same capacity that sees every request and evicts by that expert alone, counting
its hits, decayed every `window` requests. The real cache evicts with the expert whose shadow scored more
(ARC/CACHEUS-style expert choice, by simulation rather than by regret). The learned expert ranks the real cache with its
shadow's model, which learns from an undisturbed run of its own policy (its evictions and ghosts), not the other's.

In the real cache both experts leave alone the new studies that the fresh segment holds until their first read
(agent/policy/fresh.py: its horizon learnt from this box's write → first-read delays), and the priors prefetched for
them until their session (`HOLD_PRIORS`). Before either expert is asked, the files of priors that session passed by
unopened go (`DROP_UNOPENED`), then those of studies on probation (`_Doorkeeper`: a study read on a miss, or a prior
opened in its session, `PROBATION_OPENED`, until its second session; a written study that came back before has a
doorkeeper of its own, walked after the first, `KNOWN_BACK`). The last victim study of a pass gives up only the files
the pass needs, its last ones first (`TRIM`, agent/policy/eviction.py `trim`): Belady keeps the first files of the
study read farthest off, and a whole 1 GB study dropped to free a few MB leaves a small cache part empty.

The shadows' capacity is learnt from the eviction calls (the cache's size when it has to shed bytes). Memory: four
study indexes instead of one (~100 B per cached file and study each). Policies decide, never do I/O: the caller offers
only clean files, so a file not yet in S3 is never a victim.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from itertools import chain
from typing import Any, Iterator

import numpy as np

from agent.policy.eviction import DAY, FileTable, StudyLRU
from agent.policy.fresh import FreshSegment
from agent.policy.learned import Attrs, HitDensity


class _Shadow:
    """A metadata-only cache of one expert: which files it would hold, and how many requests it served."""

    def __init__(self, policy: StudyLRU | HitDensity) -> None:
        self.policy = policy
        self.size: dict[Any, int] = {}
        self.used = 0
        self.score = 0.0

    def request(self, key: Any, size: int, now: float, created: float, study: Any, prefetch: bool,
                capacity: int, written: bool = False) -> None:
        if key in self.size:
            if not prefetch:
                self.score += 1
            self.policy.on_access(key, now)
            return
        self.size[key] = size
        self.used += size
        self.policy.on_insert(key, size, now, created, study, prefetch, written)
        if capacity and self.used > capacity:
            for v in self.policy.victims(self.used - capacity, now):
                self.used -= self.size.pop(v, 0)


# the doorkeeper (`_Doorkeeper`): chosen on the tuning families (docs/replay.md, round 10); bench/gap_share.py
# --doorkeeper overrides
DOORKEEPER = True
SESSION_S = 600.0       # reads of one study closer than this are one session (learned.HitDensity.session_s)
# a study acquired longer ago and read on a miss is on probation; one acquired within the day is a new study read on a
# miss (written and evicted before its first read, or written through another box); docs/replay.md, round 16
OLD_S = DAY
MAX_BACK = 0.5          # probation while fewer of the studies through the door come back for a second session
WARM = 50               # studies through the door before it decides
HALF_LIFE = 2_000       # studies through the door after which its counts' weight halves
# a prior prefetched for a new study is held like a written study until its first read (docs/replay.md, round 11);
# bench/gap_share.py --hold-priors overrides
HOLD_PRIORS = True
# ... and no longer: a linked prior not opened in its new study's first session (the viewer hangs the priors first) is
# not waiting for anything; it leaves the fresh segment when that session is over, and with `DROP_UNOPENED` its files go
# first (docs/replay.md, round 19); bench/gap_share.py --unopened overrides
RELEASE_UNOPENED = True
DROP_UNOPENED = True
# a linked prior opened in that session is a one-off read like an old study read on a miss (the doorkeeper's example):
# when the session is over it is on the doorkeeper's probation until a second session (docs/replay.md, round 19);
# bench/gap_share.py --probation-opened overrides
PROBATION_OPENED = True
# the second door: a written study after its first session is on probation (as a study read on a miss is) while the
# cache turns over sooner than the `BACK_Q` quantile of the studies' return times (`COLD_BACK` before `WARM` returns);
# docs/replay.md, round 14; bench/gap_share.py --second-door overrides
SECOND_DOOR = True
BACK_Q = 0.25
COLD_BACK = DAY
# a written study that came back for a second session (the second door's book) and is read on a miss again goes
# through a doorkeeper of its own, with its own count of studies that come back: outpatient's follow-ups do, general's
# re-read studies do not (docs/replay.md, round 32); bench/gap_share.py --known-back overrides
KNOWN_BACK = True
INFLOW_TAU = DAY        # the inflow rate behind the turnover time is a moving average over about a day
# the last victim study of a pass gives up only the files the pass needs, its last ones first, not the whole study
# (eviction.trim; docs/replay.md, round 12); bench/gap_share.py --trim overrides
TRIM = True
# a cut frees at least this share of the cache: without it the simulator's passes (just enough for each insert) cut a
# file or two per insert once the cache is full, each after a new sample of the learned expert (3x the replay's CPU at
# 1 TB); the live agent's passes free more anyway (its watermarks)
MIN_CUT = 0.02
# a prior's heat into a full cache × P(read before evicted unread) ** this: the heat, learnt from outcomes, counts the
# evictions already, so the full chance discounts them twice (tuning sum -85; 0.5: -10; docs/replay.md, round 39)
IN_TIME_POWER = 0.5


class _Doorkeeper:
    """TinyLFU's doorkeeper at study granularity: a study read on a miss (acquired over `OLD_S` ago, not
    prefetched) that this box has not seen through the door before is on *probation*: its files go first, even while
    it is read (a one-off read does not come back to a file it has read: the archive tail, a prior opened once beside
    its new study, a follow-up of a study the cache let go). Its second session (a read after the first session
    ended) finds it known and it is cached like any study, so a case opened again and again is kept from then on.

    Whether probation pays is the box's own: it is on while fewer than `MAX_BACK` of the studies through the door
    came back for a second session (counts halved every `HALF_LIFE` studies); before `WARM` studies, on (cold start,
    `/status` says so; a cold start off lost up to 19 points on the tuning families: the first evictions decide which
    kinds of prior the planner goes on fetching). Memory: one key and float per study through the door (bounded by
    `max_seen`) and the file keys of those on probation."""

    def __init__(self, max_seen: int = 200_000) -> None:
        self.probation: OrderedDict[Any, dict[Any, int]] = OrderedDict()   # study → its cached files
        # through the door → the last read of its first session; None: it came back
        self.seen: OrderedDict[Any, float | None] = OrderedDict()
        # A pass takes files from the few studies on probation that hold some, and drops the studies it went past whose
        # session is over. In a flat store (a study per file) thousands of emptied studies wait out their session at the
        # head, and walking them on every pass (one per insert) was 40 % of the replay. So a pass walks the filled
        # studies only, in probation order (`_pos`: a study's place; `_filled`: a heap of (place, study) of those that
        # got files), and finds the ones to drop through two more heaps: (last read, place, study) of studies on
        # probation, by time, and (place, study) of those whose session is over, by place. Entries outlive changes; each
        # is checked against the study's state when it comes out.
        self._pos: dict[Any, int] = {}
        self._joined = 0
        self._filled: list[tuple[int, Any]] = []
        self._by_read: list[tuple[float, int, Any]] = []
        self._over: list[tuple[int, Any]] = []
        self.max_seen = max_seen
        self.sent = self.back = 0.0
        self.gaps: deque[float] = deque(maxlen=256)     # the last returns: first session → second
        # the `BACK_Q` quantile of the times from a first session to the second of the last studies that came back
        # (`COLD_BACK` before `WARM` of them)
        self.back_time = COLD_BACK

    @property
    def on(self) -> bool:
        return self.sent < WARM or self.back < MAX_BACK * self.sent

    def inserted(self, key: Any, size: int, now: float, study: Any, tail: bool) -> None:
        if study in self.seen:
            self.read(study, now)
        elif tail:
            self.seen[study] = now
            if len(self.seen) > self.max_seen:
                forgotten, _ = self.seen.popitem(last=False)
                if forgotten in self._pos:      # its session is over: `seen` no longer has its last read
                    heapq.heappush(self._over, (self._pos[forgotten], forgotten))
            self.sent += 1
            if self.sent >= HALF_LIFE:
                self.sent, self.back = self.sent / 2, self.back / 2
            if self.on:
                self._join(study)
            if study in self._pos:      # (on probation still when `seen` had forgotten it, even with the door shut)
                heapq.heappush(self._by_read, (now, self._pos[study], study))
        if (files := self.probation.get(study)) is not None:
            if not files:
                heapq.heappush(self._filled, (self._pos[study], study))
            files[key] = size

    def _join(self, study: Any) -> None:
        """Put a study on probation with no files (one forgotten by `seen` while on it keeps its place and files)."""
        self.probation.setdefault(study, {})
        if study not in self._pos:
            self._pos[study] = self._joined
            self._joined += 1
        if len(self.probation) > self.max_seen:    # studies whose files all left while the door was shut
            self._leave(next(iter(self.probation)))

    def _leave(self, study: Any) -> None:
        del self.probation[study]
        del self._pos[study]

    def came_back(self, study: Any) -> bool:
        return study in self.seen and self.seen[study] is None

    def read(self, study: Any, now: float) -> None:
        if (last := self.seen.get(study)) is None:
            return
        if now - last > SESSION_S:      # a second session: an ordinary study from now on
            self.seen[study] = None
            self.back += 1
            self.gaps.append(now - last)
            if len(self.gaps) >= WARM:
                self.back_time = sorted(self.gaps)[int(BACK_Q * len(self.gaps))]
            if study in self._pos:
                self._leave(study)
        else:
            self.seen[study] = now
            if study in self._pos:
                heapq.heappush(self._by_read, (now, self._pos[study], study))

    def victims(self, now: float) -> Iterator[Any]:
        """Every cached file on probation; a study whose session is over leaves probation (when the pass ends: a pass
        takes what it needs from the head, and a copy of a long probation list per pass made the replay quadratic).
        The caller takes (`removed`) each file before it asks for the next."""
        reached = math.inf      # the place of the study the pass stopped in (it and those after it stay)
        try:
            while self._filled:
                # the head study stays in the heap until emptied: a pass (one per insert once the cache is full) mostly
                # stops inside it, and a pop and push per pass was a tenth of the replay
                pos, study = self._filled[0]
                files = self.probation[study] if self._pos.get(study) == pos else None
                if files:
                    reached = pos
                    # the first file left is the next one (no copy of a large study's list per pass)
                    while files:
                        key = next(iter(files))
                        yield key
                        if key in files:        # not taken: the caller broke the contract; end the walk
                            return
                heapq.heappop(self._filled)     # gone from probation, emptied, or a second entry of one emptied
            reached = math.inf
        finally:
            self._drop_over(reached, now)

    def _drop_over(self, reached: float, now: float) -> None:
        """Drop the studies on probation before place `reached` whose session is over."""
        # the heap's first entry has the earliest read: if its session is not over, no other entry's is
        while self._by_read and now - self._by_read[0][0] > SESSION_S:
            _, pos, study = heapq.heappop(self._by_read)
            if self._pos.get(study) == pos:
                heapq.heappush(self._over, (pos, study))
        while self._over and self._over[0][0] < reached:
            pos, study = heapq.heappop(self._over)
            # a study read again since has a later entry in `_by_read`
            if self._pos.get(study) == pos and now - (self.seen.get(study) or 0.0) > SESSION_S:
                self._leave(study)

    def removed(self, study: Any, key: Any) -> None:
        if (files := self.probation.get(study)) is not None:
            files.pop(key, None)

    def status(self) -> dict[str, object]:
        mode = "cold start: on" if self.sent < WARM else "on" if self.on else "off (studies come back)"
        return {"doorkeeper": mode, "doorkeeper_back": round(self.back / max(self.sent, 1.0), 3)}


class Adaptive:
    name = "adaptive"
    online = True

    def __init__(self, window: int = 20_000, decay: float = 0.9, attrs: Attrs | None = None) -> None:
        self.window, self.decay = window, decay
        # the real cache's learned index ranks with the shadow's model and learns nothing itself: a model fitted on the
        # mixed evictions of the real cache would drift from its shadow's (and cost a refit every 100 events); new
        # studies are kept until their first read while the box's traffic says so (agent/policy/fresh.py)
        self.fresh = FreshSegment()
        self.lru = StudyLRU(held=self.fresh.holds)
        self.learned = HitDensity(learn=False, attrs=attrs, held=self.fresh.holds)
        self.model = HitDensity(attrs=attrs)  # the learned shadow's: it ranks and admits for the real cache
        self.shadows = (_Shadow(StudyLRU()), _Shadow(self.model))
        self._meta: dict[Any, tuple[int, float, Any]] = {}    # key → (size, created, study) of cached files
        self.used = 0
        self.capacity = 0
        self.requests = 0
        self.use_learned = True
        self.door = _Doorkeeper() if DOORKEEPER else None
        # the second door: written studies after their first session (`SECOND_DOOR`)
        self.door2 = _Doorkeeper() if SECOND_DOOR else None
        self.door2_open = False
        self.door_known = _Doorkeeper() if DOORKEEPER and KNOWN_BACK and SECOND_DOOR else None
        self.written: OrderedDict[Any, None] = OrderedDict()    # studies written here (newest 200k)
        self._inflow = 0.0      # bytes inserted, decayed with INFLOW_TAU (≈ the inflow rate × INFLOW_TAU)
        self._inflow_at = 0.0
        self.linked: OrderedDict[Any, Any] = OrderedDict()   # prior → the new study it was fetched for (newest 10k)
        self.waiting: OrderedDict[Any, list[Any]] = OrderedDict()    # new study → its linked priors, until its read
        self.sessions: deque[tuple[float, list[Any]]] = deque()     # (a new study's first read, its linked priors)
        self.unopened: OrderedDict[Any, None] = OrderedDict()       # priors its session passed by, still cached

    def _request(self, key: Any, now: float, prefetch: bool, written: bool = False) -> None:
        size, created, study = self._meta[key]
        for s in self.shadows:
            s.request(key, size, now, created, study, prefetch, self.capacity, written)
        self.requests += 1
        if self.requests % self.window == 0:
            lru, learned = (s.score for s in self.shadows)
            self.use_learned = learned >= lru
            for s in self.shadows:
                s.score *= self.decay

    def on_insert(self, key: Any, size: int, now: float, created: float, study: Any,
                  prefetch: bool = False, written: bool = False) -> None:
        self._meta[key] = (size, created, study)
        self.used += size
        if now > self._inflow_at:
            self._inflow *= math.exp((self._inflow_at - now) / INFLOW_TAU)
            self._inflow_at = now
        self._inflow += size
        # a linked prior waits for the radiologist's session as its new study does: the fresh segment holds both
        written = written or (prefetch and study in self.linked)
        if written:
            # a study joining the segment brings the files it has cached already: it holds them all, so they count
            joins = self.fresh.horizon > 0 and not self.fresh.holds(study)
            cached = sum(self._meta[k][0] for k in self.lru.files_of(study)) if joins else 0
            self.fresh.written(study, size + cached, now, again=prefetch)
        elif not prefetch:
            self.fresh.read(study, now)
            self._opened(study, now)
        if self.door is not None:
            tail = not (prefetch or written) and created < now - OLD_S
            known = self.door_known is not None and self.door2 is not None and self.door2.came_back(study)
            self.door.inserted(key, size, now, study, tail and not known)
            if self.door_known is not None:
                self.door_known.inserted(key, size, now, study, tail and known)
        if self.door2 is not None:
            if written and study not in self.linked:
                self.written[study] = None
                if len(self.written) > 200_000:
                    self.written.popitem(last=False)
            elif not prefetch and study in self.written:
                self.door2.inserted(key, size, now, study, True)
        self.lru.on_insert(key, size, now, created, study, prefetch, written)
        self.learned.on_insert(key, size, now, created, study, prefetch, written)
        self._request(key, now, prefetch, written)

    def on_access(self, key: Any, now: float) -> None:
        if (meta := self._meta.get(key)) is None:
            return
        size, _, study = meta
        self.fresh.read(study, now)
        self._opened(study, now)
        if self.door is not None:
            self.door.read(study, now)
            if self.door_known is not None:
                self.door_known.read(study, now)
        if self.door2 is not None and study in self.written:
            self.door2.inserted(key, size, now, study, True)
        self.lru.on_access(key, now)
        self.learned.on_access(key, now)
        self._request(key, now, False)

    def on_remove(self, key: Any) -> None:
        self.lru.on_remove(key)
        self.learned.on_remove(key)
        self._forget(key)

    def _forget(self, key: Any) -> None:
        """A file leaves the real cache: its bytes, the fresh segment's count and probation forget it."""
        if (meta := self._meta.pop(key, None)) is not None:
            self.used -= meta[0]
            self.fresh.removed(meta[2], meta[0])
            for door in (self.door, self.door2, self.door_known):
                if door is not None:
                    door.removed(meta[2], key)

    def link(self, prior: Any, new: Any, heat: float) -> None:
        """A prefetched prior's new study (HitDensity.link), for the real cache's learned index and its shadow."""
        self.learned.link(prior, new, heat)
        self.model.link(prior, new, heat)
        if HOLD_PRIORS:
            self.linked[prior] = new
            if len(self.linked) > 10_000:     # priors whose fetch never landed
                self.linked.popitem(last=False)
            if RELEASE_UNOPENED:
                self.waiting.setdefault(new, []).append(prior)
                if len(self.waiting) > 10_000:    # new studies never read
                    self.waiting.popitem(last=False)

    def _opened(self, study: Any, now: float) -> None:
        """A file of `study` was read: if it is a new study with linked priors, its session begins now."""
        self.unopened.pop(study, None)      # a prior opened after all (a board, a follow-up) is cached as read
        if (priors := self.waiting.pop(study, None)) is not None:
            self.sessions.append((now, priors))
        self._session_over(now)     # here too, so a cache that never fills keeps no backlog of sessions

    def _session_over(self, now: float) -> None:
        """The linked priors of new studies whose first session is over: those not opened in it leave the fresh
        segment (and queue to go first), the session they were fetched for has passed them by; those opened in it go
        through the doorkeeper as a study read once (probation until a second session, while the door is on)."""
        while self.sessions and now - self.sessions[0][0] > SESSION_S:
            for prior in self.sessions.popleft()[1]:
                if self.fresh.forget(prior):
                    self.lru.unheld(prior)
                    if DROP_UNOPENED:
                        self.unopened[prior] = None
                elif PROBATION_OPENED and self.door is not None:
                    for key in self.lru.files_of(prior):
                        self.door.inserted(key, self._meta[key][0], now, prior, True)

    def admit(self, new: Any, heat: float, files: int, size: int, now: float) -> bool:
        """A prior fits in free space, or is worth more than what the learned shadow evicts lately
        (HitDensity.admit: the shadow sees the same traffic and capacity, whichever expert evicts), its heat discounted
        by the chance that its new study is read before the cache would evict it unread (`IN_TIME_POWER`)."""
        if not self.capacity or self.used + size <= self.capacity:
            return True
        return self.model.admit(new, heat * self.fresh.read_in_time() ** IN_TIME_POWER, files, size, now)

    def turnover(self) -> float:
        """Seconds the cache takes to fill with new bytes at the recent inflow rate: about how long a file no one
        reads stays; inf before the first eviction."""
        return self.capacity * INFLOW_TAU / self._inflow if self.capacity and self._inflow else math.inf

    def victims(self, bytes_to_free: int, now: float) -> Iterator[Any]:
        self.capacity = max(self.capacity, self.used - bytes_to_free)
        learned, model = self.learned, self.model
        learned.density, learned.factor, learned.fitted = model.density, model.factor, model.fitted
        chosen, other = (self.learned, self.lru) if self.use_learned else (self.lru, self.learned)
        self.fresh.capacity = self.capacity
        # the second door: once-read written studies make room first while the cache turns over sooner than they come
        # back (it could not keep them until then anyway, and the space holds new studies until their first read)
        self.door2_open = self.door2 is not None and self.turnover() < self.door2.back_time
        # the real cache cuts its last victim short (Belady keeps a study's first files); the shadows judge the experts'
        # rankings with whole studies, as measured
        self.lru.cut = self.learned.cut = int(MIN_CUT * self.capacity) if TRIM else None
        self._session_over(now)
        for study in self.fresh.release(now):
            self.lru.unheld(study)
        freed = 0
        doors = [d.victims(now) for d in (self.door, self.door_known, self.door2 if self.door2_open else None)
                 if d is not None]
        if self.unopened:
            doors.insert(0, self._unopened_files())
        for key in chain.from_iterable(doors):
            if freed >= bytes_to_free:
                break
            freed += self._meta[key][0]
            self._evicted(key, now)
            self.on_remove(key)
            yield key
        for key in list(chosen.victims(bytes_to_free - freed, now)) if freed < bytes_to_free else ():
            other.on_remove(key)
            self._evicted(key, now)
            self._forget(key)
            yield key

    def _evicted(self, key: Any, now: float) -> None:
        if (meta := self._meta.get(key)) is not None:
            self.fresh.evicted(meta[2], meta[0], now)

    def _unopened_files(self) -> Iterator[Any]:
        """The cached files of priors their session passed by, the earliest passed first."""
        while self.unopened:
            prior = next(iter(self.unopened))
            yield from self.lru.files_of(prior)
            self.unopened.pop(prior, None)

    def status(self) -> dict[str, object]:
        if not self.model.fitted:
            mode = "cold start: study LRU"
        else:
            mode = "expert: learned hit density" if self.use_learned else "expert: study LRU (recency wins now)"
        return {"policy": self.name, "mode": mode, "events": self.model.events, "files": len(self._meta),
                **(self.door.status() if self.door is not None else {}), "second_door": self.door2_open,
                **({"known_" + k: v for k, v in self.door_known.status().items()} if self.door_known else {}),
                **self.fresh.status()}

    # batch (no online index fed): whole studies in LRU order, the cold-start rule
    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        return StudyLRU().select_victims(table, bytes_to_free, now)
