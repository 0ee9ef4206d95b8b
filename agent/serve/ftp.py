"""FTP front end (aioftp) over the gateway facade.

aioftp gives the command handlers for CWD, CDUP, MLST, QUIT and SYST, and its Connection and StreamIO. This module
supplies a PathIO onto the gateway, USER and PASS against hashed passwords, and these pieces of its own:
  * the session loop (`FtpServer.dispatcher`): commands are read as sent (`FtpServer._read_command`), the
    per-address and per-user session caps are enforced, and the sessions are tracked for shutdown;
  * passive data connections (`Passive`): one listener per transfer on a random free port of the range,
    handing over exactly one connection, and only from the control connection's address;
  * the STOR/APPE/RETR/LIST/NLST/MLSD workers (`FtpServer._transfer`): 226 only after the gateway committed the file,
    an upload whose data connection fails is discarded, every gateway error has its own reply code;
plus TYPE, MODE, STRU, ALLO (RFC 959 5.1), SIZE, MDTM, FEAT, OPTS, NOOP, REST, EPSV (RFC 2428) and AUTH/PBSZ/PROT
(RFC 4217).

Why not aioftp's own session loop and passive mode: its dispatcher strips trailing spaces, dies on non-UTF-8 input and
clears the REST marker on every other command; its passive listener accepts anyone, for the session's life, from a
lowest-first port pool, with one TLS setting for the whole server. Changing that meant overriding its private methods
(`_start_passive_server`, `self.ssl` per connection, `Connection._dispatcher`), which pinned aioftp to one minor
release. Only aioftp's public API is used now. Paths are resolved with agent.store.paths, so traversal attempts are
refused, not clamped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import socket
import ssl
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, AsyncContextManager, AsyncIterator, Awaitable, Callable, Iterable, Iterator, NoReturn, TypeVar

import aioftp
import structlog
from aioftp.common import END_OF_LINE, ThrottleStreamIO

from agent.audit import Who
from agent.auth import REFUSALS_EVERY, Every, LoginGuard, Passwords, kept, login_name, refusal, unmapped
from agent.config import Config, shown
from agent.records import Entry
from agent.serve import contract
from agent.serve.contract import answer, keep_alive, report, st_mode, tls_context
from agent.serve.startups import Startup
from agent.store.errors import Corrupt, GatewayError, IsADirectory
from agent.store.gateway import Gateway, ReadHandle, WriteHandle
from agent.store.paths import resolve

log = structlog.get_logger("pacsgw.ftp")

BLOCK = 256 * 1024
SEND_CHUNK = 4 * BLOCK  # a file leaves by sendfile(2) in chunks this large, each within the socket timeout
RECV_BLOCK = 4 * BLOCK  # an upload is read from its socket in blocks of at most this much
MIN_BLOCK = 4096  # and handed to the gateway in blocks of at least this much (DataConnection.receive)
SOCKET_TIMEOUT = 120
# A client gone without a word is cut after DEAD_PEER_S (contract.keep_alive), as over SMB and SFTP: its upload held
# the name, its staging file and its data connection for SOCKET_TIMEOUT, its session slot for the idle timeout (600 s).
# The control connection also gets the user timeout (a reply never acknowledged, as a 426 sent after the peer went).
REPLY_BUFFER = 64 * 1024  # replies a client left unread before its next command is read
# A control connection's longest command line, its line end included (twice vsftpd's VSFTP_MAX_COMMAND_LINE): a path
# is at most MAX_PATH_BYTES (1000), a user name 32. It was asyncio's 64 KiB: each refused path was logged and audited
# whole, JSON-escaped, so a logged-in client wrote up to 180 KB of journal per command it sent (tests/test_attack22.py).
MAX_COMMAND_LINE = 8192
# Telnet commands in a command line (RFC 959 4.1.3: ABOR comes after Telnet IP and Synch, as BSD ftp and Windows
# ftp.exe send it; Python's ftplib sends ABOR itself as urgent data): dropped, and IAC IAC is a 0xFF byte. The line
# was '\xff\xf4\xff\xf2ABOR', answered 502, and the transfer ran on with the client waiting for its 426.
TELNET = re.compile(rb"\xff(\xff|[\xfb-\xfe].|[\xf0-\xfa])", re.DOTALL)
TLS_HANDSHAKE_TIMEOUT = 30
PASSIVE_GRACE = 3.0  # on stop: how long a session told a passive port may take to send its transfer command

PATH_COMMANDS = ("cwd", "dele", "list", "nlst", "mkd", "mlsd", "mlst", "rmd", "rnfr", "rnto", "stor", "appe", "retr",
                 "size", "mdtm")
TRANSFERS = ("stor", "appe", "retr", "list", "nlst", "mlsd")  # what ABOR aborts: it runs beside these alone
NEEDS_PATH = ("dele", "mkd", "rmd", "rnfr", "rnto", "stor", "appe", "retr", "size", "mdtm")  # no default (RFC 959)
AIOFTP_COMMANDS = ("cdup", "cwd", "mlst", "quit", "syst")  # aioftp's own handlers serve these
OWN_COMMANDS = ("auth", "pbsz", "prot", "user", "pass", "stor", "appe", "retr", "list", "mlsd", "nlst", "dele", "mkd",
                "pwd", "rmd", "rnfr", "rnto", "size", "mdtm", "feat", "opts", "noop", "rest", "abor", "allo")  # on_*
# RFC 959 5.1's minimum implementation, in the forms a client may spell it: each is how bytes already travel
# (image or ASCII sent as is, byte size 8, a stream of a file); any other form gets 504
TRANSFER_FORMS = {"type": ("I", "A", "A N", "L 8"), "mode": ("S",), "stru": ("F",)}

# What a command needs done before it (aioftp's ConnectionConditions fields): the future's name, what is missing.
USER_SENT = ("user", "no user (use USER firstly)")
LOGGED_IN = ("logged", "not logged in")
RENAME_FROM = ("rename_from", "no filename (use RNFR firstly)")
# What this module's commands need done first (503 without it): these as listed, every other one the login
NEEDS = {"pass": (USER_SENT,), "rnto": (LOGGED_IN, RENAME_FROM)} | dict.fromkeys(
    ("auth", "pbsz", "prot", "user", "feat", "opts", "noop", "rest"), ())

Handler = Callable[[aioftp.Connection, str], Awaitable[bool]]
# A command that never waits (PASV, EPSV), run in place by the command loop after the login when no other command is
# running: a task, its first step and its done callback per transfer were a fixed cost.
Immediate = Callable[[aioftp.Connection, str], None]
T = TypeVar("T")


def quoted(path: str) -> str:
    """A pathname as a 257 reply quotes it (RFC 959): inside double quotes, each quote doubled."""
    return '"' + path.replace('"', '""') + '"'


def _refused(connection: aioftp.Connection, fields: Iterable[tuple[str, str]]) -> bool:
    """503 for a command sent before the USER, login or RNFR it needs → whether it was refused."""
    for name, missing in fields:
        if not connection[name].done():
            connection.response("503", f"bad sequence of commands ({missing})")
            return True
    return False


def replied(connection: aioftp.Connection, code: str, lines: str | list[str], as_list: bool = False) -> bool:
    """Send a command's reply → True, what a command handler returns when the session goes on."""
    connection.response(code, lines, as_list)
    return True


def _needing(handler: Handler, fields: tuple[tuple[str, str], ...]) -> Handler:
    """handler, answered 503 when sent before the USER, login or RNFR it needs."""
    async def run(connection: aioftp.Connection, rest: str) -> bool:
        return True if _refused(connection, fields) else await handler(connection, rest)
    return run


