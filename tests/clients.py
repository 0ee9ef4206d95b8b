"""One client interface over FTP, SFTP and SMB (the conformance suite and the model test drive all three through it).

Each client is a real protocol client (ftplib, asyncssh, smbprotocol) logged in as one user; paths are client
paths relative to that user's root ('CT/a.dcm'). A refusal by the server raises a ClientError subclass naming
its class, read from what the protocol carries: the FTP reply text, the SFTP status code (and, for the codes
SFTPv3 folds into SSH_FX_FAILURE, its text), the SMB NTSTATUS. A refusal that fits no class raises ClientError
itself, so a scenario expecting a class fails and shows the raw error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import io
import stat as statmod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import asyncssh

from harness import PASSWORD


class ClientError(Exception):
    """The server refused the operation (any protocol error)."""


class NotFound(ClientError):
    """No such file or directory."""


class Exists(ClientError):
    """The name is taken (a directory made twice, a directory made over a file)."""


class IsADirectory(ClientError):
    """A file operation (store, delete) on a directory."""


class NotADirectory(ClientError):
    """A directory operation (rmdir) on a file, or a file used as a directory."""


class NotEmpty(ClientError):
    """A directory that still holds something."""


class BadName(ClientError):
    """A name no client may create (control characters, too long, Windows device names...)."""


class Refused(ClientError):
    """Not allowed: permissions, the user's root, a path escaping it."""


class LoginFailed(ClientError):
    """Wrong user or password."""


@dataclass(frozen=True)
class Stat:
    size: int
    is_dir: bool


