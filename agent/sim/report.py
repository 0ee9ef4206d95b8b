"""The simulate report: a markdown table like the paper's table 3, results.json and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import structlog

from agent.config import fmt_bytes
from agent.sim.catalog_memory import CatalogMemory
from agent.sim.replay import DEFAULT_SCHEME, SCHEMES, ReplayConfig, SchemeResult
from agent.sim.trace import TraceArrays

log = structlog.get_logger(__name__)
RCLONE_GB_PER_TB = 4.16          # rclone's in-RAM directory cache on PACS data (the paper)

NAMES = {"A": "A: LRU (rclone default)", "B": "B: 90-day rule", "C": "C: LSTM prefetch + K-means",
         "ours": "ours: prior-study prefetch + study LRU", "study": "ours without prefetch (study LRU only)",
         "kmeans": "K-means eviction only", "learned": "learned study hit density (demand only)",
         "learned+priors": "learned study hit density + prior-study prefetch",
         "adaptive": "study LRU or learned hit density by shadow caches (demand only)",
         "adaptive+priors": "adaptive study eviction + prior-study prefetch",
         "agent": "agent default ({} eviction, prefetch: {})".format(*SCHEMES[DEFAULT_SCHEME])}


# A smaller LRU→Belady gap is none: libCacheSim counts whole KiB, so where LRU is optimal its byte ratios still differ
# from ours in the 6th digit, and a prefetching scheme closed 1,878,769 % of that "gap" (trauma, 10 GB: round 36)
GAP_EPS = 1e-4


def gaps(results: list[SchemeResult], refs: list) -> dict[str, tuple[float | None, float | None]] | None:
    """Share of the LRU→Belady miss gap each scheme closes, (object, byte), each against its own gap.

    LRU is scheme A when it ran (else libCacheSim's LRU); the bound is libCacheSim's Belady (object) and
    the better of Belady and BeladySize (byte). Belady is demand-only: a prefetching scheme can pass 100 %."""
    ref = {f.algorithm: f for f in refs}
    by = {r.scheme: r for r in results}
    if (lru := by.get("A") or ref.get("LRU")) is None or "Belady" not in ref:
        return None
    best_byte = max(f.byte_hit_ratio for k, f in ref.items() if k.startswith("Belady"))
    return {r.scheme: (gap_share(r.hit_ratio, lru.hit_ratio, ref["Belady"].hit_ratio),
                       gap_share(r.byte_hit_ratio, lru.byte_hit_ratio, best_byte)) for r in results}


def gap_share(x: float, lru: float, best: float) -> float | None:
    """The share of LRU's gap to the optimum that a hit ratio x closes; None: LRU is already optimal."""
    return (x - lru) / (best - lru) if best - lru > GAP_EPS else None


def memory_line(scheme: str, ta: TraceArrays, catalog: CatalogMemory | None) -> str:
    """The agent's stacks: the SQLite catalog as measured (RAM; SSD bytes per row scaled to the archive's
    files). A, B and C run on rclone (the paper's C did too): its in-RAM cache modelled per TB of archive."""
    archive = ta.meta.get("archive_bytes", 0)
    if scheme in ("A", "B", "C"):
        return f"{fmt_bytes(RCLONE_GB_PER_TB * archive / 1000)} RAM (rclone model, {fmt_bytes(archive)} archive)"
    if catalog is None:
        return "not measured"
    files = ta.meta.get("archive_files", 0)
    return (f"{catalog.rss_full_bytes / 2**20:,.0f} MiB RAM at {catalog.rows:,} files "
            f"({catalog.rss_half_bytes / 2**20:,.0f} MiB at half; measured) + "
            f"{files * catalog.bytes_per_row / 1e9:,.0f} GB catalog on SSD for {files / 1e6:,.0f} M files "
            f"({catalog.bytes_per_row:,.0f} B/file measured)")


def table(ta: TraceArrays, results: list[SchemeResult], refs: list, catalog: CatalogMemory | None) -> str:
    head = ("| scheme | object hit ratio | byte hit ratio | LRU→Belady gap closed (object / byte) "
            "| mean / p95 latency (idle line) | mean / p95 latency (queued) | egress peak (1 min) "
            "| prefetch spent (used) | replay CPU per hour of traffic | catalog memory |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    closed = gaps(results, refs) or {}
    hours = max(float(ta.t[-1] - ta.t[0]) / 3600, 1e-9) if ta.n else 1.0
    for r in results:
        g = closed.get(r.scheme)
        gap = " / ".join("–" if x is None else f"{x:.0%}" for x in g) if g else "–"
        name = NAMES.get(r.scheme, r.scheme) + (" **(default)**" if r.scheme == DEFAULT_SCHEME else "")
        pf = (f"{fmt_bytes(r.prefetch_bytes)} ({r.prefetch_used_bytes / max(r.prefetch_bytes, 1):.0%})"
              if r.prefetch_bytes else "0")
        rows.append(f"| {name} | {r.hit_ratio:.1%} | {r.byte_hit_ratio:.1%} | {gap} | "
                    f"{r.mean_latency_s * 1000:,.0f} / {r.p95_latency_s * 1000:,.0f} ms | "
                    f"{_ms(r.mean_queued_latency_s)} / {_ms(r.p95_queued_latency_s)} | "
                    f"{r.egress_peak_mbps:,.0f} Mbps | {pf} | {r.cpu_s / hours * 1000:,.1f} ms | "
                    f"{memory_line(r.scheme, ta, catalog)} |")
    rows += [f"| libCacheSim {ref.algorithm} | {ref.hit_ratio:.1%} | {ref.byte_hit_ratio:.1%} "
             "| – | – | – | – | 0 | – | – |" for ref in refs]
    return head + "\n".join(rows) + "\n"


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s < 100 else f"{s / 60:,.0f} min"


def describe(ta: TraceArrays, cfg: ReplayConfig) -> str:
    m = ta.meta
    reads = ~ta.is_write
    origin = (f"imported from `{m['import']['source']}` ({m['import']['format']})" if "import" in m
              else f"preset `{m.get('preset')}`, seed {m.get('seed')}")
    return (f"Trace: {origin}, {m.get('days')} days from {m.get('start')}, {m.get('monthly_tb')} TB/month; {ta.n:,} "
            f"requests ({int(reads.sum()):,} reads, {fmt_bytes(ta.size[reads].sum())} read; "
            f"{fmt_bytes(ta.size[ta.is_write].sum())} written). Cache {fmt_bytes(cfg.capacity, cfg.capacity_unit)}; "
            f"first {cfg.warmup_days:g} days are warm-up (not counted); only reads are counted. Latency model: hit = "
            f"{cfg.latency.ssd_s * 1000:g} ms + size / {cfg.latency.ssd_bps / 1e6:g} MB/s; miss = "
            f"{cfg.latency.rtt_s * 1000:g} ms + size / {cfg.latency.line_bps / 1e6:g} MB/s, on an idle line and "
            "queued (one FIFO line for all demand misses). Egress = demand misses (as the line delivers them) + "
            f"prefetch, per minute. Prefetch limited to {cfg.prefetch_bps / 1e6:g} MB/s and {cfg.prefetch_space:.0%} "
            f"(LSTM) / {cfg.priors_space:.0%} (priors) of the cache per plan.\n")


# The charts need matplotlib, which the boxes do not install (it is the [sim] extra): without it the report is
# written without them and says how to get them.
CHARTS_HINT = "charts not drawn: matplotlib is not installed (pip install 'pacsgw[sim]' draws them)"


def plots(results: list[SchemeResult], out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        log.warning("simulate_charts_skipped", reason="matplotlib is not installed",
                    install="pip install 'pacsgw[sim]'")
        return []
    matplotlib.use("Agg")
    return [hit_ratio_plot(results, out / "hit_ratio_per_day.png"), egress_plot(results, out / "egress.png")]


def hit_ratio_plot(results: list[SchemeResult], path: Path) -> str:
    """Object hit ratio of each day's reads; a day without reads is a gap, not a zero."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        daily = np.array(r.daily_hit_ratio, dtype=float)       # None → NaN: no point drawn
        ax.plot(range(daily.size), daily, marker="o", label=NAMES.get(r.scheme, r.scheme))
    ax.set_ylim(0, 1)
    return _save(fig, ax, path, "object hit ratio (reads)")


def egress_plot(results: list[SchemeResult], path: Path) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    for r in results:
        mbps = r.egress_per_min * 8 / 60 / 1e6
        hourly = mbps[: mbps.size // 60 * 60].reshape(-1, 60).max(axis=1)
        ax.plot(np.arange(hourly.size) / 24, hourly, label=NAMES.get(r.scheme, r.scheme), lw=0.8)
    return _save(fig, ax, path, "egress, max 1-min window per hour (Mbps)")


def _save(fig, ax, path: Path, ylabel: str) -> str:  # matplotlib Figure/Axes, imported lazily; x: days
    import matplotlib.pyplot as plt
    ax.set_xlabel("day")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


# What results.json keeps of each SchemeResult, beside its scheme, stack and share of the gap closed
RESULT_FIELDS = ("cpu_s", "hit_ratio", "byte_hit_ratio", "mean_latency_s", "p95_latency_s", "mean_queued_latency_s",
                 "p95_queued_latency_s", "egress_peak_mbps", "prefetch_bytes", "prefetch_used_bytes", "daily_hit_ratio")


def write_report(ta: TraceArrays, cfg: ReplayConfig, results: list[SchemeResult], refs: list,
                 out: str | Path | None, title: str | None = None, catalog: CatalogMemory | None = None,
                 timings: dict[str, float] | None = None) -> str:
    text = f"## {title or 'Cache replay'}\n\n" + describe(ta, cfg) + "\n" + table(ta, results, refs, catalog)
    if timings:
        text += (f"\nWall time ({ta.n:,} requests): "
                 + "; ".join(f"{step} {seconds:,.0f} s" for step, seconds in timings.items()) + ".\n")
    if out is None:
        return text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = plots(results, out) if results else []
    charts = [f"![{n}]({n})" for n in imgs] if imgs or not results else [f"({CHARTS_HINT})"]
    text += "\n" + "\n".join(charts) + "\n"
    (out / "report.md").write_text(text)
    closed = gaps(results, refs) or {}
    data = {"meta": {k: v for k, v in ta.meta.items() if k != "params"}, "capacity": cfg.capacity,
            "capacity_text": fmt_bytes(cfg.capacity, cfg.capacity_unit),
            "schemes": [{"scheme": r.scheme, "default": r.scheme == DEFAULT_SCHEME,
                         "stack": dict(zip(("eviction", "prefetch"), SCHEMES.get(r.scheme, (None, None)), strict=True)),
                         "gap_closed": dict(zip(("object", "byte"), closed.get(r.scheme, (None, None)), strict=True)),
                         **{name: getattr(r, name) for name in RESULT_FIELDS}} for r in results],
            "catalog": asdict(catalog) if catalog else None, "timings_s": timings or {},
            "reference": [{"algorithm": f.algorithm, "hit_ratio": f.hit_ratio, "byte_hit_ratio": f.byte_hit_ratio}
                          for f in refs]}
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return text
