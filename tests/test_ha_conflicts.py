"""An HA box never writes over an object the other box wrote meanwhile: conditional PUTs and conditional renames
(server-side copies with If-Match / If-None-Match on the destination), against the real SeaweedFS.

One real agent is the active box of a pair (keepalived's notify hook wrote MASTER to its role file); "the other
box" is played by an S3 client writing to the same bucket and prefix, as the peer's agent would. No network
namespaces: this file may run beside tests/test_ha.py.
"""

from __future__ import annotations

import asyncio
import ftplib
import hashlib
import time

import asyncssh
import numpy as np
import pytest
from pydicom.uid import generate_uid
from smbprotocol.exceptions import SMBException
from smbutil import Smb

from agent.hahook import notify
from bench.dicomgen import ct_slice
from devstack import free_port
from faultkit import bucket_keys, catalog_rows, ftp_get, ftp_login, ftp_put, payload, sftp_put, sftp_session, wait_for
from harness import BUCKET, s3_objects, sha256


@pytest.fixture
def active(agent_factory, tmp_path):
    role = tmp_path / "ha-role"
    assert notify(str(role), "MASTER") == 0
    a = agent_factory(**{"ha.enabled": True, "ha.role_file": str(role)}).start()
    assert a.health()["ha"]["role"] == "active"
    return a


def peer_put(store, agent, path: str, body: bytes, **meta: str) -> None:
    """The other box stores path (its agent's object: content plus its sha256 metadata)."""
    store.client().put_object(Bucket=BUCKET, Key=agent.prefix + path, Body=body,
                              Metadata={"sha256": hashlib.sha256(body).hexdigest(), **meta})


def conflict_key(path: str, body: bytes) -> str:
    return f".pacsgw-conflicts/{path}.{sha256(body)[:16]}"


def test_rename_never_overwrites_the_other_boxs_object(active, seaweed):
    a = active
    ftp = ftp_login(a)
    ftp.mkd("CT")
    ftp.mkd("CT/r")
    old, src, kept, moved, newer, other = (payload(n, 20_000) for n in ("old", "src", "kept", "moved", "newer",
                                                                         "other"))
    ftp_put(ftp, "CT/r/dst.dcm", old)
    ftp_put(ftp, "CT/r/src.dcm", src)
    ftp_put(ftp, "CT/r/b.dcm", kept)
    ftp_put(ftp, "CT/r/b.dcm.part", moved)
    ftp_put(ftp, "CT/r/new.dcm.part", other)
    a.wait_drained()
    # Meanwhile the other box stores a newer dst.dcm, and a new.dcm this box never saw.
    peer_put(seaweed, a, "CT/r/dst.dcm", newer)
    peer_put(seaweed, a, "CT/r/new.dcm", newer)

    ftp.rename("CT/r/src.dcm", "CT/r/dst.dcm")  # over the object this box knew: If-Match refuses it
    ftp.rename("CT/r/new.dcm.part", "CT/r/new.dcm")  # onto a key this box knew empty: If-None-Match refuses it
    ftp.rename("CT/r/b.dcm.part", "CT/r/b.dcm")  # nobody else wrote b.dcm: the conditional copy goes through
    a.wait_drained()

    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/r/dst.dcm"]["sha256"] == sha256(newer)  # the other box's object stays
    assert objects["CT/r/new.dcm"]["sha256"] == sha256(newer)
    assert objects[conflict_key("CT/r/dst.dcm", src)]["sha256"] == sha256(src)  # this box's copy, beside it
    assert objects[conflict_key("CT/r/new.dcm", other)]["sha256"] == sha256(other)
    assert objects["CT/r/b.dcm"]["sha256"] == sha256(moved)
    assert not {"CT/r/src.dcm", "CT/r/new.dcm.part", "CT/r/b.dcm.part"} & set(objects)  # the old keys left
    conflicts = {e["path"]: e for e in a.wait_events("ha_conflict", 2)}
    assert sorted(conflicts) == ["CT/r/dst.dcm", "CT/r/new.dcm"]
    assert conflicts["CT/r/dst.dcm"]["rename_from"] == "CT/r/src.dcm"
    # The box now serves the object S3 holds, not its own copy.
    assert ftp_get(ftp, "CT/r/dst.dcm") == newer and ftp_get(ftp, "CT/r/b.dcm") == moved
    ftp.quit()


