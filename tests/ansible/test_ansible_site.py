"""site.yml applied through the chroot connection to an mmdebstrap root (by image/build.sh, with the
fleet's own roles) produces the expected files, users and units."""

from __future__ import annotations

import subprocess
import tomllib

import pytest
import testinfra
from fleetlib import project_version, provision_chroot, run, unmount_chroot

# The first test to ask for the appliance pays for building it.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def root(appliance):
    return testinfra.get_host(str(appliance / 'rootfs'), connection="chroot")


@pytest.fixture(scope="module")
def rootfs(appliance):
    return appliance / "rootfs"


def test_users(root):
    svc = root.user("pacsgw")
    assert svc.exists and svc.uid < 1000 and svc.shell == "/usr/sbin/nologin" and svc.home == "/var/lib/pacsgw"
    admin = root.user("pacsadmin")
    assert admin.exists and "sudo" in admin.groups
    assert root.file("/etc/sudoers.d/pacsgw-admin").mode == 0o440


def test_release_layout(root):
    version = project_version()
    current = root.file("/opt/pacsgw/current")
    assert current.is_symlink and current.linked_to == f"/opt/pacsgw/releases/{version}"
    assert root.file(f"/opt/pacsgw/releases/{version}/.complete").content_string.strip() == version
    assert root.file(f"/opt/pacsgw/releases/{version}/pyvenv.cfg").exists
    out = root.check_output("/opt/pacsgw/current/bin/pacsgw --version")
    assert out.strip() == f"pacsgw {version}"
    assert not root.file(f"/opt/pacsgw/wheelhouse/{version}").exists   # dropped after install
    for d in ("/var/lib/pacsgw", "/var/lib/pacsgw/cache", "/var/lib/pacsgw/models"):
        f = root.file(d)
        assert f.is_directory and f.user == "pacsgw" and f.mode == 0o750
    cfg = root.file("/etc/pacsgw")
    assert cfg.is_directory and cfg.user == "root" and cfg.group == "pacsgw" and cfg.mode == 0o750
    # The image carries no hospital configuration: the first-boot step installs it.
    assert not root.file("/etc/pacsgw/agent.toml").exists


def test_agent_unit(root):
    unit = root.file("/etc/systemd/system/pacsgw.service")
    text = unit.content_string
    for line in ("Type=simple", "User=pacsgw",
                 "ExecStart=/opt/pacsgw/current/bin/pacsgw run --config /etc/pacsgw/agent.toml",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                 "ProtectHome=yes", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "SystemCallFilter=@system-service", "ReadWritePaths=/var/lib/pacsgw",
                 "ConditionPathExists=/etc/pacsgw/agent.toml", "StandardOutput=journal"):
        assert line in text.splitlines(), line
    assert root.file("/etc/systemd/system/multi-user.target.wants/pacsgw.service").linked_to == \
        "/etc/systemd/system/pacsgw.service"
    assert root.run("systemd-analyze verify /etc/systemd/system/pacsgw.service").rc in (0, 1)


def test_services_enabled(root):
    for unit, target in [("nftables.service", "sysinit.target.wants"),
                         ("pacsgw-firstboot.service", "sysinit.target.wants"),
                         ("systemd-networkd.service", "multi-user.target.wants"),
                         ("systemd-timesyncd.service", "sysinit.target.wants"),
                         ("ssh.service", "multi-user.target.wants"),
                         ("prometheus-node-exporter.service", "multi-user.target.wants"),
                         ("serial-getty@ttyS0.service", "getty.target.wants")]:
        assert root.file(f"/etc/systemd/system/{target}/{unit}").is_symlink, unit


def test_firewall(root, rootfs):
    conf = root.file("/etc/nftables.conf").content_string
    assert "policy drop" in conf and "table inet pacsgw" in conf
    assert "ip saddr @admin4 tcp dport { 22, 8080 } accept" in conf
    assert "ip saddr @pacs4 tcp dport { 21, 30000-30100, 2222 } accept" in conf
    # The ruleset is valid nft syntax (checked by the host's nft against the file).
    run(["nft", "-c", "-f", str(rootfs / "etc/nftables.conf")])


def test_tuning_and_logging(root):
    sysctl = root.file("/etc/sysctl.d/60-pacsgw.conf").content_string
    assert "fs.inotify.max_user_watches = 1048576" in sysctl and "net.ipv4.tcp_migrate_req = 1" in sysctl
    assert "nofile 1048576" in root.file("/etc/security/limits.d/60-pacsgw.conf").content_string
    assert "Storage=persistent" in root.file("/etc/systemd/journald.conf.d/pacsgw.conf").content_string
    sshd = root.file("/etc/ssh/sshd_config.d/pacsgw.conf").content_string
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    for pkg in ("openssh-server", "nftables", "systemd-timesyncd", "python3-venv", "samba", "fuse3",
                "linux-image-amd64"):
        assert root.package(pkg).is_installed, pkg


