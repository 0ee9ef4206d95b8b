"""Client paths → namespace paths, with confinement to the user's root.

A namespace path has no leading slash ('' is the root): 'CT/2026-11-23/1.2.3/4/5.dcm'. It is also the object key
below the uplink prefix: S3's limits apply, and every component must be a name Windows and Linux clients can use.
"""

from __future__ import annotations

import posixpath
import unicodedata

from agent.records import MAX_NAME_BYTES
from agent.store.errors import BadPath, PermissionDenied

MAX_PATH_BYTES = 1000  # room for an uplink prefix of 24 bytes; a longer one lowers the limit (Gateway._fits)


# Device names Windows reserves, with or without an extension ("CON", "aux.txt"): an SMB client cannot use them.
# Windows takes the superscripts ¹ ² ³ for digits there too, and has the console's CONIN$ and CONOUT$ (as CPython's
# ntpath.isreserved): "COM¹.dcm" was stored over FTP and SFTP, and listed over SMB where no Windows client opens it.
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                              *(f"{port}{i}" for port in ("COM", "LPT") for i in "123456789\u00b9\u00b2\u00b3")})


# Characters no Windows name may hold (backslash and controls are refused for every lookup already): Samba lists a
# file named with one under a mangled 8.3 name that it can then neither open nor delete.
WINDOWS_INVALID = frozenset('<>:"|?*')


def name_problem(name: str) -> str | None:
    """Why `name` cannot be shown to or used by a client (None: it can): a control character forges lines."""
    # isprintable() (one pass in C) spares nearly every name the per-character lookup (~3 % of a cached read)
    if not name.isprintable() and any(unicodedata.category(c) == "Cc" for c in name):
        return "control characters (NUL, newline, escape…) are not allowed in names"
    return None


def creatable_problem(name: str) -> str | None:
    """Why Windows (SMB) clients could not use a new name, or it would display as another; None: it could."""
    # One name shown is one file: "x\u202egpj.dcm" lists as "xmcd.jpg" (Trojan Source), "a\u200bb" as "ab", and a
    # decomposed "e\u0301" as "\xe9" (Windows and macOS send composed names). Names already stored stay usable.
    if not name.isascii() and any(unicodedata.category(c) == "Cf" for c in name):
        return (f"{name!a}: invisible format characters (text-direction controls, zero-width spaces and joiners, "
                "soft hyphens) are not allowed in names (a name would display as another)")
    if not unicodedata.is_normalized("NFC", name):
        return f"{name!a}: a name must be in Unicode NFC (composed) form; this one would display as another name"
    if not WINDOWS_INVALID.isdisjoint(name):
        return f"'{name}': the characters < > : \" | ? * cannot be used by Windows clients"
    if name.endswith((".", " ")):
        return f"'{name}': a name ending in a dot or a space cannot be used by Windows clients"
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        return f"'{name}' is a device name Windows reserves"
    return None


def check_creatable(path: str) -> None:
    """Refuse creating `path` (or its missing parents) where a name could not be used by Windows clients."""
    for part in path.split("/"):
        if part and (problem := creatable_problem(part)):
            raise BadPath(path, problem)


def check_name(name: str, original: str) -> None:
    if name in (".", ".."):
        raise BadPath(original, f"'{name}' is not a valid name")
    if problem := name_problem(name):
        raise BadPath(original, problem)
    if "\\" in name:
        raise BadPath(original, "backslash is not allowed in names")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadPath(original, f"name longer than {MAX_NAME_BYTES} bytes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPath(original, "name is not valid UTF-8") from None


def resolve(root: str, cwd: str, client_path: str) -> str:
    """A client path (absolute, or relative to cwd) → the namespace path; climbing above root is refused."""
    if "\0" in client_path:
        raise BadPath(client_path, "NUL is not allowed in paths")
    joined = client_path if client_path.startswith("/") else posixpath.join(cwd or "/", client_path)
    parts: list[str] = []
    for part in joined.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PermissionDenied(client_path, "path escapes the user's root")
            parts.pop()
            continue
        check_name(part, client_path)
        parts.append(part)
    ns = "/".join([p for p in root.split("/") if p] + parts)
    if len(ns.encode("utf-8")) > MAX_PATH_BYTES:
        raise BadPath(client_path, f"path longer than {MAX_PATH_BYTES} bytes")
    return ns


def study_of(path: str, depth: int) -> str:
    """The study of a file when no trace column names it: the first `depth` levels of its path (`[prefetch]
    study_depth`), its own directory when the path is shorter (`<patient>/<study>/<sop>.dcm`), and the file itself
    in the root (a flat store: as one directory split into write bursts it closed less of the LRU→Belady gap than
    file by file on every tuning family, docs/replay.md "round 18 — layouts").

    The one rule for the live agent's eviction groups and `pacsgw import-trace`, so a hospital replaying its own
    month groups files as the box then will."""
    parts = path.split("/")
    return "/".join(parts[:depth]) if len(parts) > depth else path.rpartition("/")[0] or path


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


def ancestors(path: str) -> list[str]:
    """'a/b/c' → ['', 'a', 'a/b'] (outermost first)."""
    parts = path.split("/")[:-1] if path else []
    return ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]
