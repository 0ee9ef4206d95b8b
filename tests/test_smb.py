"""SMB beyond the common scenarios of tests/test_conformance.py: real smbd sharing the agent's FUSE view;
smbprotocol's smbclient as the PACS (large files, many clients, Samba settings, FUSE flushes, kill -9)."""

from __future__ import annotations

import asyncio
import errno
import ftplib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncssh
import pytest
import smbclient
from smbprotocol.exceptions import SMBException
from smbutil import Smb, raw_request

from harness import BUCKET, PASSWORD, s3_objects, sha256

SMB_ERRORS = (OSError, SMBException)  # what smbprotocol raises for refusals and dead servers


def test_200mb_file(smb_agent):
    agent = smb_agent().start()
    smb = Smb(agent)
    block = os.urandom(4 * 1024 * 1024)
    h = hashlib.sha256()
    with smbclient.open_file(smb.p("big.dcm"), mode="wb", **smb.kw) as f:
        for i in range(50):
            chunk = bytes([i]) + block[1:]
            f.write(chunk)
            h.update(chunk)
    assert smb.stat("big.dcm").st_size == 200 * 1024 * 1024
    r = hashlib.sha256()
    with smbclient.open_file(smb.p("big.dcm"), mode="rb", **smb.kw) as f:
        while chunk := f.read(8 * 1024 * 1024):
            r.update(chunk)
    assert r.hexdigest() == h.hexdigest()
    smb.close()
    head = agent.store.client().head_object(Bucket=BUCKET, Key=agent.prefix + "big.dcm", ChecksumMode="ENABLED")
    assert head["ContentLength"] == 200 * 1024 * 1024
    assert s3_objects(agent.store, agent.prefix)["big.dcm"]["sha256"] == h.hexdigest()


def test_16_clients_x_50_files(smb_agent):
    agent = smb_agent().start()
    files = {f"US/c{c:02d}/{i}.dcm": os.urandom(8_000 + 997 * i + c) for c in range(16) for i in range(50)}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        smb = Smb(agent)
        try:
            smb.makedirs(f"US/c{c:02d}")
            for i in range(50):
                smb.write(f"US/c{c:02d}/{i}.dcm", files[f"US/c{c:02d}/{i}.dcm"])
            assert len(smb.listdir(f"US/c{c:02d}")) == 50
        except BaseException as e:
            errors.append(e)
        finally:
            smb.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    remote = s3_objects(agent.store, agent.prefix)
    assert {p: r["sha256"] for p, r in remote.items()} == {p: sha256(d) for p, d in files.items()}
    assert agent.health()["queue_depth"] == 0  # write-through: every close waited for its PUT
    # The FUSE inode table holds what the kernel holds, not the archive: once the kernel drops its
    # dentries (memory pressure; here drop_caches), `forget` empties the table again.
    assert agent.health()["smb"]["inodes"] > 100
    Path("/proc/sys/vm/drop_caches").write_text("2")
    deadline = time.monotonic() + 10
    while agent.health()["smb"]["inodes"] > 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.health()["smb"]["inodes"] <= 20


