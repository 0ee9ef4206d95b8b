"""The audit trail: every operation of a scripted session, with the right user, protocol and result."""

from __future__ import annotations

import asyncio
import ftplib
import io
import json
import time

import asyncssh
import pytest

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
