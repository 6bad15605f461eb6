#!/usr/bin/env bash
# Adds flash-bench binaries built from other commits to a staged .device/
# (after ../shared/device/stage.sh), so that one device call times a
# kernel change against what it replaces, or a branch's kernel against
# main's, on the same GPU minutes apart (benches/device/run.sh alternates
# them with this checkout's on issue 13's shape, each result validated).
# Usage, from the project root:
#
#   ../shared/device/stage.sh && cp benches/device/run.sh .device/run.sh
#   benches/device/stage-baseline.sh 705db0a some-branch
#
# Each commit builds in a temporary worktree with this checkout's target
# directory (the dependencies are built once), which leaves
# target/release/flash-bench as that commit's; cargo restores this
# checkout's at the end. Binaries: .device/bin/flash-bench-base-SHA, listed
# with their subjects in .device/baselines.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: stage-baseline.sh COMMIT..."; exit 1; }
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .device/bin ] || { echo "stage .device first (../shared/device/stage.sh)"; exit 1; }
trees=()
cleanup() { for t in "${trees[@]}"; do git worktree remove --force "$t"; done; }
trap cleanup EXIT
for ref in "$@"; do
  commit=$(git rev-parse --short "$ref")
  tree=$(mktemp -d)/baseline
  git worktree add --detach "$tree" "$commit" >/dev/null
  trees+=("$tree")
  echo "== building flash-bench at $commit ($ref: $(git log -1 --format=%s "$commit" | cut -c1-80))"
  (cd "$tree" && CARGO_TARGET_DIR="$root/target" cargo build --release --locked --bin flash-bench)
  binary=.device/bin/flash-bench-base-$commit
  cp target/release/flash-bench "$binary"
  strip "$binary"
  xz -T0 -6 -f "$binary"
  echo "$commit $ref: $(git log -1 --format=%s "$commit" | cut -c1-100)" >>.device/baselines
done
echo "== restoring this checkout's flash-bench"
cargo build --release --locked --bin flash-bench
du -sh .device
