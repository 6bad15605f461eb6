//! Kernel tiers: each tier the adapter offers matches the reference on the
//! same inputs (f32 and f16 storage), the default is the best one offered
//! (register-blocked on hardware GPUs, the per-row tiers on CPU adapters),
//! and forcing a tier the adapter lacks is a typed error.

mod common;

use common::random::seeded;
use common::{Inputs, gpu, round_to};
use rand::Rng;
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionShape, BlockedLayout, DType, Error,
    ForwardOptions, ForwardPlan, Gpu, Tensor, Tier, ValidLengths, reference,
};

/// Whether this adapter should offer the subgroup-broadcast tier.
fn offers_subgroup_broadcast(gpu: &Gpu) -> bool {
    let info = gpu.info();
    let adapter = &info.adapter;
    adapter.backend != wgpu::Backend::Gl
        && info.has_subgroups()
        && adapter.subgroup_min_size.is_power_of_two()
        && (4..=128).contains(&adapter.subgroup_min_size)
}

/// Largest |gpu - reference| beyond the output's storage rounding (and,
/// for f16 matrices, the rounding of the probabilities to f16: at most
/// 2^-11 of the largest |v| per row, since the weights sum to 1).
fn run_tier(
    gpu: &Gpu,
    tier: Tier,
    dtype: DType,
    shape: &AttentionShape,
    inputs: &Inputs,
    causal: bool,
) -> f64 {
    let config = AttentionConfig::new().causal(causal).tier(tier);
    let plan = ForwardPlan::for_call(gpu.info(), shape, dtype, config.tier).unwrap();
    assert_eq!(plan.tier(), tier);
    run_config(gpu, &config, dtype, shape, inputs)
}

/// [`run_tier`] for any options (the tier the config forces).
fn run_config(
    gpu: &Gpu,
    config: &AttentionConfig,
    dtype: DType,
    shape: &AttentionShape,
    inputs: &Inputs,
) -> f64 {
    let tier = config.tier.unwrap_or(Tier::RegisterBlocked);
    let held = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round_to(dtype, x)).collect() };
    let (q, k, v) = (held(&inputs.q), held(&inputs.k), held(&inputs.v));
    let q_t = Tensor::from_f32_as(gpu, shape.q_shape(), &q, dtype).unwrap();
    let k_t = Tensor::from_f32_as(gpu, shape.k_shape(), &k, dtype).unwrap();
    let v_t = Tensor::from_f32_as(gpu, shape.v_shape(), &v, dtype).unwrap();
    let out = Tensor::filled_as(gpu, shape.q_shape(), f32::NAN, dtype).unwrap();
    let args = AttentionArgs {
        q: &q_t,
        k: &k_t,
        v: &v_t,
        out: &out,
        lse: None,
    };
    gpu.run(|e| gpu.forward(e, &args, config)).unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    let want = reference::attention(shape, &q, &k, &v, config).unwrap().out;
    let roundoff = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    };
    // Kernels that round the weights to f16 (the matrix tier, and register
    // blocking with f16 products, NVIDIA's default for f16) add their bound.
    let probabilities = common::weight_rounding(gpu, shape, dtype, config, &v).unwrap();
    got.iter()
        .zip(&want)
        .map(|(g, w)| {
            assert!(!g.is_nan(), "{tier:?} {dtype:?}: NaN output");
            (f64::from(*g) - w).abs() - roundoff * w.abs() - probabilities
        })
        .fold(0.0, f64::max)
}

