#!/usr/bin/env python3
"""Read benchmark: cold (from S3) and cached reads over FTP at 1, 8 and 32 concurrent readers, ours vs rclone.

    .venv/bin/python bench/read.py [--files 128 --size 1048576 --readers 1,8,32]

Starts a loopback SeaweedFS and puts --files objects of --size bytes per reader count (a fresh set each,
so every cold pass is really cold). Per reader count and target (our agent; `rclone serve ftp
--vfs-cache-mode full`, both over the same objects), it lists the directory first (untimed: both then
know the files), reads every file once (cold: fetched from S3) and once more (cached: from the local
SSD cache), the files split over the readers, each reader its own FTP session. Printed: MB/s and files/s
over the pass, first-byte latency p50/p99 (PASV sent → first data byte, as ftplib's transfercmd; `phases_ms`
splits its p50 and the rest of a transfer: PASV → 227, connect, RETR → 150, 150 → first byte, first → last
byte, last byte → 226, each a median over the pass), the server's CPU time per file
(user + system: on a shared, loaded machine the steadier figure) and per MB, its CPUs busy (CPU seconds per
second of the pass: below the CPUs it may use, something else set the pace), the load average, and the ratios
ours/rclone.
"""

from __future__ import annotations

import argparse
import ftplib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import (
    BUCKET,
    content,
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
)
from tests.devstack import ObjectStore


def names(readers: int, files: int) -> list[str]:
    return [f"r{readers}/CT/2026-11-23/1.2.840.7/1/{i:05d}.dcm" for i in range(files)]


def put_all(store: ObjectStore, keys: list[str], size: int, blocks: list[bytes]) -> None:
    client = store.client()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=keys[i], Body=content("read", i, size, blocks))

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put, range(len(keys))))


PHASES = ("PASV→227", "connect", "RETR→150", "150→first", "first→last", "last→226")


def timed_retr(ftp: ftplib.FTP, path: str) -> tuple[float, int, list[float]]:
    """RETR /path as ftplib's transfercmd does it (PASV, connect, RETR, 150), reading and dropping the bytes
    → (seconds from the PASV to the first data byte, bytes read, seconds of each of PHASES)."""
    t0 = time.perf_counter()
    host, port = ftplib.parse227(ftp.sendcmd("PASV"))
    t1 = time.perf_counter()
    conn = socket.create_connection((host, port), 300)
    t2 = time.perf_counter()
    ftp.putcmd(f"RETR /{path}")
    if not (reply := ftp.getresp()).startswith("1"):
        raise ftplib.error_reply(reply)
    t3 = first = time.perf_counter()
    total = 0
    while data := conn.recv(1 << 16):
        if not total:
            first = time.perf_counter()
        total += len(data)
    t4 = time.perf_counter()
    conn.close()
    ftp.voidresp()
    t5 = time.perf_counter()
    return first - t0, total, [t1 - t0, t2 - t1, t3 - t2, first - t3, t4 - first, t5 - t4]


