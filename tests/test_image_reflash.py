"""image/reflash-system.sh on small disk files: it writes the image's ESP and root file system over the box's
partitions 1 and 3 and leaves the partition table, the config partition and the cache partition (the catalog and
the queue) as they were; it refuses a disk without the cache partition and an image that does not fit. (A real
re-flash of the built image, booted under qemu, which then uploads its queue: tests/ansible/test_image_boot.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "image" / "reflash-system.sh"
MiB = 1024 * 1024


def _disk(path: Path, parts: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """A GPT disk file with these (name, MiB) partitions: → {name: (offset, size)} in bytes."""
    path.write_bytes(b"")
    os.truncate(path, (sum(size for _, size in parts) + 2) * MiB)
    table = "label: gpt\n" + "".join(f"size={size}MiB, name={name}\n" for name, size in parts)
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    out, offset = {}, MiB
    for name, size in parts:
        out[name] = (offset, size * MiB)
        offset += size * MiB
    return out


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _reflash(image: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(image), str(target)], capture_output=True, text=True, timeout=60)


def test_writes_esp_and_root_and_keeps_config_and_cache(tmp_path):
    image, disk = tmp_path / "pacsgw.raw", tmp_path / "disk.raw"
    layout = [("esp", 2), ("pacsgw-config", 1), ("root", 16), ("pacsgw-cache", 2)]
    img = _disk(image, layout)
    fs = tmp_path / "root.img"                      # an 8 MiB ext4 in its 16 MiB partition, as build.sh makes it
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pacsgw-root", str(fs), "8M"], check=True)
    _write(image, img["root"][0], fs.read_bytes())
    _write(image, img["esp"][0], b"NEW-ESP" * 1000)
    _write(image, img["pacsgw-cache"][0], b"EMPTY-CACHE")
    tgt = _disk(disk, [*layout[:3], ("pacsgw-cache", 6)])   # the box's cache partition grew over its disk
    for name, (offset, size) in tgt.items():
        _write(disk, offset, name.encode().ljust(16, b"-") * (size // 16))
    table = _read(disk, 0, MiB)
    p = _reflash(image, disk)
    assert p.returncode == 0, p.stderr
    assert _read(disk, tgt["esp"][0], 2 * MiB) == _read(image, img["esp"][0], 2 * MiB)
    assert _read(disk, tgt["root"][0], 8 * MiB) == fs.read_bytes()
    for name in ("pacsgw-config", "pacsgw-cache"):
        offset, size = tgt[name]
        assert _read(disk, offset, size) == name.encode().ljust(16, b"-") * (size // 16), name
    assert _read(disk, 0, MiB) == table


def test_refuses_other_disks_and_images_that_do_not_fit(tmp_path):
    image, disk = tmp_path / "pacsgw.raw", tmp_path / "disk.raw"
    img = _disk(image, [("esp", 2), ("pacsgw-config", 1), ("root", 16), ("pacsgw-cache", 2)])
    fs = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs), "8M"], check=True)
    _write(image, img["root"][0], fs.read_bytes())
    # a box flashed before the cache had its own partition: whole-disk flash after the drain
    _disk(disk, [("esp", 2), ("pacsgw-config", 1), ("root", 20)])
    before = disk.read_bytes()
    p = _reflash(image, disk)
    assert p.returncode != 0 and "not a pacsgw disk with a cache partition" in p.stderr, p.stderr
    assert "reflash.yml" in p.stderr and disk.read_bytes() == before
    # the image's root file system is larger than the box's root partition
    _disk(disk, [("esp", 2), ("pacsgw-config", 1), ("root", 4), ("pacsgw-cache", 8)])
    before = disk.read_bytes()
    p = _reflash(image, disk)
    assert p.returncode != 0 and "larger than" in p.stderr and "root partition" in p.stderr, p.stderr
    assert disk.read_bytes() == before
    # not an image: no ext4 in its root partition
    _write(image, img["root"][0], b"\0" * 4096)
    _disk(disk, [("esp", 2), ("pacsgw-config", 1), ("root", 16), ("pacsgw-cache", 2)])
    p = _reflash(image, disk)
    assert p.returncode != 0 and "no ext4 file system" in p.stderr, p.stderr
