"""Operations over HTTP: /healthz (JSON), /metrics (Prometheus text), /status (a small page for people)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import functools
import hmac
import html
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import sys
import termios
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, TypeVar

import psutil
import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from agent.auth import REFUSALS_EVERY, Every, LoginGuard, address_group, login_name, unmapped, verify_password
from agent.config import HttpConfig, fmt_bytes
from agent.serve.contract import tls_context

log = structlog.get_logger("pacsgw.http")

STALE_QUEUE_SECONDS = 900  # dirty data older than this makes the box 'degraded' even with a live uplink
# How long a connection may wait for its next request, however slowly its headers trickle in (aiohttp's default,
# an hour, let a client trickling header lines hold as many connections as it opened)
IDLE_SECONDS = 5.0
BAD_REQUEST_EVERY = 60.0  # seconds: at most one http_bad_request event per this, counting the others
# Connections a listener keeps open from one address, and from all together: each is a descriptor of the agent's,
# as are the files its uploads and reads open. There was no cap: a client connecting in a loop held as many as it
# made in IDLE_SECONDS (600 at once here, the process's descriptor limit the only end).
MAX_CONNECTIONS_PER_ADDRESS = 32
MAX_CONNECTIONS = 256
# The box's own tools (keepalived's check, agent.hahook; pacsgw status, evict) connect from these: counted against
# MAX_CONNECTIONS, eight addresses of the admin network holding 32 idle connections each had the check refused and
# the HA pair failed over. They keep their per-address cap, beside the total (an IPv6 address counts as its /64).
OWN_ADDRESSES = ("127.0.0.1", address_group("::1"))
# Requests one keep-alive connection is answered, the last with Connection: close (nginx's keepalive_requests): a
# client asking within every IDLE_SECONDS held its connection, a slot of the caps above, for as long as it liked.
MAX_REQUESTS_PER_CONNECTION = 1000
# How old an answer of /healthz, /status or /metrics a client off the box may get: each took 0.8-1 ms of the agent's
# CPU (catalog queries, process and disk figures), 4-5 times a request it refuses, for anyone reaching the port.
# The box's own tools (loopback: pacsgw status, keepalived's check) get a fresh one.
FRESH_SECONDS = 1.0
# How long a connection's answer may wait with not a byte of it taken by the client (its kernel send queue unchanged):
# a client pipelining requests and reading none held its connection, a slot of the caps above, for ever.
STALLED_SECONDS = 30.0

T = TypeVar("T")


_bad_requests = Every(BAD_REQUEST_EVERY)


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs each request its parser refuses with a 10-line traceback, so anyone reaching a listener could fill
    the journal: one http_bad_request event per BAD_REQUEST_EVERY instead; a handler's bug keeps its traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    if (suppressed := _bad_requests.due("bad request")) is not None:
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        log.warning("http_bad_request", peer=str(peer)[:64], status=exc.code, error=type(exc).__name__,
                    detail=repr(exc.message[:120]), suppressed=suppressed, suppressed_seconds=BAD_REQUEST_EVERY)
    return False


logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)  # the logger of every aiohttp listener here


class _Connections:
    """A listener's open connections by address (an IPv6 one's /64: agent.auth.address_group), counted from their
    accept (_Listening) to their close: one over MAX_CONNECTIONS_PER_ADDRESS or MAX_CONNECTIONS is closed before
    anything of it is read or a TLS handshake (counted once aiohttp had them, a client that never started its
    handshake held as many as it opened). The requests answered on each are counted too (`answering`): the last of
    MAX_REQUESTS_PER_CONNECTION closes it; one closed after IDLE_SECONDS without any (a silent or slowloris client,
    headers trickled a byte a second) is logged (http_idle_closed: aiohttp closed those without a word)."""

    def __init__(self, listener: str) -> None:
        self.listener = listener
        self.open: Counter[str] = Counter()
        self.answered: dict[int, int] = {}  # an open connection's descriptor → requests answered on it
        self._told = Every(REFUSALS_EVERY)  # per (event, address)

    def admit(self, address: str, fd: int) -> bool:
        others = self.open.total() - sum(self.open[own] for own in OWN_ADDRESSES)
        if self.open[address] >= MAX_CONNECTIONS_PER_ADDRESS or (address not in OWN_ADDRESSES
                                                                 and others >= MAX_CONNECTIONS):
            if (since := self._told.due(("refused", address))) is not None:
                log.warning("http_refused", listener=self.listener, peer=address, refused_since=since,
                            reason=f"too many connections (limit {MAX_CONNECTIONS_PER_ADDRESS} per address, "
                                   f"{MAX_CONNECTIONS} in all)")
            return False
        self.open[address] += 1
        self.answered[fd] = 0
        return True

    def release(self, address: str, fd: int, opened: float) -> None:
        """The connection on fd (before its close: the number is not yet anyone else's) is closed."""
        self.open -= Counter({address: 1})  # the address goes at 0
        if not self.answered.pop(fd, 0) and time.monotonic() - opened >= IDLE_SECONDS:
            if (since := self._told.due(("idle", address))) is not None:
                log.warning("http_idle_closed", listener=self.listener, peer=address, closed_since=since,
                            reason=f"no whole request within {IDLE_SECONDS:g} s")

    async def answering(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """on_response_prepare: one more request answered on its connection; the last one allowed says close."""
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd in self.answered:
            self.answered[fd] += 1
            if self.answered[fd] == 1 and request.transport is not None:
                self._watch(request.transport, fd, address_group(request.remote or ""), 0)
            if self.answered[fd] >= MAX_REQUESTS_PER_CONNECTION:
                response.force_close()  # the connection ends after this answer,
                response.headers[hdrs.CONNECTION] = "close"  # which says so (its headers are made by now)

    def _watch(self, transport: asyncio.Transport, fd: int, address: str, unsent: int) -> None:
        """Every STALLED_SECONDS from its first answer while the connection is open: cut it if its client took no byte
        of what waits for it since the last look (bytes unsent or unacknowledged, the kernel's count)."""
        if transport.is_closing():
            return
        now = int.from_bytes(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(4)), sys.byteorder)
        if now and now == unsent:
            if (since := self._told.due(("stalled", address))) is not None:
                log.warning("http_stalled_closed", listener=self.listener, peer=address, closed_since=since,
                            reason=f"no byte of its answers read in {STALLED_SECONDS:g} s")
            transport.abort()
            return
        asyncio.get_running_loop().call_later(STALLED_SECONDS, self._watch, transport, fd, address, now)


class _Counted(socket.socket):
    """An accepted connection that gives its place back when asyncio's transport closes it."""

    def __init__(self, listening: socket.socket, fd: int, release: Callable[[], None]) -> None:
        super().__init__(listening.family, listening.type, listening.proto, fileno=fd)
        self._release: Callable[[], None] | None = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        super().close()


class _Listening(socket.socket):
    """A listening socket whose accept (asyncio's, for every connection) admits by _Connections."""

    def __init__(self, family: int, connections: _Connections) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.connections = connections

    def accept(self) -> tuple[socket.socket, Any]:
        while True:  # until one is admitted, or none waits (BlockingIOError: asyncio tries again when one comes)
            fd, peer = self._accept()  # type: ignore[attr-defined]
            if self.connections.admit(address := address_group(peer[0]), fd):
                release = functools.partial(self.connections.release, address, fd, time.monotonic())
                return _Counted(self, fd, release), peer
            os.close(fd)


async def _serve(app: web.Application, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> Callable[[], Awaitable[None]]:
    """Serve app on host:port (each address 'localhost' names), its connections capped (_Connections) → the call that
    closes it. Not aiohttp's TCPSite: it leaves a TLS handshake asyncio's 60 s, a silent connection held that long."""
    connections = _Connections(f"{host}:{port}")
    app.on_response_prepare.append(connections.answering)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_SECONDS)
    await runner.setup()
    assert runner.server is not None
    servers = []
    for family, *_, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        sock = _Listening(family, connections)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's own listeners
        sock.bind(address)
        servers.append(await asyncio.get_running_loop().create_server(
            runner.server, sock=sock, ssl=tls, ssl_handshake_timeout=IDLE_SECONDS if tls else None))

    async def close() -> None:
        for server in servers:
            server.close()
        await runner.cleanup()
    return close


class _Fresh(Generic[T]):
    """An expensive answer, computed once for all who ask while it is computed, and kept FRESH_SECONDS for those
    who may have one that old."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._answer: asyncio.Future[T] | None = None
        self._at = 0.0

    async def get(self, old_ok: bool) -> T:
        kept = self._answer
        if kept is None or kept.done() and not (old_ok and time.monotonic() - self._at < FRESH_SECONDS):
            kept = self._answer = asyncio.ensure_future(self._make())
            self._at = time.monotonic()
        return await asyncio.shield(kept)


def model_info(path: str) -> dict[str, Any] | None:
    """The shipped model's card (version and training facts), or None when no model is configured."""
    if not path:
        return None
    card = Path(path).with_suffix(".card.json")
    info: dict[str, Any] = {"path": path, "present": Path(path).is_file()}
    try:
        info.update(json.loads(card.read_text()))
    except (OSError, ValueError) as e:
        info["card_error"] = f"{card}: {e}"
    return info


TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")  # touched by systemd-timesyncd once in sync
TIME_ERROR = 5  # adjtimex(2): the kernel's clock is not synchronised


def clock_sync() -> dict[str, Any]:
    """Whether the clock is synchronised (S3 signing fails when skewed): adjtimex(2), else timesyncd's flag."""
    import ctypes
    buf = ctypes.create_string_buffer(512)   # struct timex (208 bytes on x86-64); modes = 0: read only
    try:
        state = ctypes.CDLL(None, use_errno=True).adjtimex(buf)
    except (OSError, AttributeError):
        state = -1
    if state >= 0:
        return {"synchronized": state != TIME_ERROR, "source": "adjtimex"}
    if TIMESYNC_FLAG.exists():
        return {"synchronized": True, "source": str(TIMESYNC_FLAG)}
    return {"synchronized": None, "source": f"unknown: {os.strerror(ctypes.get_errno())}"}  # state < 0 here


def judge(health: dict[str, Any], min_free: int) -> tuple[str, list[str]]:
    reasons: list[str] = []  # these first: each makes the box degraded
    if not health["uplink"]["reachable"]:
        reasons.append(f"object storage unreachable ({health['uplink']['last_error']}); writing back locally")
    if health["oldest_dirty_seconds"] > STALE_QUEUE_SECONDS:
        reasons.append(f"oldest file not yet in object storage waits {health['oldest_dirty_seconds']:.0f}s")
    pressure = health.get("pressure", {})
    if pressure.get("level", "normal") != "normal":
        reasons.append(f"{pressure['level']} pressure: {'; '.join(pressure['reasons'])}"
                       + ("; fetches from object storage refused" if pressure["level"] == "critical" else
                          "; reduced concurrency"))
    status = "degraded" if reasons else "ok"
    no_inodes = health["cache"]["inodes_free"] == 0  # None: a file system that counts none (btrfs)
    if health["cache"]["disk_free"] < min_free or no_inodes:
        status = "failing"
        reasons.append(f"cache disk nearly full{' (no inodes left)' if no_inodes else ''}: new writes may be refused")
    if failure := health.get("catalog", {}).get("write_failure"):
        status = "failing"
        reasons.append(f"the catalog cannot be written ({failure}): stores are refused")
    if health.get("clock", {}).get("synchronized") is False:
        reasons.append("system clock not synchronised: S3 request signing fails once it drifts by 15 minutes")
    if health.get("draining"):
        reasons.append("draining for shutdown")
    return status, reasons


# An admin request: (query parameters, JSON body or {}) → (HTTP status, JSON result).
AdminHandler = Callable[[dict[str, str], dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


ADMIN_TOKEN_FILE = "admin.token"


def issue_admin_token(path: Path) -> str:
    """A new random admin token, written (mode 0600) where `pacsgw evict/prefetch` on the box read it."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


class HttpServer:
    """`admin` maps (method, path) to handlers, served to loopback requests carrying `admin_token` only."""

    def __init__(self, host: str, port: int, health: Callable[[], Awaitable[dict[str, Any]]],
                 metrics: Callable[[], Awaitable[bytes]],
                 admin: dict[tuple[str, str], AdminHandler] | None = None, admin_token: str = "") -> None:
        self.host, self.port = host, port
        self._health, self._metrics = _Fresh(health), _Fresh(metrics)
        self._admin, self._admin_token = admin or {}, admin_token
        self._told = Every(REFUSALS_EVERY)  # admin_refused events: 401s come as fast as asked for
        self.app = web.Application()
        self.app.add_routes([web.get("/healthz", self.healthz), web.get("/metrics", self.metrics),
                             web.get("/status", self.status), web.get("/", self.status)]
                            + [web.route(method, path, self.admin) for method, path in self._admin])
        self._closes: list[Callable[[], Awaitable[None]]] = []  # of its listeners, the last started first

    async def start(self) -> None:
        self._closes.insert(0, await _serve(self.app, self.host, self.port))

    async def start_scrape(self, cfg: HttpConfig, guard: LoginGuard) -> None:
        """The /metrics-only listener of http.metrics_listen, for the central Prometheus."""
        assert cfg.metrics_listen is not None
        tls = tls_context(cfg.metrics_tls_cert, cfg.metrics_tls_key) if cfg.metrics_tls_cert else None
        self._closes.insert(0, await _serve(ScrapeListener(cfg, self.metrics, guard).app, *cfg.metrics_listen, tls=tls))

    async def close(self) -> None:
        for close in self._closes:
            await close()

    async def healthz(self, request: web.Request) -> web.Response:
        h = await self._health.get(old_ok=not _is_loopback(request.remote))
        return web.json_response(h, status=503 if h["status"] == "failing" else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self._metrics.get(old_ok=not _is_loopback(request.remote)),
                            content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

    async def status(self, request: web.Request) -> web.Response:
        h = await self._health.get(old_ok=not _is_loopback(request.remote))
        return web.Response(text=render_status_html(h), content_type="text/html")

    async def admin(self, request: web.Request) -> web.Response:
        """Admin requests: from loopback with the token (GETs list patient paths), POSTs as JSON (no CSRF)."""
        if not _is_loopback(request.remote):
            return web.json_response({"error": "admin requests are accepted from loopback only"}, status=403)
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not self._admin_token or not hmac.compare_digest(_raw(sent), self._admin_token.encode()):
            # Once a minute: any process of the box sending wrong tokens in a loop wrote an event each (thousands a
            # second), and all of them come from loopback, whose 2^24 IPv4 addresses would each have had their own.
            # Not slowed as wrong passwords are: the token is 256 random bits, unguessable at any rate, and a delay
            # would only hold the connection (a slot of the listener's caps) longer.
            if (since := self._told.due("admin")) is not None:
                log.warning("admin_refused", path=request.path, method=request.method, peer=request.remote,
                            reason="no or wrong token", refused_since=since)
            return web.json_response({"error": "admin requests need 'Authorization: Bearer <token>' with the "
                                      f"token in <cache.dir>/{ADMIN_TOKEN_FILE} (pacsgw evict/prefetch "
                                      "send it)"}, status=401)
        if request.method == "POST" and request.content_type != "application/json":
            return web.json_response({"error": "admin POSTs take Content-Type: application/json"}, status=415)
        try:
            parsed = await request.json() if request.can_read_body else {}
        except (ValueError, RecursionError, LookupError):  # not JSON, nested too deep, an unknown charset: not a 500
            parsed = None
        # a body that is not a JSON object reaches the handler as {}: it names what it expected
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        # aiohttp routes HEAD to each GET handler (RFC 9110: a GET resource answers HEAD): it was a KeyError, a 500 and
        # a traceback; HEAD gets GET's answer, without its body
        method = "GET" if request.method == hdrs.METH_HEAD else request.method
        status, result = await self._admin[(method, request.path)](dict(request.query), body)
        return web.json_response(result, status=status)


class ScrapeListener:
    """/metrics alone, the application HttpServer.start_scrape serves on http.metrics_listen for the monitoring
    subnet, over TLS and behind basic auth when set.
    Wrong passwords meet the box's LoginGuard: banned guesses get their 401 unchecked, not queued before a right one."""

    def __init__(self, cfg: HttpConfig, metrics: Callable[[web.Request], Awaitable[web.Response]],
                 guard: LoginGuard) -> None:
        self.cfg, self._metrics, self.guard = cfg, metrics, guard
        self._told = Every(REFUSALS_EVERY)  # metrics_refused events, per address: 401s come as fast as asked for
        self._checked = ""               # the last Authorization header that verified: skips scrypt per scrape
        self._verifying = asyncio.Lock()  # one scrypt at a time: guessing costs the box one core at most
        self.app = web.Application()
        self.app.add_routes([web.get("/metrics", self.metrics)])

    async def metrics(self, request: web.Request) -> web.Response:
        address = unmapped(request.remote or "")
        if self.cfg.metrics_user and not await self._authorized(request.headers.get("Authorization", ""), address):
            if (since := self._told.due(address)) is not None:
                log.warning("metrics_refused", peer=address, reason="no or wrong basic auth", refused_since=since)
            return web.Response(status=401, text="basic auth required\n",
                                headers={"WWW-Authenticate": 'Basic realm="pacsgw metrics", charset="UTF-8"'})
        return await self._metrics(request)

    async def _authorized(self, header: str, address: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        try:
            user, sep, password = base64.b64decode(_raw(encoded.strip()), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Refused unchecked before the last verified header is compared: that answered a banned guesser too
        if scheme.lower() != "basic" or not sep or await self.guard.refusal(user, address, "metrics"):
            return False
        if self._checked and hmac.compare_digest(_raw(header), _raw(self._checked)):
            return True
        async with self._verifying:
            if await self.guard.refusal(user, address, "metrics"):  # banned while it queued here: no scrypt
                return False
            ok = await asyncio.to_thread(verify_password, password, encoded=self.cfg.metrics_password_hash)
        if not (ok and hmac.compare_digest(user.encode(), self.cfg.metrics_user.encode())):
            log.warning("login_failed", protocol="metrics", user=login_name(user), peer=address)
            await asyncio.sleep(await self.guard.failed(user, address, "metrics"))
            return False
        await self.guard.succeeded(user, address)
        self._checked = header
        return True


def _raw(header: str) -> bytes:
    """A header value's bytes as sent: aiohttp keeps non-UTF-8 bytes as surrogates, which str.encode() refuses."""
    return header.encode("utf-8", "surrogateescape")


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def status_lines(h: dict[str, Any]) -> list[tuple[str, str]]:
    """The status as (label, value) rows: shared by the HTML page and `pacsgw status`."""
    c, m, u = h["cache"], h["memory"], h["uplink"]
    rows = [
        ("status", h["status"] + ("" if not h["reasons"] else " — " + "; ".join(h["reasons"]))),
        ("version", h["version"]),
        ("uptime", f"{h['uptime_seconds']:.0f} s"),
        ("object storage", f"{u['endpoint']} bucket {u['bucket']} prefix {u['prefix'] or '(none)'}: "
                           + ("reachable" if u["reachable"] else "UNREACHABLE")),
        ("write mode", h["write_mode"]),
        ("not yet in object storage", f"{h['queue_depth']} files, {fmt_bytes(h['queue_bytes'])}, "
                                      f"oldest {h['oldest_dirty_seconds']:.0f} s"),
        ("pending deletes", str(h["pending_deletes"])),
        ("files known", str(c["files"])),
        ("cache", f"{c['cached_files']} files, {fmt_bytes(c['bytes'])} of {fmt_bytes(c['max_bytes'])}; "
                  f"disk {fmt_bytes(c['disk_free'])} free of {fmt_bytes(c['disk_total'])}"),
        ("memory", f"agent RSS {fmt_bytes(m['rss'])}, system available {fmt_bytes(m['available'])}"),
    ]
    if p := h.get("prefetch"):
        rows.append(("prefetch", f"{p['state']}, window {p['window']}, last run "
                                 f"{fmt_bytes(p['last_run']['fetched_bytes'])}"
                                 + (f" (stopped: {p['last_run']['stopped']})" if p["last_run"]["stopped"] else "")))
        if p.get("priors"):
            rows.append(("prior studies", f"fetched for new studies; {p.get('priors_over_cap', 0)} not planned "
                                          "since start (writer over priors_per_user_hour)"))
    if h.get("ha"):
        a, peer = h["ha"], h["ha"]["peer"]
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["last_takeover"])) if a["last_takeover"] else "never"
        rows.append(("HA role", f"{a['role']} (keepalived {a['keepalived']}); last take-over {last}"
                                + (f"; not eligible: {a['reason']}" if a["reason"] else "")))
        rows.append(("HA peer", "not configured" if not peer else f"{peer['url']}: " + (
            f"{peer.get('role')} ({peer.get('status')})" if peer.get("reachable") else
            f"UNREACHABLE ({peer.get('error')})")))
    if e := h.get("eviction"):
        ratio = e.get("recent_hit_ratio")
        rows.append(("cache policy", f"{e.get('stack', e['policy'])} ({e.get('mode', 'rule')}); reads from the cache "
                                     f"in the last hour: {'none yet' if ratio is None else f'{ratio:.1%}'}"))
    if h.get("model"):
        rows.append(("model", f"{h['model'].get('version', '?')} ({h['model']['path']})"))
    return rows


def render_status_html(h: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in status_lines(h))
    color = {"ok": "#1a7f37", "degraded": "#9a6700", "failing": "#cf222e"}[h["status"]]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
        "<title>pacsgw status</title><style>body{font-family:sans-serif;margin:2em}"
        "th{text-align:left;padding-right:2em;vertical-align:top}td,th{padding:.25em}"
        f"h1 span{{color:{color}}}</style></head><body>"
        f"<h1>pacsgw <span>{html.escape(h['status'])}</span></h1><table>{rows}</table>"
        f"<p><a href='/healthz'>/healthz</a> · <a href='/metrics'>/metrics</a> · generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p></body></html>")


def process_memory() -> dict[str, int]:
    vm = psutil.virtual_memory()
    return {"rss": psutil.Process().memory_info().rss, "available": vm.available, "total": vm.total}

