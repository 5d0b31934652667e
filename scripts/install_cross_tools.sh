#!/usr/bin/env bash
# Install what scripts/build_aarch64.sh needs from Debian 12 (bookworm), idempotently:
# the aarch64-linux-gnu GCC 12 cross compilers (with their libc and libstdc++)
# and qemu-user (qemu-aarch64, run with -L /usr/aarch64-linux-gnu).
#
#   bash scripts/install_cross_tools.sh          install what is missing (as root, or with sudo)
#   bash scripts/install_cross_tools.sh --check  exit 0 when everything is there, 1 when not
#
# `apt-get update` runs only when something is missing. The cross compilers are
# pinned: bookworm has carried exactly 12.2.0-14cross1 since its release.
# qemu-user is not: the archive keeps only the newest bookworm point/security
# release, so a pinned version would stop installing at the next update; the
# version used is printed instead.
set -euo pipefail

CROSS_GCC_VERSION=12.2.0-14cross1
PINNED=(
  "gcc-12-aarch64-linux-gnu=$CROSS_GCC_VERSION"
  "g++-12-aarch64-linux-gnu=$CROSS_GCC_VERSION"
)
UNPINNED=(qemu-user)

say() { printf '\033[1m[cross-tools]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[cross-tools] error:\033[0m %s\n' "$*" >&2; exit 1; }

installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }

missing=()
for spec in "${PINNED[@]}"; do
  [ "$(installed_version "${spec%%=*}")" = "${spec#*=}" ] || missing+=("$spec")
done
for pkg in "${UNPINNED[@]}"; do
  [ -n "$(installed_version "$pkg")" ] || missing+=("$pkg")
done

if [ "${1:-}" = "--check" ]; then
  [ ${#missing[@]} -eq 0 ] && exit 0
  say "missing: ${missing[*]}"
  exit 1
elif [ $# -gt 0 ]; then
  die "unknown argument '$1' (expected --check or nothing)"
fi

if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get > /dev/null || die "apt-get not found: this script installs Debian 12 packages (${missing[*]})"
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
    SUDO=(sudo -n)
  else
    die "installing ${missing[*]} needs root: run 'sudo bash $0'"
  fi
  say "installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -q > /dev/null
  # no recommends: qemu-user would pull in binfmt registration, which qemu-aarch64 -L does not need
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null \
    || die "apt-get could not install ${missing[*]} (is this Debian 12 with the bookworm archive reachable?)"
fi

for tool in aarch64-linux-gnu-gcc-12 aarch64-linux-gnu-g++-12 qemu-aarch64; do
  command -v "$tool" > /dev/null || die "$tool is still missing after the install"
done
say "ready: aarch64-linux-gnu-g++-12 $CROSS_GCC_VERSION, qemu-user $(installed_version qemu-user)"
