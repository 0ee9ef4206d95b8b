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
