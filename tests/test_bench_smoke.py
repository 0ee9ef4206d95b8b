"""The benchmarks still run: each script on a tiny size, against its real servers (ours and rclone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, figure", [
    ("ingest.py", ["--files", "4", "--clients", "2", "--size", "4096", "--verify", "--protocols", "ftp,sftp"],
     "ours/rclone"),
    ("read.py", ["--files", "2", "--readers", "1", "--size", "4096"], "ours/rclone"),
    ("read.py", ["--files", "2", "--readers", "2", "--size", "4096", "--targets", "pacsgw", "--workers", "2",
                 "--agent-cpus", "0"], "workers 2, CPUs 0"),
    ("staging.py", ["--calls", "60", "--every-ms", "0"], "new_staging on the caller"),
    ("catalog_commits.py", ["--processes", "1,2", "--commits", "20"], "'gens_unique': True"),
    ("ingest_smb.py", ["--files", "4", "--clients", "2", "--size", "4096", "--big-mb", "4"], "FUSE overhead"),
])
def test_bench_script_runs_on_a_tiny_size(script, args, figure):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert figure in out.stdout
