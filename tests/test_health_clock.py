"""/healthz reports whether the system clock is synchronised (issue 15, item 7): S3 request signing fails
once the clock drifts by 15 minutes, so the admin and the fleet's alerting must see it coming."""

from __future__ import annotations

import ctypes

from agent.serve.http import TIME_ERROR, clock_sync, judge


def _health(clock: dict) -> dict:
    return {"uplink": {"reachable": True, "last_error": None}, "oldest_dirty_seconds": 0.0,
            "pressure": {"level": "normal", "reasons": []}, "cache": {"disk_free": 10 ** 12, "inodes_free": 1},
            "clock": clock}


def test_clock_state_is_the_kernels():
    """What the kernel's NTP state says (adjtimex read-only, as timedatectl's NTPSynchronized does)."""
    state = ctypes.CDLL(None).adjtimex(ctypes.create_string_buffer(512))
    got = clock_sync()
    assert got == {"synchronized": state != TIME_ERROR, "source": "adjtimex"}


def test_an_unsynchronised_clock_is_a_reason_not_a_status():
    """The box keeps serving (the uplink's own state says whether S3 accepts it); the reason is shown."""
    status, reasons = judge(_health({"synchronized": False, "source": "adjtimex"}), 1)
    assert status == "ok" and any("clock not synchronised" in r for r in reasons)
    status, reasons = judge(_health({"synchronized": True, "source": "adjtimex"}), 1)
    assert status == "ok" and reasons == []


def test_a_cache_file_system_that_counts_no_inodes_is_not_out_of_them():
    """btrfs reports no inode counts (statvfs f_files 0): /status shows inodes_free null, and /healthz is not
    "failing (no inodes left)" for good, as it was when 0 free inodes were read from it; 0 of a counted total is."""
    health = _health({"synchronized": True, "source": "adjtimex"})
    health["cache"]["inodes_free"] = None
    assert judge(health, 1) == ("ok", [])
    health["cache"]["inodes_free"] = 0
    assert judge(health, 1) == ("failing", ["cache disk nearly full (no inodes left): new writes may be refused"])
