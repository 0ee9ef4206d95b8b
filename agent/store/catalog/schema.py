"""The catalog's SQLite schema, and the guard on its version: every table, in one place (which part of the
catalog owns which: docs/architecture.md, "Who owns which table")."""

from __future__ import annotations

import sqlite3
from pathlib import Path

# PRAGMA user_version this release writes: bump it (with a migration) only for a change an older release cannot
# read; the guard refuses newer catalogs and older ones without a migration. 0: before versioning, or a new file.
SCHEMA_VERSION = 1


# (table, column, type) added after version 1, nullable, unseen by older releases: added on open, no bump
ADDED_COLUMNS = (("tombstones", "etag", "TEXT"), ("entries", "cached_at", "REAL"), ("entries", "cached_by", "TEXT"),
                 ("entries", "writer", "TEXT"))


class CatalogSchemaError(RuntimeError):
    """The catalog's schema version is not one this release reads."""


def check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    if (found := db.execute("PRAGMA user_version").fetchone()[0]) > SCHEMA_VERSION:
        raise CatalogSchemaError(
            f"{path}: catalog schema version {found} was written by a newer release; this release "
            f"reads version {SCHEMA_VERSION}. Start the newer release again, or restore the catalog "
            "backup taken before that release was installed.")
    if 0 < found < SCHEMA_VERSION:
        raise CatalogSchemaError(
            f"{path}: catalog schema version {found} is older than this release's {SCHEMA_VERSION} and "
            "this release has no migration from it.")


SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    path         TEXT PRIMARY KEY,
    parent       TEXT NOT NULL,
    name         TEXT NOT NULL,
    is_dir       INTEGER NOT NULL,
    size         INTEGER NOT NULL DEFAULT 0,
    mtime        REAL NOT NULL,
    sha256       TEXT,
    state        TEXT,
    blob         TEXT,
    gen          INTEGER NOT NULL DEFAULT 0,
    etag         TEXT,
    version_id   TEXT,
    copy_from    TEXT,
    listed       INTEGER NOT NULL DEFAULT 0,
    dirty_since  REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error   TEXT,
    last_access  REAL,
    access_count INTEGER NOT NULL DEFAULT 0,
    -- the cached copy's origin and when it began (the write, or the start of its fetch): what the eviction policy
    -- is told happened ('write' | 'read' on a miss | 'prefetch'; heat.py); ADDED_COLUMNS
    cached_at    REAL,
    cached_by    TEXT,
    writer       TEXT  -- the user whose store (or rename) made this version; NULL: the agent's, or before the column
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent, name);
-- Partial indexes are used only when the query repeats their WHERE term verbatim: keep them in step.
DROP INDEX IF EXISTS entries_queue;
CREATE INDEX IF NOT EXISTS entries_dirty ON entries(next_attempt, dirty_since) WHERE state = 'dirty';
CREATE INDEX IF NOT EXISTS entries_uploading ON entries(path) WHERE state = 'uploading';
CREATE INDEX IF NOT EXISTS entries_dirty_since ON entries(dirty_since) WHERE state IN ('dirty', 'uploading');
CREATE INDEX IF NOT EXISTS entries_blob ON entries(blob) WHERE blob IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_copy_from ON entries(copy_from) WHERE copy_from IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_evictable ON entries(last_access) WHERE state = 'clean' AND blob IS NOT NULL;

