"""The DICOM header of a stored file: one bounded, header-only parse (at most HEADER_MAX bytes, up to 0020,000E)
shared by everything that needs it. Whatever is wrong with a file gives a `Header` with `problem` set; the file
itself is always stored as given.

Two parsers give the same `Header`: a plain scan (`_scan`) of the usual file (Little Endian, defined lengths) at a
tenth of pydicom's cost, and pydicom for everything else: the scan gives up rather than guess. pydicom's work is
bounded too: PYDICOM_READS (it walks every sequence of undefined length item by item, 0.4 s for 256 KiB of empty
items), a value it converts may not be a sequence (_no_sequence: it parses one from its bytes, unbounded), and a
deflated body is inflated here to at most HEADER_MAX (pydicom inflates it whole, 200 KiB to 200 MB).
"""

from __future__ import annotations

import contextvars
import dataclasses
import io
import os
import struct
import warnings
import zlib
from typing import Any

from agent.records import Header

HEADER_MAX = 256 * 1024        # real headers are a few KiB; private tags can make them tens of KiB
FIRST_READ = 16 * 1024         # read first: enough for a usual header; HEADER_MAX only when it is not
PREAMBLE = 128                 # then b"DICM"
MAGIC = b"DICM"
# pydicom makes 1-3 reads per element or sequence item, and builds a Dataset (20 µs) per item: the largest header
# before 0020,000E among pydicom's sample files takes 292 reads; 1 000 cost a hostile header 5-7 ms of CPU
PYDICOM_READS = 1000
TOO_COMPLEX = "header too complex"

# The tags used (group, element), by the Header field each fills: SOPClassUID, SOPInstanceUID, StudyDate, Modality,
# PatientID, PatientBirthDate, StudyInstanceUID, SeriesInstanceUID.
_TAGS = {"sop_class": 0x00080016, "sop_uid": 0x00080018, "study_date": 0x00080020, "modality": 0x00080060,
         "patient": 0x00100020, "birth_date": 0x00100030, "study_uid": 0x0020000D, "series_uid": 0x0020000E}
_PATIENT_ID = _TAGS["patient"]
_LAST = max(_TAGS.values())


class _TooComplex(Exception):
    """Raised into pydicom by _Budgeted: not an EOFError, which pydicom would take for a short file."""


class _Budgeted(io.BytesIO):
    """The header's bytes, refusing pydicom more than `reads` reads: bounds its CPU whatever the header holds."""

    def __init__(self, data: bytes, reads: int) -> None:
        super().__init__(data)
        self.left = reads

    def read(self, size: int | None = -1, /) -> bytes:
        self.left -= 1
        if self.left < 0:
            raise _TooComplex(f"over {PYDICOM_READS} reads before 0020,000E")
        return super().read(size)


_PARSING = contextvars.ContextVar("pacsgw_header_parsing", default=False)  # _parse_pydicom runs (in this thread)


def _no_sequence(raw: Any, data: dict[str, Any], **kwargs: Any) -> None:
    """pydicom's raw_element_value hook. A value it converts for _parse_pydicom (the first file meta element,
    TransferSyntaxUID, PatientID) that says it is a sequence it parses from its bytes on a reader of its own, outside
    the read bound (0.6 s of CPU for 256 KiB of empty items, on the event loop for a write-through upload): none of
    them is one."""
    from pydicom.hooks import raw_element_value

    if data["VR"] == "SQ" and _PARSING.get():
        raise _TooComplex("a value read is a sequence")
    raw_element_value(raw, data, **kwargs)


def _text(value: object) -> str | None:
    return str(value if value is not None else "").strip().strip("\x00").strip() or None


def _cut_element(ds: Any) -> int | None:
    """The tag of the last element read if its value ends early (pydicom keeps it silently), else None."""
    from pydicom.dataelem import RawDataElement

    e = ds.get_item(max(ds.keys())) if ds else None  # raw: not converted, cheap
    if isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF and len(e.value or b"") < e.length:
        return int(e.tag)
    return None


