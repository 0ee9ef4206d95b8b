"""Small hand-made traces for the replay and policy tests (no mocks: real TraceArrays)."""

from __future__ import annotations

import numpy as np

from agent.sim.trace import TraceArrays


def arrays(obj, is_write, t=None, size=None, obj_study=None, study_day=None, study_patient=None,
           study_bytes=None, days=1) -> TraceArrays:
    obj = np.asarray(obj, dtype=np.int32)
    n_obj = int(obj.max()) + 1
    t = np.arange(obj.size, dtype=np.float64) if t is None else np.asarray(t, dtype=np.float64)
    obj_size = np.full(n_obj, 1000, dtype=np.int64) if size is None else np.asarray(size, dtype=np.int64)
    obj_study = np.arange(n_obj, dtype=np.int32) if obj_study is None else np.asarray(obj_study, dtype=np.int32)
    n_st = int(obj_study.max()) + 1 if study_day is None else len(study_day)
    study_day = np.zeros(n_st, dtype=np.int32) if study_day is None else np.asarray(study_day, dtype=np.int32)
    study_patient = (np.arange(n_st, dtype=np.int32) if study_patient is None
                     else np.asarray(study_patient, dtype=np.int32))
    known = np.bincount(obj_study, weights=obj_size, minlength=n_st).astype(np.int64)
    study_bytes = known if study_bytes is None else np.asarray(study_bytes, dtype=np.int64)
    return TraceArrays(
        meta={"start": "2026-01-05", "days": days}, t=t, is_write=np.asarray(is_write, dtype=bool), obj=obj,
        size=obj_size[obj], obj_study=obj_study, obj_dir=np.zeros(n_obj, dtype=np.int32), obj_size=obj_size,
        study_patient=study_patient, study_modality=np.zeros(n_st, dtype=np.int16),
        study_department=np.zeros(n_st, dtype=np.int16), study_day=study_day, study_bytes=study_bytes,
        dir_names=["CT/2026-01-05"], modality_names=["CT"], department_names=["ED"])


def write_first(obj: np.ndarray, write_share: float, rng: np.random.Generator) -> np.ndarray:
    """Mark a random share of objects' first requests as writes (writes are always first in a trace)."""
    _, first = np.unique(obj, return_index=True)
    w = np.zeros(obj.size, dtype=bool)
    w[first[rng.random(first.size) < write_share]] = True
    return w


class StudyTrace:
    """A trace built study by study: each event reads or writes every file of a study, a second apart."""

    def __init__(self, files: int) -> None:
        self.files, self.studies = files, 0
        self.t: list[float] = []
        self.obj: list[int] = []
        self.w: list[bool] = []
        self.kind: list[str] = []

    def add(self, ts: float, study: int, write: bool, kind: str) -> None:
        for f in range(self.files):
            self.t.append(ts + f)
            self.obj.append(study * self.files + f)
            self.w.append(write)
            self.kind.append(kind)

    def arrays(self, days: int) -> tuple[TraceArrays, np.ndarray]:
        """→ the trace in time order (files of 1 000 bytes), and each request's kind."""
        order = np.argsort(np.array(self.t), kind="stable")
        n = self.studies * self.files
        ta = arrays(np.array(self.obj)[order], np.array(self.w)[order], t=np.array(self.t, dtype=float)[order],
                    size=np.full(n, 1000), obj_study=np.arange(n) // self.files, days=days)
        return ta, np.array(self.kind)[order]
