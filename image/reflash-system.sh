#!/usr/bin/env bash
# Re-flash a pacsgw box's system partitions from a new image: the ESP (kernels, systemd-boot) and the root file
# system are written; the config partition (the hospital's settings) and the cache partition (the catalog and
# every file not yet in object storage) are left as they are, and the agent uploads that queue when it starts.
#
#   image/reflash-system.sh IMAGE.raw TARGET     TARGET: the box's disk (/dev/sdX, from a live USB or another
#                                                PC, never the running box) or a disk image file
#
# The partition table is not touched. It refuses a TARGET that is not a pacsgw disk with a cache partition (a box
# flashed before the cache had its own partition: run `ansible-playbook reflash.yml -l BOX` and flash the whole
# image), a TARGET with a partition mounted, and an image whose ESP or root does not fit the box's partitions.
set -euo pipefail
die() { echo "reflash-system: $*" >&2; exit 1; }
(($# == 2)) || die "usage: $0 IMAGE.raw TARGET"
image=$1 target=$2
[[ -f $image ]] || die "$image: no such image"
[[ -e $target ]] || die "$target: no such disk"
LAYOUT="esp pacsgw-config root pacsgw-cache"

# parts DISK → one "start_bytes size_bytes name" line per partition, in table order
parts() {
  local dump sector
  dump=$(sfdisk -d "$1") || die "$1: no partition table"
  sector=$(sed -n 's/^sector-size: *\([0-9]*\)/\1/p' <<<"$dump")
  sed -n 's/^.* : start= *\([0-9]*\), size= *\([0-9]*\),.*name="\([^"]*\)".*/\1 \2 \3/p' <<<"$dump" |
    awk -v s="${sector:-512}" '{printf "%.0f %.0f %s\n", $1 * s, $2 * s, $3}'
}
names() { awk '{printf "%s%s", sep, $3; sep=" "}' <<<"$1"; }
field() { awk -v n="$2" -v f="$3" '$3 == n {print $f}' <<<"$1"; }

img=$(parts "$image")
tgt=$(parts "$target")
[[ $(names "$img") == "$LAYOUT" ]] || die "$image is not a pacsgw image with a cache partition (partitions: $(names "$img"))"
[[ $(names "$tgt") == "$LAYOUT" ]] || die "$target is not a pacsgw disk with a cache partition (partitions: $(names "$tgt")): \
drain the box (ansible-playbook reflash.yml -l BOX) and flash the whole image instead"
if [[ -b $target ]] && lsblk -n -o MOUNTPOINTS "$target" 2>/dev/null | grep -q .; then
  die "$target has mounted partitions: re-flash from a live USB or another PC, not from the running box"
fi

u32() { od -An --endian=little -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
# The image's root file system (ext4) is smaller than its partition: only its blocks are written.
root_start=$(field "$img" root 1)
sb=$((root_start + 1024))
[[ $(od -An --endian=little -t u2 -j $((sb + 0x38)) -N 2 "$image" | tr -d ' ') == 61267 ]] ||
  die "$image: no ext4 file system in its root partition"
blocks=$(u32 "$image" $((sb + 4)))
if (( $(u32 "$image" $((sb + 0x60))) & 0x80 )); then blocks=$((blocks + ($(u32 "$image" $((sb + 0x150))) << 32))); fi
root_bytes=$((blocks * (1024 << $(u32 "$image" $((sb + 24))))))
esp_bytes=$(field "$img" esp 2)
((esp_bytes <= $(field "$tgt" esp 2))) || die "the image's ESP ($esp_bytes bytes) is larger than $target's"
((root_bytes <= $(field "$tgt" root 2))) || die "the image's root file system ($root_bytes bytes) is larger than $target's root partition"

copy() {  # copy NAME BYTES: the first BYTES of the image's partition NAME onto the target's
  echo "reflash-system: writing $1 ($(($2 / 1048576)) MiB)"
  dd if="$image" of="$target" bs=4M iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc,fsync status=none \
    skip="$(field "$img" "$1" 1)" seek="$(field "$tgt" "$1" 1)" count="$2"
}
copy esp "$esp_bytes"
copy root "$root_bytes"
sync
echo "reflash-system: done: $target boots the new image; its config and cache partitions are as they were"
