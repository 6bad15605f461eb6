//! `flash-bench decode`: one decode step over KV caches of several lengths
//! (default Llama-3.1-70B heads: 64 query / 8 KV, d=128), every output
//! element of the first and the last sequence validated against the
//! reference, timed, and compared with the prefill kernel on the same call;
//! speed shown against the adapter's copy and FMA ceilings.

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use wgpu_flash_attn::reference;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DecodeArgs, DecodeLanes, DecodeOptions,
    DecodePlan, Gpu, KvCache, KvCacheConfig, KvDType, KvLayout, Tensor, TensorShape, TokenTree,
};

mod warmup;

use crate::ceiling::CeilingProbes;
use crate::measure::{CEILING_WORKGROUPS, TOLERANCE, round_to, unit_roundoff};
use crate::options::{DTypeArg, DeviceSetup};
use crate::options_json::dtype_name;
use crate::random::{normal_vec, random_token_tree, seeded};
use crate::report::{AdapterJson, write_json};
use crate::timing::{self, TimingPlan, time_gpu};

#[derive(Debug, Args)]
pub struct DecodeCmdArgs {
    /// Cached tokens per sequence, one case each.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072",
        value_parser = crate::options::parse_cache_tokens)]
    cache: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// New query tokens per sequence (already in the cache); 0 only with
    /// --prompt-chunk (the other sequences sit the step out).
    #[arg(long, default_value_t = 1)]
    seq_q: usize,
    /// A continuous-batching step (`Gpu::decode_ragged`): sequence 0 takes
    /// N query tokens (a prompt chunk, already in the cache) while the
    /// others take --seq-q each, in one call. At most the cached tokens.
    #[arg(long, value_name = "N", value_parser = crate::options::parse_positive)]
    prompt_chunk: Option<usize>,
    #[arg(long, default_value_t = 64)]
    heads_q: usize,
    #[arg(long, default_value_t = 8)]
    heads_kv: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// A latent cache (multi-head latent attention): no V pool, each
    /// token's value is the first N elements of its key (DeepSeek-V3:
    /// --heads-kv 1 --head-dim 576 --latent-values 512).
    #[arg(long, value_name = "N")]
    latent_values: Option<usize>,
    /// Store the cache in pages of this many tokens, scattered over the
    /// pool (default: contiguous).
    #[arg(long, value_parser = crate::options::parse_page_size)]
    page_size: Option<usize>,
    /// Force the number of key splits (default: chosen from the adapter).
    #[arg(long)]
    splits: Option<usize>,
    /// Timed runs (at least 1).
    #[arg(long, default_value_t = 5, value_parser = crate::options::parse_iters)]
    iters: usize,
    /// Cache storage types, one case each per cache length, compared in
    /// the same run: f32, f16, bf16, int8, fp8 (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "f32", value_parser = parse_kv_dtype)]
    kv_dtype: Vec<KvDType>,
    /// Force the subgroup tier's lane layouts, one case each on the same
    /// cache: keys, head-dim, key-tiles (comma-separated; default: the
    /// adapter's).
    #[arg(long, value_delimiter = ',', value_parser = parse_lanes)]
    lanes: Vec<DecodeLanes>,
    /// Storage type of the query and the output (any cache type; the
    /// arithmetic stays f32): f32, f16 or bf16. The output may differ from
    /// the reference by the tolerance plus its own storage rounding.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    q_dtype: DTypeArg,
    /// Speculative decoding: each sequence's --seq-q query tokens are a
    /// draft token tree (drawn from a seed: each token's parent an earlier
    /// token or none), and every case runs twice in the same run, by
    /// position alone (causal) and with the trees
    /// (`DecodeOptions::token_trees`), each validated.
    #[arg(long, conflicts_with = "prompt_chunk")]
    token_tree: bool,
    /// A sliding window (Mistral, Gemma's local layers): each query sees
    /// itself and the N keys before it (causal, `window(N, 0)`). GB/s and
    /// GFLOP/s then count the keys in the step's view.
    #[arg(long, value_name = "N")]
    window: Option<usize>,
    /// With --window and --page-size: release each sequence's pages behind
    /// the window before the step (`KvCache::release_pages_before`), as a
    /// server does, and report the pages each sequence keeps.
    #[arg(long, requires_all = ["window", "page_size"])]
    release_behind_window: bool,
    /// For caches of a narrower type than f32: also hold the output to
    /// the reference over the f32 values appended (what the storage costs
    /// the output; validation stays against the values stored). The host
    /// then holds both copies of the validated sequences.
    #[arg(long)]
    storage_error: bool,
    /// The first N elements of every key head vector are 20x the others
    /// (keys' outlier channels, which set an int8 vector's step).
    #[arg(long, value_name = "N", default_value_t = 0)]
    key_outliers: usize,
}

