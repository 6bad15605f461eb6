#!/usr/bin/env bash
# Builds the chroot that firefox.sh here runs: Debian unstable with its
# Firefox and Mesa's Vulkan drivers (lavapipe, the adapter Firefox's
# WebGPU finds on a machine without a GPU). Firefox offers WebGPU on Linux
# only from its release line; Debian 12 and 13 carry Firefox ESR 140,
# which refuses it ("not yet available in Release or late Beta builds"),
# and only unstable carries the release.
#
# Run as root; built once into FIREFOX_ROOT (default below) and kept: a
# second run is a no-op. About 3-5 minutes and 1.3 GB on a 2-core machine.
set -euo pipefail

root=${FIREFOX_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/wgpu-flash-attn/firefox}
root=$(realpath -m "$root")
mirror=http://deb.debian.org/debian

if [ -f "$root/.ready" ]; then
    echo "== Firefox chroot ready in $root: $(cat "$root/.ready")"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "setup.sh needs root (debootstrap, chroot)" >&2; exit 1; }
# shellcheck source=benches/offline-gpu/mounts.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../../benches/offline-gpu/mounts.sh"
check_rebuildable "$root"

echo "== building a Debian unstable chroot with Firefox and lavapipe in $root"
command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
rm -rf "$root"
mkdir -p "$root"
nice -n 10 debootstrap --variant=minbase sid "$root" "$mirror" >/dev/null

# /proc for the packages' maintainer scripts; unmounted however this ends.
bind_into "$root" /proc
# Unstable's Release file can be past its Valid-Until on a mirror that
# lags; the packages are still signed.
nice -n 10 chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    DEBIAN_FRONTEND=noninteractive sh -c '
    apt-get -o Acquire::Check-Valid-Until=false update -qq &&
    apt-get -o Acquire::Check-Valid-Until=false install -y -qq -o Dpkg::Use-Pty=0 \
        --no-install-recommends firefox mesa-vulkan-drivers libvulkan1 >/dev/null'
version=$(chroot "$root" firefox --version 2>/dev/null)
echo "$version" >"$root/.ready"
echo "== ready: $version"
