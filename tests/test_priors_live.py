"""Prior-study prefetch in the live agent: a new study's first DICOM header (pydicom, real files) names the
patient; the patient's earlier studies, known to the catalog and evicted to S3, are cached before anyone reads
them, the most relevant first and within the budget. Non-DICOM trees are recognised and left alone."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import subprocess
import sys
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from faultkit import cached_paths, catalog_rows, ftp_get, ftp_login, ftp_put, metric, wait_for

PIXELS = 20_000
_SERIAL = itertools.count(1)


def uid() -> str:
    """A unique UID of fixed length: every study of four files is the same size, so the planner's heat per byte
    ties and the clinical rank decides (pydicom's random UIDs differ by a digit: the smaller study won ~1 in 9)."""
    return f"1.2.826.0.1.3680043.8.498.1{next(_SERIAL):019d}"  # no leading zero (PS3.5 9.1)


def dicom(patient: str, study_uid: str, date: str, modality: str, instance: int) -> bytes:
    """A small but real DICOM Part 10 file (preamble, file meta, header, pixel data)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, uid()
    ds.StudyDate, ds.Modality, ds.InstanceNumber = date, modality, instance
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel = 100, 100, 16, 16, 1
    ds.PixelData = bytes([instance % 256]) * PIXELS
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store_study(ftp, directory: str, patient: str, date: str, modality: str, files: int = 4) -> dict[str, bytes]:
    study = uid()
    out = {}
    for i in range(files):
        path = f"{directory}/{study}/{i}.dcm"
        out[path] = dicom(patient, study, date, modality, i)
        assert ftp_put(ftp, path, out[path]).startswith("226")
    return out


def logged_at(event: dict) -> float:
    """When the agent logged an event (its ISO UTC timestamp), as time.time() counts."""
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def study_uid(files: dict[str, bytes]) -> str:
    """The StudyInstanceUID of store_study's files (the directory they are stored in)."""
    return next(iter(files)).split("/")[2]


def test_new_study_brings_the_patients_priors_into_the_cache(agent_factory):
    budget = 5 * (PIXELS + 2000)  # one prior study of four files fits, two do not
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "prefetch.priors_max_bytes": budget}).start()
    ftp = ftp_login(a)
    ct_prior = store_study(ftp, "CT/2025-01-10", "P1", "20250110", "CT")
    mr_prior = store_study(ftp, "MR/2025-06-01", "P1", "20250601", "MR")
    other = store_study(ftp, "CT/2025-03-01", "P2", "20250301", "CT")
    assert ftp_put(ftp, "OT/2025-01-01/scan/x.bin", b"not dicom" * 100).startswith("226")
    a.wait_drained()
    deadline = time.monotonic() + 30
    query = "SELECT dir, patient, study_date, modality FROM studies ORDER BY study_date"
    while len(studies := catalog_rows(a, query)) < 4:
        assert time.monotonic() < deadline, studies     # each recorded by its own task, after the store's reply
        time.sleep(0.1)
    # a DICOM study's key is its StudyInstanceUID (the study index's, the eviction groups'), another its directory
    assert studies == [("OT/2025-01-01/scan", None, None, None), (study_uid(ct_prior), "P1", "20250110", "CT"),
                       (study_uid(other), "P2", "20250301", "CT"), (study_uid(mr_prior), "P1", "20250601", "MR")]

    # The priors age out of the cache (evicted through the CLI, with its progress bar): they are in S3 only.
    olds = sorted([*ct_prior, *mr_prior, *other])
    out = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *olds],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": evicted") == len(olds) and "evict: 100%" in out.stderr
    assert not cached_paths(a) & set(olds)

    # P1 comes back for a new CT: before anyone opens anything, the CT prior (same modality first) is cached;
    # the MR prior does not fit the budget; the other patient's study is not touched.
    new = store_study(ftp, "CT/2026-11-23", "P1", "20261123", "CT")
    deadline = time.monotonic() + 30
    while not set(ct_prior) <= cached_paths(a):
        assert time.monotonic() < deadline, a.events("prior_prefetch")
        time.sleep(0.2)
    event = a.events("prior_prefetch")[-1]
    assert event["priors"] == [study_uid(ct_prior)] and event["study"] == study_uid(new)
    assert event["newer"] == 2      # the eviction policy is told both earlier P1 studies now have a newer one
    assert not cached_paths(a) & (set(mr_prior) | set(other))
    assert metric(a, "pacsgw_prefetched_files_total") == 4

    # The radiologist opens the prior: served from the SSD, counted as a prefetch hit.
    hits, misses = metric(a, "pacsgw_cache_hits_total"), metric(a, "pacsgw_cache_misses_total")
    for path, data in ct_prior.items():
        assert ftp_get(ftp, path) == data
    assert metric(a, "pacsgw_cache_hits_total") == hits + 4 and metric(a, "pacsgw_cache_misses_total") == misses

    # The next new study of P1, stored right after those reads (still in the agent's access buffer): the policy
    # has learnt that the rank-0 prior it fetched was opened.
    assert a.events("prior_prefetch")[-1]["rank_heat"] == [0.5, 0.5, 0.5]
    store_study(ftp, "CT/2026-11-24", "P1", "20261124", "CT", files=1)
    ftp.quit()
    deadline = time.monotonic() + 30
    while len(a.events("prior_prefetch")) < 5:  # one per P1 study after the first, one per new study
        assert time.monotonic() < deadline, a.events("prior_prefetch")
        time.sleep(0.2)
    assert a.events("prior_prefetch")[-1]["rank_heat"][0] == 0.667
    deadline = time.monotonic() + 30
    while metric(a, "pacsgw_prefetched_files_total") < 8:   # the MR prior's four files
        assert time.monotonic() < deadline, a.events("prefetched")
        time.sleep(0.2)
    # the CT prior's four files opened, the MR prior's four not yet
    assert metric(a, "pacsgw_prefetch_used_files_total") == 4 and metric(a, "pacsgw_prefetch_hit_ratio") == 0.5
    # the CT prior was opened; the MR prior (rank 2 now, the budget holds it) is fetched, its outcome open. The
    # catalog keeps each fetch's planner cell (rank + 3 × kind, agent/policy/priors.py): the CT prior was rank 0
    # of the same modality and > 180 days old (kind 2: cell 6), the MR prior rank 2, another modality, old (11)
    assert sorted(catalog_rows(a, "SELECT rank, used FROM prior_fetches")) == [(6, 1), (11, None)]


