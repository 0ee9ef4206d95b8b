"""image/firstboot/pacsgw-seed-firewall: the config partition's pacs-subnets and agent.toml → nftables rules
for the image's firewall. The file is typed by whoever holds the box: only networks pass. The rules are
checked by nft itself (`nft -c`, inside a chain as the image's nftables.conf includes them). The fleet test
boots boxes on such seeds and stores over FTP through these rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devstack import AgentProc

HELPER = Path(__file__).parent.parent / "image" / "firstboot" / "pacsgw-seed-firewall"


def _agent_toml(tmp_path: Path, seaweed, **overrides) -> Path:
    proc = AgentProc(tmp_path / "box", seaweed, "box/", users=[{"name": "pacs", "password": "pacs-password-1"}],
                     overrides={"ftp.listen": "0.0.0.0:2121", "ftp.passive_ports": "30000-30100",
                                "sftp.listen": "0.0.0.0:2222", **overrides})
    return proc.config_path


def _helper(subnets: Path, agent_toml: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), str(subnets), str(agent_toml)],
                          capture_output=True, text=True, timeout=60)


def test_rules_open_the_agents_pacs_ports_to_the_listed_networks(tmp_path, seaweed):
    (tmp_path / "box").mkdir()
    subnets = tmp_path / "pacs-subnets"
    subnets.write_text("# radiology\n10.20.30.0/24\n\n192.0.2.7   # the old PACS\nfd00:1::/64\n")
    p = _helper(subnets, _agent_toml(tmp_path, seaweed))
    assert p.returncode == 0, p.stderr
    rules = [line for line in p.stdout.splitlines() if not line.startswith("#")]
    assert rules == [
        'ip saddr { 10.20.30.0/24, 192.0.2.7/32 } tcp dport { 2121, 30000-30100, 2222 } '
        'accept comment "PACS (config partition)"',
        'ip6 saddr { fd00:1::/64 } tcp dport { 2121, 30000-30100, 2222 } accept comment "PACS (config partition)"']
    (tmp_path / "firewall.d").mkdir()
    (tmp_path / "firewall.d" / "pacs-seed.nft").write_text(p.stdout)
    table = tmp_path / "table.nft"
    table.write_text("table inet pacsgw_seed_check {\n  chain input {\n    type filter hook input priority filter; "
                     f"policy drop;\n    include \"{tmp_path}/firewall.d/*.nft\"\n    counter\n  }}\n}}\n")
    check = subprocess.run(["nft", "-c", "-f", str(table)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    # the ports follow agent.toml: SFTP off, FTP on another port
    other = _agent_toml(tmp_path, seaweed, **{"sftp.enabled": False, "ftp.listen": "0.0.0.0:21"})
    assert "tcp dport { 21, 30000-30100 } accept" in _helper(subnets, other).stdout


def test_anything_but_networks_is_refused_with_file_and_line(tmp_path, seaweed):
    (tmp_path / "box").mkdir()
    toml = _agent_toml(tmp_path, seaweed)
    subnets = tmp_path / "pacs-subnets"
    for text, line in (("10.20.30.0/24\n10.0.0.0/8 } tcp dport 22 accept\n", 2),
                       ("0.0.0.0/0\n", 1), ("::/0\n", 1), ("pacs.hospital.example\n", 1)):
        subnets.write_text(text)
        p = _helper(subnets, toml)
        assert p.returncode != 0 and p.stdout == "", (text, p.stdout)
        assert f"{subnets}:{line}:" in p.stderr, (text, p.stderr)
    subnets.write_text("# nothing yet\n")
    p = _helper(subnets, toml)
    assert p.returncode != 0 and "names no network" in p.stderr
    # no PACS service at all in agent.toml: nothing to open, and it says so
    subnets.write_text("10.20.30.0/24\n")
    none = _agent_toml(tmp_path, seaweed, **{"ftp.enabled": False, "sftp.enabled": False})
    p = _helper(subnets, none)
    assert p.returncode != 0 and "no PACS service" in p.stderr and str(none) in p.stderr
