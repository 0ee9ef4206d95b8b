"""Attacks on a running agent (round 29): what a PACS client controls beyond names, the bytes of a DICOM file, against
the real header parser, a real agent and SeaweedFS. Each test reproduces one attack that worked and checks it no
longer does."""

from __future__ import annotations

import datetime
import ftplib
import io
import struct
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid
from test_dicom_retention import retention

from agent.dicom.header import HEADER_MAX, TOO_COMPLEX, parse
from bench.dicomgen import ct_slice
from faultkit import ftp_login

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
    f = ftp_login(agent)
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


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element."""
    if vr == b"SQ":
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def test_a_value_that_says_it_is_a_sequence_is_not_parsed_outside_the_read_bound():
    """pydicom reads a header under PYDICOM_READS (5-7 ms of CPU whatever it holds), but converts the values asked
    of it (the first file meta element, TransferSyntaxUID, PatientID) from their bytes on a reader of its own: one
    given the VR SQ and 256 KiB of empty items was parsed into 32 000 data sets, 0.5-0.7 s of CPU a file, and for a
    write-through upload on the agent's event loop (the uploader reads the header of the bytes it kept there): every
    client of the process waited. None of these values is a sequence: such a header is refused as too complex."""
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * (HEADER_MAX // 8 - 40)  # the header fills HEADER_MAX
    explicit_le = _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1\0")
    uids = _element(0x20, 0xD, b"UI", b"1.2\0") + _element(0x20, 0xE, b"UI", b"1.3\0")
    big_endian = _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.2\0")
    assert not parse(b"\0" * 128 + b"DICM" + big_endian, whole=True).problem.startswith(TOO_COMPLEX)  # pydicom imported
    for where, body in (("PatientID", explicit_le + _element(0x10, 0x20, b"SQ", items)),
                        ("TransferSyntaxUID", _element(2, 0x10, b"SQ", items)),
                        ("the first file meta element", _element(2, 2, b"SQ", items) + explicit_le)):
        head = b"\0" * 128 + b"DICM" + body + uids
        assert len(head) <= HEADER_MAX
        t0 = time.process_time()
        h = parse(head, whole=True)
        assert time.process_time() - t0 < 0.1, where
        assert h.problem.startswith(TOO_COMPLEX) and h.patient is None, (where, h.problem)
