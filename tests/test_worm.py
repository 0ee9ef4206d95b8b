"""WORM: S3 Object Lock retention, legal hold and versioning (real SeaweedFS), refusals at every front end."""

from __future__ import annotations

import asyncio
import datetime
import ftplib
import io

import asyncssh
import botocore.exceptions
import pytest
import smbclient
from smbprotocol.exceptions import SMBOSError, SMBResponseException
from smbprotocol.header import NtStatus
from smbutil import Smb

from harness import PASSWORD, sftp_refuses_changes, sha256


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
            await sftp_refuses_changes(s, "outpatient/a.dcm", "outpatient/a.dcm", "inpatient/b.dcm")
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


def test_worm_over_smb(smb_agent, locked_bucket):
    """SMB: overwriting, truncating, writing into, renaming (also onto) and deleting a retained file, moving its
    directory, are refused with STATUS_ACCESS_DENIED (the FUSE layer turns the gateway's WORM refusal into
    EACCES, Samba that into the NT status); each refusal is logged; the locked object in S3 is unchanged."""
    agent = smb_agent(**{"uplink.bucket": locked_bucket, "compliance.worm": True}).start()
    smb = Smb(agent)
    smb.makedirs("outpatient")
    smb.write("outpatient/a.dcm.part", b"outpatient image")
    smb.rename("outpatient/a.dcm.part", "outpatient/a.dcm")  # upload-then-rename still works under WORM
    smb.write("outpatient/b.dcm.part", b"another image")
    key = agent.prefix + "outpatient/a.dcm"
    client = agent.store.client()
    locked = client.head_object(Bucket=locked_bucket, Key=key)
    assert locked["ObjectLockMode"] == "COMPLIANCE"

    def truncate() -> None:
        with smbclient.open_file(smb.p("outpatient/a.dcm"), mode="r+b", **smb.kw) as f:
            f.truncate(3)

    def write_in_place() -> None:
        with smbclient.open_file(smb.p("outpatient/a.dcm"), mode="r+b", buffering=0, **smb.kw) as f:
            f.write(b"X")

    attempts = {
        "overwrite": lambda: smb.write("outpatient/a.dcm", b"tampered"),
        "truncate": truncate,
        "write in place": write_in_place,
        "rename": lambda: smb.rename("outpatient/a.dcm", "outpatient/z.dcm"),
        "replace onto": lambda: smb.replace("outpatient/b.dcm.part", "outpatient/a.dcm"),
        "delete": lambda: smb.remove("outpatient/a.dcm"),
        "directory rename": lambda: smb.rename("outpatient", "moved"),
    }
    refused = {}
    for name, attempt in attempts.items():
        with pytest.raises((SMBOSError, SMBResponseException)) as e:  # smbclient's path calls, a raw WRITE
            attempt()
        refused[name] = e.value.ntstatus if isinstance(e.value, SMBOSError) else e.value.status
    assert refused == {name: NtStatus.STATUS_ACCESS_DENIED for name in attempts}
    assert smb.listdir("outpatient") == ["a.dcm", "b.dcm.part"]
    assert smb.read("outpatient/a.dcm") == b"outpatient image"
    smb.close()

    worm_events = [e for e in agent.events("smb_error") if e["reason"].startswith("WORM")]
    assert {e["kind"] for e in worm_events} == {"PermissionDenied"}
    assert {e["path"] for e in worm_events} == {"outpatient/a.dcm", "outpatient"}
    assert len(worm_events) >= len(attempts)
    versions = client.list_object_versions(Bucket=locked_bucket, Prefix=key)
    assert [v["VersionId"] for v in versions["Versions"] if v["Key"] == key] == [locked["VersionId"]]
    assert not [m for m in versions.get("DeleteMarkers", []) if m["Key"] == key]
    assert client.get_object(Bucket=locked_bucket, Key=key)["Body"].read() == b"outpatient image"
