"""The fleet playbooks over SSH against three booted appliance containers, one per hospital, each in a
network namespace of its own with its own sshd and agent (systemd-nspawn on the image tree):

- each box boots on the seed typed at flashing time (agent.toml and pacs-subnets included) and serves a PACS
  in the networks its seed names, no other (the `flashed` fixture), then site.yml adopts all three
  (agent.toml from inventory, agent healthy), hospital B's with SMB (the `provisioned` fixture);
- a file written over SMB to hospital B's box lands in hospital B's bucket;
- a real Prometheus scrapes every box (agent metrics listener, node exporter: TLS, basic auth) and
  evaluates the example alert rules;
- a reboot after adoption keeps the fleet's agent.toml; an unsigned USB seed after adoption is ignored and
  logged, a seed signed with the fleet's key is applied;
- update.yml rolls a healthy release out (canary, then batches); plain site.yml does not switch it back;
  --check reports without changing anything;
- update.yml whose release install fails restores this update's configuration, not an older one;
- a release that fails its health check on the second box: that box is rolled back, the first keeps the
  new release, the third is untouched, and the play fails saying so;
- a release whose agent cannot reach S3 is rolled back on the canary, the others are untouched;
- an S3 key rotation rolled out as a configuration-only update while a PACS writes: nothing acknowledged lost;
- in one rollout, an unreachable box is listed in the summary and left, and the rollout goes on past it; a box
  whose upload queue does not drain is skipped (as it is by the reboot window after security updates, where a
  drained box stops its agent, then reboots), and reflash.yml refuses it; push-model.yml with and without
  models_file;
- reflash.yml drains one box, stops its agent and marks it ready for re-flashing.

The tests share one fleet (module fixture) and run in this order; each one brings the fleet to the state
it needs (update.yml to a release is a no-op on boxes already there) or gets it from a fixture.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fleetlib import (
    ANSIBLE_DIR,
    METRICS_PORT,
    NEWER_SCHEMA_PATCH,
    REPO,
    SMB_PASSWORD,
    UNREACHABLE_S3_PATCH,
    Fleet,
    break_for_hospital_b,
    build_variant_release,
    log,
    project_version,
    run,
    said,
)

from agent.store.catalog import SCHEMA_VERSION

pytestmark = pytest.mark.timeout(2400)

NEW = "99.0.1"       # a healthy new release (test-only version number)
BROKEN = "99.0.2"    # a release that cannot start on hospital B's configuration
NO_S3 = "99.0.4"     # a release whose agent cannot reach its object store, with a newer catalog schema
LAST = "99.0.5"      # another healthy release (update --check, the unreachable and undrained boxes)


@pytest.fixture(scope="module")
def fleet(base_release, tmp_path_factory, request):
    work = tmp_path_factory.mktemp("fleet")
    releases = work / "releases"
    releases.mkdir()
    shutil.copy(base_release, releases / base_release.name)
    variants = {NEW: {}, BROKEN: {"patch": break_for_hospital_b},
                NO_S3: {"patch_files": UNREACHABLE_S3_PATCH | NEWER_SCHEMA_PATCH}, LAST: {}}
    # The release builds (each a pip wheel in a build environment of its own, mostly waiting) run side by side
    # and while the appliance is built, if this module is the first to want it.
    with ThreadPoolExecutor(len(variants)) as pool:
        builds = [pool.submit(build_variant_release, base_release, releases, version, **kw)
                  for version, kw in variants.items()]
        appliance = request.getfixturevalue("appliance")
        for b in builds:
            b.result()
    f = Fleet(rootfs=appliance / "rootfs", workdir=work, groups=["hospital_a", "hospital_b", "hospital_c"])
    try:
        f.start()
        log("fleet up: " + ", ".join(f"{h.name}={h.addr} ({h.group})" for h in f.hosts))
        yield f
    finally:
        f.stop()


def _assert_ok(p):
    assert p.returncode == 0, p.stdout[-8000:] + p.stderr[-3000:]


def _conf(fleet, host) -> str:
    return fleet.ssh(host, "sudo cat /etc/pacsgw/agent.toml").stdout


# A PACS storing one file over FTP (passive mode). argv: address, port, user, password, remote name. Prints
# the server's reply to STOR, or the error.
FTP_STORE = r"""
import ftplib, io, sys
addr, port, user, password, name = sys.argv[1:]
try:
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(addr, int(port))
    ftp.login(user, password)
    print(ftp.storbinary(f"STOR {name}", io.BytesIO(b"DICM" + name.encode() * 100)))
    ftp.quit()
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


