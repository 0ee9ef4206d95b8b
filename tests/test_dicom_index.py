"""The study-index snapshot (issue 17, fast rebuild): `pacsgw index-snapshot` writes the index beside the namespace;
`pacsgw index-rebuild` takes unchanged objects' rows from it and HEADs the rest (new, overwritten), so `find`
after the rebuild equals `find` before it, with a fresh, a stale or a damaged snapshot. Real agent, real
SeaweedFS, real FTP."""

from __future__ import annotations

import asyncio
import ftplib
import gzip
import io
import subprocess
import sys
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from pydicom.uid import generate_uid
from test_config import GOOD, write
from test_dicom import KEY, pacsgw

from agent.dicom import snapshot
from agent.dicom.objectmeta import pseudonym
from bench.dicomgen import ct_slice
from harness import BUCKET, PASSWORD


def test_rebuild_from_a_snapshot_equals_the_index_before(agent_factory, seaweed, tmp_path):
    keyfile = tmp_path / "pseudonym.key"
    keyfile.write_bytes(KEY)
    keyfile.chmod(0o600)
    agent = agent_factory(**{"dicom.pseudonym_key_file": str(keyfile)}).start()
    rng = np.random.default_rng(5)
    study_a, study_b = generate_uid(), generate_uid()

    def dcm(patient: str, study: str, modality: str = "CT") -> bytes:
        return ct_slice(rng, patient=patient, study_uid=study, series_uid=generate_uid(), modality=modality,
                        rows=16, cols=16)

    ftp = ftplib.FTP(timeout=60)
    ftp.connect("127.0.0.1", agent.ftp_port)
    ftp.login("pacs", PASSWORD)
    for d in ("a", "b", "c"):
        ftp.mkd(d)

    def store(files: dict[str, bytes]) -> None:
        for path, data in files.items():
            ftp.storbinary(f"STOR {path}", io.BytesIO(data))
        agent.wait_drained()

    store({**{f"a/{i}.dcm": dcm("P-A", study_a) for i in range(4)},
           **{f"b/{i}.dcm": dcm("P-B", study_b, "MR") for i in range(3)}, "a/notes.txt": b"not dicom"})
    snap = pacsgw(agent, "index-snapshot")
    assert snap["rows"] == 7 and snap["segments"] == 1
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix="pacsgw-index/")["Contents"]]
    assert set(keys) == {f"pacsgw-index/{agent.prefix}manifest.json",
                         f"pacsgw-index/{agent.prefix}{snap['snapshot']}/00000.json.gz"}
    for key in keys:  # the snapshot is in the bucket too: the patients only as their pseudonyms
        body = seaweed.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        text = (gzip.decompress(body) if key.endswith(".gz") else body).decode()
        assert pseudonym(KEY, "P-A") in text or key.endswith("manifest.json")
        assert "P-A" not in text and "P-B" not in text, key

    # after the snapshot: new objects, one overwritten with another study's file, one deleted
    store({"c/0.dcm": dcm("P-A", study_b, "MR"), "c/1.dcm": dcm("P-C", generate_uid()),
           "a/1.dcm": dcm("P-B", study_b, "MR")})
    ftp.delete("b/2.dcm")
    ftp.quit()
    agent.wait_drained()
    queries = [(), ("--study", study_a), ("--patient", "P-B"), ("--modality", "MR")]
    before = [pacsgw(agent, "find", *q) for q in queries]
    assert [r["objects"] for r in before] == [8, 3, 3, 4]

    agent.stop()
    for suffix in ("", "-wal", "-shm"):
        agent.workdir.joinpath("cache", "catalog.sqlite" + suffix).unlink(missing_ok=True)
    report = pacsgw(agent, "index-rebuild")
    # 9 objects: 5 unchanged DICOM rows from the snapshot; the 2 new, the overwritten one and the text HEADed
    assert (report["objects"], report["indexed"], report["from_snapshot"], report["failed"]) == (9, 8, 5, 0)
    after = [pacsgw(agent, "find", *q) for q in queries]
    for b, a in zip(before, after, strict=True):
        assert [{**i, "where": "s3"} for i in b["items"]] == a["items"]

    # a damaged snapshot costs time, never a row: everything is HEADed
    client = seaweed.client()
    client.put_object(Bucket=BUCKET, Key=f"pacsgw-index/{agent.prefix}{snap['snapshot']}/00000.json.gz",
                      Body=b"\x1f\x8b garbage")
    report = pacsgw(agent, "index-rebuild")
    assert (report["objects"], report["indexed"], report["from_snapshot"]) == (9, 8, 0)
    assert pacsgw(agent, "find") == after[0]


