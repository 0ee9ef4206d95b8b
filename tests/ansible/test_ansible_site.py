"""site.yml applied through the chroot connection to a debootstrap root (by image/build.sh, with the
fleet's own roles) produces the expected files, users and units."""

from __future__ import annotations

import pytest
import testinfra
from fleetlib import project_version, run

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
    assert "fs.inotify.max_user_watches = 1048576" in sysctl
    assert "nofile 1048576" in root.file("/etc/security/limits.d/60-pacsgw.conf").content_string
    assert "Storage=persistent" in root.file("/etc/systemd/journald.conf.d/pacsgw.conf").content_string
    sshd = root.file("/etc/ssh/sshd_config.d/pacsgw.conf").content_string
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    for pkg in ("openssh-server", "nftables", "systemd-timesyncd", "python3-venv", "samba", "linux-image-amd64"):
        assert root.package(pkg).is_installed, pkg


def test_image_is_generic(root):
    """Nothing box-specific ships: host keys, machine-id, resolv.conf, apt lists are made per box."""
    assert root.run("ls /etc/ssh/ssh_host_*").rc != 0
    assert root.file("/etc/machine-id").size == 0
    assert not root.file("/etc/resolv.conf").exists
    assert root.run("ls /var/lib/apt/lists/*_Packages").rc != 0
    assert not root.file("/usr/sbin/policy-rc.d").exists
    assert root.file("/usr/local/sbin/pacsgw-firstboot").mode == 0o755
