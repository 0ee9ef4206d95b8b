"""A cached RETR's bookkeeping without Counter arithmetic or audit.op's context manager (docs/benchmarks.md §44):
what a read holds is given back at its end, read after read, and a failed open is audited once, as before."""

from __future__ import annotations

import ftplib

import pytest
from test_audit import audit_records
from test_ftp import ftp, get
from test_ftp_hostile import port_range

from faultkit import ftp_put, payload

MiB = 1 << 20


def test_reads_give_back_their_bytes_and_passive_ports_read_after_read(agent_factory):
    """A passive range of 4 ports (2 a user) and readers' files bounded to 2.5 MB of the cache: 12 reads of a 1 MiB
    file in one session, one after the other, all complete; a port or a byte not given back at a read's end would
    refuse the third (425 'holds 2 passive ports', 451 'open for reading')."""
    low, high = port_range(4)
    agent = agent_factory(**{"ftp.passive_ports": f"{low}-{high}", "cache.max_bytes": "10MB",
                             "cache.max_open_for_reading": 0.25, "cache.max_open_for_reading_per_user": 0.25}).start()
    f = ftp(agent)
    data = payload("speed38", MiB)
    assert ftp_put(f, "CT/a.dcm", data).startswith("226")
    for _ in range(12):
        assert get(f, "CT/a.dcm") == data
    assert not agent.events("open_for_reading_limit") and not agent.events("passive_ports_held")
    f.quit()


def test_a_failed_open_is_audited_once_and_gives_back_what_it_held(agent_factory):
    """A missing file (550) and a directory (550) are each recorded once as the open's error, as audit.op wrote
    them; the file read after them is recorded 'ok' once."""
    agent = agent_factory(**{"cache.max_bytes": "10MB", "cache.max_open_for_reading_per_user": 0.25}).start()
    f = ftp(agent)
    assert ftp_put(f, "CT/b.dcm", payload("b", 2 * MiB)).startswith("226")
    for path in ("CT/missing.dcm", "CT"):
        for _ in range(3):
            with pytest.raises(ftplib.error_perm, match="^550"):
                get(f, path)
    assert get(f, "CT/b.dcm") == payload("b", 2 * MiB)
    records = [(r["path"], r["result"]) for r in audit_records(agent) if r["op"] == "retrieve"]
    assert [p for p, _ in records] == ["CT/missing.dcm"] * 3 + ["CT"] * 3 + ["CT/b.dcm"]
    assert all(result.startswith("error: NotFound") for _, result in records[:3])
    assert all(result.startswith("error: IsADirectory") for _, result in records[3:6])
    assert records[6][1] == "ok"
    f.quit()