def test_snapshot_needs_a_prefix(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "index-snapshot", "--config", str(write(tmp_path, GOOD))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "index snapshots need uplink.prefix" in out.stderr


def test_the_agent_writes_snapshots_and_an_ha_standby_does_not(agent_factory, seaweed, tmp_path):
    """`[dicom] snapshot_interval`: the agent writes the snapshot itself; a standby of an HA pair (no role
    file from keepalived yet: standby) only logs that it skipped. Needs uplink.prefix, checked at load."""
    import json
    import time

    import pytest

    from agent.config import ConfigError, load
    with pytest.raises(ConfigError, match="dicom.snapshot_interval"):
        load(write(tmp_path, GOOD + "\n[dicom]\nsnapshot_interval = 60\n"))
    # left out: daily where the index has a place (a prefix), off where it has none
    assert load(write(tmp_path, GOOD)).dicom.snapshot_interval == 0
    with_prefix = GOOD.replace('bucket = "pacs"', 'bucket = "pacs"\nprefix = "hospital-a/"')
    assert load(write(tmp_path, with_prefix)).dicom.snapshot_interval == 86400
    assert load(write(tmp_path, with_prefix + "\n[dicom]\nsnapshot_interval = 0\n")).dicom.snapshot_interval == 0

    active = agent_factory(**{"dicom.snapshot_interval": 1}).start()
    standby = agent_factory(**{"dicom.snapshot_interval": 1, "ha.enabled": True,
                               "ha.role_file": str(tmp_path / "no-role-yet"),
                               "ha.peer": "http://127.0.0.1:9"}).start()
    rng = np.random.default_rng(9)
    study = generate_uid()[:60]  # room for its series' ".1"
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", active.ftp_port)
    f.login("pacs", PASSWORD)
    for i in range(2):
        f.storbinary(f"STOR {i}.dcm", io.BytesIO(ct_slice(rng, patient="P", study_uid=study,
                                                           series_uid=study + ".1", rows=32, cols=32)))
    f.quit()
    active.wait_drained()
    deadline = time.monotonic() + 60
    while not [e for e in active.events("index_snapshot_written") if e["rows"] == 2]:
        assert time.monotonic() < deadline, active.events("index_snapshot_failed")
        time.sleep(0.5)
    client = seaweed.client()
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"pacsgw-index/{active.prefix}manifest.json")
                          ["Body"].read())
    assert manifest["rows"] == 2 and len(manifest["segments"]) == 1
    standby.wait_events("index_snapshot_skipped", 2, timeout=30)
    assert not standby.events("index_snapshot_written")
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=f"pacsgw-index/{standby.prefix}").get("KeyCount")


