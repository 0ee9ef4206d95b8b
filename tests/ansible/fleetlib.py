"""Helpers for the Ansible, image and fleet tests (issue 6).

Everything here runs real tools: mmdebstrap, ansible-playbook over the chroot connection and over SSH,
systemd-nspawn containers booted from the appliance tree in network namespaces this code creates
(and deletes), rclone's S3 server inside the controller namespace, qemu (TCG) for the image boot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent


def log(msg: str, *, summary: bool = False) -> None:
    """To stderr (shown for a failing test); `summary`: also in the run's terminal summary (conftest.py), where a
    CI log of a passing run shows it."""
    line = f"[fleet {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if summary:
        SUMMARY.append(line)


SUMMARY: list[str] = []


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:   # gone meanwhile
        return ""


def said(p: subprocess.CompletedProcess[str]) -> str:
    """A playbook's output with runs of white space as one space: Ansible's YAML output folds a long message over
    lines at a width that depends on the message (an unreachable box's reason varies in length)."""
    return " ".join(p.stdout.split())


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def run(cmd, *, check=True, timeout=900, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(cmd, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout:\n{p.stdout[-6000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def ansible_env(workdir: Path) -> dict[str, str]:
    """Ansible writes ~/.ansible and control sockets unless told otherwise: keep it all in workdir."""
    home = workdir / ".ansible"
    cp = Path("/tmp") / f"pgw-cp-{uuid.uuid4().hex[:8]}"  # short: unix socket paths are limited
    cp.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cp),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PY_COLORS": "0",
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
    })
    return env


# --- releases ---------------------------------------------------------------------------------

def project_version(src: Path = REPO) -> str:
    import tomllib
    return tomllib.loads((src / "pyproject.toml").read_text())["project"]["version"]


def build_base_release(out: Path) -> Path:
    """The agent as it is in this tree, with all its dependencies: build/releases/pacsgw-<v>.tar."""
    p = run(["bash", str(REPO / "image" / "build-release.sh"), str(REPO), str(out)],
            env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    return Path(p.stdout.strip().splitlines()[-1])


def build_variant_release(base: Path, out: Path, version: str, patch=None, patch_files=None) -> Path:
    """A release with another version number (and optionally patched code: `patch` on agent/__init__.py,
    `patch_files` {relative path: function of its text}): the tree is copied, its version changed, the
    pacsgw wheel rebuilt and put beside the base release's dependency wheels."""
    work = out / f"src-{version}"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", "build", ".git", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", ".hypothesis",
                                                               ".ruff_cache", "tests"))
    pyproject = work / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(re.sub(r'(?m)^version\s*=\s*"[^"]*"', f'version = "{version}"', text, count=1))
    init = work / "agent" / "__init__.py"
    text = init.read_text()
    if "__version__" in text and "importlib" not in text:
        text = re.sub(r'__version__\s*=\s*["\'][^"\']*["\']', f'__version__ = "{version}"', text)
    if patch:
        text = patch(text)
    init.write_text(text)
    for rel, fn in (patch_files or {}).items():
        target = work / rel
        target.write_text(fn(target.read_text()))
    wheels = out / f"wheels-{version}"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    with tarfile.open(base) as tf:
        tf.extractall(wheels, filter="data")
    for w in wheels.glob("pacsgw-*.whl"):
        w.unlink()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", str(wheels), str(work)], timeout=300)
    tar = out / f"pacsgw-{version}.tar"
    with tarfile.open(tar, "w") as tf:
        for w in sorted(wheels.iterdir()):
            tf.add(w, arcname=w.name)
    shutil.rmtree(wheels)
    shutil.rmtree(work)
    return tar


# A genuinely broken release: its `pacsgw run` dies at start-up on hospital B's configuration (the
# config check still passes), so its health check fails there and only there.
BROKEN_PATCH_MARK = "FAULT INJECTED BY tests/ansible"


def break_for_hospital_b(text: str) -> str:
    return text + f'''

# --- {BROKEN_PATCH_MARK}: this release crashes `pacsgw run` on hospital B's configuration.
def _injected_fault() -> None:
    import sys as _sys
    argv = _sys.argv
    if "run" in argv[1:2] and "--config" in argv:
        try:
            text = open(argv[argv.index("--config") + 1]).read()
        except OSError:
            return
        if "hospital-b" in text:
            raise SystemExit("injected fault: this release cannot start with hospital-b's configuration")


_injected_fault()
'''


# A release whose agent cannot reach its object store: its S3 client goes to a port where nothing listens
# (the agent starts, serves and answers /healthz 200 "degraded", writing back locally).
UNREACHABLE_S3_PATCH = {"agent/uplink/s3.py": lambda text: _must_replace(
    text, "endpoint_url=self.cfg.endpoint_url", 'endpoint_url="http://127.0.0.1:9"')
    + f"\n# {BROKEN_PATCH_MARK}: this release cannot reach S3\n"}


def _newer_schema(text: str) -> str:
    """agent/store/catalog/schema.py with SCHEMA_VERSION one higher (same tables, so the previous version migrates
    by its version number alone): the release before refuses the catalog this one has opened, as it would
    after a real schema change."""
    new, n = re.subn(r"(?m)^SCHEMA_VERSION = (\d+)$", lambda m: f"SCHEMA_VERSION = {int(m.group(1)) + 1}", text)
    assert n == 1, "the schema bump cannot be injected: SCHEMA_VERSION is gone"
    return _must_replace(new, "if 0 < found < SCHEMA_VERSION:", "if 0 < found < SCHEMA_VERSION - 1:")


NEWER_SCHEMA_PATCH = {"agent/store/catalog/schema.py": _newer_schema}


def _must_replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the fault cannot be injected: {old!r} is gone"
    return text.replace(old, new, 1)


# --- the appliance tree -------------------------------------------------------------------------

def build_appliance(out: Path, release: Path, *, kernel: bool, rootfs_only: bool, compress: bool = True) -> Path:
    cmd = ["bash", str(REPO / "image" / "build.sh"), "--out", str(out), "--release", str(release)]
    if not compress:
        cmd.append("--no-compress")
    if rootfs_only:
        cmd.append("--rootfs-only")
    if not kernel:
        cmd.append("--no-kernel")
    t = time.monotonic()
    # profile_tasks: ansible.log says which task of the build took the time
    p = run(cmd, env={**os.environ, "PACSGW_VENV_BIN": str(VENV_BIN),
                      "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks"}, timeout=1500)
    log(f"image/build.sh took {time.monotonic() - t:.0f} s\n{p.stdout[-2000:]}")
    return out


def provision_chroot(rootfs: Path, work: Path, host_vars: dict) -> Path:
    """site.yml through the chroot connection onto an overlay of the appliance tree (the tree itself stays
    as built), as for one box with these settings (no service starts: pacsgw_image_build). → the merged
    tree; unmount it with unmount_chroot(work)."""
    merged = mount_chroot(rootfs, work)
    (merged / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (merged / "usr/sbin/policy-rc.d").chmod(0o755)
    host = {"ansible_connection": "community.general.chroot", "ansible_host": str(merged),
            "ansible_become": False, "ansible_python_interpreter": "/usr/bin/python3",
            "pacsgw_image_build": True, "base_apt_update_cache": False, "pacsgw_model_file": "",
            "gateway_version": (rootfs / "etc/pacsgw/image-release").read_text().strip(),
            "gateway_release_dir": str(work / "releases"),   # the tree has the release installed already
            **host_vars}
    inventory = work / "inventory.yml"
    inventory.write_text(json.dumps({"pacsgw": {"hosts": {"box": host}}}, indent=2))
    p = run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE_DIR / "site.yml")],
            check=False, timeout=900, env=ansible_env(work), cwd=str(ANSIBLE_DIR))
    (work / "ansible.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        unmount_chroot(work)
        raise AssertionError(f"site.yml over chroot failed:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}")
    (merged / "usr/sbin/policy-rc.d").unlink()
    return merged


def mount_chroot(rootfs: Path, work: Path) -> Path:
    """An overlay of rootfs at work/merged (changes go to work/upper) with /proc, /sys and /dev: → merged."""
    merged = work / "merged"
    for d in ("upper", "ovlwork", "merged"):
        (work / d).mkdir(parents=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={rootfs},upperdir={work}/upper,workdir={work}/ovlwork", str(merged)])
    run(["mount", "-t", "proc", "proc", str(merged / "proc")])
    run(["mount", "-t", "sysfs", "sys", str(merged / "sys")])
    run(["mount", "--bind", "/dev", str(merged / "dev")])
    return merged


def unmount_chroot(work: Path) -> None:
    merged = work / "merged"
    for target in ("dev", "sys", "proc", ""):
        subprocess.run(["umount", "-l", str(merged / target)], capture_output=True)


# --- fleet hosts: systemd-nspawn containers in network namespaces ----------------------------------

def seed_agent_toml(host: "Host", key: tuple[str, str], endpoint: str) -> str:
    """What a hospital puts on the config partition before the box is adopted (test-only credentials):
    a prefix of its own, so a test can tell it from the fleet's rendering."""
    slug = host.group.replace("_", "-")
    return (f'[cache]\ndir = "/var/lib/pacsgw/cache"\nmax_bytes = "1GB"\n\n'
            f'[uplink]\nendpoint_url = "{endpoint}"\nbucket = "pacs-{slug}"\nprefix = "seeded-{slug}/"\n'
            f'access_key_id = "{key[0]}"\nsecret_access_key = "{key[1]}"\n\n'
            '[ftp]\nlisten = "0.0.0.0:2121"\npassive_ports = "30000-30100"\n\n'
            '[http]\nlisten = "127.0.0.1:8080"\n\n'
            '[[users]]\nname = "seeded"\npassword = "seeded-at-flashing"\n')


SMB_PASSWORD = "smb-fleet-test"  # test-only: hospital B's SMB user
PROMETHEUS_PASSWORD = "prometheus-fleet-test"  # test-only: the central Prometheus at the boxes
METRICS_PORT = 9180          # the agent's metrics listener (base_metrics_port)
SUBNET = "10.251.0"          # only ever inside the namespaces created below
CTL_ADDR = f"{SUBNET}.1"


def bcrypt(password: str) -> str:
    """A bcrypt hash ($2b$, cost 10) by the system's libcrypt (libxcrypt), as `htpasswd -B` makes."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypt"))
    lib.crypt_gensalt.restype = lib.crypt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lib.crypt(password.encode(), lib.crypt_gensalt(b"$2b$", 10, None, 0)).decode()


@dataclass
class Host:
    name: str                 # inventory name
    group: str                # hospital group
    addr: str
    netns: str
    dir: Path
    proc: subprocess.Popen | None = None


@dataclass
class Fleet:
    """N booted containers of the appliance tree, one network namespace each, joined by a bridge that
    lives in a controller namespace where ansible-playbook and the S3 server run."""

    rootfs: Path
    workdir: Path
    groups: list[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: list[Host] = field(default_factory=list)
    s3_proc: subprocess.Popen | None = None
    s3_port: int = 9000
    s3_key: tuple[str, str] = ("FLEETTESTKEY", "FLEETTESTSECRET0123456789")  # test-only
    key: Path | None = None
    seed_signer: Path | None = None   # the fleet's seed-signing key (test-only, made per run)
    env: dict = field(default_factory=dict)
    _basic_auth_hash: str = ""
    _metrics_password_hash: str = ""

    @property
    def ctl(self) -> str:
        return f"pgwc{self.tag}"

    def nsexec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ctl, *cmd]

    # -- setup ---------------------------------------------------------------------------------
    def start(self) -> "Fleet":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = ansible_env(self.workdir)
        self.key = self.workdir / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", str(self.key)])
        self._make_monitoring_tls()
        self.seed_signer = self.workdir / "seed_signer"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-seed-signer", "-f", str(self.seed_signer)])
        run(["ip", "netns", "add", self.ctl])
        run(["ip", "-n", self.ctl, "link", "set", "lo", "up"])
        run(["ip", "-n", self.ctl, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.ctl, "addr", "add", f"{CTL_ADDR}/24", "dev", "br0"])
        run(["ip", "-n", self.ctl, "link", "set", "br0", "up"])
        for i, group in enumerate(self.groups, start=1):
            host = Host(name=f"gw{i}", group=group, addr=f"{SUBNET}.{10 + i}", netns=f"pgwh{self.tag}{i}",
                        dir=self.workdir / f"gw{i}")
            self.hosts.append(host)
            self._write_seed(host)
            run(["ip", "netns", "add", host.netns])
            peer = f"v{self.tag}{i}"
            run(["ip", "-n", self.ctl, "link", "add", peer, "type", "veth", "peer", "name", "pgw0",
                 "netns", host.netns])
            run(["ip", "-n", self.ctl, "link", "set", peer, "master", "br0", "up"])
            run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            run(["ip", "-n", host.netns, "link", "set", "pgw0", "up"])
            self._boot(host)
        self._start_s3()
        for host in self.hosts:
            self.wait_ssh(host)
        self.write_inventory()
        return self

    @property
    def basic_auth_hash(self) -> str:
        """The bcrypt hash of PROMETHEUS_PASSWORD (made once: a new salt each time would change web.yml)."""
        if not self._basic_auth_hash:
            self._basic_auth_hash = bcrypt(PROMETHEUS_PASSWORD)
        return self._basic_auth_hash

    @property
    def metrics_password_hash(self) -> str:
        """The agent's (scrypt) hash of PROMETHEUS_PASSWORD, made once like basic_auth_hash."""
        if not self._metrics_password_hash:
            from agent.auth import hash_password
            self._metrics_password_hash = hash_password(PROMETHEUS_PASSWORD)
        return self._metrics_password_hash

    def _make_monitoring_tls(self) -> None:
        """A CA of the test's own and, per box, a certificate for its address: the node exporter serves TLS
        with it (and basic auth for the user `prometheus`, whose bcrypt hash goes to the inventory)."""
        tls = self.workdir / "tls"
        tls.mkdir()
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(tls / "ca.key"), "-out", str(tls / "ca.crt"), "-days", "2", "-subj", "/CN=fleet-test-ca"])
        for i, _ in enumerate(self.groups, start=1):
            name, addr = f"gw{i}", f"{SUBNET}.{10 + i}"
            run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(tls / f"{name}.key"), "-out", str(tls / f"{name}.csr"), "-subj", f"/CN={name}"])
            (tls / f"{name}.ext").write_text(f"subjectAltName=IP:{addr}\n")
            run(["openssl", "x509", "-req", "-in", str(tls / f"{name}.csr"), "-CA", str(tls / "ca.crt"),
                 "-CAkey", str(tls / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(tls / f"{name}.ext"),
                 "-out", str(tls / f"{name}.crt")])

    def _write_seed(self, host: Host) -> None:
        seed = host.dir / "seed"
        for d in ("upper", "work", "merged", "seed"):
            (host.dir / d).mkdir(parents=True)
        shutil.copy(f"{self.key}.pub", seed / "authorized_keys")
        (seed / "hostname").write_text(host.name + "\n")
        # The box's address comes from its config partition, as on a real box: networkd owns the link, so
        # network-online.target (Debian's smbd.service waits for it) is reached. An address set from
        # outside leaves the link unmanaged (or failed: networkd cannot take it over) and smbd starts only
        # when systemd-networkd-wait-online gives up, 2 minutes later.
        (seed / "network").mkdir()
        (seed / "network" / "10-fleet.network").write_text(
            f"[Match]\nName=pgw0\n\n[Network]\nAddress={host.addr}/24\nLinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\n")
        # The agent.toml typed at flashing time: the box runs on it until the fleet adopts it.
        (seed / "agent.toml").write_text(seed_agent_toml(host, self.s3_key, f"http://{CTL_ADDR}:{self.s3_port}"))
        # The hospital's PACS networks: the controller (the test's PACS) for the first two boxes, another
        # network for the third.
        (seed / "pacs-subnets").write_text(
            f"# the PACS\n{CTL_ADDR}/32\n" if host.group != self.groups[-1] else "192.0.2.0/24\n")

    def _boot(self, host: Host, usb: Path | None = None) -> None:
        """Boot the container on its overlay (the upper layer keeps the box's state across boots); `usb`:
        a directory attached as a seed disk (PACSGW-SEED, mounted at /boot/pacsgw-seed)."""
        seed = host.dir / "seed"
        usb_bind = f"--bind-ro={usb}:/boot/pacsgw-seed " if usb else ""
        script = (
            "set -e; mkdir -p /run/systemd/nspawn; mount -t tmpfs tmpfs /run/systemd/nspawn; "
            f"mount -t overlay overlay -o lowerdir={self.rootfs},upperdir={host.dir}/upper,workdir={host.dir}/work "
            f"{host.dir}/merged; "
            f"exec systemd-nspawn --quiet -D {host.dir}/merged --machine={host.netns} --boot "
            f"--network-namespace-path=/run/netns/{host.netns} --register=no --keep-unit "
            f"--resolv-conf=off --timezone=off --link-journal=no --console=passive --capability=CAP_NET_ADMIN "
            f"--bind-ro={seed}:/boot/pacsgw-config {usb_bind}"
            "--bind=/dev/fuse"   # nspawn gives containers no /dev/fuse; an SMB box's agent mounts its view
        )
        logf = open(host.dir / "console.log", "wb")
        host.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        logf.close()

    def reboot(self, host: Host, usb: Path | None = None) -> None:
        """A clean power-off of the container (SIGTERM: nspawn shuts the box down), then a boot on the same
        disk, optionally with a seed disk attached."""
        host.proc.send_signal(signal.SIGTERM)
        try:
            host.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(timeout=30)
        self._boot(host, usb)
        self.wait_ssh(host)

    def power_on(self, host: Host) -> None:
        """Boot a box whose container has ended (a reboot inside a container ends systemd-nspawn, exit 133)."""
        assert host.proc.poll() is not None, f"{host.name} is still running"
        self._boot(host)
        self.wait_ssh(host)

    def restart_s3(self, *keys: tuple[str, str]) -> None:
        """The object store again with these access keys (a key rotation: old and new, then the new only)."""
        self.s3_proc.send_signal(signal.SIGTERM)
        self.s3_proc.wait(timeout=30)
        self._start_s3(keys)

    def _start_s3(self, keys: tuple[tuple[str, str], ...] = ()) -> None:
        data = self.workdir / "s3"
        for group in self.groups:
            (data / f"pacs-{group.replace('_', '-')}").mkdir(parents=True, exist_ok=True)
        rclone = shutil.which("rclone", path=str(VENV_BIN)) or shutil.which("rclone")
        auth = [arg for k in (keys or (self.s3_key,)) for arg in ("--auth-key", ",".join(k))]
        logf = open(self.workdir / "s3.log", "ab")
        self.s3_proc = subprocess.Popen(
            self.nsexec(rclone, "serve", "s3", str(data), "--addr", f"{CTL_ADDR}:{self.s3_port}",
                        *auth, "--config", "/dev/null"),
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 30
        while run(self.nsexec("curl", "-s", "-o", "/dev/null", f"http://{CTL_ADDR}:{self.s3_port}/"),
                  check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError("rclone serve s3 did not answer:\n"
                                     + (self.workdir / "s3.log").read_text()[-2000:])
            time.sleep(0.3)

    def wait_ssh(self, host: Host, timeout: float = 300) -> None:
        """Until the box takes an SSH login. 300 s: a CI run once saw no login in 120 s on a box that booted in
        seconds here, with three boxes booting beside other tests (not reproduced; the failure says where it was)."""
        start = time.monotonic()
        while True:
            if host.proc.poll() is not None:
                raise AssertionError(f"{host.name}: nspawn exited {host.proc.returncode}:\n"
                                     + (host.dir / "console.log").read_text(errors="replace")[-3000:])
            # INFO: sshd closing an accepted connection (no login yet while the boot runs) is said only at INFO
            p = self.ssh(host, "true", check=False, timeout=20, level="INFO")
            if p.returncode == 0:
                log(f"{host.name}: SSH after {time.monotonic() - start:.0f} s", summary=True)  # in CI's log too
                return
            if time.monotonic() > start + timeout:
                raise AssertionError(f"{host.name}: no SSH after {timeout} s: {p.stderr}\n{self.boot_state(host)}")
            time.sleep(1)

    def boot_state(self, host: Host) -> str:
        """What the box's own systemd says of its boot (for a failure): state, queued jobs, failed units, journal."""
        pids = run(["ip", "netns", "pids", host.netns], check=False).stdout.split()
        init = min((int(p) for p in pids if _comm(p) == "systemd"), default=None)
        if init is None:
            return f"no systemd in {host.netns} (pids {pids})"
        script = ("journalctl -b --no-pager | grep -v prometheus-node-exporter | tail -n 80; "
                  "systemctl is-system-running; systemctl list-jobs --no-pager; systemctl --failed --no-pager; "
                  "ls -l /run/nologin")
        p = run(["nsenter", "-t", str(init), "-a", "-r", "-w", "sh", "-c", script], check=False, timeout=60)
        return p.stdout[-12000:] + p.stderr[-2000:]

    def ssh(self, host: Host, command: str, *, check=True, timeout=60, level="ERROR") -> subprocess.CompletedProcess:
        return run(self.nsexec(
            "ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", f"LogLevel={level}", "-o", "ConnectTimeout=5",
            f"pacsadmin@{host.addr}", command), check=check, timeout=timeout)

    def healthz(self, host: Host) -> dict:
        p = self.ssh(host, "curl -fsS --max-time 5 http://127.0.0.1:8080/healthz", check=False)
        if p.returncode != 0:
            return {"error": p.stderr.strip() or f"curl exit {p.returncode}"}
        return json.loads(p.stdout)

    def current_release(self, host: Host) -> str:
        return self.ssh(host, "basename $(readlink /opt/pacsgw/current)").stdout.strip()

    def releases(self, host: Host) -> list[str]:
        return sorted(self.ssh(host, "ls /opt/pacsgw/releases").stdout.split())

    # -- inventory and playbooks -----------------------------------------------------------------
    def write_inventory(self, extra_vars: dict | None = None) -> Path:
        inv = self.workdir / "inventory"
        tls = self.workdir / "tls"
        (inv / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
        hosts = {"pacsgw": {"children": {}}}
        for h in self.hosts:
            hosts["pacsgw"]["children"].setdefault(h.group, {"hosts": {}})["hosts"][h.name] = {"ansible_host": h.addr}
        (inv / "hosts.yml").write_text(json.dumps(hosts, indent=2))
        common = {
            "ansible_user": "pacsadmin",
            "ansible_ssh_timeout": 10,           # an unreachable box is listed after 10 s, not 30
            "gateway_version": project_version(),  # the one place the release is named
            "gateway_seed_signers": [Path(f"{self.seed_signer}.pub").read_text().strip()],
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "pacsgw_admin_subnets": [f"{SUBNET}.0/24"],
            "base_admin_subnets": "{{ pacsgw_admin_subnets }}",
            "base_pacs_subnets": "{{ pacsgw_pacs_subnets }}",
            "pacsgw_pacs_subnets": [f"{SUBNET}.0/24"],
            "base_apt_update_cache": False,      # the hosts have no package mirror
            "base_admin_authorized_keys": [Path(f"{self.key}.pub").read_text().strip()],
            "pacsgw_smb_enabled": False,
            "pacsgw_model_file": "",
            "pacsgw_serial": 1,
            "pacsgw_drain_timeout": 20,
            "pacsgw_drain_delay": 2,
            "base_reboot_drain_timeout": 6,      # the reboot window's drain: a box that holds a file waits
            "gateway_release_dir": str(self.workdir / "releases"),
            "gateway_health_retries": 20,
            "gateway_health_delay": 1,
            "gateway_ftp_listen": "0.0.0.0:2121",
            "gateway_sftp_listen": "0.0.0.0:2222",
            "gateway_cache_max_bytes": "2GB",
            "gateway_uplink_endpoint_url": f"http://{CTL_ADDR}:{self.s3_port}",
            "gateway_uplink_access_key_id": self.s3_key[0],
            "gateway_uplink_secret_access_key": self.s3_key[1],
            "gateway_users": [{"name": "pacs", "password": "pacs-fleet-test"}],  # test-only
            "gateway_no_log": False,
            "base_ftp_port": "2121",
            "models_health_url": "http://127.0.0.1:8080/healthz",
            "models_health_retries": 20,
            "models_health_delay": 1,
            # The central Prometheus (in the controller namespace) scrapes the agent's metrics listener and
            # the node exporter, both over TLS with basic auth (start_prometheus); the agent's status port
            # stays on loopback.
            "pacsgw_monitoring_subnets": [f"{CTL_ADDR}/32"],
            "gateway_metrics_listen": f"0.0.0.0:{METRICS_PORT}",
            "gateway_metrics_tls_cert": "{{ lookup('file', '%s/' ~ inventory_hostname ~ '.crt') }}" % tls,
            "gateway_metrics_tls_key": "{{ lookup('file', '%s/' ~ inventory_hostname ~ '.key') }}" % tls,
            "gateway_metrics_user": "prometheus",
            "gateway_metrics_password_hash": self.metrics_password_hash,
            "base_node_exporter_tls_cert": "{{ lookup('file', '%s/' ~ inventory_hostname ~ '.crt') }}" % tls,
            "base_node_exporter_tls_key": "{{ lookup('file', '%s/' ~ inventory_hostname ~ '.key') }}" % tls,
            "base_node_exporter_basic_auth_users": {"prometheus": self.basic_auth_hash},
        }
        common.update(extra_vars or {})
        (inv / "group_vars" / "all" / "main.yml").write_text(json.dumps(common, indent=2))
        for group in self.groups:
            slug = group.replace("_", "-")
            gvars = {"gateway_uplink_bucket": f"pacs-{slug}", "gateway_uplink_prefix": f"{slug}/"}
            if group == "hospital_b":   # this hospital's old PACS also needs SMB
                gvars |= {"pacsgw_smb_enabled": True, "gateway_users": [
                    *common["gateway_users"], {"name": "pacssmb", "password": SMB_PASSWORD, "root": "/"}]}
            (inv / "group_vars" / f"{group}.yml").write_text(json.dumps(gvars, indent=2))
        return inv

    def playbook(self, name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        t = time.monotonic()
        try:
            p = run(self.nsexec(str(VENV_BIN / "ansible-playbook"), "-i", str(self.workdir / "inventory"),
                                str(ANSIBLE_DIR / name), *args),
                    check=False, timeout=timeout, env=self.env, cwd=str(ANSIBLE_DIR))
        except subprocess.TimeoutExpired as e:   # what it did until then (the last task started)
            raise AssertionError(f"ansible-playbook {name} {' '.join(args)} did not finish in {timeout} s:\n"
                                 + _text(e.stdout)[-6000:] + _text(e.stderr)[-2000:]) from None
        log(f"ansible-playbook {name} {' '.join(args)}: exit {p.returncode} in {time.monotonic() - t:.0f} s")
        (self.workdir / f"{name}.{int(time.time())}.log").write_text(p.stdout + p.stderr)
        return p

    # -- the central Prometheus --------------------------------------------------------------------
    def start_prometheus(self, rules: Path) -> subprocess.Popen:
        """Debian's prometheus in the controller namespace (loopback :9090 there), scraping every box's agent
        (its metrics listener) and node exporter, both over TLS with basic auth, each second,
        with `rules` loaded. Stop it with stop_prometheus."""
        prom = self.workdir / "prometheus"
        prom.mkdir(exist_ok=True)
        conf = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "scheme": "https",
                 "tls_config": {"ca_file": str(self.workdir / "tls" / "ca.crt")},
                 "basic_auth": {"username": "prometheus", "password": PROMETHEUS_PASSWORD},
                 "static_configs": [{"targets": [f"{h.addr}:{port}" for h in self.hosts]}]}
                for job, port in (("pacsgw", METRICS_PORT), ("node", 9100))
            ],
        }
        (prom / "prometheus.yml").write_text(json.dumps(conf, indent=2))
        logf = open(prom / "prometheus.log", "ab")
        proc = subprocess.Popen(
            self.nsexec("prometheus", f"--config.file={prom / 'prometheus.yml'}",
                        f"--storage.tsdb.path={prom / 'data'}", "--web.listen-address=127.0.0.1:9090"),
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        return proc

    def prometheus_get(self, path: str, **params: str) -> dict:
        """A Prometheus HTTP API call (GET /api/v1/<path>) from the controller namespace: → its data."""
        args = [a for k, v in params.items() for a in ("--data-urlencode", f"{k}={v}")]
        p = run(self.nsexec("curl", "-fsS", "--max-time", "10", "-G", *args, f"http://127.0.0.1:9090/api/v1/{path}"),
                check=False)
        if p.returncode != 0:
            return {}
        return json.loads(p.stdout)["data"]

    @staticmethod
    def stop_prometheus(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    # -- teardown --------------------------------------------------------------------------------
    def stop(self) -> None:
        procs = [h.proc for h in self.hosts if h.proc] + ([self.s3_proc] if self.s3_proc else [])
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        for h in self.hosts:
            subprocess.run(["ip", "netns", "delete", h.netns], capture_output=True)
            shutil.rmtree(h.dir / "upper", ignore_errors=True)
            shutil.rmtree(h.dir / "work", ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", self.ctl], capture_output=True)
        try:
            if Path("/run/netns").is_dir() and not any(Path("/run/netns").iterdir()):
                subprocess.run(["umount", "/run/netns"], capture_output=True)
        except OSError:
            pass
        shutil.rmtree(self.env.get("ANSIBLE_SSH_CONTROL_PATH_DIR", "/nonexistent"), ignore_errors=True)
