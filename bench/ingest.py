#!/usr/bin/env python3
"""Ingest benchmark: N files over FTP, SFTP and SMB with C concurrent clients into a real agent.

    python bench/ingest.py [--files 2000 --size 524288 --clients 8 --write-mode through|back]
                           [--protocols ftp,sftp,smb] [--smb-big-mb 256] [--smb-encryption desired]

Starts its own loopback SeaweedFS (`weed mini`) and a `pacsgw run` process in a temporary directory,
stores N files per protocol (each client its own FTP session / SSH connection), and prints per
protocol: files/s, MB/s, close-to-ack latency p50/p99 (FTP: data connection closed → 226; SFTP:
CLOSE sent → status OK) and the time until the last object was in S3 (queue empty and every key
listed). With --verify it also reads every object back and checks its SHA-256.
SMB (as root, with samba and fuse3; the default then) runs bench/ingest_smb.py's run_smb_bench with the same
files, size and clients: smbd over the agent's FUSE view (write-through and write-back, its own agents) and
smbd over a plain directory on the same disk, which gives the FUSE overhead as a ratio (plain ÷ agent).
Everything it starts is stopped and its directory removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import ftplib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncssh  # noqa: E402

from agent.devstack import ObjectStore, free_port  # noqa: E402

BUCKET = "bench"
USER, PASSWORD = "pacs", "bench-only-password"  # exists only in the agent this script starts


@dataclass
class Run:
    protocol: str
    files: int
    size: int
    started: float = 0.0
    finished: float = 0.0
    in_s3: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)

    def report(self) -> dict:
        wall = self.finished - self.started
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

        return {
            "protocol": self.protocol, "files": len(lat), "errors": len(self.errors),
            "seconds": round(wall, 2), "files_per_s": round(len(lat) / wall, 1),
            "MB_per_s": round(len(lat) * self.size / wall / 1e6, 1),
            "ack_p50_ms": round(pct(0.50), 1), "ack_p99_ms": round(pct(0.99), 1),
            "ack_mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else float("nan"),
            "all_in_s3_s": round(self.in_s3 - self.started, 2),
            "all_in_s3_after_last_ack_s": round(self.in_s3 - self.finished, 2),
        }


def content(protocol: str, i: int, size: int, pool: list[bytes]) -> bytes:
    """Unique bytes per file without generating N × size random bytes: a random block, stamped."""
    stamp = f"{protocol}:{i}:".encode().ljust(32, b".")
    return stamp + pool[i % len(pool)][32:size]


def key_of(protocol: str, i: int) -> str:
    # CT/<day>/<study>/<series>/<instance>.dcm, 100 instances per study, 20 per series
    return f"{protocol}/CT/2026-11-23/1.2.840.{i // 100}/{(i // 20) % 5}/{i}.dcm"


# --- clients ------------------------------------------------------------------------------------------


def ftp_client(port: int, idx: list[int], run: Run, size: int, pool: list[bytes]) -> None:
    ftp = ftplib.FTP(timeout=120)
    ftp.connect("127.0.0.1", port)
    ftp.login(USER, PASSWORD)
    ftp.voidcmd("TYPE I")
    for i in idx:
        data = content("ftp", i, size, pool)
        try:
            conn, _ = ftp.ntransfercmd(f"STOR {key_of('ftp', i)}")
            conn.sendall(data)
            conn.close()
            t0 = time.perf_counter()
            ftp.voidresp()
            run.ack(time.perf_counter() - t0)
        except (OSError, ftplib.Error, EOFError) as e:
            run.errors.append(f"{i}: {e}")
    ftp.quit()


async def sftp_clients(port: int, shards: list[list[int]], run: Run, size: int, pool: list[bytes]) -> None:
    async def one(idx: list[int]) -> None:
        async with asyncssh.connect("127.0.0.1", port, username=USER, password=PASSWORD, known_hosts=None,
                                    client_keys=None, agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                for i in idx:
                    key = key_of("sftp", i)
                    data = content("sftp", i, size, pool)
                    try:
                        f = await sftp.open("/" + key, "wb")
                        await f.write(data)
                        t0 = time.perf_counter()
                        await f.close()
                        run.ack(time.perf_counter() - t0)
                    except (OSError, asyncssh.Error) as e:
                        run.errors.append(f"{i}: {e}")

    await asyncio.gather(*(one(s) for s in shards))


# --- the agent -------------------------------------------------------------------------------------------


def write_config(work: Path, store: ObjectStore, ports: dict, write_mode: str, clients: int) -> Path:
    lo = 20000 + (os.getpid() * 13) % 20000
    cfg = f"""
[cache]
dir = "{work / 'cache'}"
max_bytes = "20GB"
min_free_bytes = "500MB"

[uplink]
endpoint_url = "{store.endpoint_url}"
bucket = "{BUCKET}"
prefix = "bench/"
access_key_id = "{store.access_key}"
secret_access_key = "{store.secret_key}"
write_mode = "{write_mode}"
max_concurrency = {max(8, clients)}

[ftp]
listen = "127.0.0.1:{ports['ftp']}"
passive_ports = "{lo}-{lo + clients + 16}"

[sftp]
listen = "127.0.0.1:{ports['sftp']}"
host_key = "{work / 'host_key'}"

[http]
listen = "127.0.0.1:{ports['http']}"

[log]
level = "warning"
format = "json"