@pytest.fixture(scope="module")
def flashed(fleet):
    """What a PACS sees of the boxes as flashed, before any site.yml: an FTP store to each on the port of
    its seed's agent.toml. → {host name: (STOR reply or error, firstboot journal)}"""
    seen = {}
    for h in fleet.hosts:
        assert 'prefix = "seeded-' in _conf(fleet, h), h.name
        _wait_agent(fleet, h)     # it starts after SSH does: a store before would be refused, not filtered
        p = run(fleet.nsexec(sys.executable, "-c", FTP_STORE, h.addr, "2121", "seeded", "seeded-at-flashing",
                             f"flashed-{h.name}.dcm"), check=False, timeout=120)
        seen[h.name] = (p.stdout.strip() + p.stderr[-500:], _firstboot_log(fleet, h))
    return seen


@pytest.fixture(scope="module")
def provisioned(fleet, flashed):
    """The boxes as flashed (running on their seed's agent.toml), then adopted by site.yml."""
    _assert_ok(fleet.playbook("site.yml"))
    return fleet


def test_flashed_box_serves_the_pacs_subnets_of_its_config_partition(flashed, fleet):
    """A box that never saw site.yml opens its agent.toml's PACS ports to the networks its config partition
    names (pacs-subnets) and to no others: the first two boxes name the PACS, the third another network."""
    first, second, third = fleet.hosts
    for h in (first, second):
        reply, journal = flashed[h.name]
        assert reply.startswith("226"), (h.name, reply, journal)
        slug = h.group.replace("_", "-")
        stored = fleet.workdir / "s3" / f"pacs-{slug}" / f"seeded-{slug}" / f"flashed-{h.name}.dcm"
        assert stored.read_bytes().startswith(b"DICM"), stored
        assert "PACS ports open to the networks of /boot/pacsgw-config/pacs-subnets" in journal, journal
    reply, journal = flashed[third.name]
    assert reply.startswith(("TimeoutError", "timeout", "OSError")) and "226" not in reply, reply
    assert "192.0.2.0/24" in journal, journal
    # the name its seed gave it resolves to the box itself: sudo does not warn "unable to resolve host"
    for h in fleet.hosts:
        p = fleet.ssh(h, "getent hosts $(hostname); sudo true")
        assert p.stdout.split() == ["127.0.1.1", h.name] and p.stderr == "", (h.name, p.stdout, p.stderr)


def test_site_provisions_every_box(provisioned):
    fleet = provisioned
    base = project_version()
    for h in fleet.hosts:
        health = fleet.healthz(h)
        assert health.get("status") in ("ok", "degraded"), (h.name, health)
        assert health["version"] == base
        assert fleet.current_release(h) == base
        stat = fleet.ssh(h, "sudo stat -c '%U %G %a' /etc/pacsgw/agent.toml").stdout.strip()
        assert stat == "pacsgw pacsgw 600"
        conf = fleet.ssh(h, "sudo cat /etc/pacsgw/agent.toml").stdout
        assert f'prefix = "{h.group.replace("_", "-")}/"' in conf
        ruleset = fleet.ssh(h, "sudo nft list ruleset").stdout
        # the fleet's firewall replaced the config partition's PACS rules
        assert "table inet pacsgw" in ruleset and "config partition" not in ruleset, ruleset
        # the agent with SMB runs as root (FUSE mount, Samba accounts); without, as the service user
        user = fleet.ssh(h, "systemctl show -p User --value pacsgw").stdout.strip()
        assert user == ("" if h.group == "hospital_b" else "pacsgw"), (h.name, user)
    # SMB only where the hospital asked for it (hospital B); elsewhere the image's Samba stays off.
    for h in fleet.hosts:
        smb = fleet.ssh(h, "for i in $(seq 60); do systemctl is-active -q smbd && break; sleep 0.5; done; "
                           "systemctl is-active smbd; systemctl is-active nmbd; ss -Hltn 'sport = :445' | wc -l; "
                           "sudo pdbedit -L | cut -d: -f1", check=False).stdout.split()
        if h.group == "hospital_b":
            assert smb[0] == "active" and smb[1] == "inactive" and int(smb[2]) >= 1, f"{smb}\n{_smb_journal(fleet, h)}"
            assert "pacsgw-pacssmb" in smb[3:] and "pacsgw-pacs" in smb[3:], smb
            cmdline = fleet.ssh(h, "systemctl show -p ExecStart --value smbd").stdout
            assert "-s /var/lib/pacsgw/samba/smb.conf" in cmdline, cmdline
        else:
            assert smb[:3] == ["inactive", "inactive", "0"], (h.name, smb)
    # Idempotent: a second run changes nothing.
    p = fleet.playbook("site.yml")
    _assert_ok(p)
    assert "changed=0" in p.stdout.split("PLAY RECAP")[-1], p.stdout.split("PLAY RECAP")[-1]


