"""TOML configuration → frozen dataclasses.

Every error names the file, the key, the bad value and what is allowed; unknown keys are errors. Each field's
parser and its words for what is allowed live in its metadata: schema, checks and messages cannot drift apart.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import itertools
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_CONFIG = "/etc/pacsgw/agent.toml"


class ConfigError(ValueError):
    """A configuration problem, already phrased for the admin."""

    def __init__(self, file: str | Path, key: str, value: Any, allowed: str) -> None:
        self.file, self.key, self.value, self.allowed = str(file), key, value, allowed
        super().__init__(f"{file}: {key} = {value!r} is invalid: {allowed}")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """'800GB' → 800e9 bytes (SI), '512KiB' → 524288; a bare integer is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(value: Any) -> int:
    """Bytes per second: '10MB' (per second), '80Mbps' (bits), or 0 for unlimited."""
    if isinstance(value, str) and value.strip().lower().endswith("bps"):
        return parse_size(value.strip()[:-3]) // 8
    return parse_size(value)


def unit_of(text: str) -> str | None:
    """The unit a size was given in ('3GB' → 'GB', '0.5 tib' → 'TiB'); None for bare bytes."""
    letters = "".join(c for c in text if c.isalpha()).lower()
    letters = {"k": "kb", "m": "mb", "g": "gb", "t": "tb"}.get(letters, letters)
    return next((u for u in ("KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB") if u.lower() == letters), None)


def fmt_bytes(n: float, unit: str | None = None) -> str:
    """`n` bytes in `unit`, or in the largest SI unit of which it holds at least one."""
    if unit is None:
        unit = next((u for u in ("TB", "GB", "MB", "KB") if abs(n) >= _SIZE_UNITS[u.lower()]), "B")
    v = n / _SIZE_UNITS[unit.lower()]
    return f"{v:,.0f} {unit}" if v >= 100 or unit == "B" else f"{v:,.2f} {unit}"


# --- field helpers: a parser → the setting, or ValueError (TypeError, OverflowError) that _build reports


def _f(parse: Callable[[Any], Any], allowed: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"parse": parse, "allowed": allowed})


def _valid(ok: Callable[[Any], object], then: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if not ok(value):
            raise ValueError
        return then(value)
    return parse


def _matching(pattern: str) -> Callable[[Any], str]:
    return _valid(lambda v: isinstance(v, str) and re.fullmatch(pattern, v))


def _str_list(ok: Callable[[str], object]) -> Callable[[Any], tuple[str, ...]]:
    return _valid(lambda v: isinstance(v, list) and all(isinstance(s, str) and ok(s) for s in v), tuple)


def _float_between(lo: float, hi: float) -> Callable[[Any], float]:
    return _valid(lambda v: type(v) in (int, float) and lo <= v <= hi, float)


_str, _bool = _valid(lambda v: isinstance(v, str)), _valid(lambda v: isinstance(v, bool))
_strings = _str_list(lambda v: True)
_nonempty = _valid(lambda v: isinstance(v, str) and v.strip())


def _ratio(value: Any) -> float:
    """0.75 or '75%'."""
    if isinstance(value, str) and value.strip().endswith("%"):
        value = float(value.strip()[:-1]) / 100
    return _float_between(0.0, 1.0)(value)


def _listen(value: Any) -> tuple[str, int]:
    """'127.0.0.1:2121', '[::1]:2121' or '0.0.0.0:21'."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip()) if isinstance(value, str) else None
    if not m or not 0 < int(m.group(2) or m.group(4)) < 65536:
        raise ValueError
    if (host := m.group(1) or m.group(3)) != "localhost":
        ipaddress.ip_address(host)
    return host, int(m.group(2) or m.group(4))


def _port_range(value: Any) -> tuple[int, int]:
    """'30000-30100'."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value) if isinstance(value, str) else None
    if not m or not 1024 <= int(m.group(1)) <= int(m.group(2)) < 65536:
        raise ValueError
    return int(m.group(1)), int(m.group(2))


_url = _valid(lambda v: isinstance(v, str) and re.fullmatch(r"https?://[^\s/]+(/.*)?", v), lambda v: v.rstrip("/"))
_bucket = _matching(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# '' or 'site-a/': normalised to end in exactly one '/' when not empty
_prefix = _valid(lambda v: isinstance(v, str) and not v.startswith("/") and "//" not in v and "\\" not in v,
                 lambda v: v.strip("/") + "/" if v.strip("/") else "")


def _ns_root(value: Any) -> str:
    """A user's root inside the gateway namespace: '/', '/CT'."""
    if not isinstance(value, str) or not value.startswith("/") or "\\" in value or "\0" in value:
        raise ValueError
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError
    return "/" + "/".join(parts)


_name = _matching(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,31}")
_share = _valid(lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.\-$]{1,64}", v)
                and v.lower() not in ("global", "homes", "printers", "ipc$"))


def _hosts_allow(value: Any) -> tuple[str, ...]:
    """['10.10.20.0/24', '192.0.2.7', 'fd00::/8'] → the same strings as networks (host bits cleared)."""
    return tuple(str(ipaddress.ip_network(v.strip(), strict=False)) for v in _strings(value))


RIGHTS = ("read", "write", "delete", "rename")
_rights = _valid(lambda v: isinstance(v, list) and all(r in RIGHTS for r in v), lambda v: tuple(dict.fromkeys(v)))
_unix_name = _valid(lambda v: isinstance(v, str) and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v) and v != "root")