/// How much larger `--key-outliers` channels are than the others.
const OUTLIER_SCALE: f32 = 20.0;

pub(crate) fn parse_lanes(name: &str) -> Result<DecodeLanes, String> {
    match name {
        "keys" => Ok(DecodeLanes::Keys),
        "head-dim" => Ok(DecodeLanes::HeadDim),
        "key-tiles" => Ok(DecodeLanes::KeyTiles),
        _ => Err(format!(
            "unknown lane layout {name:?}: keys, head-dim or key-tiles"
        )),
    }
}

/// How the case's plan spreads keys over lanes, for the report;
/// "forward" where the call ran as the forward kernels.
pub(crate) fn lanes_name(plan: &DecodePlan) -> &'static str {
    if plan.as_forward.is_some() {
        return "forward";
    }
    match plan.lanes() {
        Some(DecodeLanes::Keys) => "keys",
        Some(DecodeLanes::HeadDim) => "head-dim",
        Some(DecodeLanes::KeyTiles) => "key-tiles",
        None => "portable",
    }
}

pub(crate) fn parse_kv_dtype(name: &str) -> Result<KvDType, String> {
    KvDType::ALL
        .into_iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| format!("unknown cache type {name:?}: f32, f16, bf16, int8 or fp8"))
}

/// Tokens uploaded per append while filling a cache.
const FILL_CHUNK: usize = 4096;

#[derive(Debug, Serialize)]
struct DecodeCase {
    cache_tokens: usize,
    batch: usize,
    seq_q: usize,
    /// Sequence 0's query tokens in a ragged step (`--prompt-chunk`).
    prompt_chunk: Option<usize>,
    /// Each sequence's query tokens are a draft token tree (`--token-tree`).
    token_tree: bool,
    /// Keys each query sees before itself (`--window`).
    window: Option<usize>,
    /// Pages of sequence 0 left after releasing those behind the window
    /// (`--release-behind-window`), and its pages before.
    pages_kept: Option<(usize, usize)>,
    /// Key channels scaled up (`--key-outliers`).
    key_outliers: usize,
    /// The output against the reference over the f32 values appended
    /// (`--storage-error`, narrower caches): largest and rms error.
    storage_error_max: Option<f64>,
    storage_error_rms: Option<f64>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    /// Value head dim (the key head dim unless the cache is latent).
    head_dim_v: usize,
    /// Values are the first `head_dim_v` elements of each key (no V pool).
    latent: bool,
    layout: String,
    /// Cache storage type.
    kv_dtype: &'static str,
    /// Storage type of the query and the output.
    q_dtype: DTypeArg,
    /// The decode kernel's lanes: keys, head-dim (subgroup tier) or
    /// portable.
    lanes: &'static str,
    splits: u32,
    cache_buffers: u32,
    decode_ms: f64,
    /// K and V bytes read per step, per second.
    gb_per_s: f64,
    pct_of_copy_ceiling: f64,
    gflops: f64,
    pct_of_fma_ceiling: f64,
    max_abs_err: f64,
    /// Every checked element within the tolerance past its own storage
    /// rounding (an f16 or bf16 output's).
    within_tolerance: bool,
    /// The forward kernels on the same call (their tier forced, so that
    /// the call does not run as decoding), where they can run.
    prefill_ms: Option<f64>,
    prefill_note: Option<String>,
    speedup_over_prefill: Option<f64>,
    /// The f32 cache's step time over this one's, same length and lanes,
    /// same run.
    speedup_over_f32: Option<f64>,
}

#[derive(Debug, Serialize)]
struct DecodeReport {
    tool: &'static str,
    command: String,
    adapter: AdapterJson,
    timer: String,
    fma_gflops: f64,
    copy_gb_per_s: f64,
    cases: Vec<DecodeCase>,
}

