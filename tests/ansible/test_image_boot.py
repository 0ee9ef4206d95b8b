"""The appliance disk image under qemu (TCG: no KVM here), one box for the module:

- it boots, applies a seed disk "beside the image" (agent.toml, hostname, admin key, pacs-subnets) at first boot,
  its agent answers /healthz over a forwarded port and the PACS network the seed names (qemu's host side,
  10.0.2.2) reaches the SFTP port; the cache partition is mounted and has grown over the disk;
- files stored while the object store is down stay queued on the cache partition; the system partitions are
  re-flashed from the image (image/reflash-system.sh) with the box off; the box boots as new (the seed applied
  again) and uploads the queue it finds on the cache partition;
- a newer kernel package (bookworm-backports, fetched by apt here) installed on the running box reaches the ESP
  through the kernel hooks and the box boots it (about 4 min; docs/fleet.md "Tests and timings").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import pytest
from clients import SftpClient
from fleetlib import REPO, VENV_BIN, log, project_version, run

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
S3_KEY = ("BOOTTESTKEY", "BOOTTESTSECRET0123456789")  # test-only
PACS_PASSWORD = "boot-test-only"                      # test-only
BUCKET, PREFIX = "pacs-boot", "boot-test"


BOOT_STALL = 300        # s without a sign of progress from a booting box: hung, however loaded the machine
BOOT_LIMIT = 1800       # s: the longest a boot may take, progressing or not
BOOT_PROBE_EVERY = 15   # s between looks at the booting box's progress
# qemu's TCG at times double-faults a kernel's early boot (kernel 6.12.95 at 1.1 s, `__kmalloc_noprof`, in one run of
# four that booted it): a panicked boot is powered on once more, a second panic fails (after BOOT_STALL)
PANIC = "Kernel panic - not syncing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuBox:
    """The image on a raw disk file (a copy of pacsgw.raw, made bigger as a real box's disk), its seed disk, and
    the host side: an S3 server on loopback that the guest reaches as 10.0.2.2, forwarded HTTP/SSH/SFTP ports."""

    def __init__(self, appliance: Path, work: Path) -> None:
        self.appliance, self.work = appliance, work
        self.s3_port, self.http_port = _free_port(), _free_port()
        self.ssh_port, self.sftp_port = _free_port(), _free_port()
        self.s3_dir = work / "s3"
        (self.s3_dir / BUCKET).mkdir(parents=True)
        self.s3: subprocess.Popen | None = None
        self.vm: subprocess.Popen | None = None
        self.key = work / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        seed = work / "seed"
        seed.mkdir()
        shutil.copy(f"{self.key}.pub", seed / "authorized_keys")
        (seed / "hostname").write_text("pacsgw-boot-test\n")
        # qemu's user network: forwarded connections reach the guest from 10.0.2.2, here the PACS
        (seed / "pacs-subnets").write_text("10.0.2.2/32\n")
        (seed / "agent.toml").write_text(f"""
[cache]
dir = "/var/lib/pacsgw/cache"
max_bytes = "1GB"
[uplink]
endpoint_url = "http://10.0.2.2:{self.s3_port}"
bucket = "{BUCKET}"
prefix = "{PREFIX}/"
access_key_id = "{S3_KEY[0]}"
secret_access_key = "{S3_KEY[1]}"
write_mode = "back"
[ftp]
listen = "0.0.0.0:2121"
[sftp]
listen = "0.0.0.0:2222"
host_key = "/var/lib/pacsgw/ssh_host_ed25519_key"
[http]
listen = "0.0.0.0:8080"
[log]
format = "json"
[[users]]
name = "pacs"
password = "{PACS_PASSWORD}"
""")
        self.seed_img = work / "seed.img"
        run(["bash", str(REPO / "image" / "mkseed.sh"), str(seed), str(self.seed_img)])
        # A bigger disk than the image, as on a real box: the cache partition grows over it at first boot.
        self.disk = work / "disk.raw"
        run(["cp", "--sparse=always", str(appliance / "pacsgw.raw"), str(self.disk)])
        os.truncate(self.disk, 8 * 1024**3)
        self.vars = work / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, self.vars)
        self.boots = 0

    # -- the object store ------------------------------------------------------------------------
    def start_s3(self) -> None:
        self.s3 = subprocess.Popen([str(VENV_BIN / "rclone"), "serve", "s3", str(self.s3_dir), "--addr",
                                    f"127.0.0.1:{self.s3_port}", "--auth-key", ",".join(S3_KEY), "--config",
                                    "/dev/null"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop_s3(self) -> None:
        if self.s3 and self.s3.poll() is None:
            os.killpg(self.s3.pid, signal.SIGTERM)
            self.s3.wait(timeout=30)
        self.s3 = None

    # -- the VM ------------------------------------------------------------------------------------
    def boot(self) -> float:
        """Power the box on and wait for /healthz over the forwarded port: → seconds it took. The wait follows the
        box's progress, not a clock (a loaded machine makes a TCG boot slow, not stuck): it fails when the boot
        shows no progress for BOOT_STALL s, at once when the boot has ended without a running agent, and after
        BOOT_LIMIT s in any case."""
        assert self.vm is None or self.vm.poll() is not None, "the box is running"
        self.boots += 1
        self.console = self.work / f"console-{self.boots}.log"
        cmd = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "1024",
            # TCG's default CPU (qemu64) lacks x86-64-v2 (SSE4.2, POPCNT), numpy's baseline: the agent would die
            # with SIGILL. Real boxes and VMs with `-cpu host` have it.
            "-cpu", "max",
            "-display", "none", "-no-user-config", "-nodefaults", "-serial", f"file:{self.console}",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={self.vars}",
            # cache=unsafe: the guest's flushes stop at qemu (this disk file outlives no host crash): each of
            # dpkg's and journald's fsyncs was a wait on the host's loaded disk. Written data reaches the file
            # as before (reflash-system.sh reads it after a power-off).
            "-drive", f"file={self.disk},if=virtio,format=raw,cache=unsafe",
            "-drive", f"file={self.seed_img},if=virtio,format=raw,readonly=on",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{self.http_port}-:8080,"
                    f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,hostfwd=tcp:127.0.0.1:{self.sftp_port}-:2222",
        ]
        t0 = time.monotonic()
        self.vm = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        last, seen, moved, probed, panicked = None, None, t0, t0, False
        while True:
            if self.vm.poll() is not None:
                pytest.fail(f"qemu exited {self.vm.returncode}: {self.vm.stderr.read().decode()[-2000:]}")
            try:
                self.healthz()
                took = time.monotonic() - t0
                log(f"image boot {self.boots} → /healthz answered after {took:.0f} s (TCG)", summary=True)
                return took
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300]!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            now = time.monotonic()
            if now - probed >= BOOT_PROBE_EVERY:
                probed = now
                if not panicked and self.console.exists() and PANIC in self.console.read_text(errors="replace"):
                    panicked = True
                    log(f"image boot {self.boots} → the kernel panicked under TCG, powered on again:\n"
                        + self.console.read_text(errors="replace")[-1500:], summary=True)
                    os.killpg(self.vm.pid, signal.SIGKILL)
                    self.vm.wait(timeout=30)
                    self.vm = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               start_new_session=True)
                    seen, moved = None, now
                    continue
                progress = self._progress(seen)
                if progress != seen:
                    seen, moved = progress, now
                state = progress[1].split() if progress[1] else []
                if state[:1] in (["running"], ["degraded"]) and state[2:3] in (["inactive"], ["failed"]):
                    self._fail_boot(f"the boot ended without a running agent ({last})")
                if now - moved > BOOT_STALL:
                    self._fail_boot(f"no progress for {BOOT_STALL} s, /healthz: {last}")
                if now - t0 > BOOT_LIMIT:
                    self._fail_boot(f"/healthz did not answer within {BOOT_LIMIT} s ({last})")
            time.sleep(1)

    def _progress(self, before: tuple[int, str | None] | None) -> tuple[int, str | None]:
        """What changes while the box boots: → (its console's length, and once the console is quiet and SSH answers,
        systemd's state, its number of queued jobs and the agent's unit: state, sub-state, restarts, CPU time)."""
        size = self.console.stat().st_size if self.console.exists() else 0
        if before is None or size != before[0]:
            return size, None        # the console moves: no SSH (it costs the booting guest CPU)
        return size, self._ask("systemctl is-system-running; systemctl list-jobs --no-legend --no-pager | wc -l; "
                               "systemctl show -p ActiveState -p SubState -p NRestarts -p CPUUsageNSec --value pacsgw")

    def _fail_boot(self, why: str) -> NoReturn:
        units = self._ask("systemctl --failed --no-pager; systemctl status --no-pager pacsgw; sudo journalctl -b "
                          "--no-pager -o short-monotonic -u pacsgw -u pacsgw-firstboot -u systemd-repart "
                          "-u var-lib-pacsgw-cache.mount | tail -60")
        pytest.fail(f"boot {self.boots}: {why}; the box's units:\n{units}\nconsole:\n"
                    + self.console.read_text(errors="replace")[-4000:])

    def _ask(self, command: str) -> str | None:
        """`command`'s output over SSH, None while the box does not answer (a booting box may not, or slowly)."""
        try:
            p = self.ssh(command, timeout=90, check=False)
        except subprocess.TimeoutExpired:
            return None
        return p.stdout if p.returncode == 0 else None

    def healthz(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 503:        # 503: failing, with the same JSON
                raise
            return json.loads(e.read())

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    "-o", "ConnectTimeout=20", "pacsadmin@127.0.0.1", command], timeout=timeout, check=check)

    def wait_ssh(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.ssh("true", timeout=60, check=False).returncode != 0:
            assert time.monotonic() < deadline, "no SSH:\n" + self.console.read_text(errors="replace")[-4000:]
            time.sleep(1)

    def poweroff(self) -> None:
        self.ssh("sudo systemctl --no-block poweroff", check=False)
        self.vm.wait(timeout=300)
        self.vm = None

    def stop(self) -> None:
        if self.vm and self.vm.poll() is None:
            os.killpg(self.vm.pid, signal.SIGTERM)
            self.vm.wait(timeout=30)
        self.stop_s3()


@pytest.fixture(scope="module")
def box(appliance, tmp_path_factory):
    b = QemuBox(appliance, tmp_path_factory.mktemp("qemu"))
    b.start_s3()
    try:
        yield b
    finally:
        b.stop()
        b.disk.unlink(missing_ok=True)   # up to 8 GB: not for pytest's retained directories


def _running(box: QemuBox) -> QemuBox:
    if box.vm is None or box.vm.poll() is not None:
        if box.s3 is None:
            box.start_s3()
        box.boot()
    return box


def _wait_queue_empty(box: QemuBox, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = box.healthz()
        if health.get("queue_depth") == 0 or time.monotonic() > deadline:
            return health
        time.sleep(1)


@pytest.mark.timeout(2400)
def test_image_boots_and_serves_healthz(appliance, box):
    parts = run(["sfdisk", "--json", str(appliance / "pacsgw.raw")]).stdout
    names = [p.get("name") for p in json.loads(parts)["partitiontable"]["partitions"]]
    assert names == ["esp", "pacsgw-config", "root", "pacsgw-cache"]
    _running(box)
    health = box.healthz()
    assert health["status"] in ("ok", "degraded"), health
    assert health["version"] == project_version(), health

    out = box.ssh("hostname; sudo stat -c '%U %a' /etc/pacsgw/agent.toml; systemctl is-active pacsgw; "
                  "systemctl is-active nftables; readlink /opt/pacsgw/current; "
                  "df -B1 --output=size / | tail -1; findmnt -n -o SOURCE,FSTYPE /var/lib/pacsgw/cache; "
                  "sudo df -B1 --output=size /var/lib/pacsgw/cache | tail -1; "
                  "sudo stat -c '%U %a' /var/lib/pacsgw/cache; "
                  "sudo ls /boot/efi/loader/entries; uname -r; getent hosts pacsgw-boot-test").stdout.split("\n")
    assert out[0] == "pacsgw-boot-test"
    assert out[11].split() == ["127.0.1.1", "pacsgw-boot-test"], out[11]   # the seed's name resolves
    assert out[1] == "pacsgw 600"
    assert out[2] == "active" and out[3] == "active"
    assert out[4] == f"releases/{project_version()}"
    # the root file system grew to its fixed 4 GiB partition; the cache partition over the rest of the 8 GB disk
    assert 3.5 * 1024**3 < int(out[5]) < 4.2 * 1024**3, f"root file system: {out[5]} bytes"
    assert out[6].split() == ["/dev/vda4", "ext4"], out[6]
    assert int(out[7]) > 3 * 1024**3, f"the cache partition did not grow over the disk: {out[7]} bytes"
    assert out[8] == "pacsgw 750", out[8]
    # the ESP as pacsgw-esp-update made it at build time: one entry per kernel, the running one among them
    assert f"pacsgw-{out[10]}.conf" in out[9].split(), out[9:]
    # a box that never saw site.yml: its firewall lets the PACS of pacs-subnets reach the SFTP port
    with socket.create_connection(("127.0.0.1", box.sftp_port), timeout=30) as s:
        s.settimeout(30)
        banner = s.recv(64)
    assert banner.startswith(b"SSH-2.0-"), banner


@pytest.mark.timeout(2400)
def test_reflash_keeps_the_cache_partition_and_uploads_its_queue(appliance, box):
    """Files acknowledged while the object store is down wait on the cache partition. The box is powered off and
    its system partitions re-flashed from the image; it boots as a new box (the marker on its old root is gone,
    the seed applied again), keeps the cache partition as it is (not formatted; its files handed to this image's
    service user) and uploads the queue."""
    _running(box)
    box.stop_s3()
    box.ssh("sudo touch /var/lib/pacsgw/before-reflash /var/lib/pacsgw/cache/on-the-cache-partition")
    files = {f"/CT/2026-12-01/reflash-{i}.dcm": b"DICM" + os.urandom(64 * 1024 + i) for i in range(5)}
    sftp = SftpClient(SimpleNamespace(sftp_port=box.sftp_port), password=PACS_PASSWORD)
    try:
        sftp._do(sftp.sftp.makedirs("/CT/2026-12-01", exist_ok=True))
        for path, data in files.items():
            sftp.put(path, data)
    finally:
        sftp.conn.close()
        sftp.loop.close()
    health = box.healthz()
    assert health["queue_depth"] >= len(files), health
    # The image that wrote the partition gave its service user another uid than the new image does (uids follow
    # the packages installed before the user is made): the partition's files belong to nobody the new image knows.
    box.ssh("sudo systemctl stop pacsgw && sudo chown -R 4242:4242 /var/lib/pacsgw/cache")
    box.poweroff()

    p = run(["bash", str(REPO / "image" / "reflash-system.sh"), str(appliance / "pacsgw.raw"), str(box.disk)],
            timeout=600)
    assert "writing root" in p.stdout and "config and cache partitions are as they were" in p.stdout, p.stdout

    box.start_s3()
    box.boot()
    box.wait_ssh()
    health = _wait_queue_empty(box)
    assert health.get("queue_depth") == 0, health
    for path, data in files.items():
        stored = box.s3_dir / BUCKET / PREFIX / path.lstrip("/")
        assert stored.is_file() and stored.read_bytes() == data, path
    state = box.ssh("test -e /var/lib/pacsgw/before-reflash && echo root-kept; "
                    "sudo test -e /var/lib/pacsgw/cache/on-the-cache-partition && echo cache-kept; "
                    "sudo journalctl -b -u pacsgw-firstboot --no-pager -o cat", check=False).stdout
    assert "root-kept" not in state, "the root file system was not re-flashed"
    assert "cache-kept" in state and "kept the cache partition /dev/vda4" in state, state
    assert "owned by 4242:4242, giving it to pacsgw" in state, state
    assert "applying the seed on /boot/pacsgw-seed (box not adopted yet)" in state, state


NEWER_KERNEL_SUITE = "bookworm-backports"   # a kernel newer than bookworm's and its security pocket's


def _download_newer_kernel(work: Path) -> Path:
    """The newest kernel package of NEWER_KERNEL_SUITE, fetched by apt on this machine with a private source
    list (the box has no mirror here): → the .deb."""
    lists = work / "apt-lists"
    (lists / "partial").mkdir(parents=True)
    mirror = run(["sh", "-c", "awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources"],
                 check=False).stdout.strip() or "http://deb.debian.org/debian"
    (work / "sources.list").write_text(f"deb {mirror} {NEWER_KERNEL_SUITE} main\n")
    opts = ["-o", f"Dir::Etc::SourceList={work / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={lists}", "-o", "APT::Get::List-Cleanup=0"]
    run(["apt-get", "-q", *opts, "update"], timeout=300)
    meta = run(["apt-cache", *opts, "show", f"linux-image-amd64/{NEWER_KERNEL_SUITE}"]).stdout
    package = next(d.strip() for line in meta.splitlines() if line.startswith("Depends:")
                   for d in line[len("Depends:"):].split(",") if d.strip().startswith("linux-image-"))
    run(["apt-get", "-q", *opts, "download", package.split()[0]], cwd=str(work), timeout=900)
    deb = next(work.glob("linux-image-*.deb"))
    # The same package with its data.tar not compressed (its modules are, each: 106 MB as xz, 110 MB as tar):
    # the box's dpkg spent minutes of TCG on xz alone. Repacked here, at native speed, during the first boots.
    tree, repacked = work / "tree", work / "repacked"
    repacked.mkdir()
    run(["dpkg-deb", "-R", str(deb), str(tree)], timeout=600)
    run(["dpkg-deb", "-Znone", "-b", str(tree), str(repacked / deb.name)], timeout=600)
    shutil.rmtree(tree)
    return repacked / deb.name


@contextmanager
def _serving(directory: Path) -> Iterator[int]:
    """A plain HTTP server on loopback for the files in `directory` (the box reaches it as 10.0.2.2): → its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module", autouse=True)
def newer_kernel(tmp_path_factory):
    """The newer kernel package, fetched while the module's first boots run under TCG (not after them): → a
    future of the .deb."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_download_newer_kernel, tmp_path_factory.mktemp("kernel"))


@pytest.mark.timeout(3600)
def test_newer_kernel_package_reaches_the_esp_and_boots(box, newer_kernel):
    """A newer kernel package installed on the running box (as unattended-upgrades would): the kernel and
    initramfs hooks put it on the ESP as the default entry beside the previous kernel, and the box boots it."""
    deb = newer_kernel.result(timeout=1200)
    new = deb.name.split("_")[0].removeprefix("linux-image-")
    _running(box)
    old = box.ssh("uname -r").stdout.strip()
    assert old != new
    # Fetched by the box over plain HTTP: through scp, sshd's decryption of 110 MB under TCG took minutes.
    t0 = time.monotonic()
    with _serving(deb.parent) as port:
        box.ssh(f"curl -fsS -o /tmp/{deb.name} http://10.0.2.2:{port}/{deb.name}", timeout=900)
    log(f"kernel package fetched by the box in {time.monotonic() - t0:.0f} s")
    # Only the modules this VM uses in the new initramfs: with the image's MODULES=most, building it alone took
    # 30 min under TCG. The hooks that carry it to the ESP are the same.
    box.ssh("echo MODULES=dep | sudo tee /etc/initramfs-tools/conf.d/pacsgw-test-dep")
    t0 = time.monotonic()
    p = box.ssh(f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /tmp/{deb.name} "
                "2>&1; echo; sudo ls /boot/efi/loader/entries; sudo cat /boot/efi/loader/loader.conf", timeout=3000)
    log(f"kernel {new} installed under TCG in {time.monotonic() - t0:.0f} s", summary=True)
    phases = box.ssh("grep -E ' startup |status (unpacked|installed) (linux-image|initramfs-tools)' /var/log/dpkg.log",
                     check=False).stdout
    log(f"where the install's time went (dpkg.log: unpack, configure, the initramfs trigger):\n{phases}")
    assert "pacsgw-esp-update: ESP /boot/efi boots kernel " + new in p.stdout, p.stdout[-4000:]
    assert f"pacsgw-{new}.conf" in p.stdout and f"pacsgw-{old}.conf" in p.stdout, p.stdout[-2000:]
    assert f"default pacsgw-{new}.conf" in p.stdout, p.stdout[-2000:]
    box.poweroff()
    box.boot()
    box.wait_ssh()
    # systemd-boot names the entry it started in an EFI variable (UTF-16, after 4 bytes of attributes; efivarfs
    # files cannot seek, so tail reads a pipe)
    out = box.ssh("uname -r; cat /sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
                  " | tail -c +5 | tr -d '\\0'; echo").stdout.split()
    assert out == [new, f"pacsgw-{new}.conf"], out
    assert box.healthz()["status"] in ("ok", "degraded")
