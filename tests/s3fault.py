"""A fault-injecting HTTP proxy in front of a real S3 server (SeaweedFS).

It forwards every request unchanged (the Host header too, so SigV4 signatures still verify) and, when told,
answers some requests itself with an S3 error instead: a single 500 InternalError from a healthy server is a
fault a real SeaweedFS cannot be made to produce on demand, so the tests that need it inject it here (and say
so). Everything else, every object, comes from the real server behind it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading

import aiohttp
from aiohttp import web

from devstack import free_port

HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "te", "upgrade",
       "proxy-connection"}
ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
              b"<Message>injected by the test's fault proxy</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.fail_puts = 0  # answer the next N PUT requests with 500
        self.fail_gets = 0  # answer the next N object GETs (not listings: path-style /bucket/key) with 500
        self.fail_copies = 0  # answer the next N server-side copies (PUTs with x-amz-copy-source) with 500
        self.fail_copies_into = ""  # set: answer every server-side copy into a key ending so with 500
        self.fail_all = False  # answer every request with 500 (a server that keeps failing)
        self.injected: list[str] = []
        self.hold_puts = threading.Event()  # set: PUTs wait (forwarded once it is cleared) …
        self.puts_held = 0  # … and this many are waiting
        self.hold_deletes = threading.Event()  # set: DELETEs wait (forwarded once it is cleared) …
        self.deletes_held = 0  # … and this many are waiting
        self.hold_gets = threading.Event()  # set: GETs (listings too) wait (forwarded once it is cleared) …
        self.gets_held = 0  # … and this many are waiting
        self.hold_replies_to = ""  # set: a request whose path contains it is forwarded, its answer held until cleared
        self.hold_replies_method = ""  # set: only requests of this method (GET, PUT, …) have their answers held
        self.replies_held = 0  # … and this many answers are waiting
        self.loop_listings = False  # set: every ListObjectsV2 answer says it goes on, its next token 'a' then 'b', 'a'…
        self.restart_listings = False  # set: a listing's every page is its first one again, with a fresh next token
        self._first_pages: dict[str, bytes] = {}
        self._fresh = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(15):
            raise TimeoutError("fault proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(15)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        async with aiohttp.ClientSession(auto_decompress=False) as self._session:
            self._ready.set()
            await self._stopped.wait()
        await runner.cleanup()

    def _inject(self, request: web.Request) -> bool:
        if self.fail_all:
            return True
        if request.method == "PUT" and "x-amz-copy-source" in request.headers:
            if self.fail_copies_into and request.path.endswith(self.fail_copies_into):
                return True
            if self.fail_copies > 0:
                self.fail_copies -= 1
                return True
        if request.method == "PUT" and self.fail_puts > 0:
            self.fail_puts -= 1
            return True
        if request.method == "GET" and "/" in request.path.strip("/") and self.fail_gets > 0:
            self.fail_gets -= 1
            return True
        return False

    def _hold_reply(self, request: web.Request) -> bool:
        return bool(self.hold_replies_to) and self.hold_replies_to in request.path and (
            not self.hold_replies_method or request.method == self.hold_replies_method)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        hold, count = {"PUT": (self.hold_puts, "puts_held"), "DELETE": (self.hold_deletes, "deletes_held"),
                       "GET": (self.hold_gets, "gets_held")}.get(request.method, (None, ""))
        if hold is not None and hold.is_set():
            setattr(self, count, getattr(self, count) + 1)
            while hold.is_set():
                await asyncio.sleep(0.05)
            setattr(self, count, getattr(self, count) - 1)
        if self._inject(request):
            self.injected.append(f"{request.method} {request.path_qs}")
            return web.Response(status=500, body=ERROR_BODY, content_type="application/xml")
        listing = request.method == "GET" and "list-type" in request.query
        if self.restart_listings and listing and "continuation-token" in request.query:
            first = self._first_pages[request.query.get("prefix", "") + request.query.get("delimiter", "")]
            return web.Response(body=_looped(first, b"%d" % next(self._fresh)), content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False, skip_auto_headers=("Content-Type",)
                                         ) as r:
            data = await r.read()
            if self.loop_listings and listing:
                data = _looped(data, b"b" if request.query.get("continuation-token") == "a" else b"a")
            elif self.restart_listings and listing:
                self._first_pages[request.query.get("prefix", "") + request.query.get("delimiter", "")] = data
                data = _looped(data, b"%d" % next(self._fresh))
            if self._hold_reply(request):  # done upstream, unanswered here
                self.replies_held += 1
                while self._hold_reply(request):
                    await asyncio.sleep(0.05)
                self.replies_held -= 1
            drop = HOP | {"content-encoding"} if request.method != "HEAD" else HOP - {"content-length"}
            out = {k: v for k, v in r.headers.items() if k.lower() not in drop}
            return web.Response(status=r.status, body=data or None, headers=out)


def _looped(listing: bytes, nxt: bytes) -> bytes:
    """A ListObjectsV2 answer that goes on: truncated, its next token nxt (loop_listings: 'b' after 'a' and 'a' after
    anything else, never the one just sent: botocore's paginator stops at a token received twice in a row)."""
    listing = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"",
                     listing.replace(b"<IsTruncated>false</IsTruncated>", b"<IsTruncated>true</IsTruncated>"))
    return listing.replace(b"</ListBucketResult>", b"<NextContinuationToken>%s</NextContinuationToken>"
                                                   b"</ListBucketResult>" % nxt)