def read_pass(port: int, pid: int, paths: list[str], readers: int, size: int) -> dict:
    """Every path read once, split over `readers` FTP sessions → MB/s, files/s, first-byte p50/p99 and the
    server's CPU time per file (its own work, less sensitive than wall time to a loaded machine)."""
    firsts: list[float] = []
    phases: list[list[float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    sessions = [ftp_login(port) for _ in range(readers)]

    def reader(k: int) -> None:
        for path in paths[k::readers]:
            first, got, split = timed_retr(sessions[k], path)
            with lock:
                firsts.append(first)
                phases.append(split)
                if got != size:
                    errors.append(f"{path}: {got} bytes")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    at, t0, cpu0 = load(), time.perf_counter(), tree_cpu_seconds(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(pid) - cpu0
    for s in sessions:
        s.quit()
    return {"MB_per_s": round(len(firsts) * size / wall / 1e6, 1), "files_per_s": round(len(firsts) / wall, 1),
            "first_byte_p50_ms": pct(firsts, 0.5), "first_byte_p99_ms": pct(firsts, 0.99),
            "cpu_ms_per_file": round(cpu * 1000 / max(1, len(firsts)), 2),
            "cpu_ms_per_MB": round(cpu * 1000 / max(1e-9, len(firsts) * size / 1e6), 2),
            "cpus_busy": round(cpu / wall, 2),  # the server's CPU seconds per second: below its CPUs = not CPU-bound
            "errors": len(errors) + len(paths) - len(firsts), "load": at,
            "phases_ms": " / ".join(f"{statistics.median(p) * 1000:.3f}" for p in zip(*phases, strict=True))}


def measure(port: int, pid: int, keys: list[str], readers: int, size: int) -> list[dict]:
    ftp = ftp_login(port)
    ftp.retrlines(f"LIST /{keys[0].rsplit('/', 1)[0]}", lambda _: None)  # both now know the files
    ftp.quit()
    return [{"pass": label, **read_pass(port, pid, keys, readers, size)} for label in ("cold", "cached")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=128, help="files per reader count (default 128)")
    ap.add_argument("--size", type=int, default=2**20, help="bytes per file (default 1 MiB)")
    ap.add_argument("--readers", default="1,8,32")
    ap.add_argument("--targets", default="pacsgw,rclone")
    ap.add_argument("--workers", type=int, default=1, help="our agent's [server] workers (default 1)")
    ap.add_argument("--agent-cpus", default="", help="pin our agent (and its workers) to these CPUs, e.g. 0,1")
    args = ap.parse_args()
    levels = [int(r) for r in args.readers.split(",")]
    targets = args.targets.split(",")

    work = Path(tempfile.mkdtemp(prefix="pacsgw-read-"))
    store = ObjectStore("seaweedfs", work / "s3")
    servers: list = []
    try:
        store.start()
        store.create_bucket(BUCKET)
        blocks = pool(args.size)
        for r in levels:
            put_all(store, ["read/" + k for k in names(r, args.files)], args.size, blocks)
        concurrency = max(8, max(levels))
        print(f"read bench: {args.files} files x {args.size} B per reader count, readers {levels}, FTP, "
              f"pacsgw (workers {args.workers}, CPUs {args.agent_cpus or 'any'}) vs rclone --vfs-cache-mode full "
              f"(--transfers {concurrency}), SeaweedFS, load {load()}",
              flush=True)
        rows: list[dict] = []
        for target in targets:
            if target == "pacsgw":
                server = start_agent(work / target, store, "read/", concurrency=concurrency,
                                     **{"server.workers": args.workers})
                pin_agent(server, args.workers, cpus(args.agent_cpus))
                port = server.ftp_port
            else:
                server = start_rclone("ftp", work / target, store, "read", cache_mode="full", transfers=concurrency)
                port = server.port
            servers.append(server)
            for r in levels:
                for row in measure(port, server.proc.pid, names(r, args.files), r, args.size):
                    rows.append({"target": target, "readers": r, **row})
                    print(json.dumps(rows[-1]), flush=True)
            server.stop()
        if len(targets) == 2:
            ours = {(x["readers"], x["pass"]): x for x in rows if x["target"] == targets[0]}
            for x in [x for x in rows if x["target"] == targets[1]]:
                o = ours[(x["readers"], x["pass"])]
                label = "ours/rclone" if targets[0] == "pacsgw" else "rclone/ours"  # first target over second
                rows.append({"target": label, "readers": x["readers"], "pass": x["pass"],
                             **{c: ratio(o[c], x[c]) for c in ("MB_per_s", "files_per_s", "first_byte_p50_ms",
                                                               "first_byte_p99_ms", "cpu_ms_per_file")}})
        print()
        print(table(rows, ["target", "readers", "pass", "MB_per_s", "files_per_s", "first_byte_p50_ms",
                           "first_byte_p99_ms", "cpu_ms_per_file", "cpu_ms_per_MB", "cpus_busy", "errors", "load"]))
        print(f"\nphases_ms, medians: {' / '.join(PHASES)}")
        print(table([x for x in rows if "phases_ms" in x], ["target", "readers", "pass", "phases_ms"]))
        return 1 if any(x.get("errors") for x in rows) else 0
    finally:
        for server in servers:
            server.stop()
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
