"""SFTP front end (asyncssh) over the gateway facade.

Each client sees its configured root as '/'. A file opened for writing streams into the gateway's
staging file; `close` commits it — and the SFTP status OK goes back only after the commit (durable,
and in S3 in write-through mode). asyncssh calls `close` even when the client vanished mid-upload:
then the channel is closing, and the partial file is discarded instead of committed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, TypeVar, cast

import asyncssh
import structlog
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import SSHPacket
from asyncssh.sftp import SFTPLimits, SFTPServerHandler
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from agent.audit import Who
from agent.auth import LoginGuard, Passwords, login_name, unmapped
from agent.config import Config, SftpConfig
from agent.records import Entry
from agent.serve.contract import Idle, answer, keep_alive, login, refuse_session, report, shown, slash_checked, st_mode
from agent.serve.startups import Startup
from agent.store.errors import GatewayError, PermissionDenied
from agent.store.gateway import Gateway, ReadHandle, WriteHandle
from agent.store.paths import resolve

log = structlog.get_logger("pacsgw.sftp")

T = TypeVar("T")
H = TypeVar("H", ReadHandle, WriteHandle)

# Handles per SFTP session, files and directories together: a file holds a descriptor (and a staging file when
# writing), a directory being read its whole listing (1.4 MB for 3 000 names: 400 unclosed ones held 565 MB)
MAX_OPEN_FILES = 64
# Directory handles one user may hold over all its SFTP sessions of this process (as SMB's fuse.MAX_OPEN_DIRS):
# MAX_OPEN_FILES alone let one account hold 64 per channel, 10 channels per connection, 32 connections (20 480
# listings, 28 GB for a 3 000-file directory)
MAX_OPEN_DIRS = 64
_listings_of: dict[str, weakref.WeakSet[AsyncIterator[asyncssh.SFTPName]]] = {}  # user → its open listings
# SFTP channels one user may hold open over all its connections to this process: each may hold an unread READ reply
# (MAX_READ) and its window of unread requests. max_channels_per_connection alone let one account hold 10 per
# connection over 32 connections: 320 channels not reading their replies grew the agent by about 2 GB.
MAX_CHANNELS_PER_USER = 64
_channels_of: Counter[str] = Counter()  # user → its open SFTP channels
# The largest SSH packet a client may send on a session: each costs the agent its own decrypt, parse and dispatch in
# Python, and asyncssh's default of 32 KiB cut a 512 KiB WRITE into 16 (and asyncssh clients send an IGNORE before each)
MAX_PKTSIZE = 256 * 1024
MAX_READ = asyncssh.sftp.MAX_SFTP_READ_LEN  # what asyncssh announces (limits@openssh.com); a longer READ gets less
# Failed logins one SSH connection may make, passwords and public keys together (OpenSSH's MaxAuthTries): asyncssh
# allows any number, and a key it does not know costs a client one request, so one connection offered keys (each a
# new user, too) thousands a second, none logged, slowed or banned, keeping half a core of the agent's loop busy
MAX_AUTH_TRIES = 6


def _attrs(e: Entry) -> asyncssh.SFTPAttrs:
    return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY if e.is_dir else asyncssh.FILEXFER_TYPE_REGULAR,
                              size=e.size, permissions=st_mode(e.is_dir), uid=0, gid=0, nlink=1,
                              atime=int(e.mtime), mtime=int(e.mtime))


def _peer(conn: asyncssh.SSHServerConnection | asyncssh.SSHServerChannel[bytes] | None) -> str:
    peer = conn.get_extra_info("peername") if conn is not None else None
    return f"{unmapped(peer[0])}:{peer[1]}" if peer else ""


LINGER_S = 2.0  # the longest a refused connection's socket is read after its DISCONNECT


def _linger(sock: socket.socket, closed: Callable[[], None]) -> None:
    """Shut the write side (the DISCONNECT already sent, then FIN) and read and drop what the client still sends,
    until its EOF or for LINGER_S, then close. asyncssh's disconnect aborts its socket at once: a request of the
    client that crossed the DISCONNECT then met a closed socket, the kernel answered it with a reset, and a client
    writing again saw a broken pipe instead of the reason."""
    loop, fd = asyncio.get_running_loop(), sock.fileno()

    def close() -> None:
        loop.remove_reader(fd)
        timer.cancel()
        sock.close()
        closed()

    def drain() -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        close()

    timer = loop.call_later(LINGER_S, close)
    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone already
        close()
        return
    loop.add_reader(fd, drain)


def ensure_host_key(path: str) -> asyncssh.SSHKey:
    """Load the host key, generating an Ed25519 key (mode 0600) on first start."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        with os.fdopen(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(key.export_private_key())
        log.info("host_key_generated", path=str(p), fingerprint=key.get_fingerprint())
    return asyncssh.read_private_key(str(p))