def test_cross_protocol_at_once(smb_agent):
    agent = smb_agent().start()
    smb = Smb(agent)
    via_smb = os.urandom(300_000)
    smb.makedirs("XA")
    smb.write("XA/from-smb.dcm", via_smb)
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", agent.ftp_port)
    ftp.login("pacs", PASSWORD)
    buf = io.BytesIO()
    ftp.retrbinary("RETR XA/from-smb.dcm", buf.write)
    assert buf.getvalue() == via_smb

    async def sftp_round() -> None:
        async with asyncssh.connect("127.0.0.1", agent.sftp_port, username="pacs", password=PASSWORD,
                                    known_hosts=None) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("XA/from-smb.dcm", "rb") as f:
                assert await f.read() == via_smb
            async with sftp.open("XA/from-sftp.dcm", "wb") as f:
                await f.write(b"sftp" * 10_000)

    asyncio.run(sftp_round())
    ftp.storbinary("STOR XA/from-ftp.dcm", io.BytesIO(b"ftp" * 10_000))
    assert smb.listdir("XA") == ["from-ftp.dcm", "from-sftp.dcm", "from-smb.dcm"]
    assert smb.read("XA/from-ftp.dcm") == b"ftp" * 10_000
    assert smb.read("XA/from-sftp.dcm") == b"sftp" * 10_000
    # an overwrite over FTP is seen over SMB at once: no stale size, no stale bytes
    ftp.storbinary("STOR XA/from-smb.dcm", io.BytesIO(b"shorter"))
    assert smb.read("XA/from-smb.dcm") == b"shorter"
    assert smb.stat("XA/from-smb.dcm").st_size == 7
    ftp.delete("XA/from-ftp.dcm")
    with pytest.raises(OSError) as e:
        smb.read("XA/from-ftp.dcm")
    assert e.value.errno == errno.ENOENT
    ftp.quit()
    smb.close()


    # pacsgw selfcheck: a canary through FTP, SFTP and SMB; the running agent reports the last result
    out = subprocess.run([sys.executable, "-m", "agent.cli", "selfcheck", "--config", str(agent.config_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [["ftp", "ok"], ["sftp", "ok"], ["smb", "ok"]]
    check = agent.health()["selfcheck"]
    assert check["ok"] is True and set(check["results"]) == {"ftp", "sftp", "smb"}
    agent.wait_drained()
    assert sorted(s3_objects(agent.store, agent.prefix)) == ["XA/from-sftp.dcm", "XA/from-smb.dcm"]
    agent.stop()
    out = subprocess.run([sys.executable, "-m", "agent.cli", "selfcheck", "--config", str(agent.config_path),
                          "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and report["ok"] is False
    assert all(r["ok"] is False and r["error"] for r in report["results"].values())


def test_existing_account_joins_the_service_group(smb_agent):
    """smbd writes as the user's own Unix account, which the mount lets in through the service account's
    group: an account that already existed in another primary group is moved into it at start."""
    import grp
    import pwd

    from agent.serve.smb import unix_account
    account = unix_account("elsewhere")

    def drop_account() -> None:  # test-only account (and its own group), also when an earlier run left it
        subprocess.run(["userdel", account], capture_output=True)
        subprocess.run(["groupdel", account], capture_output=True)

    drop_account()
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    account], check=True, capture_output=True)
    assert grp.getgrgid(pwd.getpwnam(account).pw_gid).gr_name == account
    agent = smb_agent(users=[{"name": "elsewhere", "password": "elsewhere-test-pw"}]).start()
    assert grp.getgrgid(pwd.getpwnam(account).pw_gid).gr_name == "pacsgw"
    smb = Smb(agent, "elsewhere", "elsewhere-test-pw")
    smb.write("probe.dcm", b"written as its own account")
    smb.close()
    assert [e["account"] for e in agent.events("unix_account_group_set")] == [account]
    assert s3_objects(agent.store, agent.prefix)["probe.dcm"]["sha256"] == sha256(b"written as its own account")
    agent.stop()
    drop_account()


def test_smb_only_names_users_and_rename(smb_agent):
    """SMB beyond the common scenarios of tests/test_conformance.py: characters Windows refuses (FTP and SFTP take
    them), users with only a password_hash (no SMB login), a share that does not exist, rename without replace."""
    from agent.auth import hash_password
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "hashed", "password_hash": hash_password("hashed-pw"), "root": "/"}]).start()
    smb = Smb(agent)
    smb.write("a.dcm", b"a")
    smb.write("b.dcm", b"b")
    accepted = []
    for bad in ("what?.dcm", "star*.dcm", "a<b.dcm", "pipe|.dcm"):
        try:
            smb.write(bad, b"x")
            accepted.append(bad)
        except (OSError, ValueError):
            pass
    assert accepted == []
    raw_request(smb, "raw-ok.dcm", b"raw")  # the raw request that sends the conformance suite's '..' works
    with pytest.raises(OSError):
        smb.rename("b.dcm", "a.dcm")  # SMB rename without replace: the target exists
    assert smb.listdir() == ["a.dcm", "b.dcm", "raw-ok.dcm"]
    smb.close()
    with pytest.raises(SMB_ERRORS):  # password_hash users are not SMB users
        Smb(agent, "hashed", "hashed-pw").listdir()
    with pytest.raises(SMB_ERRORS):
        Smb(agent, "pacs", PASSWORD, share="IPC$x").listdir()
    assert set(s3_objects(agent.store, agent.prefix)) == {"a.dcm", "b.dcm", "raw-ok.dcm"}
    assert [e["user"] for e in agent.events("smb_user_skipped")] == ["hashed"]
    assert agent.health()["smb"]["smbd_running"] is True



