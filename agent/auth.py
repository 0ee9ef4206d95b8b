"""Password hashing (scrypt, stdlib) and verification for [[users]]; backoff and bans against guessing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Concatenate, Coroutine, Hashable, Iterable, Iterator, ParamSpec, TypeVar

import structlog

from agent.audit import AuditLog, Who
from agent.config import LoginConfig, UserConfig, parse_hash
from agent.metrics import Metrics

log = structlog.get_logger("pacsgw.auth")

_N, _R, _P = 2**14, 8, 1
T = TypeVar("T")
P = ParamSpec("P")
GUARD_FILE = "logins.sqlite"  # in the cache directory: LoginGuard's box-wide counts
REFUSALS_EVERY = 60.0  # seconds: at most one event (and audit record) per refused address, user or session cap
NAME_CHARS = 32  # the longest [[users]] name (agent.config._name)
SHOWN_NAME_CHARS = 64


def login_name(name: str) -> str:
    """A login's user name as the guard keys it and logs and audit records show it: one longer than SHOWN_NAME_CHARS
    (no configured name, so no login) cut to its first NAME_CHARS characters and its length, a form that itself
    stays within SHOWN_NAME_CHARS. An FTP USER of 8 000 characters was an 8 KB audit record, log line and guard key."""
    return name if len(name) <= SHOWN_NAME_CHARS else f"{name[:NAME_CHARS]}…({len(name)} characters)"


def hash_password(password: str) -> str:
    """'scrypt$N$r$p$salt$hash' with base64 fields; the format 'password_hash' expects."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, *, plain: str = "", encoded: str = "") -> bool:
    """Constant-time check against either a plain config password or a scrypt hash."""
    if encoded:
        n, r, p, salt, digest = parse_hash(encoded)
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 << 20)
        return hmac.compare_digest(candidate, digest)
    return bool(plain) and hmac.compare_digest(password.encode(), plain.encode())


class Passwords:
    """The password check at one cost whatever the name, so answer times do not tell which names exist."""

    def __init__(self, users: Iterable[UserConfig]) -> None:
        self.users = {u.name: u for u in users}
        self.decoy = next((u.password_hash for u in self.users.values() if u.password_hash), "")

    def check(self, name: str, password: str) -> bool:
        if (user := self.users.get(name)) is not None and user.password_hash:
            return verify_password(password, encoded=user.password_hash)
        if self.decoy:
            verify_password(password, encoded=self.decoy)  # the time a hash takes; its answer means nothing here
        return user is not None and verify_password(password, plain=user.password)


def unmapped(address: str) -> str:
    """The one form of a peer address (::ffff:a.b.c.d as a.b.c.d): a ban holds on every listener."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None else ip)


def address_group(address: str) -> str:
    """The key of the per-address caps, failed-login counts and bans: the address (unmapped), and an IPv6 one's /64.
    A client is given a /64 at least (SLAAC, a home or office prefix) and may use any of its 2^64 addresses: capped
    or banned per address, one client held as many connections, and tried as many passwords, as it took addresses."""
    address = unmapped(address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else address


class Every:
    """At most one event per `seconds` for each key: a client repeating a refused request fills no journal."""

    def __init__(self, seconds: float, kept: int = 4096) -> None:
        self.seconds, self.kept = seconds, kept
        self._last: dict[Hashable, tuple[float, int]] = {}  # key → (its last event, held back since)

    def due(self, key: Hashable) -> int | None:
        """→ how many were held back since the key's last event, when one is due now; None when not."""
        now = time.monotonic()
        last, since = self._last.get(key, (-self.seconds, 0))
        if now - last < self.seconds:
            self._last[key] = (last, since + 1)
            return None
        if len(self._last) >= self.kept:  # forget the quiet ones (or all, when every one is busy)
            for k in [k for k, (at, _) in self._last.items() if now - at >= self.seconds] or list(self._last):
                del self._last[k]
        self._last[key] = (now, 0)
        return since


def refusal(reason: str, since: int) -> str:
    """The audit detail of a refusal told once per key (`Every`): with how many were held back since the last one."""
    return f"refused: {reason}" + (f" ({since} more since the last record)" if since else "")


async def kept(take: Coroutine[Any, Any, T], give_back: Callable[[T], object]) -> T:
    """take's result (slots the guard's thread takes); a caller cancelled meanwhile (its client went away) gives them
    back with give_back(result) once they come."""
    task = asyncio.ensure_future(take)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda _: task.exception() or give_back(task.result()))
        raise


def _on_thread(method: Callable[Concatenate[LoginGuard, P], T],
               ) -> Callable[Concatenate[LoginGuard, P], Coroutine[Any, Any, T]]:
    """The method runs on the guard's own thread: a wait for another process's lock never stalls the event loop."""
    @functools.wraps(method)
    async def call(self: LoginGuard, *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, functools.partial(method, self, *args, **kwargs))
    return call


