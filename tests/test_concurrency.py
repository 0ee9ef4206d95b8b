"""32 concurrent clients × 50 files each, over FTP and SFTP at once: every file in S3, catalog consistent."""

from __future__ import annotations

import asyncio
import ftplib
import io
import random
import sqlite3
import threading

import asyncssh

from harness import PASSWORD, s3_objects, sha256

CLIENTS, FILES = 32, 50


def payload(client: int, i: int) -> bytes:
    rnd = random.Random(client * 1000 + i)
    return rnd.randbytes(rnd.choice([2_000, 16_000, 64_000, 200_000]))


def ftp_client(agent, client: int, acked: dict, errors: list) -> None:
    try:
        f = ftplib.FTP(timeout=60)
        f.connect("127.0.0.1", agent.ftp_port)
        f.login("pacs", PASSWORD)
        for i in range(FILES):
            path = f"CT/2026-11-23/c{client}/{i}.dcm"
            data = payload(client, i)
            if f.storbinary(f"STOR {path}", io.BytesIO(data)).startswith("226"):
                acked[path] = sha256(data)
        f.quit()
    except Exception as e:  # collected and asserted below
        errors.append(f"ftp client {client}: {e!r}")


async def sftp_client(agent, client: int, acked: dict, errors: list) -> None:
    try:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            for i in range(FILES):
                path = f"MR/2026-11-23/c{client}/{i}.dcm"
                data = payload(client, i)
                await sftp.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                async with sftp.open(path, "wb") as f:
                    await f.write(data)
                acked[path] = sha256(data)
    except Exception as e:
        errors.append(f"sftp client {client}: {e!r}")


def test_32_concurrent_clients(agent_factory):
    agent = agent_factory(**{"uplink.max_concurrency": 8}).start()
    acked: dict[str, str] = {}
    errors: list[str] = []
    threads = [threading.Thread(target=ftp_client, args=(agent, c, acked, errors)) for c in range(CLIENTS // 2)]
    for t in threads:
        t.start()

    async def sftp_all() -> None:
        await asyncio.gather(*(sftp_client(agent, c, acked, errors) for c in range(CLIENTS // 2, CLIENTS)))

    asyncio.run(sftp_all())
    for t in threads:
        t.join()
    assert errors == []
    assert len(acked) == CLIENTS * FILES
    health = agent.wait_drained()
    assert health["cache"]["files"] == CLIENTS * FILES
    remote = s3_objects(agent.store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == acked
    agent.stop()
    db = sqlite3.connect(agent.workdir / "cache" / "catalog.sqlite")
    states = dict(db.execute("SELECT state, COUNT(*) FROM entries WHERE is_dir = 0 GROUP BY state").fetchall())
    assert states == {"clean": CLIENTS * FILES}
    rows = db.execute("SELECT path, sha256, size FROM entries WHERE is_dir = 0").fetchall()
    assert {p: s for p, s, _ in rows} == acked
    totals = db.execute("SELECT files, queue_files, queue_bytes FROM totals").fetchone()
    assert totals == (CLIENTS * FILES, 0, 0)
