"""Synthetic PACS workload: a seeded, parameterised generator of per-file requests.

Study-centred, as a PACS works: a modality writes a study, a radiologist reads it within hours with the patient's
prior studies, clinicians re-read parts over the following days, tumour boards weekly, and a thin long tail of old
studies is read. Every study-level event expands into one request per DICOM instance, like the gateway's access log.
Two passes: draw every study-level event (small), then expand them day by day (numpy), carrying requests past
midnight into the next day: memory is one day of requests. Defaults and sources: docs/workload.md.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

DAY = 86_400.0
MB = 1_000_000


@dataclass(frozen=True)
class ModalityShape:
    """How one modality's studies look on disk."""

    series: tuple[int, int]      # min, max series per study (uniform)
    images_median: float         # median instances per series (lognormal)
    images_sigma: float          # lognormal sigma of instances per series
    image_mb: float              # median instance size, MB (lognormal per study)
    size_sigma: float = 0.15     # lognormal sigma of instance size within a study
    write_spacing_s: float = 0.2  # seconds between two instances arriving from the modality


# Study shapes, shared by the presets (see docs/workload.md for the sources).
SHAPES: dict[str, ModalityShape] = {
    "CT": ModalityShape((2, 6), 220, 0.7, 0.52, 0.05, 0.1),
    "MR": ModalityShape((6, 14), 60, 0.6, 0.13, 0.2, 0.3),
    "CR": ModalityShape((1, 2), 1.5, 0.3, 12.0, 0.3, 5.0),
    "DX": ModalityShape((1, 3), 1.5, 0.3, 18.0, 0.3, 5.0),
    "US": ModalityShape((1, 2), 30, 0.6, 0.9, 0.4, 2.0),
    "MG": ModalityShape((1, 2), 4, 0.2, 40.0, 0.3, 10.0),
    "PT": ModalityShape((2, 4), 300, 0.4, 0.07, 0.1, 0.05),
    "NM": ModalityShape((1, 3), 20, 0.6, 0.3, 0.3, 1.0),
}


@dataclass(frozen=True)
class Department:
    """Who ordered the study: decides how soon it is read and whether the tumour board sees it."""

    share: float
    read_median_h: float         # primary read delay after acquisition (lognormal median, hours)
    tumour_board: bool = False   # cases discussed at the weekly tumour board


@dataclass(frozen=True)
class WorkloadParams:
    """Every knob of the generator. Defaults: a general hospital (`general` preset)."""

    preset: str = "general"
    seed: int = 1
    start: str = "2026-01-05"             # a Monday; trace time 0 is local midnight of this day
    days: int = 14
    monthly_tb: float = 5.0               # acquired volume per month (TB, SI), scales the study count
    layout: str = "{modality}/{date}/{study}/{series}/{instance}.dcm"
    modality_mix: dict[str, float] = field(default_factory=lambda: {
        "CR": 0.30, "DX": 0.12, "CT": 0.20, "US": 0.18, "MR": 0.10, "MG": 0.06, "PT": 0.02, "NM": 0.02})
    departments: dict[str, Department] = field(default_factory=lambda: {
        "ED": Department(0.20, 0.5), "IP": Department(0.30, 2.0),
        "OP": Department(0.45, 6.0), "ONC": Department(0.05, 4.0, tumour_board=True)})
    work_start_h: float = 8.0
    work_end_h: float = 18.0
    working_hours_share: float = 0.75     # share of weekday acquisitions inside working hours
    weekend_factor: float = 0.35          # a weekend day's study count relative to a weekday's
    read_sigma: float = 0.8               # lognormal sigma of the primary read delay
    patient_pool: int = 200_000           # patients with history in the archive
    returning_share: float = 0.55         # new studies whose patient already has priors
    priors_mean: float = 2.0              # mean number of prior studies of a returning patient
    prior_gap_days: float = 365.0         # mean gap between a patient's successive studies
    priors_read: tuple[int, int] = (1, 2)  # priors opened with a new study (min, max)
    same_modality_prior: float = 0.7      # a prior is of the same modality as the new study
    history_years: float = 5.0            # how far back the archive (and priors) go
    followup_rate: float = 0.6            # mean clinician re-reads per study (Poisson)
    followup_median_days: float = 2.0     # lognormal median delay of a re-read
    followup_series_share: float = 0.5    # share of a study's series a re-read opens
    tumour_board_share: float = 0.6       # share of tumour-board-department studies discussed
    tumour_board_weekday: int = 2         # 0 = Monday; the weekly board meets on this day
    tumour_board_hour: float = 14.0
    longtail_share: float = 0.02          # random old-study reads as a share of study read events
    read_spacing_s: float = 0.05          # seconds between two instances fetched by a viewer
    # structural knobs of the other families (their defaults leave general/oncology as they were)
    archive: bool = True                  # False: a new box/hospital, nothing acquired before the trace
    board_weeks: float = 1.0              # mean weekly boards a discussed case comes back to (geometric)
    petct_share: float = 0.0              # PET studies acquired with a companion CT of the same patient
    teaching_cases: int = 0               # >0: the long tail prefers this many teaching cases (Zipf)
    teaching_share: float = 0.0           # share of long-tail reads that are teaching-case reads

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError("days must be >= 1")
        if unknown := set(self.modality_mix) - set(SHAPES):
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {sorted(SHAPES)}")
        for key in ("{modality}", "{date}", "{study}", "{series}", "{instance}"):
            if key not in self.layout:
                raise ValueError(f"layout {self.layout!r} lacks {key}")