def test_refused_put_indexes_the_object_s3_holds(active, seaweed):
    """The study index (`pacsgw find`) describes what the key holds: after a 412 it is the other box's DICOM
    object, not this box's refused one."""
    a, rng = active, np.random.default_rng(18)
    studies = {n: generate_uid()[:60] for n in ("first", "peer", "refused")}

    def slice_of(study: str) -> bytes:
        return ct_slice(rng, patient="P-HA", study_uid=study, series_uid=study + ".1", rows=16, cols=16)

    ftp = ftp_login(a)
    ftp.mkd("CT")
    ftp_put(ftp, "CT/1.dcm", slice_of(studies["first"]))
    a.wait_drained()
    index = "SELECT study_uid FROM dicom_objects WHERE path = ?"
    assert catalog_rows(a, index, ("CT/1.dcm",)) == [(studies["first"],)]
    peer_body = slice_of(studies["peer"])
    peer_put(seaweed, a, "CT/1.dcm", peer_body, **{"dicom-study": studies["peer"], "dicom-modality": "CT"})
    refused = slice_of(studies["refused"])
    ftp_put(ftp, "CT/1.dcm", refused)
    a.wait_drained()
    assert a.wait_events("ha_conflict")
    objects = s3_objects(seaweed, a.prefix)
    assert objects["CT/1.dcm"]["sha256"] == sha256(peer_body)
    assert objects[conflict_key("CT/1.dcm", refused)]["sha256"] == sha256(refused)
    assert catalog_rows(a, index, ("CT/1.dcm",)) == [(studies["peer"],)]
    ftp.quit()


def test_clients_read_conflict_copies_but_never_change_them(smb_agent, seaweed):
    """`.pacsgw-conflicts/` holds the only copy of content a box of the pair acknowledged and then lost to the
    other box's newer object, `.pacsgw-ha/` the pair's own objects (the hot set the standby prefetches): clients
    (the admin) may list and read them, but no FTP, SFTP or SMB client writes, deletes or renames anything in
    them, moves a file into them or makes their names. They could: a PACS account could rename a conflict copy
    away, store files that look like conflict copies, or feed the standby a hot set of its own."""
    a = smb_agent().start()
    refused, newer, hot = payload("refused", 5_000), payload("newer", 5_000), b'{"files": []}'
    copy = conflict_key("CT/1.dcm", refused)
    name = copy.rsplit("/", 1)[1]
    peer_put(seaweed, a, "CT/1.dcm", newer)  # the other box won CT/1.dcm and kept this copy aside
    peer_put(seaweed, a, copy, refused)
    peer_put(seaweed, a, ".pacsgw-ha/hot.json", hot)

    ftp = ftp_login(a)
    assert {".pacsgw-conflicts", ".pacsgw-ha"} <= set(ftp.nlst()) and ftp.nlst(".pacsgw-conflicts/CT") == [name]
    assert ftp_get(ftp, copy) == refused and ftp_get(ftp, ".pacsgw-ha/hot.json") == hot  # readable
    for cmd in (f"DELE {copy}", "DELE .pacsgw-ha/hot.json", "RMD .pacsgw-conflicts/CT", "MKD .pacsgw-conflicts/new",
                "MKD .pacsgw-conflicts/CT/x"):
        with pytest.raises(ftplib.error_perm, match="550"):
            ftp.sendcmd(cmd)
    for src, dst in ((copy, "CT/stolen.dcm"), ("CT/1.dcm", copy), ("CT/1.dcm", ".pacsgw-ha/hot.json"),
                     (".pacsgw-conflicts", "old-conflicts")):
        with pytest.raises(ftplib.error_perm, match="550"):
            ftp.rename(src, dst)
    for path in (".pacsgw-conflicts/CT/fake.dcm", copy, ".pacsgw-ha/hot.json"):
        with pytest.raises(ftplib.error_perm, match="550"):
            ftp_put(ftp, path, b"fake")

    async def over_sftp() -> None:
        async with sftp_session(a) as sftp:
            async with sftp.open(copy, "rb") as f:
                assert await f.read() == refused
            for change in (sftp.remove(copy), sftp.rename(copy, "CT/stolen.dcm"), sftp.truncate(copy, 0),
                           sftp.mkdir(".pacsgw-conflicts/new"), sftp.posix_rename("CT/1.dcm", copy),
                           sftp_put(sftp, ".pacsgw-conflicts/CT/fake.dcm", b"fake")):
                with pytest.raises(asyncssh.SFTPPermissionDenied):
                    await change

    asyncio.run(over_sftp())
    smb = Smb(a)
    assert smb.read(copy) == refused
    for change in (lambda: smb.remove(copy), lambda: smb.rename(copy, "CT/stolen.dcm"),
                   lambda: smb.write(".pacsgw-conflicts/CT/fake.dcm", b"fake"),
                   lambda: smb.makedirs(".pacsgw-conflicts/n")):
        with pytest.raises((OSError, SMBException)):
            change()
    smb.close()

    assert ftp_get(ftp, copy) == refused and ftp.nlst(".pacsgw-conflicts/CT") == [name]
    ftp.quit()
    a.wait_drained()
    objects = s3_objects(seaweed, a.prefix)
    assert objects[copy]["sha256"] == sha256(refused) and objects[".pacsgw-ha/hot.json"]["sha256"] == sha256(hot)
    assert sorted(k for k in objects if k.startswith(".pacsgw-")) == [copy, ".pacsgw-ha/hot.json"]
    assert "CT/stolen.dcm" not in objects and objects["CT/1.dcm"]["sha256"] == sha256(newer)


