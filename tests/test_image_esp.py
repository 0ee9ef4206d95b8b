"""image/firstboot/pacsgw-esp-update, the kernel and initramfs hooks' script, on a tree of fake kernels: the newest
two kernels with an initrd go to the ESP with a loader entry each, the newest the default; a kernel whose initrd
is not built yet waits for the initramfs hook; older kernels leave the ESP only once the new files are there.
(That a real kernel package reaches the ESP this way and boots: tests/ansible/test_image_boot.py, opt-in.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "image" / "firstboot" / "pacsgw-esp-update"


def _update(root: Path, esp: Path) -> str:
    p = subprocess.run(["sh", str(SCRIPT), "--root", str(root), "--esp", str(esp)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stderr


def _kernel(root: Path, version: str, initrd: bool = True) -> None:
    (root / "boot" / f"vmlinuz-{version}").write_text(f"kernel {version}")
    if initrd:
        (root / "boot" / f"initrd.img-{version}").write_text(f"initrd {version}")


def test_kernels_reach_the_esp_newest_first(tmp_path):
    root, esp = tmp_path / "root", tmp_path / "esp"
    (root / "boot").mkdir(parents=True)
    (root / "usr/lib/systemd/boot/efi").mkdir(parents=True)
    (root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi").write_text("systemd-boot 252")
    for v in ("6.1.0-9-amd64", "6.1.0-57-amd64"):
        _kernel(root, v)
    _update(root, esp)
    assert sorted(p.name for p in (esp / "loader/entries").iterdir()) == [
        "pacsgw-6.1.0-57-amd64.conf", "pacsgw-6.1.0-9-amd64.conf"]
    assert (esp / "loader/loader.conf").read_text().startswith("default pacsgw-6.1.0-57-amd64.conf\n")
    entry = (esp / "loader/entries/pacsgw-6.1.0-57-amd64.conf").read_text()
    assert "linux   /pacsgw/6.1.0-57-amd64/vmlinuz\ninitrd  /pacsgw/6.1.0-57-amd64/initrd.img\n" in entry
    assert (esp / "pacsgw/6.1.0-57-amd64/vmlinuz").read_text() == "kernel 6.1.0-57-amd64"
    assert (esp / "EFI/BOOT/BOOTX64.EFI").read_text() == "systemd-boot 252"
    assert "wrote" not in _update(root, esp)          # nothing differs: nothing written

    # a newer kernel whose initrd Debian builds later (dpkg trigger): nothing changes until it is there
    _kernel(root, "6.12.95+deb12-amd64", initrd=False)
    assert "6.12.95+deb12-amd64 has no initrd yet" in _update(root, esp)
    assert (esp / "loader/loader.conf").read_text().startswith("default pacsgw-6.1.0-57-amd64.conf\n")
    (root / "boot/initrd.img-6.12.95+deb12-amd64").write_text("initrd new")
    (root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi").write_text("systemd-boot 252.1")
    log = _update(root, esp)
    assert (esp / "loader/loader.conf").read_text().startswith("default pacsgw-6.12.95+deb12-amd64.conf\n")
    assert sorted(p.name for p in (esp / "pacsgw").iterdir()) == ["6.1.0-57-amd64", "6.12.95+deb12-amd64"]
    assert not (esp / "loader/entries/pacsgw-6.1.0-9-amd64.conf").exists()
    assert (esp / "EFI/BOOT/BOOTX64.EFI").read_text() == "systemd-boot 252.1"
    assert log.index("wrote") < log.index("removed kernel 6.1.0-9-amd64")
    assert not list(esp.rglob("*.new"))
