"""Bad input at the protocol level: hostile paths over FTP and SFTP, wrong passwords, a confined user.

Every hostile path is tried with every path-taking operation of both protocols, by a user confined to
`root = "/CT"`, next to a neighbour's file in /MR. What must hold:
  * a path that climbs out of the root (`..` in any position, spelled absolute or relative), or that
    carries NUL, a backslash, bytes that are not UTF-8, a 4 KB name or a > 1000-byte path, gets an error
    reply (FTP 5xx, SFTP status error), never success, and the session stays usable;
  * percent-encoded separators (`%2F`, `%5C`, `%2e%2e`) are not decoded by FTP or SFTP: they are plain
    characters, so such a name is at most a literal file inside the root;
  * afterwards nothing outside the root changed: the neighbour's file (catalog, cache, S3), the files
    around the cache directory, and every bucket key outside the agent's prefix.
"""

from __future__ import annotations

import asyncio
import ftplib
import io
import os
from pathlib import Path

import asyncssh
import pytest

from agent.auth import GUARD_FILE
from faultkit import bucket_keys, catalog_rows, ftp_get, ftp_login, ftp_put, sftp_session, sha256, tree_snapshot
from harness import BUCKET, PASSWORD, s3_objects

ESCAPES = [
    "..", "../", "/..", "/../", "../MR/secret.dcm", "../../MR/secret.dcm", "/../MR/secret.dcm",
    "/../../../../etc/passwd", "x/../../MR/secret.dcm", "./../MR", "/./../MR/secret.dcm", "//../MR/secret.dcm",
    "..\\MR\\secret.dcm", "a\\b.dcm", "\\..\\..\\MR",
    "a\x00b.dcm", "../MR/secret.dcm\x00.dcm", "\x00",
    "n" * 4096, "/".join(["d"] * 600) + "/x.dcm",
    "bad\x01name.dcm", "line\nbreak.dcm",
]
# Not escapes: FTP and SFTP do not percent-decode, so these are literal names inside the root.
LITERALS = ["..%2FMR%2Fsecret.dcm", "%2e%2e%2fMR%2fsecret.dcm", "..%5cMR%5csecret.dcm", "%00.dcm", "...x",
            "..dcm"]
INVALID_UTF8 = [b"\xc0\xaf..\xc0\xafMR", b"..\xc0\xafMR\xc0\xafsecret.dcm", b"\xff\xfe.dcm"]

SECRET = b"the neighbour's MR study"


def _ftp_cmd_ok(reply: str) -> bool:
    return reply[:1] in ("1", "2", "3")


def ftp_try(ftp: ftplib.FTP, op: str, path: str) -> str:
    """Run one FTP operation on path; → the server's reply (success or error), never raises on 4xx/5xx."""
    try:
        if op == "STOR":
            return ftp.storbinary(f"STOR {path}", io.BytesIO(b"evil"))
        if op == "APPE":
            return ftp.storbinary(f"APPE {path}", io.BytesIO(b"evil"))
        if op == "RETR":
            return ftp.retrbinary(f"RETR {path}", lambda _: None)
        if op in ("LIST", "NLST", "MLSD"):
            return ftp.retrlines(f"{op} {path}", lambda _: None)
        if op == "RNFR":
            reply = ftp.sendcmd(f"RNFR {path}")
            return ftp.sendcmd("RNTO renamed.dcm") if _ftp_cmd_ok(reply) else reply
        if op == "RNTO":
            ftp.sendcmd("RNFR mine.dcm")
            return ftp.sendcmd(f"RNTO {path}")
        return ftp.sendcmd(f"{op} {path}")
    except ftplib.all_errors as e:
        return str(e)


FTP_OPS = ["STOR", "APPE", "RETR", "LIST", "NLST", "MLSD", "MLST", "SIZE", "MDTM", "DELE", "MKD", "RMD", "CWD",
           "RNFR", "RNTO"]


def ftp_raw(ftp: ftplib.FTP, line: bytes) -> str:
    """Send bytes that ftplib would not encode (not UTF-8)."""
    ftp.sock.sendall(line + b"\r\n")
    try:
        return ftp.getresp()
    except ftplib.all_errors as e:
        return str(e)