def _smb_journal(fleet, host) -> str:
    return fleet.ssh(host, "systemctl status smbd --no-pager; sudo journalctl -u smbd --no-pager | tail -30; "
                           "systemctl show pacsgw -p Wants -p Upholds -p DropInPaths -p ActiveState; "
                           "sudo journalctl -b --no-pager | grep -i -E 'smbd|upho' | tail -20",
                     check=False).stdout


# A PACS writing over SMB (smbprotocol: SMB3, signed, encrypted), then reading back. argv: address,
# password, the local file to store as CT\2026-11-23\smb-fleet.dcm.
SMB_CLIENT = r"""
import sys, uuid
import smbclient
from smbprotocol.connection import Connection
addr, password, source = sys.argv[1:]
data = open(source, "rb").read()
conn = Connection(uuid.uuid4(), addr, 445, require_signing=True)
conn.connect(timeout=20)
kw = dict(username="pacssmb", password=password, port=445, encrypt=True,
          connection_cache={f"{addr}:445": conn})
day = "\\\\" + addr + "\\pacs\\CT\\2026-11-23"
smbclient.makedirs(day, exist_ok=True, **kw)
with smbclient.open_file(day + "\\smb-fleet.dcm", mode="wb", **kw) as f:
    f.write(data)
with smbclient.open_file(day + "\\smb-fleet.dcm", mode="rb", **kw) as f:
    assert f.read() == data, "read back differs"
"""


def test_smb_write_reaches_the_hospitals_bucket(provisioned):
    """A PACS on the hospital network writes over SMB to hospital B's box: the file goes through the agent
    into that hospital's S3 bucket (and its audit trail, under the SMB user's name) and reads back."""
    fleet = provisioned
    gw = next(h for h in fleet.hosts if h.group == "hospital_b")
    data = b"DICM" + bytes(range(256)) * 400
    source = fleet.workdir / "smb-fleet.dcm"
    source.write_bytes(data)
    p = run(fleet.nsexec(sys.executable, "-c", SMB_CLIENT, gw.addr, SMB_PASSWORD, str(source)),
            check=False, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:] + _smb_journal(fleet, gw)
    # write-through: the close returned after S3 confirmed the object (rclone keeps one file per object)
    stored = fleet.workdir / "s3" / "pacs-hospital-b" / "hospital-b" / "CT" / "2026-11-23" / "smb-fleet.dcm"
    assert stored.read_bytes() == data
    audit = fleet.ssh(gw, "sudo grep -h smb-fleet.dcm /var/lib/pacsgw/cache/audit/audit.jsonl").stdout
    assert '"pacssmb"' in audit, audit


def test_prometheus_scrapes_the_fleet(provisioned):
    """A real Prometheus (Debian's) in the monitoring subnet scrapes every box: the agent's metrics listener
    and the node exporter, both over TLS (the fleet's CA) with basic auth, and evaluates the example alert
    rules on them. Both refuse a scrape without the password; the agent's status port stays closed."""
    fleet = provisioned
    prom = fleet.start_prometheus(ANSIBLE_DIR / "monitoring" / "pacsgw-alerts.yml")
    try:
        def scraped() -> dict:
            """What Prometheus has once every target answered and every rule was evaluated ({} before)."""
            up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
                  for r in fleet.prometheus_get("query", query="up").get("result", [])}
            groups = fleet.prometheus_get("rules").get("groups", [])
            rules = [r for g in groups for r in g["rules"]]
            if len(up) < 2 * len(fleet.hosts) or not rules or any(r["health"] == "unknown" for r in rules):
                return {}
            return {"up": up, "rules": rules}

        seen: dict = {}
        for _ in range(120):
            seen = scraped()
            if seen and set(seen["up"].values()) == {"1"}:
                break
            time.sleep(1)
        targets = fleet.prometheus_get("targets").get("activeTargets", [])
        assert seen and set(seen["up"].values()) == {"1"}, (seen, [(t["scrapeUrl"], t["lastError"]) for t in targets])
        # the agent's own metrics and the box's unit states, per box
        for query in ("pacsgw_uplink_up", 'node_systemd_unit_state{name="pacsgw.service",state="active"}'):
            result = fleet.prometheus_get("query", query=query)["result"]
            assert sorted(r["metric"]["instance"].split(":")[0] for r in result) == [h.addr for h in fleet.hosts]
            assert {r["value"][1] for r in result} == {"1"}, (query, result)
        # the rules evaluate on the real series; the SMB alert is not raised for boxes that run no SMB
        assert all(r["health"] == "ok" for r in seen["rules"]), seen["rules"]
        smb = [a for r in seen["rules"] if r["name"] == "PacsgwSmbdDown" for a in r["alerts"]]
        assert smb == [], smb
    finally:
        fleet.stop_prometheus(prom)
    gw = fleet.hosts[0]
    for port in (9100, METRICS_PORT):   # the node exporter and the agent's metrics listener
        refused = run(fleet.nsexec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                                   str(fleet.workdir / "tls" / "ca.crt"), f"https://{gw.addr}:{port}/metrics"),
                      check=False)
        assert refused.stdout == "401", (port, refused)
        plain = run(fleet.nsexec("curl", "-s", "--max-time", "5", f"http://{gw.addr}:{port}/metrics"), check=False)
        assert "node_" not in plain.stdout and "pacsgw_" not in plain.stdout, port
    # the agent's status port (/healthz, /status, admin requests) is not open to the monitoring subnet
    status = run(fleet.nsexec("curl", "-s", "--max-time", "5", f"http://{gw.addr}:8080/healthz"), check=False)
    assert status.returncode != 0 and "status" not in status.stdout, status


