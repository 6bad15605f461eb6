#!/usr/bin/env bash
# Runs a command against a fake NVIDIA GPU (Mesa's NVK, its compiler NAK)
# or a fake AMD GPU (Mesa's RADV, its compiler ACO) on a machine with no
# GPU: Mesa's drm-shim, preloaded, stands in for the kernel driver, so
# pipelines compile and report their statistics (registers, spills,
# instructions) while nothing runs. Meant for `flash-bench info` and
# `flash-bench shader-stats`; see README.md here. Needs the chroot that
# setup.sh builds (same OFFLINE_GPU_ROOT). Run as root from the
# repository root:
#
#   benches/offline-gpu/run.sh nvk target/release/flash-bench shader-stats --head-dim 128
#   AMDGPU_GPU_ID=navi21 benches/offline-gpu/run.sh radv target/release/flash-bench info
#
# NOUVEAU_CHIPSET (hex, default 192 = AD102) and AMDGPU_GPU_ID (default
# navi31) pick the chip; FLASH_ATTN_* and Mesa's own debugging variables
# (MESA_*, NAK_*, NVK_*, RADV_*, ACO_*) and RUST_LOG/RUST_BACKTRACE are
# passed through.
set -euo pipefail

root=${OFFLINE_GPU_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/wgpu-flash-attn/offline-gpu}
usage="usage: benches/offline-gpu/run.sh {nvk|radv} COMMAND [ARGS...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
driver=$1
shift
case $driver in
    # Ada's AD102 (RTX 4090): its SM has the H100's and H200's register
    # file (64K 32-bit registers, at most 255 a lane).
    nvk) shim=/opt/drm-shim/libnouveau_noop_drm_shim.so icd=nouveau_icd.json
         chip=NOUVEAU_CHIPSET=${NOUVEAU_CHIPSET:-192} ;;
    radv) shim=/usr/lib/x86_64-linux-gnu/libamdgpu_noop_drm_shim.so icd=radeon_icd.json
          chip=AMDGPU_GPU_ID=${AMDGPU_GPU_ID:-navi31} ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
[ -f "$root/.ready" ] || {
    echo "no fake-GPU chroot in $root: run benches/offline-gpu/setup.sh first (same OFFLINE_GPU_ROOT)" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || { echo "run.sh needs root (chroot, bind mounts)" >&2; exit 1; }

# The caller's variables that reach the command (env -i clears the rest).
passed=()
while IFS= read -r name; do
    passed+=("$name=${!name}")
done < <(compgen -e | grep -E '^(FLASH_ATTN_|MESA_|NAK_|NVK_|RADV_|ACO_|RUST_LOG$|RUST_BACKTRACE$)' || true)

# /proc, /dev and /sys for the driver and the loader, and this checkout at
# its own path, so the command runs the checkout's binaries by the paths
# they have here. Mounted on top of whatever is there (a concurrent run's
# mounts stay its own) and unmounted however this ends.
repo=$(pwd)
# shellcheck source=benches/offline-gpu/mounts.sh
source "$(dirname "${BASH_SOURCE[0]}")/mounts.sh"
bind_into "$root" /proc /dev /dev/pts /sys "$repo"

# No shader cache: a cached pipeline may come back without statistics,
# and each run should compile what it reports.
status=0
# shellcheck disable=SC2016 # (expanded by the chroot's sh)
chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root XDG_RUNTIME_DIR=/tmp \
    LD_PRELOAD="$shim" VK_ICD_FILENAMES="/usr/share/vulkan/icd.d/$icd" \
    MESA_SHADER_CACHE_DISABLE=true WGPU_BACKEND=vulkan "$chip" ${passed[@]+"${passed[@]}"} \
    sh -c 'cd "$1" && shift && exec "$@"' sh "$repo" "$@" || status=$?
exit "$status"