SIZE = "a size: bytes as an integer or a string such as '800GB', '512KiB' (SI and IEC units)"
RATE = "a rate in bytes per second such as '10MB' or in bits such as '80Mbps'; 0 means unlimited"
LISTEN = "'HOST:PORT' with an IP address (or localhost) and a port 1-65535, e.g. '127.0.0.1:2121'"
MIN_CACHE_BYTES = 64 * 1024  # below one file of a study the box sits at critical pressure; tests use small caches


# The usual kinds of field, each with its own words for what is allowed (note: more words after them).
def _flag(default: bool, note: str = "") -> Any:
    return _f(_bool, "true or false" + note, default)


def _int(lo: int, hi: int, default: Any = dataclasses.MISSING, note: str = "", unit: str = "an integer") -> Any:
    return _f(_valid(lambda v: type(v) is int and lo <= v <= hi), f"{unit} {lo}..{hi}{note}", default)  # no bool


def _seconds(lo: float, hi: float, default: float, note: str = "") -> Any:
    return _f(_float_between(lo, hi), f"seconds {lo}..{hi}{note}", default)


def _size(default: str | int, note: str = "", least: int = 0) -> Any:
    return _f(_valid(lambda v: parse_size(v) >= least, parse_size), SIZE + note, parse_size(default))


def _one_of(*options: str, default: str) -> Any:
    return _f(_valid(lambda v: v in options), ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}", default)


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = _f(lambda v: Path(_nonempty(v)), "a directory path on the cache SSD")
    max_bytes: int = _size("800GB", ", at least 64KiB", least=MIN_CACHE_BYTES)
    high_watermark: float = _f(_ratio, "a fraction 0..1 or a percentage such as '75%'", default=0.75)
    low_watermark: float = _f(_ratio, "a fraction 0..1 below high_watermark", default=0.60)
    min_free_bytes: int = _size("1GB")
    eviction: str = _one_of("lru", "age", "kmeans", "study", "learned", "adaptive", default="adaptive")
    evict_interval_seconds: float = _seconds(0.1, 3600, 10.0)
    kmeans_refit_seconds: float = _seconds(0, 7 * 86400, 3600.0, " (0: re-fit on every pass)")
    age_max_days: float = _f(_float_between(1, 36600), "days 1..36600", default=90.0)
    eviction_candidates: int = _int(1000, 10_000_000, 200_000)
    # What one user's files being written (not yet closed) may hold, of min(max_bytes, disk - min_free_bytes)
    max_unfinished_per_user: float = _f(_ratio, "a fraction 0..1 or a percentage such as '25%' of the cache",
                                        default=0.25)
    # What one user's stored files not yet uploaded (they cannot be evicted) may hold, of the same; 1 (100 %): no share
    max_dirty_per_user: float = _f(_ratio, "a fraction 0..1 or a percentage such as '50%' of the cache", default=1.0)
    # What the files open for reading (all users) may hold, of the same: each keeps its space until closed
    max_open_for_reading: float = _f(_ratio, "a fraction 0..1 or a percentage such as '75%' of the cache", default=0.75)
    # One user's part of it: one reader holding every file open would have the PACS's reads refused
    max_open_for_reading_per_user: float = _f(_ratio, "a fraction 0..1 or a percentage such as '25%' of the cache",
                                              default=0.25)


@dataclass(frozen=True)
class UplinkConfig:
    endpoint_url: str = _f(_url, "an http:// or https:// URL of the S3 endpoint")
    bucket: str = _f(_bucket, "an S3 bucket name: 3-63 characters of a-z 0-9 . -")
    prefix: str = _f(_prefix, "a key prefix such as 'hospital-a/' (no leading '/', no '//')", default="")
    region: str = _f(_nonempty, "an S3 region name such as 'us-east-1'", default="us-east-1")
    access_key_id: str = _f(_str, "a string", default="")
    secret_access_key: str = _f(_str, "a string", default="")
    credentials_file: str = _f(_str, "a path to a TOML file with access_key_id and secret_access_key", default="")
    write_mode: str = _one_of("through", "back", default="through")
    max_concurrency: int = _int(1, 256, 8)
    multipart_threshold: int = _size("64MiB", " of at least 5MiB")
    multipart_chunk: int = _size("16MiB", " of at least 5MiB (S3's minimum part)", least=5 * 1024**2)
    bwlimit: int = _f(parse_rate, RATE, default=0)
    through_timeout: float = _seconds(1, 3600, 60.0)
    connect_timeout: float = _seconds(0.5, 300, 5.0)
    read_timeout: float = _seconds(1, 3600, 60.0)
    ca_bundle: str = _f(_str, "a path to a PEM file of CA certificates trusted for the endpoint, or ''", default="")
    # zstd for uncompressed DICOM on the line (agent/uplink/encoding.py); reads decode by the object's metadata
    compress: str = _one_of("off", "zstd", default="off")


