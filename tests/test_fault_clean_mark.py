"""A write-through ack waits for S3's answer, not for the catalog's clean mark (issue 14, ingest ack latency).

The clean mark is a catalog commit queued behind other writes' fsyncs; durability needs only the file and its row
fsynced before the PUT and the PUT confirmed. These tests hold the catalog's write lock from another connection
once the PUT is on the wire, so the mark cannot land: the ack must still come, a kill -9 then leaves the row
'uploading', and the restarted agent converges (the same bytes uploaded again, the row clean, nothing lost). The
agent is a real `pacsgw run` process, the clients ftplib, the store SeaweedFS behind the test's fault proxy
(which only holds the PUT until the lock is taken).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from s3fault import FaultProxy

from faultkit import catalog_rows, ftp_get, ftp_login, ftp_put, payload, wait_for
from harness import BUCKET, sha256

ACK_SECONDS = 5.0  # the catalog lock is held far longer than this; SQLite's busy timeout in the agent is 10 s


@contextmanager
def catalog_locked(agent) -> Iterator[sqlite3.Connection]:
    """The catalog's write lock, taken from another connection: no commit of the agent lands until it is let go."""
    db = sqlite3.connect(str(agent.workdir / "cache" / "catalog.sqlite"), isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    finally:
        db.execute("ROLLBACK")
        db.close()


def store_with_clean_mark_held(agent, proxy: FaultProxy, path: str, data: bytes, locks: ExitStack
                               ) -> tuple[str, float]:
    """STOR path; once its PUT is on the wire (the row committed, 'uploading') lock the catalog (until `locks`
    closes), let the PUT through → (the reply, seconds from the PUT's answer to the ack)."""
    replies: list[str] = []
    proxy.hold_puts.set()
    client = threading.Thread(target=lambda: replies.append(ftp_put(ftp_login(agent), path, data)))
    client.start()
    wait_for(lambda: proxy.puts_held == 1, 30, what="the PUT")
    held = locks.enter_context(catalog_locked(agent))
    assert held.execute("SELECT state FROM entries WHERE path = ?", (path,)).fetchone() == ("uploading",)
    t0 = time.monotonic()
    proxy.hold_puts.clear()
    client.join(ACK_SECONDS)
    return (replies[0] if replies else ""), time.monotonic() - t0


def test_kill9_after_a_write_through_ack_before_the_clean_mark_loses_nothing(seaweed, proxied_agent, proxy):
    """Before: the ack waited for the clean mark (here: the agent's 10 s busy timeout, then the row queued again).
    Now it comes at S3's answer; a kill -9 right after it leaves the row 'uploading', the object is in S3, and the
    restart uploads the same bytes again and marks the row clean."""
    agent = proxied_agent(**{"uplink.write_mode": "through"})
    data = payload("acked", 300_000)
    with ExitStack() as locks:
        reply, seconds = store_with_clean_mark_held(agent, proxy, "CT/acked.dcm", data, locks)
        assert reply.startswith("226"), f"no ack within {ACK_SECONDS} s of the PUT's answer: {reply!r}"
        assert seconds < ACK_SECONDS
        key = agent.prefix + "CT/acked.dcm"
        assert seaweed.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
        agent.kill9()  # acknowledged, in S3, and the catalog never heard it was clean
    assert catalog_rows(agent, "SELECT state FROM entries WHERE path = 'CT/acked.dcm'") == [("uploading",)]

    agent.start()
    agent.wait_drained()
    assert catalog_rows(agent, "SELECT state, sha256 FROM entries WHERE path = 'CT/acked.dcm'") == [
        ("clean", sha256(data))]
    assert [e["files"] for e in agent.events("uploads_resumed")] == [1]
    got = seaweed.client().get_object(Bucket=BUCKET, Key=key)
    assert got["Body"].read() == data and got["Metadata"]["sha256"] == sha256(data)
    f = ftp_login(agent)
    assert ftp_get(f, "CT/acked.dcm") == data
    f.quit()


def test_a_rename_right_after_the_ack_finds_the_row_clean(seaweed, proxied_agent, proxy):
    """The clean mark is queued on the catalog's thread before the ack is sent, so the client's next change (here
    the usual STOR x.part, RNFR/RNTO x) runs after it: the rename is a server-side copy of the object, not a second
    upload of the whole file, and leaves no doubt about the old key."""
    agent = proxied_agent(**{"uplink.write_mode": "through"})
    data = payload("part", 200_000)
    with ExitStack() as locks:
        reply, _ = store_with_clean_mark_held(agent, proxy, "CT/x.dcm.part", data, locks)
        assert reply.startswith("226")
        f = ftp_login(agent)
        renamed = threading.Thread(target=lambda: f.rename("CT/x.dcm.part", "CT/x.dcm"))
        renamed.start()
        time.sleep(0.3)  # the rename reaches the catalog's thread while the clean mark still waits there
    renamed.join(30)
    assert not renamed.is_alive()
    agent.wait_drained()
    uploads = {e["path"]: e for e in agent.events("uploaded")}
    assert uploads["CT/x.dcm"]["copy"] is True
    assert catalog_rows(agent, "SELECT key FROM doubts") == []
    assert seaweed.client().get_object(Bucket=BUCKET, Key=agent.prefix + "CT/x.dcm")["Body"].read() == data
    f.quit()
