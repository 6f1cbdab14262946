#!/usr/bin/env bash
# Installs what Strata needs on a fresh Debian machine and puts Swift on PATH.
# Sourced by the other scripts; safe to run again (apt skips what is installed).
set -euo pipefail

# qemu-system-common brings qemu-storage-daemon, the peer the vhost-user client tests run against;
# libnbd-bin (nbdinfo, nbdcopy), qemu-utils (qemu-img) and fio (nbd engine) are the NBD clients.
packages=(liburing-dev libaio-dev libzstd-dev pkg-config gcc qemu-system-common qemu-utils fio libnbd-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi

if ! command -v swift >/dev/null 2>&1; then
  export PATH="/opt/swift/usr/bin:$PATH"
fi
command -v swift >/dev/null 2>&1 || { echo "swift not found (expected in /opt/swift/usr/bin)" >&2; exit 1; }
