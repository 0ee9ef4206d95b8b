"""An upload claimed from the queue that waits for a line slot while its file is renamed (live agent, real
SeaweedFS): the delete's tombstone may be carried out before the slot frees, so the upload must not run then."""

from __future__ import annotations

import os
import time

from faultkit import ftp_login, ftp_put
from harness import s3_objects


def test_a_file_renamed_while_its_upload_waits_for_a_slot_leaves_no_object_under_the_old_name(agent_factory):
    """One slot, a slow line: big.bin uploads, small.dcm's upload is claimed behind it, then small.dcm is renamed
    (the old key's tombstone is done at once: no object yet; the cached copy stays, now moved.dcm's). The waiting
    upload used to run when the slot freed and leave small.dcm in the bucket with no row and no tombstone to delete
    it (found by the protocol model in CI: a directory renamed and renamed back left its files' keys under the
    passing name)."""
    agent = agent_factory(**{"uplink.write_mode": "back", "uplink.max_concurrency": 1,
                             "uplink.bwlimit": "2MB"}).start()
    f = ftp_login(agent, timeout=30)
    ftp_put(f, "big.bin", os.urandom(6 * 1024 * 1024))
    ftp_put(f, "small.dcm", b"small")
    time.sleep(0.5)  # the dispatcher claims small.dcm (its upload then waits for big.bin's slot)
    f.rename("small.dcm", "moved.dcm")
    f.quit()
    agent.wait_drained(120)
    assert set(s3_objects(agent.store, agent.prefix)) == {"big.bin", "moved.dcm"}