async def sftp_try(sftp: asyncssh.SFTPClient, op: str, path: str | bytes) -> str:
    """Run one SFTP operation; → 'ok' or the error's class name."""
    try:
        if op == "open-write":
            async with sftp.open(path, "wb") as f:
                await f.write(b"evil")
        elif op == "open-read":
            async with sftp.open(path, "rb") as f:
                await f.read()
        elif op == "rename-from":
            await sftp.rename(path, "/renamed.dcm")
        elif op == "rename-to":
            await sftp.rename("/mine.dcm", path)
        elif op == "posix-rename-to":
            await sftp.posix_rename("/mine.dcm", path)
        elif op == "symlink":
            await sftp.symlink("/mine.dcm", path)
        elif op == "symlink-target":
            await sftp.symlink(path, "/link.dcm")
        elif op == "readdir":
            await sftp.readdir(path)
        elif op == "setstat":
            await sftp.setstat(path, asyncssh.SFTPAttrs(permissions=0o777))
        elif op == "mkdir":
            await sftp.mkdir(path)
        else:
            await getattr(sftp, op)(path)
    except (asyncssh.SFTPError, UnicodeError, ValueError) as e:
        return type(e).__name__
    return "ok"


SFTP_OPS = ["open-write", "open-read", "stat", "lstat", "remove", "mkdir", "rmdir", "readdir", "rename-from",
            "rename-to", "posix-rename-to", "symlink", "symlink-target", "readlink", "setstat", "realpath"]