# The presets: what each family sets apart from WorkloadParams' defaults (which are `general`'s).
PRESETS: dict[str, dict[str, Any]] = {
    "general": {},
    # A cancer centre: CT/PET/MR heavy, nearly every patient returns, weekly tumour boards.
    "oncology": dict(
        monthly_tb=2.5,
        modality_mix={"CT": 0.40, "PT": 0.15, "MR": 0.18, "CR": 0.10, "DX": 0.02, "US": 0.07,
                      "MG": 0.05, "NM": 0.03},
        departments={"ONC": Department(0.70, 4.0, tumour_board=True), "IP": Department(0.15, 2.0),
                     "OP": Department(0.15, 8.0)},
        patient_pool=30_000, returning_share=0.85, priors_mean=5.0, prior_gap_days=90.0,
        priors_read=(1, 3), followup_rate=1.0, tumour_board_share=0.7, longtail_share=0.01,
        weekend_factor=0.2, working_hours_share=0.85),
    # An outpatient imaging centre: few priors, many clinic follow-ups days to weeks later, quick returns.
    "outpatient": dict(
        monthly_tb=0.6,
        modality_mix={"MR": 0.30, "US": 0.25, "CR": 0.15, "DX": 0.10, "CT": 0.12, "MG": 0.08},
        departments={"OP": Department(0.85, 3.0), "ED": Department(0.15, 1.0)},
        patient_pool=20_000, returning_share=0.35, priors_mean=1.0, prior_gap_days=40.0,
        priors_read=(0, 1), followup_rate=2.5, followup_median_days=9.0, followup_series_share=0.8,
        longtail_share=0.005, weekend_factor=0.1, working_hours_share=0.95),
    # A cancer centre around weekly boards: PET-CT pairs, cases back for weeks, whole studies shown.
    "cancer": dict(
        monthly_tb=1.2,
        modality_mix={"CT": 0.35, "PT": 0.25, "MR": 0.20, "NM": 0.08, "CR": 0.07, "MG": 0.05},
        departments={"ONC": Department(0.75, 6.0, tumour_board=True), "RT": Department(0.15, 12.0),
                     "IP": Department(0.10, 2.0)},
        patient_pool=8_000, returning_share=0.9, priors_mean=4.0, prior_gap_days=60.0, priors_read=(1, 2),
        followup_rate=0.4, followup_series_share=1.0, tumour_board_share=0.85, tumour_board_weekday=3,
        tumour_board_hour=8.0, board_weeks=3.0, petct_share=0.9, longtail_share=0.01, weekend_factor=0.05),
    # A teaching hospital: the general mix plus a fat long tail of old and teaching cases read again and again.
    "teaching": dict(
        monthly_tb=1.5, returning_share=0.5, priors_read=(1, 2), followup_rate=0.8,
        longtail_share=0.35, teaching_cases=400, teaching_share=0.6,
        departments={"ED": Department(0.25, 0.5), "IP": Department(0.35, 3.0), "OP": Department(0.35, 12.0),
                     "ONC": Department(0.05, 6.0, tumour_board=True)}),
    # A tuning family with a fat one-off tail (issue 13): a research centre reading old studies once each.
    "research": dict(
        monthly_tb=1.0,
        modality_mix={"MR": 0.35, "CT": 0.25, "US": 0.15, "CR": 0.15, "DX": 0.10},
        departments={"OP": Department(0.60, 4.0), "IP": Department(0.30, 2.0), "ED": Department(0.10, 0.5)},
        returning_share=0.4, followup_rate=1.0, longtail_share=0.3, weekend_factor=0.2),
}
# Which families policies may be tuned on, and which are only reported (held out). A `-new` variant of
# any preset (`--set archive=false`) is a box without a pre-existing archive: no priors, no old tail.
TUNING = ("general", "oncology", "outpatient", "research")
HELD_OUT = ("cancer", "teaching")