def _no_ignores(conn: asyncssh.SSHServerConnection) -> None:
    """asyncssh sends an empty IGNORE packet before every packet once encrypted, whatever the cipher: a CBC mode's
    countermeasure (its next IV is then unknown to an attacker), and a second encryption, send(2) and wake-up of the
    client for every SFTP reply. The server offers asyncssh's default ciphers, AEAD and CTR (no CBC): there they
    protect nothing, and they are left out."""
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype != MSG_IGNORE or "cbc" in conn.get_extra_info("send_cipher", "cbc"):
            send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet  # type: ignore[method-assign]


REPLIES_HELD = 32 * 1024  # the most replies wait for the end of the loop's turn: the smallest packet all clients take


def _coalesced(chan: asyncssh.SSHServerChannel[bytes], sent: Callable[[], None]) -> None:
    """The replies the SFTP loop writes in one turn of the event loop leave in one SSH packet, at the turn's end:
    a client's pipelined WRITEs (OpenSSH's sftp sends 32 KiB each, 16 per 512 KiB file) were answered in a packet
    each, every one encrypted, sent and waking the client on its own. sent() after each write."""
    write, close, loop = chan.write, chan.close, asyncio.get_running_loop()
    held = bytearray()

    def flush() -> None:
        data = bytes(held)
        held.clear()
        if data and not chan.is_closing():
            write(data)
            sent()

    def hold(data: bytes, datatype: asyncssh.DataType = None) -> None:
        if len(data) >= REPLIES_HELD:  # a READ's data leaves at once, after what is held, and is not copied
            flush()
            write(data)
            sent()
            return
        if not held:
            loop.call_soon(flush)
        held.extend(data)
        if len(held) >= REPLIES_HELD:
            flush()

    def closing() -> None:
        flush()
        close()

    chan.write, chan.close = hold, closing  # type: ignore[method-assign]


def _path_of(handle: object) -> str | None:
    return handle.path if isinstance(handle, WriteHandle) else handle.entry.path if isinstance(handle, ReadHandle) \
        else None


class _Handler(SFTPServerHandler):
    """asyncssh's SFTP server loop, with the answers it gives for a local file system set right for the gateway."""

    # Not advertised: the extensions GatewaySFTP refuses (links and file-system queries) a client would trust
    _extensions = [(name, data) for name, data in SFTPServerHandler._extensions
                   if name not in (b"hardlink@openssh.com", b"statvfs@openssh.com", b"fstatvfs@openssh.com")]

    async def _process_limits(self: SFTPServerHandler, packet: SSHPacket) -> SFTPLimits:
        """limits@openssh.com: asyncssh told its process's descriptor limit (about 20 000 handles) while a session
        opens MAX_OPEN_FILES, and a client sizing its parallel transfers by it met 'too many open files'."""
        packet.check_end()
        return SFTPLimits(asyncssh.sftp.MAX_SFTP_PACKET_LEN, MAX_READ, asyncssh.sftp.MAX_SFTP_WRITE_LEN, MAX_OPEN_FILES)

    async def _process_copy_data(self: SFTPServerHandler, packet: SSHPacket) -> None:
        """copy-data between two handles of one path is refused, as OpenSSH's sftp-server does: asyncssh's loop read
        back from a file open "r+" the blocks it had just copied into it, to the end (offset 0, length 0) without
        end, until the user's share for unfinished uploads (a quarter of the cache) was full."""
        fields = SSHPacket(packet.get_remaining_payload())
        src = _path_of(self._file_handles.get(fields.get_string()))
        fields.get_uint64(), fields.get_uint64()  # the source's offset and length
        if src is not None and src == _path_of(self._file_handles.get(fields.get_string())):
            raise asyncssh.SFTPFailure("copy-data from a file to itself is refused")
        await SFTPServerHandler._process_copy_data(self, packet)

    _packet_handlers = {**SFTPServerHandler._packet_handlers, b"limits@openssh.com": _process_limits,
                        b"copy-data": _process_copy_data}


