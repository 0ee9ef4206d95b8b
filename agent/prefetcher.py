"""Prefetch into the cache (README, "Daily prefetch", "Prior studies"): the policies decide (agent/policy: dirheat
and the policy stack's prior planner, which the simulator drives the same way); this module gathers their input
from the catalog and fetches through the gateway (shared with readers, verified, within the line's limits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Hashable

import structlog

from agent.auth import REFUSALS_EVERY, Every
from agent.config import Config
from agent.dicom import header as dicom_header
from agent.dicom.objectmeta import checked
from agent.metrics import Metrics
from agent.policy.dirheat import History, RankedDir, history, rank_by_model, rank_cold_start, window_bounds
from agent.policy.features import WINDOW
from agent.policy.prefetch import Budget, Candidate, plan
from agent.policy.pressure import Level
from agent.policy.priors import PATIENT_STUDIES, StudyInfo
from agent.policy.stack import PolicyStack
from agent.store.access import heat_dir
from agent.store.catalog import AsyncCatalog
from agent.store.errors import GatewayError
from agent.store.evictor import Evictor
from agent.store.evictor import stack_for as eviction_stack
from agent.store.gateway import Gateway
from agent.store.paths import study_of

log = structlog.get_logger("pacsgw.prefetch")


@dataclass(frozen=True)
class PlannedDir:
    dir: str
    heat: float
    why: str
    files: int        # files not cached yet (counted by the catalog: a day-directory may hold a million)
    bytes: int


@dataclass(frozen=True)
class Plan:
    ranked: list[RankedDir]       # every directory considered, hottest first
    chosen: list[PlannedDir]      # what will be fetched, in fetch order (best heat per byte first)
    skipped: list[PlannedDir]     # listed candidates that did not fit the budget
    budget_bytes: int
    window_end: float

    def as_json(self) -> dict:
        return asdict(self) | {"planned_bytes": sum(d.bytes for d in self.chosen)}


@dataclass
class RunStatus:
    running: bool = False
    planned_bytes: int = 0
    fetched_bytes: int = 0
    fetched_files: int = 0
    stopped: str = ""             # why the last run ended early ('' when it finished its plan)
    finished_at: float = 0.0


def stack_for(cfg: Config) -> PolicyStack:
    """The policy stack the config asks for: `[cache] eviction` and the planners `[prefetch]` enables."""
    planners = tuple(name for name, on in (("lstm", cfg.prefetch.enabled), ("priors", cfg.prefetch.priors)) if on)
    return eviction_stack(cfg.cache, planners, cfg.prefetch.priors_k)


def line_rate(cfg: Config) -> float:
    """Bytes per second prefetch may plan with: the uplink's limit, or unlimited."""
    return float(cfg.uplink.bwlimit) if cfg.uplink.bwlimit else float("inf")


def priors_budget(cfg: Config) -> int:
    """Bytes one new study's priors may fill: priors_space of the cache, under priors_max_bytes if set."""
    share = int(cfg.prefetch.priors_space * cfg.cache.max_bytes)
    return min(share, cfg.prefetch.priors_max_bytes) if cfg.prefetch.priors_max_bytes else share


def _load_predictor(cfg: Config):  # (HotnessPredictor or None, what /status says)
    """The heat model, or None and the cold-start rule: a missing or unusable model (corrupt file, card
    that does not match, runtime that refuses it) is logged and shown in /status; serving goes on."""
    from agent.policy.predictor import DEFAULT_MODEL, HotnessPredictor
    path = Path(cfg.model.path) if cfg.model.path else DEFAULT_MODEL
    if not path.is_file():
        log.warning("prefetch_model_missing", path=str(path), fallback="cold-start rule")
        return None, f"fallback: cold-start rule (no model at {path})"
    try:
        predictor = HotnessPredictor(path)
    except Exception as e:  # LiteRT raises ValueError/RuntimeError; the card OSError/JSON
        reason = f"{type(e).__name__}: {e}"[:300]
        log.error("prefetch_model_unusable", path=str(path), error=reason, fallback="cold-start rule")
        return None, f"fallback: cold-start rule (model {path} unusable: {reason})"
    return predictor, f"model {path} (version {predictor.version})"


