"""Eviction policies over `clean` cached files. Policies decide; they never do I/O.

Two ways in, one decision:

* **Batch.** `select_victims(table, bytes_to_free, now)` takes the clean cached files as a `FileTable` (columns: key,
  size, last_access, access_count, created, directory, and optionally study and patient) and returns row indices in
  eviction order whose sizes add up to at least `bytes_to_free` (or every row, if that is not enough). Dirty files
  never enter the table, so a policy cannot evict them (durability contract, rule 2).

* **Online.** `on_insert(key, size, now, ...)`, `on_access(key, now)`, `on_remove(key)` keep the policy's own index;
  `victims(bytes_to_free, now)` yields keys in eviction order (the live agent feeds the index through
  agent/policy/stack.py `sync`). A policy without an online index (kmeans) sets `online = False`; the live agent and
  the simulator then call `select_victims` over their FileTable.

Policies:
  `lru`    scheme A (rclone's default): least recently accessed first.
  `age`    scheme B (the paper's 90-day rule): files acquired more than `max_age_days` ago go first, oldest first;
           then LRU.
  `kmeans` scheme C's eviction: K-means over (recent access frequency, recency decay 1/(now-last+1), size weight), k
           by the elbow method; the coldest cluster is evicted first, then the lowest-scored files of the next warmer
           cluster, and so on.
  `study`  ours: whole studies in least-recently-used order (a viewer opens studies, not files), so one eviction does
           not leave a study half cached; old studies (priors, long-tail reads) are demoted once they have been read;
           prefetched files count as used at prefetch time.
  `learned` whole studies by hit density learned online from the traffic (agent/policy/learned.py).
  `adaptive` whole studies by study LRU or the learned hit density, whichever serves the traffic better now (shadow
           caches; agent/policy/adaptive.py); the last victim of a pass gives up only its last files the pass needs
           (`trim`).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

DAY = 86_400.0


@dataclass
class FileTable:
    """Clean cached files, one row each (numpy columns of equal length)."""

    key: np.ndarray               # catalog row id or path
    size: np.ndarray              # bytes
    last_access: np.ndarray       # seconds (any epoch, same as `now`)
    access_count: np.ndarray
    created: np.ndarray           # acquisition time / mtime, seconds
    directory: np.ndarray         # int code of the day-directory (MODALITY/YYYY-MM-DD)
    study: np.ndarray | None = None    # int code of the study directory, if the layout has one
    patient: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.size.size)


def take_until(order: np.ndarray, size: np.ndarray, bytes_to_free: int) -> np.ndarray:
    """The shortest prefix of `order` whose sizes reach bytes_to_free."""
    if bytes_to_free <= 0 or order.size == 0:
        return order[:0]
    return order[:int(np.searchsorted(np.cumsum(size[order]), bytes_to_free, side="left")) + 1]


def trim(files: dict[Any, int], need: int, study_of: dict[Any, Any]) -> list[tuple[Any, int]]:
    """The files of a victim study to give up to free `need` bytes (less than the study holds), instead of the whole
    study, taken from its end: a viewer reads a study in series order, so the files read soonest are its first ones,
    those Belady keeps of the study read farthest off. Drops them from `files` (in insertion order: the written or
    fetched order) and `study_of`. → (key, size) in eviction order."""
    out: list[tuple[Any, int]] = []
    freed = 0
    while freed < need and files:
        key, size = files.popitem()
        study_of.pop(key, None)
        out.append((key, size))
        freed += size
    return out


class LRU:
    """Scheme A. Online index: an OrderedDict in access order (O(1) per request)."""

    name = "lru"
    online = True

    def __init__(self) -> None:
        self._order: OrderedDict[int, int] = OrderedDict()

    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        return take_until(np.argsort(table.last_access, kind="stable"), table.size, bytes_to_free)

    def on_insert(self, key: int, size: int, now: float, created: float, study: int,
                  prefetch: bool = False, written: bool = False) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def on_access(self, key: int, now: float) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: int) -> None:
        self._order.pop(key, None)

    def victims(self, bytes_to_free: int, now: float) -> Iterator[int]:
        freed = 0
        while freed < bytes_to_free and self._order:
            key, size = self._order.popitem(last=False)
            freed += size
            yield key


class Age(LRU):
    """Scheme B: the 90-day rule first (oldest acquisitions), then LRU."""

    name = "age"

    def __init__(self, max_age_days: float = 90.0) -> None:
        super().__init__()
        self.max_age = max_age_days * DAY
        self._by_created: list[tuple[float, int]] = []

    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        old = table.created < now - self.max_age
        old_idx = np.flatnonzero(old)
        old_idx = old_idx[np.argsort(table.created[old_idx], kind="stable")]
        young = np.flatnonzero(~old)
        young = young[np.argsort(table.last_access[young], kind="stable")]
        return take_until(np.concatenate([old_idx, young]), table.size, bytes_to_free)

    def on_insert(self, key: int, size: int, now: float, created: float, study: int,
                  prefetch: bool = False, written: bool = False) -> None:
        super().on_insert(key, size, now, created, study)
        heapq.heappush(self._by_created, (created, key))

    def victims(self, bytes_to_free: int, now: float) -> Iterator[int]:
        freed = 0
        limit = now - self.max_age
        while freed < bytes_to_free and self._by_created and self._by_created[0][0] < limit:
            _, key = heapq.heappop(self._by_created)
            size = self._order.pop(key, None)
            if size is not None:          # stale heap entries (already evicted) are skipped
                freed += size
                yield key
        if freed < bytes_to_free:
            yield from super().victims(bytes_to_free - freed, now)


@dataclass
class KMeansConfig:
    k_min: int = 2
    k_max: int = 6
    sample: int = 20_000          # rows used to fit; all rows are then assigned (bounded CPU and RAM)
    window_days: float = 7.0      # "recent" access frequency: accesses per day over this window
    seed: int = 0
    refit_seconds: float = 0.0    # keep a fitted model this long (the agent re-fits on a schedule); 0: every call


def _heat(x: np.ndarray) -> np.ndarray:
    """Hotness score of feature rows: frequent and recent is hot, big is (slightly) cheaper to drop."""
    heat: np.ndarray = x[:, 0] + x[:, 1] - 0.1 * x[:, 2]
    return heat


class KMeansEviction:
    """Scheme C's eviction (batch only)."""

    name = "kmeans"
    online = False

    def __init__(self, config: KMeansConfig | None = None) -> None:
        self.cfg = config or KMeansConfig()
        self.last_k: int | None = None
        self._model: Any = None          # the fitted sklearn KMeans (untyped), kept for cfg.refit_seconds
        self._cluster_rank: np.ndarray | None = None
        self.fitted_at: float | None = None

    @staticmethod
    def features(table: FileTable, now: float, window_days: float = 7.0) -> np.ndarray:
        """(frequency, recency decay, size weight), each scaled to [0, 1]-ish."""
        age_days = np.maximum((now - table.created) / DAY, 0.0)
        freq = table.access_count / np.minimum(age_days + 1.0, window_days)
        hours_idle = np.maximum(now - table.last_access, 0.0) / 3600.0
        recency = 1.0 / (hours_idle + 1.0)
        size_w = np.log1p(table.size) / np.log1p(max(float(table.size.max()), 1.0))
        return np.column_stack([np.log1p(freq), recency, size_w])

    def elbow_k(self, x: np.ndarray) -> int:
        """Smallest k whose next step gains < 10 % of the total inertia drop (the elbow)."""
        from sklearn.cluster import KMeans
        ks = list(range(self.cfg.k_min, self.cfg.k_max + 1))
        inertia = [KMeans(n_clusters=k, n_init=1, random_state=self.cfg.seed).fit(x).inertia_ for k in ks]
        drop = inertia[0] - inertia[-1]
        for i in range(len(ks) - 1):
            if drop <= 0 or inertia[i] - inertia[i + 1] < 0.1 * drop:
                return ks[i]
        return ks[-1]

    def _fit(self, x: np.ndarray, now: float) -> None:
        from sklearn.cluster import KMeans
        n = x.shape[0]
        rng = np.random.default_rng(self.cfg.seed)
        fit = x if n <= self.cfg.sample else x[rng.choice(n, self.cfg.sample, replace=False)]
        k = self.last_k = self.elbow_k(fit)
        self._model = KMeans(n_clusters=k, n_init=1, random_state=self.cfg.seed).fit(fit)
        self._cluster_rank = rank = np.empty(k, dtype=np.int64)
        rank[np.argsort(_heat(self._model.cluster_centers_))] = np.arange(k)       # 0 = coldest cluster
        self.fitted_at = now

    def clusters(self, table: FileTable, now: float) -> tuple[np.ndarray | None, np.ndarray]:
        """(cluster rank of each row, 0 = coldest; None when too few or identical rows to cluster) and the
        per-row hotness score. Re-fits when no model is younger than cfg.refit_seconds."""
        x = self.features(table, now, self.cfg.window_days)
        score = _heat(x)
        if len(table) <= self.cfg.k_max * 4 or np.ptp(x, axis=0).max() == 0:
            return None, score
        if self.fitted_at is None or now - self.fitted_at >= self.cfg.refit_seconds:
            self._fit(x, now)
        assert self._cluster_rank is not None  # set by every fit
        return self._cluster_rank[self._model.predict(x)], score

    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        if len(table) == 0 or bytes_to_free <= 0:
            return np.zeros(0, dtype=np.int64)
        rank, score = self.clusters(table, now)
        order = np.argsort(score, kind="stable") if rank is None else np.lexsort((score, rank))
        return take_until(order, table.size, bytes_to_free)


