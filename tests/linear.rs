//! Linear attention on the GPU against the f64 recurrent reference: both
//! feature maps, causal and not, GQA, value head dims unlike the query
//! ones, lengths around the 64-token chunk, large inputs, half storage, a
//! state carried across calls and token-by-token decoding, a device whose
//! small binding limit forces the multi-segment path, strided views of a
//! fused QKV buffer, and typed errors.

mod common;

use common::random::{normal_vec, seeded};
use common::{cases, gpu, round_to, unit_roundoff};
use wgpu_flash_attn::reference::{self, LinearReferenceState};
use wgpu_flash_attn::{
    DType, Error, FeatureMap, Gpu, LinearArgs, LinearConfig, LinearPlan, LinearShape, LinearState,
    Strides, Tensor,
};

/// |gpu - reference| bound for outputs of unit-scale values (they are
/// convex combinations of V rows under elu + 1), on top of the output's
/// rounding to its storage type.
const TOLERANCE: f64 = 1e-4;

/// Packed BSHD inputs.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Inputs {
    /// Q and K from N(0, qk_scale^2), V from N(0, 1), rounded to `dtype`
    /// so that the reference sees exactly what the GPU sees.
    fn draw(shape: &LinearShape, seed: u64, qk_scale: f32, dtype: DType) -> Self {
        let mut rng = seeded(seed);
        let mut draw = |n: usize, scale: f32| -> Vec<f32> {
            normal_vec(&mut rng, n, scale)
                .into_iter()
                .map(|x| round_to(dtype, x))
                .collect()
        };
        Inputs {
            q: draw(shape.q_shape().elements(), qk_scale),
            k: draw(shape.k_shape().elements(), qk_scale),
            v: draw(shape.v_shape().elements(), 1.0),
        }
    }

    /// The same with every value made non-negative (inputs after a ReLU),
    /// so that the identity feature map keeps denominators positive.
    fn non_negative(mut self) -> Self {
        for x in self.q.iter_mut().chain(&mut self.k) {
            *x = x.abs();
        }
        self
    }

    fn upload(&self, gpu: &Gpu, shape: &LinearShape, dtype: DType) -> [Tensor; 4] {
        let up = |dims, data: &[f32]| Tensor::from_f32_as(gpu, dims, data, dtype).unwrap();
        [
            up(shape.q_shape(), &self.q),
            up(shape.k_shape(), &self.k),
            up(shape.v_shape(), &self.v),
            Tensor::filled_as(gpu, shape.out_shape(), f32::NAN, dtype).unwrap(),
        ]
    }
}

/// Every element within `TOLERANCE` plus its storage rounding; NaN
/// (unwritten) fails. Returns the largest error.
fn assert_close(got: &[f32], want: &[f64], dtype: DType, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0.0f64;
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: out[{index}] is NaN (unwritten)");
        let error = (f64::from(g) - w).abs();
        assert!(
            error <= TOLERANCE + unit_roundoff(dtype) * w.abs(),
            "{what}: out[{index}] = {g}, reference {w} (error {error:.3e})"
        );
        worst = worst.max(error);
    }
    worst
}

/// Runs one call on uploaded `[q, k, v, out]` and downloads `out`.
fn run_linear(
    gpu: &Gpu,
    [q, k, v, out]: &[Tensor; 4],
    state: Option<&LinearState>,
    config: &LinearConfig,
) -> Result<Vec<f32>, Error> {
    let args = LinearArgs {
        q,
        k,
        v,
        out,
        state,
    };
    gpu.run(|e| gpu.linear_attention(e, &args, config))?;
    out.to_f32_vec(gpu)
}

/// Runs one call (no state) and checks it against the reference.
fn check(shape: LinearShape, config: LinearConfig, dtype: DType, inputs: &Inputs, what: &str) {
    let Some(gpu) = gpu() else { return };
    let tensors = inputs.upload(gpu, &shape, dtype);
    let got = run_linear(gpu, &tensors, None, &config).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = reference::linear_attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config, None)
        .unwrap();
    let worst = assert_close(&got, &want.out, dtype, what);
    eprintln!("{what}: max error {worst:.2e}");
}

fn shape(batch: usize, seq: usize, heads: (usize, usize), dims: (usize, usize)) -> LinearShape {
    LinearShape {
        batch,
        seq_q: seq,
        seq_kv: seq,
        heads_q: heads.0,
        heads_kv: heads.1,
        head_dim: dims.0,
        head_dim_v: dims.1,
    }
}

