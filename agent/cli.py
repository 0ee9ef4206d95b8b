"""`pacsgw` command line: run, check-config, status, hash-password (and the simulator's commands)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from agent import __version__
from agent.config import DEFAULT_CONFIG, ConfigError, complain, load_or_exit, shown
from agent.dicom import commands as dicom_commands
from agent.selfcheck import local_host
from agent.serve.http import ADMIN_TOKEN_FILE
from agent.sim import commands as sim_commands


def cmd_run(args: argparse.Namespace) -> int:
    from agent import daemon, logs
    from agent.store.catalog import CatalogSchemaError
    cfg = logs.load_config(args.config)
    try:
        asyncio.run(daemon.run_until_signal(daemon.Agent(cfg)))
    except CatalogSchemaError as e:
        return complain(str(e), 3)
    except ConfigError as e:  # a setting the host cannot honour (port taken, cache.dir unusable)
        return complain(f"cannot start: {e}", 2)
    except OSError as e:
        return complain(f"cannot start: {e}", 1)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    print(f"{cfg.path}: ok ({len(cfg.users)} users, bucket {cfg.uplink.bucket!r}, write mode {cfg.uplink.write_mode})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.serve.http import status_lines
    health = _admin(_agent_url(args) + "/healthz", "", timeout=10)[1]  # a 503 still carries the health document
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        width = max(len(k) for k, _ in status_lines(health))
        for k, v in status_lines(health):
            print(f"{k:<{width}}  {v}")
    return {"ok": 0, "degraded": 1}.get(health["status"], 2)


def _agent_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    host, port = load_or_exit(args.config).http.listen
    host = local_host(host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _admin_token(args: argparse.Namespace) -> str:
    """The running agent's admin token (<cache.dir>/admin.token, readable by root only), or ''."""
    try:
        return (load_or_exit(args.config).cache.dir / ADMIN_TOKEN_FILE).read_text().strip()
    except (OSError, SystemExit):
        return ""


class Unreachable(Exception):
    """The agent's HTTP listener did not answer: main() prints why and exits 3."""


def _admin(url: str, token: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """One request to the running agent (a POST with a body) → (HTTP status, JSON answer); raises Unreachable."""
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
    except OSError as e:
        raise Unreachable(f"cannot reach the agent at {url}: {e}") from e


def _bar(total: int, desc: str, unit: str = "file"):  # a tqdm bar on stderr
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr)


def cmd_evict(args: argparse.Namespace) -> int:
    """Ask the running agent to drop clean cached copies, or with --dry-run what its policy would drop."""
    url, token = _agent_url(args) + "/admin/evict", _admin_token(args)
    if args.dry_run:
        query = "?" + urllib.parse.urlencode({"bytes": args.bytes}) if args.bytes else ""
        return _dry_run(url + query, token, args.json, _evict_text)
    if not args.paths:
        return complain("evict needs PATH... (or --dry-run)", 2)
    worst = 0
    with _bar(len(args.paths), "evict") as bar:
        for path in args.paths:
            status, result = _admin(url, token, {"path": path})
            worst = max(worst, 0 if status == 200 else 1)
            bar.write(f"{path}: " + ("evicted" if result.get("evicted")
                                     else f"not evicted ({result.get('error')})"), file=sys.stdout)
            bar.update()
    return worst


def _dry_run(url: str, token: str, as_json: bool, text: Callable[[dict], str]) -> int:
    status, plan = _admin(url, token)
    if status != 200:
        return complain(str(plan.get("error")), 2)
    print(json.dumps(plan, indent=2) if as_json else text(plan))
    return 0


def _evict_text(plan: dict) -> str:
    victims, by_cluster = plan["victims"], {}
    lines = [f"policy {plan['policy']}" + (f" (k = {plan['k']})" if plan.get("k") else "")
             + f": {len(victims)} files, {sum(v['size'] for v in victims)} bytes would go "
             f"to free {plan['bytes_to_free']} of {plan['cached_bytes']} cached bytes"]
    for v in victims:
        by_cluster.setdefault(v["cluster"], []).append(v)
    for cluster, files in by_cluster.items():
        label = "no clusters" if cluster is None else f"cluster {cluster}" + (" (coldest)" if cluster == 0 else "")
        lines.append(f"{label}: {len(files)} files, {sum(v['size'] for v in files)} bytes")
        lines += [f"  {v['path']}  {v['size']} B  read {v['access_count']}x"
                  + (f"  score {v['score']}" if v["score"] is not None else "") for v in files]
    return "\n".join(lines)


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Show what the agent's prefetch would fetch (--dry-run), or start a run and follow it."""
    url, token = _agent_url(args) + "/admin/prefetch", _admin_token(args)
    if args.dry_run:
        return _dry_run(url, token, args.json, _plan_text)
    status, started = _admin(url, token, {})
    if status != 202:
        return complain(str(started.get("error")), 1)
    with _bar(0, "prefetch", "B") as bar:
        while True:
            run = _admin(url + "?status=1", token)[1]["status"]
            bar.total = run["planned_bytes"]  # known once the run has planned
            bar.update(run["fetched_bytes"] - bar.n)
            if not run["running"]:
                break
            time.sleep(0.5)
    print(f"prefetched {run['fetched_files']} files, {run['fetched_bytes']} bytes"
          + (f"; stopped: {run['stopped']}" if run["stopped"] else ""))
    return 0


