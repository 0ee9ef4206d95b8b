"""FTP front end (aioftp) over the gateway facade.

aioftp provides the protocol; this module supplies a PathIO onto the gateway, a user manager with
hashed passwords, and its own STOR/APPE/RETR workers so that
  * 226 is sent only after the gateway committed the file (durable, and in S3 in write-through mode),
  * an upload whose data connection fails (reset, timeout) is discarded, never committed,
  * every gateway error gets its own FTP reply code and message,
plus the SIZE, MDTM, FEAT, OPTS and NOOP commands aioftp lacks. Paths are resolved with
agent.store.paths, so traversal attempts are refused, not clamped.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import stat as statmod
import time
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, Awaitable, Callable

import aioftp
import structlog
from aioftp.common import END_OF_LINE
from aioftp.server import ConnectionConditions, PathConditions, PathPermissions, worker

from agent.audit import Who, failure
from agent.auth import verify_password
from agent.config import Config, UserConfig
from agent.store.catalog import Entry
from agent.store.errors import (
    AlreadyExists,
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
from agent.store.gateway import Gateway, ReadHandle
from agent.store.paths import resolve

log = structlog.get_logger("pacsgw.ftp")

BLOCK = 256 * 1024
SEND_CHUNK = 4 * BLOCK  # a file leaves by sendfile(2) in chunks this large, each within the socket timeout
SOCKET_TIMEOUT = 120

# Gateway error → (FTP code, reply). 450/451/452 are transient ("try again"), 55x permanent.
REPLIES: dict[type, str] = {
    NotFound: "550", AlreadyExists: "550", IsADirectory: "550", NotADirectory: "550", NotEmpty: "550",
    PermissionDenied: "550", BadPath: "553", NoSpace: "452", Unavailable: "451", Corrupt: "451",
}

PATH_COMMANDS = ("cwd", "dele", "list", "nlst", "mkd", "mlsd", "mlst", "rmd", "rnfr", "rnto", "stor", "appe", "retr",
                 "size", "mdtm")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reply_for(exc: GatewayError) -> tuple[str, str]:
    return REPLIES.get(type(exc), "451"), exc.reason


def _gateway_error(exc: BaseException) -> GatewayError | None:
    """aioftp wraps PathIO exceptions in PathIOError; find ours inside."""
    seen = exc
    while seen is not None:
        if isinstance(seen, GatewayError):
            return seen
        seen = seen.__cause__
    return None


class EntryPath(PurePosixPath):
    """A path yielded by a listing that carries its catalog entry, so LIST/MLSD need no more queries."""

    entry: Entry


def _ns(path: PurePosixPath) -> str:
    return str(path).lstrip("/")


def who(connection: aioftp.Connection) -> Who:
    """The audited party of an FTP session."""
    user = connection.user.login if connection.future.user.done() else "-"
    protocol = "ftps" if getattr(connection, "tls", False) else "ftp"
    return Who(user, protocol, f"{connection.client_host}:{connection.client_port}")


async def send_file(stream: aioftp.StreamIO, handle: ReadHandle, offset: int) -> int:
    """Send the file from offset to its end by sendfile(2) as the handle allows (a verified cached copy at
    once, a fetch as it lands): page cache to socket, no copies through Python (TLS data connections fall
    back to asyncio's read-and-write loop). → bytes sent."""
    loop, pos = asyncio.get_running_loop(), offset
    try:
        with os.fdopen(os.dup(handle.fd), "rb") as f:
            while True:
                # at least once: a fetch's end (even of an empty file) waits for its check
                end = await handle.ready(pos)
                while pos < end:
                    n = await asyncio.wait_for(
                        loop.sendfile(stream.writer.transport, f, pos, min(SEND_CHUNK, end - pos)), SOCKET_TIMEOUT)
                    if not n:
                        raise Corrupt(handle.entry.path, f"content ends at {pos} of {handle.size} bytes")
                    pos += n
                if pos >= handle.size:
                    break
    finally:
        handle.gw.metrics.bytes_out.labels(handle.protocol).inc(pos - offset)
    return pos - offset


def _take_rest(connection: aioftp.Connection) -> int:
    """The REST offset for this transfer (0 if none), consumed."""
    if not connection.future.rest_offset.done():
        return 0
    offset = connection.rest_offset
    del connection.rest_offset
    return offset


class _Stat:
    def __init__(self, e: Entry) -> None:
        self.st_size = e.size
        self.st_mtime = self.st_ctime = e.mtime
        self.st_mode = (statmod.S_IFDIR | 0o755) if e.is_dir else (statmod.S_IFREG | 0o644)
        self.st_nlink = 1


class GatewayPathIO(aioftp.AbstractPathIO):
    """aioftp's view of the namespace. Paths arrive as /<user root>/<virtual path>."""

    gateway: Gateway  # set by the factory

    async def _entry(self, path: PurePosixPath) -> Entry | None:
        if isinstance(path, EntryPath):
            return path.entry
        try:
            return await self.gateway.stat(_ns(path))
        except NotFound:
            return None

    async def exists(self, path: PurePosixPath) -> bool:
        return await self._entry(path) is not None

    async def is_dir(self, path: PurePosixPath) -> bool:
        e = await self._entry(path)
        return e is not None and e.is_dir

    async def is_file(self, path: PurePosixPath) -> bool:
        e = await self._entry(path)
        return e is not None and not e.is_dir

    async def mkdir(self, path: PurePosixPath, *, parents: bool = False, exist_ok: bool = False) -> None:
        await self.gateway.mkdir(_ns(path), who(self.connection))

    async def rmdir(self, path: PurePosixPath) -> None:
        await self.gateway.rmdir(_ns(path), who(self.connection))

    async def unlink(self, path: PurePosixPath) -> None:
        await self.gateway.delete(_ns(path), who(self.connection))

    def list(self, path: PurePosixPath) -> AsyncIterator[PurePosixPath]:
        async def gen() -> AsyncIterator[PurePosixPath]:
            for e in await self.gateway.listdir(_ns(path), who(self.connection)):
                p = EntryPath(path, e.name)
                p.entry = e
                yield p
        return gen()

    async def stat(self, path: PurePosixPath) -> _Stat:
        e = await self._entry(path)
        if e is None:
            raise NotFound(_ns(path))
        return _Stat(e)

    async def rename(self, source: PurePosixPath, destination: PurePosixPath) -> PurePosixPath:
        await self.gateway.rename(_ns(source), _ns(destination), who(self.connection))
        return destination

    # File I/O goes through the server's own STOR/RETR workers, never through these.
    async def _open(self, path: PurePosixPath, mode: str) -> Any:
        raise NotImplementedError

    async def seek(self, file: Any, offset: int, whence: int = 0) -> int:
        raise NotImplementedError

    async def write(self, file: Any, data: bytes) -> int:
        raise NotImplementedError

    async def read(self, file: Any, block_size: int) -> bytes:
        raise NotImplementedError

    async def close(self, file: Any) -> None:
        raise NotImplementedError


class _Users(aioftp.AbstractUserManager):
    """Unknown names get a 331 like known ones (no user enumeration) and fail at PASS, after a delay."""

    def __init__(self, users: tuple[UserConfig, ...]) -> None:
        super().__init__()
        self.by_name = {u.name: u for u in users}
        self.ftp_users = {u.name: aioftp.User(u.name, "-", base_path=Path(u.root), home_path="/",
                                              permissions=[aioftp.Permission("/", readable=True, writable=True)])
                          for u in users}

    async def get_user(self, login: str) -> tuple[Any, aioftp.User | None, str]:
        user = self.ftp_users.get(login) or aioftp.User(login or "-", None, base_path=Path("/nonexistent"))
        return aioftp.AbstractUserManager.GetUserResponse.PASSWORD_REQUIRED, user, "password required"

    async def authenticate(self, user: aioftp.User, password: str) -> bool:
        cfg = self.by_name.get(user.login)
        ok = cfg is not None and _is_utf8(password) and await asyncio.to_thread(
            verify_password, password, plain=cfg.password, encoded=cfg.password_hash)
        if not ok:
            log.warning("login_failed", protocol="ftp", user=user.login)  # FtpServer.pass_ delays the reply
        else:
            log.info("login", protocol="ftp", user=user.login)
        return ok

    async def notify_logout(self, user: aioftp.User) -> None:
        return None


class FtpServer(aioftp.Server):
    def __init__(self, cfg: Config, gateway: Gateway) -> None:
        factory = type("BoundPathIO", (GatewayPathIO,), {"gateway": gateway})
        lo, hi = cfg.ftp.passive_ports
        super().__init__(
            _Users(cfg.users), path_io_factory=factory, block_size=BLOCK, data_ports=range(lo, hi + 1),
            ipv4_pasv_forced_response_address=cfg.ftp.masquerade_address or None,
            idle_timeout=600, socket_timeout=SOCKET_TIMEOUT)
        self.cfg, self.gateway = cfg, gateway
        self.roots = {u.name: u.root for u in cfg.users}
        self.tls = tls_context(cfg.ftp.tls_cert, cfg.ftp.tls_key) if cfg.ftp.tls_cert else None
        self.commands_mapping.update({
            "auth": self.auth, "prot": self.prot, "pbsz": self.pbsz, "user": self.user, "pass": self.pass_,
            "pasv": self.pasv,
            "epsv": self.epsv, "nlst": self.nlst, "size": self.size, "mdtm": self.mdtm, "feat": self.feat,
            "opts": self.opts, "noop": self.noop, "rest": self.rest})
        for name in PATH_COMMANDS:
            self.commands_mapping[name] = self._guarded(self.commands_mapping[name])

    # --- FTPS (explicit, RFC 4217) ---------------------------------------------------------------

    async def auth(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.strip().upper() not in ("TLS", "TLS-C", "SSL"):
            connection.response("504", f"AUTH {rest} not supported; use AUTH TLS")
        elif self.tls is None:
            connection.response("502", "TLS is not configured on this server")
        elif getattr(connection, "tls", False):
            connection.response("503", "TLS already active")
        else:
            # Stop reading first: the client's TLS hello must reach the TLS layer, not the command parser.
            stream = connection.command_connection
            stream.writer.transport.pause_reading()
            await self.write_response(stream, "234", "AUTH TLS successful")
            await stream.start_tls(self.tls, server_hostname=None)
            connection.tls = True
        return True

    async def pbsz(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("200", "PBSZ=0")
        return True

    async def prot(self, connection: aioftp.Connection, rest: str) -> bool:
        level = rest.strip().upper()
        if level == "P" and getattr(connection, "tls", False):
            connection.prot_private = True
            connection.response("200", "data connections will be protected")
        elif level == "C" and not self.cfg.ftp.require_tls:
            connection.prot_private = False
            connection.response("200", "data connections in clear")
        else:
            connection.response("536" if level in ("C", "P") else "504",
                                "PROT P after AUTH TLS is required" if self.cfg.ftp.require_tls or level == "P"
                                else f"PROT {rest} not supported")
        return True

    async def user(self, connection: aioftp.Connection, rest: str) -> bool:
        if self.cfg.ftp.require_tls and not getattr(connection, "tls", False):
            log.warning("login_refused", protocol="ftp", user=rest, reason="plain-text login while TLS is required")
            self.gateway.audit.record(Who(rest, "ftp", f"{connection.client_host}:{connection.client_port}"),
                                      "login", "", "refused: TLS required")
            connection.response("530", "TLS required: use AUTH TLS before USER")
            return True
        return await super().user(connection, rest)

    async def pass_(self, connection: aioftp.Connection, rest: str) -> bool:
        if not connection.future.user.done() or connection.future.logged.done():
            return await super().pass_(connection, rest)
        login, guard, address = who(connection).user, self.gateway.logins, connection.client_host
        if refusal := guard.refusal(login, address, "ftp"):  # LoginGuard (agent.auth): backoff and bans
            connection.response("530", refusal)
            return True
        ok = await self.user_manager.authenticate(connection.user, rest)
        self.gateway.audit.record(who(connection), "login", "", "ok" if ok else "error: wrong user or password")
        if ok:
            guard.succeeded(login, address)
            connection.logged = True
        else:
            await asyncio.sleep(guard.failed(login, address, "ftp"))  # before the reply: that is the backoff
        connection.response("230" if ok else "530", "normal login" if ok else "wrong password")
        return True

    async def pasv(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._passive(super().pasv, connection, rest)

    async def epsv(self, connection: aioftp.Connection, rest: str) -> bool:
        return await self._passive(super().epsv, connection, rest)

    async def _passive(self, handler, connection: aioftp.Connection, rest: str) -> bool:  # noqa: ANN001
        if self.cfg.ftp.require_tls and not getattr(connection, "prot_private", False):
            connection.response("521", "data connections must be protected: PROT P")
            return True
        return await handler(connection, rest)

    async def _start_passive_server(self, connection: aioftp.Connection, handler_callback):  # noqa: ANN001, ANN202
        # aioftp takes the data listener's TLS context from self.ssl; choose it per connection (PROT P or C).
        # The assignment and aioftp's read of it happen without an await in between.
        self.ssl = self.tls if getattr(connection, "prot_private", False) else None
        return await super()._start_passive_server(connection, handler_callback)

    async def close(self) -> None:
        """Close sessions after the drain. aioftp's own close can wait forever on a connection task that is
        cancelled while idle, so the wait is bounded: the transfers have already finished by now."""
        self.server.close()
        tasks = [c._dispatcher for c in list(self.connections.values())]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # --- paths and errors ------------------------------------------------------------------------

    async def parse_command(self, stream, censor_commands: tuple[str, ...] = ("pass",)):  # noqa: ANN001, ANN201
        """aioftp's parser, but bytes that are not UTF-8 no longer kill the session.

        aioftp decodes strictly, so one such byte raised UnicodeDecodeError in the dispatcher and the
        connection was dropped without a reply. Decoding with surrogateescape lets the command run: the
        path checks then refuse the name with 553 ("not valid UTF-8"), other commands answer as usual.
        """
        line = await stream.readline()
        if not line:
            raise ConnectionResetError
        cmd, _, rest = line.decode(self.encoding, errors="surrogateescape").rstrip().partition(" ")
        return cmd.lower(), rest

    def _resolve(self, connection: aioftp.Connection, rest: str) -> str:
        return resolve(self.roots.get(connection.user.login, "/"), str(connection.current_directory), rest)

    def _guarded(self, handler):  # noqa: ANN001, ANN202
        """Refuse bad paths before aioftp sees them; map gateway errors raised inside a command."""
        @functools.wraps(handler)
        async def run(connection: aioftp.Connection, rest: str) -> bool:
            if connection.future.logged.done() and rest:
                try:
                    self._resolve(connection, rest)
                except GatewayError as e:
                    return self._fail(connection, e)
            try:
                return await handler(connection, rest)
            except aioftp.errors.PathIOError as exc:
                err = _gateway_error(exc)
                if err is None:
                    raise
                return self._fail(connection, err)
            except GatewayError as e:
                return self._fail(connection, e)
        return run

    def _fail(self, connection: aioftp.Connection, e: GatewayError) -> bool:
        code, info = reply_for(e)
        self.gateway.metrics.errors.labels("ftp", type(e).__name__).inc()
        if isinstance(e, (BadPath, PermissionDenied)):
            self.gateway.audit.record(who(connection), "refused", e.path, failure(e))
        log.warning("ftp_error", user=connection.user.login, path=e.path, code=code, reason=info)
        connection.response(code, info)
        return True

    # --- transfers ---------------------------------------------------------------------------------

    @ConnectionConditions(ConnectionConditions.login_required, ConnectionConditions.passive_server_started)
    @PathPermissions(PathPermissions.writable)
    async def stor(self, connection: aioftp.Connection, rest: str, mode: str = "wb") -> bool:
        path = self._resolve(connection, rest)
        offset = _take_rest(connection)
        if mode == "ab":
            try:
                offset = (await self.gateway.stat(path)).size
            except NotFound:
                offset = 0
        handle = await self.gateway.open_write(path, "ftp", offset=offset, who=who(connection))
        if handle.size < offset:  # checked on what open_write kept: the file may have shrunk meanwhile
            await handle.abort("REST beyond the end of the file")
            connection.response("554", f"REST {offset} is beyond the end of the file ({handle.size} bytes)")
            return True

        @ConnectionConditions(ConnectionConditions.data_connection_made, wait=True, fail_code="425",
                              fail_info="Can't open data connection")
        @worker
        async def stor_worker(self: "FtpServer", connection: aioftp.Connection, rest: str) -> bool:
            stream = connection.data_connection
            del connection.data_connection
            try:
                async with stream:
                    async for data in stream.iter_by_block(connection.block_size):
                        await handle.write(data)
            except asyncio.CancelledError:
                await handle.abort("aborted")
                raise
            except GatewayError as e:
                await handle.abort(e.reason)
                return self._fail(connection, e)
            except Exception as e:  # noqa: BLE001 - the data connection broke: the file is incomplete
                await handle.abort(f"data connection failed: {type(e).__name__}: {str(e)[:200]}")
                connection.response("426", "connection closed; transfer aborted, file discarded")
                return True
            try:
                await handle.commit()
            except GatewayError as e:
                return self._fail(connection, e)
            connection.response("226", "stored")
            return True

        return self._start_transfer(connection, stor_worker(self, connection, rest))

    @ConnectionConditions(ConnectionConditions.login_required, ConnectionConditions.passive_server_started)
    @PathPermissions(PathPermissions.readable)
    async def retr(self, connection: aioftp.Connection, rest: str) -> bool:
        path = self._resolve(connection, rest)
        handle = await self.gateway.open_read(path, "ftp", who(connection))
        offset = _take_rest(connection)
        if offset > handle.size:
            await handle.close()
            connection.response("554", f"REST {offset} is beyond the end of the file ({handle.size} bytes)")
            return True

        @ConnectionConditions(ConnectionConditions.data_connection_made, wait=True, fail_code="425",
                              fail_info="Can't open data connection")
        @worker
        async def retr_worker(self: "FtpServer", connection: aioftp.Connection, rest: str) -> bool:
            stream = connection.data_connection
            del connection.data_connection
            try:
                async with stream:
                    await send_file(stream, handle, offset)
            except GatewayError as e:
                return self._fail(connection, e)
            finally:
                await handle.close()
            connection.response("226", "transfer complete")
            return True

        return self._start_transfer(connection, retr_worker(self, connection, rest))

    @staticmethod
    def _start_transfer(connection: aioftp.Connection, worker_coro) -> bool:  # noqa: ANN001
        """Run a data-connection worker beside the command loop (aioftp's model) and say so: 150."""
        connection.extra_workers.add(asyncio.create_task(worker_coro))
        connection.response("150", "data transfer started")
        return True

    # --- namespace commands: straight to the gateway, so every outcome has its precise reply and audit ---

    @ConnectionConditions(ConnectionConditions.login_required)
    async def dele(self, connection: aioftp.Connection, rest: str) -> bool:
        await self.gateway.delete(self._resolve(connection, rest), who(connection))
        connection.response("250", "deleted")
        return True

    @ConnectionConditions(ConnectionConditions.login_required)
    async def mkd(self, connection: aioftp.Connection, rest: str) -> bool:
        path = self._resolve(connection, rest)
        await self.gateway.mkdir(path, who(connection))
        connection.response("257", f'"{rest}" created')
        return True

    @ConnectionConditions(ConnectionConditions.login_required)
    async def rmd(self, connection: aioftp.Connection, rest: str) -> bool:
        await self.gateway.rmdir(self._resolve(connection, rest), who(connection))
        connection.response("250", "removed")
        return True

    @ConnectionConditions(ConnectionConditions.login_required)
    async def rnfr(self, connection: aioftp.Connection, rest: str) -> bool:
        path = self._resolve(connection, rest)
        await self.gateway.stat(path)
        connection.rename_from = path
        connection.response("350", "ready for RNTO")
        return True

    @ConnectionConditions(ConnectionConditions.login_required, ConnectionConditions.rename_from_required)
    async def rnto(self, connection: aioftp.Connection, rest: str) -> bool:
        """Like rename(2), an existing target file is replaced (PACS clients re-send x.part → x)."""
        source = connection.rename_from
        del connection.rename_from
        await self.gateway.rename(source, self._resolve(connection, rest), who(connection))
        connection.response("250", "renamed")
        return True

    @ConnectionConditions(ConnectionConditions.login_required, ConnectionConditions.passive_server_started)
    @PathConditions(PathConditions.path_must_exists)
    @PathPermissions(PathPermissions.readable)
    async def list(self, connection: aioftp.Connection, rest: str) -> bool:
        """aioftp's LIST with the same lines, sent in blocks: aioftp wrote (and drained, under a timer) each
        ~60-byte line on its own, which was most of the cost of listing a directory."""
        real_path, _ = self.get_paths(connection, rest)

        async def lines() -> list[str]:
            return [await self.build_list_string(connection, p) async for p in connection.path_io.list(real_path)]

        return self._send_lines(connection, rest, lines, "list transfer done")

    def _send_lines(self, connection: aioftp.Connection, rest: str,
                    lines: Callable[[], Awaitable[list[str]]], done: str) -> bool:
        """Send lines() over the data connection in BLOCK-sized writes (LIST, NLST), then 226 done."""

        @ConnectionConditions(ConnectionConditions.data_connection_made, wait=True, fail_code="425",
                              fail_info="Can't open data connection")
        @worker
        async def send_worker(self: "FtpServer", connection: aioftp.Connection, rest: str) -> bool:
            stream = connection.data_connection
            del connection.data_connection
            async with stream:
                data = "".join(line + END_OF_LINE for line in await lines()).encode(self.encoding)
                for start in range(0, len(data), BLOCK):
                    await stream.write(data[start:start + BLOCK])
            connection.response("226", done)
            return True

        return self._start_transfer(connection, send_worker(self, connection, rest))

    # --- commands aioftp lacks ---------------------------------------------------------------------

    @ConnectionConditions(ConnectionConditions.login_required, ConnectionConditions.passive_server_started)
    @PathPermissions(PathPermissions.readable)
    async def nlst(self, connection: aioftp.Connection, rest: str) -> bool:
        entries = await self.gateway.listdir(self._resolve(connection, rest or "."), who(connection))

        async def names() -> list[str]:
            return [e.name for e in entries]

        return self._send_lines(connection, rest, names, "name list done")

    @ConnectionConditions(ConnectionConditions.login_required)
    async def size(self, connection: aioftp.Connection, rest: str) -> bool:
        e = await self.gateway.stat(self._resolve(connection, rest))
        if e.is_dir:
            raise IsADirectory(e.path)
        connection.response("213", str(e.size))
        return True

    @ConnectionConditions(ConnectionConditions.login_required)
    async def mdtm(self, connection: aioftp.Connection, rest: str) -> bool:
        e = await self.gateway.stat(self._resolve(connection, rest))
        connection.response("213", time.strftime("%Y%m%d%H%M%S", time.gmtime(e.mtime)))
        return True

    async def feat(self, connection: aioftp.Connection, rest: str) -> bool:
        tls = [" AUTH TLS", " PBSZ", " PROT"] if self.tls else []
        connection.response("211", ["Features:", *tls, " SIZE", " MDTM", " REST STREAM",
                                    " MLST type*;size*;modify*;", " EPSV", " PASV", " UTF8", "End"], True)
        return True

    async def opts(self, connection: aioftp.Connection, rest: str) -> bool:
        if rest.strip().upper() == "UTF8 ON":
            connection.response("200", "UTF8 is always on")
        else:
            connection.response("501", f"option {rest!r} not supported")
        return True

    async def rest(self, connection: aioftp.Connection, rest: str) -> bool:
        """REST n: the next STOR/RETR starts at byte n. Kept across PASV/EPSV/TYPE (clients send REST before or
        after PASV), consumed by the transfer. aioftp's own marker was cleared by any command in between, so
        REST, PASV, STOR replaced the file with its tail."""
        if not rest.isdigit():
            connection.response("501", f"REST needs a byte offset, not {rest!r}")
            return True
        _take_rest(connection)
        connection.rest_offset = int(rest)
        connection.response("350", f"restarting at {int(rest)}; send STOR or RETR")
        return True

    async def noop(self, connection: aioftp.Connection, rest: str) -> bool:
        connection.response("200", "ok")
        return True

    async def build_mlsx_string(self, connection: aioftp.Connection, path: PurePosixPath) -> str:
        e = await connection.path_io._entry(path)
        if e is None:
            return f"Type=unknown; {path.name}"
        modify = time.strftime("%Y%m%d%H%M%S", time.gmtime(e.mtime))
        kind = "dir" if e.is_dir else "file"
        return f"Type={kind};Size={e.size};Modify={modify}; {path.name}"
