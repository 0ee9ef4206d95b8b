"""Helpers for the fault tests: real FTP (ftplib) and SFTP (asyncssh) clients, payloads, read-only peeks.

Nothing here mocks the agent: every helper talks to a real `pacsgw run` process over loopback, or reads
its files (the SQLite catalog, opened read-only) after the fact.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import random
import socket
import sqlite3
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import asyncssh

from harness import BUCKET, PASSWORD, sha256


def payload(seed: int | str, size: int) -> bytes:
    """Deterministic pseudo-random bytes: the test can regenerate what a client sent."""
    return random.Random(str(seed)).randbytes(size)


# --- FTP (ftplib: the stdlib client a PACS script would use) -------------------------------------


def ftp_login(agent, user: str = "pacs", password: str = PASSWORD, timeout: float = 60) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=timeout)
    ftp.connect("127.0.0.1", agent.ftp_port)
    ftp.login(user, password)
    return ftp


def ftp_put(ftp: ftplib.FTP, path: str, data: bytes) -> str:
    """STOR; → the final reply (226 …). Raises ftplib.error_* on a 4xx/5xx reply."""
    return ftp.storbinary(f"STOR {path}", io.BytesIO(data), blocksize=256 * 1024)


def ftp_get(ftp: ftplib.FTP, path: str) -> bytes:
    buf = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", buf.write, blocksize=256 * 1024)
    return buf.getvalue()


def ftp_walk(ftp: ftplib.FTP, top: str = "/") -> dict[str, int]:
    """Every file below top → its size, from MLSD listings."""
    out: dict[str, int] = {}
    stack = [top.rstrip("/") or "/"]
    while stack:
        d = stack.pop()
        for name, facts in ftp.mlsd(d):
            path = (d.rstrip("/") + "/" + name)
            if facts.get("type") == "dir":
                stack.append(path)
            elif facts.get("type") == "file":
                out[path.lstrip("/")] = int(facts["size"])
    return out


def ftp_reply(ftp: ftplib.FTP, cmd: str) -> str:
    """Send one command; → the reply line whatever its code (never raises on 4xx/5xx)."""
    try:
        return ftp.sendcmd(cmd)
    except ftplib.all_errors as e:
        return str(e)


def ftp_raw_stor(ftp: ftplib.FTP, path: str) -> socket.socket:
    """Start an upload by hand (PASV + STOR) and return the data socket; the caller decides how it ends."""
    ftp.voidcmd("TYPE I")
    conn, _ = ftp.ntransfercmd(f"STOR {path}")
    return conn


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN (a cut cable, a crashed NIC driver)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- SFTP (asyncssh client) ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sftp_session(agent, user: str = "pacs", password: str = PASSWORD):
    async with asyncssh.connect("127.0.0.1", agent.sftp_port, username=user, password=password,
                                known_hosts=None, client_keys=None, agent_path=None) as conn:
        async with conn.start_sftp_client() as sftp:
            yield sftp


async def sftp_put(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    """Write a whole file; returns only after the server answered the close with OK."""
    async with sftp.open(path, "wb") as f:
        await f.write(data)


async def sftp_walk(sftp: asyncssh.SFTPClient, top: str = "/") -> dict[str, int]:
    out: dict[str, int] = {}
    stack = [top]
    while stack:
        d = stack.pop()
        for n in await sftp.readdir(d):
            name = n.filename if isinstance(n.filename, str) else n.filename.decode()
            if name in (".", ".."):
                continue
            path = d.rstrip("/") + "/" + name
            if n.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                stack.append(path)
            else:
                out[path.lstrip("/")] = n.attrs.size
    return out


# --- read-only peeks at the agent's state --------------------------------------------------------


def catalog_rows(agent, sql: str = "SELECT path, state, size, sha256, blob FROM entries WHERE is_dir = 0",
                 args: tuple = ()) -> list[tuple]:
    """Query the agent's catalog read-only (WAL lets a reader in beside the running agent)."""
    db = sqlite3.connect(f"file:{agent.workdir / 'cache' / 'catalog.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def staging_files(agent) -> list[str]:
    return sorted(os.listdir(agent.workdir / "cache" / "staging"))


def bucket_keys(store) -> set[str]:
    """Every key in the test bucket (all prefixes)."""
    client = store.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def tree_snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """path → (size, mtime_ns) of every file and directory below root, except the excluded subtree."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if exclude is not None and Path(dirpath) == exclude:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if exclude is not None and p == exclude:
                out[str(p)] = (0, 0)
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll until predicate() is truthy; → its value. Raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cached_paths(agent) -> set[str]:
    """The files that have a copy in the agent's cache."""
    return {p for p, _, _, _, b in catalog_rows(agent) if b is not None}


def metric(agent, name: str) -> float:
    """One sample of the agent's /metrics (summing across labels)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "32m") -> Iterator[Path]:
    """A small tmpfs mounted at path (needs root), always unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])