@dataclass(frozen=True)
class FtpConfig:
    enabled: bool = _flag(True)
    listen: tuple[str, int] = _f(_listen, LISTEN, default=("127.0.0.1", 2121))
    passive_ports: tuple[int, int] = _f(_port_range, "'LOW-HIGH' with 1024 <= LOW <= HIGH <= 65535",
                                        default=(30000, 30100))
    masquerade_address: str = _f(_str, "the IP address to announce in PASV replies, or ''", default="")
    tls_cert: str = _f(_str, "a PEM certificate (chain) file for FTPS (AUTH TLS), or ''", default="")
    tls_key: str = _f(_str, "the PEM private key file of tls_cert", default="")
    require_tls: bool = _flag(False, " (true: refuse plain-text logins and data)")
    tls_session_reuse: bool = _flag(True, " (false: a PROT P data connection need not resume the control "
                                          "connection's TLS session, for clients that cannot)")
    tls_close_notify: bool = _flag(True, " (false: an upload over TLS may end without the client's close_notify, "
                                   "for FTPS clients that never send it)")
    # --- session limits and passive mode (issue 19: passive-port theft and pool exhaustion) ---
    max_sessions_per_user: int = _int(1, 10000, 32)
    max_sessions_per_address: int = _int(1, 10000, 64)
    # control connections not logged in yet, from every address together (OpenSSH's MaxStartups)
    max_unauthenticated: int = _int(1, 100000, 256)
    passive_timeout: float = _seconds(1, 600, 30.0, " (how long a PASV/EPSV port waits for its data connection)")
    login_timeout: float = _seconds(1, 600, 30.0, " (how long a connection may take to log in)")
    idle_timeout: float = _seconds(1, 86400, 600.0, " (a session that sends no command this long ends; not while "
                                   "a transfer runs)")


@dataclass(frozen=True)
class SftpConfig:
    enabled: bool = _flag(True)
    listen: tuple[str, int] = _f(_listen, LISTEN, default=("127.0.0.1", 2222))
    host_key: str = _f(_str, "a path; the key is generated there on first start if missing", default="")
    password_auth: bool = _flag(True, " (false: public keys only)")
    # the same caps as [ftp]'s, counted apart from FTP's (issue 19: connection floods)
    max_sessions_per_user: int = _int(1, 10000, 32)
    max_sessions_per_address: int = _int(1, 10000, 64)
    max_unauthenticated: int = _int(1, 100000, 256)
    # channels one SSH connection may hold open (OpenSSH's MaxSessions is 10): each holds buffers and a task
    max_channels_per_connection: int = _int(1, 1000, 10)
    login_timeout: float = _seconds(1, 600, 60.0, " (how long an SSH connection may take to log in)")
    idle_timeout: float = _seconds(1, 86400, 600.0, " (a logged-in connection that sends no SFTP request and is "
                                   "sent no reply this long is closed)")


@dataclass(frozen=True)
class SmbConfig:
    enabled: bool = _flag(False)
    listen: tuple[str, int] = _f(_listen, LISTEN, default=("127.0.0.1", 4450))
    share: str = _f(_share, "a share name: 1-64 characters of A-Z a-z 0-9 _ . - $", default="pacs")
    encryption: str = _one_of("required", "desired", "off", default="required")
    manage: bool = _f(_bool, "true (the agent runs and supervises smbd) or false (systemd runs smbd)", default=True)
    mountpoint: str = _f(_nonempty, "a directory path for the FUSE mount Samba shares", default="")
    state_dir: str = _f(_nonempty, "a directory path for smb.conf and Samba's private state", default="")
    unix_user: str = _f(_unix_name, "a Unix account name (a-z 0-9 _ -, at most 32)", default="pacsgw")
    case_sensitive: bool = _flag(True)
    smbd: str = _f(_nonempty, "the path of the smbd binary", default="/usr/sbin/smbd")
    hosts_allow: tuple[str, ...] = _f(_hosts_allow, "a list of client networks or addresses such as "
                                      "['10.10.20.0/24', '192.0.2.7'] ([]: every client)", default=())
    max_sessions_per_address: int = _int(1, 10000, 64)
    # SMB connections (each an smbd process) from every address together, logged in or not (max smbd processes)
    max_connections: int = _int(1, 100000, 512)
    # Memory (RSS) one smbd process, one connection, may hold: Samba bounds none of a connection's sessions, tree
    # connects or byte-range locks. Checked by the agent when manage = true
    max_process_memory: int = _size("512MiB", ", at least 32MiB", least=32 * 1024**2)


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """The fields of a 'password_hash' (made by agent.auth.hash_password); ValueError when it is none."""
    if len(parts := encoded.split("$")) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise ValueError("malformed scrypt hash") from e
    if n < 2 or n & (n - 1) or not (1 <= r <= 32 and 1 <= p <= 16) or len(digest) < 16:
        raise ValueError("implausible scrypt parameters")
    return n, r, p, salt, digest


_optional_hash = _valid(lambda v: isinstance(v, str) and (v == "" or parse_hash(v)))  # ValueError on a bad hash


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _flag(True)
    listen: tuple[str, int] = _f(_listen, LISTEN, default=("127.0.0.1", 8080))
    # A second listener serving /metrics only, for the central Prometheus on a monitoring subnet.
    metrics_listen: tuple[str, int] | None = _f(lambda v: None if v == "" else _listen(v), f"'' (off) or {LISTEN}",
                                                default=None)
    metrics_tls_cert: str = _f(_str, "'' (plain HTTP) or the path of a PEM certificate chain", default="")
    metrics_tls_key: str = _f(_str, "'' or the path of the PEM private key of metrics_tls_cert", default="")
    metrics_user: str = _f(_str, "'' (no basic auth) or the user name Prometheus sends", default="")
    metrics_password_hash: str = _f(_optional_hash, "'' or a hash made by 'pacsgw hash-password'", default="")


