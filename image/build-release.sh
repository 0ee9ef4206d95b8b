#!/usr/bin/env bash
# Build an agent release: build/releases/pacsgw-<version>.tar, a wheelhouse with the pacsgw wheel and
# every dependency, so that boxes install it with `pip --no-index` and need no package index.
# Usage: image/build-release.sh [SOURCE_DIR] [OUT_DIR]   (defaults: the repo, build/releases)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$here}"
out="${2:-$here/build/releases}"
py="${PYTHON:-python3}"
version="$("$py" -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$src/pyproject.toml")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Build from a copy so a dirty build/ or .venv in the source tree never ends up in the wheel. Caches are left out
# too: other test processes write them while this copies (tar fails on a file that changes as it reads it).
mkdir -p "$tmp/src" "$tmp/wheels"
(cd "$src" && tar --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=./.hypothesis --exclude=./.pytest_cache --exclude=./.ruff_cache -cf - .) \
  | tar -C "$tmp/src" -xf -
# With the smb extra (pyfuse3: built here against apt libfuse3-dev, pkg-config, gcc): one release serves
# boxes with and without SMB.
"$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$tmp/wheels" "$tmp/src[smb]"
mkdir -p "$out"
tar -C "$tmp/wheels" -cf "$out/pacsgw-$version.tar.part" .
mv "$out/pacsgw-$version.tar.part" "$out/pacsgw-$version.tar"
echo "$out/pacsgw-$version.tar"