class Client(Protocol):
    """What the conformance suite and the model test need of a protocol client."""

    def put(self, path: str, data: bytes) -> None: ...
    def get(self, path: str) -> bytes: ...
    def append(self, path: str, data: bytes) -> None: ...
    def resume(self, path: str, offset: int, data: bytes) -> None:
        """Keep the first `offset` bytes of the file, then `data`; the file ends there."""
    def rename(self, src: str, dst: str) -> None:
        """Replaces an existing target file (rename(2), FTP RNTO, SFTP posix-rename, SMB replace)."""
    def delete(self, path: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def list(self, path: str) -> list[str]:
        """The sorted names in a directory ('' is the user's root)."""
    def stat(self, path: str) -> Stat: ...
    def begin_put(self, path: str, data: bytes) -> None:
        """Start storing `path` and send `data`, leaving the upload unfinished (for kill -9 tests)."""
    def close(self) -> None: ...


# The gateway's reasons (agent/store/errors.py and paths.py) as FTP replies and SFTPv3 SSH_FX_FAILURE texts carry
# them: FTP answers 550 for most refusals, SFTPv3 has no codes for "exists", "not empty" or "bad name". Checked in
# order: a file being written fills its directory and holds its name, and is not to be renamed or deleted.
_REASONS: list[tuple[type[ClientError], tuple[str, ...]]] = [
    (NotFound, ("no such file", "does not exist")),
    (NotADirectory, ("not a directory",)),
    (IsADirectory, ("is a directory",)),
    (NotEmpty, ("not empty", "in this directory is being written")),
    (Exists, ("exists", "of this name is being written")),
    (BadName, ("not allowed in", "not a valid name", "longer than", "not valid utf-8", "cannot be used by windows",
               "windows reserves", "invalid path")),
    (Refused, ("permission", "escapes", "cannot be removed or renamed", "lacks the", "being written")),
]


def by_reason(text: str) -> type[ClientError]:
    low = text.lower()
    for cls, needles in _REASONS:
        if any(n in low for n in needles):
            return cls
    return ClientError


def _tidy(path: str) -> str:
    return path or "/"


# --- FTP (ftplib) -------------------------------------------------------------------------------------


class FtpClient:
    def __init__(self, agent, user: str = "pacs", password: str = PASSWORD) -> None:
        self.f = ftplib.FTP(timeout=60)
        self.f.connect("127.0.0.1", agent.ftp_port)
        try:
            self.f.login(user, password)
        except ftplib.error_perm as e:
            self.f.close()
            raise (LoginFailed if str(e).startswith("530") else ClientError)(str(e)) from None

    def _do(self, call, *args):
        try:
            return call(*args)
        except ftplib.Error as e:
            text = str(e)
            cls = BadName if text.startswith("553") else by_reason(text) if text.startswith("550") else ClientError
            raise cls(text) from None

    def put(self, path: str, data: bytes) -> None:
        self._do(self.f.storbinary, f"STOR {path}", io.BytesIO(data))

    def get(self, path: str) -> bytes:
        buf = io.BytesIO()
        self._do(self.f.retrbinary, f"RETR {path}", buf.write)
        return buf.getvalue()

    def append(self, path: str, data: bytes) -> None:
        self._do(self.f.storbinary, f"APPE {path}", io.BytesIO(data))

    def resume(self, path: str, offset: int, data: bytes) -> None:
        self._do(self.f.storbinary, f"STOR {path}", io.BytesIO(data), 8192, None, offset)

    def rename(self, src: str, dst: str) -> None:
        self._do(self.f.rename, _tidy(src), _tidy(dst))

    def delete(self, path: str) -> None:
        self._do(self.f.delete, path)

    def mkdir(self, path: str) -> None:
        self._do(self.f.mkd, path)

    def rmdir(self, path: str) -> None:
        self._do(self.f.rmd, _tidy(path))

    def list(self, path: str) -> list[str]:
        return sorted(self._do(self.f.nlst, _tidy(path)))

    def stat(self, path: str) -> Stat:
        parent, _, name = path.rpartition("/")
        facts = dict(self._do(lambda: list(self.f.mlsd(_tidy(parent)))))
        if name not in facts:
            raise NotFound(f"{path}: not in the listing of {parent!r}")
        is_dir = facts[name]["type"] == "dir"
        return Stat(0 if is_dir else int(facts[name]["size"]), is_dir)

    def begin_put(self, path: str, data: bytes) -> None:
        self.f.voidcmd("TYPE I")
        self.cut = self.f.transfercmd(f"STOR {path}")
        self.cut.sendall(data)

    def close(self) -> None:
        try:
            self.f.quit()
        except (ftplib.Error, OSError, EOFError):
            self.f.close()


# --- SFTP (asyncssh, SFTPv3 as OpenSSH and WinSCP speak it) ------------------------------------------------

# Codes of SFTPv4+ (asyncssh's server sends a v3 client their v3 fallback with the same text).

_SFTP_CODES: dict[int, type[ClientError]] = {
    asyncssh.FX_NO_SUCH_FILE: NotFound, asyncssh.FX_PERMISSION_DENIED: Refused,
    asyncssh.FX_FILE_ALREADY_EXISTS: Exists, asyncssh.FX_DIR_NOT_EMPTY: NotEmpty,
    asyncssh.FX_INVALID_FILENAME: BadName, asyncssh.FX_FILE_IS_A_DIRECTORY: IsADirectory,
    asyncssh.FX_NOT_A_DIRECTORY: NotADirectory,
}


class SftpClient:
    def __init__(self, agent, user: str = "pacs", password: str = PASSWORD) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.conn = self.loop.run_until_complete(asyncssh.connect(
                "127.0.0.1", agent.sftp_port, username=user, password=password, known_hosts=None,
                client_keys=None))
        except asyncssh.PermissionDenied as e:
            self.loop.close()
            raise LoginFailed(str(e)) from None
        self.sftp = self.loop.run_until_complete(self.conn.start_sftp_client())

    def _do(self, coro):
        try:
            return self.loop.run_until_complete(coro)
        except asyncssh.SFTPError as e:
            # the reason first: SFTPv3 folds several codes into NO_SUCH_FILE or FAILURE, keeping the text
            cls = by_reason(e.reason)
            cls = _SFTP_CODES.get(e.code, cls) if cls is ClientError else cls
            raise cls(f"{e.code} {e.reason}") from None

    async def _write(self, path: str, mode: str, data: bytes, offset: int | None = None) -> None:
        async with self.sftp.open(path, mode) as f:
            if offset is None:
                await f.write(data)
            else:
                await f.write(data, offset)
                await f.truncate(offset + len(data))

    def put(self, path: str, data: bytes) -> None:
        self._do(self._write(path, "wb", data))

    def get(self, path: str) -> bytes:
        async def body() -> bytes:
            async with self.sftp.open(path, "rb") as f:
                return await f.read()
        return self._do(body())

    def append(self, path: str, data: bytes) -> None:
        self._do(self._write(path, "ab", data))

    def resume(self, path: str, offset: int, data: bytes) -> None:
        self._do(self._write(path, "r+b", data, offset))

    def rename(self, src: str, dst: str) -> None:
        self._do(self.sftp.posix_rename(_tidy(src), _tidy(dst)))

    def delete(self, path: str) -> None:
        self._do(self.sftp.remove(path))

    def mkdir(self, path: str) -> None:
        self._do(self.sftp.mkdir(path))

    def rmdir(self, path: str) -> None:
        self._do(self.sftp.rmdir(_tidy(path)))

    def list(self, path: str) -> list[str]:
        return sorted(n for n in self._do(self.sftp.listdir(_tidy(path))) if n not in (".", ".."))

    def stat(self, path: str) -> Stat:
        attrs = self._do(self.sftp.stat(_tidy(path)))
        return Stat(attrs.size or 0, attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY)

    def begin_put(self, path: str, data: bytes) -> None:
        async def body() -> None:
            self.cut = await self.sftp.open(path, "wb")
            await self.cut.write(data)
        self._do(body())

    def close(self) -> None:
        try:
            self.sftp.exit()
            self.conn.close()
            self.loop.run_until_complete(self.conn.wait_closed())
        except (OSError, asyncssh.Error):
            pass
        self.loop.close()


@contextlib.contextmanager
def sftp_upload_held(agent, path: str, data: bytes) -> Iterator[None]:
    """Another session's SFTP upload of `path`: open, `data` sent, not closed until the block ends; its close then
    stores the file (a refusal of the close fails the block)."""
    writer = SftpClient(agent)
    try:
        writer.begin_put(path, data)
        yield
        writer._do(writer.cut.close())
    finally:
        writer.close()


# --- SMB (smbprotocol's smbclient against real Samba over the agent's FUSE view) ---------------------------

# NTSTATUS codes → classes (smbprotocol.header.NtStatus values).
_SMB_STATUS: dict[int, type[ClientError]] = {
    0xC0000034: NotFound,   # STATUS_OBJECT_NAME_NOT_FOUND
    0xC000003A: NotFound,   # STATUS_OBJECT_PATH_NOT_FOUND
    0xC000000F: NotFound,   # STATUS_NO_SUCH_FILE
    0xC0000103: NotADirectory,  # STATUS_NOT_A_DIRECTORY
    0xC0000035: Exists,     # STATUS_OBJECT_NAME_COLLISION
    0xC00000BA: IsADirectory,  # STATUS_FILE_IS_A_DIRECTORY
    0xC0000101: NotEmpty,   # STATUS_DIRECTORY_NOT_EMPTY
    0xC0000033: BadName,    # STATUS_OBJECT_NAME_INVALID
    0xC0000039: BadName,    # STATUS_OBJECT_PATH_INVALID
    0xC000003B: BadName,    # STATUS_OBJECT_PATH_SYNTAX_BAD
    0xC000000D: BadName,    # STATUS_INVALID_PARAMETER (the gateway's EINVAL for a bad name, through FUSE)
    0xC0000022: Refused,    # STATUS_ACCESS_DENIED
    0xC0000121: Refused,    # STATUS_CANNOT_DELETE
    0xC0000043: Refused,    # STATUS_SHARING_VIOLATION: Samba's answer to renaming the share's root
    0xC000006D: LoginFailed,  # STATUS_LOGON_FAILURE
    0xC000006A: LoginFailed,  # STATUS_WRONG_PASSWORD
}


class SmbClient:
    def __init__(self, agent, user: str = "pacs", password: str = PASSWORD) -> None:
        import smbclient
        from smbprotocol.exceptions import SMBException
        from smbutil import Smb
        self.smbclient, self.errors, self.smb = smbclient, (OSError, SMBException), Smb(agent, user, password)
        try:  # log in now, as the FTP and SFTP clients do, so that a wrong password fails here
            self._do(lambda: smbclient.register_session("127.0.0.1", user, password, self.smb.port,
                                                        connection_timeout=15,
                                                        connection_cache=self.smb.kw["connection_cache"]))
        except ClientError:
            self.smb.close()
            raise

    def _do(self, call, *args):
        try:
            return call(*args)
        except self.errors as e:
            status = getattr(e, "ntstatus", None) or getattr(e, "status", None)
            raise _SMB_STATUS.get(status or 0, ClientError)(f"{type(e).__name__}: {e}") from None

    def _open_write(self, path: str, mode: str, data: bytes, offset: int | None = None) -> None:
        with self.smbclient.open_file(self.smb.p(path), mode=mode, **self.smb.kw) as f:
            if offset is not None:
                f.seek(offset)
            f.write(data)
            if offset is not None:
                f.truncate(offset + len(data))

    @staticmethod
    def _climbs(path: str) -> bool:
        """smbclient resolves '..' itself: such a path goes as a raw request, for the server to judge."""
        return ".." in path.split("/")

    def put(self, path: str, data: bytes) -> None:
        from smbutil import raw_request
        if self._climbs(path):
            return self._do(raw_request, self.smb, path.replace("/", "\\"), data)
        self._do(self._open_write, path, "wb", data)

    def get(self, path: str) -> bytes:
        from smbutil import raw_request
        if self._climbs(path):
            return self._do(raw_request, self.smb, path.replace("/", "\\"))
        return self._do(self.smb.read, path)

    def append(self, path: str, data: bytes) -> None:
        self._do(self._open_write, path, "ab", data)

    def resume(self, path: str, offset: int, data: bytes) -> None:
        self._do(self._open_write, path, "r+b", data, offset)

    def rename(self, src: str, dst: str) -> None:
        self._do(self.smb.replace, src, dst)

    def delete(self, path: str) -> None:
        self._do(self.smb.remove, path)

    def mkdir(self, path: str) -> None:
        self._do(lambda: self.smbclient.mkdir(self.smb.p(path), **self.smb.kw))

    def rmdir(self, path: str) -> None:
        self._do(self.smb.rmdir, path)

    def list(self, path: str) -> list[str]:
        return self._do(self.smb.listdir, path)

    def stat(self, path: str) -> Stat:
        st = self._do(self.smb.stat, path)
        return Stat(0 if statmod.S_ISDIR(st.st_mode) else st.st_size, statmod.S_ISDIR(st.st_mode))

    def begin_put(self, path: str, data: bytes) -> None:
        self.cut = self.smbclient.open_file(self.smb.p(path), mode="wb", buffering=0, **self.smb.kw)
        self.cut.write(data)

    def close(self) -> None:
        self.smb.close()


CLIENTS: dict[str, type[Client]] = {"ftp": FtpClient, "sftp": SftpClient, "smb": SmbClient}