#[test]
fn every_offered_tier_matches_the_reference() {
    let Some(gpu) = gpu() else { return };
    // The register-blocked kernel needs no feature: every adapter runs it.
    // The cooperative-matrix one runs where the device multiplies the
    // storage type's matrices (checked per case below).
    let mut tiers = vec![
        Tier::Portable,
        Tier::RegisterBlocked,
        Tier::CooperativeMatrix,
    ];
    if offers_subgroup_broadcast(gpu) {
        tiers.push(Tier::SubgroupBroadcast);
    }
    let mut rng = seeded(0x5eed_7135);
    // f32 and f16 at d=64 unless exhaustive (both at 64 and 128: the
    // per-row tiers' d=128 kernels compile for over a minute each on a cold
    // lavapipe).
    let cases = common::cases(
        "tiers (head dim, storage)",
        &[(64, DType::F32), (64, DType::F16)],
        &[
            (64, DType::F32),
            (64, DType::F16),
            (128, DType::F32),
            (128, DType::F16),
        ],
    );
    for (head_dim, dtype) in cases {
        let shape = AttentionShape {
            batch: 2,
            seq_q: 77,
            seq_kv: 130,
            heads_q: 4,
            heads_kv: 2,
            head_dim,
            head_dim_v: head_dim,
        };
        let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
        for causal in [false, true] {
            for &tier in &tiers {
                if let Err(Error::TierUnavailable { reason, .. }) =
                    ForwardPlan::for_call(gpu.info(), &shape, dtype, Some(tier))
                {
                    eprintln!("SKIPPED: {tier:?} with {dtype:?} storage: {reason}");
                    continue;
                }
                let excess = run_tier(gpu, tier, dtype, &shape, &inputs, causal);
                assert!(
                    excess <= 1e-4,
                    "{tier:?} {dtype:?} d={head_dim} causal={causal}: error exceeds rounding by {excess:.3e}"
                );
            }
        }
    }
}

/// The register-blocked kernel with layouts the caller gives (the tuning
/// knob `flash-bench run --blocked-layout` sweeps): one invocation, odd
/// rows per invocation, more key lanes than value vec4s (d=40: 10 vec4s
/// over 16 lanes), on prefill and on decoding-like GQA shapes (grouped
/// rows), against the reference; and the typed errors of layouts the
/// kernel or the adapter cannot run.
#[test]
fn register_blocked_layouts_from_the_caller_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x1a70_0175);
    let layout = |row_lanes, key_lanes, rows| BlockedLayout {
        row_lanes,
        key_lanes,
        rows,
    };
    let prefill = AttentionShape {
        batch: 2,
        seq_q: 77,
        seq_kv: 130,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 40,
        head_dim_v: 40,
    };
    let decoding = AttentionShape {
        seq_q: 2,
        seq_kv: 101,
        heads_q: 8,
        ..prefill
    };
    for (layout, dtype) in [
        (layout(1, 1, 1), DType::F32),
        (layout(4, 2, 3), DType::F32),
        (layout(2, 16, 2), DType::F32),
        (layout(4, 2, 3), DType::F16),
    ] {
        for (shape, causal) in [(prefill, true), (prefill, false), (decoding, true)] {
            let config = AttentionConfig::new().causal(causal).blocked_layout(layout);
            let plan =
                ForwardPlan::for_call_with_layout(gpu.info(), &shape, dtype, None, layout).unwrap();
            let blocked = plan.blocked_tiling().unwrap();
            assert_eq!(
                (blocked.row_lanes, blocked.key_lanes, blocked.rows),
                (layout.row_lanes, layout.key_lanes, layout.rows)
            );
            let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
            let excess = run_config(gpu, &config, dtype, &shape, &inputs);
            assert!(
                excess <= 1e-4,
                "{layout} {dtype:?} seq_q={} causal={causal}: error exceeds rounding by {excess:.3e}",
                shape.seq_q
            );
        }
    }
    // The Q block's and the probabilities' rows are padded to odd strides
    // where that fits, and left unpadded where only that does: 32x2x3 at
    // d=64 needs 33,664 bytes padded and 30,592 unpadded (llvmpipe allows
    // 32 KiB). A tile that does not fit whole runs in two passes (half of
    // K's head dim, then half of V's keys, at a time): 8x16x4 at d=64,
    // 36,864 bytes whole and padded, 28,672 in two passes. Each form
    // against the reference, f32 and f16 storage, a prefill and a
    // decoding-like GQA shape.
    let wide = AttentionShape {
        head_dim: 64,
        head_dim_v: 64,
        ..prefill
    };
    let wide_decoding = AttentionShape {
        head_dim: 64,
        head_dim_v: 64,
        ..decoding
    };
    let limit = u64::from(gpu.info().limits.max_compute_workgroup_storage_size);
    let mut forms_run = Vec::new();
    for (layout, dtype, shape) in [
        (layout(32, 2, 3), DType::F32, wide),
        (layout(32, 2, 3), DType::F16, wide),
        (layout(8, 16, 4), DType::F32, wide),
        (layout(8, 16, 4), DType::F16, wide),
        (layout(8, 16, 4), DType::F32, wide_decoding),
    ] {
        let plan =
            ForwardPlan::for_call_with_layout(gpu.info(), &shape, dtype, None, layout).unwrap();
        let blocked = plan.blocked_tiling().unwrap();
        let fits = |pad_rows, passes| {
            wgpu_flash_attn::BlockedTiling {
                pad_rows,
                passes,
                ..blocked
            }
            .workgroup_bytes()
                <= limit
        };
        // The first of (whole, padded), (whole), (two passes, padded), (two
        // passes) that fits.
        let want = if fits(true, 1) {
            (true, 1)
        } else if fits(false, 1) {
            (false, 1)
        } else if fits(true, 2) {
            (true, 2)
        } else {
            (false, 2)
        };
        assert_eq!((blocked.pad_rows, blocked.passes), want, "{blocked:?}");
        assert!(plan.workgroup_bytes() <= limit);
        forms_run.push(want);
        for causal in [true, false] {
            let config = AttentionConfig::new().causal(causal).blocked_layout(layout);
            let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
            let excess = run_config(gpu, &config, dtype, &shape, &inputs);
            assert!(
                excess <= 1e-4,
                "{layout} {dtype:?} seq_q={} causal={causal}, rows padded: {}, passes: {}: error \
                 exceeds rounding by {excess:.3e}",
                shape.seq_q,
                blocked.pad_rows,
                blocked.passes
            );
        }
    }
    // On 32 KiB (llvmpipe, CI) the cases above reach the forms they are
    // chosen for: unpadded rows and two passes.
    if limit == 32 * 1024 {
        assert!(
            forms_run.contains(&(false, 1)) && forms_run.contains(&(true, 2)),
            "{forms_run:?}"
        );
    }
    // What the kernel or the adapter cannot run, refused before recording.
    let inputs = Inputs::draw(&prefill, 7, 1.0);
    let upload = |dims, data: &[f32]| Tensor::from_f32(gpu, dims, data).unwrap();
    let (q, k, v) = (
        upload(prefill.q_shape(), &inputs.q),
        upload(prefill.k_shape(), &inputs.k),
        upload(prefill.v_shape(), &inputs.v),
    );
    let out = Tensor::zeros(gpu, prefill.o_shape(), DType::F32).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let limit = gpu.info().limits.max_compute_invocations_per_workgroup;
    for (config, check) in [
        (
            AttentionConfig::new().blocked_layout(layout(8, 8, 9)),
            &(|e: &Error| matches!(e, Error::InvalidBlockedLayout { rows: 9, .. }))
                as &dyn Fn(&Error) -> bool,
        ),
        (
            AttentionConfig::new().blocked_layout(layout(256, 256, 1)),
            &|e: &Error| matches!(e, Error::WorkgroupInvocations { needed: 65536, .. }),
        ),
        (
            AttentionConfig::new()
                .tier(Tier::Portable)
                .blocked_layout(layout(4, 2, 3)),
            &|e: &Error| matches!(e, Error::UnsupportedCombination { .. }),
        ),
    ] {
        let err = gpu.run(|e| gpu.forward(e, &args, &config)).unwrap_err();
        assert!(check(&err), "{err} (invocation limit {limit})");
    }
}

