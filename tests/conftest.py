"""Shared fixtures: real loopback object stores and real agent processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from devstack import AgentProc, ObjectStore
from harness import BUCKET, PASSWORD

LOCKED_BUCKET = "pacs-worm"  # created with S3 Object Lock (and so versioning), for the WORM tests

# Session fixtures that build the appliance (tests/ansible/conftest.py): minutes each, and pytest-xdist builds a
# session fixture once per worker that asks for it.
APPLIANCE_FIXTURES = {"appliance", "base_release"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for `make test`'s workers (--dist loadgroup): every test of the appliance in one group, so it is built
    once and its fleet and VM tests run in their order on one worker; every other module's tests together, so a
    module fixture is made once and a module's tests run in order, as they do serially."""
    for item in items:
        appliance = APPLIANCE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.xdist_group("appliance" if appliance else item.nodeid.split("::", 1)[0]))


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
