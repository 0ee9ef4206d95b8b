"""SFTP round trips (asyncssh client): password and public-key auth, confinement, renames."""

from __future__ import annotations

import asyncio
import os

import asyncssh
import pytest

from harness import PASSWORD, s3_objects, sha256


def connect(agent, user: str = "pacs", **kw):
    opts = {"password": PASSWORD} if not kw else kw
    return asyncssh.connect("127.0.0.1", agent.sftp_port, username=user, known_hosts=None, **opts)


def run(coro):
    return asyncio.run(coro)


def test_round_trip_reaches_s3_intact(agent_factory, any_store):
    agent = agent_factory(any_store).start()
    files = {f"MR/2026-11-23/1.2.3/{i}.dcm": os.urandom(700 * i + 3) for i in range(1, 8)}
    files["DX/2026-11-23/chest.dcm"] = os.urandom(9 * 1024 * 1024 + 11)

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            assert await sftp.realpath(".") == "/"
            for path, data in files.items():
                await sftp.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                async with sftp.open(path, "wb") as f:
                    await f.write(data)
                # close returned OK only after the object was confirmed (write-through)
                assert any_store.client().head_object(Bucket="pacs-test", Key=agent.prefix + path)
            assert sorted(await sftp.listdir("MR/2026-11-23/1.2.3")) == sorted(f"{i}.dcm" for i in range(1, 8))
            for path, data in files.items():
                assert (await sftp.stat(path)).size == len(data)
                async with sftp.open(path, "rb") as f:
                    assert await f.read() == data
            assert await sftp.isdir("MR") and not await sftp.isfile("MR")

    run(session())
    remote = s3_objects(any_store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == {p: sha256(d) for p, d in files.items()}


def test_filepart_rename_and_delete(agent_factory, any_store):
    agent = agent_factory(any_store).start()
    data = os.urandom(123_456)

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            await sftp.mkdir("CT")
            async with sftp.open("CT/a.dcm.filepart", "wb") as f:
                await f.write(data)
            await sftp.posix_rename("CT/a.dcm.filepart", "CT/a.dcm")  # WinSCP's pattern
            assert await sftp.listdir("CT") == ["a.dcm"]
            async with sftp.open("CT/b.dcm", "wb") as f:
                await f.write(b"other")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.rename("CT/b.dcm", "CT/a.dcm")  # v3 rename never replaces
            await sftp.posix_rename("CT/b.dcm", "CT/a.dcm")
            async with sftp.open("CT/a.dcm", "rb") as f:
                assert await f.read() == b"other"
            await sftp.remove("CT/a.dcm")
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat("CT/a.dcm")
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.remove("CT/a.dcm")
            await sftp.rmdir("CT")

    run(session())
    agent.wait_drained()
    assert s3_objects(any_store, agent.prefix) == {}


def test_random_access_writes_are_hashed_at_commit(agent_factory):
    agent = agent_factory().start()
    data = os.urandom(300_000)

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("x.dcm", "wb") as f:
                await f.write(data[150_000:], 150_000)  # second half first
                await f.write(data[:150_000], 0)
            async with sftp.open("x.dcm", "rb") as f:
                await f.seek(100_000)
                assert await f.read(10) == data[100_000:100_010]

    run(session())
    assert s3_objects(agent.store, agent.prefix)["x.dcm"]["sha256"] == sha256(data)


def test_public_key_auth_and_wrong_password(agent_factory, tmp_path):
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(key.export_public_key())
    agent = agent_factory(users=[{"name": "modality", "authorized_keys": str(tmp_path / "authorized_keys"),
                                  "root": "/US"},
                                 {"name": "pacs", "password": PASSWORD, "root": "/"}]).start()

    async def session() -> None:
        async with connect(agent, "modality", client_keys=[key], password=None) as conn, \
                conn.start_sftp_client() as sftp:
            async with sftp.open("/probe.dcm", "wb") as f:
                await f.write(b"us")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.stat("../probe.dcm")
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, "pacs", password="wrong", client_keys=None)
        with pytest.raises(asyncssh.PermissionDenied):  # key users have no password
            await connect(agent, "modality", password="", client_keys=None)
        other = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(agent, "modality", client_keys=[other], password=None)

    run(session())
    assert set(s3_objects(agent.store, agent.prefix)) == {"US/probe.dcm"}
    assert [e["user"] for e in agent.events("login_failed")].count("pacs") >= 1


def test_bad_names_and_traversal(agent_factory):
    agent = agent_factory().start()

    async def session() -> None:
        async with connect(agent) as conn, conn.start_sftp_client() as sftp:
            for bad in ("../escape.dcm", "/../../etc/passwd", "a\\b.dcm", "n" * 4096, "x/../../y"):
                with pytest.raises(asyncssh.SFTPError):
                    async with sftp.open(bad, "wb") as f:
                        await f.write(b"x")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.listdir("/..")
            assert await sftp.listdir("/") == []

    run(session())
    assert s3_objects(agent.store, agent.prefix) == {}
    assert agent.health()["cache"]["files"] == 0
