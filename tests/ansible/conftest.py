"""Fixtures for the Ansible / image / fleet tests: one appliance tree per test run, shared by its workers."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from fleetlib import SUMMARY, build_appliance, build_base_release, log


@pytest.fixture(scope="session")
def base_release(tmp_path_factory) -> Path:
    """This tree's agent as a release archive (wheelhouse)."""
    out = tmp_path_factory.mktemp("releases")
    tar = build_base_release(out)
    log(f"base release {tar.name}")
    return tar


@pytest.fixture(scope="session")
def appliance(appliance_built: Path, request) -> Path:
    """The appliance built by image/build.sh: mmdebstrap + site.yml over chroot + kernel + disk. Once per run: the
    first worker to want it builds it, under a file lock that a worker wanting it meanwhile waits on
    (tests/conftest.py schedules the appliance modules; the run's last process deletes the disks).

    PACSGW_TEST_IMAGE_DIR (development only, never set in CI) points at an existing build to reuse.
    """
    reuse = os.environ.get("PACSGW_TEST_IMAGE_DIR")
    if reuse:
        return Path(reuse)
    out = appliance_built.parent
    failed = out.parent / "appliance.failed"
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "appliance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():   # the same build again would fail the same way, only later
            pytest.fail(f"the appliance build failed in another worker:\n{failed.read_text()}")
        if not appliance_built.exists():
            try:
                build_appliance(out, request.getfixturevalue("base_release"), kernel=True, rootfs_only=False,
                                compress=False)
            except BaseException as e:
                failed.write_text(str(e)[-8000:])
                raise
            appliance_built.touch()
    return out


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The summary lines logged since the last report ride on this one to the terminal summary (tests/conftest.py),
    which under pytest-xdist is printed by another process than the one that ran the test."""
    report = yield
    report.user_properties.extend(("summary", line) for line in SUMMARY)
    SUMMARY.clear()
    return report