#[test]
fn default_tier_is_the_best_offered() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 64, 2, 64);
    let plan = ForwardPlan::new(gpu.info(), &shape).unwrap();
    let hardware = matches!(
        gpu.info().adapter.device_type,
        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
    );
    let coop = ForwardPlan::for_call(
        gpu.info(),
        &shape,
        DType::F32,
        Some(Tier::CooperativeMatrix),
    )
    .is_ok();
    // The matrix tier is a default on CPU adapters only, until its tests
    // pass on a hardware GPU (README, "Kernel tiers").
    let best = if coop && !hardware {
        Tier::CooperativeMatrix
    } else if hardware {
        Tier::RegisterBlocked
    } else if offers_subgroup_broadcast(gpu) {
        Tier::SubgroupBroadcast
    } else {
        Tier::Portable
    };
    assert_eq!(plan.tier(), best, "{}", gpu.info().summary());
    if best == Tier::SubgroupBroadcast {
        // One subgroup of the smallest size the adapter may pick.
        assert_eq!(plan.workgroup_size(), gpu.info().adapter.subgroup_min_size);
    }
}

/// A forward call of `shape` in `dtype` with `tier` forced returns
/// `TierUnavailable` for that tier.
fn assert_call_refuses(gpu: &Gpu, shape: &AttentionShape, dtype: DType, tier: Tier) {
    let q = Tensor::filled_as(gpu, shape.q_shape(), 0.5, dtype).unwrap();
    let out = Tensor::filled_as(gpu, shape.q_shape(), 0.0, dtype).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &q,
        v: &q,
        out: &out,
        lse: None,
    };
    let config = AttentionConfig::new().tier(tier);
    match gpu.run(|e| gpu.forward(e, &args, &config)) {
        Err(Error::TierUnavailable { tier: refused, .. }) => assert_eq!(refused, tier),
        other => panic!("{tier:?} through a call: expected TierUnavailable, got {other:?}"),
    }
}

