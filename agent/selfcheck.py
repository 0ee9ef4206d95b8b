"""`pacsgw selfcheck` (README, "Operating"): a canary file written, read back and deleted through every enabled
front end, logged in like a PACS would, so it checks the whole way, to the PUT to S3 in write-through."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import io
import json
import os
import time
from typing import Any

from agent.config import Config, UserConfig

TIMEOUT = 30.0
RESULT_FILE = "selfcheck.json"  # in the cache directory: the last run's results, for /healthz


def local_host(h: str) -> str:
    """The address to reach a listener on this box by: a wildcard listener's loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(h, h)


def _same(back: bytes, data: bytes) -> None:
    if back != data:
        raise RuntimeError(f"read back {len(back)} bytes that differ from the {len(data)} written")


def check_ftp(cfg: Config, user: UserConfig, name: str, data: bytes) -> None:
    host, port = cfg.ftp.listen
    with ftplib.FTP(timeout=TIMEOUT) as f:  # QUIT on the way out (a connection already gone: closed)
        f.connect(local_host(host), port)
        f.login(user.name, user.password)
        f.storbinary(f"STOR {name}", io.BytesIO(data))
        buf = io.BytesIO()
        f.retrbinary(f"RETR {name}", buf.write)
        _same(buf.getvalue(), data)
        f.delete(name)


def check_sftp(cfg: Config, user: UserConfig, name: str, data: bytes) -> None:
    import asyncssh
    host, port = cfg.sftp.listen
    key = asyncssh.read_private_key(cfg.sftp.host_key).export_public_key().decode().strip()
    known = asyncssh.import_known_hosts(f"[{local_host(host)}]:{port} {key}\n{local_host(host)} {key}\n")

    async def run() -> None:
        async with asyncssh.connect(local_host(host), port, username=user.name, password=user.password,
                                    known_hosts=known, client_keys=None, connect_timeout=TIMEOUT) as conn, \
                conn.start_sftp_client() as sftp:
            async with sftp.open(name, "wb") as fh:
                await fh.write(data)
            async with sftp.open(name, "rb") as fh:
                _same(await fh.read(), data)
            await sftp.remove(name)

    asyncio.run(asyncio.wait_for(run(), TIMEOUT * 2))


def check_smb(cfg: Config, user: UserConfig, name: str, data: bytes) -> None:
    import smbclient
    host, port = cfg.smb.listen
    kw: dict[str, Any] = {"port": port, "username": user.name, "password": user.password,
                          "connection_cache": {}, "connection_timeout": TIMEOUT}
    if cfg.smb.encryption == "required":
        kw["encrypt"] = True
    path = rf"\\{local_host(host)}\{cfg.smb.share}\{name}"
    try:
        with smbclient.open_file(path, mode="wb", **kw) as f:
            f.write(data)
        with smbclient.open_file(path, mode="rb", **kw) as f:
            _same(f.read(), data)
        smbclient.remove(path, **kw)
    finally:
        smbclient.reset_connection_cache(fail_on_error=False, connection_cache=kw["connection_cache"])


CHECKS = {"ftp": check_ftp, "sftp": check_sftp, "smb": check_smb}


def run_selfcheck(cfg: Config) -> dict[str, Any]:
    """→ {'ok': bool, 'time': epoch, 'results': {proto: {'ok', 'seconds', 'error'?}}}"""
    user = next((u for u in cfg.users if u.password), None)
    results: dict[str, dict[str, Any]] = {}
    suffix = (cfg.compliance.temp_suffixes or (".tmp",))[0]  # the canary's name: a temporary upload's
    for proto, check in CHECKS.items():
        if not getattr(cfg, proto).enabled:
            continue
        if proto == "sftp" and not cfg.sftp.password_auth:
            results[proto] = {"ok": None, "seconds": 0.0, "error": "skipped: SFTP allows public keys only"}
            continue
        if user is None:
            results[proto] = {"ok": False, "seconds": 0.0,
                              "error": "no [[users]] entry with a plain password to log in with"}
            continue
        t0 = time.monotonic()
        data = os.urandom(64 * 1024) + f"pacsgw selfcheck {proto} {time.time()}".encode()
        try:
            check(cfg, user, f".pacsgw-selfcheck-{proto}-{int(time.time())}-{os.urandom(4).hex()}{suffix}", data)
            results[proto] = {"ok": True, "seconds": round(time.monotonic() - t0, 3)}
        except Exception as e:  # every failure is a result to report
            results[proto] = {"ok": False, "seconds": round(time.monotonic() - t0, 3),
                              "error": f"{type(e).__name__}: {e}"[:500]}
    report = {"ok": all(r["ok"] is not False for r in results.values()) and bool(results),
              "time": time.time(), "user": user.name if user else None, "results": results}
    with contextlib.suppress(OSError):  # for /healthz, which anyone reaching the port reads: no login name
        (cfg.cache.dir / RESULT_FILE).write_text(json.dumps({k: v for k, v in report.items() if k != "user"}))
    return report


def last_result(cfg: Config) -> dict[str, Any] | None:
    try:
        return json.loads((cfg.cache.dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
