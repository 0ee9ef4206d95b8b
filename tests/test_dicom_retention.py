"""Retention by DICOM rule (issue 17): [[compliance.rules]] selecting by modality, SOP class, study date and patient
age become Object Lock retain-until dates on upload; `pacsgw retention apply` extends (never shortens) old
objects to a changed rule set, dry-run first, every change audited. Real agent, real SeaweedFS with Object Lock."""

from __future__ import annotations

import asyncio
import datetime
import ftplib
import io
import json
import subprocess
import sys
import time

import asyncssh
import numpy as np
import pytest
from pydicom.uid import generate_uid
from smbprotocol.exceptions import SMBOSError
from smbprotocol.header import NtStatus
from smbutil import Smb
from test_config import GOOD, write
from test_dicom import pacsgw

from agent.config import ComplianceConfig, ConfigError, RetentionRule, load
from agent.dicom.header import Header, parse
from agent.dicom.retention import DicomRetention
from bench.dicomgen import CT_IMAGE, ct_slice
from faultkit import ftp_login
from harness import PASSWORD, sftp_refuses_changes

UTC = datetime.timezone.utc
DAY = 86400


def rule(**kw) -> RetentionRule:
    return RetentionRule(**{"retention_days": 0, **kw})


def header(modality: str = "CT", date: str = "20190315", birth: str | None = None,
           sop_class: str = CT_IMAGE) -> Header:
    return Header(dicom=True, modality=modality, study_date=date, birth_date=birth, sop_class=sop_class,
                  study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4")


def test_dicom_rules_only_lengthen_the_path_terms():
    cfg = ComplianceConfig(worm=True, retention_days=100, rules=(
        rule(prefix="scratch/", retention_days=0),                               # a path rule: not retained
        rule(modality=("MG",), retention_days=3653),                             # mammography 10 years
        rule(until_age=25),                                                      # children until 25
        rule(prefix="CT/", study_from="20190101", study_to="20191231", retention_days=50, legal_hold=True),
        rule(sop_class=("1.2.3.999",), retention_days=5000),
        rule(modality=("CT",), retention_days=10),                               # shorter than the path terms
    ))
    r, now = DicomRetention(cfg), time.time()
    assert [i for i, _ in r.rules] == [1, 2, 3, 4, 5] and r.needs_birth_date
    assert [x.prefix for x in r.path_rules] == ["scratch/"]  # DICOM rules are no path rules

    def until(path: str, h: Header | None) -> datetime.date | None:
        lock = r.lock_for(path, now, h)
        return lock.until.date() if lock else None

    today = datetime.datetime.fromtimestamp(now, UTC).date()
    assert until("MG/a.dcm", header("MG")) == today + datetime.timedelta(days=3653)
    assert r.decide("MG/a.dcm", now, header("MG")).retention == "3653d"
    assert until("MG/a.dcm", None) == today + datetime.timedelta(days=100)      # not DICOM: path terms only
    assert until("MR/a.dcm", header("MR", birth="20200229")) == datetime.date(2045, 2, 28)
    assert r.decide("MR/a.dcm", now, header("MR", birth="20200229")).retention == "age25"
    assert until("MR/a.dcm", header("MR", birth="19500101")) == today + datetime.timedelta(days=100)  # grown up
    assert until("MR/a.dcm", header("MR", birth="garbage")) == today + datetime.timedelta(days=100)
    assert until("CT/a.dcm", header("CT")) == today + datetime.timedelta(days=100)   # 50 and 10 days: shorter
    assert r.lock_for("CT/a.dcm", now, header("CT")).legal_hold                      # … but the 2019 hold holds
    assert not r.lock_for("CT/a.dcm", now, header("CT", date="20200101")).legal_hold
    assert not r.lock_for("MR/a.dcm", now, header("MR", date="20190101")).legal_hold  # only under CT/
    assert until("x/a.dcm", header("OT", sop_class="1.2.3.999")) == today + datetime.timedelta(days=5000)
    assert until("scratch/a.dcm", header("MG")) == today + datetime.timedelta(days=3653)  # extends a 0 too
    assert until("scratch/a.dcm", header("OT")) is None
    assert until("MG/a.dcm.part", header("MG")) is None                               # temporary names never
    assert r.retention_class("MG/a.dcm.part", header("MG")) == "3653d"  # … but tagged for their final name
    assert DicomRetention(ComplianceConfig(worm=False, rules=cfg.rules)).lock_for("MG/a", now, header("MG")) is None
    why = r.decide("CT/a.dcm", now, header("CT", birth="20150601")).reason
    assert "until age 25" in why and "legal hold: compliance.rules[3]" in why


def test_dicom_rule_config_is_checked(tmp_path):
    def rules(text: str):
        return load(write(tmp_path, GOOD + "\n[compliance]\nworm = true\n" + text)).compliance.rules

    got = rules('[[compliance.rules]]\nmodality = ["MG"]\nretention_days = 3653\n'
                '[[compliance.rules]]\nretention_days = 0\nuntil_age = 25\nstudy_from = "2019-01-01"\n')
    assert got[0].modality == ("MG",) and got[0].prefix == "" and got[0].selects_dicom
    assert got[1].study_from == "20190101" and got[1].until_age == 25
    for bad, key in (('modality = "MG"', "modality"), ('modality = ["mg"]', "modality"),
                     ('sop_class = ["1.2.x"]', "sop_class"), ('study_to = "2019-13-01"', "study_to"),
                     ('study_from = "20190101"', "study_from"), ("until_age = 200", "until_age")):
        with pytest.raises(ConfigError, match=rf"compliance\.rules\[0\]\.{key}"):
            rules(f"[[compliance.rules]]\nretention_days = 1\n{bad}\n")


def test_retention_apply_refuses_without_worm_or_object_lock(tmp_path, agent_factory):
    import subprocess
    import sys

    def apply(config) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent.cli", "retention", "apply", "--dry-run", "--config",
                               str(config)], capture_output=True, text=True, timeout=120)

    out = apply(write(tmp_path, GOOD))
    assert out.returncode == 2 and "worm = false" in out.stderr
    out = apply(agent_factory(**{"compliance.worm": True}).config_path)  # the plain test bucket: no Object Lock
    assert out.returncode == 2 and "has no Object Lock" in out.stderr