class Fetcher:
    """Fetches the uncached files of planned directories, a catalog page at a time (memory stays flat),
    until a stop condition says why not to go on."""

    PAGE = 256

    def __init__(self, gateway: Gateway, db: AsyncCatalog, pressure: Callable[[], Level]) -> None:
        self.gateway, self.db, self.pressure = gateway, db, pressure

    async def fetch_dir(self, d: str, deadline: float, status: RunStatus, kind: str) -> str:
        """→ '' when every missing file of directory or study d (catalog OF_STUDY) was fetched (or failed, logged),
        else why the run stopped."""
        after = ""
        while page := await self.db.missing_page(d, after, self.PAGE):
            for e in page:
                if time.time() >= deadline:
                    return "window ended"
                if self.pressure() >= Level.HIGH:
                    return f"pressure {self.pressure()}"
                try:
                    landed = await self.gateway.prefetch(e)
                except GatewayError as err:
                    log.warning("prefetch_failed", path=e.path, kind=kind, error=err.reason)
                    continue
                if landed:
                    status.fetched_files += 1
                    status.fetched_bytes += e.size
                    log.info("prefetched", path=e.path, bytes=e.size, kind=kind)
            after = page[-1].path
        return ""


class DirPrefetcher:
    """Scheme C in the live agent: rank day-directories, list the top ones, fetch within the budget."""

    def __init__(self, cfg: Config, db: AsyncCatalog, gateway: Gateway, fetcher: Fetcher) -> None:
        self.cfg, self.db, self.gateway, self.fetcher = cfg, db, gateway, fetcher
        self.predictor, self.model_state = _load_predictor(cfg)
        self.status = RunStatus()
        self._lock = asyncio.Lock()
        self._model_lock = asyncio.Lock()  # one LiteRT interpreter: a dry run must not resize it under a run

    async def history(self, now: float) -> History:
        today = dt.date.fromtimestamp(now)
        rows = await self.db.heat_since((today - dt.timedelta(days=WINDOW)).isoformat())
        rows = [(d, day, reads) for d, day, reads, _, _ in rows if day < today.isoformat()]
        return history(rows, {d: await self.db.count_files_under(d) for d in {r[0] for r in rows}}, today)

    async def rank(self, now: float) -> list[RankedDir]:
        h = await self.history(now)
        if not h.empty and self.predictor is not None:
            async with self._model_lock:
                return await asyncio.to_thread(rank_by_model, h, self.predictor, self.predictor.version)
        days = self.cfg.prefetch.cold_start_days
        writes: Counter[str] = Counter()
        for parent, n in await self.db.writes_since(now - days * 86400):
            writes[heat_dir(parent, self.cfg.prefetch.dir_depth)] += n
        return rank_cold_start(writes, days)

    async def plan(self, now: float) -> Plan:
        """Rank, list the top `top_dirs`, and fit them into max_bytes and what the line carries by the window's end.
        Outside the window (a dry run, or `pacsgw prefetch` by hand) a run now gets the window's length."""
        start, end = window_bounds(now, self.cfg.prefetch.window)
        if now < start:
            start, end = now, now + (end - start)
        ranked = await self.rank(now)
        listed: list[PlannedDir] = []
        for r in ranked[: self.cfg.prefetch.top_dirs]:
            try:
                await self.gateway.list_tree(r.dir)
            except GatewayError as e:  # the directory is gone (deleted): nothing to fetch
                log.info("prefetch_dir_skipped", dir=r.dir, reason=e.reason)
                continue
            listed.append(PlannedDir(r.dir, r.heat, r.why, *await self.db.missing_under(r.dir)))
        budget = Budget(self.cfg.prefetch.max_bytes, line_rate(self.cfg), end - max(now, start))
        fits = plan([Candidate(d.dir, d.heat, d.bytes) for d in listed], budget)
        by_dir = {d.dir: d for d in listed}  # what is not chosen is left, in ranked order: skipped
        chosen = [by_dir.pop(c.key) for c in fits]
        return Plan(ranked, chosen, list(by_dir.values()), budget.byte_limit, end)

    async def run(self) -> RunStatus:
        """One prefetch run now, ending with the current window (or after a window's length, outside it)."""
        async with self._lock:
            self.status = status = RunStatus(running=True)
            try:
                p = await self.plan(time.time())
                status.planned_bytes = sum(d.bytes for d in p.chosen)
                log.info("prefetch_start", dirs=[d.dir for d in p.chosen], planned_bytes=status.planned_bytes,
                         budget_bytes=p.budget_bytes, window_end=p.window_end)
                for d in p.chosen:
                    status.stopped = await self.fetcher.fetch_dir(d.dir, p.window_end, status, "directory")
                    if status.stopped:
                        log.warning("prefetch_stopped", reason=status.stopped, fetched_bytes=status.fetched_bytes,
                                    planned_bytes=status.planned_bytes)
                        break
            finally:  # a failed run (e.g. the catalog disk full) must not look like one still running
                status.running, status.finished_at = False, time.time()
            log.info("prefetch_done", files=status.fetched_files, bytes=status.fetched_bytes,
                     stopped=status.stopped or None)
            return status

    async def loop(self) -> None:
        """Start one run in each window. The window is marked in the catalog when its run starts, so a
        restart inside the window does not spend max_bytes a second time."""
        while True:
            now = time.time()
            start, _ = window_bounds(now, self.cfg.prefetch.window)
            if (start <= now and self.fetcher.pressure() < Level.HIGH
                    and await self.db.get_state("prefetch_window") != str(start)):
                await self.db.set_state("prefetch_window", str(start))
                try:
                    await self.run()
                except Exception as e:  # a failed run must not end the loop
                    log.error("prefetch_run_failed", error=repr(e)[:300])
            await asyncio.sleep(self.cfg.prefetch.check_seconds)