@dataclass(frozen=True)
class LogConfig:
    level: str = _f(_valid(lambda v: v in ("debug", "info", "warning", "error")), "debug, info, warning or error",
                    default="info")
    format: str = _one_of("json", "console", default="json")


_suffixes = _str_list(lambda v: v.startswith(".") and "/" not in v)
_modalities = _str_list(lambda v: re.fullmatch(r"[A-Z0-9_]{1,16}", v))
_uids = _str_list(lambda v: len(v) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", v))
# '2019-01-31' → DICOM DA '20190131'; '' stays ''
_da = _valid(lambda v: isinstance(v, str) and (v == "" or re.fullmatch(r"\d{4}-\d{2}-\d{2}", v)),
             lambda v: datetime.date.fromisoformat(v).strftime("%Y%m%d") if v else "")


@dataclass(frozen=True, kw_only=True)
class RetentionRule:
    prefix: str = _f(_prefix, "a namespace path prefix such as 'inpatient/' (no leading '/'); '' for every path "
                     "(DICOM rules only)", default="")
    retention_days: int = _int(0, 100 * 366, note=" (0: not retained)", unit="days")
    legal_hold: bool = _flag(False)
    # DICOM selectors (agent/dicom/retention.py): a rule with any of them only ever lengthens what the path rules give
    modality: tuple[str, ...] = _f(_modalities, "a list of DICOM modalities such as ['MG']", default=())
    sop_class: tuple[str, ...] = _f(_uids, "a list of SOP Class UIDs such as ['1.2.840.10008.5.1.4.1.1.1.2']",
                                    default=())
    study_from: str = _f(_da, "a study date 'YYYY-MM-DD' (inclusive) or ''", default="")
    study_to: str = _f(_da, "a study date 'YYYY-MM-DD' (inclusive) or ''", default="")
    until_age: int = _int(0, 150, 0, ": retained until the patient is this old, when the header has a birth date "
                          "(0: no age term)", unit="years")

    @property
    def selects_dicom(self) -> bool:
        return bool(self.modality or self.sop_class or self.study_from or self.study_to or self.until_age)


@dataclass(frozen=True)
class ComplianceConfig:
    worm: bool = _flag(False)
    mode: str = _one_of("COMPLIANCE", "GOVERNANCE", default="COMPLIANCE")
    retention_days: int = _int(0, 100 * 366, 15 * 365 + 4, unit="days")
    legal_hold: bool = _flag(False)
    temp_suffixes: tuple[str, ...] = _f(_suffixes, "a list of suffixes such as ['.part', '.filepart', '.tmp']",
                                        default=(".part", ".filepart", ".tmp"))
    rules: tuple[RetentionRule, ...] = _f(lambda v: v, "[[compliance.rules]] tables", default=())


DAILY_SNAPSHOT = 86400.0  # [dicom] snapshot_interval when the file leaves it out and uplink.prefix is set


@dataclass(frozen=True)
class DicomConfig:
    metadata: bool = _flag(True, " (true: each DICOM object carries its header as S3 metadata and tags)")
    pseudonym_key_file: str = _f(_str, "a path to a file (mode 0600) holding this hospital's secret pseudonym key "
                                 "(at least 32 characters), or '' (no patient pseudonym is stored)", default="")
    pseudonym_key: bytes = field(default=b"", repr=False)  # read from pseudonym_key_file by load()
    # Loaded as daily where the index has a place beside the namespace (a non-empty uplink.prefix): see load()
    snapshot_interval: float = _seconds(0, 30 * 86400, 0.0, " between study-index snapshots the agent writes "
                                        "(0: never; e.g. 86400 for daily)")
    delta_interval: float = _seconds(0, 86400, 60.0, " between the study-index deltas the agent writes while it "
                                     "writes snapshots (0: none)")


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = _flag(True)
    path: str = _f(_str, "a path for the audit log file (default <cache.dir>/audit/audit.jsonl)", default="")
    max_bytes: int = _size("100MB")
    keep: int = _int(1, 100000, 50)
    ship: bool = _flag(False)
    ship_prefix: str = _f(_prefix, "a key prefix outside uplink.prefix, e.g. 'pacsgw-audit/hospital-a/'", default="")


def _clock(text: str) -> int:
    """'05:00' or '05:00:30' → seconds after midnight."""
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59 or int(m.group(3) or 0) > 59:
        raise ValueError
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)


def _window(value: Any) -> tuple[int, int]:
    """'05:00-07:30' → (18000, 27000) seconds after local midnight; the end may be past midnight."""
    start, end = (_clock(part) for part in _str(value).split("-"))  # ValueError unless two clocks
    if start == end:
        raise ValueError
    return start, end


