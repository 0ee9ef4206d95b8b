#!/usr/bin/env bash
# Make a seed disk "beside the image": a FAT image labelled PACSGW-SEED holding a box's settings
# (agent.toml, network/*.network, hostname, authorized_keys, resolv.conf), for a VM's second disk or
# to dd onto a USB stick. The first-boot step prefers it over the image's own PACSGW-CFG partition.
#   image/mkseed.sh SEED_DIR OUT.img
set -euo pipefail
src="$1"; img="$2"
rm -f "$img"
mkfs.vfat -C -n PACSGW-SEED "$img" 8192 >/dev/null
shopt -s nullglob
files=("$src"/*)
((${#files[@]})) && mcopy -s -i "$img" "${files[@]}" ::
echo "$img"
