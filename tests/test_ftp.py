"""FTP round trips (ftplib and aioftp's client) against a real agent and real S3 servers."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import time

import aioftp
import pytest

from harness import PASSWORD, s3_objects, sha256


def ftp(agent, user: str = "pacs", password: str = PASSWORD) -> ftplib.FTP:
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login(user, password)
    return f


def get(f: ftplib.FTP, path: str, rest: int | None = None) -> bytes:
    buf = io.BytesIO()
    f.retrbinary(f"RETR {path}", buf.write, rest=rest)
    return buf.getvalue()


def test_round_trip_reaches_s3_intact(agent_factory, any_store):
    agent = agent_factory(any_store).start()
    files = {f"CT/2026-11-23/1.2.840/{i}.dcm": os.urandom(1000 * i + 7) for i in range(1, 6)}
    files["CR/2026-11-23/big.dcm"] = os.urandom(3 * 1024 * 1024 + 5)
    f = ftp(agent)
    f.mkd("CT")
    for path, data in files.items():
        # write-through: 226 comes after S3 confirmed the PUT, so the object is there the moment STOR returns
        assert f.storbinary(f"STOR {path}", io.BytesIO(data)).startswith("226")
        assert any_store.client().head_object(Bucket="pacs-test", Key=agent.prefix + path)["ContentLength"] == len(data)
    assert sorted(f.nlst("CT/2026-11-23/1.2.840")) == sorted(p.rsplit("/", 1)[1] for p in files if p.startswith("CT"))
    for path, data in files.items():
        assert f.size(path) == len(data)
        assert get(f, path) == data
    assert f.sendcmd("MDTM CR/2026-11-23/big.dcm").startswith("213 2")
    facts = dict(f.mlsd("CT/2026-11-23/1.2.840"))
    assert facts["1.dcm"]["type"] == "file" and facts["1.dcm"]["size"] == "1007"
    lines: list[str] = []
    f.retrlines("LIST CT/2026-11-23/1.2.840", lines.append)
    assert any(line.endswith(" 2007 Nov 23 " + line.split()[-2] + " 2.dcm") or line.endswith("2.dcm") for line in lines)
    f.quit()
    remote = s3_objects(any_store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == {p: sha256(d) for p, d in files.items()}
    assert all(r["meta"]["sha256"] == r["sha256"] for r in remote.values())


def test_rename_delete_mkd_rmd(agent_factory, any_store):
    agent = agent_factory(any_store).start()
    f = ftp(agent)
    data = os.urandom(50_000)
    f.mkd("MR")
    f.storbinary("STOR MR/scan.dcm.part", io.BytesIO(data))
    f.rename("MR/scan.dcm.part", "MR/scan.dcm")
    assert f.nlst("MR") == ["scan.dcm"]
    with pytest.raises(ftplib.error_perm, match="550"):
        f.rmd("MR")  # not empty
    agent.wait_drained()
    assert {p: r["sha256"] for p, r in s3_objects(any_store, agent.prefix).items()} == {"MR/scan.dcm": sha256(data)}
    f.mkd("MR/sub")
    f.rename("MR/scan.dcm", "MR/sub/scan.dcm")  # a clean object moves by server-side copy
    agent.wait_drained()
    assert set(s3_objects(any_store, agent.prefix)) == {"MR/sub/scan.dcm"}
    assert get(f, "MR/sub/scan.dcm") == data
    f.delete("MR/sub/scan.dcm")
    f.rmd("MR/sub")
    with pytest.raises(ftplib.error_perm, match="550"):
        f.delete("MR/sub/scan.dcm")
    agent.wait_drained()
    assert s3_objects(any_store, agent.prefix) == {}
    f.quit()


def test_overwrite_append_and_resume(agent_factory):
    agent = agent_factory().start()
    f = ftp(agent)
    f.storbinary("STOR a.dcm", io.BytesIO(b"first version"))
    f.storbinary("STOR a.dcm", io.BytesIO(b"second"))
    assert get(f, "a.dcm") == b"second"
    f.storbinary("APPE a.dcm", io.BytesIO(b" + appended"))
    assert get(f, "a.dcm") == b"second + appended"
    assert get(f, "a.dcm", rest=7) == b"+ appended"
    # REST + STOR resumes an interrupted upload: the first bytes are kept, the rest replaced.
    f.sendcmd("TYPE I")
    f.storbinary("STOR a.dcm", io.BytesIO(b"RESUMED"), rest=7)
    assert get(f, "a.dcm") == b"second RESUMED"
    f.quit()
    agent.wait_drained()
    assert s3_objects(agent.store, agent.prefix)["a.dcm"]["sha256"] == sha256(b"second RESUMED")


def test_errors_are_protocol_correct(agent_factory):
    agent = agent_factory().start()
    with pytest.raises(ftplib.error_perm, match="530"):
        ftp(agent, password="wrong")
    with pytest.raises(ftplib.error_perm, match="530"):
        ftp(agent, user="nobody", password="wrong")
    assert agent.events("login_failed")
    f = ftp(agent)
    with pytest.raises(ftplib.error_perm, match="550"):
        get(f, "missing.dcm")
    with pytest.raises(ftplib.error_perm, match="550"):
        f.size("missing.dcm")
    with pytest.raises(ftplib.error_perm, match="550 path escapes"):
        f.cwd("../..")
    with pytest.raises(ftplib.error_perm, match="553"):
        f.storbinary("STOR " + "n" * 4096, io.BytesIO(b"x"))
    with pytest.raises(ftplib.error_perm, match="553"):
        f.storbinary("STOR a\\b.dcm", io.BytesIO(b"x"))
    f.mkd("d")
    with pytest.raises(ftplib.error_perm, match="550"):
        f.mkd("d")
    with pytest.raises(ftplib.error_perm, match="550"):
        f.storbinary("STOR d", io.BytesIO(b"x"))  # a directory
    assert f.pwd() == "/"
    f.quit()


def test_aioftp_client_round_trip(agent_factory):
    agent = agent_factory().start()
    data = os.urandom(200_000)

    async def session() -> bytes:
        async with aioftp.Client.context("127.0.0.1", agent.ftp_port, "pacs", PASSWORD) as client:
            await client.make_directory("US/2026-11-23")
            async with client.upload_stream("US/2026-11-23/echo.dcm") as stream:
                await stream.write(data)
            names = [str(p) for p, info in await client.list("US/2026-11-23")]
            assert names == ["US/2026-11-23/echo.dcm"]
            async with client.download_stream("US/2026-11-23/echo.dcm") as stream:
                return await stream.read()

    assert asyncio.run(session()) == data
    assert s3_objects(agent.store, agent.prefix)["US/2026-11-23/echo.dcm"]["sha256"] == sha256(data)


def test_user_root_confines(agent_factory):
    agent = agent_factory(users=[{"name": "ct", "password": PASSWORD, "root": "/CT"},
                                 {"name": "admin", "password": PASSWORD, "root": "/"}]).start()
    admin = ftp(agent, "admin")
    admin.mkd("MR")
    admin.storbinary("STOR MR/secret.dcm", io.BytesIO(b"mr"))
    ct = ftp(agent, "ct")
    ct.storbinary("STOR a.dcm", io.BytesIO(b"ct"))
    assert ct.nlst("/") == ["a.dcm"]
    for attempt in ("../MR/secret.dcm", "/../MR/secret.dcm", "/../../MR/secret.dcm"):
        with pytest.raises(ftplib.error_perm, match="550"):
            get(ct, attempt)
    assert sorted(admin.nlst("/")) == ["CT", "MR"]
    assert get(admin, "CT/a.dcm") == b"ct"
    time.sleep(0.1)
    assert set(s3_objects(agent.store, agent.prefix)) == {"CT/a.dcm", "MR/secret.dcm"}