def test_rebuild_from_a_stale_snapshot_and_deltas_equals_the_index_before(agent_factory, seaweed, tmp_path):
    """Between snapshots the agent ships each upload's index row in small delta objects: a rebuild takes the
    objects stored since the (stale) snapshot from them, HEADs only what neither covers, and a damaged delta
    is reported and skipped (its objects HEADed). A snapshot folds the deltas written before it in."""
    keyfile = tmp_path / "pseudonym.key"
    keyfile.write_bytes(KEY)
    keyfile.chmod(0o600)
    agent = agent_factory(**{"dicom.pseudonym_key_file": str(keyfile), "dicom.snapshot_interval": 86400,
                             "dicom.delta_interval": 0.2}).start()
    rng = np.random.default_rng(11)
    study = generate_uid()
    client = seaweed.client()
    deltas = f"pacsgw-index/{agent.prefix}deltas/"

    def dcm(patient: str, modality: str = "CT") -> bytes:
        return ct_slice(rng, patient=patient, study_uid=study, series_uid=generate_uid(), modality=modality,
                        rows=16, cols=16)

    def delta_keys() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=deltas).get("Contents", [])]

    ftp = ftplib.FTP(timeout=60)
    ftp.connect("127.0.0.1", agent.ftp_port)
    ftp.login("pacs", PASSWORD)

    def store(files: dict[str, bytes], shipped: int) -> None:
        for path, data in files.items():
            ftp.storbinary(f"STOR {path}", io.BytesIO(data))
        agent.wait_drained()
        rows = 0
        deadline = time.monotonic() + 30
        while rows < shipped:
            assert time.monotonic() < deadline, agent.events("index_delta_failed")
            time.sleep(0.2)
            rows = sum(e["rows"] for e in agent.events("index_delta_written"))

    store({f"{i}.dcm": dcm("P-A") for i in range(4)}, 4)
    assert delta_keys()
    snap = pacsgw(agent, "index-snapshot")
    assert snap["rows"] == 4 and not delta_keys()  # folded into the snapshot
    # after the snapshot: new objects, one overwritten with another patient's file, one deleted, a text file
    store({"4.dcm": dcm("P-B", "MR"), "5.dcm": dcm("P-B", "MR"), "1.dcm": dcm("P-C"), "notes.txt": b"text"}, 7)
    ftp.delete("2.dcm")
    ftp.quit()
    agent.wait_drained()
    keys = delta_keys()
    for key in keys:  # the deltas are in the bucket too: the patients only as their pseudonyms
        text = gzip.decompress(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()).decode()
        assert "P-A" not in text and "P-B" not in text and "P-C" not in text, key
    queries = [(), ("--patient", "P-B")]  # every item compared whole: study, series, modality, date, size
    before = [pacsgw(agent, "find", *q) for q in queries]
    assert [r["objects"] for r in before] == [5, 2]

    agent.stop()
    for suffix in ("", "-wal", "-shm"):
        agent.workdir.joinpath("cache", "catalog.sqlite" + suffix).unlink(missing_ok=True)
    report = pacsgw(agent, "index-rebuild")
    # 6 objects: 2 unchanged rows from the snapshot (0, 3), 3 from the deltas (4, 5, the new 1); the text HEADed
    assert (report["objects"], report["indexed"], report["from_snapshot"], report["from_deltas"],
            report["deltas_skipped"], report["failed"]) == (6, 5, 2, 3, [], 0)
    after = [pacsgw(agent, "find", *q) for q in queries]
    for b, a in zip(before, after, strict=True):
        assert [{**i, "where": "s3"} for i in b["items"]] == a["items"]

    # a damaged delta is reported and skipped: its objects are HEADed, the index is the same
    client.put_object(Bucket=BUCKET, Key=keys[0], Body=b"\x1f\x8b garbage")
    report = pacsgw(agent, "index-rebuild")
    assert report["deltas_skipped"] == [keys[0]] and report["from_deltas"] < 3 and report["indexed"] == 5
    assert [pacsgw(agent, "find", *q) for q in queries] == after


