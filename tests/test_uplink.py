"""The uplink on its own terms: multipart uploads, the line's rate limit, retry backoff."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ftplib
import io
import os
import time
from typing import Any, AsyncIterator

import pytest

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


@contextlib.asynccontextmanager
async def _uplink_and_file(seaweed, bucket: str, content: bytes) -> AsyncIterator[tuple[Any, int]]:
    """A started S3Uplink on the test server's bucket and a memfd holding content (a cached copy's stand-in)."""
    from agent.config import UplinkConfig
    from agent.uplink.s3 import S3Uplink

    s3 = S3Uplink(UplinkConfig(endpoint_url=seaweed.endpoint_url, bucket=bucket,
                               access_key_id=seaweed.access_key, secret_access_key=seaweed.secret_key))
    await s3.start()
    fd = os.memfd_create("content")
    try:
        os.write(fd, content)
        yield s3, fd
    finally:
        os.close(fd)
        await s3.close()


def test_single_put_sends_the_object_botocore_sends(seaweed, locked_bucket):
    """S3Uplink._put (a signed PUT of its own, not the aiobotocore client's put_object) stores what botocore's
    put_object stores with the same arguments: bytes, user metadata, tags, Content-Type, Object Lock mode,
    retain-until and legal hold; its conditional write is refused with the same error botocore raises."""
    from botocore.exceptions import ClientError

    from agent.dicom.objectmeta import ObjectMeta
    from agent.records import Lock
    from agent.uplink.s3 import b64, precondition_failed

    body = os.urandom(70_000)
    sha = sha256(body)
    meta = ObjectMeta({"dicom-study": "1.2.840.113619.2.55.3", "dicom-modality": "CT", "dicom-study-date": "20190304",
                       "dicom-ts": "1.2.840.10008.1.2.1", "dicom-patient": "0123456789abcdef0123456789abcdef"},
                      {"retention": "mammo 10y", "modality": "CT", "study-year": "2019"})
    until = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    lock = Lock("GOVERNANCE", until, legal_hold=True)
    ours, theirs = "fastpath/a b+é%/x~y.dcm", "fastpath/reference.dcm"  # a key that needs percent-encoding
    client = seaweed.client()
    client.put_object(Bucket=locked_bucket, Key=theirs, Body=body, ChecksumSHA256=b64(sha),
                      Metadata={**meta.metadata, "sha256": sha}, Tagging=meta.tagging(), ObjectLockMode=lock.mode,
                      ObjectLockRetainUntilDate=until, ObjectLockLegalHoldStatus="ON", IfNoneMatch="*")

    async def put() -> tuple[object, ClientError]:
        async with _uplink_and_file(seaweed, locked_bucket, body) as (s3, fd):
            result = await s3.put_file(ours, fd, len(body), sha, lock, meta, {"IfNoneMatch": "*"})
            try:
                await s3.put_file(ours, fd, len(body), sha, lock, meta, {"IfNoneMatch": "*"})
            except ClientError as e:
                return result, e
            raise AssertionError("a conditional PUT over an existing object was accepted")

    result, refused = asyncio.run(put())
    try:
        client.put_object(Bucket=locked_bucket, Key=theirs, Body=body, IfNoneMatch="*")
    except ClientError as e:
        reference = e
    assert precondition_failed(refused) and type(refused) is type(reference)
    assert refused.response["Error"]["Code"] == reference.response["Error"]["Code"]
    assert refused.response["ResponseMetadata"]["HTTPStatusCode"] == 412

    def stored(key: str) -> dict:
        got = client.get_object(Bucket=locked_bucket, Key=key)
        tags = client.get_object_tagging(Bucket=locked_bucket, Key=key)["TagSet"]
        return {"body": got["Body"].read(), "meta": got["Metadata"], "type": got.get("ContentType"),
                "tags": sorted((t["Key"], t["Value"]) for t in tags), "mode": got.get("ObjectLockMode"),
                "until": got.get("ObjectLockRetainUntilDate"), "hold": got.get("ObjectLockLegalHoldStatus")}

    mine, reference_object = stored(ours), stored(theirs)
    assert mine == reference_object
    assert mine["body"] == body and mine["meta"]["sha256"] == sha and mine["until"] == until
    assert ("modality", "CT") in mine["tags"] and mine["hold"] == "ON"
    assert result.etag == client.head_object(Bucket=locked_bucket, Key=ours)["ETag"]


@pytest.mark.parametrize("op", ["put", "get", "get_range", "head"])
def test_a_dead_endpoint_is_unreachable_not_a_bad_request(op):
    """A request to an endpoint nobody listens on raises botocore's EndpointConnectionError, as the client did:
    the line is called down (is_unreachable), the row stays queued, the reader is told 'unavailable'."""
    from botocore.exceptions import EndpointConnectionError

    from agent.config import UplinkConfig
    from agent.uplink.s3 import S3Uplink, is_unreachable
    from devstack import free_port

    async def call() -> BaseException:
        s3 = S3Uplink(UplinkConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", bucket="nobody-home",
                                   access_key_id="k", secret_access_key="s", connect_timeout=2.0))
        await s3.start()
        try:
            if op == "put":
                await s3.put_raw("audit/x", b"record")
            elif op == "get":
                async with s3.get("CT/x.dcm"):
                    pass
            elif op == "get_range":
                await s3.get_range("CT/x.dcm", 10, 10, None)
            else:
                await s3.head("CT/x.dcm")
        except Exception as e:
            return e
        finally:
            await s3.close()
        raise AssertionError(f"a {op} to a closed port succeeded")

    exc = asyncio.run(call())
    assert isinstance(exc, EndpointConnectionError) and is_unreachable(exc)


def test_get_head_and_ranged_get_read_what_botocore_reads(seaweed, locked_bucket):
    """S3Uplink's GETs and HEADs (signed requests of its own, not the aiobotocore client's) answer what boto3
    answers for the same object: its bytes, whole and at an offset, ETag, user metadata, size and Object Lock
    fields; a ranged GET of another version (If-Match) is refused as a failed precondition, a missing object
    raises boto3's NoSuchKey (HEAD: None); a zstd object arrives decoded and cannot be read at an offset."""
    from botocore.exceptions import ClientError

    from agent.uplink import encoding
    from agent.uplink.s3 import NotRangeable, error_code, precondition_failed

    body = os.urandom(700_000)  # several GET_CHUNK blocks, the last one short
    until = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    client = seaweed.client()
    key, packed_key = "getpath/a b+é%/x~y.dcm", "getpath/packed.dcm"
    client.put_object(Bucket=locked_bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                      Metadata={"sha256": sha256(body), "dicom-modality": "CT"}, ObjectLockMode="GOVERNANCE",
                      ObjectLockRetainUntilDate=until, ObjectLockLegalHoldStatus="ON")
    client.put_object(Bucket=locked_bucket, Key=packed_key, Body=encoding.compress(body),
                      Metadata={"sha256": sha256(body), **encoding.metadata(len(body))})
    reference = client.head_object(Bucket=locked_bucket, Key=key)
    try:
        client.get_object(Bucket=locked_bucket, Key="getpath/none.dcm")
    except ClientError as e:
        missing_reference = e

    async def read() -> dict[str, Any]:
        out: dict[str, Any] = {"etags": []}
        async with _uplink_and_file(seaweed, locked_bucket, b"") as (s3, _fd):
            for path, name in ((key, "plain"), (packed_key, "packed")):
                async with s3.get(path, lambda etag, rangeable: out["etags"].append((etag, rangeable))) as (
                        size, sha, _md5, chunks):
                    out[name] = (size, sha, b"".join([c async for c in chunks]))
            out["head"] = await s3.head(key)
            out["no head"] = await s3.head("getpath/none.dcm")
            out["range"] = await s3.get_range(key, 300_001, 10_000, reference["ETag"])
            out["tail"] = await s3.get_range(key, len(body) - 100, 10_000, None)
            for name, call in (("other version", s3.get_range(key, 0, 10, '"0123456789abcdef"')),
                               ("missing", s3.get_range("getpath/none.dcm", 0, 10, None)),
                               ("packed range", s3.get_range(packed_key, 0, 10, None))):
                try:
                    await call
                except Exception as e:
                    out[name] = e
        return out

    got = asyncio.run(read())
    assert got["plain"] == (len(body), sha256(body), body)
    assert got["packed"] == (len(body), sha256(body), body)  # decoded; its logical size, not the stored one
    assert got["etags"][0] == (reference["ETag"], True) and got["etags"][1][1] is False
    head = got["head"]
    for field in ("ContentLength", "ETag", "Metadata", "LastModified", "ObjectLockMode", "ObjectLockRetainUntilDate",
                  "ObjectLockLegalHoldStatus", "VersionId"):
        assert head.get(field) == reference.get(field), field
    assert head["ObjectLockRetainUntilDate"] == until and head["Metadata"]["dicom-modality"] == "CT"
    assert got["no head"] is None
    assert got["range"] == body[300_001:310_001] and got["tail"] == body[-100:]
    assert precondition_failed(got["other version"])
    missing = got["missing"]  # each client generates its own classes: the same name, code and base
    assert type(missing).__name__ == type(missing_reference).__name__ == error_code(missing) == "NoSuchKey"
    assert isinstance(missing, ClientError)
    assert isinstance(got["packed range"], NotRangeable)


