"""The audit trail: every operation of a scripted session, with the right user, protocol and result."""

from __future__ import annotations

import asyncio
import calendar
import ftplib
import io
import json
import time
from datetime import datetime

import asyncssh
import pytest
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb

from harness import BUCKET, PASSWORD


def audit_records(agent) -> list[dict]:
    path = agent.workdir / "cache" / "audit" / "audit.jsonl"
    files = sorted(path.parent.glob("audit-*.jsonl")) + [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_scripted_session_is_audited(agent_factory):
    agent = agent_factory(users=[{"name": "ct", "password": PASSWORD, "root": "/CT"},
                                 {"name": "pacs", "password": PASSWORD}]).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    with pytest.raises(ftplib.error_perm):
        f.login("ct", "wrong")
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("ct", PASSWORD)
    f.mkd("2026-11-23")
    f.storbinary("STOR 2026-11-23/a.dcm.part", io.BytesIO(b"x" * 1234))
    f.rename("2026-11-23/a.dcm.part", "2026-11-23/a.dcm")
    f.retrbinary("RETR 2026-11-23/a.dcm", io.BytesIO().write)
    f.nlst("2026-11-23")
    with pytest.raises(ftplib.error_perm):
        f.retrbinary("RETR ../MR/secret.dcm", io.BytesIO().write)
    with pytest.raises(ftplib.error_perm):
        f.delete("2026-11-23/missing.dcm")
    f.delete("2026-11-23/a.dcm")
    f.rmd("2026-11-23")
    f.quit()

    async def sftp() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            async with s.open("MR/b.dcm", "wb") as fh:
                await fh.write(b"y" * 10)
            async with s.open("MR/b.dcm", "rb") as fh:
                await fh.read()
            await s.remove("MR/b.dcm")

    asyncio.run(sftp())
    time.sleep(0.2)
    got = [(r["user"], r["protocol"], r["op"], r["path"], r["result"].split(":")[0], r.get("bytes"))
           for r in audit_records(agent)]
    assert got == [
        ("ct", "ftp", "login", "", "error", None),
        ("ct", "ftp", "login", "", "ok", None),
        ("ct", "ftp", "mkdir", "CT/2026-11-23", "ok", None),
        ("ct", "ftp", "store", "CT/2026-11-23/a.dcm.part", "ok", 1234),
        ("ct", "ftp", "rename", "CT/2026-11-23/a.dcm.part", "ok", None),
        ("ct", "ftp", "retrieve", "CT/2026-11-23/a.dcm", "ok", 1234),
        ("ct", "ftp", "list", "CT/2026-11-23", "ok", None),
        ("ct", "ftp", "refused", "../MR/secret.dcm", "error", None),
        ("ct", "ftp", "delete", "CT/2026-11-23/missing.dcm", "error", None),
        ("ct", "ftp", "delete", "CT/2026-11-23/a.dcm", "ok", None),
        ("ct", "ftp", "rmdir", "CT/2026-11-23", "ok", None),
        ("pacs", "sftp", "login", "", "ok", None),
        ("pacs", "sftp", "store", "MR/b.dcm", "ok", 10),
        ("pacs", "sftp", "retrieve", "MR/b.dcm", "ok", 10),
        ("pacs", "sftp", "delete", "MR/b.dcm", "ok", None),
    ]
    records = audit_records(agent)
    assert records[4]["to"] == "CT/2026-11-23/a.dcm"
    assert all(r["peer"].startswith("127.0.0.1:") for r in records)
    assert PASSWORD not in (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text()
    assert "NotFound" in records[8]["result"]


def test_audit_rotates_and_ships_outside_the_namespace(agent_factory):
    agent = agent_factory(prefix="shiptest/", **{"audit.max_bytes": 2000, "audit.ship": True}).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    for i in range(30):
        f.storbinary(f"STOR f{i}.dcm", io.BytesIO(b"z"))
    names = f.nlst()
    f.quit()
    assert "pacsgw-audit" not in names
    client = agent.store.client()
    deadline = time.monotonic() + 30  # shipped right after each rotation
    keys: list[str] = []
    while time.monotonic() < deadline and not keys:
        time.sleep(1)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="pacsgw-audit/shiptest/")
                .get("Contents", [])]
    assert keys, "no rotated audit file reached the bucket"
    body = client.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read().decode()
    assert all(json.loads(line)["user"] == "pacs" for line in body.splitlines())


