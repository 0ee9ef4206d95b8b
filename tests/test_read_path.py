"""Read path: a replacement box discovers a bucket that already holds studies, and reads them intact."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os

import asyncssh

from harness import BUCKET, PASSWORD, sha256


def test_replacement_box_discovers_existing_bucket(agent_factory, any_store):
    prefix = f"discover{os.getpid()}/"
    client = any_store.client()
    existing = {f"CT/2026-11-{d:02d}/study{d}/1/{i}.dcm": os.urandom(10_000 + i) for d in (20, 21) for i in range(3)}
    for path, data in existing.items():
        # as the old box wrote them: with the sha256 metadata …
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=data, Metadata={"sha256": sha256(data)})
    # a directory nothing lists or reads before a write lands in it (each level is listed on the way down)
    client.put_object(Bucket=BUCKET, Key=prefix + "US/2026-11-22/s/1/0.dcm", Body=b"us",
                      Metadata={"sha256": sha256(b"us")})
    foreign = os.urandom(5000)
    client.put_object(Bucket=BUCKET, Key=prefix + "MR/imported.dcm", Body=foreign)  # … or by another tool: without
    agent = agent_factory(any_store, prefix=prefix).start()
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    assert sorted(f.nlst("/")) == ["CT", "MR", "US"]
    assert sorted(f.nlst("CT")) == ["2026-11-20", "2026-11-21"]
    # stat and read deep paths without listing their parents first
    path = "CT/2026-11-21/study21/1/2.dcm"
    assert f.size(path) == len(existing[path])
    for p, data in existing.items():
        buf = io.BytesIO()
        f.retrbinary(f"RETR {p}", buf.write)
        assert buf.getvalue() == data
    buf = io.BytesIO()
    f.retrbinary("RETR MR/imported.dcm", buf.write)
    assert buf.getvalue() == foreign
    # new writes land beside the discovered ones
    f.storbinary("STOR CT/2026-11-21/study21/1/new.dcm", io.BytesIO(b"new"))
    assert sorted(f.nlst("CT/2026-11-21/study21/1")) == ["0.dcm", "1.dcm", "2.dcm", "new.dcm"]
    f.storbinary("STOR US/2026-11-22/s/1/new.dcm", io.BytesIO(b"new"))
    assert sorted(f.nlst("US/2026-11-22/s/1")) == ["0.dcm", "new.dcm"]
    f.quit()
    fetched = {e["path"] for e in agent.wait_events("fetched", len(existing) + 1)}  # logged once cached
    assert fetched == set(existing) | {"MR/imported.dcm"}
    # Once fetched, reads are cache hits: a second read fetches nothing more.
    f = ftplib.FTP(timeout=30)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    f.retrbinary(f"RETR {path}", io.BytesIO().write)
    f.quit()
    assert len(agent.events("fetched")) == len(fetched)


def test_corrupt_remote_object_is_refused(agent_factory, seaweed):
    """An object whose bytes do not match its recorded sha256 is never cached and the read fails."""
    prefix = f"corrupt{os.getpid()}/"
    seaweed.client().put_object(Bucket=BUCKET, Key=prefix + "bad.dcm", Body=b"actual bytes",
                                Metadata={"sha256": sha256(b"what the old box wrote")})
    agent = agent_factory(seaweed, prefix=prefix).start()

    async def read() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("bad.dcm", "rb") as fh:
                try:
                    await fh.read()
                except asyncssh.SFTPError:
                    return
            raise AssertionError("corrupt object was served without an error")

    asyncio.run(read())
    assert agent.events("fetch_failed")
    assert agent.health()["cache"]["cached_files"] == 0
