#!/usr/bin/env bash
# Runs a command, from the repository root, against a fake NVIDIA GPU
# (Mesa's NVK, its compiler NAK) or a fake AMD GPU (Mesa's RADV, its
# compiler ACO), with no GPU present: Mesa's drm-shim stands in for the
# kernel driver, so pipelines compile and report their statistics
# (registers, spills) but nothing runs. For `flash-bench info` and
# `flash-bench shader-stats`; see README.md here for building the chroot
# this needs (OFFLINE_GPU_ROOT).
#
#   benches/offline-gpu/run.sh nvk target/release/flash-bench shader-stats --head-dim 128
#   AMDGPU_GPU_ID=navi21 benches/offline-gpu/run.sh radv target/release/flash-bench info
set -euo pipefail
root=${OFFLINE_GPU_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/wgpu-flash-attn/offline-gpu}
[ $# -ge 2 ] || { echo "usage: run.sh {nvk|radv} COMMAND [ARGS...]"; exit 2; }
driver=$1
shift
case $driver in
  # Ada's AD102 (the H200's register file: 64K registers an SM, 255 a lane).
  nvk) shim=nouveau/drm-shim/libnouveau_noop_drm_shim.so icd=nouveau_icd.x86_64.json
       chip="NOUVEAU_CHIPSET=${NOUVEAU_CHIPSET:-192}" ;;
  radv) shim=amd/drm-shim/libamdgpu_noop_drm_shim.so icd=radeon_icd.x86_64.json
        chip="AMDGPU_GPU_ID=${AMDGPU_GPU_ID:-navi31}" ;;
  *) echo "unknown driver $driver (nvk or radv)"; exit 2 ;;
esac
for file in "/src/build/src/$shim" "/opt/mesa26/icd/$icd"; do
  [ -f "$root$file" ] || { echo "no $file in $root: build the chroot first (benches/offline-gpu/README.md)"; exit 1; }
done

# /proc, /dev and /sys for the driver, and this checkout at its own path
# (so the command runs the checkout's binaries by their paths); unmounted
# however the command ends.
repo=$(pwd)
mounted=()
cleanup() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" || true; done
}
trap cleanup EXIT
for dir in /proc /dev /dev/pts /sys "$repo"; do
  mkdir -p "$root$dir"
  mountpoint -q "$root$dir" && continue
  mount --bind "$dir" "$root$dir"
  mounted+=("$root$dir")
done
status=0
chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root XDG_RUNTIME_DIR=/tmp \
  WGPU_BACKEND=vulkan LD_PRELOAD="/src/build/src/$shim" VK_ICD_FILENAMES="/opt/mesa26/icd/$icd" \
  "$chip" sh -c 'cd "$1" && shift && exec "$@"' sh "$repo" "$@" || status=$?
exit $status
