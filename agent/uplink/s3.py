"""The object store: put (single or multipart, SHA-256 verified), copy, get, list, delete. Single-request PUTs,
GETs and HEADs are signed requests of our own over aiohttp (S3Uplink._request); the rest goes through aiobotocore.

Every object carries its SHA-256 as the S3 checksum and as user metadata `sha256` (the whole file's, also when
multipart), so a replacement box can verify what it reads. Compressed objects are decoded here (docs/dicom.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, NamedTuple, cast

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.auth import EMPTY_SHA256_HASH, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    PaginationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import RestXMLParser
from botocore.utils import parse_timestamp as botocore_parse_timestamp
from botocore.utils import percent_encode
from yarl import URL

from agent.config import UplinkConfig
from agent.records import Lock, ObjectMeta, RemoteObject
from agent.uplink import encoding
from agent.uplink.encoding import Decoder, Undecodable, encoding_of, logical_size
from agent.uplink.ratelimit import Bandwidth, TokenBucket

log = structlog.get_logger("pacsgw.uplink")

META_SHA = "sha256"
# An object whose HEAD got no answer is not asked again for this long: every listing of its directory (each use, it
# stays unlisted) waited read_timeout for it
UNANSWERED_RETRY_S = 300.0
GET_CHUNK = 256 * 1024  # a download lands (written, hashed, readers woken) in blocks this large


class ChecksumMismatch(Exception):
    """The object store stored something else than what we sent or expected."""


class NotRangeable(Exception):
    """A ranged GET cannot give the file's bytes at an offset: a compressed object's, or a store ignoring Range."""


# (path, ETag) of listed objects → the logical sizes of those the catalog knows (same ETag)
KnownSizes = Callable[[list[tuple[str, str | None]]], Awaitable[dict[str, int]]]
Row = tuple[str, int, float, str | None]  # a walked object: path, size, mtime, etag


@dataclass(frozen=True)
class PutResult:
    etag: str | None
    version_id: str | None
    parts: int = 1
    # the uploader's study-index row of the object for mark_clean: () none (not DICOM), None unchanged (a copy)
    index_row: tuple[object, ...] | None = None


@dataclass(frozen=True)
class RemoteListing:
    objects: list[RemoteObject]
    dirs: list[str]
    unsized: list[str]  # names whose logical size the store did not tell now (a HEAD's 5xx, timeout): left out


# "Slow down" codes: AWS's SlowDown, SeaweedFS's circuit breaker's, and botocore's list of throttling codes
THROTTLE_CODES = frozenset({
    "SlowDown", "ErrTooManyRequest", "ErrRequestBytesExceed", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottledException", "TooManyRequestsException", "RequestThrottled",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "PriorRequestNotComplete",
})


DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_throttled(exc: BaseException) -> bool:
    """True when the server is up but asks us to slow down: retry later, do not call the line down."""
    return isinstance(exc, ClientError) and (
        _status(exc) == 429 or exc.response.get("Error", {}).get("Code") in THROTTLE_CODES)


def is_server_error(exc: BaseException) -> bool:
    """A 5xx other than 'slow down': the server is there but failed this request (SeaweedFS after a restart)."""
    return isinstance(exc, ClientError) and not is_throttled(exc) and _status(exc) >= 500


def is_unreachable(exc: BaseException) -> bool:
    """True when the failure says 'the line or the server is down' rather than 'the request was bad'."""
    if is_throttled(exc):
        return False
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, BotoConnectionError,
                        aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, ClientError):
        return not 0 < _status(exc) < 500
    return isinstance(exc, BotoCoreError) and "connect" in str(exc).lower()


def outcome_unknown(exc: BaseException) -> bool:
    """A failed request the server may still carry out: no answer, or a 5xx; not a connection never made."""
    cause = getattr(exc, "kwargs", {}).get("error")  # what a botocore connection error wraps
    return is_unreachable(exc) and not any(isinstance(e, (ConnectTimeoutError, aiohttp.ClientConnectorError))
                                           for e in (exc, cause))


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "ClientError"))
    return type(exc).__name__


def precondition_failed(exc: BaseException) -> bool:
    """S3 refused a conditional write (If-Match / If-None-Match): the object is not the one expected."""
    return isinstance(exc, ClientError) and (
        error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(exc) == 412)


def meta_sha(metadata: dict[str, str] | None) -> str | None:
    """The sha256 user metadata; some servers (rclone) change the key's case, and S3 keys are headers."""
    return {k.lower(): v for k, v in (metadata or {}).items()}.get(META_SHA)


