"""`learned`: whole-study eviction by *hit density* learned from the cache's own traffic (after LHD).

A radiologist waits for the whole study, so the unit is the study: it enters, is read (sessions: reads more than
`session_s` apart), and leaves whole. For each study *class* the policy learns, online, at which ages (time since the
study's last session) studies come back and at which they are evicted:

    class = (sessions so far: 0, 1, 2, 3+) × (study age at entry: < 1 day, < 1 week, < 5 weeks, older)

Ages are log-spaced buckets (1 min … ~1 year). From the per-class histograms of hits H(x) and evictions E(x), a study
of class c at age a is worth

    density(c, a) = P(another session | survived to a) / E[remaining time in cache | a]
                  = Σ_{x≥a} H(x) / Σ_{x≥a} (x − a)(H(x) + E(x))

and the victim is the cached study of lowest density × factors × (mean file size / the study's mean file size +
`byte_weight`) among `sample` random ones (LHD's sampling). That last term is what a byte of the study is worth on both
targets, object hits (its share of the files) and byte hits (its share of the bytes, weighted): a study of small files
is kept over one of big files as likely to come back, but a big study is not given up for its size (the radiologist
waits for all of it; density per byte^0.5 did, and lost the byte hit ratio). The factors are features without more
class dimensions (a finer class table splits the counts: a class by gap, by department or finer ages each lost on the
tuning families): per bucket of a feature, P(back) / P(back) over all, learnt from the same hits and evictions (naive
Bayes). *Gap*: how long the study stayed away before its latest session (not back yet, < 1 d, < 3 d, < 10 d, longer):
a case that came back after a week (a board, a follow-up clinic) is kept over one read once, whichever its class.
*Size*: the study's bytes (< 10 MB, < 100 MB, < 1 GB, more): where big studies come back (PET-CT at a board), they are
kept for it. *Newer*: the study's patient has a newer study (a prior, which a board may show again beside the new
one). *Modality* and *department* are offered too but off by default (they lost on the tuning families). The study
features come from `attrs` (the runner's `describe`: the catalog's study index live, the trace in the simulator). A
weekly schedule needs no code: a study class read again ~7 days later has hits piling up in the 4–8-day bucket, so its
density stays high through the week while one never read again decays. The histograms are refitted every
`refit_events` events and decayed by `decay`, so the policy follows the box's traffic; memory is (4 × 4 × 20) × 2 +
3 × (5 + 4 + 2) floats plus one record per cached study and per ghost (~100 B). Until `warm_events` events have been
seen the policy is *cold* and evicts studies in LRU order (the safe heuristic); `status()` says which.

A prior prefetched for a new study (told by the prior planner through the runner) is kept beside it until it is opened
or the new study is read (`link`: an unread old study alone would be the first victim), and is fetched into a full
cache only if it is worth `ADMIT_MARGIN` times the rank the cache has been evicting at lately (`admit`, `boundary`).

Policies decide, never do I/O: the caller offers only clean files (already in S3), so a file not yet in S3 is never
evicted (durability contract, rule 2).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from agent.policy.eviction import DAY, FileTable, StudyLRU, trim

N_AGE = 20                      # log2 buckets of minutes: 1 min .. 2^19 min (~1 year)
N_READS = 4
N_ENTRY = 4
_ENTRY_EDGES = (DAY, 7 * DAY, 35 * DAY)
N_GAP = 5                       # the study's last gap between sessions: none yet, < 1 d, < 3 d, < 10 d, longer
_GAP_EDGES = (DAY, 3 * DAY, 10 * DAY)
N_SIZE = 4                      # study bytes: < 10 MB, < 100 MB, < 1 GB, more
_SIZE_EDGES = (1e7, 1e8, 1e9)
N_CODE = 16                     # modality / department codes, folded into this many buckets (0: unknown)

# the factors a rank multiplies (naive Bayes over the class density), in `_buckets` order: gap and size, and the `attrs`
# (modality and department of the study, whether its patient has a newer study: a prior)
FACTORS = ("gap", "size", "modality", "dept", "newer")
FACTOR_BUCKETS = {"gap": N_GAP, "size": N_SIZE, "modality": N_CODE, "dept": N_CODE, "newer": 2}
# chosen on the tuning families (docs/replay.md, "Study features"); bench/gap_share.py --factors overrides
DEFAULT_FACTORS: tuple[str, ...] = ("gap", "size", "newer")

# the rank's weight of a study's bytes against its files (see `_per_byte`); chosen on the tuning families
# (docs/replay.md, "Bytes"); bench/gap_share.py --byte-weight overrides
BYTE_WEIGHT = 10.0

# admission of a prefetched prior into a full cache (`admit`): only if, kept beside its new study, it is worth more than
# the rank the cache evicts at lately; bench/gap_share.py --admit overrides
ADMIT_PRIORS = True
BOUNDARY_RATE = 0.01            # the eviction boundary: an average over the last ~100 victims' ranks
# ... and only at this multiple of it: the prior's rank is taken beside a new study just written (its new study's
# highest worth) and has to last the hours to the session; at 1x, a prior fetched into a small cache was often among the
# next victims (oncology at 3 % of a month's writes: a fifth of the prefetched bytes evicted unread within the hour of
# their fetch). Chosen on the tuning families, 1 / 2 / 3 / 4 (docs/replay.md, round 22); bench/gap_share.py
# --admit-margin overrides
ADMIT_MARGIN = 2.0

Attrs = Callable[[Any], tuple[int, int, int]]     # study → (modality code, department code, newer 0/1)


def _fold(code: int) -> int:
    """A modality / department code (0: unknown) into N_CODE buckets, unknown kept apart."""
    return code and 1 + (code - 1) % (N_CODE - 1)


def gap_bucket(gap_s: float) -> int:
    """1..N_GAP-1: how long the study stayed away before its latest session (0: not back yet)."""
    return 1 + bisect_right(_GAP_EDGES, gap_s)


def age_bucket(age_s: float) -> int:
    m = age_s / 60.0
    return 0 if m < 1 else min(N_AGE - 1, int(math.log2(m)) + 1)


_LOW = np.array([0.0] + [60.0 * 2 ** (b - 1) for b in range(1, N_AGE)])           # bucket starts, s
_MID = np.array([30.0] + [60.0 * 1.5 * 2 ** (b - 1) for b in range(1, N_AGE)])   # bucket midpoints, s


def hit_density(hits: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hits per second of remaining life at each age bucket a and above (suffix sums over the last axis), and
    the events (hits + evictions) behind each."""
    h_tail, n_tail, t_tail = (np.cumsum(x[..., ::-1], axis=-1)[..., ::-1] for x in (hits, total, total * _MID))
    life = t_tail - n_tail * _LOW          # Σ (x − a)(H + E), x at its bucket's midpoint, a at its start
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(life > 0, h_tail / np.maximum(life, 1e-9), 0.0), n_tail


