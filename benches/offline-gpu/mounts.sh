# Bind mounts into the chroot for setup.sh and run.sh, undone however the
# sourcing script ends (exit, error, Ctrl-C, TERM): source this file, then
# `bind_into ROOT DIR...` mounts each DIR at ROOT/DIR.
mounted=()
# shellcheck disable=SC2317 # (called by the trap)
unmount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true
    done
}
trap unmount_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bind_into() {
    local root=$1 dir
    shift
    for dir in "$@"; do
        mkdir -p "$root$dir"
        mount --bind "$dir" "$root$dir"
        mounted+=("$root$dir")
    done
}
