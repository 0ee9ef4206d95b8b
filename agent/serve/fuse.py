"""The gateway namespace as a FUSE filesystem (pyfuse3 on the agent's asyncio loop), shared by Samba.

Every operation goes through the gateway facade, so SMB has FTP's and SFTP's durability contract:
  * `flush` (synchronous in close(2)) commits before smbd answers CLOSE; a writer that never reached one is dropped;
  * a write after a flush starts a new version keeping the committed bytes; a flush of an unchanged file is a no-op;
  * nothing is cached by the kernel (timeouts 0, page cache dropped on open): other protocols' changes show at once;
  * the inode table holds only what the kernel knows (lookup counts, `forget`): RAM does not grow with the archive.
Gateway errors become errno values; Samba turns them into NT status codes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import itertools
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, Sequence, TypeVar

import psutil
import pyfuse3
import structlog

from agent.audit import Who
from agent.auth import REFUSALS_EVERY, Every
from agent.records import Entry
from agent.serve.contract import OUT_OF_DESCRIPTORS, answer, out_of_descriptors, report, st_mode
from agent.store.errors import BadPath, GatewayError, NotFound, PermissionDenied
from agent.store.gateway import Gateway, ReadHandle, WriteHandle
from agent.store.paths import MAX_PATH_BYTES, check_name, name_of, parent_of

log = structlog.get_logger("pacsgw.fuse")

T = TypeVar("T")

PROTOCOL = "smb"
# Directories one SMB user may hold open: each holds its listing (300 of a 3 000-file directory held 265 MB)
MAX_OPEN_DIRS = 64
# Files one SMB user may hold open, far above a PACS's need: each may hold a descriptor, and one client took them all
MAX_OPEN_FILES = 1024


def errno_for(e: GatewayError) -> int:
    if isinstance(e, BadPath) and "longer than" in e.reason:
        return errno.ENAMETOOLONG
    return answer(e).errno


class SmbPeers:
    """The client address behind a request: the TCP connection of the smbd process (one per client), once a process."""

    LIMIT = 4096

    def __init__(self, port: int) -> None:
        self.port = port
        self._known: dict[tuple[int, float], str] = {}

    def of(self, pid: int) -> str:
        """Raises OSError when /proc cannot be read (out of descriptors): an unknown address skips _cut_short's checks,
        and a cut client's upload opened then was stored whole (attack48). The request is answered EMFILE."""
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())  # a reused pid is another process
            if key not in self._known:
                if len(self._known) >= self.LIMIT:
                    self._known.clear()
                self._known[key] = next((f"{c.raddr.ip}:{c.raddr.port}" for c in proc.net_connections("tcp")
                                         if c.raddr and c.laddr.port == self.port), "")
            return self._known[key]
        return ""

    @staticmethod
    def acting_as(pid: int) -> int | None:
        """The uid smbd process pid acts as now (its file-system uid; None if it is gone). smbd does a client's CLOSE
        as the user's account, and the closes of what a LOGOFF or TREE_DISCONNECT left open as root."""
        with contextlib.suppress(OSError, StopIteration, ValueError), open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("Uid:")).split()[4])
        return None

    def connected(self, pid: int) -> bool:
        """Whether smbd process pid still has its client: one whose connection was cut closes what was left open."""
        with contextlib.suppress(psutil.Error):
            return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
                       for c in psutil.Process(pid).net_connections("tcp"))
        return False


@dataclass
class _Inode:
    path: str | None  # None: the name was deleted or replaced while the kernel still held the inode
    lookups: int = 0


