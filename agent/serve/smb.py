"""SMB service: Samba's smbd sharing the agent's FUSE view of the gateway namespace.

The agent mounts the namespace with FUSE (agent.serve.fuse), renders smb.conf from the TOML, keeps Samba's users
in step with [[users]] and, with `[smb] manage = true`, runs and supervises smbd itself (else systemd does).

Each [[users]] name maps (`username map`) to a locked Unix account `pacsgw-<name>` in the `[smb] unix_user`
account's group: smbd works as that account, so the FUSE layer knows each request's SMB user from its uid. A user's
`root` is its share path `<state_dir>/roots/%u`, a symlink (by the account that logged in, not %U, the name typed,
which Samba matches without case) to `<mountpoint>/<root>`. Samba checks NTLM against the password's NT hash: only
users with a plain `password` can use SMB (the others are logged and left out).

Password guessing ([login]): Samba's account policy locks a user after max_failures; the agent follows Samba's
JSON authentication audit into the LoginGuard of FTP and SFTP and denies the addresses it bans in smb.conf (cutting
their connections). Samba can neither delay an answer nor cap a client: SMB gets the ban, not the growing delay,
and an address holding max_sessions_per_address connections is denied the same way meanwhile (an IPv6 client's
/64 counted and denied as one address, as the other front ends count it).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import ipaddress
import json
import math
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent.audit import Who
from agent.auth import LoginGuard, address_group, unmapped
from agent.config import Config, UserConfig
from agent.serve.contract import DEAD_PEER_S, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, login, refuse_session, watch_failed
from agent.serve.fuse import GatewayFS, SmbPeers
from agent.store.errors import AlreadyExists
from agent.store.gateway import Gateway

log = structlog.get_logger("pacsgw.smb")

ACCOUNT_PREFIX = "pacsgw-"
SMBD_STOP_SECONDS = 10.0
AUTH_POLL_SECONDS = 0.25
AUTH_LOG = "log/auth.json"  # Samba's JSON authentication audit, below state_dir
BANS_CONF = "bans.conf"     # included by smb.conf: the addresses the LoginGuard bans now
MEMORY_CHECK_SECONDS = 2.0  # how often the smbd processes' memory is compared with [smb] max_process_memory


def unix_account(name: str) -> str:
    """The Unix account Samba maps an SMB user to: 'pacsgw-<name>', valid for useradd (≤ 32, a-z0-9_-)."""
    plain = ACCOUNT_PREFIX + name
    if re.fullmatch(r"[a-z0-9_][a-z0-9_-]*", name) and len(plain) <= 32:
        return plain
    clean = re.sub(r"[^a-z0-9_-]", "_", name.lower())[:14]
    return f"{ACCOUNT_PREFIX}{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def smb_users(cfg: Config) -> list[UserConfig]:
    return [u for u in cfg.users if u.password]


def render_conf(cfg: Config) -> str:
    s = cfg.smb
    host, port = s.listen
    state = s.state_dir
    lines = [
        "# Rendered by pacsgw from " + str(cfg.path) + " — do not edit; edit the agent's TOML instead.",
        "[global]",
        "server role = standalone server",
        "security = user",
        "passdb backend = tdbsam",
        *(f"{option} = {state}/{below}" for option, below in (
            ("private dir", "private"), ("lock directory", "lock"), ("state directory", "state"),
            ("cache directory", "cache"), ("pid directory", "run"), ("ncalrpc dir", "run/ncalrpc"))),
        f"log file = {state}/log/smbd.log",
        "max log size = 10000",
        # failed (level 2) and successful (level 3) logins as JSON, in a file of their own the agent follows
        f"log level = 1 auth_json_audit:3@{state}/{AUTH_LOG}",
        f"username map = {state}/usermap",
        f"smb ports = {port}",
        # a wildcard address listens on every interface (Samba cannot name 0.0.0.0), any other on its own
        *(["bind interfaces only = no"] if host != "localhost" and ipaddress.ip_address(host).is_unspecified
          else [f"interfaces = {host}", "bind interfaces only = yes"]),
        *([f"hosts allow = {' '.join(s.hosts_allow)}", "hosts deny = ALL"] if s.hosts_allow else []),
        f"include = {state}/{BANS_CONF}",  # after the hosts lines: it overrides them while a ban lasts
        "disable netbios = yes",
        "server min protocol = SMB3_00",  # plain "SMB3" means SMB3_11 only: Windows 8 / Server 2012 need 3.0(2)
        "server signing = mandatory",
        f"server smb encrypt = {s.encryption}",  # the config allows Samba's own words only
        "map to guest = never",
        # an idle connection (an smbd process) is closed after 10 minutes, not a week; clients reconnect
        "deadtime = 10",
        # A client gone without a word (power cut, pulled cable) is dropped after DEAD_PEER_S of silence: TCP keepalive
        # (smbd sends no SMB2 echo) and a user timeout (an answer never acknowledged) found it after 2 h 11 min
        # (15 min), its unfinished upload holding the name all along (STATUS_SHARING_VIOLATION to the PACS sending it
        # again)
        f"socket options = TCP_NODELAY TCP_KEEPIDLE={KEEPALIVE_IDLE} TCP_KEEPINTVL={KEEPALIVE_INTERVAL} "
        f"TCP_USER_TIMEOUT={DEAD_PEER_S * 1000}",
        # a connection is a process: a flood from many addresses forked without end; one over this is closed
        f"max smbd processes = {s.max_connections}",
        # One process per connection (SmbPeers): with multi-channel, Samba handed a new connection naming a connected
        # ClientGUID to that client's process before any login, and a stranger's NEGOTIATE kept a PACS's process
        # 'connected' after its connection was cut: its unfinished upload was then stored whole (fuse._cut_short)
        "server multi channel support = no",
        "restrict anonymous = 2",
        "load printers = no",
        "printing = bsd",
        "printcap name = /dev/null",
        "disable spoolss = yes",
        "unix password sync = no",
        "obey pam restrictions = no",
        "invalid users = root",
        # Shared with FTP/SFTP: no client caching another protocol's change makes stale, no kernel locks or xattrs
        *(f"{option} = no" for option in (
            "oplocks", "level2 oplocks", "smb2 leases", "kernel oplocks", "kernel share modes", "posix locking",
            "ea support", "store dos attributes", "map archive", "map hidden", "map system", "map readonly",
            "nt acl support")),
        "acl allow execute always = yes",  # an open for FILE_EXECUTE (clients probe rename targets so) is fine
        "stat cache = no",
        "use sendfile = no",
        "strict sync = no",
        "",
        f"[{s.share}]",
        f"path = {state}/roots/%u",
        "comment = pacsgw PACS archive",
        "browseable = yes",
        "read only = no",
        f"valid users = {' '.join(n for u in smb_users(cfg) for n in (u.name, unix_account(u.name))) or 'nobody'}",
        "create mask = 0660",
        "directory mask = 0770",
        "wide links = no",
        "follow symlinks = no",
        "hide dot files = no",
        f"case sensitive = {'yes' if s.case_sensitive else 'auto'}",
        "preserve case = yes",
        "short preserve case = yes",
        "",
    ]
    return "\n".join(lines)


def render_bans(cfg: Config, banned: list[str]) -> str:
    """bans.conf: deny the banned addresses (Samba lets `hosts allow` win over `hosts deny`: EXCEPT then)."""
    if not banned:
        return "# no address is banned now\n"
    if cfg.smb.hosts_allow:
        return f"hosts allow = {' '.join(cfg.smb.hosts_allow)} EXCEPT {' '.join(banned)}\n"
    return f"hosts deny = {' '.join(banned)}\n"


def _proc_address(text: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (hex, 32-bit words in host order) → its usual text."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian hosts (x86, arm64)
    return unmapped(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words))


def connections_by_address(port: int) -> Counter[str]:
    """Established TCP connections to `port` per client address (smbd has no per-client cap). A table that cannot be
    read raises: none counted (out of descriptors, attack48) lifted the denial of an address over its cap."""
    counts: Counter[str] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:  # no tcp6 without IPv6
            next(f)
            for line in f:
                local, remote, state = line.split()[1:4]
                if state == "01" and int(local.rpartition(":")[2], 16) == port:
                    counts[_proc_address(remote.rpartition(":")[0])] += 1
    return counts


def per_group(counts: Counter[str]) -> Counter[str]:
    """Counts per address → per address_group (an IPv6 client's /64 as one), which smb.conf denies as such:
    Samba reads "fd00:1:2:3::/64" in hosts deny as a network and its prefix length (lib/util/access.c)."""
    return Counter(address_group(address) for address in counts.elements())


def auth_event(line: str) -> tuple[str, str, bool] | None:
    """A line of Samba's JSON authentication audit → (user, client address, succeeded), None for others."""
    start = line.find("{")
    try:
        record = json.loads(line[start:]) if start >= 0 else {}
    except ValueError:
        return None
    event = record.get("Authentication") if isinstance(record, dict) else None
    if not isinstance(event, dict):
        return None
    remote, status = event.get("remoteAddress") or "", event.get("status") or ""
    if not remote.startswith(("ipv4:", "ipv6:")) or not status:
        return None
    address = unmapped(remote.split(":", 1)[1].rsplit(":", 1)[0])  # as the guard keys it, also in the audit
    return str(event.get("clientAccount") or "-"), address, status == "NT_STATUS_OK"


def _ensure_account(name: str, *, group: str | None = None) -> tuple[int, int]:
    """The Unix account `name` (created if missing; with `group` as its primary group) → (uid, gid)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _useradd(name, group)
    else:
        if group is not None and grp.getgrgid(pw.pw_gid).gr_name != group:
            subprocess.run(["usermod", "--gid", group, name], check=True, capture_output=True)
            log.info("unix_account_group_set", account=name, group=group)
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def _useradd(name: str, group: str | None) -> None:
    """Create the account, trying again: another agent starting now may hold /etc/passwd's lock or make it."""
    cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    cmd += ["--gid", group] if group else ["--user-group"]
    for _ in range(10):
        done = subprocess.run([*cmd, name], capture_output=True)
        if done.returncode == 0:
            log.info("unix_account_created", account=name)
            return
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return
        time.sleep(0.2)
    done.check_returncode()


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(4 * 1024 * 1024)


def _check_searchable(path: Path, uid: int, gid: int, account: str) -> None:
    """smbd enters the share as the service account: every directory on the way must let it through."""
    p = path.absolute()
    for d in [p, *p.parents]:
        st = d.stat()
        if st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100) or (st.st_gid == gid and st.st_mode & 0o010):
            continue
        raise RuntimeError(f"[smb]: the service account {account!r} cannot reach {path}: {d} is not searchable "
                           f"by it (mode {oct(st.st_mode & 0o777)}); choose mountpoint/state_dir elsewhere "
                           f"or chmod o+x {d}")