def long_dirs(ftp: ftplib.FTP, total: int) -> str:
    """Make directories of 199-byte names, together `total` bytes long (with their slashes); → their path."""
    parts = ["d" * 199] * (total // 200)
    for depth in range(1, len(parts) + 1):
        ftp.mkd("/".join(parts[:depth]))
    return "/".join(parts)


def test_every_new_name_leaves_room_for_its_conflict_copy(active, seaweed):
    """A conflict copy's key is 35 bytes longer than its file's path (`.pacsgw-conflicts/<path>.<16 hex>`), but new
    names were checked against the whole key: a path within 35 bytes of the limit was acknowledged, the other box's
    object refused its PUT, its conflict copy then failed (KeyTooLongError) on every retry, and the box kept a queue
    for good (never eligible for the address again). With [ha] on, new names now leave that room (FTP 553)."""
    a = active
    ftp = ftp_login(a)
    top = long_dirs(ftp, 800)
    limit = 1024 - len(a.prefix.encode()) - 35
    fits = f"{top}/{'f' * (limit - len(top) - 1)}"
    too_long = fits + "x"
    body, peer_body = payload("ours", 5_000), payload("peer", 5_000)
    peer_put(seaweed, a, too_long, peer_body)
    with pytest.raises(ftplib.error_perm, match="553.*longer than"):
        ftp_put(ftp, too_long, body)
    peer_put(seaweed, a, fits, peer_body)  # the other box stored it first: this box's PUT is refused
    assert ftp_put(ftp, fits, body).startswith("226")
    ftp.quit()
    assert a.wait_events("ha_conflict")
    a.wait_drained(timeout=20)
    objects = s3_objects(seaweed, a.prefix)
    assert objects[fits]["sha256"] == sha256(peer_body)
    assert objects[conflict_key(fits, body)]["sha256"] == sha256(body)
    assert not a.events("upload_failed") and a.health()["ha"]["eligible"]


def test_a_long_path_queued_before_ha_still_gets_its_conflict_copy(agent_factory, seaweed, tmp_path):
    """A file stored before [ha] was enabled may take the whole key (1024 bytes with the prefix); if it is still
    queued when the box joins a pair and the other box wrote its key, its conflict copy cannot be kept under its
    path: it is kept under the path's SHA-256 instead (the ha_conflict event names both), never failed for good."""
    # a prefix long enough that the key (1024 bytes), not the namespace's 1000-byte paths, is the limit
    a = agent_factory(prefix=f"hospital-saint-elisabeth-{time.time_ns()}/",
                      **{"uplink.endpoint_url": f"http://127.0.0.1:{free_port()}"}).start()  # the line is down
    ftp = ftp_login(a)
    top = long_dirs(ftp, 800)
    path = f"{top}/{'f' * (1024 - len(a.prefix.encode()) - len(top) - 1)}"
    body, peer_body = payload("queued", 5_000), payload("peer", 5_000)
    assert ftp_put(ftp, path, body).startswith("226")  # acknowledged in write-back: queued on the SSD
    ftp.quit()
    a.stop()
    peer_put(seaweed, a, path, peer_body)
    role = tmp_path / "ha-role"
    assert notify(str(role), "BACKUP") == 0  # a returning box: standby, uploading its queue
    del a.overrides["uplink.endpoint_url"]
    a.overrides.update({"ha.enabled": True, "ha.role_file": str(role)})
    a.write_config()
    a.start()
    a.wait_drained(timeout=30)
    (event,) = a.wait_events("ha_conflict")
    side = f".pacsgw-conflicts/{hashlib.sha256(path.encode()).hexdigest()}.{sha256(body)[:16]}"
    assert event["path"] == path and event["kept_as"] == side
    objects = s3_objects(seaweed, a.prefix)
    assert objects[path]["sha256"] == sha256(peer_body) and objects[side]["sha256"] == sha256(body)
    assert a.health()["ha"]["eligible"]


def test_a_file_requeued_after_its_own_late_delete_is_no_conflict(proxied_agent, proxy, seaweed, tmp_path):
    """A deleted file's DELETE held by the store past read_timeout (the proxy holds it: a slow store, which SeaweedFS
    cannot be made on demand) is given up on and sent again; a new file is stored under the name, and then the first
    DELETE lands. The doubt re-check finds the new file's object gone and uploads it again: its conditional PUT
    (If-Match the ETag this box last stored) was refused, taken for the other box's write (`ha_conflict`), and the
    file was dropped from the namespace (its copy kept aside under .pacsgw-conflicts) though nobody else wrote it."""
    import threading

    role = tmp_path / "ha-role"
    assert notify(str(role), "MASTER") == 0
    a = proxied_agent(**{"ha.enabled": True, "ha.role_file": str(role), "uplink.read_timeout": 2})
    ftp = ftp_login(a)
    old, new = payload("old", 20_000), payload("new", 21_000)
    assert ftp_put(ftp, "CT/a.dcm", old).startswith("226")
    a.wait_drained()
    proxy.hold_deletes.set()
    ftp.delete("CT/a.dcm")
    wait_for(lambda: proxy.deletes_held >= 1 and a.events("uplink_failure"), 30, what="the DELETE given up on")
    held, proxy.hold_deletes = proxy.hold_deletes, threading.Event()  # those stay held, later ones pass
    wait_for(lambda: a.prefix + "CT/a.dcm" not in bucket_keys(seaweed), 30, what="the DELETE sent again, done")
    a.wait_drained()
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")
    a.wait_drained()
    held.clear()
    wait_for(lambda: proxy.deletes_held == 0, 30, what="the first DELETE landed")
    wait_for(lambda: a.events("late_write_found"), 30, what="the re-check found the object gone")
    wait_for(lambda: s3_objects(seaweed, a.prefix).get("CT/a.dcm", {}).get("sha256") == sha256(new), 30,
             what="the new file uploaded again")
    a.wait_drained()
    assert not a.events("ha_conflict"), a.events("ha_conflict")
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items() if not k.startswith(".pacsgw-ha/")
            } == {"CT/a.dcm": sha256(new)}
    assert ftp_get(ftp, "CT/a.dcm") == new
    ftp.quit()