#[test]
fn head_dims_match_the_reference_causal_and_not() {
    // Tiling classes: head dims below the 8 lanes of a CPU subgroup (8,
    // 24), not a multiple of 32 (40, 200), the row counts' thresholds (64,
    // 128), the largest (256), and value head dims unlike the query ones
    // both ways. Each pair compiles three kernels (~30 s cold on
    // lavapipe), so the exhaustive list is a spread, not every pair.
    let quick = [(8, 8), (64, 64), (32, 128), (256, 256)];
    let full = [
        (8, 8),
        (24, 24),
        (40, 40),
        (64, 64),
        (128, 128),
        (200, 200),
        (256, 256),
        (32, 128),
        (16, 256),
        (256, 16),
        (64, 200),
        (40, 120),
    ];
    for (d, dv) in cases("linear head dims", &quick, &full) {
        for causal in [false, true] {
            let shape = shape(1, 100, (2, 2), (d, dv));
            let inputs = Inputs::draw(&shape, d as u64 * 1000 + dv as u64, 1.0, DType::F32);
            let config = LinearConfig::new().causal(causal);
            check(
                shape,
                config,
                DType::F32,
                &inputs,
                &format!("d={d} dv={dv} causal={causal}"),
            );
        }
    }
}

#[test]
fn lengths_around_the_chunk_with_gqa_and_batches() {
    for seq in [1, 2, 63, 64, 65, 130, 200] {
        for causal in [false, true] {
            let shape = shape(2, seq, (6, 2), (32, 48));
            let inputs = Inputs::draw(&shape, 7 + seq as u64, 1.0, DType::F32);
            let config = LinearConfig::new().causal(causal);
            check(
                shape,
                config,
                DType::F32,
                &inputs,
                &format!("N={seq} causal={causal}"),
            );
        }
    }
}

#[test]
fn cross_attention_has_its_own_key_length() {
    for (seq_q, seq_kv) in [(1, 300), (77, 5), (130, 64)] {
        let shape = LinearShape {
            seq_q,
            seq_kv,
            ..shape(2, 1, (4, 1), (64, 32))
        };
        let inputs = Inputs::draw(&shape, 31, 1.0, DType::F32);
        check(
            shape,
            LinearConfig::new(),
            DType::F32,
            &inputs,
            &format!("Nq={seq_q} Nkv={seq_kv}"),
        );
    }
}

#[test]
fn large_magnitude_inputs_stay_accurate() {
    // phi(x) = x + 1 up to ~100 and exp(x) down to 0: S and z grow to
    // ~1e6 while the outputs stay convex combinations of V.
    for causal in [false, true] {
        let shape = shape(1, 700, (2, 2), (64, 64));
        let inputs = Inputs::draw(&shape, 99, 30.0, DType::F32);
        let config = LinearConfig::new().causal(causal);
        check(
            shape,
            config,
            DType::F32,
            &inputs,
            &format!("|q|,|k| ~ 30 causal={causal}"),
        );
    }
}

#[test]
fn identity_feature_map_on_non_negative_inputs() {
    for causal in [false, true] {
        let shape = shape(1, 150, (4, 2), (32, 32));
        let inputs = Inputs::draw(&shape, 5, 1.0, DType::F32).non_negative();
        let config = LinearConfig::new()
            .causal(causal)
            .feature_map(FeatureMap::Identity)
            .eps(1e-3);
        check(
            shape,
            config,
            DType::F32,
            &inputs,
            &format!("identity causal={causal}"),
        );
    }
}

#[test]
fn half_storage_matches_the_reference() {
    // d=32 in a newcomer's run: the f16 and bf16 kernels compile 4x as
    // long at d=64 on a cold lavapipe (58 s against 15 s for the test).
    for d in cases("linear half storage (head dim)", &[32], &[32, 64]) {
        for (dtype, causal) in [DType::F16, DType::BF16]
            .into_iter()
            .flat_map(|dtype| [(dtype, false), (dtype, true)])
        {
            let shape = shape(2, 130, (4, 2), (d, d));
            let inputs = Inputs::draw(&shape, 17, 1.0, dtype);
            let config = LinearConfig::new().causal(causal);
            check(
                shape,
                config,
                dtype,
                &inputs,
                &format!("{dtype:?} d={d} causal={causal}"),
            );
        }
    }
}

