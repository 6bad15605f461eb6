//! `flash-bench masks`: masks and padding at model scale. A BERT-base batch
//! with padding (valid lengths skipped entirely, against the same padding
//! as a dense boolean mask, and against no mask), and a Longformer layout
//! at N=4096 (block-sparse, against the same mask applied densely). Each
//! result is validated on sampled rows against the f64 reference first.
//! On CPU adapters the kernels compile ahead, one device per core
//! (`warmup.rs`).

mod warmup;

use anyhow::{Result, ensure};
use clap::Args;
use rand::RngExt;
use serde::Serialize;
use wgpu_flash_attn::reference::{self, HostMask, ReferenceOutput};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, BackwardArgs, ForwardOptions,
    Gpu, Lse, Tensor, ValidLengths, patterns,
};

use crate::backward::BACKWARD_FLOPS_PER_FORWARD;
use crate::measure::TOLERANCE;
use crate::options::DeviceSetup;
use crate::random::{normal_vec, seeded};
use crate::report::{AdapterJson, write_json};
use crate::timing::{self, TimingPlan, time_gpu};

#[derive(Debug, Args)]
pub struct MasksArgs {
    /// BERT batch size (sequence 512, 12 heads, d=64).
    #[arg(long, default_value_t = 8)]
    bert_batch: usize,
    /// Longformer sequence length (12 heads, d=64).
    #[arg(long, default_value_t = 4096)]
    longformer_seq: usize,
    /// Longformer attention window (keys, both sides together).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Timed runs (at least 1).
    #[arg(long, default_value_t = 3, value_parser = crate::options::parse_iters)]
    iters: usize,
    /// Also the backward (training): the BERT batch's, valid lengths
    /// against the dense mask, and a packed batch of short causal sequences
    /// against the same sequences padded; validated against the f64
    /// reference backward.
    #[arg(long)]
    backward: bool,
    /// Sequences of the packed backward batch (16-128 tokens each, 12
    /// heads, d=64).
    #[arg(long, default_value_t = 128)]
    packed_sequences: usize,
    /// The packed batch's sequence lengths instead, comma-separated (e.g.
    /// 2048,256: one long sequence beside a short one, whose work the
    /// grid must spread over the adapter's cores).
    #[arg(
        long,
        value_name = "N,N,...",
        value_delimiter = ',',
        value_parser = crate::options::parse_packed_len,
        requires = "backward",
        conflicts_with = "packed_sequences"
    )]
    packed_lens: Option<Vec<usize>>,
}

/// Query rows checked per case, spread over the sequence.
const SAMPLED_ROWS: usize = 24;

#[derive(Debug, Serialize)]
struct MaskRun {
    case: String,
    variant: String,
    median_ms: f64,
    /// Attended (query, key) pairs x 2 x (head_dim + head_dim_v) per second.
    useful_gflops: f64,
    /// Over the case's first variant (the dense mask where there is one).
    speedup_over_first: Option<f64>,
    /// Forward: the largest |out - reference|; backward: the largest
    /// |gradient - reference| over the largest reference gradient.
    max_abs_err: f64,
}

#[derive(Debug, Serialize)]
struct MasksReport {
    tool: &'static str,
    command: String,
    adapter: AdapterJson,
    timer: String,
    runs: Vec<MaskRun>,
}

/// One way to run a case: records its dispatch into an encoder.
type Variant<'a> = (
    &'static str,
    Box<dyn Fn(&mut wgpu::CommandEncoder) -> wgpu_flash_attn::Result<()> + 'a>,
);