def test_node_exporter_collects_unit_states(root):
    assert "--collector.systemd" in root.file("/etc/default/prometheus-node-exporter").content_string


def test_image_is_generic(root):
    """Nothing box-specific ships: host keys, machine-id, resolv.conf, apt lists are made per box."""
    assert root.run("ls /etc/ssh/ssh_host_*").rc != 0
    assert root.file("/etc/machine-id").size == 0
    assert not root.file("/etc/resolv.conf").exists
    assert root.run("ls /var/lib/apt/lists/*_Packages").rc != 0
    assert not root.file("/usr/sbin/policy-rc.d").exists
    assert not root.file("/etc/dpkg/dpkg.cfg.d/pacsgw-build-unsafe-io").exists   # the build's, not the box's dpkg
    assert root.file("/usr/local/sbin/pacsgw-firstboot").mode == 0o755


def test_image_keeps_samba_off(root):
    """The image (no SMB until a hospital asks for it): the agent's unprivileged unit, Samba disabled."""
    for unit in ("smbd", "nmbd", "samba-ad-dc"):
        assert not root.file(f"/etc/systemd/system/multi-user.target.wants/{unit}.service").exists, unit
    assert not root.file("/etc/systemd/system/smbd.service.d/pacsgw.conf").exists
    assert not root.file("/etc/systemd/system/pacsgw.service.d/smbd.conf").exists


# --- an SMB-enabled box: site.yml over the chroot with hospital B's kind of settings ------------------

SMB_VARS = {
    "pacsgw_smb_enabled": True,
    "pacsgw_pacs_subnets": ["172.20.5.0/24"],
    "base_pacs_subnets": ["172.20.5.0/24"],
    "base_admin_subnets": ["203.0.113.0/24"],
    "gateway_uplink_endpoint_url": "https://s3.region.example",
    "gateway_uplink_bucket": "pacs-hospital-b",
    "gateway_uplink_prefix": "hospital-b/",
    "gateway_uplink_access_key_id": "SITETESTKEY",                       # test-only
    "gateway_uplink_secret_access_key": "SITETESTSECRET0123456789",      # test-only
    "gateway_users": [{"name": "pacssmb", "password": "smb-site-test", "root": "/"}],  # test-only
    "gateway_no_log": False,   # a failed config check shows why
}


@pytest.fixture(scope="module")
def smb_box(appliance, tmp_path_factory):
    work = tmp_path_factory.mktemp("smb-box")
    merged = provision_chroot(appliance / "rootfs", work, SMB_VARS)
    try:
        yield merged
    finally:
        unmount_chroot(work)


def _in(tree, *cmd: str) -> subprocess.CompletedProcess:
    return run(["chroot", str(tree), *cmd], check=False)


def test_smb_box_agent_config(smb_box):
    conf = smb_box / "etc/pacsgw/agent.toml"
    st = conf.stat()
    assert oct(st.st_mode & 0o777) == "0o600"
    p = _in(smb_box, "/opt/pacsgw/current/bin/pacsgw", "check-config", "--config", "/etc/pacsgw/agent.toml")
    assert p.returncode == 0, p.stdout + p.stderr
    smb = tomllib.loads(conf.read_text())["smb"]
    assert smb == {"enabled": True, "manage": False, "listen": "0.0.0.0:445", "share": "pacs",
                   "encryption": "required", "hosts_allow": ["172.20.5.0/24", "127.0.0.1/32"],
                   "mountpoint": "/var/lib/pacsgw/fs", "state_dir": "/var/lib/pacsgw/samba",
                   "unix_user": "pacsgw"}
    # The smb.conf this agent will render for systemd's smbd, read back by the image's own Samba.
    render = ("from agent.config import load; from agent.serve.smb import render_conf; "
              "print(render_conf(load('/etc/pacsgw/agent.toml')), end='')")
    p = _in(smb_box, "/opt/pacsgw/current/bin/python", "-c", render)
    assert p.returncode == 0, p.stderr
    (smb_box / "tmp/agent-smb.conf").write_text(p.stdout)
    p = _in(smb_box, "testparm", "-s", "--suppress-prompt", "/tmp/agent-smb.conf")
    assert "Loaded services file OK." in p.stderr, p.stderr
    parsed = p.stdout
    for line in ("[pacs]", "\tpath = /var/lib/pacsgw/samba/roots/%u", "\thosts allow = 172.20.5.0/24 127.0.0.1/32",
                 "\thosts deny = ALL", "\tserver min protocol = SMB3_00", "\tserver signing = required",
                 "\tserver smb encrypt = required", "\tsmb ports = 445"):
        assert line in parsed.splitlines(), (line, parsed)
    # pyfuse3 (the release's smb extra) loads against the image's libfuse3; fusermount3 is there.
    p = _in(smb_box, "/opt/pacsgw/current/bin/python", "-c", "import pyfuse3")
    assert p.returncode == 0, p.stderr
    assert (smb_box / "usr/bin/fusermount3").exists()