# --- live: upload with DICOM rules, then a rule change applied to the old objects ---------------------


def retention(client, bucket: str, key: str) -> tuple[datetime.date, bool]:
    until = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]["RetainUntilDate"].date()
    try:
        hold = client.get_object_legal_hold(Bucket=bucket, Key=key)["LegalHold"]["Status"] == "ON"
    except client.exceptions.ClientError:
        hold = False
    return until, hold


def test_rules_lock_on_upload_and_apply_extends_old_objects(agent_factory, seaweed, locked_bucket):
    agent = agent_factory(**{"uplink.bucket": locked_bucket, "compliance.worm": True,
                             "compliance.retention_days": 1,
                             "compliance.rules": [{"modality": ["MG"], "retention_days": 3653}]}).start()
    rng = np.random.default_rng(11)

    def dcm(modality: str, birth: str) -> bytes:
        return ct_slice(rng, patient="P", study_uid=generate_uid(), series_uid=generate_uid(),
                        modality=modality, birth_date=birth, study_date="20190315", rows=32, cols=32)

    files = {"MG/a/1.dcm": dcm("MG", "19700101"), "CT/a/child.dcm": dcm("CT", "20150601"),
             "CT/a/adult.dcm": dcm("CT", "19500101"), "MG/b/2.dcm": dcm("MG", "19800101"),
             "notes.txt": b"not dicom"}
    assert parse(files["CT/a/child.dcm"], whole=True).birth_date == "20150601"
    f = ftp_login(agent)
    for d in ("MG", "MG/a", "MG/b", "CT", "CT/a"):
        f.mkd(d)
    for path, data in files.items():
        f.storbinary(f"STOR {path}.part" if path == "MG/b/2.dcm" else f"STOR {path}", io.BytesIO(data))
    agent.wait_drained()
    f.rename("MG/b/2.dcm.part", "MG/b/2.dcm")  # upload-then-rename: the copy gets the DICOM rule's lock
    f.quit()
    agent.wait_drained()
    client = seaweed.client()

    def key(path: str) -> str:
        return agent.prefix + path

    today = datetime.datetime.now(UTC).date()
    days = datetime.timedelta
    assert retention(client, locked_bucket, key("MG/a/1.dcm")) == (today + days(3653), False)
    assert retention(client, locked_bucket, key("MG/b/2.dcm")) == (today + days(3653), False)
    for path in ("CT/a/child.dcm", "CT/a/adult.dcm", "notes.txt"):
        assert retention(client, locked_bucket, key(path)) == (today + days(1), False), path
    for path in ("MG/a/1.dcm", "MG/b/2.dcm"):  # the renamed one keeps the tag its .part was given
        tags = client.get_object_tagging(Bucket=locked_bucket, Key=key(path))["TagSet"]
        assert {t["Key"]: t["Value"] for t in tags}["retention"] == "3653d", path

    # the rules change: children until 25, CT studies of 2019 for 30 days and held; mammography shortened
    agent.overrides["compliance.rules"] = [
        {"modality": ["MG"], "retention_days": 100},
        {"until_age": 25, "retention_days": 0},
        {"prefix": "CT/", "modality": ["CT"], "study_from": "2019-01-01", "study_to": "2019-12-31",
         "retention_days": 30, "legal_hold": True}]
    agent.write_config()
    plan = pacsgw(agent, "retention", "apply", "--dry-run")
    assert plan["dry_run"] and plan["objects"] == len(files) and plan["failed"] == []
    items = {i["path"]: i for i in plan["items"]}
    assert set(items) == {"CT/a/child.dcm", "CT/a/adult.dcm"}  # MG is never shortened, notes.txt not DICOM
    child, adult = items["CT/a/child.dcm"], items["CT/a/adult.dcm"]
    assert child["until"].startswith("2040-06-01") and "until age 25" in child["reason"] and child["legal_hold"]
    assert datetime.date.fromisoformat(adult["until"][:10]) - today in (days(30), days(29))
    assert "compliance.rules[2]" in adult["reason"] and adult["mode"] == "COMPLIANCE"
    assert retention(client, locked_bucket, key("CT/a/child.dcm")) == (today + days(1), False)  # dry: no change

    done = pacsgw(agent, "retention", "apply")
    assert not done["dry_run"] and done["changes"] == 2 and done["failed"] == []
    assert retention(client, locked_bucket, key("CT/a/child.dcm")) == (datetime.date(2040, 6, 1), True)
    until, hold = retention(client, locked_bucket, key("CT/a/adult.dcm"))
    assert until - today in (days(30), days(29)) and hold
    assert retention(client, locked_bucket, key("MG/a/1.dcm")) == (today + days(3653), False)
    audit = [json.loads(line) for line in (agent.workdir / "cache" / "audit" / "audit.jsonl").read_text().splitlines()]
    changed = [(a["op"], a["path"], a["result"]) for a in audit if a["protocol"] == "cli"]
    assert sorted(changed) == sorted((op, p, "ok") for op in ("retention-extend", "legal-hold")
                                     for p in ("CT/a/child.dcm", "CT/a/adult.dcm"))
    assert pacsgw(agent, "retention", "apply", "--dry-run")["changes"] == 0  # applied: nothing left to do


