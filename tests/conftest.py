"""Shared fixtures: real loopback object stores and real agent processes."""

from __future__ import annotations

import hashlib
import time

import pytest

from agent.devstack import AgentProc, ObjectStore

BUCKET = "pacs-test"
PASSWORD = "test-only-password"  # test-only credential for the agents these tests start


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def agent_factory(tmp_path, seaweed):
    """Start agents (default: against SeaweedFS, a fresh prefix per test); all stopped at teardown."""
    started: list[AgentProc] = []

    def make(store: ObjectStore | None = None, *, prefix: str | None = None, **overrides) -> AgentProc:
        users = overrides.pop("users", None)
        workdir = tmp_path / f"agent{len(started)}"
        workdir.mkdir()
        a = AgentProc(workdir, store or seaweed, prefix if prefix is not None else f"t{time.time_ns()}/",
                      overrides, users or [{"name": "pacs", "password": PASSWORD, "root": "/"}], bucket=BUCKET)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


def s3_objects(store: ObjectStore, prefix: str) -> dict[str, dict]:
    """Every object under prefix → {'size', 'sha256' (from the bytes themselves), 'meta'}."""
    client = store.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=BUCKET, Key=obj["Key"])
            body = got["Body"].read()
            out[obj["Key"][len(prefix):]] = {"size": len(body), "sha256": sha256(body),
                                             "meta": {k.lower(): v for k, v in got.get("Metadata", {}).items()}}
    return out


@pytest.fixture
def private_seaweed(tmp_path_factory) -> ObjectStore:
    """A SeaweedFS of this test's own, for tests that stop and start the object store (outages)."""
    store = ObjectStore("seaweedfs", tmp_path_factory.mktemp("seaweed-private")).start()
    store.create_bucket(BUCKET)
    yield store
    store.stop()
