//! The cooperative-matrix forward (`Tier::CooperativeMatrix`) against the
//! reference: on a device with matrix units (`FLASH_ATTN_COOPERATIVE_MATRIX=1`
//! on a GPU that has them, or on lavapipe from Mesa 26.1, whose 8x8x8 f16
//! matrices CI's `.ci/matrix-units` pass runs) the real kernel, elsewhere the
//! same kernel with its matrix products emulated in scalar code
//! (`AdapterOptions::emulate_cooperative_matrices`), which checks
//! everything but the matrix units themselves: tile layouts and strides as
//! the matrix loads read them, the softmax over the score tiles, the
//! accumulators' rescaling when a row's reference max moves, 16x16 and
//! 8x8 matrices, f16 and f32
//! operands, masks, sinks, windows, ALiBi, GQA, padded batches and key
//! chunks.

mod common;

use common::random::{normal_vec, seeded};
use common::{Inputs, cooperative_gpu, round_to, unit_roundoff};
use rand::{Rng, RngExt};
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    Alibi, AttentionConfig, AttentionMask, AttentionShape, CoopLayout, DType, Error,
    ForwardOptions, ForwardPlan, Gpu, Tensor, Tier, ValidLengths,
};

/// The plan of a forced cooperative-matrix call, or `None` (said) where
/// this adapter cannot run it in `dtype` (f16 needs SHADER_F16, which GL
/// lacks).
fn coop_plan(gpu: &Gpu, shape: &AttentionShape, dtype: DType) -> Option<ForwardPlan> {
    match ForwardPlan::for_call(gpu.info(), shape, dtype, Some(Tier::CooperativeMatrix)) {
        Ok(plan) => {
            assert_eq!(plan.tier(), Tier::CooperativeMatrix);
            Some(plan)
        }
        Err(Error::TierUnavailable { reason, .. }) => {
            eprintln!("SKIPPED: cooperative matrices with {dtype:?} storage: {reason}");
            None
        }
        Err(other) => panic!("{shape:?} {dtype:?}: {other}"),
    }
}

/// The operand type of the tier's tests that take one: f32 where the
/// adapter multiplies f32 matrices (the emulation, Apple's), else f16
/// (NVIDIA's, AMD's and lavapipe's matrix units take no f32), so that they
/// run on every adapter with the tier; `None` (said) without it.
fn matrix_operands(gpu: &Gpu, shape: &AttentionShape) -> Option<DType> {
    [DType::F32, DType::F16]
        .into_iter()
        .find(|&dtype| coop_plan(gpu, shape, dtype).is_some())
}

/// Runs `options` on inputs held in `dtype` (`common::run_views`, which
/// poisons the outputs); output and logsumexp as f32.
fn run(
    gpu: &Gpu,
    shape: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    dtype: DType,
    options: ForwardOptions<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let upload = |dims, data: &[f32]| Tensor::from_f32_as(gpu, dims, data, dtype).unwrap();
    let out = Tensor::filled_as(gpu, shape.o_shape(), f32::NAN, dtype).unwrap();
    let [q, k, v] = [
        upload(shape.q_shape(), q),
        upload(shape.k_shape(), k),
        upload(shape.v_shape(), v),
    ];
    common::run_views(
        gpu,
        common::Implementation::Flash,
        shape,
        options,
        [&q, &k, &v, &out],
    )
}

/// The bound on |out - reference| for inputs held in `dtype`: f32's 1e-4,
/// plus for f16 the output's rounding and the probabilities' rounding to
/// f16 before `P V` (at most 2^-11 of the largest |v| times the sum of a
/// row's weights: 1, or with dropout at most 1 / (1 - p);
/// docs/semantics.md).
fn bound(dtype: DType, want: f64, v_max: f64, weights: f64) -> f64 {
    let probabilities = if dtype == DType::F16 {
        unit_roundoff(DType::F16) * v_max * weights
    } else {
        0.0
    };
    1e-4 + unit_roundoff(dtype) * want.abs() + probabilities
}

