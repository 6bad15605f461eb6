#!/usr/bin/env bash
# Stages kernel variants for a GPU device call: each patch in
# benches/device/variants/ (a unified diff against shaders/, made with
# `diff -u`) is applied to a copy of shaders/, and the files it changes go
# to .device/variants/NAME/, which benches/device/run.sh times with
# `flash-bench --shader-dir` on issue 13's shape, beside the built-in
# kernels, each result validated against the reference. No rebuild: a
# variant is WGSL only, with the constants and bindings of the kernel it
# replaces. Run after ../shared/device/stage.sh, from the project root;
# a patch that no longer applies stops the script (refresh it).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .device ] || { echo "stage .device first (../shared/device/stage.sh)"; exit 1; }
rm -rf .device/variants
for patch in benches/device/variants/*.patch; do
  [ -e "$patch" ] || continue
  name=$(basename "$patch" .patch)
  work=$(mktemp -d)
  cp -r shaders "$work/shaders"
  (cd "$work" && patch -s -p1 --no-backup-if-mismatch <"$root/$patch")
  mkdir -p ".device/variants/$name"
  for file in "$work"/shaders/*.wgsl; do
    cmp -s "$file" "shaders/$(basename "$file")" || cp "$file" ".device/variants/$name/"
  done
  echo "variant $name: $(ls ".device/variants/$name" | tr '\n' ' ')"
  rm -rf "$work"
done