class SmbService:
    def __init__(self, cfg: Config, gateway: Gateway, logins: LoginGuard) -> None:
        self.cfg, self.gateway, self.logins = cfg, gateway, logins
        self.state = Path(cfg.smb.state_dir)
        self.conf_path = self.state / "smb.conf"
        self.fs: GatewayFS | None = None  # mounted at [smb] mountpoint
        self.proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._auth_watch: asyncio.Task[None] | None = None
        self._memory_watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        self._bans: list[str] = []  # denied in bans.conf now: banned by the guard…
        self._full: list[str] = []  # …or holding max_sessions_per_address connections

    # --- start / stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        s = self.cfg.smb
        if os.geteuid() != 0:
            raise RuntimeError("[smb] needs root (a FUSE mount with allow_other, Samba accounts, smbd); "
                               "run as root or set [smb] enabled = false")
        for d in ("private", "lock", "state", "cache", "run", "log", "roots"):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state / "private", 0o700)
        if s.manage:
            await asyncio.to_thread(self._kill_stale_smbd)
        uid, gid = await asyncio.to_thread(_ensure_account, s.unix_user)
        # not the mount point itself: a killed agent's dead mount answers ENOTCONN until GatewayFS.mount detaches it
        Path(s.mountpoint).parent.mkdir(parents=True, exist_ok=True)
        for path in (Path(s.mountpoint).parent, self.state / "roots"):
            _check_searchable(path, uid, gid, s.unix_user)
        self.conf_path.write_text(render_conf(self.cfg))
        (self.state / BANS_CONF).write_text(render_bans(self.cfg, []))
        auth_log = self.state / AUTH_LOG
        auth_offset = auth_log.stat().st_size if auth_log.exists() else 0  # earlier runs' logins are history
        users = await asyncio.to_thread(self._sync_users, gid)
        await asyncio.to_thread(self._lockout_policy)
        self.fs = GatewayFS(self.gateway, uid, gid, users, SmbPeers(s.listen[1]))
        await self.fs.mount(Path(s.mountpoint))
        await self._ensure_roots()
        if s.manage:
            proc = self._start_smbd()
            await self._wait_listening()
            self._supervisor = asyncio.create_task(self._supervise(proc), name="smbd-supervisor")
            self._memory_watch = asyncio.create_task(self._watch_memory(), name="smbd-memory")
        self._auth_watch = asyncio.create_task(self._watch_logins(auth_log, auth_offset), name="smb-logins")
        log.info("smb_started", listen=s.listen, share=s.share, mountpoint=s.mountpoint, manage=s.manage,
                 encryption=s.encryption, users=[u.name for u in smb_users(self.cfg)])

    async def _ensure_roots(self) -> None:
        roots = self.state / "roots"
        wanted = {unix_account(u.name): u.root for u in smb_users(self.cfg)}
        for link in roots.iterdir():
            if link.name not in wanted:
                link.unlink()
        for account, root in wanted.items():
            if ns := root.strip("/"):
                with contextlib.suppress(AlreadyExists):
                    await self.gateway.mkdir(ns)
            target = Path(self.cfg.smb.mountpoint) / ns  # the mount point itself for root '/'
            link = roots / account
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            link.unlink(missing_ok=True)
            link.symlink_to(target)

    def _sync_users(self, gid: int) -> dict[int, str]:
        """Samba's accounts and passwords as [[users]] says. → uid of each user's Unix account → user name."""
        for u in self.cfg.users:
            if not u.password:
                log.warning("smb_user_skipped", user=u.name,
                            reason="Samba needs the NT hash of a plain password; this user has only "
                                   "password_hash or authorized_keys and cannot log in over SMB")
        group = grp.getgrgid(gid).gr_name
        accounts, by_uid = {}, {}  # Unix account → user name (the username map), uid → user name
        for u in smb_users(self.cfg):
            account = unix_account(u.name)
            uid, _ = _ensure_account(account, group=group)
            by_uid[uid] = accounts[account] = u.name
            # the password goes to smbpasswd on stdin only, never onto a command line or into the log
            r = subprocess.run(["smbpasswd", "-c", str(self.conf_path), "-s", "-a", account],
                               input=f"{u.password}\n{u.password}\n", text=True, capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"smbpasswd failed for SMB user {u.name!r}: {r.stderr.strip() or r.stdout.strip()}")
        usermap = "\n".join(f"{account} = {name}" for account, name in accounts.items())
        (self.state / "usermap").write_text(usermap + "\n")
        listed = subprocess.run(["pdbedit", "-s", str(self.conf_path), "-L"], capture_output=True, text=True)
        if listed.returncode != 0:
            raise RuntimeError(f"pdbedit could not list Samba's users: {listed.stderr.strip()[:500]}")
        for line in listed.stdout.splitlines():
            account = line.split(":", 1)[0]
            if account.startswith(ACCOUNT_PREFIX) and account not in accounts:
                subprocess.run(["smbpasswd", "-c", str(self.conf_path), "-x", account], capture_output=True)
                log.info("smb_user_removed", account=account)
        return by_uid

    def _lockout_policy(self) -> None:
        """[login] for SMB: Samba's own account policy locks a user (it checks SMB passwords itself)."""
        lg = self.cfg.login
        policies = {"bad lockout attempt": lg.max_failures, "reset count minutes": math.ceil(lg.window_seconds / 60),
                    "lockout duration": math.ceil(lg.ban_seconds / 60)}
        runs = {policy: subprocess.Popen(["pdbedit", "-s", str(self.conf_path), "-P", policy, "-C", str(value)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for policy, value in policies.items()}  # one pdbedit per policy: run them side by side
        for policy, run in runs.items():
            _, err = run.communicate()
            if run.returncode != 0:
                raise RuntimeError(f"pdbedit could not set Samba's {policy!r}: {err.strip()[:500]}")

    # --- password guessing: Samba's authentication audit → LoginGuard → smb.conf ---------------------

    async def _watch_logins(self, path: Path, offset: int) -> None:
        """Follow Samba's authentication audit; deny the addresses the guard bans, allow them again after."""
        inode = None
        while True:
            try:
                st = await asyncio.to_thread(path.stat)
                if inode is not None and (st.st_ino != inode or st.st_size < offset):
                    offset = 0  # Samba rotated the file (max log size)
                inode = st.st_ino
                if st.st_size > offset:
                    complete = (await asyncio.to_thread(_read_from, path, offset)).rpartition(b"\n")[0]
                    offset += len(complete) + 1 if complete else 0
                    # \n only: splitlines() also cut at U+2028, raw in a client's NTLM workstation (a hidden failure)
                    for line in complete.decode("utf-8", "replace").split("\n"):
                        if (event := auth_event(line)) is not None:
                            await self._login(*event)
            except FileNotFoundError:
                pass
            except Exception as e:  # a bad line must not end the watch
                watch_failed("smb_login_watch_failed", e)
            try:
                await self._enforce_bans()
            except Exception as e:  # nor a failed reload (it ended the bans for good)
                watch_failed("smb_login_watch_failed", e)
            await asyncio.sleep(AUTH_POLL_SECONDS)

    async def _login(self, user: str, address: str, ok: bool) -> None:
        # Samba matches an account name without case: 'PACS' guesses 'pacs', and is counted (and banned) as it
        user = next((u.name for u in smb_users(self.cfg) if u.name.casefold() == user.casefold()), user)
        who = Who(user, "smb", address)
        # no delay: Samba has already answered
        await login(self.gateway, self.logins, "smb", who, address, ok, method="password")
        if ok:
            self.gateway.audit_event(who, "login")

    async def _enforce_bans(self) -> None:
        """Deny the addresses the guard bans, and those holding max_sessions_per_address connections now."""
        banned = await self.logins.banned("address")  # addresses and IPv6 /64s (agent.auth.address_group)
        cap = self.cfg.smb.max_sessions_per_address
        connected = await asyncio.to_thread(connections_by_address, self.cfg.smb.listen[1])
        full = sorted(group for group, n in per_group(connected).items() if n >= cap)
        if (banned, full) == (self._bans, self._full):
            return
        (self.state / BANS_CONF).write_text(render_bans(self.cfg, sorted({*banned, *full})))
        await asyncio.to_thread(self._reload_smbd)
        # A denial keeps out new connections only: a newly banned address loses those it could go on guessing in
        # (looked up after the reload: one made meanwhile is among them)
        if newly := set(banned) - set(self._bans):
            connected = await asyncio.to_thread(connections_by_address, self.cfg.smb.listen[1])
            for address in sorted(a for a in connected if address_group(a) in newly):
                await asyncio.to_thread(self._smbcontrol, "kill-client-ip", address)
        for address in sorted(set(full) - set(self._full)):
            refuse_session(self.gateway, "smb", Who("-", "smb", address),
                           f"too many connections from {address} (limit {cap})")
        log.warning("smb_hosts_denied", banned=banned, full=full)
        self._bans, self._full = banned, full

    async def _watch_memory(self) -> None:
        """Kill an smbd process over [smb] max_process_memory. One logged-in connection grew its process without end:
        each tree connect cost it 8 KB, each session 10 KB, up to 65 534 of each (of tree connects per session),
        thousands a second, and nothing in Samba caps them. Killed, not stopped: smbd's own exit would close its open
        files as completions; the kernel's closes of a killed process's files are aborts (fuse._cut_short)."""
        while True:
            await asyncio.sleep(MEMORY_CHECK_SECONDS)
            try:
                await asyncio.to_thread(self._kill_oversized)
            except Exception as e:  # a failed look must not end the watch
                watch_failed("smbd_memory_watch_failed", e)

    def _kill_oversized(self) -> None:
        limit = self.cfg.smb.max_process_memory
        if self.proc is None or self.proc.poll() is not None:
            return
        for child in psutil.Process(self.proc.pid).children():  # one per connection, and Samba's helpers
            with contextlib.suppress(psutil.Error):
                if (rss := child.memory_info().rss) > limit:
                    peer = self.fs.peers.of(child.pid) if self.fs is not None else ""
                    child.kill()
                    self.gateway.count_error("smb", "ProcessMemoryLimit")
                    log.warning("smbd_process_killed", pid=child.pid, peer=peer, rss=rss, limit=limit,
                                reason="over [smb] max_process_memory: its connection is cut, its unfinished "
                                       "uploads discarded")

    def _reload_smbd(self) -> None:
        """smbd rereads smb.conf (and so bans.conf): new connections from a banned address are refused."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGHUP)
            return
        self._smbcontrol("reload-config")

    def _smbcontrol(self, *message: str) -> None:
        r = subprocess.run(["smbcontrol", "-s", str(self.conf_path), "smbd", *message],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            log.error("smbcontrol_failed", message=message[0], error=(r.stderr or r.stdout).strip()[:300])

    def _start_smbd(self) -> subprocess.Popen[bytes]:
        with open(self.state / "log" / "smbd.stdout", "ab") as log_out:  # smbd keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [self.cfg.smb.smbd, "--foreground", "--no-process-group", "-s", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("smbd_started", pid=self.proc.pid, conf=str(self.conf_path))
        return self.proc

    async def _wait_listening(self, timeout: float = 30.0) -> None:
        host, port = self.cfg.smb.listen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"smbd exited with {self.proc.returncode}; see {self.state}/log/smbd.log")
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
                w.close()
                return
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        raise RuntimeError(f"smbd did not listen on {host}:{port} within {timeout:.0f}s")

    async def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        delay = 1.0
        while True:
            rc = await asyncio.to_thread(proc.wait)
            if not self._stopping:
                log.error("smbd_exited", returncode=rc, restart_in=delay)
                await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            proc = self._start_smbd()
            delay = min(delay * 2, 30.0)

    def _kill_stale_smbd(self) -> None:
        """An smbd left running by a killed agent still serves the dead mount: stop it (by its pid)."""
        for pidfile in (self.state / "run").glob("smbd*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if b"smbd" in cmdline[0] and str(self.conf_path).encode() in cmdline:
                log.warning("stale_smbd_stopped", pid=pid)
                self._terminate(pid)

    @staticmethod
    def _terminate(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + SMBD_STOP_SECONDS
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                    return
            except (ProcessLookupError, FileNotFoundError):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def stop_accepting(self) -> None:
        """Drain: files already open may be finished and closed; no new file is opened for writing."""
        if self.fs is not None:
            self.fs.draining = True

    def _open_files(self) -> int | None:
        """How many files smbd has open (its share-mode table, `smbstatus -L --json`); None if unknown."""
        r = subprocess.run(["smbstatus", "-s", str(self.conf_path), "-L", "--json"],
                           capture_output=True, text=True, timeout=10)
        with contextlib.suppress(ValueError):
            if r.returncode == 0:
                return len(json.loads(r.stdout).get("open_files", {}))
        return None

    async def wait_files_closed(self, timeout: float) -> bool:
        """Drain: wait until smbd has closed every file (its replies sent before it stops); → False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(self._open_files):
                return True
            await asyncio.sleep(0.1)
        return False

    async def close(self) -> None:
        """Stop smbd (its closes of still-open files are aborts, not completions), then unmount."""
        self._stopping = True
        for watch in (self._auth_watch, self._memory_watch):
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        if self.fs is not None:
            self.fs.closing = True
        if self.proc is not None and self.proc.poll() is None:
            await asyncio.to_thread(self._terminate, self.proc.pid)
            await asyncio.to_thread(self.proc.wait)
            log.info("smbd_stopped", returncode=self.proc.returncode)
        if self._supervisor is not None:
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self.fs is not None:
            await self.fs.unmount()

    def health(self) -> dict[str, Any]:
        s = self.cfg.smb
        return {"listen": f"{s.listen[0]}:{s.listen[1]}", "share": s.share, "mountpoint": s.mountpoint,
                "manage": s.manage,
                "smbd_running": (self.proc is not None and self.proc.poll() is None) if s.manage else None,
                "smbd_restarts": self.restarts, "inodes": self.fs.inode_count() if self.fs else 0}