pub fn run(
    gpu: &Gpu,
    setup: &DeviceSetup,
    args: &MasksArgs,
    json: Option<&std::path::Path>,
) -> Result<bool> {
    println!("{}", gpu.info().summary());
    warmup::compile_ahead(gpu, setup, args.backward);
    println!(
        "{:<50} {:<20} {:>10} {:>14} {:>14} {:>9}",
        "case", "variant", "ms", "useful GFLOP/s", "vs first", "max|err|"
    );
    let mut runs = Vec::new();
    let mut ok = true;
    let plan = TimingPlan {
        warmup: 1,
        runs: args.iters,
    };

    // BERT-base with padding: valid lengths between 128 and 512.
    let shape = AttentionShape::self_attention(args.bert_batch, 512, 12, 64);
    let mut rng = seeded(0xbe27);
    let lens: Vec<usize> = (0..shape.batch)
        .map(|_| rng.random_range(128..=512))
        .collect();
    let mut padding = vec![false; shape.batch * 512 * 512];
    for (b, &len) in lens.iter().enumerate() {
        for i in 0..512 {
            for j in 0..len {
                padding[(b * 512 + i) * 512 + j] = true;
            }
        }
    }
    let dims = [shape.batch, 1, 512, 512];
    let tensors = Tensors::new(gpu, &shape, 0xbe28)?;
    let dense = AttentionMask::boolean(gpu, dims, &padding)?;
    let config = AttentionConfig::new();
    let host = HostMask::Bool {
        dims,
        values: &padding,
    };
    let want = tensors.reference(&shape, &config, &host)?;
    let attended: usize = lens.iter().map(|&len| 512 * len).sum::<usize>() * shape.heads_q;
    let (lens_ref, tensors_ref, config_ref) = (&lens, &tensors, &config);
    let variants: Vec<Variant> = vec![
        (
            "dense boolean mask",
            Box::new(|e: &mut wgpu::CommandEncoder| {
                gpu.forward(
                    e,
                    &tensors.args(),
                    ForwardOptions::new(&config).mask(&dense),
                )
            }),
        ),
        (
            "valid lengths",
            Box::new(move |e: &mut wgpu::CommandEncoder| {
                gpu.forward(
                    e,
                    &tensors_ref.args(),
                    ForwardOptions::new(config_ref).valid_lengths(ValidLengths {
                        q: None,
                        kv: lens_ref,
                    }),
                )
            }),
        ),
    ];
    let name = format!("BERT-base B{} N512 H12 d64, lens 128-512", shape.batch);
    ok &= measure(
        gpu, &name, variants, &tensors, &want, attended, &shape, plan, &mut runs,
    )?;
    if args.backward {
        let padded = Padded {
            shape: &shape,
            lens: &lens,
            dense: &dense,
            host: &host,
        };
        ok &= padded_backward(gpu, &padded, &tensors, attended, plan, &mut runs)?;
        let packed = match &args.packed_lens {
            Some(lens) => {
                let joined: Vec<String> = lens.iter().map(usize::to_string).collect();
                PackedBatch {
                    lens: lens.clone(),
                    label: format!("causal seqs {}", joined.join("+")),
                }
            }
            None => {
                let mut rng = seeded(0x9ac3);
                let count = args.packed_sequences;
                PackedBatch {
                    lens: (0..count).map(|_| rng.random_range(16..=128)).collect(),
                    label: format!("{count} causal seqs 16-128"),
                }
            }
        };
        ok &= packed_forward_backward(gpu, &packed, plan, &mut runs)?;
    }

    // Longformer: sliding window plus global tokens.
    let n = args.longformer_seq;
    let shape = AttentionShape::self_attention(1, n, 12, 64);
    let globals: Vec<usize> = (0..n).step_by(1024).collect();
    let pattern = patterns::longformer(n, args.window, &globals)?;
    let dims = [1, 1, n, n];
    let tensors = Tensors::new(gpu, &shape, 0x10f0)?;
    let dense = AttentionMask::boolean(gpu, dims, &pattern)?;
    let sparse = AttentionMask::block_sparse(gpu, dims, &pattern)?;
    let host = HostMask::Bool {
        dims,
        values: &pattern,
    };
    let want = tensors.reference(&shape, &config, &host)?;
    let attended = pattern.iter().filter(|&&on| on).count() * shape.heads_q;
    let variants: Vec<Variant> = vec![
        (
            "dense boolean mask",
            Box::new(|e: &mut wgpu::CommandEncoder| {
                gpu.forward(
                    e,
                    &tensors.args(),
                    ForwardOptions::new(&config).mask(&dense),
                )
            }),
        ),
        (
            "block-sparse",
            Box::new(|e: &mut wgpu::CommandEncoder| {
                gpu.forward(
                    e,
                    &tensors.args(),
                    ForwardOptions::new(&config).mask(&sparse),
                )
            }),
        ),
    ];
    let name = format!(
        "Longformer N{n} H12 d64, window {}, {} global",
        args.window,
        globals.len()
    );
    ok &= measure(
        gpu, &name, variants, &tensors, &want, attended, &shape, plan, &mut runs,
    )?;

    println!(
        "useful GFLOP/s counts 2 x (head_dim + head_dim_v) FLOPs per attended (query, key) pair \
         (backward: 2.5 times that); a backward's max|err| is relative to its largest gradient"
    );
    if let Some(path) = json {
        let report = MasksReport {
            tool: "flash-bench masks",
            command: std::env::args().collect::<Vec<_>>().join(" "),
            adapter: AdapterJson::of_device(gpu.info()),
            timer: format!(
                "GPU timestamps where available (median after a validating run{})",
                timing::warm_up_note(gpu)
            ),
            runs,
        };
        write_json(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ok)
}

/// A padded batch both ways: valid lengths, and the same padding as a
/// dense boolean mask.
struct Padded<'a> {
    shape: &'a AttentionShape,
    lens: &'a [usize],
    dense: &'a AttentionMask,
    host: &'a HostMask<'a>,
}

