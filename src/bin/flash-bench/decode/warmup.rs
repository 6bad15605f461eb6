//! `flash-bench decode`'s kernels compiled before anything is timed, on
//! one device per core, as the suite's are (`compile_ahead.rs` says why).
//!
//! A decode step's kernel depends on the cache's type and layout, the
//! heads, the head dims, the query rows and the lanes, not on the cache's
//! length: a small cache of each type (zeros) compiles the step, its
//! append and its merge of split results (two forced splits), and the
//! prefill runs once at the shortest length it is compared at. On lavapipe
//! a cold run's first case was a decode compile (~57 s) followed by a
//! prefill compile (~46 s); here they overlap.

use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, DType, DecodeArgs, DecodeLanes, DecodeOptions, Gpu, KvDType,
    Tensor, TensorShape, TokenTree,
};

use super::{DecodeCmdArgs, cache_config, lane_layouts, new_cache, prefill_skipped};
use crate::compile_ahead::{self, COMPILE_AHEAD_FAILED};
use crate::options::DeviceSetup;

/// Cached tokens of the small caches (at least the query tokens).
const WARM_TOKENS: usize = 64;

/// A kernel set the measuring pass will use.
enum Warmup {
    /// A step (with its append and merge) over a cache of this type.
    Step {
        dtype: KvDType,
        lanes: Option<DecodeLanes>,
        /// With token trees (`--token-tree`'s second kernel).
        tree: bool,
    },
    /// The prefill kernel over this many keys.
    Prefill { tokens: usize },
}

/// Compiles every kernel `args`' cases will use, where the adapter
/// compiles at first dispatch ([`compile_ahead::worthwhile`]). Failures are
/// said on stderr and left to the measuring pass.
pub fn compile_ahead(gpu: &Gpu, setup: &DeviceSetup, args: &DecodeCmdArgs) {
    if !compile_ahead::worthwhile(gpu) {
        return;
    }
    let forced_lanes = lane_layouts(args);
    let mut work: Vec<Warmup> = args
        .kv_dtype
        .iter()
        .flat_map(|&dtype| {
            forced_lanes.iter().flat_map(move |&lanes| {
                [false, true]
                    .into_iter()
                    .filter(|&tree| !tree || args.token_tree)
                    .map(move |tree| Warmup::Step { dtype, lanes, tree })
            })
        })
        .collect();
    if let Some(&tokens) = args
        .cache
        .iter()
        .filter(|&&tokens| prefill_skipped(gpu, args, tokens, KvDType::F32).is_none())
        .min()
        .filter(|_| args.kv_dtype.contains(&KvDType::F32))
    {
        work.push(Warmup::Prefill { tokens });
    }
    if work.len() < 2 {
        // One kernel set: the measuring pass compiles it as soon.
        return;
    }
    eprintln!("compiling kernels, one device per core...");
    compile_ahead::spread(gpu, setup, &[work], |device, warmup| {
        let done = match *warmup {
            Warmup::Step { dtype, lanes, tree } => step(device, args, dtype, lanes, tree),
            Warmup::Prefill { tokens } => prefill(device, args, tokens),
        };
        // Said, not fatal: the measuring pass runs (and reports) the same
        // calls on real inputs; a failure here only costs the head start.
        if let Err(err) = done {
            eprintln!("{COMPILE_AHEAD_FAILED}: {err}");
        }
    });
}

/// One step over a small cache of `dtype` laid out as `args` asks, on
/// zeros; with `tree`, each sequence's query tokens a chain (the same
/// kernel as any tree).
fn step(
    gpu: &Gpu,
    args: &DecodeCmdArgs,
    dtype: KvDType,
    lanes: Option<DecodeLanes>,
    tree: bool,
) -> wgpu_flash_attn::Result<()> {
    let tokens = WARM_TOKENS.max(args.seq_q);
    let config = cache_config(args, tokens, dtype);
    let head_dim_v = config.head_dim_v();
    let mut cache = new_cache(gpu, args, config, tokens)?;
    let kv_shape = TensorShape::new(args.batch, tokens, args.heads_kv, args.head_dim);
    let zeros = Tensor::zeros(gpu, kv_shape, DType::F32)?;
    gpu.run(|e| match args.latent_values {
        Some(_) => cache.append_latent(gpu, e, &zeros, None),
        None => cache.append(gpu, e, &zeros, &zeros, None),
    })?;
    let q_dtype = args.q_dtype.dtype();
    let q = Tensor::zeros(
        gpu,
        TensorShape::new(args.batch, args.seq_q, args.heads_q, args.head_dim),
        q_dtype,
    )?;
    let out = Tensor::zeros(
        gpu,
        TensorShape::new(args.batch, args.seq_q, args.heads_q, head_dim_v),
        q_dtype,
    )?;
    let decode_args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let options = DecodeOptions {
        config: AttentionConfig::new().causal(true),
        // Two splits: the merge of split results runs too (the long
        // caches' steps need it).
        kv_splits: Some(2),
        lanes,
        token_trees: tree.then(|| vec![TokenTree::chain(args.seq_q); args.batch]),
    };
    gpu.run(|e| gpu.decode(e, &decode_args, options).map(|_| ()))
}

/// The prefill kernel over `tokens` keys of zeros, as `time_prefill` runs it.
fn prefill(gpu: &Gpu, args: &DecodeCmdArgs, tokens: usize) -> wgpu_flash_attn::Result<()> {
    let head_dim_v = args.latent_values.unwrap_or(args.head_dim);
    let zeros =
        |seq, heads, dim| Tensor::zeros(gpu, TensorShape::new(1, seq, heads, dim), DType::F32);
    let q = zeros(args.seq_q, args.heads_q, args.head_dim)?;
    let k = zeros(tokens, args.heads_kv, args.head_dim)?;
    let v = zeros(tokens, args.heads_kv, head_dim_v)?;
    let out = zeros(args.seq_q, args.heads_q, head_dim_v)?;
    let attention_args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    gpu.run(|e| gpu.forward(e, &attention_args, AttentionConfig::new().causal(true)))
}