/// The causal reference over the whole sequence, for the state tests.
fn whole_sequence(shape: &LinearShape, inputs: &Inputs) -> reference::LinearReferenceOutput {
    let config = LinearConfig::new().causal(true);
    reference::linear_attention(shape, &inputs.q, &inputs.k, &inputs.v, &config, None).unwrap()
}

/// Tokens `range` of a packed `[batch, seq, heads, dim]` tensor.
fn tokens(data: &[f32], seq: usize, row: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    data.chunks(seq * row)
        .flat_map(|sequence| sequence[range.start * row..range.end * row].to_vec())
        .collect()
}

#[test]
fn a_state_carries_a_sequence_across_calls_and_decodes_token_by_token() {
    let Some(gpu) = gpu() else { return };
    let (batch, seq, heads, (d, dv)) = (2, 140, (4, 2), (32, 24));
    let whole = shape(batch, seq, heads, (d, dv));
    let inputs = Inputs::draw(&whole, 2024, 1.0, DType::F32);
    let want = whole_sequence(&whole, &inputs);
    let state = LinearState::zeros(gpu, batch, heads.1, d, dv).unwrap();
    let config = LinearConfig::new().causal(true);
    // A prompt in two pieces (the first not a whole number of chunks),
    // then single tokens: recurrent decoding.
    let mut pieces = vec![0..70, 70..135];
    pieces.extend((135..seq).map(|t| t..t + 1));
    for range in pieces {
        let piece = shape(batch, range.len(), heads, (d, dv));
        let part = Inputs {
            q: tokens(&inputs.q, seq, heads.0 * d, range.clone()),
            k: tokens(&inputs.k, seq, heads.1 * d, range.clone()),
            v: tokens(&inputs.v, seq, heads.1 * dv, range.clone()),
        };
        let tensors = part.upload(gpu, &piece, DType::F32);
        let got = run_linear(gpu, &tensors, Some(&state), &config).unwrap();
        let expected: Vec<f64> = want
            .out
            .chunks(seq * heads.0 * dv)
            .flat_map(|s| s[range.start * heads.0 * dv..range.end * heads.0 * dv].to_vec())
            .collect();
        assert_close(
            &got,
            &expected,
            DType::F32,
            &format!("tokens {range:?} after a state"),
        );
    }
    // The state ends as the sum over every token, within the bound of
    // f32 summation: (terms + a few roundings of each term) * 2^-24 *
    // the sum of the terms' magnitudes.
    let magnitudes = {
        let positive = |x: &[f32]| x.iter().map(|v| v.abs()).collect::<Vec<f32>>();
        let abs_inputs = Inputs {
            q: inputs.q.clone(),
            k: inputs.k.clone(),
            v: positive(&inputs.v),
        };
        whole_sequence(&whole, &abs_inputs).state
    };
    let bound = (seq + 4) as f64 * 2f64.powi(-24);
    let (s, z) = state.to_f32_vecs(gpu).unwrap();
    for (name, got, expected, sizes) in [
        ("S", &s, &want.state.s, &magnitudes.s),
        ("z", &z, &want.state.z, &magnitudes.z),
    ] {
        for (index, ((&g, &w), &size)) in got.iter().zip(expected).zip(sizes).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= bound * size,
                "state {name}[{index}] = {g}, reference {w}, bound {:.2e}",
                bound * size
            );
        }
    }
}

#[test]
fn a_state_from_the_host_equals_the_reference_from_that_state() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(1, 90, (2, 1), (16, 40));
    let inputs = Inputs::draw(&shape, 404, 1.0, DType::F32);
    let mut rng = seeded(405);
    let initial = LinearReferenceState {
        s: normal_vec(&mut rng, 16 * 40, 3.0)
            .into_iter()
            .map(f64::from)
            .collect(),
        // z is a sum of positive features: keep it positive.
        z: normal_vec(&mut rng, 16, 3.0)
            .into_iter()
            .map(|x| f64::from(x.abs()) + 10.0)
            .collect(),
    };
    let as_f32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let state = LinearState::from_f32(
        gpu,
        [1, 1, 16, 40],
        &as_f32(&initial.s),
        &as_f32(&initial.z),
    )
    .unwrap();
    let config = LinearConfig::new().causal(true);
    let tensors = inputs.upload(gpu, &shape, DType::F32);
    let got = run_linear(gpu, &tensors, Some(&state), &config).unwrap();
    let want = reference::linear_attention(
        &shape,
        &inputs.q,
        &inputs.k,
        &inputs.v,
        &config,
        Some(&initial),
    )
    .unwrap();
    assert_close(&got, &want.out, DType::F32, "from a host state");
}

