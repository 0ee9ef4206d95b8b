"""`pacsgw gen-trace`, `import-trace`, `simulate` and `train` (wired into agent/cli.py by `register`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import structlog

from agent.config import complain, parse_rate, parse_size, unit_of

log = structlog.get_logger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:  # argparse's private _SubParsersAction
    g = subparsers.add_parser("gen-trace", help="generate a synthetic PACS trace (docs/workload.md)")
    g.add_argument("out", help="trace file to write (.gz: compressed)")
    g.add_argument("--preset", default="general",
                   help="general | oncology | outpatient | research | cancer | teaching (docs/replay.md: tuning "
                        "vs held out)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--days", type=int, default=None)
    g.add_argument("--monthly-tb", type=float, default=None, help="acquired TB per month (default: preset)")
    g.add_argument("--start", default=None, help="first day, YYYY-MM-DD")
    g.add_argument("--layout", default=None,
                   help="path template, e.g. {modality}/{date}/{study}/{series}/{instance}.dcm")
    g.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override any WorkloadParams field, e.g. --set returning_share=0.7")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_gen_trace)

    s = subparsers.add_parser("simulate", help="replay a trace through the cache policies and libCacheSim")
    s.add_argument("trace")
    s.add_argument("--capacity", required=True, help="cache size, e.g. 1TB")
    s.add_argument("--schemes", default="A,B,C,ours,adaptive,agent",
                   help="comma list of schemes (docs/replay.md); the default ends with the agent's own stack, demand "
                        "only (adaptive) and as it runs (agent: with prefetch)")
    s.add_argument("--reference", default="all", help="libCacheSim algorithms: a comma list, 'all' (LRU, ARC, "
                   "S3FIFO, Sieve, LRB, GL-Cache, 3L-Cache, LeCaR, CACHEUS, GDSF, LHD, Belady, BeladySize) or 'none'")
    s.add_argument("--warmup-days", type=float, default=3.0)
    s.add_argument("--line-rate", default="10MB", help="private line rate for the latency model")
    s.add_argument("--prefetch-rate", default="5MB", help="bandwidth the prefetcher may use")
    s.add_argument("--model", default=None, help="hotness .tflite for scheme C")
    s.add_argument("--catalog-rows", type=int, default=400_000,
                   help="files of the trace put in a real SQLite catalog to measure ours' memory (0: skip)")
    s.add_argument("--out", default=None, help="directory for report.md, results.json and PNG plots")
    s.add_argument("--title", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_simulate)

    m = subparsers.add_parser("import-trace", help="convert CSV, the agent's audit log or xferlog into a trace")
    m.add_argument("src", help="CSV (ts,op,path,size[,patient,study,modality,dept]), audit log or xferlog")
    m.add_argument("dst", help="trace file to write (.gz: compressed)")
    m.add_argument("--format", default="auto", help="csv | audit | xferlog | auto (from the first line)")
    m.add_argument("--start", default=None, help="YYYY-MM-DD: the day CSV times count from (default 2026-01-05); "
                   "for logs, the day the trace starts (default: the first request's)")
    m.add_argument("--study-depth", type=int, default=None, help="without a study column: path levels of a study "
                   "directory, as the agent's [prefetch] study_depth (default: its default, 3, for MODALITY/DAY/STUDY)")
    m.set_defaults(func=cmd_import_trace)

    t = subparsers.add_parser("train", help="train the hotness LSTM (needs the `train` extra)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="arguments for models/train.py")
    t.set_defaults(func=cmd_train)


def cmd_gen_trace(ns: argparse.Namespace) -> int:
    from agent.sim.trace import write_trace
    from agent.sim.workload import generate, preset

    overrides: dict = {}
    for item in ns.set:
        key, _, text = item.partition("=")
        value = json.loads(text)
        overrides[key] = tuple(value) if isinstance(value, list) else value  # JSON has no tuples
    for key in ("seed", "days", "start", "layout", "monthly_tb"):
        if getattr(ns, key) is not None:
            overrides[key] = getattr(ns, key)
    try:
        params = preset(ns.preset, **overrides)
    except (TypeError, ValueError) as e:
        return complain(f"gen-trace: {e}", 2)
    t0 = time.monotonic()
    meta = write_trace(generate(params), ns.out, progress=not ns.no_progress)
    log.info("gen_trace.done", out=ns.out, requests=meta["requests"], bytes=meta["request_bytes"],
             seconds=round(time.monotonic() - t0, 1))
    return 0


def cmd_import_trace(ns: argparse.Namespace) -> int:
    from agent.sim.importer import STUDY_DEPTH, TraceImportError, import_trace
    depth = STUDY_DEPTH if ns.study_depth is None else ns.study_depth
    if depth < 1:
        return complain("import-trace: --study-depth must be 1 or more", 2)
    try:
        summary = import_trace(ns.src, ns.dst, ns.format, ns.start, depth)
    except (OSError, TraceImportError) as e:
        return complain(f"import-trace: {e}", 2)
    print(summary.text())
    print(f"  wrote {ns.dst}")
    return 0


def cmd_simulate(ns: argparse.Namespace) -> int:
    from agent.sim.replay import LatencyModel, ReplayConfig, replay
    from agent.sim.report import write_report
    from agent.sim.trace import check_replayable, load_arrays

    try:
        capacity = parse_size(ns.capacity)
        line_bps, prefetch_bps = parse_rate(ns.line_rate), parse_rate(ns.prefetch_rate)
    except ValueError:
        return complain(f"simulate: --capacity {ns.capacity!r}, --line-rate {ns.line_rate!r} and --prefetch-rate "
                        f"{ns.prefetch_rate!r} must be sizes such as 3GB, 0.5TB, 10MB", 2)
    cfg = ReplayConfig(capacity=capacity, warmup_days=ns.warmup_days, latency=LatencyModel(line_bps=line_bps),
                       prefetch_bps=prefetch_bps, model=ns.model, capacity_unit=unit_of(ns.capacity))
    progress = not ns.no_progress
    timings: dict[str, float] = {}
    with _timed(timings, "load trace"):
        try:
            ta = load_arrays(ns.trace, progress=progress)
            check_replayable(ta)     # before any scheme runs, not after the first hour of them
        except (OSError, ValueError) as e:
            return complain(f"simulate: {ns.trace}: {e}", 2)
    try:
        algorithms = _reference_algorithms(ns.reference)
    except ValueError as e:
        return complain(f"simulate: --reference: {e}", 2)
    results = []
    schemes = [s for s in ns.schemes.split(",") if s]
    for scheme in schemes:
        with _timed(timings, f"replay {scheme}"):
            results.append(replay(ta, scheme, cfg, progress=progress))
    refs = []
    if algorithms:
        from agent.sim.reference import run_reference
        with _timed(timings, f"libCacheSim ({len(algorithms)} algorithms)"):
            refs = run_reference(ta, cfg.capacity, cfg.warmup_days, algorithms)
    catalog = None
    if ns.catalog_rows > 0 and set(schemes) - {"A", "B", "C"}:    # a stack the agent runs on its catalog
        from agent.sim.catalog_memory import measure_trace
        with _timed(timings, f"catalog memory ({ns.catalog_rows:,} files)"):
            catalog = measure_trace(ns.trace, ns.catalog_rows)
    print(write_report(ta, cfg, results, refs, ns.out, title=ns.title, catalog=catalog, timings=timings))
    return 0


def _reference_algorithms(text: str) -> tuple[str, ...]:
    from agent.sim.reference import ALGORITHMS, canonical
    named = {"none": (), "all": ALGORITHMS}.get(text.strip().lower())
    return named if named is not None else tuple(canonical(a) for a in text.split(",") if a.strip())


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:  # a step's wall time, for the report
    t0 = time.monotonic()
    yield
    timings[step] = time.monotonic() - t0
    log.info("simulate.step", step=step, seconds=round(timings[step], 1))


def cmd_train(ns: argparse.Namespace) -> int:
    import importlib.util
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return complain("train: TensorFlow is not installed; use a separate venv with `pip install -e '.[train]'`", 2)
    spec = importlib.util.spec_from_file_location("pacsgw_train", ROOT / "models" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main(ns.args[1:] if ns.args[:1] == ["--"] else ns.args))
