"""Held-out workloads from outside agent/sim/workload.py, as `pacsgw import-trace` CSVs (issue 13: "other held-out
workloads with other path layouts"; docs/replay.md, round 36):

    .venv/bin/python bench/foreign_csv.py /tmp/foreign/screening.csv --family screening --seed 1
    pacsgw import-trace /tmp/foreign/screening.csv /tmp/foreign/screening.tsv

Its own mechanics (nothing of the generator's presets or code): a few seeded rules per family, `--days` days at
about `--monthly-gb` written a month (the issue's 42 GB), rows shuffled (the CSV form takes them in any order).
Files read but never written are the archive from before the trace (the importer dates them so).

- `screening`: a breast screening programme, weekdays only. Each exam 4 mammograms and 4 tomosynthesis volumes
  (large files); read twice (double reading) by two readers in batches 1-3 working days after capture, with last
  year's screening exam (an archive prior) beside it; ~10 % recalled 2-5 weeks later: a diagnostic exam (spot views,
  ultrasound) read with the screening exam and last year's. Paths `AE/YYYYMMDD/ACCESSION/IM0001` (no extension).
- `trauma`: an emergency and trauma centre, round the clock, CT-heavy. A study is read within minutes, then by 2-4
  services over 48 h (some series each); ~30 % get a follow-up CT 1-3 days later, read with the first; few old
  priors (5 %). Flat paths `<sop uid>.dcm`.
- `zipf`: an independent-reference tail. Each study is one object (`<patient>/<accession>`, a VNA-style export),
  read once after it is written; the rest of the reads pick a study (archive or written so far) by a Zipf law
  (s = 0.8) over a fixed random ranking, at random times: no schedule, no priors that matter, where LRU is strong.

`--no-labels` leaves out the patient, study, modality and dept columns (the importer then takes a study to be the
path's first `--study-depth` levels, and each study its own patient).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import random
from collections.abc import Callable
from pathlib import Path

DAY = 86_400.0
HOUR = 3_600.0
LABELS = ["patient", "study", "modality", "dept"]
START = dt.date(2026, 1, 5)     # import-trace's default --start, a Monday

File = tuple[str, int]                        # path, bytes
Study = tuple[list[File], tuple[str, str, str, str]]   # files, (patient, study, modality, dept)


class Writer:
    """Collects rows; `rows()` gives them shuffled (seeded), the header first."""

    def __init__(self, rng: random.Random, days: int, labels: bool) -> None:
        self.rng, self.end, self.labels = rng, days * DAY, labels
        self.out: list[tuple[float, str, str, int, tuple[str, ...]]] = []

    def add(self, t: float, op: str, f: File, lab: tuple[str, str, str, str], dept: str | None = None) -> None:
        if 0 <= t < self.end:       # past the trace's end: not seen
            self.out.append((t, op, f[0], f[1], lab if dept is None else (*lab[:3], dept)))

    def write(self, t: float, study: Study) -> float:
        """The study arrives file by file (a modality sends ~2 files a second); → when the last one landed."""
        for f in study[0]:
            self.add(t, "write", f, study[1])
            t += self.rng.uniform(0.2, 0.8)
        return t

    def read(self, t: float, study: Study, dept: str, share: float = 1.0) -> float:
        """A viewer opens `share` of the study's files (the first ones: its leading series), in order; → the end."""
        files = study[0][:max(1, math.ceil(len(study[0]) * share))]
        for f in files:
            self.add(t, "read", f, study[1], dept)
            t += self.rng.uniform(0.05, 0.3)
        return t

    def rows(self) -> list[list[str]]:
        self.rng.shuffle(self.out)
        head = ["ts", "op", "path", "size", *(LABELS if self.labels else [])]
        return [head] + [[f"{t:.3f}", op, p, str(s), *(lab if self.labels else ())] for t, op, p, s, lab in self.out]


def _size(rng: random.Random, mean: float, spread: float = 0.25) -> int:
    return max(1024, int(rng.gauss(mean, mean * spread)))


def _working(day: int) -> bool:
    return day % 7 < 5              # day 0 is a Monday (import-trace's default start)