def who(connection: aioftp.Connection) -> Who:
    """The audited party of an FTP session."""
    user = connection.user.login if connection.future.user.done() else "-"
    return Who(user, "ftps" if connection.session.tls else "ftp", f"{connection.client_host}:{connection.client_port}")


async def send_file(data: "DataConnection", handle: ReadHandle, offset: int) -> None:
    """Send the file from offset to its end as the handle allows (a verified cached copy at once, a fetch as it
    lands): by sendfile(2) from the page cache to the socket in clear, by reads and writes over TLS."""
    pos = offset
    try:
        while True:
            # at least once: a fetch's end (even of an empty file) waits for its check
            end = await handle.ready(pos)
            while pos < end:
                n = await data.sendfile(handle.fd, pos, min(SEND_CHUNK, end - pos))
                handle.recorded()  # the open's audit record, once its first bytes left (_download)
                if not n:
                    raise Corrupt(handle.entry.path, f"content ends at {pos} of {handle.size} bytes")
                pos += n
                if pos < handle.size:  # a reader as fast as sendfile never blocks it: let other sessions run
                    await asyncio.sleep(0)
            if pos >= handle.size:
                break
    finally:
        handle.sent(pos - offset)


class GatewayPathIO(aioftp.AbstractPathIO[PurePosixPath]):
    """aioftp's view of the namespace. Paths arrive as /<user root>/<virtual path>."""

    gateway: Gateway  # set by the factory

    async def entry(self, path: PurePath) -> Entry | None:
        return await self.gateway.find(str(path).lstrip("/"))

    async def exists(self, path: PurePosixPath) -> bool:
        return await self.entry(path) is not None

    async def is_dir(self, path: PurePosixPath) -> bool:
        return (e := await self.entry(path)) is not None and e.is_dir

    # Only aioftp's CWD, CDUP and MLST use this PathIO (exists, is_dir, entry); namespace commands, listings
    # and file I/O are this module's own handlers, straight to the gateway. Overridden, these methods lose aioftp's
    # universal_exception: a GatewayError reaches FtpServer._guarded as raised, never wrapped in a PathIOError.
    def _unused(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("the FTP front end calls the gateway for this")

    is_file = mkdir = rmdir = unlink = rename = list = stat = _open = seek = write = read = close = _unused


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _streams(sock: socket.socket, tls: ssl.SSLContext | None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over an accepted data connection, after the TLS handshake if tls."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls else None)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _close_notified(writer: asyncio.StreamWriter) -> bool:
    """Whether the client ended the TLS stream with close_notify, after the reader saw its end. The end of an
    upload over TLS is that alert (RFC 4217 section 9): asyncio's TLS transport reports a bare TCP FIN as the
    same EOF, so a FIN forged into the connection (a truncation attack) or a client dying mid-send would store
    the first part of a file as the whole. The TLS object tells them apart: after close_notify it reads as closed
    (b'' or SSLZeroReturnError); a cut stream still wants bytes (SSLWantReadError)."""
    tls = writer.get_extra_info("ssl_object")
    try:
        return tls is not None and tls.read(1) == b""
    except ssl.SSLZeroReturnError:
        return True
    except ssl.SSLError:
        return False


class DataConnection:
    """An accepted data connection. A RETR in clear sends from its bare socket with sendfile(2): no transport and
    no stream objects, whose set-up and tear-down (four epoll changes, a protocol, two tasks) were a fixed cost of
    every transfer. Uploads, listings and TLS data connections use asyncio streams over it (`streams`)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self.sock = sock
        self._streams: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        if tls is not None:
            # Clients start TLS right after connecting or only after the 150 reply: begin now, await at 150.
            self._streams = asyncio.ensure_future(_streams(sock, tls))
            self._streams.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, if never awaited

    async def handshake(self, resumed: bool) -> None:
        """PROT P: wait for the TLS handshake begun when the connection came; if `resumed`, it must have resumed the
        control connection's TLS session, which its client alone holds (a context of the session's own): any other
        client of its address could take the port first and, with a handshake of its own, be sent the file or store its
        bytes under the session's user (vsftpd's require_ssl_reuse)."""
        if self._streams is not None:
            _, writer = await self._streams
            if resumed and not writer.get_extra_info("ssl_object").session_reused:
                raise Reply("425", "the TLS data connection did not resume the control connection's TLS session "
                                   "(ftp.tls_session_reuse): another client's, or a client that cannot resume")

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            self._streams = asyncio.ensure_future(_streams(self.sock, None))
        return await self._streams

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Up to count bytes of fd from offset → bytes sent (0: fd ends before offset)."""
        if self._streams is not None:  # TLS (or streams already made): through the transport
            data = await asyncio.to_thread(os.pread, fd, count, offset)
            _, writer = await self._streams
            writer.write(data)
            async with asyncio.timeout(SOCKET_TIMEOUT):
                await writer.drain()
            return len(data)
        while True:
            try:
                return os.sendfile(self.sock.fileno(), fd, offset, count)
            except BlockingIOError:
                await self._ready(writing=True)

    async def receive(self, close_notify: bool = True) -> AsyncIterator[bytes]:
        """An upload's bytes in blocks of MIN_BLOCK at least (but the last, and one before each larger block): a
        client trickling a byte per TCP segment (or TLS record) had each read stored as a block of its own, a bytes
        object a write-through file holds until its upload (BODY_BUDGET: 64 MiB of such bytes), its 1 MiB read buffer
        cut down to it: 44-84 bytes of agent memory per byte sent here, thousands in a bare loop of such reads."""
        pending = bytearray()
        async for data in self._blocks(close_notify):
            if len(data) < MIN_BLOCK:
                pending += data
                if len(pending) < MIN_BLOCK:
                    continue
                data = bytes(pending)
                pending.clear()
            elif pending:  # a large block is handed on as it came, after the small ones before it
                yield bytes(pending)
                pending.clear()
            yield data
        if pending:
            yield bytes(pending)

    async def _blocks(self, close_notify: bool) -> AsyncIterator[bytes]:
        """An upload's bytes as they come, until the client closes the connection. In clear read straight from
        the socket (aioftp's throttled stream cost a transport, a protocol and a wait_for task per block), each block
        a bytes object of its own: a write-through file keeps it for its PUT as it is, where a block read into a
        reused buffer was copied once more (docs/benchmarks.md §37); over TLS from the stream, whose end must be the
        client's close_notify unless close_notify is False (ftp.tls_close_notify)."""
        if self._streams is not None:
            reader, writer = await self._streams
            while True:
                async with asyncio.timeout(SOCKET_TIMEOUT):
                    data = await reader.read(RECV_BLOCK)
                if not data:
                    if close_notify and not _close_notified(writer):
                        raise ssl.SSLEOFError("the TLS data connection ended without close_notify: the upload was cut")
                    return
                yield data
        size, turned = RECV_BLOCK, True
        while True:
            try:
                data = self.sock.recv(size)
            except BlockingIOError:
                await self._ready(writing=False)
                turned = True
                continue
            if not data:
                return
            # A client sending faster than the box stores keeps the socket readable: without a turn of the loop
            # before each block one upload would hold it (every other session waiting) until its file ends. Not
            # before the end, read at once after the last block: the commit (and the 226) waited a turn (§45).
            if not turned:
                await asyncio.sleep(0)
            turned = False
            # After a short read a short one: recv allocates its size first, and a 1 MiB buffer cut down to the byte
            # that came left the heap fragmented (kept or not, ~17 bytes of the agent's memory per byte sent)
            size = RECV_BLOCK if len(data) >= MIN_BLOCK else MIN_BLOCK
            yield data

    async def _ready(self, writing: bool) -> None:
        """Wait until the socket can be written (or read), up to SOCKET_TIMEOUT: a peer may stop reading or sending."""
        loop, fileno = asyncio.get_running_loop(), self.sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()
        (loop.add_writer if writing else loop.add_reader)(fileno, _settle, ready)
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):
                await ready
        finally:
            (loop.remove_writer if writing else loop.remove_reader)(fileno)

    def close(self, at_once: bool = False) -> asyncio.StreamWriter | None:
        """Close the connection: bytes already handed to the kernel still reach the client, and over TLS a close_notify
        goes out and waits for the client's (asyncio's TLS shutdown, up to 30 s) → the stream whose close may still be
        under way (`_closed` waits for it). at_once (no transfer used it, or its transfer failed: nothing to deliver)
        drops it now: a client that never answers the close_notify held it those 30 s."""
        streams = self._streams
        if streams is not None and streams.done() and not streams.cancelled() and streams.exception() is None:
            writer = streams.result()[1]
            if at_once:
                writer.transport.abort()
                return None
            writer.close()
            return writer
        if streams is not None:
            streams.cancel()
        self.sock.close()
        return None


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait for a transfer's data connection to close (SOCKET_TIMEOUT at most), then cut it: over TLS a client that
    never answered the close_notify held one descriptor per transfer for 30 s (609 NLSTs in 5 s held 609). The command
    ends once it is closed, so the session's next one waits: one such close per session."""
    try:
        with contextlib.suppress(Exception):  # reset, or out of time: the transfer was answered already
            async with asyncio.timeout(SOCKET_TIMEOUT):
                await writer.wait_closed()
    finally:
        writer.transport.abort()  # nothing to do once closed