def test_a_cached_copy_that_does_not_match_its_checksum_is_not_uploaded(seaweed):
    """The bytes a single-request PUT sends are checked against the catalog's SHA-256 before they leave (the
    signer is handed that hash, not a new one of the body): a rotten copy raises ChecksumMismatch, nothing is
    stored."""
    from agent.uplink.s3 import ChecksumMismatch

    good = os.urandom(30_000)
    rotten = bytes([good[0] ^ 1]) + good[1:]

    async def put() -> None:
        async with _uplink_and_file(seaweed, BUCKET, rotten) as (s3, fd):
            await s3.put_file("rotten/a.dcm", fd, len(rotten), sha256(good))

    with pytest.raises(ChecksumMismatch):
        asyncio.run(put())
    assert "Contents" not in seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix="rotten/")


def test_reads_and_writes_over_tls_trust_only_the_configured_ca(tmp_path):
    """Over https:// (rclone's S3 with a private CA) the uplink's own requests verify the server against
    uplink.ca_bundle: PUT, GET, ranged GET and HEAD work with it; without it the first request fails as
    botocore's SSLError, as the aiobotocore client failed (the line reports it: a certificate problem)."""
    from botocore.exceptions import SSLError
    from test_transport_security import make_ca_and_cert

    from agent.config import UplinkConfig
    from agent.uplink.s3 import S3Uplink
    from devstack import ObjectStore

    ca, cert, key = make_ca_and_cert(tmp_path)
    store = ObjectStore("rclone", tmp_path / "s3", tls=(cert, key, ca)).start()
    body = os.urandom(300_000)

    async def use(ca_bundle: str) -> dict[str, object]:
        s3 = S3Uplink(UplinkConfig(endpoint_url=store.endpoint_url, bucket=BUCKET, access_key_id=store.access_key,
                                   secret_access_key=store.secret_key, ca_bundle=ca_bundle))
        await s3.start()

        async def whole() -> bytes:
            async with s3.get("tls/a.dcm") as (_size, _sha, _md5, chunks):
                return b"".join([c async for c in chunks])

        async def head() -> object:
            got = await s3.head("tls/a.dcm")
            return got and got["ContentLength"]

        out: dict[str, object] = {}
        try:
            for op, call in (("put", lambda: s3.put_raw("tls/a.dcm", body)), ("get", whole), ("head", head),
                             ("range", lambda: s3.get_range("tls/a.dcm", 1000, 50, None))):
                try:
                    out[op] = await call()
                except Exception as e:
                    out[op] = e
        finally:
            await s3.close()
        return out

    try:
        store.create_bucket(BUCKET)
        trusted = asyncio.run(use(str(ca)))
        assert (trusted["get"], trusted["head"], trusted["range"]) == (body, len(body), body[1000:1050])
        for op, refused in asyncio.run(use("")).items():  # each request checks the certificate, GETs too
            assert isinstance(refused, SSLError) and "certificate" in str(refused).lower(), op
    finally:
        store.stop()


