"""SMB ingest benchmark: files/s and MB/s over SMB into the agent, and the FUSE overhead as a ratio.

Three targets, all real smbd on loopback with the same smb.conf settings (SMB3, signing, the same
encryption), driven by smbprotocol clients:
  * agent, write-through — Samba → FUSE → gateway → SSD + verified PUT to SeaweedFS before each CLOSE;
  * agent, write-back    — the same, acknowledged once durable on the SSD (uploads follow);
  * plain                — Samba sharing a plain directory on the same disk (no FUSE, no fsync, no S3).
The FUSE overhead is plain ÷ agent (write-back): how many times faster the bare share is; the
write-through figure adds the S3 round trip to every close.

Needs root, samba, fuse3. `python bench/ingest_smb.py --help`; the lead calls `run_smb_bench(...)` from
bench/ingest.py, which returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import smbclient  # noqa: E402
from smbprotocol.connection import Connection  # noqa: E402

from bench.common import BUCKET, PASSWORD, USER, start_agent  # noqa: E402
from tests.devstack import AgentProc, ObjectStore, free_port, stop_group  # noqa: E402


def _toml(sections: dict, users: list[dict]) -> str:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    for u in users:
        lines.append("[[users]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in u.items()]
    return "\n".join(lines) + "\n"


class _PlainSamba:
    """smbd with the agent's smb.conf settings, sharing a plain directory on the same disk."""

    def __init__(self, work: Path, encryption: str) -> None:
        from agent.config import load
        from agent.serve.smb import _ensure_account, render_conf, unix_account
        self.base = Path(tempfile.mkdtemp(prefix="pacsgw-bench-plain-", dir=str(work)))
        os.chmod(self.base, 0o755)
        os.chmod(work, 0o755)  # the share must be reachable for the SMB users' accounts
        self.port = free_port()
        conf_toml = work / "plain.toml"
        conf_toml.write_text(_toml({
            "cache": {"dir": str(self.base / "unused")},
            "uplink": {"endpoint_url": "http://127.0.0.1:9", "bucket": BUCKET, "access_key_id": "x",
                       "secret_access_key": "y"},
            "smb": {"enabled": True, "listen": f"127.0.0.1:{self.port}", "encryption": encryption,
                    "mountpoint": str(self.base / "unused-fs"), "state_dir": str(self.base / "smb")},
        }, [{"name": USER, "password": PASSWORD}]))
        os.chmod(conf_toml, 0o600)
        cfg = load(conf_toml)
        state = self.base / "smb"
        for d in ("private", "lock", "state", "cache", "run", "log", "roots"):
            (state / d).mkdir(parents=True, exist_ok=True)
        uid, gid = _ensure_account(cfg.smb.unix_user)
        data = self.base / "data"
        data.mkdir()
        os.chown(data, uid, gid)
        os.chmod(data, 0o775)  # like the agent's mount: writable by the group every SMB user's account has
        account = unix_account(USER)
        (state / "roots" / account).symlink_to(data)  # the share's path names the Unix account (%u)
        self.conf = state / "smb.conf"
        self.conf.write_text(render_conf(cfg))
        import grp
        _ensure_account(account, group=grp.getgrgid(gid).gr_name)
        (state / "usermap").write_text(f"{account} = {USER}\n")
        subprocess.run(["smbpasswd", "-c", str(self.conf), "-s", "-a", account],
                       input=f"{PASSWORD}\n{PASSWORD}\n", text=True, check=True, capture_output=True)
        self.proc = subprocess.Popen(["/usr/sbin/smbd", "--foreground", "--no-process-group", "-s", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import socket
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        stop_group(self.proc, 15)
        shutil.rmtree(self.base, ignore_errors=True)


def _kw(port: int) -> dict:
    """smbclient arguments on a fresh connection with its own ClientGUID (one per simulated PACS machine)."""
    conn = Connection(uuid.uuid4(), "127.0.0.1", port, require_signing=True)
    conn.connect(timeout=30)
    return {"port": port, "username": USER, "password": PASSWORD, "connection_cache": {f"127.0.0.1:{port}": conn}}


def _ingest(port: int, files: int, size: int, clients: int, big: int, tag: str) -> dict:
    payload = os.urandom(size)
    errors: list[BaseException] = []
    per = [list(range(c, files, clients)) for c in range(clients)]

    def client(c: int) -> None:
        kw = _kw(port)
        try:
            smbclient.makedirs(rf"\\127.0.0.1\pacs\{tag}\c{c}", exist_ok=True, **kw)
            for i in per[c]:
                with smbclient.open_file(rf"\\127.0.0.1\pacs\{tag}\c{c}\{i}.dcm", mode="wb", **kw) as f:
                    f.write(payload[:-8] + i.to_bytes(8, "big"))
        except BaseException as e:
            errors.append(e)
        finally:
            smbclient.reset_connection_cache(fail_on_error=False, connection_cache=kw["connection_cache"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    small_s = time.monotonic() - t0
    if errors:
        raise errors[0]
    kw = _kw(port)
    block = os.urandom(4 * 1024 * 1024)
    t0 = time.monotonic()
    with smbclient.open_file(rf"\\127.0.0.1\pacs\{tag}\big.dcm", mode="wb", **kw) as f:
        for _ in range(big // len(block)):
            f.write(block)
    big_s = time.monotonic() - t0
    smbclient.reset_connection_cache(fail_on_error=False, connection_cache=kw["connection_cache"])
    return {"files": files, "file_bytes": size, "clients": clients, "seconds": round(small_s, 3),
            "files_per_s": round(files / small_s, 1), "MB_per_s": round(files * size / small_s / 1e6, 1),
            "big_file_MB": big // 1_000_000, "big_seconds": round(big_s, 3),
            "big_MB_per_s": round(big / big_s / 1e6, 1)}


def _agent_run(work: Path, store: ObjectStore, write_mode: str, encryption: str, ingest) -> dict:
    """ingest(port) against the agent serving SMB only, then wait until every file is in S3."""
    port = free_port()
    # The FUSE view and Samba state outside `work`, in a directory every SMB user's account can pass.
    base = Path(tempfile.mkdtemp(prefix="pacsgw-bench-smb-"))
    os.chmod(base, 0o755)
    agent: AgentProc | None = None
    try:
        agent = start_agent(work, store, f"{write_mode}{time.time_ns()}/", write_mode=write_mode,
                            **{"cache.max_bytes": "50GB", "cache.min_free_bytes": "100MB",
                               "ftp.enabled": False, "sftp.enabled": False, "smb.enabled": True,
                               "smb.listen": f"127.0.0.1:{port}", "smb.encryption": encryption,
                               "smb.mountpoint": str(base / "fs"), "smb.state_dir": str(base / "smb")})
        figures = ingest(port)
        agent.wait_drained(timeout=300)
        return figures
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_smb_bench(files: int = 400, size: int = 512 * 1024, clients: int = 4, big: int = 256 * 1024 * 1024,
                  encryption: str = "desired", workdir: str | None = None) -> dict:
    """→ {'agent_through': {...}, 'agent_back': {...}, 'plain': {...}, 'fuse_overhead': {...}}"""
    work = Path(workdir or tempfile.mkdtemp(prefix="pacsgw-bench-"))
    os.chmod(work, 0o755)
    store = ObjectStore("seaweedfs", work / "s3").start()
    out: dict = {}
    try:
        store.create_bucket(BUCKET)
        for mode in ("through", "back"):
            out[f"agent_{mode}"] = _agent_run(work / f"agent-{mode}", store, mode, encryption,
                                              lambda port: _ingest(port, files, size, clients, big, "bench"))
        plain = _PlainSamba(work, encryption)
        try:
            out["plain"] = _ingest(plain.port, files, size, clients, big, "bench")
        finally:
            plain.stop()
    finally:
        store.stop()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    p = out["plain"]
    out["fuse_overhead"] = {
        # how many times the bare share is faster than the agent's share (1.0 = no overhead)
        "small_files_back": round(p["files_per_s"] / out["agent_back"]["files_per_s"], 2),
        "small_files_through": round(p["files_per_s"] / out["agent_through"]["files_per_s"], 2),
        "big_file_back": round(p["big_MB_per_s"] / out["agent_back"]["big_MB_per_s"], 2),
        "big_file_through": round(p["big_MB_per_s"] / out["agent_through"]["big_MB_per_s"], 2),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--size", type=int, default=512 * 1024, help="bytes per small file")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--big-mb", type=int, default=256, help="MiB of the single large file")
    ap.add_argument("--encryption", default="desired", choices=["required", "desired", "off"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = run_smb_bench(a.files, a.size, a.clients, a.big_mb * 1024 * 1024, a.encryption)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"SMB ingest: {a.files} files x {a.size} B over {a.clients} clients, then one {a.big_mb} MiB file "
          f"(encryption {a.encryption})")
    print(f"{'target':<22}{'files/s':>10}{'MB/s':>10}{'big MB/s':>10}")
    for name, label in (("agent_through", "agent write-through"), ("agent_back", "agent write-back"),
                        ("plain", "Samba, plain dir")):
        x = r[name]
        print(f"{label:<22}{x['files_per_s']:>10}{x['MB_per_s']:>10}{x['big_MB_per_s']:>10}")
    o = r["fuse_overhead"]
    print(f"FUSE overhead (plain / agent write-back): small files x{o['small_files_back']}, "
          f"big file x{o['big_file_back']}")
    print(f"with write-through to S3:                 small files x{o['small_files_through']}, "
          f"big file x{o['big_file_through']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