@dataclass
class _Study:
    files: dict[int, int]
    size: int
    last: float
    entry: int                  # study-age class at entry
    sessions: int = 0
    gap: int = 0                # gap_bucket of the time it stayed away before its latest session
    study: Any = None


class HitDensity:
    """The online study-level hit-density eviction (see the module docstring)."""

    name = "learned"
    online = True

    def __init__(self, sample: int = 64, byte_weight: float | None = None, session_s: float = 600.0,
                 refit_events: int = 100, decay: float = 0.95, warm_events: int = 200, seed: int = 0,
                 max_ghosts: int = 200_000, learn: bool = True, factors: tuple[str, ...] | None = None,
                 attrs: Attrs | None = None, held: Callable[[Any], bool] | None = None) -> None:
        self.sample, self.session_s = sample, session_s
        self.held = held            # a written, unread study kept from eviction (agent/policy/fresh.py)
        self.cut: int | None = None  # a pass's last victim gives up this many bytes at least (eviction.trim); None: all
        self.byte_weight = BYTE_WEIGHT if byte_weight is None else byte_weight
        self.learn = learn          # False: rank with a density set from outside (adaptive's shadow model)
        self.refit_events, self.decay, self.warm_events = refit_events, decay, warm_events
        self.hits = np.zeros((N_READS, N_ENTRY, N_AGE))
        self.evictions = np.zeros((N_READS, N_ENTRY, N_AGE))
        self.density = np.zeros((N_READS, N_ENTRY, N_AGE))
        # P(back) per gap bucket against P(back) overall: a factor on the class density (naive Bayes), so a feature
        # shares the class tables' counts instead of splitting them
        self.factors = DEFAULT_FACTORS if factors is None else factors
        if unknown := set(self.factors) - set(FACTORS):
            raise ValueError(f"unknown factors {sorted(unknown)}; known: {FACTORS}")
        self._fi = [FACTORS.index(f) for f in self.factors]
        self.attrs = attrs          # the study's features the catalog knows (None: all unknown)
        self.back = [np.zeros(FACTOR_BUCKETS[f]) for f in self.factors]
        self.seen = [np.zeros(FACTOR_BUCKETS[f]) for f in self.factors]
        self.factor = [np.ones(FACTOR_BUCKETS[f]) for f in self.factors]
        self.events = 0
        self.fitted = False
        self._studies: dict[int, _Study] = {}
        self._ids: list[int] = []               # cached studies, for O(1) random sampling
        self._pos: dict[int, int] = {}
        self._study_of: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()   # cold-start order
        self._rng = random.Random(seed)
        # evicted studies (sessions, entry class, last session, age bucket at eviction, gap, the factor buckets at
        # eviction), oldest first
        self._ghosts: OrderedDict[Any, tuple[int, int, float, int, int, tuple[int, ...]]] = OrderedDict()
        self.max_ghosts = max_ghosts
        self._files = self._bytes = 0           # files and bytes inserted so far: the mean file size
        # prefetched prior → (its new study, the planner's chance that it is opened with it), until opened
        self._links: dict[Any, tuple[Any, float]] = {}
        self.boundary = 0.0         # the rank the cache evicts at lately (moving average of victims); 0: unknown

    # -- learning
    def _cls(self, s: _Study) -> tuple[int, int]:
        return min(s.sessions, N_READS - 1), s.entry

    def _buckets(self, s: _Study) -> tuple[int, ...]:
        """The study's bucket of each factor in use."""
        a = self.attrs(s.study) if self.attrs is not None else (0, 0, 0)
        # bisect: the edges at or below the size (a sum over them took 4x the time)
        every = (s.gap, bisect_right(_SIZE_EDGES, s.size), _fold(a[0]), _fold(a[1]), a[2])
        return tuple(map(every.__getitem__, self._fi))

    def _count(self, table: np.ndarray, s: _Study, now: float, buckets: tuple[int, ...] | None = None) -> None:
        if not self.learn:
            return
        r, e = self._cls(s)
        table[r, e, age_bucket(now - s.last)] += 1
        hit = table is self.hits
        for seen, back, b in zip(self.seen, self.back, buckets or self._buckets(s), strict=True):
            seen[b] += 1
            if hit:
                back[b] += 1
        self.events += 1
        if self.events % self.refit_events == 0:
            self.refit()

    def refit(self) -> None:
        """density(c, a) from the histograms, then decay them (recent traffic weighs more)."""
        total = self.hits + self.evictions
        d, n_tail = hit_density(self.hits, total)
        # a class seen too little borrows from the pooled table of its session count
        pooled, _ = hit_density(self.hits.sum(axis=1), total.sum(axis=1))
        self.density = np.where(n_tail < 20, pooled[:, None, :], d)
        if self.factors:
            overall = (self.back[0].sum() + 1) / (self.seen[0].sum() + 2)
            self.factor = [(b + 1) / (n + 2) / overall for b, n in zip(self.back, self.seen, strict=True)]
        for t in (*self.back, *self.seen, self.hits, self.evictions):
            t *= self.decay
        self.fitted = self.events >= self.warm_events

    def status(self) -> dict[str, object]:
        return {"policy": self.name, "mode": "learned" if self.fitted else "cold start: study LRU",
                "events": self.events, "studies": len(self._studies)}

    # -- the online index
    def on_insert(self, key: int, size: int, now: float, created: float, study: int,
                  prefetch: bool = False, written: bool = False) -> None:
        s = self._studies.get(study)
        if s is None:
            entry = sum(now - created >= e for e in _ENTRY_EDGES)
            s = self._studies[study] = _Study({}, 0, now, entry, study=study)
            self._pos[study] = len(self._ids)
            self._ids.append(study)
            if (ghost := self._ghosts.pop(study, None)) is not None:
                self._returned(s, ghost, now, prefetch)
        s.files[key] = size
        s.size += size
        self._files += 1
        self._bytes += size
        self._study_of[key] = study
        self._lru[study] = None
        if not prefetch:
            self._session(study, s, now)

    def _returned(self, s: _Study, ghost: tuple[int, int, float, int, int, tuple[int, ...]], now: float,
                  prefetch: bool) -> None:
        """A study evicted earlier is back. Its eviction was premature: the histogram learns the real
        time to its next session (a hit at that age) instead of the eviction, so a class is not judged
        by what the cache happened to keep (the chicken-and-egg of learning only from cached objects)."""
        sessions, entry, last, evicted_at, gap, buckets = ghost
        s.sessions, s.entry, s.last, s.gap = sessions, entry, last, gap
        if prefetch:
            return          # the read it was fetched for, if it comes, is the session
        if self.learn:
            r = min(sessions, N_READS - 1)
            self.evictions[r, entry, evicted_at] = max(0.0, self.evictions[r, entry, evicted_at] - 1)
            for seen, b in zip(self.seen, buckets, strict=True):
                seen[b] = max(0.0, seen[b] - 1)
            # counted with the buckets it left with (its files are not back yet: no size of its own)
            self._count(self.hits, s, now, buckets)
        s.sessions += 1
        s.gap = gap_bucket(now - last)
        s.last = now

    def _session(self, study: int, s: _Study, now: float) -> None:
        if now - s.last > self.session_s:
            self._count(self.hits, s, now)
            s.sessions += 1
            s.gap = gap_bucket(now - s.last)
        s.last = now
        self._lru.move_to_end(study)

    def on_access(self, key: int, now: float) -> None:
        study = self._study_of.get(key)
        if study is not None:
            self._links.pop(study, None)
            self._session(study, self._studies[study], now)

    def link(self, prior: Any, new: Any, heat: float) -> None:
        """A prior was prefetched for a new study: until it is opened, it is worth `heat` × what its new study
        is worth while that one waits for its first read (the radiologist opens both in one session), so it
        stays as long as the new study does instead of being evicted hours before the report."""
        self._links[prior] = (new, heat)
        if len(self._links) > self.max_ghosts:      # priors whose fetch never landed
            del self._links[next(iter(self._links))]

    def on_remove(self, key: int) -> None:
        if (study := self._study_of.pop(key, None)) is None:
            return
        s = self._studies[study]
        s.size -= s.files.pop(key, 0)
        if not s.files:
            self._drop(study)

    def _drop(self, study: int) -> _Study:
        s = self._studies.pop(study)
        i = self._pos.pop(study)
        last = self._ids.pop()
        if last != study:
            self._ids[i] = last
            self._pos[last] = i
        self._lru.pop(study, None)
        self._links.pop(study, None)
        for key in s.files:
            self._study_of.pop(key, None)
        return s

    def _worth(self, s: _Study, now: float) -> float:
        """The study's hit density × its factors (before its bytes)."""
        r, e = self._cls(s)
        rank = float(self.density[r, e, age_bucket(now - s.last)])
        for f, b in zip(self.factor, self._buckets(s), strict=True):
            rank *= float(f[b])
        return rank

    def _rank(self, s: _Study, now: float) -> float:
        rank = self._worth(s, now)
        if (link := self._links.get(s.study)) is not None:
            new = self._studies.get(link[0])
            if new is not None and new.sessions == 0:
                rank = max(rank, link[1] * self._worth(new, now))
        return rank * self._per_byte(len(s.files), s.size)

    def _per_byte(self, files: int, size: int) -> float:
        """What keeping a study is worth per byte on both targets: its share of the files (object hits) plus
        `byte_weight` × its share of the bytes (byte hits), per byte; ∝ mean file size / the study's + weight."""
        return self._bytes / max(self._files, 1) * files / max(size, 1) + self.byte_weight

    def _victim(self, now: float) -> int:
        held = self.held
        if not self.fitted:
            return next((st for st in self._lru if held is None or not held(st)), next(iter(self._lru)))
        k = min(self.sample, len(self._ids))
        cand = self._rng.sample(self._ids, k) if k < len(self._ids) else list(self._ids)
        if held is not None:
            cand = [st for st in cand if not held(st)] or cand
        # ties (an unseen class: density 0) go to the least recently used
        ranks = {st: self._rank(self._studies[st], now) for st in cand}
        victim = min(cand, key=lambda st: (ranks[st], self._studies[st].last))
        self.boundary += BOUNDARY_RATE * (ranks[victim] - self.boundary) if self.boundary else ranks[victim]
        return victim

    def admit(self, new: Any, heat: float, files: int, size: int, now: float) -> bool:
        """Is a prior worth fetching for the new study `new` into a full cache? Kept beside its new study
        (`link`) it ranks heat × the new study's worth (then its own bytes term); fetched below the rank the
        cache evicts at lately (`boundary`), it would push out a study worth more and be the next victim
        itself, long before the report; it must clear it by `ADMIT_MARGIN`. Cold (no boundary yet): yes."""
        if not (ADMIT_PRIORS and self.fitted and self.boundary > 0):
            return True
        s = self._studies.get(new) or _Study({}, 0, now, 0, study=new)     # not indexed yet: new, unread
        return heat * self._worth(s, now) * self._per_byte(files, size) >= ADMIT_MARGIN * self.boundary

    def victims(self, bytes_to_free: int, now: float) -> Iterator[int]:
        freed = 0
        while freed < bytes_to_free and self._ids:
            study = self._victim(now)
            s = self._studies[study]
            if self.cut is not None and (need := max(bytes_to_free - freed, self.cut)) < s.size:
                for key, size in trim(s.files, need, self._study_of):
                    s.size -= size
                    yield key
                return
            self._count(self.evictions, s, now)
            self._drop(study)
            self._ghosts[study] = (s.sessions, s.entry, s.last, age_bucket(now - s.last), s.gap, self._buckets(s))
            if len(self._ghosts) > self.max_ghosts:
                self._ghosts.popitem(last=False)
            for key, size in s.files.items():
                freed += size
                yield key

    # -- batch (a caller without the online index): the cold-start heuristic, whole studies in LRU order. The live agent
    # feeds the online index (agent/policy/stack.py `sync`) and does not come here
    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        return StudyLRU().select_victims(table, bytes_to_free, now)