class _Session(SSHServerStreamSession[bytes]):
    """asyncssh's own SFTP-only session (what `listen(sftp_factory=...)` builds), counted on its connection."""

    def __init__(self, owner: _Auth, sftp_factory: type[GatewaySFTP]) -> None:
        super().__init__(None, functools.partial(sftp_factory, session=self), asyncssh.sftp.MIN_SFTP_VERSION)
        self.owner = owner
        self.ended = False  # the SFTP loop read the client's EOF, or a request it cannot frame: no request comes
        self._length_next = True  # asyncssh reads each packet as its 4-byte length, then that many bytes

    async def read(self, datatype: asyncssh.DataType, n: int, exact: bool) -> bytes:
        # asyncssh queues every reply on the channel: a client that opens no window for them (reads no replies)
        # had each next request answered into that queue without end. The next request is read once the
        # replies before it have left; the client's window for requests then closes too. Nor while the connection's
        # own unsent bytes are over asyncio's high-water mark (_Auth.writable): a client granting a window of
        # gigabytes and reading nothing had each READ answered into the agent (200 READs of 4 MiB: 813 MiB).
        await self.drain(None)
        await self.owner.writable.wait()
        try:
            data = await super().read(datatype, n, exact)
        except asyncio.IncompleteReadError:
            self.ended = True
            raise
        self._frame(data)
        self.owner.active()
        return data

    def _frame(self, data: bytes) -> None:
        """A packet asyncssh cannot frame (longer than it takes, or too short for a type and an id) ends the SFTP
        session, and asyncssh then closes the open files through GatewaySFTP.close as if the client had sent
        CLOSE: a half-written upload was committed over the stored file. Such a session has ended here."""
        self.ended |= (int.from_bytes(data, "big") > asyncssh.sftp.MAX_SFTP_PACKET_LEN if self._length_next
                       else len(data) < 5)
        self._length_next = not self._length_next

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        super().connection_made(chan)
        _coalesced(chan, self.owner.active)
        # A client's environment variables ("env" requests, RFC 4254 6.4) are refused, as OpenSSH refuses those outside
        # its AcceptEnv: the agent runs no command, and asyncssh kept every one for the channel's life without a limit
        # (a logged-in client sent 1 000 of 30 KB per channel: 287 MB in the agent over one connection's 10 channels).
        # `chan` is asyncssh's own channel: the server has no line editor, whose wrapper would take the refusal instead.
        chan._process_env_request = lambda packet: False  # type: ignore[method-assign]

    def session_started(self) -> None:
        """asyncssh's, with _Handler's loop (asyncssh's own has no hook for it). The session grants the sftp
        subsystem alone: no shell, command or scp reaches here."""
        assert self._chan is not None and self._conn is not None
        reader, writer = SSHReader[bytes](self, self._chan), SSHWriter[bytes](self, self._chan)
        server = self._init_sftp_server()
        assert isinstance(server, GatewaySFTP)
        self._conn.create_task(_Handler(server, reader, writer, self._sftp_version).run(), reader.logger)

    def exception_received(self, exc: Exception) -> None:
        """A signal, break or terminal size the client sent: ignored (there is no terminal, no command). asyncssh queued
        it for the SFTP loop's next read to raise, which ended the loop without closing the session's files: an upload
        open then was never aborted, its path stayed 'being written' (renames over it refused), its bytes counted
        against its user's unfinished share and its descriptor and staging file were held, until the agent stopped
        (and its drain waited for it)."""

    def break_received(self, msec: int) -> bool:
        return False  # not performed

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.owner.channel_closed()