def test_a_file_a_dicom_rule_retains_cannot_be_changed(smb_agent, locked_bucket):
    """A file only a DICOM rule retains (the path rules keep nothing) is protected like one a path rule keeps:
    overwrite, rename and delete are refused over FTP (550), SFTP (permission denied) and SMB (access denied),
    from its cached header, and, once it is not cached here, from its object's lock and metadata (one HEAD);
    a file no rule keeps stays deletable. The objects in S3 are unchanged."""
    agent = smb_agent(**{"uplink.bucket": locked_bucket, "compliance.worm": True, "compliance.retention_days": 0,
                         "compliance.rules": [{"modality": ["MG"], "retention_days": 3653}]}).start()
    rng = np.random.default_rng(13)

    def dcm(modality: str) -> bytes:
        return ct_slice(rng, patient="P", study_uid=generate_uid(), series_uid=generate_uid(), modality=modality,
                        rows=32, cols=32)

    files = {"MG/a.dcm": dcm("MG"), "MG/cold.dcm": dcm("MG"), "CT/c.dcm": dcm("CT")}
    f = ftp_login(agent)
    f.mkd("MG")
    f.mkd("CT")
    for path, data in files.items():
        f.storbinary(f"STOR {path}", io.BytesIO(data))
    agent.wait_drained()
    until = (datetime.datetime.now(UTC) + datetime.timedelta(days=3653)).date()

    with pytest.raises(ftplib.error_perm, match=f"550 WORM: file is retained until {until:%Y-%m-%d}"):
        f.storbinary("STOR MG/a.dcm", io.BytesIO(b"tampered"))
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.delete("MG/a.dcm")
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.rename("MG/a.dcm", "MG/z.dcm")
    f.delete("CT/c.dcm")  # CT: no rule keeps it

    async def sftp() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as s:
            await sftp_refuses_changes(s, "MG/a.dcm", "MG/a.dcm", "MG/a.dcm")

    asyncio.run(sftp())
    smb = Smb(agent)
    for attempt in (lambda: smb.write("MG/a.dcm", b"tampered"), lambda: smb.rename("MG/a.dcm", "MG/y.dcm"),
                    lambda: smb.remove("MG/a.dcm")):
        with pytest.raises(SMBOSError) as e:
            attempt()
        assert e.value.ntstatus == NtStatus.STATUS_ACCESS_DENIED
    assert smb.read("MG/a.dcm") == files["MG/a.dcm"]
    smb.close()

    # not cached here any more: the object in S3 says it is retained
    evicted = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(agent.config_path),
                              "MG/cold.dcm"], capture_output=True, text=True, timeout=60)
    assert evicted.returncode == 0 and "evicted" in evicted.stdout, evicted.stdout + evicted.stderr
    with pytest.raises(ftplib.error_perm, match=f"550 WORM: file is retained until {until:%Y-%m-%d}"):
        f.delete("MG/cold.dcm")
    with pytest.raises(ftplib.error_perm, match="550 WORM"):
        f.rename("MG/cold.dcm", "MG/warm.dcm")
    assert sorted(f.nlst("MG")) in (["MG/a.dcm", "MG/cold.dcm"], ["a.dcm", "cold.dcm"])
    f.quit()
    agent.wait_drained()
    client = agent.store.client()
    for path in ("MG/a.dcm", "MG/cold.dcm"):
        body = client.get_object(Bucket=locked_bucket, Key=agent.prefix + path)["Body"].read()
        assert body == files[path], path


