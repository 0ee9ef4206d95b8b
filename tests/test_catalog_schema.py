"""The catalog's schema version (PRAGMA user_version) and its guard in both directions (issue 15, item 3)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from agent.store.catalog import SCHEMA_VERSION, Catalog, CatalogSchemaError
from agent.store.catalog import schema as catalog_mod


def _user_version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_a_new_catalog_carries_this_releases_schema_version(tmp_path):
    Catalog(tmp_path / "c.sqlite").close()
    assert _user_version(tmp_path / "c.sqlite") == SCHEMA_VERSION


def test_a_catalog_from_before_versioning_is_stamped_and_keeps_its_rows(tmp_path):
    path = tmp_path / "c.sqlite"
    c = Catalog(path)
    c.commit_write("CT/a.dcm", "blob-a", 10, "ab" * 32, time.time(), claim=False)
    c.db.execute("PRAGMA user_version=0")   # as the releases before the version was written left it
    c.close()
    c = Catalog(path)
    try:
        assert c.get("CT/a.dcm").state == "dirty"
    finally:
        c.close()
    assert _user_version(path) == SCHEMA_VERSION


def test_a_catalog_from_a_newer_release_is_refused_and_left_as_it_is(tmp_path):
    """A rollback to an older release across a schema change: the old release must not run on (and write
    into) a catalog it does not understand."""
    path = tmp_path / "c.sqlite"
    c = Catalog(path)
    c.commit_write("CT/a.dcm", "blob-a", 10, "ab" * 32, time.time(), claim=False)
    c.db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(CatalogSchemaError, match=rf"schema version {SCHEMA_VERSION + 1} was written by a newer"):
        Catalog(path)
    assert _user_version(path) == SCHEMA_VERSION + 1


def test_a_catalog_older_than_any_migration_is_refused(tmp_path, monkeypatch):
    """The other direction: a release whose schema moved on opens a catalog of an older version it has no
    migration for (simulated by raising this release's version: there is only one schema so far)."""
    path = tmp_path / "c.sqlite"
    Catalog(path).close()
    monkeypatch.setattr(catalog_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(CatalogSchemaError, match=rf"version {SCHEMA_VERSION} is older"):
        Catalog(path)
    assert _user_version(path) == SCHEMA_VERSION


def test_a_catalog_whose_tombstones_have_no_etag_gets_the_column_and_keeps_its_rows(tmp_path):
    """tombstones.etag (the object a deleted file left, which a file sent again under its name replaces) came after
    version 1: a catalog without it gets it when opened; its tombstones stay, with no ETag known."""
    path = tmp_path / "c.sqlite"
    c = Catalog(path)
    c.db.execute("DROP TABLE tombstones")
    c.db.execute("CREATE TABLE tombstones (key TEXT PRIMARY KEY, queued REAL NOT NULL, attempts INTEGER NOT NULL "
                 "DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0)")  # as version 1 had it
    c.db.execute("INSERT INTO tombstones (key, queued) VALUES ('CT/old.dcm', 1.0)")
    c.close()
    c = Catalog(path)
    try:
        assert c.due_tombstones(time.time(), 10) == ["CT/old.dcm"]
        gen, _ = c.commit_write("CT/old.dcm", "blob", 10, "ab" * 32, time.time(), claim=False)
        assert c.get("CT/old.dcm").etag is None and c.due_tombstones(time.time(), 10) == []
        c.claim("CT/old.dcm", gen)
        c.mark_clean("CT/old.dcm", gen, "e1", None, "ab" * 32)
        c.delete("CT/old.dcm")
        c.commit_write("CT/old.dcm", "blob-2", 11, "cd" * 32, time.time(), claim=False)
        assert c.get("CT/old.dcm").etag == "e1", "sent again before the DELETE ran: it replaces the object it left"
    finally:
        c.close()