@dataclass
class StudyStarts:
    """Which stored file starts a study not seen lately, and the key a study is known by: asked at the commit by the
    owner's PriorFetcher and by each serving worker (which queues what it finds for the owner), with no catalog query
    for a study's later files."""

    cfg: Config
    _seen: dict[tuple[str, str | None], None] = field(default_factory=dict)  # recent (key, patient)

    SEEN_MAX = 4096

    def key(self, d: str, study_uid: str | None) -> str:
        """The key of a study in directory d: the key the evictor groups its files by, their study UID where the
        study index holds them (`[dicom] metadata`), else the directory. The catalog's study tables and the stack
        know a study by it; its files are those indexed under it, else those below the directory (catalog OF_STUDY)."""
        return study_uid or d if self.cfg.dicom.metadata else d

    def first(self, path: str, header: dicom_header.Header) -> tuple[str, dicom_header.Header] | None:
        """→ (the study's key, the header with only the values their VR allows: the study table and the planner keep
        them for good) when path starts a (study, patient) not seen lately. Keyed by the directory, a study's later
        files start nothing; keyed by the study UID, each file's header says which study it is of (a day directory
        holds many). A file in no study (not deep enough: paths.study_of, the evictor's rule) starts none."""
        depth = self.cfg.prefetch.study_depth
        if path.count("/") < depth or (
                seen := (self.key(study_of(path, depth), (h := checked(header)).study_uid), h.patient)) in self._seen:
            return None
        self._seen[seen] = None
        if len(self._seen) > self.SEEN_MAX:
            del self._seen[next(iter(self._seen))]
        return seen[0], h