/// The largest sum of a row's weights under `config`: 1, or with dropout
/// 1 / (1 - p) (every kept probability scaled by it).
fn weight_sum(config: &AttentionConfig) -> f64 {
    config
        .active_dropout()
        .map_or(1.0, |dropout| 1.0 / dropout.keep_probability())
}

/// Every element within [`bound`]; an unwritten (NaN) one fails.
fn assert_within(
    got: &[f32],
    want: &[f64],
    dtype: DType,
    v: &[f32],
    config: &AttentionConfig,
    what: &str,
) {
    let v_max = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: element {i} not written");
        let limit = bound(dtype, w, v_max, weight_sum(config));
        assert!(
            (f64::from(g) - w).abs() <= limit,
            "{what}: element {i}: {g} vs {w} (bound {limit:.2e})"
        );
    }
}

/// Head dims of each matrix size (16x16 at 64 and 128, 8x8 at 40 and
/// 72, which 16 does not divide), f32 and f16 operands, ragged lengths,
/// GQA, and the options that place or weigh keys.
#[test]
fn matches_the_reference_on_every_matrix_size_and_operand_type() {
    let Some(gpu) = cooperative_gpu() else { return };
    let mut rng = seeded(0x5eed_c00b);
    let dims = common::cases(
        "cooperative-matrix head dims",
        &[40, 64, 128],
        &[16, 40, 64, 72, 128, 256],
    );
    for head_dim in dims {
        for dtype in [DType::F32, DType::F16] {
            for (seq_q, seq_kv) in [(1, 130), (37, 64), (100, 33)] {
                let shape = AttentionShape {
                    batch: 2,
                    seq_q,
                    seq_kv,
                    heads_q: 4,
                    heads_kv: 2,
                    head_dim,
                    head_dim_v: head_dim,
                };
                let Some(plan) = coop_plan(gpu, &shape, dtype) else {
                    continue;
                };
                let size = plan.coop_tiling().unwrap().size;
                assert_eq!(head_dim as u32 % size, 0);
                let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
                let [q, k, v] = held_inputs(&inputs, dtype);
                let sinks = normal_vec(&mut rng, 4, 1.0);
                let configs = [
                    AttentionConfig::new(),
                    AttentionConfig::new().causal(true).sinks(sinks),
                    AttentionConfig::new()
                        .window(Some(9), Some(2))
                        .softcap(6.0)
                        .alibi(Alibi::PerHead(vec![0.1, 0.2, 0.3, 0.4])),
                    // Steep slopes and no window: a row's scores rise by
                    // 8-256 (natural units) per 32-64-key tile towards its
                    // position, so its reference max moves on every tile
                    // and the accumulators in the matrices are rescaled.
                    AttentionConfig::new().alibi(Alibi::PerHead(vec![0.25, 0.5, 1.0, 4.0])),
                ];
                for config in configs {
                    let config = config.tier(Tier::CooperativeMatrix);
                    let what = format!("{shape:?} {dtype:?} {size}x{size} {config:?}");
                    check_against_reference(gpu, &shape, [&q, &k, &v], dtype, &config, &what);
                }
            }
        }
    }
}

