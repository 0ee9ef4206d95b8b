"""The line is called down only on sustained failure (agent/uplink/line.py): one S3 5xx is retried, not an
outage, so it neither degrades the box to write-back nor makes an HA box give up its address.

The agent talks to the real SeaweedFS through tests/s3fault.py, a proxy that forwards everything and answers
chosen requests with 500 InternalError: a single 5xx from a healthy server is a fault SeaweedFS cannot be made
to produce on demand, so this fault (and only it) is injected by the proxy.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from test_fault_coldread import evict_cli

from faultkit import ftp_get, ftp_login, ftp_put, metric, payload, wait_for
from harness import s3_objects, sha256


def store_evicted(a, ftp, files: dict[str, bytes]) -> None:
    """Store the files over FTP, wait until they are in S3, and drop their cached copies (`pacsgw evict`)."""
    for path, data in files.items():
        assert ftp_put(ftp, path, data).startswith("226")
    a.wait_drained(60)
    done = evict_cli(a, *files)
    assert done.returncode == 0 and done.stdout.count("evicted") == len(files), done.stdout + done.stderr


class Sampler(threading.Thread):
    """/healthz every 0.1 s: did the box ever look degraded?"""

    def __init__(self, agent) -> None:
        super().__init__(daemon=True)
        self.agent, self.samples, self.done = agent, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            h = self.agent.health()
            self.samples.append((h["status"], h["uplink"]["reachable"]))
            time.sleep(0.1)

    def stop(self) -> list[tuple[str, bool]]:
        self.done.set()
        self.join(10)
        return self.samples


def test_one_5xx_is_retried_and_sustained_failure_is_an_outage(proxied_agent, seaweed, proxy):
    a = proxied_agent()
    wait_for(lambda: a.health()["status"] == "ok", 30, what="agent ok")
    ftp = ftp_login(a)
    ftp_put(ftp, "CT/warm.dcm", b"warm-up")  # the connection pool is open: the fault hits a live line

    # One upload fails with 500 (botocore already retries a 500 once: the proxy fails both attempts). It is
    # retried from the queue; the line stays up and /healthz stays ok.
    sampler = Sampler(a)
    sampler.start()
    proxy.fail_puts = 2
    data = payload("one-5xx", 40_000)
    assert ftp_put(ftp, "CT/d/one.dcm", data).startswith("226")
    a.wait_drained(60)
    time.sleep(1.0)  # a line wrongly called down would show on /healthz for at least this long
    samples = sampler.stop()
    assert len(proxy.injected) == 2 and all(r.startswith("PUT ") for r in proxy.injected), proxy.injected
    assert a.events("uplink_failure"), "the injected 500 never reached the line"
    assert not a.events("uplink_unreachable"), "one 5xx was taken for an outage"
    assert samples and all(s == ("ok", True) for s in samples), [s for s in samples if s != ("ok", True)][:5]
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/d/one.dcm"]["sha256"] == sha256(data)

    # The server keeps failing: a few failures in a row make the line down (write-back, degraded) ...
    proxy.fail_all = True
    later = payload("sustained", 40_000)
    assert ftp_put(ftp, "CT/d/later.dcm", later).startswith("226")  # acknowledged in write-back
    wait_for(lambda: not a.health()["uplink"]["reachable"], 30, what="line down after sustained failure")
    h = a.health()
    assert h["status"] == "degraded" and h["queue_depth"] == 1
    assert a.events("uplink_unreachable")
    # ... and up again once the server answers; the queued file reaches S3.
    proxy.fail_all = False
    wait_for(lambda: a.health()["uplink"]["reachable"], 30, what="line up again")
    a.wait_drained(60)
    assert s3_objects(seaweed, a.prefix)["CT/d/later.dcm"]["sha256"] == sha256(later)
    ftp.quit()


def test_a_cold_read_waits_out_a_few_5xx_and_hears_451_when_they_go_on(proxied_agent, seaweed, proxy):
    """A GET answered 500 InternalError (a SeaweedFS whose volumes are not back yet a moment after a restart
    does this; the proxy injects it here on demand) is retried a few times within the read: the viewer gets its
    file. A server that keeps failing GETs ends the read with FTP 451 (try later), not a hang or a 550."""
    import ftplib
    import io

    from harness import BUCKET

    a = proxied_agent()
    data = {name: payload(name, 300_000) for name in ("CT/first.dcm", "CT/second.dcm")}
    for path, body in data.items():
        seaweed.client().put_object(Bucket=BUCKET, Key=a.prefix + path, Body=body)
    ftp = ftp_login(a)
    assert sorted(ftp.nlst("CT")) == ["first.dcm", "second.dcm"]  # listed before the fault

    proxy.fail_gets = 2
    out = io.BytesIO()
    assert ftp.retrbinary("RETR CT/first.dcm", out.write).startswith("226")
    assert out.getvalue() == data["CT/first.dcm"]
    assert [r.split("?")[0] for r in proxy.injected] == [f"GET /{BUCKET}/{a.prefix}CT/first.dcm"] * 2
    assert len(a.events("uplink_server_error")) == 2

    proxy.fail_gets = 1000
    with pytest.raises(ftplib.error_temp, match="^451"):
        ftp.retrbinary("RETR CT/second.dcm", io.BytesIO().write)
    proxy.fail_gets = 0
    out = io.BytesIO()
    assert ftp.retrbinary("RETR CT/second.dcm", out.write).startswith("226")
    assert out.getvalue() == data["CT/second.dcm"]
    ftp.quit()


def test_a_new_file_under_a_renamed_files_old_name_before_its_copy_ran(proxied_agent, seaweed, proxy):
    """A clean file renamed A → C is copied server-side from A's key; a new file stored under A before that
    copy ran overwrote A's key, so the copy gave other content: C was retried for ever (ChecksumMismatch: seen in
    the FTP protocol model). The proxy fails the first copy (a fault a healthy SeaweedFS cannot produce on
    demand) so the new A lands first; C must then come from the cache, A keep its new content."""
    a = proxied_agent()
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 30_000)
    assert ftp_put(ftp, "CT/a.dcm", old).startswith("226")
    proxy.fail_copies = 1
    ftp.rename("CT/a.dcm", "CT/c.dcm")
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    ftp.quit()
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/c.dcm"]["sha256"] == sha256(old) and objects["CT/a.dcm"]["sha256"] == sha256(new)
    assert any(r.startswith("PUT ") for r in proxy.injected), "the copy was never tried: the fault did not happen"


def test_an_evicted_files_rename_keeps_its_content_when_a_new_file_takes_the_old_name(proxied_agent, seaweed, proxy):
    """As above, but A is not in the cache (evicted), so C can only come from A's object: the new A must not
    overwrite that object before C's copy has read it (A's old content is parked under .pacsgw-parked and C is
    copied from there). Until its copy runs, a renamed file reads from its old key (B → D, read at once: it was
    answered 451 NoSuchKey). The proxy fails C's copies until the new A is in S3 (a fault SeaweedFS cannot
    produce on demand)."""
    a = proxied_agent()
    ftp = ftp_login(a)
    old, new, other = payload("old", 20_000), payload("new", 30_000), payload("other", 25_000)
    store_evicted(a, ftp, {"CT/a.dcm": old, "CT/b.dcm": other})
    proxy.fail_copies_into = "CT/c.dcm"  # C's copy fails until the new A is in S3
    ftp.rename("CT/a.dcm", "CT/c.dcm")
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/a.dcm", {}).get("sha256") == sha256(new), 30,
             what="the new A in S3 while C's copy still waits")
    proxy.fail_copies_into = ""
    ftp.rename("CT/b.dcm", "CT/d.dcm")
    assert ftp_get(ftp, "CT/d.dcm") == other
    ftp.quit()
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/c.dcm"]["sha256"] == sha256(old) and objects["CT/a.dcm"]["sha256"] == sha256(new)
    assert objects["CT/d.dcm"]["sha256"] == sha256(other) and "CT/b.dcm" not in objects
    assert any("c.dcm" in r for r in proxy.injected), "C's copy was never tried before the new A"
    wait_for(lambda: not [k for k in s3_objects(seaweed, a.prefix) if k.startswith(".pacsgw-parked/")], 30,
             what="the parked copy deleted once C's copy read it")


def test_two_evicted_files_swapped_by_renames_keep_their_contents(proxied_agent, seaweed, proxy):
    """a ↔ c swapped through t while their copies fail (neither cached): a's copy reads c's key and c's reads a's,
    so each write must park the other's source first, and the two copies must not wait for each other's lock.
    The proxy fails every copy into a .dcm key (not the parked copies) until both renames are queued."""
    a = proxied_agent()
    ftp = ftp_login(a)
    x, y = payload("x", 21_000), payload("y", 22_000)
    store_evicted(a, ftp, {"CT/a.dcm": x, "CT/c.dcm": y})
    proxy.fail_copies_into = ".dcm"
    for src, dst in (("a", "t"), ("c", "a"), ("t", "c")):
        ftp.rename(f"CT/{src}.dcm", f"CT/{dst}.dcm")
    assert ftp_get(ftp, "CT/a.dcm") == y and ftp_get(ftp, "CT/c.dcm") == x  # from the old keys, or parked
    wait_for(lambda: len(proxy.injected) >= 2, 30, what="both copies tried and failed")
    proxy.fail_copies_into = ""
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/a.dcm"]["sha256"] == sha256(y) and objects["CT/c.dcm"]["sha256"] == sha256(x)
    assert "CT/t.dcm" not in objects
    assert ftp_get(ftp, "CT/a.dcm") == y and ftp_get(ftp, "CT/c.dcm") == x
    ftp.quit()


def test_an_evicted_file_renamed_again_while_its_copy_runs_keeps_its_content(proxied_agent, seaweed, proxy):
    """a → t while t's copy from a's key is on the wire (the proxy holds it), then t → c: c must still be copied
    from a's key. It was to be uploaded from a cache that does not hold it (`no cached content to upload`, retried
    for ever: the file existed nowhere but in a's key, which the tombstone loop then deleted)."""
    a = proxied_agent()
    ftp = ftp_login(a)
    x = payload("x", 23_000)
    store_evicted(a, ftp, {"CT/a.dcm": x})
    proxy.hold_puts.set()
    ftp.rename("CT/a.dcm", "CT/t.dcm")
    wait_for(lambda: proxy.puts_held == 1, 30, what="t's copy on the wire")
    ftp.rename("CT/t.dcm", "CT/c.dcm")
    proxy.hold_puts.clear()
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/c.dcm"]["sha256"] == sha256(x) and not {"CT/a.dcm", "CT/t.dcm"} & set(objects)
    assert ftp_get(ftp, "CT/c.dcm") == x
    ftp.quit()