def _next_working(day: int, n: int) -> int:
    while n > 0:
        day += 1
        n -= _working(day)
    return day


def screening(w: Writer, days: int, monthly: float) -> None:
    rng = w.rng
    exam_bytes = 4 * 12e6 + 4 * 60e6
    per_day = monthly / 30 / exam_bytes * 7 / 5          # exams a working day
    acc = iter(range(100_000, 10**7))

    def exam(day: int, ae: str, patient: str, kinds: list[tuple[int, float]], modality: str) -> Study:
        a = f"A{next(acc)}"
        date = (START + dt.timedelta(days=day)).strftime("%Y%m%d")
        files, i = [], 1
        for n, mean in kinds:
            for _ in range(n):
                files.append((f"{ae}/{date}/{a}/IM{i:04d}", _size(rng, mean)))
                i += 1
        return files, (patient, a, modality, "SCREEN")

    pid = iter(range(1, 10**7))
    for day in range(days):
        if not _working(day):
            continue
        for _ in range(_poisson(rng, per_day)):
            patient = f"S{next(pid):07d}"
            t = day * DAY + rng.uniform(8 * HOUR, 17 * HOUR)
            new = exam(day, rng.choice(["MG_HOLOGIC1", "MG_HOLOGIC2"]), patient, [(4, 12e6), (4, 60e6)], "MG")
            prior = exam(day - rng.randint(350, 380), "MG_HOLOGIC1", patient, [(4, 12e6), (4, 60e6)], "MG") \
                if rng.random() < 0.7 else None
            w.write(t, new)
            for reader in ("R1", "R2"):        # double reading, in the reader's batch 1-3 working days later
                d = _next_working(day, rng.randint(1, 3))
                r = d * DAY + rng.choice([9, 13, 16]) * HOUR + rng.uniform(0, 1.5 * HOUR)
                r = w.read(r, new, reader)
                if prior is not None and rng.random() < 0.9:
                    w.read(r + 5, prior, reader, 0.5)       # last year's mammograms (not its tomosynthesis)
            if rng.random() < 0.10:            # recall for assessment
                rd = day + rng.randint(14, 35)
                while not _working(rd):
                    rd += 1
                rt = rd * DAY + rng.uniform(8 * HOUR, 16 * HOUR)
                diag = exam(rd, "US_BREAST", patient, [(2, 12e6), (12, 1.5e6)], "US")
                r = w.write(rt, diag) + rng.uniform(10 * 60, 60 * 60)
                r = w.read(r, diag, "BREAST")
                r = w.read(r + 5, new, "BREAST")
                if prior is not None:
                    w.read(r + 5, prior, "BREAST", 0.5)


def trauma(w: Writer, days: int, monthly: float) -> None:
    rng = w.rng
    services = ["SURG", "ORTHO", "NEURO", "ICU", "MED"]
    study_bytes = (0.8 * 2.5 * 120 * 0.52e6 + 0.2 * 3 * 10e6) * 1.3      # and 30 % of patients scanned again
    per_day = monthly / 30 / study_bytes
    uid = iter(range(1, 10**8))

    def study(patient: str) -> Study:
        n = next(uid)
        if rng.random() < 0.8:     # CT: series of 0.5 MB slices, the leading series first
            files = [(f"1.2.840.113619.2.55.{n}.{se}.{i}.dcm", _size(rng, 0.52e6, 0.05))
                     for se in range(1, rng.randint(1, 4) + 1) for i in range(1, rng.randint(40, 200) + 1)]
            return files, (patient, f"ST{n}", "CT", "ED")
        files = [(f"1.2.840.113619.2.56.{n}.1.{i}.dcm", _size(rng, 10e6)) for i in range(1, rng.randint(2, 4) + 1)]
        return files, (patient, f"ST{n}", "DX", "ED")

    pid = iter(range(1, 10**7))
    t = 0.0
    while t < days * DAY:
        hour = (t % DAY) / HOUR
        rate = per_day / DAY * (1.3 if 10 <= hour < 22 else 0.55)      # busier by day, never shut
        t += rng.expovariate(rate)
        patient = f"E{next(pid):07d}"
        first = study(patient)
        landed = w.write(t, first)
        r = w.read(landed + rng.uniform(2 * 60, 20 * 60), first, "ED")
        if rng.random() < 0.05:            # an old prior, years back, read once beside the first read
            w.read(r + 5, study(patient), "ED")
        for svc in rng.sample(services, rng.randint(2, 4)):       # the services over 48 h
            w.read(landed + min(rng.expovariate(1 / (10 * HOUR)), 48 * HOUR), first, svc, rng.choice([0.3, 0.6, 1.0]))
        if rng.random() < 0.3:             # the follow-up scan, compared with the first
            f = t + rng.uniform(1 * DAY, 3 * DAY)
            follow = study(patient)
            landed = w.write(f, follow)
            r = w.read(landed + rng.uniform(5 * 60, 40 * 60), follow, "ED")
            w.read(r + 5, first, "ED", 0.6)
            for svc in rng.sample(services, rng.randint(1, 2)):
                w.read(landed + min(rng.expovariate(1 / (8 * HOUR)), 48 * HOUR), follow, svc)