class _Auth(asyncssh.SSHServer):
    """One SSH connection: its login, its slots against [sftp] max_sessions_per_address and _per_user
    (LoginGuard's box-wide slots, scopes 'sftp address' and 'sftp user': counted apart from FTP's), and its
    channels against max_channels_per_connection."""

    REFUSE_S = 2.0  # the longest a connection over the address cap stays before its disconnect
    HOLD_MAX = 32  # refused connections a process keeps at once (waiting for REFUSE_S, lingering after)
    holding: set[_Auth] = set()  # those it keeps now

    def __init__(self, passwords: Passwords, cfg: SftpConfig, gateway: Gateway, guard: LoginGuard,
                 sftp_factory: type[GatewaySFTP]) -> None:
        self.passwords, self.cfg, self.gateway, self.guard, self.sftp_factory = (
            passwords, cfg, gateway, guard, sftp_factory)
        self.startup: Startup | None = None  # its slot of sftp.max_unauthenticated, until the login
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = ""
        self.username = "-"
        self.slots: list[int] = []
        self.admitted: list[asyncio.Task[bool]] = []  # the slot checks: a channel opens once they all passed
        self.channels = 0
        self.by_password = False  # the login was a password's (the guard has recorded it already)
        self.refused = ""  # the disconnect reason of a connection over a session cap, until it is sent
        self.began = ""  # the user this connection's authentication is for (the first it named)
        self.failures = 0  # its failed logins, against MAX_AUTH_TRIES
        self.checking: asyncio.Future[bool] | None = None  # its password check under way, or the last one
        self.idle: Idle | None = None  # sftp.idle_timeout, from the login on: touched by each request and reply
        self.writable = asyncio.Event()  # what asyncio tells the connection (pause/resume_writing; asyncssh ignores it)
        self.writable.set()
        self.lost = False  # the connection is gone

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn, self.address = conn, unmapped(conn.get_extra_info("peername")[0])
        # TCP's dead-peer options, not asyncssh's keepalive (4 unanswered rounds of 30 s held a vanished client 120 s,
        # and the first of them, sent at 30 s, turned the kernel's probes into retransmissions: 60 s)
        keep_alive(conn.get_extra_info("socket"))
        _no_ignores(conn)
        self.transport = cast(asyncio.Transport, conn._transport)  # asyncssh exposes no other way to stop reading it
        conn.pause_writing, conn.resume_writing = self._pause, self._resume  # type: ignore[method-assign]
        self.startup = Startup("sftp", self.cfg.max_unauthenticated, self.guard, self.gateway, self.address,
                               _peer(conn))
        self.startup.task.add_done_callback(self._admitted)
        # counted at once: a connection over the cap is disconnected at its login request, before any password
        cap = self.cfg.max_sessions_per_address
        self.admitted.append(asyncio.ensure_future(self._take_slot("sftp address", self.address, cap,
                                                                   f"from {self.address}", "from your address")))

    def _pause(self) -> None:
        """The connection's unsent bytes are over asyncio's high-water mark: nothing more is read from the client
        until they leave. Every request outside SFTP is answered by asyncssh at once (a global request such as
        keepalive@openssh.com, a refused channel open or channel request): a client sending them without reading
        the answers had each queued in the agent (400 000 keepalives grew it by 9 MB, and on without end)."""
        self.writable.clear()
        self.transport.pause_reading()

    def _resume(self) -> None:
        self.writable.set()
        self.transport.resume_reading()

    def _admitted(self, task: asyncio.Task[int | None]) -> None:
        """Over sftp.max_unauthenticated: closed at once, as OpenSSH's MaxStartups does (no reason is sent: that
        would hold the connection longer, for a flood)."""
        if not task.cancelled() and task.exception() is None and task.result() is None and self.conn is not None:
            self.conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()  # a request waiting to be read finds the connection gone, and its session ends
        if self.idle is not None:
            self.idle.cancel()
        if self.startup is not None:
            self.startup.end()
        for task in self.admitted:
            task.add_done_callback(lambda _: self._release())  # a slot taken after the client left goes too
        self._release()

    def _release(self) -> None:
        for slot in self.slots:
            self.guard.release_session(slot)
        self.slots = []

    async def _take_slot(self, scope: str, key: str, cap: int, whose: str, yours: str) -> bool:
        """A slot of the guard for this connection, or refuse it: audit, log, and an SSH disconnect."""
        if (slot := await self.guard.take_session(scope, key, cap)) is not None:
            self.slots.append(slot)
            return True
        refuse_session(self.gateway, "sftp", self._who(self.username), f"too many sessions {whose} (limit {cap})")
        self.refused = f"too many sessions {yours} (limit {cap}); try again later"
        if self.username == "-" and self._hold():
            # The guard answers during the key exchange: a disconnect now (asyncssh aborts the socket) would
            # reach a client that is still writing as a bare reset. It goes with the login request, or soon.
            asyncio.get_running_loop().call_later(self.REFUSE_S, self._disconnect)
        else:
            self._disconnect()
        return False

    def _hold(self) -> bool:
        """Whether this refused connection may be kept a while (for its client to read why): each holds a
        descriptor, and a client opening connections over the cap as fast as it can piled them up (4 s' worth)
        until the agent ran out of descriptors. Beyond HOLD_MAX it is cut at once."""
        if len(_Auth.holding) < self.HOLD_MAX:
            _Auth.holding.add(self)
        return self in _Auth.holding

    def _disconnect(self, code: int = asyncssh.DISC_TOO_MANY_CONNECTIONS) -> None:
        if self.refused and self.conn is not None:
            raw = self.conn.get_extra_info("socket")  # asyncssh closes its own: a duplicate lingers (_linger)
            try:
                held = socket.socket(fileno=os.dup(raw.fileno())) if raw is not None and self._hold() else None
            except OSError:  # out of descriptors: the disconnect goes all the same, without the lingering
                held = None
            self.conn.disconnect(code, self.refused)
            self.refused = ""
            if held is not None:
                _linger(held, lambda: _Auth.holding.discard(self))
            else:
                _Auth.holding.discard(self)

    def _who(self, username: str) -> Who:
        """Who a connection is, its name cut as a login's is (auth.login_name): refused before its login (auth
        tries, a session cap), a name of 1 000 characters was logged and audited whole."""
        return Who(login_name(username), "sftp", _peer(self.conn))

    def auth_completed(self) -> None:
        if self.startup is not None:
            self.startup.end()
        self.admitted.append(asyncio.ensure_future(self._login()))
        self.idle = Idle(self.cfg.idle_timeout, expire=self._idle)

    def active(self) -> None:
        if self.idle is not None:
            self.idle.touch()

    def _idle(self) -> None:
        """A logged-in connection idle for sftp.idle_timeout is closed, as FTP's idle_timeout and SMB's deadtime do:
        it held its session slots (per user, per address) and its unfinished uploads' disk for as long as the
        client kept the TCP connection, which SSH keepalives only prove alive. Its open uploads end uncommitted."""
        if self.conn is not None:
            log.info("sftp_idle_closed", user=self.username, peer=_peer(self.conn), seconds=self.cfg.idle_timeout)
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"idle for {self.cfg.idle_timeout:g} seconds")

    async def _login(self) -> bool:
        name, cap = self.username, self.cfg.max_sessions_per_user
        if not await self._take_slot("sftp user", name, cap, f"for user {name}", "for this user"):
            return False
        if not self.by_password:  # a key login trusts its address too: a guesser elsewhere cannot lock it out
            await self.guard.succeeded(name, self.address)
        self.gateway.audit_event(self._who(name), "login")
        return True

    def session_requested(self) -> Awaitable[_Session]:
        """A channel for SFTP: refused (RESOURCE_SHORTAGE) beyond max_channels_per_connection, which one
        authenticated client could otherwise open by the thousand, and beyond MAX_CHANNELS_PER_USER; opened once
        the session caps admit it."""
        for held, cap, where in ((self.channels, self.cfg.max_channels_per_connection, "on one connection"),
                                 (_channels_of[self.username], MAX_CHANNELS_PER_USER, "for this user")):
            if held >= cap:
                reason = f"too many channels {where} (limit {cap})"
                refuse_session(self.gateway, "sftp", self._who(self.username), reason)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, reason)
        self.channels += 1
        _channels_of[self.username] += 1
        return self._session()

    def channel_closed(self) -> None:
        self.channels -= 1
        _channels_of[self.username] -= 1
        if not _channels_of[self.username]:
            del _channels_of[self.username]

    async def _session(self) -> _Session:
        """The channel's session once the caps admit it. A channel whose connection went meanwhile gets none (asyncssh
        drops it unopened, no connection_lost follows): its count goes back here, or 64 connections dropped while
        opening channels locked their user out of SFTP until a restart."""
        try:
            if not all(await asyncio.gather(*self.admitted)) or self.lost:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "too many sessions")
        except BaseException:
            self.channel_closed()
            raise
        return _Session(self, self.sftp_factory)

    async def begin_auth(self, username: str) -> bool:
        """Every method is checked against the guard's bans here: a banned address or user gets no login by
        public key either (their keys are not even offered to asyncssh). One connection authenticates one user, as
        with OpenSSH: a client naming another user on the same connection is disconnected."""
        if self.began and username != self.began:
            self._cut(asyncssh.DISC_PROTOCOL_ERROR, "change of username not allowed",
                      "change of username on one connection")
            return True
        self.began = self.username = username
        if self.startup is not None and not await self.startup.admitted():  # closed already (_admitted)
            return True
        if not await self.admitted[0]:  # over the address cap
            self._disconnect()
            return True
        refused = await self.guard.refusal(username, self.address, "sftp")
        user = self.passwords.users.get(username)
        if user and user.authorized_keys and self.conn is not None and not refused:
            self.conn.set_authorized_keys(asyncssh.read_authorized_keys(list(user.authorized_keys)))
        return True

    def _cut(self, code: int, reason: str, logged: str) -> None:
        """Disconnect this connection before its login, telling the client why (counted in
        pacsgw_errors_total{kind="AuthTries"}, logged and audited as a session refused)."""
        refuse_session(self.gateway, "sftp", self._who(self.username), logged, "AuthTries")
        self.refused = reason
        self._disconnect(code)

    def _failed(self) -> None:
        self.failures += 1
        if self.failures >= MAX_AUTH_TRIES:
            self._cut(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "too many authentication failures",
                      f"too many authentication failures on one connection (limit {MAX_AUTH_TRIES})")

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """A key none of the user's authorized_keys holds (asyncssh asks only then): a failed login."""
        self._failed()
        return False

    def password_auth_supported(self) -> bool:
        return self.cfg.password_auth

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        """One password check at a time per connection, each carried to its end. asyncssh cancels the check under
        way when the client sends its next request: the hash ran on in its thread (0.1 s of CPU for a password_hash
        and its decoy) with its failure never recorded nor slowed, its guard slots freed at once, so a client
        sending password requests back to back kept the agent's threads hashing (50 sent: none recorded)."""
        if self.checking is not None:  # asyncssh cancels the request waiting here too, if another one comes
            await asyncio.wait([self.checking])
        self.checking = asyncio.ensure_future(self._check_password(username, password))
        return await asyncio.shield(self.checking)

    async def _check_password(self, username: str, password: str) -> bool:
        async with self.guard.attempt(username, self.address, "sftp") as refusal:
            if refusal:  # also a ban this connection's failures made
                self._failed()
                return False
            ok = await asyncio.to_thread(self.passwords.check, username, password)
            wait = await login(self.gateway, self.guard, "sftp", self._who(username), self.address, ok,
                               method="password")
        await asyncio.sleep(wait)
        self.by_password = ok
        if not ok:
            self._failed()
        return ok