def test_a_file_deleted_and_sent_again_before_its_delete_ran_is_no_conflict(proxied_agent, proxy, seaweed,
                                                                             tmp_path):
    """A PACS deletes a file and sends it again at once, before the tombstone loop deleted its object (here it is busy
    with another file's DELETE, which the proxy holds: a slow store, which SeaweedFS cannot be made on demand). The
    new file's row knew no object under its name, so its PUT was conditional on none (If-None-Match); the key still
    held this box's own old object: refused, taken for the other box's write (`ha_conflict`), and the namespace
    served the deleted content while the new file went aside to .pacsgw-conflicts."""
    role = tmp_path / "ha-role"
    assert notify(str(role), "MASTER") == 0
    a = proxied_agent(**{"ha.enabled": True, "ha.role_file": str(role)})
    ftp = ftp_login(a)
    old, new, moved = payload("old", 20_000), payload("new", 21_000), payload("moved", 22_000)
    for path in ("CT/a.dcm", "CT/b.dcm", "CT/z.dcm"):
        assert ftp_put(ftp, path, old).startswith("226")
    assert ftp_put(ftp, "CT/m.dcm", moved).startswith("226")
    a.wait_drained()
    proxy.hold_deletes.set()
    ftp.delete("CT/z.dcm")  # the tombstone loop waits for z's DELETE
    wait_for(lambda: proxy.deletes_held == 1, 30, what="z's DELETE on the wire")
    ftp.delete("CT/a.dcm")
    assert ftp_put(ftp, "CT/a.dcm", new).startswith("226")  # sent again: a new PUT over the old object
    ftp.delete("CT/b.dcm")
    ftp.rename("CT/m.dcm", "CT/b.dcm")  # another file renamed onto the deleted name: a copy over the old object
    proxy.hold_deletes.clear()
    a.wait_drained()
    assert not a.events("ha_conflict"), a.events("ha_conflict")
    assert {k: v["sha256"] for k, v in s3_objects(seaweed, a.prefix).items() if not k.startswith(".pacsgw-ha/")
            } == {"CT/a.dcm": sha256(new), "CT/b.dcm": sha256(moved)}
    assert ftp_get(ftp, "CT/a.dcm") == new and ftp_get(ftp, "CT/b.dcm") == moved
    ftp.quit()