@dataclass(frozen=True)
class PrefetchConfig:
    dir_depth: int = _int(1, 8, 2, ": how many path levels make a directory whose daily reads are counted "
                          "(2 for MODALITY/DAY)")
    enabled: bool = _flag(False)   # the LSTM planner: off, it lost its ablation
    window: tuple[int, int] = _f(_window, "'HH:MM-HH:MM' (or HH:MM:SS) in local time, e.g. '05:00-07:30'",
                                 default=(5 * 3600, 7 * 3600 + 1800))
    max_bytes: int = _size("20GB")
    top_dirs: int = _int(1, 10000, 20)
    check_seconds: float = _seconds(0.1, 3600, 60.0)
    cold_start_days: int = _int(1, 365, 7, unit="days")
    priors: bool = _flag(True)
    study_depth: int = _int(1, 16, 3, ": path levels of a study directory (3 for MODALITY/DAY/STUDY)")
    priors_k: int = _int(1, 20, 3)
    # One new study's priors may fill this share of cache.max_bytes: `pacsgw simulate`'s (docs/replay.md round 4)
    priors_space: float = _f(_ratio, "a fraction 0..1 or a percentage such as '30%' of cache.max_bytes", default=0.3)
    priors_max_bytes: int = _size(0, ": a ceiling on priors_space in bytes (0: none)")
    priors_window_seconds: float = _seconds(1, 86400, 3600.0)
    # new-study prior plans one writing user may start per hour: a modality writes a few studies an hour (README)
    priors_per_user_hour: int = _int(1, 100_000, 120, unit="plans")


@dataclass(frozen=True)
class PressureConfig:
    memory_high: int = _size("8GiB", ": system memory available below this is high pressure")
    memory_critical: int = _size("2GiB", ": available below this is critical")
    rss_high: int = _size("16GiB", ": the agent's own memory above this is high pressure (0: no limit)")
    rss_critical: int = _size("32GiB", " (0: no limit)")
    disk_critical: float = _f(_ratio, "a fraction 0..1 of cache.max_bytes above high_watermark", default=0.95)
    interval_seconds: float = _seconds(0.5, 300, 5.0)


@dataclass(frozen=True)
class ScrubConfig:
    enabled: bool = _flag(True)
    rate: int = _f(parse_rate, RATE.replace("0 means unlimited", "at least 1MB"), default=parse_size("20MB"))
    pause_seconds: float = _seconds(1, 30 * 86400, 3600.0, " between passes")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f(_str, "a path to the .tflite heat model (its model card <name>.card.json beside it), or ''",
                   default="")


@dataclass(frozen=True)
class UserConfig:
    name: str = _f(_name, "1-32 characters of A-Z a-z 0-9 _ . - (not starting with . or -)")
    password: str = _f(_str, "a string (prefer password_hash)", default="")
    password_hash: str = _f(_optional_hash, "a hash made by 'pacsgw hash-password'", default="")
    authorized_keys: tuple[str, ...] = _f(lambda v: (v,) if isinstance(v, str) else _strings(v),
                                          "a path, or a list of paths, of OpenSSH authorized_keys files", default=())
    root: str = _f(_ns_root, "an absolute path inside the gateway namespace such as '/' or '/CT'", default="/")
    permissions: tuple[str, ...] = _f(_rights, "a list of 'read', 'write', 'delete', 'rename' "
                                      "(a PACS account: ['read', 'write', 'rename'])", default=RIGHTS)


@dataclass(frozen=True)
class LoginConfig:
    """Password guessing (agent.auth.LoginGuard): backoff delays, then bans."""

    delay_seconds: float = _seconds(0, 60, 1.0)
    max_delay_seconds: float = _seconds(0, 600, 16.0, ", at least delay_seconds")
    max_failures: int = _int(1, 10000, 10)
    window_seconds: float = _seconds(1, 86400, 600.0)
    ban_seconds: float = _seconds(1, 7 * 86400, 900.0)


