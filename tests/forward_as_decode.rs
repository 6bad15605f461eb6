//! Dense forward calls with few query rows per KV head over many keys run
//! as split-KV decoding over K and V viewed as a cache
//! (`DecodePlan::for_forward`): checked against the f64 reference for
//! every option decoding shares with the forward, every storage type,
//! batches of sequences laid out with room to grow, and against the
//! forward kernels where the tensors are not laid out as a cache.

mod common;

use common::{
    Implementation, Inputs, assert_close, gpu, round_to, run_and_compare, unit_roundoff, with_tier,
};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionShape, DType, DecodePlan, Error,
    ForwardOptions, Gpu, Strides, Tensor, TensorShape, Tier, reference,
};

/// (batch, seq_q, seq_kv, (heads_q, heads_kv), head_dim).
type Dims = (usize, usize, usize, (usize, usize), usize);

/// Shapes that run as decoding: at most 16 query rows per KV head, 1024
/// keys or more.
const SHAPES: [Dims; 3] = [
    // One decoding step of a GQA model for two sequences.
    (2, 1, 1024, (8, 2), 64),
    // Three speculative tokens, 15 rows per KV head, 16-token pages.
    (1, 3, 2064, (10, 2), 128),
    // Multi-query, a head dim that fills no subgroup evenly.
    (1, 2, 1536, (4, 1), 40),
];

fn shape_of((batch, seq_q, seq_kv, (heads_q, heads_kv), head_dim): Dims) -> AttentionShape {
    common::attention_shape(batch, seq_q, seq_kv, (heads_q, heads_kv), head_dim)
}

fn configs(heads_q: usize) -> Vec<(&'static str, AttentionConfig)> {
    let sinks: Vec<f32> = (0..heads_q).map(|h| h as f32 * 0.5 - 1.0).collect();
    vec![
        ("plain", AttentionConfig::new()),
        ("causal", AttentionConfig::new().causal(true)),
        (
            "window, softcap, scale",
            AttentionConfig::new()
                .window(Some(300), Some(0))
                .softcap(20.0)
                .scale(0.3),
        ),
        (
            "causal, ALiBi, sinks",
            AttentionConfig::new()
                .causal(true)
                .alibi(Alibi::PerHead(Alibi::standard_slopes(heads_q)))
                .sinks(sinks),
        ),
    ]
}

#[test]
fn few_query_rows_over_many_keys_run_as_decoding_and_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (index, dims) in SHAPES.into_iter().enumerate() {
        let shape = shape_of(dims);
        let inputs = Inputs::draw(&shape, 40 + index as u64, 1.0);
        for (name, config) in configs(shape.heads_q) {
            let plan = DecodePlan::for_forward(gpu.info(), &shape, DType::F32, &config);
            assert!(
                plan.is_some(),
                "{shape:?} {name}: planned to run the forward kernels"
            );
            let errors = run_and_compare(gpu, &shape, &inputs, &config);
            assert_close(errors, &format!("{shape:?} {name}"));
        }
    }
}

/// What the forward kernels run instead: a forced tier, dropout, more
/// query rows per KV head, fewer keys, a key count that is no whole
/// number of pages.
#[test]
fn other_calls_keep_the_forward_kernels() {
    let Some(gpu) = gpu() else { return };
    let info = gpu.info();
    let shape = shape_of(SHAPES[0]);
    let plain = AttentionConfig::new();
    assert!(DecodePlan::for_forward(info, &shape, DType::F32, &plain).is_some());
    for (what, config) in [
        ("a forced tier", with_tier(&plain, Some(Tier::Portable))),
        ("dropout", plain.clone().dropout(0.1, 7)),
    ] {
        assert!(
            DecodePlan::for_forward(info, &shape, DType::F32, &config).is_none(),
            "{what}"
        );
    }
    for (what, shape) in [
        (
            "132 rows per KV head",
            AttentionShape {
                seq_q: 33,
                heads_q: 8,
                heads_kv: 2,
                ..shape
            },
        ),
        (
            "240 keys",
            AttentionShape {
                seq_kv: 240,
                ..shape
            },
        ),
        (
            "1030 keys",
            AttentionShape {
                seq_kv: 1030,
                ..shape
            },
        ),
        (
            "a value head dim of its own",
            AttentionShape {
                head_dim_v: 32,
                ..shape
            },
        ),
    ] {
        assert!(
            DecodePlan::for_forward(info, &shape, DType::F32, &plain).is_none(),
            "{what}"
        );
    }
}

