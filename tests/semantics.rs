//! The full option set against the reference: GQA/MQA, windows, custom
//! scale, softcap, ALiBi, logsumexp, every head dim, strided layouts, the
//! seed-model presets, and seeded random combinations of all of them.

mod common;
#[path = "../src/bin/flash-bench/presets.rs"]
#[allow(dead_code, reason = "the tests use the shapes, not the names")]
mod presets;

use common::random::{SeededRng, seeded};
use common::{
    Inputs, assert_close, attention_shape as shape, gpu, run_and_compare, run_views_and_compare,
};
use presets::seed_models;
use rand::{Rng, RngExt};
use wgpu_flash_attn::{Alibi, AttentionConfig, AttentionShape, Gpu, Strides, Tensor, TensorShape};

fn check(gpu: &Gpu, shape: &AttentionShape, config: &AttentionConfig, seed: u64) {
    let inputs = Inputs::draw(shape, seed, 1.0);
    let errors = run_and_compare(gpu, shape, &inputs, config);
    assert_close(errors, &format!("{shape:?} {config:?} seed={seed}"));
}

#[test]
fn grouped_and_multi_query_attention() {
    let Some(gpu) = gpu() else { return };
    for (heads, seq_q, seq_kv) in [
        ((8, 2), 65, 129),
        ((6, 1), 100, 37),
        ((64, 8), 33, 70),
        ((4, 4), 9, 9),
    ] {
        for causal in [false, true] {
            check(
                gpu,
                &shape(2, seq_q, seq_kv, heads, 64),
                &AttentionConfig::new().causal(causal),
                11,
            );
        }
    }
}

#[test]
fn sliding_windows() {
    let Some(gpu) = gpu() else { return };
    let windows = [
        (Some(0), Some(0)),
        (Some(16), Some(0)),
        (Some(5), Some(9)),
        (None, Some(3)),
        (Some(40), None),
        (Some(1000), Some(1000)),
    ];
    for (left, right) in windows {
        for (seq_q, seq_kv) in [(129, 129), (50, 200), (200, 50)] {
            for causal in [false, true] {
                let config = AttentionConfig::new().window(left, right).causal(causal);
                check(gpu, &shape(1, seq_q, seq_kv, (3, 1), 32), &config, 12);
            }
        }
    }
}

/// Rows that no key reaches give zeros and +inf logsumexp (asserted in
/// `compare`); some rows here are empty, the others are not.
#[test]
fn windows_that_leave_rows_empty() {
    let Some(gpu) = gpu() else { return };
    // pos_i = i - 40: rows below 37 see nothing with right = 3.
    let config = AttentionConfig::new().window(Some(2), Some(3));
    check(gpu, &shape(1, 50, 10, (2, 2), 16), &config, 13);
    let reference = wgpu_flash_attn::reference::attention(
        &shape(1, 50, 10, (2, 2), 16),
        &[0.5; 50 * 2 * 16],
        &[0.5; 10 * 2 * 16],
        &[0.5; 10 * 2 * 16],
        &config,
    )
    .unwrap();
    assert_eq!(
        reference.lse.iter().filter(|l| l.is_infinite()).count(),
        2 * 37
    );
}

#[test]
fn scale_softcap_and_alibi() {
    let Some(gpu) = gpu() else { return };
    let s = shape(2, 70, 90, (4, 2), 64);
    let per_batch: Vec<f32> = (0..8).map(|i| 0.01 + 0.03 * i as f32).collect();
    let configs = [
        AttentionConfig::new().scale(0.3),
        AttentionConfig::new().scale(-0.05),
        AttentionConfig::new().softcap(2.0),
        AttentionConfig::new().softcap(30.0).causal(true),
        AttentionConfig::new().alibi(Alibi::PerHead(Alibi::standard_slopes(4))),
        AttentionConfig::new()
            .alibi(Alibi::PerBatchHead(per_batch.clone()))
            .causal(true),
        AttentionConfig::new()
            .scale(0.2)
            .softcap(5.0)
            .alibi(Alibi::PerBatchHead(per_batch))
            .window(Some(20), Some(7)),
    ];
    for (index, config) in configs.iter().enumerate() {
        check(gpu, &s, config, 20 + index as u64);
    }
}

#[test]
fn standard_alibi_slopes() {
    let eight = Alibi::standard_slopes(8);
    let expected: Vec<f32> = (1..=8).map(|i| 2f32.powi(-i)).collect();
    for (got, want) in eight.iter().zip(&expected) {
        assert!((got - want).abs() < 1e-7, "{eight:?}");
    }
    // 12 heads: the 8-head slopes, then odd powers of the 16-head sequence.
    let twelve = Alibi::standard_slopes(12);
    assert_eq!(twelve.len(), 12);
    assert_eq!(&twelve[..8], &eight[..]);
    assert!((twelve[8] - 2f32.powf(-0.5)).abs() < 1e-7);
    assert!((twelve[9] - 2f32.powf(-1.5)).abs() < 1e-7);
}