def _value(ds: Any, tag: int) -> str | None:
    """An element's value as stripped text: UI, DA and CS (ASCII) from the raw bytes (pydicom's conversion cost a
    whole header's read); PatientID (LO) decoded by pydicom in the file's character set, as it always was."""
    from pydicom.dataelem import RawDataElement

    raw = ds.get_item(tag)
    if tag != _PATIENT_ID and isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
        return _text(raw.value.decode("latin-1"))
    return _text(ds[tag].value)


_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_EXPLICIT_LE = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")  # deflated, Big Endian: pydicom's
_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US "
                 b"UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 2 reserved bytes, 4-byte length
_WANTED = frozenset(_TAGS.values())
_TS_TAG = 0x00020010
_SHORT, _LONG, _IMPLICIT = struct.Struct("<HH2sH"), struct.Struct("<HH2s2xI"), struct.Struct("<HHI")


def _elements(head: bytes, pos: int, explicit: bool, meta: bool) -> tuple[dict[int, bytes], int] | None:
    """The raw values of the wanted tags from pos up to the first element past the group (meta: 0002) or 0020,000E,
    and where it starts; None where pydicom must decide (cut, undefined length, odd VR, PatientID not LO)."""
    found: dict[int, bytes] = {}
    end = len(head)
    while pos + 8 <= end:
        group, elem, vr, length = _SHORT.unpack_from(head, pos)
        tag = group << 16 | elem
        if (group != 2) if meta else tag > _LAST:
            return found, pos
        if not explicit:
            vr, length, start = b"LO", _IMPLICIT.unpack_from(head, pos)[2], pos + 8  # LO: PatientID's VR
        elif vr not in _VRS:
            return None
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length, start = _LONG.unpack_from(head, pos)[3], pos + 12
        else:
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > end:
            return None
        if tag in _WANTED or tag == _TS_TAG:
            if tag == _PATIENT_ID and vr != b"LO":
                return None
            found[tag] = head[start:start + length]
        pos = start + length
    return None


def _scan(head: bytes, bound: str) -> Header | None:
    """The header of the usual file without pydicom; None when pydicom must read it (see the module doc)."""
    if (meta := _elements(head, PREAMBLE + 4, True, True)) is None or _TS_TAG not in meta[0]:
        return None
    ts = _text(meta[0][_TS_TAG].decode("latin-1"))
    if ts is None or ts != meta[0][_TS_TAG].rstrip(b"\0 ").decode("latin-1") or ts in _NOT_EXPLICIT_LE \
            or not ts.startswith("1.2.840.10008.1.2"):
        return None
    if (implicit := ts == _IMPLICIT_LE) and all(0x40 < c < 0x5B for c in head[meta[1] + 4:meta[1] + 6]):
        return None  # pydicom would take the data set for Explicit VR (it sniffs the first element's VR)
    if (data := _elements(head, meta[1], not implicit, False)) is None:
        return None
    raw = data[0]
    patient = raw.get(_PATIENT_ID)
    # pydicom decodes a PatientID the same in every character set only when ASCII, with no ISO 2022 escape, no '\'
    if patient is not None and not (patient.isascii() and b"\\" not in patient and b"\x1b" not in patient):
        return None
    v = {k: _text(raw[tag].decode("latin-1")) if tag in raw else None for k, tag in _TAGS.items()}
    if patient is not None:  # as pydicom's text conversion leaves it (it strips trailing NULs and spaces)
        v["patient"] = _text(patient.decode("ascii").rstrip("\0 "))
    return _header(v, ts, bound)


_DEFLATED_TS = b"\x02\x00\x10\x00UI\x16\x00" + _NOT_EXPLICIT_LE[0].encode()  # (0002,0010) as written