@pytest.mark.slow
async def test_hostile_paths_stay_inside_the_root(agent_factory, seaweed, tmp_path, request):
    a = agent_factory(users=[{"name": "ct", "password": PASSWORD, "root": "/CT"},
                             {"name": "pacs", "password": PASSWORD, "root": "/"}]).start()
    # Sentinels outside the user's root: the neighbour's study, files around the cache dir, bucket keys
    # outside the agent's prefix (a sibling prefix that a climbing key would land in).
    admin = ftp_login(a, "pacs")
    assert ftp_put(admin, "MR/secret.dcm", SECRET).startswith("226")
    (tmp_path / "outside.dcm").write_bytes(SECRET)
    (a.workdir / "outside.dcm").write_bytes(SECRET)
    client = seaweed.client()
    sibling = a.prefix.rstrip("/") + "-sibling/MR/secret.dcm"
    for key in ("MR/secret.dcm", "etc/passwd", sibling):
        client.put_object(Bucket=BUCKET, Key=key, Body=SECRET)
        # the bucket is the session's: a later module's whole-bucket check (test_conformance) must not find them
        request.addfinalizer(lambda key=key: client.delete_object(Bucket=BUCKET, Key=key))
    keys_before = bucket_keys(seaweed)
    cache_dir = a.workdir / "cache"
    fs_before = tree_snapshot(tmp_path, exclude=cache_dir)
    agent_cwd = Path(os.readlink(f"/proc/{a.proc.pid}/cwd"))
    cwd_before = set(os.listdir(agent_cwd))
    etc_passwd = Path("/etc/passwd").stat()

    ct = ftp_login(a, "ct")
    assert ftp_put(ct, "mine.dcm", b"mine").startswith("226")
    accepted: list[tuple[str, str, str]] = []
    for path in ESCAPES:
        for op in FTP_OPS:
            if "\n" in path or "\r" in path:
                continue  # ftplib refuses to send it (it would be two commands); SFTP gets it below
            reply = ftp_try(ct, op, path)
            if _ftp_cmd_ok(reply):
                accepted.append(("ftp", op, path))
            else:
                assert reply[:3] in ("550", "553", "501"), (op, path, reply)
            assert ct.voidcmd("NOOP").startswith("200")  # the session survives
    for raw in INVALID_UTF8:
        for op in (b"STOR", b"RETR", b"DELE", b"MKD", b"CWD", b"SIZE", b"RNFR"):
            ct.voidcmd("TYPE I")
            ct.makepasv()  # a listener, so data commands get as far as their path check
            # The control connection is Telnet (RFC 959 → RFC 854): a 0xFF byte travels doubled (IAC IAC); sent
            # alone, b"\xff\xfe." is Telnet's DONT '.', which the server drops from the line (test_attack38)
            reply = ftp_raw(ct, op + b" " + raw.replace(b"\xff", b"\xff\xff"))
            assert reply.startswith("553"), (op, raw, reply)
            assert ct.voidcmd("NOOP").startswith("200")
    assert ct.pwd() == "/"
    for name in LITERALS:
        assert ftp_put(ct, name, b"literal").startswith("226")
        assert ct.size(name) == len(b"literal")
    assert ftp_try(ct, "STOR", "...").startswith("553")  # not a parent, but Windows clients cannot use it

    async with sftp_session(a, "ct") as sftp:
        for path in ESCAPES + INVALID_UTF8:
            for op in SFTP_OPS:
                if op == "realpath" and path in ("..", "../", "/..", "/../", "./../MR"):
                    continue  # see below
                result = await sftp_try(sftp, op, path)
                if result == "ok":
                    accepted.append(("sftp", op, repr(path)))
            assert await sftp.stat("/mine.dcm")  # the session survives
        # realpath of the root's parent: an error, or the root itself (what OpenSSH's sftp shows for cd ..).
        for path in ("..", "/..", "../", "./../MR"):
            result = await sftp_try(sftp, "realpath", path)
            assert result != "ok" or (await sftp.realpath(path)) in ("/", "/MR"), path
        # Host paths must mean nothing: asyncssh's default SFTPServer methods act on the local filesystem.
        outside = tmp_path / "outside.dcm"
        host_link = tmp_path / "host-link"
        host_link.symlink_to("/etc/passwd")
        mode = outside.stat().st_mode
        attempts = {
            "symlink": sftp.symlink(str(outside), str(tmp_path / "evil-symlink")),
            "link": sftp.link(str(outside), str(tmp_path / "evil-hardlink")),
            "readlink": sftp.readlink(str(host_link)),
            "statvfs": sftp.statvfs("/"),
        }
        for op, coro in attempts.items():
            try:
                await coro
            except asyncssh.SFTPError:
                continue
            raise AssertionError(f"SFTP {op} on a host path succeeded")
        # setstat/lsetstat of a host path: that name is just a path inside the root, attributes are ignored
        # (accepted or refused, the host file must not change).
        for follow in (True, False):
            try:
                await sftp.setstat(str(outside), asyncssh.SFTPAttrs(permissions=0o777, uid=65534, gid=65534,
                                                                    atime=0, mtime=0), follow_symlinks=follow)
            except asyncssh.SFTPError:
                pass
        assert not (tmp_path / "evil-symlink").exists() and not (tmp_path / "evil-hardlink").exists()
        st = outside.stat()
        assert (st.st_mode, st.st_nlink, st.st_uid) == (mode, 1, 0) and st.st_mtime > 1e9
        host_link.unlink()
        names = {n for n in await sftp.listdir("/") if n not in (".", "..")}
        assert names == {"mine.dcm", *LITERALS}
        assert await sftp_try(sftp, "stat", "/MR") == "SFTPNoSuchFile"  # that is CT/MR, which does not exist

    assert accepted == [], f"hostile paths accepted: {accepted}"

    # Nothing outside the root changed: the namespace, the neighbour's bytes, the filesystem, the bucket.
    paths = {p for p, *_ in catalog_rows(a)}
    assert paths == {"MR/secret.dcm", "CT/mine.dcm", *(f"CT/{n}" for n in LITERALS)}
    assert ftp_get(admin, "MR/secret.dcm") == SECRET
    a.wait_drained(30)
    objects = s3_objects(seaweed, a.prefix)
    assert set(objects) == paths and objects["MR/secret.dcm"]["sha256"] == sha256(SECRET)
    new_keys = bucket_keys(seaweed) - keys_before
    assert all(k.startswith(a.prefix + "CT/") for k in new_keys), sorted(new_keys)
    assert keys_before <= bucket_keys(seaweed)
    for key in ("MR/secret.dcm", "etc/passwd", sibling):
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == SECRET
    fs_after = tree_snapshot(tmp_path, exclude=cache_dir)
    changed = {p for p in fs_before.keys() | fs_after.keys()
               if fs_before.get(p) != fs_after.get(p) and not p.endswith("agent.log")}
    assert changed == set(), changed
    assert (tmp_path / "outside.dcm").read_bytes() == SECRET
    assert set(os.listdir(agent_cwd)) == cwd_before  # relative host paths resolve against the agent's cwd
    assert Path("/etc/passwd").stat().st_mtime_ns == etc_passwd.st_mtime_ns
    # Inside the cache dir only the gateway's own layout exists (no file named after a client path).
    assert {p.name for p in cache_dir.iterdir()} <= {"catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm",
                                                       "data", "staging", "spare", "audit", "ssh_host_ed25519_key",
                                                       "admin.token", "writing.lock", "reading.lock", GUARD_FILE,
                                                       GUARD_FILE + "-wal", GUARD_FILE + "-shm"}
    assert all(len(p.name) == 2 for p in (cache_dir / "data").iterdir())
    assert all(len(p.name) == 32 and int(p.name, 16) >= 0 for p in (cache_dir / "spare").iterdir())  # blob names
    ct.quit()
    admin.quit()