pub fn run(
    gpu: &Gpu,
    setup: &DeviceSetup,
    args: &DecodeCmdArgs,
    json: Option<&std::path::Path>,
) -> Result<bool> {
    anyhow::ensure!(
        args.seq_q > 0 || args.prompt_chunk.is_some(),
        "--seq-q 0: every sequence needs a query token, unless --prompt-chunk gives \
         sequence 0 its chunk (the others then sit the step out)"
    );
    anyhow::ensure!(
        args.key_outliers <= args.head_dim,
        "--key-outliers {}: a key vector has {} elements",
        args.key_outliers,
        args.head_dim
    );
    warmup::compile_ahead(gpu, setup, args);
    eprintln!("measuring the FMA and copy ceilings...");
    let probes = CeilingProbes::new(gpu)?;
    let fma = probes.measure_fma(CEILING_WORKGROUPS, TimingPlan { warmup: 1, runs: 5 })?;
    let copy = probes.measure_copy(256 << 20, TimingPlan { warmup: 1, runs: 5 })?;
    println!("{}", gpu.info().summary());
    println!(
        "FMA ceiling {:.1} GFLOP/s, copy ceiling {:.2} GB/s (read + written); timer: {}",
        fma.gflops, copy.gb_per_s, fma.timing.timer
    );
    println!(
        "{:<34} {:>5} {:>8} {:>7} {:>10} {:>7} {:>8} {:>7} {:>8} {:>6} {:>11} {:>8} {:>9}",
        "case",
        "kv",
        "lanes",
        "splits",
        "decode ms",
        "vs f32",
        "GB/s",
        "% copy",
        "GFLOP/s",
        "% FMA",
        "prefill ms",
        "speedup",
        "max|err|"
    );
    let mut cases = Vec::new();
    let mut ok = true;
    for (&tokens, &dtype) in args
        .cache
        .iter()
        .flat_map(|t| args.kv_dtype.iter().map(move |d| (t, d)))
    {
        let new_cases = run_case(gpu, args, tokens, dtype, fma.gflops, copy.gb_per_s)
            .with_context(|| format!("cache of {tokens} tokens, {}", dtype.name()))?;
        for mut case in new_cases {
            case.speedup_over_f32 = cases
                .iter()
                .find(|c: &&DecodeCase| {
                    c.cache_tokens == tokens
                        && c.kv_dtype == "f32"
                        && c.lanes == case.lanes
                        && c.token_tree == case.token_tree
                })
                .map(|f32_case| f32_case.decode_ms / case.decode_ms);
            print_case(args, &case);
            ok &= case.within_tolerance;
            cases.push(case);
        }
    }
    println!(
        "splits = key chunks x cache buffers; lanes forward = the call ran as the forward \
         kernels over a dense f32 copy of the cache (f32 queries, more than 32 decode row \
         tiles per KV head; on CPU adapters f32 caches, and 16-bit ones in 8-row tiles; \
         --lanes forces the decode kernel; with --prompt-chunk the chunk's sequence did, \
         the others the decode kernel); GB/s counts the K and V bytes a step reads (the cache's stored bytes); \
         vs f32 = the f32 cache's time over this one's, same \
         length and lanes, same run; prefill = the forward kernels on the same call \
         (contiguous f32 K/V tensors, the planner's tier forced: left to the planner, \
         such a call runs as split-KV decoding); half, int8 and fp8 caches are validated against the \
         reference over the values they store"
    );
    if let Some(path) = json {
        let report = DecodeReport {
            tool: "flash-bench decode",
            command: std::env::args().collect::<Vec<_>>().join(" "),
            adapter: AdapterJson::of_device(gpu.info()),
            timer: format!(
                "{}, median of {} runs after a validating run{}",
                fma.timing.timer,
                args.iters,
                timing::warm_up_note(gpu)
            ),
            fma_gflops: fma.gflops,
            copy_gb_per_s: copy.gb_per_s,
            cases,
        };
        write_json(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    if !ok {
        eprintln!("a decode result disagreed with the reference (tolerance {TOLERANCE:e})");
    }
    Ok(ok)
}

/// One row of the table.
fn print_case(args: &DecodeCmdArgs, case: &DecodeCase) {
    let dims = if case.latent {
        format!("{}/{} latent", case.head_dim, case.head_dim_v)
    } else {
        case.head_dim.to_string()
    };
    let queries = match case.prompt_chunk {
        Some(chunk) => format!("{chunk}+{}", case.seq_q),
        None if case.token_tree => format!("{} tree", case.seq_q),
        None => case.seq_q.to_string(),
    };
    let name = format!(
        "B{} H{}/{} q{queries} kv{} d{dims}{}{}{}",
        case.batch,
        case.heads_q,
        case.heads_kv,
        case.cache_tokens,
        case.window.map_or(String::new(), |w| format!(" w{w}")),
        if case.key_outliers > 0 {
            format!(" outliers{}", case.key_outliers)
        } else {
            String::new()
        },
        args.page_size
            .map_or(String::new(), |p| format!(" paged{p}")),
    );
    let name = match case.q_dtype {
        DTypeArg::F32 => name,
        q => format!("{name} q:{}", dtype_name(q.dtype())),
    };
    let prefill = case
        .prefill_ms
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"));
    let speedup = case
        .speedup_over_prefill
        .map_or_else(|| "-".to_string(), |s| format!("{s:.1}x"));
    let vs_f32 = case
        .speedup_over_f32
        .map_or_else(|| "-".to_string(), |s| format!("{s:.2}x"));
    println!(
        "{name:<34} {:>5} {:>8} {:>3}x{:<3} {:>10.2} {vs_f32:>7} {:>8.2} {:>6.1}% {:>8.2} {:>5.1}% {prefill:>11} {speedup:>8} {:>9.2e}",
        case.kv_dtype,
        case.lanes,
        case.splits,
        case.cache_buffers,
        case.decode_ms,
        case.gb_per_s,
        case.pct_of_copy_ceiling,
        case.gflops,
        case.pct_of_fma_ceiling,
        case.max_abs_err
    );
    if let Some(note) = &case.prefill_note {
        println!("    prefill: {note}");
    }
    if let (Some(max), Some(rms)) = (case.storage_error_max, case.storage_error_rms) {
        println!("    against the f32 values appended: max |err| {max:.2e}, rms {rms:.2e}");
    }
    if let Some((kept, before)) = case.pages_kept {
        println!("    pages behind the window released: sequence 0 holds {kept} of its {before}");
    }
}

fn run_case(
    gpu: &Gpu,
    args: &DecodeCmdArgs,
    tokens: usize,
    dtype: KvDType,
    fma: f64,
    copy: f64,
) -> Result<Vec<DecodeCase>> {
    if let Some(chunk) = args.prompt_chunk {
        anyhow::ensure!(
            chunk <= tokens,
            "--prompt-chunk {chunk}: a chunk's tokens are in the cache, which holds {tokens}"
        );
    }

    let cache_config = cache_config(args, tokens, dtype);
    let head_dim_v = cache_config.head_dim_v();
    let layout = cache_config.layout;
    let mut cache = new_cache(gpu, args, cache_config, tokens)?;
    // Host copies of the validated sequences' K and V, `[tokens, heads_kv,
    // width]`: the reference checks every output element of those
    // sequences (a kernel that gets one head's or one sequence's
    // addressing wrong fails the case), the first and the last, so that
    // the host holds at most two sequences of a large batch.
    let validated = validated_sequences(args.batch);
    let token = args.heads_kv * args.head_dim;
    let value_token = args.heads_kv * head_dim_v;
    let prefill_skipped = prefill_skipped(gpu, args, tokens, dtype);
    let mut rng = seeded(0xdec0_de00 ^ tokens as u64);
    let mut host: Vec<(Vec<f32>, Vec<f32>)> = vec![Default::default(); validated.len()];
    // The f32 values appended, where they are not what the cache stores
    // and `--storage-error` asks for them.
    let keep_appended = dtype == KvDType::F32 || args.storage_error;
    let mut written = 0;
    while written < tokens {
        let chunk = (tokens - written).min(FILL_CHUNK);
        let shape = TensorShape::new(args.batch, chunk, args.heads_kv, args.head_dim);
        let mut k = normal_vec(&mut rng, shape.elements(), 1.0);
        for key in k.chunks_mut(args.head_dim) {
            for x in &mut key[..args.key_outliers] {
                *x *= OUTLIER_SCALE;
            }
        }
        let v = if args.latent_values.is_some() {
            // A latent cache's values are its keys' prefixes.
            gpu.run(|e| cache.append_latent(gpu, e, &Tensor::from_f32(gpu, shape, &k)?, None))?;
            k.chunks(args.head_dim)
                .flat_map(|key| key[..head_dim_v].to_vec())
                .collect()
        } else {
            let v = normal_vec(&mut rng, shape.elements(), 1.0);
            gpu.run(|e| {
                cache.append(
                    gpu,
                    e,
                    &Tensor::from_f32(gpu, shape, &k)?,
                    &Tensor::from_f32(gpu, shape, &v)?,
                    None,
                )
            })?;
            v
        };
        gpu.wait()?;
        // Other types are read back as stored, below.
        if keep_appended {
            for (&b, (host_k, host_v)) in validated.iter().zip(&mut host) {
                host_k.extend_from_slice(&k[b * chunk * token..(b + 1) * chunk * token]);
                host_v
                    .extend_from_slice(&v[b * chunk * value_token..(b + 1) * chunk * value_token]);
            }
        }
        written += chunk;
    }
    // (`--storage-error`: the values appended, for narrower caches.)
    let mut appended = None;
    if dtype != KvDType::F32 {
        // Validate against what the cache stores (rounded or quantized).
        let stored = validated
            .iter()
            .map(|&b| cache.read_sequence(gpu, b))
            .collect::<wgpu_flash_attn::Result<_>>()?;
        let values_appended = std::mem::replace(&mut host, stored);
        appended = args.storage_error.then_some(values_appended);
    }

    // Each sequence's query tokens; a ragged step's are one packed entry.
    let counts = query_counts(args);
    let firsts: Vec<usize> = counts
        .iter()
        .scan(0, |first, &n| {
            *first += n;
            Some(*first - n)
        })
        .collect();
    let total: usize = counts.iter().sum();
    let (q_batch, q_seq) = match args.prompt_chunk {
        Some(_) => (1, total),
        None => (args.batch, args.seq_q),
    };
    let q_shape = TensorShape::new(q_batch, q_seq, args.heads_q, args.head_dim);
    // The reference sees the query as stored.
    let q_dtype = args.q_dtype.dtype();
    let q_host = round_to(q_dtype, normal_vec(&mut rng, q_shape.elements(), 1.0));
    let q = Tensor::from_f32_as(gpu, q_shape, &q_host, q_dtype)?;
    let o_shape = TensorShape::new(q_batch, q_seq, args.heads_q, head_dim_v);
    let out = Tensor::filled_as(gpu, o_shape, f32::NAN, q_dtype)?;
    let config = AttentionConfig::new()
        .causal(true)
        .window(args.window.map(|w| w as i64), Some(0));
    let pages_kept = match (args.release_behind_window, args.window) {
        (true, Some(window)) => Some(release_behind_window(&mut cache, &counts, window)?),
        _ => None,
    };
    let decode_args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    // A latent cache holds (and a step reads) one pool; others K and V.
    let pools = if args.latent_values.is_some() { 1 } else { 2 };
    // The keys in the step's view: a window's over the most query tokens
    // of a sequence (a prompt chunk's too), or all.
    let most_queries = counts.iter().copied().max().unwrap_or(0);
    let keys = args.window.map_or(tokens, |w| tokens.min(w + most_queries));
    let bytes =
        (pools * args.batch * keys * args.heads_kv * dtype.vector_bytes(args.head_dim)) as f64;
    let flops = 2.0 * (args.heads_q * total * keys * (args.head_dim + head_dim_v)) as f64;
    // The reference output, computed once for every result of this call
    // (decode's in each lane layout, the prefill's).
    let pick = |data: &[f32], width: usize| -> Vec<f32> {
        let row = args.heads_q * width;
        validated
            .iter()
            .flat_map(|&b| data[firsts[b] * row..][..counts[b] * row].to_vec())
            .collect()
    };
    let validated_counts: Vec<usize> = validated.iter().map(|&b| counts[b]).collect();
    let reference_of = |values: &[(Vec<f32>, Vec<f32>)], trees: Option<&[TokenTree]>| {
        let validated_trees: Option<Vec<TokenTree>> =
            trees.map(|trees| validated.iter().map(|&b| trees[b].clone()).collect());
        reference_outputs(
            args,
            (tokens, head_dim_v),
            (&pick(&q_host, args.head_dim), &validated_counts),
            values,
            &config,
            validated_trees.as_deref(),
        )
    };
    let want = reference_of(&host, None)?;
    // Each sequence's draft tree (`--token-tree`), and what it gives.
    let trees: Option<Vec<TokenTree>> = args.token_tree.then(|| {
        let mut rng = seeded(0x7ee_7ee ^ tokens as u64);
        counts
            .iter()
            .map(|&n| random_token_tree(&mut rng, n))
            .collect()
    });
    let want_tree = match &trees {
        Some(trees) => Some(reference_of(&host, Some(trees))?),
        None => None,
    };
    // `--storage-error`: the references over the values appended, the
    // positional one and the trees' (in `masks`' order below).
    let want_appended: Vec<Vec<f64>> = match &appended {
        Some(values) => std::iter::once(None)
            .chain(trees.as_deref().map(Some))
            .map(|trees| reference_of(values, trees))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    // The largest error (and excess over the output's rounding) of a
    // result of this call against the reference.
    let validate = |got: &[f32], want: &[f64]| {
        output_error(&pick(got, head_dim_v), want, unit_roundoff(q_dtype))
    };
    // The prefill's output is held to the decode's reference and bound
    // (the same call): a prefill that disagrees fails the case.
    let (prefill_ms, prefill_note, prefill_ok) = match prefill_skipped {
        Some(why) => (None, Some(why), true),
        None => match time_prefill(gpu, args, (tokens, head_dim_v), &q, &host[0], &config) {
            Ok((ms, got)) => {
                let (worst, excess) = validate(&got, &want)?;
                let ok = excess <= TOLERANCE;
                let note =
                    (!ok).then(|| format!("FAILED: max |err| {worst:.2e} against the reference"));
                (Some(ms), note, ok)
            }
            Err(err) => (None, Some(format!("does not run: {err}")), true),
        },
    };
    let mut cases = Vec::new();
    // By position alone, then (`--token-tree`) with the trees.
    let mut masks: Vec<(Option<&Vec<TokenTree>>, &[f64])> = vec![(None, &want)];
    masks.extend(
        trees
            .as_ref()
            .zip(want_tree.as_deref())
            .map(|(trees, want)| (Some(trees), want)),
    );
    for (lanes, (mask_index, &(trees, want))) in lane_layouts(args)
        .into_iter()
        .flat_map(|lanes| masks.iter().enumerate().map(move |mask| (lanes, mask)))
    {
        let options = DecodeOptions {
            config: config.clone(),
            kv_splits: args.splits,
            lanes,
            token_trees: trees.cloned(),
        };
        let step = |encoder: &mut wgpu::CommandEncoder| match args.prompt_chunk {
            Some(_) => gpu
                .decode_ragged(encoder, &decode_args, &counts, options.clone())
                .map(|plan| plan.expect("sequence 0 has query tokens")),
            None => gpu.decode(encoder, &decode_args, options.clone()),
        };
        let plan: DecodePlan = gpu.run(step)?;
        let got = out.to_f32_vec(gpu)?;
        let (max_abs_err, excess) = validate(&got, want)?;
        let storage_error = want_appended
            .get(mask_index)
            .map(|want| max_and_rms_error(&pick(&got, head_dim_v), want));
        let timing = time_gpu(
            gpu,
            TimingPlan {
                warmup: 1,
                runs: args.iters,
            },
            |encoder| step(encoder).map(|_| ()),
        )?;
        let seconds = timing.median_ms / 1e3;
        let gb_per_s = bytes / seconds / 1e9;
        let gflops = flops / seconds / 1e9;
        cases.push(DecodeCase {
            cache_tokens: tokens,
            batch: args.batch,
            seq_q: args.seq_q,
            prompt_chunk: args.prompt_chunk,
            token_tree: trees.is_some(),
            window: args.window,
            pages_kept,
            key_outliers: args.key_outliers,
            storage_error_max: storage_error.map(|(max, _)| max),
            storage_error_rms: storage_error.map(|(_, rms)| rms),
            heads_q: args.heads_q,
            heads_kv: args.heads_kv,
            head_dim: args.head_dim,
            head_dim_v,
            latent: args.latent_values.is_some(),
            layout: format!("{layout:?}"),
            kv_dtype: dtype.name(),
            q_dtype: args.q_dtype,
            lanes: lanes_name(&plan),
            // (As the forward kernels: one copy dispatch per cache buffer.)
            splits: if plan.as_forward.is_some() {
                1
            } else {
                plan.splits
            },
            cache_buffers: plan.segments,
            decode_ms: timing.median_ms,
            gb_per_s,
            pct_of_copy_ceiling: 100.0 * gb_per_s / copy,
            gflops,
            pct_of_fma_ceiling: 100.0 * gflops / fma,
            max_abs_err,
            within_tolerance: excess <= TOLERANCE && prefill_ok,
            // The prefill is compared on the positional rows (it has no
            // trees).
            speedup_over_prefill: prefill_ms
                .filter(|_| trees.is_none())
                .map(|ms| ms / timing.median_ms),
            speedup_over_f32: None,
            prefill_ms: prefill_ms.filter(|_| trees.is_none()),
            prefill_note: prefill_note.clone().filter(|_| trees.is_none()),
        });
    }
    Ok(cases)
}

/// Releases each sequence's pages behind the window of its first query
/// (`counts[b]` query tokens at its end); returns sequence 0's pages
/// kept and held before.
fn release_behind_window(
    cache: &mut KvCache,
    counts: &[usize],
    window: usize,
) -> wgpu_flash_attn::Result<(usize, usize)> {
    let held = |cache: &KvCache| {
        cache.block_table(0).map(|table| {
            table
                .iter()
                .filter(|&&page| page != wgpu_flash_attn::RELEASED_PAGE)
                .count()
        })
    };
    let before = held(cache)?;
    for (b, &count) in counts.iter().enumerate() {
        let first_query = cache.lens()[b] - count;
        cache.release_pages_before(b, first_query.saturating_sub(window))?;
    }
    Ok((held(cache)?, before))
}

/// The lane layouts each cache is timed with: those of `--lanes`, else
/// the adapter's (`None`).
fn lane_layouts(args: &DecodeCmdArgs) -> Vec<Option<DecodeLanes>> {
    if args.lanes.is_empty() {
        vec![None]
    } else {
        args.lanes.iter().copied().map(Some).collect()
    }
}

/// The cache `args` asks for, holding `tokens` tokens per sequence in
/// `dtype`: contiguous, or in pages of `--page-size`.
fn cache_config(args: &DecodeCmdArgs, tokens: usize, dtype: KvDType) -> KvCacheConfig {
    let layout = match args.page_size {
        None => KvLayout::Contiguous { capacity: tokens },
        Some(page_size) => KvLayout::Paged {
            page_size,
            pages: args.batch * tokens.div_ceil(page_size),
        },
    };
    let config = KvCacheConfig::new(args.batch, args.heads_kv, args.head_dim, layout).dtype(dtype);
    match args.latent_values {
        Some(values) => config.latent_values(values),
        None => config,
    }
}

/// An empty cache of `config`; a paged one with its block tables set.
fn new_cache(
    gpu: &Gpu,
    args: &DecodeCmdArgs,
    config: KvCacheConfig,
    tokens: usize,
) -> wgpu_flash_attn::Result<KvCache> {
    let mut cache = KvCache::new(gpu, config)?;
    if let Some(page_size) = args.page_size {
        // Sequence b takes every batch-th page, so no table is consecutive
        // when batch > 1 (and pages interleave across sequences).
        let per_seq = tokens.div_ceil(page_size);
        for b in 0..args.batch {
            let pages: Vec<u32> = (0..per_seq).map(|i| (i * args.batch + b) as u32).collect();
            cache.set_block_table(b, &pages)?;
        }
    }
    Ok(cache)
}

/// Why the prefill kernel is not compared on the case of `tokens` cached
/// tokens of type `dtype`; `None` when it is.
fn prefill_skipped(
    gpu: &Gpu,
    args: &DecodeCmdArgs,
    tokens: usize,
    dtype: KvDType,
) -> Option<String> {
    let k_bytes = (tokens * args.heads_kv * args.head_dim * 4) as u64;
    let binding = gpu.info().limits.max_storage_buffer_binding_size;
    if dtype != KvDType::F32 {
        Some("compared for the f32 cache".to_string())
    } else if args.q_dtype != DTypeArg::F32 {
        Some("compared for f32 queries".to_string())
    } else if k_bytes > binding {
        Some(format!(
            "does not run: K alone is {} MiB, over the {} MiB storage binding",
            k_bytes >> 20,
            binding >> 20
        ))
    } else if args.batch != 1 || args.page_size.is_some() || args.prompt_chunk.is_some() {
        Some("compared for batch 1, contiguous caches, uniform steps only".to_string())
    } else {
        None
    }
}

/// Each sequence's query tokens: `--seq-q`, and `--prompt-chunk` for
/// sequence 0.
fn query_counts(args: &DecodeCmdArgs) -> Vec<usize> {
    let mut counts = vec![args.seq_q; args.batch];
    if let Some(chunk) = args.prompt_chunk {
        counts[0] = chunk;
    }
    counts
}

/// The sequences whose every output element `decode` validates: the first
/// and the last.
fn validated_sequences(batch: usize) -> Vec<usize> {
    let mut sequences = vec![0, batch - 1];
    sequences.dedup();
    sequences
}

/// The reference output of the sequences whose queries are `q` (each
/// `[counts[i], heads_q, head_dim]`, end to end) and host copies of K and
/// V are `host` (one pair per sequence), their outputs end to end; each
/// masked by its token tree where `trees` gives them (one per sequence).
fn reference_outputs(
    args: &DecodeCmdArgs,
    (tokens, head_dim_v): (usize, usize),
    (q, counts): (&[f32], &[usize]),
    host: &[(Vec<f32>, Vec<f32>)],
    config: &AttentionConfig,
    trees: Option<&[TokenTree]>,
) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut first = 0;
    for (i, (&count, (k, v))) in counts.iter().zip(host).enumerate() {
        if count == 0 {
            // A sequence that sits the step out has no output rows.
            continue;
        }
        let shape = AttentionShape {
            batch: 1,
            seq_q: count,
            seq_kv: tokens,
            heads_q: args.heads_q,
            heads_kv: args.heads_kv,
            head_dim: args.head_dim,
            head_dim_v,
        };
        let q_len = count * args.heads_q * args.head_dim;
        let q = &q[first..first + q_len];
        let result = match trees {
            Some(trees) => {
                let mask = trees[i].dense_mask(tokens);
                let mask = reference::HostMask::Bool {
                    dims: [1, 1, count, tokens],
                    values: &mask,
                };
                reference::attention_masked(&shape, q, k, v, config, &mask)?
            }
            None => reference::attention(&shape, q, k, v, config)?,
        };
        out.extend(result.out);
        first += q_len;
    }
    Ok(out)
}

/// Largest error of `got` against the reference output `want`, and the
/// largest by which an element's error exceeds `roundoff` of its reference
/// value (the output's storage rounding: 0 for f32).
fn output_error(got: &[f32], want: &[f64], roundoff: f64) -> Result<(f64, f64)> {
    anyhow::ensure!(
        got.len() == want.len(),
        "decode wrote {} output elements, the reference {}",
        got.len(),
        want.len()
    );
    let mut worst = 0.0f64;
    let mut excess = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        anyhow::ensure!(!g.is_nan(), "decode left an output element unwritten (NaN)");
        let err = (f64::from(*g) - w).abs();
        worst = worst.max(err);
        excess = excess.max(err - roundoff * w.abs());
    }
    Ok((worst, excess))
}

/// The largest and the rms difference of `got` from `want`.
fn max_and_rms_error(got: &[f32], want: &[f64]) -> (f64, f64) {
    let (mut max, mut squares) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        let err = (f64::from(*g) - w).abs();
        max = max.max(err);
        squares += err * err;
    }
    (max, (squares / want.len().max(1) as f64).sqrt())
}