/// Every supported head dim (multiples of 8 from 8 to 256) in the
/// exhaustive mode; otherwise one of each tiling class (rows per
/// invocation 16/8/4, keys per tile 64/32/16, head dims that split
/// unevenly over subgroup lanes), and the common 64 and 128 (200 and 256,
/// 4 rows like 136, compile for minutes on a cold lavapipe: exhaustive).
#[test]
fn every_head_dim() {
    let Some(gpu) = gpu() else { return };
    let dims = common::head_dims("every_head_dim (f32)", &[8, 40, 64, 72, 128, 136]);
    for head_dim in dims {
        let config = AttentionConfig::new().causal(head_dim % 16 == 0);
        check(
            gpu,
            &shape(1, 37, 45, (2, 1), head_dim),
            &config,
            head_dim as u64,
        );
    }
}

/// How operands are laid out in their buffers.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Packed `[batch, seq, heads, head_dim]`.
    Bshd,
    /// Packed `[batch, heads, seq, head_dim]`.
    Bhsd,
    /// One `[batch, seq, 3, heads, head_dim]` projection output, seen as Q,
    /// K and V (self-attention with equal heads only).
    PackedQkv,
    /// BSHD with padding between heads and rows (strides past the data).
    Padded,
}

/// Strides and offset of operand `which` (0 = q, 1 = k, 2 = v, 3 = out),
/// and the buffer length in elements.
fn placement(layout: Layout, dims: TensorShape, which: usize) -> (Strides, usize, usize) {
    let TensorShape {
        batch: b,
        seq: s,
        heads: h,
        head_dim: d,
    } = dims;
    match layout {
        Layout::Bshd => (dims.contiguous_strides(), 0, dims.elements()),
        Layout::Bhsd => (
            Strides {
                batch: h * s * d,
                seq: d,
                head: s * d,
            },
            0,
            dims.elements(),
        ),
        Layout::PackedQkv => (
            Strides {
                batch: s * 3 * h * d,
                seq: 3 * h * d,
                head: d,
            },
            (which % 3) * h * d,
            b * s * 3 * h * d,
        ),
        Layout::Padded => {
            let head = d + 4;
            let seq = h * head + 8;
            let batch = s * seq + 12;
            (Strides { batch, seq, head }, 4 * which + 4, b * batch + 32)
        }
    }
}

/// Places packed BSHD `data` into a NaN-filled buffer at `strides`/`offset`.
fn scatter(
    data: &[f32],
    dims: TensorShape,
    strides: Strides,
    offset: usize,
    len: usize,
) -> Vec<f32> {
    let mut buffer = vec![f32::NAN; len];
    let d = dims.head_dim;
    for (row, chunk) in data.chunks(d).enumerate() {
        let h = row % dims.heads;
        let i = (row / dims.heads) % dims.seq;
        let b = row / (dims.heads * dims.seq);
        let start = offset + b * strides.batch + i * strides.seq + h * strides.head;
        buffer[start..start + d].copy_from_slice(chunk);
    }
    buffer
}

fn check_layout(
    gpu: &Gpu,
    shape: &AttentionShape,
    config: &AttentionConfig,
    layout: Layout,
    seed: u64,
) {
    let inputs = Inputs::draw(shape, seed, 1.0);
    let view = |which: usize, dims: TensorShape, data: &[f32]| {
        let (strides, offset, len) = placement(layout, dims, which);
        let buffer = Tensor::from_f32(
            gpu,
            TensorShape::new(1, 1, 1, len),
            &scatter(data, dims, strides, offset, len),
        )
        .unwrap();
        buffer.view(dims, strides, offset).unwrap()
    };
    let (q, k, v) = match layout {
        Layout::PackedQkv => {
            // One buffer holding all three, interleaved per token.
            let dims = shape.q_shape();
            let (strides, _, len) = placement(layout, dims, 0);
            let mut packed = scatter(&inputs.q, dims, strides, 0, len);
            for (which, data) in [(1, &inputs.k), (2, &inputs.v)] {
                let (_, offset, _) = placement(layout, dims, which);
                for (dst, src) in packed
                    .iter_mut()
                    .zip(scatter(data, dims, strides, offset, len))
                {
                    if !src.is_nan() {
                        *dst = src;
                    }
                }
            }
            let buffer = Tensor::from_f32(gpu, TensorShape::new(1, 1, 1, len), &packed).unwrap();
            let at = |which| {
                let (strides, offset, _) = placement(layout, dims, which);
                buffer.view(dims, strides, offset).unwrap()
            };
            (at(0), at(1), at(2))
        }
        _ => (
            view(0, shape.q_shape(), &inputs.q),
            view(1, shape.k_shape(), &inputs.k),
            view(2, shape.v_shape(), &inputs.v),
        ),
    };
    // The output goes to its own buffer in the same layout, NaN-poisoned.
    let out_layout = match layout {
        Layout::PackedQkv => Layout::Bhsd,
        other => other,
    };
    let (strides, offset, len) = placement(out_layout, shape.o_shape(), 3);
    let out = Tensor::filled(gpu, TensorShape::new(1, 1, 1, len), f32::NAN)
        .unwrap()
        .view(shape.o_shape(), strides, offset)
        .unwrap();
    let errors = run_views_and_compare(gpu, shape, &inputs, config, [&q, &k, &v, &out]);
    assert_close(errors, &format!("{layout:?} {shape:?} {config:?}"));
}

