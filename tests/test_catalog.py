"""The catalog alone (real SQLite): states, renames and tombstones, totals, crash recovery, flat memory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from test_group_commit import commit_write

from agent.records import RemoteObject
from agent.store.catalog import AsyncCatalog, Catalog
from agent.store.errors import (
    AlreadyExists,
    BadPath,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    PermissionDenied,
)
from bench.catalog_scale import import_inventory


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


def write(cat: Catalog, path: str, size: int = 10, claim: bool = False) -> int:
    gen, _ = cat.commit_write(path, f"blob-{path}-{time.monotonic_ns()}", size, "ab" * 32, time.time(), claim=claim)
    return gen


def test_write_creates_parents_and_queues(cat):
    write(cat, "CT/2026-11-23/s/1.dcm", 100)
    assert cat.get("CT").is_dir and cat.get("CT/2026-11-23/s").is_dir
    e = cat.get("CT/2026-11-23/s/1.dcm")
    assert (e.state, e.size, e.blob is not None) == ("dirty", 100, True)
    t = cat.totals()
    assert (t.files, t.queue_files, t.queue_bytes, t.cached_bytes) == (1, 1, 100, 100)
    assert [r.path for r in cat.due_uploads(time.time(), 10)] == ["CT/2026-11-23/s/1.dcm"]


def test_upload_lifecycle_and_stale_generation(cat):
    gen = write(cat, "a.dcm")
    assert cat.claim("a.dcm", gen)
    assert not cat.claim("a.dcm", gen)  # already claimed
    gen2 = write(cat, "a.dcm", 20)  # overwritten while the first upload runs
    assert not cat.mark_clean("a.dcm", gen, "etag", None, "ab" * 32)  # stale: must not mark new content clean
    assert cat.get("a.dcm").state == "dirty"
    assert cat.claim("a.dcm", gen2) and cat.mark_clean("a.dcm", gen2, "etag", "v1", "cd" * 32)
    e = cat.get("a.dcm")
    assert (e.state, e.etag, e.version_id) == ("clean", "etag", "v1")
    assert cat.totals().queue_files == 0


def test_a_late_transfer_never_matches_a_later_row_of_its_path(cat):
    """Found by the model-based protocol test: rename B/b → B/c, then A/b → B/c while the first rename's
    copy runs; that copy's late mark_clean matched the second row (both had gen 2): S3 kept the 1-byte
    object, the row said clean with the wrong checksum. The same for delete + write again."""
    write(cat, "B/b", 1)
    write(cat, "A/b", 10)
    cat.rename("B/b", "B/c")
    first = cat.get("B/c").gen
    cat.rename("A/b", "B/c")
    assert not cat.mark_clean("B/c", first, "etag", None, "ab" * 32)
    assert (cat.get("B/c").state, cat.get("B/c").size) == ("dirty", 10)
    gen = write(cat, "x.dcm")
    cat.delete("x.dcm")
    assert write(cat, "x.dcm") != gen and not cat.mark_clean("x.dcm", gen, "etag", None, "ab" * 32)


def test_failure_backoff_and_crash_reset(cat):
    gen = write(cat, "a.dcm")
    cat.claim("a.dcm", gen)
    cat.mark_failed("a.dcm", gen, "boom", time.time() + 60)
    assert cat.due_uploads(time.time(), 10) == []
    e = cat.get("a.dcm")
    assert (e.state, e.attempts, e.last_error) == ("dirty", 1, "boom")
    gen = write(cat, "b.dcm")
    cat.claim("b.dcm", gen)
    assert cat.reset_uploading() == 1
    assert cat.get("b.dcm").state == "dirty"


def test_rename_clean_file_copies_then_tombstones(cat):
    gen = write(cat, "x.part")
    cat.claim("x.part", gen)
    cat.mark_clean("x.part", gen, "e", None, "ab" * 32)
    cat.rename("x.part", "dir/x.dcm")
    assert cat.get("x.part") is None
    e = cat.get("dir/x.dcm")
    assert (e.state, e.copy_from) == ("dirty", "x.part")
    # The old key is protected while the copy still needs it.
    assert cat.due_tombstones(time.time(), 10) == []
    cat.claim("dir/x.dcm", e.gen)
    cat.mark_clean("dir/x.dcm", e.gen, "e2", None, "ab" * 32)
    assert cat.due_tombstones(time.time(), 10) == ["x.part"]


def test_rename_dirty_file_uploads_fresh(cat):
    write(cat, "x.part")
    cat.rename("x.part", "x.dcm")
    e = cat.get("x.dcm")
    assert (e.state, e.copy_from) == ("dirty", None)
    assert cat.due_tombstones(time.time(), 10) == ["x.part"]


def test_rename_over_existing_and_directories(cat):
    write(cat, "a")
    write(cat, "b")
    replaced = cat.rename("a", "b")
    assert len(replaced) == 1 and cat.get("a") is None and cat.totals().files == 1
    write(cat, "d/1")
    write(cat, "d/e/2")
    cat.rename("d", "f")
    assert cat.get("f/1") and cat.get("f/e/2") and cat.get("d") is None and cat.get("d/e/2") is None
    with pytest.raises(BadPath, match="into itself"):  # EINVAL, as rename(2) (round 42)
        cat.rename("f", "f/e/inside")
    cat.mkdir("g")
    with pytest.raises(AlreadyExists):
        cat.rename("f", "g")


def test_rename_does_not_replace_a_target_stored_since_the_check(cat):
    """The gateway judged a renamer's right to replace on the target it saw (`base`: its gen, -1 for none); a
    version another session stored in between is not replaced (a user without `delete`, or WORM)."""
    write(cat, "a")
    stored = write(cat, "b")  # committed after the renamer saw no "b"
    with pytest.raises(PermissionDenied):
        cat.rename("a", "b", base=-1)
    assert cat.get("b").gen == stored and cat.get("a") is not None
    assert cat.rename("a", "b", base=stored) and cat.get("a") is None


def test_write_again_cancels_tombstone(cat):
    write(cat, "a")
    cat.delete("a")
    assert cat.tombstone_pending("a")
    write(cat, "a")
    assert not cat.tombstone_pending("a")


def test_directory_rules(cat):
    cat.mkdir("d")
    with pytest.raises(AlreadyExists):
        cat.mkdir("d")
    write(cat, "d/f")
    with pytest.raises(NotEmpty):
        cat.rmdir("d")
    with pytest.raises(IsADirectory):
        cat.commit_write("d", "b", 1, "00", 0, claim=False)
    with pytest.raises(NotADirectory):
        write(cat, "d/f/g")
    with pytest.raises(IsADirectory):
        cat.delete("d")
    with pytest.raises(NotFound):
        cat.rmdir("nope")


def test_merge_listing_keeps_local_state(cat):
    write(cat, "CT/local.dcm")
    cat.merge_listing("CT", [RemoteObject("local.dcm", 999, 0.0, "x"), RemoteObject("remote.dcm", 5, 1.0, "y")],
                      ["2025"], time.time())
    assert cat.get("CT/local.dcm").state == "dirty" and cat.get("CT/local.dcm").size == 10
    r = cat.get("CT/remote.dcm")
    assert (r.state, r.blob is not None, r.size) == ("clean", False, 5)
    assert cat.get("CT/2025").is_dir and cat.get("CT").listed


def test_a_listing_asked_for_before_a_delete_landed_does_not_bring_the_file_back(cat):
    """The listing was answered while the DELETEs were on the wire and merged after they landed (their tombstones
    gone): a 'directory not empty' on the rmdir that follows in test_hardening under load. Neither the files nor a
    directory that only held them come back, the directory is listed again at its next use, and a later listing
    takes what the bucket then has."""
    for path in ("CT/a.dcm", "CT/old/b.dcm"):
        write(cat, path)
        cat.delete(path)
    cat.rmdir("CT/old")
    asked = time.time()
    for path in ("CT/a.dcm", "CT/old/b.dcm"):
        cat.tombstone_done(path)
    cat.merge_listing("CT", [RemoteObject("a.dcm", 10, asked, "x"), RemoteObject("c.dcm", 5, asked, "y")], ["old"],
                      asked)
    assert [e.name for e in cat.children("CT")] == ["c.dcm"] and not cat.get("CT").listed
    cat.merge_listing("CT", [RemoteObject("a.dcm", 10, asked, "z")], [], time.time() + 1)  # written again elsewhere
    assert cat.get("CT/a.dcm").etag == "z" and cat.get("CT").listed


def test_a_write_with_no_outcome_heard_is_a_doubt_until_checked_long_enough(cat):
    """A file deleted while its upload is on the wire: the store may still carry that PUT out after the tombstone
    ran. Its key is a doubt (durable), which a listing does not adopt as a file, and each check queues the key's
    tombstone again while no file has it, never once a file is stored there; a clean file's cached copy stays
    while its key is in doubt (it uploads the file again over a late write)."""
    write(cat, "CT/a.dcm", claim=True)
    cat.delete("CT/a.dcm")
    cat.tombstone_done("CT/a.dcm")
    now = time.time()
    assert [k for k, _, _ in cat.due_doubts(now + 1, 10)] == ["CT/a.dcm"]
    cat.merge_listing("CT", [RemoteObject("a.dcm", 10, now, "late")], [], now)
    assert cat.get("CT/a.dcm") is None, "the late object was taken for a file"
    assert cat.recheck("CT/a.dcm", None, now + 2, now - 3600) is None and cat.due_tombstones(now + 1, 10) == []
    assert cat.recheck("CT/a.dcm", '"late"', now + 5, now - 3600) is None  # the late object found: deleted again
    assert cat.due_tombstones(now + 1, 10) == ["CT/a.dcm"]
    assert cat.due_doubts(now + 1, 10) == [] and cat.due_doubts(now + 6, 10) == [("CT/a.dcm", 2, "ab" * 32)]
    gen, _ = cat.commit_write("CT/a.dcm", "blob-new", 10, "cd" * 32, now, claim=True)
    assert cat.get("CT/a.dcm").etag == '"late"', "an HA box's conditional PUT must name the late object it replaces"
    cat.mark_clean("CT/a.dcm", gen, "e", None, "cd" * 32)
    assert cat.recheck("CT/a.dcm", '"e"', now + 10, now - 3600).gen == gen and cat.due_tombstones(now + 1, 10) == []
    assert cat.uncache("CT/a.dcm", gen) is None, "evicted while a late write of other content may still land over it"
    cat.recheck("CT/a.dcm", '"e"', now + 20, now + 1)  # its write is older than the horizon: forgotten
    assert cat.due_doubts(now + 100, 10) == [] and cat.uncache("CT/a.dcm", gen) == "blob-new"


def test_a_doubt_of_the_files_own_content_does_not_keep_its_cached_copy(cat):
    """A retried upload of the same content landing late is harmless: the copy may go (a slow store makes many
    such doubts, and an hour of copies that cannot be evicted could fill the disk). Writes in doubt of two contents
    are one doubt of unknown content."""
    gen = write(cat, "CT/a.dcm", claim=True)
    cat.mark_failed("CT/a.dcm", gen, "ReadTimeoutError", 0.0, unsure=True)
    cat.claim("CT/a.dcm", gen)
    cat.mark_clean("CT/a.dcm", gen, "e", None, "ab" * 32)
    assert cat.uncache("CT/a.dcm", gen) is not None
    gen, _ = cat.commit_write("CT/a.dcm", "blob-2", 10, "cd" * 32, time.time(), claim=True)
    cat.mark_failed("CT/a.dcm", gen, "ReadTimeoutError", 0.0, unsure=True)
    cat.claim("CT/a.dcm", gen)
    cat.mark_clean("CT/a.dcm", gen, "e2", None, "cd" * 32)
    assert cat.uncache("CT/a.dcm", gen) is None, "the first write, of other content, may still land"


def test_a_delete_sent_twice_is_a_doubt_and_a_requeue_names_what_the_key_holds(cat):
    """A DELETE the S3 client had to send twice (tombstone_done unsure) may still land by its first attempt: a doubt.
    A file requeued by a re-check carries the ETag the key held then (None: nothing), which an HA box's conditional
    PUT may replace, not the ETag of its own upload (that was taken for the other box's write)."""
    cat.tombstone_done("CT/gone.dcm", unsure=True)
    assert [k for k, _, _ in cat.due_doubts(time.time() + 1, 10)] == ["CT/gone.dcm"]
    gen = write(cat, "CT/a.dcm", claim=True)
    cat.mark_clean("CT/a.dcm", gen, "mine", None, "ab" * 32)
    assert cat.requeue("CT/a.dcm", gen, None)
    e = cat.get("CT/a.dcm")
    assert (e.state, e.etag) == ("dirty", None)
    assert not cat.requeue("CT/a.dcm", gen, "late"), "only a clean row is requeued"


def test_totals_match_a_full_count(cat):
    for i in range(50):
        gen = write(cat, f"d{i % 5}/f{i}", size=i)
        if i % 3 == 0:
            cat.claim(f"d{i % 5}/f{i}", gen)
            cat.mark_clean(f"d{i % 5}/f{i}", gen, None, None, "00")
    for i in range(0, 50, 7):
        cat.delete(f"d{i % 5}/f{i}")
    cat.rename("d1", "e1")
    files = list(cat.walk_files(batch=7))
    t = cat.totals()
    assert t.files == len(files)
    assert t.queue_files == sum(f.state != "clean" for f in files)
    assert t.queue_bytes == sum(f.size for f in files if f.state != "clean")
    assert t.cached_bytes == sum(f.size for f in files if f.blob is not None)


def test_a_study_key_is_its_directory_or_the_files_the_study_index_holds_under_it(cat):
    """What prior prefetch fetches of a study (agent/prefetcher.py `PriorFetcher.key`): below its directory, or, keyed
    by its StudyInstanceUID, the files the study index holds under it: two studies in one day directory are two."""
    uids = {"2025/01/10/a1.dcm": "1.2.1", "2025/01/10/b1.dcm": "1.2.2", "2025/01/10/a2.dcm": "1.2.1"}
    for path, uid in uids.items():
        gen = write(cat, path)
        cat.claim(path, gen)
        cat.mark_clean(path, gen, None, None, "00", (path, 10, uid, "1.3", "1.4." + path[-6:-4], "CT", "2025", None))
        assert cat.uncache(path, gen)
    assert cat.missing_under("1.2.1") == (2, 20) and cat.missing_under("2025/01/10") == (3, 30)
    assert [e.path for e in cat.missing_page("1.2.1", "", 1)] == ["2025/01/10/a1.dcm"]
    assert [e.path for e in cat.missing_page("1.2.1", "2025/01/10/a1.dcm", 16)] == ["2025/01/10/a2.dcm"]
    assert [e.path for e in cat.missing_page("2025/01/10", "", 16)] == sorted(uids)
    cat.record_prior_fetch("1.2.1", 0)
    cat.record_prior_fetch("1.2.2", 1)
    cat.record_access([("2025/01/10/b1.dcm", time.time() + 1, 1)])     # read after its fetch: opened
    assert sorted(cat.settle_prior_fetches()) == [(0, False), (1, True)]


def test_hot_queries_never_scan_the_whole_catalog(cat):
    """Every query the agent runs per request or per loop uses an index: cost must not grow with the archive."""
    for i in range(200):
        write(cat, f"d{i % 7}/f{i}")
    gen = write(cat, "x.part")
    cat.claim("x.part", gen)
    cat.mark_clean("x.part", gen, None, None, "00")
    statements: list[str] = []
    cat.db.set_trace_callback(statements.append)
    now = time.time()
    cat.get("d1/f1"), cat.children("d1"), cat.totals(), cat.oldest_dirty()
    with pytest.raises(NotEmpty):
        cat.rmdir("d1")
    cat.due_uploads(now, 16), cat.next_due(), cat.due_tombstones(now, 16), cat.tombstone_pending("x")
    cat.files_after("", 16), cat.cached_after("", 16)
    cat.missing_under("d1"), cat.missing_page("d1", "", 16), cat.count_files_under("d1"), cat.study_known("d1")
    cat.patient_studies("P1", 256), cat.mark_prefetched("d1/f2", 1), cat.uncache("d1/f2", 1), cat.eviction_rows(16)
    cat.missing_page("1.2.3", "", 16), cat.record_prior_fetch("1.2.3", 0), cat.settle_prior_fetches()
    cat.blob_referenced("nope"), cat.reset_uploading(), cat.rename("x.part", "x.dcm"), cat.delete("d1/f1")
    g = write(cat, "d2/new")
    cat.claim("d2/new", g), cat.mark_failed("d2/new", g, "e", now), cat.record_access([("d2/new", now, 1)])
    cat.db.set_trace_callback(None)
    checked = 0
    for sql in set(statements):
        if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
            continue
        plan = [row[3] for row in cat.db.execute("EXPLAIN QUERY PLAN " + sql)]
        full_scans = [d for d in plan if d.startswith("SCAN entries") and "INDEX" not in d]
        assert not full_scans, (sql, plan)
        checked += 1
    assert checked > 15


def test_scrub_pages_cost_what_the_cache_holds(cat):
    """The scrub pages through cached files by the partial blob index, never through every file."""
    import_inventory(cat, ((f"d/{i:05d}", 1, 0.0) for i in range(500)))
    for i in range(3):
        write(cat, f"c/{i}")
    statements: list[str] = []
    cat.db.set_trace_callback(statements.append)
    first = cat.cached_after("", 2)
    cat.db.set_trace_callback(None)
    plan = [row[3] for row in cat.db.execute("EXPLAIN QUERY PLAN " + statements[0])]
    assert any("entries_blob" in d for d in plan), plan
    assert [e.path for e in first + cat.cached_after(first[-1].blob, 2)] == sorted(
        [f"c/{i}" for i in range(3)], key=lambda p: cat.get(p).blob)


def test_commit_survives_kill9(tmp_path):
    """A committed row is on disk the moment commit returns: a process killed right after keeps it."""
    script = (
        "import os, signal, time, sys\n"
        "from agent.store.catalog import Catalog\n"
        f"c = Catalog(__import__('pathlib').Path({str(tmp_path / 'c.sqlite')!r}))\n"
        "for i in range(200):\n"
        "    c.commit_write(f'f{i}', 'b', 1, '00', time.time(), claim=False)\n"
        "print('committed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == -9 and "committed" in out.stdout
    c = Catalog(tmp_path / "c.sqlite")
    assert c.totals().files == 200 and c.get("f199") is not None


def _rss_after(n: int, tmp_path) -> int:
    script = (
        "import time, psutil\n"
        "from agent.store.catalog import Catalog\n"
        f"c = Catalog(__import__('pathlib').Path({str(tmp_path / f'm{n}.sqlite')!r}))\n"
        "c.db.execute('BEGIN')\n"
        f"c.db.executemany(\"INSERT INTO entries (path, parent, name, is_dir, size, mtime, state, gen) "
        f"VALUES (?, 'd', ?, 0, 1, 0, 'clean', 1)\", ((f'd/{{i:09d}}', f'{{i:09d}}') for i in range({n})))\n"
        "c.db.execute('COMMIT')\n"
        "for _ in c.walk_files(batch=5000): pass\n"
        "print(psutil.Process().memory_info().rss)\n")
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)


def test_memory_does_not_grow_with_file_count(tmp_path):
    """RAM must not grow with the archive: 20x the files, a full walk, and RSS stays within the page cache bound."""
    small, large = _rss_after(10_000, tmp_path), _rss_after(200_000, tmp_path)
    # The catalog's page cache is capped at 64 MiB; nothing else may scale with the row count.
    assert large - small < 100 * 2**20, (small, large)


def test_import_inventory_adds_clean_files_and_listed_directories(cat):
    write(cat, "CT/d1/s/1.dcm", 5)  # a local file the inventory also names: kept as it is
    added = import_inventory(cat, [("CT/d1/s/1.dcm", 9, 1.0), ("CT/d1/s/2.dcm", 7, 2.0), ("MR/d2/x.dcm", 3, 3.0)],
                             batch=2)
    assert added == 2
    assert cat.get("CT/d1/s/1.dcm").size == 5 and cat.get("CT/d1/s/1.dcm").state == "dirty"
    e = cat.get("CT/d1/s/2.dcm")
    assert (e.size, e.mtime, e.state, e.blob, e.gen) == (7, 2.0, "clean", None, 1)
    assert all(cat.get(d).listed for d in ("", "MR", "MR/d2"))
    assert [c.name for c in cat.children("CT/d1/s")] == ["1.dcm", "2.dcm"]
    assert cat.totals().files == 3 and cat.totals().queue_files == 1


def test_eviction_rows_are_clean_cached_files_least_recently_read_first(cat):
    """The eviction policy's input: only clean cached files, the least recently read `limit` of them."""
    now = time.time()
    for i in range(5):
        gen = write(cat, f"d/{i}")
        if i != 4:  # d/4 stays dirty: never a candidate
            cat.claim(f"d/{i}", gen)
            cat.mark_clean(f"d/{i}", gen, None, None, "00")
    cat.record_access([("d/0", now + 30, 3), ("d/1", now + 10, 1), ("d/2", now + 20, 1), ("d/3", now + 40, 1)])
    rows = cat.eviction_rows(2)
    assert [(r[0], r[4]) for r in rows] == [("d/1", 1), ("d/2", 1)]
    assert [r[0] for r in cat.eviction_rows(10)] == ["d/1", "d/2", "d/0", "d/3"]


def test_eviction_rows_say_how_and_when_each_copy_came(cat):
    """A cached copy's origin (written here, fetched for a read's miss, prefetched) and its start, so the eviction
    policy is told what happened instead of guessing it from reads (a written file read before the evictor's pass
    looked fetched for the read; agent/policy/stack.py `sync`); and its study UID where the study index has the file
    (the eviction group, agent/store/evictor.py)."""
    for i in range(3):
        gen = write(cat, f"d/{i}")
        cat.claim(f"d/{i}", gen)
        cat.mark_clean(f"d/{i}", gen, None, None, "00", (f"d/{i}", 1, "1.2.3", "1.2.3.4", "1.2.3.4.5", "CT",
                                                          "20261122", None) if i == 1 else ())
    for i, by in ((1, "read"), (2, "prefetch")):
        e = cat.get(f"d/{i}")
        assert cat.uncache(e.path, e.gen) and cat.set_cached(e.path, e.gen, f"b{i}", "00", by, 1000.0 + i)
    assert {r[0]: r[6:] for r in cat.eviction_rows(10)} == {
        "d/0": (pytest.approx(time.time(), abs=60), "write", None), "d/1": (1001.0, "read", "1.2.3"),
        "d/2": (1002.0, "prefetch", None)}


async def test_a_full_catalog_is_no_space_through_the_async_catalog(tmp_path):
    """SQLite's SQLITE_FULL (here a real page limit, as on a full disk) reaches the front ends as NoSpace; the
    transaction rolls back and the catalog goes on answering."""
    db = AsyncCatalog(Catalog(tmp_path / "catalog.sqlite"))
    try:
        gen, replaced = await commit_write(db, "CT/a.dcm", "blob-a", 10, "ab" * 32, time.time(), claim=False)
        assert gen >= 1 and replaced is None
        db.catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.catalog.db.execute("PRAGMA page_count").fetchone()[0]
        db.catalog.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(NoSpace):
            for i in range(2000):
                await commit_write(db, f"CT/{i:04}/" + "x" * 200 + ".dcm", f"blob-{i}", 10, "ab" * 32, time.time(),
                                      claim=False)
        assert (await db.get("CT/a.dcm")).gen == gen
        claimed = await db.claim_due(time.time() + 3600, 10)  # a write that needs no new page still commits
        assert ("CT/a.dcm", gen) in [(e.path, e.gen) for e in claimed] and db.row("CT/a.dcm").state == "uploading"
    finally:
        db.shutdown()


async def test_a_read_waits_for_no_write_and_sees_only_committed_rows(tmp_path):
    """get and get_many (every open and stat: a cached read's first step) read through a connection of their own,
    not on the catalog thread: they answer while that thread is inside a transaction (in the agent, a group
    commit's fsync), with the rows as last committed; the change shows once committed."""
    inside, release = threading.Event(), threading.Event()

    class Held(Catalog):
        def group(self, calls: list, durable: bool = True) -> list:  # a group commit that holds its transaction open
            with self._tx(durable=True):
                self.db.execute("UPDATE entries SET size = 99 WHERE path = 'CT/a.dcm'")
                inside.set()
                release.wait(10)
            return super().group(calls, durable)

    db = AsyncCatalog(Catalog(tmp_path / "catalog.sqlite"))
    gen, _ = await commit_write(db, "CT/a.dcm", "blob-a", 10, "ab" * 32, time.time(), claim=False)
    db.shutdown()
    db = AsyncCatalog(Held(tmp_path / "catalog.sqlite"))
    try:
        held = asyncio.ensure_future(commit_write(db, "CT/b.dcm", "blob-b", 10, "ab" * 32, time.time(), claim=False))
        assert await asyncio.to_thread(inside.wait, 10)
        row = await asyncio.wait_for(db.get("CT/a.dcm"), 2)
        assert (row.gen, row.size) == (gen, 10)
        rows = await asyncio.wait_for(db.get_many(["CT", "CT/a.dcm", "CT/b.dcm"]), 2)
        assert rows["CT"].is_dir and rows["CT/a.dcm"].size == 10 and "CT/b.dcm" not in rows
        release.set()
        await held
        assert (await db.get("CT/a.dcm")).size == 99
    finally:
        release.set()
        db.shutdown()


async def test_an_eviction_scan_holds_back_no_commit(tmp_path):
    """eviction_rows (2-3 s for 200 000 rows at a million files, once an eviction pass and once a minute) reads
    through a connection of its own in a thread: on the catalog thread every commit waited behind it. A write
    commits while a scan is still reading."""
    inside, release = threading.Event(), threading.Event()

    class Slow(Catalog):
        def eviction_rows(self, limit: int, db=None) -> list:  # a scan still reading
            rows = super().eviction_rows(limit, db)
            inside.set()
            release.wait(10)
            return rows

    db = AsyncCatalog(Slow(tmp_path / "catalog.sqlite"))
    try:
        scan = asyncio.ensure_future(db.eviction_rows(10))
        assert await asyncio.to_thread(inside.wait, 10)
        gen, _ = await asyncio.wait_for(commit_write(db, "CT/a.dcm", "blob-a", 10, "ab" * 32, time.time(),
                                                     claim=False), 5)
        assert gen >= 1 and not scan.done()
        release.set()
        assert await scan == []
    finally:
        release.set()
        db.shutdown()


def test_a_patients_studies_are_its_newest_by_date(cat):
    """A plan weighs a patient's newest studies only: a writer inventing 10 000 studies for one patient made every new
    study's plan a 0.5 s stall of the event loop (attack round 30)."""
    for i in range(300):   # recorded in an order that is not the dates'
        day = f"2026{1 + i % 12:02d}{1 + i // 12:02d}"
        assert cat.record_study(f"p/{i:03d}", "P1", f"1.2.{i}", day, "CT")
    cat.record_study("q/1", "P2", "1.3", "20260101", "MR")
    studies = cat.patient_studies("P1", 256)
    by_date = sorted(((f"2026{1 + i % 12:02d}{1 + i // 12:02d}", f"p/{i:03d}") for i in range(300)))
    assert [(d, k) for k, _, d, _ in studies] == by_date[-256:]