def test_a_park_cut_short_by_kill_9_leaves_no_copy_behind(proxied_agent, seaweed, proxy):
    """A renamed evicted file's old object is parked (copied under .pacsgw-parked) before a new file takes its
    name; kill -9 after that copy was made but before the catalog recorded it left the parked copy in the bucket
    for ever (a deleted patient's images kept, hidden from every client) once the rename's copy ran from the old
    key first after the restart. The proxy holds the parked copy's answer (the copy is made, the agent does not
    hear it) and then fails the next park, so that the rename's copy runs first: faults SeaweedFS cannot produce
    on demand."""
    import signal

    a = proxied_agent(**{"uplink.through_timeout": 1})
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 30_000)
    _hold_the_park(a, ftp, proxy, old, new)
    a.stop(signal.SIGKILL)
    parked = [k for k in s3_objects(seaweed, a.prefix) if k.startswith(".pacsgw-parked/")]
    assert len(parked) == 1, parked
    proxy.hold_replies_to = ""
    proxy.fail_copies_into = parked[0]  # after the restart the new a cannot park: c's copy runs first
    a.start()
    wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/c.dcm", {}).get("sha256") == sha256(old), 60,
             what="c copied from a's old object")
    proxy.fail_copies_into = ""
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/c.dcm"]["sha256"] == sha256(old) and objects["CT/a.dcm"]["sha256"] == sha256(new)
    assert not [k for k in objects if k.startswith(".pacsgw-parked/")], "the parked copy was left behind"
    assert ftp_login(a).retrbinary("RETR CT/a.dcm", lambda _: None).startswith("226")