/// Callers' blocks (`AttentionConfig::coop_layout`): one row tile or
/// several, one key tile or several, each against the reference; a block
/// this adapter cannot hold is said and skipped, and most must run.
#[test]
fn callers_blocks_match_the_reference() {
    let Some(gpu) = cooperative_gpu() else { return };
    let shape = AttentionShape {
        batch: 1,
        seq_q: 100,
        seq_kv: 90,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    };
    let Some(plan) = coop_plan(gpu, &shape, DType::F16) else {
        return;
    };
    let size = plan.coop_tiling().unwrap().size;
    let inputs = Inputs::draw(&shape, 0x5eed_c010, 1.0);
    let [q, k, v] = held_inputs(&inputs, DType::F16);
    let mut ran = 0;
    for (row_tiles, key_tiles) in [(1, 1), (2, 1), (1, 4), (4, 2), (3, 3)] {
        let layout = CoopLayout {
            row_tiles,
            key_tiles,
        };
        let config = AttentionConfig::new()
            .causal(true)
            .alibi(Alibi::PerHead(vec![0.25, 0.5, 1.0, 4.0]))
            .coop_layout(layout);
        match ForwardPlan::for_config(gpu.info(), &shape, DType::F16, &config) {
            Ok(plan) => assert_eq!(
                plan.block_m(),
                row_tiles * size,
                "{layout}: rows of the block"
            ),
            Err(Error::TierUnavailable { reason, .. }) => {
                eprintln!("SKIPPED: block {layout}: {reason}");
                continue;
            }
            Err(other) => panic!("{layout}: {other}"),
        }
        let what = format!("block {layout} ({size}x{size} matrices)");
        check_against_reference(gpu, &shape, [&q, &k, &v], DType::F16, &config, &what);
        ran += 1;
    }
    assert!(ran >= 4, "only {ran} of five blocks ran");
}

/// Bias, boolean and block-sparse masks on the masked kernel of the tier.
#[test]
fn masks_match_the_reference() {
    let Some(gpu) = cooperative_gpu() else { return };
    let shape = AttentionShape {
        batch: 1,
        seq_q: 70,
        seq_kv: 150,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 32,
        head_dim_v: 32,
    };
    let Some(dtype) = matrix_operands(gpu, &shape) else {
        return;
    };
    let inputs = Inputs::draw(&shape, 0x5eed_c00c, 1.0);
    let [q, k, v] = held_inputs(&inputs, dtype);
    let mut rng = seeded(0x5eed_c00d);
    let dims = [1, 2, shape.seq_q, shape.seq_kv];
    let n: usize = dims.iter().product();
    let mut bias = normal_vec(&mut rng, n, 1.0);
    for x in bias.iter_mut() {
        if rng.random_ratio(1, 8) {
            *x = f32::NEG_INFINITY;
        }
    }
    let bools: Vec<bool> = (0..n)
        .map(|i| i / 150 % 70 != 3 && rng.random_ratio(3, 4))
        .collect();
    let sparse_dims = [1, 1, shape.seq_q, shape.seq_kv];
    let sparse_values: Vec<bool> = (0..shape.seq_q * shape.seq_kv)
        .map(|i| (i % 150) / 32 == (i / 150) / 16)
        .collect();
    let masks = [
        (
            AttentionMask::bias(gpu, dims, &bias).unwrap(),
            HostMask::Bias {
                dims,
                values: &bias,
            },
        ),
        (
            AttentionMask::boolean(gpu, dims, &bools).unwrap(),
            HostMask::Bool {
                dims,
                values: &bools,
            },
        ),
        (
            AttentionMask::block_sparse(gpu, sparse_dims, &sparse_values).unwrap(),
            HostMask::Bool {
                dims: sparse_dims,
                values: &sparse_values,
            },
        ),
    ];
    for causal in [false, true] {
        let config = AttentionConfig::new()
            .causal(causal)
            .tier(Tier::CooperativeMatrix);
        for (mask, host) in &masks {
            let what = format!("{:?} mask causal={causal} {dtype:?}", mask.kind());
            let (got, _) = run(
                gpu,
                &shape,
                [&q, &k, &v],
                dtype,
                ForwardOptions::new(&config).mask(mask),
            );
            let want = reference::attention_masked(&shape, &q, &k, &v, &config, host).unwrap();
            assert_within(&got, &want.out, dtype, &v, &config, &what);
        }
    }
}

/// Q, K and V of `inputs` rounded to `dtype`, as the tensors hold them
/// (the reference then sees the values the kernel reads).
fn held_inputs(inputs: &Inputs, dtype: DType) -> [Vec<f32>; 3] {
    [&inputs.q, &inputs.k, &inputs.v].map(|x| x.iter().map(|&x| round_to(dtype, x)).collect())
}

