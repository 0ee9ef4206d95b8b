"""What the benchmarks share: the servers under test (our agent, rclone's peers), FTP sessions, figures.

Every server listens on loopback only. The user and password exist only in the servers a benchmark starts.
"""

from __future__ import annotations

import ftplib
import os
import random
import time
from pathlib import Path

import psutil

from tests.devstack import AgentProc, ObjectStore, RcloneServe

BUCKET = "bench"
USER, PASSWORD = "pacs", "bench-only-password"  # exists only in the servers the benchmarks start


def load() -> str:
    """The 1-minute load average, to print beside every figure (the machine is shared)."""
    return f"{os.getloadavg()[0]:.2f}"


def pct(values: list[float], p: float) -> float:
    """The p-quantile of values (seconds) in milliseconds; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)


def ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 2) if theirs else float("nan")


def pool(size: int, n: int = 16, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def content(tag: str, i: int, size: int, blocks: list[bytes]) -> bytes:
    """Unique bytes per file without generating N × size random bytes: a random block, stamped."""
    stamp = f"{tag}:{i}:".encode().ljust(32, b".")
    return (stamp + blocks[i % len(blocks)][32:size])[:size]


def start_agent(work: Path, store: ObjectStore, prefix: str, *, concurrency: int = 8, write_mode: str = "through",
                **overrides: object) -> AgentProc:
    """Our agent with production timeouts and warning-level logs, serving FTP and SFTP."""
    work.mkdir(parents=True, exist_ok=True)
    settings = {"cache.max_bytes": "20GB", "cache.min_free_bytes": "500MB", "uplink.write_mode": write_mode,
                "uplink.max_concurrency": concurrency, "uplink.read_timeout": 60.0, "uplink.through_timeout": 60.0,
                "uplink.connect_timeout": 5.0, "log.level": "warning", **overrides}
    return AgentProc(work, store, prefix, settings, [{"name": USER, "password": PASSWORD, "root": "/"}],
                     bucket=BUCKET).start(timeout=120)


def cpus(value: str) -> list[int] | None:
    """--agent-cpus '0,1' → [0, 1]; '' → None (the agent runs wherever the kernel puts it)."""
    return [int(c) for c in value.split(",")] if value else None


def pin_agent(agent: AgentProc, workers: int, cpu_list: list[int] | None) -> None:
    """Wait until the agent's serving workers ([server] workers) listen, then pin the whole agent (owner and
    workers; a restarted worker inherits the owner's CPUs) to cpu_list, like `taskset -c` would."""
    pids = agent.workdir / "cache" / "workers"
    deadline = time.monotonic() + 60
    while workers > 1 and len(list(pids.glob("*.pid"))) < workers - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers - 1} workers did not start")
        time.sleep(0.1)
    if cpu_list is not None:
        owner = psutil.Process(agent.proc.pid)
        for p in [owner, *owner.children(recursive=True)]:
            p.cpu_affinity(cpu_list)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live children (the agent's workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def start_rclone(protocol: str, work: Path, store: ObjectStore, prefix: str, *, cache_mode: str,
                 transfers: int = 8) -> RcloneServe:
    """`rclone serve <protocol>` over BUCKET/prefix with the given VFS cache mode."""
    path = f"{BUCKET}/{prefix.rstrip('/')}" if prefix else BUCKET
    return RcloneServe(protocol, store, path, work, USER, PASSWORD, cache_mode=cache_mode,
                       transfers=transfers).start()


def ftp_login(port: int) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=300)
    ftp.connect("127.0.0.1", port)
    ftp.login(USER, PASSWORD)
    ftp.voidcmd("TYPE I")
    return ftp


def retr(ftp: ftplib.FTP, path: str) -> tuple[float, int]:
    """RETR /path, reading and dropping the bytes → (seconds from the command to the first byte, bytes read)."""
    t0 = time.perf_counter()
    conn = ftp.transfercmd(f"RETR /{path}")
    first, total = 0.0, 0
    while data := conn.recv(1 << 16):
        first = first or time.perf_counter() - t0
        total += len(data)
    conn.close()
    ftp.voidresp()
    return first, total


def count_keys(store: ObjectStore, prefix: str) -> int:
    client, count = store.client(), 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        count += page.get("KeyCount", 0)
    return count


def wait_keys(store: ObjectStore, prefix: str, n: int, timeout: float = 1800) -> float:
    """→ perf_counter time of the first listing that shows n objects under prefix (polled back to back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.perf_counter()
        if count_keys(store, prefix) >= n:
            return asked
        time.sleep(0.1)
    raise TimeoutError(f"{prefix}: not all {n} objects in S3 after {timeout}s")


def table(rows: list[dict], cols: list[str]) -> str:
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:>{width[c]}}" for c in cols)]
    lines += ["  ".join(f"{r.get(c, '')!s:>{width[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)