@dataclass
class _Open:
    """One open(2)/create(2) of a file: a lazy reader, a lazy writer."""

    inode: int
    path: str
    writable: bool
    who: Who  # the SMB user who opened it: reads and writes (no request context of their own) act for them
    pid: int  # the smbd process that opened it (one per client connection)
    truncate: bool = False
    reader: ReadHandle | None = None
    writer: WriteHandle | None = None
    committed: bool = False  # the current writer's content was committed by a flush
    unlinked: bool = False
    failed: bool = False  # a write failed (e.g. disk full): the file is discarded, its close reports an error
    closing: bool = False  # its flush is committing the writer's content
    refused_end: int = -1  # an end-of-file set refused "disk full", which smbd tries again as a write of its last byte
    uid: int = -1  # the Unix account that opened it (MAX_OPEN_FILES counts per account)
    refused: tuple[range, int] | None = None  # the bytes of the read whose reader was refused, its errno

    def retried(self, off: int, size: int) -> int | None:
        """The errno of the refused read this one is a page of, once: the kernel reads a failed readahead again a
        page at a time, and one SMB read over the user's reading share was two refusals logged and counted."""
        refused, self.refused = self.refused, None
        if refused is not None and off in refused[0] and off + size <= refused[0].stop and size < len(refused[0]):
            return refused[1]
        return None

    async def close_reader(self) -> None:
        if self.reader is not None:
            await self.reader.close()
            self.reader = None


Row = tuple[bytes, str, bool, int, float]  # a directory entry as readdir sends it: name, path, dir, size, mtime
KEEP_BEHIND = 1024  # rows an open directory keeps behind the last read: smbd seeks back to those its reply left out


@dataclass
class _Dir:
    """An open directory, read from the catalog as the kernel asks for it (a whole listing of a million files held
    every row): `read` rows read so far, the last of them (KEEP_BEHIND at most) held."""
    uid: int
    who: Who
    path: str
    rows: AsyncIterator[Row]
    read: int = 0
    held: collections.deque[Row] = field(default_factory=lambda: collections.deque(maxlen=KEEP_BEHIND))


_unexpected = Every(REFUSALS_EVERY)  # one event a minute per request kind: a bug a client can repeat fills no journal
Ops = TypeVar("Ops", bound=pyfuse3.Operations)


