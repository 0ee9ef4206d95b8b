"""The policy stack: one eviction policy plus the prefetch planners behind one runner (`PolicyStack`), which the live
agent (agent/store/evictor.py, agent/prefetcher.py) and the simulator (agent/sim/replay.py) drive alike, so the stack
the simulator scores is the one the box runs. The runner decides and never does I/O; its callers feed it what happened
and act on its answers:

* cache events: `inserted` (a file landed: `written`, read on a miss, or `prefetch`ed), `accessed` (a read hit),
  `removed` (dropped for any other reason), from which online policies keep their index;
* `victims(bytes_to_free, now, table)`: keys to evict, in order, from an online policy's index or, for a batch policy
  (kmeans), from the `FileTable` that `table()` builds on demand. Callers offer only clean files (already in S3);
* `sync(rows, now)`: the live agent's way in. It sees the cache through the catalog each pass (the clean cached files
  with size, last access, read count and how and when the copy came), not event by event, and `sync` turns the
  difference from the last pass into the same events, in time order;
* `prior_ranked` → `prior_plan` / `prior_outcome`: the prior-study planner (rank the patient's earlier studies, fit
  them into the budget, learn per rank from what was read);
* `describe(study, modality, dept, newer)`: what the catalog knows of a study (its DICOM modality, the department or
  calling user, whether its patient has a newer study), told when a study is first written, for it and the patient's
  earlier studies; the learned policy reads them as factors (agent/policy/learned.py `FACTORS`);
* `status()`: what is running and in which mode (learned or cold start), for /status.

The day-directory planner (LiteRT LSTM ranking, agent/policy/dirheat.py) is a member too (`"lstm" in spec.planners`);
its candidates come from the catalog (live) or the trace (simulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol, Sequence, cast

from agent.policy import eviction
from agent.policy.adaptive import Adaptive
from agent.policy.eviction import LRU, Age, KMeansConfig, KMeansEviction, StudyLRU
from agent.policy.groups import Groups
from agent.policy.learned import HitDensity
from agent.policy.prefetch import Budget, Candidate, plan
from agent.policy.priors import PriorPrefetcher, StudyInfo


@dataclass(frozen=True)
class StackSpec:
    eviction: str                       # lru | age | kmeans | study | learned
    planners: tuple[str, ...] = ()      # of: lstm (day-directories, early morning), priors (on a new study)

    @property
    def label(self) -> str:
        return "+".join((self.eviction, *self.planners))


def spec_of(eviction_name: str, planners: Iterable[str]) -> StackSpec:
    return StackSpec(eviction_name, tuple(p for p in ("lstm", "priors") if p in set(planners)))


class OnlineIndex(Protocol):
    """What an online eviction policy keeps up to date (keys: the simulator's ints, the agent's paths)."""

    def on_insert(self, key: Any, size: int, now: float, created: float, study: Any,
                  prefetch: bool = False, written: bool = False) -> None: ...

    def on_access(self, key: Any, now: float) -> None: ...

    def on_remove(self, key: Any) -> None: ...

    def victims(self, bytes_to_free: int, now: float) -> Iterator[Any]: ...


@dataclass(frozen=True)
class CatalogRow:
    """One clean cached file as the live agent's catalog shows it."""

    key: Hashable
    size: int
    last_access: float
    access_count: int
    created: float
    study: Hashable                     # a study id (the simulator); the agent's: the study UID, else the directory
    # how the cached copy came (write | read: on a miss | prefetch) and when it began: the write, the fetch's start;
    # None where the catalog does not know (a copy from before it recorded them, a renamed file)
    cached_at: float | None = None
    cached_by: str | None = None


def make(name: str, *, kmeans: KMeansConfig | None = None, max_age_days: float = 90.0,
         attrs: Callable[[Any], tuple[int, int, int]] | None = None,
         ) -> LRU | Age | KMeansEviction | StudyLRU | HitDensity | Adaptive:
    policies: dict[str, Callable[[], LRU | Age | KMeansEviction | StudyLRU | HitDensity | Adaptive]] = {
        "lru": LRU, "age": lambda: Age(max_age_days), "kmeans": lambda: KMeansEviction(kmeans), "study": StudyLRU,
        "learned": lambda: HitDensity(attrs=attrs), "adaptive": lambda: Adaptive(attrs=attrs)}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(policies)}")
    return policies[name]()


