"""Rewrite a generated trace's request sequence as an import-trace CSV under another path layout
(issue 13: reviewers replay workloads whose directories are not studies, through `pacsgw import-trace`
with default options and no study column):

    .venv/bin/python bench/relayout.py /tmp/p12/traces/general.tsv /tmp/lay/general --layouts all

writes `<out>-<layout>.csv` per layout. The same requests (time, op, size) in the same order; only the
path changes, and only `baseline` keeps the patient/study/modality/dept columns (the original layout
as the generator names it, the yardstick). Catalog (`S`) lines are dropped: a CSV has none.

Layouts (what `import-trace`'s default `--study-depth 3`, the agent's, then takes to be a study):
- `day`:    YYYY/MM/DD/<sop uid>.dcm         (day directories of many studies; study = the day)
- `flat`:   <sop uid>.dcm                    (one directory; study = the file)
- `patient`: <patient>/<sop uid>.dcm         (all of a patient's studies; study = the patient)
- `nosedir`: <patient>/<study>/<sop uid>.dcm (no series level; study = the study)
- `dayuid`: the `day` paths with a `study` column only (the StudyInstanceUID the agent parses from each file's
  header, agent/dicom; no patient: no priors): what grouping by the DICOM study instead of the path would do
- `dayhdr`: the `day` paths with what the agent reads from each file's DICOM header: the study (StudyInstanceUID),
  the patient (PatientID) and the modality; no department (the header has none): the live agent on a day layout,
  which groups and plans priors by the header's study (docs/replay.md, round 27)
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.sim.trace import MAGIC

Fields = tuple[str, str, str, str]   # original path, patient, study, modality
LABELS = ["patient", "study", "modality", "dept"]


def _sop(path: str) -> str:
    """A SOP-instance-UID-like file name, unique per original file."""
    parts = path.split("/")
    study, series, inst = parts[2], parts[3], parts[4].removesuffix(".dcm")
    return f"1.2.826.0.1.{int(study[2:])}.{int(series[2:])}.{int(inst)}.dcm"


def _day(f: Fields) -> str:
    return f[0].split("/")[1].replace("-", "/") + "/" + _sop(f[0])


LAYOUTS: dict[str, Callable[[Fields], str]] = {
    "baseline": lambda f: f[0],
    "day": _day,
    "flat": lambda f: _sop(f[0]),
    "patient": lambda f: f"{f[1]}/{_sop(f[0])}",
    "nosedir": lambda f: f"{f[1]}/{f[2]}/{_sop(f[0])}",
    "dayuid": _day,
    "dayhdr": _day,
}
EXTRA = {"baseline": LABELS, "dayuid": ["study"], "dayhdr": ["patient", "study", "modality"]}  # the label columns kept


def relayout(src: Path, out: str, layouts: list[str]) -> list[Path]:
    files = {name: Path(f"{out}-{name}.csv") for name in layouts}
    with ExitStack() as stack, src.open() as f:
        writers = {name: csv.writer(stack.enter_context(p.open("w", newline=""))) for name, p in files.items()}
        for name, w in writers.items():
            w.writerow(["ts", "op", "path", "size", *EXTRA.get(name, [])])
        for line in f:
            if line.startswith(MAGIC) or line.startswith("t\t"):
                continue
            t, op, path, size, patient, study, modality, dept = line.rstrip("\n").split("\t")
            if op == "S":
                continue
            fields = (path, patient, study, modality)
            verb = "write" if op == "W" else "read"
            labels = dict(zip(LABELS, (patient, study, modality, dept), strict=True))
            for name, w in writers.items():
                w.writerow([t, verb, LAYOUTS[name](fields), size, *(labels[c] for c in EXTRA.get(name, []))])
    return list(files.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("out", help="prefix of the CSVs: <out>-<layout>.csv")
    ap.add_argument("--layouts", default="all", help=f"comma list of {', '.join(LAYOUTS)} (or all)")
    args = ap.parse_args()
    names = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    for p in relayout(args.trace, args.out, names):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