def _opened(file_obj: object, kind: type[H], purpose: str) -> H:
    if not isinstance(file_obj, kind):
        raise asyncssh.SFTPPermissionDenied(f"file not opened for {purpose}")
    return file_obj


def _writer(file_obj: object) -> WriteHandle:
    """An upload still open: one its session removed (GatewaySFTP.remove) takes no more reads, writes or sizes."""
    writer = _opened(file_obj, WriteHandle, "writing")
    if not writer.open:
        raise asyncssh.SFTPNoSuchFile("the file was removed while open")
    return writer


class GatewaySFTP(asyncssh.SFTPServer):
    gateway: Gateway  # set by the factory
    roots: dict[str, str]

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], session: _Session) -> None:
        super().__init__(chan)
        self.session = session
        self.user = chan.get_extra_info("username")
        self.root = self.roots[self.user]
        self.who = Who(self.user, "sftp", _peer(chan))
        self.flags: dict[WriteHandle, int] = {}  # the pflags a file open for writing was opened with
        self.unchanged: set[WriteHandle] = set()  # opened on the stored file ("r+"), nothing written yet
        self.open_files = 0  # file handles; with the directory handles, against MAX_OPEN_FILES
        # asyncssh drops a directory handle at CLOSE without telling the server: each is counted while it lives
        self.listings: weakref.WeakSet[AsyncIterator[asyncssh.SFTPName]] = weakref.WeakSet()

    def _ns(self, path: bytes) -> str:
        try:
            return resolve(self.root, "/", path.decode("utf-8"))
        except UnicodeDecodeError:
            raise asyncssh.SFTPInvalidFilename("path is not valid UTF-8") from None
        except GatewayError as e:
            raise self._refused(e) from None

    async def _path(self, path: bytes, *, creates_file: bool = False, moved_from: str | None = None) -> str:
        ns = self._ns(path)
        try:
            await slash_checked(self.gateway, path.decode(), ns, creates_file=creates_file, moved_from=moved_from)
        except GatewayError as e:
            raise self._refused(e) from None
        return ns

    def _refused(self, e: GatewayError) -> asyncssh.SFTPError:
        """A request refused here, before the gateway saw it."""
        report(self.gateway, "sftp", self.who, e, refused_here=True)
        return answer(e).sftp(e.reason)

    async def _call(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except GatewayError as e:
            report(self.gateway, "sftp", self.who, e)
            raise answer(e).sftp(e.reason) from None

    # --- paths -----------------------------------------------------------------------------------

    def realpath(self, path: bytes) -> bytes:
        rel = self._ns(path)[len(self.root.strip("/")):]  # below the user's root ('' for root '/')
        return ("/" + rel.lstrip("/")).encode()

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return _attrs(await self._call(self.gateway.stat(await self._path(path))))

    lstat = stat

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        if isinstance(file_obj, WriteHandle):
            return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=file_obj.size,
                                      permissions=st_mode(False))
        return _attrs(_opened(file_obj, ReadHandle, "reading").entry)

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """A size truncates (or extends with zeros) the stored file: a new version is committed; or the session's own
        upload of the file, if it has one (truncate(2) of a file held open: a second upload lost the cut). Times and
        modes are accepted and ignored: the object store keeps its own (for a valid path inside the user's
        root: a path that escapes gets the usual error; some clients set them on a file still being written)."""
        ns = await self._path(path)
        if attrs.size is None:
            return
        if mine := self._writing(ns):
            for writer in mine:
                await self.fsetstat(writer, attrs)
        else:
            await self._call(self.gateway.truncate(ns, attrs.size, "sftp", self.who))

    lsetstat = setstat  # lsetstat@openssh.com: asyncssh's default would chmod/chown/utime a *local* path

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        """ftruncate: a size cuts (or extends) the file being written; otherwise see setstat."""
        if attrs.size is not None and attrs.size != (writer := _writer(file_obj)).size:  # the same size: no change
            await self._call(writer.truncate(attrs.size))
            self.unchanged.discard(writer)  # once done: a refused size changes nothing, the close stores no copy

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        self._take_handle(path)
        users = _listings_of.setdefault(self.user, weakref.WeakSet())
        if len(users) >= MAX_OPEN_DIRS:
            raise self._over_cap(path, f"too many open directories for this user (limit {MAX_OPEN_DIRS})")
        listing = self._listing(path)
        self.listings.add(listing)
        users.add(listing)
        return listing

    async def _listing(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        async for e in await self._call(self.gateway.listdir(await self._path(path), self.who)):
            yield asyncssh.SFTPName(e.name.encode(), attrs=_attrs(e))

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        await self._call(self.gateway.mkdir(self._ns(path), self.who))

    async def rmdir(self, path: bytes) -> None:
        await self._call(self.gateway.rmdir(self._ns(path), self.who))

    def _writing(self, path: str) -> list[WriteHandle]:
        """This session's own uploads of path: its remove or rename acts on them as unlink(2) and rename(2) on a file
        the process holds open (and SMB's on its own open file), where the gateway refuses another session's."""
        return [w for w in self.flags if w.path == path and w.open]

    async def remove(self, path: bytes) -> None:
        ns = await self._path(path)
        mine = self._writing(ns)
        if mine and await self._call(self.gateway.find(ns)) is None:  # a new file, not stored yet: only the uploads
            for writer in mine:
                await writer.abort("removed by its own session before its close")
        else:  # dropped once the delete is allowed: their close would store the file again
            await self._call(self.gateway.delete(ns, self.who, dropping=mine))

    async def rename(self, oldpath: bytes, newpath: bytes, replace: bool = False) -> None:
        """SFTPv3 rename refuses to replace an existing target; posix_rename replaces it. This session's own upload of
        the file moves with it: its close stores it under the new name."""
        src = await self._path(oldpath)
        dst = await self._path(newpath, moved_from=src)
        mine = self._writing(src)
        if mine and await self._call(self.gateway.find(src)) is None:  # a new file, not stored yet
            await self._call(self.gateway.rename_unstored(mine, dst, self.who, replace=replace))
        else:
            await self._call(self.gateway.rename(src, dst, self.who, replace=replace, moving=mine))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self.rename(oldpath, newpath, replace=True)

    # --- files -----------------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> ReadHandle | WriteHandle:
        writing = bool(pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND))
        ns = await self._path(path, creates_file=writing)
        self._take_handle(path)
        if not writing:
            handle: ReadHandle | WriteHandle = await self._call(self.gateway.open_read(ns, "sftp", self.who))
        else:
            handle = await self._call(self.gateway.open_for_write(
                ns, "sftp", self.who, keep=0 if pflags & asyncssh.FXF_TRUNC else None,
                create=bool(pflags & asyncssh.FXF_CREAT), exclusive=bool(pflags & asyncssh.FXF_EXCL)))
            self.flags[handle] = pflags
            if not pflags & (asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC):
                self.unchanged.add(handle)
        self.open_files += 1
        return handle

    def _take_handle(self, path: bytes) -> None:
        """Refuse a handle beyond MAX_OPEN_FILES: one client would otherwise take every descriptor of the agent,
        or its memory."""
        if self.open_files + len(self.listings) >= MAX_OPEN_FILES:
            raise self._over_cap(path, f"too many open files in this session (limit {MAX_OPEN_FILES})")

    def _over_cap(self, path: bytes, reason: str) -> asyncssh.SFTPError:
        """A handle refused at a cap, counted and logged. The path is the client's, not yet checked (OPENDIR is
        refused before it is read): logged whole, 250 KB of control characters were a 1.5 MB journal line."""
        log.warning("sftp_refused", user=self.user, path=shown(path.decode(errors="replace")), path_bytes=len(path),
                    reason=reason)
        self.gateway.count_error("sftp", "TooManyOpenFiles")
        return asyncssh.SFTPFailure(reason)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if isinstance(file_obj, WriteHandle) and self.flags[file_obj] & asyncssh.FXF_READ:
            # "r+": what the file holds so far, the stored bytes it started with too (those need the 'read' right)
            if not self.gateway.allowed(self.who, "read"):
                raise self._refused(PermissionDenied(file_obj.path, f"user {self.user} lacks the 'read' permission"))
            # past the end is the end (EOF), as a file opened for reading: pread(2) takes no offset of 2^63 and above
            return await self._call(_writer(file_obj).read_back(min(offset, file_obj.size), min(size, MAX_READ)))
        return await self._call(_opened(file_obj, ReadHandle, "reading").read(offset, min(size, MAX_READ)))

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        writer = _writer(file_obj)
        self.unchanged.discard(writer)
        # FXF_APPEND: every write goes to the end, whatever offset the client sends (clients send 0)
        await self._call(writer.write(data, None if self.flags[writer] & asyncssh.FXF_APPEND else offset))
        return len(data)

    async def close(self, file_obj: object) -> None:
        self.open_files -= 1
        if isinstance(file_obj, ReadHandle):
            await file_obj.close()
            return
        writer = _opened(file_obj, WriteHandle, "writing")
        self.flags.pop(writer)
        # The client vanished (its channel is closing) or ended the SFTP session (_Session.ended) before closing:
        # not a completed upload. asyncssh closes the handles still open then through this same close(); the
        # channel's EOF alone said nothing (a CLOSE sent just before it was served after it).
        if self.channel.is_closing() or self.session.ended:
            await writer.abort("session ended before close")
        elif writer in self.unchanged:  # storing the same bytes as a new version would upload them all again
            self.unchanged.discard(writer)
            await writer.abort("closed without a write: the stored file is kept as it was")
        else:
            await self._call(writer.commit())

    async def fsync(self, file_obj: object) -> None:
        if isinstance(file_obj, WriteHandle):
            await file_obj.fsync()

    # --- everything else asyncssh.SFTPServer would do on the *local* filesystem ------------------
    # Its default implementations act on real paths of this host, as the agent's user (root on the
    # appliance): symlink/link created links anywhere, readlink and statvfs read the host, open56
    # (SFTPv5+) opened any file. Links have no meaning in the object namespace: refuse them all, and
    # make map_path fail closed for any default method not overridden here.

    def map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPPermissionDenied("operation not supported by this server")

    def _unsupported(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise asyncssh.SFTPOpUnsupported("links and file-system queries are not supported by this server")

    readlink = symlink = link = statvfs = fstatvfs = open56 = _unsupported

    def exit(self) -> None:
        log.debug("sftp_session_end", user=self.user)


class SftpService:
    def __init__(self, cfg: Config, gateway: Gateway, logins: LoginGuard) -> None:
        self.cfg, self.gateway, self.logins = cfg, gateway, logins
        self.passwords = Passwords(cfg.users)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._conns: weakref.WeakSet[asyncssh.SSHServerConnection] = weakref.WeakSet()

    async def start(self, reuse_port: bool = False) -> None:
        factory = type("BoundSFTP", (GatewaySFTP,), {"gateway": self.gateway,
                                                      "roots": {u.name: u.root for u in self.cfg.users}})
        self._acceptor = await asyncssh.listen(
            *self.cfg.sftp.listen, server_host_keys=[ensure_host_key(self.cfg.sftp.host_key)], allow_scp=False,
            server_factory=lambda: _Auth(self.passwords, self.cfg.sftp, self.gateway, self.logins, factory),
            agent_forwarding=False, x11_forwarding=False,
            allow_pty=False, line_editor=False, login_timeout=self.cfg.sftp.login_timeout,
            acceptor=self._conns.add, reuse_port=reuse_port, max_pktsize=MAX_PKTSIZE)

    def stop_accepting(self) -> None:
        if self._acceptor:
            self._acceptor.close()

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.close()
        if self._acceptor:
            await self._acceptor.wait_closed()
