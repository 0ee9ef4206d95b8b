"""Throttling: the object store answers "slow down" (HTTP 503) to part of the PUTs during an ingest.

A real fault, not a mock: SeaweedFS's S3 circuit breaker (`weed shell` s3.circuitBreaker) is set to one
simultaneous write, so concurrent PUTs get 503 ErrTooManyRequest, SeaweedFS's SlowDown. The agent must retry
them with backoff and must not take them for an outage: the line stays 'reachable' (no write-back
degradation on /healthz), and every acknowledged file reaches S3 with its content.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from devstack import _bin
from faultkit import Ingest
from harness import BUCKET, s3_objects


def circuit_breaker(store, writes: int, action: str = "Write") -> str:
    master = store._ports[0]  # the `weed mini` master this ObjectStore started
    p = subprocess.run([_bin("weed"), "shell", f"-master=127.0.0.1:{master}"], capture_output=True, text=True,
                       input=f"s3.circuitBreaker -global -type Count -actions {action} -values {writes} -apply\n",
                       timeout=60, check=True)
    return p.stdout


def wait_until_reads_are_throttled(client, key: str, timeout: float = 90) -> None:
    """The breaker's setting reaches the S3 server through the filer a moment after `-apply` (seconds on a loaded
    machine): until this test's own concurrent GETs of `key` meet a 503, reads the agent makes would not be
    throttled and the test would prove nothing (its landing CI once read every file before the breaker held). `client`
    does not retry: a GET retried for another reason was taken for a 503, and the readers once ran before it held."""
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import ClientError

    def get(_: int) -> bool:
        try:
            client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            return False
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(8) as ex:
        while not any(ex.map(get, range(8))):
            assert time.monotonic() < deadline, "the circuit breaker on reads never answered 503"
            time.sleep(0.5)


@pytest.mark.slow
def test_slow_down_is_retried_not_an_outage(agent_factory, private_seaweed):
    store = private_seaweed
    a = agent_factory(store, **{"uplink.max_concurrency": 8}).start()
    assert '"Write:Count":  "1"' in circuit_breaker(store, 1)
    ingest = Ingest(a, ftp_clients=4, sftp_clients=4, min_size=256 * 1024, max_size=1024 * 1024).start()
    samples = []
    try:
        deadline = time.monotonic() + 120
        while not a.events("uplink_throttled"):
            assert time.monotonic() < deadline, "no PUT was throttled: the fault did not happen"
            samples.append(a.health())
            time.sleep(0.5)
        for _ in range(10):  # a few more seconds of ingest under the breaker
            samples.append(a.health())
            time.sleep(0.5)
    finally:
        ingest.stop()

    assert ingest.errors == [], f"the PACS saw errors: {ingest.errors[:5]}"
    assert all(s["uplink"]["reachable"] for s in samples), "a 503 SlowDown was taken for an outage"
    assert not a.events("uplink_unreachable")
    throttled = a.events("uplink_throttled")
    assert {e["error"] for e in throttled} == {"ErrTooManyRequest"}
    h = a.wait_drained(180)
    assert h["uplink"]["reachable"] and h["queue_depth"] == 0
    objects = s3_objects(store, a.prefix)
    missing = sorted(set(ingest.acked) - set(objects))
    assert missing == [], f"{len(missing)} acknowledged files not in S3, e.g. {missing[:3]}"
    assert [p for p, sha in ingest.acked.items() if objects[p]["sha256"] != sha] == []


@pytest.mark.slow
def test_slow_down_on_reads_is_retried_not_an_outage(agent_factory, private_seaweed):
    """The same fault on GETs (s3.circuitBreaker on Read): cold reads by 8 concurrent FTP readers get 503s
    from the GETs the uplink signs and sends itself; each is throttling, retried with backoff, and every reader
    gets the file's bytes."""
    import ftplib
    import io
    import os
    from concurrent.futures import ThreadPoolExecutor

    from harness import PASSWORD

    store, prefix = private_seaweed, f"throttle-read{os.getpid()}/"
    files = {f"CT/{i:02d}.dcm": os.urandom(1024 * 1024) for i in range(72)}  # three rounds of 24 cold files at most
    client = store.client()
    for path, data in files.items():
        client.put_object(Bucket=BUCKET, Key=prefix + path, Body=data)
    a = agent_factory(store, prefix=prefix, **{"uplink.max_concurrency": 8}).start()
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", a.ftp_port)
    f.login("pacs", PASSWORD)
    assert sorted("CT/" + n for n in f.nlst("CT")) == sorted(files)  # listed (and sized by HEADs) before the fault
    f.quit()
    assert '"Read:Count":  "1"' in circuit_breaker(store, 1, "Read")

    def read(paths: list[str]) -> dict[str, bytes]:
        f = ftplib.FTP(timeout=120)
        f.connect("127.0.0.1", a.ftp_port)
        f.login("pacs", PASSWORD)
        got = {}
        for path in paths:
            out = io.BytesIO()
            f.retrbinary(f"RETR {path}", out.write)
            got[path] = out.getvalue()
        f.quit()
        return got

    # A round of 24 cold reads by 8 readers, until one of the agent's GETs meets the breaker: once (final CI, load
    # ~3) all 24 landed in 0.13 s with the breaker shown holding a moment before and none was throttled
    names = sorted(files)
    for round_ in range(3):
        wait_until_reads_are_throttled(store.client(attempts=1), prefix + min(files))
        cold = names[24 * round_:24 * (round_ + 1)]
        with ThreadPoolExecutor(8) as ex:
            got = {k: v for part in ex.map(read, [cold[k::8] for k in range(8)]) for k, v in part.items()}
        assert got == {path: files[path] for path in cold}
        if throttled := a.events("uplink_throttled"):
            break
    assert throttled, "no GET was throttled in three rounds: the fault did not happen"
    assert {e["error"] for e in throttled} == {"ErrTooManyRequest"}
    assert not a.events("uplink_unreachable") and a.health()["uplink"]["reachable"]
