"""agent.ha.peer_view: the HA peer's /healthz answer arrives over plain HTTP (docs/ha.md, "The peer's status") and
is shown on the status page, by `pacsgw status` in a terminal and in the log: only known values pass, and an
answer that is too long or not a JSON object counts as no answer."""

from __future__ import annotations

import json

import pytest

from agent.ha import PEER_MAX_BYTES, peer_view


def test_a_real_answer_is_shown_as_it_is():
    body = json.dumps({"status": "degraded", "reasons": ["S3 unreachable"],
                       "ha": {"role": "standby", "eligible": False, "reason": "x"}}).encode()
    assert peer_view(body) == {"status": "degraded", "role": "standby", "eligible": False}


def test_hostile_values_are_replaced():
    body = json.dumps({"status": "ok\x1b]2;owned\x07", "ha": {"role": "<script>alert(1)</script>",
                                                             "eligible": "yes"}}).encode()
    assert peer_view(body) == {"status": "unknown", "role": "unknown", "eligible": None}
    assert peer_view(b'{"status": "ok", "ha": ["active"]}') == {"status": "ok", "role": "unknown", "eligible": None}


@pytest.mark.parametrize("body", [b"[1, 2]", b'"ok"', b"not json", b"{" + b" " * PEER_MAX_BYTES + b"}"])
def test_anything_else_is_no_answer(body):
    with pytest.raises(ValueError):
        peer_view(body)