/// One call of `config` on `[q, k, v]` held in `dtype`: its output within
/// [`bound`] and its logsumexp within [`assert_lse_within`]'s of the
/// reference.
fn check_against_reference(
    gpu: &Gpu,
    shape: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    dtype: DType,
    config: &AttentionConfig,
    what: &str,
) {
    let (got, got_lse) = run(gpu, shape, [q, k, v], dtype, config.into());
    let want = reference::attention(shape, q, k, v, config).unwrap();
    assert_within(&got, &want.out, dtype, v, config, what);
    assert_lse_within(&got_lse, &want.lse, dtype, what);
}

/// Each logsumexp within 1e-4 of the reference's, +inf exactly; with f16
/// operands the weights' rounding to f16 may add `ln(1 + 2^-11) < 2^-11`
/// (docs/semantics.md).
fn assert_lse_within(got: &[f32], want: &[f64], dtype: DType, what: &str) {
    let limit = 1e-4
        + if dtype == DType::F16 {
            2f64.powi(-11)
        } else {
            0.0
        };
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() {
            assert_eq!(f64::from(g), w, "{what}: lse {i}");
        } else {
            assert!(
                (f64::from(g) - w).abs() <= limit,
                "{what}: lse {i}: {g} vs {w} (bound {limit:.2e})"
            );
        }
    }
}

/// Attention dropout on the tier: the probabilities are dropped as they
/// are staged for `P V`, the logsumexp keeps them all. The rates and
/// options of `common::dropout_configs`, both matrix sizes, f32 and f16
/// operands, and with a boolean mask (whole rows hidden; f32 operands
/// where the adapter multiplies them, else f16); the reference
/// draws the same mask from the seed.
#[test]
fn dropout_matches_the_reference() {
    let Some(gpu) = cooperative_gpu() else { return };
    let mut rng = seeded(0x5eed_c0d0);
    for head_dim in [40, 64] {
        let shape = AttentionShape {
            batch: 2,
            seq_q: 37,
            seq_kv: 70,
            heads_q: 4,
            heads_kv: 2,
            head_dim,
            head_dim_v: head_dim,
        };
        for dtype in [DType::F32, DType::F16] {
            if coop_plan(gpu, &shape, dtype).is_none() {
                continue;
            }
            let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
            let [q, k, v] = held_inputs(&inputs, dtype);
            for config in common::dropout_configs(shape.heads_q) {
                let config = config.tier(Tier::CooperativeMatrix);
                let what = format!("{shape:?} {dtype:?} {config:?}");
                check_against_reference(gpu, &shape, [&q, &k, &v], dtype, &config, &what);
            }
        }
    }
    let shape = AttentionShape::self_attention(1, 40, 2, 32);
    let Some(dtype) = matrix_operands(gpu, &shape) else {
        return;
    };
    let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
    let [q, k, v] = held_inputs(&inputs, dtype);
    let dims = [1, 1, shape.seq_q, shape.seq_kv];
    let bools: Vec<bool> = (0..shape.seq_q * shape.seq_kv)
        .map(|i| i / shape.seq_kv % 13 != 4 && rng.random_ratio(2, 3))
        .collect();
    let mask = AttentionMask::boolean(gpu, dims, &bools).unwrap();
    let host = HostMask::Bool {
        dims,
        values: &bools,
    };
    let config = AttentionConfig::new()
        .dropout(0.4, 0xd0d0)
        .causal(true)
        .tier(Tier::CooperativeMatrix);
    let (got, got_lse) = run(
        gpu,
        &shape,
        [&q, &k, &v],
        dtype,
        ForwardOptions::new(&config).mask(&mask),
    );
    let want = reference::attention_masked(&shape, &q, &k, &v, &config, &host).unwrap();
    let what = format!("masked dropout, {dtype:?}");
    assert_within(&got, &want.out, dtype, &v, &config, &what);
    assert_lse_within(&got_lse, &want.lse, dtype, &what);
}

