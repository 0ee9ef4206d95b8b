"""Password hashing (scrypt, stdlib) and verification for [[users]]; backoff and bans against guessing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections import deque

import structlog

from agent.audit import AuditLog, Who
from agent.config import LoginConfig
from agent.metrics import Metrics

log = structlog.get_logger("pacsgw.auth")

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """'scrypt$N$r$p$salt$hash' with base64 fields; the format 'password_hash' expects."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_N}${_R}${_P}${b64(salt)}${b64(digest)}"


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise ValueError("malformed scrypt hash") from e
    if n < 2 or n & (n - 1) or not (1 <= r <= 32 and 1 <= p <= 16) or len(digest) < 16:
        raise ValueError("implausible scrypt parameters")
    return n, r, p, salt, digest


def verify_password(password: str, *, plain: str = "", encoded: str = "") -> bool:
    """Constant-time check against either a plain config password or a scrypt hash."""
    if encoded:
        n, r, p, salt, digest = parse_hash(encoded)
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest),
                                   maxmem=256 * 1024 * 1024)
        return hmac.compare_digest(candidate, digest)
    if plain:
        return hmac.compare_digest(password.encode(), plain.encode())
    return False


class LoginGuard:
    """Backoff and temporary bans against password guessing, shared by every front end of one agent.

    Each failed login delays its answer by delay_seconds, doubled for every earlier failure of the same
    address or user within window_seconds (up to max_delay_seconds). max_failures within the window ban the
    address, or lock the user, for ban_seconds: logins are then refused without checking the password.
    A locked user can still log in from an address it logged in from successfully before the lock, so a
    guesser elsewhere on the network cannot lock the PACS out. Memory is bounded: old entries are pruned.
    """

    MAX_TRACKED = 100_000

    def __init__(self, cfg: LoginConfig, metrics: Metrics, audit: AuditLog) -> None:
        self.cfg, self.metrics, self.audit = cfg, metrics, audit
        self._failures: dict[tuple[str, str], deque[float]] = {}  # (scope, key) → failure times
        self._banned: dict[tuple[str, str], float] = {}           # (scope, key) → ban end
        self._trusted: dict[str, dict[str, float]] = {}           # user → {address: last good login}

    def refusal(self, user: str, address: str, protocol: str, now: float | None = None) -> str:
        """Why a login must be refused unchecked now ('' when it may be checked)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        for scope, key in (("address", address), ("user", user)):
            if (scope, key) in self._banned:
                if scope == "user" and address in self._trusted.get(user, {}):
                    continue
                self.metrics.login_refused.labels(protocol, scope).inc()
                log.warning("login_refused", protocol=protocol, user=user, peer=address, reason=f"{scope} banned")
                self.audit.record(Who(user, protocol, address), "login", "", f"refused: {scope} temporarily banned")
                return f"too many failed logins: {scope} temporarily banned"
        return ""

    def banned(self, scope: str, now: float | None = None) -> list[str]:
        """The addresses (scope 'address') or users ('user') banned now, for a front end that enforces bans
        elsewhere (Samba checks SMB passwords itself: its smb.conf denies banned addresses)."""
        self._expire(time.monotonic() if now is None else now)
        return sorted(key for sc, key in self._banned if sc == scope)

    def succeeded(self, user: str, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.pop(("address", address), None)
        self._trusted.setdefault(user, {})[address] = now

    def failed(self, user: str, address: str, protocol: str, now: float | None = None) -> float:
        """Record a failed login → the seconds to wait before answering it."""
        now = time.monotonic() if now is None else now
        self.metrics.login_failures.labels(protocol).inc()
        if len(self._failures) >= self.MAX_TRACKED:
            self._prune(now)
        worst = 0
        for scope, key in (("address", address), ("user", user)):
            times = self._failures.setdefault((scope, key), deque())
            while times and times[0] <= now - self.cfg.window_seconds:
                times.popleft()
            times.append(now)
            worst = max(worst, len(times))
            if len(times) >= self.cfg.max_failures and (scope, key) not in self._banned:
                self._banned[(scope, key)] = now + self.cfg.ban_seconds
                times.clear()
                self.metrics.login_bans.labels(scope).inc()
                self.metrics.login_banned.labels(scope).inc()
                log.warning("login_ban", scope=scope, key=key, protocol=protocol, seconds=self.cfg.ban_seconds,
                            failures=self.cfg.max_failures)
                self.audit.record(Who(user, protocol, address), "ban", "", f"{scope} banned for "
                                  f"{self.cfg.ban_seconds:g} s after {self.cfg.max_failures} failed logins")
        return min(self.cfg.delay_seconds * 2 ** (worst - 1), self.cfg.max_delay_seconds)

    def _expire(self, now: float) -> None:
        for k, end in list(self._banned.items()):
            if end <= now:
                del self._banned[k]
                self.metrics.login_banned.labels(k[0]).dec()

    def _prune(self, now: float) -> None:
        horizon = now - self.cfg.window_seconds
        self._failures = {k: t for k, t in self._failures.items() if t and t[-1] > horizon}
        for user, addrs in list(self._trusted.items()):
            self._trusted[user] = dict(sorted(addrs.items(), key=lambda kv: kv[1])[-16:])
