#!/usr/bin/python3
"""The catalog around a release with a newer schema (update.yml runs this on the box as root):

  catalog_backup.py version CATALOG         print the catalog's schema version (0: no catalog yet)
  catalog_backup.py backup CATALOG BACKUP   a consistent copy (SQLite's online backup) of a stopped agent's catalog
  catalog_backup.py restore BACKUP CATALOG  put that copy back (the agent stopped), owned as the catalog was
"""

import os
import sqlite3
import sys
from pathlib import Path


def version(catalog: Path) -> int:
    if not catalog.exists():
        return 0
    db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        found = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    return max(found, 1)   # 0: a catalog from before versioning, whose tables are version 1's


def copy(src: Path, dst: Path) -> None:
    """SQLite's backup API: a page-consistent copy, WAL included, whatever state the source file is in."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(str(dst))
    try:
        source.backup(target)
        if target.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise SystemExit(f"{dst}: the copy of {src} fails SQLite's integrity check")
    finally:
        target.close()
        source.close()


def main(argv: list[str]) -> int:
    os.umask(0o077)   # the catalog names every stored file (patient data): root and the agent only
    match argv:
        case ["version", catalog]:
            print(version(Path(catalog)))
        case ["backup", catalog, backup]:
            Path(backup).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            Path(backup).unlink(missing_ok=True)
            copy(Path(catalog), Path(backup))
            print(f"catalog schema {version(Path(catalog))} backed up to {backup}")
        case ["restore", backup, catalog]:
            st = os.stat(catalog)
            copy(Path(backup), Path(catalog))
            for p in Path(catalog).parent.glob(Path(catalog).name + "*"):
                os.chown(p, st.st_uid, st.st_gid)
            print(f"catalog restored from {backup} (schema {version(Path(catalog))})")
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
