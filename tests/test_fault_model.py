"""Model-based test of the cache and the write-through queue under S3 faults (a sibling of test_protocol_model).

The protocol model never evicts a file and never holds or fails a transfer, so a rename's server-side copy always
ran at once from a cached file: the losses fixed in 54722aa (a renamed evicted file's old name taken by a new file
before its copy ran; a renamed evicted file read before its copy ran; a file renamed again while its copy was on the
wire) were out of its reach. This one adds, over FTP against a live agent: evicting files from the cache (the
admin path `pacsgw evict` uses), S3 faults injected by tests/s3fault.py (the only injection: PUTs and copies held
on the wire for a few steps, or, with DELETEs, past the agent's read timeout, then released; the next N copies,
PUTs or GETs answered 500; the whole store answering 500 for a few steps, an outage), reads right after renames,
and kill -9 of the agent, with the held requests still on the wire.

Invariants: a read answers the model's bytes; it may fail (451) only while a fault is active (or the line it called
down is not up again yet); every acknowledged change survives a kill; after the faults end and the queue drains,
the bucket holds exactly the model's files (no parked copy left behind).

A held PUT or copy the agent gave up on (its read timeout passed, or the agent was killed) lands when the hold
ends, maybe after its file was deleted, renamed or stored again: the agent's re-checks of such keys (agent/uplink/
uploader.py, Uploader._recheck) must leave the bucket as the model says all the same.

Bounded: PACSGW_FAULT_MODEL_STEPS steps (default DEFAULT_STEPS, about a minute on a 2-core box) in examples of
STEPS_PER_EXAMPLE; PACSGW_FAULT_MODEL_KILLS kills; the kill points from PACSGW_MODEL_SEED (printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
import urllib.request
from dataclasses import dataclass, field

from clients import ClientError, FtpClient
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from modelkit import DIRS, Model, Session, file_paths, payloads, run_examples
from s3fault import FaultProxy

from faultkit import wait_for
from harness import s3_objects, sha256

DEFAULT_STEPS = 500
STEPS = int(os.environ.get("PACSGW_FAULT_MODEL_STEPS", str(DEFAULT_STEPS)))
KILLS = int(os.environ.get("PACSGW_FAULT_MODEL_KILLS", "1"))
STEPS_PER_EXAMPLE = 40
READ_TIMEOUT = 3  # [uplink] read_timeout: a long hold outlasts it
PAYLOADS = payloads(2000)


@dataclass
class Run:
    agent: object
    proxy: FaultProxy
    seed: int
    steps: int = 0
    kills: list[int] = field(default_factory=list)
    killed: int = 0
    models: dict[str, Model] = field(default_factory=dict)
    release_at: int = 0  # the step at which a held line or an outage ends (0: none)
    release_after: float = 0.0  # … and the time (monotonic) before which it does not: a long hold
    faults: int = 0
    journal: list[str] = field(default_factory=list)  # the steps so far (shrinking cannot replay a live agent)

    def note(self, step: str) -> None:
        self.journal.append(f"{self.steps}: {step}")

    def trace(self, base: str) -> str:
        """The last steps, and the agent's events about this example's files, for a failure's message."""
        events = [line for line in self.agent.log_path.read_text().splitlines() if f'"{base}/' in line][-40:]
        return "\n".join(["steps:", *self.journal[-40:], "agent events:", *events])

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.kills = sorted(rng.sample(range(STEPS_PER_EXAMPLE // 2, max(STEPS, STEPS_PER_EXAMPLE)), KILLS))

    @property
    def faulty(self) -> bool:
        p = self.proxy
        return bool(p.fail_all or p.hold_puts.is_set() or p.hold_deletes.is_set() or p.fail_gets or p.fail_puts
                    or p.fail_copies)

    def release(self) -> None:
        """End every fault; wait until the line is up again (reads of evicted files need it)."""
        p = self.proxy
        p.fail_all, p.fail_puts, p.fail_gets, p.fail_copies = False, 0, 0, 0
        p.hold_puts.clear()
        p.hold_deletes.clear()
        self.release_at, self.release_after = 0, 0.0
        self.note("faults released")
        wait_for(lambda: p.puts_held == p.deletes_held == 0, 60, what="the held requests forwarded")
        wait_for(lambda: self.agent.health()["uplink"]["reachable"], 60, what="line up after the faults")

    def check_bucket(self) -> None:
        """Once the queue drained (again: a held write landing over a newer file has that uploaded again), and the
        agent re-checked the keys of the writes it gave up on, the bucket holds the model's files."""
        self.release()
        expected = {f"{base}/{f}": data for base, m in self.models.items() for f, data in m.files.items()}
        want = {k: (len(v), sha256(v)) for k, v in expected.items()}

        def bucket() -> dict[str, tuple[int, str]]:
            self.agent.wait_drained(180)
            return {k: (v["size"], v["sha256"]) for k, v in s3_objects(self.agent.store, self.agent.prefix).items()}

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: bucket() == want, 30, interval=1.0, what="the bucket as the model says")
        remote = bucket()
        assert {k: v[0] for k, v in remote.items()} == {k: v[0] for k, v in want.items()}
        assert {k: v[1] for k, v in remote.items()} == {k: v[1] for k, v in want.items()}

    def evict(self, path: str) -> bool:
        """What `pacsgw evict PATH` does (tests/test_fault_coldread.py::evict_cli), without a process start."""
        token = (self.agent.workdir / "cache" / "admin.token").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.agent.http_port}/admin/evict",
                                     data=json.dumps({"path": path}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return bool(json.load(r).get("evicted"))
        except urllib.error.HTTPError:
            return False


def machine_for(run: Run):
    class FaultModel(Session):
        def __init__(self) -> None:
            super().__init__("f", run.models, FtpClient(run.agent))

        def check_read(self, f: str) -> None:
            try:
                got = self.client.get(self.p(f))
            except ClientError as e:
                # a line called down by the last fault's failures is up again at its next probe (agent.uplink.line)
                down = "unreachable" in str(e) and str(e).startswith("451")
                assert run.faulty or down, f"read of {f} failed with no fault active: {e}\n{run.trace(self.base)}"
                return
            assert got == self.model.files[f], f"content of {f}\n{run.trace(self.base)}"

        @precondition(lambda self: not self.model.dirs.issuperset(DIRS))
        @rule(data=st.data())
        def mkdir(self, data: st.DataObject) -> None:
            d = data.draw(st.sampled_from(sorted(set(DIRS) - self.model.dirs)))
            run.note(f"mkdir {self.p(d)}")
            self.touched.add("")
            self.client.mkdir(self.p(d))
            self.model.dirs.add(d)

        @rule(f=file_paths(), data=PAYLOADS)
        def store(self, f: str, data: bytes) -> None:
            run.note(f"store {self.p(f)} ({len(data)} bytes {sha256(data)[:8]})")
            self.touch(f)
            self.client.put(self.p(f), data)
            self.model.dirs.update([f.rpartition("/")[0]] if "/" in f else [])
            self.model.files[f] = data

        @rule(f=file_paths(), data=PAYLOADS)
        def append(self, f: str, data: bytes) -> None:
            """APPE: the stored bytes first (fetched from S3 when the file is not cached, maybe from a renamed file's
            old key or a parked copy), then these."""
            run.note(f"append {self.p(f)} ({len(data)} bytes)")
            self.touch(f)
            try:
                self.client.append(self.p(f), data)
            except ClientError as e:  # the stored bytes could not be fetched: nothing changed
                down = "unreachable" in str(e) and str(e).startswith("451")
                assert run.faulty or down, f"append to {f} failed with no fault active: {e}\n{run.trace(self.base)}"
                return
            self.model.dirs.update([f.rpartition("/")[0]] if "/" in f else [])
            self.model.files[f] = self.model.files.get(f, b"") + data

        def parent_made(self, dst: str) -> None:
            """A rename makes no directory (rename(2), round 42): its target's is made first where missing."""
            if not self.model.parent_exists(dst):
                parent = dst.rpartition("/")[0]
                run.note(f"mkdir {self.p(parent)}")
                self.touched.add("")
                self.client.mkdir(self.p(parent))
                self.model.dirs.add(parent)

        @precondition(lambda self: self.model.files)
        @rule(data=st.data(), dst=file_paths(), evict_first=st.booleans(), then_read=st.booleans())
        def rename_file(self, data: st.DataObject, dst: str, evict_first: bool, then_read: bool) -> None:
            m = self.model
            src = data.draw(st.sampled_from(sorted(m.files)))
            run.note(f"rename {self.p(src)} {self.p(dst)} evict_first={evict_first} then_read={then_read}")
            if evict_first:
                run.evict(self.p(src))
            self.touch(src, dst)
            self.parent_made(dst)
            self.client.rename(self.p(src), self.p(dst))
            m.files[dst] = m.files.pop(src)
            if then_read:
                self.check_read(dst)

        @precondition(lambda self: self.model.files)
        @rule(data=st.data(), dst=file_paths(), new=PAYLOADS, fail_copy=st.booleans())
        def rename_and_reuse(self, data: st.DataObject, dst: str, new: bytes, fail_copy: bool) -> None:
            """An evicted file renamed, and a new file stored under its old name before (fail_copy: the copy's
            first try fails) or after the rename's server-side copy ran."""
            m = self.model
            src = data.draw(st.sampled_from(sorted(m.files)))
            run.note(f"rename and reuse {self.p(src)} {self.p(dst)} fail_copy={fail_copy} new={sha256(new)[:8]}")
            run.evict(self.p(src))
            self.touch(src, dst)
            if fail_copy:
                run.proxy.fail_copies += 1
            self.parent_made(dst)
            self.client.rename(self.p(src), self.p(dst))
            m.files[dst] = m.files.pop(src)
            self.client.put(self.p(src), new)
            m.files[src] = new

        @precondition(lambda self: self.model.dirs)
        @rule(data=st.data(), evict_first=st.booleans(), then_read=st.booleans())
        def rename_dir(self, data: st.DataObject, evict_first: bool, then_read: bool) -> None:
            m = self.model
            src = data.draw(st.sampled_from(sorted(m.dirs)))
            dst = data.draw(st.sampled_from(sorted({*DIRS, "C"} - m.dirs)))
            run.note(f"rename dir {self.p(src)} {self.p(dst)} evict_first={evict_first} then_read={then_read}")
            if evict_first:
                for f in [f for f in m.files if f.startswith(src + "/")]:
                    run.evict(self.p(f))
            self.touched.update([src, dst, ""])
            self.client.rename(self.p(src), self.p(dst))
            m.dirs.discard(src)
            m.dirs.add(dst)
            for f in [f for f in m.files if f.startswith(src + "/")]:
                m.files[dst + f[len(src):]] = m.files.pop(f)
            if then_read:
                for f in [f for f in m.files if f.startswith(dst + "/")]:
                    self.check_read(f)
            if dst == "C":  # keep the universe small: back under a name the rules use
                self.client.rename(self.p("C"), self.p(src))
                m.dirs.discard("C")
                m.dirs.add(src)
                for f in [f for f in m.files if f.startswith("C/")]:
                    m.files[src + f[1:]] = m.files.pop(f)

        @precondition(lambda self: self.model.files)
        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            f = data.draw(st.sampled_from(sorted(self.model.files)))
            run.note(f"delete {self.p(f)}")
            self.touch(f)
            self.client.delete(self.p(f))
            del self.model.files[f]

        @precondition(lambda self: self.model.files)
        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            f = data.draw(st.sampled_from(sorted(self.model.files)))
            run.note(f"read {self.p(f)}")
            self.check_read(f)

        @precondition(lambda self: self.model.files)
        @rule(data=st.data())
        def evict(self, data: st.DataObject) -> None:
            """Drop cached copies (of clean files only: the agent refuses the others)."""
            files = sorted(self.model.files)
            for f in data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=len(files), unique=True)):
                run.note(f"evict {self.p(f)}: {run.evict(self.p(f))}")

        @rule(kind=st.sampled_from(["fail_copies", "fail_puts", "fail_gets"]), n=st.integers(1, 4))
        def fail_next(self, kind: str, n: int) -> None:
            if run.proxy.fail_copies or run.proxy.fail_puts or run.proxy.fail_gets:
                return  # one at a time (not a precondition: the proxy's state is not the example's)
            run.note(f"{kind} {n}")
            setattr(run.proxy, kind, getattr(run.proxy, kind) + n)
            run.faults += 1

        @rule(kind=st.sampled_from(["hold", "long hold", "outage"]), steps=st.integers(1, 6))
        def line_fault(self, kind: str, steps: int) -> None:
            """PUTs and copies held on the wire (a long hold: DELETEs too, past the agent's read timeout), or every
            request failing, for a few steps."""
            if run.release_at:
                return
            run.note(f"{kind} for {steps} steps")
            if kind != "outage":
                run.proxy.hold_puts.set()
                if kind == "long hold":
                    run.proxy.hold_deletes.set()
                    run.release_after = time.monotonic() + READ_TIMEOUT + 1
            else:
                run.proxy.fail_all = True
            run.release_at = run.steps + steps
            run.faults += 1

        def kill(self) -> None:
            run.note("kill -9")  # held requests stay on the wire: they land after the restart (check_bucket)
            run.agent.stop(signal.SIGKILL)
            run.agent.start(timeout=180)
            run.killed += 1
            self.reconnect(FtpClient(run.agent))
            run.check_bucket()

        @invariant()
        def after_step(self) -> None:
            run.steps += 1
            if run.release_at and run.steps >= run.release_at and time.monotonic() >= run.release_after:
                run.release()
            if run.kills and run.steps >= run.kills[0]:
                run.kills.pop(0)
                self.kill()
            self.check_listings(self.touched)

        def teardown(self) -> None:
            run.release()
            self.client.close()

    return FaultModel