/// A device whose storage bindings hold 1 MiB, so that a few chunks of
/// d=256 states fill the chunk-state buffer and the call runs in
/// segments.
fn small_binding_gpu() -> Option<Gpu> {
    common::gpu_with_limits("small bindings", |limits| {
        limits.max_storage_buffer_binding_size = 1 << 20;
    })
}

#[test]
fn long_sequences_run_in_segments_equal_to_the_reference() {
    let Some(gpu) = small_binding_gpu() else {
        return;
    };
    for causal in [true, false] {
        let shape = shape(1, 1000, (1, 1), (256, 256));
        let config = LinearConfig::new().causal(causal);
        let plan = LinearPlan::for_call(gpu.info(), &shape, DType::F32, &config).unwrap();
        assert!(
            plan.segments() > 1 || !causal,
            "a 1 MiB binding should split {} chunks of 257 KiB states into segments: {plan:?}",
            plan.splits()
        );
        let inputs = Inputs::draw(&shape, 77, 1.0, DType::F32);
        let tensors = inputs.upload(&gpu, &shape, DType::F32);
        let got = run_linear(&gpu, &tensors, None, &config).unwrap();
        let want =
            reference::linear_attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config, None)
                .unwrap();
        assert_close(
            &got,
            &want.out,
            DType::F32,
            &format!("{} segments causal={causal}", plan.segments()),
        );
    }
}

#[test]
fn bad_calls_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(1, 16, (2, 2), (16, 8));
    let inputs = Inputs::draw(&shape, 1, 1.0, DType::F32);
    let [q, k, v, out] = inputs.upload(gpu, &shape, DType::F32);
    let args = LinearArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        state: None,
    };
    let run = |args: &LinearArgs<'_>, config: &LinearConfig| {
        gpu.run(|e| gpu.linear_attention(e, args, config))
    };
    // Output shaped like the queries instead of [.., head_dim_v].
    let wrong_out = Tensor::zeros(gpu, shape.q_shape(), DType::F32).unwrap();
    let err = run(
        &LinearArgs {
            out: &wrong_out,
            ..args
        },
        &LinearConfig::new(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                left: 16,
                right: 8,
                ..
            }
        ),
        "{err}"
    );
    // A state with non-causal attention, and a state of the wrong dims.
    let state = LinearState::zeros(gpu, 1, 2, 16, 8).unwrap();
    let err = run(
        &LinearArgs {
            state: Some(&state),
            ..args
        },
        &LinearConfig::new(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnsupportedCombination { .. }), "{err}");
    let wrong = LinearState::zeros(gpu, 1, 2, 16, 16).unwrap();
    let causal = LinearConfig::new().causal(true);
    let err = run(
        &LinearArgs {
            state: Some(&wrong),
            ..args
        },
        &causal,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LinearStateShape {
                expected: [1, 2, 16, 8],
                got: [1, 2, 16, 16]
            }
        ),
        "{err}"
    );
    // eps must be finite and >= 0.
    for eps in [-1.0, f32::NAN, f32::INFINITY] {
        let err = run(&args, &LinearConfig::new().eps(eps)).unwrap_err();
        assert!(matches!(err, Error::InvalidEps(_)), "eps {eps}: {err}");
    }
    // Causal needs queries and keys of the same tokens.
    let cross = LinearShape {
        seq_kv: 20,
        ..shape
    };
    let long = Tensor::zeros(gpu, cross.k_shape(), DType::F32).unwrap();
    let long_v = Tensor::zeros(gpu, cross.v_shape(), DType::F32).unwrap();
    let err = run(
        &LinearArgs {
            k: &long,
            v: &long_v,
            ..args
        },
        &causal,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                left: 16,
                right: 20,
                ..
            }
        ),
        "{err}"
    );
    // Head dims past 256 or not multiples of 8.
    for (d, dv) in [(12, 8), (16, 264)] {
        let bad = LinearShape {
            head_dim: d,
            head_dim_v: dv,
            ..shape
        };
        let err =
            LinearPlan::for_call(gpu.info(), &bad, DType::F32, &LinearConfig::new()).unwrap_err();
        assert!(
            matches!(err, Error::HeadDimUnsupported { got, .. } if got == if d == 12 { 12 } else { 264 }),
            "{err}"
        );
    }
    // Queries read from the state's own buffer, which the call writes in
    // place (wgpu would refuse a buffer bound read-only and writable).
    let broadcast = Strides {
        batch: 0,
        seq: 0,
        head: 16,
    };
    let buffer = state.buffer().clone();
    let state_q =
        Tensor::from_buffer(gpu, buffer, shape.q_shape(), broadcast, 0, DType::F32).unwrap();
    let with_state = LinearArgs {
        q: &state_q,
        state: Some(&state),
        ..args
    };
    let err = run(&with_state, &causal).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutputAliasesInput {
                tensor: "linear state",
                input: "q"
            }
        ),
        "{err}"
    );
    // Writing into an input.
    let err = run(&LinearArgs { out: &v, ..args }, &LinearConfig::new()).unwrap_err();
    assert!(
        matches!(err, Error::OutputAliasesInput { input: "v", .. }),
        "{err}"
    );
}