class PolicyStack:
    MAX_DESCRIBED = 1_000_000           # studies whose features are kept (~100 B each), oldest forgotten
    # Distinct modalities (or departments) given a code of their own, later ones one 'other' code: a header's Modality
    # is any 16-character code string, and a code per value kept for good grew without bound. The learned policy folds
    # codes into 16 buckets anyway (agent/policy/learned.py N_CODE).
    MAX_CODES = 256

    def __init__(self, spec: StackSpec, *, priors_k: int = 3, kmeans: KMeansConfig | None = None,
                 max_age_days: float = 90.0) -> None:
        self.spec = spec
        self._attrs: dict[Hashable, tuple[int, int, int]] = {}
        self._codes: dict[tuple[int, str], int] = {}        # (kind, name) → code, 1.. in order of first sight
        self._named = [0, 0]                                 # names with their own code, per kind
        self.policy = make(spec.eviction, kmeans=kmeans, max_age_days=max_age_days, attrs=self.attrs_of)
        self.priors = PriorPrefetcher(k=priors_k) if "priors" in spec.planners else None
        self._seen: dict[Hashable, tuple[float, int]] = {}   # sync: key → (last access, reads) last pass
        self.groups = Groups()      # the eviction unit where a directory is not a study (agent/policy/groups.py)

    @property
    def index(self) -> OnlineIndex | None:
        """The policy's online index, or None for a batch policy (kmeans)."""
        return cast(OnlineIndex, self.policy) if self.policy.online else None

    @property
    def online(self) -> bool:
        return bool(self.policy.online)

    # -- cache events
    def inserted(self, key: Hashable, size: int, now: float, created: float, study: Hashable,
                 prefetch: bool = False, written: bool = False) -> None:
        if (index := self.index) is not None:
            index.on_insert(key, size, now, created, self.groups.of(study, now, written, prefetch, key), prefetch,
                            written)

    def accessed(self, key: Hashable, now: float) -> None:
        if (index := self.index) is not None:
            index.on_access(key, now)

    def removed(self, key: Hashable) -> None:
        if (index := self.index) is not None:
            index.on_remove(key)
        self._seen.pop(key, None)

    def victims(self, bytes_to_free: int, now: float,
                table: Callable[[], tuple[eviction.FileTable, Sequence[Hashable]]]) -> Iterator[Hashable]:
        """Keys to evict, in order, until bytes_to_free are freed. `table` → (the clean cached files as a
        FileTable, the key of each row); only built for a batch policy."""
        if (index := self.index) is None:
            t, keys = table()
            return self._unseen(keys[i] for i in self.policy.select_victims(t, bytes_to_free, now).tolist())
        if not self._seen:      # no synced view to keep (the simulator): the index's own, one generator less per key
            return index.victims(bytes_to_free, now)
        return self._unseen(index.victims(bytes_to_free, now))

    def _unseen(self, keys: Iterator[Hashable]) -> Iterator[Hashable]:
        for key in keys:
            self._seen.pop(key, None)
            yield key

    def sync(self, rows: Iterable[CatalogRow], now: float) -> int:
        """Feed an online policy the difference between this view of the cache and the last one: new rows are
        inserted, rows read since are accessed, rows gone are removed. → events applied.

        A new row is inserted as what its copy is (`cached_by`) as of when it began (`cached_at`), then accessed if read
        since, as the simulator has it (reads between two passes come at the last one's time, as many as the catalog
        counted; a new row's are one: its count holds its reads before an eviction too). Inferred from the last access
        and read count instead, a written file read before the pass looked read on a miss, and a prefetch of a file read
        minutes before looked written or read on a miss. A row of no known origin: read on a miss at its last access."""
        if (index := self.index) is None:
            return 0
        events: list[tuple[float, int, CatalogRow]] = []   # (time, reads (0: the insert), row)
        now_keys: set[Hashable] = set()
        for r in rows:
            now_keys.add(r.key)
            before = self._seen.get(r.key)
            if before is None:
                at = r.last_access if r.cached_at is None else r.cached_at
                events.append((at, 0, r))
                if r.last_access > at:
                    events.append((r.last_access, 1, r))
            elif r.last_access > before[0] or r.access_count > before[1]:
                # each read is a request to the policy, as in the simulator (the experts' scores and window count
                # requests); the catalog keeps their number, not their times
                events.append((r.last_access, max(1, r.access_count - before[1]), r))
            self._seen[r.key] = (r.last_access, r.access_count)
        gone = [k for k in self._seen if k not in now_keys]
        for k in gone:
            self.removed(k)
        events.sort(key=lambda e: (e[0], min(e[1], 1)))
        for t, reads, r in events:
            if not reads:
                self.inserted(r.key, r.size, t, r.created, r.study, r.cached_by == "prefetch", r.cached_by == "write")
            for _ in range(reads):
                index.on_access(r.key, t)
        return len(events) + len(gone)

    # -- study features
    def _code(self, kind: int, name: str | None) -> int:
        if not name:
            return 0
        key = (kind, name)
        if key not in self._codes:
            if self._named[kind] >= self.MAX_CODES:
                key = (kind, "\0other")  # no modality or department is named so (CS values are checked)
            else:
                self._named[kind] += 1
        return self._codes.setdefault(key, len(self._codes) + 1)

    def describe(self, study: Hashable, modality: str | None, dept: str | None, newer: bool) -> None:
        """What is known of a study: its modality, its department (or calling user), whether its patient has
        a newer study. A later call replaces an earlier one, keeping a known modality or department."""
        old = self._attrs.pop(study, (0, 0, 0))
        self._attrs[study] = (self._code(0, modality) or old[0], self._code(1, dept) or old[1], int(newer))
        if len(self._attrs) > self.MAX_DESCRIBED:
            del self._attrs[next(iter(self._attrs))]

    def attrs_of(self, study: Hashable) -> tuple[int, int, int]:
        """(modality code, department code, newer 0/1) of a study; 0 where unknown."""
        return self._attrs.get(Groups.directory(study), (0, 0, 0))

    # -- the prior-study planner
    def prior_ranked(self, new: StudyInfo, studies: Sequence[StudyInfo]) -> list[tuple[int, StudyInfo, float]]:
        """(cell, study, heat) of the patient's earlier studies worth fetching, most relevant first (a cell is the
        rank and kind of prior the planner learns its heat for, agent/policy/priors.py)."""
        return [] if self.priors is None else self.priors.candidates(new, list(studies))

    def prior_plan(self, new: Hashable, ranked: Sequence[tuple[int, Hashable, float, int, int]], budget: Budget,
                   now: float) -> list[tuple[Hashable, int, int, float]]:
        """(key, cell, bytes, heat) to fetch for the new study, in clinical order (`ranked`'s), within the budget (its
        space scaled by the planner's `space_share`: what past fetches say the cache keeps until read), each admitted by
        the eviction policy (one that weighs a prior against what it would push out, agent/policy/learned.py `admit`).
        ranked: (cell, key, heat, bytes and files not cached) of `prior_ranked`'s studies."""
        if self.priors is not None:
            budget = Budget(int(budget.space_bytes * self.priors.space_share()), budget.bandwidth_bps, budget.window_s)
        admit = getattr(self.policy, "admit", None)
        wanted = [r for r in ranked if r[3] > 0 and (admit is None or admit(new, r[2], r[4], r[3], now))]
        order = {key: (i, cell) for i, (cell, key, _, _, _) in enumerate(wanted)}
        chosen = plan([Candidate(key, heat, size) for _, key, heat, size, _ in wanted], budget)
        chosen.sort(key=lambda c: order[c.key][0])
        if (pp := self.priors) is not None:     # cold start: a cell not judged yet waits for its fetch's outcome
            chosen = [c for c in chosen if not pp.waiting(order[c.key][1], now)]
        return [(c.key, order[c.key][1], c.size, c.heat) for c in chosen]

    def prior_fetched(self, prior: Hashable, new: Hashable, heat: float, cell: int, now: float) -> None:
        """A planned prior of this cell is being fetched for a new study: tell the eviction policy (one that keeps the
        pair, agent/policy/learned.py `link`), before the prior's files land, and a cold planner (an outcome is out)."""
        if self.priors is not None:
            self.priors.fetching(cell, now)
        if (link := getattr(self.policy, "link", None)) is not None:
            link(prior, new, heat)

    def prior_outcome(self, cell: int, used: bool) -> None:
        """A prefetched prior of this cell was opened (used) or evicted unopened."""
        if self.priors is not None:
            self.priors.feedback(cell, used)

    def prior_heat(self) -> list[float]:
        """The learnt chance that a prefetched prior of each rank is opened."""
        return [] if self.priors is None else [round(self.priors.heat(r), 3) for r in range(self.priors.k)]

    def status(self) -> dict[str, object]:
        st = self.policy.status() if hasattr(self.policy, "status") else {"policy": self.policy.name, "mode": "rule"}
        space: dict[str, object] = {}
        if self.priors is not None:     # the page's "cache policy" row shows the mode: the planner's too
            space = {"prior_space_share": round(self.priors.space_share(), 3), "prior_mode": self.priors.mode(),
                     "mode": f"{st.get('mode', 'rule')}; priors: {self.priors.mode()}"}
        return {"stack": self.spec.label, **st, "last_k": getattr(self.policy, "last_k", None), **space}
