"""Value types shared by the store and the uplink, so the uplink imports nothing from agent.store (nor from
agent.dicom, which reads the headers and decides retention above it)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from urllib.parse import urlencode

DICOM_PREFIX = "dicom-"  # the user-metadata keys of a DICOM object (agent.dicom.objectmeta)
S3_KEY_BYTES = 1024  # the longest object key S3 takes, uplink prefix included
MAX_NAME_BYTES = 255  # the longest name (one path segment) a client can make or look up


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalog row: a file or directory and its state (see agent.store.catalog)."""

    path: str
    is_dir: bool
    size: int
    mtime: float
    sha256: str | None
    state: str | None
    blob: str | None
    gen: int
    etag: str | None
    version_id: str | None
    copy_from: str | None
    listed: bool
    dirty_since: float | None
    attempts: int
    last_error: str | None
    last_access: float | None
    access_count: int

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def object_key(self) -> str:
        """Where the file's bytes are in S3 now: a renamed file's old key until its copy has run."""
        return self.copy_from or self.path


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object found by a remote listing, relative to the directory listed."""

    name: str
    size: int
    mtime: float
    etag: str | None


@dataclass(frozen=True)
class Lock:
    """The S3 Object Lock an object is written with (decided by agent.dicom.retention, applied by the uplink)."""

    mode: str
    until: datetime.datetime
    legal_hold: bool

    def s3_args(self) -> dict[str, object]:
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": self.until,
                **({"ObjectLockLegalHoldStatus": "ON"} if self.legal_hold else {})}


@dataclass(frozen=True)
class Header:
    """What the gateway uses of a DICOM header (agent.dicom.header reads it), as stripped text; `dicom` False else."""

    dicom: bool = False
    problem: str = ""               # why the header could not be (fully) read; '' when it could
    transfer_syntax: str | None = None
    sop_class: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    study_date: str | None = None   # DA: YYYYMMDD
    modality: str | None = None
    patient: str | None = None      # PatientID, in clear: never leaves the box (see agent.dicom.objectmeta)
    birth_date: str | None = None   # DA, for age-based retention; never leaves the box either


@dataclass(frozen=True)
class ObjectMeta:
    """What an object carries in S3 beside its bytes (agent.dicom.objectmeta builds it from the header)."""

    metadata: dict[str, str]   # S3 user metadata, without the 'x-amz-meta-' prefix
    tags: dict[str, str]       # S3 object tags
    # the parsed header, for the retention decision on the box (it holds the patient in clear: never printed)
    header: Header | None = field(default=None, repr=False, compare=False)

    def tagging(self) -> str:
        """The x-amz-tagging header value (URL query encoded)."""
        return urlencode(self.tags)


def index_row(path: str, size: int, metadata: dict[str, str]) -> tuple[object, ...] | None:
    """The study-index row of an object with this user metadata (None: not DICOM); size: the file's."""
    if DICOM_PREFIX + "study" not in (m := {k.lower(): v for k, v in metadata.items()}):
        return None
    return (path, size, *(m.get(DICOM_PREFIX + k) for k in ("study", "series", "sop", "modality", "study-date",
                                                            "patient")))
