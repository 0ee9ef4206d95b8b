"""Attacks on a running agent (round 30): the object store as a trust boundary (a misbehaving endpoint, another
writer of a shared bucket). Each test reproduces one attack that worked and checks it no longer does. The store is
the real SeaweedFS; what SeaweedFS will not answer (a redirect, a key with a '..' component: it refuses to store
one, AWS S3 and Ceph keep it) comes from the project's fault proxy (tests/s3fault.py), as each test says."""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiohttp import web
from s3fault import FaultProxy
from test_ftp import ftp

from agent.config import UplinkConfig
from agent.uplink.s3 import S3Uplink
from faultkit import wait_for
from harness import BUCKET


class _Sink(BaseHTTPRequestHandler):
    """Another host, that answers every PUT 200 as a store would: what a redirect sent the agent's uploads to."""

    puts: list[tuple[str, int]] = []

    def do_PUT(self) -> None:  # http.server's naming
        n = int(self.headers.get("Content-Length", 0))
        self.puts.append((self.path, len(self.rfile.read(n))))
        self.send_response(200)
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _Redirecting(FaultProxy):
    """The fault proxy, answering every PUT 307 Temporary Redirect to `to` (a misbehaving endpoint or a
    compromised front of it: SeaweedFS never redirects)."""

    to = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and self.to:
            return web.Response(status=307, headers={"Location": self.to + request.path_qs})
        return await super()._handle(request)


@pytest.fixture
def redirecting(seaweed):
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    proxy = _Redirecting(seaweed.endpoint_url).start()
    proxy.to = f"http://127.0.0.1:{sink.server_port}"
    yield proxy
    proxy.stop()
    sink.shutdown()
    sink.server_close()


def test_an_upload_the_store_redirects_elsewhere_is_not_taken_for_stored(agent_factory, seaweed, redirecting):
    """The agent's own PUTs, GETs and HEADs (S3Uplink._request) followed redirects, which aiobotocore never does: a
    PUT answered 307 to another host was sent there, the patient's bytes with it (aiohttp only drops the
    Authorization header across origins), and that host's 200 taken for the upload: the file was marked clean, its
    only copy evictable, and the bucket never held it. A redirect is an error now: the upload stays queued."""
    agent = agent_factory(**{"uplink.endpoint_url": redirecting.endpoint_url}).start()
    f = ftp(agent)
    f.storbinary("STOR redirected.dcm", io.BytesIO(b"patient image " * 1000))  # stored here, the upload queued
    time.sleep(2)
    assert _Sink.puts == []
    assert not [e for e in agent.events("uploaded") if e.get("path") == "redirected.dcm"]
    assert agent.health()["queue_depth"] == 1
    redirecting.to = ""  # the store behaves again: the queued upload lands in the bucket
    wait_for(lambda: agent.health()["queue_depth"] == 0, 60, what="the queued upload")
    assert seaweed.client().head_object(Bucket=BUCKET, Key=f"{agent.prefix}redirected.dcm")["ContentLength"] == 14000
    f.quit()


class _ForeignKeys(FaultProxy):
    """The fault proxy, adding to the store's listing of d/ the directories another writer of a shared bucket made
    with keys AWS S3 and Ceph store as given: 'd/../x', 'd/./y', 'd/a\\b/z' (SeaweedFS refuses the first two and
    turns the backslash into a slash, so it cannot list them)."""

    added = ("..", ".", "a\\b")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle(request)
        prefix = request.query.get("prefix", "")
        if request.method == "GET" and "list-type" in request.query and prefix.endswith("/d/"):
            extra = "".join(f"<CommonPrefixes><Prefix>{prefix}{d}/</Prefix></CommonPrefixes>" for d in self.added)
            assert isinstance(response, web.Response) and response.body is not None
            response.body = bytes(response.body).replace(b"</ListBucketResult>",
                                                         extra.encode() + b"</ListBucketResult>")
        return response


@pytest.fixture
def foreign_keys(seaweed):
    proxy = _ForeignKeys(seaweed.endpoint_url).start()
    yield proxy
    proxy.stop()


def test_listed_keys_no_client_could_use_are_not_shown(agent_factory, seaweed, foreign_keys):
    """A directory of the bucket named '..', '.' or with a backslash (another writer's key 'd/../x') was listed to
    the clients as it came: LIST showed d holding a '..' directory besides its parent's (a client walking the tree
    went up into its parent from there), and names that every later command refused (resolve() reads '..' as the
    parent; a backslash is no name). They are left out like the names with control characters, and said why."""
    agent = agent_factory(**{"uplink.endpoint_url": foreign_keys.endpoint_url})
    seaweed.client().put_object(Bucket=BUCKET, Key=f"{agent.prefix}d/x.dcm", Body=b"another writer's image")
    agent.start()
    f = ftp(agent)
    assert [n.rsplit("/", 1)[-1] for n in f.nlst("d")] == ["x.dcm"]
    assert sorted(name for name, _ in f.mlsd("d")) == ["x.dcm"]
    assert {e["name"] for e in agent.events("listing_name_hidden")} == {repr(n) for n in _ForeignKeys.added}
    f.quit()


