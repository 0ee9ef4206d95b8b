"""A new user's first start: the README's commands on a Debian 12 root, from a clone of this commit.

The root is an overlay of the appliance tree the fleet tests build anyway (mmdebstrap'd bookworm plus the
fleet's roles), so no second Debian root is built. That tree has the SMB role's samba and fuse3: they are
removed first, so the root has no make, no compiler, no samba, fuse3 or libfuse3-dev. In a chroot on it:
the README's `apt install python3-venv make curl`, a clone of the commit, `make run` (its venv step with
the network, pip resolving as pip here does; the servers then in a network namespace of their own, so its
fixed ports meet nothing on this machine). Then /healthz answers ok, SMB is off and make run said how to
turn it on, and a file stored over FTP is in the S3 bucket. About 4 minutes on a quiet machine (most of it
apt and pip), more under load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fleetlib import REPO, log, mount_chroot, run, unmount_chroot

# This machine's pip setup (its package index mirrors under /opt and the pip.conf files naming them), shown to
# the chroot as it is, so pip there resolves what pip here does; PyPI is reachable too.
PIP_DIRS = [Path(d) for d in ("/opt/pypi", "/opt/pypi-more", "/opt/wheels", Path.home() / ".cache" / "pip")]
PIP_CONFIGS = [Path(f) for f in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "/etc/xdg/pip/constraints.txt",
                                 Path.home() / ".config" / "pip" / "pip.conf")]

# Runs inside the chroot, in a network namespace with only loopback: make run in the background, then
# the checks, then make run is stopped. Prints one JSON line with what it saw.
CHECK = r"""
set -u
cd /root/pacsgw
setsid make run > /root/run.log 2>&1 < /dev/null &
pid=$!
ok=""
for i in $(seq 1 300); do
  if curl -sf http://127.0.0.1:8080/healthz > /root/healthz.json 2>/dev/null; then ok=1; break; fi
  kill -0 $pid 2>/dev/null || break
  sleep 0.5
done
.venv/bin/python - <<'EOF'
import ftplib, io, json, time, tomllib
import botocore.session
cfg = tomllib.load(open("run/agent.toml", "rb"))
up = cfg["uplink"]
result = {"healthz": None, "stored": None, "in_s3": []}
try:
    result["healthz"] = json.load(open("/root/healthz.json"))
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", 2121)
    ftp.login("pacs", "pacs-example")
    ftp.mkd("CT")
    result["stored"] = ftp.storbinary("STOR CT/first.dcm", io.BytesIO(b"DICM" * 4096))
    ftp.quit()
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=up["endpoint_url"], region_name=up["region"],
        aws_access_key_id=up["access_key_id"], aws_secret_access_key=up["secret_access_key"])
    for _ in range(60):
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=up["bucket"], Prefix=up["prefix"]).get("Contents", [])]
        result["in_s3"] = keys
        if keys:
            break
        time.sleep(0.5)
except Exception as e:
    result["error"] = repr(e)
print("RESULT " + json.dumps(result))
EOF
kill -TERM -- -$pid 2>/dev/null
for i in $(seq 1 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
kill -KILL -- -$pid 2>/dev/null
true
"""


def _mount_root(lower: Path, work: Path) -> Path:
    merged = mount_chroot(lower, work)
    # The network as this machine has it (name servers, and the CA bundle that its HTTPS proxy, if any, needs).
    (merged / "etc/resolv.conf").unlink(missing_ok=True)
    shutil.copy("/etc/resolv.conf", merged / "etc/resolv.conf")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", merged / "etc/ssl/certs/ca-certificates.crt")
    return merged


@pytest.mark.slow
def test_readme_first_start_on_debian(appliance, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root (overlay mount, chroot, network namespace): run make test as root")
    work = tmp_path / "root"
    merged = _mount_root(appliance / "rootfs", work)
    binds: list[Path] = []
    try:
        assert not (merged / "usr/bin/make").exists(), "the root already has make: not a first start"
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive",
               **{k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.endswith("_proxy")}}
        # The fleet's tree has the SMB role's packages: removed, so the root has what a fresh Debian 12 has.
        # Then the README's first line.
        run(["chroot", str(merged), "sh", "-c", "apt-get remove -y -qq --purge samba samba-common-bin fuse3 && "
             "apt-get update -qq && apt-get install -y -qq python3-venv make curl"], env=env, timeout=600)
        assert not (merged / "usr/sbin/smbd").exists()
        # A clone of this commit.
        commit = run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).stdout.strip()
        run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(merged / "root/pacsgw")], timeout=300)
        run(["git", "-C", str(merged / "root/pacsgw"), "checkout", "--quiet", "--detach", commit])
        for d in PIP_DIRS:
            if d.is_dir():
                (merged / d.relative_to("/")).mkdir(parents=True, exist_ok=True)
                run(["mount", "--bind", str(d), str(merged / d.relative_to("/"))])
                binds.append(merged / d.relative_to("/"))
        for f in PIP_CONFIGS:
            if f.is_file():
                (merged / f.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, merged / f.relative_to("/"))
        # make run, part 1: its venv step (pip needs the network).
        p = run(["chroot", str(merged), "make", "-C", "/root/pacsgw", ".venv/.run"], env=env, timeout=1500,
                check=False)
        log(f"make venv: exit {p.returncode}\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        # make run, part 2: the servers, in a network namespace with only loopback.
        (merged / "root/first-start.sh").write_text(CHECK)
        p = run(["unshare", "--net", "sh", "-c",
                 f"ip link set lo up && exec chroot {merged} bash /root/first-start.sh"],
                env=env, timeout=900, check=False)
        out = (merged / "root/run.log").read_text(errors="replace")
        log(f"make run output:\n{out[-3000:]}")
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        assert line, p.stdout[-3000:] + p.stderr[-3000:] + out[-3000:]
        result = json.loads(line[len("RESULT "):])
        assert "error" not in result, (result, out[-3000:])
        assert result["healthz"]["status"] == "ok", result["healthz"]
        assert "smb" not in result["healthz"], result["healthz"]
        assert "SMB   off" in out and "apt-get install -y samba fuse3" in out
        assert result["stored"].startswith("226"), result
        assert result["in_s3"] == ["hospital-a/CT/first.dcm"], result
    finally:
        for b in binds:
            subprocess.run(["umount", "-l", str(b)], capture_output=True)
        unmount_chroot(work)