def test_smb_session_is_audited(smb_agent, locked_bucket):
    """SMB: smbd does each session's file access as that user's Unix account; the FUSE layer maps the uid
    back to the [[users]] name. A WORM bucket gives the gateway a refusal to record (Samba refuses bad names
    and paths itself, before they reach the gateway; its own log has those)."""
    agent = smb_agent(**{"uplink.bucket": locked_bucket, "compliance.worm": True},
                      users=[{"name": "ct", "password": "ct-test-pw", "root": "/CT"},
                             {"name": "pacs", "password": PASSWORD}]).start()
    ct = Smb(agent, "ct", "ct-test-pw")
    ct.makedirs("day")
    ct.write("day/a.dcm.part", b"x" * 1234)
    ct.rename("day/a.dcm.part", "day/a.dcm")
    assert ct.read("day/a.dcm") == b"x" * 1234
    assert ct.listdir("day") == ["a.dcm"]
    with pytest.raises(SMBOSError) as refused:
        ct.remove("day/a.dcm")  # retained: WORM
    assert refused.value.ntstatus == NtStatus.STATUS_ACCESS_DENIED
    ct.close()
    pacs = Smb(agent)
    pacs.makedirs("MR")
    pacs.write("MR/b.dcm.tmp", b"y" * 10)
    pacs.remove("MR/b.dcm.tmp")
    pacs.close()
    time.sleep(0.2)
    records = audit_records(agent)
    got = [(r["user"], r["protocol"], r["op"], r["path"], r["result"].split(":")[0], r.get("bytes"))
           for r in records if r["op"] not in ("list", "login")]  # smbd also lists directories for its own checks
    assert got == [
        ("ct", "smb", "mkdir", "CT/day", "ok", None),
        ("ct", "smb", "store", "CT/day/a.dcm.part", "ok", 1234),
        ("ct", "smb", "rename", "CT/day/a.dcm.part", "ok", None),
        ("ct", "smb", "retrieve", "CT/day/a.dcm", "ok", 1234),
        ("ct", "smb", "delete", "CT/day/a.dcm", "error", None),
        ("pacs", "smb", "mkdir", "MR", "ok", None),
        ("pacs", "smb", "store", "MR/b.dcm.tmp", "ok", 10),
        ("pacs", "smb", "delete", "MR/b.dcm.tmp", "ok", None),
    ]
    assert ("ct", "smb", "list", "CT/day", "ok") in [(r["user"], r["protocol"], r["op"], r["path"], r["result"])
                                                     for r in records]
    assert {r["user"] for r in records} == {"ct", "pacs"}
    # Logins come from Samba's auth log, which the agent follows: in the trail, not in step with the file ops.
    assert sorted((r["user"], r["result"]) for r in records if r["op"] == "login") == [("ct", "ok"), ("pacs", "ok")]
    assert all(r["peer"].partition(":")[0] == "127.0.0.1" for r in records)  # logins: no port
    assert [r["to"] for r in records if r["op"] == "rename"] == ["CT/day/a.dcm"]
    assert [r["result"] for r in records if r["op"] == "delete"][0].startswith("error: PermissionDenied: WORM")


async def test_a_rotation_by_another_thread_wakes_the_shipper_at_once(tmp_path):
    """The login guard records from its own thread (agent.auth): a rotation there must wake the shipper on the
    event loop through the loop (an asyncio.Event set from another thread wakes nobody until the loop's next
    timer: here the 5 s timeout)."""
    import threading

    from agent.audit import AuditLog, Who
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=300, keep=5)
    audit.loop = asyncio.get_running_loop()   # as audit.ship does
    audit.rotated_event.clear()
    who = Who("pacs", "sftp", "127.0.0.1")
    start = time.monotonic()
    threading.Thread(target=lambda: [audit.record(who, "login", "", "refused") for _ in range(10)]).start()
    await asyncio.wait_for(audit.rotated_event.wait(), 5)
    assert time.monotonic() - start < 2, "the shipper was not woken by a rotation on another thread"
    assert audit.rotated()
    audit.close()


def test_rotated_files_are_named_by_utc_time_as_their_records(tmp_path, monkeypatch):
    """Rotated files are shipped and sorted by name, and their records carry UTC times: a name in the box's local
    time (a zone 9 hours ahead here) would sort out of order across a change of zone or of summer time."""
    from agent.audit import AuditLog, Who
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=300, keep=5)
        for _ in range(3):
            audit.record(Who("pacs", "ftp", "10.0.0.1:1"), "store", "x.dcm")
        audit.close()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    name = audit.rotated()[0].name
    record = json.loads(audit.rotated()[0].read_text().splitlines()[0])
    stamp = time.strptime(name.split("-")[1], "%Y%m%dT%H%M%S")
    written = datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
    assert abs(calendar.timegm(stamp) - written) < 60, (name, record["time"])


def test_a_record_the_disk_refuses_is_logged_not_raised(tmp_path, capsys):
    """The record of an operation must not fail the operation: a write the disk refuses (/dev/full: ENOSPC,
    a real device, not a mock) is reported in the operational log; the next record on a good disk is written
    whole, one JSON line each."""
    from pathlib import Path

    from agent.audit import AuditLog, Who

    who = Who("pacs", "ftp", "127.0.0.1")
    full = AuditLog(Path("/dev/full"), max_bytes=0, keep=1)
    full.record(who, "retrieve", "CT/a.dcm", nbytes=10)  # no exception
    full.close()
    said = capsys.readouterr()
    assert "audit_write_failed" in said.out + said.err
    good = AuditLog(tmp_path / "audit.jsonl", max_bytes=0, keep=1)
    for i in range(3):
        good.record(who, "retrieve", f"CT/{i}.dcm", nbytes=i, cached=True)
    good.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["path"], r["bytes"], r["cached"], r["user"]) for r in records] == [
        (f"CT/{i}.dcm", i, True, "pacs") for i in range(3)]


def test_a_name_that_is_not_utf8_is_recorded_with_json_escapes(tmp_path):
    """FTP hands names that are not UTF-8 on as surrogate escapes; their refusal is audited, not lost (the record
    raised UnicodeEncodeError into the refusal: FTP answered 451 instead of 553)."""
    from agent.audit import AuditLog, Who
    log = AuditLog(tmp_path / "audit.log", 1 << 20, 2, True)
    name = b"\xc0\xaf..\xc0\xafMR".decode("utf-8", "surrogateescape")
    log.record(Who("ct", "ftp", "127.0.0.1:1"), "refused", name, "error: BadPath")
    log.close()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    assert json.loads(line)["path"] == name
