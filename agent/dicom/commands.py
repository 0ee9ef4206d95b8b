"""`pacsgw find` (objects by study, patient, modality and study date) and `pacsgw index-rebuild`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import getpass
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable

from agent.config import complain, shown
from agent.dicom.objectmeta import pseudonym
from agent.logs import load_config


def _day(text: str) -> str:
    """'2019-01-31' → DICOM DA '20190131'."""
    try:
        return dt.date.fromisoformat(text).strftime("%Y%m%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _open(config: str):  # (Config, Catalog)
    from agent.store.catalog import Catalog
    cfg = load_config(config, console_on_tty=True)
    return cfg, Catalog(cfg.catalog_path)


def cmd_find(args: argparse.Namespace) -> int:
    cfg, catalog = _open(args.config)
    if args.patient is not None and not cfg.dicom.pseudonym_key:
        return complain("--patient needs [dicom] pseudonym_key_file (objects carry only the keyed pseudonym)", 2)
    patient = None if args.patient is None else pseudonym(cfg.dicom.pseudonym_key, args.patient)
    with contextlib.closing(catalog):
        rows = catalog.find_dicom(args.study, patient, args.modality, args.date_from, args.date_to)
    items = [{"path": p, "bytes": size, "study": study, "series": series, "modality": modality,
              "study_date": date, "where": "cached" if cached else "s3"}
             for p, size, study, series, modality, date, cached in rows]
    cached = [i for i in items if i["where"] == "cached"]
    summary = {"objects": len(items), "bytes": sum(i["bytes"] for i in items), "cached": len(cached),
               "cached_bytes": sum(i["bytes"] for i in cached), "s3_only": len(items) - len(cached)}
    if args.json:
        print(json.dumps({**summary, "items": items}, indent=2))
    else:
        for i in items:
            print(f"{i['where']:<6} {i['bytes']:>12} {i['modality'] or '-':<6} {i['study_date'] or '-':<8} "
                  f"{shown(i['path'])}")
        print(f"{summary['objects']} objects, {summary['bytes']} bytes; {summary['cached']} cached "
              f"({summary['cached_bytes']} bytes), {summary['s3_only']} in S3 only")
    return 0


def cmd_index_rebuild(args: argparse.Namespace) -> int:
    from agent.dicom.reindex import rebuild
    cfg, catalog = _open(args.config)
    with contextlib.closing(catalog):
        report = asyncio.run(rebuild(cfg, catalog, args.concurrency, progress=not args.json,
                                     use_snapshot=not args.no_snapshot))
    per_million = 1e6 / report.per_second if report.per_second else 0.0
    out = dataclasses.asdict(report) | {"seconds": round(report.seconds, 2),
                                         "objects_per_s": round(report.per_second, 1),
                                         "seconds_per_million": round(per_million, 1)}
    print(json.dumps(out, indent=2) if args.json else
          f"{report.objects} objects read ({report.from_snapshot} from the index snapshot, {report.from_deltas} from "
          f"{report.deltas} index deltas, the rest HEADed), {report.indexed} DICOM objects indexed, {report.failed} "
          f"failed, {report.seconds:.1f} s ({report.per_second:.0f} objects/s: {per_million / 60:.1f} min per million)")
    for key in report.deltas_skipped:
        print(shown(f"pacsgw: index delta {key} is damaged: skipped, its objects were HEADed"), file=sys.stderr)
    return 1 if report.failed else 0


def cmd_index_snapshot(args: argparse.Namespace) -> int:
    from agent.dicom import snapshot
    cfg = load_config(args.config, console_on_tty=True)
    t0 = time.monotonic()
    try:
        manifest = asyncio.run(snapshot.write(cfg, snapshot.catalog_rows(cfg.catalog_path)))
    except snapshot.NoPlace as e:
        return complain(str(e), 2)
    except sqlite3.Error as e:
        return complain(f"{cfg.catalog_path}: cannot read the catalog: {e}", 2)
    out = {"snapshot": manifest["snapshot"], "rows": manifest["rows"], "segments": len(manifest["segments"]),
           "seconds": round(time.monotonic() - t0, 2)}
    print(json.dumps(out, indent=2) if args.json else
          f"index snapshot {out['snapshot']}: {out['rows']} objects in {out['segments']} segments, {out['seconds']} s")
    return 0


def cmd_retention_apply(args: argparse.Namespace) -> int:
    from agent.audit import AuditLog, Who
    from agent.dicom.reapply import NoObjectLock, apply, plan
    cfg = load_config(args.config, console_on_tty=True)
    if not cfg.compliance.worm:
        return complain(f"{cfg.path}: [compliance] worm = false: there is no retention to apply", 2)
    try:
        p = asyncio.run(plan(cfg, args.concurrency))
    except NoObjectLock as e:
        return complain(str(e), 2)
    failed = list(p.failed)
    if not args.dry_run and p.changes:
        who = Who(os.environ.get("SUDO_USER") or getpass.getuser(), "cli")
        with contextlib.closing(AuditLog(Path(cfg.audit.path), cfg.audit.max_bytes, cfg.audit.keep,
                                         cfg.audit.enabled)) as audit:
            failed += asyncio.run(apply(cfg, p.changes, audit, who))
    out = {"dry_run": args.dry_run, "objects": p.objects, "changes": len(p.changes), "failed": failed,
           "items": [dataclasses.asdict(c) for c in p.changes]}
    if args.json:
        print(json.dumps(out, indent=2, default=dt.datetime.isoformat))
    else:
        verb = "would extend" if args.dry_run else "extended"
        for c in p.changes:
            before = f"{c.until_before:%Y-%m-%d}" if c.until_before else "none"
            after = f"{c.until:%Y-%m-%d}" if c.until else before
            print(shown(f"{verb}: {c.path}: {before} -> {after}{' + legal hold' if c.legal_hold else ''} ({c.reason})"))
        for f in failed:
            print(shown(f"failed: {f}"), file=sys.stderr)
        print(f"{p.objects} objects read, {len(p.changes)} {verb}, {len(failed)} failed")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction, command: Callable[..., argparse.ArgumentParser],
             as_json: argparse.ArgumentParser) -> None:
    """These commands under sub, each made by the CLI's command() (--config) with its --json parser."""
    p = command("find", cmd_find, "DICOM objects by study, patient, modality and study date, and where they are",
                as_json)
    p.add_argument("--study", help="StudyInstanceUID")
    p.add_argument("--patient", help="PatientID (matched through the keyed pseudonym; never stored in clear)")
    p.add_argument("--modality", help="e.g. CT, MR, MG")
    p.add_argument("--from", dest="date_from", type=_day, help="study date from (YYYY-MM-DD, inclusive)")
    p.add_argument("--to", dest="date_to", type=_day, help="study date to (YYYY-MM-DD, inclusive)")

    p = command("index-rebuild", cmd_index_rebuild, "rebuild the study index from the bucket alone", as_json)
    p.add_argument("--concurrency", type=int, default=64, help="HEAD requests in flight (default 64)")
    p.add_argument("--no-snapshot", action="store_true", help="HEAD every object; ignore the index snapshot")

    command("index-snapshot", cmd_index_snapshot, "write the study index to the bucket (beside the namespace) so that "
            "index-rebuild reads a few objects instead of HEADing every one; run it e.g. nightly", as_json)

    p = sub.add_parser("retention", help="Object Lock retention of the objects already in the bucket")
    p = command("apply", cmd_retention_apply, "extend (never shorten) the retention and legal hold of old objects to "
                "what today's [compliance] rules give them; every change is audited", as_json,
                under=p.add_subparsers(dest="retention_command", required=True))
    p.add_argument("--dry-run", action="store_true", help="list what would be extended, and why; change nothing")
    p.add_argument("--concurrency", type=int, default=32, help="HEAD requests in flight (default 32)")