/// Median time of the forward kernel on the same call, and the output of
/// its first run (inside an error scope, so a kernel that does not compile
/// is an error here), which the caller validates.
fn time_prefill(
    gpu: &Gpu,
    args: &DecodeCmdArgs,
    (tokens, head_dim_v): (usize, usize),
    q: &Tensor,
    full: &(Vec<f32>, Vec<f32>),
    config: &AttentionConfig,
) -> Result<(f64, Vec<f32>)> {
    let k_shape = TensorShape::new(1, tokens, args.heads_kv, args.head_dim);
    let v_shape = TensorShape::new(1, tokens, args.heads_kv, head_dim_v);
    let k = Tensor::from_f32(gpu, k_shape, &full.0)?;
    let v = Tensor::from_f32(gpu, v_shape, &full.1)?;
    let q_shape = q.shape();
    let o_shape = TensorShape::new(q_shape.batch, q_shape.seq, q_shape.heads, head_dim_v);
    let out = Tensor::filled(gpu, o_shape, f32::NAN)?;
    let attention_args = AttentionArgs {
        q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    // The forward kernels, their tier forced: left to the planner, a call
    // of a decode step's shape runs as split-KV decoding itself
    // (`DecodePlan::for_forward`).
    let shape = attention_args.shape()?;
    let tier =
        wgpu_flash_attn::ForwardPlan::for_config(gpu.info(), &shape, q.dtype(), config)?.tier();
    let config = &config.clone().tier(tier);
    gpu.run(|e| gpu.forward(e, &attention_args, config))?;
    let got = out.to_f32_vec(gpu)?;
    let timing = time_gpu(
        gpu,
        TimingPlan {
            warmup: 1,
            runs: args.iters,
        },
        |encoder| gpu.forward(encoder, &attention_args, config),
    )?;
    Ok((timing.median_ms, got))
}
