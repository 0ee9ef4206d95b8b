"""What a DICOM file's object carries in S3: user metadata and tags for lifecycle rules. The patient never reaches
the bucket in clear, only a keyed pseudonym the archive team (holding the key) can match; every value is checked
against its VR first: a hostile header cannot inject characters or blow S3's 2 KB metadata limit.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import replace
from typing import Callable

import structlog

from agent.config import DicomConfig
from agent.dicom.header import read_fd
from agent.records import DICOM_PREFIX as PREFIX
from agent.records import Header, ObjectMeta

log = structlog.get_logger("pacsgw.dicom")

META_LIMIT = 2048            # S3: user metadata keys + values, in bytes
DICOM_SUFFIXES = (".dcm", ".dicom")  # names that promise DICOM: a missing preamble there is worth a warning

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")            # UI: digits and dots, at most 64
_DA = re.compile(r"[0-9]{8}")                      # DA: YYYYMMDD
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")              # CS: upper case, digits, space, underscore
_LO = re.compile(r"[^\x00-\x1f\x7f\\]{1,64}")          # LO: no control characters nor backslash, at most 64
_HEADER_VRS = {"sop_class": _UID, "sop_uid": _UID, "study_uid": _UID, "series_uid": _UID, "study_date": _DA,
               "modality": _CS, "patient": _LO, "birth_date": _DA}


def pseudonym(key: bytes, patient: str) -> str:
    """The keyed pseudonym of a PatientID: stable per hospital key, irreversible without it (128 bits)."""
    return hmac.new(key, patient.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]


def _valid(value: object, pattern: re.Pattern[str]) -> str | None:
    return value if isinstance(value, str) and len(value) <= 64 and pattern.fullmatch(value) else None


def checked(h: Header) -> Header:
    """h without the values its VRs do not allow, as object_meta leaves them out: for what keeps header values
    beside the bucket (prior studies, the log), which a 60 000-character Modality would fill per new study."""
    return replace(h, **{name: _valid(getattr(h, name), vr) for name, vr in _HEADER_VRS.items()})


_PSEUDONYM = re.compile(r"[0-9a-f]{32}")
_ROW_VRS = (_UID, _UID, _UID, _CS, _DA, _PSEUDONYM)  # study, series, sop, modality, study date, patient


def checked_row(row: tuple[object, ...]) -> tuple[object, ...] | None:
    """A study-index row read back from the bucket, with only the values object_meta writes (anyone may write
    metadata or an index object); None without a valid study UID."""
    path, size, *values = row
    study, *rest = (_valid(v, vr) for v, vr in zip(values, _ROW_VRS, strict=True))
    return None if study is None else (path, size, study, *rest)


def object_meta(h: Header, key: bytes | None, retention: str) -> ObjectMeta:
    """The metadata and tags of a DICOM object (header h); nothing for a file that is not DICOM."""
    if not h.dicom:
        return ObjectMeta({}, {})
    c = checked(h)
    fields = {"study": c.study_uid, "series": c.series_uid, "sop": c.sop_uid, "sop-class": c.sop_class,
              "modality": c.modality, "study-date": c.study_date, "ts": _valid(h.transfer_syntax, _UID),
              "patient": pseudonym(key, h.patient) if key and h.patient else None}
    # at most 9 values of at most 64 characters: far below META_LIMIT, whatever the header says
    metadata = {PREFIX + k: v for k, v in fields.items() if v is not None}
    if h.problem:
        metadata[PREFIX + "problem"] = "header"   # details go to the log; a marker is enough for a scan
    tags = {"retention": retention}
    if fields["modality"]:
        tags["modality"] = fields["modality"].strip()
    if fields["study-date"]:
        tags["study-year"] = fields["study-date"][:4]
    return ObjectMeta(metadata, tags)


class Describer:
    """For the uploader: a cached file's header (bounded) → its object's metadata and tags; an unreadable one goes
    as given (a warning, never a refusal). With metadata off it is still read for DICOM retention rules."""

    def __init__(self, cfg: DicomConfig, retention: Callable[[str, Header | None], str], needs_header: bool) -> None:
        self.cfg, self.retention = cfg, retention
        self.reads = cfg.metadata or needs_header  # whether it reads headers at all

    def __call__(self, path: str, fd: int, size: int, h: Header | None = None) -> ObjectMeta:
        """h: the header read at the file's commit, else read here. Blocking then (one pread of at most HEADER_MAX
        bytes and a parse): run it off the event loop."""
        if not self.reads:
            return ObjectMeta({}, {})
        h = h or read_fd(fd, size)
        if h.problem and (h.dicom or path.lower().endswith(DICOM_SUFFIXES)):
            log.warning("dicom_header_problem", path=path, problem=h.problem, stored="as given")
        if not self.cfg.metadata:
            return ObjectMeta({}, {}, h)
        return replace(object_meta(h, self.cfg.pseudonym_key or None, self.retention(path, h)), header=h)
