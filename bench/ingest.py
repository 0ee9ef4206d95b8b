#!/usr/bin/env python3
"""Ingest benchmark: N files over FTP and SFTP with C concurrent clients into our agent and into rclone.

    .venv/bin/python bench/ingest.py [--files 2000 --size 524288 --clients 8 --write-mode through|back]

Starts a loopback SeaweedFS (`weed mini`), our agent (`pacsgw run`) and, per protocol, the reference peer
`rclone serve ftp|sftp --vfs-cache-mode writes` over the same bucket (each under its own key prefix).
The directory tree is created first (untimed: rclone does not create parents on upload); then each
target gets the same N files from C clients (each client its own FTP session / SSH connection).
Printed per protocol and target: files/s, MB/s, close-to-ack latency p50/p99 (FTP: data connection
closed → 226; SFTP: CLOSE sent → status OK), the time until the last object is listed in S3, the CPU per file
of the server and of SeaweedFS (which shares the cores), the load average, and the ratio ours/rclone. Our agent
acknowledges after S3 confirmed the object (write-through, the default); rclone acknowledges once the file is in
its local cache and uploads after --vfs-write-back (5 s by default), which is what "all in S3" shows.
SMB (as root, with samba and fuse3; in --protocols by default then) runs bench/ingest_smb.py's run_smb_bench
with the same files, size and clients: smbd over the agent's FUSE view (write-through and write-back, its own
agents) and smbd over a plain directory on the same disk, which gives the FUSE overhead as a ratio (plain ÷ agent).
With --dicom every file is a real DICOM CT slice (bench/dicomgen.py: 512x512, 16-bit, noise; --size is then the
slice's size) and target `pacsgw-nometa` is our agent with [dicom] metadata = false: `--dicom --targets
pacsgw,pacsgw-nometa` gives the cost of the header parse, metadata and tags as the ratio of the two.
--rounds R interleaves the targets: every target's server runs throughout, each gets --warmup untimed files
first, then R short alternating rounds of files/R each (the order swapped every round), so machine noise
and drift hit both alike. Printed then: each round's rows, and per target the median files/s and agent CPU
per file over the rounds, and the median of the rounds' ratios (first target ÷ second). The issue-17 figure:
    .venv/bin/python bench/ingest.py --dicom --protocols ftp,sftp --targets pacsgw,pacsgw-nometa \
        --files 2000 --rounds 20 --warmup 50
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
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncssh

from bench.common import (
    BUCKET,
    PASSWORD,
    USER,
    content,
    count_keys,
    cpus,
    ftp_login,
    load,
    pct,
    pin_agent,
    pool,
    ratio,
    start_agent,
    start_rclone,
    table,
    tree_cpu_seconds,
    wait_keys,
)
from tests.devstack import ObjectStore


@dataclass
class Run:
    target: str
    protocol: str
    size: int
    started: float = 0.0
    finished: float = 0.0
    in_s3: float = 0.0
    load: str = ""
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)

    def report(self) -> dict:
        wall, n = self.finished - self.started, len(self.latencies)
        return {
            "target": self.target, "protocol": self.protocol, "files": n, "errors": len(self.errors),
            "seconds": round(wall, 2), "files_per_s": round(n / wall, 1),
            "MB_per_s": round(n * self.size / wall / 1e6, 1),
            "ack_p50_ms": pct(self.latencies, 0.50), "ack_p99_ms": pct(self.latencies, 0.99),
            "all_in_s3_s": round(self.in_s3 - self.started, 2), "load": self.load,
        }


def key_of(i: int) -> str:
    # CT/<day>/<study>/<series>/<instance>.dcm, 100 instances per study, 20 per series
    return f"CT/2026-11-23/1.2.840.{i // 100}/{(i // 20) % 5}/{i}.dcm"


def directories(n: int) -> list[str]:
    """Every directory files 0..N-1 need, parents first."""
    dirs: set[str] = set()
    for i in range(0, n, 20):
        parts = key_of(i).split("/")[:-1]
        dirs.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return sorted(dirs)


# --- clients ------------------------------------------------------------------------------------------


def ftp_mkdirs(port: int, dirs: list[str]) -> None:
    ftp = ftp_login(port)
    for d in dirs:
        try:
            ftp.mkd("/" + d)
        except ftplib.error_perm:
            pass  # already there
    ftp.quit()


def ftp_client(port: int, idx: list[int], run: Run, blocks: list[bytes]) -> None:
    ftp = ftp_login(port)
    for i in idx:
        try:
            conn, _ = ftp.ntransfercmd(f"STOR /{key_of(i)}")
            conn.sendall(content(run.protocol, i, run.size, blocks))
            conn.close()
            t0 = time.perf_counter()
            ftp.voidresp()
            run.ack(time.perf_counter() - t0)
        except (OSError, ftplib.Error, EOFError) as e:
            run.errors.append(f"{i}: {e}")
    ftp.quit()


# The SFTP clients' cipher preference (--sftp-ciphers); empty: asyncssh's, chacha20-poly1305 first as OpenSSH's
CLIENT_CIPHERS: list[str] = []


def _ssh(port: int):  # asyncssh's connection context manager
    return asyncssh.connect("127.0.0.1", port, username=USER, password=PASSWORD, known_hosts=None,
                            client_keys=None, agent_path=None, encryption_algs=CLIENT_CIPHERS or ())


async def sftp_mkdirs(port: int, dirs: list[str]) -> None:
    async with _ssh(port) as conn, conn.start_sftp_client() as sftp:
        for d in dirs:
            await sftp.makedirs("/" + d, exist_ok=True)


async def sftp_clients(port: int, shards: list[list[int]], run: Run, blocks: list[bytes], block: int = -1) -> None:
    """block: bytes per WRITE request (-1: the most the server takes; OpenSSH's sftp and most clients send 32 KiB)"""
    async def one(idx: list[int]) -> None:
        async with _ssh(port) as conn, conn.start_sftp_client() as sftp:
            for i in idx:
                try:
                    f = await sftp.open("/" + key_of(i), "wb", block_size=block)
                    await f.write(content(run.protocol, i, run.size, blocks))
                    t0 = time.perf_counter()
                    await f.close()
                    run.ack(time.perf_counter() - t0)
                except (OSError, asyncssh.Error) as e:
                    run.errors.append(f"{i}: {e}")

    await asyncio.gather(*(one(s) for s in shards))


def mkdirs(protocol: str, port: int, files: int) -> None:
    """Create the tree files 0..N-1 need (untimed: rclone does not create parents on upload)."""
    if protocol == "ftp":
        ftp_mkdirs(port, directories(files))
    else:
        asyncio.run(sftp_mkdirs(port, directories(files)))


def ingest(run: Run, port: int, files: range, clients: int, blocks: list[bytes], sftp_block: int = -1) -> None:
    """Store these files (numbers) with C clients; fills run's timings."""
    shards = [list(files[c::clients]) for c in range(clients)]
    run.load, run.started = load(), time.perf_counter()
    if run.protocol == "ftp":
        threads = [threading.Thread(target=ftp_client, args=(port, s, run, blocks)) for s in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        asyncio.run(sftp_clients(port, shards, run, blocks, sftp_block))
    run.finished = time.perf_counter()


def verify(store: ObjectStore, prefix: str, protocol: str, files: int, size: int, blocks: list[bytes]) -> int:
    client, bad = store.client(), 0
    for i in range(files):
        try:
            body = client.get_object(Bucket=BUCKET, Key=prefix + key_of(i))["Body"].read()
        except client.exceptions.NoSuchKey:  # its store failed (the run's errors say why)
            bad += 1
            continue
        bad += hashlib.sha256(body).digest() != hashlib.sha256(content(protocol, i, size, blocks)).digest()
    return bad


def start_target(target: str, protocol: str, args: argparse.Namespace, work: Path, store: ObjectStore,
                 concurrency: int, keyfile: Path | None) -> tuple[object, int]:
    """Our agent (pacsgw, or pacsgw-nometa: [dicom] metadata off) or rclone over BUCKET/<target>-<protocol>/
    → the server and its port for this protocol."""
    prefix = f"{target}-{protocol}/"
    if not target.startswith("pacsgw"):
        peer = start_rclone(protocol, work / prefix, store, prefix, cache_mode="writes", transfers=concurrency)
        return peer, peer.port
    dicom = ({"dicom.metadata": target != "pacsgw-nometa", "dicom.pseudonym_key_file": str(keyfile)}
             if keyfile else {})
    server = start_agent(work / prefix, store, prefix, concurrency=concurrency, write_mode=args.write_mode,
                         **dicom, **{"server.workers": args.workers})
    pin_agent(server, args.workers, cpus(args.agent_cpus))
    return server, server.ftp_port if protocol == "ftp" else server.sftp_port


def store_cpu_seconds(store: ObjectStore) -> float:
    """CPU time of the object store (SeaweedFS shares this machine's cores with the agent and the clients: what a PUT
    costs it is part of the ingest rate here, not on a box whose S3 is remote). It includes wait_keys's listings."""
    assert store._proc is not None
    return tree_cpu_seconds(store._proc.pid)


def measure(server, port: int, store: ObjectStore, run: Run, files: range, blocks: list[bytes], clients: int,
            sftp_block: int = -1) -> dict:
    """Store these files into one target and wait until those stored are in S3 → its row (with the agent's CPU).
    A file whose store failed is not waited for (it was: for wait_keys's 30 minutes, then the whole run failed)."""
    prefix = f"{run.target}-{run.protocol}/"
    before = count_keys(store, prefix)
    cpu0, store0 = tree_cpu_seconds(server.proc.pid), store_cpu_seconds(store)
    ingest(run, port, files, clients, blocks, sftp_block)
    run.in_s3 = wait_keys(store, prefix, before + len(files) - len(run.errors))
    cpu, store_cpu = tree_cpu_seconds(server.proc.pid) - cpu0, store_cpu_seconds(store) - store0
    # CPUs busy: the agent's CPU seconds per second until the last file was in S3 (below the CPUs it may use,
    # the clients, SeaweedFS or the rest of the machine set the pace)
    return run.report() | {"cpu_ms_per_file": round(cpu * 1000 / len(files), 2),
                           "s3_cpu_ms_per_file": round(store_cpu * 1000 / len(files), 2),
                           "cpus_busy": round(cpu / (max(run.finished, run.in_s3) - run.started), 2)}


def protocol_rows(protocol: str, args: argparse.Namespace, work: Path, store: ObjectStore, servers: list,
                  blocks: list[bytes], concurrency: int, keyfile: Path | None) -> list[dict]:
    """Every target's server up, each given --warmup untimed files, then --rounds alternating rounds of
    files/rounds each (the first target first in even rounds). → the rows to tabulate: with one round each
    target's row, else per target the medians over the rounds; then first ÷ second target (the median of the
    rounds' ratios)."""
    targets = args.targets.split(",")
    per = args.files // args.rounds
    timed = per * args.rounds
    up = {}
    for target in targets:
        server, port = start_target(target, protocol, args, work, store, concurrency, keyfile)
        servers.append(server)
        up[target] = server, port
        mkdirs(protocol, port, timed + args.warmup)
        if args.warmup:  # numbered after the timed files: the tree exists, the servers and S3 have started
            measure(server, port, store, Run(target, protocol, args.size), range(timed, timed + args.warmup),
                    blocks, args.clients, args.sftp_block)
    rounds: dict[str, list[dict]] = {t: [] for t in targets}
    for r in range(args.rounds):
        for target in targets if r % 2 == 0 else targets[::-1]:
            server, port = up[target]
            run = Run(target, protocol, args.size)
            row = measure(server, port, store, run, range(r * per, (r + 1) * per), blocks, args.clients,
                          args.sftp_block)
            if args.rounds > 1:
                row["round"] = r
            print(json.dumps(row), flush=True)
            for e in run.errors[:5]:
                print("  error:", e, flush=True)
            rounds[target].append(row)
    for target in targets:
        server, _ = up[target]
        if args.verify:
            rounds[target][-1]["bad_checksums"] = verify(store, f"{target}-{protocol}/", protocol, timed, args.size,
                                                         blocks)
        server.stop()
    rows = [summary(rounds[t]) for t in targets]
    if len(targets) > 1:
        a, b = rounds[targets[0]], rounds[targets[-1]]
        label = "ours/rclone" if targets[-1] == "rclone" else f"{targets[0]}/{targets[-1]}"
        each = [ratio(x["files_per_s"], y["files_per_s"]) for x, y in zip(a, b, strict=True)]
        first, last = rows[0], rows[-1]
        rows.append({"target": label, "protocol": protocol, "rounds": len(each),
                     **{c: ratio(first[c], last[c]) for c in ("MB_per_s", "ack_p50_ms", "ack_p99_ms",
                                                                    "all_in_s3_s", "cpu_ms_per_file")},
                     "files_per_s": round(statistics.median(each), 2)})
        if args.rounds > 1:
            print(f"{protocol} {label} files/s per round: {each}; median {rows[-1]['files_per_s']}; agent CPU ms per "
                  f"file, median of the rounds: {first['target']} {first['cpu_ms_per_file']}, "
                  f"{last['target']} {last['cpu_ms_per_file']}", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """One target's row over its rounds: files and errors summed, every other figure the median."""
    if len(rows) == 1:
        return rows[0]
    out = {k: round(statistics.median(r[k] for r in rows), 2) for k, v in rows[0].items()
           if isinstance(v, (int, float)) and k != "round"}
    return out | {"target": rows[0]["target"], "protocol": rows[0]["protocol"], "rounds": len(rows),
                  "files": sum(r["files"] for r in rows), "errors": sum(r["errors"] for r in rows),
                  "bad_checksums": sum(r.get("bad_checksums", 0) for r in rows),
                  "load": f"{min((r['load'] for r in rows), key=float)}-{max((r['load'] for r in rows), key=float)}"}


def smb_rows(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """SMB with the same files, size and clients: rows for the agent (args.write_mode, then the other write
    mode) and plain Samba, and the FUSE overhead ratios (how many times faster Samba over a plain directory is)."""
    from ingest_smb import run_smb_bench
    r = run_smb_bench(args.files, args.size, args.clients, args.smb_big_mb * 1024 * 1024, args.smb_encryption)
    other = "back" if args.write_mode == "through" else "through"
    rows = []
    for target, key in ((f"pacsgw-{args.write_mode}", f"agent_{args.write_mode}"),
                        (f"pacsgw-{other}", f"agent_{other}"), ("samba-plain-dir", "plain")):
        x = r[key]
        rows.append({"target": target, "protocol": "smb", "files": x["files"], "errors": 0, "seconds": x["seconds"],
                     "files_per_s": x["files_per_s"], "MB_per_s": x["MB_per_s"], "big_MB_per_s": x["big_MB_per_s"],
                     "load": load()})
    return rows, r["fuse_overhead"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="files per protocol and target (default 2000)")
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per file (default 524288)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--protocols", default="ftp,sftp,smb" if os.geteuid() == 0 else "ftp,sftp",
                    help="default ftp,sftp,smb as root (SMB needs root, samba, fuse3), else ftp,sftp")
    ap.add_argument("--smb-big-mb", type=int, default=256, help="MiB of the single large SMB file (default 256)")
    ap.add_argument("--smb-encryption", choices=["required", "desired", "off"], default="desired")
    ap.add_argument("--targets", default="pacsgw,rclone")
    ap.add_argument("--write-mode", choices=["through", "back"], default="through", help="our agent's mode")
    ap.add_argument("--verify", action="store_true", help="read every object back and check its SHA-256")
    ap.add_argument("--dicom", action="store_true", help="real DICOM CT slices instead of random bytes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--workers", type=int, default=1, help="our agent's [server] workers (default 1)")
    ap.add_argument("--agent-cpus", default="", help="pin our agent (and its workers) to these CPUs, e.g. 0,1")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of files/rounds per target (default 1)")
    ap.add_argument("--sftp-block", type=int, default=-1,
                    help="bytes per SFTP WRITE (default: the most the server takes; OpenSSH's sftp sends 32768)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed files per target before the rounds (default 0)")
    ap.add_argument("--sftp-ciphers", default="",
                    help="the SFTP clients' ciphers, preferred first: aes128-gcm@openssh.com,... (default asyncssh's)")
    args = ap.parse_args()
    CLIENT_CIPHERS[:] = [c for c in args.sftp_ciphers.split(",") if c]
    if not 1 <= args.rounds <= args.files:
        ap.error("--rounds must be 1..--files")

    work = Path(tempfile.mkdtemp(prefix="pacsgw-bench-"))
    store = ObjectStore("seaweedfs", work / "s3")
    if args.dicom:  # the stamp content() puts on each file lands in the 128-byte preamble: still valid DICOM
        import numpy as np
        from dicomgen import series
        blocks = series(np.random.default_rng(17), 16)
        args.size = len(blocks[0])
        keyfile: Path | None = work / "pseudonym.key"
        keyfile.write_text(os.urandom(32).hex())
        keyfile.chmod(0o600)
    else:
        blocks, keyfile = pool(args.size), None
    servers: list = []
    try:
        store.start()
        store.create_bucket(BUCKET)
        concurrency = max(8, args.clients)
        print(f"ingest bench: {args.files} files x {args.size} B per protocol and target, {args.clients} clients, "
              f"pacsgw write-{args.write_mode} (workers {args.workers}, CPUs {args.agent_cpus or 'any'}), "
              f"rclone --vfs-cache-mode writes --transfers {concurrency}, "
              f"SeaweedFS on loopback, load {load()}", flush=True)
        runs: list[dict] = []
        protocols = args.protocols.split(",")
        for protocol in [p for p in protocols if p != "smb"]:
            runs += protocol_rows(protocol, args, work, store, servers, blocks, concurrency, keyfile)
        overhead = None
        if "smb" in protocols:
            smb, overhead = smb_rows(args)
            for r in smb:
                print(json.dumps(r), flush=True)
            runs += smb
        cols = ["target", "protocol", *(["rounds"] if args.rounds > 1 else []), "files", "errors", "seconds",
                "files_per_s", "MB_per_s", "ack_p50_ms", "ack_p99_ms", "all_in_s3_s", "cpu_ms_per_file",
                "s3_cpu_ms_per_file", "cpus_busy", "load"]
        cols += ["bad_checksums"] if args.verify else []
        print()
        print(table(runs, cols))
        if overhead is not None:
            print(f"\nSMB big file ({args.smb_big_mb} MiB), MB/s: " + ", ".join(f"{r['target']} {r['big_MB_per_s']}"
                                                                          for r in runs[-3:]))
            o = overhead
            print(f"FUSE overhead (plain / agent, x times): small files write-back x{o['small_files_back']}, "
                  f"write-through x{o['small_files_through']}; big file write-back x{o['big_file_back']}, "
                  f"write-through x{o['big_file_through']}")
        return 1 if any(r.get("errors") or r.get("bad_checksums") for r in runs) else 0
    finally:
        for server in servers:
            server.stop()
        store.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