#[test]
fn forcing_a_tier_the_adapter_lacks_is_a_typed_error() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 64, 2, 64);
    let forced = ForwardPlan::for_call(
        gpu.info(),
        &shape,
        DType::F32,
        Some(Tier::SubgroupBroadcast),
    );
    if offers_subgroup_broadcast(gpu) {
        assert_eq!(forced.unwrap().tier(), Tier::SubgroupBroadcast);
        eprintln!(
            "this adapter offers every tier; the error path is exercised on adapters without one (CI's GL pass)"
        );
    } else {
        match forced {
            Err(Error::TierUnavailable { tier, reason }) => {
                assert_eq!(tier, Tier::SubgroupBroadcast);
                assert!(!reason.is_empty());
            }
            other => panic!("expected TierUnavailable, got {other:?}"),
        }
        // The same through a call.
        assert_call_refuses(gpu, &shape, DType::F32, Tier::SubgroupBroadcast);
    }
    // Cooperative matrices: where the device lacks them (every CI
    // adapter), forcing them names the missing feature, here and through
    // a call.
    let coop = ForwardPlan::for_call(
        gpu.info(),
        &shape,
        DType::F16,
        Some(Tier::CooperativeMatrix),
    );
    if gpu
        .info()
        .features
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        eprintln!("this device has cooperative matrices: {coop:?}");
    } else {
        match coop {
            Err(Error::TierUnavailable { tier, reason }) => {
                assert_eq!(tier, Tier::CooperativeMatrix);
                // GL is named first (wgpu has no matrices there), else the
                // missing feature.
                let missing = match gpu.info().adapter.backend {
                    wgpu::Backend::Gl => "not Gl",
                    _ => "EXPERIMENTAL_COOPERATIVE_MATRIX",
                };
                assert!(reason.contains(missing), "{reason}");
            }
            other => panic!("expected TierUnavailable, got {other:?}"),
        }
        assert_call_refuses(gpu, &shape, DType::F16, Tier::CooperativeMatrix);
    }
    // The portable tier is offered everywhere.
    let portable =
        ForwardPlan::for_call(gpu.info(), &shape, DType::F32, Some(Tier::Portable)).unwrap();
    assert_eq!(portable.tier(), Tier::Portable);
}

