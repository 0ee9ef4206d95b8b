"""mypy, strict, over the layers below the gateway facade (the files listed in pyproject's [tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_strict_is_clean():
    p = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(REPO / "build" / "mypy-cache")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert "Success" in p.stdout