/// Sixteen query tokens of a GQA group of eight (128 rows a KV head: a
/// speculative-decoding check or a short prompt chunk): decoding on CPU
/// adapters outside GL, where it measured faster than the forward kernels
/// up to 128 rows, the forward kernels elsewhere; the reference either way.
#[test]
fn a_128_row_group_runs_as_decoding_on_cpu_adapters_and_matches_the_reference() {
    let Some(gpu) = gpu() else { return };
    let info = gpu.info();
    let shape = shape_of((1, 16, 512, (8, 1), 64));
    let decodes_as_cpu = common::cpu_outside_gl(gpu);
    let inputs = Inputs::draw(&shape, 60, 1.0);
    for (name, config) in configs(shape.heads_q) {
        assert_eq!(
            DecodePlan::for_forward(info, &shape, DType::F32, &config).is_some(),
            decodes_as_cpu,
            "{name}: routed as decoding"
        );
        let errors = run_and_compare(gpu, &shape, &inputs, &config);
        assert_close(errors, &format!("128 rows a KV head, {name}"));
    }
}

/// f16 and bf16 storage: decoding computes in f32 from the stored values,
/// so each output is within its own rounding to the storage type of the
/// reference on those values, plus f32 noise. A newcomer's run takes the
/// multi-query d=40 shape (8 rows a KV head); the speculative d=128 one (15
/// rows) compiles for about a minute per storage type on a cold lavapipe,
/// and the exhaustive run takes it too.
#[test]
fn half_storage_runs_as_decoding_within_its_output_rounding() {
    let Some(gpu) = gpu() else { return };
    let config = AttentionConfig::new().causal(true);
    let shapes = common::cases(
        "half storage as decoding (shape)",
        &SHAPES[2..],
        &SHAPES[1..],
    );
    for (dims, dtype) in shapes
        .into_iter()
        .flat_map(|dims| [(dims, DType::F16), (dims, DType::BF16)])
    {
        let shape = shape_of(dims);
        assert!(DecodePlan::for_forward(gpu.info(), &shape, dtype, &config).is_some());
        let drawn = Inputs::draw(&shape, 50, 1.0);
        let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| round_to(dtype, v)).collect() };
        let (q, k, v) = (round(&drawn.q), round(&drawn.k), round(&drawn.v));
        let upload = |of, data: &[f32]| Tensor::from_f32_as(gpu, of, data, dtype).unwrap();
        let views = [
            &upload(shape.q_shape(), &q),
            &upload(shape.k_shape(), &k),
            &upload(shape.v_shape(), &v),
            &Tensor::filled_as(gpu, shape.o_shape(), f32::NAN, dtype).unwrap(),
        ];
        let options = ForwardOptions::new(&config);
        let (got, got_lse) = common::run_views(gpu, Implementation::Flash, &shape, options, views);
        let want = reference::attention(&shape, &q, &k, &v, &config).unwrap();
        let unit = unit_roundoff(dtype);
        for (i, (&g, &w)) in got.iter().zip(&want.out).enumerate() {
            let bound = 1e-4 + unit * w.abs();
            assert!(
                (f64::from(g) - w).abs() <= bound,
                "{dtype:?} {dims:?}: out[{i}] = {g}, reference {w}, bound {bound:.2e}"
            );
        }
        let lse_error = common::max_abs_error(&got_lse, &want.lse, "lse");
        assert!(
            lse_error <= 1e-4,
            "{dtype:?} {dims:?}: lse off by {lse_error:.2e}"
        );
    }
}

/// Capacity (tokens per sequence) of [`grown`]'s cache.
const CAPACITY: usize = 2048;

/// Packed `[batch, seq_kv, heads_kv, head_dim]` values in a cache with room
/// to grow: each sequence at the start of its [`CAPACITY`]-token run (NaN
/// past it), seen as a view of `shape.k_shape()`.
fn grown(gpu: &Gpu, shape: &AttentionShape, values: &[f32]) -> Tensor {
    let row = shape.heads_kv * shape.head_dim;
    let mut pool = vec![f32::NAN; shape.batch * CAPACITY * row];
    for b in 0..shape.batch {
        let run = shape.seq_kv * row;
        pool[b * CAPACITY * row..][..run].copy_from_slice(&values[b * run..][..run]);
    }
    let dims = TensorShape::new(shape.batch, CAPACITY, shape.heads_kv, shape.head_dim);
    let pool = Tensor::from_f32(gpu, dims, &pool).unwrap();
    let strides = Strides {
        batch: CAPACITY * row,
        seq: row,
        head: shape.head_dim,
    };
    pool.view(shape.k_shape(), strides, 0).unwrap()
}