def test_a_doubts_recheck_deletes_only_the_content_this_box_wrote(agent_factory, seaweed, tmp_path):
    """A box's writes whose outcome it never heard are doubts it re-checks for an hour: a key no file has that holds
    an object got a tombstone. After a fail-over the other box may have stored a file under such a key, which this
    box's catalog does not know yet (its next follow pass, or a listing, imports it): the re-check deleted the other
    box's acknowledged file. In a pair only an object of the content this box's write carried is deleted. The doubts
    are written into the catalog while the agent is stopped (its restart after the fail-over); the other box is an
    S3 client writing to the same prefix."""
    import sqlite3

    role = tmp_path / "ha-role"
    assert notify(str(role), "MASTER") == 0
    a = agent_factory(**{"ha.enabled": True, "ha.role_file": str(role)}).start()
    a.stop()
    theirs, mine, my_other = payload("theirs", 20_000), payload("mine", 21_000), payload("my-other", 22_000)
    peer_put(seaweed, a, "CT/theirs.dcm", theirs)  # the other box's file, stored after the fail-over
    peer_put(seaweed, a, "CT/mine.dcm", mine)  # this box's own write, landed late
    db = sqlite3.connect(a.workdir / "cache" / "catalog.sqlite")
    with db:
        db.executemany("INSERT INTO doubts (key, since, next_check, sha256) VALUES (?, ?, 0, ?)",
                       [("CT/theirs.dcm", time.time(), sha256(my_other)), ("CT/mine.dcm", time.time(), sha256(mine))])
    db.close()
    a.start()
    wait_for(lambda: a.prefix + "CT/mine.dcm" not in bucket_keys(seaweed), 60, what="this box's late object deleted")
    time.sleep(2.0)  # the tombstone loop runs every second: a wrongly queued tombstone would have run by now
    assert s3_objects(seaweed, a.prefix).get("CT/theirs.dcm", {}).get("sha256") == sha256(theirs), "deleted"
    assert [e for e in a.events("late_object_kept") if e.get("path") == "CT/theirs.dcm"], a.events("late_object_kept")