def test_timestamps_parse_as_botocore_parses_them():
    """The uplink's timestamp parser (listings, HEADs) reads ISO 8601 and HTTP dates itself and leaves the rest to
    botocore: the same instants, offsets kept, as botocore's dateutil path gives."""
    from botocore.utils import parse_timestamp as botocore_parse

    from agent.uplink.s3 import parse_timestamp

    for value in ("Tue, 01 Dec 2026 19:00:00 GMT", "Tue, 01 Dec 2026 19:00:00 -0000", "Tue, 01 Dec 2026 19:00:00 +0200",
                  "2026-12-01T19:00:00.123Z", "2026-12-01T19:00:00Z", "2026-12-01T21:00:00+02:00", "1700000000"):
        ours, theirs = parse_timestamp(value), botocore_parse(value)
        assert ours == theirs and ours.utcoffset() == theirs.utcoffset(), value


@pytest.mark.parametrize("env", [
    {},
    {"HTTP_PROXY": "http://proxy.example:3128"},
    {"HTTP_PROXY": "http://us%40er:p%3Ass@proxy.example:3128", "HTTPS_PROXY": "http://other.example:8080"},
    {"http_proxy": "http://proxy.example:3128", "no_proxy": "s3.example,.internal"},
    {"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "*"},
    {"HTTPS_PROXY": "http://u:p@proxy.example:3128"},
])
def test_the_proxy_is_the_one_aiohttp_would_take_from_the_environment(monkeypatch, tmp_path, env):
    """env_proxy reads HTTP(S)_PROXY and NO_PROXY through urllib's documented lookups; aiohttp's own helper
    (get_env_proxy_for_url, not a documented API) gives the same answer, without a .netrc. The user goes to the
    proxy as the Proxy-Authorization header aiohttp's deprecated proxy_auth made, where it put it (the CONNECT of
    an https endpoint, each request of an http one), and without aiohttp's DeprecationWarning."""
    import warnings

    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    from agent.uplink.s3 import Proxy, env_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for endpoint in ("http://s3.example:8333", "https://s3.example", "http://b.internal:9000"):
        try:
            url, auth = get_env_proxy_for_url(URL(endpoint))
        except LookupError:
            url, auth = None, None
        header = {"Proxy-Authorization": auth.encode()} if auth else {}
        https = endpoint.startswith("https:")
        expected = Proxy(url, header, {}) if https else Proxy(url, {}, header)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            assert env_proxy(endpoint) == expected


def test_the_proxy_hears_its_user_and_aiohttp_warns_of_nothing(monkeypatch):
    """A request through a proxy named with a user (HTTP_PROXY=http://user:password@host) carries it to the
    proxy as Proxy-Authorization, through aiohttp's non-deprecated API (no BasicAuth, no proxy_auth)."""
    import warnings

    from botocore.exceptions import ClientError

    from agent.config import UplinkConfig
    from agent.uplink.s3 import S3Uplink

    async def call() -> list[bytes]:
        heard: list[bytes] = []

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
        for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
        s3 = S3Uplink(UplinkConfig(endpoint_url="http://s3.example:8333", bucket="b", access_key_id="k",
                                   secret_access_key="s"))
        await s3.start()
        try:
            with pytest.raises(ClientError):  # the 407: this proxy lets nothing through
                await s3.head("CT/x.dcm")
        finally:
            await s3.close()
            proxy.close()
        return heard

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        heard = asyncio.run(call())
    request = heard[0].decode().split("\r\n")
    assert request[0] == "HEAD http://s3.example:8333/b/CT/x.dcm HTTP/1.1"
    assert "Proxy-Authorization: Basic " + base64.b64encode(b"us@er:p:ss").decode() in request
    assert not [w for w in warned if "proxy_auth" in str(w.message) or "BasicAuth" in str(w.message)]