/// The padded batch's backward after its forward, each way; validated
/// against the f64 reference backward (every gradient, relative to the
/// largest), then timed alone.
fn padded_backward(
    gpu: &Gpu,
    padded: &Padded<'_>,
    tensors: &Tensors,
    attended: usize,
    plan: TimingPlan,
    runs: &mut Vec<MaskRun>,
) -> Result<bool> {
    let shape = padded.shape;
    let config = AttentionConfig::new();
    let mut rng = seeded(0xbe29);
    let d_out_host = normal_vec(&mut rng, shape.o_shape().elements(), 1.0);
    let d_out = Tensor::from_f32(gpu, shape.o_shape(), &d_out_host)?;
    let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q)?;
    let poisoned = |dims| Tensor::filled(gpu, dims, f32::NAN);
    let (dq, dk, dv) = (
        poisoned(shape.q_shape())?,
        poisoned(shape.k_shape())?,
        poisoned(shape.v_shape())?,
    );
    let (q, k, v) = &tensors.host;
    let want =
        reference::attention_backward(shape, [q, k, v, &d_out_host], &config, Some(padded.host))?;
    let name = format!(
        "BERT-base B{} N512 H12 d64 backward, lens 128-512",
        shape.batch
    );
    let options = [
        (
            "dense boolean mask",
            ForwardOptions::new(&config).mask(padded.dense),
        ),
        (
            "valid lengths",
            ForwardOptions::new(&config).valid_lengths(ValidLengths {
                q: None,
                kv: padded.lens,
            }),
        ),
    ];
    let backward = BackwardArgs {
        q: &tensors.q,
        k: &tensors.k,
        v: &tensors.v,
        out: &tensors.out,
        lse: &lse,
        d_out: &d_out,
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dsinks: None,
    };
    let mut ok = true;
    let mut dense_ms = None;
    for (variant, options) in options {
        gpu.run(|e| {
            gpu.forward(e, &backward.forward_args(), options.clone())?;
            gpu.backward(e, &backward, options.clone())
        })?;
        let mut err = 0.0f64;
        for (got, want) in [(&dq, &want.dq), (&dk, &want.dk), (&dv, &want.dv)] {
            let what = format!("{name} / {variant}");
            err = err.max(scaled_error(
                &got.to_f32_vec(gpu)?,
                want,
                largest(want),
                &what,
            )?);
        }
        ok &= err <= BACKWARD_TOLERANCE;
        let timing = time_gpu(gpu, plan, |e| gpu.backward(e, &backward, options.clone()))?;
        let ms = timing.median_ms;
        let per_pair = 2.0 * (shape.head_dim + shape.head_dim_v) as f64;
        let flops = BACKWARD_FLOPS_PER_FORWARD * per_pair * attended as f64;
        let gflops = flops / (ms / 1e3) / 1e9;
        let speedup = dense_ms.map(|dense: f64| dense / ms);
        dense_ms = dense_ms.or(Some(ms));
        report_row(&name, variant, ms, gflops, speedup, err, runs);
    }
    Ok(ok)
}

