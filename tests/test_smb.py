"""SMB: real smbd sharing the agent's FUSE view; smbprotocol's smbclient as the PACS."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import s3_objects, sha256
from smbutil import Smb, cleanup_smb, smb_overrides


@pytest.fixture
def smb_agent(agent_factory):
    made, bases = [], []

    def make(**overrides):
        base = Path(tempfile.mkdtemp(prefix="pacsgw-smb-"))
        os.chmod(base, 0o755)
        bases.append(base)
        a = agent_factory(**{**smb_overrides(base), **overrides})
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        cleanup_smb(a)
    for base in bases:
        shutil.rmtree(base, ignore_errors=True)


def test_round_trip(smb_agent):
    agent = smb_agent().start()
    smb = Smb(agent)
    files = {f"CT/2026-11-23/1.2.3/{i}.dcm": os.urandom(1000 * i + 7) for i in range(1, 6)}
    smb.makedirs("CT/2026-11-23/1.2.3")
    for path, data in files.items():
        smb.write(path, data)
    assert smb.listdir("CT/2026-11-23/1.2.3") == sorted(f"{i}.dcm" for i in range(1, 6))
    for path, data in files.items():
        assert smb.read(path) == data
    smb.close()
    remote = s3_objects(agent.store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == {p: sha256(d) for p, d in files.items()}
