"""Attacks on a running agent (round 36): the admin HTTP endpoints' bodies, and SMB beyond plain uploads (byte-range
locks, sessions and tree connects on one connection, set-info, delete-on-close, directory renames). Each test
reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from smbprotocol.exceptions import SMBException
from smbprotocol.tree import TreeConnect
from smbutil import Smb, create_for_write
from test_smb_hostile import logged_in_tree, wait_for


def test_an_admin_body_nested_too_deep_or_in_an_unknown_charset_is_a_400_not_a_500(agent_factory):
    """An admin POST whose JSON nests 100 000 arrays (RecursionError in the decoder) or whose Content-Type names a
    charset Python does not know (LookupError) got '500 Server got itself in trouble' and a traceback in the journal
    each, where a body that is not JSON gets a 400 naming what the endpoint expects. Both get that 400 now."""
    agent = agent_factory().start()
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    for body, content_type in ((b"[" * 100_000 + b"]" * 100_000, "application/json"),
                               (b'{"path": "CT/x.dcm"}', "application/json; charset=no-such-charset")):
        req = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/admin/evict", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400, content_type
            assert json.load(e) == {"error": 'expected a JSON body {"path": "…"}'}
    assert "Traceback" not in agent.log_path.read_text()


def test_one_smb_connection_cannot_grow_its_smbd_without_end(smb_agent):
    """Samba caps no connection's tree connects (65 534 per session), sessions (65 534) or byte-range locks: one
    logged-in client repeating TREE_CONNECT grew its smbd process by 8 KB each, a session setup by 10 KB, thousands
    a second, until the box ran out of memory (3 000 tree connects: 17 → 43 MB). An smbd process over
    [smb] max_process_memory is killed now: its connection is cut, its unfinished upload discarded, not stored, and
    the other clients go on."""
    agent = smb_agent(**{"smb.max_process_memory": "48MiB"}).start(timeout=180)
    smb = Smb(agent)
    conn, tree = logged_in_tree(agent, smb)
    create_for_write(tree, "half.dcm").write(b"h" * 2**20, 0)  # never closed
    made, cut = 0, None
    while made < 8_000 and cut is None:
        try:
            TreeConnect(tree.session, smb.root).connect()
            made += 1
        except (SMBException, OSError) as e:  # the connection is cut
            cut = e
    assert cut is not None, f"{made} tree connects on one connection were all accepted"
    [killed] = agent.wait_events("smbd_process_killed", timeout=10)
    assert killed["rss"] > killed["limit"] == 48 * 2**20
    smb.write("other.dcm", b"another client stores")
    wait_for(lambda: agent.events("upload_aborted"), 10)
    assert [e["path"] for e in agent.events("upload_aborted")] == ["half.dcm"]
    assert smb.listdir("") == ["other.dcm"]
    agent.wait_drained(30)
    assert [e["path"] for e in agent.events("stored")] == ["other.dcm"]
    smb.close()