def plain_md5(headers: Mapping[str, str]) -> str | None:
    """The MD5 of the object's bytes when its ETag is one (a single PutObject's, stored as sent): not an upload's
    parts' ("<md5>-N"), nor under SSE-KMS or SSE-C, whose ETags AWS makes no MD5 of the content."""
    etag = (headers.get("ETag") or "").strip('"').lower()
    plain = headers.get("x-amz-server-side-encryption", "AES256") == "AES256"
    if not plain or "x-amz-server-side-encryption-customer-algorithm" in headers:
        return None
    return etag if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None


def read_verified(path: str, fd: int, size: int, sha256: str, by_store: bool = False) -> bytes:
    """The size bytes behind fd, checked against sha256: what a single-request PUT sends. by_store: only their
    length is checked here, the store refuses other bytes than the SHA-256 the PUT carries (_put's
    ChecksumMismatch; S3Uplink.store_verifies). Blocking."""
    body = os.pread(fd, size, 0)
    if len(body) != size or not by_store and hashlib.sha256(body).hexdigest() != sha256:
        raise ChecksumMismatch(f"{path}: cached content does not match its catalog checksum")
    return body


def refused_digest(exc: BaseException) -> bool:
    """The store refused a PUT whose body is not of the checksum it carries (AWS checks x-amz-checksum-sha256,
    x-amz-content-sha256 and Content-MD5; SeaweedFS the first and the last, with BadDigest)."""
    return isinstance(exc, ClientError) and _status(exc) == 400 and error_code(exc) in DIGEST_CODES


@contextlib.contextmanager
def _sending(url: str, request: AWSRequest) -> Iterator[None]:
    """aiohttp's failures as the botocore exceptions aiobotocore raises (is_unreachable knows those)."""
    try:
        yield
    except aiohttp.ClientSSLError as e:  # a certificate problem is a configuration error, not an outage
        raise SSLError(endpoint_url=url, error=e) from e
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
        raise ConnectionClosedError(error=e, request=request, endpoint_url=url) from e
    except aiohttp.ServerTimeoutError as e:
        error = ConnectTimeoutError if str(e).lower().startswith("connect") else ReadTimeoutError
        raise error(endpoint_url=url, error=e) from e
    except aiohttp.ClientConnectionError as e:
        raise EndpointConnectionError(endpoint_url=url, error=e) from e
    except asyncio.TimeoutError as e:
        raise ReadTimeoutError(endpoint_url=url, error=e) from e


