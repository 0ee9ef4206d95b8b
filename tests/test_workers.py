"""Serving workers ([server] workers = 2): kill -9 of the worker or of the owner in the middle of an FTP + SFTP
ingest loses nothing acknowledged, the catalog passes `pacsgw fsck`, and the other process keeps serving.

Real parts: a `pacsgw run` owner with one worker process (SO_REUSEPORT), ftplib and asyncssh clients that
retry a file when their connection dies (as a PACS does), SeaweedFS read back with botocore.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import json
import multiprocessing
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import asyncssh
import psutil
import pytest
import yaml
from halib import in_netns, run
from test_frontend_hostile import open_upload, rename_refused

from agent.audit import AuditLog
from agent.auth import LoginGuard, _process_identity
from agent.config import ConfigError, LoginConfig, load
from agent.metrics import Metrics
from agent.store.catalog import Catalog
from agent.store.writing import WriteMarks
from faultkit import bucket_keys, ftp_get, ftp_login, ftp_put, payload, sftp_put, sftp_session, sha256, wait_for
from harness import PASSWORD, s3_objects

CONFIG = """
[cache]
dir = "cache"
[uplink]
endpoint_url = "http://127.0.0.1:8333"
bucket = "pacs"
access_key_id = "EXAMPLEACCESSKEY"
secret_access_key = "EXAMPLESECRETKEY0123456789"
[[users]]
name = "pacs"
password = "test-only-password"
"""

N_FILES = 200
FTP_CLIENTS = SFTP_CLIENTS = 3
KILL_AFTER = 60
DEADLINE = 120.0  # the whole ingest; it takes ~10-20 s on a loaded 2-core machine


def plan() -> dict[str, bytes]:
    return {f"MR/2026-12-01/1.2.{i // 40}/{i}.dcm": payload(i, 16 * 1024 + (i * 977) % (48 * 1024))
            for i in range(N_FILES)}


class Ingest:
    """A shared list of files; a client takes one, puts it back when its connection dies (the PACS retries)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.todo, self.acked = files, list(files), set[str]()
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + DEADLINE
        self.errors: list[str] = []

    def take(self) -> str | None:
        with self.lock:
            return self.todo.pop() if self.todo else None

    def done(self, path: str, ok: bool, error: str = "") -> None:
        with self.lock:
            if ok:
                self.acked.add(path)
            else:
                self.todo.append(path)
                self.errors.append(error)

    def running(self) -> bool:
        with self.lock:
            return (bool(self.todo) or len(self.acked) < len(self.files)) and time.monotonic() < self.deadline


def ftp_client(agent, ingest: Ingest) -> None:
    while ingest.running():
        try:
            ftp = ftp_login(agent, timeout=20)
        except (OSError, EOFError, ftplib.Error):
            time.sleep(0.2)
            continue
        while (path := ingest.take()) is not None:
            try:
                ok = ftp_put(ftp, path, ingest.files[path]).startswith("226")
                ingest.done(path, ok, "reply")
            except (OSError, EOFError, ftplib.Error) as e:
                ingest.done(path, False, f"ftp {type(e).__name__}: {e}")
                break
        else:
            time.sleep(0.1)  # nothing to take now: a file another client holds may come back
        ftp.close()


async def sftp_client(agent, ingest: Ingest) -> None:
    while ingest.running():
        try:
            async with sftp_session(agent) as sftp:
                while (path := ingest.take()) is not None:
                    try:
                        await sftp_put(sftp, path, ingest.files[path])
                    except (OSError, asyncssh.Error, asyncio.IncompleteReadError) as e:
                        ingest.done(path, False, f"sftp {type(e).__name__}: {e}")
                        break
                    ingest.done(path, True)
        except (OSError, asyncssh.Error, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.1)


def worker_pid(agent) -> int:
    pidfile = agent.workdir / "cache" / "workers" / "1.pid"
    return int(pidfile.read_text())


def live_worker(agent, not_pid: int = 0) -> int:
    """The worker's pid once it is up (a new one, when not_pid names the one it replaces)."""
    def up() -> int:
        try:
            pid = worker_pid(agent)
        except (OSError, ValueError):
            return 0
        return pid if pid != not_pid and psutil.pid_exists(pid) else 0
    return wait_for(up, 60, what="a serving worker")


