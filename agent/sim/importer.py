"""`pacsgw import-trace`: real traffic (CSV, the agent's audit log, xferlog) → a pacsgw trace.

A hospital replays its own month before it picks a policy. The three formats (csv, audit, xferlog) and the repairs
that make a trace replayable (a read before the first write, rewrites, sizes) are described in docs/replay.md ("Your
own traffic"); a row that cannot be parsed is reported with its line number, never written.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

from agent.config import PrefetchConfig
from agent.sim.trace import COLUMNS, MAGIC, _open
from agent.sim.workload import DAY
from agent.store.paths import study_of

CSV_REQUIRED = ("ts", "op", "path", "size")
CSV_OPTIONAL = {"patient": "patient", "study": "study", "modality": "modality", "dept": "department",
                "department": "department"}
DEFAULT_START = dt.datetime(2026, 1, 5)   # a Monday: CSV times are relative
NO_MODALITY = "OT"          # DICOM's "other"
NO_DEPARTMENT = "-"
STUDY_DEPTH = PrefetchConfig().study_depth  # without a study column a file's study is what the live agent takes
_CONTROL = {chr(c) for c in range(32)} | {"\x7f"}
T = TypeVar("T")


class TraceImportError(ValueError):
    """The source as a whole cannot be imported (no header, unknown format, no usable row)."""


@dataclass
class Row:
    t: float              # seconds since midnight of the trace's start
    write: bool
    path: str
    size: int
    line: int
    patient: str = ""
    study: str = ""
    modality: str = ""
    department: str = ""


@dataclass
class Bad:
    line: int
    reason: str


@dataclass
class Summary:
    source: str
    format: str
    start: str = ""
    rows: int = 0                      # transfer rows parsed
    bad: list[Bad] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)   # not a transfer (audit: list, login, …)
    read_before_write: int = 0         # objects read before their first write (treated as pre-existing)
    rewrites: int = 0                  # writes dropped: the object was already written or read
    sizes_fixed: int = 0
    reads: int = 0
    writes: int = 0
    objects: int = 0
    studies: int = 0
    days: int = 0

    def text(self, max_bad: int = 20) -> str:
        lines = [f"import-trace: {self.source} ({self.format}): {self.rows:,} transfer rows"]
        if self.bad:
            lines.append(f"  bad rows (skipped): {len(self.bad):,}")
            lines += [f"    line {b.line}: {b.reason}" for b in self.bad[:max_bad]]
            if len(self.bad) > max_bad:
                lines.append(f"    … and {len(self.bad) - max_bad:,} more")
        if self.ignored:
            lines.append("  not transfers (skipped): "
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(self.ignored.items())))
        if self.read_before_write:
            lines.append(f"  repaired: {self.read_before_write:,} objects read before their first write "
                         "(treated as in the archive before the trace)")
        if self.rewrites:
            lines.append(f"  dropped: {self.rewrites:,} rewrites of an object already written or read "
                         "(the replay keeps one version per path)")
        if self.sizes_fixed:
            lines.append(f"  repaired: {self.sizes_fixed:,} reads given their object's size")
        lines.append(f"  trace: {self.reads + self.writes:,} requests ({self.reads:,} reads, {self.writes:,} "
                     f"writes), {self.objects:,} files, {self.studies:,} studies, {self.days} days from {self.start}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "rows": self.rows, "bad": len(self.bad),
                "ignored": dict(self.ignored), "read_before_write": self.read_before_write,
                "rewrites": self.rewrites, "sizes_fixed": self.sizes_fixed}


def _path(raw: str) -> str:
    """A relative POSIX path without '.'/'..' parts or control characters (they would break the TSV)."""
    if not raw or any(c in _CONTROL for c in raw):
        raise ValueError(f"path {raw!r} is empty or has control characters")
    if not (parts := [p for p in raw.strip("/").split("/") if p not in ("", ".")]) or ".." in parts:
        raise ValueError(f"path {raw!r} is empty or has a '..' part")
    return "/".join(parts)


def _parsed(convert: Callable[[Any], T], raw: Any, why: str) -> T:
    """convert(raw), failing with `why` (the row's reason) instead of convert's own message."""
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(why) from None


def _size(raw: object) -> int:
    why = f"size {raw!r} is not a whole number of bytes"
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(why)
    if (n := _parsed(int, raw, why)) < 0:
        raise ValueError(f"size {raw!r} is negative")
    return n


def _label(name: str, raw: str) -> str:
    if any(c in _CONTROL for c in raw):
        raise ValueError(f"{name} {raw!r} has control characters")
    return raw.strip()


def _items(records: Iterable[tuple[int, T]], parse: Callable[[T, int], Row | str | None]) -> Iterator[Row | Bad | str]:
    """parse(record, line) of each numbered record: a Row, (str) a non-transfer kind to count, or None (a blank line,
    left out); a ValueError is a Bad row, its message the reason."""
    for line, record in records:
        try:
            item: Row | Bad | str | None = parse(record, line)
        except ValueError as e:
            item = Bad(line, str(e))
        if item is not None:
            yield item


def parse_csv(f: IO[str]) -> Iterator[Row | Bad | str]:
    reader = csv.reader(f)
    if (header := next(reader, None)) is None:
        raise TraceImportError("empty CSV (a header `ts,op,path,size[,patient,study,modality,dept]` is needed)")
    cols = [c.strip().lower() for c in header]
    unknown = [c for c in cols if c not in CSV_REQUIRED and c not in CSV_OPTIONAL]
    missing = [c for c in CSV_REQUIRED if c not in cols]
    if unknown or missing or len(set(cols)) != len(cols):
        raise TraceImportError(f"CSV header {header!r}: needs ts,op,path,size (optional patient,study,modality,dept); "
                               f"missing {missing}, unknown {unknown}")

    def row_of(row: list[str], line: int) -> Row | None:
        if not row or (len(row) == 1 and not row[0].strip()):
            return None
        if len(row) != len(cols):
            raise ValueError(f"{len(row)} fields, the header has {len(cols)}")
        rec = dict(zip(cols, row, strict=True))
        if not math.isfinite(ts := _parsed(float, rec["ts"], f"ts {rec['ts']!r} is not a number")) or ts < 0:
            raise ValueError(f"ts {rec['ts']!r} is not a time in seconds from the start")
        if (op := rec["op"].strip().lower()) not in ("read", "write"):
            raise ValueError(f"op {rec['op']!r} is neither read nor write")
        r = Row(ts, op == "write", _path(rec["path"]), _size(rec["size"].strip()), line)
        for col, attr in CSV_OPTIONAL.items():
            if col in rec:
                setattr(r, attr, _label(col, rec[col]))
        return r

    return _items(((reader.line_num, row) for row in reader), row_of)


def _audit_row(text: str, line: int) -> Row | str | None:
    """Absolute times (UTC); Row.t is seconds since the epoch here, rebased by `load`."""
    if not text.strip():
        return None
    try:
        rec = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not an audit record: {e}") from None
    if not isinstance(rec, dict):
        raise ValueError("not an audit record: not a JSON object")
    if (op := rec.get("op")) not in ("store", "retrieve"):
        return f"audit {op}"
    if rec.get("result") != "ok":
        return f"audit {op} not ok"
    if not isinstance(stamp := rec.get("time"), str):
        raise ValueError(f"time {stamp!r} is missing")
    when = _parsed(dt.datetime.fromisoformat, stamp.replace("Z", "+00:00"), f"time {stamp!r} is not an ISO time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    if "bytes" not in rec:
        raise ValueError("no byte count")
    return Row(when.timestamp(), op == "store", _path(str(rec.get("path", ""))), _size(rec["bytes"]), line,
               department=_label("user", str(rec.get("user", ""))))


def _xferlog_row(text: str, line: int) -> Row | str | None:
    """`Mon Nov 30 21:12:14 2026 <secs> <host> <bytes> <file…> <type> <action> <i|o|d> <mode> <user> <service> <auth>
    <auth-user> <c|i>`: the file name (spaces and all) lies between 8 leading and 9 trailing fields; local times."""
    if not (tok := text.split()):
        return None
    if len(tok) < 18:
        raise ValueError(f"{len(tok)} fields, an xferlog line has at least 18")
    stamp = " ".join(tok[:5])
    when = _parsed(lambda t: dt.datetime.strptime(t, "%a %b %d %H:%M:%S %Y"), stamp,
                   f"time {stamp!r} is not `Mon Nov 30 21:12:14 2026`")
    secs = _parsed(int, tok[5], f"transfer time {tok[5]!r} is not whole seconds")
    direction, status, user = tok[-7], tok[-1], tok[-5]
    if direction not in ("i", "o", "d"):
        raise ValueError(f"direction {direction!r} is not i, o or d")
    if status not in ("c", "i"):
        raise ValueError(f"completion status {status!r} is not c or i")
    size, path = _size(tok[7]), _path(" ".join(tok[8:-9]))
    if direction == "d":
        return "xferlog delete"
    if status == "i":
        return "xferlog incomplete transfer"
    t = when.replace(tzinfo=dt.timezone.utc).timestamp() - max(secs, 0)
    return Row(t, direction == "i", path, size, line, department=_label("user", user))


PARSERS: dict[str, Callable[[IO[str]], Iterator[Row | Bad | str]]] = {
    "csv": parse_csv, "audit": lambda f: _items(enumerate(f, 1), _audit_row),
    "xferlog": lambda f: _items(enumerate(f, 1), _xferlog_row)}


def sniff(first_line: str) -> str:
    s = first_line.lstrip()
    if s.startswith("{"):
        return "audit"
    if s.split(",")[0].strip().lower() == "ts" or "," in s and "path" in s.lower():
        return "csv"
    return "xferlog"


def repair(rows: list[Row], summary: Summary) -> list[Row]:
    """Sort (a write before a read of the same second) and keep one write per object, first."""
    rows.sort(key=lambda r: (r.t, not r.write, r.line))
    first: dict[str, tuple[bool, int]] = {}     # path → (first request was a write, object size)
    out: list[Row] = []
    pre_existing_rewritten: set[str] = set()
    for r in rows:
        if (known := first.get(r.path)) is None:
            first[r.path] = (r.write, r.size)
        elif r.write:
            summary.rewrites += 1
            if not known[0]:
                pre_existing_rewritten.add(r.path)
            continue
        elif r.size != known[1]:
            r.size = known[1]
            summary.sizes_fixed += 1
        out.append(r)
    summary.read_before_write = len(pre_existing_rewritten)
    return out


def load(src: str | Path, fmt: str = "auto", start: str | None = None,
         study_depth: int = STUDY_DEPTH) -> tuple[list[Row], Summary]:
    """Parse `src` and make it replayable; → rows with t relative to midnight of the start day."""
    with _open(src, "r") as f:
        first = f.readline()
    if not first:
        raise TraceImportError(f"{src}: empty file")
    fmt = sniff(first) if fmt == "auto" else fmt
    if fmt not in PARSERS:
        raise TraceImportError(f"unknown format {fmt!r}; known: {', '.join(PARSERS)}")
    summary = Summary(source=str(src), format=fmt)
    rows: list[Row] = []
    try:
        base = dt.datetime.fromisoformat(start) if start else None
    except ValueError:
        raise TraceImportError(f"--start {start!r} is not a date (YYYY-MM-DD)") from None
    with _open(src, "r") as f:
        for item in PARSERS[fmt](f):
            if isinstance(item, Row):
                rows.append(item)
            elif isinstance(item, Bad):
                summary.bad.append(item)
            else:
                summary.ignored[item] += 1
    summary.rows = len(rows)
    if not rows:
        raise TraceImportError(f"{src}: no usable transfer rows ({len(summary.bad)} bad)\n" + summary.text())
    if fmt == "csv":
        day0 = (base or DEFAULT_START).date()
    else:   # absolute times: the trace starts at midnight (UTC / the log's clock) of the first request
        day0 = base.date() if base else dt.datetime.fromtimestamp(min(r.t for r in rows), dt.timezone.utc).date()
        midnight = dt.datetime.combine(day0, dt.time(), dt.timezone.utc).timestamp()
        for r in rows:
            r.t -= midnight
        if min(r.t for r in rows) < 0:
            raise TraceImportError(f"{src}: --start {start} is after the first request")
    summary.start = day0.isoformat()
    for r in rows:
        r.study = r.study or study_of(r.path, study_depth)
        r.patient = r.patient or r.study
        r.modality = r.modality or NO_MODALITY
        r.department = r.department or NO_DEPARTMENT
    return repair(rows, summary), summary


def write(rows: list[Row], summary: Summary, dst: str | Path) -> dict:
    """The trace file (agent.sim.trace format, no `S` catalog lines: the archive before it is unknown)."""
    written = {r.path: r.size for r in rows}  # one size a path: repair gave reads their object's
    summary.writes = sum(r.write for r in rows)
    summary.reads = len(rows) - summary.writes
    summary.objects, summary.studies = len(written), len({r.study for r in rows})
    summary.days = int(rows[-1].t // DAY) + 1
    meta = {"start": summary.start, "preset": "import", "seed": None, "days": summary.days, "layout": None,
            "monthly_tb": round(sum(r.size for r in rows if r.write) / 1e12 * 30 / summary.days, 6),
            "archive_bytes": sum(written.values()), "archive_files": len(written),
            "requests": len(rows), "request_bytes": sum(r.size for r in rows), "import": summary.as_dict()}
    with _open(dst, "w") as f:
        f.write(MAGIC + json.dumps(meta, sort_keys=True) + "\n" + "\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write(f"{r.t:.3f}\t{'W' if r.write else 'R'}\t{r.path}\t{r.size}\t{r.patient}\t{r.study}"
                    f"\t{r.modality}\t{r.department}\n")
    return meta


def import_trace(src: str | Path, dst: str | Path, fmt: str = "auto", start: str | None = None,
                 study_depth: int = STUDY_DEPTH) -> Summary:
    rows, summary = load(src, fmt, start, study_depth)
    write(rows, summary, dst)
    return summary