def _answered(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """pyfuse3 ends its request loop on any exception but FUSEError, and every SMB request after it (and the agent's
    stop) then waits for ever (an EMFILE did: attack47). An unexpected error is answered: its errno, else EIO."""
    @functools.wraps(handler)
    async def run(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            if code in OUT_OF_DESCRIPTORS:
                out_of_descriptors("smb", e)
            elif (since := _unexpected.due(handler.__name__)) is not None:
                log.error("smb_unexpected_error", op=handler.__name__, error=repr(e)[:200], errno=code,
                          suppressed=since, exc_info=True)
            raise pyfuse3.FUSEError(code) from None
    return run


def _answering(cls: type[Ops]) -> type[Ops]:
    """Every request handler the class overrides, through `_answered`."""
    for name in vars(pyfuse3.Operations):
        if asyncio.iscoroutinefunction(handler := vars(cls).get(name)):
            setattr(cls, name, _answered(handler))
    return cls


@_answering
class GatewayFS(pyfuse3.Operations):
    """pyfuse3 operations over the gateway. All handlers run as tasks on the agent's loop."""

    enable_writeback_cache = False
    supports_dot_lookup = False  # no NFS export: the kernel then looks up no '.' or '..' (fs/fuse/inode.c)

    def __init__(self, gateway: Gateway, uid: int, gid: int, users: dict[int, str], peers: SmbPeers) -> None:
        super().__init__()
        self.gw, self.uid, self.gid, self.peers = gateway, uid, gid, peers
        self.users = users  # uid of an SMB user's Unix account → the user's name in [[users]]
        self._inodes: dict[int, _Inode] = {pyfuse3.ROOT_INODE: _Inode("", 1)}
        self._by_path: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._inode_numbers = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._files: dict[int, _Open] = {}
        self._files_of: collections.Counter[int] = collections.Counter()  # uid → its open files (MAX_OPEN_FILES)
        self._dirs: dict[int, _Dir] = {}
        self._fh_numbers = itertools.count(1)
        self._writing: dict[str, _Open] = {}  # path → the open file whose uncommitted content it shows
        self.closing = False  # set before smbd is stopped: its closes of open files are not completions
        self.draining = False  # agent stopping: files already open may finish, no new file is opened to write
        self._mounted: tuple[Path, asyncio.Task[None]] | None = None  # where, and the request loop's task

    # --- inode table -----------------------------------------------------------------------------

    def inode_count(self) -> int:
        return len(self._inodes)

    def _inode_for(self, path: str) -> int:
        if (ino := self._by_path.get(path)) is None:
            ino = next(self._inode_numbers)
            self._inodes[ino] = _Inode(path)
            self._by_path[path] = ino
        return ino

    def _path(self, inode: int) -> str:
        if (node := self._inodes.get(inode)) is None or node.path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.path

    def _child(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> str:
        parent = self._path(parent_inode)
        try:
            text = name.decode("utf-8", "replace")
            path = f"{parent}/{text}" if parent else text
            if text.encode() != name:
                raise BadPath(path, "name is not valid UTF-8")
            check_name(text, path)
            if len(path.encode()) > MAX_PATH_BYTES:
                raise BadPath(path, f"path longer than {MAX_PATH_BYTES} bytes")
        except BadPath as e:
            report(self.gw, PROTOCOL, self._who(ctx), e, refused_here=True)
            raise pyfuse3.FUSEError(errno_for(e)) from None
        return path

    def _require(self, who: Who, right: str, path: str, writer: _Open | None = None) -> None:
        """Refuse what the gateway would for a file still being written (it does not know it yet), unless `writer`'s."""
        if not self.gw.allowed(who, right) and (writer is None or writer.who.user != who.user):
            e = PermissionDenied(path, f"user {who.user} lacks the '{right}' permission")
            report(self.gw, PROTOCOL, who, e, refused_here=True)
            raise pyfuse3.FUSEError(errno_for(e))

    def _who(self, ctx: pyfuse3.RequestContext) -> Who:
        """The SMB user behind a request: smbd does each session's file access as that user's Unix account."""
        return Who(user=self.users.get(ctx.uid, f"(uid {ctx.uid})"), protocol=PROTOCOL, peer=self.peers.of(ctx.pid))

    def _counted(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        self._inodes[attrs.st_ino].lookups += 1
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            if (node := self._inodes.get(inode)) is not None:  # the root's count is never read: it is never dropped
                node.lookups -= n
                self._drop_unused(inode)

    def _drop_unused(self, inode: int) -> None:
        """Forget an inode the kernel no longer looks up and no open file uses (never the root)."""
        if (node := self._inodes.get(inode)) is not None and node.lookups <= 0 and inode != pyfuse3.ROOT_INODE \
                and not any(f.inode == inode for f in self._files.values()):
            del self._inodes[inode]
            if node.path is not None and self._by_path.get(node.path) == inode:
                del self._by_path[node.path]

    def _stop_showing(self, op: _Open) -> None:
        """op's uncommitted content is no longer what its path shows (committed, failed or closed)."""
        if self._writing.get(op.path) is op:
            del self._writing[op.path]

    def _detach(self, path: str) -> None:
        """path no longer names the inode the kernel may still hold: later uses of that inode get ENOENT."""
        if (ino := self._by_path.pop(path, None)) is not None:
            self._inodes[ino].path = None
            if self._inodes[ino].lookups <= 0:
                self._inodes.pop(ino)

    def _moved(self, src: str, dst: str) -> None:
        """Re-key every known inode at or below src to dst (a rename)."""
        self._detach(dst)
        prefix = src + "/"
        for path in [p for p in self._by_path if p == src or p.startswith(prefix)]:
            ino = self._by_path.pop(path)
            new = dst + path[len(src):]
            self._detach(new)
            self._inodes[ino].path = new
            self._by_path[new] = ino
        if (shown := self._writing.pop(src, None)) is not None:  # not below src: the gateway refused that (WriteMarks)
            self._writing[dst] = shown
            shown.path = dst  # also when its fh is already released (an abort or commit still running)
        for op in self._files.values():
            if op.path == src or op.path.startswith(prefix):
                op.path = dst + op.path[len(src):]

    # --- attributes ------------------------------------------------------------------------------

    def _attrs(self, inode: int, *, is_dir: bool, size: int, mtime: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()  # generation and st_rdev stay 0
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = 0
        a.st_mode = st_mode(is_dir)  # group-writable: smbd checks it (agent.serve.contract)
        a.st_nlink = 2 if is_dir else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = size
        a.st_blksize = 128 * 1024
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = int(mtime * 1e9)
        return a

    async def _attrs_of(self, path: str) -> pyfuse3.EntryAttributes:
        if (op := self._writing.get(path)) is not None and op.writer is not None:
            return self._attrs(self._inode_for(path), is_dir=False, size=op.writer.size, mtime=time.time())
        e = await self._call(self.gw.stat(path))
        return self._attrs(self._inode_for(path), is_dir=e.is_dir, size=e.size, mtime=e.mtime)

    async def _call(self, coro: Awaitable[T], who: Who | None = None) -> T:
        """`who`: the SMB user of the request, named in the smb_error event (None: the op has no user, e.g. a stat)."""
        try:
            return await coro
        except GatewayError as e:
            if not isinstance(e, NotFound):  # smbd looks names up before it creates them: an answer, not an error
                report(self.gw, PROTOCOL, who, e)
            raise pyfuse3.FUSEError(errno_for(e)) from None

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._counted(await self._attrs_of(self._child(parent_inode, name, ctx)))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attrs_of(self._path(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            op = self._files.get(fh) if fh is not None else self._writing.get(path)
            if op is None or not op.writable:
                who = self._who(ctx)
                await self._call(self.gw.truncate(path, attr.st_size, PROTOCOL, who), who)
            else:
                writer = await self._ensure_writer(op, keep=attr.st_size)
                try:
                    await self._call(writer.truncate(attr.st_size), op.who)
                except pyfuse3.FUSEError as e:
                    op.refused_end = attr.st_size if e.errno == errno.ENOSPC else -1
                    raise
                op.committed = False
        # modes, owners and times: the object store keeps its own; accept and ignore
        return await self._attrs_of(path)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        disk = self.gw.disk_usage()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = disk.total // 4096
        s.f_bfree = s.f_bavail = disk.free // 4096
        s.f_files = s.f_ffree = s.f_favail = 1 << 40
        s.f_namemax = 255
        return s

    # --- namespace -------------------------------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name, ctx)
        who = self._who(ctx)
        await self._call(self.gw.mkdir(path, who), who)
        return self._counted(await self._attrs_of(path))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name, ctx)
        who = self._who(ctx)
        await self._call(self.gw.rmdir(path, who), who)
        self._detach(path)

    def _not_sealing(self, who: Who, path: str) -> None:
        """Refuse to rename or delete a file whose close is sealing it (ETXTBSY: STATUS_SHARING_VIOLATION) until its
        row is in the catalog (its descriptor closed), short of the write-through PUT: the commit stores it under the
        name it started with. Another client's rename meanwhile (Samba drops the closing open's share mode before its
        close(2)) was answered, then lost, the file in S3 under no name despite the write-through ack; a delete came
        back. Not waited for here: the kernel holds the directory locked for the request."""
        if (op := self._writing.get(path)) is not None and op.closing and op.writer is not None and op.writer.open:
            self._refuse(who, path, "being closed: its commit stores it under this name", "SharingViolation",
                         errno.ETXTBSY)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path, who = self._child(parent_inode, name, ctx), self._who(ctx)
        self._not_sealing(who, path)
        op = self._writing.get(path)
        if op is not None:  # being written and not (or not again) committed: nothing will be
            self._require(who, "delete", path, op)
        writer = op.writer if op is not None and not op.committed else None
        if op is None or await self.gw.find(path) is not None:  # judged whole before the upload is dropped (SFTP's)
            await self._call(self.gw.delete(path, who, dropping=[writer] if writer and writer.open else []), who)
        if op is not None:
            del self._writing[path]
            op.unlinked = True
            if writer is not None:
                await writer.abort("unlinked while open")
                op.writer = None
        self._detach(path)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        src = self._child(parent_inode_old, name_old, ctx)
        dst = self._child(parent_inode_new, name_new, ctx)
        if src == dst:
            return
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        who = self._who(ctx)
        self._not_sealing(who, src)
        replace = not flags & pyfuse3.RENAME_NOREPLACE
        if not replace and dst in self._writing:  # a file being written, not yet committed, holds the name
            raise pyfuse3.FUSEError(errno.EEXIST)
        held = self._writing.get(dst)
        if held is not None and held.writer is not None and not held.committed or any(
                f.path == dst and f.pid != ctx.pid for f in self._files.values()):
            # Open for writing, or in another smbd: a rename may not replace it (MS-FSA 2.1.5.14.11). Samba checks
            # only opens in one smbd: from another client the writer's close then stored over the renamed file.
            raise pyfuse3.FUSEError(errno.EACCES)
        op = self._writing.get(src)
        if await self.gw.find(src) is not None:
            await self._call(self.gw.rename(src, dst, who, replace=replace,
                                            moving=[op.writer] if op and op.writer and op.writer.open else []), who)
        elif op is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        else:  # only the open, not yet committed file: it will be committed under the new name
            self._require(who, "rename", src, op)
            assert op.writer is not None  # a file shown as being written has its writer
            await self._call(self.gw.rename_unstored([op.writer], dst, who, replace=replace), who)
            if (old := self._writing.get(dst)) is not None and old is not op:
                self._require(who, "delete", dst, old)
                old.unlinked = True
                self._writing.pop(dst)
        self._moved(src, dst)

    # --- directories -----------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        self._admit(ctx, path, "directories", sum(d.uid == ctx.uid for d in self._dirs.values()), MAX_OPEN_DIRS)
        who = self._who(ctx)
        fh = next(self._fh_numbers)
        self._dirs[fh] = _Dir(ctx.uid, who, path, self._rows(path, await self._call(self.gw.listdir(path, who), who)))
        return fh

    async def _rows(self, path: str, entries: AsyncIterator[Entry]) -> AsyncIterator[Row]:
        """The directory's entries as the catalog gives them, a page at a time, then the files being written in it
        that the catalog does not hold yet."""
        async for e in entries:
            yield e.name.encode(), e.path, e.is_dir, e.size, e.mtime
        for wpath, op in list(self._writing.items()):
            if parent_of(wpath) == path and op.writer is not None and await self.gw.find(wpath) is None:
                yield name_of(wpath).encode(), wpath, False, op.writer.size, time.time()

    async def _row_at(self, d: _Dir, offset: int) -> Row | None:
        """The entry at offset (None past the end), read on as far as it: before the rows held (rewinddir, a seek
        back further than KEEP_BEHIND) the directory is listed again from its top."""
        if offset < d.read - len(d.held):
            d.rows, d.read = self._rows(d.path, await self._call(self.gw.listdir(d.path, d.who), d.who)), 0
            d.held.clear()
        while d.read <= offset:
            if (row := await anext(d.rows, None)) is None:
                return None
            d.held.append(row)
            d.read += 1
        return d.held[offset - d.read]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        for i in itertools.count(start_id):
            if (row := await self._row_at(d, i)) is None:
                return
            name, path, is_dir, size, mtime = row
            ino = self._inode_for(path)
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino, is_dir=is_dir, size=size, mtime=mtime), i + 1):
                self._drop_unused(ino)  # not sent: the kernel holds no lookup of it from this entry
                return
            self._inodes[ino].lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files -----------------------------------------------------------------------------------

    def _admit(self, ctx: pyfuse3.RequestContext, path: str, what: str, held: int, limit: int) -> None:
        """Refuse an SMB user's open beyond its limit (EMFILE: smbd answers STATUS_TOO_MANY_OPENED_FILES)."""
        if ctx.uid in self.users and held >= limit:
            self._refuse(self._who(ctx), path, f"too many open {what} ({limit})", "TooManyOpenFiles", errno.EMFILE)

    def _refuse(self, who: Who, path: str, reason: str, kind: str, err: int) -> NoReturn:
        """An open refused here, before the gateway saw it: logged, counted, answered with err."""
        log.warning("smb_refused", user=who.user, path=path, reason=reason)
        self.gw.count_error(PROTOCOL, kind)
        raise pyfuse3.FUSEError(err)

    def _new_fh(self, op: _Open, uid: int) -> int:
        fh = next(self._fh_numbers)
        self._files[fh] = op
        op.uid = uid
        self._files_of[uid] += 1
        return fh

    async def _ensure_writer(self, op: _Open, keep: int | None = None, exclusive: bool = False) -> WriteHandle:
        if op.writer is not None and not op.committed:
            return op.writer
        if op.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if op.failed or self.closing:
            raise pyfuse3.FUSEError(errno.EIO)
        if not exclusive:  # an exclusive create finds the name taken (create, the gateway's claim): EEXIST
            self._one_writer(op.path, op.who)
        writer = op.writer = await self._call(self.gw.open_for_write(op.path, PROTOCOL, op.who, exclusive=exclusive,
                                                                      keep=0 if op.truncate else keep), op.who)
        op.truncate = op.committed = False
        self._writing[op.path] = op
        return writer

    def _one_writer(self, path: str, who: Who) -> None:
        """Refuse a second writer of a file an open is writing (ETXTBSY: smbd answers STATUS_SHARING_VIOLATION, as for
        an open that shares no writes). Opens that share writes each wrote a version of their own, and the last one
        closed replaced the others: a client's acknowledged 1 MiB upload became another handle's 10 bytes. An FTP or
        SFTP upload (or another serving process's) holds it too: an end-of-file set on it was committed, replaced."""
        if (held := self._writing.get(path)) is not None and held.writer is not None and not held.committed \
                or self.gw.being_written(path):
            self._refuse(who, path, "being written through another open", "SharingViolation", errno.ETXTBSY)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name, ctx)
        if self.closing or self.draining:
            raise pyfuse3.FUSEError(errno.EROFS)
        if path in self._writing and flags & os.O_EXCL:  # a file being written, not yet committed, holds the name
            raise pyfuse3.FUSEError(errno.EEXIST)
        self._admit(ctx, path, "files", self._files_of[ctx.uid], MAX_OPEN_FILES)
        op = _Open(0, path, writable=True, who=self._who(ctx), pid=ctx.pid, truncate=True)
        await self._ensure_writer(op, exclusive=bool(flags & os.O_EXCL))
        op.inode = self._inode_for(path)
        attrs = self._counted(self._attrs(op.inode, is_dir=False, size=0, mtime=time.time()))
        return pyfuse3.FileInfo(fh=self._new_fh(op, ctx.uid), keep_cache=False), attrs

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        self._admit(ctx, path, "files", self._files_of[ctx.uid], MAX_OPEN_FILES)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if path not in self._writing and (await self._call(self.gw.stat(path))).is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writable and (self.closing or self.draining):
            raise pyfuse3.FUSEError(errno.EROFS)
        op = _Open(inode, path, writable=writable, who=self._who(ctx), pid=ctx.pid, truncate=bool(flags & os.O_TRUNC))
        if writable:
            self._one_writer(path, op.who)
        if op.truncate and writable:
            await self._ensure_writer(op)
        return pyfuse3.FileInfo(fh=self._new_fh(op, ctx.uid), keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        op = self._files[fh]
        src = op if op.writer is not None else self._writing.get(op.path)
        if src is not None and src.writer is not None and src.writer.open:
            self._require(op.who, "read", op.path)
            return await src.writer.read_back(off, size)
        if op.reader is None or op.reader.entry.path != op.path:
            if (err := op.retried(off, size)) is not None:
                raise pyfuse3.FUSEError(err)
            await op.close_reader()
            try:
                op.reader = await self._call(self.gw.open_read(op.path, PROTOCOL, op.who), op.who)
            except pyfuse3.FUSEError as e:
                op.refused = range(off, off + size), e.errno
                raise
        return await self._call(op.reader.read(off, min(size, op.reader.size - off)), op.who)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        op = self._files[fh]
        if not op.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if buf == b"\0" and off + 1 == op.refused_end:  # Samba's vfswrap_ftruncate: refused as the set was, no harm
            op.refused_end = -1
            raise pyfuse3.FUSEError(errno.ENOSPC)
        writer = await self._ensure_writer(op)
        try:
            await self._call(writer.write(buf, off), op.who)
        except pyfuse3.FUSEError:
            # a file with a failed write is never committed, whatever the client does next
            op.failed = True
            await writer.abort("write failed")
            op.writer = None
            self._stop_showing(op)
            raise
        return len(buf)

    def _cut_short(self, op: _Open) -> str:
        """Why op's close is not its client's ('' if it is): smbd stopped, the connection was cut short, or the
        client ended its session or tree connect with the file open (LOGOFF, TREE_DISCONNECT: MS-SMB2 has the server
        close it, and a half-written upload was stored as a complete file)."""
        if self.closing:
            return "smbd stopped"
        if op.who.peer and not self.peers.connected(op.pid):
            return "the client's connection ended"
        if op.who.peer and self.peers.acting_as(op.pid) != op.uid:  # smbd closes it itself, in the request's thread
            return "the client's session ended"
        return ""

    async def flush(self, fh: int) -> None:
        """close(2): commit what this handle wrote. smbd's CLOSE reply waits for this."""
        if (op := self._files.get(fh)) is not None and op.failed:
            raise pyfuse3.FUSEError(errno.EIO)
        if op is None or op.writer is None or op.committed:
            return
        if op.unlinked:
            await op.writer.abort("unlinked before close")
            return
        if cut := self._cut_short(op):
            await op.writer.abort(f"{cut} before the client closed the file")
            self._stop_showing(op)  # another client's upload of the name may be what it shows
            raise pyfuse3.FUSEError(errno.EIO)
        op.closing = True
        try:
            await self._call(op.writer.commit(), op.who)
        finally:
            op.committed, op.closing = True, False
            self._stop_showing(op)
        await op.close_reader()

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Durability comes with close (flush); an fsync in the middle of a file changes nothing."""

    async def release(self, fh: int) -> None:
        op = self._files.pop(fh)  # each fh of _new_fh, released once (none if its open's reply failed)
        self._files_of[op.uid] -= 1  # a 0 stays: one entry per Unix account that ever opened a file
        if op.writer is not None and not op.committed:
            await op.writer.abort("released without a flush")
        self._stop_showing(op)
        await op.close_reader()
        self._drop_unused(op.inode)

    # --- mounting --------------------------------------------------------------------------------

    async def mount(self, mountpoint: Path) -> None:
        """Mount at mountpoint and run the request loop as a task of the agent's loop."""
        import pyfuse3.asyncio as pyfuse3_asyncio
        pyfuse3_asyncio.enable()
        unmount_stale(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        options = {"fsname=pacsgw", "subtype=pacsgw", "allow_other", "default_permissions", "noatime"}
        pyfuse3.init(self, str(mountpoint), options)
        self._mounted = mountpoint, asyncio.create_task(pyfuse3.main(min_tasks=4, max_tasks=64), name="fuse")
        log.info("fuse_mounted", mountpoint=str(mountpoint))

    async def unmount(self) -> None:
        if self._mounted is None:
            return
        mountpoint, task = self._mounted
        self.closing = True
        pyfuse3.terminate()
        try:
            await asyncio.wait_for(task, 10)
        except (asyncio.TimeoutError, Exception) as e:  # unmount regardless
            log.warning("fuse_loop_end", error=repr(e))
        for op in list(self._files.values()):  # what smbd left open
            if op.writer is not None and not op.committed:
                await op.writer.abort("agent stopping")
                op.committed = True
            await op.close_reader()
        pyfuse3.close(unmount=True)
        self._mounted = None
        log.info("fuse_unmounted", mountpoint=str(mountpoint))


def _mount_entry(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at mountpoint (all=True: no stat of a dead mount)."""
    target = os.path.abspath(mountpoint)
    return next((p.fstype for p in psutil.disk_partitions(all=True) if p.mountpoint == target), None)


def unmount_stale(mountpoint: Path) -> None:
    """A mount left by a killed agent answers ENOTCONN: detach it (lazily)."""
    if _mount_entry(mountpoint) is None:
        return
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            raise
    else:
        raise RuntimeError(f"{mountpoint} is already mounted by a live filesystem (another agent?)")
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)
    if _mount_entry(mountpoint) is not None:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
    log.warning("stale_mount_removed", mountpoint=str(mountpoint))
