"""The eviction unit where a directory is not a study (issue 13, docs/replay.md "Other path layouts").

Whole-study eviction takes a study to be its StudyInstanceUID where known (a trace's study column; live, the study
index), else a directory (`agent.store.paths.study_of`: the first `[prefetch] study_depth` levels). Where a directory
is not one study (`YYYY/MM/DD/<sop>.dcm` day directories, one flat directory, `<patient>/<sop>.dcm`) and no UID names
it, one "study" holds days to years of files, and dropping it whole empties the cache: the default closed -65 % of the
LRU→Belady gap on `general` in day directories. A study is written in one burst (the tuning families' longest: 11 min);
a directory that goes on receiving writes for hours is not one. Such a *mixed* directory is split into groups by insert
bursts instead: the files that land in it within `GAP_S` of one another (and within `SPAN_S` of the burst's first),
written or read on a miss alike, since the reads of one case's files also come together. A directory written in one
burst keeps its own name as the group, so study directories evict exactly as before. A directory never seen written (an
old day directory whose studies come back as priors) is split the same way once it has been read into on misses for
more than `MIXED_S`: whole, every case read from a busy old day kept the day young, then it went at once. The planner's
prefetches do not start that clock (a prior study is fetched again for each new study of its patient). A file read
again on a miss from such a directory rejoins the group it was first read into: the split tells the cases of an old
day apart, and a case read in session after session (a prior of several new studies, a board's or a teaching case)
stays one group, which the doorkeeper then sees come back (docs/replay.md, round 20). So does a file written into a
mixed directory (a patient's, new studies on several days): a new burst each time it came back hid its return from the
learned expert and the doorkeeper (round 36). A directory's clock starts at its first insert, read or written.

`PolicyStack` maps every insert through one `Groups`, for the live agent and the simulator alike.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

MIXED_S = 2 * 3600.0    # writes into one directory spread over more than this: not one study
GAP_S = 300.0           # inserts closer than this are one burst (one study written, one case read)
SPAN_S = 3600.0         # a burst is cut after this long (a busy flat directory never pauses)
MAX_DIRS = 1_000_000    # directories remembered (~150 B each), least recently inserted into forgotten
MAX_FILES = 500_000     # files read from directories never written whose group is remembered (~100 B each)


@dataclass
class _Dir:
    first_write: float | None = None
    first_read: float | None = None     # first insert on a read, while the directory was never seen written
    mixed: bool = False
    burst: int = 0                  # group number of the current burst (mixed only)
    burst_start: float = 0.0
    last_insert: float = float("-inf")


class Groups:
    """Directory (study key) + insert time → eviction group: the directory itself, or (directory, burst)."""

    def __init__(self, max_dirs: int = MAX_DIRS) -> None:
        self.max_dirs = max_dirs
        self._dirs: OrderedDict[Hashable, _Dir] = OrderedDict()
        # file → the group it was first read into on a miss, for directories never seen written; least recently
        # read forgotten (a dict keeps insertion order: a re-read moves a file to the end)
        self._read_into: dict[Hashable, Hashable] = {}

    def of(self, study: Hashable, now: float, written: bool, prefetch: bool = False,
           key: Hashable | None = None) -> Hashable:
        """The group of file `key` inserted into directory `study` at `now`: written, read on a miss or prefetched."""
        group = self._group(study, now, written, prefetch)
        if key is None or prefetch:
            return group
        d = self._dirs[study]
        if written or (d.first_write is not None and key not in self._read_into):
            if d.mixed:     # a written file of a mixed directory: read on a miss later, it goes back to its burst
                self._remember(key, group)
            return group
        group = self._read_into.pop(key, group)
        self._remember(key, group)
        return group

    def _remember(self, key: Hashable, group: Hashable) -> None:
        self._read_into[key] = group
        if len(self._read_into) > MAX_FILES:
            del self._read_into[next(iter(self._read_into))]

    def _group(self, study: Hashable, now: float, written: bool, prefetch: bool) -> Hashable:
        d = self._dirs.get(study)
        if d is None:
            d = self._dirs[study] = _Dir()
            if len(self._dirs) > self.max_dirs:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(study)
        if written:
            d.first_write = now if d.first_write is None else d.first_write
            # read into on misses before its first write (a patient's archive study, days before the new one): the
            # files are from then on, and a write hours later is no part of that read's group
            first = d.first_write if d.first_read is None else d.first_read
        elif d.first_write is None and not prefetch:     # only ever read on misses so far
            d.first_read = now if d.first_read is None else d.first_read
            first = d.first_read
        else:                   # a read of a written directory, a prefetch: neither makes a directory mixed
            first = now
        if not d.mixed and now - first > MIXED_S:
            d.mixed, d.burst_start = True, float("-inf")     # the next line opens burst 1
        if not d.mixed:
            d.last_insert = now
            return study
        if now - d.last_insert > GAP_S or now - d.burst_start > SPAN_S:
            d.burst, d.burst_start = d.burst + 1, now
        d.last_insert = now
        return (study, d.burst)

    @staticmethod
    def directory(group: Hashable) -> Hashable:
        """The study key a group came from (what `describe` was told)."""
        return group[0] if isinstance(group, tuple) else group
