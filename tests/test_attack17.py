"""Attacks on a running agent (round 17): hostile SFTP, SMB and HTTP clients against a real agent, with real client
libraries or raw sockets. Each test reproduces one attack that worked and checks it no longer does."""

from __future__ import annotations

import pytest
import smbclient
from smbprotocol.exceptions import SMBException
from smbutil import Smb

from harness import PASSWORD, s3_objects

SMB_ERRORS = (OSError, SMBException)


def test_an_smb_file_renamed_before_its_close_gets_no_name_a_client_could_not_create(smb_agent):
    """A new file an SMB client still has open is not in the catalog yet: its rename was judged by the FUSE layer
    alone, and the name rules of every new name (Windows device names, a trailing dot, text-direction controls)
    and a stored file's protection were never asked. Created as new.dcm and renamed to CON, aux.txt, x. or
    report-\u202eexe.dcm before its CLOSE, it was stored under that name: in S3, and listed to SMB clients under a
    mangled name they can neither open nor delete. A user without `delete` renamed its new file over a stored one:
    the rename answered success, and the CLOSE then failed and dropped the file. Both renames are refused now, as
    the rename of a stored file is, and the CLOSE stores the file under its own name."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "modality", "password": PASSWORD, "root": "/",
                              "permissions": ["read", "write", "rename"]}]).start(timeout=180)
    smb, modality = Smb(agent), Smb(agent, user="modality")
    modality.write("stored.dcm", b"the stored image")
    cases = [(smb, bad, "INVALID_PARAMETER") for bad in ("CON", "aux.txt", "x.", "report-\u202eexe.dcm")]
    cases.append((modality, "stored.dcm", "ACCESS_DENIED"))
    for i, (client, bad, status) in enumerate(cases):
        with smbclient.open_file(client.p(f"new{i}.dcm"), mode="wb", share_access="rwd", **client.kw) as f:
            f.write(b"image %d" % i)
            f.flush()  # the bytes reach the agent: the file is being written
            with pytest.raises(SMB_ERRORS, match=status):
                smbclient.replace(client.p(f"new{i}.dcm"), client.p(bad), **client.kw)
    names = [f"new{i}.dcm" for i in range(len(cases))]
    assert smb.listdir() == sorted([*names, "stored.dcm"])
    assert [smb.read(name) for name in names] == [b"image %d" % i for i in range(len(cases))]
    assert smb.read("stored.dcm") == b"the stored image"
    agent.wait_drained(60)
    assert sorted(s3_objects(agent.store, agent.prefix)) == sorted([*names, "stored.dcm"])
    smb.close()
    modality.close()
