"""bench/relayout.py's `dayuid` layout (docs/replay.md, round 26): the day layout's paths, grouped by the study a file's
DICOM header names (the trace's study) instead of by the day directory, and no patient (no priors); `dayhdr` (round 27):
the same with the header's patient and modality too (the prior planner's input)."""

from __future__ import annotations

from pathlib import Path

from agent.sim.importer import Row, load
from agent.sim.trace import COLUMNS, MAGIC
from bench.relayout import relayout

ROWS = [  # two studies written on one day, the first read later; a catalog line the CSVs drop
    ("0.000", "S", "CT/2026-01-05/ST00000001", "300", "P1", "ST00000001", "CT", "ED"),
    ("10.000", "W", "CT/2026-01-05/ST00000001/SE001/00001.dcm", "100", "P1", "ST00000001", "CT", "ED"),
    ("11.000", "W", "CT/2026-01-05/ST00000001/SE001/00002.dcm", "200", "P1", "ST00000001", "CT", "ED"),
    ("20.000", "W", "MR/2026-01-05/ST00000002/SE001/00001.dcm", "50", "P2", "ST00000002", "MR", "OP"),
    ("90.000", "R", "CT/2026-01-05/ST00000001/SE001/00002.dcm", "200", "P1", "ST00000001", "CT", "ED"),
]


def relaid(tmp_path: Path, layouts: list[str]) -> list[list[Row]]:
    """ROWS under each layout, as `pacsgw import-trace` reads the CSV."""
    src = tmp_path / "t.tsv"
    src.write_text(MAGIC + "{}\n" + "\t".join(COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in ROWS))
    return [load(csv, start="2026-01-05")[0] for csv in relayout(src, str(tmp_path / "x"), layouts)]


def test_dayuid_keeps_the_day_paths_and_groups_by_the_study(tmp_path: Path) -> None:
    day, uid = relaid(tmp_path, ["day", "dayuid"])
    assert [(r.t, r.write, r.path, r.size) for r in uid] == [(r.t, r.write, r.path, r.size) for r in day]
    assert {r.path.rpartition("/")[0] for r in uid} == {"2026/01/05"}
    assert {r.study for r in day} == {"2026/01/05"}                 # the day directory is one "study"
    assert [r.study for r in uid] == ["ST00000001", "ST00000001", "ST00000002", "ST00000001"]
    assert all(r.patient == r.study for r in uid)                   # no patient column: no priors


def test_dayhdr_adds_the_headers_patient_and_modality(tmp_path: Path) -> None:
    uid, hdr = relaid(tmp_path, ["dayuid", "dayhdr"])
    assert [(r.t, r.path, r.study) for r in hdr] == [(r.t, r.path, r.study) for r in uid]
    assert [(r.patient, r.modality, r.department) for r in hdr] == [("P1", "CT", "-"), ("P1", "CT", "-"),
                                                                    ("P2", "MR", "-"), ("P1", "CT", "-")]