def _inflated(head: bytes) -> bytes | None:
    """A deflated file's first bytes with its data set inflated (at most HEADER_MAX) and its file meta saying
    Explicit VR Little Endian, for pydicom to read under the read bound. None: not deflated; b"": not readable so."""
    meta = _elements(head, PREAMBLE + 4, True, True)
    if meta is None or _NOT_EXPLICIT_LE[0].encode() not in head[:meta[1]]:
        return None
    if (at := head.find(_DEFLATED_TS, 0, meta[1])) < 0:
        return b""
    try:
        body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(head[meta[1]:], HEADER_MAX)
    except zlib.error:
        return b""
    ts = at + len(_DEFLATED_TS) - len(_NOT_EXPLICIT_LE[0])
    return head[:ts] + b"1.2.840.10008.1.2.1".ljust(len(_NOT_EXPLICIT_LE[0]), b"\0") + head[ts + 22:meta[1]] + body


def parse(head: bytes, whole: bool) -> Header:
    """Parse a file's first bytes (`whole`: they are the entire file). Never raises."""
    if len(head) < PREAMBLE + 4 or head[PREAMBLE:PREAMBLE + 4] != MAGIC:
        return Header(problem="no DICM preamble")
    bound = "" if whole else f" (only the first {len(head)} bytes read)"
    if _NOT_EXPLICIT_LE[0].encode() in head[:FIRST_READ] and (inflated := _inflated(head)) is not None:
        if not inflated:
            return Header(dicom=True, problem=f"unreadable header{bound}: deflated data set not read")
        return dataclasses.replace(_parse_pydicom(inflated, bound), transfer_syntax=_NOT_EXPLICIT_LE[0])
    return _scan(head, bound) or _parse_pydicom(head, bound)


def _parse_pydicom(head: bytes, bound: str) -> Header:
    """parse by pydicom: every file _scan leaves (and, in the tests, every file, to compare the two)."""
    from pydicom.filereader import read_partial
    from pydicom.hooks import hooks

    hooks.register_callback("raw_element_value", _no_sequence)  # for the whole process, acting only in a parse
    parsing = _PARSING.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd-but-readable values; we report what matters
            # stop_when: nothing after the last tag used is read (nor checked for truncation)
            ds = read_partial(_Budgeted(head, PYDICOM_READS), stop_when=lambda tag, vr, length: tag > _LAST)
            cut = _cut_element(ds)
            values = {k: _value(ds, tag) if tag in ds and tag != cut else None for k, tag in _TAGS.items()}
            ts = _text(getattr(ds.file_meta, "TransferSyntaxUID", None))
    except _TooComplex as e:  # more bytes would not make it simpler: read_fd does not read further
        return Header(dicom=True, problem=f"{TOO_COMPLEX} ({e})")
    except Exception as e:  # pydicom raises many kinds (OSError at a cut sequence, zlib.error in a deflated
        # body, InvalidDicomError, ValueError...): whatever a header holds, the file is stored, never refused
        return Header(dicom=True, problem=f"unreadable header{bound}: {type(e).__name__}: {str(e)[:120]}")
    finally:
        _PARSING.reset(parsing)
    return _header(values, ts, bound, f"header truncated in element {cut:08X}{bound}" if cut is not None else "")


def _header(v: dict[str, str | None], ts: str | None, bound: str, problem: str = "") -> Header:
    """The Header of the values read (by _TAGS name), whichever parser read them: incomplete without its UIDs."""
    if not problem and None in (v["study_uid"], v["series_uid"], v["sop_uid"]):
        problem = f"header incomplete{bound}"
    return Header(dicom=True, problem=problem, transfer_syntax=ts, **v)


def read_fd(fd: int, size: int) -> Header:
    """The header of the file behind fd (pread: the caller's offset is untouched). Blocking."""
    n = min(size, FIRST_READ)
    h = parse(os.pread(fd, n, 0), whole=n == size)
    # the header goes on past the first read (a header too complex in 16 KiB is no simpler in 256 KiB)
    if h.dicom and h.problem and not h.problem.startswith(TOO_COMPLEX) and n < min(size, HEADER_MAX):
        n = min(size, HEADER_MAX)
        h = parse(os.pread(fd, n, 0), whole=n == size)
    return h
