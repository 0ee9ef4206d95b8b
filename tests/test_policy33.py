"""The prior planner's cold start in the live agent (docs/replay.md, round 31): a kind of prior not judged yet (a
new box) has one fetch out at a time, the next waits for its outcome, and /healthz and /status say so."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from test_priors_live import store_study, study_uid

from faultkit import cached_paths, catalog_rows, ftp_get, ftp_login, wait_for


def test_a_new_box_fetches_a_kind_of_prior_again_only_once_the_last_one_came_back(agent_factory):
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3}).start()
    ftp = ftp_login(a)
    # two patients with a CT prior each, aged out to S3: each new CT's prior is rank 0, same modality, recent
    p1, p2 = (store_study(ftp, f"CT/2026-10-0{i}", f"P{i}", f"2026100{i}", "CT") for i in (1, 2))
    a.wait_drained()
    wait_for(lambda: len(catalog_rows(a, "SELECT dir FROM studies")) == 2, 30, what="both studies recorded")
    out = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(a.config_path), *p1, *p2],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not cached_paths(a) & {*p1, *p2}

    def plan_of(study: dict[str, bytes]) -> dict:
        uid = study_uid(study)
        wait_for(lambda: uid in {e["study"] for e in a.events("prior_prefetch")}, 30, what="its plan")
        return next(e for e in a.events("prior_prefetch") if e["study"] == uid)

    # P1's new CT brings its prior; P2's, planned while that fetch's outcome is out, does not
    assert plan_of(store_study(ftp, "CT/2026-11-23", "P1", "20261123", "CT", files=1))["priors"] == [study_uid(p1)]
    wait_for(lambda: set(p1) <= cached_paths(a), 30, what="P1's prior cached")
    assert plan_of(store_study(ftp, "CT/2026-11-24", "P2", "20261124", "CT", files=1))["priors"] == []
    assert not cached_paths(a) & set(p2)
    h = a.health()["eviction"]
    assert h["prior_mode"] == "cold start: 0 outcomes, 0 of 12 kinds of prior judged, 1 of their fetches unsettled", h
    with urllib.request.urlopen(f"http://127.0.0.1:{a.http_port}/status", timeout=10) as r:
        assert "priors: cold start: 0 outcomes" in r.read().decode()

    # P1's prior is opened: the next plan settles it, and P2's next new study brings P2's prior
    for path, data in p1.items():
        assert ftp_get(ftp, path) == data
    assert plan_of(store_study(ftp, "CT/2026-11-25", "P2", "20261125", "CT", files=1))["priors"] == [study_uid(p2)]
    ftp.quit()
    wait_for(lambda: set(p2) <= cached_paths(a), 30, what="P2's prior cached")
    assert a.health()["eviction"]["prior_mode"].startswith("cold start: 1 outcomes")