def _wait_agent(fleet, host, seconds: int = 90) -> dict:
    """/healthz once the agent answers it (after `seconds`, whatever it said last)."""
    for _ in range(seconds):
        health = fleet.healthz(host)
        if "version" in health:
            break
        time.sleep(1)
    return health


def _firstboot_log(fleet, host) -> str:
    return fleet.ssh(host, "sudo journalctl -b -u pacsgw-firstboot --no-pager -o cat").stdout


def test_reboot_after_adoption_keeps_the_fleets_config(provisioned):
    """The seed on the config partition still holds the agent.toml typed at flashing time; the fleet has
    rendered its own since. A reboot (a power cut) must not put the old file back."""
    fleet = provisioned
    gw = fleet.hosts[0]
    fleet_conf = _conf(fleet, gw)
    assert 'prefix = "hospital-a/"' in fleet_conf and "seeded-" not in fleet_conf
    fleet.reboot(gw)
    assert _conf(fleet, gw) == fleet_conf
    assert "seed on /boot/pacsgw-config already applied" in _firstboot_log(fleet, gw)
    health = _wait_agent(fleet, gw)     # the agent comes up after SSH does
    assert health.get("version") == fleet.current_release(gw), health


def test_usb_seed_after_adoption_is_ignored_unless_signed(provisioned, tmp_path):
    """Whoever plugs in a stick labelled PACSGW-SEED and power-cycles an adopted box gets nothing: its SSH
    key and agent.toml (uploads to another bucket) are ignored, and the journal says so. A seed signed with
    the fleet's key (its public half is in /etc/pacsgw/seed-signers) is applied, except an agent.toml in it that
    fails the agent's configuration check: the installed one stays and the journal names the bad key."""
    fleet = provisioned
    gw = fleet.hosts[1]
    before = _conf(fleet, gw)
    keys_before = fleet.ssh(gw, "sudo cat ~pacsadmin/.ssh/authorized_keys").stdout
    usb = tmp_path / "usb"
    usb.mkdir()
    intruder = tmp_path / "intruder"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "intruder", "-f", str(intruder)])
    (usb / "authorized_keys").write_text(Path(f"{intruder}.pub").read_text())
    (usb / "agent.toml").write_text(before.replace('bucket = "pacs-hospital-b"', 'bucket = "elsewhere"'))
    (usb / "hostname").write_text("taken\n")
    fleet.reboot(gw, usb=usb)
    assert _conf(fleet, gw) == before
    assert fleet.ssh(gw, "sudo cat ~pacsadmin/.ssh/authorized_keys").stdout == keys_before
    assert fleet.ssh(gw, "hostname").stdout.strip() == gw.name
    journal = _firstboot_log(fleet, gw)
    assert "IGNORED the unsigned seed on /boot/pacsgw-seed" in journal, journal

    signed = tmp_path / "signed"
    signed.mkdir()
    (signed / "hostname").write_text(f"{gw.name}-resigned\n")
    (signed / "agent.toml").write_text(before.replace('bucket = "pacs-hospital-b"', 'bucket = "Pacs_Hospital_B"'))
    run(["bash", str(REPO / "image" / "mkseed.sh"), "--sign", str(fleet.seed_signer), "--dir", str(signed)])
    fleet.reboot(gw, usb=signed)
    journal = _firstboot_log(fleet, gw)
    assert "applying the seed on /boot/pacsgw-seed (signed by a fleet key)" in journal, journal
    assert "configuration error" in journal and "uplink.bucket" in journal, journal
    assert "ERROR: /boot/pacsgw-seed/agent.toml failed pacsgw check-config; keeping the installed configuration" \
        in journal, journal
    assert fleet.ssh(gw, "cat /etc/hostname").stdout.strip() == f"{gw.name}-resigned"
    assert fleet.ssh(gw, f"getent hosts {gw.name}-resigned; getent hosts {gw.name} || echo gone").stdout.split() \
        == ["127.0.1.1", f"{gw.name}-resigned", "gone"]
    assert _conf(fleet, gw) == before


