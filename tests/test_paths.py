"""Confinement: no client path, however spelled, resolves outside the user's root."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.store.errors import BadPath, GatewayError, PermissionDenied
from agent.store.paths import ancestors, resolve


@pytest.mark.parametrize("root,cwd,path,expected", [
    ("/", "/", "CT/a.dcm", "CT/a.dcm"),
    ("/", "/CT", "a.dcm", "CT/a.dcm"),
    ("/", "/CT", "../MR/a.dcm", "MR/a.dcm"),
    ("/CT", "/", "/2026/a.dcm", "CT/2026/a.dcm"),
    ("/CT", "/", "./x/./y", "CT/x/y"),
    ("/", "/", "a//b///c", "a/b/c"),
    ("/", "/", "/", ""),
    ("/", "/", "..%2F..%2Fetc", "..%2F..%2Fetc"),  # literal name: never URL-decoded
])
def test_resolve(root, cwd, path, expected):
    assert resolve(root, cwd, path) == expected


@pytest.mark.parametrize("path,error", [
    ("..", PermissionDenied), ("../etc/passwd", PermissionDenied), ("/../../etc", PermissionDenied),
    ("a/../../b", PermissionDenied), ("a\0b", BadPath), ("a\\..\\b", BadPath), ("x" * 256, BadPath),
    ("/".join(["d" * 200] * 6), BadPath), ("new\nline", BadPath),
])
def test_refused(path, error):
    with pytest.raises(error):
        resolve("/CT", "/", path)


def test_ancestors():
    assert ancestors("a/b/c") == ["", "a", "a/b"]
    assert ancestors("a") == [""]


@given(st.lists(st.sampled_from(["..", ".", "", "a", "b", "%2e%2e", "..\u2215", "\u202e"]), max_size=12),
       st.sampled_from(["/", "/CT", "/CT/2026"]), st.booleans())
def test_never_escapes_root(parts, root, absolute):
    path = ("/" if absolute else "") + "/".join(parts)
    try:
        ns = resolve(root, "/", path)
    except GatewayError:
        return
    root_ns = root.strip("/")
    assert ns == root_ns or ns.startswith(root_ns + "/") or not root_ns
    assert ".." not in ns.split("/")