def test_a_day_directory_is_planned_study_by_study(agent_factory):
    """A day layout (the files of many studies in one day directory, a study known only by its header's UID): each
    DICOM study is recorded, ranked and fetched as its own files. Keyed by the directory, the day's first study stood
    for all of them: a patient whose prior was not the first in its day had none, one whose was got the whole day."""
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3}).start()
    ftp = ftp_login(a)

    studies: list[str] = []

    def day_study(day: str, patient: str, date: str) -> dict[str, bytes]:
        studies.append(uid())
        out = {f"{day}/{uid()}.dcm": dicom(patient, studies[-1], date, "CT", i) for i in range(4)}
        for path, body in out.items():
            assert ftp_put(ftp, path, body).startswith("226")
        return out

    p1_prior, p2_prior = day_study("2025/01/10", "P1", "20250110"), day_study("2025/01/10", "P2", "20250110")
    a.wait_drained()    # clean, so in the study index, and evictable
    olds = [*p1_prior, *p2_prior]
    out = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *olds],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not cached_paths(a) & set(olds)
    for new, prior, fetched in ((("P2", "20261123"), p2_prior, 4), (("P1", "20261124"), p1_prior, 8)):
        day_study(f"{new[1][:4]}/{new[1][4:6]}/{new[1][6:]}", *new)
        deadline = time.monotonic() + 30
        while not set(prior) <= cached_paths(a):
            assert time.monotonic() < deadline, a.events("prior_prefetch")
            time.sleep(0.2)
        assert metric(a, "pacsgw_prefetched_files_total") == fetched    # the prior's own files, not its day's
        for path, body in prior.items():    # opened: a new box has one prior of a kind out until its outcome is in
            assert ftp_get(ftp, path) == body
    ftp.quit()
    assert cached_paths(a) & set(olds) == set(olds)
    assert sorted(catalog_rows(a, "SELECT dir FROM prior_fetches")) == sorted([(studies[0],), (studies[1],)])