def preset(name: str, **overrides: object) -> WorkloadParams:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return WorkloadParams(**{"preset": name, **PRESETS[name], **overrides})


@dataclass
class Study:
    """One study in the archive: its place and the size of every instance (bytes), series-ordered."""

    idx: int
    modality: str
    day: int                     # acquisition day relative to the trace start (negative: prior)
    patient: int
    department: str
    sizes: np.ndarray            # int64 bytes per instance
    series_starts: np.ndarray    # offsets into sizes where each series begins (len = n_series + 1)
    acquired_at: float = 0.0

    @property
    def n_series(self) -> int:
        return len(self.series_starts) - 1


@dataclass(frozen=True, order=True)
class Event:
    """A study-level action that expands into per-instance requests."""

    t: float
    seq: int                     # tie-breaker, keeps the order deterministic
    op: str = field(compare=False)          # "W" or "R"
    study: int = field(compare=False)
    series: tuple[int, ...] = field(compare=False, default=())   # empty = all series
    kind: str = field(compare=False, default="primary")


@dataclass(frozen=True)
class Request:
    t: float
    op: str
    path: str
    size: int
    patient: str
    study: str
    modality: str
    department: str


def draw_instances(rng: np.random.Generator, s: ModalityShape) -> tuple[np.ndarray, np.ndarray]:
    """One study's instance sizes (int64 bytes, series-ordered) and series start offsets."""
    n_series = int(rng.integers(s.series[0], s.series[1] + 1))
    images = np.maximum(1, np.round(rng.lognormal(np.log(s.images_median), s.images_sigma, n_series))).astype(np.int64)
    median = s.image_mb * MB * float(rng.lognormal(0.0, 0.1))
    sizes = np.maximum(1024, rng.lognormal(np.log(median), s.size_sigma, int(images.sum())))
    return sizes.astype(np.int64), np.concatenate(([0], np.cumsum(images)))


