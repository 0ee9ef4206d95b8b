"""mypy, strict, over the front ends, the gateway facade and the layers below it (pyproject's [tool.mypy] files)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(REPO / "build" / "mypy-cache"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_strict_set_covers_every_layer_from_the_front_ends_down():
    files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert {"agent/serve", "agent/store", "agent/uplink", "agent/policy", "agent/records.py"} <= set(files)


def test_mypy_strict_is_clean():
    p = _mypy()
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert "Success" in p.stdout


def test_a_wrong_call_through_the_async_catalog_is_a_type_error(tmp_path):
    """AsyncCatalog's methods carry Catalog's signatures (no __getattr__ erasing them to Any), and they are what
    the uplink's UploadQueue protocol asks for."""
    probe = tmp_path / "probe.py"
    probe.write_text("from agent.store.catalog import AsyncCatalog\nfrom agent.uplink.uploader import UploadQueue\n\n\n"
                     "async def f(db: AsyncCatalog) -> str:\n    return await db.get_state(1)\n\n\n"
                     "def g(db: AsyncCatalog) -> UploadQueue:\n    return db\n")
    out = _mypy("--strict", str(probe)).stdout
    assert "Found 2 errors" in out, out  # and none in g: AsyncCatalog is the uploader's UploadQueue
    assert 'Argument 1 has incompatible type "int"; expected "str"' in out, out
    assert 'Incompatible return value type (got "str | None", expected "str")' in out, out