/// The same values stored `[batch, heads_kv, seq_kv, head_dim]` (heads
/// apart: not a cache's rows), seen as a view of `shape.k_shape()`.
fn heads_apart(gpu: &Gpu, shape: &AttentionShape, values: &[f32]) -> Tensor {
    let mut bhsd = vec![0.0; values.len()];
    for b in 0..shape.batch {
        for s in 0..shape.seq_kv {
            for h in 0..shape.heads_kv {
                let from = ((b * shape.seq_kv + s) * shape.heads_kv + h) * shape.head_dim;
                let to = ((b * shape.heads_kv + h) * shape.seq_kv + s) * shape.head_dim;
                bhsd[to..to + shape.head_dim].copy_from_slice(&values[from..from + shape.head_dim]);
            }
        }
    }
    let dims = TensorShape::new(shape.batch, shape.heads_kv, shape.seq_kv, shape.head_dim);
    let stored = Tensor::from_f32(gpu, dims, &bhsd).unwrap();
    let strides = Strides {
        batch: shape.heads_kv * shape.seq_kv * shape.head_dim,
        seq: shape.head_dim,
        head: shape.seq_kv * shape.head_dim,
    };
    stored.view(shape.k_shape(), strides, 0).unwrap()
}

/// How K and V are stored for a call: a view of `shape.k_shape()`.
type KvLayout = fn(&Gpu, &AttentionShape, &[f32]) -> Tensor;

/// Q (packed), K and V (laid out by `layout`) and a NaN-poisoned output
/// for the forward of `inputs`.
fn operands_with_kv(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    layout: KvLayout,
) -> [Tensor; 4] {
    [
        Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap(),
        layout(gpu, shape, &inputs.k),
        layout(gpu, shape, &inputs.v),
        Tensor::filled(gpu, shape.o_shape(), f32::NAN).unwrap(),
    ]
}

/// The forward of `inputs` with K and V laid out by `layout`, against the
/// reference.
fn run_with_kv(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
    layout: KvLayout,
) -> common::Errors {
    let [q, k, v, out] = operands_with_kv(gpu, shape, inputs, layout);
    common::run_views_and_compare(gpu, shape, inputs, config, [&q, &k, &v, &out])
}

/// A batch whose sequences sit in a cache with room to grow (a batch
/// stride of 2048 tokens, 1024 in use) runs as decoding over its pages;
/// K and V with their heads apart (not a cache's rows) run the forward
/// kernels (which of the two runs is proven below). Both match the
/// reference.
#[test]
fn views_run_as_decoding_where_they_are_laid_out_as_a_cache() {
    let Some(gpu) = gpu() else { return };
    let shape = shape_of(SHAPES[0]);
    let config = AttentionConfig::new().causal(true);
    let inputs = Inputs::draw(&shape, 60, 1.0);
    assert_close(
        run_with_kv(gpu, &shape, &inputs, &config, grown),
        "K and V in a cache with room to grow",
    );
    assert_close(
        run_with_kv(gpu, &shape, &inputs, &config, heads_apart),
        "K and V with their heads apart",
    );
}

/// The calls above do run the decode kernel: on a device whose decode
/// kernel file is replaced by text no compiler accepts, a call that runs
/// as decoding (packed K and V, or a grown cache) fails, and the same call
/// with a forced tier, or with K and V's heads apart, does not.
#[test]
fn a_call_that_runs_as_decoding_runs_the_decode_kernel() {
    if gpu().is_none() {
        return;
    }
    let gpu = Gpu::new().expect("a second device on the test adapter");
    gpu.override_shader_file("flash_decode.wgsl", "this is not WGSL")
        .unwrap();
    let shape = shape_of(SHAPES[0]);
    let inputs = Inputs::draw(&shape, 70, 1.0);
    let config = AttentionConfig::new();
    let failed = gpu.attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config);
    assert!(
        matches!(
            failed,
            Err(Error::ShaderSource { .. } | Error::GpuValidation { .. })
        ),
        "the forward ran without the decode kernel: {:?}",
        failed.map(|_| "Ok")
    );
    let [q, k, v, out] = operands_with_kv(&gpu, &shape, &inputs, grown);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let failed = gpu.run(|e| gpu.forward(e, &args, &config));
    assert!(
        matches!(
            failed,
            Err(Error::ShaderSource { .. } | Error::GpuValidation { .. })
        ),
        "a grown cache ran without the decode kernel: {failed:?}"
    );
    // Into the program's own encoder, where wgpu would report the failed
    // compile with a panic: the same typed error, naming the kernel.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let failed = gpu.forward(&mut encoder, &args, &config);
    assert!(
        matches!(&failed, Err(Error::ShaderSource { kernel, .. }) if kernel.contains("flash_decode")),
        "the caller's encoder: {failed:?}"
    );
    drop(encoder);
    assert_close(
        run_with_kv(&gpu, &shape, &inputs, &config, heads_apart),
        "heads apart on the broken-decode device",
    );
    let [_, other_tier] = common::forward_tiers(&gpu, DType::F32);
    let forced = with_tier(&config, other_tier);
    assert_close(
        run_and_compare(&gpu, &shape, &inputs, &forced),
        "a forced tier on the broken-decode device",
    );
}