/// Keys in chunks (the carry between dispatches) and padded sequences
/// (lengths 0 and 1) on the tier, without and with dropout (whose mask
/// carries on across a sequence's chunks: each chunk names its first key).
#[test]
fn key_chunks_and_padded_batches_match_the_reference() {
    let Some(gpu) = cooperative_gpu() else { return };
    let shape = AttentionShape {
        batch: 3,
        seq_q: 20,
        seq_kv: 120,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    };
    let Some(dtype) = matrix_operands(gpu, &shape) else {
        return;
    };
    let inputs = Inputs::draw(&shape, 0x5eed_c00e, 1.0);
    let [q, k, v] = held_inputs(&inputs, dtype);
    let plain = AttentionConfig::new()
        .causal(true)
        .sinks(vec![0.5, -1.0, 1.5, 0.0])
        .tier(Tier::CooperativeMatrix);
    // Steep ALiBi slopes: a chunk's scores pass the carried logsumexp by
    // far, so the carried accumulators are rescaled.
    let rising = AttentionConfig::new()
        .causal(true)
        .alibi(Alibi::PerHead(vec![0.25, 0.5, 1.0, 4.0]))
        .tier(Tier::CooperativeMatrix);
    let qkv = [&q[..], &k[..], &v[..]];
    let check_chunks = |config: &AttentionConfig| {
        let want = reference::attention(&shape, &q, &k, &v, config).unwrap();
        for keys in [7, 40] {
            let options = ForwardOptions::new(config).keys_per_dispatch(keys);
            let (got, got_lse) = run(gpu, &shape, qkv, dtype, options);
            let what = format!("{keys} keys per dispatch, {dtype:?}, {config:?}");
            assert_within(&got, &want.out, dtype, &v, config, &what);
            assert_lse_within(&got_lse, &want.lse, dtype, &what);
        }
    };
    check_chunks(&rising);
    for config in [plain.clone(), plain.dropout(0.3, 0xc4c4)] {
        check_chunks(&config);
        for keys in [None, Some(40)] {
            check_padded_batch(gpu, &shape, qkv, dtype, &config, keys);
        }
    }
}

/// The tier over `shape`'s three batch entries padded to 20/1/0 queries
/// and 120/45/1 keys (with `keys` per dispatch: the first two entries in
/// chunks), on `[q, k, v]` held in `dtype`, each entry against the
/// reference of its rows, padded rows zeros.
fn check_padded_batch(
    gpu: &Gpu,
    shape: &AttentionShape,
    qkv: [&[f32]; 3],
    dtype: DType,
    config: &AttentionConfig,
    keys: Option<usize>,
) {
    let [q, k, v] = qkv;
    let (q_lens, kv_lens) = ([20usize, 1, 0], [120usize, 45, 1]);
    let lens = ValidLengths {
        q: Some(&q_lens),
        kv: &kv_lens,
    };
    let (got, _) = run(
        gpu,
        shape,
        qkv,
        dtype,
        keys.into_iter().fold(
            ForwardOptions::new(config).valid_lengths(lens),
            ForwardOptions::keys_per_dispatch,
        ),
    );
    let (hq, hkv, d) = (4, 2, 64);
    for b in 0..3 {
        let (q0, k0) = (b * 20 * hq * d, b * 120 * hkv * d);
        let (want, _) = common::sequence_reference(
            config,
            b,
            (hq, hkv, d),
            &q[q0..q0 + q_lens[b] * hq * d],
            &k[k0..k0 + kv_lens[b] * hkv * d],
            &v[k0..k0 + kv_lens[b] * hkv * d],
        );
        assert_within(
            &got[q0..q0 + q_lens[b] * hq * d],
            &want,
            dtype,
            v,
            config,
            &format!("entry {b}, {keys:?} keys per dispatch, {dtype:?}, {config:?}"),
        );
        assert!(
            got[q0 + q_lens[b] * hq * d..q0 + 20 * hq * d]
                .iter()
                .all(|&x| x == 0.0),
            "entry {b}: padded rows are zeros"
        );
    }
}

