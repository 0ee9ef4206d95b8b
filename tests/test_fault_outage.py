"""Outage: the object store goes away for 30 s in the middle of an ingest.

DESIGN.md: if the uplink is down the gateway degrades to write-back: it still accepts writes against the
durable local journal, says so on /healthz and in the log, and drains the queue when the line returns.
The object store is a private SeaweedFS that the test really stops (SIGTERM) and starts again on the same
ports and data; the PACS is two ftplib and two asyncssh clients storing files the whole time.
"""

from __future__ import annotations

import time

import pytest

from faultkit import Ingest, catalog_rows, ftp_login, ftp_put, wait_for
from harness import s3_objects, sha256

OUTAGE_SECONDS = 30


@pytest.mark.slow
def test_object_store_outage_during_ingest(agent_factory, private_seaweed):
    store = private_seaweed
    a = agent_factory(store).start()
    assert a.health()["status"] == "ok"
    ingest = Ingest(a, ftp_clients=2, sftp_clients=2, pause=0.25).start()
    try:
        wait_for(lambda: len(ingest.acked) >= 20, 60, what="ingest to get going")
        store.stop()
        down_at = time.monotonic()

        # The agent notices (a failed write-through PUT or probe) and says so.
        h = wait_for(lambda: (lambda h: h if h["status"] == "degraded" else None)(a.health()), 30,
                     what="/healthz to say degraded")
        assert h["uplink"]["reachable"] is False
        assert h["write_mode"] == "through (degraded to write-back)"
        assert "unreachable" in " ".join(h["reasons"])
        noticed_at = time.monotonic()
        # ... and keeps saying so, while the PACS keeps storing, for the rest of the outage.
        samples = []
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            samples.append(a.health())
            time.sleep(0.5)
        assert samples and all(s["status"] == "degraded" and not s["uplink"]["reachable"] for s in samples)
        assert max(s["queue_depth"] for s in samples) > 0
        acks_during = ingest.acks_between(noticed_at, time.monotonic())
        assert acks_during >= 10, f"only {acks_during} files acknowledged while the store was down"

        store.start()
        up_at = time.monotonic()
        wait_for(lambda: a.health()["uplink"]["reachable"], 60, what="uplink to be reachable again")
        # Some more ingest with the line back, then stop the PACS.
        wait_for(lambda: ingest.acks_between(up_at, time.monotonic()) >= 10, 60, what="ingest after the outage")
    finally:
        ingest.stop()

    assert ingest.errors == [], f"the PACS saw errors: {ingest.errors[:5]}"
    h = a.wait_drained(120)
    assert h["status"] == "ok" and h["uplink"]["reachable"] and h["queue_depth"] == 0
    assert a.events("uplink_unreachable") and a.events("uplink_reachable")

    objects = s3_objects(store, a.prefix)
    missing = sorted(set(ingest.acked) - set(objects))
    assert missing == [], f"{len(missing)} acknowledged files not in S3, e.g. {missing[:3]}"
    bad = [p for p, sha in ingest.acked.items() if objects[p]["sha256"] != sha]
    assert bad == [], f"wrong content in S3: {bad[:3]}"
    assert set(objects) == set(ingest.acked)
    assert {state for _, state, *_ in catalog_rows(a)} == {"clean"}


def test_a_file_in_a_directory_never_listed_is_unavailable_not_missing_while_the_store_is_down(
        agent_factory, private_seaweed):
    """A file written to the bucket by another box, in a directory this agent has not listed yet: with object
    storage down the agent cannot know whether it is there, so a read is refused as unavailable (FTP 451, an SFTP
    failure, not "no such file", which a PACS would take as final); a name missing from a directory already
    listed is still 550; and the same read succeeds once the store is back."""
    import asyncio
    import ftplib
    import io

    import asyncssh

    from faultkit import sftp_session
    from harness import BUCKET, PASSWORD

    store = private_seaweed
    a = agent_factory(store).start()
    store.client().put_object(Bucket=BUCKET, Key=a.prefix + "MR/prior.dcm", Body=b"p" * 4096)
    f = ftplib.FTP(timeout=60)
    f.connect("127.0.0.1", a.ftp_port)
    f.login("pacs", PASSWORD)
    f.storbinary("STOR CT/new.dcm", io.BytesIO(b"n" * 100))  # CT is listed (it was looked up to write)
    f.nlst("CT")
    store.stop()
    with pytest.raises(ftplib.error_temp, match="^451"):
        f.retrbinary("RETR MR/prior.dcm", io.BytesIO().write)
    with pytest.raises(ftplib.error_perm, match="^550"):
        f.retrbinary("RETR CT/absent.dcm", io.BytesIO().write)

    async def sftp_read() -> None:
        async with sftp_session(a) as s:
            with pytest.raises(asyncssh.SFTPError) as refused:
                await s.open("MR/prior.dcm", "rb")
            assert refused.value.code == asyncssh.FX_FAILURE

    asyncio.run(sftp_read())
    store.start()
    wait_for(lambda: a.health()["uplink"]["reachable"], 60, what="uplink to be reachable again")
    out = io.BytesIO()
    f.retrbinary("RETR MR/prior.dcm", out.write)
    assert out.getvalue() == b"p" * 4096
    f.quit()


def test_a_directory_renamed_away_and_back_while_the_store_is_down_is_stored_once(agent_factory, private_seaweed):
    """CI's protocol model found it: a clean file's directory renamed A → C → A before the copy to C ran leaves
    a row whose copy source is its own key. S3 refuses a copy onto itself (InvalidRequest), so the row was
    retried for ever and the queue never drained. The object never left its key: the row is clean again with no
    copy, and C holds nothing."""
    store = private_seaweed
    a = agent_factory(store).start()
    f = ftp_login(a)
    ftp_put(f, "CT/x.dcm", b"x" * 100)
    a.wait_drained(60)
    store.stop()
    ftp_put(f, "CT/y.dcm", b"y" * 100)  # its write-through PUT finds the line down
    wait_for(lambda: not a.health()["uplink"]["reachable"], 60, what="the line to be down")
    f.rename("CT", "MR")
    f.rename("MR", "CT")
    f.quit()
    store.start()
    h = a.wait_drained(60)
    assert h["queue_depth"] == 0 and h["pending_deletes"] == 0
    objects = s3_objects(store, a.prefix)
    assert {k: v["sha256"] for k, v in objects.items()} == {"CT/x.dcm": sha256(b"x" * 100),
                                                            "CT/y.dcm": sha256(b"y" * 100)}
    assert not [e for e in a.events("upload_failed") if "InvalidRequest" in e.get("error", "")]
