#!/usr/bin/env python3
"""zstd on the line (`[uplink] compress = "zstd"`): the ratio and CPU on real DICOM, and time-to-S3 on a
10 MB/s line with and without it.

    .venv/bin/python bench/dicom_compress.py [--slices 100 --rate 10MB --senders 1,4 --listed 1000 --skip-line]

Codec: every file of pydicom's bundled test data whose transfer syntax the agent compresses (uncompressed
Implicit/Explicit VR), and generated 512x512 CT and 256x256 MR series (bench/dicomgen.py: a body phantom with
Gaussian noise), at zstd levels 1, 3 (the agent's) and 9: ratio, compression and decompression MB/s on one
core (process CPU time). Line: two agents against a loopback SeaweedFS with `uplink.bwlimit` = rate, one
with compress off and one with zstd; the CT series is stored over FTP (write-through: each 226 waits for S3)
by 1 or more concurrent sessions (a PACS's associations) and timed from the first STOR until the queue is
drained, with the agent's CPU seconds. Listing: what a replacement box's first listing of a directory of
`listed` objects costs (one HEAD per object it does not know, for the logical size; any box, whatever its
`compress`) against a box that knows them all by ETag (the listing alone). Everything it starts is stopped and
its directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import psutil
import pydicom
import zstandard

from agent.config import load as load_config
from agent.dicom.header import parse
from agent.uplink.encoding import worth_compressing
from agent.uplink.s3 import S3Uplink
from bench.common import BUCKET, PASSWORD, USER, ftp_login, load, start_agent, table
from bench.dicomgen import series
from tests.devstack import AgentProc, ObjectStore


def pydicom_files() -> list[bytes]:
    """pydicom's bundled test files the agent would compress (no download: the files in the wheel)."""
    out = []
    for p in sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm")):
        data = p.read_bytes()
        if worth_compressing(parse(data[:256 * 1024], whole=len(data) <= 256 * 1024).transfer_syntax):
            out.append(data)
    return out


def codec(name: str, files: list[bytes], level: int) -> dict:
    cctx, dctx = zstandard.ZstdCompressor(level=level, write_checksum=True), zstandard.ZstdDecompressor()
    total = sum(map(len, files))
    t0 = time.process_time()
    packed = [cctx.compress(f) for f in files]
    t1 = time.process_time()
    for p in packed:
        dctx.decompress(p)
    t2 = time.process_time()
    return {"set": name, "files": len(files), "MB": round(total / 1e6, 1), "level": level,
            "ratio": round(total / sum(map(len, packed)), 2),
            "compress_MB_s": round(total / 1e6 / max(t1 - t0, 1e-9)),
            "decompress_MB_s": round(total / 1e6 / max(t2 - t1, 1e-9)), "load": load()}


def line(work: Path, store: ObjectStore, files: list[bytes], rate: str, compress: str, senders: int) -> dict:
    agent = start_agent(work / f"{compress}-{senders}", store, f"compress-{compress}-{time.time_ns()}/",
                        **{"uplink.bwlimit": rate, "uplink.compress": compress})

    def send(k: int) -> None:
        f = ftp_login(agent.ftp_port)
        for i in range(k, len(files), senders):
            f.storbinary(f"STOR ct{i:04d}.dcm", io.BytesIO(files[i]))
        f.quit()

    try:
        proc = psutil.Process(agent.proc.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.monotonic()
        with ThreadPoolExecutor(senders) as ex:
            list(ex.map(send, range(senders)))
        agent.wait_drained(timeout=3600)
        seconds = time.monotonic() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
    finally:
        agent.stop()
    sent = sum(o["Size"] for page in store.client().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=agent.prefix) for o in page.get("Contents", []))
    total = sum(map(len, files))
    return {"compress": compress, "rate": rate, "senders": senders, "files": len(files), "MB": round(total / 1e6, 1),
            "MB_sent": round(sent / 1e6, 1), "seconds_to_s3": round(seconds, 2),
            "agent_cpu_s": round(cpu, 2), "load": load()}


def listing(work: Path, store: ObjectStore, n: int) -> list[dict]:
    """Seconds for a first listing of a directory of n objects by a box that knows them all by ETag, and by a
    box that knows none of them (a HEAD each)."""
    client = store.client()
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"list/CT/{i}.dcm", Body=b"x" * 100,
                                                Metadata={"pacsgw-encoding": "zstd", "pacsgw-size": "200"}),
                    range(n)))
    (work / "list").mkdir()
    cfg = load_config(AgentProc(work / "list", store, "list/", {}, [{"name": USER, "password": PASSWORD,
                                                                     "root": "/"}], bucket=BUCKET).config_path)
    rows = []
    async def all_known(objects: list[tuple[str, str | None]]) -> dict[str, int]:
        return {path: 200 for path, _ in objects}

    for known in ("all", "none"):
        async def run(known: str = known) -> tuple[float, int]:
            s3 = S3Uplink(cfg.uplink)
            s3.known_sizes = all_known if known == "all" else None
            await s3.start()
            try:
                t0 = time.monotonic()
                got = await s3.list_dir("CT")
                return time.monotonic() - t0, sum(o.size for o in got.objects)
            finally:
                await s3.close()
        seconds, size = asyncio.run(run())
        rows.append({"known_by_etag": known, "objects": n, "listed_bytes": size, "seconds": round(seconds, 3),
                     "ms_per_object": round(seconds * 1000 / n, 3), "load": load()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100, help="slices of the CT series (512x512, 513 KB each)")
    ap.add_argument("--rate", default="10MB", help="the line's rate (uplink.bwlimit)")
    ap.add_argument("--senders", default="1,4", help="concurrent FTP sessions, comma-separated runs")
    ap.add_argument("--listed", type=int, default=1000, help="objects in the directory of the listing test")
    ap.add_argument("--skip-line", action="store_true", help="the codec figures only (no servers)")
    args = ap.parse_args()
    rng = np.random.default_rng(11)
    ct = series(rng, args.slices, rows=512, cols=512)
    sets = {"pydicom test files": pydicom_files(), "CT 512x512": ct,
            "MR 256x256": series(rng, max(args.slices, 4) * 4, modality="MR", rows=256, cols=256)}
    print(table([codec(n, fs, lv) for n, fs in sets.items() for lv in (1, 3, 9)],
                ["set", "files", "MB", "level", "ratio", "compress_MB_s", "decompress_MB_s", "load"]))
    if args.skip_line:
        return
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    store = ObjectStore("seaweedfs", work / "s3").start()
    try:
        store.create_bucket(BUCKET)
        print(table(listing(work, store, args.listed),
                    ["known_by_etag", "objects", "listed_bytes", "seconds", "ms_per_object", "load"]))
        rows = [line(work, store, ct, args.rate, c, int(n)) for n in args.senders.split(",") for c in ("off", "zstd")]
        print(table(rows, ["compress", "rate", "senders", "files", "MB", "MB_sent", "seconds_to_s3", "agent_cpu_s",
                           "load"]))
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    assert USER and PASSWORD  # the benchmark's user exists only in the agents it starts
    main()
