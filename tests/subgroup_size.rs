//! The subgroup tier at a subgroup size other than lavapipe's usual 8.
//!
//! lavapipe's subgroup size is its SIMD width: with
//! `LP_NATIVE_VECTOR_WIDTH=128` it reports 4, so this binary (its own
//! process, one test) sets that before opening the adapter and checks that
//! the tier sizes its workgroup from the adapter and still matches the
//! reference. On other adapters the variable does nothing and the test runs
//! at their own smallest subgroup size.

mod common;

use common::{Inputs, gpu};
use wgpu_flash_attn::random::SeededRng;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, ForwardPlan, Tensor, Tier, reference,
};

#[test]
fn subgroup_tier_follows_the_adapters_subgroup_size() {
    // SAFETY: this binary's only test sets the variable before anything
    // (the driver included) is loaded or reads the environment.
    unsafe { std::env::set_var("LP_NATIVE_VECTOR_WIDTH", "128") };
    let Some(gpu) = gpu() else { return };
    let info = gpu.info();
    let adapter = &info.adapter;
    if adapter.backend == wgpu::Backend::Gl || !info.has_subgroups() {
        eprintln!(
            "SKIPPED: the {:?} adapter has no subgroups; the tier's absence is tested in tests/tiers.rs",
            adapter.backend
        );
        return;
    }
    if adapter.driver.contains("llvmpipe") {
        assert_eq!(
            adapter.subgroup_min_size, 4,
            "LP_NATIVE_VECTOR_WIDTH=128 should give lavapipe 4-wide subgroups"
        );
    }
    let mut rng = SeededRng::new(0x5eed_5b54);
    for (head_dim, causal) in [(8, false), (64, true), (96, false)] {
        let shape = AttentionShape {
            batch: 2,
            seq_q: 45,
            seq_kv: 103,
            heads_q: 4,
            heads_kv: 2,
            head_dim,
        };
        let config = AttentionConfig::new()
            .causal(causal)
            .tier(Tier::SubgroupBroadcast);
        let plan = ForwardPlan::for_call(gpu, &shape, DType::F32, config.tier).unwrap();
        let tiling = plan.specialization.attention_tiling().unwrap();
        assert_eq!(tiling.workgroup_size, adapter.subgroup_min_size);
        assert!(tiling.subgroup_kv);

        let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
        let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
        let k = Tensor::from_f32(gpu, shape.kv_shape(), &inputs.k).unwrap();
        let v = Tensor::from_f32(gpu, shape.kv_shape(), &inputs.v).unwrap();
        let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: None,
        };
        gpu.attention_into(&args, &config).unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
            .unwrap()
            .out;
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        assert!(
            err <= 1e-4,
            "subgroup size {} d={head_dim} causal={causal}: max error {err:.3e}",
            adapter.subgroup_min_size
        );
    }
}