@dataclass
class PriorFetcher:
    """When the first file of a new study is stored (its DICOM header, read at the commit, says which study it is of):
    remember the study (catalog `studies` table), and fetch the patient's earlier studies within the budget."""

    cfg: Config
    db: AsyncCatalog
    gateway: Gateway
    fetcher: Fetcher
    stack: PolicyStack
    view: Evictor       # feeds the shared stack: its reads flushed and its view synced before a plan
    metrics: Metrics    # the daemon's (a gateway is used through its facade methods only: test_architecture)
    starts: StudyStarts = field(init=False)     # which stored file starts a new study
    _tasks: set[asyncio.Task] = field(default_factory=set)
    status: RunStatus = field(default_factory=RunStatus)
    _learned: bool = False  # the catalog's decided outcomes were fed to the stack once
    # stored file that starts a new study → when, until its priors are planned and fetched (Evictor.plans_pending)
    _pending: dict[str, float] = field(default_factory=dict)
    # writing user → when their last plans started (at most priors_per_user_hour): any writer could make the box fetch
    # and hold other patients' archive studies, a new study UID with a newer StudyDate at a time
    _started: dict[str, deque[float]] = field(default_factory=dict)
    _told: Every = field(default_factory=lambda: Every(REFUSALS_EVERY))
    over_cap: int = 0     # new studies recorded but not planned (/healthz prefetch.priors_over_cap)
    # PLANS_AT_ONCE plans (each with its fetch) at a time; the rest wait, not dropped: users × the hourly cap bound the
    # queue, and a modality catching up after an outage still gets its priors. Two let one plan's catalog work, remote
    # listing and wait for the evictor overlap another's fetch; more would split the line, which each plan's budget
    # counts whole, until their windows cut every fetch short
    _plans: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PriorFetcher.PLANS_AT_ONCE))
    _learning: asyncio.Lock = field(default_factory=asyncio.Lock)   # the first learn() feeds every outcome, once
    # prior keys planned and not yet fetched to the end: not planned again meanwhile (nor in the simulator, while open),
    # and not settled as evicted unread while none of their files has landed yet
    _fetching: set[str] = field(default_factory=set)
    _adopting: asyncio.Task[None] | None = None     # the poll of the serving workers' new studies (adopt_workers)

    PLANS_AT_ONCE = 2
    ADOPT_EVERY_S = 1.0
    ADOPT_AT_ONCE = 256

    def __post_init__(self) -> None:
        self.starts = StudyStarts(self.cfg)

    async def learn(self) -> None:
        """Feed the policy what became of earlier prior fetches (opened or evicted unread), as the simulator
        does; the outcomes live in the catalog, so what was learnt survives restarts."""
        async with self._learning:
            await self.view.flush_reads()
            outcomes = await self.db.settle_prior_fetches(frozenset(self._fetching))
            if not self._learned:
                outcomes = await self.db.prior_outcomes()  # every decided outcome, those just settled included
                self._learned = True
            for cell, used in outcomes:     # the catalog's rank column keeps the planner's cell
                self.stack.prior_outcome(cell, used)

    def on_stored(self, path: str, header: dicom_header.Header, user: str) -> None:
        """At the commit, before an eviction pass can run (a serving worker's store: when adopt_workers takes it in)."""
        if (first := self.starts.first(path, header)) is None:
            return
        self._pending[path] = time.monotonic()
        task = asyncio.create_task(self.new_study(first[0], path, first[1], user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def adopt_workers(self) -> None:
        """[server] workers > 1: the studies the serving workers saw start (queued in the catalog's worker_studies by
        agent/worker.py) are taken in as if stored here: one plan per study whichever process stored its files, the
        writing user's cap counted box-wide. Polled each ADOPT_EVERY_S: one read of a table empty but for the last
        second's new studies."""
        self._adopting = asyncio.create_task(self._adopt())

    async def _adopt(self) -> None:
        while True:
            try:
                if rows := await self.db.worker_studies(self.ADOPT_AT_ONCE):
                    for _, path, study_uid, study_date, modality, patient, user in rows:
                        self.on_stored(path, dicom_header.Header(study_uid=study_uid, study_date=study_date,
                                                                 modality=modality, patient=patient), user)
                    await self.db.worker_studies_taken(rows[-1][0])
            except Exception as e:  # the catalog failed (disk full): the rows wait for the next poll (seen: no replan)
                log.error("worker_studies_failed", error=repr(e)[:300])
            await asyncio.sleep(self.ADOPT_EVERY_S)

    async def new_study(self, key: str, path: str, h: dicom_header.Header, user: str) -> None:
        try:
            if await self.db.study_known(key, h.patient):
                return
            # First writer wins the row; a file naming another patient first (a study UID a worklist handed out before
            # its study came) kept the study's own priors from ever being planned: planned for each patient, once
            if disputed := not await self.db.record_study(key, h.patient, h.study_uid, h.study_date, h.modality):
                log.warning("study_uid_disputed", study=key, path=path, user=user)
            else:
                log.info("study_recorded", study=key, first=path, dicom=h.patient is not None, modality=h.modality)
                self.stack.describe(key, h.modality, None, False)
            if h.patient is not None and self.may_plan(user, key):
                async with self._plans:
                    await self.fetch_chosen(key, await self.plan_priors(key, h, disputed))
        except Exception as e:  # prior prefetch is best effort; the store itself succeeded
            log.error("prior_prefetch_failed", study=key, error=repr(e)[:300])
        finally:
            self._pending.pop(path, None)

    def may_plan(self, user: str, study: str) -> bool:
        """Whether the user started fewer than priors_per_user_hour plans in the last hour (then this one counts)."""
        started = self._started.setdefault(user, deque(maxlen=self.cfg.prefetch.priors_per_user_hour))
        if len(started) == started.maxlen and time.monotonic() - started[0] < 3600:
            self.over_cap += 1
            self.metrics.prior_plans_over_cap.inc()
            if (since := self._told.due(user)) is not None:
                log.warning("prior_plans_capped", user=user, study=study, per_hour=started.maxlen, suppressed=since)
            return False
        started.append(time.monotonic())
        return True

    def planning(self, within: float) -> bool:
        """Whether a file stored less than `within` seconds ago may still start a new study whose priors are to plan
        or fetch."""
        oldest = time.monotonic() - within
        return any(t > oldest for t in self._pending.values())

    async def plan_priors(self, new: str, h: dicom_header.Header,
                          disputed: bool = False) -> list[tuple[Hashable, int, int, float]]:
        """The priors to fetch for the new study (key `new`), planned against the cache as the study's first write
        left it; `disputed`: its row names another patient, it is ranked among h's as its header says.
        → (key, cell, bytes, heat) of each."""
        await self.learn()
        studies = await self.db.patient_studies(h.patient, PATIENT_STUDIES)
        if disputed:    # in patient_studies' order (a NULL date first)
            studies = sorted([*studies, (new, h.study_uid, h.study_date, h.modality)],
                             key=lambda s: (s[2] is not None, s[2] or "", s[0]))[-PATIENT_STUDIES:]
        keys = [self.starts.key(k, uid) for k, uid, _, _ in studies]
        if new not in keys:     # PATIENT_STUDIES newer ones came first: its priors are never ranked
            return []
        new_day = _ordinal(h.study_date)
        older = [(k, m) for k, (_, _, day, m) in zip(keys, studies, strict=True)
                 if k != new and _ordinal(day) < new_day]
        for prior, modality in older:       # they have a newer study now (the simulator says the same)
            self.stack.describe(prior, modality, None, True)
        info = [StudyInfo(i, m or "", _ordinal(day), 0) for i, (_, _, day, m) in enumerate(studies)]
        ranked: list[tuple[int, str, float, int, int]] = []
        for cell, prior, heat in self.stack.prior_ranked(StudyInfo(keys.index(new), h.modality or "", new_day, 0),
                                                         info):
            key = keys[prior.key]
            if key != studies[prior.key][1]:    # a directory (by UID: the files the study index names are known)
                await self.gateway.list_tree(key)
            missing_files, missing_bytes = await self.db.missing_under(key)
            ranked.append((cell, key, heat, missing_bytes, missing_files))
        budget = Budget(priors_budget(self.cfg), line_rate(self.cfg), self.cfg.prefetch.priors_window_seconds)
        async with self.view.synced() as stack:
            chosen = stack.prior_plan(new, [r for r in ranked if r[1] not in self._fetching], budget, time.time())
            self._fetching.update(str(c[0]) for c in chosen)    # no await since the test: another plan's are out
        log.info("prior_prefetch", study=new, patient_studies=len(studies), newer=len(older),
                 priors=[c[0] for c in chosen], heat=[round(c[3], 3) for c in chosen],
                 bytes=sum(c[2] for c in chosen), rank_heat=self.stack.prior_heat())
        return chosen

    async def fetch_chosen(self, new: str, chosen: list[tuple[Hashable, int, int, float]]) -> None:
        deadline = time.time() + self.cfg.prefetch.priors_window_seconds
        unfetched = [str(c[0]) for c in chosen]     # plan_priors' study keys, in _fetching
        try:
            for (_, cell, _, heat), prior in zip(chosen, list(unfetched), strict=True):
                self.stack.prior_fetched(prior, new, heat, cell, time.time())  # beside its new study till the report
                await self.db.record_prior_fetch(prior, cell)
                stopped = await self.fetcher.fetch_dir(prior, deadline, self.status, "prior")
                self._fetching.discard(unfetched.pop(0))
                if stopped:
                    break
        finally:    # those not fetched (the window ended, an error, the agent stopping) are plannable again
            self._fetching.difference_update(unfetched)

    async def stop(self) -> None:
        """At the agent's stop, before the gateway and the catalog close under them: plans and fetches still running
        end here (a fetch cut short settles at the next start's first plan)."""
        if self._adopting is not None:     # first: it would start plans
            self._adopting.cancel()
            await asyncio.gather(self._adopting, return_exceptions=True)
        if self._tasks:
            log.info("prior_prefetch_stopped", studies=len(self._tasks))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _ordinal(day: str | None) -> float:
    """DICOM StudyDate YYYYMMDD → a day number (unknown dates sort first)."""
    try:
        return float(dt.datetime.strptime(day or "", "%Y%m%d").toordinal())
    except ValueError:
        return 0.0

