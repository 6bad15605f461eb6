//! The subgroup tier at a subgroup size other than lavapipe's usual 8.
//!
//! lavapipe's subgroup size is its SIMD width: with
//! `LP_NATIVE_VECTOR_WIDTH=128` it reports 4, so this binary (its own
//! process, one test) sets that before opening the adapter and checks that
//! the tier sizes its workgroup from the adapter and still matches the
//! reference. On other adapters the variable does nothing and the test runs
//! at their own smallest subgroup size.

mod common;

use common::random::seeded;
use common::{Inputs, gpu};
use rand::Rng;
use wgpu_flash_attn::{AttentionConfig, AttentionShape, DType, ForwardPlan, Tier};

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
    let mut rng = seeded(0x5eed_5b54);
    // Head dims that divide the lanes evenly and not (96 = 24 vec4s over
    // 4 lanes per key group); one of them unless exhaustive.
    let cases = common::cases(
        "subgroup size 4 (head dim, causal)",
        &[(64, true)],
        &[(8, false), (64, true), (96, false)],
    );
    for (head_dim, causal) in cases {
        let shape = AttentionShape {
            batch: 2,
            seq_q: 45,
            seq_kv: 103,
            heads_q: 4,
            heads_kv: 2,
            head_dim,
            head_dim_v: head_dim,
        };
        let config = AttentionConfig::new()
            .causal(causal)
            .tier(Tier::SubgroupBroadcast);
        let plan = ForwardPlan::for_call(gpu.info(), &shape, DType::F32, config.tier).unwrap();
        assert_eq!(plan.workgroup_size(), adapter.subgroup_min_size);
        assert_eq!(plan.tier(), Tier::SubgroupBroadcast);

        let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
        let errors = common::run_and_compare(gpu, &shape, &inputs, &config);
        assert!(
            errors.out <= 1e-4 && errors.lse <= 1e-4,
            "subgroup size {} d={head_dim} causal={causal}: {errors:?}",
            adapter.subgroup_min_size
        );
    }
}