def _hold_the_park(a, ftp, proxy, old: bytes, new: bytes) -> None:
    """CT/a.dcm (content old) stored, evicted and renamed to c, whose copy fails (the proxy fails copies into c);
    a new a (content new) is stored, acknowledged after through_timeout: its upload first parks a's old object,
    and the proxy holds that copy's answer (the copy is made, the agent does not hear it)."""
    store_evicted(a, ftp, {"CT/a.dcm": old})
    proxy.fail_copies_into = "CT/c.dcm"  # c's copy waits: the new a's upload must park a's old object
    ftp.rename("CT/a.dcm", "CT/c.dcm")
    wait_for(lambda: proxy.injected, 30, what="c's copy tried")
    proxy.hold_replies_to = "/.pacsgw-parked/"
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    wait_for(lambda: proxy.replies_held == 1, 30, what="the parked copy made, its answer held")


def test_a_read_of_a_renamed_file_whose_copy_runs_meanwhile_follows_the_object(proxied_agent, seaweed, proxy):
    """A renamed, uncached file reads from its old key until its copy ran; when the copy runs (and the old key is
    deleted) while the read waits (for a slot on a busy line, or here retrying GETs answered 500 by the proxy, a
    fault SeaweedFS cannot produce on demand), the read answered 451 NoSuchKey (seen in tests/test_fault_model.py).
    It must find the object under its new key."""
    a = proxied_agent()
    ftp = ftp_login(a)
    x = payload("x", 24_000)
    store_evicted(a, ftp, {"CT/a.dcm": x})
    proxy.hold_puts.set()
    ftp.rename("CT/a.dcm", "CT/c.dcm")
    wait_for(lambda: proxy.puts_held == 1, 30, what="c's copy on the wire")
    proxy.fail_gets = 4  # the read retries for about 4 s (agent.uplink.line.SERVER_ERROR_RETRIES)
    got: list[bytes | Exception] = []
    reader = threading.Thread(target=lambda: got.append(_get_or_error(a, "CT/c.dcm")))
    reader.start()
    wait_for(lambda: proxy.fail_gets < 4, 30, what="the read's first GET")
    proxy.hold_puts.clear()
    wait_for(lambda: "CT/a.dcm" not in s3_objects(seaweed, a.prefix), 30, what="a's key deleted after c's copy")
    reader.join(60)
    assert got == [x], got
    ftp.quit()