async def _read_block(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """Up to size bytes of a body (fewer only at its end), failing as aiobotocore's streaming body does."""
    try:
        return await resp.content.readexactly(size)
    except asyncio.IncompleteReadError as e:  # the end of the body
        return e.partial
    except asyncio.TimeoutError as e:
        raise ReadTimeoutError(endpoint_url=str(resp.url), error=e) from e
    except aiohttp.ClientConnectionError as e:
        raise ResponseStreamingError(error=e) from e


_META = "x-amz-meta-"


def _object_head(headers: Mapping[str, str]) -> dict[str, Any]:
    """The few fields get and get_range read, keyed as botocore's parser keys them (its full pass costs ~0.3 ms)."""
    meta = {k[len(_META):]: v for k, v in headers.items() if k.lower().startswith(_META)}
    return {"ContentLength": int(headers.get("Content-Length", 0)), "ETag": headers.get("ETag"), "Metadata": meta}


def parse_timestamp(value: str) -> datetime:
    """ISO 8601 and HTTP dates natively; anything else as botocore does, by dateutil (~0.4 ms a date)."""
    for parse in (datetime.fromisoformat, parsedate_to_datetime):
        try:
            parsed = parse(value)
        except (TypeError, ValueError):
            continue
        if parsed.tzinfo is not None:
            return parsed
    return cast(datetime, botocore_parse_timestamp(value))


def b64(digest_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(digest_hex)).decode()


class _KnownPayload(S3SigV4Auth):  # type: ignore[misc]  # botocore ships no types
    """botocore's SigV4 signer, told the payload's SHA-256 (request.context) instead of hashing the body again."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context.get("payload_sha256", EMPTY_SHA256_HASH))  # a GET, a HEAD: no body

    def headers_to_sign(self, request: AWSRequest) -> Any:
        """botocore's, once per request: it asks twice, and each answer was a third of the signer's time."""
        if "headers_to_sign" not in request.context:  # the headers change only before the first call
            request.context["headers_to_sign"] = super().headers_to_sign(request)
        return request.context["headers_to_sign"]


def _retain_until(until: datetime) -> str:
    """x-amz-object-lock-retain-until-date as botocore serializes it: ISO 8601, UTC, whole seconds."""
    return (until if until.tzinfo else until.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Proxy(NamedTuple):
    """The proxy from the environment, its user as Proxy-Authorization (aiohttp deprecates BasicAuth and proxy_auth)
    where proxy_auth put it: an https endpoint's CONNECT; each request of an http one (no CONNECT: no proxy_headers)."""

    url: URL | None
    connect_headers: dict[str, str]
    request_headers: dict[str, str]


def env_proxy(endpoint: str) -> Proxy:
    """The proxy for endpoint from HTTP(S)_PROXY and NO_PROXY as botocore reads them."""
    url = URL(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or (url.host is not None and urllib.request.proxy_bypass(url.host)):
        return Proxy(None, {}, {})
    found = URL(proxy)
    auth = {"Proxy-Authorization": aiohttp.encode_basic_auth(found.user, found.password or "")} if found.user else {}
    return Proxy(found.with_user(None), auth, {}) if url.scheme == "https" else Proxy(found.with_user(None), {}, auth)


# PutObject's arguments (Lock.s3_args, the HA conditions) → the header botocore's serializer writes for each
_HEADERS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "ObjectLockMode": ("x-amz-object-lock-mode", str),
    "ObjectLockRetainUntilDate": ("x-amz-object-lock-retain-until-date", _retain_until),
    "ObjectLockLegalHoldStatus": ("x-amz-object-lock-legal-hold", str),
    "IfMatch": ("If-Match", str),
    "IfNoneMatch": ("If-None-Match", str),
}


def put_headers(metadata: Mapping[str, str], lock: Lock | None, tagging: str | None,
                condition: Mapping[str, str]) -> dict[str, str]:
    """A PutObject's headers as botocore writes them (ASCII values: agent.dicom.objectmeta checks them)."""
    headers = {"x-amz-meta-" + k: v for k, v in metadata.items()}
    if tagging:
        headers["x-amz-tagging"] = tagging
    for arg, value in {**(lock.s3_args() if lock else {}), **condition}.items():
        name, encode = _HEADERS[arg]
        headers[name] = encode(value)
    return headers


_NO_AUTO_HEADERS = ("Content-Type",)  # botocore sends none (the server's default); aiohttp would add its own


class S3Uplink:
    def __init__(self, cfg: UplinkConfig, bandwidth: Bandwidth | None = None) -> None:
        self.cfg = cfg
        # the line's (agent.uplink.line): bwlimit each way
        self.bandwidth = bandwidth or Bandwidth(TokenBucket(cfg.bwlimit), TokenBucket(cfg.bwlimit))
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None  # aiobotocore's S3 client: generated at run time, untyped
        self._http: aiohttp.ClientSession | None = None  # our own requests (see _request)
        self._base_url = f"{cfg.endpoint_url.rstrip('/')}/{cfg.bucket}"  # the rest of _request's parts: start()
        # Logical sizes for listings: the daemon points this at the catalog (else a HEAD per listed object)
        self.known_sizes: KnownSizes | None = None
        # Their HEADs, max_concurrency at a time for all listings together: a client listing many directories at
        # once sent max_concurrency per listing
        self._heads = asyncio.Semaphore(cfg.max_concurrency)
        self._unanswered: dict[tuple[str, str | None], float] = {}  # (path, ETag) → when its HEAD may be sent again
        # Whether the store refuses a body of another SHA-256 than a PUT carries: None until probed (store_verifies)
        self.verified_by_store: bool | None = None
        self._probing = asyncio.Lock()

    async def start(self) -> None:
        config = AioConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},  # our queue retries, with backoff and jitter
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.read_timeout,
            max_pool_connections=self.cfg.max_concurrency * 2 + 4,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = get_session()
        # botocore parses every listed object's LastModified with dateutil (most of a listing's CPU time)
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
        self._client = await self._stack.enter_async_context(session.create_client(
            "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region,
            aws_access_key_id=self.cfg.access_key_id, aws_secret_access_key=self.cfg.secret_access_key,
            verify=self.cfg.ca_bundle or None, config=config))
        # Single-request PUTs, GETs and HEADs (_request): aiohttp as aiobotocore uses it, a session of its own
        tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.cfg.ca_bundle or None) if (
            self.cfg.endpoint_url.startswith("https:")) else True
        self._http = await self._stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_pool_connections, keepalive_timeout=12, ssl=tls),
            timeout=aiohttp.ClientTimeout(sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout),
            auto_decompress=False))
        # The proxy looked up once: aiohttp's trust_env does it in two thread hops per request
        self._proxy = env_proxy(self.cfg.endpoint_url)
        self._signer = _KnownPayload(Credentials(self.cfg.access_key_id, self.cfg.secret_access_key), "s3",
                                     self.cfg.region)
        self._host = self._signer.headers_to_sign(AWSRequest("GET", self._base_url))["host"]  # as botocore signs it
        model = self._client.meta.service_model
        self._models = {op: model.operation_model(op) for op in ("PutObject", "GetObject", "HeadObject")}
        self._parser = RestXMLParser(timestamp_parser=parse_timestamp)  # as the client's, not async

    async def close(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> S3Uplink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def key(self, path: str) -> str:
        return self.cfg.prefix + path

    async def probe(self) -> None:
        await self._client.head_bucket(Bucket=self.cfg.bucket)

    async def store_verifies(self, probe_key: str) -> bool:
        """Whether the store refuses a single PutObject whose body is not of the SHA-256 it carries (AWS, SeaweedFS
        do; rclone's `serve s3` does not): then its uploads need not hash their bodies here. Found once, by a PUT
        of probe_key (absolute) with a wrong checksum, deleted if stored; no answer raises (the next call asks)."""
        async with self._probing:  # the first uploads all ask at once: one probe
            if self.verified_by_store is None:
                self.verified_by_store, answer = await self._probe_verify(probe_key)
                log.info("upload_verify", mode="store" if self.verified_by_store else "local", answer=answer,
                         key=probe_key)
        return self.verified_by_store

    async def _probe_verify(self, key: str) -> tuple[bool, str]:
        body = b"pacsgw upload-verify probe: a store that keeps this does not check x-amz-checksum-sha256\n"
        wrong = hashlib.sha256(body + b"not this").hexdigest()  # in both headers, as an upload sends the catalog's
        try:
            async with self._request("PUT", key, "PutObject", {"x-amz-checksum-sha256": b64(wrong)}, body, wrong):
                pass
        except ClientError as e:
            if refused_digest(e):
                return True, error_code(e)
            if is_unreachable(e) or is_throttled(e):
                raise
            return False, error_code(e)  # another refusal (AccessDenied…): no sign of a check, hash here
        await self.delete_raw(key)
        return False, "stored"

    async def object_lock_enabled(self) -> bool:
        try:
            resp = await self._client.get_object_lock_configuration(Bucket=self.cfg.bucket)
        except ClientError as e:
            if _status(e) in (400, 404, 501):
                return False
            raise
        return bool(resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    async def put_file(self, path: str, fd: int, size: int, sha256: str, lock: Lock | None = None,
                       meta: ObjectMeta | None = None, condition: dict[str, str] | None = None,
                       compress: bool = False, body: bytes | None = None) -> PutResult:
        """Upload the content behind fd (pread); body: its bytes, read by read_verified, for a single_request
        file. compress: zstd on the way (kept only if it shrinks). lock and meta go in the same request. A
        condition ({"IfMatch": etag} or {"IfNoneMatch": "*"}) makes S3 refuse (412) another object than this
        box last knew: an HA pair never overwrites the other box's newer content."""
        metadata = {**(meta.metadata if meta else {}), META_SHA: sha256}
        tagging = meta.tagging() if meta and meta.tags else None
        condition = condition or {}
        if not self.single_request(size):
            lock_args = lock.s3_args() if lock else {}
            if tagging:
                lock_args["Tagging"] = tagging
            if compress:
                metadata |= encoding.metadata(size)
            return await self._put_multipart(path, fd, size, sha256, lock_args, metadata, condition, compress)
        if body is None:
            body = await asyncio.to_thread(read_verified, path, fd, size, sha256)
        sent_sha = sha256
        if compress and len(packed := await asyncio.to_thread(encoding.compress, body)) < size:
            body, metadata = packed, metadata | encoding.metadata(size)
            sent_sha = hashlib.sha256(body).hexdigest()
        return await self._put(self.key(path), body, sent_sha, put_headers(metadata, lock, tagging, condition))

    def single_request(self, size: int) -> bool:
        """Whether put_file sends a file of this size in one PutObject (else a multipart upload)."""
        return size < self.cfg.multipart_threshold

    async def _put(self, key: str, body: bytes, sha256: str, headers: dict[str, str]) -> PutResult:
        """One PutObject of body (whose SHA-256 is sha256) with these headers, at the line's upload rate."""
        await self.bandwidth.up.acquire(len(body))
        try:
            async with self._request("PUT", key, "PutObject", {"x-amz-checksum-sha256": b64(sha256), **headers},
                                     body, sha256) as resp:
                # every S3 store names what it stored by a strong ETag: a web page's 200 (weak one at most) stored
                # nothing
                if resp.headers.get("ETag", "W/").startswith("W/"):
                    raise ChecksumMismatch(
                        f"{key}: answered {resp.status} without an object's ETag ({resp.content_type})")
                returned = resp.headers.get("x-amz-checksum-sha256")
                if returned is not None and returned != b64(sha256):
                    raise ChecksumMismatch(f"{key}: object store answered checksum {returned}")
                return PutResult(resp.headers.get("ETag"), resp.headers.get("x-amz-version-id"))
        except ClientError as e:
            if refused_digest(e):  # the failure the local check raises, when the store is the one checking
                raise ChecksumMismatch(f"{key}: the object store refused the body as not of sha256 {sha256} "
                                       f"({error_code(e)})") from e
            raise

    @contextlib.asynccontextmanager
    async def _request(self, method: str, key: str, operation: str, headers: Mapping[str, str],
                       body: bytes | None = None, payload_sha256: str = EMPTY_SHA256_HASH, stream: bool = False,
                       ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request for key as aiobotocore sends it, without the client's per-request work (~2 ms of CPU per PUT),
        failing as it does (botocore's signer, error parser and exceptions) → the answer (status < 300), its
        body read unless stream (then read it with _read_block)."""
        url = f"{self._base_url}/{percent_encode(key, safe='/~')}"
        request = AWSRequest(method, url, headers={"host": self._host, **headers})
        request.context["payload_sha256"] = payload_sha256
        self._signer.add_auth(request)
        assert self._http is not None
        with _sending(url, request):
            # No "Expect: 100-continue": its wait for the store's interim answer was a round trip inside every ack.
            # No redirects (as aiobotocore): a PUT redirected to another host sent it the file, and its 200 was taken
            resp = await self._http.request(method, URL(url, encoded=True), data=body, allow_redirects=False,
                                            headers={**request.headers, **self._proxy.request_headers,
                                                     "Accept-Encoding": "identity"},
                                            skip_auto_headers=_NO_AUTO_HEADERS, proxy=self._proxy.url,
                                            proxy_headers=self._proxy.connect_headers or None)
        try:
            with _sending(url, request):
                answer = await resp.read() if resp.status >= 300 or not stream else b""
            if resp.status >= 300:
                parsed = self._parser.parse({"status_code": resp.status, "headers": resp.headers, "body": answer},
                                            self._models[operation].output_shape)
                raise self._client.exceptions.from_code(parsed.get("Error", {}).get("Code"))(parsed, operation)
            yield resp
        finally:
            resp.release()

    async def _put_multipart(self, path: str, fd: int, size: int, sha256: str, lock_args: dict[str, object],
                             metadata: dict[str, str], condition: dict[str, str], compress: bool) -> PutResult:
        at = {"Bucket": self.cfg.bucket, "Key": self.key(path)}
        mpu = await self._client.create_multipart_upload(
            **at, ChecksumAlgorithm="SHA256", Metadata=metadata, **lock_args)
        upload = {**at, "UploadId": mpu["UploadId"]}
        whole = hashlib.sha256()
        try:
            parts = []
            async for number, body in _parts(fd, size, self.cfg.multipart_chunk, whole, compress):
                part_sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
                await self.bandwidth.up.acquire(len(body))
                resp = await self._client.upload_part(**upload, PartNumber=number, Body=body, ChecksumSHA256=part_sha)
                if resp.get("ChecksumSHA256", part_sha) != part_sha:
                    raise ChecksumMismatch(f"{path}: part {number} checksum differs")
                parts.append({"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": part_sha})
            if whole.hexdigest() != sha256:
                raise ChecksumMismatch(f"{path}: cached content does not match its catalog checksum")
            done = await self._client.complete_multipart_upload(**upload, MultipartUpload={"Parts": parts}, **condition)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._client.abort_multipart_upload(**upload))
            raise
        return PutResult(done.get("ETag"), done.get("VersionId"), len(parts))

    async def put_raw(self, key: str, body: bytes) -> PutResult:
        """Put bytes under an absolute key (outside the namespace prefix: audit logs), checksummed."""
        sha = hashlib.sha256(body).hexdigest()
        return await self._put(key, body, sha, put_headers({META_SHA: sha}, None, None, {}))

    async def get_raw(self, key: str, max_bytes: int) -> bytes | None:
        """A small object under an absolute key, whole (None: there is none); ValueError, unread, when it holds more
        than max_bytes (any S3 client may write there)."""
        try:
            resp = await self._client.get_object(Bucket=self.cfg.bucket, Key=key)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise
        async with resp["Body"] as body:
            if resp["ContentLength"] > max_bytes:
                raise ValueError(f"{key}: {resp['ContentLength']} bytes, more than the {max_bytes} expected")
            return cast(bytes, await body.read())

    async def keys(self, prefix: str) -> list[str]:
        """Every key under an absolute prefix, in key order."""
        return [o["Key"] async for page in self.pages(prefix) for o in page.get("Contents", [])]

    async def delete_raw(self, key: str) -> None:
        await self._client.delete_object(Bucket=self.cfg.bucket, Key=key)

    async def copy(self, src: str, dst: str, sha256: str | None, lock: Lock | None = None,
                   condition: dict[str, str] | None = None, src_etag: str | None = None) -> PutResult:
        """Server-side copy (no traffic on the line), verified by the copy's recorded hash; condition as in
        put_file. src_etag: the source the caller's HEAD saw; S3 refuses (412) if src holds another one by now."""
        lock_args = {**lock.s3_args(), "ChecksumAlgorithm": "SHA256"} if lock else {}
        target = self._version(dst, None)
        resp = await self._client.copy_object(
            **target, CopySource={"Bucket": self.cfg.bucket, "Key": self.key(src)}, MetadataDirective="COPY",
            **lock_args, **(condition or {}), **({"CopySourceIfMatch": src_etag} if src_etag else {}))
        if lock:  # set explicitly too: not every S3 server honours lock headers on CopyObject
            await self.retain(dst, lock.mode, lock.until, resp.get("VersionId"))
            if lock.legal_hold:
                await self.hold(dst, resp.get("VersionId"))
        remote_sha = meta_sha((await self._client.head_object(**target)).get("Metadata"))
        if sha256 and remote_sha and remote_sha != sha256:
            raise ChecksumMismatch(f"{dst}: copied object's sha256 {remote_sha} != {sha256}")
        return PutResult(resp.get("CopyObjectResult", {}).get("ETag"), resp.get("VersionId"))

    def _version(self, path: str, version: str | None) -> dict[str, str]:
        return {"Bucket": self.cfg.bucket, "Key": self.key(path), **({"VersionId": version} if version else {})}

    async def retain(self, path: str, mode: str, until: datetime, version: str | None) -> None:
        await self._client.put_object_retention(Retention={"Mode": mode, "RetainUntilDate": until},
                                                ChecksumAlgorithm="SHA256", **self._version(path, version))

    async def hold(self, path: str, version: str | None) -> None:
        await self._client.put_object_legal_hold(LegalHold={"Status": "ON"}, ChecksumAlgorithm="SHA256",
                                                 **self._version(path, version))

    async def delete(self, path: str) -> bool:
        """→ whether the client sent it twice (it retries): an unanswered attempt may land after a new object."""
        resp = await self._client.delete_object(Bucket=self.cfg.bucket, Key=self.key(path))
        return int(resp.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0

    @contextlib.asynccontextmanager
    async def get(self, path: str, on_etag: Callable[[str | None, bool], None] | None = None, sha256: str | None = None
                  ) -> AsyncIterator[tuple[int, str | None, str | None, AsyncIterator[bytes]]]:
        """→ (the file's size, its sha256 metadata, the MD5 its ETag is when it has no SHA-256 (another writer's
        object), rate-limited decoded chunks); on_etag(ETag, rangeable) once it answered. sha256: the content
        expected; other content (the key written again) is ChecksumMismatch."""
        async with self._request("GET", self.key(path), "GetObject", {}, stream=True) as resp:
            head = _object_head(resp.headers)
            if sha256 and meta_sha(head["Metadata"]) not in (None, sha256):
                raise ChecksumMismatch(f"{path}: the object holds other content than sha256 {sha256}")
            encoded = encoding_of(head["Metadata"]) is not None
            size = logical_size(head)
            if on_etag is not None:
                on_etag(head["ETag"], not encoded)

            async def decoded(decoder: Decoder) -> AsyncIterator[bytes]:
                async for data in self._blocks(resp):
                    decoder.push(data)
                    while (out := await asyncio.to_thread(decoder.pull)) is not None:
                        if out:
                            yield out
                decoder.finish()

            unhashed = not (encoded or sha256 or meta_sha(head["Metadata"]))
            yield (size, meta_sha(head["Metadata"]), plain_md5(resp.headers) if unhashed else None,
                   decoded(Decoder(size)) if encoded else self._blocks(resp))

    async def _blocks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The answer's body in GET_CHUNK blocks, at the line's download rate."""
        while data := await _read_block(resp, GET_CHUNK):
            await self.bandwidth.down.acquire(len(data))
            yield data

    async def decoded_sha256(self, path: str) -> tuple[int, str]:
        """(size, SHA-256) of the file a (compressed) object holds, decoded: `pacsgw fsck --remote`."""
        h, n = hashlib.sha256(), 0
        async with self.get(path) as (_size, _sha, _md5, chunks):
            async for data in chunks:
                await asyncio.to_thread(h.update, data)
                n += len(data)
        return n, h.hexdigest()

    async def get_range(self, path: str, start: int, length: int, etag: str | None) -> bytes:
        """length bytes from start of the version with this ETag: a cold read at an offset need not wait."""
        ask = {"Range": f"bytes={start}-{start + length - 1}", **({"If-Match": etag} if etag else {})}
        async with self._request("GET", self.key(path), "GetObject", ask, stream=True) as resp:
            head = _object_head(resp.headers)
            if head["ContentLength"] > length:  # Range ignored (HTTP allows it): not read into memory whole
                raise NotRangeable(f"{path}: answered {head['ContentLength']} bytes for a range of {length}")
            if encoding_of(head["Metadata"]) is not None:
                raise NotRangeable(f"{path}: compressed object, read whole")
            return b"".join([data async for data in self._blocks(resp)])

    async def first_bytes(self, path: str, n: int, version: str | None) -> bytes:
        """The first n bytes this version of path holds, as stored (not decoded): a header's read, not the file's."""
        resp = await self._client.get_object(Range=f"bytes=0-{n - 1}", **self._version(path, version))
        head = bytearray()
        async with resp["Body"] as body:  # n at most: a store ignoring Range (HTTP allows it) sends the whole object
            while len(head) < n and (data := await body.read(n - len(head))):
                head += data
        return bytes(head)

    async def head(self, path: str, full: bool = True) -> dict[str, Any] | None:
        """The object's HeadObject answer as the client parses it (full=False: only the fields get reads, enough
        for a logical size: botocore's pass cost ~90 µs of a HEAD's ~860); None when there is none."""
        try:
            async with self._request("HEAD", self.key(path), "HeadObject", {}) as resp:
                return self._parser.parse(
                    {"status_code": resp.status, "headers": resp.headers, "body": b""},
                    self._models["HeadObject"].output_shape) if full else _object_head(resp.headers)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise

    async def pages(self, prefix: str, **args: str) -> AsyncIterator[dict[str, Any]]:
        """ListObjectsV2's pages of the keys under prefix (an absolute key prefix). A continuation token given before,
        or a key or common prefix that the first or the last page listed (one listing never names one twice), raises
        PaginationError: such a listing goes round for ever (botocore stops only at a token given twice in a row, and
        one restarting with fresh tokens never), and a LIST of its directory, and every one after that joined it,
        never answered. Not an order check: SeaweedFS lists a tree walk's order ('a/x' before 'a b'), S3 binary."""
        seen: set[str] = set()
        first: set[str] = set()
        last: set[str] = set()
        async for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.cfg.bucket, Prefix=prefix, **args):
            if (token := page.get("NextContinuationToken")) in seen:
                raise PaginationError(message=f"listing {prefix!r}: continuation token {token!r} again")
            names = {o["Key"] for o in page.get("Contents", [])} | {p["Prefix"] for p in page.get("CommonPrefixes", [])}
            if again := names & (first | last):
                raise PaginationError(message=f"listing {prefix!r}: {min(again)!r} listed again")
            seen.add(token)
            first, last = first or names, names
            yield page

    def _row(self, obj: Mapping[str, Any]) -> Row:
        """A listed object → (its path in the namespace, its listed size, mtime, ETag)."""
        mtime = obj["LastModified"]  # a datetime; epoch seconds from some servers
        mtime = mtime.timestamp() if isinstance(mtime, datetime) else float(mtime)
        return obj["Key"][len(self.cfg.prefix):], obj["Size"], mtime, obj.get("ETag")

    async def walk(self, logical: bool = True) -> AsyncIterator[list[Row]]:
        """Every object of the namespace, a page at a time, invalid paths left out; logical=False: sizes as listed."""
        async for page in self.pages(self.cfg.prefix):
            rows = [self._row(obj) for obj in page.get("Contents", [])]
            rows = [r for r in rows if not any(part in ("", ".", "..") for part in r[0].split("/"))]
            yield await self.logical_sizes(rows) if logical else rows

    async def names(self, path: str) -> tuple[list[str], list[str]]:
        """(file names, directory names) in directory path: no HEAD, where only names matter."""
        files: list[str] = []
        dirs: list[str] = []
        async for rows, page_dirs in self._row_pages(path):
            files += [p.rsplit("/", 1)[-1] for p, *_ in rows]
            dirs += page_dirs
        return files, dirs

    async def list_dir(self, path: str) -> AsyncIterator[RemoteListing]:
        """The directory's files with their logical sizes, and its directories, a ListObjectsV2 page at a time (a
        directory of a million objects held them all, and a HEAD's task each at once); a file whose size the store
        did not tell now is left out and named in `unsized` (the rest listed: one failing HEAD failed the whole
        listing, and each LIST sent every HEAD again)."""
        async for rows, dirs in self._row_pages(path):
            unsized: list[str] = []
            yield RemoteListing([RemoteObject(p.rsplit("/", 1)[-1], size, mtime, etag)
                                 for p, size, mtime, etag in await self.logical_sizes(rows, unsized)], dirs,
                                [p.rsplit("/", 1)[-1] for p in unsized])

    async def _row_pages(self, path: str) -> AsyncIterator[tuple[list[Row], list[str]]]:
        """Per listed page: the rows of the files directly in path (sizes as listed), the names of its directories."""
        prefix = self.key(path + "/" if path else "")
        async for page in self.pages(prefix, Delimiter="/"):
            yield ([self._row(obj) for obj in page.get("Contents", [])
                    if (name := obj["Key"][len(prefix):]) and "/" not in name],
                   [name for cp in page.get("CommonPrefixes", []) if (name := cp["Prefix"][len(prefix):].rstrip("/"))])

    async def logical_sizes(self, rows: list[Row], unsized: list[str] | None = None) -> list[Row]:
        """The rows with each object's logical size: from the catalog by ETag, else a HEAD; gone ones left out.
        unsized: where the paths go whose HEAD failed for now (a 5xx, no answer, slow down), left out too; without
        it such a failure fails the whole call (a walk must see every object: ha.py forgets the ones it does not)."""
        if not rows:
            return rows
        known = await self.known_sizes([(r[0], r[3]) for r in rows]) if self.known_sizes else {}

        async def size_of(path: str, etag: str | None) -> int | None:
            if unsized is not None and time.monotonic() < self._unanswered.get((path, etag), 0.0):
                unsized.append(path)
                failures.append("unanswered before")
                return None
            async with self._heads:
                try:
                    head = await self.head(path, full=False)
                except Exception as e:
                    if unsized is not None and (is_unreachable(e) or is_throttled(e)):
                        unsized.append(path)
                        failures.append(error_code(e))
                        if isinstance(e, ReadTimeoutError):
                            self._unanswered_until(path, etag)
                        return None
                    if not isinstance(e, ClientError) or _status(e) not in (400, 403) or is_throttled(e):
                        raise
                    # Refused to this box (a key's policy, another writer's SSE-C key): a read would be too. Left
                    # out: the listing failed whole, its directory looked empty, and each LIST asked every object again
                    log.warning("remote_object_skipped", path=path, reason=f"HEAD refused ({_status(e)})")
                    return None
            if head is None:
                return None
            try:
                return logical_size(head)
            except Undecodable as e:  # another client's object whose metadata lies: it cannot be read as a
                # file (a read would fail its checks); left out, so its siblings stay listed
                log.warning("remote_object_skipped", path=path, reason=str(e)[:200])
                return None

        failures: list[str] = []
        unknown = [r[0] for r in rows if r[0] not in known]
        sizes = await asyncio.gather(*(size_of(r[0], r[3]) for r in rows if r[0] not in known))
        if unsized:  # one event for them all: with the line gone, each HEAD of a large directory fails
            log.warning("remote_objects_unsized", count=len(unsized), first=unsized[0], error=failures[0])
        known |= {p: s for p, s in zip(unknown, sizes, strict=True) if s is not None}
        return [(p, known[p], mtime, etag) for p, _, mtime, etag in rows if p in known]

    def _unanswered_until(self, path: str, etag: str | None) -> None:
        now = time.monotonic()
        if len(self._unanswered) >= 1024:  # the ones due again go: at most max_concurrency a read_timeout come in
            self._unanswered = {k: t for k, t in self._unanswered.items() if t > now}
        self._unanswered[(path, etag)] = now + UNANSWERED_RETRY_S


async def _parts(fd: int, size: int, chunk: int, whole: Any, compress: bool) -> AsyncIterator[tuple[int, bytes]]:
    """(part number, body) of a multipart upload of fd, hashed into `whole`; compressed: `chunk` bytes of output."""
    packer = encoding.compressor(size) if compress else None
    pending, number = b"", 1
    for offset in range(0, size, chunk):
        body = await asyncio.to_thread(os.pread, fd, min(chunk, size - offset), offset)
        whole.update(body)
        if packer is None:
            yield number, body
            number += 1
            continue
        pending += await asyncio.to_thread(packer.compress, body)
        if offset + chunk >= size:
            pending += packer.flush()
        while len(pending) >= chunk or (pending and offset + chunk >= size):
            yield number, pending[:chunk]
            pending, number = pending[chunk:], number + 1
