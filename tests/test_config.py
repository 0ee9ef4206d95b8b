"""Configuration: every invalid key gets its own message naming the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.auth import hash_password, verify_password
from agent.config import ConfigError, load, parse_rate, parse_size

GOOD = """
[cache]
dir = "cache"
max_bytes = "800GB"

[uplink]
endpoint_url = "http://127.0.0.1:8333"
bucket = "pacs"
access_key_id = "EXAMPLEACCESSKEY"
secret_access_key = "EXAMPLESECRETKEY0123456789"

[[users]]
name = "pacs"
password = "test-only"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_good_config_loads_with_documented_defaults(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert cfg.cache.max_bytes == 800 * 10**9
    assert cfg.cache.dir == (tmp_path / "cache").resolve()
    assert (cfg.cache.high_watermark, cfg.cache.low_watermark) == (0.75, 0.60)
    assert cfg.uplink.write_mode == "through"
    assert cfg.ftp.listen == ("127.0.0.1", 2121)
    assert cfg.sftp.listen == ("127.0.0.1", 2222)
    assert cfg.http.listen == ("127.0.0.1", 8080)
    assert cfg.sftp.host_key == str(cfg.cache.dir / "ssh_host_ed25519_key")
    assert cfg.users[0].root == "/"
    assert (cfg.smb.mountpoint, cfg.smb.state_dir) == (str(cfg.cache.dir / "fs"), str(cfg.cache.dir / "smb"))
    assert cfg.smb.hosts_allow == ()


def test_smb_paths_and_hosts_allow(tmp_path):
    cfg = load(write(tmp_path, GOOD.replace("[[users]]", '[smb]\nmountpoint = "fs"\nstate_dir = "/srv/samba"\n'
                                            'hosts_allow = ["10.10.20.0/24", "192.0.2.7", "10.1.2.3/8"]\n[[users]]')))
    assert (cfg.smb.mountpoint, cfg.smb.state_dir) == (str(tmp_path / "fs"), "/srv/samba")
    assert cfg.smb.hosts_allow == ("10.10.20.0/24", "192.0.2.7/32", "10.0.0.0/8")


@pytest.mark.parametrize("text,value", [("800GB", 800 * 10**9), ("512KiB", 524288), ("1.5MB", 1_500_000),
                                        ("64MiB", 64 * 2**20), (1024, 1024), ("10 TB", 10**13)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "-1", "12XB", "1e3", True, 1.5, [1]])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_rates():
    assert parse_rate("80Mbps") == 10_000_000
    assert parse_rate("10MB") == 10_000_000
    assert parse_rate(0) == 0


BAD_CASES = [
    # (where to insert / what to replace, key named in the error, fragment of what is allowed)
    ('max_bytes = "800GB"', 'max_bytes = "lots"', "cache.max_bytes", "a size"),
    ('max_bytes = "800GB"', 'max_bytes = "800GB"\nhigh_watermark = 1.5', "cache.high_watermark", "fraction"),
    ('max_bytes = "800GB"', 'max_bytes = "800GB"\nlow_watermark = 0.9', "cache.low_watermark", "below"),
    ('max_bytes = "800GB"', 'max_bytes = "800GB"\nsize = 1', "cache.size", "unknown key"),
    ('endpoint_url = "http://127.0.0.1:8333"', 'endpoint_url = "ftp://x"', "uplink.endpoint_url", "URL"),
    ('bucket = "pacs"', 'bucket = "Pacs_Bucket"', "uplink.bucket", "bucket name"),
    ('bucket = "pacs"', 'bucket = "pacs"\nwrite_mode = "sometimes"', "uplink.write_mode", "'through' or 'back'"),
    ('bucket = "pacs"', 'bucket = "pacs"\nmax_concurrency = 0', "uplink.max_concurrency", "1..256"),
    ('bucket = "pacs"', 'bucket = "pacs"\nmultipart_chunk = "1MB"', "uplink.multipart_chunk", "5MiB"),
    ('bucket = "pacs"', 'bucket = "pacs"\nprefix = "/abs"', "uplink.prefix", "no leading"),
    ('bucket = "pacs"', 'bucket = "pacs"\nbwlimit = "fast"', "uplink.bwlimit", "rate"),
    ('access_key_id = "EXAMPLEACCESSKEY"', "", "uplink.access_key_id", "required"),
    ('[[users]]', '[ftp]\nlisten = "127.0.0.1"\n[[users]]', "ftp.listen", "HOST:PORT"),
    ('[[users]]', '[ftp]\nlisten = "127.0.0.1:99999"\n[[users]]', "ftp.listen", "HOST:PORT"),
    ('[[users]]', '[ftp]\npassive_ports = "300-200"\n[[users]]', "ftp.passive_ports", "LOW-HIGH"),
    ('[[users]]', '[sftp]\nenabled = "yes"\n[[users]]', "sftp.enabled", "true or false"),
    ('[[users]]', '[log]\nlevel = "loud"\n[[users]]', "log.level", "debug, info"),
    ('[[users]]', '[nfs]\nport = 2049\n[[users]]', "nfs", "unknown section"),
    ('[[users]]', '[smb]\nport = 445\n[[users]]', "smb.port", "unknown key"),
    ('[[users]]', '[smb]\nencryption = "maybe"\n[[users]]', "smb.encryption", "'required', 'desired' or 'off'"),
    ('[[users]]', '[smb]\nshare = "my share"\n[[users]]', "smb.share", "share name"),
    ('[[users]]', '[smb]\nunix_user = "root"\n[[users]]', "smb.unix_user", "Unix account"),
    ('[[users]]', '[smb]\nhosts_allow = ["10.10.20.0/33"]\n[[users]]', "smb.hosts_allow", "client networks"),
    ('[[users]]', '[smb]\nhosts_allow = "10.10.20.0/24"\n[[users]]', "smb.hosts_allow", "a list"),
    ('[[users]]', '[smb]\nenabled = true\nlisten = "127.0.0.1:2121"\n[[users]]', "smb.listen", "ftp.listen"),
    ('password = "test-only"', 'password_hash = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$'
     'aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g="\n[smb]\nenabled = true', "smb.enabled", "plain password"),
    ('name = "pacs"', 'name = "../root"', "users[0].name", "characters"),
    ('password = "test-only"', 'password = "test-only"\nroot = "relative"', "users[0].root", "absolute path"),
    ('password = "test-only"', 'password = "test-only"\nroot = "/CT/../.."', "users[0].root", "absolute path"),
    ('password = "test-only"', "", "users[0]", "a password"),
    ('password = "test-only"', 'password_hash = "md5$abc"', "users[0].password_hash", "hash-password"),
    ('password = "test-only"', 'password = "x"\nauthorized_keys = "/nonexistent/keys"', "users[0].authorized_keys",
     "existing"),
    ('password = "test-only"', 'password = "x"\nshell = "/bin/sh"', "users[0].shell", "unknown key"),
    ('[[users]]', '[compliance]\nmode = "STRICT"\n[[users]]', "compliance.mode", "COMPLIANCE"),
    ('[[users]]', '[[compliance.rules]]\nprefix = "inpatient/"\nretention_days = -1\n[[users]]',
     "compliance.rules[0].retention_days", "days"),
    ('[[users]]', '[[compliance.rules]]\nretention_days = 10\n[[users]]', "compliance.rules[0].prefix", "required"),
    ('[[users]]', '[compliance]\ntemp_suffixes = ["part"]\n[[users]]', "compliance.temp_suffixes", "suffixes"),
    ('[[users]]', '[audit]\nship = true\n[[users]]', "audit.ship_prefix", "outside the PACS namespace"),
    # issue 19 item 12: values that used to pass check-config and broke the box at run time
    ('max_bytes = "800GB"', 'max_bytes = 0', "cache.max_bytes", "at least 64KiB"),
    ('max_bytes = "800GB"', 'max_bytes = "800GB"\nmin_free_bytes = "500TB"', "cache.min_free_bytes",
     "below the size of the cache file system"),
    ('dir = "cache"', 'dir = "agent.toml"', "cache.dir", "is not a directory"),
    ('dir = "cache"', 'dir = "agent.toml/cache"', "cache.dir", "is not a directory"),
    ('[[users]]', '[sftp]\nlisten = "127.0.0.1:2121"\n[[users]]', "sftp.listen", "not already used by ftp.listen"),
    ('[[users]]', '[http]\nlisten = "0.0.0.0:2222"\n[[users]]', "http.listen", "not already used by sftp.listen"),
    ('[[users]]', '[ftp]\npassive_ports = "2100-2200"\n[[users]]', "ftp.passive_ports", "ftp.listen's port 2121"),
    ('[[users]]', '[ftp]\npassive_ports = "8000-9000"\n[[users]]', "ftp.passive_ports", "http.listen's port 8080"),
    ('password = "test-only"', 'password = "x"', "users[0].password", "at least 8 characters"),
    ('password = "test-only"', 'password = "test-only"\npermissions = ["read", "erase"]', "users[0].permissions",
     "'read', 'write', 'delete', 'rename'"),
    ('[[users]]', '[login]\nmax_failures = 0\n[[users]]', "login.max_failures", "1..10000"),
    ('[[users]]', '[login]\ndelay_seconds = 5\nmax_delay_seconds = 1\n[[users]]', "login.max_delay_seconds",
     "at least login.delay_seconds"),
]


@pytest.mark.parametrize("old,new,key,allowed", BAD_CASES, ids=[c[2] + ":" + c[1][:20] for c in BAD_CASES])
def test_each_bad_key_has_its_own_message(tmp_path, old, new, key, allowed):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == key
    assert str(path) in str(err.value)
    assert allowed in err.value.allowed


def test_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, GOOD + "\n[cache\n")
    with pytest.raises(ConfigError, match="valid TOML") as err:
        load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="readable TOML file"):
        load(tmp_path / "nope.toml")