def test_smb_box_smbd_runs_on_the_agents_conf(smb_box):
    dropin = (smb_box / "etc/systemd/system/smbd.service.d/pacsgw.conf").read_text().splitlines()
    for line in ("After=pacsgw.service", "BindsTo=pacsgw.service", "ExecStart=", "ExecCondition=",
                 "ExecStart=/usr/sbin/smbd --foreground --no-process-group -s /var/lib/pacsgw/samba/smb.conf",
                 "PIDFile=/var/lib/pacsgw/samba/run/smbd.pid"):
        assert line in dropin, line
    agent_dropin = (smb_box / "etc/systemd/system/pacsgw.service.d/smbd.conf").read_text().splitlines()
    assert "Wants=smbd.service" in agent_dropin and "Upholds=smbd.service" in agent_dropin
    wants = smb_box / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "smbd.service").is_symlink()
    assert not (wants / "nmbd.service").exists() and not (wants / "samba-ad-dc.service").exists()
    # No share of Samba's own: /etc/samba/smb.conf only includes the agent's, no plain directory is shared.
    etc_conf = [line.strip() for line in (smb_box / "etc/samba/smb.conf").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert etc_conf == ["[global]", "include = /var/lib/pacsgw/samba/smb.conf"]
    assert not (smb_box / "var/lib/pacsgw/smb").exists()
    # smbd passes through the agent's state directory as the SMB users' accounts (group pacsgw).
    for d in ("var/lib/pacsgw/samba", "var/lib/pacsgw/samba/roots"):
        st = (smb_box / d).stat()
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o750"), d
        assert _in(smb_box, "stat", "-c", "%G", "/" + d).stdout.strip() == "pacsgw", d
    # The firewall opens SMB to the PACS subnet only.
    nft = (smb_box / "etc/nftables.conf").read_text()
    assert "ip saddr @pacs4 tcp dport { 21, 30000-30100, 2222, 445 } accept" in nft
    run(["nft", "-c", "-f", str(smb_box / "etc/nftables.conf")])


def test_smb_box_agent_unit_privileges(smb_box):
    """With SMB the agent runs as root, in the host's mount namespace (smbd must see its FUSE mount),
    with a reduced capability set, /dev/fuse, and @mount on top of @system-service."""
    lines = (smb_box / "etc/systemd/system/pacsgw.service").read_text().splitlines()
    assert not any(line.startswith(("User=", "Group=")) for line in lines)
    for line in ("CapabilityBoundingSet=CAP_SYS_ADMIN CAP_NET_BIND_SERVICE CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER",
                 "DevicePolicy=closed", "DeviceAllow=/dev/fuse rw", "NoNewPrivileges=yes",
                 "SystemCallFilter=@system-service @mount", "RestrictNamespaces=yes"):
        assert line in lines, line
    namespacing = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernel",
                   "ProtectControlGroups", "ProtectHostname", "ProtectProc", "ReadWritePaths", "ReadOnlyPaths")
    assert not [line for line in lines if line.startswith(namespacing)]


def test_security_updates_only_and_a_draining_reboot_window(root):
    """unattended-upgrades takes the Debian security pocket and nothing else (Debian's own list cleared),
    never reboots by itself; the reboot window's timer (drain first) is enabled."""
    assert root.package("unattended-upgrades").is_installed
    origins = root.check_output("apt-config dump Unattended-Upgrade::Origins-Pattern").splitlines()
    assert [o for o in origins if "origin=" in o] == [
        'Unattended-Upgrade::Origins-Pattern:: "origin=Debian,codename=${distro_codename}-security,'
        'label=Debian-Security";'], origins
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in root.check_output("apt-config dump")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in root.file("/etc/apt/apt.conf.d/20auto-upgrades").content_string
    assert root.file("/etc/systemd/system/timers.target.wants/pacsgw-drain-reboot.timer").is_symlink
    assert root.file("/usr/local/sbin/pacsgw-drain-reboot").mode == 0o755