class LoginGuard:
    """Backoff, temporary bans and session caps against password guessing (README, `[login]`), for every front end
    of every serving process of the box (docs/workers.md); a dead process's slots are freed at a cap."""

    MAX_TRACKED = 100_000
    TRUSTED_PER_USER = 16
    BUSY_MS = 200  # the longest a call waits for another process's transaction
    GAUGE_S = 1.0  # pacsgw_login_banned is counted again at most this often (bans of other processes show)
    ATTEMPT_WAIT = 10.0  # the longest a password check waits for the checks under way (LoginGuard.attempt)
    ATTEMPT_POLL = (0.01, 0.5)  # seconds between its tries: the first, the longest

    def __init__(self, cfg: LoginConfig, metrics: Metrics, audit: AuditLog, path: Path | None = None) -> None:
        self.cfg, self.metrics, self.audit = cfg, metrics, audit
        self.db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None, check_same_thread=False)
        # Held past BUSY_MS: a stuck process (_unless_unrecordable). NORMAL: a power cut forgets, never corrupts
        self.db.execute(f"PRAGMA busy_timeout={self.BUSY_MS}")
        if path:
            self.db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL")
        self.db.executescript(_GUARD_SCHEMA)
        self._me = _process_identity(os.getpid())
        self._unreleased: list[int] = []  # slots whose release could not be recorded: retried with the next call
        self._gauged = float("-inf")
        self._told = Every(REFUSALS_EVERY)  # refused logins logged and audited: (protocol, scope, key)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="login-guard")  # one: calls run in order
        with self._tx():
            boot = self.db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
            if boot is None or boot[0] != _BOOT_ID:  # monotonic times of another boot mean nothing
                for table in ("failures", "bans", "trusted", "sessions"):
                    self.db.execute(f"DELETE FROM {table}")
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot', ?)", (_BOOT_ID,))

    def close(self) -> None:
        """After the releases still queued; a later one fails unseen, its slot going with this process (_full)."""
        self._thread.submit(self.db.close).result()

    def release_session(self, slot: int) -> Future[None]:
        """Queued on the guard's thread: connection callbacks and cleanups need not wait."""
        return self._thread.submit(self._release, slot)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # also a COMMIT that failed (disk full) leaves it open
                self.db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _unless_unrecordable(self, what: str) -> Iterator[None]:
        """A full disk or stuck process must not lock the PACS out: unrecorded logins pass, failures wait longest."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY):
                raise
            log.error("login_guard_not_recorded", what=what, error=str(e))

    @_on_thread
    def refusal(self, user: str, address: str, protocol: str, now: float | None = None) -> str:
        """Why a login must be refused unchecked now ('' when it may be checked)."""
        now, address, user = time.monotonic() if now is None else now, unmapped(address), login_name(user)
        # reads only: in WAL mode another process's write lock never blocks them, and a full disk neither
        with self._unless_unrecordable("ban check"):
            self._gauge(now)  # bans other processes imposed show here too
            for scope, key in (("address", address_group(address)), ("user", user)):
                if self.db.execute("SELECT 1 FROM bans WHERE scope = ? AND key = ? AND until > ?",
                                   (scope, key, now)).fetchone():
                    # A user's ban, or a /64's another of its hosts earned, spares where the user logged in from
                    if (scope == "user" or key != address) and self.db.execute(
                            "SELECT 1 FROM trusted WHERE user = ? AND address = ?", (user, address)).fetchone():
                        continue
                    self.metrics.login_refused.labels(protocol, scope).inc()
                    if (since := self._told.due((protocol, scope, key))) is not None:
                        log.warning("login_refused", protocol=protocol, user=user, peer=address,
                                    reason=f"{scope} banned", refused_since=since)
                        self.audit.record(Who(user, protocol, address), "login", "",
                                          refusal(f"{scope} temporarily banned", since))
                    return f"too many failed logins: {scope} temporarily banned"
            return ""
        self.metrics.login_refused.labels(protocol, "unchecked").inc()
        log.warning("login_refused", protocol=protocol, user=user, peer=address, reason="bans not readable")
        self.audit.record(Who(user, protocol, address), "login", "", "refused: bans could not be checked")
        return "login check unavailable: try again later"

    @contextlib.asynccontextmanager
    async def attempt(self, user: str, address: str, protocol: str) -> AsyncIterator[str]:
        """One password check → why it is refused unchecked ('': check and record it inside), once the box's failures
        and checks under way leave room below max_failures (30 sent at once were all checked); else refused."""
        user = login_name(user)
        if refusal := await self.refusal(user, address, protocol):
            yield refusal
            return
        address, pause = unmapped(address), self.ATTEMPT_POLL[0]
        deadline = time.monotonic() + self.ATTEMPT_WAIT
        while (slots := await kept(self._admit(user, address),
                                   lambda slots: [self.release_session(s) for s in slots or []])) is None:
            if time.monotonic() > deadline:
                log.warning("login_refused", protocol=protocol, user=user, peer=address, reason="too many at once")
                yield "too many logins at once from your address or for this user; try again later"
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, self.ATTEMPT_POLL[1])  # many waiting connections must not busy the guard
        try:
            yield await self.refusal(user, address, protocol)  # a ban the checks ahead of it made
        finally:
            for slot in slots:
                self.release_session(slot)

    @_on_thread
    def _admit(self, user: str, address: str) -> list[int] | None:
        """Slots 'attempt address' and (untrusted) 'attempt user' → ids; None at max_failures; [] unrecordable."""
        now = time.monotonic()
        self._release_pending()
        with self._unless_unrecordable("login attempt"), self._tx():
            trusted = self.db.execute("SELECT 1 FROM trusted WHERE user = ? AND address = ?",
                                      (user, address)).fetchone()
            # Where the user logged in from is held to its own checks, not its /64's: a host of its LAN guessing
            # would hold them all, and the PACS wait for its turn
            keys = [("address", address)] if trusted else [("address", address_group(address)), ("user", user)]
            for scope, key in keys:
                (failures,) = self.db.execute("SELECT COUNT(*) FROM failures WHERE scope = ? AND key = ? AND at > ?",
                                              (scope, key, now - self.cfg.window_seconds)).fetchone()
                if self._full(f"attempt {scope}", key, self.cfg.max_failures - failures):
                    return None
            return [self._slot(f"attempt {scope}", key) for scope, key in keys]
        return []

    @_on_thread
    def banned(self, scope: str, now: float | None = None) -> list[str]:
        """The addresses or users banned now, for a front end that enforces bans elsewhere (Samba's smb.conf)."""
        now = time.monotonic() if now is None else now
        self._gauge(now)
        keys = [k for (k,) in self.db.execute("SELECT key FROM bans WHERE scope = ? AND until > ? ORDER BY key",
                                              (scope, now))]
        self.metrics.login_banned.labels(scope).set(len(keys))  # exact now, as smb.conf will be (not up to 1 s old)
        return keys

    @_on_thread
    def succeeded(self, user: str, address: str, now: float | None = None) -> None:
        now, address, user = time.monotonic() if now is None else now, unmapped(address), login_name(user)
        with self._unless_unrecordable("login"), self._tx():
            # Not a /64's: another of its hosts may be the one guessing, and would start again at each success
            self.db.execute("DELETE FROM failures WHERE scope = 'address' AND key = ?", (address,))
            self.db.execute("INSERT OR REPLACE INTO trusted (user, address, at) VALUES (?, ?, ?)", (user, address, now))
            self.db.execute("DELETE FROM trusted WHERE user = ? AND address NOT IN (SELECT address FROM trusted "
                            "WHERE user = ? ORDER BY at DESC LIMIT ?)", (user, user, self.TRUSTED_PER_USER))

    @_on_thread
    def known(self, address: str) -> bool:
        """Whether some user logged in from address before (since boot; at most TRUSTED_PER_USER per user)."""
        with self._unless_unrecordable("known address"):
            return self.db.execute("SELECT 1 FROM trusted WHERE address = ? LIMIT 1",
                                   (unmapped(address),)).fetchone() is not None
        return False

    @_on_thread
    def failed(self, user: str, address: str, protocol: str, now: float | None = None) -> float:
        """Record a failed login → the seconds to wait before answering it."""
        now, address, user = time.monotonic() if now is None else now, unmapped(address), login_name(user)
        self.metrics.login_failures.labels(protocol).inc()
        worst = 0
        with self._unless_unrecordable("failed login"), self._tx():
            self.db.execute("DELETE FROM failures WHERE at <= ?", (now - self.cfg.window_seconds,))
            self.db.execute("DELETE FROM bans WHERE until <= ?", (now,))
            for scope, key in (("address", address_group(address)), ("user", user)):
                self.db.execute("INSERT INTO failures (scope, key, at) VALUES (?, ?, ?)", (scope, key, now))
                (count,) = self.db.execute("SELECT COUNT(*) FROM failures WHERE scope = ? AND key = ?",
                                           (scope, key)).fetchone()
                worst = max(worst, count)
                if count >= self.cfg.max_failures and not self.db.execute(
                        "SELECT 1 FROM bans WHERE scope = ? AND key = ?", (scope, key)).fetchone():
                    self.db.execute("INSERT INTO bans (scope, key, until) VALUES (?, ?, ?)",
                                    (scope, key, now + self.cfg.ban_seconds))
                    self.db.execute("DELETE FROM failures WHERE scope = ? AND key = ?", (scope, key))
                    self.metrics.login_bans.labels(scope).inc()
                    log.warning("login_ban", scope=scope, key=key, protocol=protocol, seconds=self.cfg.ban_seconds,
                                failures=self.cfg.max_failures)
                    self.audit.record(Who(user, protocol, address), "ban", "", f"{scope} banned for "
                                      f"{self.cfg.ban_seconds:g} s after {self.cfg.max_failures} failed logins")
            # rowids grow: this keeps the newest MAX_TRACKED failures (a spray from many addresses is bounded)
            self.db.execute("DELETE FROM failures WHERE rowid <= (SELECT MAX(rowid) FROM failures) - ?",
                            (self.MAX_TRACKED,))
            self._gauge(now, fresh=worst >= self.cfg.max_failures)
            return min(self.cfg.delay_seconds * 2 ** (worst - 1), self.cfg.max_delay_seconds)
        return self.cfg.max_delay_seconds

    @_on_thread
    def take_session(self, scope: str, key: str, cap: int) -> int | None:
        """A box-wide session slot for key while fewer than cap → its id; None at the cap; 0 unrecordable."""
        key = address_group(key) if scope.endswith("address") else key
        self._release_pending()
        with self._unless_unrecordable("session"), self._tx():
            return None if self._full(scope, key, cap) else self._slot(scope, key)
        return 0

    def _release(self, slot: int) -> None:
        if slot:
            self._unreleased.append(slot)
            self._release_pending()

    def _release_pending(self) -> None:
        if self._unreleased:
            with self._unless_unrecordable("session end"):
                with self._tx():
                    self.db.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in self._unreleased])
                self._unreleased = []  # committed

    def _full(self, scope: str, key: str, cap: int) -> bool:
        """key holds cap slots of scope, counted again after freeing those of processes gone (killed unreleased)."""
        count = "SELECT COUNT(*) FROM sessions WHERE scope = ? AND key = ?"
        if self.db.execute(count, (scope, key)).fetchone()[0] < cap:
            return False
        for pid, started in self.db.execute("SELECT DISTINCT pid, started FROM sessions WHERE scope = ? AND key = ?",
                                            (scope, key)).fetchall():
            with contextlib.suppress(OSError):  # not known gone (out of descriptors, attack48): its slots count
                if _process_identity(pid) != (pid, started):
                    self.db.execute("DELETE FROM sessions WHERE pid = ? AND started = ?", (pid, started))
                    log.warning("session_slots_freed", scope=scope, key=key, pid=pid, reason="process gone")
        return bool(self.db.execute(count, (scope, key)).fetchone()[0] >= cap)

    def _slot(self, scope: str, key: str) -> int:
        return int(self.db.execute("INSERT INTO sessions (scope, key, pid, started) VALUES (?, ?, ?, ?)",
                                   (scope, key, *self._me)).lastrowid or 0)

    def _gauge(self, now: float, fresh: bool = False) -> None:
        """pacsgw_login_banned: two counts, at most every GAUGE_S (each login asks), and after a new ban."""
        if not fresh and now - self._gauged < self.GAUGE_S:
            return
        self._gauged = now
        for scope in ("address", "user"):
            (n,) = self.db.execute("SELECT COUNT(*) FROM bans WHERE scope = ? AND until > ?", (scope, now)).fetchone()
            self.metrics.login_banned.labels(scope).set(n)


_GUARD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (scope TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_by_key ON failures (scope, key);
CREATE INDEX IF NOT EXISTS failures_by_time ON failures (at);
CREATE TABLE IF NOT EXISTS bans (scope TEXT NOT NULL, key TEXT NOT NULL, until REAL NOT NULL,
                                 PRIMARY KEY (scope, key));
CREATE TABLE IF NOT EXISTS trusted (user TEXT NOT NULL, address TEXT NOT NULL, at REAL NOT NULL,
                                    PRIMARY KEY (user, address));
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, key TEXT NOT NULL,
                                     pid INTEGER NOT NULL, started INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_key ON sessions (scope, key);
"""


try:
    _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
except OSError:
    _BOOT_ID = ""


def _process_identity(pid: int) -> tuple[int, int]:
    """(pid, its start time since boot): a reused pid names another process; (pid, -1) when none runs (or a zombie).
    OSError when /proc cannot tell (out of descriptors: that was taken for no process, and live slots were freed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # from field 3, the state
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it ended while read
        return pid, -1
    return pid, -1 if fields[0] in ("Z", "X") else int(fields[19])  # field 22: the start time