def _get_or_error(agent, path: str) -> bytes | Exception:
    import ftplib
    ftp = ftp_login(agent)
    try:
        return ftp_get(ftp, path)
    except ftplib.Error as e:
        return e
    finally:
        ftp.close()


def test_a_read_never_joins_the_fetch_of_an_earlier_version(proxied_agent, seaweed, proxy):
    """A reader of an uncached file joins the fetch already running for that name. A fetch of the file's previous
    version still on the wire (the proxy holds its answer: a slow store, which SeaweedFS cannot be made on demand)
    when the file was stored again and evicted was joined too: the reader of the new version got the old bytes.
    A reader pins the copy (the new version cannot be evicted while it waits), so here the first reader gives up
    and goes: the fetch it began outlives it."""
    a = proxied_agent()
    ftp = ftp_login(a)
    old, new = payload("old", 24_000), payload("new", 24_000)
    assert ftp_put(ftp, "CT/a.dcm", old).startswith("226")
    a.wait_drained(60)
    assert _evict(a, "CT/a.dcm")
    proxy.hold_replies_to, proxy.hold_replies_method = "CT/a.dcm", "GET"
    first = ftp_login(a)
    first.voidcmd("TYPE I")
    data = first.transfercmd("RETR CT/a.dcm")
    wait_for(lambda: proxy.replies_held == 1, 30, what="the old version's GET on the wire")
    data.close()
    first.close()  # gone without a word: its pin goes with its session
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    a.wait_drained(60)
    wait_for(lambda: _evict(a, "CT/a.dcm", refused_ok=True), 30, what="the new version evicted")
    got_new: list[bytes | Exception] = []
    second = threading.Thread(target=lambda: got_new.append(_get_or_error(a, "CT/a.dcm")))
    second.start()
    time.sleep(1.0)  # the second read joined the old fetch, or its own GET is held too
    proxy.hold_replies_to = ""
    second.join(60)
    assert got_new == [new], [g if isinstance(g, Exception) else sha256(g) for g in got_new]
    ftp.quit()


