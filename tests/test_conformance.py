"""Conformance (issue 16, like rclone's vfstest): each scenario is written once and run against FTP, SFTP and SMB
through tests/clients.py; the scenarios with S3 requests of their own (puts, copies, deletes, listings and reads
of foreign objects) run once more over FTP with rclone's S3 server behind the agent, the second S3 implementation.
Every scenario checks what the client sees and what S3 holds.

One agent per target serves all of a target's scenarios (each in a directory named after the test), with users
confined to /confined and /US and, written to the bucket before the agent started, objects only S3 knows.
Protocol-specific behaviour (FTP REST/APPE replies and the aioftp client, SFTP keys and random-access writes,
SMB's large files, Samba settings, FUSE flushes, kill -9) stays in test_ftp.py, test_sftp.py, test_smb.py.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass

import pytest
from clients import (
    CLIENTS,
    BadName,
    Client,
    Exists,
    FtpClient,
    IsADirectory,
    LoginFailed,
    NotADirectory,
    NotEmpty,
    NotFound,
    Refused,
    SftpClient,
    Stat,
    sftp_upload_held,
)

from devstack import AgentProc
from faultkit import reset_close, wait_for
from harness import BUCKET, PASSWORD, s3_objects, sha256

PROTOCOLS = ["ftp", "sftp", "smb"]
# The scenarios whose S3 requests differ (puts, copies, deletes, foreign listings) also run against rclone's S3.
s3_facing = pytest.mark.parametrize("target", [*PROTOCOLS, "ftp-rclone"], indirect=True)
USERS = [{"name": "pacs", "password": PASSWORD, "root": "/"},
         {"name": "ct", "password": PASSWORD, "root": "/confined"},  # test_user_root_confines
         {"name": "us", "password": PASSWORD, "root": "/US"}]  # test_roots_cannot_be_removed_or_renamed
ONLY_IN_S3 = {"s3only/foreign.dcm": os.urandom(123_457), "s3only/deep/nested.dcm": os.urandom(5_000)}
# Names no client may create: control characters, over 255 bytes, Windows device names, a trailing dot or space,
# a text-direction override (it would list as "report-mcd.exe"), a character Windows names cannot hold.
BAD_NAMES = ["bad\x01name.dcm", "n" * 300 + ".dcm", "CON", "aux", "con.txt", "LPT1.dcm", "x.", "x ",
             "report-\u202eexe.dcm", "a:b.dcm", "q?.dcm", "s*.dcm", 'd"q.dcm', "l<t.dcm", "g>t.dcm", "p|p.dcm"]


def evict(agent: AgentProc, path: str) -> dict:
    """What `pacsgw evict PATH` asks of the running agent (its admin endpoint, with the box's token)."""
    token = (agent.workdir / "cache" / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/admin/evict", method="POST",
                                 data=json.dumps({"path": path}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def wait_fetched(agent: AgentProc, *paths: str, timeout: float = 10.0) -> None:
    """'fetched' is logged once the copy is cached, which may be just after the last byte was served."""
    deadline = time.monotonic() + timeout
    while not set(paths) <= {e["path"] for e in agent.events("fetched")}:
        assert time.monotonic() < deadline, f"no 'fetched' event for {paths}"
        time.sleep(0.1)


@dataclass
class Target:
    name: str
    agent: AgentProc

    @property
    def protocol(self) -> str:
        return self.name.split("-")[0]

    def client(self, user: str = "pacs", password: str = PASSWORD) -> Client:
        return CLIENTS[self.protocol](self.agent, user, password)

    def s3(self, directory: str) -> dict[str, dict]:
        """The objects below a directory: {path relative to it: {'size', 'sha256', 'meta'}}."""
        return s3_objects(self.agent.store, f"{self.agent.prefix}{directory}/")

    def s3_hashes(self, directory: str, drained: bool = False) -> dict[str, str]:
        if drained:  # deletes and renames reach S3 from the upload queue, after the client's reply
            self.agent.wait_drained(120)
        return {p: r["sha256"] for p, r in self.s3(directory).items()}


@pytest.fixture(scope="module", params=PROTOCOLS)
def target(request, module_agent_factory) -> Target:
    quick = {"login.delay_seconds": 0.05}  # wrong passwords are answered at once: no slowed guessing to wait for
    if request.param == "smb":
        agent = request.getfixturevalue("module_smb_agent")(users=USERS, **quick)
    else:
        store = request.getfixturevalue("rclone_s3" if request.param.endswith("rclone") else "seaweed")
        agent = module_agent_factory(store, users=USERS, **quick)
    s3 = agent.store.client()
    for key, data in ONLY_IN_S3.items():  # written by another tool (or the box this one replaced)
        s3.put_object(Bucket=BUCKET, Key=agent.prefix + key, Body=data)
    return Target(request.param, agent.start(timeout=180))


@pytest.fixture
def c(target):
    client = target.client()
    yield client
    client.close()


@pytest.fixture
def d(c, request) -> str:
    """This test's own directory on the shared agent."""
    c.mkdir(request.node.originalname)
    return request.node.originalname


@s3_facing
def test_round_trip_reaches_s3_intact(target, c, d):
    files = {f"{d}/CT/1.2.840/{i}.dcm": os.urandom(1000 * i + 7) for i in range(1, 6)}
    files[f"{d}/CR/big.dcm"] = os.urandom(3 * 1024 * 1024 + 5)
    for directory in ("CT", "CT/1.2.840", "CR"):
        c.mkdir(f"{d}/{directory}")
    s3 = target.agent.store.client()
    for path, data in files.items():
        c.put(path, data)
        # write-through: the client's put returns after S3 confirmed the object, so it is there already
        assert s3.head_object(Bucket=BUCKET, Key=target.agent.prefix + path)["ContentLength"] == len(data)
    assert c.list(d) == ["CR", "CT"]
    assert c.list(f"{d}/CT/1.2.840") == [f"{i}.dcm" for i in range(1, 6)]
    assert c.stat(f"{d}/CT") == Stat(0, True)
    for path, data in files.items():
        assert c.stat(path) == Stat(len(data), False)
        assert c.get(path) == data
    remote = target.s3(d)
    assert {p: r["sha256"] for p, r in remote.items()} == {p[len(d) + 1:]: sha256(v) for p, v in files.items()}
    assert all(r["meta"]["sha256"] == r["sha256"] for r in remote.values())


def test_zero_byte_file(target, c, d):
    c.put(f"{d}/empty.dcm", b"")
    assert c.list(d) == ["empty.dcm"]
    assert c.stat(f"{d}/empty.dcm") == Stat(0, False)
    assert c.get(f"{d}/empty.dcm") == b""
    remote = target.s3(d)
    assert remote["empty.dcm"]["size"] == 0 and remote["empty.dcm"]["meta"]["sha256"] == sha256(b"")
    c.put(f"{d}/empty.dcm", b"now full")
    assert c.get(f"{d}/empty.dcm") == b"now full"
    assert target.s3_hashes(d) == {"empty.dcm": sha256(b"now full")}


def test_names_with_spaces_and_unicode(target, c, d):
    folder = "Müller, Hans (1970) 胸部"
    names = ["name with spaces.dcm", "Ünïcödé ß.dcm", "胸部 CT 平扫.dcm"]
    c.mkdir(f"{d}/{folder}")
    data = {n: os.urandom(2_000 + i) for i, n in enumerate(names)}
    for n, v in data.items():
        c.put(f"{d}/{folder}/{n}", v)
    assert c.list(d) == [folder]
    assert c.list(f"{d}/{folder}") == sorted(names)
    for n, v in data.items():
        assert c.get(f"{d}/{folder}/{n}") == v
    assert target.s3_hashes(d) == {f"{folder}/{n}": sha256(v) for n, v in data.items()}  # keys are the UTF-8 names


def test_overwrite_replaces_the_whole_file(target, c, d):
    c.put(f"{d}/a.dcm", os.urandom(50_000))
    c.put(f"{d}/a.dcm", b"shorter")
    assert c.get(f"{d}/a.dcm") == b"shorter"
    assert c.stat(f"{d}/a.dcm") == Stat(7, False)
    assert target.s3_hashes(d) == {"a.dcm": sha256(b"shorter")}


def test_append_and_resume(target, c, d):
    c.put(f"{d}/a.dcm", b"second")
    c.append(f"{d}/a.dcm", b" + appended")
    assert c.get(f"{d}/a.dcm") == b"second + appended"
    c.append(f"{d}/new.dcm", b"created by an append")
    c.resume(f"{d}/a.dcm", 7, b"RESUMED")  # an interrupted upload resumed: the first bytes kept, the rest replaced
    assert c.get(f"{d}/a.dcm") == b"second RESUMED"
    assert c.stat(f"{d}/a.dcm") == Stat(14, False)
    assert target.s3_hashes(d) == {"a.dcm": sha256(b"second RESUMED"), "new.dcm": sha256(b"created by an append")}


@s3_facing
def test_rename_file_replaces_and_moves(target, c, d):
    a, b = os.urandom(50_000), os.urandom(7_000)
    c.put(f"{d}/a.dcm.part", a)
    c.rename(f"{d}/a.dcm.part", f"{d}/a.dcm")  # the upload-then-rename pattern of PACS clients
    assert c.list(d) == ["a.dcm"]
    assert c.get(f"{d}/a.dcm") == a
    c.put(f"{d}/b.dcm", b)
    c.rename(f"{d}/b.dcm", f"{d}/a.dcm")  # over an existing file: replaces it
    assert c.list(d) == ["a.dcm"]
    assert c.get(f"{d}/a.dcm") == b and c.stat(f"{d}/a.dcm") == Stat(len(b), False)
    assert target.s3_hashes(d, drained=True) == {"a.dcm": sha256(b)}
    c.mkdir(f"{d}/sub")
    c.rename(f"{d}/a.dcm", f"{d}/sub/a.dcm")  # a clean object moves by a server-side copy
    assert c.list(d) == ["sub"]
    with pytest.raises(NotFound):
        c.stat(f"{d}/a.dcm")
    assert c.get(f"{d}/sub/a.dcm") == b
    assert target.s3_hashes(d, drained=True) == {"sub/a.dcm": sha256(b)}


def test_rename_directory(target, c, d):
    files = {"1.dcm": os.urandom(3_000), "2.dcm": os.urandom(4_000), "series/3.dcm": os.urandom(5_000)}
    for directory in ("day", "day/series", "other"):
        c.mkdir(f"{d}/{directory}")
    for p, v in files.items():
        c.put(f"{d}/day/{p}", v)
    c.rename(f"{d}/day", f"{d}/moved")
    assert c.list(d) == ["moved", "other"]
    assert c.list(f"{d}/moved") == ["1.dcm", "2.dcm", "series"]
    with pytest.raises(NotFound):
        c.stat(f"{d}/day")
    for p, v in files.items():
        assert c.get(f"{d}/moved/{p}") == v
    assert target.s3_hashes(d, drained=True) == {f"moved/{p}": sha256(v) for p, v in files.items()}


@s3_facing
def test_delete(target, c, d):
    c.put(f"{d}/a.dcm", b"DICM")
    assert target.s3_hashes(d) == {"a.dcm": sha256(b"DICM")}
    c.delete(f"{d}/a.dcm")
    assert c.list(d) == []
    for call in (c.stat, c.get, c.delete):
        with pytest.raises(NotFound):
            call(f"{d}/a.dcm")
    assert target.s3_hashes(d, drained=True) == {}


def test_mkdir_and_rmdir(target, c, d):
    c.mkdir(f"{d}/x")
    assert c.list(d) == ["x"] and c.list(f"{d}/x") == []
    assert c.stat(f"{d}/x") == Stat(0, True)
    c.put(f"{d}/x/f.dcm", b"f")
    with pytest.raises(NotEmpty):
        c.rmdir(f"{d}/x")
    c.mkdir(f"{d}/y")
    c.mkdir(f"{d}/y/z")
    with pytest.raises(NotEmpty):
        c.rmdir(f"{d}/y")  # holding only an empty directory
    assert c.list(d) == ["x", "y"] and c.list(f"{d}/x") == ["f.dcm"]
    assert target.s3_hashes(d) == {"x/f.dcm": sha256(b"f")}
    c.delete(f"{d}/x/f.dcm")
    c.rmdir(f"{d}/x")
    c.rmdir(f"{d}/y/z")
    c.rmdir(f"{d}/y")
    with pytest.raises(NotFound):
        c.rmdir(f"{d}/x")
    assert c.list(d) == []
    assert target.s3_hashes(d, drained=True) == {}  # directories are not objects


def test_errors_by_class(target, c, d):
    c.put(f"{d}/f.dcm", b"kept")
    c.mkdir(f"{d}/sub")
    c.put(f"{d}/sub/g.dcm", b"g")
    missing = f"{d}/missing.dcm"
    for call, args in ((c.get, (missing,)), (c.stat, (missing,)), (c.delete, (missing,)),
                       (c.rename, (missing, f"{d}/x.dcm")), (c.rmdir, (f"{d}/nodir",)), (c.list, (f"{d}/nodir",))):
        with pytest.raises(NotFound):
            call(*args)
    for existing in (f"{d}/sub", f"{d}/f.dcm"):
        with pytest.raises(Exists):
            c.mkdir(existing)
    with pytest.raises(IsADirectory):
        c.put(f"{d}/sub", b"over a directory")
    with pytest.raises(IsADirectory):
        c.delete(f"{d}/sub")
    with pytest.raises(NotADirectory):
        c.rmdir(f"{d}/f.dcm")
    with pytest.raises(NotEmpty):
        c.rmdir(f"{d}/sub")
    with pytest.raises(Exists):
        c.rename(f"{d}/sub", f"{d}/f.dcm")  # a directory over a file
    assert c.list(d) == ["f.dcm", "sub"] and c.get(f"{d}/f.dcm") == b"kept"
    assert target.s3_hashes(d, drained=True) == {"f.dcm": sha256(b"kept"), "sub/g.dcm": sha256(b"g")}


@pytest.mark.parametrize("op", ["rename", "delete", "mkdir", "rmdir"])
def test_a_file_another_session_is_writing_is_left_to_it(target, c, op):
    """While another session's SFTP upload writes busy.dcm (over a stored file, for there to be one to rename or
    delete), renaming or deleting it, making a directory of its name or removing its directory is refused: the
    upload's close would have stored it again, under the old name, over the directory or with its directory back.
    Once the upload is closed, the file is stored whole and the operation is done (a mkdir finds the name taken)."""
    d, data = f"busy-{op}", os.urandom(70_000)
    path = f"{d}/busy.dcm"
    c.mkdir(d)
    if op in ("rename", "delete"):
        c.put(path, b"old")
    act, refused = {"rename": (lambda: c.rename(path, f"{d}/moved.dcm"), Refused),
                    "delete": (lambda: c.delete(path), Refused),
                    "mkdir": (lambda: c.mkdir(path), Exists),
                    "rmdir": (lambda: c.rmdir(d), NotEmpty)}[op]
    with sftp_upload_held(target.agent, path, data):
        with pytest.raises(refused):
            act()
    assert c.get(path) == data
    assert target.s3_hashes(d, drained=True) == {"busy.dcm": sha256(data)}
    if op == "mkdir":
        with pytest.raises(Exists):
            act()
        return
    if op == "rmdir":
        c.delete(path)
    act()
    stored = {"moved.dcm": sha256(data)} if op == "rename" else {}
    assert d not in c.list("") if op == "rmdir" else c.list(d) == sorted(stored)
    assert target.s3_hashes(d, drained=True) == stored


def _close_upload(client: Client) -> None:
    """The client's CLOSE of the upload begin_put opened: a reply refusing it fails the test."""
    if isinstance(client, FtpClient):
        client.cut.close()
        assert client.f.voidresp().startswith("226")
    elif isinstance(client, SftpClient):
        client._do(client.cut.close())
    else:
        client._do(client.cut.close)


def test_a_second_writer_of_a_file(target, c, d):
    """Two writers of one file, each protocol's rule (README, "Two writers of one file"). FTP and SFTP take the
    second: each upload streams into a staging file of its own, and the last complete close is the stored file.
    SMB refuses it (STATUS_SHARING_VIOLATION): SMB writes at offsets into one open file. Over every protocol an
    upload whose session is gone before its close stores nothing."""
    path, first, second = f"{d}/two.dcm", target.client(), target.client()
    try:
        first.begin_put(path, b"first writer")
        if target.protocol == "smb":
            with pytest.raises(Refused, match="0xc0000043"):  # STATUS_SHARING_VIOLATION
                second._do(second.begin_put, path, b"second writer")
        else:
            second.begin_put(path, b"second writer")
            _close_upload(second)
            assert c.get(path) == b"second writer"
        _close_upload(first)
        assert c.get(path) == b"first writer"
        second.begin_put(path, b"gone before its close")
        if isinstance(second, FtpClient):  # its connections reset
            reset_close(second.cut)
            reset_close(second.f.sock)
        elif isinstance(second, SftpClient):
            second.conn.abort()
        else:  # its connection closed, no CLOSE sent (smbprotocol's disconnect closes the files it holds open)
            for conn in second.smb.kw["connection_cache"].values():
                conn.transport.close()
    finally:
        second.close()
        first.close()
    wait_for(lambda: path in {e["path"] for e in target.agent.events("upload_aborted")}, 30, what="upload dropped")
    assert c.get(path) == b"first writer"
    assert target.s3_hashes(d, drained=True) == {"two.dcm": sha256(b"first writer")}


def test_bad_names_are_refused(target, c, d):
    c.put(f"{d}/ok.dcm", b"ok")
    cached = target.agent.health()["cache"]["files"]
    for bad in BAD_NAMES:
        with pytest.raises(BadName):
            c.put(f"{d}/{bad}", b"x")
        with pytest.raises(BadName):
            c.mkdir(f"{d}/{bad}")
        with pytest.raises(BadName):
            c.rename(f"{d}/ok.dcm", f"{d}/{bad}")
    assert c.list(d) == ["ok.dcm"] and c.get(f"{d}/ok.dcm") == b"ok"
    assert target.agent.health()["cache"]["files"] == cached  # nothing half-written left in the cache
    assert target.s3_hashes(d, drained=True) == {"ok.dcm": sha256(b"ok")}


def test_traversal_is_refused(target, c, d):
    """'..' above the user's root is refused, never clamped. (FTP and SFTP refuse the path as escaping the root;
    Samba, before the gateway sees it, as a bad path.)"""
    for path in ("../escape.dcm", "/../escape.dcm", f"{d}/../../escape.dcm", "/../../etc/passwd"):
        with pytest.raises((Refused, BadName)):
            c.put(path, b"x")
        with pytest.raises((Refused, BadName)):
            c.get(path)
    assert c.list(d) == []
    pages = target.agent.store.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]  # the whole bucket, not only this agent's
    assert not [k for k in keys if k.endswith(("escape.dcm", "passwd"))]


def test_roots_cannot_be_removed_or_renamed(target, c, d):
    """The namespace's root and every user's root stay, whoever asks. (Over SMB, removing a user's root that
    still holds files is refused by Samba as 'not empty' before the gateway is asked: tested here empty.)"""
    us = target.client("us")
    try:
        us.put("probe.dcm", b"us")  # FTP and SFTP make a user's root with its first file, Samba at start
        us.delete("probe.dcm")
        for client, root in ((c, ""), (c, "US"), (us, "")):
            with pytest.raises(Refused):
                client.rmdir(root)
            with pytest.raises(Refused):
                client.rename(root, f"{d}/moved" if client is c else "moved")
        us.put("still-works.dcm", b"us")
        assert us.list("") == ["still-works.dcm"]
    finally:
        us.close()
    assert {d, "US"} <= set(c.list("")) and c.list(d) == []
    assert target.s3_hashes("US", drained=True) == {"still-works.dcm": sha256(b"us")}
    c.mkdir(f"{d}/MR")
    c.rename(f"{d}/MR", f"{d}/MR2")  # other directories still move
    assert c.list(d) == ["MR2"]


def test_user_root_confines(target, c, d):
    c.put(f"{d}/secret.dcm", b"secret")
    ct = target.client("ct")
    try:
        ct.put("ct.dcm", b"ct")
        assert ct.list("") == ["ct.dcm"]
        for attempt in (f"../{d}/secret.dcm", f"/../{d}/secret.dcm", f"/../../{d}/secret.dcm"):
            with pytest.raises((Refused, BadName)):
                ct.get(attempt)
        with pytest.raises((Refused, BadName)):
            ct.put(f"../{d}/planted.dcm", b"planted")
    finally:
        ct.close()
    assert c.get("confined/ct.dcm") == b"ct"
    assert c.list(d) == ["secret.dcm"]
    assert target.s3_hashes("confined") == {"ct.dcm": sha256(b"ct")}
    assert target.s3_hashes(d) == {"secret.dcm": sha256(b"secret")}


def test_wrong_password_is_refused(target, c, d):
    with pytest.raises(LoginFailed):
        target.client(password="wrong-password")
    with pytest.raises(LoginFailed):
        target.client(user="nobody", password="wrong-password")
    assert "pacs" in [e.get("user") for e in target.agent.wait_events("login_failed")]
    assert c.list(d) == []  # the session logged in before is unaffected


@s3_facing
def test_file_only_in_s3_is_listed_and_read(target, c):
    assert c.list("s3only") == ["deep", "foreign.dcm"]
    assert c.stat("s3only/deep/nested.dcm") == Stat(len(ONLY_IN_S3["s3only/deep/nested.dcm"]), False)
    for path, data in ONLY_IN_S3.items():
        assert c.get(path) == data
    wait_fetched(target.agent, *ONLY_IN_S3)
    assert target.s3_hashes("s3only") == {p[len("s3only/"):]: sha256(v) for p, v in ONLY_IN_S3.items()}


def test_evicted_file_is_fetched_again(target, c, d):
    data = os.urandom(2_000_000)
    c.put(f"{d}/evicted.dcm", data)
    target.agent.wait_drained()
    assert evict(target.agent, f"{d}/evicted.dcm") == {"path": f"{d}/evicted.dcm", "evicted": True}
    assert c.get(f"{d}/evicted.dcm") == data  # fetched from S3 again, verified, served
    wait_fetched(target.agent, f"{d}/evicted.dcm")
    assert target.s3_hashes(d) == {"evicted.dcm": sha256(data)}
