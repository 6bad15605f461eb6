#!/usr/bin/env bash
# Firefox from the chroot that setup.sh here builds, started as if it
# were installed on this machine: tests/browser/run_page.py runs it as
# FLASH_ATTN_FIREFOX=tests/browser/firefox/firefox.sh. /tmp (where
# run_page.py keeps the profile), /proc, /sys and /dev are bound into the
# chroot for the browser's life; the loopback network is shared. As root.
set -euo pipefail

root=${FIREFOX_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/wgpu-flash-attn/firefox}
root=$(realpath -m "$root")
[ -f "$root/.ready" ] || {
    echo "no Firefox chroot in $root: run tests/browser/firefox/setup.sh (as root)" >&2
    exit 1
}
in_root() {
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        XDG_RUNTIME_DIR=/tmp "$@"
}
# shellcheck source=benches/offline-gpu/mounts.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../../benches/offline-gpu/mounts.sh"
# (Firefox finds its own files through /proc, even for --version.)
bind_into "$root" /proc /sys /dev /dev/shm /tmp
# In the background and waited for, so that a TERM reaches the trap that
# unmounts (run_page.py ends the browser's whole session).
in_root firefox "$@" &
wait $!