def test_a_cold_read_of_a_key_written_again_larger_stops_at_the_files_size(agent_factory, seaweed):
    """Another writer of a shared bucket wrote a listed key again, larger (here 1 KB → 48 MiB). A cold read of the
    file (the catalog's size: 1 KB) streamed the whole new object into the cache's staging before its size check
    failed it: 48 MiB of download and disk for a 1 KB file, at each read again, and an object larger than the free
    space filled the disk the PACS stores to. The fetch stops at the first byte past the file's size now."""
    agent = agent_factory().start()
    client, key = seaweed.client(), f"{agent.prefix}d/x.dcm"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"k" * 1000)
    f = ftp(agent)
    assert [n.rsplit("/", 1)[-1] for n in f.nlst("d")] == ["x.dcm"]  # listed: the catalog holds 1 000 bytes
    client.put_object(Bucket=BUCKET, Key=key, Body=b"L" * (48 << 20))
    with pytest.raises(ftplib.error_temp):
        f.retrbinary("RETR d/x.dcm", lambda _: None)
    failed = agent.wait_events("fetch_failed")[0]
    assert failed["error"] == "Corrupt" and "past its size" in failed["detail"], failed
    f.close()


class _IgnoringRanges(FaultProxy):
    """The fault proxy as a store (or an HTTP proxy before it) that ignores Range, as HTTP allows: a ranged GET of
    big.dcm is answered 200 with the whole object (fetched here by the store's own client: the request's signature
    covers its Range header, so it cannot be forwarded without it)."""

    client = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and "Range" in request.headers and request.path.endswith("/big.dcm"):
            bucket, key = request.path.lstrip("/").split("/", 1)
            whole = await asyncio.to_thread(lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())
            return web.Response(status=200, body=whole, headers={"ETag": request.headers.get("If-Match", '"x"')})
        return await super()._handle(request)


def test_a_ranged_get_answered_with_the_whole_object_is_not_read(agent_factory, seaweed):
    """A cold reader far ahead of a fetch gets a ranged GET (Gateway.read_ahead). A store that ignored the Range and
    answered 200 with the whole object had it read into memory, all of it (b"".join: a 2 GB object, 2 GB of the
    agent's RAM, the box's OOM killer), before its length was found wrong. Only a 206 is read now."""
    proxy = _IgnoringRanges(seaweed.endpoint_url)
    proxy.client = seaweed.client()
    proxy.start()
    try:
        agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url, "uplink.bwlimit": "16MB"})
        data = os.urandom(32 << 20)
        proxy.client.put_object(Bucket=BUCKET, Key=f"{agent.prefix}big.dcm", Body=data)
        agent.start()
        f = ftp(agent)
        parts: list[bytes] = []
        f.retrbinary("RETR big.dcm", parts.append, rest=24 << 20)  # far ahead of the fetch's stream
        assert b"".join(parts) == data[24 << 20:]  # the stream brought them
        failed = agent.wait_events("ranged_get_failed")
        assert [e["error"] for e in failed] == ["NotRangeable"], failed
        f.quit()
    finally:
        proxy.stop()


def test_a_header_read_answered_with_the_whole_object_reads_only_the_header(seaweed):
    """`pacsgw retention reapply` reads each object's first bytes (S3Uplink.first_bytes, a ranged GET) for its
    PatientBirthDate. From a store ignoring Range it read the whole object into memory (a multi-frame study: GBs);
    it reads the bytes it asked for now."""
    proxy = _IgnoringRanges(seaweed.endpoint_url)
    proxy.client = seaweed.client()
    proxy.start()

    async def header() -> bytes:
        async with S3Uplink(UplinkConfig(endpoint_url=proxy.endpoint_url, bucket=BUCKET, prefix="attack30/",
                                         access_key_id=seaweed.access_key,
                                         secret_access_key=seaweed.secret_key)) as s3:
            return await s3.first_bytes("big.dcm", 4096, None)

    try:
        data = os.urandom(8 << 20)
        proxy.client.put_object(Bucket=BUCKET, Key="attack30/big.dcm", Body=data)
        assert asyncio.run(header()) == data[:4096]
    finally:
        proxy.stop()


class _Portal(FaultProxy):
    """The fault proxy as a web server or filtering HTTP proxy in the store's place (a wrong endpoint_url, a captive
    portal): every PUT answered 200 with an HTML page, no ETag (SeaweedFS never answers so)."""

    page = True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and self.page:
            return web.Response(status=200, text="<html><body>Request blocked by policy</body></html>",
                                content_type="text/html")
        return await super()._handle(request)


def test_an_upload_answered_by_a_web_page_is_not_taken_for_stored(agent_factory, seaweed):
    """A PUT answered 200 with an HTML page and no ETag (every S3 store sends the object's ETag) was an upload: the
    file marked clean, its only copy evictable, the bucket without it. Such an answer is an error: it stays queued."""
    proxy = _Portal(seaweed.endpoint_url).start()
    try:
        agent = agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url}).start()
        f = ftp(agent)
        f.storbinary("STOR portal.dcm", io.BytesIO(b"patient image " * 1000))  # stored here, the upload queued
        time.sleep(2)
        assert not [e for e in agent.events("uploaded") if e.get("path") == "portal.dcm"]
        assert agent.health()["queue_depth"] == 1
        proxy.page = False
        wait_for(lambda: agent.health()["queue_depth"] == 0, 60, what="the queued upload")
        assert seaweed.client().head_object(Bucket=BUCKET, Key=f"{agent.prefix}portal.dcm")["ContentLength"] == 14000
        f.quit()
    finally:
        proxy.stop()
