//! Kernel tiers: each tier the adapter offers matches the reference on the
//! same inputs (f32 and f16 storage), the default is the best one offered
//! (register-blocked on hardware GPUs, the per-row tiers on CPU adapters),
//! and forcing a tier the adapter lacks is a typed error.

mod common;

use common::random::seeded;
use common::{Inputs, gpu, round_to};
use rand::Rng;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, Error, ForwardPlan, Gpu, Tensor, Tier,
    reference,
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
    let held = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round_to(dtype, x)).collect() };
    let (q, k, v) = (held(&inputs.q), held(&inputs.k), held(&inputs.v));
    let config = AttentionConfig::new().causal(causal).tier(tier);
    let plan = ForwardPlan::for_call(gpu.info(), shape, dtype, config.tier).unwrap();
    assert_eq!(plan.tier(), tier);
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
    gpu.run(|e| gpu.forward(e, &args, &config)).unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    let want = reference::attention(shape, &q, &k, &v, &config)
        .unwrap()
        .out;
    let roundoff = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    };
    let probabilities = if tier == Tier::CooperativeMatrix && dtype == DType::F16 {
        let v_max = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
        2f64.powi(-11) * v_max
    } else {
        0.0
    };
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
    // f32 at d=64 and f16 at d=128 unless exhaustive (both at both).
    let cases = common::cases(
        "tiers (head dim, storage)",
        &[(64, DType::F32), (128, DType::F16)],
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
    let best = if coop {
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
        let q = Tensor::filled(gpu, shape.q_shape(), 0.5).unwrap();
        let out = Tensor::filled(gpu, shape.q_shape(), 0.0).unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &q,
            v: &q,
            out: &out,
            lse: None,
        };
        let config = AttentionConfig::new().tier(Tier::SubgroupBroadcast);
        assert!(matches!(
            gpu.run(|e| gpu.forward(e, &args, &config)),
            Err(Error::TierUnavailable { .. })
        ));
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
                assert!(
                    reason.contains("EXPERIMENTAL_COOPERATIVE_MATRIX"),
                    "{reason}"
                );
            }
            other => panic!("expected TierUnavailable, got {other:?}"),
        }
        let q = Tensor::filled_as(gpu, shape.q_shape(), 0.5, DType::F16).unwrap();
        let out = Tensor::filled_as(gpu, shape.q_shape(), 0.0, DType::F16).unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &q,
            v: &q,
            out: &out,
            lse: None,
        };
        let config = AttentionConfig::new().tier(Tier::CooperativeMatrix);
        assert!(matches!(
            gpu.run(|e| gpu.forward(e, &args, &config)),
            Err(Error::TierUnavailable {
                tier: Tier::CooperativeMatrix,
                ..
            })
        ));
    }
    // The portable tier is offered everywhere.
    let portable =
        ForwardPlan::for_call(gpu.info(), &shape, DType::F32, Some(Tier::Portable)).unwrap();
    assert_eq!(portable.tier(), Tier::Portable);
}
