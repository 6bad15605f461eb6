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

# Exits unless ROOT may be deleted and rebuilt as a chroot: it must not be
# /, nothing may be mounted under it (a launcher killed outright can leave
# /dev or the checkout bind-mounted inside, and rm -rf would delete
# through them), and it must be empty or hold a chroot (a variable naming
# the root could name anything).
check_rebuildable() {
    local root=$1
    [ "$root" != / ] || { echo "the chroot's root must not be /" >&2; exit 1; }
    if awk -v r="$root/" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        echo "something is mounted under $root; unmount it first:" >&2
        awk -v r="$root/" 'index($2, r) == 1 { print "  " $2 }' /proc/self/mounts >&2
        exit 1
    fi
    if [ -n "$(ls -A "$root" 2>/dev/null)" ] && [ ! -f "$root/etc/debian_version" ]; then
        echo "$root is neither empty nor a chroot: not deleting it" >&2
        exit 1
    fi
}
