"""The standby's catalog following the bucket, and a lost conditional PUT (agent/ha.py; real SQLite)."""

from __future__ import annotations

import time

import pytest

from agent.store.catalog import Catalog
from bench.catalog_scale import import_inventory


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


def follow(cat: Catalog, objects: list[tuple[str, int, float, str | None]]) -> tuple[int, int, list[str], int]:
    cat.follow_begin()
    added, changed, stale = cat.follow_batch(objects)
    return added, changed, stale, cat.follow_end()


def test_follow_adds_changes_and_forgets(cat):
    t = time.time()
    assert follow(cat, [("CT/d/1.dcm", 10, t, '"e1"'), ("CT/d/2.dcm", 20, t, '"e2"')])[:2] == (2, 0)
    e = cat.get("CT/d/1.dcm")
    assert (e.state, e.blob is not None, e.size, e.etag) == ("clean", False, 10, '"e1"') and cat.get("CT/d").is_dir
    assert cat.set_cached("CT/d/1.dcm", e.gen, "blob1", "ab" * 32)
    # 1.dcm was stored again by the active box (newer object): the cached copy goes; 2.dcm was deleted.
    added, changed, stale, gone = follow(cat, [("CT/d/1.dcm", 11, t + 5, '"e3"')])
    assert (added, changed, stale, gone) == (0, 1, ["blob1"], 1)
    e = cat.get("CT/d/1.dcm")
    assert (e.size, e.etag, e.blob is not None, e.sha256) == (11, '"e3"', False, None)
    assert cat.get("CT/d/2.dcm") is None
    assert cat.totals().files == 1
    # A row without an ETag (from an S3 inventory) learns it: its next overwrite can be conditional.
    import_inventory(cat, [("CT/i/1.dcm", 4, t)])
    follow(cat, [("CT/d/1.dcm", 11, t + 5, '"e3"'), ("CT/i/1.dcm", 4, t, '"e4"')])
    assert cat.get("CT/i/1.dcm").etag == '"e4"'


def test_follow_keeps_this_boxs_queue_and_newer_uploads(cat):
    t = time.time()
    gen, _ = cat.commit_write("MR/q.dcm", "blobq", 5, "cd" * 32, t, claim=False)
    # A dirty row is this box's own queue: neither replaced nor forgotten by a listing.
    assert follow(cat, [("MR/q.dcm", 99, t + 10, '"other"')]) == (0, 0, [], 0)
    assert cat.get("MR/q.dcm").state == "dirty"
    assert follow(cat, [])[3] == 0 and cat.get("MR/q.dcm") is not None
    # Once uploaded, a listing page taken before that upload (the older object) does not undo it.
    assert cat.claim("MR/q.dcm", gen) and cat.mark_clean("MR/q.dcm", gen, '"mine"', None, "cd" * 32)
    assert follow(cat, [("MR/q.dcm", 99, t - 60, '"older"')])[:3] == (0, 0, [])
    e = cat.get("MR/q.dcm")
    assert (e.etag, e.blob is not None, e.size) == ('"mine"', True, 5)


def test_lost_conditional_put_adopts_the_remote_object(cat):
    t = time.time()
    gen, _ = cat.commit_write("MR/c.dcm", "blobc", 5, "ef" * 32, t, claim=True)
    assert cat.adopt_remote("MR/c.dcm", gen + 1, 7, '"x"') is None  # a stale generation changes nothing
    assert cat.adopt_remote("MR/c.dcm", gen, 7, '"theirs"') == "blobc"
    e = cat.get("MR/c.dcm")
    assert (e.state, e.size, e.etag, e.blob is not None, e.sha256) == ("clean", 7, '"theirs"', False, None)
    assert cat.totals().queue_files == 0
    gen2, _ = cat.commit_write("MR/gone.dcm", "blobg", 5, "ef" * 32, t, claim=True)
    assert cat.adopt_remote("MR/gone.dcm", gen2, None, None) == "blobg"  # deleted on the other box
    assert cat.get("MR/gone.dcm") is None


def test_hot_paths_and_unlist_all(cat):
    t = time.time()
    follow(cat, [(f"CT/h/{i}.dcm", 1, t, None) for i in range(3)])
    for i in (2, 0):
        e = cat.get(f"CT/h/{i}.dcm")
        cat.set_cached(e.path, e.gen, f"b{i}", "00" * 32)
    cat.record_access([("CT/h/2.dcm", t + 1, 1), ("CT/h/0.dcm", t + 2, 1), ("CT/h/1.dcm", t + 3, 1)])
    assert cat.hot_paths(10) == ["CT/h/0.dcm", "CT/h/2.dcm"]  # cached clean files, most recently used first
    assert cat.hot_paths(1) == ["CT/h/0.dcm"]
    cat.merge_listing("CT", [], ["h"], time.time())
    assert cat.get("CT").listed
    cat.unlist_all()
    assert not cat.get("CT").listed and not cat.get("").listed