/// bf16 has no matrices: a typed error naming it (head dims the
/// matrices do not tile are checked from adapter profiles in src/plan/tests.rs,
/// since the emulation offers 8x8, which tiles every supported head dim).
#[test]
fn bf16_is_a_typed_error() {
    let Some(gpu) = cooperative_gpu() else { return };
    let shape = AttentionShape::self_attention(1, 16, 2, 64);
    match ForwardPlan::for_call(
        gpu.info(),
        &shape,
        DType::BF16,
        Some(Tier::CooperativeMatrix),
    ) {
        Err(Error::TierUnavailable { reason, .. }) => assert!(reason.contains("bf16"), "{reason}"),
        other => panic!("bf16: {other:?}"),
    }
}

/// A caller's own device, opened on the adapter with the matrix feature
/// (and passthrough on Vulkan), runs the tier once told the adapter's
/// configurations (`Gpu::with_cooperative_matrices_of`), against the
/// reference; without them it is refused, and on Vulkan without
/// passthrough too, each with its reason. Needs real matrices.
#[test]
fn a_callers_device_runs_the_tier_given_its_adapter() {
    let Some(gpu) = cooperative_gpu() else { return };
    if gpu.info().cooperative_matrix_emulation {
        eprintln!(
            "SKIPPED: needs the adapter's own matrices (FLASH_ATTN_COOPERATIVE_MATRIX=1 on an \
             adapter that has them)"
        );
        return;
    }
    let adapter = pollster::block_on(wgpu_flash_attn::AdapterOptions::from_env().select())
        .expect("the test adapter");
    let open = |features: wgpu::Features| {
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("a caller's device"),
            required_features: features,
            required_limits: adapter.limits(),
            // SAFETY: the test asks for the experimental matrix feature,
            // as the crate's own devices do when told to.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .expect("a device with the crate's features");
        Gpu::from_device(device, queue, adapter.get_info())
    };
    // The crate's own device's features: the matrices, passthrough on
    // Vulkan, f16, subgroups.
    let features = gpu.info().features;
    let shape = AttentionShape {
        batch: 1,
        seq_q: 70,
        seq_kv: 90,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
        head_dim_v: 64,
    };
    let plain = open(features);
    let refused = ForwardPlan::for_call(
        plain.info(),
        &shape,
        DType::F16,
        Some(Tier::CooperativeMatrix),
    );
    assert!(
        matches!(refused, Err(Error::TierUnavailable { .. })),
        "without the adapter's configurations: {refused:?}"
    );
    let caller = plain.with_cooperative_matrices_of(&adapter);
    assert_eq!(
        caller.info().cooperative_matrices,
        adapter.cooperative_matrix_properties()
    );
    let inputs = Inputs::draw(&shape, 0x5eed_ca11, 1.0);
    let [q, k, v] = held_inputs(&inputs, DType::F16);
    let config = AttentionConfig::new()
        .causal(true)
        .tier(Tier::CooperativeMatrix);
    check_against_reference(
        &caller,
        &shape,
        [&q, &k, &v],
        DType::F16,
        &config,
        "a caller's device",
    );
    if adapter.get_info().backend == wgpu::Backend::Vulkan {
        let without = open(features - wgpu::Features::PASSTHROUGH_SHADERS)
            .with_cooperative_matrices_of(&adapter);
        match ForwardPlan::for_call(
            without.info(),
            &shape,
            DType::F16,
            Some(Tier::CooperativeMatrix),
        ) {
            Err(Error::TierUnavailable { reason, .. }) => {
                assert!(reason.contains("PASSTHROUGH_SHADERS"), "{reason}")
            }
            other => panic!("a Vulkan device without passthrough: {other:?}"),
        }
    }
}
