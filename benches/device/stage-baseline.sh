#!/usr/bin/env bash
# Adds a second flash-bench, built from an older commit, to a staged
# .device/ (after ../shared/device/stage.sh), so that one device call times
# a kernel change against what it replaces on the same GPU, minutes apart
# (benches/device/run.sh alternates the two on issue 13's shape). Usage,
# from the project root:
#
#   ../shared/device/stage.sh && cp benches/device/run.sh .device/run.sh
#   benches/device/stage-baseline.sh 705db0a
#
# The baseline builds in a temporary worktree with this checkout's target
# directory (its dependencies are already built), which leaves
# target/release/flash-bench as the baseline's: it is rebuilt from this
# checkout at the end.
set -euo pipefail
ref=${1:?usage: stage-baseline.sh COMMIT}
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .device/bin ] || { echo "stage .device first (../shared/device/stage.sh)"; exit 1; }
commit=$(git rev-parse --short "$ref")
tree=$(mktemp -d)/baseline
git worktree add --detach "$tree" "$commit" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
echo "== building flash-bench at $commit ($(git log -1 --format=%s "$commit"))"
(cd "$tree" && CARGO_TARGET_DIR="$root/target" cargo build --release --locked --bin flash-bench)
cp target/release/flash-bench .device/bin/flash-bench-base
echo "$commit" >.device/baseline-commit
strip .device/bin/flash-bench-base
xz -T0 -6 -f .device/bin/flash-bench-base
echo "== rebuilding this checkout's flash-bench"
cargo build --release --locked --bin flash-bench
du -sh .device