/// Prints a result row and keeps it for the JSON report.
fn report_row(
    name: &str,
    variant: &str,
    ms: f64,
    gflops: f64,
    speedup: Option<f64>,
    err: f64,
    runs: &mut Vec<MaskRun>,
) {
    let speedup_text = speedup.map_or_else(|| "-".to_string(), |s| format!("{s:.2}x"));
    println!("{name:<50} {variant:<20} {ms:>10.2} {gflops:>14.2} {speedup_text:>14} {err:>9.2e}");
    runs.push(MaskRun {
        case: name.to_string(),
        variant: variant.to_string(),
        median_ms: ms,
        useful_gflops: gflops,
        speedup_over_first: speedup,
        max_abs_err: err,
    });
}

/// The row of token `i` of sequence `b` in a layout.
type RowOf<'a> = dyn Fn(usize, usize) -> usize + 'a;

/// The sequences of `masks --backward`'s packed batch.
struct PackedBatch {
    lens: Vec<usize>,
    /// How the case names them ("128 causal seqs 16-128", "causal seqs
    /// 2048+256").
    label: String,
}

/// One timed variant of a packed case, reported once all have run.
struct PackedRow {
    variant: &'static str,
    ms: f64,
    gflops: f64,
    err: f64,
}

/// A packed batch of causal sequences (12 heads, d=64; by default 16-128
/// tokens each, supervised fine-tuning's shape), its forward and its
/// backward two ways: padded to the longest with valid lengths, and packed
/// with cumulative offsets (`cu_seqlens`). Every output and gradient of
/// every sequence is validated against the f64 reference of that sequence
/// alone; padding must hold zeros.
fn packed_forward_backward(
    gpu: &Gpu,
    batch: &PackedBatch,
    plan: TimingPlan,
    runs: &mut Vec<MaskRun>,
) -> Result<bool> {
    let (heads, d) = (12, 64);
    let width = heads * d;
    let lens = &batch.lens;
    let count = lens.len();
    let mut rng = seeded(0x9ac4);
    let longest = lens.iter().copied().max().unwrap_or(1);
    let mut cu = vec![0];
    for &len in lens {
        cu.push(cu.last().unwrap() + len);
    }
    let total = cu[count];
    let config = AttentionConfig::new().causal(true);
    // Per sequence: q, k, v, dO as [len, heads, d], and its gradients.
    let inputs: Vec<[Vec<f32>; 4]> = lens
        .iter()
        .map(|&len| std::array::from_fn(|_| normal_vec(&mut rng, len * width, 1.0)))
        .collect();
    let mut wants = Vec::with_capacity(count);
    for (x, &len) in inputs.iter().zip(lens) {
        let alone = AttentionShape::self_attention(1, len, heads, d);
        let [q, k, v, d_out] = x;
        wants.push(reference::attention_backward(
            &alone,
            [q, k, v, d_out],
            &config,
            None,
        )?);
    }
    let attended: usize = lens.iter().map(|&n| n * (n + 1) / 2).sum::<usize>() * heads;
    let forward_flops = 2.0 * (2 * d) as f64 * attended as f64;
    let forward_name = format!("packed forward, {} H12 d64", batch.label);
    let backward_name = format!("packed backward, {} H12 d64", batch.label);
    let padded_shape = AttentionShape::self_attention(count, longest, heads, d);
    let packed_shape = AttentionShape::self_attention(1, total, heads, d);
    // Where token `i` of sequence `b` lives in each layout.
    let padded_row = |b: usize, i: usize| b * longest + i;
    let packed_row = |b: usize, i: usize| cu[b] + i;
    let layouts: [(&str, AttentionShape, &RowOf); 2] = [
        ("padded, valid lengths", padded_shape, &padded_row),
        ("packed, cu_seqlens", packed_shape, &packed_row),
    ];
    let mut ok = true;
    let (mut forward_rows, mut backward_rows) = (Vec::new(), Vec::new());
    for (variant, shape, row_of) in layouts {
        let rows = shape.batch * shape.seq_q;
        let mut host: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.0; rows * width]);
        for (b, x) in inputs.iter().enumerate() {
            for i in 0..lens[b] {
                let at = row_of(b, i) * width;
                for (to, from) in host.iter_mut().zip(x) {
                    to[at..at + width].copy_from_slice(&from[i * width..(i + 1) * width]);
                }
            }
        }
        let dims = shape.q_shape();
        let upload = |data: &[f32]| Tensor::from_f32(gpu, dims, data);
        let (q, k, v, d_out) = (
            upload(&host[0])?,
            upload(&host[1])?,
            upload(&host[2])?,
            upload(&host[3])?,
        );
        let poisoned = || Tensor::filled(gpu, dims, f32::NAN);
        let (out, dq, dk, dv) = (poisoned()?, poisoned()?, poisoned()?, poisoned()?);
        let lse = Lse::new(gpu, shape.batch, heads, shape.seq_q)?;
        let options = if shape.batch == 1 {
            ForwardOptions::new(&config).varlen(&cu, &cu)
        } else {
            ForwardOptions::new(&config).valid_lengths(ValidLengths {
                q: Some(lens),
                kv: lens,
            })
        };
        let backward = BackwardArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
            d_out: &d_out,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dsinks: None,
        };
        gpu.run(|e| {
            gpu.forward(e, &backward.forward_args(), options.clone())?;
            gpu.backward(e, &backward, options.clone())
        })?;
        let got_out = out.to_f32_vec(gpu)?;
        let got = [
            dq.to_f32_vec(gpu)?,
            dk.to_f32_vec(gpu)?,
            dv.to_f32_vec(gpu)?,
        ];
        let (mut out_err, mut err) = (0.0f64, 0.0f64);
        let mut valid = vec![false; rows];
        for (b, want) in wants.iter().enumerate() {
            for i in 0..lens[b] {
                let at = row_of(b, i) * width;
                let (got, want) = (
                    &got_out[at..at + width],
                    &want.out[i * width..(i + 1) * width],
                );
                let what = format!("{forward_name} / {variant}");
                // Outputs are held to an absolute bound: magnitude 1.
                out_err = out_err.max(scaled_error(got, want, 1.0, &what)?);
            }
            let want = [&want.dq, &want.dk, &want.dv];
            for (got, want) in got.iter().zip(want) {
                let magnitude = largest(want);
                for i in 0..lens[b] {
                    let at = row_of(b, i) * width;
                    valid[row_of(b, i)] = true;
                    let (got, want) = (&got[at..at + width], &want[i * width..(i + 1) * width]);
                    let what = format!("{backward_name} / {variant}");
                    err = err.max(scaled_error(got, want, magnitude, &what)?);
                }
            }
        }
        // Padding rows get zero outputs and gradients.
        for (row, _) in valid.iter().enumerate().filter(|(_, v)| !**v) {
            for got in got.iter().chain([&got_out]) {
                ensure!(
                    got[row * width..(row + 1) * width]
                        .iter()
                        .all(|&g| g == 0.0),
                    "{backward_name} / {variant}: padding row {row} is not zeros"
                );
            }
        }
        ok &= out_err <= TOLERANCE && err <= BACKWARD_TOLERANCE;
        let forward = time_gpu(gpu, plan, |e| {
            gpu.forward(e, &backward.forward_args(), options.clone())
        })?;
        forward_rows.push(PackedRow {
            variant,
            ms: forward.median_ms,
            gflops: forward_flops / (forward.median_ms / 1e3) / 1e9,
            err: out_err,
        });
        let timing = time_gpu(gpu, plan, |e| gpu.backward(e, &backward, options.clone()))?;
        backward_rows.push(PackedRow {
            variant,
            ms: timing.median_ms,
            gflops: BACKWARD_FLOPS_PER_FORWARD * forward_flops / (timing.median_ms / 1e3) / 1e9,
            err,
        });
    }
    for (name, rows) in [
        (&forward_name, forward_rows),
        (&backward_name, backward_rows),
    ] {
        let first_ms = rows[0].ms;
        for (i, row) in rows.iter().enumerate() {
            let speedup = (i > 0).then(|| first_ms / row.ms);
            report_row(
                name,
                row.variant,
                row.ms,
                row.gflops,
                speedup,
                row.err,
                runs,
            );
        }
    }
    Ok(ok)
}

