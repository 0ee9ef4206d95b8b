"""Ours' catalog memory is measured on the agent's real SQLite catalog, not assumed."""

from __future__ import annotations

import multiprocessing

from agent.sim.catalog_memory import measure, measure_trace, trace_files
from agent.sim.report import memory_line
from agent.sim.trace import iter_requests, load_arrays, write_trace
from agent.sim.workload import generate, preset
from agent.store.catalog import Catalog


def test_measure_fills_a_real_catalog(tmp_path) -> None:
    files = [(f"CT/2026-01-05/ST{s:08d}/SE{e:03d}/{i:05d}.dcm", 500_000 + i)
             for s in range(20) for e in range(1, 4) for i in range(1, 51)]
    # in a fresh interpreter, as measure_trace does: RSS growth inside a process that other tests have
    # already grown and shrunk (libCacheSim's caches) can be negative
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        m = pool.apply(measure, (files, tmp_path))
    assert m.rows == len(files) == 3000
    # a row holds the path, its parent and name, a SHA-256, an ETag and indexes: hundreds of bytes, not 10s
    assert 150 < m.bytes_per_row < 2000
    assert m.rss_full_bytes >= 0 and m.rss_half_bytes >= 0
    cat = Catalog(tmp_path / "catalog.sqlite")
    try:
        e = cat.get(files[7][0])
        assert e is not None and e.state == "clean" and e.size == files[7][1] and len(e.sha256) == 64
        assert e.access_count == 1
        assert cat.totals().files == len(files)
    finally:
        cat.close()


def test_measure_trace_runs_on_a_trace_in_a_child_process(tmp_path) -> None:
    path = tmp_path / "t.tsv"
    write_trace(generate(preset("general", seed=8, days=2, monthly_tb=0.05)), path)
    distinct = len({r.path for r in iter_requests(path)})
    assert len(trace_files(path, 10**9)) == distinct
    m = measure_trace(path, 2000)
    assert m.rows == min(2000, distinct)
    line = memory_line("ours", load_arrays(path), m)
    assert f"{m.rows:,} files" in line and f"{m.bytes_per_row:,.0f} B/file measured" in line
    assert "rclone model" in memory_line("A", load_arrays(path), m)
    assert memory_line("ours", load_arrays(path), None) == "not measured"