def test_rolling_update_all_healthy(provisioned):
    fleet = provisioned
    p = fleet.playbook("update.yml", "-e", f"gateway_version={NEW}")
    _assert_ok(p)
    base = project_version()
    for h in fleet.hosts:
        assert fleet.current_release(h) == NEW
        health = fleet.healthz(h)
        assert health["version"] == NEW and health["status"] == "ok", health
        assert fleet.releases(h) == sorted([base, NEW])   # the old release stays beside the new one
    assert f"updated {base} -> {NEW}" in said(p)
    assert "catalog schema" not in said(p)    # the same schema: no catalog backup, no agent stop for it
    # The inventory still names the base release: a plain site.yml must not switch the boxes back.
    gw1 = fleet.hosts[0]
    p = fleet.playbook("site.yml", "--limit", gw1.name)
    _assert_ok(p)
    assert "site.yml keeps the running release" in said(p)
    assert fleet.current_release(gw1) == NEW and fleet.healthz(gw1)["version"] == NEW


def _all_on(fleet, release: str) -> None:
    """Every box on `release`: update.yml to it unless they all run it already (a test run on its own; in the
    module's order the test before left them there, and the run would only find nothing to do)."""
    if any(fleet.current_release(h) != release for h in fleet.hosts):
        _assert_ok(fleet.playbook("update.yml", "-e", f"gateway_version={release}"))


def test_update_check_mode_changes_nothing(provisioned):
    fleet = provisioned
    _all_on(fleet, NEW)
    p = fleet.playbook("update.yml", "--check", "-e", f"gateway_version={LAST}")
    _assert_ok(p)
    assert "did not drain" not in said(p), p.stdout[-5000:]
    assert f"would be updated {NEW} -> {LAST} (check mode; drained)" in said(p), p.stdout[-5000:]
    for h in fleet.hosts:
        assert fleet.current_release(h) == NEW and LAST not in fleet.releases(h)


def test_failed_install_restores_this_updates_config(provisioned):
    """The rescue restores the configuration this update replaced, not a .rollback left by an earlier
    update: here the new release's archive is missing, so the install fails before anything changes."""
    fleet = provisioned
    _all_on(fleet, NEW)
    gw1 = fleet.hosts[0]
    before = _conf(fleet, gw1)
    fleet.ssh(gw1, "sudo sh -c 'echo \"# an earlier update\" > /etc/pacsgw/agent.toml.rollback'")
    p = fleet.playbook("update.yml", "-e", "gateway_version=99.9.9")
    assert p.returncode != 0
    assert "ROLLOUT STOPPED: release 99.9.9 failed its health check on gw1" in said(p), p.stdout[-5000:]
    assert _conf(fleet, gw1) == before
    assert fleet.current_release(gw1) == NEW and fleet.healthz(gw1)["version"] == NEW


def test_failed_health_check_rolls_back_and_stops(provisioned):
    fleet = provisioned
    gw1, gw2, gw3 = fleet.hosts
    _all_on(fleet, NEW)
    p = fleet.playbook("update.yml", "-e", f"gateway_version={BROKEN}")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-6000:]
    assert "ROLLOUT STOPPED" in out and f"release {BROKEN} failed its health check on {gw2.name}" in out, out[-6000:]
    assert f"rolled back to {NEW}" in out
    # 1st box: stays on the new release, healthy.
    assert fleet.current_release(gw1) == BROKEN and fleet.healthz(gw1)["version"] == BROKEN
    # 2nd box: rolled back and healthy again on the previous release and configuration.
    assert fleet.current_release(gw2) == NEW
    health = fleet.healthz(gw2)
    assert health["version"] == NEW and health["status"] in ("ok", "degraded"), health
    assert BROKEN in fleet.releases(gw2)   # installed beside, not in use
    journal = fleet.ssh(gw2, "sudo journalctl -u pacsgw --no-pager -o cat").stdout
    assert "injected fault" in journal
    # 3rd box: untouched.
    assert fleet.current_release(gw3) == NEW and fleet.healthz(gw3)["version"] == NEW
    assert BROKEN not in fleet.releases(gw3)