-- Keys whose DELETE landed in the last hour: a listing asked for before that may still name them (remote.py)
CREATE TABLE IF NOT EXISTS deleted (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deleted_at ON deleted(at);

CREATE TABLE IF NOT EXISTS tombstones (
    key          TEXT PRIMARY KEY,
    queued       REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    etag         TEXT  -- the object this box knew under key (a deleted or renamed-away file's): ADDED_COLUMNS
);

-- Keys a write went to whose outcome is unknown (no answer in time, or the agent killed while it was on the wire):
-- the store may still carry it out, after the key's tombstone or a newer write. Checked again (uploads.py) until
-- long after the last such write.
CREATE TABLE IF NOT EXISTS doubts (
    key        TEXT PRIMARY KEY,
    since      REAL NOT NULL,
    next_check REAL NOT NULL,
    checks     INTEGER NOT NULL DEFAULT 0,
    sha256     TEXT  -- the content the write in doubt carries; NULL: a DELETE, a parked copy, or writes of several
) WITHOUT ROWID;

-- Reads per directory (the first [prefetch] dir_depth levels, e.g. CT/2026-11-23) per local day: the history
-- the heat model learns from. Bounded by directories x days, not by files.
CREATE TABLE IF NOT EXISTS heat (
    dir    TEXT NOT NULL,
    day    TEXT NOT NULL,
    reads  INTEGER NOT NULL,
    misses INTEGER NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (dir, day)
) WITHOUT ROWID;

-- Files fetched ahead of any read by a prefetch, until they are read (a prefetch hit) or evicted.
CREATE TABLE IF NOT EXISTS prefetched (
    path   TEXT PRIMARY KEY,
    bytes  INTEGER NOT NULL,
    at     REAL NOT NULL
) WITHOUT ROWID;

-- One row per study seen being written, from the DICOM header of its first file: what prior-study prefetch finds a
-- patient's earlier studies by. `dir` is the study's key (agent/prefetcher.py `PriorFetcher.key`): its
-- StudyInstanceUID where the study index is kept ([dicom] metadata; a day directory holds many studies), else its
-- directory ([prefetch] study_depth levels; patient NULL where its first file was not DICOM: not looked at again).
CREATE TABLE IF NOT EXISTS studies (
    dir        TEXT PRIMARY KEY,
    patient    TEXT,
    study_uid  TEXT,
    study_date TEXT,
    modality   TEXT,
    recorded   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient, study_date) WHERE patient IS NOT NULL;
-- The first file of a study a serving worker stored ([server] workers > 1, agent/worker.py): the header values prior
-- planning uses and the writing user, until the owner's PriorFetcher takes it in as if stored there (its cap is the
-- user's). A table of its own: the owner alone writes `studies`, and a disputed study (its row names another patient)
-- is still planned for the patient this file names.
CREATE TABLE IF NOT EXISTS worker_studies (
    id         INTEGER PRIMARY KEY,
    path       TEXT NOT NULL,
    study_uid  TEXT,
    study_date TEXT,
    modality   TEXT,
    patient    TEXT,
    user       TEXT NOT NULL
);

-- Prior studies fetched by prior-study prefetch, with the planner's cell (`rank` holds rank + k x kind, kind =
-- other modality / older than recent_days, agent/policy/priors.py), until it is known whether they were opened
-- (a file read after the fetch) or not (evicted unread): what PriorPrefetcher learns its heat per cell from. `dir`:
-- the study's key, as in `studies`.
CREATE TABLE IF NOT EXISTS prior_fetches (
    dir     TEXT PRIMARY KEY,
    rank    INTEGER NOT NULL,
    fetched REAL NOT NULL,
    used    INTEGER
) WITHOUT ROWID;

-- The study index: one row per DICOM object, from the header metadata its S3 object carries (agent/dicom),
-- written when the upload is confirmed and rebuildable from the bucket alone (`pacsgw index-rebuild`).
-- patient is the keyed pseudonym, never the PatientID. What `pacsgw find` answers from.
CREATE TABLE IF NOT EXISTS dicom_objects (
    path       TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    study_uid  TEXT,
    series_uid TEXT,
    sop_uid    TEXT,
    modality   TEXT,
    study_date TEXT,
    patient    TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dicom_objects_study ON dicom_objects(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS dicom_objects_patient ON dicom_objects(patient) WHERE patient IS NOT NULL;
CREATE INDEX IF NOT EXISTS dicom_objects_modality ON dicom_objects(modality, study_date);
-- Study-index rows not yet shipped to the bucket in an index delta (agent/dicom/deltas.py): (path, etag) of
-- the object each describes. Filled by mark_clean only while the agent ships deltas (Catalog.ship_index).
CREATE TABLE IF NOT EXISTS dicom_unshipped (
    path TEXT PRIMARY KEY,
    etag TEXT NOT NULL
) WITHOUT ROWID;

-- Small facts that must survive a restart (e.g. the start of the last prefetch window that had its run).
CREATE TABLE IF NOT EXISTS agent_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS totals (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    files        INTEGER NOT NULL,
    cached_files INTEGER NOT NULL,
    cached_bytes INTEGER NOT NULL,
    queue_files  INTEGER NOT NULL,
    queue_bytes  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0, 0);

CREATE TRIGGER IF NOT EXISTS totals_ins AFTER INSERT ON entries WHEN NEW.is_dir = 0 BEGIN
    UPDATE totals SET
        files = files + 1,
        cached_files = cached_files + (NEW.blob IS NOT NULL),
        cached_bytes = cached_bytes + (CASE WHEN NEW.blob IS NOT NULL THEN NEW.size ELSE 0 END),
        queue_files = queue_files + (NEW.state != 'clean'),
        queue_bytes = queue_bytes + (CASE WHEN NEW.state != 'clean' THEN NEW.size ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_del AFTER DELETE ON entries WHEN OLD.is_dir = 0 BEGIN
    UPDATE totals SET
        files = files - 1,
        cached_files = cached_files - (OLD.blob IS NOT NULL),
        cached_bytes = cached_bytes - (CASE WHEN OLD.blob IS NOT NULL THEN OLD.size ELSE 0 END),
        queue_files = queue_files - (OLD.state != 'clean'),
        queue_bytes = queue_bytes - (CASE WHEN OLD.state != 'clean' THEN OLD.size ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS totals_upd AFTER UPDATE OF blob, size, state ON entries WHEN NEW.is_dir = 0 BEGIN
    UPDATE totals SET
        cached_files = cached_files + (NEW.blob IS NOT NULL) - (OLD.blob IS NOT NULL),
        cached_bytes = cached_bytes + (CASE WHEN NEW.blob IS NOT NULL THEN NEW.size ELSE 0 END)
                                    - (CASE WHEN OLD.blob IS NOT NULL THEN OLD.size ELSE 0 END),
        queue_files = queue_files + (NEW.state != 'clean') - (OLD.state != 'clean'),
        queue_bytes = queue_bytes + (CASE WHEN NEW.state != 'clean' THEN NEW.size ELSE 0 END)
                                  - (CASE WHEN OLD.state != 'clean' THEN OLD.size ELSE 0 END)
    WHERE id = 1;
END;

-- Bytes of each user's files not yet in object storage and on the disk (they cannot be evicted): what
-- cache.max_dirty_per_user bounds. Kept by triggers, as totals; files stored before the writer column count for none.
CREATE TABLE IF NOT EXISTS dirty_bytes (user TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS dirty_ins AFTER INSERT ON entries
WHEN NEW.writer IS NOT NULL AND NEW.state != 'clean' AND NEW.blob IS NOT NULL BEGIN
    INSERT INTO dirty_bytes VALUES (NEW.writer, NEW.size)
    ON CONFLICT(user) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS dirty_del AFTER DELETE ON entries
WHEN OLD.writer IS NOT NULL AND OLD.state != 'clean' AND OLD.blob IS NOT NULL BEGIN
    UPDATE dirty_bytes SET bytes = bytes - OLD.size WHERE user = OLD.writer;
END;
CREATE TRIGGER IF NOT EXISTS dirty_upd AFTER UPDATE OF blob, size, state, writer ON entries
WHEN OLD.writer IS NOT NULL OR NEW.writer IS NOT NULL BEGIN
    UPDATE dirty_bytes SET bytes = bytes - OLD.size
    WHERE user = OLD.writer AND OLD.state != 'clean' AND OLD.blob IS NOT NULL;
    INSERT INTO dirty_bytes SELECT NEW.writer, NEW.size
    WHERE NEW.writer IS NOT NULL AND NEW.state != 'clean' AND NEW.blob IS NOT NULL
    ON CONFLICT(user) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
"""
