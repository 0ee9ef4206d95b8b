"""Fixtures for the Ansible / image / fleet tests: one appliance tree per test session, shared."""

from __future__ import annotations

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
def appliance(tmp_path_factory, request) -> Path:
    """The appliance built by image/build.sh: mmdebstrap + site.yml over chroot + kernel + disk.

    PACSGW_TEST_IMAGE_DIR (development only, never set in CI) points at an existing build to reuse.
    """
    reuse = os.environ.get("PACSGW_TEST_IMAGE_DIR")
    if reuse:
        yield Path(reuse)
        return
    out = tmp_path_factory.mktemp("image")
    yield build_appliance(out, request.getfixturevalue("base_release"), kernel=True, rootfs_only=False,
                          compress=False)
    # The disk images are 2.5 GB: do not leave them in pytest's retained temporary directories (the
    # tree, under 1 GB, goes with pytest's own cleanup of old runs: deleting it here costs a minute).
    for name in ("pacsgw.raw", "pacsgw.qcow2"):
        (out / name).unlink(missing_ok=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The summary lines logged since the last report ride on this one to the terminal summary (tests/conftest.py),
    which under pytest-xdist is printed by another process than the one that ran the test."""
    report = yield
    report.user_properties.extend(("summary", line) for line in SUMMARY)
    SUMMARY.clear()
    return report
