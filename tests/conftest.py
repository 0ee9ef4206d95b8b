"""Shared fixtures: real loopback object stores and real agent processes."""

from __future__ import annotations

import time

import pytest

from agent.devstack import ObjectStore
from harness import BUCKET, AgentProc


def _session_store(kind: str, tmp_path_factory):  # noqa: ANN202 - a generator fixture body
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


@pytest.fixture
def agent_factory(tmp_path, seaweed):
    """Start agents (default: against SeaweedFS, a fresh prefix per test); all stopped at teardown."""
    started: list[AgentProc] = []

    def make(store: ObjectStore | None = None, *, prefix: str | None = None, **overrides) -> AgentProc:
        users = overrides.pop("users", None)
        workdir = tmp_path / f"agent{len(started)}"
        workdir.mkdir()
        a = AgentProc(workdir, store or seaweed, prefix if prefix is not None else f"t{time.time_ns()}/",
                      overrides, users)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def private_seaweed(tmp_path_factory) -> ObjectStore:
    """A SeaweedFS of this test's own, for tests that stop and start the object store (outages)."""
    store = ObjectStore("seaweedfs", tmp_path_factory.mktemp("seaweed-private")).start()
    store.create_bucket(BUCKET)
    yield store
    store.stop()