def _evict(agent, path: str, refused_ok: bool = False) -> bool:
    """What `pacsgw evict PATH` (evict_cli) asks the agent, without starting a process (a second). refused_ok:
    a 409 (a reader holds the copy) → False."""
    import json
    import urllib.error
    import urllib.request
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/admin/evict", method="POST",
                                 data=json.dumps({"path": path}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return bool(json.load(r).get("evicted"))
    except urllib.error.HTTPError as e:
        if e.code == 409 and refused_ok:
            return False
        raise


def test_a_foreign_object_renamed_away_and_back_before_its_copy_ran_stays_put(proxied_agent, seaweed, proxy):
    """An object another client stored (no sha256 metadata), read once (the catalog learns its SHA-256) and evicted,
    renamed away and back before the rename's copy ran (the proxy fails copies into the new name: a fault SeaweedFS
    cannot produce on demand): its key already holds it, but the missing metadata was taken for other content and
    it was to be uploaded from a cache that does not hold it ('no cached content', retried for ever: the queue never
    drained). It must be left where it is, and stay readable."""
    from harness import BUCKET
    a = proxied_agent()
    data = payload("foreign", 30_000)
    seaweed.client().put_object(Bucket=BUCKET, Key=a.prefix + "CT/f.dcm", Body=data)
    ftp = ftp_login(a)
    assert ftp_get(ftp, "CT/f.dcm") == data
    a.wait_drained(60)
    assert _evict(a, "CT/f.dcm")
    proxy.fail_copies_into = "CT/g.dcm"
    ftp.rename("CT/f.dcm", "CT/g.dcm")
    wait_for(lambda: proxy.injected, 30, what="g's copy tried")
    ftp.rename("CT/g.dcm", "CT/f.dcm")
    proxy.fail_copies_into = ""
    a.wait_drained(60)
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/f.dcm"]["sha256"] == sha256(data) and "CT/g.dcm" not in objects
    assert ftp_get(ftp, "CT/f.dcm") == data
    ftp.quit()


def test_writes_the_store_carries_out_after_the_agent_gave_up_leave_no_orphan(proxied_agent, seaweed, proxy):
    """A PUT or server-side copy held by the store past uplink.read_timeout (the proxy holds every PUT: a slow
    store, which SeaweedFS cannot be made on demand) is given up on and retried; when its file is deleted, renamed
    away or stored again meanwhile, the key's tombstone (or the newer upload) runs first and the held request lands
    after it. That left an orphan object (old content under a name the namespace no longer has) or old content
    over the newer file. The bucket must end as the catalog says."""
    a = proxied_agent(**{"uplink.through_timeout": 1, "uplink.read_timeout": 2})
    ftp = ftp_login(a)
    x, y, z, old, new = (payload(s, 20_000 + i) for i, s in enumerate(("x", "y", "z", "old", "new")))
    assert ftp_put(ftp, "CT/e.dcm", z).startswith("226")
    a.wait_drained(60)
    proxy.hold_puts.set()
    for path, data in (("CT/a.dcm", x), ("CT/b.dcm", y), ("CT/d.dcm", old)):
        assert ftp_put(ftp, path, data).startswith("226")  # acknowledged after through_timeout: write-back
    ftp.rename("CT/e.dcm", "CT/f.dcm")  # a server-side copy from e's key, held too
    wait_for(lambda: proxy.puts_held >= 4 and len(a.events("uplink_failure")) + len(a.events("upload_failed")) >= 1,
             30, what="the held writes given up on")
    ftp.delete("CT/a.dcm")  # deleted, renamed away, stored again, deleted after its copy: each key's
    ftp.rename("CT/b.dcm", "CT/c.dcm")  # tombstone (or newer write) may run before the held request lands
    assert ftp_put(ftp, "CT/d.dcm", new).startswith("226")
    ftp.delete("CT/f.dcm")
    wait_for(lambda: {e.get("path") for e in a.events("deleted")} >= {"CT/a.dcm", "CT/b.dcm", "CT/f.dcm"}, 60,
             what="the tombstones run while the writes are held")
    proxy.hold_puts.clear()
    wait_for(lambda: proxy.puts_held == 0, 30, what="every held write forwarded")
    a.wait_drained(60)
    expected = {"CT/c.dcm": sha256(y), "CT/d.dcm": sha256(new)}
    bucket = lambda: {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items()}  # noqa: E731
    with contextlib.suppress(TimeoutError):  # the late writes are found by the agent's re-checks
        wait_for(lambda: bucket() == expected, 60, what="the bucket as the catalog says, no orphan")
    assert bucket() == expected
    assert ftp_get(ftp, "CT/c.dcm") == y and ftp_get(ftp, "CT/d.dcm") == new
    ftp.quit()


def test_a_delete_the_store_carries_out_after_a_new_file_took_the_key_loses_nothing(proxied_agent, seaweed, proxy):
    """A deleted file's DELETE held by the store past uplink.read_timeout (the proxy holds it: a slow store) is
    given up on; a new file stored under the name is uploaded, and then the held DELETE lands: the new file's
    object was gone while the catalog had it clean (and, once evicted, nowhere). It must be uploaded again."""
    a = proxied_agent(**{"uplink.read_timeout": 2})
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 21_000)
    assert ftp_put(ftp, "CT/a.dcm", old).startswith("226")
    proxy.hold_deletes.set()
    ftp.delete("CT/a.dcm")
    wait_for(lambda: proxy.deletes_held >= 1 and a.events("uplink_failure"), 30, what="the DELETE given up on")
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    a.wait_drained(60)
    proxy.hold_deletes.clear()
    wait_for(lambda: proxy.deletes_held == 0, 30, what="the held DELETEs forwarded")
    with contextlib.suppress(TimeoutError):  # the late DELETE is found by the agent's re-checks
        wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/a.dcm", {}).get("sha256") == sha256(new), 30,
                 what="the new file in S3 again")
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items()} == {"CT/a.dcm": sha256(new)}
    assert a.events("late_write_found")
    ftp.quit()


def test_a_read_from_an_old_key_a_new_file_took_meanwhile_reads_the_parked_object(proxied_agent, seaweed, proxy):
    """A renamed evicted file (x → c, its copy failing: c reads from x's key) is read; its GET reaches the store
    (the proxy holds it: a slow store) only after a new file was stored under x (x's old object parked first).
    The GET got the new file's bytes, failed its checksum after streaming them, and the client saw an error
    after a partial transfer. It must read the parked object."""
    a = proxied_agent(**{"uplink.through_timeout": 1})
    ftp = ftp_login(a)
    old, new = payload("old", 300_000), payload("new", 310_000)
    store_evicted(a, ftp, {"CT/x.dcm": old})
    proxy.fail_copies_into = "CT/c.dcm"  # c's copy waits: c reads from x's key
    ftp.rename("CT/x.dcm", "CT/c.dcm")
    proxy.hold_gets.set()
    got: list[bytes | Exception] = []
    reader = threading.Thread(target=lambda: got.append(_get_or_error(a, "CT/c.dcm")))
    reader.start()
    wait_for(lambda: proxy.gets_held == 1, 30, what="c's GET from x's key on the wire")
    assert ftp_put(ftp, "CT/x.dcm", new).startswith("226")
    wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/x.dcm", {}).get("sha256") == sha256(new), 30,
             what="the new x in S3, x's old object parked")
    proxy.hold_gets.clear()
    reader.join(60)
    assert [g if isinstance(g, Exception) else sha256(g) for g in got] == [sha256(old)]
    proxy.fail_copies_into = ""
    a.wait_drained(60)
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items() if not k.startswith(".pacsgw")} == {
        "CT/c.dcm": sha256(old), "CT/x.dcm": sha256(new)}
    ftp.quit()