/// The largest |reference gradient|, at least 1.
fn largest(want: &[f64]) -> f64 {
    want.iter().fold(1.0f64, |m, w| m.max(w.abs()))
}

/// The largest |got - want| over `magnitude`; an unwritten (non-finite)
/// output or gradient is an error.
fn scaled_error(got: &[f32], want: &[f64], magnitude: f64, what: &str) -> Result<f64> {
    let mut err = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        ensure!(g.is_finite(), "{what}: a value was not written");
        err = err.max((f64::from(*g) - w).abs() / magnitude);
    }
    Ok(err)
}

/// Backward gradients: within this share of the largest reference gradient
/// (the test suite's f32 rule).
const BACKWARD_TOLERANCE: f64 = 2e-5;

/// Device inputs and an output for one shape.
struct Tensors {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    host: (Vec<f32>, Vec<f32>, Vec<f32>),
}

impl Tensors {
    fn new(gpu: &Gpu, shape: &AttentionShape, seed: u64) -> Result<Self> {
        let mut rng = seeded(seed);
        let q = normal_vec(&mut rng, shape.q_shape().elements(), 1.0);
        let k = normal_vec(&mut rng, shape.k_shape().elements(), 1.0);
        let v = normal_vec(&mut rng, shape.v_shape().elements(), 1.0);
        Ok(Tensors {
            q: Tensor::from_f32(gpu, shape.q_shape(), &q)?,
            k: Tensor::from_f32(gpu, shape.k_shape(), &k)?,
            v: Tensor::from_f32(gpu, shape.v_shape(), &v)?,
            out: Tensor::filled(gpu, shape.q_shape(), f32::NAN)?,
            host: (q, k, v),
        })
    }

