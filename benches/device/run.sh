#!/usr/bin/env bash
# The project's GPU device run, ordered so that the first minutes answer
# the open questions (issue 13's targets, then the newest kernels on a real
# GPU). Use it in place of the generic script that ../shared/device/stage.sh
# copies (first used on an H200 on 2026-12-04: BENCHMARKS.md). A commit
# or branch staged as a baseline has its flash-bench validate and time its
# kernels beside this checkout's in the A/B step (its own test binaries
# need a call of their own). Since 2026-12-05 (fourteenth session) the
# cooperative-matrix kernel keeps Q and the accumulators in the subgroups'
# matrix registers (64 x 64 blocks at d=128 on NVIDIA). On an H100 it
# computed NaN in some rows, rows that changed from run to run (fifteenth
# session, BENCHMARKS.md). Two fixes since, neither run on a GPU: every
# workgroup variable a multiple of 16 bytes (matrix loads' addresses
# 16-byte aligned whatever order the driver places them in), and, since the
# eighteenth session, the kernel's SPIR-V is the crate's own on Vulkan
# (src/spirv/: naga declares the Vulkan memory model for it but leaves its
# workgroup accesses private and its barriers without availability, so
# hand-overs between invocations are unordered there; gfx-rs/wgpu#8805).
# `tests: matrix_probes` runs each probe both ways (naga's words reported,
# the crate's asserted), then `tests: cooperative_matrix` says whether the
# kernel computes right (c69b7c1, the kernel before the rewrite, ran 62.6
# ms on the H100). Since the same
# session the register-blocked forward unrolls its loops over key lanes
# (wgpu's loop bounds kept the drivers from it), and since the sixteenth
# every kernel compiles without wgpu's loop counters (its loops proven
# finite; `--skip-checks none` puts them back): stage 3a3082f, the kernel
# before both, as the A/B baseline (one baseline: two overflow the 64 MiB
# carry); the checks step below times the loop counters alone. Since the
# seventeenth the register-blocked forward pairs its invocations and pads
# its Q and probability rows (half the shared-memory cycles on NVIDIA, by
# its engineers' account of the hardware; unmeasured): `plain-lanes` times the
# old order in the same call, and the layout sweep runs right after it.
# The budget ends before the backward, decoding and the suite: a second
# call with DEVICE_SKIP_TO (below) goes on from where the first stopped.
#
#   ../shared/device/stage.sh && cp benches/device/run.sh .device/run.sh
#   benches/device/stage-baseline.sh 3a3082f         # optional A/B
#   benches/device/stage-variants.sh          # optional: WGSL-only variants
#   # device call: command "bash .device/run.sh", carry [".device"], timeout 450
#
# Everything lands in $OUT/device.log and $OUT/results.tar.gz. New steps
# stop starting after DEVICE_BUDGET_S seconds (default 360), so one call
# leaves device time for a rerun. Rehearse on lavapipe (the loaders are left
# alone and the shapes time out quickly; this checks the script, not the
# figures):
#
#   DEVICE_DRY_RUN=1 DEVICE_BUDGET_S=90 OUT=/tmp/dev \
#     FLASH_BENCH=target/release/flash-bench bash benches/device/run.sh
#
# (with DEVICE_TARGET="--seq-q 256 --head-dim 128 --causal --iters 2" the
# target-shape steps, the A/B and the variants finish on lavapipe too; the
# staged baselines must then be unpacked by hand: xz -dk .device/bin/*-base-*)
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
res=$(mktemp -d)
exec > >(tee -a "$OUT/device.log") 2>&1
start=$SECONDS
budget=${DEVICE_BUDGET_S:-360}
left() { echo $((budget - (SECONDS - start))); }
# A second call picks up where the first one's budget ended: with
# DEVICE_SKIP_TO set to the name of the first step the log reports
# "SKIPPED (budget spent)" (or any prefix of it), every step before that
# one is skipped (e.g. command "DEVICE_SKIP_TO='PyTorch SDPA peer' bash
# .device/run.sh").
skip_to=${DEVICE_SKIP_TO:-}
# step SECONDS NAME COMMAND...: under a timeout, unless the budget is spent
# (or the step comes before DEVICE_SKIP_TO).
step() {
  local limit=$1 name=$2
  shift 2
  if [ -n "$skip_to" ]; then
    case $name in
      "$skip_to"*) skip_to= ;;
      *) echo "== SKIPPED (before DEVICE_SKIP_TO): $name"; return ;;
    esac
  fi
  local remain
  remain=$(left)
  if [ "$remain" -le 10 ]; then
    echo "== SKIPPED (budget spent): $name"
    return
  fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  echo "== $name (limit ${limit}s, ${remain}s of budget left)"
  timeout "$limit" "$@"
  echo "== $name: exit $?"
}