/// Decoding-like GQA calls (fewer query rows than a block) on the
/// register-blocked kernel give a block's rows to the (query row, head)
/// pairs of one KV head's query heads: every option that depends on the
/// head (sinks, ALiBi slopes) or the row (causal, windows) must follow
/// each row, also with keys in chunks, padded sequences and f16 storage.
#[test]
fn register_blocked_rows_group_a_kv_heads_query_heads() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x5eed_9a0c);
    // (batch, seq_q, seq_kv, heads_q, heads_kv): GQA 4, 4, 8 and MQA, and
    // more queries than keys (causal rows that see nothing).
    let shapes = [
        (1, 1, 500, 8, 2),
        (2, 3, 130, 12, 3),
        (1, 3, 77, 64, 8),
        (2, 2, 40, 4, 1),
        (1, 6, 4, 8, 2),
    ];
    for (batch, seq_q, seq_kv, heads_q, heads_kv) in shapes {
        let shape = AttentionShape {
            batch,
            seq_q,
            seq_kv,
            heads_q,
            heads_kv,
            head_dim: 64,
            head_dim_v: 64,
        };
        let plan =
            ForwardPlan::for_call(gpu.info(), &shape, DType::F32, Some(Tier::RegisterBlocked))
                .unwrap();
        assert!(plan.groups_heads(), "{shape:?}: {plan:?}");
        assert_eq!(plan.workgroups()[2], heads_kv as u32);
        let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
        let sinks = common::random::normal_vec(&mut rng, heads_q, 1.0);
        let slopes: Vec<f32> = (0..heads_q).map(|h| 0.05 * (h + 1) as f32).collect();
        let configs = [
            AttentionConfig::new(),
            AttentionConfig::new().causal(true).sinks(sinks),
            AttentionConfig::new()
                .window(Some(17), Some(3))
                .softcap(8.0)
                .alibi(Alibi::PerHead(slopes)),
        ];
        for config in configs {
            let config = config.tier(Tier::RegisterBlocked);
            let [q, k, v, _] = common::upload(gpu, &shape, &inputs);
            for keys in [None, Some(7), Some(64)] {
                // A fresh poisoned output each time: an element a chunked
                // run leaves unwritten must not pass on the last run's value.
                let out = Tensor::filled(gpu, shape.o_shape(), f32::NAN).unwrap();
                let mut options = ForwardOptions::new(&config);
                if let Some(keys) = keys {
                    options = options.keys_per_dispatch(keys);
                }
                let (got, got_lse) = common::run_views(
                    gpu,
                    common::Implementation::Flash,
                    &shape,
                    options,
                    [&q, &k, &v, &out],
                );
                common::assert_close(
                    common::compare(&shape, &inputs, &config, &got, &got_lse),
                    &format!("{shape:?} {config:?} keys per dispatch {keys:?}"),
                );
            }
        }
    }
}

/// Grouped rows with padded sequences (lengths 0 and 1) and f16 storage.
#[test]
fn register_blocked_grouped_rows_with_padding_and_half_storage() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 3,
        seq_q: 4,
        seq_kv: 90,
        heads_q: 8,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    };
    let inputs = Inputs::draw(&shape, 0x5eed_9a0d, 1.0);
    let config = AttentionConfig::new()
        .causal(true)
        .sinks(vec![0.5, -1.0, 0.0, 2.0, -0.5, 1.0, 0.25, -2.0])
        .tier(Tier::RegisterBlocked);
    let (q_lens, kv_lens) = ([4usize, 1, 0], [90usize, 33, 1]);
    let [q, k, v, out] = common::upload(gpu, &shape, &inputs);
    let lens = ValidLengths {
        q: Some(&q_lens),
        kv: &kv_lens,
    };
    let (got, got_lse) = common::run_views(
        gpu,
        common::Implementation::Flash,
        &shape,
        ForwardOptions::new(&config).valid_lengths(lens),
        [&q, &k, &v, &out],
    );
    let (hq, hkv, d) = (8, 2, 64);
    for b in 0..3 {
        let (q_base, kv_base) = (b * 4 * hq * d, b * 90 * hkv * d);
        let (want, want_lse) = common::sequence_reference(
            &config,
            b,
            (hq, hkv, d),
            &inputs.q[q_base..q_base + q_lens[b] * hq * d],
            &inputs.k[kv_base..kv_base + kv_lens[b] * hkv * d],
            &inputs.v[kv_base..kv_base + kv_lens[b] * hkv * d],
        );
        let what = format!("batch entry {b}");
        common::assert_rows_close(&got[q_base..q_base + q_lens[b] * hq * d], &want, &what);
        assert!(
            got[q_base + q_lens[b] * hq * d..q_base + 4 * hq * d]
                .iter()
                .all(|&x| x == 0.0),
            "{what}: padded rows are zeros"
        );
        for h in 0..hq {
            let row0 = (b * hq + h) * 4;
            common::assert_rows_close(
                &got_lse[row0..row0 + q_lens[b]],
                &want_lse[h * q_lens[b]..(h + 1) * q_lens[b]],
                &format!("{what} lse head {h}"),
            );
        }
    }
    // f16 storage: within the output's rounding of the reference.
    let f16 = DType::F16;
    let excess = run_tier(gpu, Tier::RegisterBlocked, f16, &shape, &inputs, true);
    assert!(excess <= 1e-4, "f16 grouped rows: {excess:.3e}");
    let plan = ForwardPlan::for_call(gpu.info(), &shape, f16, Some(Tier::RegisterBlocked)).unwrap();
    assert!(plan.groups_heads());
}