def test_a_delete_on_the_wire_at_kill_9_that_lands_after_a_new_file_took_the_key_loses_nothing(
        proxied_agent, seaweed, proxy):
    """kill -9 while a deleted file's DELETE is on the wire (the proxy holds it: a slow store); after the restart the
    tombstone is deleted again, a new file is stored under the name, and then the first DELETE lands: the new file's
    object was gone while the catalog had it clean. It must be uploaded again."""
    import signal
    a = proxied_agent()
    ftp = ftp_login(a)
    assert ftp_put(ftp, "CT/a.dcm", payload("old", 20_000)).startswith("226")
    held = _hold_first_delete(ftp, proxy, "CT/a.dcm")
    a.stop(signal.SIGKILL)
    a.start()
    wait_for(lambda: a.events("deleted"), 30, what="the tombstone deleted again after the restart")
    ftp = ftp_login(a)
    _a_new_file_outlives_the_late_delete(a, ftp, seaweed, proxy, held)
    ftp.quit()


def _hold_first_delete(ftp, proxy, path: str) -> threading.Event:
    """Delete path while the proxy holds its first DELETE (a slow store, which SeaweedFS cannot be made on demand);
    → what holds it (clear it to let that DELETE land); later DELETEs pass."""
    proxy.hold_deletes.set()
    ftp.delete(path)
    wait_for(lambda: proxy.deletes_held == 1, 30, what="the DELETE's first attempt on the wire")
    held, proxy.hold_deletes = proxy.hold_deletes, threading.Event()
    return held


def _a_new_file_outlives_the_late_delete(a, ftp, seaweed, proxy, held: threading.Event) -> None:
    """A new file stored under CT/a.dcm, then the held DELETE lands: the agent's re-checks must upload it again."""
    new = payload("new", 21_000)
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    a.wait_drained(60)
    held.clear()
    wait_for(lambda: proxy.deletes_held == 0, 30, what="the first DELETE forwarded")
    with contextlib.suppress(TimeoutError):  # the late DELETE is found by the agent's re-checks
        wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/a.dcm", {}).get("sha256") == sha256(new), 30,
                 what="the new file in S3 again")
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items()} == {"CT/a.dcm": sha256(new)}


def test_the_uploaders_loops_outlive_a_catalog_another_process_holds(proxied_agent, seaweed, proxy):
    """Another process (an administrator's sqlite3 shell, a long `pacsgw` command) holds the catalog's write lock
    longer than its busy timeout (10 s) just as the line comes back: the dispatcher's claim and the tombstone loop's
    write fail with 'database is locked'. Both loops died of it, silently (nothing logged until shutdown): the queued
    file was never uploaded, the deleted file's object never deleted, while /healthz said ok. They must log the
    crash, count it and start again, and /healthz must say degraded while one keeps crashing. The line is made to
    fail by the proxy (fail_all) so that work waits for it."""
    import sqlite3

    a = proxied_agent(**{"uplink.write_mode": "back"})
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 21_000)
    assert ftp_put(ftp, "CT/old.dcm", old).startswith("226")
    a.wait_drained(60)
    proxy.fail_all = True
    ftp.delete("CT/old.dcm")
    assert ftp_put(ftp, "CT/new.dcm", new).startswith("226")
    wait_for(lambda: not a.health()["uplink"]["reachable"], 30, what="the line down, the work queued")
    other = sqlite3.connect(a.workdir / "cache" / "catalog.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other process's write transaction
    try:
        proxy.fail_all = False
        wait_for(lambda: {e.get("loop") for e in a.events("loop_crashed")} >= {"upload-dispatch", "tombstones"}, 60,
                 what="both loops hit the locked catalog")
        wait_for(lambda: len([e for e in a.events("loop_crashed") if e.get("loop") == "tombstones"]) >= 2, 60,
                 what="the tombstone loop crashed again after its restart")
    finally:
        other.execute("ROLLBACK")
        other.close()
    health = a.health()  # /healthz itself waits while the catalog is held; then the crashes stay shown
    assert health["status"] == "degraded" and any("tombstones crashed" in r for r in health["reasons"]), health
    crash = next(e for e in a.events("loop_crashed") if e.get("loop") == "tombstones")
    assert crash["level"] == "error" and "database is locked" in crash["detail"], crash
    a.wait_drained(60)
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items()} == {"CT/new.dcm": sha256(new)}
    loops = a.health()["loops"]
    assert loops["tombstones"]["crashes"] >= 2 and "database is locked" in loops["tombstones"]["last_error"], loops
    assert metric(a, "pacsgw_loop_crashes_total") >= 2
    ftp.quit()


