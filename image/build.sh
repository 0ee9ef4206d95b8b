#!/usr/bin/env bash
# Build the pacsgw appliance disk image: Debian bookworm by mmdebstrap, provisioned by ansible/site.yml
# (the fleet's own roles) through the chroot connection, then a GPT disk with systemd-boot (UEFI).
#
#   image/build.sh [--out DIR] [--release TAR] [--rootfs-only] [--no-kernel] [--no-compress] [--mirror URL]
#
# Output (default build/image/): rootfs/ (the provisioned tree), pacsgw.raw and pacsgw.qcow2.
# Partitions: 1 ESP (FAT32, PACSGW-ESP: systemd-boot, kernels, initrds), 2 config (FAT, PACSGW-CFG: the
# hospital's agent.toml and network settings, see docs/fleet.md), 3 root (ext4, pacsgw-root, a fixed 4 GiB),
# 4 cache (ext4, pacsgw-cache: the catalog and the cached files; grows to fill the disk on first boot and
# survives a re-flash of partitions 1 and 3 by image/reflash-system.sh). Needs root (mmdebstrap, chroot); no
# loop devices or mounts of images.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/build/image"
release=""
rootfs_only=0
kernel=1
compress=1
mirror=""
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --release) release="$2"; shift 2 ;;
    --rootfs-only) rootfs_only=1; shift ;;
    --no-kernel) kernel=0; shift ;;
    --no-compress) compress=0; shift ;;
    --mirror) mirror="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
venv_bin="${PACSGW_VENV_BIN:-$repo/.venv/bin}"
export PATH="$venv_bin:$PATH"
if [[ -z "$mirror" ]]; then
  mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  [[ -n "$mirror" ]] || mirror="$(awk '$1=="deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  [[ -n "$mirror" ]] || mirror="http://deb.debian.org/debian"
fi
t0=$SECONDS
step() { echo "==> [$((SECONDS - t0)) s] $*"; }

mkdir -p "$out"
rootfs="$out/rootfs"

# --- the agent release (a wheelhouse the box installs with pip --no-index) ----------------------
if [[ -z "$release" ]]; then
  step "building the agent release"
  release="$(PYTHON="$venv_bin/python" "$repo/image/build-release.sh" "$repo" "$out/releases" | tail -1)"
fi
release="$(cd "$(dirname "$release")" && pwd)/$(basename "$release")"
version="$(basename "$release" .tar)"; version="${version#pacsgw-}"

# --- mmdebstrap --------------------------------------------------------------------------------
mounted=()
cleanup() {
  local m
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  rm -f "$rootfs/usr/sbin/policy-rc.d" "$rootfs/etc/dpkg/dpkg.cfg.d/pacsgw-build-unsafe-io"
}
trap cleanup EXIT
rm -rf "$rootfs"
# mmdebstrap: the package set of `debootstrap --variant=minbase` (Priority: required + apt; merged /usr as
# debootstrap makes it, so usr-is-merged and not usrmerge with perl), installed by apt in one go without an
# fsync per file: 41-60 s here where debootstrap took 80-103 s (load 6-7).
command -v mmdebstrap >/dev/null || { echo "build.sh needs mmdebstrap: apt-get install -y mmdebstrap" >&2; exit 1; }
step "mmdebstrap bookworm from $mirror"
mmdebstrap --variant=minbase --include=python3,ca-certificates --dpkgopt=force-unsafe-io \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr bookworm "$rootfs" "$mirror" \
  > "$out/mmdebstrap.log" 2>&1 || { tail -20 "$out/mmdebstrap.log"; exit 1; }
rm -f "$rootfs/etc/dpkg/dpkg.cfg.d/99mmdebstrap"   # its --dpkgopt: the unsafe-io below is removed before shipping
# apt in the chroot needs the build machine's resolver (removed again when the tree is cleaned)
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
security="$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -m1 security || true)"
{
  echo "deb $mirror bookworm main"
  echo "deb $mirror bookworm-updates main"
  [[ -n "$security" ]] && echo "deb $security bookworm-security main"
} > "$rootfs/etc/apt/sources.list"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"; chmod +x "$rootfs/usr/sbin/policy-rc.d"
# No fsync per unpacked file while the tree is built (a build cut short is built again): removed before the
# tree is cleaned, so the boxes' own dpkg syncs as usual.
unsafe_io="$rootfs/etc/dpkg/dpkg.cfg.d/pacsgw-build-unsafe-io"
echo force-unsafe-io > "$unsafe_io"
for m in proc sys dev dev/pts; do
  case $m in
    proc) mount -t proc proc "$rootfs/proc" ;;
    sys) mount -t sysfs sys "$rootfs/sys" ;;
    dev) mount --bind /dev "$rootfs/dev" ;;
    dev/pts) mount -t devpts devpts "$rootfs/dev/pts" ;;
  esac
  mounted+=("$rootfs/$m")
done

# --- the fleet roles through the chroot connection ------------------------------------------------
step "ansible: site.yml + appliance extras (chroot)"
export ANSIBLE_HOME="$out/.ansible" ANSIBLE_SSH_CONTROL_PATH_DIR="$out/.ansible/cp" ANSIBLE_LOCAL_TEMP="$out/.ansible/tmp"
export ANSIBLE_CONFIG="$repo/ansible/ansible.cfg" ANSIBLE_ROLES_PATH="$repo/ansible/roles"
ansible-playbook -i "$repo/image/inventory.yml" "$repo/image/image.yml" \
  -e "pacsgw_rootfs=$rootfs" -e "pacsgw_release_version=$version" -e "pacsgw_release_dir=$(dirname "$release")" \
  -e "image_kernel=$([[ $kernel == 1 ]] && echo true || echo false)" > "$out/ansible.log" 2>&1 \
  || { tail -40 "$out/ansible.log"; exit 1; }
