"""The uplink on its own terms: multipart uploads, the line's rate limit, retry backoff."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import time

from agent.uplink.line import backoff
from agent.uplink.ratelimit import TokenBucket
from harness import BUCKET, PASSWORD, s3_objects, sha256


def test_multipart_upload_is_verified_and_readable(agent_factory, any_store):
    agent = agent_factory(any_store, **{"uplink.multipart_threshold": "5MiB", "uplink.multipart_chunk": "5MiB"}).start()
    data = os.urandom(12 * 1024 * 1024 + 123)  # three parts
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", agent.ftp_port)
    f.login("pacs", PASSWORD)
    assert f.storbinary("STOR PET/big.dcm", io.BytesIO(data)).startswith("226")
    f.quit()
    head = any_store.client().head_object(Bucket=BUCKET, Key=agent.prefix + "PET/big.dcm")
    assert head["ContentLength"] == len(data)
    assert [e["parts"] for e in agent.events("uploaded")] == [3]  # really a three-part upload
    obj = s3_objects(any_store, agent.prefix)["PET/big.dcm"]
    assert obj["sha256"] == sha256(data) and obj["meta"]["sha256"] == sha256(data)
    # no multipart upload left behind
    assert not any_store.client().list_multipart_uploads(Bucket=BUCKET, Prefix=agent.prefix).get("Uploads")


def test_token_bucket_never_exceeds_its_rate():
    async def send(total: int, rate: int) -> float:
        bucket = TokenBucket(rate)
        t0 = time.monotonic()
        for _ in range(total // 10_000):
            await bucket.acquire(10_000)
        return time.monotonic() - t0

    # 1 s of burst is free, the remaining 2 s worth of bytes must wait: never faster than the rate.
    assert asyncio.run(send(300_000, 100_000)) >= 1.9


def test_unlimited_bucket_does_not_wait():
    async def go() -> None:
        bucket = TokenBucket(0)
        for _ in range(1000):
            await bucket.acquire(10**9)
    asyncio.run(asyncio.wait_for(go(), 5))


def test_backoff_grows_with_jitter_and_is_capped():
    samples = [backoff(n) for n in range(12) for _ in range(50)]
    assert all(0 < s <= 450 for s in samples)
    assert max(backoff(0) for _ in range(50)) < 1.5 <= min(backoff(3) for _ in range(50)) * 2
    assert len({round(backoff(5), 6) for _ in range(20)}) > 1  # jittered
    assert all(150 <= backoff(30) < 450 for _ in range(50))  # capped at 300 s nominal
