"""bench/foreign_csv.py (docs/replay.md, round 36): held-out workloads written as the CSV `pacsgw import-trace` takes,
rows in any order, the same for the same seed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agent.sim.importer import load
from bench.foreign_csv import FAMILIES, generate


def _written(tmp_path: Path, rows: list[list[str]], name: str) -> Path:
    p = tmp_path / f"{name}.csv"
    with p.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return p


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_import_cleanly_and_are_the_same_per_seed(tmp_path: Path, family: str) -> None:
    rows = generate(family, seed=3, days=10, monthly_gb=20)
    assert rows == generate(family, seed=3, days=10, monthly_gb=20)
    assert rows != generate(family, seed=4, days=10, monthly_gb=20)
    assert rows[0] == ["ts", "op", "path", "size", "patient", "study", "modality", "dept"]
    ts = [float(r[0]) for r in rows[1:]]
    assert ts != sorted(ts)                         # the CSV form's rows come in any order
    imported, summary = load(_written(tmp_path, rows, family))
    assert not summary.bad and summary.rewrites == 0 and summary.sizes_fixed == 0
    assert len(imported) == len(rows) - 1
    writes = [r for r in imported if r.write]
    assert writes and len(writes) < len(imported)
    # every file written is written before it is read: no read of the trace's own files is taken for the archive
    first = {}
    for r in imported:
        first.setdefault(r.path, r.write)
    assert all(first[r.path] for r in writes)
    assert 0.5 < sum(r.size for r in writes) / (20e9 * 10 / 30) < 1.6      # about the monthly bytes, pro rata


def test_without_labels_the_importer_takes_the_study_from_the_path(tmp_path: Path) -> None:
    rows = generate("zipf", seed=1, days=10, monthly_gb=20, labels=False)
    assert rows[0] == ["ts", "op", "path", "size"]
    imported, summary = load(_written(tmp_path, rows, "zipf"))
    assert not summary.bad
    assert {r.study for r in imported} == {r.path.split("/")[0] for r in imported}   # `<patient>/<accession>`
    assert all(r.patient == r.study for r in imported)