def test_users_removed_from_the_config_lose_smb(smb_agent):
    """A user taken out of [[users]] is removed from Samba's database at the next start: no login."""
    agent = smb_agent(users=[{"name": "pacs", "password": PASSWORD, "root": "/"},
                             {"name": "leaver", "password": "leaver-test-pw", "root": "/"}]).start()
    leaver = Smb(agent, "leaver", "leaver-test-pw")
    leaver.write("before.dcm", b"DICM")
    leaver.close()
    agent.stop()
    agent.users = [{"name": "pacs", "password": PASSWORD, "root": "/"}]
    agent.write_config()
    agent.start()
    conf = Path(agent.overrides["smb.state_dir"]) / "smb.conf"
    listed = subprocess.run(["pdbedit", "-s", str(conf), "-L"], capture_output=True, text=True, check=True)
    assert [line.split(":")[0] for line in listed.stdout.splitlines()] == ["pacsgw-pacs"]
    assert [e["account"] for e in agent.events("smb_user_removed")] == ["pacsgw-leaver"]
    with pytest.raises(SMB_ERRORS):
        Smb(agent, "leaver", "leaver-test-pw").listdir()
    pacs = Smb(agent)
    assert pacs.read("before.dcm") == b"DICM"
    pacs.close()


def test_hosts_allow_admits_only_the_listed_networks(smb_agent):
    """smbd refuses a client outside [smb] hosts_allow before it can log in; a listed network gets in."""
    inside = smb_agent(**{"smb.hosts_allow": ["127.0.0.0/8", "192.0.2.0/24"]}).start()
    smb = Smb(inside)
    smb.write("allowed.dcm", b"DICM")
    assert smb.read("allowed.dcm") == b"DICM"
    smb.close()
    outside = smb_agent(**{"smb.hosts_allow": ["192.0.2.0/24"]}).start()
    with pytest.raises(SMB_ERRORS):
        Smb(outside).listdir()
    log = (Path(outside.overrides["smb.state_dir"]) / "log" / "smbd.log").read_text()
    assert "Denied connection from 127.0.0.1" in log


def test_appliance_conf_listens_everywhere_for_the_allowed_networks(agent_factory, tmp_path):
    """The appliance's [smb] (systemd runs smbd, a wildcard listen address, the PACS subnets): Samba's
    own parser (testparm) reads the rendered smb.conf back with those settings."""
    from agent.config import load
    from agent.serve.smb import render_conf
    state = tmp_path / "samba"
    for d in ("private", "lock", "state", "cache", "run", "log"):
        (state / d).mkdir(parents=True)
    agent = agent_factory(**{"smb.enabled": True, "smb.manage": False, "smb.listen": "0.0.0.0:445",
                             "smb.hosts_allow": ["10.10.20.0/24", "192.0.2.7", "fd00::/8"],
                             "smb.mountpoint": str(tmp_path / "fs"), "smb.state_dir": str(state)})
    conf = agent.workdir / "smb.conf"
    conf.write_text(render_conf(load(agent.config_path)))
    lines = conf.read_text().splitlines()
    assert not any(line.startswith("interfaces") for line in lines)
    assert "hosts allow = 10.10.20.0/24 192.0.2.7/32 fd00::/8" in lines
    parsed = {}
    for name in ("bind interfaces only", "smb ports", "hosts allow", "hosts deny", "server min protocol",
                 "server smb encrypt", "private dir", "deadtime"):
        p = subprocess.run(["testparm", "-s", "--suppress-prompt", f"--parameter-name={name}", str(conf)],
                           capture_output=True, text=True, check=True)
        parsed[name] = p.stdout.strip()
    assert parsed == {"bind interfaces only": "No", "smb ports": "445",
                      "hosts allow": "10.10.20.0/24 192.0.2.7/32 fd00::/8", "hosts deny": "ALL",
                      "server min protocol": "SMB3_00", "server smb encrypt": "required",
                      "private dir": f"{state}/private", "deadtime": "10"}


