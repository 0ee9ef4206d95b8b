"""The same trace through libCacheSim (LRU, ARC, S3-FIFO, SIEVE, LRB, GL-Cache, 3L-Cache, LeCaR, CACHEUS,
GDSF, LHD, Belady, BeladySize); libCacheSim is a dev/bench dependency, imported only here.

The trace goes to libCacheSim's oracleGeneral binary format (24-byte records with the index of the object's next
request, which Belady needs), sizes in KiB so caches over 2 GiB do not overflow 32-bit counters. Only reads count
(as in agent.sim.replay): every write is its object's first request, a compulsory miss, so read misses = misses -
writes. Warm-up requests are processed first and not counted.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from agent.sim.trace import TraceArrays, check_replayable
from agent.sim.workload import DAY

ORACLE = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
# the learned and adaptive ones (LRB, GL-Cache, 3L-Cache, LeCaR, CACHEUS) and the size-aware ones (GDSF,
# LHD) as libCacheSim 0.3.5 implements them, beside the classic ones and the offline optimum
ALGORITHMS = ("LRU", "ARC", "S3FIFO", "Sieve", "LRB", "GL-Cache", "3L-Cache", "LeCaR", "CACHEUS", "GDSF", "LHD",
              "Belady", "BeladySize")
_CLASSES = {"S3FIFO": "S3FIFO", "Sieve": "Sieve", "GL-Cache": "GLCache", "3L-Cache": "ThreeLCache",
            "CACHEUS": "Cacheus"}


def canonical(name: str) -> str:
    """'glcache' → 'GL-Cache': the report's name of a libCacheSim algorithm, any spelling of it."""
    key = name.strip().replace("-", "").lower()
    for known in ALGORITHMS:
        if key in (known.replace("-", "").lower(), _CLASSES.get(known, "").lower()):
            return known
    raise ValueError(f"unknown libCacheSim algorithm {name!r}; known: {', '.join(ALGORITHMS)}")


@dataclass
class ReferenceResult:
    algorithm: str
    reads: int
    hits: int
    read_kib: int
    hit_kib: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(self.reads, 1)

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_kib / max(self.read_kib, 1)


def next_access(obj: np.ndarray) -> np.ndarray:
    """Index of each request's next request for the same object, or -1."""
    order = np.argsort(obj, kind="stable")
    nxt = np.full(obj.size, -1, dtype=np.int64)
    same = obj[order[1:]] == obj[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def write_oracle(obj: np.ndarray, size_bytes: np.ndarray, t: np.ndarray, path: str) -> None:
    rec = np.empty(obj.size, dtype=ORACLE)
    rec["t"] = t.astype(np.uint32)
    rec["id"] = obj.astype(np.uint64) + 1          # libCacheSim treats id 0 as special in places
    rec["size"] = np.maximum(1, -(-size_bytes // 1024)).astype(np.uint32)
    rec["next"] = next_access(obj)
    rec.tofile(path)


def _make(name: str, cap_kib: int, hashpower: int = 24):
    import libcachesim as lcs
    if name == "S3FIFO" and cap_kib < 10:
        # its small queue is 10 % of the cache: below 10 units libCacheSim aborts the process
        raise ValueError("libCacheSim S3FIFO needs a cache of at least 10 KiB")
    return getattr(lcs, _CLASSES.get(name, name))(cache_size=int(cap_kib), hashpower=hashpower)


def run_reference(ta: TraceArrays, capacity: int, warmup_days: float = 3.0,
                  algorithms: tuple[str, ...] = ALGORITHMS) -> list[ReferenceResult]:
    check_replayable(ta)
    return run_arrays(ta.obj, ta.size, ta.t, ta.is_write, capacity, warmup_days * DAY, algorithms)


def run_arrays(obj: np.ndarray, size: np.ndarray, t: np.ndarray, is_write: np.ndarray, capacity: int,
               warmup_s: float = 0.0, algorithms: tuple[str, ...] = ALGORITHMS) -> list[ReferenceResult]:
    import libcachesim as lcs
    kib = np.maximum(1, -(-size // 1024)).astype(np.int64)
    warm = int(np.searchsorted(t, warmup_s, side="left"))
    post = slice(warm, None)
    n_post = obj.size - warm
    writes_post = int(is_write[post].sum())
    wkib_post = int(kib[post][is_write[post]].sum())
    reads = n_post - writes_post
    read_kib = int(kib[post].sum()) - wkib_post
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.oracleGeneral.bin")
        write_oracle(obj, size, t, path)
        # the hash table is 2^hashpower buckets: the default 2^24 costs ~100 MB per cache, sized here
        hashpower = int(np.clip(np.ceil(np.log2(max(int(obj.max()) + 1, 2))) + 1, 10, 26))
        for name in algorithms:
            cache = _make(name, max(1, capacity // 1024), hashpower)
            if warm:
                cache.process_trace(lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE), 0, warm)
            if n_post <= 0:
                out.append(ReferenceResult(name, 0, 0, 0, 0))
                continue
            mr, bmr = cache.process_trace(lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE), warm, -1)
            misses = int(round(mr * n_post)) - writes_post
            miss_kib = int(round(bmr * int(kib[post].sum()))) - wkib_post
            out.append(ReferenceResult(name, reads, reads - misses, read_kib, read_kib - miss_kib))
    return out