def zipf(w: Writer, days: int, monthly: float) -> None:
    rng = w.rng
    med = 40e6                   # one object a study: lognormal sizes, median 40 MB
    mean = med * math.exp(0.5)
    per_day = monthly / 30 / mean
    depts = ["ONC", "CARD", "NEURO", "ORTHO", "RESEARCH"]
    patients = [f"P{i:07d}" for i in range(1, 2001)]
    acc = iter(range(1, 10**8))

    def study(modality: str) -> Study:
        a = next(acc)
        p = rng.choice(patients)
        size = int(min(max(rng.lognormvariate(math.log(med), 1.0), 0.5e6), 400e6))
        return [(f"{p}/ACC{a:08d}", size)], (p, f"ACC{a:08d}", modality, "-")

    archive = [study(rng.choice(["CT", "MR", "CR", "US"])) for _ in range(3000)]
    written: list[tuple[float, Study]] = []
    t = 0.0
    while t < days * DAY:
        t += rng.expovariate(per_day / DAY)
        s = study(rng.choice(["CT", "MR", "CR", "US"]))
        end = w.write(t, s)
        w.read(end + rng.uniform(10 * 60, 3 * HOUR), s, rng.choice(depts))
        written.append((t, s))
    pool = archive + [s for _, s in written]
    order = list(range(len(pool)))
    rng.shuffle(order)                       # a fixed random popularity ranking over all the studies
    weights = [1 / (r + 1) ** 0.8 for r in range(len(pool))]
    born = [0.0] * len(archive) + [t0 for t0, _ in written]
    n_reads = int(days * 6 * per_day)        # ~6 tail reads per study written
    for rank in rng.choices(range(len(pool)), weights, k=n_reads):
        i = order[rank]
        when = rng.uniform(born[i] + HOUR, days * DAY)    # independent of what else is read
        w.read(when, pool[i], rng.choice(depts))


def _poisson(rng: random.Random, lam: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-lam)
    while (p := p * rng.random()) > limit:
        n += 1
    return n


FAMILIES: dict[str, Callable[[Writer, int, float], None]] = {"screening": screening, "trauma": trauma, "zipf": zipf}


def generate(family: str, seed: int, days: int = 60, monthly_gb: float = 42.0, labels: bool = True) -> list[list[str]]:
    """The CSV's rows (header first), shuffled; the same for the same arguments."""
    w = Writer(random.Random(f"{family}/{seed}"), days, labels)
    FAMILIES[family](w, days, monthly_gb * 1e9)
    return w.rows()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--monthly-gb", type=float, default=42.0)
    ap.add_argument("--no-labels", action="store_true", help="only ts,op,path,size")
    args = ap.parse_args()
    rows = generate(args.family, args.seed, args.days, args.monthly_gb, not args.no_labels)
    with args.out.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    written = sum(int(r[3]) for r in rows[1:] if r[1] == "write")
    print(f"{args.out}: {len(rows) - 1:,} rows, {written / 1e9:.1f} GB written in {args.days} days")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