def test_index_rows_wait_in_the_catalog_until_a_delta_holds_them(tmp_path):
    """The delta queue (real SQLite): a confirmed upload queues its row with its ETag; a file being written again
    holds its row back; marking an older ETag shipped leaves the newer queued."""
    from agent.store.catalog import Catalog
    cat = Catalog(tmp_path / "catalog.sqlite")

    def upload(path: str, etag: str) -> None:
        gen, _ = cat.commit_write(path, f"blob-{path}-{etag}", 10, "ab" * 32, time.time(), claim=True)
        assert cat.mark_clean(path, gen, etag, None, "ab" * 32,
                              (path, 10, "1.2", "1.2.3", "1.2.3.4", "CT", "20190101", "cd" * 16))

    upload("off.dcm", '"e0"')  # no deltas shipped by this agent: nothing queued
    cat.ship_index = True
    upload("a.dcm", '"a1"')
    upload("b.dcm", '"b1"')
    assert [(r[0], r[2]) for r in cat.unshipped_index_rows(10)] == [("a.dcm", '"a1"'), ("b.dcm", '"b1"')]
    assert cat.unshipped_index_rows(10)[0] == ("a.dcm", 10, '"a1"', "1.2", "1.2.3", "1.2.3.4", "CT", "20190101",
                                               "cd" * 16)
    cat.commit_write("a.dcm", "blob-a2", 10, "ab" * 32, time.time(), claim=False)  # written again, not yet uploaded
    assert [r[0] for r in cat.unshipped_index_rows(10)] == ["b.dcm"]
    upload("a.dcm", '"a2"')
    cat.index_rows_shipped([("a.dcm", '"a1"'), ("b.dcm", '"b1"')])  # a delta written before a.dcm's new upload
    assert [(r[0], r[2]) for r in cat.unshipped_index_rows(10)] == [("a.dcm", '"a2"')]
    # b.dcm replaced by a file that is not DICOM (index row ()): its row goes, nothing is queued for it
    gen, _ = cat.commit_write("b.dcm", "blob-b2", 10, "ab" * 32, time.time(), claim=True)
    assert cat.mark_clean("b.dcm", gen, '"b2"', None, "ab" * 32, ())
    assert [r[0] for r in cat.find_dicom()] == ["a.dcm", "off.dcm"]
    # a rename's server-side copy (row None: copy_dicom_row wrote it) is queued under the copy's ETag
    gen, _ = cat.commit_write("c.dcm", "blob-c", 10, "ab" * 32, time.time(), claim=True)
    cat.copy_dicom_row("a.dcm", "c.dcm")
    assert cat.mark_clean("c.dcm", gen, '"c1"', None, "ab" * 32)
    assert [(r[0], r[2]) for r in cat.unshipped_index_rows(10)] == [("a.dcm", '"a2"'), ("c.dcm", '"c1"')]
    cat.close()


def test_an_index_object_that_inflates_without_bound_is_damaged_not_read():
    """Any S3 client may write under pacsgw-index/: a 1 MB gzip 'delta' inflating to 1 GB was inflated whole by a
    rebuild (times READ_AHEAD deltas at once). Now it is damaged as soon as it passes ROWS_MAX_BYTES (the rebuild
    skips it and HEADs its objects), with memory to match; real rows still decode."""
    rows = [("CT/a.dcm", 10, "etag", "1.2", "1.3", "1.4", "CT", "20250101", None)]
    assert asyncio.run(snapshot.decode_rows(snapshot.encode_rows(rows))) == [list(r) for r in rows]
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(packer.compress(b"[" * (1 << 20)) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    with pytest.raises(ValueError, match="decodes to more than"):
        asyncio.run(snapshot.decode_rows(bomb))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < snapshot.ROWS_MAX_BYTES + (64 << 20)


def test_a_rebuild_indexes_only_what_an_upload_would_write(agent_factory, seaweed):
    """Another S3 client's object metadata and keys went into the study index as they were, and `pacsgw find`
    printed them to the admin's terminal: an escape sequence in dicom-modality or in a key (which the listings
    hide from clients) could retitle, clear or rewrite that terminal. Now a rebuilt row keeps only values an
    upload writes (UIDs, CS, DA, a hex pseudonym), and a key no client could name is not indexed."""
    a = agent_factory()
    s3, study = seaweed.client(), "1.2.826.0.1.3680043.8.498.77"
    meta = {"dicom-study": study, "dicom-series": study + ".1", "dicom-sop": study + ".2", "dicom-modality": "CT"}
    s3.put_object(Bucket=BUCKET, Key=a.prefix + "CT/good.dcm", Body=b"g" * 100, Metadata=meta)
    s3.put_object(Bucket=BUCKET, Key=a.prefix + "CT/bad.dcm", Body=b"b" * 100,
                  Metadata={**meta, "dicom-modality": "CT;[2J", "dicom-study-date": "x" * 1000})
    s3.put_object(Bucket=BUCKET, Key=a.prefix + "CT/\x1b[2Jname.dcm", Body=b"n" * 100, Metadata=meta)
    assert pacsgw(a, "index-rebuild")["objects"] == 3
    out = subprocess.run([sys.executable, "-m", "agent.cli", "find", "--study", study, "--config", str(a.config_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert [line.split()[-1] for line in out.stdout.splitlines()[:-1]] == ["CT/bad.dcm", "CT/good.dcm"]