[[users]]
name = "{USER}"
password = "{PASSWORD}"
root = "/"
"""
    path = work / "agent.toml"
    path.write_text(cfg)
    path.chmod(0o600)
    return path


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def wait_in_s3(store: ObjectStore, http_port: int, prefix: str, n: int, timeout: float = 900) -> float:
    """→ when the agent's queue was first seen empty with all n keys listed under prefix in S3.

    The time is when the /healthz request that first answers queue_depth 0 was sent (polled every 50 ms;
    on a loaded box one request can take a second); the listing that follows only confirms it.
    """
    client = store.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.perf_counter()
        if health(http_port)["queue_depth"] == 0:
            seen = asked
            count = 0
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
                count += page.get("KeyCount", 0)
            if count >= n:
                return seen
        time.sleep(0.05)
    raise TimeoutError(f"{prefix}: not all {n} objects in S3 after {timeout}s")


def verify(store: ObjectStore, protocol: str, n: int, size: int, pool: list[bytes]) -> int:
    client, bad = store.client(), 0
    for i in range(n):
        body = client.get_object(Bucket=BUCKET, Key="bench/" + key_of(protocol, i))["Body"].read()
        bad += hashlib.sha256(body).digest() != hashlib.sha256(content(protocol, i, size, pool)).digest()
    return bad


def smb_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """SMB with the same files, size and clients: rows for the agent (args.write_mode, then the other write
    mode) and plain Samba, and the FUSE overhead ratios (how many times faster Samba over a plain directory is)."""
    from ingest_smb import run_smb_bench
    r = run_smb_bench(args.files, args.size, args.clients, args.smb_big_mb * 1024 * 1024, args.smb_encryption)
    other = "back" if args.write_mode == "through" else "through"
    rows = []
    for name, key in (("smb", f"agent_{args.write_mode}"), (f"smb-{other}", f"agent_{other}"), ("smb-plain", "plain")):
        x = r[key]
        rows.append({"protocol": name, "files": x["files"], "errors": 0, "seconds": x["seconds"],
                     "files_per_s": x["files_per_s"], "MB_per_s": x["MB_per_s"], "big_MB_per_s": x["big_MB_per_s"]})
    return rows, r["fuse_overhead"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="files per protocol (default 2000)")
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per file (default 524288)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients per protocol (default 8)")
    ap.add_argument("--protocols", default="ftp,sftp,smb" if os.geteuid() == 0 else "ftp,sftp",
                    help="default ftp,sftp,smb as root (SMB needs root, samba, fuse3), else ftp,sftp")
    ap.add_argument("--smb-big-mb", type=int, default=256, help="MiB of the single large SMB file (default 256)")
    ap.add_argument("--smb-encryption", choices=["required", "desired", "off"], default="desired")
    ap.add_argument("--write-mode", choices=["through", "back"], default="through")
    ap.add_argument("--verify", action="store_true", help="read every object back and check its SHA-256")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pacsgw-bench-"))
    store = ObjectStore("seaweedfs", work / "s3")
    agent: subprocess.Popen | None = None
    rng = __import__("random").Random(7)
    pool = [rng.randbytes(args.size) for _ in range(16)]
    try:
        store.start()
        store.create_bucket(BUCKET)
        ports = {"ftp": free_port(), "sftp": free_port(), "http": free_port()}
        config = write_config(work, store, ports, args.write_mode, args.clients)
        with open(work / "agent.log", "ab") as log:
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                health(ports["http"])
                break
            except OSError as e:
                if agent.poll() is not None:
                    raise RuntimeError((work / "agent.log").read_text()[-2000:]) from e
                time.sleep(0.1)

        cpu = os.cpu_count()
        print(f"pacsgw ingest bench: {args.files} files x {args.size} B per protocol, {args.clients} clients, "
              f"write-{args.write_mode}, SeaweedFS on loopback, {cpu} CPUs (clients, agent and S3 share them)",
              flush=True)
        runs = []
        protocols = args.protocols.split(",")
        for protocol in [p for p in protocols if p != "smb"]:
            run = Run(protocol, args.files, args.size)
            shards = [list(range(c, args.files, args.clients)) for c in range(args.clients)]
            run.started = time.perf_counter()
            if protocol == "ftp":
                threads = [threading.Thread(target=ftp_client, args=(ports["ftp"], s, run, args.size, pool))
                           for s in shards]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            elif protocol == "sftp":
                asyncio.run(sftp_clients(ports["sftp"], shards, run, args.size, pool))
            else:
                raise SystemExit(f"unknown protocol {protocol!r}")
            run.finished = time.perf_counter()
            run.in_s3 = wait_in_s3(store, ports["http"], f"bench/{protocol}/", args.files)
            r = run.report()
            if args.verify:
                r["bad_checksums"] = verify(store, protocol, args.files, args.size, pool)
            runs.append(r)
            print(json.dumps(r), flush=True)
            for e in run.errors[:5]:
                print("  error:", e, flush=True)
        overhead = None
        if "smb" in protocols:
            smb, overhead = smb_rows(args)
            for r in smb:
                print(json.dumps(r), flush=True)
            runs += smb

        cols = ["protocol", "files", "errors", "seconds", "files_per_s", "MB_per_s", "ack_p50_ms", "ack_p99_ms",
                "all_in_s3_s", "all_in_s3_after_last_ack_s"] + (["bad_checksums"] if args.verify else [])
        print()
        print("  ".join(f"{c:>12}" for c in cols))
        for r in runs:
            print("  ".join(f"{r.get(c, '-')!s:>12}" for c in cols))
        if overhead is not None:
            print(f"\nSMB big file ({args.smb_big_mb} MiB), MB/s: " + ", ".join(f"{r['protocol']} {r['big_MB_per_s']}"
                                                                          for r in runs[-3:]))
            o = overhead
            print(f"FUSE overhead (plain / agent, x times): small files write-back x{o['small_files_back']}, "
                  f"write-through x{o['small_files_through']}; big file write-back x{o['big_file_back']}, "
                  f"write-through x{o['big_file_through']}")
        return 1 if any(r["errors"] or r.get("bad_checksums") for r in runs) else 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        store.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
