"""An upload from the cached copy is verified by the store where the store checks the SHA-256 a PUT carries
(docs/benchmarks.md §40): a probe with a wrong checksum decides, once, whether the agent still hashes the body
itself. A rotten copy fails its upload as ChecksumMismatch either way, and nothing reaches S3.

Against the real SeaweedFS (it checks x-amz-checksum-sha256: 400 BadDigest) and rclone's `serve s3` (it does not)."""

from __future__ import annotations

import asyncio
import ftplib
import os

import numpy as np
import pytest
import structlog
from botocore.exceptions import ClientError
from pydicom.uid import generate_uid
from test_integrity import flip_a_byte

from agent.config import UplinkConfig
from agent.uplink.s3 import ChecksumMismatch, S3Uplink, read_verified
from agent.uplink.uploader import VERIFY_PROBE
from bench.dicomgen import ct_slice
from faultkit import catalog_rows, ftp_get, ftp_login, ftp_put, payload, wait_for
from harness import BUCKET, s3_objects, sha256


def _rotten_upload(proxied_agent, proxy, rotten: bytes = payload("rotten", 200_000), **overrides):
    """A write-back file acknowledged while S3 fails every request, its cached copy rotted on disk, then the line
    back: → (agent, the upload's failure event), the good file stored beside it uploaded."""
    proxy.fail_all = True  # the line down from the start: nothing is read for an upload until it is back
    agent = proxied_agent(**{"uplink.write_mode": "back", **overrides})
    good = payload("good", 150_000)
    ftp = ftp_login(agent)
    assert ftp_put(ftp, "CT/rotten.dcm", rotten).startswith("226")
    assert ftp_put(ftp, "CT/good.dcm", good).startswith("226")
    ftp.quit()
    flip_a_byte(agent, "CT/rotten.dcm")
    proxy.fail_all = False
    [failed] = agent.wait_events("upload_failed", 1, timeout=60)
    wait_for(lambda: "CT/good.dcm" in s3_objects(agent.store, agent.prefix), 60, what="the good file uploaded")
    objects = s3_objects(agent.store, agent.prefix)
    assert set(objects) == {"CT/good.dcm"} and objects["CT/good.dcm"]["sha256"] == sha256(good)
    return agent, failed


def test_a_rotten_copy_is_refused_and_stays_an_upload_failure(proxied_agent, proxy):
    """The flipped byte ends as it did when the agent hashed every body: the upload fails as ChecksumMismatch (not
    an outage: the line stays up), the row stays dirty with that error, nothing is stored under its key, and a
    read is refused (451), never served."""
    agent, failed = _rotten_upload(proxied_agent, proxy)
    assert failed["path"] == "CT/rotten.dcm" and failed["error"] == "ChecksumMismatch", failed
    [(state, error)] = catalog_rows(agent, "SELECT state, last_error FROM entries WHERE path = ?", ("CT/rotten.dcm",))
    assert state == "dirty" and error.startswith("ChecksumMismatch: ")
    assert agent.health()["uplink"]["reachable"] is True
    ftp = ftp_login(agent)
    with pytest.raises(ftplib.error_temp, match="451"):
        ftp_get(ftp, "CT/rotten.dcm")
    ftp.quit()
    assert [e["path"] for e in agent.events("cache_copy_lost")] == ["CT/rotten.dcm"]


def test_the_probe_logs_the_store_checks_and_the_store_finds_the_rot(proxied_agent, proxy):
    """Against SeaweedFS the agent's first upload from a cached copy probes once (mode=store), and the rotten
    copy's failure is the store's refusal (BadDigest), not the agent's own hash: that one was not taken."""
    agent, failed = _rotten_upload(proxied_agent, proxy)
    [decided] = agent.events("upload_verify")
    assert decided["mode"] == "store" and decided["answer"] == "BadDigest", decided
    assert decided["key"] == agent.prefix + VERIFY_PROBE
    assert "object store refused" in failed["detail"] and "BadDigest" in failed["detail"], failed
    assert not [k for k in s3_objects(agent.store, agent.prefix) if k.startswith(VERIFY_PROBE)]


def test_a_body_to_be_compressed_is_still_hashed_here(proxied_agent, proxy):
    """An upload zstd packs is sent with the packed body's own SHA-256: the store checks the packing, not the copy
    it was made from, so the copy is hashed here before it is packed, whatever the probe found."""
    rotten = ct_slice(np.random.default_rng(34), patient="P-34", study_uid=generate_uid(),
                      series_uid=generate_uid(), rows=256, cols=256, modality="CT")  # uncompressed: packed
    agent, failed = _rotten_upload(proxied_agent, proxy, rotten, **{"uplink.compress": "zstd"})
    assert [e["mode"] for e in agent.events("upload_verify")] == ["store"]
    assert failed["error"] == "ChecksumMismatch" and "cached content does not match" in failed["detail"], failed


@pytest.mark.parametrize("kind, mode", [("seaweedfs", "store"), ("rclone", "local")])
def test_the_probe_decides_by_what_the_store_does(kind, mode, request):
    """SeaweedFS refuses the probe's wrong checksum (nothing stored): uploads skip their own hash, and a rotten
    body read without it is refused as ChecksumMismatch. rclone's `serve s3` stores it (then deleted): it would
    store a rotten body too, so uploads keep hashing. Asked once per uplink."""
    store = request.getfixturevalue("seaweed" if kind == "seaweedfs" else "rclone_s3")
    good = os.urandom(40_000)
    rotten = bytes([good[0] ^ 1]) + good[1:]
    prefix = f"speed34-{os.urandom(4).hex()}/"

    async def run() -> tuple[list[bool], list[dict], ChecksumMismatch | None]:
        s3 = S3Uplink(UplinkConfig(endpoint_url=store.endpoint_url, bucket=BUCKET, prefix=prefix,
                                   access_key_id=store.access_key, secret_access_key=store.secret_key))
        await s3.start()
        fd = os.memfd_create("copy")
        try:
            os.write(fd, rotten)
            with structlog.testing.capture_logs() as logs:
                decided = await asyncio.gather(*(s3.store_verifies(s3.key(VERIFY_PROBE)) for _ in range(3)))
            try:  # as the uploader reads and sends a cached copy in the mode decided
                body = read_verified("a.dcm", fd, len(rotten), sha256(good), by_store=decided[0])
                await s3.put_file("a.dcm", fd, len(rotten), sha256(good), body=body)
            except ChecksumMismatch as e:
                return decided, logs, e
            return decided, logs, None
        finally:
            os.close(fd)
            await s3.close()

    decided, logs, refused = asyncio.run(run())
    assert decided == [mode == "store"] * 3
    assert [(e["event"], e["mode"]) for e in logs] == [("upload_verify", mode)]
    assert refused is not None
    if mode == "store":  # found by the store: SeaweedFS's 400 BadDigest
        assert isinstance(refused.__cause__, ClientError) and "BadDigest" in str(refused)
    else:  # found by the agent's own hash, before a byte was sent
        assert "cached content does not match" in str(refused)
    assert s3_objects(store, prefix) == {}  # neither the probe nor the rotten body