    fn args(&self) -> AttentionArgs<'_> {
        AttentionArgs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            out: &self.out,
            lse: None,
        }
    }

    /// The reference on sampled rows (every head and batch entry).
    fn reference(
        &self,
        shape: &AttentionShape,
        config: &AttentionConfig,
        mask: &HostMask<'_>,
    ) -> Result<ReferenceOutput> {
        let step = (shape.seq_q / SAMPLED_ROWS).max(1);
        let last = shape.seq_q - 1;
        let (q, k, v) = &self.host;
        Ok(reference::attention_masked_rows(
            shape,
            q,
            k,
            v,
            config,
            mask,
            |_, _, i| i % step == 0 || i == last,
        )?)
    }
}

/// Runs each variant once and validates it, then times it; prints a row
/// per variant. Ok(false) when a result disagrees with the reference.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per case, all of them needed"
)]
fn measure(
    gpu: &Gpu,
    name: &str,
    variants: Vec<Variant<'_>>,
    tensors: &Tensors,
    want: &ReferenceOutput,
    attended: usize,
    shape: &AttentionShape,
    plan: TimingPlan,
    runs: &mut Vec<MaskRun>,
) -> Result<bool> {
    let mut ok = true;
    let mut dense_ms = None;
    for (variant, record) in variants {
        // Inside an error scope: a kernel that does not compile (a bad
        // --shader-dir) is an error, not a panic.
        gpu.run(|encoder| record(encoder))?;
        let got = tensors.out.to_f32_vec(gpu)?;
        let mut err = 0.0f64;
        for (g, w) in got.iter().zip(&want.out) {
            if w.is_nan() {
                continue;
            }
            ensure!(
                !g.is_nan(),
                "{name} / {variant}: an output element was not written"
            );
            err = err.max((f64::from(*g) - w).abs());
        }
        ok &= err <= TOLERANCE;
        let timing = time_gpu(gpu, plan, |encoder| record(encoder))?;
        let ms = timing.median_ms;
        let per_pair = 2.0 * (shape.head_dim + shape.head_dim_v) as f64;
        let gflops = per_pair * attended as f64 / (ms / 1e3) / 1e9;
        let speedup = dense_ms.map(|dense: f64| dense / ms);
        if variant == "dense boolean mask" {
            dense_ms = Some(ms);
        }
        report_row(name, variant, ms, gflops, speedup, err, runs);
    }
    Ok(ok)
}
