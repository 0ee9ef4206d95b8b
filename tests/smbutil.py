"""SMB test helpers: an smbprotocol client bound to one agent, and cleanup of smbd/FUSE left by a killed agent."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import smbclient
from smbprotocol.connection import Connection
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)

from harness import PASSWORD


def smb_overrides(base: Path) -> dict:
    """[smb] for a test agent. pytest's tmp dirs are mode 0700: smbd's service account could not enter a
    mount below them, so the mount point and Samba's state live in a world-searchable dir of their own."""
    from devstack import free_port
    return {"smb.enabled": True, "smb.listen": f"127.0.0.1:{free_port()}", "smb.encryption": "desired",
            "smb.mountpoint": str(base / "fs"), "smb.state_dir": str(base / "smb")}


class Smb:
    """smbclient calls against one agent's share, with a private connection cache (one client)."""

    def __init__(self, agent, user: str = "pacs", password: str = PASSWORD, share: str = "pacs",
                 encrypt: bool | None = None) -> None:
        self.port = int(agent.overrides["smb.listen"].rsplit(":", 1)[1])
        self._kw = {"port": self.port, "username": user, "password": password, "connection_cache": {},
                   "connection_timeout": 15}
        if encrypt is not None:
            self._kw["encrypt"] = encrypt
        self.root = rf"\\127.0.0.1\{share}"

    @property
    def kw(self) -> dict:
        """smbclient keyword arguments, on this client's own connection. Each client gets its own ClientGUID
        (smbclient's default is one per process): separate PACS machines have separate GUIDs (with multi-channel,
        now off in smb.conf, Samba handed connections that share a GUID over to one smbd process)."""
        cache = self._kw["connection_cache"]
        key = f"127.0.0.1:{self.port}"
        if key not in cache or not cache[key].transport.connected:
            conn = Connection(uuid.uuid4(), "127.0.0.1", self.port, require_signing=True)
            conn.connect(timeout=15)
            cache[key] = conn
        return self._kw

    def p(self, path: str) -> str:
        return self.root + ("\\" + path.replace("/", "\\") if path else "")

    def write(self, path: str, data: bytes) -> None:
        with smbclient.open_file(self.p(path), mode="wb", **self.kw) as f:
            for i in range(0, len(data), 4 * 1024 * 1024):
                f.write(data[i:i + 4 * 1024 * 1024])
            if not data:
                f.write(b"")

    def read(self, path: str) -> bytes:
        with smbclient.open_file(self.p(path), mode="rb", **self.kw) as f:
            return f.read()

    def listdir(self, path: str = "") -> list[str]:
        return sorted(smbclient.listdir(self.p(path), **self.kw))

    def makedirs(self, path: str) -> None:
        smbclient.makedirs(self.p(path), exist_ok=True, **self.kw)

    def stat(self, path: str):
        return smbclient.stat(self.p(path), **self.kw)

    def rename(self, src: str, dst: str) -> None:
        smbclient.rename(self.p(src), self.p(dst), **self.kw)

    def replace(self, src: str, dst: str) -> None:
        smbclient.replace(self.p(src), self.p(dst), **self.kw)

    def remove(self, path: str) -> None:
        smbclient.remove(self.p(path), **self.kw)

    def rmdir(self, path: str) -> None:
        smbclient.rmdir(self.p(path), **self.kw)

    def close(self) -> None:
        smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self._kw["connection_cache"])


def _mounted(mountpoint: Path) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def cleanup_smb(agent) -> None:
    """After a test (even a failed one): stop an smbd the agent left behind, detach its FUSE mount."""
    state = Path(agent.overrides["smb.state_dir"])
    conf = str(state / "smb.conf").encode()
    for pidfile in (state / "run").glob("smbd*.pid") if (state / "run").exists() else []:
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if conf in cmdline:
            os.kill(pid, signal.SIGKILL)
    mp = Path(agent.overrides["smb.mountpoint"])
    for _ in range(50):
        if not _mounted(mp):
            break
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        time.sleep(0.1)


def create_for_write(tree, name: str, disposition: int = CreateDisposition.FILE_OVERWRITE_IF):
    """CREATE `name` for writing (by default overwriting it if it exists) in a connected smbprotocol tree → the file."""
    f = Open(tree, name)
    f.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.GENERIC_WRITE, 0x80,
             ShareAccess.FILE_SHARE_READ, disposition, CreateOptions.FILE_NON_DIRECTORY_FILE)
    return f


def open_for_read(tree, name: str):
    """Open `name` for reading in a connected smbprotocol tree → the file."""
    f = Open(tree, name)
    f.create(ImpersonationLevel.Impersonation, FilePipePrinterAccessMask.GENERIC_READ, 0x80,
             ShareAccess.FILE_SHARE_READ, CreateDisposition.FILE_OPEN, CreateOptions.FILE_NON_DIRECTORY_FILE)
    return f


def raw_request(smb: "Smb", name: str, data: bytes | None = None) -> bytes:
    """Write `data` to `name` (CREATE, WRITE, CLOSE), or read it when data is None, with the name exactly as given:
    smbclient would resolve '..' client-side, and the server is the one that must refuse it."""
    from smbprotocol.tree import TreeConnect
    kw = smb.kw
    session = smbclient.register_session("127.0.0.1", username=kw["username"], password=kw["password"],
                                         port=smb.port, connection_cache=kw["connection_cache"])
    tree = TreeConnect(session, smb.root)
    tree.connect()
    try:
        if data is None:
            f = open_for_read(tree, name)
            got = f.read(0, f.end_of_file) if f.end_of_file else b""
        else:
            f = create_for_write(tree, name)
            f.write(data, 0)
            got = b""
        f.close()
        return got
    finally:
        tree.disconnect()