def test_priors_off_reads_no_headers(agent_factory):
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": False}).start()
    ftp = ftp_login(a)
    store_study(ftp, "CT/2025-01-10", "P1", "20250110", "CT", files=1)
    ftp.quit()
    a.wait_drained()
    assert catalog_rows(a, "SELECT * FROM studies") == [] and not a.events("study_recorded")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the values it is made to write
def test_a_hostile_header_leaves_bounded_study_rows_and_logs(agent_factory):
    """A header's values reach the study table, the log and the planner's modality codes (held for the process's
    life, one per distinct modality): only values their VR allows may, as for the S3 metadata. Before, a 60 000-
    character Modality or PatientID went there whole, once per new study directory."""
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3}).start()
    ftp = ftp_login(a)
    huge, hostile = "CT\n" + "A" * 60_000, uid()
    body = dicom("P" * 60_000, hostile, "2025011\x07", huge, 1)
    assert ftp_put(ftp, "CT/2025-01-10/hostile/0.dcm", body).startswith("226")
    store_study(ftp, "CT/2025-01-11", "P9", "20250111", "CT", files=1)
    ftp.quit()
    a.wait_drained()
    assert ftp_get(ftp_login(a), "CT/2025-01-10/hostile/0.dcm") == body  # stored as given
    rows = {key: r for key, *r in catalog_rows(a, "SELECT dir, patient, study_date, modality FROM studies")}
    assert rows.pop(hostile) == [None, None, None] and list(rows.values()) == [["P9", "20250111", "CT"]]
    recorded = a.wait_events("study_recorded", 2)
    assert max(len(str(ev)) for ev in recorded) < 1000


def test_a_fetched_prior_is_linked_to_its_study_by_the_eviction_groups_key(agent_factory):
    """The planner tells the eviction policy which new study a prior was fetched for by the key the evictor groups
    the prior's files by (the study UID, agent/store/evictor.py): the default policy then holds the prior beside its
    unread new study (adaptive.HOLD_PRIORS: the fresh segment's bytes count it). Keyed otherwise (the directory), the
    link matches no group and the prior is an ordinary prefetch, held by nothing."""
    interval = 0.2
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "cache.evict_interval_seconds": interval}).start()
    ftp = ftp_login(a)
    # 50 studies read soon after their write: the fresh segment learns a horizon and holds what is written from then
    warm = [f"OT/2026-11-20/w{i}/0.bin" for i in range(50)]
    for p in warm:
        assert ftp_put(ftp, p, b"x" * 100).startswith("226")
    prior = store_study(ftp, "CT/2025-01-10", "P1", "20250110", "CT")
    a.wait_drained()
    for p in warm:
        assert ftp_get(ftp, p) == b"x" * 100
    out = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *prior],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    store_study(ftp, "CT/2026-11-23", "P1", "20261123", "CT", files=1)     # the new study brings the prior back
    deadline = time.monotonic() + 30
    while not set(prior) <= cached_paths(a):
        assert time.monotonic() < deadline, a.events("prior_prefetch")
        time.sleep(0.2)
    a.wait_drained()
    # The next new study's plan feeds the policy the cache now: its view is at most an evict interval old (the evictor
    # reads the catalog's rows once per interval), so the study comes an interval after the prior's last file landed
    landed = max(logged_at(e) for e in a.wait_events("prefetched", len(prior)))
    time.sleep(max(0.0, landed + interval - time.time()))
    other = study_uid(store_study(ftp, "MR/2026-11-23", "P2", "20261123", "MR", files=1))
    ftp.quit()
    wait_for(lambda: other in {e["study"] for e in a.events("prior_prefetch")}, 30, what="the other study's plan")
    h = a.health()["eviction"]
    assert h["fresh_mode"] == "learned" and h["fresh_bytes"] >= sum(map(len, prior.values())), h
