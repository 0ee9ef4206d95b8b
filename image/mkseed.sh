#!/usr/bin/env bash
# Make a seed disk "beside the image": a FAT image labelled PACSGW-SEED holding a box's settings
# (agent.toml, network/*.network, hostname, authorized_keys, resolv.conf), for a VM's second disk or
# to dd onto a USB stick. The first-boot step applies it once, before the box is adopted by the fleet;
# after adoption only a seed signed with a fleet key (--sign, its public half in the image's
# /etc/pacsgw/seed-signers: gateway_seed_signers) is applied.
#   image/mkseed.sh [--sign FLEET_KEY] SEED_DIR OUT.img
#   image/mkseed.sh --sign FLEET_KEY --dir SEED_DIR      (sign the directory in place: SHA256SUMS(.sig))
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
key=""; in_place=0
while (($#)); do
  case "$1" in
    --sign) key="$2"; shift 2 ;;
    --dir) in_place=1; shift ;;
    *) break ;;
  esac
done
src="$1"
if [[ -n "$key" ]]; then
  rm -f "$src/SHA256SUMS" "$src/SHA256SUMS.sig"
  sh "$here/firstboot/pacsgw-firstboot" --manifest "$src" > "$src/SHA256SUMS"
  ssh-keygen -q -Y sign -f "$key" -n pacsgw-seed "$src/SHA256SUMS" </dev/null
fi
((in_place)) && exit 0
img="$2"
rm -f "$img"
mkfs.vfat -C -n PACSGW-SEED "$img" 8192 >/dev/null
shopt -s nullglob
files=("$src"/*)
((${#files[@]})) && mcopy -s -i "$img" "${files[@]}" ::
echo "$img"
