"""The trace file: one request per line, streaming, optionally gzip-compressed (name ends in .gz).

Format (tab-separated, UTF-8)::

    # pacsgw-trace v1 {"start": "2026-01-05", "preset": "general", "seed": 1, ...}
    t	op	path	size	patient	study	modality	department
    29412.350	W	CT/2026-01-05/ST00000012/SE001/00001.dcm	524288	P0001234	ST00000012	CT	ED

`t`: seconds since local midnight of `start` (ms), `op`: R or W, `size`: bytes. The first line's JSON (generator
parameters, archive totals) makes a trace self-describing. `load_arrays` turns it into integer numpy columns for
the replay, cached beside it (`<trace>.npz`) so repeated `pacsgw simulate` runs skip parsing.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from agent.sim.workload import DAY, Generator, Request, archive_totals

MAGIC = "# pacsgw-trace v1 "
COLUMNS = ("t", "op", "path", "size", "patient", "study", "modality", "department")


def _open(path: str | Path, mode: str) -> IO[str]:
    if str(path).endswith(".gz"):
        # level 1: the trace is large and written once; speed matters more than the last 10 %
        return io.TextIOWrapper(gzip.open(path, mode + "b", compresslevel=1), encoding="utf-8")
    return open(path, mode, encoding="utf-8", buffering=1 << 20)


def write_trace(g: Generator, path: str | Path, progress: bool = False) -> dict:
    """Stream the generator's requests to `path`; returns the header metadata (with counts)."""
    archive_bytes, archive_files = archive_totals(g)
    meta = {"start": g.p.start, "preset": g.p.preset, "seed": g.p.seed, "days": g.p.days,
            "monthly_tb": g.p.monthly_tb, "layout": g.p.layout, "archive_bytes": archive_bytes,
            "archive_files": archive_files, "params": asdict(g.p)}
    n = nbytes = 0
    with _open(path, "w") as f, _bar(progress, g.p.days, "gen-trace (days)") as bar:
        f.write(MAGIC + json.dumps(meta, sort_keys=True) + "\n" + "\t".join(COLUMNS) + "\n")
        names: dict[int, tuple[list[int], str, list[str]]] = {}
        # The catalog's view of the archive at the start: one `S` line per pre-existing study of every
        # patient the trace touches (its directory and total bytes). A policy may use these (as the
        # agent uses its catalog); they are not requests. Without them a prefetcher in the simulator
        # could only see the files that are going to be read, which would be an oracle.
        for st in g.studies:
            if st.day < 0:
                f.write(f"0.000\tS\t{_study_dir(g, st)}\t{int(st.sizes.sum())}\tP{st.patient:07d}\tST{st.idx:08d}"
                        f"\t{st.modality}\t{st.department}\n")
        for t, w, s, i in g.iter_chunks():
            lines = []
            for tt, ww, ss, ii in zip(t.tolist(), w.tolist(), s.tolist(), i.tolist(), strict=True):
                if (entry := names.get(ss)) is None:
                    entry = names[ss] = _study_names(g, ss)
                size = entry[0][ii]
                nbytes += size
                lines.append(f"{tt:.3f}\t{'W' if ww else 'R'}\t{entry[2][ii]}\t{size}\t{entry[1]}\n")
            f.write("".join(lines))
            n += len(lines)
            if len(names) > 50_000:   # bound memory: the names of a day's studies are enough
                names.clear()
            bar.update(1)
    meta.update(requests=n, request_bytes=nbytes)
    return meta


def _study_names(g: Generator, idx: int) -> tuple[list[int], str, list[str]]:
    """(sizes, the study's trailing columns, every instance path): computed once per study."""
    st = g.studies[idx]
    date = (g.start + dt.timedelta(days=st.day)).isoformat()
    starts = st.series_starts.tolist()
    paths = [g.p.layout.format(modality=st.modality, date=date, study=f"ST{st.idx:08d}", series=f"SE{se + 1:03d}",
                               instance=f"{k + 1:05d}")
             for se in range(len(starts) - 1) for k in range(starts[se + 1] - starts[se])]
    return st.sizes.tolist(), f"P{st.patient:07d}\tST{st.idx:08d}\t{st.modality}\t{st.department}", paths


def _study_dir(g: Generator, st) -> str:
    """The study's directory: the layout up to and including {study}."""
    depth = _layout_index(g.p.layout, "study") + 1
    date = (g.start + dt.timedelta(days=st.day)).isoformat()
    return "/".join(g.p.layout.split("/")[:depth]).format(modality=st.modality, date=date, study=f"ST{st.idx:08d}")