def _plan_text(plan: dict) -> str:
    lines = ["predicted heat (expected reads in the next 24 h):"]
    lines += [f"  {r['heat']:>10.2f}  {r['dir']}  ({r['why']})" for r in plan["ranked"]]
    lines.append(f"would fetch {plan['planned_bytes']} bytes (budget {plan['budget_bytes']}):")
    lines += [f"  {d['dir']}: {d['files']} files, {d['bytes']} bytes, heat {d['heat']}" for d in plan["chosen"]]
    lines += [f"  not fitting the budget: {d['dir']} ({d['bytes']} bytes)" for d in plan["skipped"]]
    return "\n".join(lines)


def cmd_fsck(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.fsck import Fsck
    cfg = logs.load_config(args.config, console_on_tty=True)
    report = asyncio.run(Fsck(cfg, remote=args.remote, repair=args.repair, progress=not args.json).run())
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"exit_code": report.exit_code}, indent=2))
    else:
        print(f"checked {report.files} files, verified {report.verified_bytes} cached bytes")
        for label, items in (("corrupt or missing cached copies", report.corrupt),
                             ("fetched again", report.refetched),
                             ("missing or different in object storage", report.remote_missing),
                             ("queued for upload again", report.requeued),
                             ("compressed objects recorded with their stored size", report.wrong_size),
                             ("their size corrected", report.resized),
                             ("LOST (no good copy anywhere)", report.lost)):
            if items:
                print(f"{label}: {len(items)}")
                for path in items[:20]:  # catalog paths: keys another S3 client wrote, merged from listings
                    print(f"  {shown(path)}")
        if report.orphans:
            print(f"orphan cache files: {report.orphans}" + (" (removed)" if args.repair else ""))
        if not args.repair and report.exit_code == 1:
            print("run again with --repair to fix what can be fixed")
    return report.exit_code


def cmd_hash_password(args: argparse.Namespace) -> int:
    from agent.auth import hash_password
    password = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass("password: ")
    if not password:
        return complain("empty password", 2)
    print(hash_password(password))
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from agent.selfcheck import run_selfcheck
    report = run_selfcheck(load_or_exit(args.config))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if not report["results"]:
            print("no front end is enabled")
        for proto, r in report["results"].items():
            state = {True: "ok", False: "FAILED", None: "skipped"}[r["ok"]]
            print(f"{proto:<5} {state:<7} {r['seconds']:.2f}s" + (f"  {r['error']}" if r.get("error") else ""))
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pacsgw", description="Edge storage gateway for hospital PACS.")
    ap.add_argument("--version", action="version", version=f"pacsgw {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    config, url, as_json = (argparse.ArgumentParser(add_help=False) for _ in range(3))
    config.add_argument("--config", default=DEFAULT_CONFIG)
    url.add_argument("--url", help="the agent's HTTP address, instead of reading [http] listen from the config")
    as_json.add_argument("--json", action="store_true")

    def command(name: str, func, help: str, *parents: argparse.ArgumentParser, under=sub) -> argparse.ArgumentParser:
        p = under.add_parser(name, help=help, parents=[config, *parents])
        p.set_defaults(func=func)
        return p

    command("run", cmd_run, "run the agent in the foreground (SIGTERM drains and stops)")
    command("check-config", cmd_check_config, "validate a configuration file")
    command("status", cmd_status, "print the running agent's health (exit 0 ok, 1 degraded, 2 failing)", url, as_json)
    p = command("fsck", cmd_fsck, "verify cached files (and with --remote, objects in S3); --repair fixes "
                "(exit 0 clean, 1 problems found, 2 data lost)", as_json)
    p.add_argument("--remote", action="store_true", help="also check every clean file's object in S3")
    p.add_argument("--repair", action="store_true", help="fetch corrupt copies again, re-queue missing objects")
    command("selfcheck", cmd_selfcheck, "write, read back and delete a canary file through every enabled "
            "front end (FTP, SFTP, SMB); exit 1 if one fails", as_json)
    p = command("evict", cmd_evict, "drop the cached copies of files already in S3 (exit 1 if one was not)",
                url, as_json)
    p.add_argument("paths", nargs="*", metavar="PATH", help="namespace paths such as CT/2026-11-23/1.2.3/4/5.dcm")
    p.add_argument("--dry-run", action="store_true", help="list what the eviction policy would drop now, by cluster")
    p.add_argument("--bytes", help="with --dry-run: how much to free (default: down to the low watermark)")
    p = command("prefetch", cmd_prefetch, "start a prefetch run in the agent, or show what it would fetch "
                "(--dry-run)", url, as_json)
    p.add_argument("--dry-run", action="store_true", help="what would be fetched and why, with predicted heat")

    p = sub.add_parser("hash-password", help="print a password_hash for [[users]]")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_hash_password)

    sim_commands.register(sub)  # gen-trace, import-trace, simulate, train
    dicom_commands.register(sub, command, as_json)  # find, index-rebuild, index-snapshot, retention apply
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Unreachable as e:
        return complain(str(e), 3)


if __name__ == "__main__":
    raise SystemExit(main())
