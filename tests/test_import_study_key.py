"""Without a study column `import-trace` groups files into studies by the rule the live agent uses
(`agent.store.paths.study_of` with `[prefetch] study_depth`), so a hospital's replayed month is evicted in the
groups the box will use (issue 13, docs/replay.md "round 18 — layouts")."""

from __future__ import annotations

from pathlib import Path

from agent.cli import main
from agent.config import PrefetchConfig
from agent.sim.trace import iter_requests
from agent.store.evictor import study_of as live_study_of

PATHS = [
    "CT/2026-01-05/ST1/SE1/00001.dcm",      # the generator's MODALITY/DAY/STUDY/SERIES: the study
    "2026/01/05/1.2.826.0.1.7.1.1.dcm",     # day directories: the day, not the month
    "P123/1.2.826.0.1.8.1.1.dcm",           # a patient's directory: the patient
    "1.2.826.0.1.9.1.1.dcm",                # one flat directory: the file
]


def _import(tmp_path: Path, *options: str) -> dict[str, str]:
    src, dst = tmp_path / "plain.csv", tmp_path / "t.tsv"
    src.write_text("ts,op,path,size\n" + "".join(f"{i},write,{p},10\n" for i, p in enumerate(PATHS)))
    assert main(["import-trace", str(src), str(dst), *options]) == 0
    return {r.path: r.study for r in iter_requests(dst)}


def test_the_imported_study_is_the_live_agents(tmp_path: Path) -> None:
    depth = PrefetchConfig().study_depth
    assert _import(tmp_path) == {p: live_study_of(p, depth) for p in PATHS} == {
        PATHS[0]: "CT/2026-01-05/ST1", PATHS[1]: "2026/01/05", PATHS[2]: "P123", PATHS[3]: PATHS[3]}


def test_study_depth_as_the_box_is_configured(tmp_path: Path) -> None:
    assert _import(tmp_path, "--study-depth", "2")[PATHS[1]] == "2026/01"
    assert main(["import-trace", str(tmp_path / "plain.csv"), str(tmp_path / "u.tsv"), "--study-depth", "0"]) == 2
