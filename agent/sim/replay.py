"""Replay a trace through a cache of a given capacity, with the agent's own policy classes.

Schemes (see agent/policy): A = `lru`; B = `age` (90-day rule); C = `kmeans` eviction + LSTM day-directory prefetch in
an early-morning window; `ours` = whole-study LRU + prior-study prefetch at write time (when the first file of a new
study arrives, the patient's most recent prior studies, same modality first, are fetched from S3 within a bandwidth and
space budget, before the radiologist opens the new study with them).

What is counted:
  * only reads count for hit ratios and latency; writes always land in the cache (write-through);
  * the first `warmup_days` fill the cache and are not counted;
  * latency model (`LatencyModel`): hit = SSD latency + size / SSD rate; miss = round trip + size / line rate (default
    10 MB/s, the paper's measured private line), reported on an idle line and through one FIFO queue of all demand
    misses at the line rate (a burst of misses waits);
  * egress = bytes fetched from S3 per 1-minute window, each transfer's bytes in the minutes it was on the line
    (demand misses back to back through the FIFO line, prefetches at their capped rate on top: demand is not slowed by
    them in this model); the peak is reported in Mbps. Transfers still queued at the trace's end extend the series.
    Uploads are excluded, they are the same for every scheme;
  * a prefetched file that is read before its fetch completed counts as a miss (fetched on demand);
  * prior studies are known to the policy only through the trace's catalog lines (`S`) and the studies written so far
    (one acquired later, even the same day, is not a prior yet, as in the agent's study index): their total bytes, so
    a prefetch pays for the whole study, including files nobody reads later.

Per-request work is a few dict/bytearray operations; the batch policy (kmeans) runs when the cache is over capacity
and frees down to `low_watermark`, like the agent's pressure loop.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from agent.policy import eviction
from agent.policy.features import WINDOW, daily_counts, window_features
from agent.policy.prefetch import Budget, Candidate, plan
from agent.policy.priors import PATIENT_STUDIES, StudyInfo
from agent.policy.stack import PolicyStack, spec_of
from agent.sim.trace import TraceArrays, _bar
from agent.sim.workload import DAY

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LatencyModel:
    ssd_s: float = 0.0002          # NVMe/SATA SSD random read
    ssd_bps: float = 500e6
    rtt_s: float = 0.030           # object-store round trip over the private line
    line_bps: float = 10e6         # 10 MB/s, as measured in the paper

    def latency(self, hit: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Per request on an idle line."""
        return np.where(hit, self.ssd_s + size / self.ssd_bps, self.rtt_s + size / self.line_bps)

    def line_queue(self, t: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Completion times of demand fetches arriving at t (sorted) through one FIFO line.

        finish_i = max(t_i, finish_{i-1}) + s_i / rate, in closed form:
        finish = C + running max of (t - C_prev), C = cumulative transfer time."""
        if t.size == 0:
            return t.copy()
        dur = size / self.line_bps
        c = np.cumsum(dur)
        return c + np.maximum.accumulate(t - (c - dur))


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int
    warmup_days: float = 3.0
    low_watermark: float = 0.95        # batch policies free down to this share of the capacity
    # the agent's pass for every policy, (high, low): over high × capacity free down to low × capacity. None: online
    # policies free just the overflow, batch ones down to low_watermark (the live-vs-simulated parity test sets them)
    watermarks: tuple[float, float] | None = None
    # when the files the trace reads but never writes were made, in seconds from its start (at the latest): the
    # archive's are older; the live parity test puts its archive into the bucket just before the agent starts (0)
    archive_created: float = -DAY
    latency: LatencyModel = field(default_factory=LatencyModel)
    prefetch_bps: float = 5e6          # prefetch may use half of the 10 MB/s line
    prefetch_space: float = 0.05       # scheme C: one LSTM plan may fill at most this share of the capacity
    priors_space: float = 0.3          # one prior plan may fill at most this share (the tuning families' choice)
    lstm_hour: float = 5.0             # scheme C: the early-morning prefetch window starts here
    lstm_window_h: float = 2.0
    priors_k: int = 3                  # ours: prior studies considered per new study
    priors_window_s: float = 3600.0    # ours: a prior plan must be fetched within this
    model: str | None = None           # .tflite for scheme C (default: models/hotness.tflite)
    capacity_unit: str | None = None   # the unit the capacity was given in, for the report ('GB')


def agent_default() -> tuple[str, str | None]:
    """The stack a box runs when its config says nothing: `[cache] eviction` and the prefetchers that
    `[prefetch]` enables by default (LSTM day-directories: `enabled`; prior studies: `priors`)."""
    from agent.config import CacheConfig, PrefetchConfig
    ev = {f.name: f.default for f in dataclasses.fields(CacheConfig)}["eviction"]
    pf = {f.name: f.default for f in dataclasses.fields(PrefetchConfig)}
    planners = [name for name, on in (("lstm", pf["enabled"]), ("priors", pf["priors"])) if on]
    return ev, "+".join(planners) or None


SCHEMES: dict[str, tuple[str, str | None]] = {
    "A": ("lru", None),
    "B": ("age", None),
    "C": ("kmeans", "lstm"),
    "ours": ("study", "priors"),
    # demand-only variants (no prefetch): for comparisons with Belady, which cannot prefetch
    "study": ("study", None),
    "kmeans": ("kmeans", None),
    # study hit density learned from the trace's own traffic (agent/policy/learned.py)
    "learned": ("learned", None),
    "learned+priors": ("learned", "priors"),
    "learned+lstm+priors": ("learned", "lstm+priors"),      # does the LSTM earn its place? (ablation)
    # study LRU or learned hit density, whichever shadow cache serves more (agent/policy/adaptive.py)
    "adaptive": ("adaptive", None),
    "adaptive+priors": ("adaptive", "priors"),
    # what the agent runs with its default configuration (results.json marks it "default": true)
    "agent": agent_default(),
}
DEFAULT_SCHEME = "agent"


@dataclass
class SchemeResult:
    scheme: str
    reads: int
    hits: int
    read_bytes: int
    hit_bytes: int
    mean_latency_s: float
    p95_latency_s: float
    egress_peak_mbps: float
    prefetch_bytes: int
    mean_queued_latency_s: float
    p95_queued_latency_s: float
    prefetch_used_bytes: int
    daily_hit_ratio: list[float | None]   # None: no reads that day (e.g. a weekend without an ED)
    egress_per_min: np.ndarray = dataclasses.field(repr=False)
    cpu_s: float = 0.0                     # process CPU of the replay (policy + simulator bookkeeping)

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(self.reads, 1)

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / max(self.read_bytes, 1)


def spread_per_minute(end: np.ndarray, size: np.ndarray, rate: float, since: float, n_min: int) -> np.ndarray:
    """Bytes per minute of transfers that end at `end` and ran at `rate`: each transfer's bytes are
    spread over the minutes it was on the line (a 2 GB prior arrives over minutes, not in one).
    `n_min` must cover the last end (see `egress_minutes`)."""
    start = end - size / rate
    keep = end >= since
    short = keep & (np.floor(start / 60) == np.floor(end / 60))
    # float even without a short transfer: bincount of nothing is int64, which the long ones cannot be added to
    out = np.bincount((end[short] // 60).astype(np.int64), weights=size[short], minlength=n_min).astype(np.float64)
    for s0, e0 in zip(start[keep & ~short].tolist(), end[keep & ~short].tolist(), strict=True):
        m0, m1 = int(s0 // 60), int(e0 // 60)
        edges = np.clip(np.arange(m0, m1 + 2) * 60.0, s0, e0)
        out[m0:m1 + 1] += np.diff(edges) * rate
    return out


def egress_minutes(horizon_s: float, *ends: np.ndarray) -> int:
    """Minutes of the egress series: the trace's horizon, or longer when transfers queued at its end
    finish after it (they are still on the line, and are counted, not folded into the last minute)."""
    last = max([horizon_s] + [float(e.max()) for e in ends if e.size])
    return int(last // 60) + 1


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.argsort(keys, kind="stable"), np.concatenate(([0], np.cumsum(np.bincount(keys, minlength=n))))


def _members(csr: tuple[np.ndarray, np.ndarray], k: int) -> np.ndarray:
    order, starts = csr
    return order[starts[k]:starts[k + 1]]


class Replayer:
    def __init__(self, ta: TraceArrays, scheme: str, cfg: ReplayConfig, predictor=None) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
        self.ta, self.scheme, self.cfg = ta, scheme, cfg
        ev_name, self.prefetch = SCHEMES[scheme]
        # the agent's own runner: the same eviction policy and planners as agent/store/evictor.py and
        # agent/prefetcher.py build from the config
        self.stack = PolicyStack(spec_of(ev_name, (self.prefetch or "").split("+")), priors_k=cfg.priors_k)
        # CSR lists: objects per study, objects per directory, studies per patient
        self.study_objs = _csr(ta.obj_study, len(ta.study_bytes))
        self.dir_objs = _csr(ta.obj_dir, len(ta.dir_names))
        self.patient_studies = _csr(ta.study_patient, int(ta.study_patient.max()) + 1 if ta.study_patient.size else 0)
        n_obj, n_st = ta.n_objects, len(ta.study_bytes)
        known = np.bincount(ta.obj_study, weights=ta.obj_size, minlength=n_st).astype(np.int64)
        # one "phantom" object per study holds the bytes of its files that never appear in the trace
        phantom = np.maximum(ta.study_bytes - known, 0)
        self.size = np.concatenate([ta.obj_size, phantom])
        self.study = np.concatenate([ta.obj_study, np.arange(n_st, dtype=np.int32)])
        self.created = np.concatenate([ta.study_day[ta.obj_study], ta.study_day]).astype(np.float64) * DAY
        # a file the trace never writes was made before it began (cfg.archive_created), as the live catalog's mtime
        # says; its study's day (the day a new study was written into the directory, where a directory holds a
        # patient's studies) made a prior read on a miss look new, and the doorkeeper let it in as an ordinary study
        written = ta.obj[ta.is_write]
        never = np.ones(n_obj, dtype=bool)
        never[written] = False
        self.created[:n_obj][never] = np.minimum(self.created[:n_obj][never], cfg.archive_created)
        # and a written file no earlier than the day it was written: an imported trace's directory "study" dates from
        # its first write, and a study written into it weeks later looked weeks old (docs/replay.md, round 36)
        self.created[written] = np.maximum(self.created[written], ta.t[ta.is_write] // DAY * DAY)
        self.directory = np.concatenate([ta.obj_dir, np.full(n_st, -1, dtype=np.int32)])
        self.n_obj = n_obj
        self.dir_files = np.bincount(ta.obj_dir, minlength=len(ta.dir_names))
        self.in_cache = bytearray(n_obj + n_st)
        self.cached_view = np.frombuffer(self.in_cache, dtype=np.uint8)
        self.prefetched = bytearray(n_obj + n_st)
        self.ready: dict[int, float] = {}
        self.used = 0
        self.queue_free = 0.0
        self.pf_times: list[float] = []
        self.pf_sizes: list[int] = []
        self.pf_used = 0
        # bytes prefetched after the warm-up, and of them read: the hit ratios count no warm-up, and a planner's cold
        # start (its first fetches, before any outcome) falls in it on these traces (docs/replay.md, round 29)
        self.pf_after = self.pf_used_after = 0
        self.fetched_after: set[int] = set()     # prefetched after the warm-up, not read yet
        self.predictor = predictor
        self.pf_cell: dict[int, int] = {}    # prefetched study → its planner cell, until opened or evicted
        # the studies the catalog knows at the current request: the archive's (never written during the
        # trace) from the start, the others from their first write; a study acquired later the same day
        # is not a prior yet (the agent's study index learns it from its first file's header)
        self.known = np.ones(n_st, dtype=bool)
        self.known[ta.obj_study[ta.obj[ta.is_write]]] = False
        if not self.stack.online:
            self.last = np.zeros(n_obj + n_st)
            self.count = np.zeros(n_obj + n_st, dtype=np.int64)

    # -- cache state
    def _insert(self, o: int, t: float, prefetch: bool = False, written: bool = False) -> None:
        self.in_cache[o] = 1
        size = self.size.item(o)    # .item: a Python number without a numpy scalar on the way (once per insert)
        self.used += size
        if self.stack.online:
            self.stack.inserted(o, size, t, self.created.item(o), self.study.item(o), prefetch, written)
        else:
            self.last[o] = t
            self.count[o] = 0 if prefetch else 1

    def _table(self) -> tuple[eviction.FileTable, np.ndarray]:
        cached = np.flatnonzero(self.cached_view)
        return eviction.FileTable(
            key=cached, size=self.size[cached], last_access=self.last[cached], access_count=self.count[cached],
            created=self.created[cached], directory=self.directory[cached], study=self.study[cached]), cached

    def _limit(self) -> float:
        """Cached bytes over which a pass runs."""
        cfg = self.cfg
        return cfg.capacity if cfg.watermarks is None else cfg.watermarks[0] * cfg.capacity

    def _evict(self, t: float) -> None:
        cfg = self.cfg
        # online policies free just enough; batch ones down to the low watermark, like the agent's pass
        if cfg.watermarks is not None:
            want = int(self.used - cfg.watermarks[1] * cfg.capacity)
        else:
            want = self.used - cfg.capacity if self.stack.online else int(self.used - cfg.low_watermark * cfg.capacity)
        for v in self.stack.victims(want, t, self._table):
            self.in_cache[v] = 0
            self.used -= self.size.item(v)
            self.ready.pop(v, None)
            if self.prefetched[v]:
                self.prefetched[v] = 0
                self._evicted_unread(v)

    def _fetch_plan(self, objs: list[int], t: float) -> None:
        """Fetch objects in order at the prefetch rate behind whatever is queued."""
        start = max(t, self.queue_free)
        after = t >= self.cfg.warmup_days * DAY
        for o in objs:
            if after:
                self.pf_after += self.size.item(o)
                self.fetched_after.add(o)
            start += float(self.size[o]) / self.cfg.prefetch_bps
            self._insert(o, t, prefetch=True)
            self.ready[o] = start
            self.prefetched[o] = 1
            self.pf_times.append(start)
            self.pf_sizes.append(int(self.size[o]))
        self.queue_free = start

    def _describe(self, s: int) -> None:
        """A new study is written: tell the stack its features, and that the patient's earlier studies now
        have a newer one (what the agent's prefetcher tells it from the catalog's study index)."""
        ta = self.ta
        earlier = [x for x in self._newest(s).tolist() if ta.study_day[x] < ta.study_day[s]]
        for x in [s, *earlier]:
            dept = ta.department_names[ta.study_department[x]] if ta.department_names else None
            self.stack.describe(x, ta.modality_names[ta.study_modality[x]], dept, x != s)

    def _newest(self, s: int) -> np.ndarray:
        """The known studies of s's patient a plan weighs: the newest PATIENT_STUDIES by day (the catalog's query)."""
        studies = _members(self.patient_studies, int(self.ta.study_patient[s]))
        studies = studies[self.known[studies]]
        return studies[np.argsort(self.ta.study_day[studies], kind="stable")[-PATIENT_STUDIES:]]

    # -- ours: prior studies of the patient when a new study arrives
    def _plan_priors(self, s: int, t: float) -> None:
        ta, cfg = self.ta, self.cfg
        studies = self._newest(s)
        if studies.size <= 1 or s not in studies:
            return
        info = [StudyInfo(int(x), int(ta.study_modality[x]), float(ta.study_day[x]), 0) for x in studies]
        new = StudyInfo(s, int(ta.study_modality[s]), float(ta.study_day[s]), 0)
        ranked, objs_of = [], {}
        for cell, prior, heat in self.stack.prior_ranked(new, info):
            x = prior.key
            if x in self.pf_cell:
                continue
            objs = [int(o) for o in _members(self.study_objs, x) if not self.in_cache[o]]
            ph = self.n_obj + x
            if not self.in_cache[ph] and self.size[ph] > 0:
                objs.append(ph)
            objs_of[x] = objs
            ranked.append((cell, x, heat, int(self.size[objs].sum()) if objs else 0, len(objs)))
        if not objs_of:
            return
        backlog = max(0.0, self.queue_free - t)
        budget = Budget(int(cfg.priors_space * cfg.capacity), cfg.prefetch_bps, max(0.0, cfg.priors_window_s - backlog))
        for x, cell, _, heat in self.stack.prior_plan(s, ranked, budget, t):
            self.pf_cell[x] = cell
            self.stack.prior_fetched(x, s, heat, cell, t)
            self._fetch_plan(objs_of[x], t)

    def _evicted_unread(self, o: int) -> None:
        """A prefetched file left the cache unread: its prior is unused once none of its files is cached, as the live
        catalog settles it (agent/store/catalog/studies.py `settle_prior_fetches`, there once its fetch is over: here
        its files hold their place from the plan, so none is cached only once they were evicted); a prior whose last
        files were cut before its session and whose first ones were then read was opened."""
        st = self.study.item(o)
        if st in self.pf_cell and not (self.in_cache[self.n_obj + st] or self.cached_view[
                _members(self.study_objs, st)].any()):
            self._prefetch_feedback(o, False)

    def _prefetch_feedback(self, o: int, used: bool) -> None:
        st = int(self.study[o])
        if (cell := self.pf_cell.pop(st, None)) is not None:
            self.stack.prior_outcome(cell, used)

    # -- scheme C: LSTM-predicted day-directories in the early-morning window
    def _plan_lstm(self, day: int, t: float, counts: np.ndarray, dir_day: np.ndarray, dir_mod: np.ndarray,
                   start_weekday: int) -> None:
        cfg = self.cfg
        # directories acquired in the last WINDOW days: their full content is known to the catalog
        # (older day-directories hold tens of GB of unrelated studies: no budget could afford them)
        dirs = np.flatnonzero((dir_day < day) & (dir_day >= day - WINDOW))
        if dirs.size == 0 or self.predictor is None:
            return
        files = self.dir_files[dirs]
        x = window_features(counts[dirs], day, dir_day[dirs], dir_mod[dirs], len(self.ta.modality_names),
                            start_weekday, files)
        heat = self.predictor.predict(x, files)
        cands = []
        for d, h in zip(dirs.tolist(), heat.tolist(), strict=True):
            objs = _members(self.dir_objs, d)
            objs = objs[self.cached_view[objs] == 0]
            objs = objs[self.created[objs] < t]   # only files that already exist
            if objs.size:
                cands.append(Candidate((d, objs), float(h), int(self.size[objs].sum())))
        budget = Budget(int(cfg.prefetch_space * cfg.capacity), cfg.prefetch_bps, cfg.lstm_window_h * 3600)
        for c in plan(cands, budget):
            self._fetch_plan(c.key[1].tolist(), t)
            if self.used > self._limit():
                self._evict(t)

    def run(self, progress: bool = False) -> SchemeResult:
        ta, cfg = self.ta, self.cfg
        n = ta.n
        T = ta.t.tolist()
        objs = ta.obj.tolist()
        W = ta.is_write.tolist()
        hit = bytearray(n)
        limit = self._limit()
        online = self.stack.online
        accessed = self.stack.accessed
        in_cache, ready, prefetched = self.in_cache, self.ready, self.prefetched
        study = self.study.tolist()
        planners = (self.prefetch or "").split("+")
        lstm = "lstm" in planners
        priors = "priors" in planners
        next_plan = cfg.lstm_hour * 3600 if lstm else float("inf")
        if lstm:
            reads = ~ta.is_write
            counts = daily_counts(ta.t[reads], ta.obj_dir[ta.obj[reads]], len(ta.dir_names), ta.n_days)
            dir_day, dir_mod = ta.dir_day(), ta.dir_modality()
            import datetime as dt
            start_weekday = dt.date.fromisoformat(ta.meta["start"]).weekday()
        last = getattr(self, "last", None)
        count = getattr(self, "count", None)
        bar = _bar(progress, n, f"replay {self.scheme}")
        step = 200_000
        for i in range(n):
            t = T[i]
            o = objs[i]
            if t >= next_plan:
                self._plan_lstm(int(next_plan // DAY), next_plan, counts, dir_day, dir_mod, start_weekday)
                next_plan += DAY
            if W[i]:
                s = study[o]
                new = not self.known[s]
                if new:
                    self.known[s] = True
                    self._describe(s)
                if not in_cache[o]:
                    self._insert(o, t, written=True)
                if new and priors:  # against the cache as the study's first write left it, as the agent plans
                    self._plan_priors(s, t)
            elif in_cache[o]:
                if prefetched[o]:
                    prefetched[o] = 0
                    self.pf_used += int(self.size[o])
                    if o in self.fetched_after:
                        self.fetched_after.discard(o)
                        self.pf_used_after += int(self.size[o])
                    self._prefetch_feedback(o, True)
                if (r := ready.pop(o, None)) is None or r <= t:
                    hit[i] = 1
                if online:
                    accessed(o, t)
                else:
                    last[o] = t
                    count[o] += 1
            else:
                self._insert(o, t)
            if self.used > limit:
                self._evict(t)
            if i % step == 0:
                bar.update(step if i else 0)
        bar.close()
        return self._result(np.frombuffer(hit, dtype=np.uint8).astype(bool))

    def _result(self, hit: np.ndarray) -> SchemeResult:
        ta, cfg = self.ta, self.cfg
        warm = cfg.warmup_days * DAY
        all_reads = ~ta.is_write
        reads = all_reads & (ta.t >= warm)
        size = ta.size
        lat = cfg.latency.latency(hit[reads], size[reads])
        # demand misses (warm-up included: the line is busy then too) through one FIFO line
        all_miss = all_reads & ~hit
        finish = cfg.latency.line_queue(ta.t[all_miss], size[all_miss].astype(np.float64))
        queued = np.full(ta.n, np.nan)
        queued[all_miss] = finish - ta.t[all_miss] + cfg.latency.rtt_s
        q_lat = np.where(hit[reads], cfg.latency.ssd_s + size[reads] / cfg.latency.ssd_bps, queued[reads])
        # each transfer's bytes in the minutes it was on the line: demand back to back at the line rate,
        # prefetch at its own capped rate on top
        pf_end = np.array(self.pf_times, dtype=np.float64)
        n_min = egress_minutes(ta.n_days * DAY, finish, pf_end)
        egress = spread_per_minute(finish, size[all_miss].astype(np.float64), cfg.latency.line_bps, warm, n_min)
        egress += spread_per_minute(pf_end, np.array(self.pf_sizes, dtype=np.float64), cfg.prefetch_bps, warm, n_min)
        first = int(np.ceil(warm / 60))
        peak = float(egress[first:].max()) * 8 / 60 / 1e6 if egress[first:].size else 0.0
        day = (ta.t // DAY).astype(np.int64)
        per_day_reads = np.bincount(day[all_reads], minlength=ta.n_days)
        per_day_hits = np.bincount(day[all_reads & hit], minlength=ta.n_days)
        daily = [h / n if n else None for h, n in zip(per_day_hits.tolist(), per_day_reads.tolist(), strict=True)]
        return SchemeResult(
            scheme=self.scheme, reads=int(reads.sum()), hits=int((hit & reads).sum()),
            read_bytes=int(size[reads].sum()), hit_bytes=int(size[reads & hit].sum()),
            mean_latency_s=float(lat.mean()) if lat.size else 0.0,
            p95_latency_s=float(np.percentile(lat, 95)) if lat.size else 0.0,
            mean_queued_latency_s=float(q_lat.mean()) if q_lat.size else 0.0,
            p95_queued_latency_s=float(np.percentile(q_lat, 95)) if q_lat.size else 0.0,
            egress_peak_mbps=peak, prefetch_bytes=sum(self.pf_sizes), prefetch_used_bytes=self.pf_used,
            daily_hit_ratio=daily, egress_per_min=egress)


def replay(ta: TraceArrays, scheme: str, cfg: ReplayConfig, progress: bool = False) -> SchemeResult:
    predictor = None
    if "lstm" in (SCHEMES[scheme][1] or "").split("+"):
        from agent.policy.predictor import DEFAULT_MODEL, HotnessPredictor
        predictor = HotnessPredictor(Path(cfg.model) if cfg.model else DEFAULT_MODEL)
    log.info("replay.start", scheme=scheme, requests=ta.n, capacity=cfg.capacity)
    cpu0 = time.process_time()
    r = Replayer(ta, scheme, cfg, predictor).run(progress)
    r.cpu_s = time.process_time() - cpu0
    log.info("replay.done", scheme=scheme, hit_ratio=round(r.hit_ratio, 4), byte_hit_ratio=round(r.byte_hit_ratio, 4))
    return r