#[test]
fn strided_layouts() {
    let Some(gpu) = gpu() else { return };
    for layout in [Layout::Bshd, Layout::Bhsd, Layout::Padded] {
        for causal in [false, true] {
            let config = AttentionConfig::new().causal(causal);
            check_layout(gpu, &shape(2, 67, 45, (4, 2), 32), &config, layout, 30);
        }
    }
    for causal in [false, true] {
        let config = AttentionConfig::new().causal(causal);
        check_layout(
            gpu,
            &shape(2, 70, 70, (3, 3), 64),
            &config,
            Layout::PackedQkv,
            31,
        );
    }
}

/// Every seed-model preset at a test-sized length, causal where the model is.
#[test]
fn seed_model_presets() {
    let Some(gpu) = gpu() else { return };
    for (index, preset) in seed_models().iter().enumerate() {
        // Cross-attention keeps its unequal lengths.
        let (seq_q, seq_kv) = if preset.shape.seq_q == preset.shape.seq_kv {
            (100, 100)
        } else {
            (80, 120)
        };
        let small = preset.with_seq(seq_q, seq_kv);
        check(gpu, &small.shape, &small.config(), 40 + index as u64);
    }
}

/// Seeded random combinations of every option and layout. Set
/// FLASH_ATTN_PROPTEST_SEED to replay a run; the seed is printed. The
/// cases are drawn first, then run on as many devices as the tests get
/// (`common::devices_at_once`), each device taking every case of one
/// head-dim pair at a time, so that no two devices compile the same kernel
/// (on a cold lavapipe the compiles are most of this test's time).
#[test]
fn random_combinations() {
    if gpu().is_none() {
        return;
    }
    let seed = std::env::var("FLASH_ATTN_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c0_ffee_u64);
    eprintln!("random_combinations: seed {seed} (FLASH_ATTN_PROPTEST_SEED={seed} replays it)");
    let mut rng = seeded(seed);
    const CASES: usize = 200;
    let mut cases = Vec::with_capacity(CASES);
    for case in 0..CASES {
        let heads_kv = rng.random_range(1..=3);
        let heads_q = heads_kv * rng.random_range(1..=4);
        let head_dim = [8, 40, 64, 128][rng.random_range(0..4usize)];
        // One case in four has values of another width (MLA-style).
        let head_dim_v = if rng.random_ratio(1, 4) {
            [16, 48, 96][rng.random_range(0..3usize)]
        } else {
            head_dim
        };
        let s = AttentionShape {
            batch: rng.random_range(1..=3),
            seq_q: rng.random_range(1..=80),
            seq_kv: rng.random_range(1..=80),
            heads_q,
            heads_kv,
            head_dim,
            head_dim_v,
        };
        let side = |rng: &mut SeededRng| rng.random_ratio(1, 3).then(|| rng.random_range(0..40i64));
        let (left, right) = (side(&mut rng), side(&mut rng));
        let mut config = AttentionConfig::new()
            .causal(rng.random_bool(0.5))
            .window(left, right);
        if rng.random_bool(0.5) {
            config = config.scale((0.05 + 0.5 * rng.random::<f64>()) as f32);
        }
        if rng.random_ratio(1, 3) {
            config = config.softcap((1.0 + 30.0 * rng.random::<f64>()) as f32);
        }
        config = match rng.random_range(0..3) {
            0 => config.alibi(Alibi::PerHead(Alibi::standard_slopes(heads_q))),
            1 => config.alibi(Alibi::PerBatchHead(
                (0..s.batch * heads_q)
                    .map(|_| (0.2 * rng.random::<f64>()) as f32)
                    .collect(),
            )),
            _ => config,
        };
        let layout = match rng.random_range(0..3) {
            0 => Layout::Bhsd,
            1 => Layout::Padded,
            _ => Layout::Bshd,
        };
        let case_seed = rng.next_u64();
        cases.push((case, layout, s, config, case_seed));
    }
    let mut groups: Vec<Vec<_>> = Vec::new();
    for drawn in cases {
        let dims = |c: &(usize, Layout, AttentionShape, AttentionConfig, u64)| {
            (c.2.head_dim, c.2.head_dim_v)
        };
        match groups.iter_mut().find(|g| dims(&g[0]) == dims(&drawn)) {
            Some(group) => group.push(drawn),
            None => groups.push(vec![drawn]),
        }
    }
    common::on_the_devices(&groups, |gpu, group| {
        for (case, layout, s, config, case_seed) in group {
            let label = format!("case {case}: {layout:?} {s:?} {config:?}");
            eprintln!("{label}");
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_layout(gpu, s, config, *layout, *case_seed)
            }));
            if let Err(panic) = checked {
                eprintln!("FAILED {label}");
                std::panic::resume_unwind(panic);
            }
        }
    });
}