def test_a_file_deleted_while_its_upload_was_about_to_read_it_is_skipped_not_failed(proxied_agent, seaweed, proxy):
    """A new file under an evicted, renamed file's old name first parks the old object (copies it aside); the
    file deleted while that copy waited (the proxy holds its answer: a slow store, which SeaweedFS cannot be made on
    demand) had its cached copy removed, so the upload's open failed: `upload_failed FileNotFoundError` at error
    level, counted as a failed upload, for a file that is simply gone. It must be an info event saying so."""
    a = proxied_agent(**{"uplink.through_timeout": 1})
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 21_000)
    _hold_the_park(a, ftp, proxy, old, new)
    proxy.fail_copies_into = ""  # c's copy waits for a's lock, which the park holds: no failure counted from here
    failures = metric(a, 'pacsgw_uploads_total{result="error"}')  # c's failed copies
    ftp.delete("CT/a.dcm")
    proxy.hold_replies_to = ""
    skipped = wait_for(lambda: a.events("upload_skipped_gone"), 30, what="the upload of the deleted file skipped")
    assert skipped[0]["level"] == "info" and skipped[0]["path"] == "CT/a.dcm", skipped
    a.wait_drained(60)
    assert not a.events("upload_failed"), a.events("upload_failed")
    assert metric(a, 'pacsgw_uploads_total{result="error"}') == failures, "counted as a failed upload"
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items()} == {"CT/c.dcm": sha256(old)}
    ftp.quit()


def test_a_queued_files_cached_copy_gone_while_its_row_is_dirty_is_a_loud_failure(proxied_agent, seaweed, proxy):
    """The other side of the test above: a file still to be uploaded whose cached copy vanished (removed behind
    the agent's back: the only copy of an acknowledged file) is lost data, not a race: it stays an error. The line
    fails (the proxy answers 500) so that the file waits in the queue while its copy is removed."""
    from faultkit import catalog_rows
    a = proxied_agent(**{"uplink.write_mode": "back"})
    ftp = ftp_login(a)
    proxy.fail_all = True
    assert ftp_put(ftp, "CT/lost.dcm", payload("lost", 20_000)).startswith("226")
    def row() -> tuple[str, str, int]:
        [(blob, state, attempts)] = catalog_rows(
            a, "SELECT blob, state, attempts FROM entries WHERE path = 'CT/lost.dcm'")
        return blob, state, attempts

    # An attempt that opened the copy before it is removed would send it once the line answers (the S3 client's own
    # retry of the open body): remove it between attempts, and let any attempt it races fail on the line first.
    wait_for(lambda: row()[1] == "dirty" and row()[2] >= 1, 60, what="the first attempt failed on the line")
    blob, _, _ = row()
    (a.workdir / "cache" / "data" / blob[:2] / blob).unlink()
    _, state, attempts = row()
    if state == "uploading":
        wait_for(lambda: row()[2] > attempts, 60, what="the attempt in flight when the copy went failed")
    proxy.fail_all = False
    failed = wait_for(lambda: [e for e in a.events("upload_failed") if e.get("path") == "CT/lost.dcm"], 120,
                      what="the upload of the vanished copy failed")
    assert failed[0]["level"] == "error" and "FileNotFoundError" in failed[0]["error"], failed
    assert not a.events("upload_skipped_gone")
    ftp.quit()


def test_a_renames_copy_never_takes_what_another_writer_put_under_its_source_after_its_head(
        proxied_agent, seaweed, proxy):
    """An evicted file's rename is a HEAD of the old key, then a server-side copy. Another writer (the other box of an
    HA pair, another S3 client, a write the store carries out late) that takes the old key between the two made the
    copy take its content: under c (its object carrying sha256 metadata of other content) the copy's check failed
    after the fact, leaving the wrong object under c, retried for ever; under d (a plain object without metadata) it
    passed, and d was marked clean holding another file's bytes. The copy must be refused (CopySourceIfMatch: the
    HEAD's ETag) and the new name never hold the other content. The proxy holds the copies while the other writer
    (straight to SeaweedFS) writes: a slow store, which SeaweedFS cannot be made on demand."""
    from harness import BUCKET
    a = proxied_agent()
    ftp = ftp_login(a)
    x, y = payload("x", 20_000), payload("y", 21_000)
    other_x, other_y = payload("other-x", 22_000), payload("other-y", 23_000)
    store_evicted(a, ftp, {"CT/a.dcm": x, "CT/b.dcm": y})
    proxy.hold_puts.set()
    ftp.rename("CT/a.dcm", "CT/c.dcm")
    ftp.rename("CT/b.dcm", "CT/d.dcm")
    wait_for(lambda: proxy.puts_held == 2, 30, what="both copies on the wire, after their HEADs")
    other = seaweed.client()
    other.put_object(Bucket=BUCKET, Key=a.prefix + "CT/a.dcm", Body=other_x, Metadata={"sha256": sha256(other_x)})
    other.put_object(Bucket=BUCKET, Key=a.prefix + "CT/b.dcm", Body=other_y)
    proxy.hold_puts.clear()
    wait_for(lambda: {e.get("path") for e in a.events("upload_failed")} >= {"CT/c.dcm", "CT/d.dcm"}, 30,
             what="both copies refused")
    time.sleep(3.0)  # their retries (1-3 s later) must not copy the other content either
    objects = s3_objects(seaweed, a.prefix)
    assert {k: v["sha256"] for k, v in objects.items() if k in ("CT/c.dcm", "CT/d.dcm")} == {}, objects
    assert objects["CT/a.dcm"]["sha256"] == sha256(other_x)  # the other writer's objects are left alone
    assert objects["CT/b.dcm"]["size"] == len(other_y)
    assert not [e for e in a.events("uploaded") if e.get("path") in ("CT/c.dcm", "CT/d.dcm")]
    assert a.health()["queue_depth"] == 2  # the renamed files' content is nowhere now: they stay queued, loudly
    ftp.quit()


