//! The subgroup tier at a subgroup size other than lavapipe's usual 8.
//!
//! lavapipe's subgroup size is its SIMD width: with
//! `LP_NATIVE_VECTOR_WIDTH=128` it reports 4, so this binary (its own
//! process, one test) sets that before opening the adapter and checks that
//! the forward's subgroup tier and the decode's head-dim lane layout (the
//! GPUs' default) size their workgroups from the adapter and still match
//! the reference, with lanes past the head dim idle (as at d=64 over
//! NVIDIA's 32 lanes). On other adapters the variable does nothing and the
//! test runs at their own smallest subgroup size.
//!
//! (Mesa 22.3's llvmpipe reports 16, 32 and 64 lanes at widths 512, 1024
//! and 2048, but supports at most 512 bits, `LP_MAX_VECTOR_WIDTH`: past
//! it, values from lanes 16 and up come out as NaN whatever the kernel.)

mod common;

use common::random::seeded;
use common::{Inputs, gpu};
use rand::Rng;
use wgpu_flash_attn::{
    AttentionConfig, AttentionShape, DType, DecodeArgs, DecodeLanes, DecodeOptions, ForwardPlan,
    Gpu, KvCache, KvCacheConfig, KvLayout, Lse, Tensor, Tier, reference,
};

#[test]
fn subgroup_kernels_follow_the_adapters_subgroup_size() {
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
    // 4 lanes per key group); d=32 unless exhaustive (every kernel of this
    // binary compiles cold, for its own vector width: d=64's took 4x as
    // long, 41 s against 11 s for the test).
    let cases = common::cases(
        "subgroup size 4 (head dim, causal)",
        &[(32, true)],
        &[(8, false), (32, true), (64, true), (96, false)],
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
    decode_head_dim_lanes(gpu, &mut rng);
}

/// Decoding with lanes over the head dim at the adapter's smallest subgroup
/// size: one query token of eight heads over two KV heads, in three key
/// splits (the merge included), against the f64 reference. d=24 spreads
/// six vec4s over four lanes (a second slot with two lanes idle); d=8
/// leaves half the lanes idle; d=64 takes four slots.
fn decode_head_dim_lanes(gpu: &Gpu, rng: &mut impl Rng) {
    let lanes = gpu.info().adapter.subgroup_min_size;
    let head_dims = common::cases(
        "decode over head-dim lanes at the smallest subgroup size (head dim)",
        &[24],
        &[8, 24, 64],
    );
    for head_dim in head_dims {
        let shape = AttentionShape {
            batch: 1,
            seq_q: 1,
            seq_kv: 299,
            heads_q: 8,
            heads_kv: 2,
            head_dim,
            head_dim_v: head_dim,
        };
        let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
        let layout = KvLayout::Contiguous {
            capacity: shape.seq_kv,
        };
        let mut cache =
            KvCache::new(gpu, KvCacheConfig::new(1, shape.heads_kv, head_dim, layout)).unwrap();
        let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
        let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
        gpu.run(|e| cache.append(gpu, e, &k, &v, None)).unwrap();

        let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
        let out = Tensor::filled_as(gpu, shape.q_shape(), f32::NAN, DType::F32).unwrap();
        let lse = Lse::new(gpu, 1, shape.heads_q, 1).unwrap();
        let config = AttentionConfig::new().causal(true);
        let mut options = DecodeOptions::new(&config).lanes(DecodeLanes::HeadDim);
        options.kv_splits = Some(3);
        let args = DecodeArgs {
            q: &q,
            cache: &cache,
            out: &out,
            lse: Some(&lse),
        };
        let plan = gpu.run(|e| gpu.decode(e, &args, options.clone())).unwrap();
        assert_eq!(plan.lanes(), Some(DecodeLanes::HeadDim), "{plan:?}");
        assert_eq!(plan.slots, 3, "{plan:?}");

        let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        let got_lse = lse.to_vec(gpu).unwrap();
        let what = format!("decode over {lanes} head-dim lanes, d={head_dim}");
        let errors = common::compare_with(&want, &got, &got_lse, &what);
        assert!(
            errors.out <= 1e-4 && errors.lse <= 1e-4,
            "{what}: {errors:?}"
        );
    }
}