@dataclass(frozen=True)
class ServerConfig:
    """Processes serving FTP and SFTP (docs/workers.md): N > 1 is the owner and N-1 workers; 0: one per CPU."""

    workers: int = _int(0, 256, 1, " (1: one process, 0: one per CPU)")

    def serving_processes(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


_peer_url = _matching(r"|https?://[A-Za-z0-9.\-:\[\]]+(:\d+)?")


@dataclass(frozen=True)
class HaConfig:
    """An active/standby pair behind a keepalived address (agent/ha.py)."""

    enabled: bool = _flag(False)
    peer: str = _f(_peer_url, "'' or the peer box's status URL such as 'http://10.0.0.12:8080'", default="")
    role_file: str = _f(_nonempty, "the path keepalived's notify hook writes the role to",
                        default="/run/pacsgw-ha/role")
    follow_seconds: float = _seconds(1, 86400, 30.0, " between standby catalog syncs")
    prefetch_bytes: int = _size("10GB", "; 0 turns the standby's prefetch of the active box's hot set off")


@dataclass(frozen=True)
class Config:
    path: Path
    cache: CacheConfig
    uplink: UplinkConfig
    ftp: FtpConfig
    sftp: SftpConfig
    smb: SmbConfig
    http: HttpConfig
    log: LogConfig
    audit: AuditConfig
    compliance: ComplianceConfig
    pressure: PressureConfig
    prefetch: PrefetchConfig
    scrub: ScrubConfig
    model: ModelConfig
    users: tuple[UserConfig, ...]
    dicom: DicomConfig = DicomConfig()
    ha: HaConfig = field(default_factory=HaConfig)
    login: LoginConfig = field(default_factory=LoginConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def catalog_path(self) -> Path:
        return self.cache.dir / "catalog.sqlite"


# every [section] is a Config field of a dataclass type ([[users]] and the file's path are not)
_SECTIONS: dict[str, type] = {n: t for n, t in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(t)}


def _build(cls: type, table: Any, file: Path, where: str) -> Any:
    _need(isinstance(table, dict), file, where, table, "a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if "parse" in f.metadata}  # not derived ones
    for key, value in table.items():
        _need(key in fields, file, f"{where}.{key}", value,
              f"unknown key; allowed keys in [{where}] are: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in table:
            _need(f.default is not dataclasses.MISSING, file, f"{where}.{name}", None,
                  f"required; {f.metadata['allowed']}")
            continue
        try:
            kwargs[name] = f.metadata["parse"](table[name])
        except (ValueError, TypeError, OverflowError):
            shown = "***" if "password" in name else table[name]  # a password (hash) is never echoed
            raise ConfigError(file, f"{where}.{name}", shown, f.metadata["allowed"]) from None
    return cls(**kwargs)


def _need(ok: object, file: Path, key: str, value: Any, allowed: str) -> None:
    """A rule across fields (or against the host): a ConfigError naming key unless ok."""
    if not ok:
        raise ConfigError(file, key, value, allowed)


def _check_cross(cfg: Config) -> None:
    file, up, pr = cfg.path, cfg.uplink, cfg.pressure
    _need(cfg.cache.low_watermark < cfg.cache.high_watermark, file, "cache.low_watermark", cfg.cache.low_watermark,
          f"must be below cache.high_watermark ({cfg.cache.high_watermark})")
    _need(up.multipart_threshold >= up.multipart_chunk, file, "uplink.multipart_threshold", up.multipart_threshold,
          "at least uplink.multipart_chunk")
    _need(not (up.credentials_file and (up.access_key_id or up.secret_access_key)), file, "uplink.credentials_file",
          up.credentials_file, "either credentials_file or access_key_id/secret_access_key, not both")
    _need(up.credentials_file or (up.access_key_id and up.secret_access_key), file, "uplink.access_key_id",
          up.access_key_id, "access_key_id and secret_access_key are both required (or credentials_file)")
    _need(not up.ca_bundle or Path(up.ca_bundle).is_file(), file, "uplink.ca_bundle", up.ca_bundle,
          "an existing PEM file")
    _need(not cfg.dicom.snapshot_interval or up.prefix, file, "dicom.snapshot_interval", cfg.dicom.snapshot_interval,
          "0 while uplink.prefix is empty (snapshots are kept beside the namespace prefix)")
    _check_pem_pair(file, "ftp", cfg.ftp.tls_cert, cfg.ftp.tls_key, "tls_")
    _need(not cfg.ftp.require_tls or cfg.ftp.tls_cert, file, "ftp.require_tls", True, "tls_cert and tls_key to be set")
    _check_metrics_listener(cfg)
    _need(cfg.sftp.password_auth or not cfg.sftp.enabled or any(u.authorized_keys for u in cfg.users), file,
          "sftp.password_auth", False, "true, or authorized_keys for at least one user")
    _need(not (cfg.audit.ship and cfg.audit.ship_prefix.startswith(up.prefix)), file, "audit.ship_prefix",
          cfg.audit.ship_prefix, f"a prefix outside the PACS namespace (uplink.prefix {up.prefix!r}); "
          "with an empty uplink.prefix the whole bucket is the namespace")
    _need(pr.memory_critical <= pr.memory_high, file, "pressure.memory_critical", pr.memory_critical,
          "at most pressure.memory_high")
    _need(not (pr.rss_high and pr.rss_critical and pr.rss_critical < pr.rss_high), file, "pressure.rss_critical",
          pr.rss_critical, "at least pressure.rss_high")
    _need(pr.disk_critical > cfg.cache.high_watermark, file, "pressure.disk_critical", pr.disk_critical,
          f"above cache.high_watermark ({cfg.cache.high_watermark})")
    _need(cfg.prefetch.study_depth > cfg.prefetch.dir_depth or not cfg.prefetch.priors, file, "prefetch.study_depth",
          cfg.prefetch.study_depth, f"deeper than prefetch.dir_depth ({cfg.prefetch.dir_depth}): a study lies inside "
          "a day-directory")
    _need(cfg.scrub.rate >= 10**6, file, "scrub.rate", cfg.scrub.rate, "at least 1MB per second")
    _need(cfg.users, file, "users", [], "at least one [[users]] entry")
    for i, u in enumerate(cfg.users):
        _need(u.name not in {v.name for v in cfg.users[:i]}, file, f"users[{i}].name", u.name, "unique user names")
        _need(not (u.password and u.password_hash), file, f"users[{i}].password", "***",
              "either password or password_hash, not both")
        _need(u.password or u.password_hash or u.authorized_keys, file, f"users[{i}]", u.name,
              "a password, a password_hash or authorized_keys")
        for keyfile in u.authorized_keys:
            _need(Path(keyfile).is_file(), file, f"users[{i}].authorized_keys", keyfile, "an existing readable file")
        _need(not u.password or len(u.password) >= MIN_PASSWORD, file, f"users[{i}].password", "***",
              f"at least {MIN_PASSWORD} characters")
    _need(cfg.server.workers == 1 or not cfg.ha.enabled, file, "server.workers", cfg.server.workers,
          "1 when [ha] is enabled (only the owner process follows the standby role)")
    _need(cfg.login.max_delay_seconds >= cfg.login.delay_seconds, file, "login.max_delay_seconds",
          cfg.login.max_delay_seconds, f"at least login.delay_seconds ({cfg.login.delay_seconds})")
    _check_ports(cfg)
    _check_cache_dir(cfg)
    if cfg.smb.enabled:
        _need(any(u.password for u in cfg.users), file, "smb.enabled", True, "at least one [[users]] entry with a "
              "plain password: Samba authenticates with the password's NT hash, which a password_hash cannot give")
        mp = Path(cfg.smb.mountpoint)
        _need(mp != cfg.cache.dir and not cfg.cache.dir.is_relative_to(mp), file, "smb.mountpoint", str(mp),
              "a directory that does not contain cache.dir")


MIN_PASSWORD = 8


def _check_metrics_listener(cfg: Config) -> None:
    """http.metrics_*: TLS files that load together, a user with a password hash, an [http] that runs."""
    import ssl
    file, h = cfg.path, cfg.http
    if h.metrics_listen is None:
        for key in ("metrics_tls_cert", "metrics_tls_key", "metrics_user", "metrics_password_hash"):
            _need(not getattr(h, key), file, f"http.{key}", getattr(h, key) if "hash" not in key else "***",
                  "set together with http.metrics_listen")
        return
    _need(h.enabled, file, "http.metrics_listen", ":".join(map(str, h.metrics_listen)), "http.enabled = true")
    _check_pem_pair(file, "http", h.metrics_tls_cert, h.metrics_tls_key, "metrics_tls_")
    if h.metrics_tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(h.metrics_tls_cert, h.metrics_tls_key)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(file, "http.metrics_tls_cert", h.metrics_tls_cert,
                              f"a readable PEM certificate chain whose key is http.metrics_tls_key "
                              f"({h.metrics_tls_key}): {e}") from None
    _need(bool(h.metrics_user) == bool(h.metrics_password_hash), file,
          "http.metrics_password_hash" if h.metrics_user else "http.metrics_user", "",
          "metrics_user and metrics_password_hash go together")


def _check_pem_pair(file: Path, section: str, cert: str, key: str, prefix: str) -> None:
    """<prefix>cert and <prefix>key: both set or neither, and both existing files."""
    _need(bool(cert) == bool(key), file, f"{section}.{prefix}{'key' if cert else 'cert'}", "",
          f"{prefix}cert and {prefix}key go together")
    for name, value in (("cert", cert), ("key", key)):
        _need(not value or Path(value).is_file(), file, f"{section}.{prefix}{name}", value, "an existing PEM file")


def _check_ports(cfg: Config) -> None:
    """Two services on one port (or the FTP passive range over a listener) fail only at start-up."""
    file = cfg.path
    listeners = [(f"{name}.listen", getattr(cfg, name).listen) for name in ("ftp", "sftp", "http", "smb")
                 if getattr(cfg, name).enabled]
    if cfg.http.enabled and cfg.http.metrics_listen:
        listeners.append(("http.metrics_listen", cfg.http.metrics_listen))
    wildcard = ("0.0.0.0", "::")
    for (other, addr), (key, listen) in itertools.combinations(listeners, 2):
        clash = listen[1] == addr[1] and (listen[0] == addr[0] or listen[0] in wildcard or addr[0] in wildcard)
        _need(not clash, file, key, ":".join(map(str, listen)), f"an address not already used by {other}")
    if cfg.ftp.enabled:
        low, high = cfg.ftp.passive_ports
        for other, (_, port) in listeners:
            _need(not low <= port <= high, file, "ftp.passive_ports", f"{low}-{high}",
                  f"a range that does not include {other}'s port {port}")


def _check_cache_dir(cfg: Config) -> None:
    """cache.dir must be (or become) a directory on a file system with room beyond min_free_bytes."""
    file, c = cfg.path, cfg.cache
    probe = next(p for p in (c.dir, *c.dir.parents) if p.exists())
    _need(probe.is_dir(), file, "cache.dir", str(c.dir), f"a directory path on the cache SSD ({probe} is not a "
          "directory)")
    st = os.statvfs(probe)
    total = st.f_blocks * st.f_frsize
    _need(c.min_free_bytes < total, file, "cache.min_free_bytes", c.min_free_bytes,
          f"{SIZE}, below the size of the cache file system ({total} bytes at {probe})")


def _check_private(file: Path) -> None:
    """A file holding secrets must not be readable by group or others (mode 0600 or 0400)."""
    mode = file.stat().st_mode & 0o777
    _need(not mode & 0o077, file, "(file mode)", oct(mode), f"0600: this file holds secrets; run: chmod 600 {file}")


def _secret_file(cfg: Config, key: str, name: str, read: Callable[[Path], Any]) -> tuple[Path, Any]:
    """The private file of secrets setting `key` names (relative to the config's directory) → (path, read(path))."""
    path = cfg.path.parent / name  # an absolute name stays as it is
    try:
        value = read(path)
        _check_private(path)
    except OSError as e:
        raise ConfigError(cfg.path, key, name, f"a readable file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", str(e), "valid TOML") from None
    return path, value


def _credentials(cfg: Config) -> Config:
    if not (name := cfg.uplink.credentials_file):
        return cfg
    cred_path, data = _secret_file(cfg, "uplink.credentials_file", name, lambda path: tomllib.loads(path.read_text()))
    keys = ("access_key_id", "secret_access_key")
    for key in keys:
        _need(isinstance(data.get(key), str) and data[key], cred_path, key, "***" if key in data else None,
              "a non-empty string")
    extra = sorted(set(data) - set(keys))
    _need(not extra, cred_path, extra[0] if extra else "", "…", "only access_key_id and secret_access_key")
    return dataclasses.replace(cfg, uplink=dataclasses.replace(cfg.uplink, **{key: data[key] for key in keys}))


def _pseudonym_key(cfg: Config) -> Config:
    """Read dicom.pseudonym_key_file (a secret: mode 0600, never logged)."""
    if not (name := cfg.dicom.pseudonym_key_file):
        return cfg
    path, key = _secret_file(cfg, "dicom.pseudonym_key_file", name, lambda path: path.read_bytes().strip())
    _need(len(key) >= 32, path, "(key)", "***", "at least 32 characters of secret (e.g. openssl rand -hex 32)")
    return dataclasses.replace(cfg, dicom=dataclasses.replace(cfg.dicom, pseudonym_key=key))


def _abs(file: Path, path: str) -> str:
    return path if os.path.isabs(path) else str((file.parent / path).resolve())


# Path settings, relative to the config file's directory: where one left unset goes under cache.dir (None: '')
_PATHS = {("sftp", "host_key"): "ssh_host_ed25519_key", ("smb", "mountpoint"): "fs", ("smb", "state_dir"): "smb",
          ("audit", "path"): "audit/audit.jsonl", ("ftp", "tls_cert"): None, ("ftp", "tls_key"): None,
          ("uplink", "ca_bundle"): None, ("ha", "role_file"): None, ("http", "metrics_tls_cert"): None,
          ("http", "metrics_tls_key"): None}


def _tables(file: Path, key: str, raw: Any, cls: type) -> tuple[Any, ...]:
    """An array of tables such as [[users]]."""
    _need(isinstance(raw, list), file, key, raw, f"an array of tables: [[{key}]]")
    return tuple(_build(cls, r, file, f"{key}[{i}]") for i, r in enumerate(raw))


def load(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError naming the file and key on any problem."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except OSError as e:
        raise ConfigError(file, "(file)", str(file), f"a readable TOML file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "(syntax)", str(e), "valid TOML") from None
    for key, value in data.items():
        _need(key in _SECTIONS or key == "users", file, key, value,
              f"unknown section; allowed: {', '.join(sorted([*_SECTIONS, 'users']))}")
    for required in ("cache", "uplink"):
        _need(required in data, file, required, None, f"required section [{required}]")
    compliance = data.get("compliance", {})
    rules_raw = compliance.pop("rules", []) if isinstance(compliance, dict) else []
    sections = {name: _build(cls, data.get(name, {}), file, name) for name, cls in _SECTIONS.items()}
    rules = _tables(file, "compliance.rules", rules_raw, RetentionRule)
    sections["compliance"] = dataclasses.replace(sections["compliance"], rules=rules)
    for i, (rule, raw) in enumerate(zip(rules, rules_raw, strict=True)):
        _need(rule.selects_dicom or "prefix" in raw, file, f"compliance.rules[{i}].prefix", None,
              "required in a rule that selects by no DICOM attribute (a path rule)")
    cache_dir = Path(_abs(file, str(sections["cache"].dir)))
    sections["cache"] = dataclasses.replace(sections["cache"], dir=cache_dir)
    for (name, key), under in _PATHS.items():
        if (value := getattr(sections[name], key)) or under:
            sections[name] = dataclasses.replace(sections[name], **{
                key: _abs(file, value) if value else str(cache_dir / under)})
    audit, prefix = sections["audit"], sections["uplink"].prefix
    sections["audit"] = dataclasses.replace(audit, ship_prefix=audit.ship_prefix or "pacsgw-audit/" + prefix)
    if "snapshot_interval" not in (data.get("dicom") or {}) and prefix:
        sections["dicom"] = dataclasses.replace(sections["dicom"], snapshot_interval=DAILY_SNAPSHOT)
    users = tuple(dataclasses.replace(u, authorized_keys=tuple(_abs(file, k) for k in u.authorized_keys))
                  for u in _tables(file, "users", data.get("users", []), UserConfig))
    cfg = Config(path=file, users=users, **sections)
    _check_cross(cfg)
    if cfg.uplink.secret_access_key or any(u.password for u in cfg.users):
        _check_private(file)
    return _pseudonym_key(_credentials(cfg))


def load_or_exit(path: str) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        raise SystemExit(complain(f"configuration error: {e}", 2)) from None


def shown(text: str) -> str:
    """Text for an admin's terminal or an FTP reply, control characters escaped: another S3 client's key could
    rewrite the one, end the other."""
    if text.isprintable():  # nearly every line: no per-character pass
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def complain(why: str, code: int) -> int:
    """A command's problem on stderr (stdout is its answer) → the exit code it ends with."""
    print(f"pacsgw: {why}", file=sys.stderr)
    return code