class StudyLRU:
    """Ours: evict whole studies in least-recently-used order, with *consumed old studies demoted*.

    A study acquired more than `recent_days` ago (a prior, or a long-tail read) that has been opened since it entered
    the cache is ranked as if it had been used `old_penalty_s` earlier: once its comparison read is done, an old study
    is rarely opened again, while a new study is re-read for days (clinicians, follow-ups, tumour boards). A prefetched
    old study is not demoted until read, so a prefetch is not undone before the read it was made for.

    Priority (lower goes first) = last use of the study − (old_penalty_s if old and consumed). Online: OrderedDicts
    (recent-or-unconsumed, consumed-old, and with a `held` rule written-unread), each in last-use order; the victim is
    the head with the lowest priority, a written study not before its first read while `held` says so
    (agent/policy/fresh.py). Batch: the same priority over the FileTable."""

    name = "study"
    online = True

    def __init__(self, recent_days: float = 30.0, old_penalty_s: float = DAY,
                 held: Callable[[Any], bool] | None = None) -> None:
        self.recent = recent_days * DAY
        self.penalty = old_penalty_s
        self.held = held            # a written, unread study kept from eviction (agent/policy/fresh.py)
        # the last victim of a pass gives up only the files needed, at least this many bytes (`trim`); None: whole
        self.cut: int | None = None
        self._bytes: dict[int, int] = {}                # study → its cached bytes
        self._fresh: OrderedDict[int, dict[int, int]] = OrderedDict()     # written, not read yet, in write order
        self._young: OrderedDict[int, dict[int, int]] = OrderedDict()
        self._old: OrderedDict[int, dict[int, int]] = OrderedDict()
        self._last: dict[int, float] = {}
        self._created: dict[int, float] = {}
        self._study_of: dict[int, int] = {}

    def select_victims(self, table: FileTable, bytes_to_free: int, now: float) -> np.ndarray:
        group = table.study if table.study is not None else table.directory
        _, inv = np.unique(group, return_inverse=True)
        n = int(inv.max()) + 1 if inv.size else 0
        last = np.full(n, -np.inf)
        np.maximum.at(last, inv, table.last_access)
        created = np.full(n, np.inf)
        np.minimum.at(created, inv, table.created)
        accessed = np.zeros(n, dtype=bool)
        np.logical_or.at(accessed, inv, table.access_count > 0)
        prio = last - self.penalty * ((created < now - self.recent) & accessed)
        order = np.lexsort((table.last_access, inv, prio[inv]))
        chosen = take_until(order, table.size, bytes_to_free)
        if chosen.size:   # never leave a study half cached: finish the last one started
            last_study = inv[chosen[-1]]
            rest = order[chosen.size:]
            n_more = int(np.argmax(inv[rest] != last_study)) if np.any(inv[rest] != last_study) else rest.size
            chosen = order[:chosen.size + n_more]
        return chosen

    def _queue(self, study: int) -> OrderedDict[int, dict[int, int]]:
        return self._fresh if study in self._fresh else self._old if study in self._old else self._young

    def on_insert(self, key: int, size: int, now: float, created: float, study: int,
                  prefetch: bool = False, written: bool = False) -> None:
        if study not in self._last:
            self._created[study] = created
        self._study_of[key] = study
        self._bytes[study] = self._bytes.get(study, 0) + size
        # without a segment to hold them (`held`), written studies queue with the others, as they always did
        fresh = written and self.held is not None and study not in self._young and study not in self._old
        queue = self._fresh if fresh else self._queue(study)
        queue.setdefault(study, {})[key] = size
        if not prefetch:
            self._touch(study, now, read=not written)
        else:
            self._last.setdefault(study, now)
            queue.move_to_end(study)

    def _touch(self, study: int, now: float, read: bool = True) -> None:
        self._last[study] = now
        if study in self._fresh:
            if not read:
                self._fresh.move_to_end(study)
                return
            self._young[study] = self._fresh.pop(study)      # its first read: an ordinary study from now on
        if study in self._old:
            self._old.move_to_end(study)
        elif self._created.get(study, now) < now - self.recent:
            self._old[study] = self._young.pop(study)      # consumed old study: demoted
        else:
            self._young.move_to_end(study)

    def on_access(self, key: int, now: float) -> None:
        study = self._study_of.get(key)
        if study is not None:
            self._touch(study, now)

    def files_of(self, study: int) -> list[int]:
        """The cached files of a study (a copy: the caller may remove them)."""
        return list(self._queue(study).get(study, ()))

    def unheld(self, study: int) -> None:
        """A written, unread study is no longer held: it queues with the others by its write time (at the head when that
        is older than the head's last use, else at the tail: releases are the segment's ends)."""
        if (files := self._fresh.pop(study, None)) is None:
            return
        self._young[study] = files
        if self._last[study] <= self._last[next(iter(self._young))]:
            self._young.move_to_end(study, last=False)

    def on_remove(self, key: int) -> None:
        if (study := self._study_of.pop(key, None)) is None:
            return
        queue = self._queue(study)
        if (files := queue.get(study)) is not None:
            self._bytes[study] -= files.pop(key, 0)
            if not files:
                del queue[study]
                self._last.pop(study, None)
                self._created.pop(study, None)
                self._bytes.pop(study, None)

    def _next(self) -> OrderedDict[int, dict[int, int]] | None:
        """The queue whose head goes next: the lowest priority among the heads (a written, unread study by its write
        time unless `held`); a held study only when nothing else is left."""
        heads = []
        if self._old:       # first: on a tie the consumed old study goes
            heads.append((self._last[next(iter(self._old))] - self.penalty, self._old))
        if self._young:
            heads.append((self._last[next(iter(self._young))], self._young))
        if self._fresh:
            first = next(iter(self._fresh))
            if not heads or self.held is None or not self.held(first):
                heads.append((self._last[first], self._fresh))
        return min(heads, key=lambda h: h[0])[1] if heads else None

    def victims(self, bytes_to_free: int, now: float) -> Iterator[int]:
        freed = 0
        while freed < bytes_to_free and (queue := self._next()) is not None:
            study, files = next(iter(queue.items()))
            if self.cut is not None and (need := max(bytes_to_free - freed, self.cut)) < self._bytes[study]:
                for key, size in trim(files, need, self._study_of):
                    self._bytes[study] -= size
                    yield key
                return
            queue.popitem(last=False)
            self._last.pop(study, None)
            self._created.pop(study, None)
            self._bytes.pop(study, None)
            for key, size in files.items():
                self._study_of.pop(key, None)
                freed += size
                yield key

