"""Read statistics, buffered in memory for a few seconds and then written to the catalog in one go: per file (what
eviction ranks by), and per directory (its first `dir_depth` levels, MODALITY/DAY) and local day (what the heat
model learns tomorrow's directories from).
"""

from __future__ import annotations

import time

from agent.metrics import Metrics
from agent.store.catalog import AsyncCatalog


def heat_dir(directory: str, depth: int) -> str:
    """The directory whose reads are counted together: the first `depth` levels of `directory`."""
    return "/".join(directory.split("/")[:depth])


class AccessStats:
    def __init__(self, dir_depth: int) -> None:
        self.dir_depth = dir_depth
        self._files: dict[str, tuple[float, int]] = {}
        self._heat: dict[tuple[str, str], list[int]] = {}
        self._day = (-1, "")  # the last note's whole second and its local day

    def heat_dir(self, path: str) -> str:
        return heat_dir(path.rpartition("/")[0], self.dir_depth)

    def note(self, path: str, size: int, *, hit: bool) -> None:
        now = time.time()
        _, count = self._files.get(path, (0.0, 0))
        self._files[path] = (now, count + 1)
        second, day = self._day
        if int(now) != second:  # the local day's text, made once a second (strftime per read was ~1 % of one)
            day = time.strftime("%Y-%m-%d", time.localtime(now))
            self._day = (int(now), day)
        counts = self._heat.setdefault((self.heat_dir(path), day), [0, 0, 0])
        counts[0] += 1
        counts[1] += 0 if hit else 1
        counts[2] += size

    def drain(self) -> tuple[list[tuple[str, float, int]], list[tuple[str, str, int, int, int]]]:
        """Everything noted since the last drain, as catalog rows; the buffers start empty again."""
        files, heat = self._files, self._heat
        self._files, self._heat = {}, {}
        return ([(p, t, n) for p, (t, n) in files.items()], [(d, day, r, m, b) for (d, day), (r, m, b) in heat.items()])

    async def flush(self, db: AsyncCatalog, metrics: Metrics) -> None:
        files, heat = self.drain()
        if files:
            metrics.note_prefetch_used(*await db.record_access(files, heat))
