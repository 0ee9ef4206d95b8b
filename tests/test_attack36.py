"""Attacks on a running agent (round 36): the admin HTTP endpoints' bodies, and SMB beyond plain uploads (byte-range
locks, sessions and tree connects on one connection, set-info, delete-on-close, directory renames). Each test
reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


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
