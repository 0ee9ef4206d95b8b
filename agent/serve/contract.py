"""What every front end (FTP, SFTP, SMB over FUSE) does the same way; the protocol modules only translate.

* Modes: one file shows one mode whatever protocol lists it. 0660 / 0770 (group-writable) because SMB needs
  it: smbd checks the mode bits itself, as the session user's Unix account, which is not the mount's owner but
  is in its group (agent.serve.smb). Nothing for others: the kernel checks the bits on the FUSE mount
  (default_permissions), so no other local account of the box reads or changes the archive through it.
  The object store keeps no modes; FTP and SFTP only display them.
* Errors: one table (`ANSWERS`) says what each gateway error is in every protocol (FTP: 450/451/452 are
  transient, "try again", 55x permanent; SMB: an errno Samba turns into an NT status). A request the front end
  refused itself, before the gateway saw it (a path outside the user's root, a name no client may use), is
  audited by `report` as 'refused'; whatever reached the gateway was audited there, once.
* Logins: a success is audited by the front end once the session is really open (FTP may still refuse it).
* Opening for write (create, exclusive, truncate, resume) is decided by the facade:
  Gateway.open_for_write, Gateway.open_write (FTP's REST) and Gateway.truncate.
* Idle sessions: `Idle` (FTP's idle_timeout, SFTP's; SMB has Samba's deadtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import ssl
import stat
from dataclasses import dataclass, replace
from typing import Any, Callable

import asyncssh
import structlog

from agent.audit import Who, failure
from agent.auth import REFUSALS_EVERY, Every, LoginGuard, login_name, refusal
from agent.store.errors import (
    AlreadyExists,
    BadOffset,
    BadPath,
    Corrupt,
    GatewayError,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from agent.store.gateway import Gateway
from agent.store.paths import MAX_PATH_BYTES

log = structlog.get_logger("pacsgw.serve")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS (FTPS, the metrics listener): TLS 1.2 at least."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def st_mode(is_dir: bool) -> int:
    return stat.S_IFDIR | 0o770 if is_dir else stat.S_IFREG | 0o660


@dataclass(frozen=True)
class Answer:
    ftp: str  # reply code
    sftp: Callable[[str], asyncssh.SFTPError]  # the SFTPError subclass, given the reason
    errno: int  # FUSE → Samba → NT status


ANSWERS: dict[type[GatewayError], Answer] = {
    NotFound: Answer("550", asyncssh.SFTPNoSuchFile, errno.ENOENT),
    AlreadyExists: Answer("550", asyncssh.SFTPFileAlreadyExists, errno.EEXIST),
    IsADirectory: Answer("550", asyncssh.SFTPFileIsADirectory, errno.EISDIR),
    NotADirectory: Answer("550", asyncssh.SFTPNotADirectory, errno.ENOTDIR),
    NotEmpty: Answer("550", asyncssh.SFTPDirNotEmpty, errno.ENOTEMPTY),
    PermissionDenied: Answer("550", asyncssh.SFTPPermissionDenied, errno.EACCES),
    BadPath: Answer("553", asyncssh.SFTPInvalidFilename, errno.EINVAL),
    BadOffset: Answer("554", asyncssh.SFTPInvalidParameter, errno.EINVAL),
    NoSpace: Answer("452", asyncssh.SFTPNoSpaceOnFilesystem, errno.ENOSPC),
    Unavailable: Answer("451", asyncssh.SFTPFailure, errno.EIO),
    Corrupt: Answer("451", asyncssh.SFTPFailure, errno.EIO),
}


def answer(e: GatewayError) -> Answer:
    return ANSWERS.get(type(e), ANSWERS[Unavailable])


async def slash_checked(gw: Gateway, client_path: str, path: str, *, creates_file: bool = False,
                        moved_from: str | None = None) -> None:
    """A path ending in '/' names a directory (POSIX): not a file there, and no file made by it (`creates_file`,
    or a file `moved_from` renamed to it). The slash was dropped: `STOR new/` stored `new`, `SIZE f/` sized f."""
    if not client_path.endswith(("/", "/.")) or not path:
        return
    if (e := await gw.find(path)) is not None and not e.is_dir or e is None and (
            creates_file or moved_from is not None and not (await gw.stat(moved_from)).is_dir):
        raise NotADirectory(path, "a path ending in '/' names a directory")


# A client gone without a word (power cut, pulled cable: no FIN or reset) is cut after DEAD_PEER_S of silence, over
# FTP, SFTP and SMB alike: TCP keepalive probes from KEEPALIVE_IDLE s on, every KEEPALIVE_INTERVAL s (a live client's
# kernel answers them however long its PACS pauses), and a user timeout for an answer never acknowledged.
DEAD_PEER_S = 30
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL = 10, 5


def keep_alive(sock: socket.socket, user_timeout: bool = True) -> None:
    """A connection's dead-peer options. The user timeout also cuts a live client whose kernel shows a zero window as
    long: an FTP data connection goes without (a client reading a RETR slowly); over SSH a client only closes the
    TCP window when its process stops reading at all (a slow application closes the channel's window)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in ((socket.TCP_KEEPIDLE, KEEPALIVE_IDLE), (socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
                          (socket.TCP_KEEPCNT, (DEAD_PEER_S - KEEPALIVE_IDLE) // KEEPALIVE_INTERVAL),
                          (socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000 if user_timeout else 0)):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


# A listener out of descriptors (EMFILE, ENFILE): asyncio logged each failed accept, up to 100 a tick per listener
# (30 000 lines in 10 s, each a "Logging error" traceback: the formatter could not open its codec either), and left the
# client waiting in the backlog, unanswered, until descriptors came back. One descriptor is kept spare to accept such
# a client and close it at once (refused, not hung); the burst is logged once per REFUSALS_EVERY.
_spare: list[int] = []
_exhausted, _watch_failures = Every(REFUSALS_EVERY), Every(REFUSALS_EVERY)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def out_of_descriptors(where: str, error: BaseException | None) -> None:
    if (since := _exhausted.due(where)) is not None:
        log.warning("descriptors_exhausted", where=where, error=str(error), refused_since=since)


def watch_failed(event: str, error: Exception) -> None:
    """A background watch's failed round (SMB's login and memory watches, every 0.25 s and 2 s): a cause that stays
    (a client holding every descriptor, a full disk) failed each round, and each was an error in the journal."""
    if isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS:
        out_of_descriptors(event, error)
    elif (since := _watch_failures.due((event, type(error)))) is not None:
        log.error(event, error=f"{type(error).__name__}: {error}"[:300], suppressed=since)


def watch_descriptors(loop: asyncio.AbstractEventLoop) -> None:
    _spare.append(os.open(os.devnull, os.O_RDONLY))
    loop.set_exception_handler(_loop_error)


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    error = context.get("exception")  # asyncio's failed accept: its OSError beside the listening socket
    if not (isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS and "socket" in context):
        loop.default_exception_handler(context)
        return
    listener = socket.socket(fileno=context["socket"].fileno())  # not a dup: there is no descriptor for one
    try:
        out_of_descriptors(f"accept on {listener.getsockname()}", error)
        if _spare:
            os.close(_spare.pop())
        listener.accept()[0].close()
    except OSError:  # nobody waiting, or the spare was taken meanwhile
        pass
    finally:
        listener.detach()
        with contextlib.suppress(OSError):
            _spare.append(os.open(os.devnull, os.O_RDONLY))


# The most of a client's path a log event or an audit record keeps, JSON-escaped with ASCII escapes (the journal's,
# the longest): every path the gateway accepts fits whole (a character is at most 3x its UTF-8 bytes there, and
# controls, 6x, are refused in names). A refused path was kept whole: 6x what the client sent, twice, per request.
SHOWN_PATH_BYTES = 3 * MAX_PATH_BYTES


def shown(path: str) -> str:
    """The start of path that, JSON-escaped, fits in SHOWN_PATH_BYTES (path itself when it all does)."""
    cut = path[:SHOWN_PATH_BYTES]
    while (escaped := len(json.dumps(cut)) - 2) > SHOWN_PATH_BYTES:  # each pass keeps a share that fits, or less
        cut = cut[:len(cut) * SHOWN_PATH_BYTES // escaped]
    return cut


def report(gw: Gateway, protocol: str, who: Who | None, e: GatewayError, *, refused_here: bool = False,
           **context: object) -> None:
    """A gateway error on its way back to a client (`context`: what the protocol answered, e.g. its code)."""
    gw.count_error(protocol, type(e).__name__)
    path = shown(e.path)
    cut = {"path_chars": len(e.path)} if path != e.path else {}
    if refused_here:
        gw.audit_event(who, "refused", path, failure(e) + (f" (path cut from {len(e.path)} characters)" if cut else ""))
    log.warning(f"{protocol}_error", user=who.user if who is not None else None, path=path, reason=e.reason,
                kind=type(e).__name__, **cut, **context)


async def login(gw: Gateway, guard: LoginGuard, protocol: str, who: Who, address: str, ok: bool,
                **context: object) -> float:
    """A password check's outcome → the seconds its answer must wait: the guard's growing delay after a failure
    (that is the backoff; the caller waits once its LoginGuard.attempt is over, so the checks of others need not
    wait for it; Samba has answered already), 0 after a success."""
    who = replace(who, user=login_name(who.user))  # a name no config holds is logged and audited cut
    if ok:
        log.info("login", protocol=protocol, user=who.user, peer=who.peer, **context)
        await guard.succeeded(who.user, address)
        return 0.0
    log.warning("login_failed", protocol=protocol, user=who.user, peer=who.peer, **context)
    gw.audit_event(who, "login", "", "error: wrong user or password")
    return await guard.failed(who.user, address, protocol)


_refusals = Every(REFUSALS_EVERY)  # session_refused events (and audit records): (protocol, reason)


def refuse_session(gw: Gateway, protocol: str, who: Who, reason: str, kind: str = "SessionLimit") -> None:
    """A connection or login turned away at a session cap ([ftp]/[sftp] max_sessions_per_*, max_unauthenticated):
    counted each time, logged and audited once per protocol and reason per REFUSALS_EVERY: a client opening
    connections over a cap as fast as it could filled the journal and rotated the audit trail away."""
    gw.count_error(protocol, kind)
    if (since := _refusals.due((protocol, reason))) is None:
        return
    log.warning("session_refused", protocol=protocol, user=who.user, peer=who.peer, reason=reason, refused_since=since)
    gw.audit_event(who, "login", "", refusal(reason, since))


class Idle:
    """A session's idle timeout, touched as each request begins and ends: one timer that re-arms when it fires early
    (asyncio.timeout per FTP readline cost ~5 % of a cached read's Python time). A session is not idle while
    `busy()` (an FTP transfer runs: its data socket has a timeout of its own), as vsftpd's idle timeout. On expiry:
    `expire()`, else the task that made it is cancelled (FTP's command loop, which then sees `expired`)."""

    def __init__(self, seconds: float, busy: Callable[[], bool] = lambda: False,
                 expire: Callable[[], object] | None = None) -> None:
        self.loop, self.seconds, self.task = asyncio.get_running_loop(), seconds, asyncio.current_task()
        self.since = self.loop.time()
        self.busy, self.expire = busy, expire
        self.expired = False
        self._timer = self.loop.call_later(seconds, self._check)

    def touch(self) -> None:
        self.since = self.loop.time()

    def _check(self) -> None:
        left = self.since + self.seconds - self.loop.time()
        if left <= 0 and self.busy():
            self.since, left = self.loop.time(), self.seconds
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
            return
        self.expired = True
        if self.expire is not None:
            self.expire()
        elif self.task is not None:
            self.task.cancel()

    def cancel(self) -> None:
        self._timer.cancel()
