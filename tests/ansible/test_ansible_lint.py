"""The roles and playbooks are ansible-lint clean (production profile) and pass --syntax-check."""

from __future__ import annotations

import json

import pytest
from fleetlib import ANSIBLE_DIR, REPO, VENV_BIN, ansible_env, run

VAULT_PASS = ANSIBLE_DIR / "inventory" / "example" / "vault-password.TEST-ONLY.txt"


def test_ansible_lint_offline(tmp_path):
    env = ansible_env(tmp_path) | {"ANSIBLE_VAULT_PASSWORD_FILE": str(VAULT_PASS)}
    p = run([str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor",
             ".", str(REPO / "image" / "image.yml")], cwd=ANSIBLE_DIR, env=env, check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "image.yml" in p.stdout + p.stderr or "passed" in (p.stdout + p.stderr).lower()


@pytest.mark.parametrize("playbook", ["site.yml", "update.yml", "push-model.yml", "reflash.yml"])
def test_syntax_check(tmp_path, playbook):
    env = ansible_env(tmp_path)
    run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "--vault-password-file", str(VAULT_PASS),
         "-i", str(ANSIBLE_DIR / "inventory" / "example" / "hosts.yml"), playbook], cwd=ANSIBLE_DIR, env=env)


def _render(tmp_path, *extra: str) -> list:
    """Every example host's agent.toml, rendered from inventory + vault (+ extra -e arguments) with the
    gateway role's template and defaults → the rendered files."""
    env = ansible_env(tmp_path)
    out = tmp_path / "rendered"
    role = tmp_path / "roles" / "render_agent_toml"
    (role / "tasks").mkdir(parents=True)
    (role / "defaults").mkdir()
    (role / "defaults" / "main.yml").symlink_to(ANSIBLE_DIR / "roles" / "gateway" / "defaults" / "main.yml")
    (role / "templates").symlink_to(ANSIBLE_DIR / "roles" / "gateway" / "templates")
    (role / "tasks" / "main.yml").write_text(
        "- name: Render\n  ansible.builtin.template:\n    src: agent.toml.j2\n"
        f"    dest: {out}/{{{{ inventory_hostname }}}}.toml\n    mode: '0600'\n")
    play = tmp_path / "render.yml"
    play.write_text("- hosts: pacsgw\n  connection: local\n  gather_facts: false\n  roles: [render_agent_toml]\n")
    out.mkdir()
    run([str(VENV_BIN / "ansible-playbook"), "-i", str(ANSIBLE_DIR / "inventory" / "example" / "hosts.yml"),
         "--vault-password-file", str(VAULT_PASS), "-e", f"ansible_python_interpreter={VENV_BIN / 'python'}",
         *extra, str(play)], cwd=ANSIBLE_DIR, env=env | {"ANSIBLE_ROLES_PATH": str(tmp_path / "roles")})
    files = sorted(out.glob("*.toml"))
    assert len(files) == 3
    return files


def test_example_inventory_renders_valid_agent_config(tmp_path):
    """Every example host's agent.toml, rendered from inventory + vault with the gateway role's template
    and defaults, passes the agent's own config check and is written 0600."""
    files = _render(tmp_path)
    from agent import config
    for f in files:
        cfg = config.load(f)
        assert cfg.uplink.bucket.startswith("pacs-hospital-")
        assert cfg.uplink.secret_access_key.startswith("EXAMPLESECRETKEY")  # decrypted from the vault
        assert cfg.users and cfg.users[0].password_hash.startswith("scrypt$")
        assert oct(f.stat().st_mode & 0o777) == "0o600"
        # SMB where the hospital asked for it (hospital B): through the agent, smbd run by systemd.
        smb = cfg.smb
        if "hospital-b" in f.name:
            assert smb.enabled and not smb.manage and smb.listen == ("0.0.0.0", 445)
            assert smb.encryption == "required" and smb.hosts_allow == ("172.20.5.0/24", "127.0.0.1/32")
            assert (smb.mountpoint, smb.state_dir) == ("/var/lib/pacsgw/fs", "/var/lib/pacsgw/samba")
            assert [u.name for u in cfg.users if u.password] == ["pacssmb"]
        else:
            assert not smb.enabled
        # Hospital A keeps its images under WORM and ships its audit trail to object storage.
        a = "hospital-a" in f.name
        assert cfg.compliance.worm is a and cfg.audit.ship is a
        if a:
            assert [(r.prefix, r.retention_days) for r in cfg.compliance.rules] == [("inpatient/", 10958)]
            assert cfg.audit.ship_prefix == "pacsgw-audit/hospital-a/"


def test_role_renders_ftps_ca_bundle_and_credentials_file(tmp_path):
    """FTPS, a private CA for the endpoint and a credentials file instead of keys in agent.toml (issue 15,
    item 5): rendered by the role, accepted by the agent's config check."""
    pem = tmp_path / "pem"
    pem.mkdir()
    for name in ("ftp.crt", "ftp.key", "ca.pem"):
        (pem / name).write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    creds = pem / "s3-credentials.toml"   # test-only keys
    creds.write_text('access_key_id = "ROTATEDKEY"\nsecret_access_key = "ROTATEDSECRET0123"\n')
    creds.chmod(0o600)
    files = _render(tmp_path, "-e", json.dumps({
        "gateway_ftp_tls_cert": str(pem / "ftp.crt"), "gateway_ftp_tls_key": str(pem / "ftp.key"),
        "gateway_ftp_require_tls": True, "gateway_uplink_ca_bundle": str(pem / "ca.pem"),
        "gateway_uplink_credentials_file": str(creds)}))
    from agent import config
    for f in files:
        text = f.read_text()
        assert "secret_access_key" not in text and "EXAMPLESECRETKEY" not in text
        cfg = config.load(f)
        assert (cfg.ftp.tls_cert, cfg.ftp.tls_key, cfg.ftp.require_tls) == (str(pem / "ftp.crt"),
                                                                           str(pem / "ftp.key"), True)
        assert cfg.uplink.ca_bundle == str(pem / "ca.pem")
        assert cfg.uplink.credentials_file == str(creds) and cfg.uplink.access_key_id == "ROTATEDKEY"


def test_prometheus_scrape_config_and_alert_rules():
    """The example scrape config and alert rules load in Prometheus' own checker, and the alerts fire on
    the faults they are named for (promtool test rules on alerts_test.yml)."""
    import shutil
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: .ci/run installs it"
    p = run([promtool, "check", "config", str(ANSIBLE_DIR / "monitoring" / "prometheus.yml")], check=False)
    assert p.returncode == 0 and "SUCCESS: 7 rules found" in p.stdout, p.stdout + p.stderr
    here = REPO / "tests" / "ansible"
    p = run([promtool, "test", "rules", "alerts_test.yml"], cwd=here, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