def _bar(enabled: bool, total: int | None, desc: str):  # a tqdm bar, silent unless enabled
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit_scale=True, mininterval=1.0, disable=not enabled)


def read_header(path: str | Path) -> dict:
    with _open(path, "r") as f:
        first = f.readline()
    if not first.startswith(MAGIC):
        raise ValueError(f"{path}: not a pacsgw trace (first line must start with {MAGIC!r})")
    return json.loads(first[len(MAGIC):])


def _fields(path: str | Path) -> Iterator[list[str]]:
    """The COLUMNS of every record after the two header lines, as text, `S` (catalog) lines first."""
    with _open(path, "r") as f:
        for line in itertools.islice(f, 2, None):
            yield line.rstrip("\n").split("\t")


def iter_requests(path: str | Path) -> Iterator[Request]:
    """Every request of a trace file as a record (for tests, small traces and conversions)."""
    for t, op, p, size, patient, study, modality, dep in _fields(path):
        if op != "S":
            yield Request(float(t), op, p, int(size), patient, study, modality, dep)


@dataclass
class TraceArrays:
    """A trace as integer columns: per request t, is_write, obj, size; per object its study, day directory and
    size; per study patient, modality, department and acquisition day (negative for priors)."""

    meta: dict
    t: np.ndarray            # float64 seconds
    is_write: np.ndarray     # bool
    obj: np.ndarray          # int32 object id (interned path)
    size: np.ndarray         # int64 bytes
    obj_study: np.ndarray    # int32
    obj_dir: np.ndarray      # int32
    obj_size: np.ndarray     # int64
    study_patient: np.ndarray  # int32
    study_modality: np.ndarray  # int16
    study_department: np.ndarray  # int16
    study_day: np.ndarray    # int32
    study_bytes: np.ndarray  # int64 total bytes of the study (catalog `S` line, or its written files)
    dir_names: list[str]
    modality_names: list[str]
    department_names: list[str]

    @property
    def n(self) -> int:
        return int(self.t.size)

    @property
    def n_objects(self) -> int:
        return int(self.obj_size.size)

    @property
    def n_days(self) -> int:
        return int(self.meta.get("days") or int(self.t[-1] // DAY) + 1)

    def dir_day(self) -> np.ndarray:
        """Acquisition day of every directory (relative to the trace start)."""
        start = dt.date.fromisoformat(self.meta["start"])
        dates = (next(p for p in d.split("/") if len(p) == 10 and p[4] == "-" and p[7] == "-") for d in self.dir_names)
        return np.array([(dt.date.fromisoformat(day) - start).days for day in dates], dtype=np.int32)

    def dir_modality(self) -> np.ndarray:
        codes = {m: i for i, m in enumerate(self.modality_names)}
        return np.array([next((codes[p] for p in d.split("/") if p in codes), 0) for d in self.dir_names],
                        dtype=np.int16)


def check_replayable(ta: TraceArrays) -> None:
    """ValueError unless requests are in time order and every write comes first (`pacsgw import-trace` repairs)."""
    if (late := np.flatnonzero(np.diff(ta.t) < 0)).size:
        raise ValueError(f"request {int(late[0]) + 2:,} is earlier than the one before it "
                         f"({late.size:,} such); convert the source with `pacsgw import-trace`")
    _, first = np.unique(ta.obj, return_index=True)
    is_first = np.zeros(ta.n, dtype=bool)
    is_first[first] = True
    if (bad := np.flatnonzero(ta.is_write & ~is_first)).size:
        raise ValueError(f"request {int(bad[0]) + 1:,} writes a file that was already written or read "
                         f"({bad.size:,} such); convert the source with `pacsgw import-trace`")


# TraceArrays' columns and their types, in this order: parse_trace fills them, load_arrays caches them
_ARRAYS = {"t": np.float64, "is_write": bool, "obj": np.int32, "size": np.int64, "obj_study": np.int32,
           "obj_dir": np.int32, "obj_size": np.int64, "study_patient": np.int32, "study_modality": np.int16,
           "study_department": np.int16, "study_day": np.int32, "study_bytes": np.int64}


def _layout_index(layout: str, key: str) -> int:
    return [i for i, part in enumerate(layout.split("/")) if "{" + key + "}" in part][0]


def parse_trace(path: str | Path, progress: bool = False) -> TraceArrays:
    meta = read_header(path)
    layout = meta.get("layout", "{modality}/{date}/{study}/{series}/{instance}.dcm")
    # An imported trace (layout null) has paths of any shape: its study's day is that of the study's
    # first write (-1: in the archive before the trace) and its "day directory" is modality/date, as
    # the generator's layouts have it; both set after the pass, once the first writes are known.
    if dated := bool(layout) and "{date}" in layout and "{modality}" in layout:
        # the day-directory: the layout's prefix that holds both the modality and the date
        dir_depth = max(_layout_index(layout, "date"), _layout_index(layout, "modality")) + 1
        date_index = _layout_index(layout, "date")
    start = dt.date.fromisoformat(meta["start"])
    # interned names → their number: objects (paths), studies, day directories, patients, modalities, departments
    objs, studies, dirs, patients, mods, deps = {}, {}, {}, {}, {}, {}
    columns: dict[str, list] = {name: [] for name in _ARRAYS}
    t_l, w_l, o_l, s_l, obj_study, obj_dir, obj_size, st_pat, st_mod, st_dep, st_day, st_bytes = columns.values()
    bar = _bar(progress, meta.get("requests"), "parse trace")

    def new_study(study: str, patient: str, modality: str, dep: str, day: int, nbytes: int) -> int:
        st_pat.append(patients.setdefault(patient, len(patients)))
        st_mod.append(mods.setdefault(modality, len(mods)))
        st_dep.append(deps.setdefault(dep, len(deps)))
        st_day.append(day)
        st_bytes.append(nbytes)
        sid = studies[study] = len(studies)
        return sid

    for t, op, p, size, patient, study, modality, dep in _fields(path):
        if op == "S":
            new_study(study, patient, modality, dep,
                      (dt.date.fromisoformat(p.split("/")[date_index]) - start).days, int(size))
            continue
        isize = int(size)
        if (oid := objs.get(p)) is None:
            oid = objs[p] = len(objs)
            if (sid := studies.get(study)) is None:
                if dated:
                    day = (dt.date.fromisoformat(p.split("/")[date_index]) - start).days
                else:
                    day = int(float(t) // DAY) if op == "W" else -1
                # -1 bytes: a study acquired during the trace, summed below
                sid = new_study(study, patient, modality, dep, day, -1)
            elif not dated and op == "W" and st_day[sid] < 0:
                st_day[sid] = int(float(t) // DAY)
            obj_study.append(sid)
            obj_dir.append(dirs.setdefault("/".join(p.split("/", dir_depth)[:dir_depth]), len(dirs)) if dated else -1)
            obj_size.append(isize)
        t_l.append(float(t))
        w_l.append(op == "W")
        o_l.append(oid)
        s_l.append(isize)
        if len(t_l) % 1_000_000 == 0:
            bar.update(1_000_000)
    bar.close()
    a = {name: np.array(values, dtype=_ARRAYS[name]) for name, values in columns.items()}
    summed = np.bincount(a["obj_study"], weights=a["obj_size"], minlength=len(st_bytes)).astype(np.int64)
    a["study_bytes"] = np.where(a["study_bytes"] < 0, summed, a["study_bytes"])
    if not dated:
        mod_names = list(mods)
        for o, sid in enumerate(obj_study):
            date = (start + dt.timedelta(days=st_day[sid])).isoformat()
            a["obj_dir"][o] = dirs.setdefault(f"{mod_names[st_mod[sid]]}/{date}", len(dirs))
    return TraceArrays(meta=meta, dir_names=list(dirs), modality_names=list(mods), department_names=list(deps), **a)


def load_arrays(path: str | Path, progress: bool = False, cache: bool = True) -> TraceArrays:
    """parse_trace, memoised in `<trace>.npz` (rebuilt when the trace is newer)."""
    npz = Path(str(path) + ".npz")
    if cache and npz.exists() and npz.stat().st_mtime >= os.stat(path).st_mtime:
        with np.load(npz, allow_pickle=False) as z:
            names = json.loads(str(z["names"]))
            return TraceArrays(meta=names["meta"], dir_names=names["dirs"], modality_names=names["mods"],
                               department_names=names["deps"], **{k: z[k] for k in _ARRAYS})
    ta = parse_trace(path, progress)
    if cache:
        names = json.dumps({"meta": ta.meta, "dirs": ta.dir_names, "mods": ta.modality_names,
                            "deps": ta.department_names})
        tmp = npz.with_suffix(".tmp.npz")
        np.savez(tmp, names=np.array(names), **{k: getattr(ta, k) for k in _ARRAYS})
        os.replace(tmp, npz)
    return ta
