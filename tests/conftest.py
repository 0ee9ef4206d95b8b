"""Shared fixtures: real loopback object stores and real agent processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from s3fault import FaultProxy

from devstack import AgentProc, ObjectStore
from harness import BUCKET, PASSWORD

LOCKED_BUCKET = "pacs-worm"  # created with S3 Object Lock (and so versioning), for the WORM tests

# The modules whose tests use the appliance (tests/ansible/conftest.py's `appliance`: minutes to build). Under
# `make test`'s pytest-xdist workers they are one unit of work, run in their order on one worker, while the other runs
# the rest of the suite (every other module a unit of its own: module fixtures made once, its tests in order). The
# build is shared through a file lock all the same. Not overlapped: with the qemu boots (TCG, two threads) beside the
# fleet's containers on the other worker, a quiet run took ~55 minutes against 23-25 in series.
APPLIANCE_MODULES = frozenset(f"tests/ansible/{name}.py" for name in (
    "test_ansible_fleet", "test_ansible_site", "test_first_start", "test_image_boot"))
APPLIANCE_FIXTURES = {"appliance", "base_release"}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A new module of appliance tests must join APPLIANCE_MODULES (or a second worker would wait on the build)."""
    for item in items:
        uses = APPLIANCE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses and _module(item.nodeid) not in APPLIANCE_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses the appliance: add its module to APPLIANCE_MODULES")


def _run_tmp(config: pytest.Config) -> Path:
    """A directory every process of this run sees: pytest's base temporary directory (under pytest-xdist the
    controller's, whose popen-gwN sub-directories are the workers' own)."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def _appliance_built(config: pytest.Config) -> Path:
    """The marker of the run's appliance build; the build is in its directory."""
    return _run_tmp(config) / "appliance" / "built"


def _drop_appliance_disks(config: pytest.Config) -> None:
    """The appliance's disk images: 2.5 GB, not for pytest's retained temporary directories (the tree, under 1 GB,
    goes with pytest's own cleanup of old runs: deleting it here costs a minute)."""
    for name in ("pacsgw.raw", "pacsgw.qcow2"):
        (_appliance_built(config).parent / name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def appliance_built(request) -> Path:
    yield _appliance_built(request.config)
    if not hasattr(request.config, "workerinput"):   # a serial run: no other process uses the disks
        _drop_appliance_disks(request.config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist the controller, which ends after every worker, deletes the appliance's disks."""
    if session.config.getoption("dist", "no") != "no" and not hasattr(session.config, "workerinput"):
        _drop_appliance_disks(session.config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by module, with the appliance's modules as one unit. (Not its xdist_group marks:
    with pytest 9.2 pytest-xdist 3.8 cannot add the group to the test ids, and every test was a unit of its own.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "appliance" if module in APPLIANCE_MODULES else module

    return ByModule(config, log)


_SUMMARY: list[str] = []   # what tests asked to show in the terminal summary, from every worker


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SUMMARY.extend(value for name, value in report.user_properties if name == "summary")


def pytest_terminal_summary(terminalreporter) -> None:
    if _SUMMARY:
        terminalreporter.write_sep("-", "fleet and image tests")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


def _session_store(kind: str, tmp_path_factory):  # a generator fixture body
    store = ObjectStore(kind, tmp_path_factory.mktemp(kind)).start()
    store.create_bucket(BUCKET)
    yield store
    store.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> ObjectStore:
    yield from _session_store("seaweedfs", tmp_path_factory)


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory) -> ObjectStore:
    yield from _session_store("rclone", tmp_path_factory)


@pytest.fixture(params=["seaweedfs", "rclone"])
def any_store(request) -> ObjectStore:
    """The S3-facing tests run against both independent S3 implementations."""
    return request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "rclone_s3")


def _agents(root: Path, default_store: ObjectStore):  # a generator fixture body
    """Start agents (default: against default_store, a fresh prefix each); all stopped at teardown."""
    started: list[AgentProc] = []

    def make(store: ObjectStore | None = None, *, prefix: str | None = None, **overrides) -> AgentProc:
        users = overrides.pop("users", None)
        workdir = root / f"agent{len(started)}"
        workdir.mkdir()
        a = AgentProc(workdir, store or default_store, prefix if prefix is not None else f"t{time.time_ns()}/",
                      overrides, users or [{"name": "pacs", "password": PASSWORD, "root": "/"}], bucket=BUCKET)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def agent_factory(tmp_path, seaweed):
    yield from _agents(tmp_path, seaweed)


@pytest.fixture(scope="module")
def module_agent_factory(tmp_path_factory, seaweed):
    """agent_factory for agents that the tests of one module share (the conformance suite)."""
    yield from _agents(tmp_path_factory.mktemp("agents"), seaweed)


@pytest.fixture
def private_seaweed(tmp_path_factory) -> ObjectStore:
    """A SeaweedFS of this test's own, for tests that stop and start the object store (outages)."""
    store = ObjectStore("seaweedfs", tmp_path_factory.mktemp("seaweed-private")).start()
    store.create_bucket(BUCKET)
    yield store
    store.stop()


@pytest.fixture
def proxy(seaweed) -> FaultProxy:
    """tests/s3fault.py's proxy in front of the shared SeaweedFS: it fails or holds the requests a test chooses
    (faults a healthy SeaweedFS cannot be made to produce on demand)."""
    p = FaultProxy(seaweed.endpoint_url).start()
    yield p
    p.stop()


@pytest.fixture
def proxied_agent(agent_factory, proxy):
    """Start an agent (agent_factory's overrides) whose uplink goes through `proxy`."""
    def start(start_timeout: float = 30.0, **overrides) -> AgentProc:
        return agent_factory(**{"uplink.endpoint_url": proxy.endpoint_url, **overrides}).start(start_timeout)
    return start


@pytest.fixture(scope="session")
def locked_bucket(seaweed) -> str:
    seaweed.create_bucket(LOCKED_BUCKET, object_lock=True)
    return LOCKED_BUCKET


def _smb_agents(agent_factory):  # a generator fixture body
    """Agents serving SMB too (real smbd over the FUSE mount; needs root); smbd and the mount are cleaned up."""
    from smbutil import cleanup_smb, smb_overrides
    made, bases = [], []

    def make(**overrides) -> AgentProc:
        base = Path(tempfile.mkdtemp(prefix="pacsgw-smb-"))
        os.chmod(base, 0o755)
        bases.append(base)
        a = agent_factory(**{**smb_overrides(base), **overrides})
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        cleanup_smb(a)
        log = Path(a.overrides["smb.state_dir"]) / "log" / "smbd.log"
        if log.exists():  # keep Samba's log beside the agent's for a failed test
            shutil.copy(log, a.workdir / "smbd.log")
    for base in bases:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def smb_agent(agent_factory):
    yield from _smb_agents(agent_factory)


@pytest.fixture(scope="module")
def module_smb_agent(module_agent_factory):
    yield from _smb_agents(module_agent_factory)


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths fsynced, in order (a spy on os.fsync: a power cut cannot be produced here). A file is named by the
    name it was opened by: a spare's is its spare/ link's."""
    seen: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen
