//! Fuzz mode: random forward, decode, backward and linear attention configurations through
//! the public API, each checked against the f64 reference. Ignored by default because its worth
//! is in the number of cases (each new head dim, storage type or mask kind
//! also compiles kernels, ~20 s each on a cold lavapipe): run it with
//!
//! ```sh
//! FLASH_ATTN_FUZZ_CASES=10000 cargo test --release --test fuzz -- --ignored --nocapture
//! ```
//!
//! Every case prints nothing unless it fails; the run prints its seed
//! first, and `FLASH_ATTN_FUZZ_SEED=S FLASH_ATTN_FUZZ_CASES=1` replays the
//! case a failure names (each case draws from its own seed, `base + index`).
//!
//! Drawn per case: the operation (forward 60 %, decode over a KV cache
//! 20 %, backward 20 %; then, from a seed of its own so that the others
//! draw as before, 10 % of all cases become linear attention cases, see
//! `draw_linear_case`), batch, lengths (1-150, `seq_q != seq_kv`
//! included), GQA groups, head dims (multiples of 8 up to 256; in 15 % of
//! cases a pair from a short list past 256 (forward and decode) or with
//! values of another width, decoding those over a latent cache), causal,
//! windows, softcap, scale, ALiBi, attention sinks. Forward: storage (f32, f16, bf16),
//! layout (packed BSHD or a BHSD buffer seen through strides), and at most
//! one of: a boolean mask, an additive bias mask (with `-inf` entries),
//! valid lengths (key and query padding) or a packed variable-length batch
//! (sequences of 0-60 tokens); without a mask, in 25 % of cases its keys
//! run in chunks of 1-160 per dispatch (`keys_per_dispatch`); in 30-40 % of the cases the
//! other forward kernel than the adapter's default (register-blocked on CPU adapters, the
//! portable per-row tier on GPUs; on the register-blocked tier, a caller's layout of
//! 64-key tiles run in two passes where one plans so), in 20 % the
//! cooperative-matrix kernel (emulated on
//! adapters without matrix units), where their tiles fit; in 10 % of f16 cases (which
//! then have no mask, padding or key chunks) the register-blocked kernel with f16
//! products, held to twice the error of standard attention computed in f16. Decode: a contiguous or paged cache (page
//! size 16-256, pages shuffled), per-sequence lengths 0-300, 1-4 query
//! tokens, a chosen or forced split count, f32, f16, bf16, int8 or fp8 storage
//! (checked over the values stored), queries and output in f32, f16 or
//! bf16; in 40 % of them (drawn from a seed of their own) RoPE fused into
//! the append, the stored keys of an f32 cache held to 2e-5 of RoPE in
//! f64; in 30 % of paged ones (also from a seed of its own) the pool spread
//! over buffers of 1-4 pages each; in 30 % of all decode cases (from a
//! third seed) every page of the pool moved to another before the step (a random
//! permutation, by `copy_pages` or through the host by `read_pages` and
//! `write_pages`), the block tables following it; in 40 % (a fourth seed)
//! the cache filled by one ragged append of each sequence's own length
//! (`append_ragged`) rather than a uniform one; in 40 % (a fifth seed) the
//! step ragged (`decode_ragged`), each sequence with its own number of
//! query tokens from 0 to the case's, in a quarter of them one sequence
//! with a prompt chunk of 64-600 (where the call may split between the
//! forward and the decode kernel); a paged case with a left window
//! releases each sequence's pages behind it before the step
//! (`release_pages_before`). Backward (f32): no mask, a
//! boolean or a bias mask, valid lengths or a packed variable-length batch
//! (one dispatch per pass for all of its sequences), in 30 % of the cases
//! on the register-blocked passes; with sinks, their gradients too. In 25 %
//! of forward and backward cases (key chunks included), dropout at a rate of
//! 0-0.9 with a random
//! seed, which the reference applies too (each sequence of a padded or
//! packed batch its own mask). The bound is the crate's accuracy rule: 1e-4
//! plus the output's rounding to its storage type, on inputs already
//! rounded to it (docs/semantics.md), a row that sees no key being zeros;
//! forward and decode logsumexps within 1e-4 (2^-11 more on the
//! cooperative-matrix tier in f16, whose row sums add f16-rounded weights),
//! `+inf` for a row that sees no key, the sink's logit with a sink;
//! gradients within 2e-5 of the largest reference gradient (at least 1) plus twice the
//! error of standard attention's backward in f32 (FlashAttention's rule).

mod common;

use std::borrow::Cow;

use common::random::{SeededRng, normal_vec, seeded};
use common::{forward_tiers, gpu, round_to, unit_roundoff};
use rand::RngExt;
use rand::seq::SliceRandom;
use std::sync::Mutex;
use wgpu_flash_attn::reference::LinearReferenceState;
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, BackwardArgs,
    BackwardPlan, BlockedLayout, DType, DecodeArgs, DecodeLanes, DecodeOptions, Error, FeatureMap,
    ForwardOptions, ForwardPlan, Gpu, KeyRotation, KvCache, KvCacheConfig, KvDType, KvLayout,
    LinearArgs, LinearConfig, LinearPlan, LinearShape, LinearState, Lse, Rope, RopeStyle,
    SinkGrads, Strides, Tensor, TensorShape, Tier, ValidLengths,
};

const CASES_VAR: &str = "FLASH_ATTN_FUZZ_CASES";
const SEED_VAR: &str = "FLASH_ATTN_FUZZ_SEED";
/// Cases when the variable is unset (a short look, not the soak).
const DEFAULT_CASES: usize = 50;
const TOLERANCE: f64 = 1e-4;
/// Keys of N(0, 1) values rotated by the append's RoPE, against RoPE in
/// f64 (the bound of tests/decode.rs).
const ROPE_TOLERANCE: f64 = 2e-5;
/// Gradients: this share of the largest reference gradient (at least 1),
/// plus twice the error of standard attention's backward in f32.
const GRADIENT_TOLERANCE: f64 = 2e-5;

/// What one case runs with, for the failure message.
#[derive(Debug)]
enum Extra {
    None,
    BoolMask,
    BiasMask,
    ValidLengths {
        q: Vec<usize>,
        kv: Vec<usize>,
    },
    /// A packed batch: the case's shape is `[1, total, ..]`.
    Varlen {
        cu_q: Vec<usize>,
        cu_k: Vec<usize>,
    },
}

/// Which operation a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Forward,
    /// Decoding `seq_q` tokens over a cache of per-sequence lengths.
    Decode {
        paged: Option<usize>,
        kv_splits: Option<usize>,
        cache: KvDType,
        /// Run a lane layout the adapter does not pick by default
        /// (`common::other_decode_lanes`; which one follows the case's
        /// cache length, so a seed's cases stay those it drew before the
        /// third layout), where it has one.
        other_lanes: bool,
    },
    Backward,
}

#[derive(Debug)]
struct Case {
    operation: Operation,
    /// Decode: each sequence's cache length (`shape.seq_kv` is the longest).
    cache_lens: Vec<usize>,
    shape: AttentionShape,
    dtype: DType,
    bhsd: bool,
    config: AttentionConfig,
    extra: Extra,
    /// Forward without a mask: the keys of each sequence run in chunks of
    /// this many, one dispatch each.
    keys_per_dispatch: Option<usize>,
    /// Forward: which kernel runs it.
    forward_kernel: ForwardKernel,
    /// Backward: run the register-blocked passes (forward and backward
    /// with `Tier::RegisterBlocked`), where their tiles fit.
    backward_blocked: bool,
    /// Decode: RoPE fused into the append of the keys, with one position
    /// offset per sequence (`draw_rotation`).
    rotation: Option<(Rope, Vec<u32>)>,
    /// Decode over a paged cache: its pool spread over buffers of this many
    /// pages each (`KvCacheConfig::max_buffer_bytes`; `draw_buffer_pages`).
    pages_per_buffer: Option<usize>,
    /// Decode: every page of the pool moved before the step
    /// (`draw_page_move`).
    page_move: Option<PageMove>,
    /// Decode: the cache filled by one ragged append of each sequence's
    /// length (`draw_ragged_append`) rather than a uniform one.
    ragged_append: bool,
    /// Decode: a ragged step (`Gpu::decode_ragged`), each sequence with
    /// its own number of query tokens, packed (`draw_query_counts`).
    query_counts: Option<Vec<usize>>,
}

/// How a decode case moves its cache's pages to a permutation of the pool
/// before the step.
#[derive(Debug, Clone)]
struct PageMove {
    /// Seeds the permutation of the pool (whose size the cache knows).
    seed: u64,
    /// Through the host (`read_pages`, then `write_pages`) rather than by
    /// device copies (`copy_pages`).
    through_host: bool,
}

/// The forward kernel a case runs, where its tiles fit (else the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForwardKernel {
    /// The adapter's default.
    Default,
    /// The other kernel family (`common::forward_tiers`).
    OtherFamily,
    /// The cooperative-matrix kernel on `common::cooperative_gpu`
    /// (emulated where the adapter has no matrix units).
    Cooperative,
    /// The register-blocked kernel with f16 products
    /// (`AttentionConfig::f16_products`), for f16 cases on adapters with
    /// SHADER_F16; held to the bound of f16 weights (docs/semantics.md),
    /// as the cooperative-matrix kernel is.
    F16Products,
}

fn draw_case(rng: &mut SeededRng) -> Case {
    let operation = match rng.random_range(0..10) {
        0 | 1 => Operation::Decode {
            paged: rng.random_bool(0.6).then(|| 16 << rng.random_range(0..=4)),
            kv_splits: rng.random_bool(0.3).then(|| rng.random_range(1..=8)),
            cache: KvDType::ALL[rng.random_range(0..KvDType::ALL.len())],
            other_lanes: rng.random_bool(0.4),
        },
        2 | 3 => Operation::Backward,
        _ => Operation::Forward,
    };
    let heads_kv = rng.random_range(1..=3);
    let mut shape = AttentionShape {
        batch: rng.random_range(1..=3),
        seq_q: rng.random_range(1..=150),
        seq_kv: rng.random_range(1..=150),
        heads_q: heads_kv * rng.random_range(1..=3),
        heads_kv,
        head_dim: 8 * rng.random_range(1..=32),
        head_dim_v: 0,
    };
    shape.head_dim_v = shape.head_dim;
    // Some cases take head dims past 256 or values of another width, from a
    // short list (each pair compiles its kernels): decoding with values
    // narrower than keys is a latent cache; the backward stops at 256.
    let uneven: &[(usize, usize)] = match operation {
        Operation::Forward => &[
            (192, 128),
            (128, 192),
            (96, 64),
            (576, 512),
            (512, 512),
            (320, 320),
        ],
        Operation::Decode { .. } => &[(192, 128), (576, 512), (512, 512)],
        Operation::Backward => &[(192, 128), (128, 192), (96, 64)],
    };
    if !uneven.is_empty() && rng.random_bool(0.15) {
        (shape.head_dim, shape.head_dim_v) = uneven[rng.random_range(0..uneven.len())];
    }
    let mut cache_lens = Vec::new();
    if let Operation::Decode { .. } = operation {
        shape.seq_q = rng.random_range(1..=4);
        cache_lens = (0..shape.batch)
            .map(|_| rng.random_range(0..=300))
            .collect();
        shape.seq_kv = cache_lens.iter().copied().max().unwrap_or(0).max(1);
    }
    // Forward storage, or decoding's query/output type (the cache draws
    // its own); the backward runs f32 (its half storage has its own rule
    // in tests/backward.rs).
    let dtype = match operation {
        Operation::Forward | Operation::Decode { .. } => {
            [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)]
        }
        Operation::Backward => DType::F32,
    };
    let mut config = AttentionConfig::new().causal(rng.random_bool(0.4));
    if rng.random_bool(0.3) {
        let side = |rng: &mut SeededRng| rng.random_bool(0.7).then(|| rng.random_range(0..=160i64));
        config = config.window(side(rng), side(rng));
    }
    if rng.random_bool(0.3) {
        config = config.softcap(rng.random_range(1.0..50.0f32));
    }
    if rng.random_bool(0.3) {
        let magnitude = rng.random_range(0.02..1.0f32);
        config = config.scale(if rng.random_bool(0.2) {
            -magnitude
        } else {
            magnitude
        });
    }
    if rng.random_bool(0.3) {
        let slopes = (0..shape.heads_q)
            .map(|_| rng.random_range(0.0..0.5f32))
            .collect();
        config = config.alibi(Alibi::PerHead(slopes));
    }
    if rng.random_bool(0.25) {
        config = config.sinks(normal_vec(rng, shape.heads_q, 2.0));
    }
    let extras = match operation {
        Operation::Forward | Operation::Backward => 5,
        Operation::Decode { .. } => 1,
    };
    let extra = match rng.random_range(0..extras) {
        1 => Extra::BoolMask,
        2 => Extra::BiasMask,
        4 => {
            let sequences = rng.random_range(1..=4);
            // At least one token on each side, so the tensors exist.
            let offsets = |rng: &mut SeededRng| {
                let mut cu = vec![0];
                for _ in 0..sequences {
                    cu.push(cu.last().unwrap() + rng.random_range(0..=60));
                }
                let last = cu.last_mut().unwrap();
                *last = (*last).max(1);
                cu
            };
            let (cu_q, cu_k) = (offsets(rng), offsets(rng));
            shape.batch = 1;
            shape.seq_q = *cu_q.last().unwrap();
            shape.seq_kv = *cu_k.last().unwrap();
            Extra::Varlen { cu_q, cu_k }
        }
        3 => Extra::ValidLengths {
            q: (0..shape.batch)
                .map(|_| rng.random_range(0..=shape.seq_q))
                .collect(),
            kv: (0..shape.batch)
                .map(|_| rng.random_range(0..=shape.seq_kv))
                .collect(),
        },
        _ => Extra::None,
    };
    let bhsd = operation == Operation::Forward && rng.random_bool(0.3);
    let chunkable =
        operation == Operation::Forward && !matches!(extra, Extra::BoolMask | Extra::BiasMask);
    let keys_per_dispatch = (chunkable && rng.random_bool(0.25)).then(|| rng.random_range(1..=160));
    // Drawn for forward cases only, so decode and backward seeds draw as
    // they did before the kernel choice existed.
    let forward_kernel = if operation == Operation::Forward {
        match rng.random_range(0..10) {
            0..=3 => ForwardKernel::Default,
            4..=6 => ForwardKernel::OtherFamily,
            7 if dtype == DType::F16 => ForwardKernel::F16Products,
            7 => ForwardKernel::OtherFamily,
            _ => ForwardKernel::Cooperative,
        }
    } else {
        ForwardKernel::Default
    };
    // Drawn last and for backward cases only, so other cases draw as they
    // did before.
    let backward_blocked = operation == Operation::Backward && rng.random_bool(0.3);
    // Dropout (drawn after everything else, so other cases draw as they
    // did): training calls, on the kernels that apply it.
    if !matches!(operation, Operation::Decode { .. }) && rng.random_bool(0.25) {
        config = config.dropout(rng.random_range(0.0..0.9f32), rng.random());
    }
    Case {
        operation,
        cache_lens,
        shape,
        dtype,
        bhsd,
        config,
        extra,
        keys_per_dispatch,
        forward_kernel,
        backward_blocked,
        rotation: None,
        pages_per_buffer: None,
        page_move: None,
        ragged_append: false,
        query_counts: None,
    }
}

/// A `[batch, seq, heads, d]` tensor holding `data` (packed BSHD values),
/// stored packed or as a BHSD buffer seen through strides.
fn upload(gpu: &Gpu, dims: TensorShape, data: &[f32], dtype: DType, bhsd: bool) -> Tensor {
    if !bhsd {
        return Tensor::from_f32_as(gpu, dims, data, dtype).unwrap();
    }
    let TensorShape {
        batch,
        seq,
        heads,
        head_dim: d,
    } = dims;
    let mut stored = vec![0.0f32; data.len()];
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads {
                let from = ((b * seq + t) * heads + h) * d;
                let to = ((b * heads + h) * seq + t) * d;
                stored[to..to + d].copy_from_slice(&data[from..from + d]);
            }
        }
    }
    let flat = TensorShape::new(1, 1, 1, data.len());
    let buffer = Tensor::from_f32_as(gpu, flat, &stored, dtype).unwrap();
    let strides = Strides {
        batch: heads * seq * d,
        seq: d,
        head: seq * d,
    };
    buffer.view(dims, strides, 0).unwrap()
}

/// Runs one case; `Err` describes the first element outside the rule.
fn run_case(gpu: &Gpu, case: &Case, rng: &mut SeededRng) -> Result<(), String> {
    match case.operation {
        Operation::Forward => {
            let (gpu, tier) = forward_kernel(gpu, case);
            let f16_products = case.forward_kernel == ForwardKernel::F16Products
                && tier == Some(Tier::RegisterBlocked);
            let layout = two_pass_layout(gpu, case, tier);
            run_forward(gpu, case, (tier, f16_products, layout), rng)
        }
        Operation::Decode {
            paged,
            kv_splits,
            cache,
            other_lanes,
        } => {
            // Lanes over keys refuse heads whose state would not fit a
            // lane (KeyLanesState, a typed error tests/decode.rs covers):
            // such cases keep the adapter's layout.
            let others = common::other_decode_lanes(gpu);
            let lanes = (other_lanes && !others.is_empty())
                .then(|| others[case.shape.seq_kv % others.len()])
                .filter(|&lanes| !key_lanes_refused(gpu, case, cache, lanes));
            run_decode(gpu, case, (paged, kv_splits, cache, lanes), rng)
        }
        Operation::Backward => run_backward(gpu, case, rng),
    }
}

/// Whether the planner refuses `lanes` for the decode case's heads (lanes
/// over keys past a lane's state, key tiles past workgroup memory).
fn key_lanes_refused(gpu: &Gpu, case: &Case, dtype: KvDType, lanes: DecodeLanes) -> bool {
    let s = &case.shape;
    let cache = wgpu_flash_attn::CacheShape {
        batch: s.batch,
        heads_kv: s.heads_kv,
        head_dim: s.head_dim,
        head_dim_v: s.head_dim_v,
        longest: s.seq_kv,
        segments: 1,
        dtype,
    };
    let options = DecodeOptions::default().lanes(lanes);
    matches!(
        wgpu_flash_attn::DecodePlan::for_call(gpu.info(), &cache, s.seq_q, s.heads_q, &options),
        Err(Error::KeyLanesState { .. } | Error::WorkgroupMemory { .. })
    )
}

/// The device and forced tier a forward case runs on: the drawn kernel
/// where its tiles fit and, for a mask (which cannot run in key chunks),
/// where its loops fit the adapter's budget whole (past it the call is a
/// typed LoopBudget error, not a case of the rule); else the worker's
/// device's default.
fn forward_kernel<'g>(gpu: &'g Gpu, case: &Case) -> (&'g Gpu, Option<Tier>) {
    let (device, tier) = match case.forward_kernel {
        ForwardKernel::Default => return (gpu, None),
        ForwardKernel::OtherFamily => (gpu, forward_tiers(gpu, case.dtype)[1]),
        ForwardKernel::Cooperative => (
            common::cooperative_gpu().expect("the test adapter"),
            Some(Tier::CooperativeMatrix),
        ),
        ForwardKernel::F16Products => {
            let planned = ForwardPlan::for_call(
                gpu.info(),
                &case.shape,
                case.dtype,
                Some(Tier::RegisterBlocked),
            )
            .and_then(|plan| plan.with_f16_products(gpu.info()));
            if planned.is_err() {
                return (gpu, None);
            }
            (gpu, Some(Tier::RegisterBlocked))
        }
    };
    let fits = ForwardPlan::for_call(device.info(), &case.shape, case.dtype, tier)
        .is_ok_and(|plan| runs_whole(device, case, &plan));
    if fits { (device, tier) } else { (gpu, None) }
}

/// Whether `plan` runs the case: a masked case (which cannot run in key
/// chunks) only where its loops fit the adapter's budget whole (past it
/// the call is a typed LoopBudget error, not a case of the rule).
fn runs_whole(gpu: &Gpu, case: &Case, plan: &ForwardPlan) -> bool {
    let masked = matches!(case.extra, Extra::BoolMask | Extra::BiasMask);
    !masked
        || gpu
            .info()
            .loop_budget()
            .is_none_or(|budget| plan.loop_trips(case.shape.seq_kv as u64) <= budget)
}

/// The register-blocked layout a forward case runs with in place of the
/// planner's: the first of 8x16x4, 4x16x2 and 2x16x1 (64-key tiles, blocks
/// of 32, 8 and 2 rows) that the case plans in two passes
/// (`BlockedTiling::passes`, which no planner default takes), in the
/// cases that draw the other kernel family where that is the
/// register-blocked tier (few shapes: most fit those tiles whole or not at
/// all; a choice from the shape, so that seeds draw as before); `None`
/// otherwise.
fn two_pass_layout(gpu: &Gpu, case: &Case, tier: Option<Tier>) -> Option<BlockedLayout> {
    if case.forward_kernel != ForwardKernel::OtherFamily || tier != Some(Tier::RegisterBlocked) {
        return None;
    }
    [(8, 4), (4, 2), (2, 1)]
        .into_iter()
        .map(|(row_lanes, rows)| BlockedLayout {
            row_lanes,
            key_lanes: 16,
            rows,
        })
        .find(|&layout| {
            ForwardPlan::for_call_with_layout(gpu.info(), &case.shape, case.dtype, tier, layout)
                .is_ok_and(|plan| {
                    plan.blocked_tiling().is_some_and(|t| t.passes == 2)
                        && runs_whole(gpu, case, &plan)
                })
        })
}

/// The forward case, on `gpu` with `tier` forced if given (and f16
/// products when the flag says so, a caller's register-blocked layout
/// when one is given).
fn run_forward(
    gpu: &Gpu,
    case: &Case,
    (tier, f16_products, layout): (Option<Tier>, bool, Option<BlockedLayout>),
    rng: &mut SeededRng,
) -> Result<(), String> {
    let s = &case.shape;
    let mut config = case.config.clone();
    config.tier = tier;
    // (Otherwise the planner's choice, which the rule follows too.)
    config.f16_products = f16_products.then_some(true);
    config.blocked_layout = layout;
    let mut draw = |n: usize| -> Vec<f32> {
        normal_vec(rng, n, 1.0)
            .into_iter()
            .map(|x| round_to(case.dtype, x))
            .collect()
    };
    let (q, k, v) = (
        draw(s.q_shape().elements()),
        draw(s.k_shape().elements()),
        draw(s.v_shape().elements()),
    );
    let tensor = |dims, data: &[f32]| upload(gpu, dims, data, case.dtype, case.bhsd);
    let (qt, kt, vt) = (
        tensor(s.q_shape(), &q),
        tensor(s.k_shape(), &k),
        tensor(s.v_shape(), &v),
    );
    let out = tensor(s.o_shape(), &vec![f32::NAN; s.o_shape().elements()]);
    // Lse::new fills it with NaN: a row the call does not write stands out.
    let lse = Lse::new(gpu, s.batch, s.heads_q, s.seq_q).unwrap();
    let args = AttentionArgs {
        q: &qt,
        k: &kt,
        v: &vt,
        out: &out,
        lse: Some(&lse),
    };
    let mask_dims = [s.batch, s.heads_q, s.seq_q, s.seq_kv];
    let mask_len = mask_dims.iter().product();
    let mut mask_rng = seeded(rng.random());
    let mut chunked = ForwardOptions::new(&config);
    if let Some(keys) = case.keys_per_dispatch {
        chunked = chunked.keys_per_dispatch(keys);
    }
    // Standard attention in f32, the baseline of FlashAttention's rule, is
    // computed only where the flat bound is exceeded (`check_forward`).
    type Standard<'a> = Box<dyn FnOnce() -> reference::ReferenceOutput + 'a>;
    let (want, got, standard): (_, _, Standard) = match &case.extra {
        Extra::None => {
            gpu.run(|e| gpu.forward(e, &args, chunked.clone()))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let want = reference::attention(s, &q, &k, &v, &config).unwrap();
            let standard = || {
                reference::attention_rows_in_precision(
                    s,
                    &q,
                    &k,
                    &v,
                    &config,
                    DType::F32,
                    |_, _, _| true,
                )
                .unwrap()
            };
            (want, out.to_f32_vec(gpu).unwrap(), Box::new(standard))
        }
        Extra::BoolMask => {
            let values: Vec<bool> = (0..mask_len).map(|_| mask_rng.random_bool(0.7)).collect();
            let mask = AttentionMask::boolean(gpu, mask_dims, &values).unwrap();
            gpu.run(|e| gpu.forward(e, &args, ForwardOptions::new(&config).mask(&mask)))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let host = HostMask::Bool {
                dims: mask_dims,
                values: &values,
            };
            let want = reference::attention_masked(s, &q, &k, &v, &config, &host).unwrap();
            let (q, k, v, config) = (&q, &k, &v, &config);
            let standard = move || {
                let host = HostMask::Bool {
                    dims: mask_dims,
                    values: &values,
                };
                reference::attention_masked_in_precision(s, q, k, v, config, &host, DType::F32)
                    .unwrap()
            };
            (want, out.to_f32_vec(gpu).unwrap(), Box::new(standard))
        }
        Extra::BiasMask => {
            let values: Vec<f32> = (0..mask_len)
                .map(|_| {
                    if mask_rng.random_bool(0.2) {
                        f32::NEG_INFINITY
                    } else {
                        mask_rng.random_range(-3.0..3.0f32)
                    }
                })
                .collect();
            let mask = AttentionMask::bias(gpu, mask_dims, &values).unwrap();
            gpu.run(|e| gpu.forward(e, &args, ForwardOptions::new(&config).mask(&mask)))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let host = HostMask::Bias {
                dims: mask_dims,
                values: &values,
            };
            let want = reference::attention_masked(s, &q, &k, &v, &config, &host).unwrap();
            let (q, k, v, config) = (&q, &k, &v, &config);
            let standard = move || {
                let host = HostMask::Bias {
                    dims: mask_dims,
                    values: &values,
                };
                reference::attention_masked_in_precision(s, q, k, v, config, &host, DType::F32)
                    .unwrap()
            };
            (want, out.to_f32_vec(gpu).unwrap(), Box::new(standard))
        }
        Extra::Varlen { cu_q, cu_k } => {
            let options = chunked.clone().varlen(cu_q, cu_k);
            gpu.run(|e| gpu.forward(e, &args, options))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            // Each sequence is attention over its own tokens alone.
            let sequences: Vec<_> = cu_q
                .windows(2)
                .zip(cu_k.windows(2))
                .map(|(qs, ks)| (qs[0]..qs[1], ks[0]..ks[1]))
                .collect();
            let want = per_sequence_reference(s, [&q, &k, &v], &config, &sequences, None);
            let (q, k, v, config) = (&q, &k, &v, &config);
            let standard =
                move || per_sequence_reference(s, [q, k, v], config, &sequences, Some(DType::F32));
            (want, out.to_f32_vec(gpu).unwrap(), Box::new(standard))
        }
        Extra::ValidLengths { q: q_lens, kv } => {
            let lengths = ValidLengths {
                q: Some(q_lens),
                kv,
            };
            let options = chunked.clone().valid_lengths(lengths);
            gpu.run(|e| gpu.forward(e, &args, options))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            // Each sequence is attention over its valid rows and keys alone
            // (positions aligned to those lengths); rows past them are zeros.
            let sequences: Vec<_> = (0..s.batch)
                .map(|b| {
                    let (q0, k0) = (b * s.seq_q, b * s.seq_kv);
                    (q0..q0 + q_lens[b], k0..k0 + kv[b])
                })
                .collect();
            let want = per_sequence_reference(s, [&q, &k, &v], &config, &sequences, None);
            let (q, k, v, config) = (&q, &k, &v, &config);
            let standard =
                move || per_sequence_reference(s, [q, k, v], config, &sequences, Some(DType::F32));
            (want, out.to_f32_vec(gpu).unwrap(), Box::new(standard))
        }
    };
    // The f16 weights of the cooperative-matrix tier and of f16 products
    // (docs/semantics.md).
    let probabilities = common::weight_rounding(gpu, s, case.dtype, &config, &v)
        .map_err(|e| format!("the call ran, but its plan fails: {e}"))?;
    // The same f16 rounding of the weights enters their row sums, so the
    // logsumexp is that of the rounded weights: up to ln(1 + 2^-11) <=
    // 2^-11 more (docs/semantics.md).
    let rounded_sums = if probabilities > 0.0 {
        unit_roundoff(DType::F16)
    } else {
        0.0
    };
    let results = (got, lse.to_vec(gpu).unwrap());
    let extras = (unit_roundoff(case.dtype), probabilities, rounded_sums);
    check_forward(results, &want, standard, extras)
}

/// FlashAttention's rule on a forward's results `(out, lse)`: every output
/// within 1e-4 plus `roundoff` of its magnitude plus `extra` of the
/// reference's, every logsumexp within 1e-4 plus `lse_extra`
/// (`check_rule`, `check_lse`); where that flat bound is exceeded, plus
/// twice the largest error of standard attention in f32 (`standard`,
/// computed only then): with large scores and long heads, `q . k` in f32
/// is itself off by more than 1e-4, in any f32 kernel (docs/semantics.md).
fn check_forward(
    (got, got_lse): (Vec<f32>, Vec<f32>),
    want: &reference::ReferenceOutput,
    standard: impl FnOnce() -> reference::ReferenceOutput,
    (roundoff, extra, lse_extra): (f64, f64, f64),
) -> Result<(), String> {
    let flat = check_rule(&got, &want.out, roundoff, extra)
        .and_then(|()| check_lse(&got_lse, &want.lse, lse_extra));
    if flat.is_ok() {
        return flat;
    }
    let standard = standard();
    // Rows without keys are +inf in both: not an error.
    let largest_error = |of: &[f64], to: &[f64]| {
        of.iter()
            .zip(to)
            .filter(|(_, w)| w.is_finite())
            .fold(0.0f64, |m, (s, w)| m.max((s - w).abs()))
    };
    let out_error = largest_error(&standard.out, &want.out);
    let lse_error = largest_error(&standard.lse, &want.lse);
    let baseline = |e: String| {
        format!("{e} (standard f32 attention's errors: out {out_error:.3e}, lse {lse_error:.3e})")
    };
    check_rule(&got, &want.out, roundoff, extra + 2.0 * out_error).map_err(baseline)?;
    check_lse(&got_lse, &want.lse, lse_extra + 2.0 * lse_error).map_err(baseline)
}

/// Every logsumexp within the rule's 1e-4 (plus `extra`) of the
/// reference's (computed in f32 from inputs already rounded to the storage
/// type), +inf exactly for a row that sees no key; NaN (unwritten) fails.
fn check_lse(got: &[f32], want: &[f64], extra: f64) -> Result<(), String> {
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        let within = if w.is_infinite() {
            g == f32::INFINITY
        } else {
            (f64::from(g) - w).abs() <= TOLERANCE + extra
        };
        if !within {
            return Err(format!("lse[{index}] = {g}, reference {w}"));
        }
    }
    Ok(())
}

/// The reference of a batch whose sequences run alone: each is (query
/// tokens, key tokens) as ranges of the packed token axis (batch entries
/// laid end to end); rows of no sequence, or of one without keys, are zeros.
/// Exact, or standard attention in `precision` (the rule's baseline).
fn per_sequence_reference(
    s: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    config: &AttentionConfig,
    sequences: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
    precision: Option<DType>,
) -> reference::ReferenceOutput {
    let (q_row, k_row) = (s.heads_q * s.head_dim, s.heads_kv * s.head_dim);
    let (v_row, o_row) = (s.heads_kv * s.head_dim_v, s.heads_q * s.head_dim_v);
    let mut want = vec![0.0f64; s.o_shape().elements()];
    // Rows no sequence holds, or whose sequence has no keys, see no key.
    let mut lse = vec![f64::INFINITY; s.batch * s.heads_q * s.seq_q];
    // A sequence's index is its dropout mask's.
    for (index, (rows, keys)) in sequences.iter().enumerate() {
        if keys.is_empty() {
            // Rows that see no key: zeros, and logsumexp +inf, or the
            // sink's logit where there is one (docs/semantics.md).
            if let Some(sinks) = &config.sinks {
                for head in 0..s.heads_q {
                    for row in rows.clone() {
                        let (batch, local) = (row / s.seq_q, row % s.seq_q);
                        lse[(batch * s.heads_q + head) * s.seq_q + local] = f64::from(sinks[head]);
                    }
                }
            }
            continue;
        }
        if rows.is_empty() {
            continue;
        }
        let one = AttentionShape {
            batch: 1,
            seq_q: rows.len(),
            seq_kv: keys.len(),
            ..*s
        };
        let q_rows = &q[rows.start * q_row..rows.end * q_row];
        let k_rows = &k[keys.start * k_row..keys.end * k_row];
        let v_rows = &v[keys.start * v_row..keys.end * v_row];
        let result = match precision {
            None => reference::attention_of_sequences(&one, q_rows, k_rows, v_rows, config, index),
            Some(dtype) => reference::attention_of_sequences_in_precision(
                &one, q_rows, k_rows, v_rows, config, index, dtype,
            ),
        }
        .unwrap();
        want[rows.start * o_row..rows.end * o_row].copy_from_slice(&result.out);
        // Row r of the sequence is row `rows.start + r` of the (batch x
        // seq_q) rows; the logsumexp is [batch, heads_q, seq_q].
        for head in 0..s.heads_q {
            for r in 0..rows.len() {
                let row = rows.start + r;
                let (batch, local) = (row / s.seq_q, row % s.seq_q);
                lse[(batch * s.heads_q + head) * s.seq_q + local] =
                    result.lse[head * rows.len() + r];
            }
        }
    }
    reference::ReferenceOutput { out: want, lse }
}

/// The accuracy rule on every element: 1e-4 plus the storage rounding,
/// plus `extra` (the cooperative-matrix tier's f16 probabilities).
fn check_rule(got: &[f32], want: &[f64], roundoff: f64, extra: f64) -> Result<(), String> {
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        let error = (f64::from(g) - w).abs();
        if g.is_nan() || error > TOLERANCE + roundoff * w.abs() + extra {
            return Err(format!(
                "out[{index}] = {g}, reference {w} (error {error:.3e})"
            ));
        }
    }
    Ok(())
}

/// The decode case: a cache filled with random tokens (pages from a
/// shuffled pool when paged), then `seq_q` query tokens per sequence
/// against each sequence's reference.
fn run_decode(
    gpu: &Gpu,
    case: &Case,
    (paged, kv_splits, dtype, lanes): (Option<usize>, Option<usize>, KvDType, Option<DecodeLanes>),
    rng: &mut SeededRng,
) -> Result<(), String> {
    let s = &case.shape;
    let longest = s.seq_kv;
    let layout = match paged {
        Some(page_size) => KvLayout::Paged {
            page_size,
            pages: s.batch * longest.div_ceil(page_size),
        },
        None => KvLayout::Contiguous { capacity: longest },
    };
    // Values narrower than keys: a latent cache (values are key prefixes).
    let latent = !s.same_head_dims();
    let mut cache_config = KvCacheConfig::new(s.batch, s.heads_kv, s.head_dim, layout).dtype(dtype);
    if latent {
        cache_config = cache_config.latent_values(s.head_dim_v);
    }
    if let (Some(pages), KvLayout::Paged { page_size, .. }) = (case.pages_per_buffer, layout) {
        let page_bytes = page_size * s.heads_kv * dtype.vector_bytes(s.head_dim);
        cache_config = cache_config.max_buffer_bytes((pages * page_bytes) as u64);
    }
    let mut cache = KvCache::new(gpu, cache_config).map_err(|e| format!("cache: {e}"))?;
    if let KvLayout::Paged { page_size, pages } = layout {
        let mut pool: Vec<u32> = (0..pages as u32).collect();
        pool.shuffle(rng);
        let per_seq = longest.div_ceil(page_size);
        for b in 0..s.batch {
            cache
                .set_block_table(b, &pool[b * per_seq..(b + 1) * per_seq])
                .map_err(|e| format!("block table: {e}"))?;
        }
    }
    let tokens = s.k_shape();
    let rotation = || {
        case.rotation
            .as_ref()
            .map(|(rope, position_offsets)| KeyRotation {
                rope,
                position_offsets,
            })
    };
    let mut k = normal_vec(rng, tokens.elements(), 1.0);
    // The keys a rotation should store: RoPE in f64 at each token's cache
    // position plus its sequence's offset.
    let rotated = match &case.rotation {
        Some((rope, offsets)) => Some(rotated_keys(rope, offsets, tokens, &k, latent)?),
        None => None,
    };
    let mut v = if latent {
        append_rows(gpu, &mut cache, case, (tokens, &k, None), rotation())?;
        k.chunks(s.head_dim)
            .flat_map(|key| key[..s.head_dim_v].to_vec())
            .collect()
    } else {
        let v = normal_vec(rng, tokens.elements(), 1.0);
        append_rows(gpu, &mut cache, case, (tokens, &k, Some(&v)), rotation())?;
        v
    };
    for (b, &len) in case.cache_lens.iter().enumerate() {
        cache.set_len(b, len).map_err(|e| format!("set_len: {e}"))?;
        // Half and int8 caches, and rotated keys: the reference runs on
        // what is stored (tests/decode.rs bounds the storage rounding
        // itself); an f32 cache's rotated keys are first held to the
        // rotation's bound.
        if dtype != KvDType::F32 || rotated.is_some() {
            let (stored_k, stored_v) = cache
                .read_sequence(gpu, b)
                .map_err(|e| format!("read back: {e}"))?;
            let at = b * longest * s.heads_kv;
            if let (Some(want), KvDType::F32) = (&rotated, dtype) {
                let want = &want[at * s.head_dim..][..stored_k.len()];
                for (index, (&got, &w)) in stored_k.iter().zip(want).enumerate() {
                    let error = (f64::from(got) - w).abs();
                    if error.is_nan() || error > ROPE_TOLERANCE {
                        return Err(format!(
                            "sequence {b}: rotated key element {index} = {got}, reference {w} \
                             (error {error:.3e})"
                        ));
                    }
                }
            }
            k[at * s.head_dim..][..stored_k.len()].copy_from_slice(&stored_k);
            v[at * s.head_dim_v..][..stored_v.len()].copy_from_slice(&stored_v);
        }
    }
    if let Some(moved) = &case.page_move {
        move_pages(gpu, &mut cache, moved)?;
    }
    // A ragged step's queries are one packed batch entry, sequence `b`'s
    // `counts[b]` rows after the sequences before it.
    let counts = case.query_counts.as_deref();
    release_behind_window(&mut cache, case, counts)?;
    let q_shape = match counts {
        Some(counts) => AttentionShape {
            batch: 1,
            seq_q: counts.iter().sum(),
            ..*s
        },
        None => *s,
    };
    // Queries and output in the case's type, the queries rounded to it so
    // the reference reads what the GPU does.
    let q: Vec<f32> = normal_vec(rng, q_shape.q_shape().elements(), 1.0)
        .into_iter()
        .map(|x| round_to(case.dtype, x))
        .collect();
    let qt = Tensor::from_f32_as(gpu, q_shape.q_shape(), &q, case.dtype).unwrap();
    let out = Tensor::filled_as(gpu, q_shape.o_shape(), f32::NAN, case.dtype).unwrap();
    let lse = Lse::new(gpu, q_shape.batch, s.heads_q, q_shape.seq_q).unwrap();
    let args = DecodeArgs {
        q: &qt,
        cache: &cache,
        out: &out,
        lse: Some(&lse),
    };
    let options = DecodeOptions {
        config: case.config.clone(),
        kv_splits,
        lanes,
        token_trees: None,
    };
    let plan = gpu
        .run(|e| match counts {
            Some(counts) => gpu
                .decode_ragged(e, &args, counts, options.clone())
                .map(|plan| plan.expect("the draw gives some sequence query tokens")),
            None => gpu.decode(e, &args, options.clone()),
        })
        .map_err(|e| format!("GPU call failed: {e}"))?;
    if let Some(pages) = case.pages_per_buffer {
        let buffers = cache.pool_pages().div_ceil(pages);
        if plan.segments as usize != buffers {
            return Err(format!(
                "{} pages of {pages} per buffer: {buffers} buffers expected, the step ran over {}",
                cache.pool_pages(),
                plan.segments
            ));
        }
    }
    let mut first = 0;
    let sequences: Vec<_> = (0..s.batch)
        .map(|b| {
            let rows = counts.map_or(s.seq_q, |counts| counts[b]);
            let (q0, k0) = (counts.map_or(b * s.seq_q, |_| first), b * longest);
            first += rows;
            (q0..q0 + rows, k0..k0 + case.cache_lens[b])
        })
        .collect();
    let reference_of = |precision| {
        per_sequence_reference(&q_shape, [&q, &k, &v], &case.config, &sequences, precision)
    };
    let want = reference_of(None);
    let standard = || reference_of(Some(DType::F32));
    let results = (out.to_f32_vec(gpu).unwrap(), lse.to_vec(gpu).unwrap());
    check_forward(
        results,
        &want,
        standard,
        (unit_roundoff(case.dtype), 0.0, 0.0),
    )
}

/// Paged decode cases with a left window first release each sequence's
/// pages behind it, as a server does (`KvCache::release_pages_before`):
/// the window hides those keys, so the reference, which keeps them, still
/// holds.
fn release_behind_window(
    cache: &mut KvCache,
    case: &Case,
    counts: Option<&[usize]>,
) -> Result<(), String> {
    let (Some(left), Operation::Decode { paged: Some(_), .. }) =
        (case.config.window_left, &case.operation)
    else {
        return Ok(());
    };
    for (b, &len) in case.cache_lens.iter().enumerate() {
        let queries = counts.map_or(case.shape.seq_q, |counts| counts[b]);
        if queries == 0 {
            continue;
        }
        let first_visible = len.saturating_sub(queries).saturating_sub(left as usize);
        cache
            .release_pages_before(b, first_visible)
            .map_err(|e| format!("release_pages_before({b}, {first_visible}): {e}"))?;
    }
    Ok(())
}

/// The backward case (f32): forward and backward on the GPU, every
/// gradient against the reference backward.
fn run_backward(gpu: &Gpu, case: &Case, rng: &mut SeededRng) -> Result<(), String> {
    let s = &case.shape;
    let (q_dims, kv_dims) = (s.q_shape(), s.k_shape());
    let (v_dims, o_dims) = (s.v_shape(), s.o_shape());
    let (q, k, v, d_out) = (
        normal_vec(rng, q_dims.elements(), 1.0),
        normal_vec(rng, kv_dims.elements(), 1.0),
        normal_vec(rng, v_dims.elements(), 1.0),
        normal_vec(rng, o_dims.elements(), 1.0),
    );
    let upload = |dims, data: &[f32]| Tensor::from_f32(gpu, dims, data).unwrap();
    let poisoned = |dims| Tensor::filled(gpu, dims, f32::NAN).unwrap();
    let (qt, kt, vt, dot) = (
        upload(q_dims, &q),
        upload(kv_dims, &k),
        upload(v_dims, &v),
        upload(o_dims, &d_out),
    );
    let (out, dq, dk, dv) = (
        poisoned(o_dims),
        poisoned(q_dims),
        poisoned(kv_dims),
        poisoned(v_dims),
    );
    let lse = Lse::new(gpu, s.batch, s.heads_q, s.seq_q).unwrap();
    let mask_dims = [s.batch, s.heads_q, s.seq_q, s.seq_kv];
    let mask_len = mask_dims.iter().product();
    let mut mask_rng = seeded(rng.random());
    let bits: Vec<bool> = (0..mask_len).map(|_| mask_rng.random_bool(0.7)).collect();
    let bias: Vec<f32> = (0..mask_len)
        .map(|_| match mask_rng.random_bool(0.2) {
            true => f32::NEG_INFINITY,
            false => mask_rng.random_range(-3.0..3.0f32),
        })
        .collect();
    let (mask, host) = match case.extra {
        Extra::BoolMask => (
            Some(AttentionMask::boolean(gpu, mask_dims, &bits).unwrap()),
            Some(HostMask::Bool {
                dims: mask_dims,
                values: &bits,
            }),
        ),
        Extra::BiasMask => (
            Some(AttentionMask::bias(gpu, mask_dims, &bias).unwrap()),
            Some(HostMask::Bias {
                dims: mask_dims,
                values: &bias,
            }),
        ),
        _ => (None, None),
    };
    // The register-blocked passes where both the forward's and the
    // backward's tiles fit this adapter, else its default.
    let blocked = case.config.clone().tier(Tier::RegisterBlocked);
    let config = if case.backward_blocked
        && ForwardPlan::for_call(gpu.info(), s, DType::F32, blocked.tier).is_ok()
        && BackwardPlan::for_config(gpu.info(), s, DType::F32, &blocked).is_ok()
    {
        blocked
    } else {
        case.config.clone()
    };
    let mut options = ForwardOptions::new(&config);
    if let Some(mask) = &mask {
        options = options.mask(mask);
    }
    // Padded and packed batches: each sequence is attention over its own
    // tokens alone (as ranges of the packed token axis).
    let sequences: Option<Vec<_>> = match &case.extra {
        Extra::ValidLengths { q: q_lens, kv } => {
            options = options.valid_lengths(ValidLengths {
                q: Some(q_lens),
                kv,
            });
            Some(
                (0..s.batch)
                    .map(|b| {
                        let (q0, k0) = (b * s.seq_q, b * s.seq_kv);
                        (q0..q0 + q_lens[b], k0..k0 + kv[b])
                    })
                    .collect(),
            )
        }
        Extra::Varlen { cu_q, cu_k } => {
            options = options.varlen(cu_q, cu_k);
            Some(
                cu_q.windows(2)
                    .zip(cu_k.windows(2))
                    .map(|(qs, ks)| (qs[0]..qs[1], ks[0]..ks[1]))
                    .collect(),
            )
        }
        _ => None,
    };
    let dsinks = case
        .config
        .sinks
        .as_ref()
        .map(|_| SinkGrads::new(gpu, s.heads_q).unwrap());
    gpu.run(|e| {
        let backward = BackwardArgs {
            q: &qt,
            k: &kt,
            v: &vt,
            out: &out,
            lse: &lse,
            d_out: &dot,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dsinks: dsinks.as_ref(),
        };
        gpu.forward(e, &backward.forward_args(), options.clone())?;
        gpu.backward(e, &backward, options.clone())
    })
    .map_err(|e| format!("GPU call failed: {e}"))?;
    let inputs = [&q[..], &k[..], &v[..], &d_out[..]];
    let [want, standard] = match &sequences {
        Some(sequences) => per_sequence_backward(s, inputs, &case.config, sequences),
        None => [
            reference::attention_backward(s, inputs, &case.config, host.as_ref()).unwrap(),
            reference::attention_backward_f32(s, inputs, &case.config, host.as_ref()).unwrap(),
        ],
    };
    for (name, got, want, standard) in [
        ("dq", dq.to_f32_vec(gpu).unwrap(), &want.dq, &standard.dq),
        ("dk", dk.to_f32_vec(gpu).unwrap(), &want.dk, &standard.dk),
        ("dv", dv.to_f32_vec(gpu).unwrap(), &want.dv, &standard.dv),
        (
            "dsinks",
            dsinks.map_or_else(Vec::new, |d| d.to_vec(gpu).unwrap()),
            &want.dsinks,
            &standard.dsinks,
        ),
    ] {
        let magnitude = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
        // FlashAttention's rule: twice the error of standard attention's
        // backward in f32, over the floor (docs/semantics.md).
        let standard_error = standard
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (s, w)| m.max((s - w).abs()));
        let bound = GRADIENT_TOLERANCE * magnitude + 2.0 * standard_error;
        for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
            let error = (f64::from(g) - w).abs();
            if g.is_nan() || error > bound {
                return Err(format!(
                    "{name}[{index}] = {g}, reference {w} (error {error:.3e}, largest gradient \
                     {magnitude:.3e}, standard f32 backward's error {standard_error:.3e})"
                ));
            }
        }
    }
    Ok(())
}

/// The reference gradients (f64) and standard attention's in f32 of a
/// batch whose sequences run alone, each (query tokens, key tokens) as
/// ranges of the packed token axis: rows and keys of no sequence get zero
/// gradients, and the sinks' gradients add up over the sequences.
fn per_sequence_backward(
    s: &AttentionShape,
    [q, k, v, d_out]: [&[f32]; 4],
    config: &AttentionConfig,
    sequences: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
) -> [reference::ReferenceGradients; 2] {
    let (q_row, k_row) = (s.heads_q * s.head_dim, s.heads_kv * s.head_dim);
    let (v_row, o_row) = (s.heads_kv * s.head_dim_v, s.heads_q * s.head_dim_v);
    let zeros = || reference::ReferenceGradients {
        out: Vec::new(),
        lse: Vec::new(),
        dq: vec![0.0; s.q_shape().elements()],
        dk: vec![0.0; s.k_shape().elements()],
        dv: vec![0.0; s.v_shape().elements()],
        dsinks: vec![0.0; config.sinks.as_ref().map_or(0, Vec::len)],
    };
    let mut totals = [zeros(), zeros()];
    // A sequence's index is its dropout mask's.
    for (index, (rows, keys)) in sequences.iter().enumerate() {
        if rows.is_empty() || keys.is_empty() {
            continue;
        }
        let one = AttentionShape {
            batch: 1,
            seq_q: rows.len(),
            seq_kv: keys.len(),
            ..*s
        };
        let inputs = [
            &q[rows.start * q_row..rows.end * q_row],
            &k[keys.start * k_row..keys.end * k_row],
            &v[keys.start * v_row..keys.end * v_row],
            &d_out[rows.start * o_row..rows.end * o_row],
        ];
        let parts = [
            reference::attention_backward_of_sequences(&one, inputs, config, index).unwrap(),
            reference::attention_backward_f32_of_sequences(&one, inputs, config, index).unwrap(),
        ];
        for (total, part) in totals.iter_mut().zip(parts) {
            total.dq[rows.start * q_row..rows.end * q_row].copy_from_slice(&part.dq);
            total.dk[keys.start * k_row..keys.end * k_row].copy_from_slice(&part.dk);
            total.dv[keys.start * v_row..keys.end * v_row].copy_from_slice(&part.dv);
            for (sum, x) in total.dsinks.iter_mut().zip(&part.dsinks) {
                *sum += x;
            }
        }
    }
    totals
}

/// Mixed into a case's seed to draw a decode case's key rotation (joined
/// the fuzz later; a seed of its own leaves every other draw as before).
const ROPE_SALT: u64 = 0x0e0e_5a17_0000_0000;

/// RoPE fused into a decode case's append in 40 % of decode cases: either
/// convention, a base from 100 to 10^6, the whole head or a partial
/// rotary dim (a latent cache's rotates the elements past its values),
/// positions offset by up to 4,000,000 per sequence.
fn draw_rotation(seed: u64, case: &Case) -> Option<(Rope, Vec<u32>)> {
    let mut rng = seeded(seed ^ ROPE_SALT);
    if !matches!(case.operation, Operation::Decode { .. }) || !rng.random_bool(0.4) {
        return None;
    }
    let s = &case.shape;
    let style = [RopeStyle::Interleaved, RopeStyle::HalfSplit][rng.random_range(0..2)];
    let mut rope = Rope::new(style)
        .base([10_000.0, 500_000.0, rng.random_range(100.0..1e6)][rng.random_range(0..3)]);
    // A latent cache's rotation may not reach the values (its first
    // head_dim_v elements).
    let room = if s.same_head_dims() {
        s.head_dim
    } else {
        s.head_dim - s.head_dim_v
    };
    if !s.same_head_dims() || rng.random_bool(0.5) {
        rope = rope.rotary_dim(2 * rng.random_range(1..=room / 2));
    }
    let offsets = (0..s.batch)
        .map(|_| rng.random_range(0..=4_000_000u32))
        .collect();
    Some((rope, offsets))
}

/// Mixed into a case's seed to draw how many pages each buffer of a paged
/// decode case's pool holds (joined the fuzz later, as RoPE did).
const SEGMENT_SALT: u64 = 0x5e6_0000_0000;

/// In 30 % of paged decode cases, a pool spread over buffers of 1-4 pages
/// each (one dispatch per buffer for the append and the step, partial
/// results merged across them), as when a pool outgrows one binding.
fn draw_buffer_pages(seed: u64, case: &Case) -> Option<usize> {
    let mut rng = seeded(seed ^ SEGMENT_SALT);
    match case.operation {
        Operation::Decode { paged: Some(_), .. } if rng.random_bool(0.3) => {
            Some(rng.random_range(1..=4))
        }
        _ => None,
    }
}

/// Mixed into a case's seed to draw its page move (joined the fuzz later
/// still).
const PAGE_MOVE_SALT: u64 = 0x9a6e_0000_0000;

/// In 30 % of decode cases, a random permutation of the pool's pages,
/// applied by device copies or through the host.
fn draw_page_move(seed: u64, case: &Case) -> Option<PageMove> {
    if !matches!(case.operation, Operation::Decode { .. }) {
        return None;
    }
    let mut rng = seeded(seed ^ PAGE_MOVE_SALT);
    rng.random_bool(0.3).then(|| PageMove {
        seed: rng.random(),
        through_host: rng.random_bool(0.5),
    })
}

/// Mixed into a case's seed to draw whether its cache is filled by a
/// ragged append (joined the fuzz last).
const RAGGED_SALT: u64 = 0x7a66_0000_0000;

/// In 40 % of decode cases, one ragged append of each sequence's length.
fn draw_ragged_append(seed: u64, case: &Case) -> bool {
    matches!(case.operation, Operation::Decode { .. })
        && seeded(seed ^ RAGGED_SALT).random_bool(0.4)
}

/// Mixed into a case's seed to draw whether its step is a ragged decode
/// (joined the fuzz after ragged appends).
const QUERY_COUNTS_SALT: u64 = 0x9c07_0000_0000;

/// In 40 % of decode cases, a ragged step: each sequence's query tokens
/// drawn from 0 to the case's `seq_q` (more than its keys allowed, as in a
/// uniform step), at least one sequence with some; in a quarter of those
/// one sequence with a prompt chunk of 64-600 tokens.
fn draw_query_counts(seed: u64, case: &Case) -> Option<Vec<usize>> {
    let mut rng = seeded(seed ^ QUERY_COUNTS_SALT);
    if !matches!(case.operation, Operation::Decode { .. }) || !rng.random_bool(0.4) {
        return None;
    }
    let s = &case.shape;
    let mut counts: Vec<usize> = (0..s.batch)
        .map(|_| rng.random_range(0..=s.seq_q))
        .collect();
    if counts.iter().all(|&n| n == 0) {
        counts[rng.random_range(0..s.batch)] = s.seq_q;
    }
    // A quarter of them with a prompt chunk: one sequence with enough query
    // rows that, where the route is open (f32 cache and queries, kernels
    // left to the planners), the call splits into the forward for it and
    // the decode kernel for the others.
    if rng.random_bool(0.25) {
        counts[rng.random_range(0..s.batch)] = rng.random_range(64..=600);
    }
    Some(counts)
}

/// Appends the decode case's tokens (`k` and `v` rows `[batch, longest,
/// heads, head_dim]`; no `v` for a latent cache) to `cache`: all `longest`
/// of every sequence by one uniform append (the lengths are set back to
/// the case's after), or with `case.ragged_append` each sequence's own
/// `cache_lens[b]` first rows by one ragged append.
fn append_rows(
    gpu: &Gpu,
    cache: &mut KvCache,
    case: &Case,
    (tokens, k, v): (TensorShape, &[f32], Option<&[f32]>),
    rotation: Option<KeyRotation<'_>>,
) -> Result<(), String> {
    let (shape, counts, k, v) = if case.ragged_append {
        let token = tokens.heads * tokens.head_dim;
        let rows = |data: &[f32]| -> Cow<'_, [f32]> {
            case.cache_lens
                .iter()
                .enumerate()
                .flat_map(|(b, &len)| &data[b * tokens.seq * token..][..len * token])
                .copied()
                .collect()
        };
        let total: usize = case.cache_lens.iter().sum();
        if total == 0 {
            return Ok(());
        }
        let shape = TensorShape::new(1, total, tokens.heads, tokens.head_dim);
        (shape, Some(&case.cache_lens[..]), rows(k), v.map(rows))
    } else {
        (tokens, None, Cow::Borrowed(k), v.map(Cow::Borrowed))
    };
    let kt = Tensor::from_f32(gpu, shape, &k).unwrap();
    let vt = v.map(|v| Tensor::from_f32(gpu, shape, &v).unwrap());
    let appended = gpu.run(|e| match (counts, &vt) {
        (None, None) => cache.append_latent(gpu, e, &kt, rotation),
        (None, Some(vt)) => cache.append(gpu, e, &kt, vt, rotation),
        (Some(counts), None) => cache.append_latent_ragged(gpu, e, counts, &kt, rotation),
        (Some(counts), Some(vt)) => cache.append_ragged(gpu, e, counts, &kt, vt, rotation),
    });
    appended.map_err(|e| format!("append: {e}"))
}

/// Moves every page `p` of `cache`'s pool to page `to[p]`, `to` a random
/// permutation, then points each sequence's table at the new places: what
/// each sequence holds is unchanged.
fn move_pages(gpu: &Gpu, cache: &mut KvCache, moved: &PageMove) -> Result<(), String> {
    let from: Vec<u32> = (0..cache.pool_pages() as u32).collect();
    let mut to = from.clone();
    to.shuffle(&mut seeded(moved.seed));
    if moved.through_host {
        let bytes = cache
            .read_pages(gpu, &from)
            .map_err(|e| format!("read_pages: {e}"))?;
        gpu.run(|e| cache.write_pages(gpu, e, &to, &bytes))
            .map_err(|e| format!("write_pages: {e}"))?;
    } else {
        let pairs: Vec<(u32, u32)> = from.iter().copied().zip(to.iter().copied()).collect();
        gpu.run(|e| cache.copy_pages(gpu, e, &pairs))
            .map_err(|e| format!("copy_pages: {e}"))?;
    }
    for b in 0..cache.batch() {
        let table: Vec<u32> = cache
            .block_table(b)
            .unwrap()
            .iter()
            .map(|&p| to[p as usize])
            .collect();
        cache
            .set_block_table(b, &table)
            .map_err(|e| format!("moved block table: {e}"))?;
    }
    Ok(())
}

/// The keys (packed `[batch, tokens, heads, head_dim]`) as a rotation
/// should store them, in f64: RoPE at each token's cache position plus its
/// sequence's offset, over the first `rotary_dim` elements of each vector,
/// or for a latent cache its last ones (past the value prefix).
fn rotated_keys(
    rope: &Rope,
    offsets: &[u32],
    tokens: TensorShape,
    k: &[f32],
    latent: bool,
) -> Result<Vec<f64>, String> {
    let first: Vec<u64> = offsets.iter().map(|&o| u64::from(o)).collect();
    let d = tokens.head_dim;
    let rotary_dim = rope
        .checked_rotary_dim(d)
        .map_err(|e| format!("rope: {e}"))?;
    if !latent {
        return reference::rope(rope, tokens, k, &first).map_err(|e| format!("rope: {e}"));
    }
    // The tails as vectors of their own, rotated whole, put back.
    let tails: Vec<f32> = k
        .chunks(d)
        .flat_map(|v| v[d - rotary_dim..].to_vec())
        .collect();
    let tail_shape = TensorShape {
        head_dim: rotary_dim,
        ..tokens
    };
    let whole = Rope {
        rotary_dim: None,
        ..*rope
    };
    let rotated =
        reference::rope(&whole, tail_shape, &tails, &first).map_err(|e| format!("rope: {e}"))?;
    Ok(k.chunks(d)
        .zip(rotated.chunks(rotary_dim))
        .flat_map(|(v, tail)| {
            v[..d - rotary_dim]
                .iter()
                .map(|&x| f64::from(x))
                .chain(tail.iter().copied())
                .collect::<Vec<f64>>()
        })
        .collect())
}

/// A linear attention case (`Gpu::linear_attention` against
/// `reference::linear_attention`).
#[derive(Debug)]
struct LinearCase {
    shape: LinearShape,
    config: LinearConfig,
    dtype: DType,
    /// Q and K drawn from N(0, qk_scale^2) (absolute values under the
    /// identity feature map, which keeps every denominator positive).
    qk_scale: f32,
    /// Q, K and V stored as BHSD buffers seen through strides.
    bhsd: bool,
    /// Seeds the inputs (and a host state).
    input_seed: u64,
    /// Causal cases only: the state carried in (zeros, or random values
    /// from the host) and the token counts of the calls the sequence is
    /// cut into, each carrying the state to the next.
    state: Option<LinearStateCase>,
}

#[derive(Debug)]
struct LinearStateCase {
    from_host: bool,
    pieces: Vec<usize>,
}

/// Mixed into a case's seed to draw whether it is a linear attention case:
/// linear attention joined the fuzz later, and a seed of its own for that
/// choice leaves every other case drawing (and replaying) as before.
const LINEAR_SALT: u64 = 0x11ea_a77e_0000_0000;

/// A linear attention case in 10 % of the seeds: batch, lengths (across
/// the kernel's 64-token chunks), GQA groups, head dims each a multiple of
/// 8 up to 256, causal or not (non-causal with its own key length), either
/// feature map, `eps`, a forced tier, f32, f16 or bf16 storage, packed or
/// strided inputs, and for causal cases a state carried in and across 1-3
/// calls.
fn draw_linear_case(seed: u64) -> Option<LinearCase> {
    let mut rng = seeded(seed ^ LINEAR_SALT);
    if !rng.random_bool(0.1) {
        return None;
    }
    let heads_kv = rng.random_range(1..=3);
    let causal = rng.random_bool(0.5);
    let seq_q = rng.random_range(1..=200);
    let head_dim = 8 * rng.random_range(1..=32);
    let shape = LinearShape {
        batch: rng.random_range(1..=3),
        seq_q,
        seq_kv: if causal {
            seq_q
        } else {
            rng.random_range(1..=200)
        },
        heads_q: heads_kv * rng.random_range(1..=3),
        heads_kv,
        head_dim,
        head_dim_v: if rng.random_bool(0.7) {
            head_dim
        } else {
            8 * rng.random_range(1..=32)
        },
    };
    let mut config = LinearConfig::new().causal(causal);
    if rng.random_bool(0.2) {
        config = config.feature_map(FeatureMap::Identity);
    }
    if rng.random_bool(0.3) {
        config = config.eps(rng.random_range(0.0..1e-2f32));
    }
    config.tier = [
        None,
        None,
        Some(Tier::Portable),
        Some(Tier::SubgroupBroadcast),
    ][rng.random_range(0..4)];
    let state = (causal && rng.random_bool(0.4)).then(|| {
        // Cut points anywhere, so pieces need not be whole chunks.
        let mut cuts: Vec<usize> = (0..rng.random_range(0..=2))
            .map(|_| rng.random_range(1..=seq_q))
            .collect();
        cuts.extend([0, seq_q]);
        cuts.sort_unstable();
        cuts.dedup();
        LinearStateCase {
            from_host: rng.random_bool(0.5),
            pieces: cuts.windows(2).map(|w| w[1] - w[0]).collect(),
        }
    });
    Some(LinearCase {
        shape,
        config,
        dtype: [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)],
        qk_scale: rng.random_range(0.3..2.0f32),
        bhsd: rng.random_bool(0.3),
        input_seed: rng.random(),
        state,
    })
}

/// Tokens `range` of each sequence of a packed `[batch, seq, heads, dim]`
/// tensor (`row` = heads x dim values per token).
fn token_range<T: Copy>(
    data: &[T],
    seq: usize,
    row: usize,
    range: std::ops::Range<usize>,
) -> Vec<T> {
    data.chunks(seq * row)
        .flat_map(|sequence| sequence[range.start * row..range.end * row].to_vec())
        .collect()
}

/// Runs a linear attention case: the whole call, or the sequence in pieces
/// carrying the state, every output within the crate's rule of the
/// reference over the whole sequence.
fn run_linear_case(gpu: &Gpu, case: &LinearCase) -> Result<(), String> {
    let LinearCase {
        shape, dtype, bhsd, ..
    } = *case;
    let mut config = case.config;
    // A forced tier the adapter lacks is a typed error, not a case of the
    // rule: such cases run on the default tier.
    if let Err(Error::TierUnavailable { .. }) =
        LinearPlan::for_call(gpu.info(), &shape, dtype, &config)
    {
        config.tier = None;
    }
    let mut rng = seeded(case.input_seed);
    let non_negative = config.feature_map == FeatureMap::Identity;
    let mut draw = |n: usize, scale: f32, abs: bool| -> Vec<f32> {
        normal_vec(&mut rng, n, scale)
            .into_iter()
            .map(|x| round_to(dtype, if abs { x.abs() } else { x }))
            .collect()
    };
    let q = draw(shape.q_shape().elements(), case.qk_scale, non_negative);
    let k = draw(shape.k_shape().elements(), case.qk_scale, non_negative);
    let v = draw(shape.v_shape().elements(), 1.0, false);
    let (d, dv, heads_kv) = (shape.head_dim, shape.head_dim_v, shape.heads_kv);
    let slots = shape.batch * heads_kv;
    // A host state as after some earlier tokens: z is a sum of positive
    // features, so it stays positive.
    let initial = case.state.as_ref().filter(|s| s.from_host).map(|_| {
        let s: Vec<f32> = draw(slots * d * dv, 3.0, false);
        let z: Vec<f32> = draw(slots * d, 3.0, true)
            .into_iter()
            .map(|x| x + 10.0)
            .collect();
        (s, z)
    });
    let reference_state = initial.as_ref().map(|(s, z)| LinearReferenceState {
        s: s.iter().map(|&x| f64::from(x)).collect(),
        z: z.iter().map(|&x| f64::from(x)).collect(),
    });
    let want = reference::linear_attention(&shape, &q, &k, &v, &config, reference_state.as_ref())
        .map_err(|e| format!("reference: {e}"))?;
    let state = match (&case.state, &initial) {
        (None, _) => None,
        (Some(_), Some((s, z))) => Some(LinearState::from_f32(
            gpu,
            [shape.batch, heads_kv, d, dv],
            s,
            z,
        )),
        (Some(_), None) => Some(LinearState::zeros(gpu, shape.batch, heads_kv, d, dv)),
    }
    .transpose()
    .map_err(|e| format!("state: {e}"))?;
    let pieces = case
        .state
        .as_ref()
        .map_or_else(|| vec![shape.seq_q], |s| s.pieces.clone());
    let mut start = 0;
    for tokens in pieces {
        let range = start..start + tokens;
        start += tokens;
        // Causal pieces take the same tokens of Q, K and V; a non-causal
        // call is one piece of all of them.
        let piece = LinearShape {
            seq_q: tokens,
            seq_kv: if case.state.is_some() {
                tokens
            } else {
                shape.seq_kv
            },
            ..shape
        };
        let (q_part, k_part, v_part) = if case.state.is_some() {
            (
                token_range(&q, shape.seq_q, shape.heads_q * d, range.clone()),
                token_range(&k, shape.seq_kv, heads_kv * d, range.clone()),
                token_range(&v, shape.seq_kv, heads_kv * dv, range.clone()),
            )
        } else {
            (q.clone(), k.clone(), v.clone())
        };
        let out = Tensor::filled_as(gpu, piece.out_shape(), f32::NAN, dtype)
            .map_err(|e| format!("out: {e}"))?;
        let (q_t, k_t, v_t) = (
            upload(gpu, piece.q_shape(), &q_part, dtype, bhsd),
            upload(gpu, piece.k_shape(), &k_part, dtype, bhsd),
            upload(gpu, piece.v_shape(), &v_part, dtype, bhsd),
        );
        let args = LinearArgs {
            q: &q_t,
            k: &k_t,
            v: &v_t,
            out: &out,
            state: state.as_ref(),
        };
        gpu.run(|e| gpu.linear_attention(e, &args, &config))
            .map_err(|e| format!("tokens {range:?}: {e}"))?;
        let got = out.to_f32_vec(gpu).map_err(|e| format!("download: {e}"))?;
        let expected = token_range(&want.out, shape.seq_q, shape.heads_q * dv, range.clone());
        check_rule(&got, &expected, unit_roundoff(dtype), 0.0)
            .map_err(|problem| format!("tokens {range:?}: {problem}"))?;
    }
    Ok(())
}

/// Cases between two running tallies of a soak.
const PROGRESS_EVERY: usize = 1000;

fn tally(done: usize, counts: [usize; 4], start: std::time::Instant, failures: usize) -> String {
    format!(
        "{done} cases ({} forward, {} decode, {} backward, {} linear) in {:.1} s, {failures} outside the rule",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        start.elapsed().as_secs_f64(),
    )
}

#[test]
#[ignore = "a soak: its value is many cases, each compiling kernels on first use; \
            FLASH_ATTN_FUZZ_CASES=N runs N (see the file's doc)"]
fn random_configurations_follow_the_accuracy_rule() {
    if gpu().is_none() {
        return;
    }
    let cases: usize = std::env::var(CASES_VAR)
        .ok()
        .map(|v| v.parse().expect("FLASH_ATTN_FUZZ_CASES is a number"))
        .unwrap_or(DEFAULT_CASES);
    let base: u64 = std::env::var(SEED_VAR)
        .ok()
        .map(|v| v.parse().expect("FLASH_ATTN_FUZZ_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    // Cases run on as many devices at once as the tests get (one per core
    // on lavapipe, whose kernel compiles are most of a case's time); each
    // case draws from its own seed, so the order they finish in changes
    // nothing.
    let workers = common::devices_at_once().clamp(1, cases.max(1));
    eprintln!(
        "fuzz: {cases} cases from seed {base} ({SEED_VAR}={base} replays them) on {workers} device(s)"
    );
    let start = std::time::Instant::now();
    // Cases finished, per operation, and the seeds outside the rule.
    let progress = Mutex::new((0usize, [0usize; 4], Vec::new()));
    let indices: Vec<usize> = (0..cases).collect();
    common::on_the_devices(&indices, |gpu, &index| {
        let seed = base + index as u64;
        let mut rng = seeded(seed);
        let mut case = draw_case(&mut rng);
        case.rotation = draw_rotation(seed, &case);
        case.pages_per_buffer = draw_buffer_pages(seed, &case);
        case.page_move = draw_page_move(seed, &case);
        case.ragged_append = draw_ragged_append(seed, &case);
        case.query_counts = draw_query_counts(seed, &case);
        let (kind, result, described) = match draw_linear_case(seed) {
            Some(linear) => (3, run_linear_case(gpu, &linear), format!("{linear:?}")),
            None => {
                let kind = match case.operation {
                    Operation::Forward => 0,
                    Operation::Decode { .. } => 1,
                    Operation::Backward => 2,
                };
                (kind, run_case(gpu, &case, &mut rng), format!("{case:?}"))
            }
        };
        let mut progress = progress.lock().expect("no worker panicked");
        let (done, counts, failures) = &mut *progress;
        counts[kind] += 1;
        if let Err(problem) = result {
            eprintln!("FAILED seed {seed}: {problem}\n  {described}");
            failures.push(seed);
        }
        // A running tally, so that a long soak stopped early still says
        // how many cases it finished.
        *done += 1;
        if *done % PROGRESS_EVERY == 0 && *done < cases {
            eprintln!(
                "fuzz: {} of seeds {base}-{} done: {}",
                *done,
                base + cases as u64 - 1,
                tally(*done, *counts, start, failures.len())
            );
        }
    });
    let (_, counts, mut failures) = progress.into_inner().expect("no worker panicked");
    failures.sort_unstable();
    eprintln!("fuzz: {}", tally(cases, counts, start, failures.len()));
    assert!(
        failures.is_empty(),
        "cases outside the rule (replay each with {SEED_VAR}=S {CASES_VAR}=1): {failures:?}"
    );
}
