"""The appliance disk image boots under qemu (TCG: no KVM here), applies a seed disk "beside the image"
(agent.toml, hostname, admin key, pacs-subnets) at first boot, and its agent answers /healthz over a
forwarded port; the PACS network the seed names (qemu's host side, 10.0.2.2) reaches the SFTP port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from fleetlib import REPO, VENV_BIN, log, project_version, run

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
S3_KEY = ("BOOTTESTKEY", "BOOTTESTSECRET0123456789")  # test-only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(2400)
def test_image_boots_and_serves_healthz(appliance, tmp_path):
    qcow2 = appliance / "pacsgw.qcow2"
    raw = appliance / "pacsgw.raw"
    assert qcow2.is_file() and raw.is_file()
    parts = run(["sfdisk", "--json", str(raw)]).stdout
    names = [p.get("name") for p in json.loads(parts)["partitiontable"]["partitions"]]
    assert names == ["esp", "pacsgw-config", "root"]

    # An S3 server on the host's loopback; the guest reaches it as 10.0.2.2 through qemu's user network.
    s3_port, http_port, ssh_port, sftp_port = _free_port(), _free_port(), _free_port(), _free_port()
    (tmp_path / "s3" / "pacs-boot").mkdir(parents=True)
    s3 = subprocess.Popen([str(VENV_BIN / "rclone"), "serve", "s3", str(tmp_path / "s3"), "--addr",
                           f"127.0.0.1:{s3_port}", "--auth-key", ",".join(S3_KEY), "--config", "/dev/null"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    key = tmp_path / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    seed = tmp_path / "seed"
    seed.mkdir()
    shutil.copy(f"{key}.pub", seed / "authorized_keys")
    (seed / "hostname").write_text("pacsgw-boot-test\n")
    # qemu's user network: forwarded connections reach the guest from 10.0.2.2, here the PACS
    (seed / "pacs-subnets").write_text("10.0.2.2/32\n")
    (seed / "agent.toml").write_text(f"""
[cache]
dir = "/var/lib/pacsgw/cache"
max_bytes = "1GB"
[uplink]
endpoint_url = "http://10.0.2.2:{s3_port}"
bucket = "pacs-boot"
prefix = "boot-test/"
access_key_id = "{S3_KEY[0]}"
secret_access_key = "{S3_KEY[1]}"
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
password = "boot-test-only"
""")
    seed_img = tmp_path / "seed.img"
    run(["bash", str(REPO / "image" / "mkseed.sh"), str(seed), str(seed_img)])
    # A bigger disk than the image, as on a real box: the root partition and filesystem grow at first boot.
    disk = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2", str(disk), "6G"])
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copy(OVMF_VARS, vars_copy)
    console = tmp_path / "console.log"
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "1024",
        # TCG's default CPU (qemu64) lacks x86-64-v2 (SSE4.2, POPCNT), numpy's baseline: the agent would die with
        # SIGILL. Real boxes and VMs with `-cpu host` have it.
        "-cpu", "max",
        "-display", "none", "-no-user-config", "-nodefaults", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_copy}",
        "-drive", f"file={disk},if=virtio,format=qcow2",
        "-drive", f"file={seed_img},if=virtio,format=raw,readonly=on",
        "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{http_port}-:8080,"
                f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{sftp_port}-:2222",
    ]
    t0 = time.monotonic()
    vm = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        health, last = None, None
        while time.monotonic() - t0 < 600:
            if vm.poll() is not None:
                pytest.fail(f"qemu exited {vm.returncode}: {vm.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                    break
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300]!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            time.sleep(3)
        boot_s = time.monotonic() - t0
        log(f"image boot → /healthz answered after {boot_s:.0f} s (TCG)")
        if health is None:
            pytest.fail(f"/healthz never answered within 600 s ({last}); console:\n"
                        + console.read_text(errors="replace")[-4000:])
        assert health["status"] in ("ok", "degraded"), health
        assert health["version"] == project_version(), health

        ssh = ["ssh", "-i", str(key), "-p", str(ssh_port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "pacsadmin@127.0.0.1"]
        out = run(ssh + ["hostname; sudo stat -c '%U %a' /etc/pacsgw/agent.toml; systemctl is-active pacsgw; "
                         "systemctl is-active nftables; readlink /opt/pacsgw/current; "
                         "df -B1 --output=size / | tail -1"],
                  timeout=120).stdout.split("\n")
        assert out[0] == "pacsgw-boot-test"
        assert out[1] == "pacsgw 600"
        assert out[2] == "active" and out[3] == "active"
        assert out[4] == f"releases/{project_version()}"
        assert int(out[5]) > 4 * 1024**3, f"root filesystem did not grow to the disk: {out[5]} bytes"
        # a box that never saw site.yml: its firewall lets the PACS of pacs-subnets reach the SFTP port
        with socket.create_connection(("127.0.0.1", sftp_port), timeout=30) as s:
            s.settimeout(30)
            banner = s.recv(64)
        assert banner.startswith(b"SSH-2.0-"), banner
    finally:
        os.killpg(vm.pid, signal.SIGTERM)
        vm.wait(timeout=30)
        os.killpg(s3.pid, signal.SIGTERM)
        s3.wait(timeout=30)
