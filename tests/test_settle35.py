"""settle35: a prior fetch settles as evicted unread only once its fetch is over (a running one has none of its files
cached until the first lands), the prior plans still running when the agent stops end with it, the new studies over
the per-user cap are shown where the admin looks, and a study UID another patient's file took first still gets the
study's priors planned."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from test_catalog import cat, write  # noqa: F401  (cat: the fixture)
from test_priors_live import dicom, store_study, study_uid, uid

from agent.serve.http import status_lines
from faultkit import cached_paths, catalog_rows, ftp_login, ftp_put, wait_for
from harness import PASSWORD


def test_a_prior_whose_fetch_runs_is_not_settled_unread_until_the_fetch_is_over(cat):  # noqa: F811
    """Recorded, none of its files landed yet: open while this process fetches it; over (or cut by a restart: a new
    process fetches nothing), settled unused. A read while it runs counts as opened."""
    for study in ("1.2.1", "1.2.2"):
        gen = write(cat, f"{study}/f.dcm")
        cat.claim(f"{study}/f.dcm", gen)
        cat.mark_clean(f"{study}/f.dcm", gen, None, None, "00")
        assert cat.uncache(f"{study}/f.dcm", gen)
        cat.record_prior_fetch(study, int(study[-1]))
    cat.record_access([("1.2.2/f.dcm", time.time() + 1, 1)])
    assert cat.settle_prior_fetches({"1.2.1", "1.2.2"}) == [(2, True)]
    assert cat.settle_prior_fetches({"1.2.1"}) == []
    assert cat.settle_prior_fetches() == [(1, False)]


def test_a_study_is_known_for_the_patient_its_row_names(cat):  # noqa: F811
    """A file naming another patient under a known study key is a disputed study, not a known one; a row or a file
    without a patient (not DICOM) is known to either."""
    cat.record_study("1.2.9", "X", "1.2.9", "20261205", "CT")
    cat.record_study("CT/2026-12-05/s", None, None, None, None)
    assert cat.study_known("1.2.9", "X") and cat.study_known("1.2.9") and not cat.study_known("1.2.9", "P")
    assert cat.study_known("CT/2026-12-05/s", "P") and not cat.study_known("1.2.8", "X")


def test_the_status_page_shows_the_new_studies_over_the_cap():
    h = {"status": "ok", "reasons": [], "version": "x", "uptime_seconds": 1, "write_mode": "through",
         "uplink": {"endpoint": "e", "bucket": "b", "prefix": "", "reachable": True}, "queue_depth": 0,
         "queue_bytes": 0, "oldest_dirty_seconds": 0, "pending_deletes": 0,
         "cache": {"files": 0, "cached_files": 0, "bytes": 0, "max_bytes": 1, "disk_free": 1, "disk_total": 1},
         "memory": {"rss": 1, "available": 1},
         "prefetch": {"state": "disabled", "window": "01:00-05:00", "priors": True, "priors_over_cap": 7,
                      "last_run": {"fetched_bytes": 0, "stopped": ""}}}
    assert ("prior studies", "fetched for new studies; 7 not planned since start (writer over "
                             "priors_per_user_hour)") in status_lines(h)
    h["prefetch"]["priors"] = False
    assert "prior studies" not in dict(status_lines(h))


def test_a_prior_fetch_running_at_sigterm_ends_with_the_agent(agent_factory):
    """A plan fetching priors over a slow line when the agent is told to stop: it is cancelled and awaited once no
    store can start another, not left fetching through the drain (here an upload's, ~9 s) while the line, the
    S3 client and the catalog close under it."""
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "uplink.bwlimit": "20KB", "uplink.write_mode": "back"}).start()
    ftp = ftp_login(a)
    old = store_study(ftp, "CT/2025-01-10", "P1", "20250110", "CT", files=8)     # ~8 s to fetch
    a.wait_drained()
    assert subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *old],
                          capture_output=True, timeout=30).returncode == 0
    store_study(ftp, "CT/2026-12-05", "P1", "20261205", "CT", files=1)
    wait_for(lambda: a.events("prefetched"), 30, what="the prior's first file")
    assert ftp_put(ftp, "big.bin", b"x" * 200_000).startswith("226")    # its upload takes ~9 s: the drain waits
    ftp.quit()
    wait_for(lambda: catalog_rows(a, "SELECT state FROM entries WHERE path = 'big.bin'") == [("uploading",)], 10)
    assert a.stop() == 0
    text = a.log_path.read_text()
    names = [e["event"] for e in (json.loads(line) for line in text.splitlines() if line.startswith("{"))]
    drain = names[names.index("draining"):]
    assert drain[-1] == "stopped" and "uploaded" in drain, drain       # the drain lasted the upload
    assert drain.count("prefetched") <= 1 and "prefetched" not in drain[drain.index("prior_prefetch_stopped"):], drain
    assert not {"prior_prefetch_failed", "prefetch_failed"} & set(drain), drain
    assert "Task was destroyed" not in text and "Traceback" not in text


def test_a_study_uid_taken_first_by_another_patients_file_still_gets_its_priors(agent_factory):
    """StudyUID squatting: a study is known by its StudyInstanceUID, first writer wins. Another user's file naming
    that UID and another PatientID before the study came (a worklist hands UIDs out at scheduling) bound the UID to
    the wrong patient, and the study's own files, known by then, never had their priors planned. Now each patient a
    study's files name is planned for, once; the row stays the first writer's (logged: study_uid_disputed)."""
    a = agent_factory(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "writer", "password": PASSWORD, "root": "/"}],
                      **{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3}).start()
    pacs = ftp_login(a)
    old = store_study(pacs, "CT/2025-01-10", "P", "20250110", "CT", files=2)
    a.wait_drained()
    assert subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *old],
                          capture_output=True, timeout=30).returncode == 0
    study = uid()
    writer = ftp_login(a, "writer")
    assert ftp_put(writer, f"up/load/{study}/x.dcm", dicom("X", study, "20261205", "CT", 0)).startswith("226")
    writer.quit()
    wait_for(lambda: len(a.events("prior_prefetch")) == 2, 30, what="the squatting file's plan")
    for i in range(2):
        assert ftp_put(pacs, f"CT/2026-12-05/{study}/{i}.dcm", dicom("P", study, "20261205", "CT", i)).startswith("226")
    pacs.quit()
    wait_for(lambda: set(old) <= cached_paths(a), 30, what="P's prior")
    assert catalog_rows(a, "SELECT patient FROM studies WHERE dir = ?", (study,)) == [("X",)]
    assert [(e["study"], e["user"]) for e in a.events("study_uid_disputed")] == [(study, "pacs")]
    assert a.events("prior_prefetch")[-1]["priors"] == [study_uid(old)]