@pytest.mark.slow
def test_kill9_during_writes_loses_nothing_acknowledged(smb_agent):
    agent = smb_agent().start()
    intended: dict[str, bytes] = {}
    acked: dict[str, str] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def writer(c: int) -> None:
        smb = Smb(agent)
        try:
            smb.makedirs(f"CT/w{c}")
            for i in range(10_000):
                if stop.is_set():
                    return
                path, data = f"CT/w{c}/{i}.dcm", os.urandom(100_000 + 37_000 * (i % 9))
                with lock:
                    intended[path] = data
                smb.write(path, data)  # returns after the SMB CLOSE reply: Samba acknowledged it
                with lock:
                    acked[path] = sha256(data)
        except Exception:  # the agent dies under these writers
            return
        finally:
            smb.close()

    threads = [threading.Thread(target=writer, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.kill9()
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked) >= 24
    done = dict(acked)

    # While the agent is down the share answers with errors, never with stale or partial content.
    some = sorted(done)[:3]
    down = Smb(agent)
    for path in some:
        with pytest.raises(SMB_ERRORS):
            down.read(path)
    down.close()

    agent.start()  # stops the orphaned smbd, detaches the dead mount, mounts again
    agent.wait_drained(120)
    remote = s3_objects(agent.store, agent.prefix)
    for path, digest in done.items():
        assert remote.get(path, {}).get("sha256") == digest, path
    # whatever else reached S3 was committed whole (its close was under way when the agent died)
    for path, r in remote.items():
        assert r["sha256"] == sha256(intended[path]), path
    up = Smb(agent)
    for path in some:
        assert sha256(up.read(path)) == done[path]
    up.close()
    # (searched in the raw text: kill -9 can cut the dead agent's last log line before its newline)
    text = agent.log_path.read_text()
    assert '"event": "stale_smbd_stopped"' in text and '"event": "stale_mount_removed"' in text


def test_sigterm_lets_open_smb_file_finish(smb_agent):
    """SIGTERM while a file is open over SMB: it may still be written and closed (and is stored); new files
    are refused meanwhile; then smbd stops, the mount goes, the agent exits cleanly."""
    agent = smb_agent().start()
    smb = Smb(agent)
    data = os.urandom(3 * 1024 * 1024)
    with smbclient.open_file(smb.p("slow.dcm"), mode="wb", **smb.kw) as f:
        f.write(data[:1024 * 1024])
        agent.proc.send_signal(15)
        time.sleep(1.0)
        other = Smb(agent)
        with pytest.raises(OSError):
            other.write("new-during-drain.dcm", b"x")
        other.close()
        f.write(data[1024 * 1024:])
    smb.close()
    assert agent.proc.wait(60) == 0
    stopped = agent.events("stopped")[0]
    assert stopped["drained"] is True and stopped["queued_files"] == 0
    assert set(s3_objects(agent.store, agent.prefix)) == {"slow.dcm"}
    assert s3_objects(agent.store, agent.prefix)["slow.dcm"]["sha256"] == sha256(data)
    assert not Path(agent.overrides["smb.mountpoint"]).is_mount()


def test_fuse_flush_semantics(smb_agent):
    """The mount itself: every close(2) (flush) commits what was written; a write after a flush starts a new
    version keeping the committed bytes; a flush with nothing new is a no-op; ftruncate works."""
    agent = smb_agent().start()
    mp = Path(agent.overrides["smb.mountpoint"])
    fd = os.open(mp / "f.dcm", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"first part|")
    dup = os.dup(fd)
    os.close(dup)  # flush #1: committed, in S3 (write-through) before close returned
    assert s3_objects(agent.store, agent.prefix)["f.dcm"]["sha256"] == sha256(b"first part|")
    os.write(fd, b"second part")  # a write after the flush: a new version that keeps the first part
    dup = os.dup(fd)
    os.close(dup)
    os.close(fd)  # a flush with nothing new: no third version
    assert s3_objects(agent.store, agent.prefix)["f.dcm"]["sha256"] == sha256(b"first part|second part")
    assert (mp / "f.dcm").read_bytes() == b"first part|second part"
    assert len([e for e in agent.events("stored") if e["path"] == "f.dcm"]) == 2
    with open(mp / "f.dcm", "r+b") as f:
        f.truncate(5)
    assert (mp / "f.dcm").read_bytes() == b"first"
    assert s3_objects(agent.store, agent.prefix)["f.dcm"]["sha256"] == sha256(b"first")
    # unlinking a file that is still open and uncommitted: nothing is ever stored under that name
    fd = os.open(mp / "gone.dcm", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"temporary")
    os.unlink(mp / "gone.dcm")
    os.close(fd)
    assert not (mp / "gone.dcm").exists()
    agent.wait_drained()
    assert set(s3_objects(agent.store, agent.prefix)) == {"f.dcm"}
    assert os.listdir(mp) == ["f.dcm"]