def test_a_delete_whose_first_attempt_lands_after_the_retry_succeeded_loses_nothing(proxied_agent, seaweed, proxy):
    """The S3 client retries a request once by itself: a DELETE whose first attempt the store held past read_timeout
    (the proxy holds it: a slow store) was sent again, that attempt answered, and the tombstone counted as done; a new
    file was stored under the name, then the first attempt landed. Its outcome had been unknown, but nothing recorded
    a doubt: the new file's object was gone for good while the catalog had it clean. It must be found and uploaded
    again."""
    a = proxied_agent(**{"uplink.read_timeout": 2})
    ftp = ftp_login(a)
    assert ftp_put(ftp, "CT/a.dcm", payload("old", 20_000)).startswith("226")
    a.wait_drained(60)
    held = _hold_first_delete(ftp, proxy, "CT/a.dcm")
    wait_for(lambda: a.events("deleted"), 30, what="the DELETE's retry answered")
    assert not a.events("uplink_failure")  # the agent itself never saw the first attempt fail
    _a_new_file_outlives_the_late_delete(a, ftp, seaweed, proxy, held)
    ftp.quit()


def test_a_doubt_is_forgotten_only_after_a_look_that_answered(proxied_agent, seaweed, proxy):
    """A key in doubt is checked for an hour (DOUBT_SECONDS) after the write whose outcome was never heard; a check
    whose HEAD did not answer is no look. A line down for longer forgot every such doubt unchecked, and a write that
    landed late stayed an orphan object for good. Here the doubt is two hours old when the box starts with the line
    failing (the catalog is written while the agent is stopped: an hour cannot pass in a test); the late object must
    be deleted once the line answers."""
    import sqlite3

    from faultkit import catalog_rows
    from harness import BUCKET
    a = proxied_agent()
    a.stop()
    seaweed.client().put_object(Bucket=BUCKET, Key=a.prefix + "CT/late.dcm", Body=b"a write that landed late")
    db = sqlite3.connect(a.workdir / "cache" / "catalog.sqlite")
    with db:
        db.execute("INSERT INTO doubts (key, since, next_check) VALUES ('CT/late.dcm', ?, 0)", (time.time() - 7200,))
    db.close()
    proxy.fail_all = True
    a.start()
    wait_for(lambda: [e for e in a.events("recheck_failed") if e.get("path") == "CT/late.dcm"], 60,
             what="the doubt checked while the line fails")
    assert catalog_rows(a, "SELECT key FROM doubts") == [("CT/late.dcm",)]
    proxy.fail_all = False
    listed = lambda: seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=a.prefix).get("Contents", [])  # noqa: E731
    wait_for(lambda: not listed(), 120, what="the late object deleted once the line answered")
    wait_for(lambda: catalog_rows(a, "SELECT key FROM doubts") == [], 30, what="the doubt forgotten after its look")


class _Unprintable(ConnectionError):
    """A failure whose message cannot be formatted: recording it as the line's last error raises."""

    def __str__(self) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a reason in no encoding")


def test_the_probe_loop_outlives_an_exception_and_the_crash_is_shown(monkeypatch):
    """The probe runs under the shared Loops supervisor (agent/supervise.py): an exception that escaped it used to
    end the probing while the line was down, leaving the box in write-back for good, told nowhere."""
    import asyncio

    from structlog.testing import capture_logs

    from agent.metrics import Metrics
    from agent.uplink import line as line_module
    from agent.uplink.ratelimit import Bandwidth, TokenBucket

    monkeypatch.setattr(line_module, "PROBE_INTERVAL", 0.05)
    answers: list[BaseException | None] = [ConnectionError("refused"), _Unprintable(), None]

    async def probe() -> None:
        answer = answers.pop(0) if answers else None
        if answer is not None:
            raise answer

    async def main() -> tuple[bool, dict]:
        line = line_module.Line(probe, Metrics(), 2, Bandwidth(TokenBucket(0), TokenBucket(0)))
        await line.start()  # refused: down, probing
        assert not line.reachable
        for _ in range(200):
            if line.reachable:
                break
            await asyncio.sleep(0.05)
        reachable, status = line.reachable, line.loops.status()
        await line.stop()
        return reachable, status

    with capture_logs() as logs:
        reachable, status = asyncio.run(main())
    assert reachable, "the probe started again after the crash and found the line back"
    assert status["uplink-probe"]["crashes"] == 1, status
    assert [e["loop"] for e in logs if e["event"] == "loop_crashed"] == ["uplink-probe"]