def test_release_that_cannot_reach_s3_is_rolled_back_on_the_canary(provisioned):
    """Its agent starts and answers /healthz 200, but "degraded": the gate wants `ok` and a write/read round
    trip, so the canary is rolled back and no other box is touched. The release also has a newer catalog
    schema: the update backed the catalog up before starting it, and the rollback restores that backup
    (the release before refuses a catalog a newer schema has opened, so without it the box stays down)."""
    fleet = provisioned
    gw1, gw2, gw3 = fleet.hosts
    before = {h.name: fleet.current_release(h) for h in fleet.hosts}
    p = fleet.playbook("update.yml", "-e", f"gateway_version={NO_S3}")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-6000:]
    assert f"release {NO_S3} failed its health check on {gw1.name}" in out, out[-6000:]
    assert f"rolled back to {before[gw1.name]}" in out
    backup = f"/var/lib/pacsgw/cache/catalog-backups/catalog-before-{NO_S3}.sqlite"
    assert f"catalog restored from {backup}" in out, out[-6000:]
    assert fleet.ssh(gw1, f"sudo stat -c '%U %a' {backup}").stdout.strip() == "root 600"
    schema = fleet.ssh(gw1, "sudo python3 -c \"import sqlite3; print(sqlite3.connect("
                            "'file:/var/lib/pacsgw/cache/catalog.sqlite?mode=ro', uri=True)"
                            ".execute('PRAGMA user_version').fetchone()[0])\"").stdout.strip()
    assert schema == str(SCHEMA_VERSION), schema
    health = fleet.healthz(gw1)
    assert fleet.current_release(gw1) == before[gw1.name] and health["version"] == before[gw1.name], health
    for h in (gw2, gw3):
        assert fleet.current_release(h) == before[h.name] and NO_S3 not in fleet.releases(h)


# A PACS storing files over FTP, one connection per file as PACS systems do, retrying a connection the box
# refuses (its agent restarting). argv: stop-file, result-file, address... Every file it was told 226 for is
# listed in the result; any other reply to STOR is a PACS-visible error, listed too.
PACS_WRITER = r"""
import ftplib, io, json, os, sys, time
stop, result, addrs = sys.argv[1], sys.argv[2], sys.argv[3:]
acked, errors, n = [], [], 0
while not os.path.exists(stop):
    for addr in addrs:
        n += 1
        name = f"rot-{addr.split('.')[-1]}-{n}.dcm"
        data = b"DICM" + name.encode() * 512
        try:
            f = ftplib.FTP()
            f.connect(addr, 2121, timeout=20)
            f.login("pacs", "pacs-fleet-test")
        except (OSError, EOFError, ftplib.error_temp):
            continue   # the box is not taking connections (agent restarting): the PACS tries again later
        try:
            f.storbinary(f"STOR {name}", io.BytesIO(data))
            acked.append([addr, name, len(data)])
        except ftplib.error_temp as e:
            if not str(e).startswith("421"):
                errors.append([addr, name, str(e)])
            # 421: the agent is restarting (an idle session at the end of its drain); nothing was
            # acknowledged, and the PACS stores the file again later, like a refused connection above
        except (ftplib.error_perm, ftplib.error_reply) as e:
            errors.append([addr, name, str(e)])
        except (OSError, EOFError) as e:
            errors.append([addr, name, f"{type(e).__name__}: {e}"])
        finally:
            f.close()
    time.sleep(0.2)
json.dump({"acked": acked, "errors": errors}, open(result, "w"))
"""


def test_key_rotation_rolls_out_with_no_pacs_visible_error(provisioned, tmp_path):
    """New S3 keys as a configuration-only rolling update (canary, batches, the same gate) while a PACS
    keeps writing to every box: no transfer fails, and every acknowledged file reaches the bucket."""
    fleet = provisioned
    # Each box stays on the release it runs (the tests before leave them on different ones, all healthy): named
    # per box, so the key change is configuration only everywhere, without a release rollout first.
    running = {h.name: fleet.current_release(h) for h in fleet.hosts}
    host_vars = fleet.workdir / "inventory" / "host_vars"
    host_vars.mkdir(exist_ok=True)
    for h in fleet.hosts:
        (host_vars / f"{h.name}.yml").write_text(json.dumps({"gateway_version": running[h.name]}))
    old = fleet.s3_key
    new = ("FLEETROTATEDKEY", "FLEETROTATEDSECRET0123456789")   # test-only
    fleet.restart_s3(old, new)          # the provider issues the new key beside the old one
    stop, result = tmp_path / "stop", tmp_path / "result.json"
    writer = subprocess.Popen(fleet.nsexec(sys.executable, "-c", PACS_WRITER, str(stop), str(result),
                                           *[h.addr for h in fleet.hosts]))
    try:
        p = fleet.playbook("update.yml", "-e", f"gateway_uplink_access_key_id={new[0]}",
                           "-e", f"gateway_uplink_secret_access_key={new[1]}")
        _assert_ok(p)
        time.sleep(3)
    finally:
        stop.touch()
        writer.wait(timeout=120)
        for h in fleet.hosts:
            (host_vars / f"{h.name}.yml").unlink()
    for h in fleet.hosts:
        assert f"{h.name}: configuration updated on {running[h.name]}" in said(p), p.stdout[-5000:]
        assert fleet.current_release(h) == running[h.name]
        assert new[0] in _conf(fleet, h) and old[0] not in _conf(fleet, h)
    fleet.restart_s3(new)               # the old key is revoked
    fleet.s3_key = new                  # and the fleet's inventory names the new one, as an admin's would:
    fleet.write_inventory()             # later rollouts render it (the old key would get 403 from now on)
    report = json.loads(result.read_text())
    assert report["errors"] == [], report["errors"]
    assert len(report["acked"]) >= 3, report
    for h in fleet.hosts:               # what was acknowledged locally during S3's restarts drains now
        for _ in range(60):
            health = fleet.healthz(h)
            if health.get("queue_depth") == 0:
                break
            time.sleep(1)
        assert health.get("queue_depth") == 0 and health["uplink"]["reachable"], (h.name, health)
    by_addr = {h.addr: h for h in fleet.hosts}
    for addr, name, size in report["acked"]:
        slug = by_addr[addr].group.replace("_", "-")
        stored = fleet.workdir / "s3" / f"pacs-{slug}" / slug / name
        assert stored.is_file() and stored.stat().st_size == size, (addr, name)


