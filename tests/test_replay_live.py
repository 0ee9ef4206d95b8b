"""The simulator tells the truth about the stack the box runs: a generated trace replayed through the live
agent with its default policy stack (FTP stores and reads in trace order, object sizes scaled down together
with the cache) gives the hit ratio `pacsgw simulate` gives for the same requests, stack and capacity.

The live replay compresses two days into a minute or two, and the default eviction (`adaptive`: study LRU
or the learned hit density) is driven by time (sessions, ages): the simulator is given the times at which
the live agent saw each request, so both run the same policy on the same inputs.

The first test runs the stack without its prior-study planner (the generated payloads are not DICOM, and
the archive's studies are not in a new box's catalog); the second runs all of it on two days of real DICOM
files (bench/dicomgen): the agent's study index learns patient and study from each new study's header, and
the day-2 studies bring back their patients' day-1 priors, evicted by then. tests/test_priors_live.py covers
the planner's details (ranking, budget, what it learns)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid

from agent.cli import main as sim
from agent.config import CacheConfig
from agent.sim.replay import SCHEMES, ReplayConfig, replay
from agent.sim.trace import COLUMNS, MAGIC, iter_requests, load_arrays
from agent.sim.workload import DAY
from bench.dicomgen import ct_slice
from faultkit import catalog_rows, ftp_login, metric, payload
from harness import BUCKET

SCALE = 1000          # live bytes = trace bytes / SCALE: the same cache decisions, a thousandth of the I/O
SHARES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)    # cache sizes considered, as shares of the bytes the trace touches
STEP = 0.02
TOLERANCE = 0.01      # the bar: within 1 point
HIGH, LOW = 0.99, 0.97   # the live cache's pass frees down to LOW from HIGH of its capacity; the simulator's too
PRIOR_SPACE = 0.1     # one prior plan may take this share of the cache (live: prefetch.priors_space)


def away_from_a_cliff(ta, touched: int, scheme: str = "adaptive", **cfg: object) -> float:
    """The share where the simulated hit ratio changes least with ±STEP of capacity (a small trace has steep
    cliffs where one big study fits or not; parity there would hang on a few bytes of accounting), among
    those where neither everything nor nothing fits."""
    def ratio(share: float) -> float:
        return replay(ta, scheme, ReplayConfig(capacity=int(share * touched), warmup_days=0,
                                               watermarks=(HIGH, LOW), **cfg)).hit_ratio
    slopes = {}
    for s in SHARES:
        r = ratio(s)
        if 0.1 < r < 0.9:
            slopes[s] = abs(ratio(s + STEP) - ratio(s - STEP))
    return min(slopes, key=slopes.__getitem__)


@pytest.mark.slow
def test_live_default_stack_matches_the_simulator(agent_factory, seaweed, tmp_path):
    assert CacheConfig.__dataclass_fields__["eviction"].default == "adaptive"
    trace = tmp_path / "day.tsv"
    assert sim(["gen-trace", str(trace), "--days", "2", "--monthly-tb", "0.008", "--seed", "4",
                "--no-progress"]) == 0
    requests = list(iter_requests(trace))
    touched = {r.path: r.size for r in requests}
    ta = load_arrays(trace, cache=False)
    # the archive is put into the bucket just before the agent starts: its files are that new to the agent too
    share = away_from_a_cliff(ta, sum(touched.values()), archive_created=0.0)
    capacity = int(share * sum(touched.values()))

    # the agent's defaults, but for the cache's size, tight watermarks (the simulator's too) and a fast pass,
    # and no prior planner (see the module docstring)
    a = agent_factory(prefix="replay/", **{
        "cache.max_bytes": capacity // SCALE, "cache.high_watermark": HIGH, "cache.low_watermark": LOW,
        "cache.max_unfinished_per_user": 1.0,  # a cache of a few files: one file may be a quarter of it
        "cache.evict_interval_seconds": 0.1, "pressure.disk_critical": 1.0,
        "prefetch.priors": False, "scrub.enabled": False})
    # Files the trace reads before (or without) writing them are the archive: already in the bucket.
    written: set[str] = set()
    client = seaweed.client()
    for r in requests:
        if r.op == "W":
            written.add(r.path)
        elif r.path not in written:
            client.put_object(Bucket=BUCKET, Key=a.prefix + r.path, Body=payload(r.path, max(1, r.size // SCALE)))
            written.add(r.path)
    a.start()
    assert a.health()["eviction"]["stack"] == "adaptive"
    ftp = ftp_login(a)
    seen = []
    for r in requests:
        seen.append(time.time())
        if r.op == "W":
            ftp.storbinary(f"STOR {r.path}", io.BytesIO(payload(r.path, max(1, r.size // SCALE))))
        else:
            ftp.retrbinary(f"RETR {r.path}", io.BytesIO().write)
    ftp.quit()
    hits, misses = metric(a, "pacsgw_cache_hits_total"), metric(a, "pacsgw_cache_misses_total")
    live = hits / (hits + misses)

    # the same requests at the times the agent saw them; every study acquired at the start (as on the box,
    # where the archive was put just before and the rest is written during the replay)
    t = np.array(seen) - seen[0]
    same = dataclasses.replace(ta, t=t, study_day=np.zeros_like(ta.study_day))
    cfg = ReplayConfig(capacity=capacity, warmup_days=0, watermarks=(HIGH, LOW), archive_created=0.0)
    simulated = replay(same, "adaptive", cfg)
    on_trace_time = replay(ta, "adaptive", cfg)
    print(f"\nreads {simulated.reads}, cache {share:.0%} of the bytes touched: hit ratio simulated "
          f"{simulated.hit_ratio:.3f} (on the trace's own times {on_trace_time.hit_ratio:.3f}), live {live:.3f}")
    assert hits + misses == simulated.reads == sum(r.op == "R" for r in requests)
    assert 0.1 < simulated.hit_ratio < 0.9            # neither everything nor nothing fits
    assert abs(live - simulated.hit_ratio) <= TOLERANCE
    assert metric(a, "pacsgw_evictions_total") > 0      # the cache really was full and evicting


# --- the default stack with its prior-study planner ---------------------------------------------------

DAY1 = dt.date(2026, 11, 22)


# where a study's files are stored: a directory per study, or a day directory of many (the study known by its header)
LAYOUTS = {"study": "{modality}/{day:%Y-%m-%d}/{sid}/{i:03d}.dcm", "day": "{day:%Y/%m/%d}/{sid}.{i:03d}.dcm"}


def prior_workload(rng: np.random.Generator, patients: int = 24, layout: str = LAYOUTS["study"]
                   ) -> tuple[list[tuple[str, str]], dict[str, bytes], dict]:
    """Two days of real DICOM traffic: on day 1 each patient's earlier study (or two, CT and MR) is written
    and sometimes reported on; on day 2 most patients come back for a new study, which is read, and so is
    the most recent same-modality prior often, the other one sometimes (what a radiologist compares).
    → (requests (op, path) in order, the files, path → (patient, study, modality, day) for the trace)."""
    ops: list[tuple[str, str]] = []
    files: dict[str, bytes] = {}
    attrs: dict[str, tuple[str, str, str]] = {}
    n = 0

    def study(patient: str, day: dt.date, modality: str) -> list[str]:
        nonlocal n
        n += 1
        sid, uid, series = f"ST{n:04d}", generate_uid(), generate_uid()
        paths = []
        for i in range(int(rng.integers(3, 9))):
            path = layout.format(modality=modality, day=day, sid=sid, i=i + 1)
            files[path] = ct_slice(rng, patient=patient, study_uid=uid, series_uid=series, instance=i + 1,
                                   modality=modality, study_date=day.strftime("%Y%m%d"), rows=48, cols=48)
            attrs[path] = (patient, sid, modality, (day - DAY1).days)
            ops.append(("W", path))
            paths.append(path)
        return paths

    priors: dict[str, list[tuple[str, list[str]]]] = {}
    for k in range(patients):
        patient = f"P{k:03d}"
        for modality in ("CT", "MR") if rng.random() < 0.4 else (str(rng.choice(["CT", "MR"])),):
            paths = study(patient, DAY1, modality)
            priors.setdefault(patient, []).append((modality, paths))
            if rng.random() < 0.5:                      # reported on the day it was acquired
                ops += [("R", p) for p in paths]
    later: list[str] = []
    for patient in rng.permutation(sorted(priors)).tolist():
        if rng.random() < 0.2:
            continue
        modality = str(rng.choice(["CT", "MR"]))
        new = study(patient, DAY1 + dt.timedelta(days=1), modality)
        ops += [("R", p) for p in new]
        for m, paths in reversed(priors[patient]):
            if rng.random() < (0.7 if m == modality else 0.3):
                ops += [("R", p) for p in paths]
        if rng.random() < 0.3:
            later += new
    ops += [("R", p) for p in later]                     # second opinions at the end of the day
    return ops, files, attrs


def write_trace(path, ops: list[tuple[str, str]], files: dict[str, bytes], attrs: dict) -> None:
    """The requests as a pacsgw trace (one a minute on its own clock: only the order matters here; a study's day is
    that of its first write, as for an imported trace)."""
    meta = {"start": DAY1.isoformat(), "layout": None, "days": 2}
    with open(path, "w") as f:
        f.write(MAGIC + json.dumps(meta) + "\n" + "\t".join(COLUMNS) + "\n")
        day = 0
        for i, (op, p) in enumerate(ops):
            patient, sid, modality, acquired = attrs[p]
            day = max(day, acquired)    # day 2 from its first study
            f.write(f"{day * DAY + 8 * 3600 + 60 * i:.3f}\t{op}\t{p}\t{len(files[p])}\t{patient}\t{sid}"
                    f"\t{modality}\tRAD\n")


def wait_for(cond, what, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_live_default_stack_with_priors_matches_the_simulator(agent_factory, seaweed, tmp_path, layout):
    """On a day layout too (the files of a day's studies in one directory): the agent groups and plans by the study
    each file's header names, as the simulator by the trace's study."""
    assert SCHEMES["agent"] == ("adaptive", "priors")      # the default stack: this test covers all of it
    ops, files, attrs = prior_workload(np.random.default_rng(11), layout=LAYOUTS[layout])
    trace = tmp_path / "priors.tsv"
    write_trace(trace, ops, files, attrs)
    ta = load_arrays(trace, cache=False)
    touched = sum(len(b) for b in files.values())
    # The prefetch line: the live agent with no bwlimit plans priors at an unlimited rate, and the test
    # waits for each plan's fetch before the next request, so the simulator's prior is ready at once
    # (prefetch_bps infinite). The byte budget is the same share of the cache on both sides.
    sim_cfg = {"prefetch_bps": float("inf"), "priors_space": PRIOR_SPACE}
    share = away_from_a_cliff(ta, touched, "agent", **sim_cfg)
    capacity = int(share * touched)

    a = agent_factory(prefix="replay/", **{
        "cache.max_bytes": capacity, "cache.high_watermark": HIGH, "cache.low_watermark": LOW,
        "cache.evict_interval_seconds": 0.1, "pressure.disk_critical": 1.0,
        # the disk reading is taken once at start (empty cache): a full tight cache must not read as high
        # pressure, which stops a prior fetch (the simulator has no such throttle)
        "pressure.interval_seconds": 300,
        "prefetch.priors_space": PRIOR_SPACE, "scrub.enabled": False}).start()
    assert a.health()["eviction"]["stack"] == "adaptive+priors"
    ftp = ftp_login(a)
    seen, studies = [], set()
    for op, p in ops:
        seen.append(time.time())
        if op == "W":
            ftp.storbinary(f"STOR {p}", io.BytesIO(files[p]))
            if attrs[p][1] not in studies:
                # the study index learns patient and study from the header, and plans the priors: let the
                # planned fetch land before the next request (as the simulator inserts it at once)
                studies.add(attrs[p][1])
                wait_for(lambda: len(a.events("prior_prefetch")) == len(studies),
                         lambda: a.events("prior_prefetch_failed"))
                planned = sum(e["bytes"] for e in a.events("prior_prefetch"))
                wait_for(lambda want=planned: sum(e["bytes"] for e in a.events("prefetched")) >= want,
                         lambda want=planned: (want, a.events("prefetched")[-3:]))
        else:
            ftp.retrbinary(f"RETR {p}", io.BytesIO().write)
        # the simulator evicts as soon as the cache passes HIGH, before the next request: wait for the
        # evictor's pass (its victims depend on which reads it has seen, so the order has to be the same)
        wait_for(lambda: a.health()["cache"]["bytes"] < HIGH * capacity, lambda: a.health()["cache"])
    ftp.quit()
    hits, misses = metric(a, "pacsgw_cache_hits_total"), metric(a, "pacsgw_cache_misses_total")
    live = hits / (hits + misses)
    fetched = sum(e["bytes"] for e in a.events("prefetched"))
    rows = catalog_rows(a, "SELECT COUNT(DISTINCT patient) FROM studies")

    same = dataclasses.replace(ta, t=np.array(seen) - seen[0])
    cfg = ReplayConfig(capacity=capacity, warmup_days=0, watermarks=(HIGH, LOW), **sim_cfg)
    simulated = replay(same, "agent", cfg)
    without = replay(same, "adaptive", cfg)
    print(f"\nreads {simulated.reads}, cache {share:.0%} of the bytes touched: hit ratio simulated "
          f"{simulated.hit_ratio:.3f} (without priors {without.hit_ratio:.3f}), live {live:.3f}; prior bytes "
          f"fetched simulated {simulated.prefetch_bytes}, live {fetched}")
    assert rows == [(24,)]                                   # every patient learnt from the headers
    assert hits + misses == simulated.reads == sum(op == "R" for op, _ in ops)
    assert 0.1 < simulated.hit_ratio < 0.9
    assert simulated.hit_ratio > without.hit_ratio and fetched > 0     # the priors planner did work
    assert abs(live - simulated.hit_ratio) <= TOLERANCE
    # the same plans: a simulator that planned priors the agent could not know (a study written later)
    # fetched 60 % more here, with the same hit ratio
    assert abs(fetched - simulated.prefetch_bytes) <= 0.05 * fetched
    assert metric(a, "pacsgw_evictions_total") > 0