class Generator:
    """Draws the study-level events, then streams per-instance requests (see module docstring)."""

    def __init__(self, params: WorkloadParams) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.start = dt.date.fromisoformat(params.start)
        self.studies: list[Study] = []
        self.history: dict[int, list[int]] = {}      # patient → study indices, oldest first
        self.events: list[Event] = []
        mix = {m: s for m, s in params.modality_mix.items() if s > 0}
        self.modalities, self.mod_p = list(mix), np.array(list(mix.values())) / sum(mix.values())
        shares = [d.share for d in params.departments.values()]
        self.departments, self.dep_p = list(params.departments), np.array(shares) / sum(shares)

    def expected_study_bytes(self) -> float:
        """E[bytes per study] under the modality mix, for scaling the study count to monthly_tb."""
        total = 0.0
        for m, pm in zip(self.modalities, self.mod_p, strict=True):
            s = SHAPES[m]
            series = (s.series[0] + s.series[1]) / 2
            images = max(1.0, s.images_median * np.exp(s.images_sigma**2 / 2))
            size = s.image_mb * MB * np.exp(s.size_sigma**2 / 2)
            total += pm * series * images * size
        return total

    def studies_per_day(self, weekday: int) -> float:
        per_week = 7 * (self.p.monthly_tb * 1e12 / (365.25 / 12)) / self.expected_study_bytes()
        return per_week / (5 + 2 * self.p.weekend_factor) * (self.p.weekend_factor if weekday >= 5 else 1.0)

    def _new_study(self, modality: str, day: int, patient: int, department: str, acquired_at: float = 0.0) -> Study:
        sizes, starts = draw_instances(self.rng, SHAPES[modality])
        st = Study(len(self.studies), modality, day, patient, department, sizes, starts, acquired_at)
        self.studies.append(st)
        self.history.setdefault(patient, []).append(st.idx)
        return st

    def _materialise_history(self, patient: int, modality: str, before_day: int) -> None:
        """A returning patient seen for the first time in the trace gets priors in the archive."""
        if patient in self.history:
            return
        self.history[patient] = []  # the priors drawn below; on a new box, none: its history starts in the trace
        p = self.p
        if not p.archive:
            return
        # the archive's history ends where the trace starts: studies acquired during the trace are
        # generated (and written) by the trace itself
        day = before_day = min(before_day, 0)
        days: list[int] = []
        for _ in range(1 + int(self.rng.poisson(max(p.priors_mean - 1, 0.0)))):
            day -= max(1, int(self.rng.exponential(p.prior_gap_days)))
            if day < -p.history_years * 365.25:
                break
            days.append(day)
        if not days:
            days = [before_day - 1 - int(self.rng.integers(0, int(p.history_years * 365)))]
        for d in sorted(days):
            m = modality if self.rng.random() < p.same_modality_prior else self._draw(self.modalities, self.mod_p)
            prior = self._new_study(m, d, patient, self._draw(self.departments, self.dep_p))
            prior.acquired_at = d * DAY + self.rng.uniform(p.work_start_h, p.work_end_h) * 3600

    def _draw(self, names: list[str], p: np.ndarray) -> str:  # a modality or a department, by its share
        return names[int(self.rng.choice(len(names), p=p))]

    def _event(self, t: float, op: str, study: int, series: tuple[int, ...] = (), kind: str = "primary") -> None:
        if t < self.p.days * DAY:
            self.events.append(Event(t, len(self.events), op, study, series, kind))  # seq: the order drawn

    def _acquisition_time(self, day: int) -> float:
        p = self.p
        weekday = (self.start + dt.timedelta(days=day)).weekday()
        if weekday < 5 and self.rng.random() < p.working_hours_share:
            hour = self.rng.uniform(p.work_start_h, p.work_end_h)
        elif weekday < 5:
            # outside working hours: the rest of the day, uniformly
            hour = (p.work_end_h + self.rng.uniform(0, 24 - (p.work_end_h - p.work_start_h))) % 24
        else:
            hour = self.rng.uniform(0, 24)
        return day * DAY + hour * 3600

    def _next_working(self, t: float) -> float:
        """Move a non-urgent read into working hours (reporting is done by day staff)."""
        p = self.p
        while True:  # at most three turns: a weekend is two days
            day = int(t // DAY)
            hour = (t - day * DAY) / 3600
            if (self.start + dt.timedelta(days=day)).weekday() < 5:
                if p.work_start_h <= hour < p.work_end_h:
                    return t
                if hour < p.work_start_h:
                    return day * DAY + (p.work_start_h + self.rng.uniform(0, 2)) * 3600
            t = (day + 1) * DAY

    def _subset(self, st: Study, share: float) -> tuple[int, ...]:
        k = max(1, int(round(st.n_series * share)))
        return tuple(sorted(self.rng.choice(st.n_series, size=k, replace=False).tolist()))

    def _pick_priors(self, st: Study, n: int) -> list[int]:
        older = [i for i in self.history[st.patient] if i != st.idx and self.studies[i].acquired_at < st.acquired_at]
        older.sort(key=lambda i: self.studies[i].acquired_at, reverse=True)
        return sorted(older, key=lambda i: self.studies[i].modality != st.modality)[:n]  # stable: same modality first

    def draw_events(self) -> None:
        p, rng = self.p, self.rng
        n_primary = 0
        for day in range(p.days):
            n = int(rng.poisson(self.studies_per_day((self.start + dt.timedelta(days=day)).weekday())))
            for t in sorted(self._acquisition_time(day) for _ in range(n)):
                modality = self._draw(self.modalities, self.mod_p)
                dep_name = self._draw(self.departments, self.dep_p)
                dep = p.departments[dep_name]
                if rng.random() < p.returning_share:
                    patient = int(rng.integers(0, p.patient_pool))
                    self._materialise_history(patient, modality, day)
                else:
                    patient = p.patient_pool + len(self.studies)   # a new patient: no history
                st = self._new_study(modality, day, patient, dep_name, t)
                self._event(t, "W", st.idx, kind="write")
                duration = (st.sizes.size * SHAPES[modality].write_spacing_s)
                companion = None
                if modality == "PT" and p.petct_share and rng.random() < p.petct_share:
                    # the low-dose CT of a PET-CT: same patient, same session, read and shown together
                    companion = self._new_study("CT", day, patient, dep_name, t + 1.0)
                    self._event(t + 1.0, "W", companion.idx, kind="write")
                read_t = t + duration + rng.lognormal(np.log(dep.read_median_h * 3600), p.read_sigma)
                if dep_name != "ED":
                    read_t = self._next_working(read_t)
                # the viewer opens the priors first (hanging protocol), then the new study
                chosen = self._pick_priors(st, int(rng.integers(p.priors_read[0], p.priors_read[1] + 1)))
                for k, prior in enumerate(chosen):
                    self._event(read_t + k * 5.0, "R", prior, kind="prior")
                self._event(read_t + len(chosen) * 5.0 + 5.0, "R", st.idx, kind="primary")
                if companion is not None:
                    self._event(read_t + len(chosen) * 5.0 + 10.0, "R", companion.idx, kind="primary")
                n_primary += 1
                for _ in range(int(rng.poisson(p.followup_rate))):
                    delay = rng.lognormal(np.log(p.followup_median_days * DAY), 1.0)
                    self._event(self._next_working(read_t + delay), "R", st.idx,
                                self._subset(st, p.followup_series_share), kind="followup")
                if dep.tumour_board and rng.random() < p.tumour_board_share:
                    board = self._next_board(read_t)
                    # a case comes back to the board week after week until it is settled
                    weeks = int(rng.geometric(1.0 / p.board_weeks)) if p.board_weeks > 1 else 1
                    for week in range(weeks):
                        self._event(board, "R", st.idx, self._subset(st, p.followup_series_share), kind="board")
                        if companion is not None:
                            self._event(board + 15.0, "R", companion.idx, kind="board")
                        if priors := self._pick_priors(st, 1):
                            prior = self.studies[priors[0]]
                            self._event(board + 30.0, "R", prior.idx,
                                        self._subset(prior, p.followup_series_share), kind="board")
                        if week + 1 < weeks:
                            board = self._next_board(board)
        self._draw_longtail(n_primary)
        self.events.sort()

    def _next_board(self, t: float) -> float:
        day = int(t // DAY) + 1
        while (self.start + dt.timedelta(days=day)).weekday() != self.p.tumour_board_weekday:
            day += 1
        return day * DAY + self.p.tumour_board_hour * 3600 + self.rng.uniform(0, 2 * 3600)

    def _draw_longtail(self, n_primary: int) -> None:
        """Random reads of old archive studies: audits, research exports, transfers."""
        p, rng = self.p, self.rng
        n = int(rng.poisson(p.longtail_share * n_primary))
        teaching = self._teaching_cases()
        acquired = np.array([s.acquired_at for s in self.studies])
        for _ in range(n):
            day = int(rng.integers(0, p.days))
            if teaching.size and rng.random() < p.teaching_share:
                # a few cases are shown again and again (Zipf popularity over the teaching file)
                rank = min(int(rng.zipf(1.3)), teaching.size) - 1
                t = self._next_working(day * DAY + rng.uniform(0, DAY))
                self._event(t, "R", int(teaching[rank]), kind="teaching")
            elif not p.archive:   # a new box: the tail reaches back only to what the trace acquired
                t = self._next_working(day * DAY + rng.uniform(0, DAY))
                if (done := np.flatnonzero(acquired < t - DAY)).size:
                    self._event(t, "R", int(rng.choice(done)), kind="longtail")
            elif old := self._archive_studies_of_a_patient():
                t = self._next_working(day * DAY + rng.uniform(0, DAY))
                self._event(t, "R", int(rng.choice(old)), kind="longtail")

    def _teaching_cases(self) -> np.ndarray:
        """The teaching file: archive studies of random patients (or, on a new box, none)."""
        p, rng = self.p, self.rng
        if not p.teaching_cases or not p.archive:
            return np.zeros(0, dtype=np.int64)
        cases = [int(rng.choice(old)) for _ in range(p.teaching_cases) if (old := self._archive_studies_of_a_patient())]
        return np.array(cases, dtype=np.int64)

    def _archive_studies_of_a_patient(self) -> list[int]:
        """The studies in the archive before the trace of a random patient (their history drawn if not yet)."""
        patient = int(self.rng.integers(0, self.p.patient_pool))
        self._materialise_history(patient, self._draw(self.modalities, self.mod_p), 0)
        return [i for i in self.history[patient] if self.studies[i].day < 0]

    def _expand(self, ev: Event) -> tuple[np.ndarray, np.ndarray]:
        """(times, instance indices) of one event's per-instance requests."""
        st = self.studies[ev.study]
        if ev.series:
            idx = np.concatenate([np.arange(st.series_starts[s], st.series_starts[s + 1]) for s in ev.series])
        else:
            idx = np.arange(st.sizes.size)
        spacing = SHAPES[st.modality].write_spacing_s if ev.op == "W" else self.p.read_spacing_s
        return ev.t + np.arange(idx.size) * spacing, idx

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per-day chunks of (t, is_write, study, instance), sorted by time, for the whole horizon."""
        carry: list[tuple[np.ndarray, ...]] = []
        ev_i = 0
        for day in range(self.p.days):
            end = (day + 1) * DAY
            parts = carry
            while ev_i < len(self.events) and self.events[ev_i].t < end:
                ev = self.events[ev_i]
                t, inst = self._expand(ev)
                parts.append((t, np.full(t.size, ev.op == "W"), np.full(t.size, ev.study, np.int64), inst))
                ev_i += 1
            if not parts:  # carry, the same list, is empty too
                continue
            t, w, s, i = (np.concatenate(c) for c in zip(*parts, strict=True))
            order = np.lexsort((i, s, t))
            t, w, s, i = t[order], w[order], s[order], i[order]
            cut = int(np.searchsorted(t, end))
            yield t[:cut], w[:cut], s[:cut], i[:cut]
            carry = [(t[cut:], w[cut:], s[cut:], i[cut:])] if cut < t.size else []
        # requests that run past the horizon are dropped: the trace ends at days * DAY


def generate(params: WorkloadParams) -> Generator:
    g = Generator(params)
    g.draw_events()
    return g


def archive_totals(g: Generator) -> tuple[int, int]:
    """(bytes, files) of the archive the trace refers to, extrapolated to the whole history."""
    avg = sum(int(s.sizes.sum()) for s in g.studies) / max(1, sum(s.sizes.size for s in g.studies))
    total = g.p.monthly_tb * 1e12 / (365.25 / 12) * 365.25 * g.p.history_years
    return int(total), int(total / max(avg, 1))