def test_unreachable_box_is_listed_and_a_box_that_does_not_drain_is_skipped(provisioned):
    """One rollout with two boxes it cannot update: gw2 does not answer (its link is down): it is listed in the
    summary and left, and the rollout goes on past it. gw3's upload queue does not empty (its object store is
    unreachable and it holds a file that is not in S3 yet): it is skipped after the drain timeout. The canary
    is updated. The reboot window after security updates likewise leaves gw3 and reboots a drained box, and
    reflash.yml refuses to mark gw3 ready for re-flashing."""
    fleet = provisioned
    gw1, gw2, gw3 = fleet.hosts
    before = {h.name: fleet.current_release(h) for h in fleet.hosts}
    running = before[gw3.name]
    host_vars = fleet.workdir / "inventory" / "host_vars"
    host_vars.mkdir(exist_ok=True)
    (host_vars / f"{gw3.name}.yml").write_text(json.dumps({
        "gateway_uplink_endpoint_url": "http://10.251.0.1:9",   # nothing listens there
        "gateway_uplink_write_mode": "back",
    }))
    _assert_ok(fleet.playbook("site.yml", "--limit", gw3.name))   # keeps the running release
    # A PACS stores a file over FTP: acknowledged from the SSD, queued for an upload that cannot happen.
    script = (
        "import ftplib, io; f = ftplib.FTP(); f.connect('%s', 2121, timeout=20); f.login('pacs', 'pacs-fleet-test');"
        "f.storbinary('STOR drain-test.dcm', io.BytesIO(b'DICM' * 1024)); f.quit()" % gw3.addr)
    run(fleet.nsexec(sys.executable, "-c", script), timeout=120)
    assert fleet.healthz(gw3)["queue_depth"] >= 1
    link = f"v{fleet.tag}2"     # gw2's cable, on the controller's bridge
    run(fleet.nsexec("ip", "link", "set", link, "down"))
    try:
        p = fleet.playbook("update.yml", "-e", f"gateway_version={LAST}", "-e", "pacsgw_drain_timeout=6",
                           timeout=600)
    finally:
        run(fleet.nsexec("ip", "link", "set", link, "up"))
    _assert_ok(p)               # neither the unreachable box nor the skipped one fails the rollout
    summary = said(p).split("Rollout summary")[-1]
    assert f"{gw2.name}: UNREACHABLE" in summary and "left for the next run" in summary, p.stdout[-6000:]
    assert f"{gw3.name}: SKIPPED: upload queue did not drain within 6 s" in summary, summary
    assert f"{gw1.name}: updated {before[gw1.name]} -> {LAST}" in summary, summary
    assert fleet.current_release(gw1) == LAST and fleet.healthz(gw1)["version"] == LAST
    fleet.wait_ssh(gw2)
    assert fleet.current_release(gw2) == before[gw2.name] and LAST not in fleet.releases(gw2)
    assert fleet.healthz(gw2)["version"] == before[gw2.name]
    assert fleet.current_release(gw3) == running and LAST not in fleet.releases(gw3)
    assert fleet.healthz(gw3)["queue_depth"] >= 1      # nothing lost, still waiting for its S3

    # The reboot window after security updates (unattended-upgrades left /run/reboot-required): gw3 still
    # holds a file not in S3, so it waits for the next window; gw1 has drained: agent stopped, then reboot.
    p = fleet.ssh(gw3, "sudo touch /run/reboot-required && sudo systemctl start pacsgw-drain-reboot.service && "
                       "sudo journalctl -u pacsgw-drain-reboot --no-pager -o cat", timeout=120)
    assert "reboot postponed to the next window: the upload queue did not drain within 6 s" in said(p), p.stdout
    assert fleet.healthz(gw3)["queue_depth"] >= 1

    # Nor may that box be re-flashed: reflash.yml refuses it, its agent keeps running and nothing marks it ready.
    p = fleet.playbook("reflash.yml", "-l", gw3.name, "-e", "pacsgw_drain_timeout=6")
    assert p.returncode != 0 and "NOT READY: the upload queue did not drain within 6 s" in said(p), p.stdout[-3000:]
    state = fleet.ssh(gw3, "systemctl is-active pacsgw; sudo test -e /etc/pacsgw/reflash-ready && echo marked",
                      check=False).stdout.split()
    assert state == ["active"], state
    assert fleet.healthz(gw3)["queue_depth"] >= 1
    assert "pacsgw-drain-reboot.timer" in fleet.ssh(gw1, "systemctl list-timers --no-pager").stdout
    boot = fleet.ssh(gw1, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    fleet.ssh(gw1, "sudo touch /run/reboot-required && sudo systemctl start --no-block pacsgw-drain-reboot.service")
    assert gw1.proc.wait(timeout=180) == 133      # systemd-nspawn's exit status for a reboot inside
    fleet.power_on(gw1)
    assert fleet.ssh(gw1, "cat /proc/sys/kernel/random/boot_id").stdout.strip() != boot
    journal = fleet.ssh(gw1, "sudo journalctl -b -1 -u pacsgw-drain-reboot -u pacsgw --no-pager -o cat").stdout
    drained = journal.index("upload queue drained; stopping the agent (no new stores) before the reboot")
    assert journal.index('"stopped"', drained) < journal.index("rebooting for the installed updates", drained)
    for _ in range(90):                 # the agent comes up after SSH does
        if fleet.healthz(gw1).get("version") == LAST:
            break
        time.sleep(1)
    assert fleet.healthz(gw1)["version"] == LAST


def test_push_model_reaches_every_box(provisioned, tmp_path):
    fleet = provisioned
    # Without models_file: the model this repository ships.
    _assert_ok(fleet.playbook("push-model.yml"))
    shipped_version = json.loads((REPO / "models" / "hotness.card.json").read_text())["version"]
    assert fleet.healthz(fleet.hosts[0])["model"]["version"] == shipped_version
    version = f"fleet-test-{uuid.uuid4().hex[:8]}"
    shipped = REPO / "models" / "hotness.tflite"
    model = tmp_path / "hotness.tflite"
    if shipped.is_file():
        shutil.copy(shipped, model)
        card = json.loads((REPO / "models" / "hotness.card.json").read_text())
    else:  # the model issue has not landed yet: any bytes do, the agent reads the card's version
        model.write_bytes(b"TFL3" + uuid.uuid4().bytes * 64)
        card = {}
    card["version"] = version
    (tmp_path / "hotness.card.json").write_text(json.dumps(card))
    p = fleet.playbook("push-model.yml", "-e", f"models_file={model}")
    _assert_ok(p)
    for h in fleet.hosts:
        health = fleet.healthz(h)
        assert health["model"]["version"] == version, (h.name, health.get("model"))
        assert health["model"]["path"] == "/var/lib/pacsgw/models/hotness.tflite"
        same = fleet.ssh(h, "sudo sha256sum /var/lib/pacsgw/models/hotness.tflite").stdout.split()[0]
        import hashlib
        assert same == hashlib.sha256(model.read_bytes()).hexdigest()


def test_reflash_drains_first_and_stops_the_agent(provisioned):
    """reflash.yml runs on one box named with -l only; there it waits for an empty upload queue, stops the
    agent, finds nothing waiting for object storage in the stopped agent's catalog and marks the box ready
    for re-flashing. The other boxes keep serving."""
    fleet = provisioned
    gw, others = fleet.hosts[0], fleet.hosts[1:]
    p = fleet.playbook("reflash.yml")
    assert p.returncode != 0 and "re-flash one box at a time" in said(p), p.stdout[-3000:]
    assert fleet.ssh(gw, "systemctl is-active pacsgw", check=False).stdout.strip() == "active"
    try:
        p = fleet.playbook("reflash.yml", "-l", gw.name)
        _assert_ok(p)
        assert f"READY: {gw.name} is drained" in said(p), p.stdout[-3000:]
        state = fleet.ssh(gw, "systemctl is-active pacsgw; sudo test -e /etc/pacsgw/reflash-ready && echo marked",
                          check=False).stdout.split()
        assert state == ["inactive", "marked"], state
        assert [fleet.ssh(h, "systemctl is-active pacsgw", check=False).stdout.strip() for h in others] \
            == ["active"] * len(others)
    finally:   # not re-flashed here: the box goes back to serving
        fleet.ssh(gw, "sudo rm -f /etc/pacsgw/reflash-ready; sudo systemctl start pacsgw", check=False)
        for _ in range(90):
            if fleet.healthz(gw).get("status") in ("ok", "degraded"):
                break
            time.sleep(1)