#[test]
fn views_of_a_fused_qkv_buffer_need_no_copy() {
    let Some(gpu) = gpu() else { return };
    // One projection output [batch, seq, 3, heads, d] (q, k, v interleaved
    // per token), seen as three strided BSHD views; the output is a BHSD
    // buffer seen as BSHD.
    let (batch, seq, heads, d) = (2, 90, 2, 32);
    let shape = shape(batch, seq, (heads, heads), (d, d));
    let inputs = Inputs::draw(&shape, 3, 1.0, DType::F32);
    let mut fused = vec![0.0f32; batch * seq * 3 * heads * d];
    for b in 0..batch {
        for t in 0..seq {
            for (part, data) in [&inputs.q, &inputs.k, &inputs.v].into_iter().enumerate() {
                let from = ((b * seq + t) * heads) * d;
                let to = (((b * seq + t) * 3 + part) * heads) * d;
                fused[to..to + heads * d].copy_from_slice(&data[from..from + heads * d]);
            }
        }
    }
    let dims = shape.q_shape();
    let whole = Tensor::from_f32(
        gpu,
        wgpu_flash_attn::TensorShape::new(1, 1, 1, fused.len()),
        &fused,
    )
    .unwrap();
    let strides = wgpu_flash_attn::Strides {
        batch: seq * 3 * heads * d,
        seq: 3 * heads * d,
        head: d,
    };
    let [q, k, v] = [0, 1, 2].map(|part| whole.view(dims, strides, part * heads * d).unwrap());
    let out_strides = wgpu_flash_attn::Strides {
        batch: heads * seq * d,
        seq: d,
        head: seq * d,
    };
    for causal in [false, true] {
        // Poisoned afresh: an element the causal run leaves unwritten must
        // not pass on the non-causal run's value.
        let bhsd = Tensor::filled(
            gpu,
            wgpu_flash_attn::TensorShape::new(1, 1, 1, dims.elements()),
            f32::NAN,
        )
        .unwrap();
        let out = bhsd.view(dims, out_strides, 0).unwrap();
        let config = LinearConfig::new().causal(causal);
        let args = LinearArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            state: None,
        };
        gpu.run(|e| gpu.linear_attention(e, &args, &config))
            .unwrap();
        let want =
            reference::linear_attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config, None)
                .unwrap();
        // Back from BHSD to BSHD for the comparison.
        let got = bhsd.to_f32_vec(gpu).unwrap();
        let mut bshd = vec![0.0f32; got.len()];
        for b in 0..batch {
            for h in 0..heads {
                for t in 0..seq {
                    let from = ((b * heads + h) * seq + t) * d;
                    let to = ((b * seq + t) * heads + h) * d;
                    bshd[to..to + d].copy_from_slice(&got[from..from + d]);
                }
            }
        }
        assert_close(
            &bshd,
            &want.out,
            DType::F32,
            &format!("fused views causal={causal}"),
        );
    }
}

#[test]
fn a_state_from_another_gpu_is_refused() {
    let Some(gpu) = gpu() else { return };
    let Some(other) = small_binding_gpu() else {
        return;
    };
    let shape = shape(1, 8, (1, 1), (8, 8));
    let inputs = Inputs::draw(&shape, 9, 1.0, DType::F32);
    let [q, k, v, out] = inputs.upload(gpu, &shape, DType::F32);
    let foreign = LinearState::zeros(&other, 1, 1, 8, 8).unwrap();
    let args = LinearArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        state: Some(&foreign),
    };
    let err = gpu
        .run(|e| gpu.linear_attention(e, &args, &LinearConfig::new().causal(true)))
        .unwrap_err();
    assert!(matches!(err, Error::WrongDevice { .. }), "{err}");
}
