"""The fleet playbooks over SSH against three booted appliance containers, one per hospital, each in a
network namespace of its own with its own sshd and agent (systemd-nspawn on the image tree):

- site.yml provisions all three (agent.toml from inventory, agent healthy), hospital B's with SMB;
- a file written over SMB to hospital B's box lands in hospital B's bucket;
- update.yml rolls a healthy release out to all three, one box per batch;
- update.yml with a release that fails its health check on the second box: that box is rolled back,
  the first keeps the new release, the third is untouched, and the play fails saying so;
- push-model.yml delivers a model to every box and each agent reports its version on /healthz.

The tests run in order and share the fleet: each starts from the state the previous one left.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid

import pytest
from fleetlib import (
    REPO,
    SMB_PASSWORD,
    Fleet,
    break_for_hospital_b,
    build_variant_release,
    log,
    project_version,
    run,
)

pytestmark = pytest.mark.timeout(2400)

NEW = "99.0.1"       # a healthy new release (test-only version number)
BROKEN = "99.0.2"    # a release that cannot start on hospital B's configuration
NEXT = "99.0.3"      # another healthy release, for the drain test


@pytest.fixture(scope="module")
def fleet(appliance, base_release, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    releases = work / "releases"
    releases.mkdir()
    shutil.copy(base_release, releases / base_release.name)
    build_variant_release(base_release, releases, NEW)
    build_variant_release(base_release, releases, BROKEN, patch=break_for_hospital_b)
    build_variant_release(base_release, releases, NEXT)
    f = Fleet(rootfs=appliance / "rootfs", workdir=work, groups=["hospital_a", "hospital_b", "hospital_c"])
    try:
        f.start()
        log("fleet up: " + ", ".join(f"{h.name}={h.addr} ({h.group})" for h in f.hosts))
        yield f
    finally:
        f.stop()


def _assert_ok(p):
    assert p.returncode == 0, p.stdout[-8000:] + p.stderr[-3000:]


def test_site_provisions_every_box(fleet):
    _assert_ok(fleet.playbook("site.yml"))
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
        assert "table inet pacsgw" in fleet.ssh(h, "sudo nft list ruleset").stdout
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


def test_smb_write_reaches_the_hospitals_bucket(fleet):
    """A PACS on the hospital network writes over SMB to hospital B's box: the file goes through the agent
    into that hospital's S3 bucket (and its audit trail, under the SMB user's name) and reads back."""
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


def test_rolling_update_all_healthy(fleet):
    p = fleet.playbook("update.yml", "-e", f"gateway_version={NEW}")
    _assert_ok(p)
    base = project_version()
    for h in fleet.hosts:
        assert fleet.current_release(h) == NEW
        assert fleet.healthz(h)["version"] == NEW
        assert fleet.releases(h) == sorted([base, NEW])   # the old release stays beside the new one
    assert f"updated {base} -> {NEW}" in p.stdout


def test_failed_health_check_rolls_back_and_stops(fleet):
    gw1, gw2, gw3 = fleet.hosts
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


def test_box_that_does_not_drain_is_skipped(fleet):
    """A box whose upload queue does not empty (its object store is unreachable and it holds a file that
    is not in S3 yet) is skipped after the drain timeout; the rollout goes on to the other boxes."""
    gw1, gw2, gw3 = fleet.hosts
    host_vars = fleet.workdir / "inventory" / "host_vars"
    host_vars.mkdir(exist_ok=True)
    (host_vars / f"{gw3.name}.yml").write_text(json.dumps({
        "gateway_uplink_endpoint_url": "http://10.251.0.1:9",   # nothing listens there
        "gateway_uplink_write_mode": "back",
    }))
    _assert_ok(fleet.playbook("site.yml", "--limit", gw3.name, "-e", f"gateway_version={NEW}"))
    # A PACS stores a file over FTP: acknowledged from the SSD, queued for an upload that cannot happen.
    script = (
        "import ftplib, io; f = ftplib.FTP(); f.connect('%s', 2121, timeout=20); f.login('pacs', 'pacs-fleet-test');"
        "f.storbinary('STOR drain-test.dcm', io.BytesIO(b'DICM' * 1024)); f.quit()" % gw3.addr)
    run(fleet.nsexec(sys.executable, "-c", script), timeout=120)
    assert fleet.healthz(gw3)["queue_depth"] >= 1
    p = fleet.playbook("update.yml", "-e", f"gateway_version={NEXT}", "-e", "pacsgw_drain_timeout=6")
    _assert_ok(p)
    assert f"{gw3.name}: SKIPPED: upload queue did not drain within 6 s" in p.stdout, p.stdout[-5000:]
    assert fleet.current_release(gw1) == NEXT and fleet.healthz(gw1)["version"] == NEXT
    assert fleet.current_release(gw2) == NEXT and fleet.healthz(gw2)["version"] == NEXT
    assert fleet.current_release(gw3) == NEW and NEXT not in fleet.releases(gw3)
    assert fleet.healthz(gw3)["queue_depth"] >= 1      # nothing lost, still waiting for its S3


def test_push_model_reaches_every_box(fleet, tmp_path):
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
