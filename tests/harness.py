"""Test harness shared by the test modules: real agent processes, S3 helpers, test-only constants.

A plain module, not conftest.py: tests/ansible has a conftest of its own, and `from conftest import`
would find whichever conftest pytest loaded last.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent.devstack import ObjectStore, free_port

BUCKET = "pacs-test"
PASSWORD = "test-only-password"  # test-only credential for the agents these tests start


def toml_value(v) -> str:
    """TOML for the values our configs use (JSON's strings, numbers and booleans are TOML too)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class AgentProc:
    """A real `pacsgw run` process with its own config, cache and ports."""

    workdir: Path
    store: ObjectStore
    prefix: str
    overrides: dict = field(default_factory=dict)
    users: list[dict] | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.ftp_port, self.sftp_port, self.http_port = free_port(), free_port(), free_port()
        base = 20000 + (os.getpid() * 7 + self.ftp_port) % 20000
        self.passive = (base, base + 63)
        self.config_path = self.workdir / "agent.toml"
        self.write_config()

    def write_config(self) -> None:
        sections = {
            "cache": {"dir": str(self.workdir / "cache"), "max_bytes": "10GB", "high_watermark": 0.9,
                      "low_watermark": 0.8, "min_free_bytes": "1MB"},
            "uplink": {"endpoint_url": self.store.endpoint_url, "bucket": BUCKET, "prefix": self.prefix,
                       "access_key_id": self.store.access_key, "secret_access_key": self.store.secret_key,
                       "write_mode": "through", "max_concurrency": 8, "connect_timeout": 1.0,
                       "read_timeout": 10.0, "through_timeout": 20.0},
            "ftp": {"listen": f"127.0.0.1:{self.ftp_port}", "passive_ports": f"{self.passive[0]}-{self.passive[1]}"},
            "sftp": {"listen": f"127.0.0.1:{self.sftp_port}", "host_key": str(self.workdir / "host_key")},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "log": {"level": "info", "format": "json"},
        }
        for key, value in self.overrides.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        lines = []
        for name, table in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        for user in self.users or [{"name": "pacs", "password": PASSWORD, "root": "/"}]:
            lines.append("[[users]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in user.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)  # it holds secrets: the agent refuses anything more open

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


def s3_objects(store: ObjectStore, prefix: str) -> dict[str, dict]:
    """Every object under prefix → {'size', 'sha256' (from the bytes themselves), 'meta'}."""
    client = store.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=BUCKET, Key=obj["Key"])
            body = got["Body"].read()
            out[obj["Key"][len(prefix):]] = {"size": len(body), "sha256": sha256(body),
                                             "meta": {k.lower(): v for k, v in got.get("Metadata", {}).items()}}
    return out