@contextlib.contextmanager
def ext4(path: Path, size: str, inodes: int) -> Iterator[Path]:
    """A small ext4 of about `inodes` inodes, a loop device's, mounted at path (needs root), always unmounted on the
    way out: a cache out of inodes with bytes free (tmpfs charges the cache's stamps, extended attributes, to its
    inodes: out of them, a stamp fails too, not as on the disks a box has)."""
    path.mkdir(parents=True, exist_ok=True)
    image = path.with_name(path.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])
        image.unlink()


class Ingest:
    """A PACS in the background: FTP threads and SFTP sessions storing files until stopped.

    Every file has a unique path and deterministic content; `acked` maps each path whose upload the
    client saw succeed (FTP 226 / SFTP close OK) to its SHA-256; `errors` lists every failure the PACS
    saw, with the time it happened.
    """

    def __init__(self, agent, *, ftp_clients: int = 2, sftp_clients: int = 2, min_size: int = 64 * 1024,
                 max_size: int = 256 * 1024, top: str = "CT/2026-11-23", pause: float = 0.0) -> None:
        import threading
        self.agent, self.top, self.pause = agent, top, pause
        self.min_size, self.max_size = min_size, max_size
        self.ftp_clients, self.sftp_clients = ftp_clients, sftp_clients
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.acked: dict[str, str] = {}
        self.ack_times: list[float] = []
        self.errors: list[tuple[float, str]] = []
        self.threads: list[threading.Thread] = []

    def _next(self, client: str, n: int) -> tuple[str, bytes]:
        path = f"{self.top}/{client}/{n // 50}/{n}.dcm"
        size = random.Random(path).randint(self.min_size, self.max_size)
        return path, payload(path, size)

    def _ok(self, path: str, data: bytes) -> None:
        with self.lock:
            self.acked[path] = sha256(data)
            self.ack_times.append(time.monotonic())

    def _err(self, path: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append((time.monotonic(), f"{path}: {type(exc).__name__}: {exc}"))

    def _ftp(self, name: str) -> None:
        try:
            ftp = ftp_login(self.agent)
        except Exception as e:
            self._err("(ftp login)", e)
            return
        n = 0
        while not self.stop_event.is_set():
            path, data = self._next(name, n)
            n += 1
            try:
                reply = ftp_put(ftp, path, data)
            except Exception as e:
                self._err(path, e)
                return
            if reply.startswith("226"):
                self._ok(path, data)
            else:
                self._err(path, RuntimeError(reply))
            time.sleep(self.pause)
        ftp.quit()

    def _sftp_loop(self) -> None:
        import asyncio

        async def one(name: str) -> None:
            try:
                async with sftp_session(self.agent) as sftp:
                    n = 0
                    while not self.stop_event.is_set():
                        path, data = self._next(name, n)
                        n += 1
                        try:
                            await sftp_put(sftp, "/" + path, data)
                        except Exception as e:
                            self._err(path, e)
                            return
                        self._ok(path, data)
                        await asyncio.sleep(self.pause)
            except Exception as e:
                self._err("(sftp session)", e)

        async def main() -> None:
            await asyncio.gather(*(one(f"sftp{i}") for i in range(self.sftp_clients)))

        asyncio.run(main())

    def start(self) -> "Ingest":
        import threading
        for i in range(self.ftp_clients):
            self.threads.append(threading.Thread(target=self._ftp, args=(f"ftp{i}",), daemon=True))
        if self.sftp_clients:
            self.threads.append(threading.Thread(target=self._sftp_loop, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 120) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)
        alive = [t for t in self.threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"{len(alive)} clients still busy after {timeout}s")

    def acks_between(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(1 for t in self.ack_times if t0 <= t <= t1)


def orphan_blobs(agent) -> set[str]:
    """Content files in the cache that no catalog row references (leaked space); the spares made ahead are not."""
    data = agent.workdir / "cache" / "data"
    on_disk = {f.name for sub in data.iterdir() if sub.is_dir() for f in sub.iterdir()}
    on_disk -= set(os.listdir(agent.workdir / "cache" / "spare"))
    referenced = {r[0] for r in catalog_rows(agent, "SELECT blob FROM entries WHERE blob IS NOT NULL")}
    return on_disk - referenced