def test_without_the_line_a_file_not_cached_is_not_released(agent_factory, private_seaweed):
    """A file not cached here whose terms only its object can tell (a DICOM rule applies): with object storage
    down, its delete is refused as unavailable (FTP 451), not let through on a guess."""
    private_seaweed.create_bucket("locked-offline", object_lock=True)
    agent = agent_factory(private_seaweed, **{"uplink.bucket": "locked-offline", "compliance.worm": True,
                                              "compliance.retention_days": 0,
                                              "compliance.rules": [{"modality": ["MG"], "retention_days": 3653}]})
    agent.start()
    f = ftp_login(agent)
    mammogram = ct_slice(np.random.default_rng(1), patient="P", modality="MG", rows=16, cols=16,
                         study_uid=generate_uid(), series_uid=generate_uid())
    f.storbinary("STOR cold.dcm", io.BytesIO(mammogram))
    agent.wait_drained()
    evicted = subprocess.run([sys.executable, "-m", "agent.cli", "evict", "--config", str(agent.config_path),
                              "cold.dcm"], capture_output=True, text=True, timeout=60)
    assert evicted.returncode == 0 and "evicted" in evicted.stdout, evicted.stdout + evicted.stderr
    private_seaweed.stop()
    with pytest.raises(ftplib.error_temp, match="451 .*retention cannot be checked"):
        f.delete("cold.dcm")
    f.quit()
    assert agent.events("retention_unchecked")


def test_retention_apply_prints_bucket_keys_escaped(agent_factory, seaweed, locked_bucket):
    """retention apply reads every key in the bucket, including those another S3 client wrote (the FTP/SFTP/SMB
    listings hide names with control characters, the bucket does not), and printed them as they were: a key
    holding an escape sequence reached the admin's terminal and could clear or rewrite it. Now printed with
    control characters escaped (\\x1b); --json was already escaped by JSON."""
    agent = agent_factory(**{"uplink.bucket": locked_bucket, "compliance.worm": True,
                             "compliance.retention_days": 1}).start()
    evil = "evil\x1b[2J\x1b]0;owned\x07/1.dcm"
    seaweed.client().put_object(Bucket=locked_bucket, Key=agent.prefix + evil, Body=b"written elsewhere")
    for dry in (["--dry-run"], []):
        r = subprocess.run([sys.executable, "-m", "agent.cli", "retention", "apply", *dry, "--config",
                            str(agent.config_path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
        assert "evil\\x1b[2J\\x1b]0;owned\\x07/1.dcm: none -> " in r.stdout, r.stdout