if [ -z "${DEVICE_DRY_RUN:-}" ]; then
  for f in .device/gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
  egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  [ -f "$egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl
  for f in .device/bin/*.xz .device/tests/*.xz; do
    [ -e "$f" ] || continue
    unxz -f "$f" 2>/dev/null ||
      python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$f"
    rm -f "$f"
  done
  chmod +x .device/bin/* .device/tests/*
fi
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
# The tensor-core tier where the adapter offers cooperative matrices.
export FLASH_ATTN_COOPERATIVE_MATRIX=1
fb=${FLASH_BENCH:-.device/bin/flash-bench}
tests=${DEVICE_TESTS:-.device/tests}
# Issue 13's shape (DEVICE_TARGET replaces it in a rehearsal on lavapipe).
target=${DEVICE_TARGET:-"--batch 4 --seq-q 4096 --heads-q 16 --head-dim 128 --causal --iters 10"}
nvidia-smi -L 2>/dev/null
git log -1 --format='project commit %h %s' 2>/dev/null

step 45 "adapters and the planner's tiers" "$fb" info
# The matrix kernel's correctness first (see the top): a failure here is
# the top priority. The probes first: each tests one thing the kernel
# relies on (row/column-major loads, accumulators loaded from memory,
# matrix arrays across barriers and loop trips, several subgroups, loads
# at offsets, lone 4-byte words before the tiles, plain values handed over
# around matrix stores to the same tile), as the crate's SPIR-V and as
# naga's, so that a failing kernel says why in the same call.
[ -x "$tests/matrix_probes" ] && step 30 "tests: matrix_probes" \
  "$tests/matrix_probes" --nocapture
[ -x "$tests/cooperative_matrix" ] && step 60 "tests: cooperative_matrix" \
  "$tests/cooperative_matrix" --test-threads=4
# Which fix did it, if the kernel now computes right: the same
# flash_coop.wgsl (unchanged since 3a3082f) with every runtime check, as
# naga's SPIR-V (a staged baseline from before the eighteenth session:
# wgpu compiles its WGSL) and as the crate's (this checkout with
# --skip-checks none). Each validated: FAILED for the first alone points at
# naga's words.
for base in $(ls .device/bin/flash-bench-base-* 2>/dev/null | grep -v '\.xz$' | head -1); do
  step 25 "matrix kernel as naga's SPIR-V ($(basename "$base")), f16" \
    "$base" run $target --dtype f16 --tier coop --json "$res/coop-naga-words.json"
  step 25 "matrix kernel as the crate's SPIR-V, every runtime check, f16" \
    "$fb" --skip-checks none run $target --dtype f16 --tier coop --json "$res/coop-crate-words.json"
done
# What the driver compiled issue 13's kernels into: registers per
# invocation (how many workgroups share a compute unit), spills, with
# every one of wgpu's runtime checks and as they run by default (without
# the loop counters; NAK: 144 against 128 registers, 12 against 16 warps a
# multiprocessor for the register-blocked f32 forward). The subgroup
# tier in f16 too: it ran f16 storage 3.2x slower than f32 (128.0 against
# 39.8 ms), as decoding ran half and int8 caches ~5x slower than f32.
step 60 "driver statistics, B4 H16 N4096 d128 kernels, f32" \
  "$fb" shader-stats --head-dim 128 --tier blocked,subgroup,portable \
  --blocked-layout 16x8x2,32x4x2,64x4x1,16x16x1,8x8x4
# What the checks left on (index clamps, division guards) do to it.
step 30 "driver statistics, register-blocked f32, without any runtime check" \
  "$fb" --unchecked-shaders shader-stats --head-dim 128 --tier blocked
step 40 "driver statistics, B4 H16 N4096 d128 kernels, f16" \
  "$fb" shader-stats --head-dim 128 --dtype f16 --tier coop,blocked-f16,subgroup
# Decoding's layouts, Llama-3.1-70B's step at 128K tokens (registers per
# lane set how many loads a compute unit keeps in flight), beside the
# "decode layouts" timings below.
for kv in f32 int8; do
  step 20 "driver statistics, decode kernels, Llama-3.1-70B heads, 128K, $kv cache" \
    "$fb" shader-stats --seq-q 1 --seq-kv 131072 --heads-q 64 --heads-kv 8 --head-dim 128 \
    --kv-dtype "$kv" --decode-lanes head-dim,key-tiles
done
# Issue 13's targets: the register-blocked tier in f32 (>= 40 % of the FMA
# ceiling) and the best f16 tier (>= 10 % of SDPA's f16), every tier of
# each in one run (blocked-f16: the register-blocked kernel with f16
# products, AttentionConfig::f16_products, off by default until measured).
# (The shape: `target`, set at the top.)
step 75 "tiers, B4 H16 N4096 d128 causal, f32" \
  "$fb" run $target --tier blocked,subgroup,portable --json "$res/tiers-f32.json"
# The same with wgpu's loop counters (the default before the sixteenth
# session): what dropping them gained, same call.
step 40 "register-blocked f32 with every runtime check (--skip-checks none), B4 H16 N4096 d128 causal" \
  "$fb" --skip-checks none run $target --tier blocked --json "$res/skip-none-f32.json"
# Since 2026-12-06 (seventeenth session) the register-blocked forward
# pairs its invocations (n and n ^ 1 one key lane, n and n ^ 2 one row
# lane) and pads its Q and probability rows to odd strides, so that a
# subgroup's vec4 reads of workgroup memory return to pairs at once and its
# row lanes read different banks: at the 128 bytes a cycle NVIDIA's
# engineers describe (a vec4 read shared by a pair returned to both at
# once), half the shared-memory cycles of 16x8x2's products (which then
# bound it at ~38 % of the FMA ceiling). The same kernel with the old order
# (variant plain-lanes) in the same call says what that is worth.
if [ -d .device/variants/plain-lanes ]; then
  step 30 "variant plain-lanes (no lane pairs, unpadded rows), f32 register-blocked" \
    "$fb" --shader-dir .device/variants/plain-lanes run $target --tier blocked \
    --json "$res/plain-lanes-f32.json"
  step 30 "variant plain-lanes (no lane pairs, unpadded rows), f16 products" \
    "$fb" --shader-dir .device/variants/plain-lanes run $target --dtype f16 --tier blocked-f16 \
    --json "$res/plain-lanes-f16.json"
fi
# Tuning the register-blocked tier toward the 40 % target: layouts
# (ROW_LANESxKEY_LANESxROWS) around the planner's choice, each validated;
# those past the adapter's workgroup memory are reported and skipped. By
# NVIDIA's 128 bytes a cycle of shared memory, the H100's sweep of
# 2026-12-05 (plain lanes) never beat the bound those reads set, and the
# one-row layouts ran close to it (64x4x1 at 92 % of it); with lane pairs
# that bound halves for every layout (64x4x1: 80 registers, 24 warps a
# multiprocessor on NAK), so the planner's pick may change. 8x16x4 and
# 16x16x2 take 64-key tiles in two passes (BlockedTiling::passes; 8x16x4
# the first f32 layout the model puts under its FMAs, at 8 warps a
# multiprocessor). Early, so the first call measures it. (At --iters 3
# the H200's sweep was noise: 10.)
step 100 "register-blocked layouts, B4 H16 N4096 d128 causal, f32" \
  "$fb" run $target --tier blocked \
  --blocked-layout 16x8x2,32x4x2,64x4x1,16x16x1,32x2x2,8x8x4,16x4x3,8x16x4,16x16x2 \
  --json "$res/blocked-layouts-f32.json"
step 75 "tiers, B4 H16 N4096 d128 causal, f16" \
  "$fb" run $target --dtype f16 --tier coop,blocked,blocked-f16,subgroup --json "$res/tiers-f16.json"
# The cooperative-matrix forward's blocks (since 2026-12-05, fourteenth
# session; NAK: 4x4 and 2x4 240 registers a lane, 4x2, 2x2 and 8x2 192).
step 60 "cooperative-matrix blocks, f16" \
  "$fb" run $target --dtype f16 --tier coop --coop-layout 4x2,2x4,2x2,8x2 \
  --json "$res/coop-layouts-f16.json"
# Register-blocked layouts with f16 products (blocked-f16 alone makes the
# layouts take them; f16 storage's default on NVIDIA): a caller's layout
# is held to its f16 tiles' bytes, so blocks of 64 rows fit 48 KiB at d128
# (the planner picks at f32 sizes: 16x8x2 on NVIDIA, unmeasured with f16
# products; 8x8x4 gave 25.2 ms on an H100). Skipped for want of budget on
# 2026-12-05, so early now.
step 90 "register-blocked layouts with f16 products, B4 H16 N4096 d128 causal, f16" \
  "$fb" run $target --dtype f16 --tier blocked-f16 \
  --blocked-layout 16x8x4,16x8x2,32x4x2,16x4x4,32x8x2,8x8x4,8x16x4 \
  --json "$res/blocked-layouts-f16.json"
# At d=256 the planner sizes f16-product layouts at f32 tile bytes: 8 rows
# x 16 keys, 32 invocations (7.9 % of the FMA ceiling on the H100); f16
# tiles fit larger blocks in 48 KiB.
step 60 "register-blocked layouts with f16 products, B4 H16 N4096 d256 causal, f16" \
  "$fb" run ${target/--head-dim 128/--head-dim 256} --dtype f16 --tier blocked-f16 \
  --blocked-layout 16x8x2,16x8x1,8x8x2,16x4x2,8x4x2 --json "$res/blocked-layouts-f16-d256.json"
# f32 on NVIDIA defaults to the subgroup tier up to d=128 (measured at
# d128 only, 2026-12-04): the same comparison at d64.
step 40 "tiers, B4 H16 N4096 d64 causal, f32" \
  "$fb" run ${target/--head-dim 128/--head-dim 64} --tier blocked,subgroup \
  --json "$res/tiers-f32-d64.json"
# The same kernels without wgpu's runtime checks (index clamps, loop
# bounds, checked division): what the checks cost, against the two steps
# above.
step 60 "tiers without runtime checks, B4 H16 N4096 d128 causal, f32" \
  "$fb" --unchecked-shaders run $target --tier blocked,subgroup --json "$res/unchecked-f32.json"
step 60 "tiers without runtime checks, B4 H16 N4096 d128 causal, f16" \
  "$fb" --unchecked-shaders run $target --dtype f16 --tier coop,blocked-f16 --json "$res/unchecked-f16.json"
# What the checks still on cost (an H100 ran 8x8x4 30 % faster with none,
# 2026-12-05), on the f32 default, against the tiers step (the crate's
# default: without the loop counters): the index clamps or the division
# guards skipped too.
for checks in loops,bounds loops,division; do
  step 30 "register-blocked f32, --skip-checks $checks, B4 H16 N4096 d128 causal" \
    "$fb" --skip-checks "$checks" run $target --tier blocked --json "$res/skip-${checks/,/-}-f32.json"
done
# Where the register-blocked forward's time goes (issue 13's f32 target):
# the kernel with its K/V loads, its Q K^T products or its P V products
# removed (benches/device/variants/ablate-*: results wrong on purpose,
# timed anyway and reported FAILED), between two runs of the built-in one.
ablations=$(ls -d .device/variants/ablate-*/ 2>/dev/null || true)
if [ -n "$ablations" ]; then
  step 30 "ablations: built-in register-blocked forward, f32 (before)" \
    "$fb" run $target --tier blocked --json "$res/ablation-builtin-before.json"
  for v in $ablations; do
    name=$(basename "$v")
    step 30 "ablation $name, f32 register-blocked forward (wrong results on purpose)" \
      "$fb" --shader-dir "$v" run $target --tier blocked --json "$res/ablation-$name.json"
  done
  step 30 "ablations: built-in register-blocked forward, f32 (after)" \
    "$fb" run $target --tier blocked --json "$res/ablation-builtin-after.json"
fi
step 90 "PyTorch SDPA peer" python3 .device/torch_sdpa.py "$res/torch_sdpa.json"
# Decoding's key tiles (DecodeLanes::KeyTiles, 2026-12-05): one key per
# lane, staged in workgroup memory, against GPUs' default (lanes over the
# head dim: eight subgroupAdd reductions per four keys), on the same
# caches. The default follows the figures: if key tiles are faster on
# every cache type, the planner should pick them on GPUs where they fit.
# FP8 E4M3 caches (2026-12-08) share int8's layout and widen each byte as
# an f16: they should decode as fast as int8 where the bytes set the time.
step 45 "decode layouts, Llama-3.1-70B heads, 128K: head-dim lanes against key tiles" \
  "$fb" decode --cache 131072 --kv-dtype f32,f16,int8,fp8 --lanes head-dim,key-tiles \
  --json "$res/decode-layouts.json"
# A sliding window of 4,096 keys over 128K cached tokens in pages of 16,
# the pages behind it released: the step should read the window only.
step 30 "decode, Llama-3.1-70B heads, 128K, window 4096, pages behind it released" \
  "$fb" decode --cache 131072 --page-size 16 --window 4096 --release-behind-window \
  --kv-dtype f32,fp8 --json "$res/decode-window.json"
# Decoding with eight keys a trip (variant decode-eight-keys: both quads'
# K and V loads in flight before either is used), against the head-dim
# lanes of the step above: the H100 decoded f16 and int8 caches no faster
# than f32 (0.98-1.08 ms at 128K), as if the loads' latency, not their
# bytes, set the time.
if [ -d .device/variants/decode-eight-keys ]; then
  step 45 "variant decode-eight-keys, Llama-3.1-70B heads, 128K, head-dim lanes" \
    "$fb" --shader-dir .device/variants/decode-eight-keys decode --cache 131072 \
    --kv-dtype f32,f16,int8 --lanes head-dim --json "$res/variant-decode-eight-keys.json"
fi
# The kernels' tests on a real GPU: a failure here is the top priority.
# On NVIDIA the defaults these run are register blocking (16x8x2 at
# d=128 since 2026-12-05, fifteenth session; the subgroup tier for f32 up
# to d=128 before), with f16 products for f16, matrices requested or not;
# the matrix tier's own tests force it.
for t in tiers half_storage forward masks key_chunks backward decode head_dims forward_as_decode; do
  [ -x "$tests/$t" ] && step 90 "tests: $t" "$tests/$t" --test-threads=4
done
# Since 2026-12-06 (twenty-first session) a forward call with at most 16
# query rows per KV head over 1024+ keys runs as split-KV decoding on GPUs
# (128 rows and 256 keys on CPU adapters since the twenty-third session,
# where the crossover was measured). Where the GPU crossover lies: decode
# against the forward kernels (the prefill column forces their tier) at
# 16, 64 and 128 rows.
for seq_q in 2 8 16; do
  step 30 "forward as decoding: decode vs forward kernels, Llama-3.1-70B heads, seq_q $seq_q, 4K/32K" \
    "$fb" decode --seq-q "$seq_q" --cache 4096,32768 --json "$res/forward-as-decode-q$seq_q.json"
done
# The other way (2026-12-06, twenty-fourth session): a decode call whose
# decode plan takes more than 32 row tiles per KV head (f32 queries; 8-row
# tiles at d=128 on GPUs: 256 rows) runs as the forward kernels over a
# dense copy of the cache, bound measured on lavapipe only. The route
# (lanes "forward") against the decode kernel forced (--lanes head-dim)
# at 64 tokens (512 rows, 64 tiles) and 32 (256 rows, not routed).
for seq_q in 32 64; do
  step 30 "decode as forward: route vs decode kernel, Llama-3.1-70B heads, seq_q $seq_q, 4K" \
    "$fb" decode --seq-q "$seq_q" --cache 4096 --kv-dtype f32,int8 --json "$res/decode-as-forward-q$seq_q.json"
  step 30 "decode as forward: decode kernel forced, seq_q $seq_q, 4K" \
    "$fb" decode --seq-q "$seq_q" --cache 4096 --kv-dtype f32,int8 --lanes head-dim \
    --json "$res/decode-as-forward-forced-q$seq_q.json"
done
# A continuous-batching step (2026-12-07, twenty-ninth session:
# Gpu::decode_ragged): a 512-token prompt chunk joins 31 sequences decoding
# one token, Llama-3.1-8B heads, 8K each, paged; the chunk takes the
# forward route (f32) and the rest the decode kernel. Lavapipe only so far.
step 30 "ragged step: 512-token chunk beside 31 one-token sequences, 8K, f32 and f16" \
  "$fb" decode --cache 8192 --batch 32 --heads-q 32 --heads-kv 8 --page-size 256 \
  --prompt-chunk 512 --kv-dtype f32,f16 --json "$res/decode-prompt-chunk.json"
# Speculative decoding's token trees (2026-12-08, thirty-third session):
# 16 draft tokens per sequence as a seeded random tree against the causal
# step in the same run, the GPU's default lanes and key tiles. Lavapipe
# only so far (no cost above its noise).
step 30 "token trees: 16-token drafts, tree vs causal, Llama-3.1-70B heads, 4K/32K" \
  "$fb" decode --seq-q 16 --cache 4096,32768 --token-tree --lanes head-dim,key-tiles \
  --json "$res/decode-token-tree.json"
# This commit against others (benches/device/stage-baseline.sh: the
# commit a kernel change replaces, a branch's kernel), in two rounds so
# that a drift in the GPU's clocks shows as disagreement between the
# rounds rather than as a difference; every result validated.
bases=$(ls .device/bin/flash-bench-base-* 2>/dev/null | grep -v '\.xz$' || true)
if [ -n "$bases" ]; then
  cat .device/baselines 2>/dev/null
  for round in 1 2; do
    for binary in $bases "$fb"; do
      name=$(basename "$binary")
      step 40 "A/B round $round: $name, f16 tiers (matrices, register-blocked plain and with f16 products)" \
        "$binary" run $target --dtype f16 --tier coop,blocked,blocked-f16 --json "$res/ab-$name-f16-$round.json"
      step 30 "A/B round $round: $name, f32 register-blocked" \
        "$binary" run $target --tier blocked --json "$res/ab-$name-f32-$round.json"
      # Decoding's plan too (MLA's latent: 2 rows a workgroup since the
      # twelfth session; c69b7c1's 16 ran 3.72 ms against 1.39 on the
      # H100, 2026-12-05).
      step 30 "A/B round $round: $name, DeepSeek-V3 MLA decode 32K, f16 cache" \
        "$binary" decode --heads-q 128 --heads-kv 1 --head-dim 576 --latent-values 512 \
        --cache 32768 --kv-dtype f16 --json "$res/ab-$name-mla-$round.json"
    done
  done
fi
# Random configurations against the rule (what CI runs on lavapipe).
[ -x "$tests/fuzz" ] && step 60 "tests: fuzz, 40 cases" \
  env FLASH_ATTN_FUZZ_CASES=40 "$tests/fuzz" --ignored --test-threads=4
# Kernel variants (benches/device/stage-variants.sh: patches against
# shaders/, run through --shader-dir without a rebuild), each validated,
# between two runs of the built-in kernels on the same shapes: the forward
# on issue 13's shape where a variant replaces flash_blocked.wgsl (f32 and
# f16) or flash_coop.wgsl (f16), the register-blocked backward where it
# replaces flash_backward_blocked.wgsl.
backward_shape="--seq-q 4096 --heads-q 16 --head-dim 128 --causal --backward --iters 5"
builtin() {
  step 30 "variants: built-in register-blocked forward, f32 ($1)" \
    "$fb" run $target --tier blocked --json "$res/variant-builtin-forward-$1.json"
  if ls .device/variants/*/flash_attention.wgsl >/dev/null 2>&1; then
    step 30 "variants: built-in subgroup forward, f32 ($1)" \
      "$fb" run $target --tier subgroup --json "$res/variant-builtin-subgroup-$1.json"
  fi
  if ls .device/variants/*/flash_coop.wgsl >/dev/null 2>&1; then
    step 30 "variants: built-in cooperative-matrix forward, f16 ($1)" \
      "$fb" run $target --dtype f16 --tier coop --json "$res/variant-builtin-coop-$1.json"
  fi
  if ls .device/variants/*/flash_backward_blocked.wgsl >/dev/null 2>&1; then
    step 45 "variants: built-in register-blocked backward ($1)" \
      "$fb" run $backward_shape --tier blocked --json "$res/variant-builtin-backward-$1.json"
  fi
}
if [ -d .device/variants ]; then
  builtin before
  for v in .device/variants/*/; do
    name=$(basename "$v")
    # (Ablations and plain-lanes ran above.)
    case $name in ablate-* | plain-lanes) continue ;; esac
    if [ -f "$v/flash_blocked.wgsl" ]; then
      step 30 "variant $name, f32 register-blocked forward" \
        "$fb" --shader-dir "$v" run $target --tier blocked --json "$res/variant-$name-f32.json"
      step 30 "variant $name, f16 register-blocked forward with f16 products" \
        "$fb" --shader-dir "$v" run $target --dtype f16 --tier blocked-f16 --json "$res/variant-$name-f16.json"
    fi
    if [ -f "$v/flash_attention.wgsl" ]; then
      step 30 "variant $name, f32 subgroup forward" \
        "$fb" --shader-dir "$v" run $target --tier subgroup --json "$res/variant-$name-subgroup-f32.json"
    fi
    if [ -f "$v/flash_coop.wgsl" ]; then
      step 30 "variant $name, f16 cooperative-matrix forward" \
        "$fb" --shader-dir "$v" run $target --dtype f16 --tier coop --json "$res/variant-$name-coop.json"
    fi
    if [ -f "$v/flash_backward_blocked.wgsl" ]; then
      step 45 "variant $name, register-blocked backward" \
        "$fb" --shader-dir "$v" run $backward_shape --tier blocked --json "$res/variant-$name-backward.json"
    fi
  done
  builtin after
fi
# Training and serving shapes: the backward (equal and DeepSeek's uneven
# head dims; at d128 the per-key passes against the register-blocked
# ones, GPUs' default since the H200 measured them 3.8x faster), decoding
# over every cache type.
step 90 "backward, H16 N4096 d128 causal, per-key and register-blocked passes" \
  "$fb" run --seq-q 4096 --heads-q 16 --head-dim 128 --causal --backward --iters 5 \
  --tier portable,blocked --json "$res/backward-d128.json"
# Dropout's cost on the GPU's default kernels (the same shape without it
# is the step above).
step 45 "dropout 0.1, H16 N4096 d128 causal, forward and backward" \
  "$fb" run --seq-q 4096 --heads-q 16 --head-dim 128 --causal --backward --iters 3 \
  --dropout 0.1 --json "$res/dropout-d128.json"
# Dropout on the f16 default (the tensor-core tier where offered; the same
# shape without it is the f16 tiers step).
step 40 "dropout 0.1, B4 H16 N4096 d128 causal, f16 default tier" \
  "$fb" run $target --dtype f16 --dropout 0.1 --json "$res/dropout-f16.json"
step 60 "backward, H16 N4096 d192/128 causal" \
  "$fb" run --seq-q 4096 --heads-q 16 --head-dim 192 --head-dim-v 128 --causal --backward \
  --iters 5 --json "$res/backward-d192-128.json"
step 60 "masks and padding, with the backward (BERT padded, 512 packed short sequences)" \
  "$fb" masks --backward --packed-sequences 512 --json "$res/masks.json"
step 90 "decode, Llama-3.1-70B heads, 32K/128K, every cache type" \
  "$fb" decode --cache 32768,131072 --kv-dtype f32,f16,bf16,int8 --json "$res/decode.json"
# On the H200 the f16, bf16 and int8 caches decoded 5x slower than f32,
# each timed after seconds of host work while f32's came right after its
# prefill loaded the GPU: likely the GPU's clocks, which flash-bench's
# 250 ms warm-up (added after that run) should settle. Each alone in a
# fresh process as a cross-check.
for kv in f16 int8; do
  step 30 "decode, 128K, $kv cache alone in its process" \
    "$fb" decode --cache 131072 --kv-dtype "$kv" --json "$res/decode-$kv-alone.json"
done
# DeepSeek-V3's MLA decode (128 query heads over one 576-wide latent KV
# head, values its first 512). At 16 rows a workgroup a lane of the
# head-dim layout held 576 floats of query and output and NAK spilled
# 1,854 instructions; GPUs now take 2 rows (240 registers on NAK, no
# spills) and read the cache 64 times per step instead of 8 (37.7 MB in
# f16 at 32K: within the H200's L2): 2.7x faster on the H100 (1.39 against
# 3.72 ms, f16 cache, in the A/B against c69b7c1; 2026-12-05).
step 45 "decode, DeepSeek-V3 MLA heads (128 q / 1 latent kv, 576/512), 32K, f32 and f16 caches" \
  "$fb" decode --heads-q 128 --heads-kv 1 --head-dim 576 --latent-values 512 --cache 32768 \
  --kv-dtype f32,f16 --json "$res/decode-mla.json"
# The real Llama-3.1-405B step (128 query heads over 8 KV heads; the
# 64/8 shape above is 70B's): 16 rows a group, which GPUs now split into
# two 8-row workgroups (16 rows spilled 232 instructions on NAK).
step 30 "decode, Llama-3.1-405B heads (128 q / 8 kv), 128K, f32 and f16 caches" \
  "$fb" decode --heads-q 128 --heads-kv 8 --cache 131072 --kv-dtype f32,f16 \
  --json "$res/decode-405b.json"
step 120 "suite (every case validated against the f64 reference)" \
  "$fb" --json "$res/suite.json" --plot "$res/suite.svg"
for t in "$tests"/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  case $name in
    # Done above; flash_bench_cli needs the source tree's binary, shaders no GPU.
    tiers | cooperative_matrix | half_storage | forward | masks | key_chunks | backward | decode | head_dims | fuzz | flash_bench_cli | shaders) continue ;;
  esac
  step 90 "tests: $name" "$t" --test-threads=4
done
# (No GL step: on NVIDIA's driver wgpu 30 gets a GL 3.3 context and opens
# no device; README.)
# Last, with what budget is left: register-blocked backward layouts
# (ROW_LANESxKEY_LANESxROWS: key blocks of 4 x KEY_LANES keys, query
# blocks of ROW_LANES x ROWS rows); the forward runs each layout too.
step 90 "register-blocked backward layouts, H16 N4096 d128 causal" \
  "$fb" run --seq-q 4096 --heads-q 16 --head-dim 128 --causal --backward --iters 3 \
  --tier blocked --blocked-layout 8x4x2,8x8x1,4x4x4,2x8x4,16x4x1,16x2x2 \
  --json "$res/backward-blocked-layouts.json"
tar -C "$res" -czf "$OUT/results.tar.gz" .
echo "== done in $((SECONDS - start)) s; results: results.tar.gz, device.log"