def test_duplicate_users(tmp_path):
    with pytest.raises(ConfigError, match="unique") as err:
        load(write(tmp_path, GOOD + '\n[[users]]\nname = "pacs"\npassword = "y"\n'))
    assert err.value.key == "users[1].name"


def test_credentials_file(tmp_path):
    (tmp_path / "s3.toml").write_text('access_key_id = "AK"\nsecret_access_key = "SK"\n')
    (tmp_path / "s3.toml").chmod(0o600)
    text = GOOD.replace('access_key_id = "EXAMPLEACCESSKEY"\nsecret_access_key = "EXAMPLESECRETKEY0123456789"',
                        'credentials_file = "s3.toml"')
    cfg = load(write(tmp_path, text))
    assert (cfg.uplink.access_key_id, cfg.uplink.secret_access_key) == ("AK", "SK")
    (tmp_path / "s3.toml").write_text('access_key_id = "AK"\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "agent.toml")
    assert err.value.key == "secret_access_key" and err.value.file == str(tmp_path / "s3.toml")


def test_password_hash_roundtrip(tmp_path):
    h = hash_password("correct horse")
    assert verify_password("correct horse", encoded=h)
    assert not verify_password("wrong", encoded=h)
    cfg = load(write(tmp_path, GOOD.replace('password = "test-only"', f'password_hash = "{h}"')))
    assert cfg.users[0].password_hash == h


def test_secret_is_not_echoed(tmp_path):
    path = write(tmp_path, GOOD.replace('password = "test-only"', 'password = "s3cret"\npassword_hash = "x"'))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "s3cret" not in str(err.value)


def test_check_config_cli(tmp_path):
    good = write(tmp_path, GOOD)
    ok = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", "--config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    good.write_text(GOOD.replace('bucket = "pacs"', 'bucket = "pacs"\nbwlimt = 5'))
    good.chmod(0o600)
    bad = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", "--config", str(good)],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "uplink.bwlimt" in bad.stderr and str(good) in bad.stderr and "allowed keys" in bad.stderr


def test_files_with_secrets_must_be_private(tmp_path):
    path = write(tmp_path, GOOD)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as err:
        load(path)
    assert err.value.key == "(file mode)"
    (tmp_path / "s3.toml").write_text('access_key_id = "AK"\nsecret_access_key = "SK"\n')
    (tmp_path / "s3.toml").chmod(0o640)
    path.write_text(GOOD.replace('access_key_id = "EXAMPLEACCESSKEY"\nsecret_access_key = "EXAMPLESECRETKEY0123456789"',
                                 'credentials_file = "s3.toml"').replace('password = "test-only"',
                                                                          f'password_hash = "{hash_password("x")}"'))
    path.chmod(0o644)  # no secret left in the main file: its mode is free
    with pytest.raises(ConfigError, match="chmod 600") as err:
        load(path)
    assert err.value.file == str(tmp_path / "s3.toml")


def test_example_config_is_valid(tmp_path):
    example = tmp_path / "agent.toml"
    example.write_text((Path(__file__).parent.parent / "examples" / "agent.toml").read_text())
    example.chmod(0o600)
    cfg = load(example)
    assert cfg.ftp.listen == ("127.0.0.1", 2121) and cfg.http.listen == ("127.0.0.1", 8080)


def test_readme_documents_every_key():
    import dataclasses

    from agent import config
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for section, cls in [*config._SECTIONS.items(), ("users", config.UserConfig)]:
        heading = f"[[{section}]]" if section == "users" else f"[{section}]"
        assert heading in readme, heading
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in readme, f"{section}.{f.name} is not documented in README.md"