def served_by(pid: int, agent) -> bool:
    """A fresh FTP session lands on process pid (the kernel spreads them); one STOR and RETR go through it."""
    for _ in range(40):
        ftp = ftp_login(agent)
        port = ftp.sock.getsockname()[1]
        conns = psutil.Process(pid).net_connections("tcp")
        if any(c.raddr and c.raddr.port == port for c in conns):
            data = payload("probe", 40_000)
            assert ftp_put(ftp, "probe.dcm", data).startswith("226")
            assert ftp_get(ftp, "probe.dcm") == data
            ftp.quit()
            return True
        ftp.quit()
    return False


async def run_ingest(agent, ingest: Ingest, kill) -> None:
    threads = [threading.Thread(target=ftp_client, args=(agent, ingest), daemon=True) for _ in range(FTP_CLIENTS)]
    for t in threads:
        t.start()
    tasks = [asyncio.create_task(sftp_client(agent, ingest)) for _ in range(SFTP_CLIENTS)]
    await asyncio.to_thread(wait_for, lambda: len(ingest.acked) >= KILL_AFTER, 90, what="ingest under way")
    await kill()
    await asyncio.gather(*tasks)
    for t in threads:
        await asyncio.to_thread(t.join, 30)


async def check_durable(agent, seaweed, ingest: Ingest) -> None:
    """Every file acknowledged (after retries), in S3 with its bytes; the stopped agent's catalog passes fsck."""
    assert ingest.acked == set(ingest.files), f"not acknowledged by the deadline: {len(ingest.acked)}/{N_FILES}"
    await asyncio.to_thread(agent.wait_drained, 60)
    objects = await asyncio.to_thread(s3_objects, seaweed, agent.prefix)
    bad = [p for p in ingest.files if objects.get(p, {}).get("sha256") != sha256(ingest.files[p])]
    assert bad == [], f"acknowledged but missing or wrong in S3: {bad[:5]}"
    assert agent.stop() == 0
    log = agent.log_path.read_text()
    assert "Traceback" not in log, "a process of the agent did not stop cleanly: " + log[log.find("Traceback"):][:1500]
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fsck", "--config", str(agent.config_path), "--json",
                          "--remote"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert json.loads(out.stdout)


async def test_kill9_worker_during_ingest(agent_factory, seaweed):
    a = agent_factory(**{"server.workers": 2}).start()
    first = await asyncio.to_thread(live_worker, a)
    ingest = Ingest(plan())

    async def kill() -> None:
        os.kill(first, signal.SIGKILL)

    await run_ingest(a, ingest, kill)
    died = await asyncio.to_thread(a.wait_events, "worker_died", 1, 30)
    assert died[0]["pid"] == first and died[0]["returncode"] == -signal.SIGKILL
    second = await asyncio.to_thread(live_worker, a, first)
    assert a.health()["workers"] == {"processes": 2, "workers_running": 1, "restarts": 1}
    assert await asyncio.to_thread(served_by, second, a), "the restarted worker takes no sessions"
    assert await asyncio.to_thread(served_by, a.proc.pid, a), "the owner stopped serving"
    ingest.files["probe.dcm"] = payload("probe", 40_000)
    ingest.acked.add("probe.dcm")
    await check_durable(a, seaweed, ingest)


async def test_kill9_owner_during_ingest(agent_factory, seaweed):
    # Small audit files: the worker rotates its own several times, the restarted owner ships them.
    a = agent_factory(**{"server.workers": 2, "audit.ship": True, "audit.max_bytes": "4KB"}).start()
    orphan = await asyncio.to_thread(live_worker, a)
    ingest = Ingest(plan())

    async def kill() -> None:
        a.kill9()
        # The worker goes on serving without its owner: sessions that were on the owner reconnect to it.
        at_kill = len(ingest.acked)
        await asyncio.to_thread(wait_for, lambda: len(ingest.acked) >= at_kill + 20, 60,
                                what="the worker serving while the owner is dead")
        assert served_by(orphan, a)
        await asyncio.to_thread(a.start)  # the service manager's restart: the orphan is told to drain and go

    try:
        await run_ingest(a, ingest, kill)
        await asyncio.to_thread(wait_for, lambda: not psutil.pid_exists(orphan) or
                                psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, 90,
                                what="the orphaned worker to drain and exit")
        assert a.events("worker_retired")[0]["pid"] == orphan
        shipped = await asyncio.to_thread(wait_for, lambda: [k for k in bucket_keys(seaweed)
                                                             if k.startswith(f"pacsgw-audit/{a.prefix}audit.worker1-")],
                                          30, what="the worker's rotated audit files in the bucket")
        assert all(k.endswith(".jsonl") for k in shipped)
        assert await asyncio.to_thread(served_by, await asyncio.to_thread(live_worker, a, orphan), a)
        ingest.files["probe.dcm"] = payload("probe", 40_000)
        ingest.acked.add("probe.dcm")
        await check_durable(a, seaweed, ingest)
    finally:
        if psutil.pid_exists(orphan):
            os.kill(orphan, signal.SIGKILL)