def test_fault_model(proxied_agent, proxy):
    """Everything the agent sends to S3 goes through the fault proxy (tests/s3fault.py), which injects the faults."""
    seed = int(os.environ.get("PACSGW_MODEL_SEED") or random.randrange(1 << 32))
    print(f"PACSGW_MODEL_SEED={seed}")
    a = proxied_agent(start_timeout=180, **{"uplink.through_timeout": 1, "uplink.read_timeout": READ_TIMEOUT})
    run = Run(a, proxy, seed)
    t0 = time.monotonic()
    run_examples(machine_for(run), lambda: run.steps, STEPS, STEPS_PER_EXAMPLE, shrink=False)
    run.check_bucket()
    print(f"{run.steps} steps, {run.faults} faults, {run.killed} kills, {len(run.models)} examples, "
          f"{time.monotonic() - t0:.0f} s")
    counts: dict[str, int] = {}
    for line in a.log_path.read_text().splitlines():
        try:
            j = json.loads(line)
        except ValueError:
            continue
        ev = j.get("event", "")
        ev += f" {j.get('code')} {str(j.get('reason'))[:40]}" if ev == "ftp_error" else ""
        counts[ev] = counts.get(ev, 0) + 1
    print(sorted(counts.items()))
    assert run.killed == KILLS and not run.kills
