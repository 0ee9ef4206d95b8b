"""Prior planning with serving workers (issues 13 + 14): with `[server] workers = 2` a study whose first file a worker
stored was never recorded for prior planning (only the owner's gateway told its PriorFetcher), so its patient's
evicted priors were never fetched. The worker now queues the study in the catalog and the owner plans it as if stored
there, the writing user's cap counted. Real parts: a `pacsgw run` owner with one worker process, FTP sessions the
kernel handed to either process, SeaweedFS, pydicom files."""

from __future__ import annotations

import time

from test_attack34 import archive_evicted
from test_priors_live import dicom, store_study, study_uid
from test_workers import live_worker, serving_pid

from faultkit import cached_paths, catalog_rows, ftp_login, ftp_put
from harness import PASSWORD


def ftp_on(agent, pid: int, pids: set[int], user: str):
    """A logged-in FTP session of user that the kernel handed to process pid (sessions landing elsewhere closed)."""
    for _ in range(60):
        ftp = ftp_login(agent, user)
        if serving_pid(ftp.sock.getsockname()[1], pids) == pid:
            return ftp
        ftp.quit()
    raise AssertionError(f"no FTP session landed on process {pid}")


def wait(what: str, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_study_stored_through_a_worker_brings_its_patients_evicted_prior_back(agent_factory):
    a = agent_factory(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "writer", "password": PASSWORD, "root": "/"}],
                      **{"server.workers": 2, "prefetch.enabled": False, "prefetch.priors": True,
                         "prefetch.study_depth": 3, "prefetch.priors_per_user_hour": 1}).start()
    worker = live_worker(a)
    pids = {a.proc.pid, worker}
    # The archive (one earlier CT per patient), stored through the owner and evicted: in S3 only.
    pacs = ftp_on(a, a.proc.pid, pids, "pacs")
    archive = archive_evicted(a, pacs, 2, files=2)
    pacs.quit()

    # The writer's new study of P0, stored through the worker: the owner plans it, and its prior comes back before
    # anyone reads it.
    on_worker, on_owner = ftp_on(a, worker, pids, "writer"), ftp_on(a, a.proc.pid, pids, "writer")
    new = store_study(on_worker, "CT/2026-12-05", "P0", "20261205", "CT", files=2)
    wait("P0's prior fetched", lambda: set(archive["P0"]) <= cached_paths(a))
    plans = [e for e in a.events("prior_prefetch") if e["study"] == study_uid(new)]
    assert len(plans) == 1 and plans[0]["priors"] == [study_uid(archive["P0"])], plans
    assert catalog_rows(a, f"SELECT patient, modality FROM studies WHERE dir = '{study_uid(new)}'") == [("P0", "CT")]
    # A later file of it through the owner plans nothing again.
    path = f"CT/2026-12-05/{study_uid(new)}/2.dcm"
    assert ftp_put(on_owner, path, dicom("P0", study_uid(new), "20261205", "CT", 2)).startswith("226")

    # The writer's next new study, through the worker: over the writer's cap (1 an hour), recorded, not planned.
    later = store_study(on_worker, "CT/2026-12-05", "P1", "20261205", "CT", files=1)
    wait("P1's study recorded", lambda: catalog_rows(
        a, f"SELECT COUNT(*) FROM studies WHERE dir = '{study_uid(later)}'") == [(1,)])
    wait("the writer's plan capped", lambda: [e["study"] for e in a.events("prior_plans_capped")
                                              if e["user"] == "writer"] == [study_uid(later)], 10)
    assert not cached_paths(a) & set(archive["P1"])
    assert len([e for e in a.events("prior_prefetch") if e["study"] == study_uid(new)]) == 1
    assert catalog_rows(a, "SELECT COUNT(*) FROM worker_studies") == [(0,)]   # every queued study taken in
    on_worker.quit()
    on_owner.quit()
