"""A client-driven prior-fetch storm (attack34): each file stored with a new StudyInstanceUID, some patient's
PatientID and a newer StudyDate made the box fetch that patient's earlier studies from the archive and hold them
until first read. Any writer storing one file per patient, patient after patient, made the box pull archive study
after archive study over the private line and evict the PACS's real working set. Now one writing user starts at most
`[prefetch] priors_per_user_hour` plans an hour: the studies over it are recorded, not planned, logged once a minute
per user and counted on /healthz, /metrics and /status. Real agent, real SeaweedFS, real FTP, real DICOM files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request

from test_priors_live import dicom, store_study, uid

from agent.prefetcher import PriorFetcher
from faultkit import cached_paths, catalog_rows, ftp_login, ftp_put, metric, wait_for
from harness import PASSWORD

CAP = 2
PATIENTS = 5


def archive_evicted(a, ftp, patients: int, files: int) -> dict[str, dict[str, bytes]]:
    """One earlier CT study per patient (patient → its files), stored through ftp, uploaded, evicted (S3 only)."""
    archive = {f"P{k}": store_study(ftp, "CT/2025-01-10", f"P{k}", "20250110", "CT", files=files)
               for k in range(patients)}
    a.wait_drained()
    olds = sorted(p for files in archive.values() for p in files)
    out = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *olds],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not cached_paths(a) & set(olds)
    return archive


def judged(a) -> None:
    """A box that has learnt its CT priors are opened: two settled, opened fetches of the cell these tests' priors fall
    in (rank 0, same modality, older than 180 days: 0 + 3 x 2), in the catalog, from which the first plan learns. A new
    box has one prior of a kind out at a time until its outcome is in (agent/policy/priors.py, cold start)."""
    db = sqlite3.connect(a.workdir / "cache" / "catalog.sqlite", timeout=10)
    with db:
        db.executemany("INSERT INTO prior_fetches (dir, rank, fetched, used) VALUES (?, 6, ?, 1)",
                       [(f"earlier{i}", time.time()) for i in range(2)])
    db.close()


def store_new_studies(a, user: str, patients: int) -> None:
    """The attack: one file of a new, newer study for each patient in a row."""
    ftp = ftp_login(a, user)
    for k in range(patients):
        study = uid()
        assert ftp_put(ftp, f"CT/2026-12-05/{study}/0.dcm", dicom(f"P{k}", study, "20261205", "CT", 0)
                       ).startswith("226")
    ftp.quit()


def test_a_writer_storing_new_studies_for_many_patients_fetches_at_most_the_caps_worth(agent_factory):
    a = agent_factory(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "writer", "password": PASSWORD, "root": "/"}],
                      **{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "prefetch.priors_per_user_hour": CAP}).start()
    judged(a)
    # The archive, stored by the PACS: its own new studies count against its cap, not the writer's (its last 3 are
    # over it; they have no priors anyway).
    pacs = ftp_login(a)
    archive = archive_evicted(a, pacs, PATIENTS, files=2)
    pacs.quit()
    olds = {p for files in archive.values() for p in files}
    store_new_studies(a, "writer", PATIENTS)
    deadline = time.monotonic() + 20
    while catalog_rows(a, "SELECT COUNT(*) FROM studies") != [(2 * PATIENTS,)] or \
            metric(a, "pacsgw_prefetched_files_total") < 2 * CAP:
        assert time.monotonic() < deadline, (catalog_rows(a, "SELECT dir FROM studies"), a.events("prior_prefetch"))
        time.sleep(0.1)
    # each study past the cap is counted once refused: then every study is decided, none planned later
    wait_for(lambda: metric(a, "pacsgw_prior_plans_over_cap_total") >= 2 * (PATIENTS - CAP), 20, what="the refusals")

    # every study is recorded; only the writer's first CAP were planned, so only those patients' priors came back
    assert metric(a, "pacsgw_prefetched_files_total") == 2 * CAP, a.events("prefetched")
    planned = [e for e in a.events("prior_prefetch") if e["priors"]]
    assert len(planned) == CAP, planned
    back = {p for p, files in archive.items() if set(files) <= cached_paths(a)}
    assert len(back) == CAP and not cached_paths(a) & set(olds) - {f for p in back for f in archive[p]}
    # told once a minute per user (not once per study), and counted where the admin looks
    capped = a.events("prior_plans_capped")
    assert sorted((e["user"], e["suppressed"]) for e in capped) == [("pacs", 0), ("writer", 0)], capped
    assert a.health()["prefetch"]["priors_over_cap"] == 2 * (PATIENTS - CAP)
    assert metric(a, "pacsgw_prior_plans_over_cap_total") == 2 * (PATIENTS - CAP)
    with urllib.request.urlopen(f"http://127.0.0.1:{a.http_port}/status", timeout=10) as r:
        assert f"{2 * (PATIENTS - CAP)} not planned since start (writer over priors_per_user_hour)" in r.read().decode()


def test_a_burst_of_new_studies_gets_every_prior_and_teaches_the_planner_nothing_false(agent_factory):
    """Under the cap, a burst of new studies (a modality's backlog after an outage) over a slow line (bwlimit): every
    study's prior is fetched, PLANS_AT_ONCE plans at a time, and the planner learns nothing new (none was opened or
    evicted). A plan's learn() settled another plan's prior as evicted unread while its fetch was still running (none
    of its files landed yet): the burst taught the planner that priors are not opened, and it fetched fewer."""
    patients, files = 8, 2
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "uplink.bwlimit": "50KB"}).start()
    judged(a)
    ftp = ftp_login(a)
    archive_evicted(a, ftp, patients, files)
    ftp.quit()
    store_new_studies(a, "pacs", patients)
    deadline = time.monotonic() + 40
    while metric(a, "pacsgw_prefetched_files_total") < patients * files or \
            len(a.events("prior_prefetch")) < 2 * patients:
        assert time.monotonic() < deadline, [(e["priors"], e["rank_heat"]) for e in a.events("prior_prefetch")]
        time.sleep(0.2)
    plans = [e for e in a.events("prior_prefetch") if e["priors"]]
    assert len(plans) == patients and {e["rank_heat"][0] for e in plans} == {0.75}, plans   # judged's 2 of 2
    assert catalog_rows(a, "SELECT COUNT(*) FROM prior_fetches WHERE used IS NULL") == [(patients,)]
    # in the log's order: a plan fetches from its prior_prefetch event (planned) to its prior's last file; they overlap
    events = [json.loads(line) for line in a.log_path.read_text().splitlines() if line.startswith("{")]
    last = {e["path"].split("/")[2]: i for i, e in enumerate(events) if e.get("event") == "prefetched"}
    fetching: set[str] = set()
    most = 0
    for i, e in enumerate(events):
        if e.get("event") == "prior_prefetch" and e["priors"]:
            fetching = {p for p in fetching if last[p] > i} | set(e["priors"])
            most = max(most, len(fetching))
    assert most == PriorFetcher.PLANS_AT_ONCE, most