def serving_pid(local_port: int, pids: set[int]) -> int:
    """Which of pids holds the server end of the client connection from local_port (0: none of them)."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if any(c.raddr and c.raddr.port == local_port for c in psutil.Process(pid).net_connections("tcp")):
                return pid
    return 0


def ftp_open(agent) -> tuple[ftplib.FTP | None, str]:
    """A control connection → (it, None) when greeted with 220, (None, the reply) when refused."""
    ftp = ftplib.FTP(timeout=20)
    try:
        ftp.connect("127.0.0.1", agent.ftp_port)
    except (ftplib.error_temp, OSError, EOFError) as e:  # OSError: a listener of a process just killed
        ftp.close()
        return None, str(e)
    return ftp, ""


def ftp_try_login(agent, password: str) -> None:
    """USER and PASS on a connection of its own (once the sessions just closed have freed a slot), closed
    whatever the answer (a refusal raises)."""
    ftp = wait_for(lambda: ftp_open(agent)[0], 20, what="a free FTP session slot")
    try:
        ftp.login("pacs", password)
    finally:
        ftp.close()


def test_login_limits_hold_for_the_box(agent_factory):
    """workers = 2: the FTP per-address session cap and the failed-login ban count the whole box (one shared
    LoginGuard file), not each process: with the cap held, both processes refuse; after max_failures wrong
    passwords over FTP and SFTP together, both processes refuse the right one. kill -9 of the worker frees
    the slots of its sessions."""
    cap, failures = 3, 4
    a = agent_factory(**{"server.workers": 2, "ftp.max_sessions_per_address": cap, "login.delay_seconds": 0,
                         "login.max_delay_seconds": 0, "login.max_failures": failures,
                         "login.ban_seconds": 3600}).start()
    worker = live_worker(a)
    pids = {a.proc.pid, worker}
    held: dict[ftplib.FTP, int] = {}  # open sessions → the process serving them
    refused_by: set[int] = set()
    for _ in range(60):  # until both processes have refused one: a per-process count would accept more
        ftp, reply = ftp_open(a)
        if ftp is not None:
            held[ftp] = serving_pid(ftp.sock.getsockname()[1], pids)
            assert len(held) <= cap, f"more than {cap} sessions from one address on the box"
        else:
            assert reply.startswith("421") and "too many sessions" in reply
            refused_by |= {pid for pid in pids if "refused: too many sessions" in audit_text(a, pid)}
            if refused_by == pids:
                break
    assert len(held) == cap and refused_by == pids, (held, refused_by)
    # Let the worker hold one of the sessions, then kill it: its slot must come free for new sessions.
    for _ in range(60):
        if worker in held.values():
            break
        ftp = next(f for f, pid in held.items() if pid != worker)
        ftp.close()
        del held[ftp]
        wait_for(lambda: ftp_open_and_keep(a, held, pids), 20, what="a session slot after a close")
    on_worker = [f for f, pid in held.items() if pid == worker]
    assert on_worker, "no session landed on the worker"
    os.kill(worker, signal.SIGKILL)
    for f in on_worker:
        f.close()
        del held[f]
    for _ in range(len(on_worker)):
        wait_for(lambda: ftp_open_and_keep(a, held, pids), 20, what="the killed worker's slot")
    assert ftp_open(a)[0] is None  # and the cap holds again
    for f in held:
        f.close()
    # Wrong passwords over FTP and SFTP, whichever process takes them: the ban comes after `failures` in all.
    for i in range(failures):
        if i % 2:
            with pytest.raises(asyncssh.PermissionDenied):
                asyncio.run(sftp_login(a, "wrong-guess"))
        else:
            with pytest.raises(ftplib.error_perm):
                ftp_try_login(a, "wrong-guess")
    pids = {a.proc.pid, live_worker(a, worker)}
    banned_by: set[int] = set()
    for _ in range(60):
        ftp = wait_for(lambda: ftp_open(a)[0], 20, what="an FTP session")
        pid = serving_pid(ftp.sock.getsockname()[1], pids)
        with pytest.raises(ftplib.error_perm, match="banned"):
            ftp.login("pacs", PASSWORD)
        ftp.close()
        banned_by.add(pid)
        if banned_by == pids:
            break
    assert banned_by == pids, banned_by
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(sftp_login(a, PASSWORD))


def ftp_on(agent, pid: int, pids: set[int]) -> ftplib.FTP:
    """A logged-in FTP session that the kernel handed to process pid (sessions landing elsewhere are closed)."""
    for _ in range(60):
        ftp = ftp_login(agent)
        if serving_pid(ftp.sock.getsockname()[1], pids) == pid:
            return ftp
        ftp.quit()
    raise AssertionError(f"no FTP session landed on process {pid}")


def test_a_rename_over_a_file_another_process_is_writing_is_refused(agent_factory):
    """A rename over a file that an upload is still writing is refused (the upload's close would store over
    what was renamed there: gone under both names). With workers = 2 the gateway knew only its own process's
    uploads: a session on the other process renamed over the file (250). Refused now whichever process writes;
    when the upload ends, or the process writing it is killed -9 in the middle, the name is free again."""
    a = agent_factory(**{"server.workers": 2}).start()
    worker = live_worker(a)
    pids = {a.proc.pid, worker}
    writing = {a.proc.pid: ftp_on(a, a.proc.pid, pids), worker: ftp_on(a, worker, pids)}
    renaming = {a.proc.pid: ftp_on(a, a.proc.pid, pids), worker: ftp_on(a, worker, pids)}
    ftp_put(renaming[a.proc.pid], "y.dcm", b"Y" * 100)
    uploads = {}
    for writer, renamer, name in ((a.proc.pid, worker, "z.dcm"), (worker, a.proc.pid, "x.dcm")):
        uploads[name] = open_upload(writing[writer], name)
        rename_refused(renaming[renamer], "y.dcm", name)
    uploads["z.dcm"].close()  # the upload ends: its name is free again
    assert writing[a.proc.pid].voidresp().startswith("226")
    renaming[worker].rename("y.dcm", "z.dcm")
    assert ftp_get(renaming[worker], "z.dcm") == b"Y" * 100
    # x.dcm is still being written on the worker: kill -9 of the worker must not leave the name marked.
    os.kill(worker, signal.SIGKILL)
    a.wait_events("worker_died", 1, 30)
    owner = renaming[a.proc.pid]
    owner.rename("z.dcm", "x.dcm")
    assert ftp_get(owner, "x.dcm") == b"Y" * 100
    owner.quit()


def test_write_marks_count_writers_and_follow_a_rename(tmp_path):
    """Two WriteMarks on one file see each other as two processes do (OFD locks belong to the open, not the
    process). A path stays marked until its last writer ends; a file renamed while written (SMB) frees its
    old name and marks the new one; the directories above a path being written are busy too."""
    mine, other = WriteMarks(tmp_path / "writing.lock"), WriteMarks(tmp_path / "writing.lock")
    mine.add("x")
    mine.add("x")
    assert mine.busy("x") and other.busy("x") and not other.busy("y")
    mine.remove("x")
    assert other.busy("x")
    mine.add("y")  # renamed (Gateway._claim, then WriteHandle.moved)
    mine.remove("x")
    assert not other.busy("x") and other.busy("y") and mine.busy("y")
    mine.remove("y")
    assert not other.busy("y") and not mine.busy("y")
    mine.add("a/b/x")  # a directory renamed to a or a/b would bring its own files below them
    assert other.busy("a") and other.busy("a/b") and not other.busy("a/c") and not other.busy("b")
    mine.remove("a/b/x")
    assert not other.busy("a")


def test_guesses_sent_at_once_get_no_more_checks_than_max_failures(agent_factory):
    """workers = 2: 30 wrong passwords sent at once over FTP (both processes) all passed the ban check before the
    first failure was recorded: 11 were checked with max_failures 4. Now at most max_failures are checked, the
    rest refused; and 30 good logins sent at once are all let in (they wait for the checks ahead of them)."""
    failures = 4
    a = agent_factory(**{"server.workers": 2, "login.delay_seconds": 0, "login.max_delay_seconds": 0,
                         "login.max_failures": failures, "login.ban_seconds": 3600}).start()
    live_worker(a)

    def burst(password: str) -> Counter[str]:
        sessions = [ftp_open(a)[0] for _ in range(30)]
        for f in sessions:
            f.sendcmd("USER pacs")
        start, answers = threading.Barrier(len(sessions)), Counter[str]()

        def send(f: ftplib.FTP) -> None:
            start.wait()
            try:
                answers[f.sendcmd(f"PASS {password}")[:3]] += 1
            except ftplib.error_perm as e:
                answers[str(e)[4:30]] += 1
            f.close()

        threads = [threading.Thread(target=send, args=(f,)) for f in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    assert burst(PASSWORD) == {"230": 30}
    answers = burst("wrong-guess")
    assert answers["wrong user or password"] <= failures and sum(answers.values()) == 30, answers


async def test_password_checks_under_way_count_across_guards(tmp_path, monkeypatch):
    """Two guards on one file (two processes): with max_failures - 1 failures recorded, a check under way in one
    makes the other's wait (then refused: try again later); its end, or the death of the process holding it
    (kill -9: its slot is freed as session slots are), lets the next one begin."""
    monkeypatch.setattr(LoginGuard, "ATTEMPT_WAIT", 0.3)
    cfg, off = LoginConfig(max_failures=3, ban_seconds=60), AuditLog(None, 0, 1, False)
    a, b = (LoginGuard(cfg, Metrics(), off, tmp_path / "logins.sqlite") for _ in range(2))
    for _ in range(2):
        await a.failed("pacs", "10.9.0.1", "ftp")
    async with a.attempt("pacs", "10.9.0.1", "ftp") as refusal:
        assert refusal == ""
        async with b.attempt("pacs", "10.9.0.1", "sftp") as refusal:
            assert "too many logins at once" in refusal
    async with b.attempt("pacs", "10.9.0.1", "sftp") as refusal:
        assert refusal == ""
    doomed = subprocess.Popen(["sleep", "60"])
    a._me = _process_identity(doomed.pid)  # a's next slot is that process's
    assert await a.attempt("pacs", "10.9.0.1", "ftp").__aenter__() == ""  # never left: the process dies in it
    doomed.kill()
    doomed.wait()
    async with b.attempt("pacs", "10.9.0.1", "sftp") as refusal:
        assert refusal == ""
    a.close()
    b.close()


def audit_text(agent, pid: int) -> str:
    """The audit file of the serving process pid (the owner's or worker 1's)."""
    name = "audit.jsonl" if pid == agent.proc.pid else "audit.worker1.jsonl"
    path = agent.workdir / "cache" / "audit" / name
    return path.read_text() if path.exists() else ""


def ftp_open_and_keep(agent, held: dict, pids: set[int]) -> bool:
    ftp, _ = ftp_open(agent)
    if ftp is not None:
        held[ftp] = serving_pid(ftp.sock.getsockname()[1], pids)
    return ftp is not None


async def sftp_login(agent, password: str) -> None:
    async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=password,
                                known_hosts=None, client_keys=None, agent_path=None):
        pass


@pytest.mark.parametrize("server,key,message", [
    ("workers = -1", "server.workers", "0..256"),
    ("workers = 'all'", "server.workers", "0..256"),
    ("workers = 2\n[ha]\nenabled = true", "server.workers", "1 when [ha] is enabled"),
])
def test_workers_config_refused(tmp_path, server, key, message):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG + "[server]\n" + server + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.key == key and message in e.value.allowed and str(path) in str(e.value)


def test_workers_default_and_per_cpu(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG)
    path.chmod(0o600)
    assert load(path).server.serving_processes() == 1  # today's single process unless asked
    path.write_text(CONFIG + "[server]\nworkers = 0\n")
    assert load(path).server.serving_processes() == len(os.sched_getaffinity(0))


def _commit_many(path: str, who: int, n: int) -> None:
    catalog = Catalog(Path(path))
    for i in range(n):
        catalog.commit_write(f"w{who}/{i % 7}/{i}.dcm", f"{who:02d}{i:030d}", 1, "0" * 64, time.time(),
                             claim=who % 2 == 0)
    catalog.close()


def test_generation_unique_across_processes(tmp_path):
    """Three processes commit into one catalog at once: every row gets its own gen (BEGIN IMMEDIATE serialises
    the writers across processes), and the totals the triggers keep add up."""
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_commit_many, args=(str(path), k, 150)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    catalog = Catalog(path)
    gens = [g for (g,) in catalog.db.execute("SELECT gen FROM entries WHERE is_dir = 0")]
    assert len(gens) == 450 and len(set(gens)) == 450
    assert int(catalog.get_state("gen") or 0) == max(gens)
    assert catalog.totals().files == 450
    catalog.close()


def _queued_connections_after_one_listener_closes(port: int) -> tuple[int, int]:
    """Two SO_REUSEPORT listeners on one port (as the owner and a worker), 32 connections made (the kernel
    completes each handshake into one of the two accept queues), then the first listener closes without
    accepting: → (connections the second listener accepted, connections reset)."""
    def listener() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s
    closing, staying = listener(), listener()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(32)]
    closing.close()
    staying.settimeout(0.5)
    accepted = []
    with contextlib.suppress(TimeoutError):
        while True:
            accepted.append(staying.accept()[0])
    reset = 0
    for c in select.select(clients, [], [], 0.2)[0]:     # a reset connection reads as an error at once
        try:
            c.recv(1)
        except ConnectionResetError:
            reset += 1
    for c in clients:
        c.close()
    for s in accepted:
        s.close()
    staying.close()
    return len(accepted), reset


@pytest.mark.parametrize("migrate", [True, False])
def test_a_stopping_listeners_queued_connections_go_to_the_others_with_the_boxs_sysctl(migrate):
    """A worker that drains (or an agent that restarts) closes its listening socket; connections the kernel had
    already queued on it were reset (a PACS sees a refused store) unless net.ipv4.tcp_migrate_req hands them to
    the port's other listeners. The base role sets it: in a network namespace this test creates, with the role's
    net.* sysctls applied, every connection reaches the listener that stays; without the migrate setting (the
    kernel's default) some are reset, which shows the setting is what keeps them."""
    sysctls = yaml.safe_load(Path("ansible/roles/base/defaults/main.yml").read_text())["base_sysctl"]
    assert sysctls["net.ipv4.tcp_migrate_req"] == 1
    ns = f"pgwmig{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        for key, value in sysctls.items():
            if key.startswith("net.") and (migrate or key != "net.ipv4.tcp_migrate_req"):
                run("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")
        accepted, reset = in_netns(ns, _queued_connections_after_one_listener_closes, 2121)
    finally:
        run("ip", "netns", "del", ns)
    if migrate:
        assert (accepted, reset) == (32, 0)
    else:
        assert reset > 0 and accepted + reset == 32


def test_a_workers_audit_shipper_that_crashes_starts_again_and_is_shown(agent_factory):
    """The owner ships each serving worker's rotated audit files under the Loops supervisor that runs its own
    shipper: a crash (here a rotated file whose `.shipped` marker name is too long for the file system) is logged,
    shown on /healthz and the shipper started again. It used to end that worker's shipping for good, told nowhere."""
    a = agent_factory(**{"server.workers": 2, "audit.ship": True})
    audit_dir = a.workdir / "cache" / "audit"
    audit_dir.mkdir(parents=True)
    filler = "9" * (250 - len("audit.worker1-.jsonl"))  # a 250-byte name: 258 with '.shipped', over NAME_MAX
    (audit_dir / f"audit.worker1-{filler}.jsonl").write_text('{"op": "a rotated record"}\n')
    a.start()
    loops = wait_for(lambda: a.health()["loops"].get("audit-ship-1", {}).get("crashes", 0) >= 2 and
                     a.health()["loops"], 60, what="the worker's audit shipper crashing and started again")
    assert "audit-ship" not in loops, "the owner's own shipper has nothing of worker 1's to ship"
    assert {e["loop"] for e in a.events("loop_crashed")} == {"audit-ship-1"}
