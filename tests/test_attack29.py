"""Attacks on a running agent (round 29): what a PACS client controls beyond names, the bytes of a DICOM file, against
a real agent and a real SeaweedFS. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import datetime
import ftplib
import io

import numpy as np
import pytest
from pydicom.uid import generate_uid
from test_dicom_retention import retention

from bench.dicomgen import ct_slice
from harness import PASSWORD

UTC = datetime.timezone.utc


def test_a_birth_date_in_the_future_neither_blocks_the_upload_nor_retains_the_file_for_ever(agent_factory,
                                                                                             locked_bucket):
    """`until_age` counted from the header's PatientBirthDate, which the PACS client writes: 9999-12-31 plus 25 years
    is past datetime's year 9999, and the retention decision raised. The upload failed and was retried for ever (the
    queue never drained), and a DELE of the file was an internal error. 2999-01-01 locked the object until 3024 in
    COMPLIANCE mode, which nobody can shorten. A birth date after the file was stored is no birth date."""
    agent = agent_factory(**{"uplink.bucket": locked_bucket, "compliance.worm": True,
                             "compliance.retention_days": 1,
                             "compliance.rules": [{"until_age": 25, "retention_days": 0}]}).start()
    rng = np.random.default_rng(29)

    def dcm(birth: str) -> bytes:
        return ct_slice(rng, patient="P", study_uid=generate_uid(), series_uid=generate_uid(), birth_date=birth,
                        rows=16, cols=16)

    files = {"overflow.dcm": dcm("99991231"), "future.dcm": dcm("29990101"), "child.dcm": dcm("20150601")}
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    for path, data in files.items():
        assert f.storbinary(f"STOR {path}", io.BytesIO(data)).startswith("226"), path
    agent.wait_drained(timeout=20)
    today = datetime.datetime.now(UTC).date()
    with pytest.raises(ftplib.error_perm, match=f"550 WORM: file is retained until {today + datetime.timedelta(1)}"):
        f.delete("overflow.dcm")
    f.quit()
    client = agent.store.client()
    assert retention(client, locked_bucket, agent.prefix + "child.dcm") == (datetime.date(2040, 6, 1), False)
    for path in ("overflow.dcm", "future.dcm"):
        assert retention(client, locked_bucket, agent.prefix + path) == (today + datetime.timedelta(1), False), path