async def test_wrong_passwords_are_refused_and_logged(agent_factory):
    a = agent_factory().start()
    wrong = "not-the-password-0xDEAD"
    for user in ("pacs", "nobody"):
        with pytest.raises(ftplib.error_perm, match="^530"):
            await asyncio.to_thread(ftp_login, a, user, wrong)
        with pytest.raises(asyncssh.PermissionDenied):
            async with sftp_session(a, user, wrong):
                pass
    events = a.events("login_failed")
    assert {(e["protocol"], e["user"]) for e in events} >= {("ftp", "pacs"), ("ftp", "nobody"),
                                                              ("sftp", "pacs"), ("sftp", "nobody")}
    assert wrong not in a.log_path.read_text()  # the attempted password is never logged
    # The right password still works on both protocols afterwards.
    ftp = await asyncio.to_thread(ftp_login, a)
    ftp.quit()
    async with sftp_session(a) as sftp:
        assert await sftp.listdir("/") is not None


async def test_confined_user_cannot_reach_a_sibling_root(agent_factory, seaweed):
    """root = "/CT": /MR is unreachable by any spelling, over FTP and SFTP; / shows only CT's files."""
    a = agent_factory(users=[{"name": "ct", "password": PASSWORD, "root": "/CT"},
                             {"name": "pacs", "password": PASSWORD, "root": "/"}]).start()
    admin = ftp_login(a, "pacs")
    admin.storbinary("STOR MR/2026-11-23/s1/secret.dcm", io.BytesIO(SECRET))
    admin.storbinary("STOR CT/2026-11-23/s1/ct.dcm", io.BytesIO(b"ct"))
    ct = ftp_login(a, "ct")
    assert ct.nlst("/") == ["2026-11-23"]
    for spelling in ("/MR/2026-11-23/s1/secret.dcm", "../MR/2026-11-23/s1/secret.dcm",
                     "/../MR/2026-11-23/s1/secret.dcm", "2026-11-23/../../MR/2026-11-23/s1/secret.dcm"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp_get(ct, spelling)
        with pytest.raises(ftplib.error_perm, match="^550"):
            ct.delete(spelling)
    with pytest.raises(ftplib.error_perm, match="^550"):
        ct.cwd("/../MR")
    with pytest.raises(ftplib.error_perm, match="^550"):
        ct.rename("2026-11-23/s1/ct.dcm", "../MR/stolen.dcm")  # moving a file out of the root
    assert ftp_get(ct, "/2026-11-23/s1/ct.dcm") == b"ct"
    async with sftp_session(a, "ct") as sftp:
        names = [n for n in await sftp.listdir("/") if n not in (".", "..")]
        assert names == ["2026-11-23"]
        for spelling in ("/MR/2026-11-23/s1/secret.dcm", "../MR/2026-11-23/s1/secret.dcm",
                         "/../MR/2026-11-23/s1/secret.dcm"):
            with pytest.raises(asyncssh.SFTPError):
                async with sftp.open(spelling, "rb") as f:
                    await f.read()
            with pytest.raises(asyncssh.SFTPError):
                await sftp.remove(spelling)
        with pytest.raises(asyncssh.SFTPError):
            await sftp.rename("/2026-11-23/s1/ct.dcm", "/../MR/stolen.dcm")
    assert ftp_get(admin, "MR/2026-11-23/s1/secret.dcm") == SECRET
    assert {p for p, *_ in catalog_rows(a)} == {"MR/2026-11-23/s1/secret.dcm", "CT/2026-11-23/s1/ct.dcm"}
    a.wait_drained(30)
    assert set(s3_objects(seaweed, a.prefix)) == {"MR/2026-11-23/s1/secret.dcm", "CT/2026-11-23/s1/ct.dcm"}
    ct.quit()
    admin.quit()
