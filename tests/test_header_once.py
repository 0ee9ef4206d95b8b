"""A stored DICOM file's header is parsed once, at its commit, for the prior planner and for its upload's metadata
(docs/benchmarks.md §37). Before, the planner's queue and the uploader's Describer each read and parsed it.

The agent runs in this process (the parses are counted by wrapping agent.dicom.header.parse), over real FTP and a
real SeaweedFS."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.config import load
from agent.daemon import Agent
from agent.dicom import header
from bench.dicomgen import ct_slice
from faultkit import catalog_rows, ftp_login, ftp_put


@pytest.mark.parametrize("mode", ["through", "back"])
def test_each_stored_files_header_is_parsed_once(agent_factory, monkeypatch, mode):
    a = agent_factory(**{"prefetch.enabled": False, "prefetch.priors": True, "prefetch.study_depth": 3,
                         "uplink.write_mode": mode})
    parsed: list[int] = []
    parse = header.parse

    def counted(head: bytes, whole: bool) -> header.Header:
        parsed.append(len(head))
        return parse(head, whole)

    monkeypatch.setattr(header, "parse", counted)
    rng = np.random.default_rng(7)
    studies = {f"1.2.826.0.1.3680043.8.498.{s}": f"P{s}" for s in (11, 12)}
    files = {f"CT/2025-01-10/{study}/{i}.dcm": ct_slice(rng, patient=patient, study_uid=study, series_uid=study + ".1",
                                                         instance=i, rows=64, cols=64)
             for study, patient in studies.items() for i in range(3)}

    def store() -> None:
        ftp = ftp_login(a)
        for path, body in files.items():
            assert ftp_put(ftp, path, body).startswith("226")
        ftp.quit()
        a.wait_drained()

    async def run() -> None:
        agent = Agent(load(a.config_path))
        await agent.start()
        try:
            await asyncio.to_thread(store)
        finally:
            await agent.stop()

    asyncio.run(run())
    assert len(parsed) == len(files)
    # both readers got it: the planner recorded each study, each upload's study-index row (its S3 metadata) is there
    assert sorted(catalog_rows(a, "SELECT dir, patient FROM studies")) == sorted(studies.items())
    assert sorted(catalog_rows(a, "SELECT path, study_uid FROM dicom_objects")) == sorted(
        (path, path.split("/")[2]) for path in files)
