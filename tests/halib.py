"""Two gateway boxes and a LAN in network namespaces this test creates (issue 18): each box runs a real agent and
Debian's keepalived; VRRP between them over a bridge; SeaweedFS and the PACS clients on the LAN namespace.

Addresses: 10.253.0.0/24 (the fleet tests use 10.251.x). Namespaces: pgha-<tag>-{lan,a,b}.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import asyncssh

from devstack import AgentProc, ObjectStore
from harness import BUCKET, PASSWORD

LAN_ADDR = "10.253.0.1"
S3_ADDR = "10.253.0.2"  # its own address, so one box's S3 line can be cut with a blackhole route
VIP = "10.253.0.100"
FTP_PORT, SFTP_PORT, SMB_PORT, HTTP_PORT = 2121, 2222, 4450, 8080
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ns: its new sockets and children live there."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args) on a thread inside ns; its result or its exception."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(ns)
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def payload(name: str, version: str = "") -> bytes:
    """Deterministic content of 4-20 KB per file name (and version)."""
    seed = hashlib.sha256((name + version).encode()).digest()
    return seed * (128 + seed[0] * 2)


@dataclass
class Box:
    name: str
    ns: str
    addr: str
    peer_addr: str
    workdir: Path
    agent: AgentProc | None = None
    keepalived: subprocess.Popen | None = None
    starts: int = 0

    @property
    def role_file(self) -> Path:
        return self.workdir / "run" / "ha-role"  # /run on a real box: a reboot clears it

    @property
    def keepalived_log(self) -> Path:
        return self.workdir / f"keepalived-{self.starts}.log"

    def health(self) -> dict:
        return in_netns(self.ns, self.agent.health)

    def role(self) -> str:
        try:
            return self.health()["ha"]["role"]
        except OSError:
            return "down"


def kill_all(box: Box) -> None:
    """SIGKILL every process in the box's namespace (agent, keepalived, its check scripts) and reap ours."""
    for pid in run("ip", "netns", "pids", box.ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in (box.agent.proc if box.agent else None, box.keepalived):
        if proc is not None:
            proc.wait(10)


@dataclass
class Pair:
    """The LAN namespace (bridge, SeaweedFS, clients) and boxes a and b."""

    workdir: Path
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}")
    store: ObjectStore | None = None
    boxes: dict[str, Box] = field(default_factory=dict)
    host_key: asyncssh.SSHKey | None = None  # the pair's SFTP host key (start)
    smb_dirs: list[Path] = field(default_factory=list)

    @property
    def lan(self) -> str:
        return f"pgha-{self.tag}-lan"

    def start(self) -> "Pair":
        run("ip", "netns", "add", self.lan)
        run("ip", "-n", self.lan, "link", "set", "lo", "up")
        run("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        for addr in (LAN_ADDR, S3_ADDR):
            run("ip", "-n", self.lan, "addr", "add", f"{addr}/24", "dev", "br0")
        run("ip", "-n", self.lan, "link", "set", "br0", "up")
        for name, addr, peer in (("a", "10.253.0.11", "10.253.0.12"), ("b", "10.253.0.12", "10.253.0.11")):
            box = Box(name, f"pgha-{self.tag}-{name}", addr, peer, self.workdir / name)
            box.workdir.mkdir(parents=True)
            run("ip", "netns", "add", box.ns)
            run("ip", "-n", self.lan, "link", "add", f"pgha{self.tag}{name}", "type", "veth", "peer", "name",
                "eth0", "netns", box.ns)
            run("ip", "-n", self.lan, "link", "set", f"pgha{self.tag}{name}", "master", "br0", "up")
            run("ip", "-n", box.ns, "link", "set", "lo", "up")
            run("ip", "-n", box.ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", box.ns, "link", "set", "eth0", "up")
            self.boxes[name] = box
        self.store = ObjectStore("seaweedfs", self.workdir / "s3", host=S3_ADDR)
        in_netns(self.lan, self.store.start)
        in_netns(self.lan, self.store.create_bucket, BUCKET)
        hook = self.workdir / "hahook"
        hook.write_text(f"#!/bin/sh\nexec {sys.executable} -m agent.hahook \"$@\"\n")
        hook.chmod(0o755)
        # Both boxes answer SFTP on the floating address with one host key (the ha role installs the pair's key
        # on both): a PACS that checks the host key keeps trusting the address after a take-over.
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        key_file = self.workdir / "ssh_host_ed25519_key"
        key_file.write_bytes(self.host_key.export_private_key())
        key_file.chmod(0o600)
        return self

    # --- a box's parts ---------------------------------------------------------------------------

    def start_agent(self, box: Box, **overrides: Any) -> None:
        box.role_file.parent.mkdir(exist_ok=True)
        if box.agent is None:
            (box.workdir / "agent").mkdir()
            box.agent = AgentProc(box.workdir / "agent", self.store, f"ha{self.tag}/", {
                "ftp.listen": f"0.0.0.0:{FTP_PORT}", "http.listen": f"0.0.0.0:{HTTP_PORT}",
                "sftp.listen": f"0.0.0.0:{SFTP_PORT}", "sftp.host_key": str(self.workdir / "ssh_host_ed25519_key"),
                "ha.enabled": True, "ha.peer": f"http://{box.peer_addr}:{HTTP_PORT}",
                "ha.role_file": str(box.role_file), "ha.follow_seconds": 2, "uplink.read_timeout": 5.0,
                **overrides}, [{"name": "pacs", "password": PASSWORD, "root": "/"}], bucket=BUCKET)
            box.agent.http_port, box.agent.ftp_port = HTTP_PORT, FTP_PORT
        elif overrides:
            box.agent.overrides.update(overrides)
            box.agent.write_config()
        in_netns(box.ns, box.agent.start)

    def start_keepalived(self, box: Box) -> None:
        box.starts += 1
        hook = self.workdir / "hahook"
        conf = box.workdir / "keepalived.conf"
        notify = "\n".join(f'    notify_{s.lower()} "{hook} notify {box.role_file} {s}"'
                           for s in ("MASTER", "BACKUP", "FAULT", "STOP"))
        conf.write_text(f"""global_defs {{
    router_id pgha_{box.name}
    script_user root
}}
vrrp_script pacsgw_check {{
    script "{hook} check http://127.0.0.1:{HTTP_PORT}"
    interval 1
    timeout 2
    fall 3
    rise 2
    weight -50
    init_fail
}}
vrrp_instance pacsgw {{
    state BACKUP
    interface eth0
    virtual_router_id 53
    priority 100
    advert_int 1
    unicast_src_ip {box.addr}
    unicast_peer {{
        {box.peer_addr}
    }}
    authentication {{
        auth_type PASS
        auth_pass pghatest
    }}
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
    track_script {{
        pacsgw_check
    }}
{notify}
}}
""")
        logf = open(box.keepalived_log, "wb")
        box.keepalived = subprocess.Popen(
            ["ip", "netns", "exec", box.ns, "keepalived", "-n", "-l", "-D", "-P", "-f", str(conf),
             "-p", str(box.workdir / "k.pid"), "-r", str(box.workdir / "k-vrrp.pid"),
             "-c", str(box.workdir / "k-chk.pid")], stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()

    def start_box(self, box: Box, **overrides: Any) -> None:
        self.start_agent(box, **overrides)
        self.start_keepalived(box)

    def kill_agent(self, box: Box) -> None:
        box.agent.kill9()

    def power_off(self, box: Box) -> None:
        """Every process of the box dies at once and its NIC goes dark (its addresses die with it)."""
        kill_all(box)
        run("ip", "-n", box.ns, "link", "set", "eth0", "down")

    def power_on(self, box: Box) -> None:
        """The box boots: /run is empty, the NIC comes up with only its own address."""
        run("ip", "-n", box.ns, "addr", "del", f"{VIP}/24", "dev", "eth0", check=False)
        run("ip", "-n", box.ns, "link", "set", "eth0", "up")
        shutil.rmtree(box.role_file.parent, ignore_errors=True)

    def cut_s3(self, box: Box, cut: bool = True) -> None:
        run("ip", "-n", box.ns, "route", "add" if cut else "del", "blackhole", f"{S3_ADDR}/32")

    # --- waiting ---------------------------------------------------------------------------------

    def wait(self, what: str, test: Callable[[], bool], timeout: float = 60) -> float:
        t0 = time.monotonic()
        while not test():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} not within {timeout}s; " + self.describe())
            time.sleep(0.2)
        return time.monotonic() - t0

    def active(self) -> str | None:
        roles = {n: b.role() for n, b in self.boxes.items() if b.agent}
        actives = [n for n, r in roles.items() if r == "active"]
        return actives[0] if len(actives) == 1 else None

    def describe(self) -> str:
        out = []
        for b in self.boxes.values():
            try:
                h = b.health()
                out.append(f"{b.name}: {h['status']} {h['reasons']} ha={h['ha']} queue={h['queue_depth']}")
            except Exception as e:  # diagnostics only
                out.append(f"{b.name}: {e!r}")
            if b.keepalived_log.exists():
                out.append(b.keepalived_log.read_text()[-1500:])
        return "\n".join(out)

    def smb_overrides(self, box: Box) -> dict[str, Any]:
        """[smb] for a box (smbd run by its agent, in its namespace). The FUSE mount and Samba's state live in a
        world-searchable dir of their own: smbd's service account cannot enter pytest's 0700 tmp dirs."""
        base = Path(tempfile.mkdtemp(prefix=f"pgha-smb-{box.name}-"))
        base.chmod(0o755)
        self.smb_dirs.append(base)
        return {"smb.enabled": True, "smb.listen": f"0.0.0.0:{SMB_PORT}", "smb.encryption": "desired",
                "smb.mountpoint": str(base / "fs"), "smb.state_dir": str(base / "smb"),
                "smb.hosts_allow": [f"{LAN_ADDR.rsplit('.', 1)[0]}.0/24"]}

    def stop(self) -> None:
        for box in self.boxes.values():
            kill_all(box)
        for base in self.smb_dirs:  # a killed agent leaves its FUSE mount behind
            subprocess.run(["fusermount3", "-u", "-z", str(base / "fs")], capture_output=True, timeout=30)
            shutil.rmtree(base, ignore_errors=True)
        if self.store:
            self.store.stop()
        for ns in [b.ns for b in self.boxes.values()] + [self.lan]:
            run("ip", "netns", "delete", ns, check=False)
        if Path("/run/netns").is_dir() and not any(Path("/run/netns").iterdir()):
            run("umount", "/run/netns", check=False)