class Passive:
    """One passive data connection (PASV/EPSV): a listening socket on a random free port of the configured range.
    It hands over the first connection that comes from the control connection's address, drops and reports any
    other, and stops listening after that one or after `timeout` seconds, whichever comes first. The transfer
    command takes it (and closes the data connection); one no transfer took is closed, with the data connection it
    accepted, by the next PASV/EPSV or the session's end, so an idle session holds no port and no connection. The
    socket is a bare one watched with add_reader (an asyncio.Server per transfer cost its own set-up and tear-down)."""

    def __init__(self, sock: socket.socket, port: int, peer: str, tls: ssl.SSLContext | None, timeout: float,
                 on_refused: Callable[[str, str], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.peer, self.tls, self.on_refused = peer, tls, on_refused  # the session's address, unmapped already
        self.sock: socket.socket | None = sock  # listening until None
        self.port = port
        self.connected: asyncio.Future[DataConnection] = self.loop.create_future()
        self.stopped: Callable[[], None] = lambda: None  # told once, when it stops listening
        self._timer = self.loop.call_later(timeout, self._give_up, TimeoutError("no data connection came"))
        self.loop.add_reader(sock.fileno(), self._accept)

    @classmethod
    def open(cls, host: str, ports: range, peer: str, tls: ssl.SSLContext | None, timeout: float,
             on_refused: Callable[[str, str], None]) -> "Passive | None":
        """Listen on a random free port of `ports` (not to be guessed from the last one) → None if all are taken."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for port in _random_ports(ports):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers: past TIME_WAIT
                sock.setblocking(False)
                sock.bind((host, port))
                sock.listen(8)
            except OSError:
                sock.close()
                continue
            return cls(sock, port, peer, tls, timeout, on_refused)
        return None

    def _accept(self) -> None:
        while self.sock is not None:
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of descriptors or buffers: this transfer gets its 425 now
                self._give_up(e)
                return
            host, port = address[:2]
            if self.connected.done() or (host != self.peer and unmapped(host) != self.peer):
                self.on_refused(f"{host}:{port}", "the data connection was already made" if self.connected.done()
                                else "its address is not the control connection's")
                conn.close()
                continue
            self._stop_listening()
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
            keep_alive(conn, user_timeout=False)
            self.connected.set_result(DataConnection(conn, self.tls))

    def _give_up(self, e: Exception) -> None:
        if not self.connected.done():
            self.connected.set_exception(e)
        self._stop_listening()

    def _stop_listening(self) -> None:
        self._timer.cancel()
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            self.stopped()

    def close(self) -> None:
        """Stop listening; close the data connection it accepted. Deterministically: one left to the garbage collector
        stayed open as long as its TLS transport was registered with the loop, and a client looping PASV, connect and
        handshake held a descriptor per loop (tests/test_attack22.py)."""
        self._stop_listening()
        if not self.connected.done():
            self.connected.cancel()
        elif not self.connected.cancelled() and self.connected.exception() is None:
            self.connected.result().close(at_once=True)


_RNG = random.SystemRandom()


def _random_ports(ports: range) -> Iterator[int]:
    """Ports of the range in an order that cannot be guessed: a few single draws, then, only if those were all
    taken, every port shuffled. Shuffling the whole range for every PASV cost 1.2 ms of CPU per 1 000 ports
    (0.12 ms for the default 101), per transferred file; a single draw costs 2 µs (issue 14)."""
    yield from (_RNG.choice(ports) for _ in range(8))
    yield from _RNG.sample(ports, len(ports))


@dataclass
class Session:
    """What this module keeps per FTP session (aioftp's Connection holds the rest)."""

    address: str  # the control connection's peer address: data connections must come from it
    server: str  # the control connection's own address, unmapped (PASV announces it, EPSV names its family)
    startup: Startup  # its slot of ftp.max_unauthenticated, given back at the login
    tls: ssl.SSLContext | None = None  # AUTH TLS done on the control connection, with this context
    prot_private: bool = False  # PROT P: data connections are TLS too
    epsv_all: bool = False  # EPSV ALL: no other data connection set-up command is accepted (RFC 2428)
    user: str | None = None  # logged in, and counted against ftp.max_sessions_per_user
    user_slot: int | None = None  # that count's slot in the LoginGuard
    rest: int = 0  # the REST marker for the next STOR/APPE/RETR
    passive: Passive | None = None
    committing: asyncio.Task[Any] | None = None  # the upload whose bytes are all in: ABOR no longer stops it
    resolved: tuple[tuple[str | None, str, str], str] = ((None, "", ""), "")  # the last argument FtpServer._resolve did

    def take_passive(self) -> Passive | None:
        """The passive listener, for the transfer command that uses it (and closes it)."""
        passive, self.passive = self.passive, None
        return passive

    def take_rest(self) -> int:
        rest, self.rest = self.rest, 0
        return rest

    def forget_transfer(self) -> None:
        """A transfer refused before it ran (a path, a listing) uses up the REST marker and passive port: else the next
        STOR or RETR of another file started there (stored over the old one's head or sent short, yet answered 226)."""
        self.rest = 0
        if (passive := self.take_passive()) is not None:
            passive.close()


class Reply(Exception):
    """End a transfer with this reply (425 no data connection, 554 REST beyond the end…)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason  # `reason` as a GatewayError's: the reply's text


def _stored(connection: aioftp.Connection, task: asyncio.Task[Any] | None) -> None:
    """A STOR's 226, in the turn its file became durable, not a turn later when its task wakes (§45). An ABOR in
    between finds nothing to abort, as after any 226: cancelled, the task would answer 426 and 226 after this one."""
    connection.response("226", "stored")
    connection.extra_workers.discard(task)


def _aborted() -> None:
    """Raise CancelledError if ABOR (or the session's end) cancelled this transfer while its I/O was finishing:
    aioftp's asyncio.wait_for (Python 3.11) returns the block read or written and drops the cancellation, an
    upload's last reads never wait; the transfer would go on as if nothing had come."""
    if (task := asyncio.current_task()) is not None and task.cancelling():
        raise asyncio.CancelledError


def _abort_reason(e: BaseException) -> str:
    if isinstance(e, (GatewayError, Reply)):
        return e.reason
    if isinstance(e, asyncio.CancelledError):
        return "aborted (ABOR, or the session ended)"
    return f"data connection failed: {type(e).__name__}: {str(e)[:200]}"


class FtpServer(aioftp.Server):
    def __init__(self, cfg: Config, gateway: Gateway, logins: LoginGuard) -> None:
        # USER and PASS are this module's (on_user, on_pass): aioftp's user manager is never asked
        super().__init__(path_io_factory=type("BoundPathIO", (GatewayPathIO,), {"gateway": gateway}),
                         block_size=BLOCK, idle_timeout=cfg.ftp.idle_timeout, socket_timeout=SOCKET_TIMEOUT,
                         welcome_message="pacsgw FTP ready")
        self.cfg, self.gateway, self.logins = cfg, gateway, logins
        self.passive_ports = range(cfg.ftp.passive_ports[0], cfg.ftp.passive_ports[1] + 1)
        self.passwords = Passwords(cfg.users)
        self.users = {u.name: aioftp.User(u.name, "-", base_path=Path(u.root), home_path="/",
                                          permissions=[aioftp.Permission("/", readable=True, writable=True)])
                      for u in cfg.users}
        self.tls = tls_context(cfg.ftp.tls_cert, cfg.ftp.tls_key) if cfg.ftp.tls_cert else None
        self.sessions: dict[asyncio.Task[Any], Session] = {}
        # Passive ports one user, or one address, may hold listening at once, in this process: half the range (one at
        # least). Each session holds one until its data connection comes or passive_timeout: one user's 32 sessions
        # (max_sessions_per_user) held a range of 10 ports, renewed every 30 s, and every other user got 425.
        self.passive_share = max(1, len(self.passive_ports) // 2)
        self._listening: Counter[tuple[str, str]] = Counter()  # ("user"|"address", name) → its ports listening
        self.draining = False  # the agent stops: no new session, and each session's next command hears 421
        # events and audit records a client can repeat at will, once a minute per (kind, address): data connections
        # from strangers, plain-text logins while TLS is required, failed TLS handshakes; PASV on a full range per user
        self._told = Every(REFUSALS_EVERY)
        own: dict[str, Handler] = {name: getattr(self, f"on_{name}") for name in OWN_COMMANDS}
        own |= {name: self._form(name) for name in TRANSFER_FORMS}
        own = {name: _needing(h, NEEDS.get(name, (LOGGED_IN,))) for name, h in own.items()}
        self.immediate: dict[str, Immediate] = {"pasv": self.on_pasv, "epsv": self.on_epsv}
        handlers: dict[str, Handler] = {name: self.commands_mapping[name] for name in AIOFTP_COMMANDS} | own
        self.handlers = {name: self._guarded(h, name) if name in PATH_COMMANDS else h for name, h in handlers.items()}

    async def dispatcher(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One session: aioftp.Server.start serves each control connection with this method."""
        peer, port = writer.get_extra_info("peername")[:2]
        host = unmapped(peer)  # the one form: bans, slots, audit (agent.auth.unmapped)
        cap = self.cfg.ftp.max_sessions_per_address
        slot = await self.logins.take_session("address", host, cap)  # counted box-wide (agent.auth.LoginGuard)
        if slot is None:
            contract.refuse_session(self.gateway, "ftp", Who("-", "ftp", f"{host}:{port}"),
                                    f"too many sessions from {host} (limit {cap})")
            writer.write(f"421 too many sessions from your address (limit {cap}); try again later\r\n".encode())
            writer.close()
            return
        startup = Startup("ftp", self.cfg.ftp.max_unauthenticated, self.logins, self.gateway, host, f"{host}:{port}")
        try:
            if not await startup.admitted():
                writer.write(b"421 too many connections not logged in; try again later\r\n")
                writer.close()
                return
            task = asyncio.current_task()
            assert task is not None  # asyncio.start_server runs each connection as a task
            session = self.sessions[task] = Session(host, unmapped(writer.get_extra_info("sockname")[0]), startup)
            try:
                await self._session(reader, writer, host, port, session)
            finally:
                del self.sessions[task]
        finally:
            startup.end()
            self.logins.release_session(slot)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                       session: Session) -> None:
        """The command loop, shaped like aioftp's: each command (a transfer too) runs as a task beside the command
        reader, and replies leave in order. One reading task for the session and a done callback per command
        (aioftp's loop made a reading task and an asyncio.wait over every running task for each command)."""
        # Urgent data (the Synch before ABOR, ftplib's whole ABOR line) stays in the command stream: else the kernel
        # takes its last byte out of it, and the line lost its end or its Telnet DM
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        keep_alive(writer.get_extra_info("socket"))
        # aioftp's handlers (and AUTH TLS) use this stream; commands are read straight from `reader`
        stream = ThrottleStreamIO(reader, writer, throttles={
            "server_global": self.throttle, "server_per_connection": self.throttle_per_connection.clone()},
            read_timeout=self.idle_timeout, write_timeout=self.socket_timeout)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # set when the session is over
        commands: set[asyncio.Task[bool]] = set()
        transfers: set[asyncio.Task[bool]] = set()  # the running commands that are TRANSFERS

        def respond(code: str, lines: str | Iterable[str] = "", as_list: bool = False) -> None:
            """A reply, written at once, in the order made (aioftp queued each line for a writer task that wrote and
            drained it under a timeout task of its own). Control characters (and bytes that were not UTF-8) are escaped:
            nothing a client or an S3 key put into a reply can end it early or start a forged one."""
            if isinstance(lines, str):  # nearly every reply: one line, no list to build and join
                writer.write(f"{code} {shown(lines)}{END_OF_LINE}".encode(self.encoding))
            else:
                writer.write(_reply(code, [shown(line) for line in lines], as_list, self.encoding))

        def failed(exc: BaseException) -> None:
            log.error("ftp_command_failed", user=session.user, error=f"{type(exc).__name__}: {exc}"[:300], exc_info=exc)
            respond("451", "internal error; the server log has the details")

        def settled(task: asyncio.Task[Any]) -> None:
            """A command ended: a failure is logged and answered 451; False (QUIT, or a refusal) ends the session."""
            commands.discard(task)
            transfers.discard(task)
            connection.extra_workers.discard(task)
            if task.cancelled():
                return
            if (exc := task.exception()) is not None:
                failed(exc)
            elif task.result() is False:
                _settle(ended)

        connection = aioftp.Connection(
            client_host=host, client_port=port, server_host=writer.get_extra_info("sockname")[0],
            server_port=self.server_port, command_connection=stream, socket_timeout=self.socket_timeout,
            idle_timeout=self.idle_timeout, wait_future_timeout=self.wait_future_timeout, block_size=self.block_size,
            path_io_factory=self.path_io_factory, path_timeout=self.path_timeout, extra_workers=set(),
            response=respond, session=session)
        connection.path_io = self.path_io_factory(timeout=self.path_timeout, connection=connection)
        respond("220", self.welcome_message)

        def login_expired() -> None:
            """No login by ftp.login_timeout: the session goes (it held an address-cap slot until the idle timeout)."""
            if not connection.future.logged.done():
                log.warning("ftp_session_closed", peer=host, reason="no login within login_timeout")
                respond("421", "no login in time; closing the connection")
                _settle(ended)

        login_timer = asyncio.get_running_loop().call_later(self.cfg.ftp.login_timeout, login_expired)

        async def read_commands() -> None:
            idle = contract.Idle(self.cfg.ftp.idle_timeout, busy=lambda: bool(commands))
            try:
                while True:
                    cmd, rest = await self._read_command(reader, writer, idle)  # a closed connection raises
                    if commands and (cmd != "abor" or not transfers):  # one at a time, in order (RFC 959): ABOR
                        await asyncio.wait(commands)  # alone runs beside a transfer; QUIT waits (the upload is kept)
                    if cmd != "rnto":  # RFC 959: RNTO must follow RNFR at once; any other command forgets the RNFR
                        del connection.rename_from
                    if self.draining and not commands:  # RFC 959 allows 421 as the answer to any command
                        respond("421", "service restarting; try again later")
                        return
                    if (now := self.immediate.get(cmd)) is not None:
                        try:
                            if not _refused(connection, (LOGGED_IN,)):  # both need a login
                                now(connection, rest)
                        except Exception as exc:
                            failed(exc)
                        continue
                    if (handler := self.handlers.get(cmd)) is None:
                        respond("502", f"{cmd[:16].upper()} not implemented")
                        continue
                    task = asyncio.ensure_future(handler(connection, rest))
                    commands.add(task)
                    if cmd in TRANSFERS:
                        transfers.add(task)
                    task.add_done_callback(settled)
                    if cmd == "auth":  # nothing sent behind AUTH is read before TLS is up (on_auth drops it)
                        await asyncio.wait([task])
            except asyncio.CancelledError:
                if idle.expired:
                    raise TimeoutError("no command within the idle timeout") from None
                raise
            finally:
                idle.cancel()

        read = asyncio.create_task(read_commands())
        read.add_done_callback(lambda _: _settle(ended))
        try:
            await ended
            if read.done():
                read.result()  # the client went away (raises), or a fault of ours
            # QUIT, a refusal that ends the session or the drain's 421: the last reply leaves first
            await asyncio.wait_for(writer.drain(), self.socket_timeout)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError, ValueError):
            pass  # the client went away, stayed idle too long, or sent an over-long line
        except asyncio.CancelledError:
            # The agent stops after its drain: an idle session hears why (421, as RFC 959 allows at any
            # command) instead of a bare close, which a PACS would take for a failed transfer.
            if not commands - connection.extra_workers:  # idle but for transfers
                with contextlib.suppress(Exception):
                    writer.write(b"421 service restarting; try again later\r\n")
                    await asyncio.wait_for(writer.drain(), 1)
            raise
        finally:
            login_timer.cancel()
            tasks: set[asyncio.Task[Any]] = {read, *commands, *connection.extra_workers}
            for task in tasks:
                task.cancel()
            if session.passive is not None:  # told and never used
                session.passive.close()
            stream.writer.transport.abort()
            await asyncio.wait(tasks, timeout=10)  # workers abort their uploads and close their files
            if session.user_slot is not None:  # its login no longer counts against ftp.max_sessions_per_user
                self.logins.release_session(session.user_slot)

    async def _read_command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: contract.Idle
                            ) -> tuple[str, str]:
        """→ (command, argument). Only the line end is cut from a path argument: a trailing space is part of
        the name (refused for a new file, never silently dropped). Bytes that are not UTF-8 are kept as
        surrogates, so the path checks answer 553 instead of the session dying."""
        if writer.transport.get_write_buffer_size() > REPLY_BUFFER:
            # a client that sends commands but reads no replies: read its next command once they have left
            await asyncio.wait_for(writer.drain(), self.socket_timeout)
        try:
            idle.touch()
            line = await reader.readline()
            idle.touch()
        except ValueError:  # no line end within the reader's limit: the session ends, the client hears why
            log.warning("ftp_session_closed", peer=writer.get_extra_info("peername"), reason="command line too long")
            writer.write(f"500 command line too long (over {MAX_COMMAND_LINE} bytes); closing the connection\r\n"
                         .encode())
            raise
        if not line:
            raise ConnectionResetError("client closed the control connection")
        if b"\xff" in line:
            line = TELNET.sub(lambda m: b"\xff" if m[1] == b"\xff" else b"", line)
        cmd, _, rest = line.decode("utf-8", errors="surrogateescape").rstrip("\r\n").partition(" ")
        cmd = cmd.strip().lower()
        return cmd, rest if cmd in PATH_COMMANDS else rest.strip()

    async def start(self, host: str | None = None, port: int = 0, **kwargs: Any) -> None:
        await super().start(host, port, limit=MAX_COMMAND_LINE, **kwargs)

    def stop_accepting(self) -> None:
        self.draining = True
        self.server.close()

    async def close(self) -> None:
        """Close the sessions left after the drain (their transfers have finished by now), within a bound. A
        session whose client was just told a passive port waits PASSIVE_GRACE for its transfer command (answered
        421 over a connection still open): closed at once, the client's data connection was refused, an error
        a PACS cannot tell from a failed transfer (seen in the fleet's key rotation)."""
        self.stop_accepting()
        if told := [task for task, session in self.sessions.items() if session.passive is not None]:
            await asyncio.wait(told, timeout=PASSIVE_GRACE)
        if tasks := list(self.sessions):
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=15)

    async def on_auth(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.upper() not in ("TLS", "TLS-C", "SSL"):
            return replied(connection, "504", f"AUTH {rest} not supported; use AUTH TLS")
        if self.tls is None:
            return replied(connection, "502", "TLS is not configured on this server")
        if connection.session.tls:
            return replied(connection, "503", "TLS already active")
        # The session's own, so that its data connections' resumption proves them its client's (DataConnection)
        context = tls_context(self.cfg.ftp.tls_cert, self.cfg.ftp.tls_key) if self.cfg.ftp.tls_session_reuse \
            else self.tls
        # Stop reading first: the client's TLS hello must reach the TLS layer, not the command parser.
        stream = connection.command_connection
        stream.writer.transport.pause_reading()
        # What the client sent in clear behind AUTH came in with it: drop it, or it would run after the
        # handshake as if it were protected (RFC 4217 section 11; STARTTLS injection, CVE-2011-0411).
        pipelined: bytearray = stream.reader._buffer  # asyncio has no public way to drop what it holds
        if pipelined:
            log.warning("ftp_pipelined_before_tls_dropped", peer=connection.client_host, bytes=len(pipelined))
            pipelined.clear()
        await self.write_response(stream, "234", "AUTH TLS successful")
        try:
            await stream.start_tls(context, server_hostname=None)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            # The client's failure (a scanner's probe, a rejected certificate, no common version), not the agent's:
            # as an internal error each was a 3 KB traceback at error level, one per connection anyone opened.
            self.gateway.count_error("ftp", "TLSHandshakeFailed")
            if (since := self._told.due(("tls", connection.client_host))) is not None:
                log.warning("ftp_tls_failed", peer=connection.client_host, error=f"{type(e).__name__}: {e}"[:200],
                            failed_since=since)
            return False  # the connection is neither clear nor TLS now: it ends
        connection.session.tls = context
        return True

    async def on_pbsz(self, connection: aioftp.Connection, rest: str) -> bool:
        return replied(connection, "200", "PBSZ=0")

    async def on_prot(self, connection: aioftp.Connection, rest: str) -> bool:
        level, session = rest.upper(), connection.session
        if level == "P" and session.tls:
            session.prot_private = True
            return replied(connection, "200", "data connections will be protected")
        if level == "C" and not self.cfg.ftp.require_tls:
            session.prot_private = False
            return replied(connection, "200", "data connections in clear")
        return replied(connection, "536" if level in ("C", "P") else "504",
                       "PROT P after AUTH TLS is required" if self.cfg.ftp.require_tls or level == "P"
                       else f"PROT {rest} not supported")

    async def on_user(self, connection: aioftp.Connection, rest: str) -> bool:
        rest = login_name(rest)  # 8 000 characters were logged, audited and the guard's key whole (no user's name)
        if self.cfg.ftp.require_tls and not connection.session.tls:
            # told once a minute per address: a client pipelining USER lines wrote an event and a record per line
            if (since := self._told.due(("plain", connection.client_host))) is not None:
                log.warning("login_refused", protocol="ftp", user=rest, reason="plain-text login while TLS is required",
                            refused_since=since)
                self.gateway.audit_event(Who(rest, "ftp", f"{connection.client_host}:{connection.client_port}"),
                                         "login", "", refusal("TLS required", since))
            return replied(connection, "530", "TLS required: use AUTH TLS before USER")
        if connection.future.logged.done():
            # Logged out by USER, a session was one no login_timeout ended (its clock had run) and max_unauthenticated
            # did not count (its slot went back at the login): refused, as vsftpd does
            return replied(connection, "530", "already logged in: open a new connection to log in as another user")
        # An unknown name gets a 331 like a known one (no user enumeration) and fails at PASS, after a delay
        connection.user = self.users.get(rest) or aioftp.User(rest or "-", None, base_path=Path("/nonexistent"))
        connection.current_directory = connection.user.home_path
        return replied(connection, "331", "password required")

    async def on_pass(self, connection: aioftp.Connection, rest: str) -> bool:
        if connection.future.logged.done():
            return replied(connection, "503", "already logged in")
        login, guard, address = connection.user.login, self.logins, connection.client_host
        async with guard.attempt(login, address, "ftp") as refusal:  # LoginGuard (agent.auth): backoff and bans
            if refusal:
                return replied(connection, "530", refusal)
            # bytes that were not UTF-8 arrive as surrogate escapes (FtpServer._read_command): never a password
            ok = not any("\ud800" <= c <= "\udfff" for c in rest) and await asyncio.to_thread(
                self.passwords.check, login, rest)
            wait = await contract.login(self.gateway, guard, "ftp", who(connection), address, ok)
        await asyncio.sleep(wait)
        if not ok:
            return replied(connection, "530", "wrong user or password")
        cap = self.cfg.ftp.max_sessions_per_user
        slot = await kept(guard.take_session("user", login, cap), lambda s: guard.release_session(s or 0))
        if slot is None:
            contract.refuse_session(self.gateway, "ftp", who(connection),
                                    f"too many sessions for user {login} (limit {cap})")
            connection.response("421", f"too many sessions for this user (limit {cap}); try again later")
            return False
        connection.session.user, connection.session.user_slot = login, slot
        connection.session.startup.end()
        connection.logged = True
        self.gateway.audit_event(who(connection), "login")
        return replied(connection, "230", "logged in")

    def on_pasv(self, connection: aioftp.Connection, rest: str) -> None:
        host = self.cfg.ftp.masquerade_address or connection.session.server
        if connection.session.epsv_all:
            connection.response("503", "EPSV ALL was sent: use EPSV")
        elif ":" in host:
            connection.response("425", "PASV cannot announce an IPv6 address; use EPSV")
        elif (passive := self._listen(connection)) is not None:
            numbers = [*host.split("."), str(passive.port >> 8), str(passive.port & 0xFF)]
            connection.response("227", f"Entering Passive Mode ({','.join(numbers)})")

    def on_epsv(self, connection: aioftp.Connection, rest: str) -> None:
        """EPSV, EPSV ALL and EPSV <net-prt> (RFC 2428: 1 is IPv4, 2 is IPv6)."""
        arg = rest.upper()
        family = "2" if ":" in connection.session.server else "1"
        if arg == "ALL":
            connection.session.epsv_all = True
            connection.response("200", "EPSV ALL ok: only EPSV from now on")
        elif arg and not arg.isdigit():
            connection.response("501", f"EPSV takes ALL or a network protocol number, not {rest!r}")
        elif arg and arg != family:
            connection.response("522", f"Network protocol not supported, use ({family})")
        elif (passive := self._listen(connection)) is not None:
            connection.response("229", f"Entering Extended Passive Mode (|||{passive.port}|)")

    def _listen(self, connection: aioftp.Connection) -> Passive | None:
        """A passive listener for the next transfer (an unused earlier one is closed) → None, after replying why not."""
        session: Session = connection.session
        if self.cfg.ftp.require_tls and not session.prot_private:
            connection.response("521", "data connections must be protected: PROT P")
            return None
        if session.passive is not None:  # an unused one, and the data connection it may have accepted
            session.passive.close()
            session.passive = None
        user = connection.user.login
        holders = (("user", user), ("address", session.address))
        for holder in holders:
            if self._listening[holder] >= self.passive_share:
                self.gateway.count_error("ftp", "PassivePortsHeld")
                if (since := self._told.due(("held", *holder))) is not None:
                    log.warning("passive_ports_held", user=user, peer=connection.client_host, held_by=holder[0],
                                ports=self._listening[holder], limit=self.passive_share, refused_since=since)
                connection.response("425", f"this {holder[0]} holds {self._listening[holder]} passive ports not yet "
                                           f"connected, half the range: connect to them or try again")
                return None

        def refused(peer: str, reason: str) -> None:
            # Counted each, told once a minute per address: a stranger knocking on a passive port in a loop wrote an
            # event and an audit record per connection, thousands a second, and rotated the audit trail away.
            self.gateway.count_error("ftp", "DataConnectionRefused")
            if (since := self._told.due(("stranger", peer.rpartition(":")[0]))) is not None:
                log.warning("data_connection_refused", user=user, peer=peer, control_peer=connection.client_host,
                            reason=reason, refused_since=since)
                self.gateway.audit_event(Who(user, "ftp", peer), "data-connection", "", refusal(reason, since))

        try:
            session.passive = Passive.open(
                connection.server_host, self.passive_ports, session.address,
                session.tls if session.prot_private else None, self.cfg.ftp.passive_timeout, refused)
        except OSError as e:  # no descriptor for its socket: was a 451 "internal error" and a traceback each
            contract.out_of_descriptors("ftp passive", e)
            connection.response("425", "out of resources; try again")
            return None
        if session.passive is None:
            # Counted each, told once a minute per user: a client pipelining PASV while the range was full wrote an
            # event per line, 3 500 a second
            self.gateway.count_error("ftp", "PassivePortsExhausted")
            if (since := self._told.due(("ports", user))) is not None:
                log.warning("passive_ports_exhausted", user=user, refused_since=since,
                            range=f"{self.passive_ports.start}-{self.passive_ports.stop - 1}")
            connection.response("425", "no free passive port; try again")
            return None
        for holder in holders:  # not Counter.update: its Mapping check is an ABC's isinstance
            self._listening[holder] = self._listening.get(holder, 0) + 1
        session.passive.stopped = functools.partial(self._unlisten, holders)
        return session.passive

    def _unlisten(self, holders: tuple[tuple[str, str], ...]) -> None:
        for holder in holders:  # not Counter's -=: a Counter built and every holder walked, per data connection
            if (left := self._listening.get(holder, 0) - 1) > 0:
                self._listening[holder] = left
            else:
                self._listening.pop(holder, None)  # a holder goes at 0

    async def _transfer(self, connection: aioftp.Connection, opener: Callable[[], AsyncContextManager[T]],
                        body: Callable[[T, DataConnection], Awaitable[None]], done: str | None) -> bool:
        """A transfer, run by its command's task beside the command loop: take the passive port; wait for the data
        connection; enter `opener()` (the file or listing; its errors are answered without a 150); 150; the data
        connection's TLS handshake if PROT P; `body(opened, data)`; 226 `done` (None: the body sent it). Nothing is
        opened before the data connection is there (a 425 leaves nothing behind), and the data connection is closed on
        every path.
        ABOR (aioftp's: it cancels the connection's extra workers) or the session's end cancels it: 426, then 226."""
        connection.extra_workers.add(asyncio.current_task())  # the session's end-of-task callback takes it out
        passive = connection.session.take_passive()
        data = closing = delivered = None
        try:
            if passive is None:
                raise Reply("425", "no data connection: send PASV or EPSV first")
            try:
                data = await asyncio.shield(passive.connected)
            except TimeoutError:
                raise Reply("425", f"no data connection within {self.cfg.ftp.passive_timeout:g} s") from None
            except OSError as e:
                raise Reply("425", f"no data connection: {e}") from None
            async with opener() as opened:
                connection.response("150", "data connection open")
                try:
                    await data.handshake(self.cfg.ftp.tls_session_reuse)
                except (OSError, ssl.SSLError, TimeoutError) as e:
                    raise Reply("425", f"TLS handshake on the data connection failed: {e}") from None
                await body(opened, data)
                delivered = True
            if done is not None:
                connection.response("226", done)
        except Reply as e:
            log.warning("ftp_error", user=connection.user.login, code=e.code, reason=e.reason)
            connection.response(e.code, e.reason)
        except GatewayError as e:
            self._fail(connection, e)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            log.warning("ftp_error", user=connection.user.login, code="426", reason=_abort_reason(e))
            connection.response("426", "data connection failed; transfer aborted")
        except asyncio.CancelledError:
            connection.response("426", "transfer aborted")
            connection.response("226", "abort successful")
        finally:
            if data is not None:  # the listener stopped when it came; a transfer not done has nothing to deliver
                closing = data.close(at_once=delivered is None)
            elif passive is not None:  # and what it accepted as the transfer ended unanswered goes too
                passive.close()
        if closing is not None:  # answered: an ABOR meanwhile finds nothing to abort
            connection.extra_workers.discard(asyncio.current_task())
            await _closed(closing)
        return True

    def _resolve(self, connection: aioftp.Connection, rest: str) -> str:
        """The namespace path a command's argument names (remembered: _guarded checks it, then the handler uses it)."""
        session: Session = connection.session
        key = (connection.user.login, str(connection.current_directory), rest)
        if session.resolved[0] != key:
            session.resolved = key, resolve(str(connection.user.base_path), key[1], rest)  # the user's root
        return session.resolved[1]

    def _guarded(self, handler: Handler, name: str) -> Handler:
        """Refuse bad paths before aioftp sees them (and a path ending in '/' that names no directory: STOR, APPE and
        a file's RNTO would make a file by it); map gateway errors raised inside a command."""
        @functools.wraps(handler)
        async def run(connection: aioftp.Connection, rest: str) -> bool:
            try:
                if connection.future.logged.done() and not rest and name in NEEDS_PATH:  # not the current directory
                    return replied(connection, "501", f"{name.upper()} needs a pathname")
                if connection.future.logged.done() and rest:
                    moved = connection.rename_from if name == "rnto" and connection.future.rename_from.done() else None
                    try:
                        await contract.slash_checked(self.gateway, rest, self._resolve(connection, rest),
                                                     creates_file=name in ("stor", "appe"), moved_from=moved)
                    except GatewayError as e:
                        return self._fail(connection, e, refused_here=True)
                return await handler(connection, rest)
            except GatewayError as e:
                return self._fail(connection, e)
            finally:
                if name in TRANSFERS:  # run or refused, it used the REST marker and the passive port up
                    connection.session.forget_transfer()
        return run

    def _fail(self, connection: aioftp.Connection, e: GatewayError, refused_here: bool = False) -> bool:
        code, info = answer(e).ftp, e.reason
        report(self.gateway, "ftp", who(connection), e, refused_here=refused_here, code=code)
        return replied(connection, code, info)

    async def on_stor(self, connection: aioftp.Connection, rest: str, append: bool = False) -> bool:
        path = self._resolve(connection, rest)
        offset = connection.session.take_rest()

        async def receive(handle: WriteHandle, conn: DataConnection) -> None:
            async for data in conn.receive(self.cfg.ftp.tls_close_notify):
                await handle.write(data)
            _aborted()  # ABOR with the last bytes: no read waited, so no await raised it, and it would be committed
            task = connection.session.committing = asyncio.current_task()
            await handle.commit(functools.partial(_stored, connection, task))

        return await self._transfer(connection, lambda: self._upload(connection, path, offset, append), receive, None)

    on_appe = functools.partialmethod(on_stor, append=True)

    # methods: an asynccontextmanager made inside the command cost a functools.wraps per transfer

    @contextlib.asynccontextmanager
    async def _upload(self, connection: aioftp.Connection, path: str, offset: int, append: bool
                      ) -> AsyncIterator[WriteHandle]:
        """The file being written: discarded unless committed."""
        if append:
            handle = await self.gateway.open_for_write(path, "ftp", who(connection))
        else:
            handle = await self.gateway.open_write(path, "ftp", offset=offset, who=who(connection))
        try:
            yield handle
        except BaseException as e:
            await handle.abort(_abort_reason(e))
            raise

    @contextlib.asynccontextmanager
    async def _download(self, connection: aioftp.Connection, path: str, offset: int) -> AsyncIterator[ReadHandle]:
        """The file being read. Its open's audit record is written after the 150, off the way to the first byte
        (send_file, after its first sendfile), and here on every other path: before any reply after the 150."""
        handle = await self.gateway.open_read(path, "ftp", who(connection), record_later=True)
        try:
            if offset > handle.size:
                raise Reply("554", f"REST {offset} is beyond the end of the file ({handle.size} bytes)")
            yield handle
        finally:
            handle.recorded()
            await handle.close()

    async def on_retr(self, connection: aioftp.Connection, rest: str) -> bool:
        path = self._resolve(connection, rest)
        offset = connection.session.take_rest()
        return await self._transfer(connection, lambda: self._download(connection, path, offset),
                                    lambda handle, conn: send_file(conn, handle, offset), "transfer complete")

    async def on_list(self, connection: aioftp.Connection, rest: str) -> bool:
        """aioftp's LIST line format."""
        return await self._listing(connection, _ls_path(rest), "list transfer done", lambda e, name: " ".join((
            stat.filemode(st_mode(e.is_dir)), "1", "none", "none", str(e.size), self.build_list_mtime(e.mtime), name)))

    async def on_mlsd(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._listing(connection, rest, "mlsd transfer done", _mlsx, files=False)

    async def on_nlst(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._listing(connection, _ls_path(rest), "name list done", lambda e, name: name)

    async def _listing(self, connection: aioftp.Connection, rest: str, done: str, line: Callable[[Entry, str], str],
                       files: bool = True) -> bool:
        """A listing, a line per entry, in BLOCK-sized writes (aioftp wrote and drained each ~60-byte line alone). LIST
        and NLST of a file list that file, named as given (RFC 959, as `ls`; it was 550 'not a directory': a client
        checking with NLST for a file it stored took it for missing); MLSD lists directories only (RFC 3659)."""
        path = self._resolve(connection, rest or ".")
        entries = await self.gateway.listdir(path, who(connection), file_too=files)

        async def send(entries: AsyncIterator[Entry], conn: DataConnection) -> None:
            reader, writer = await conn.streams()  # in aioftp's stream (throttles, timeout); conn closes it
            stream = ThrottleStreamIO(reader, writer, throttles=connection.command_connection.throttles,
                                      timeout=connection.socket_timeout)
            block = bytearray()  # lines are encoded as the rows come: the listing is never held whole

            async def flush() -> None:
                if block:
                    await stream.write(bytes(block))
                    block.clear()
                    _aborted()  # or an ABORted listing would end with 226

            async for e in entries:
                block += (line(e, rest if e.path == path else e.name) + END_OF_LINE).encode(self.encoding)
                if len(block) >= BLOCK:
                    await flush()
            await flush()

        return await self._transfer(connection, lambda: contextlib.nullcontext(entries), send, done)

    async def on_dele(self, connection: aioftp.Connection, rest: str) -> bool:
        await self.gateway.delete(self._resolve(connection, rest), who(connection))
        return replied(connection, "250", "deleted")

    async def on_mkd(self, connection: aioftp.Connection, rest: str) -> bool:
        await self.gateway.mkdir(self._resolve(connection, rest), who(connection))
        return replied(connection, "257", f"{quoted(str(self.get_paths(connection, rest)[1]))} created")

    async def on_pwd(self, connection: aioftp.Connection, rest: str) -> bool:
        return replied(connection, "257", f"{quoted(str(connection.current_directory))} is the current directory")

    async def on_rmd(self, connection: aioftp.Connection, rest: str) -> bool:
        await self.gateway.rmdir(self._resolve(connection, rest), who(connection))
        return replied(connection, "250", "removed")

    async def on_rnfr(self, connection: aioftp.Connection, rest: str) -> bool:
        path = self._resolve(connection, rest)
        await self.gateway.stat(path)
        connection.rename_from = path
        return replied(connection, "350", "ready for RNTO")

    async def on_rnto(self, connection: aioftp.Connection, rest: str) -> bool:
        """Like rename(2), an existing target file is replaced (PACS clients re-send x.part → x)."""
        source = connection.rename_from
        del connection.rename_from
        await self.gateway.rename(source, self._resolve(connection, rest), who(connection))
        return replied(connection, "250", "renamed")

    async def on_size(self, connection: aioftp.Connection, rest: str) -> bool:
        e = await self.gateway.stat(self._resolve(connection, rest))
        if e.is_dir:
            raise IsADirectory(e.path)
        return replied(connection, "213", str(e.size))

    async def on_mdtm(self, connection: aioftp.Connection, rest: str) -> bool:
        e = await self.gateway.stat(self._resolve(connection, rest))
        return replied(connection, "213", _mdtm(e.mtime))

    async def on_feat(self, connection: aioftp.Connection, rest: str) -> bool:
        tls = [" AUTH TLS", " PBSZ", " PROT"] if self.tls else []
        return replied(connection, "211", ["Features:", *tls, " SIZE", " MDTM", " REST STREAM",
                                           " MLST type*;size*;modify*;", " EPSV", " PASV", " UTF8", "End"], True)

    async def on_opts(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.upper() == "UTF8 ON":
            return replied(connection, "200", "UTF8 is always on")
        return replied(connection, "501", f"option {rest!r} not supported")

    async def on_rest(self, connection: aioftp.Connection, rest: str) -> bool:
        """REST n: the next STOR/RETR starts at byte n, whatever comes in between (PASV, EPSV, TYPE): aioftp cleared the
        marker at any other command, so REST, PASV, STOR replaced the file with its tail."""
        if not (rest.isascii() and rest.isdigit() and len(rest) <= 19):  # int() refused '²' and 5 000 digits: 451
            return replied(connection, "501", f"REST needs a byte offset, not {rest[:40]!r}")
        connection.session.rest = int(rest)
        return replied(connection, "350", f"restarting at {int(rest)}; send STOR or RETR")

    async def on_abor(self, connection: aioftp.Connection, rest: str) -> bool:
        """Cancel the running transfer: it answers 426 then 226. A transfer that has just ended (its 226 sent, its task
        not yet out of the running set) cannot answer: aioftp's ABOR then said nothing and the client hung."""
        running = [task for task in connection.extra_workers if not task.done()]
        if connection.session.committing in running:  # stored once its commit ends (its durable part runs on):
            await asyncio.wait(running)  # its own reply says so first, then this 226 (RFC 959: ABOR after completion)
            running = []
        for task in running:
            task.cancel()
        if not running:
            connection.response("226", "nothing to abort")
        return True

    async def on_noop(self, connection: aioftp.Connection, rest: str) -> bool:
        return replied(connection, "200", "ok")

    def _form(self, command: str) -> Handler:
        """TYPE, MODE, STRU (RFC 959 5.1): the forms the server has answer 200, others 504 (they were 502, and MODE S,
        STRU F and TYPE A N, which a client may send first, were refused). ASCII is sent unconverted, as aioftp did."""
        async def run(connection: aioftp.Connection, rest: str) -> bool:
            if (form := " ".join(rest.upper().split())) not in TRANSFER_FORMS[command]:
                return replied(connection, "504", f"{command.upper()} {rest[:40]!r} not implemented; use "
                                                  f"{' or '.join(TRANSFER_FORMS[command])}")
            return replied(connection, "200", f"{command.upper()} set to {form}")
        return run

    async def on_allo(self, connection: aioftp.Connection, rest: str) -> bool:
        """ALLO (RFC 959): no space is set aside ahead; the disk is checked as the bytes come."""
        return replied(connection, "202", "ALLO not needed")

    async def build_mlsx_string(self, connection: aioftp.Connection, path: PurePath) -> str:
        """MLST (aioftp's handler)."""
        e = await connection.path_io.entry(path)
        return f"Type=unknown; {path.name}" if e is None else _mlsx(e, path.name)


def _reply(code: str, lines: list[str], as_list: bool, encoding: str) -> bytes:
    """A reply as aioftp's write_response formats it: `code-` before each line but the last (a list: the lines
    between the first and the last start with a space), `code ` before the last."""
    *body, tail = lines
    text = [f" {line}" if as_list and i else f"{code}-{line}" for i, line in enumerate(body)] + [f"{code} {tail}"]
    return "".join(line + END_OF_LINE for line in text).encode(encoding)


def _ls_path(rest: str) -> str:
    """The path of `LIST -la [path]` / `NLST -a`: clients send ls options (Windows ftp.exe's `ls -l`, scripts);
    vsftpd and proftpd ignore them, and so do we (MLSD takes none: RFC 3659)."""
    return rest.partition(" ")[2].strip() if rest.startswith("-") else rest


def _mlsx(e: Entry, name: str) -> str:
    """An MLST/MLSD line (RFC 3659)."""
    return f"Type={'dir' if e.is_dir else 'file'};Size={e.size};Modify={_mdtm(e.mtime)}; {name}"


def _mdtm(mtime: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(mtime))
