#!/usr/bin/env bash
# Builds the chroot that run.sh here uses: Debian trixie with Mesa 26.1's
# Vulkan drivers NVK (NVIDIA, compiler NAK) and RADV (AMD, compiler ACO)
# from trixie-backports, and Mesa's drm-shim for nouveau and amdgpu, a
# preloaded library that stands in for the kernel driver, so those
# drivers open a fake GPU and compile pipelines without one.
#
# Backports' mesa-drm-shim package serves RADV as it is, but its nouveau
# shim offers NVK no Ada chip and no real board (see drm-shim.patch), so
# that one shim is built from trixie's Mesa source (25.0.7; backports'
# source is not on the mirror) with drm-shim.patch; a shim only answers
# the driver's ioctls, so 25.0.7's serves 26.1's NVK. Only the shim and
# what it links (Mesa's utility library) are compiled: no driver, no Rust,
# no LLVM.
#
# Run as root; built once into OFFLINE_GPU_ROOT (default below) and kept:
# a second run is a no-op unless drm-shim.patch changed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${OFFLINE_GPU_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/wgpu-flash-attn/offline-gpu}
root=$(realpath -m "$root")
mirror=http://deb.debian.org/debian
patch_sum=$(sha256sum "$here/drm-shim.patch" | cut -d' ' -f1)

if [ -f "$root/.ready" ] && grep -qx "patch $patch_sum" "$root/.ready"; then
    echo "== fake-GPU chroot ready in $root: $(head -n1 "$root/.ready")"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "setup.sh needs root (debootstrap, chroot)" >&2; exit 1; }
# shellcheck source=benches/offline-gpu/mounts.sh
source "$here/mounts.sh"
check_rebuildable "$root"

echo "== building a Debian trixie chroot with Mesa's NVK and RADV on drm-shim in $root"
command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
# Rebuilt from scratch (an earlier attempt may have stopped anywhere).
rm -rf "$root"
mkdir -p "$root"
nice -n 10 debootstrap --variant=minbase trixie "$root" "$mirror" >/dev/null
cat >"$root/etc/apt/sources.list.d/offline-gpu.list" <<EOF
deb-src $mirror trixie main
deb $mirror trixie-backports main
EOF

# /proc for the packages' maintainer scripts and the build's tools;
# unmounted however this ends.
bind_into "$root" /proc

# Niced: this is a background build, and the machine may be shared.
in_root() {
    nice -n 10 chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        DEBIAN_FRONTEND=noninteractive "$@"
}
apt_install() {
    # (No pseudo-terminal in the chroot: dpkg is told not to log through one.)
    in_root apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "$@" >/dev/null
}

echo "== packages: Mesa's Vulkan drivers and shims (trixie-backports), the shim's build tools"
in_root apt-get update -qq
# The drivers, with their ICD files in /usr/share/vulkan/icd.d (both in
# one package, with lavapipe, hence its LLVM), and the packaged shims.
apt_install -t trixie-backports mesa-vulkan-drivers mesa-drm-shim libvulkan1
# What `meson setup` asks of the configuration below (the project
# declares C++, and any Gallium driver wants flex and bison), apt-get
# source (dpkg-dev) and the shim (libdrm); removed again after the build.
build_tools=(dpkg-dev gcc g++ meson ninja-build pkgconf python3-mako python3-yaml
    flex bison libdrm-dev zlib1g-dev)
apt_install "${build_tools[@]}"

echo "== Mesa source (trixie), patched with drm-shim.patch"
mkdir -p "$root/src"
in_root sh -c 'cd /src && apt-get source -qq -o APT::Sandbox::User=root mesa >/dev/null'
in_root sh -c 'cd /src/mesa-*/ && patch -p1 --quiet' <"$here/drm-shim.patch"

# The shim's directory is configured only with a nouveau driver: Gallium's
# needs no Rust to configure (NVK would), and nothing but the shim's
# target is built.
echo "== building the nouveau shim"
in_root sh -c 'cd /src/mesa-*/ && meson setup /src/build --wrap-mode=nodownload \
    -Dbuildtype=release -Dgallium-drivers=nouveau -Dvulkan-drivers= \
    -Dtools=drm-shim -Dplatforms= -Dopengl=false -Dglx=disabled \
    -Degl=disabled -Dgbm=disabled -Dllvm=disabled >/dev/null'
in_root ninja -C /src/build -j "$(nproc)" \
    src/nouveau/drm-shim/libnouveau_noop_drm_shim.so >/dev/null
mkdir -p "$root/opt/drm-shim"
cp "$root/src/build/src/nouveau/drm-shim/libnouveau_noop_drm_shim.so" "$root/opt/drm-shim/"
source_version=$(in_root sh -c 'cd /src/mesa-*/ && dpkg-parsechangelog -S Version')

# The source, the build, its tools and the downloaded packages are not
# needed again.
rm -rf "$root/src"
# (Python's removal scripts complain on stderr of a directory already gone.)
in_root apt-get purge -y -qq -o Dpkg::Use-Pty=0 --autoremove "${build_tools[@]}" >/dev/null 2>&1
in_root apt-get clean

# shellcheck disable=SC2016 # (dpkg-query's format, not the shell's)
drivers_version=$(in_root dpkg-query -W -f '${Version}' mesa-vulkan-drivers)
printf 'Mesa %s drivers, nouveau shim from Mesa %s\npatch %s\n' \
    "$drivers_version" "$source_version" "$patch_sum" >"$root/.ready"
echo "== ready: $(head -n1 "$root/.ready")"