grep -E '^(PLAY RECAP|appliance)' "$out/ansible.log" | tail -1

# --- clean what must differ per box or not ship -----------------------------------------------
step "cleaning the tree"
for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[i]}"; done
mounted=()
rm -f "$rootfs/usr/sbin/policy-rc.d" "$unsafe_io" "$rootfs"/etc/ssh/ssh_host_* "$rootfs/etc/resolv.conf"
: > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/root/.ansible "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
mkdir -p "$rootfs/usr/share/doc/pacsgw"
cp "$repo/docs/fleet.md" "$rootfs/usr/share/doc/pacsgw/" 2>/dev/null || true
echo "$version" > "$rootfs/etc/pacsgw/image-release"
step "rootfs ready: $rootfs ($(du -sh "$rootfs" | cut -f1))"
((rootfs_only)) && exit 0

# --- disk: ESP + config + root + cache, GPT ------------------------------------------------------
kver="$(ls "$rootfs/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)"
[[ -n "$kver" ]] || { echo "no kernel in $rootfs/boot (built with --no-kernel?)" >&2; exit 1; }
work="$out/parts"; rm -rf "$work"; mkdir -p "$work/esp" "$work/cfg/network"
step "assembling the disk (kernel $kver)"
# The ESP is filled by the same script that the kernel hooks run on the box.
sh "$repo/image/firstboot/pacsgw-esp-update" --root "$rootfs" --esp "$work/esp"
cp "$repo/image/config-partition/README.txt" "$work/cfg/README.txt"
cp "$repo/image/config-partition/agent.toml.example" "$work/cfg/agent.toml.example"
cp "$repo/image/config-partition/10-static.network.example" "$work/cfg/network/10-static.network.example"
cp "$repo/image/config-partition/pacs-subnets.example" "$work/cfg/pacs-subnets.example"

# Fixed sizes for the ESP, config and root partitions: a later image's ESP and root are written over them
# (image/reflash-system.sh) and the cache partition after them stays. The root file system is smaller than its
# partition and grows into it at first boot (x-systemd.growfs); the cache partition grows over the disk
# (systemd-repart, /etc/repart.d/60-cache.conf).
esp_mb=256; cfg_mb=16; root_part_mb=${PACSGW_ROOT_PART_MB:-4096}; cache_mb=64
root_mb=$(( $(du -sm "$rootfs" | cut -f1) * 13 / 10 + 256 ))
((root_mb <= root_part_mb)) || { echo "the root file system ($root_mb MiB) does not fit its partition ($root_part_mb MiB)" >&2; exit 1; }
rm -f "$work"/*.img
mkfs.vfat -C -F 32 -n PACSGW-ESP "$work/esp.img" $((esp_mb * 1024)) >/dev/null
mcopy -s -i "$work/esp.img" "$work/esp"/* ::
mkfs.vfat -C -n PACSGW-CFG "$work/cfg.img" $((cfg_mb * 1024)) >/dev/null
mcopy -s -i "$work/cfg.img" "$work/cfg/README.txt" "$work/cfg/agent.toml.example" "$work/cfg/pacs-subnets.example" \
  "$work/cfg/network" ::
mkfs.ext4 -q -F -L pacsgw-root -d "$rootfs" "$work/root.img" "${root_mb}M"
owner="$(awk -F: '$1 == "pacsgw" {print $3 ":" $4}' "$rootfs/etc/passwd")"
[[ -n "$owner" ]] || { echo "no pacsgw user in $rootfs" >&2; exit 1; }
mkfs.ext4 -q -F -L pacsgw-cache -E "root_owner=$owner" "$work/cache.img" "${cache_mb}M"

raw="$out/pacsgw.raw"
total_mb=$((1 + esp_mb + cfg_mb + root_part_mb + cache_mb + 1))
rm -f "$raw"; truncate -s "${total_mb}M" "$raw"
sfdisk -q "$raw" <<EOS
label: gpt
start=2048, size=$((esp_mb * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
size=$((cfg_mb * 2048)), type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=pacsgw-config
size=$((root_part_mb * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root
size=$((cache_mb * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=pacsgw-cache
EOS
dd if="$work/esp.img" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/cfg.img" of="$raw" bs=1M seek=$((1 + esp_mb)) conv=notrunc,sparse status=none
dd if="$work/root.img" of="$raw" bs=1M seek=$((1 + esp_mb + cfg_mb)) conv=notrunc,sparse status=none
dd if="$work/cache.img" of="$raw" bs=1M seek=$((1 + esp_mb + cfg_mb + root_part_mb)) conv=notrunc,sparse status=none
rm -rf "$work"
step "qcow2"
qemu-img convert -O qcow2 $([[ $compress == 1 ]] && echo -c) "$raw" "$out/pacsgw.qcow2"
step "done: $raw ($(du -h "$raw" | cut -f1) used of ${total_mb} MiB), $out/pacsgw.qcow2 ($(du -h "$out/pacsgw.qcow2" | cut -f1))"
