"""WORM: S3 Object Lock retention, legal hold and versioning (real SeaweedFS), refusals at every front end."""

from __future__ import annotations

import asyncio
import datetime
import ftplib
import io

import asyncssh
import botocore.exceptions
import pytest

from harness import PASSWORD, sha256

LOCKED_BUCKET = "pacs-worm"


@pytest.fixture(scope="module")
def locked_bucket(seaweed):
    seaweed.create_bucket(LOCKED_BUCKET, object_lock=True)
    return LOCKED_BUCKET


def ftp(agent) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    return f


def test_worm_locks_objects_and_refuses_changes(agent_factory, seaweed, locked_bucket):
    agent = agent_factory(**{"uplink.bucket": locked_bucket, "compliance.worm": True,
                             "compliance.retention_days": 5479,
                             "compliance.rules": [{"prefix": "inpatient/", "retention_days": 10958},
                                                  {"prefix": "litigation/", "retention_days": 1,
                                                   "legal_hold": True}]}).start()
    client = seaweed.client()
    f = ftp(agent)
    f.storbinary("STOR outpatient/a.dcm", io.BytesIO(b"outpatient image"))
    f.storbinary("STOR inpatient/b.dcm.part", io.BytesIO(b"inpatient image"))  # the usual upload pattern …
    f.rename("inpatient/b.dcm.part", "inpatient/b.dcm")                       # … still works under WORM
    f.storbinary("STOR litigation/c.dcm", io.BytesIO(b"held"))
    agent.wait_drained()

    def retention(path: str) -> tuple[str, datetime.date]:
        r = client.get_object_retention(Bucket=locked_bucket, Key=agent.prefix + path)["Retention"]
        return r["Mode"], r["RetainUntilDate"].date()

    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert retention("outpatient/a.dcm") == ("COMPLIANCE", today + datetime.timedelta(days=5479))
    assert retention("inpatient/b.dcm") == ("COMPLIANCE", today + datetime.timedelta(days=10958))
    hold = client.get_object_legal_hold(Bucket=locked_bucket, Key=agent.prefix + "litigation/c.dcm")
    assert hold["LegalHold"]["Status"] == "ON"
    got = client.get_object(Bucket=locked_bucket, Key=agent.prefix + "inpatient/b.dcm")["Body"].read()
    assert sha256(got) == sha256(b"inpatient image")

    # FTP: overwrite, delete, rename are refused with 550 and the reason
    with pytest.raises(ftplib.error_perm, match="550 WORM: file is retained until"):
        f.storbinary("STOR outpatient/a.dcm", io.BytesIO(b"tampered"))
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.delete("inpatient/b.dcm")
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.rename("outpatient/a.dcm", "outpatient/z.dcm")
    with pytest.raises(ftplib.error_perm, match="550 WORM: file is under legal hold"):
        f.delete("litigation/c.dcm")
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.rename("outpatient", "moved")
    f.quit()

    async def sftp() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await s.remove("outpatient/a.dcm")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                async with s.open("outpatient/a.dcm", "wb") as fh:
                    await fh.write(b"tampered")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await s.posix_rename("inpatient/b.dcm", "inpatient/x.dcm")
            async with s.open("outpatient/a.dcm", "rb") as fh:
                assert await fh.read() == b"outpatient image"

    asyncio.run(sftp())
    refusals = [e for e in agent.events("ftp_error") + agent.events("sftp_error") if "WORM" in e["reason"]]
    assert len(refusals) == 8

    # S3 API with normal credentials: the locked version cannot be deleted or shortened
    key = agent.prefix + "outpatient/a.dcm"
    version = client.head_object(Bucket=locked_bucket, Key=key)["VersionId"]
    with pytest.raises(botocore.exceptions.ClientError):
        client.delete_object(Bucket=locked_bucket, Key=key, VersionId=version)
    assert client.get_object(Bucket=locked_bucket, Key=key, VersionId=version)["Body"].read() == b"outpatient image"
    # versioning: the temporary .part key's delete left a marker, not a hole in history
    versions = client.list_object_versions(Bucket=locked_bucket, Prefix=agent.prefix + "inpatient/")
    assert any(m["Key"].endswith("b.dcm.part") for m in versions.get("DeleteMarkers", []))


def test_worm_refuses_a_bucket_without_object_lock(agent_factory):
    agent = agent_factory(**{"compliance.worm": True})
    with pytest.raises(RuntimeError, match="has no Object Lock"):
        agent.start()
