//! The planners over the adapter profiles: what each adapter would run,
//! and the errors where it cannot.

use super::decode::{GPU_HEAD_DIM_LANE_REGISTERS, head_dim_lane_registers, key_tile_bytes};
use super::profiles::*;
use super::*;
use crate::config::AttentionShape;
use crate::decode::{DecodeLanes, DecodeOptions};
use crate::shaders::{BlockedTiling, MIN_BLOCK_N, NaivePass};
use crate::tensor::DType;

fn profile(name: &str) -> GpuInfo {
    all()
        .into_iter()
        .find(|p| p.name.starts_with(name))
        .expect("a profile of that name")
        .info()
}

/// (tier, workgroup size, rows per invocation, keys per tile, unrolled)
type Tiling = (Tier, u32, u32, u32, bool);

fn forward(info: &GpuInfo, head_dim: usize) -> Tiling {
    let shape = AttentionShape::self_attention(1, 1024, 8, head_dim);
    let plan = ForwardPlan::new(info, &shape).expect("plans");
    (
        plan.tier(),
        plan.workgroup_size(),
        plan.rows_per_invocation(),
        plan.block_n(),
        plan.unrolled(),
    )
}

/// Only calls with dropout compile its hashing (the DROPOUT variant),
/// on every tier.
#[test]
fn dropout_is_a_variant_of_its_own() {
    let shape = AttentionShape::self_attention(1, 1024, 8, 64);
    for profile in profiles::all() {
        let info = profile.info();
        for storage in [DType::F32, DType::F16] {
            let Ok(plan) = ForwardPlan::for_call(&info, &shape, storage, None) else {
                continue;
            };
            let has_dropout = |spec: Specialization| spec.variant_flags().contains(&"DROPOUT");
            assert!(!has_dropout(plan.specialization()), "{}", profile.name);
            assert!(!has_dropout(plan.masked_specialization()));
            assert!(!plan.applies_dropout());
            let dropout = plan.with_dropout();
            assert!(dropout.applies_dropout());
            assert!(has_dropout(dropout.specialization()), "{}", profile.name);
            assert!(has_dropout(dropout.masked_specialization()));
            // The same tier and tiles otherwise.
            assert_eq!(dropout.tier(), plan.tier());
            assert_eq!(dropout.workgroups(), plan.workgroups());
            assert_eq!(dropout.block_m(), plan.block_m());
        }
    }
}

#[test]
fn forward_tiling_per_adapter() {
    use Tier::{Portable, RegisterBlocked, SubgroupBroadcast};
    // name, head dim, (tier, workgroup, rows, block_n, unrolled)
    let table: [(&str, usize, Tiling); 17] = [
        // lavapipe: one subgroup of 8, many rows each, unrolled.
        (
            "llvmpipe (LLVM 15.0.6, 256 bits)",
            64,
            (SubgroupBroadcast, 8, 16, 64, true),
        ),
        (
            "llvmpipe (LLVM 15.0.6, 256 bits)",
            256,
            (SubgroupBroadcast, 8, 4, 16, true),
        ),
        // GL: no subgroups; the GPU tiling, head-dim loops unrolled.
        (
            "llvmpipe (LLVM 15.0.6, 256 bits) GL",
            64,
            (Portable, 64, 1, 64, true),
        ),
        (
            "llvmpipe (LLVM 15.0.6, 256 bits) GL",
            256,
            (Portable, 64, 1, 16, true),
        ),
        // Hardware: register-blocked, 64 rows x 32 keys by 128
        // invocations where the workgroup memory holds them, smaller
        // blocks (and fewer rows per invocation) for wider heads; on
        // NVIDIA, 128 invocations with two rows each before fewer lanes
        // (measured faster).
        ("NVIDIA", 64, (RegisterBlocked, 128, 4, 32, false)),
        ("NVIDIA", 128, (RegisterBlocked, 128, 2, 32, false)),
        ("NVIDIA", 256, (RegisterBlocked, 32, 1, 16, false)),
        ("AMD", 128, (RegisterBlocked, 128, 4, 32, false)),
        ("AMD", 256, (RegisterBlocked, 64, 2, 32, false)),
        ("Apple", 64, (RegisterBlocked, 64, 4, 32, false)),
        ("Apple", 256, (RegisterBlocked, 32, 1, 16, false)),
        ("Intel", 64, (RegisterBlocked, 128, 4, 32, false)),
        ("Intel", 192, (RegisterBlocked, 128, 2, 32, false)),
        // 16 KiB of workgroup memory: small blocks, and at d=256 none
        // fits, so the subgroup tier (one row per lane).
        ("Adreno", 64, (RegisterBlocked, 32, 4, 16, false)),
        ("Adreno", 256, (SubgroupBroadcast, 64, 1, 8, true)),
        // WARP: a CPU adapter whose smallest subgroup is 4.
        ("WARP", 64, (SubgroupBroadcast, 4, 16, 64, true)),
        ("WARP", 128, (SubgroupBroadcast, 4, 8, 32, true)),
    ];
    for (name, head_dim, expected) in table {
        assert_eq!(
            forward(&profile(name), head_dim),
            expected,
            "{name} d={head_dim}"
        );
    }
}

#[test]
fn portable_tier_everywhere_and_subgroups_only_where_offered() {
    let shape = AttentionShape::self_attention(1, 512, 4, 64);
    for p in all() {
        let info = p.info();
        let portable = ForwardPlan::for_call(&info, &shape, DType::F16, Some(Tier::Portable))
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
        assert_eq!(portable.tier(), Tier::Portable);
        assert_eq!(portable.storage(), DType::F16);
        assert!(portable.workgroup_size() <= p.invocations);
        let forced =
            ForwardPlan::for_call(&info, &shape, DType::F32, Some(Tier::SubgroupBroadcast));
        match (p.backend, p.subgroups) {
            (wgpu::Backend::Gl, _) | (_, None) => assert!(
                matches!(forced, Err(Error::TierUnavailable { .. })),
                "{}: {forced:?}",
                p.name
            ),
            _ => assert_eq!(forced.expect("offered").tier(), Tier::SubgroupBroadcast),
        }
    }
    // Without the feature, or with a smallest size outside 4..=128, the
    // per-row default (a CPU adapter's) is the portable tier and
    // forcing says why.
    let mut info = profile("WARP");
    info.features.remove(wgpu::Features::SUBGROUP);
    assert_eq!(
        ForwardPlan::new(&info, &shape).unwrap().tier(),
        Tier::Portable
    );
    let mut info = profile("WARP");
    info.adapter.subgroup_min_size = 256;
    info.adapter.subgroup_max_size = 256;
    assert_eq!(
        ForwardPlan::new(&info, &shape).unwrap().tier(),
        Tier::Portable
    );
    match ForwardPlan::for_call(&info, &shape, DType::F32, Some(Tier::SubgroupBroadcast)) {
        Err(Error::TierUnavailable { reason, .. }) => {
            assert!(reason.contains("256"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn register_blocked_layouts_given_by_the_caller() {
    let shape = AttentionShape::self_attention(2, 1000, 8, 128);
    let layout = |row_lanes, key_lanes, rows| BlockedLayout {
        row_lanes,
        key_lanes,
        rows,
    };
    for p in all() {
        let info = p.info();
        let what = p.name;
        // A small layout fits every profile and is taken exactly, on
        // any storage, CPU adapters included.
        let plan =
            ForwardPlan::for_call_with_layout(&info, &shape, DType::F16, None, layout(4, 2, 3))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        let blocked = plan.blocked_tiling().expect("register-blocked");
        assert_eq!(
            (blocked.row_lanes, blocked.key_lanes, blocked.rows),
            (4, 2, 3),
            "{what}"
        );
        assert_eq!(plan.tier(), Tier::RegisterBlocked);
        // Heads along z, the slowest axis (equal work in every contiguous
        // range of the grid, as llvmpipe's threads take it).
        assert_eq!(plan.workgroups(), [1000u32.div_ceil(12), 2, 8]);
        assert_eq!(plan.block_n(), 8);
        // Out of the kernel's range: the numbers come back.
        for bad in [
            layout(0, 8, 2),
            layout(8, 0, 2),
            layout(8, 8, 0),
            layout(8, 8, 9),
        ] {
            match ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, bad) {
                Err(Error::InvalidBlockedLayout {
                    row_lanes,
                    key_lanes,
                    rows,
                }) => assert_eq!(layout(row_lanes, key_lanes, rows), bad),
                other => panic!("{what} {bad}: {other:?}"),
            }
        }
        // Past the adapter's invocations or workgroup memory.
        let wide = layout(256, 256, 1);
        assert!(matches!(
            ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, wide),
            Err(Error::WorkgroupInvocations { needed: 65536, limit }) if limit == p.invocations
        ));
        let tall = layout(128, 1, 8);
        let needed = BlockedTiling {
            head_dim: 128,
            head_dim_v: 128,
            row_lanes: 128,
            key_lanes: 1,
            rows: 8,
            storage: DType::F32,
            f16_products: false,
            dropout: false,
            pad_rows: false,
            passes: 1,
        }
        .workgroup_bytes();
        match ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, tall) {
            Err(Error::WorkgroupMemory {
                needed: n, limit, ..
            }) => {
                assert_eq!((n, limit), (needed, p.workgroup_bytes), "{what}");
            }
            Err(Error::WorkgroupInvocations { .. }) => assert!(p.invocations < 128, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        // Only the register-blocked tier has layouts.
        for tier in [
            Tier::Portable,
            Tier::SubgroupBroadcast,
            Tier::CooperativeMatrix,
        ] {
            assert!(matches!(
                ForwardPlan::for_call_with_layout(
                    &info,
                    &shape,
                    DType::F32,
                    Some(tier),
                    layout(4, 2, 3)
                ),
                Err(Error::UnsupportedCombination { .. })
            ));
        }
    }
}

/// The register-blocked scores' loop takes `D_STEP` head-dim vec4s a trip
/// (unrolled): every supported head dim is a whole number of trips.
#[test]
fn the_scores_loop_step_divides_every_head_dim() {
    let step = BlockedTiling::D_STEP as usize;
    for head_dim in (1..=576).filter(|&d| crate::config::is_supported_head_dim(d)) {
        assert_eq!((head_dim / 4) % step, 0, "d={head_dim}");
        assert_eq!(head_dim % 4, 0, "d={head_dim}");
    }
}

#[test]
fn register_blocked_where_it_fits_and_by_default_on_hardware_gpus() {
    for p in all() {
        let info = p.info();
        let gpu = matches!(
            p.device_type,
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
        ) || p.backend == wgpu::Backend::BrowserWebGpu;
        for (head_dim, head_dim_v) in [(64, 64), (128, 128), (192, 128), (256, 256)] {
            let shape =
                AttentionShape::self_attention(1, 1000, 4, head_dim).with_head_dim_v(head_dim_v);
            let what = format!("{} d={head_dim}/{head_dim_v}", p.name);
            let limit = u64::from(p.workgroup_bytes);
            let default = ForwardPlan::new(&info, &shape).unwrap();
            match ForwardPlan::for_call(&info, &shape, DType::BF16, Some(Tier::RegisterBlocked)) {
                Ok(plan) => {
                    let blocked = plan.blocked_tiling().expect("a blocked layout");
                    assert_eq!(plan.tier(), Tier::RegisterBlocked, "{what}");
                    assert!(plan.workgroup_bytes() <= limit, "{what}");
                    assert!(plan.workgroup_size() <= p.invocations, "{what}");
                    assert_eq!(plan.block_m(), blocked.row_lanes * blocked.rows);
                    assert_eq!(plan.block_n(), 4 * blocked.key_lanes);
                    assert!(blocked.rows * blocked.columns() <= 16 || blocked.rows == 1);
                    // Rows padded exactly where the padding fits.
                    let padded = BlockedTiling {
                        pad_rows: true,
                        ..blocked
                    };
                    assert_eq!(
                        blocked.pad_rows,
                        padded.workgroup_bytes() <= limit,
                        "{what}"
                    );
                    assert_eq!(plan.workgroups()[0], 1000u32.div_ceil(plan.block_m()));
                    assert!(matches!(
                        plan.masked_specialization(),
                        Specialization::FlashBlockedMasked(t) if t == blocked
                    ));
                    // The default takes it exactly on hardware GPUs
                    // (unless their matrix units take the call).
                    let coop = default.tier() == Tier::CooperativeMatrix;
                    assert_eq!(
                        default.tier() == Tier::RegisterBlocked,
                        gpu && !coop,
                        "{what}"
                    );
                }
                Err(Error::TierUnavailable { reason, .. }) => {
                    assert!(reason.contains(&limit.to_string()), "{what}: {reason}");
                    assert_ne!(default.tier(), Tier::RegisterBlocked, "{what}");
                }
                Err(other) => panic!("{what}: {other}"),
            }
        }
    }
    // The naive baseline keeps the per-row tiling; decoding has no
    // register-blocked kernel.
    let info = profile("NVIDIA");
    let shape = AttentionShape::self_attention(1, 256, 4, 64);
    let naive =
        NaivePlan::for_call(&info, &shape, DType::F32, Some(Tier::RegisterBlocked)).unwrap();
    assert!(matches!(
        naive.specialization(NaivePass::Scores),
        Specialization::Naive { .. }
    ));
    // Decoding has neither block-tiled kernel.
    let cache = CacheShape {
        batch: 1,
        heads_kv: 1,
        head_dim: 64,
        head_dim_v: 64,
        longest: 100,
        segments: 1,
        dtype: crate::KvDType::F16,
    };
    for tier in [Tier::RegisterBlocked, Tier::CooperativeMatrix] {
        let options = DecodeOptions::new(&crate::AttentionConfig::new().tier(tier));
        let info = profile("NVIDIA H200 with");
        match DecodePlan::for_call(&info, &cache, 1, 4, &options) {
            Err(Error::TierUnavailable { tier: refused, .. }) => assert_eq!(refused, tier),
            other => panic!("decode with {tier:?}: {other:?}"),
        }
    }
}

/// On NVIDIA the register-blocked tier keeps its 16 x 8 lanes at d=128
/// with two rows a lane (16x8x2, measured 1.56x faster than 8x8x4 and
/// 1.72x faster than the subgroup tier on an H100), f32 and f16 alike;
/// other vendors keep four rows over fewer lanes (8x8x4), and wider heads
/// their plans.
#[test]
fn register_blocked_keeps_its_lanes_on_nvidia() {
    let plan = |name: &str, shape: &AttentionShape, storage| {
        ForwardPlan::for_call(&profile(name), shape, storage, None).unwrap()
    };
    let layout = |plan: &ForwardPlan| {
        let t = plan.blocked_tiling().expect("register-blocked");
        (t.row_lanes, t.key_lanes, t.rows)
    };
    let target = AttentionShape::self_attention(4, 4096, 16, 128);
    for name in ["NVIDIA H200", "NVIDIA H200 with"] {
        for storage in [DType::F32, DType::F16, DType::BF16] {
            let p = plan(name, &target, storage);
            assert_eq!(p.tier(), Tier::RegisterBlocked, "{name} {storage:?}");
            assert_eq!(layout(&p), (16, 8, 2), "{name} {storage:?}");
            assert_eq!(
                (p.block_m(), p.block_n(), p.workgroup_size()),
                (32, 32, 128)
            );
        }
    }
    assert!(plan("NVIDIA H200", &target, DType::F16).f16_products());
    // Forcing the subgroup tier still runs it.
    let forced = ForwardPlan::for_call(
        &profile("NVIDIA H200"),
        &target,
        DType::F32,
        Some(Tier::SubgroupBroadcast),
    )
    .unwrap();
    assert_eq!(forced.tier(), Tier::SubgroupBroadcast);
    // d=64 fits four rows over 16 x 8 lanes already.
    let narrow = AttentionShape::self_attention(4, 4096, 16, 64);
    assert_eq!(
        layout(&plan("NVIDIA H200", &narrow, DType::F32)),
        (16, 8, 4)
    );
    // Other vendors: unmeasured, fewer lanes with four rows where 16x8x4
    // does not fit (Apple's 32 KiB at d=64; forward_tiling_per_adapter
    // has the rest).
    assert_eq!(layout(&plan("Apple", &narrow, DType::F32)), (8, 8, 4));
    for name in ["AMD", "Apple", "Intel"] {
        assert_eq!(
            plan(name, &target, DType::F32).tier(),
            Tier::RegisterBlocked,
            "{name}"
        );
    }
    // A decoding step of Llama's heads: the KV head's query heads share
    // the register-blocked block's K/V tiles.
    let decode = AttentionShape {
        seq_q: 1,
        heads_kv: 8,
        ..AttentionShape::self_attention(1, 8192, 64, 128)
    };
    let p = plan("NVIDIA H200", &decode, DType::F32);
    assert_eq!(p.tier(), Tier::RegisterBlocked);
    assert!(p.groups_heads());
}

/// A caller's register-blocked layout is held to the bytes of the tiles it
/// will run: f16 tiles with f16 products (forced, or the planner's default
/// for f16 storage on NVIDIA), f32 tiles otherwise.
#[test]
fn caller_layouts_fit_with_the_tiles_they_run() {
    let info = profile("NVIDIA H200");
    let limit = u64::from(info.limits.max_compute_workgroup_storage_size);
    let shape = AttentionShape::self_attention(4, 4096, 16, 128);
    let layout = BlockedLayout {
        row_lanes: 16,
        key_lanes: 8,
        rows: 4,
    };
    let config = crate::AttentionConfig::new().blocked_layout(layout);
    let plan = |storage, config: &crate::AttentionConfig| {
        ForwardPlan::for_config(&info, &shape, storage, config)
    };
    for config in [config.clone(), config.clone().f16_products(true)] {
        let fits = plan(DType::F16, &config).unwrap();
        assert!(fits.f16_products());
        assert_eq!(fits.block_m(), 64);
        assert!(fits.workgroup_bytes() <= limit);
        // The same layout with f32 tiles needs more than the adapter has.
        assert!(fits.without_f16_products().workgroup_bytes() > limit);
    }
    assert_eq!(
        ForwardPlan::for_call_with_layout(&info, &shape, DType::F16, None, layout)
            .unwrap()
            .block_m(),
        64
    );
    for (storage, config) in [
        (DType::F16, config.clone().f16_products(false)),
        (DType::F32, config.clone()),
        (DType::BF16, config.clone()),
    ] {
        match plan(storage, &config) {
            Err(Error::WorkgroupMemory {
                needed, limit: l, ..
            }) => {
                assert!(needed > limit && u64::from(l) == limit, "{storage:?}")
            }
            other => panic!("{storage:?}: {other:?}"),
        }
    }
}

/// f16 storage on the register-blocked tier takes f16 products by default
/// where they measured faster (NVIDIA), forced or not, and nowhere else;
/// f32 and bf16 storage and the other tiers never.
#[test]
fn f16_products_by_default_on_nvidia_only() {
    let shape = AttentionShape::self_attention(4, 4096, 16, 128);
    let plan =
        |name: &str, storage, tier| ForwardPlan::for_call(&profile(name), &shape, storage, tier);
    let nvidia = plan("NVIDIA H200", DType::F16, None).unwrap();
    assert_eq!(nvidia.tier(), Tier::RegisterBlocked);
    assert!(nvidia.f16_products());
    assert!(nvidia.blocked_tiling().unwrap().f16_products);
    assert!(matches!(nvidia.specialization(), Specialization::FlashBlocked(b) if b.f16_products));
    let forced = plan("NVIDIA H200", DType::F16, Some(Tier::RegisterBlocked)).unwrap();
    assert!(forced.f16_products());
    // The caller's layout is the planner's choice of layout only.
    let layout = BlockedLayout {
        row_lanes: 8,
        key_lanes: 8,
        rows: 4,
    };
    let info = profile("NVIDIA H200");
    let laid_out =
        ForwardPlan::for_call_with_layout(&info, &shape, DType::F16, None, layout).unwrap();
    assert!(laid_out.f16_products());
    // Turned off, the same plan with f32 tiles.
    let off = nvidia.without_f16_products();
    assert!(!off.f16_products());
    assert_eq!(off.block_m(), nvidia.block_m());
    assert!(off.workgroup_bytes() > nvidia.workgroup_bytes());
    // (The layout is chosen at f32 tile sizes, so it still fits.)
    assert!(off.workgroup_bytes() <= u64::from(info.limits.max_compute_workgroup_storage_size));
    for storage in [DType::F32, DType::BF16] {
        assert!(
            !plan("NVIDIA H200", storage, None).unwrap().f16_products(),
            "{storage:?}"
        );
    }
    for tier in [Tier::Portable, Tier::SubgroupBroadcast] {
        assert!(
            !plan("NVIDIA H200", DType::F16, Some(tier))
                .unwrap()
                .f16_products(),
            "{tier:?}"
        );
    }
    // A call's config over the planner's choice (ForwardPlan::for_config,
    // what Gpu::attention runs): off, forced where not the default, with
    // dropout.
    let config = crate::AttentionConfig::new();
    let for_config = |name: &str, config: &crate::AttentionConfig| {
        ForwardPlan::for_config(&profile(name), &shape, DType::F16, config).unwrap()
    };
    assert!(for_config("NVIDIA H200", &config).f16_products());
    assert!(!for_config("NVIDIA H200", &config.clone().f16_products(false)).f16_products());
    let amd = for_config("AMD", &config.clone().f16_products(true));
    assert!(amd.f16_products() && amd.tier() == Tier::RegisterBlocked);
    assert!(!for_config("AMD", &config).f16_products());
    assert!(for_config("NVIDIA H200", &config.clone().dropout(0.1, 7)).applies_dropout());
    // With matrix units enabled, NVIDIA keeps the register-blocked tier
    // with f16 products (the matrix tier is forced-only on hardware
    // GPUs); forced, it has no f16 products.
    let with_matrices = plan("NVIDIA H200 with", DType::F16, None).unwrap();
    assert_eq!(with_matrices.tier(), Tier::RegisterBlocked);
    assert!(with_matrices.f16_products());
    let coop = plan(
        "NVIDIA H200 with",
        DType::F16,
        Some(Tier::CooperativeMatrix),
    )
    .unwrap();
    assert_eq!(coop.tier(), Tier::CooperativeMatrix);
    assert!(!coop.f16_products());
    // Both round the weights to f16; f32 matrices (Apple) and f32
    // products do not.
    assert!(coop.rounds_weights_to_f16() && with_matrices.rounds_weights_to_f16());
    assert!(!with_matrices.without_f16_products().rounds_weights_to_f16());
    let apple_f32 = plan("Apple M2 with", DType::F32, Some(Tier::CooperativeMatrix)).unwrap();
    assert_eq!(apple_f32.tier(), Tier::CooperativeMatrix);
    assert!(!apple_f32.rounds_weights_to_f16());
    // Unmeasured elsewhere: off, and the CPU adapters keep their tiers.
    for name in ["AMD", "Apple M2", "Intel", "llvmpipe", "WARP"] {
        let default = plan(name, DType::F16, None).unwrap();
        assert!(!default.f16_products(), "{name}");
        if let Ok(blocked) = plan(name, DType::F16, Some(Tier::RegisterBlocked)) {
            assert!(!blocked.f16_products(), "{name}");
        }
    }
}

/// (tier, matrix size, block rows, block keys, invocations) of a forced
/// or default plan, or the reason it is unavailable.
fn coop(
    name: &str,
    head_dim: usize,
    storage: DType,
    tier: Option<Tier>,
) -> std::result::Result<(Tier, u32, u32, u32, u32), String> {
    let shape = AttentionShape::self_attention(1, 1000, 4, head_dim);
    match ForwardPlan::for_call(&profile(name), &shape, storage, tier) {
        Ok(plan) => Ok((
            plan.tier(),
            plan.coop_tiling().map_or(0, |c| c.size),
            plan.block_m(),
            plan.block_n(),
            plan.workgroup_size(),
        )),
        Err(Error::TierUnavailable { reason, .. }) => Err(reason),
        Err(other) => panic!("{name}: {other}"),
    }
}

#[test]
fn cooperative_matrices_where_the_device_multiplies_the_storage_type() {
    use Tier::{CooperativeMatrix, RegisterBlocked};
    let nvidia = "NVIDIA H200 with";
    let apple = "Apple M2 with";
    // NVIDIA: 16x16 f16 matrices into f32; 64 x 64 blocks fit 48 KiB
    // at d=128 (Q and O stay in the subgroups' matrix registers).
    // Offered, but not the default on hardware GPUs (`coop_by_default`).
    let forced = Some(CooperativeMatrix);
    assert_eq!(
        coop(nvidia, 128, DType::F16, forced),
        Ok((CooperativeMatrix, 16, 64, 64, 128))
    );
    assert_eq!(
        coop(nvidia, 64, DType::F16, forced),
        Ok((CooperativeMatrix, 16, 64, 64, 128))
    );
    for head_dim in [64, 128] {
        assert_eq!(
            coop(nvidia, head_dim, DType::F16, None).unwrap().0,
            RegisterBlocked
        );
    }
    // No f32 or bf16 matrices there: the default is register-blocked,
    // and forcing says why.
    for storage in [DType::BF16, DType::F32] {
        assert_eq!(coop(nvidia, 128, storage, None).unwrap().0, RegisterBlocked);
    }
    let why = coop(nvidia, 128, DType::F32, Some(CooperativeMatrix)).unwrap_err();
    assert!(
        why.contains("F32") && why.contains("16x16x16 F16->F32"),
        "{why}"
    );
    let why = coop(nvidia, 128, DType::BF16, Some(CooperativeMatrix)).unwrap_err();
    assert!(why.contains("bf16"), "{why}");
    // Head dims that 16x16 matrices do not tile.
    let why = coop(nvidia, 72, DType::F16, Some(CooperativeMatrix)).unwrap_err();
    assert!(why.contains("72/72") && why.contains("16x16"), "{why}");
    assert_eq!(
        coop(nvidia, 72, DType::F16, None).unwrap().0,
        RegisterBlocked
    );
    // Apple: 8x8 matrices, f32 ones too; four lanes per row. Forced
    // only: on hardware GPUs the tier is not a default until its tests
    // pass there (`coop_by_default`).
    assert_eq!(
        coop(apple, 128, DType::F32, forced),
        Ok((CooperativeMatrix, 8, 32, 32, 128))
    );
    assert_eq!(
        coop(apple, 72, DType::F16, forced).unwrap().0,
        CooperativeMatrix
    );
    for storage in [DType::F32, DType::F16] {
        assert_eq!(coop(apple, 128, storage, None).unwrap().0, RegisterBlocked);
    }
    // A CPU adapter's matrices (lavapipe from Mesa 26.1, 8x8 f16, on
    // which CI runs the kernel) are its default for f16.
    let mut lavapipe = profile("llvmpipe (LLVM 15.0.6, 256 bits)");
    lavapipe.features |=
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::PASSTHROUGH_SHADERS;
    lavapipe.cooperative_matrices = vec![wgpu::CooperativeMatrixProperties {
        m_size: 8,
        n_size: 8,
        k_size: 8,
        ab_type: wgpu::CooperativeScalarType::F16,
        cr_type: wgpu::CooperativeScalarType::F32,
        saturating_accumulation: false,
    }];
    let shape = AttentionShape::self_attention(1, 256, 4, 64);
    let default = ForwardPlan::for_call(&lavapipe, &shape, DType::F16, None).unwrap();
    assert_eq!(default.tier(), CooperativeMatrix);
    // On Vulkan the kernel goes to the driver as the crate's own SPIR-V: a
    // device without passthrough (a caller's) is refused it, and its
    // default moves on to another tier.
    let mut without = lavapipe.clone();
    without.features.remove(wgpu::Features::PASSTHROUGH_SHADERS);
    let why = ForwardPlan::for_call(&without, &shape, DType::F16, Some(CooperativeMatrix))
        .unwrap_err()
        .to_string();
    assert!(why.contains("PASSTHROUGH_SHADERS"), "{why}");
    let default = ForwardPlan::for_call(&without, &shape, DType::F16, None).unwrap();
    assert_ne!(default.tier(), CooperativeMatrix);
    // Without the feature (the default device), or on GL and DX12.
    let why = coop("NVIDIA H200", 128, DType::F16, Some(CooperativeMatrix)).unwrap_err();
    assert!(why.contains("EXPERIMENTAL_COOPERATIVE_MATRIX"), "{why}");
    let why = coop("Intel", 128, DType::F16, Some(CooperativeMatrix)).unwrap_err();
    assert!(why.contains("Dx12"), "{why}");
    // Every layout chosen fits and splits a row's quads evenly.
    for p in all().iter().filter(|p| !p.coop.is_empty()) {
        for head_dim in (16..=256).step_by(16) {
            for storage in [DType::F16, DType::F32] {
                let shape = AttentionShape::self_attention(1, 500, 4, head_dim);
                let info = p.info();
                let Ok(plan) =
                    ForwardPlan::for_call(&info, &shape, storage, Some(CooperativeMatrix))
                else {
                    continue;
                };
                let c = plan.coop_tiling().unwrap();
                assert!(c.workgroup_bytes() <= u64::from(p.workgroup_bytes));
                assert_eq!(c.workgroup_size % c.block_m(), 0);
                assert_eq!((c.block_n() / 4) % c.lanes_per_row(), 0);
                assert_eq!(
                    plan.masked_specialization(),
                    Specialization::FlashCoopMasked(c)
                );
            }
        }
    }
}

/// A caller's cooperative-matrix block: planned as given where it fits,
/// a typed error with the numbers where it does not, and refused beside
/// another tier or a register-blocked layout.
#[test]
fn a_callers_cooperative_matrix_block_is_planned_or_refused_with_the_numbers() {
    use crate::{AttentionConfig, CoopLayout};
    let info = profile("NVIDIA H200 with");
    let shape = AttentionShape::self_attention(1, 1000, 4, 128);
    let plan =
        |config: &AttentionConfig| ForwardPlan::for_config(&info, &shape, DType::F16, config);
    let block = |row_tiles, key_tiles| CoopLayout {
        row_tiles,
        key_tiles,
    };
    // 128 rows x 32 keys: 8 subgroups of 32.
    let wide = plan(&AttentionConfig::new().coop_layout(block(8, 2))).unwrap();
    assert_eq!(wide.tier(), Tier::CooperativeMatrix);
    let tiling = wide.coop_tiling().unwrap();
    assert_eq!(
        (tiling.block_m(), tiling.block_n(), tiling.workgroup_size),
        (128, 32, 256)
    );
    // 128 x 64 needs more than the 48 KiB the adapter has.
    let Err(Error::TierUnavailable { reason, .. }) =
        plan(&AttentionConfig::new().coop_layout(block(8, 4)))
    else {
        panic!("8x4 fits 48 KiB");
    };
    assert!(
        reason.contains("70672") && reason.contains("49152"),
        "{reason}"
    );
    // Outside the kernel's range: 80 keys a tile, no row tiles.
    for (rows, keys) in [(4, 5), (0, 4), (9, 1)] {
        let Err(Error::TierUnavailable { reason, .. }) =
            plan(&AttentionConfig::new().coop_layout(block(rows, keys)))
        else {
            panic!("{rows}x{keys} is outside the kernel's range");
        };
        assert!(reason.contains("range"), "{reason}");
    }
    // Another tier, or a register-blocked layout beside it.
    let both = AttentionConfig::new().coop_layout(block(4, 4));
    for config in [
        both.clone().tier(Tier::RegisterBlocked),
        both.clone().blocked_layout(crate::BlockedLayout {
            row_lanes: 8,
            key_lanes: 8,
            rows: 4,
        }),
    ] {
        assert!(matches!(
            plan(&config),
            Err(Error::UnsupportedCombination { .. })
        ));
    }
    // Forcing the tier itself is fine.
    assert!(plan(&both.tier(Tier::CooperativeMatrix)).is_ok());
}

#[test]
fn decoding_like_gqa_calls_group_a_kv_heads_rows() {
    let info = profile("NVIDIA H200");
    let plan_of = |seq_q: usize, heads_q: usize, heads_kv: usize, tier: Option<Tier>| {
        let shape = AttentionShape {
            batch: 2,
            seq_q,
            seq_kv: 4096,
            heads_q,
            heads_kv,
            head_dim: 128,
            head_dim_v: 128,
        };
        ForwardPlan::for_call(&info, &shape, DType::F32, tier).unwrap()
    };
    // One token of Llama-3.1-70B's heads: 8 KV heads' workgroups, each a
    // block of its 8 query heads (32 rows: 4 queries x 8 heads).
    let step = plan_of(1, 64, 8, None);
    assert!(step.groups_heads());
    assert_eq!(step.workgroups(), [1, 2, 8]);
    assert_eq!(step.without_grouped_rows().workgroups(), [1, 2, 64]);
    assert!(!step.without_grouped_rows().groups_heads());
    // Five queries x 8 heads: 40 pairs, two blocks.
    assert_eq!(plan_of(5, 64, 8, None).workgroups(), [2, 2, 8]);
    // Not for full blocks, plain multi-head calls or per-row tiers.
    assert!(!plan_of(32, 64, 8, None).groups_heads());
    assert!(!plan_of(1, 8, 8, None).groups_heads());
    assert!(!plan_of(1, 64, 8, Some(Tier::SubgroupBroadcast)).groups_heads());
    assert!(!plan_of(1, 64, 8, Some(Tier::Portable)).groups_heads());
}

/// Every default plan, on every profile, storage type, head-dim pair and
/// call shape (long multi-head, GQA prefill, a GQA decoding step), fits
/// its adapter: workgroup memory and invocations within the limits, a
/// subgroup workgroup of the smallest subgroup size, and f16 products only
/// on register-blocked plans of f16 storage.
#[test]
fn default_plans_fit_their_adapter_everywhere() {
    let heads = [(1000, 8, 8), (1000, 32, 8), (1, 64, 8), (5, 8, 1)];
    let dims = [
        (8, 8),
        (64, 64),
        (128, 128),
        (192, 128),
        (256, 256),
        (576, 512),
    ];
    for p in all() {
        let info = p.info();
        for storage in [DType::F32, DType::F16, DType::BF16] {
            for (seq_q, heads_q, heads_kv) in heads {
                for (head_dim, head_dim_v) in dims {
                    let shape = AttentionShape {
                        batch: 2,
                        seq_q,
                        seq_kv: 700,
                        heads_q,
                        heads_kv,
                        head_dim,
                        head_dim_v,
                    };
                    let what = format!("{} {storage:?} {shape:?}", p.name);
                    let plan = match ForwardPlan::for_call(&info, &shape, storage, None) {
                        Ok(plan) => plan,
                        // Only head dims whose smallest tile outgrows the
                        // adapter's workgroup memory refuse.
                        Err(Error::WorkgroupMemory { limit, .. }) => {
                            assert_eq!(limit, p.workgroup_bytes, "{what}");
                            continue;
                        }
                        Err(other) => panic!("{what}: {other}"),
                    };
                    assert!(
                        plan.workgroup_bytes() <= u64::from(p.workgroup_bytes),
                        "{what}"
                    );
                    assert!(plan.workgroup_size() <= p.invocations, "{what}");
                    if plan.tier() == Tier::SubgroupBroadcast {
                        assert_eq!(
                            Some(plan.workgroup_size()),
                            p.subgroups.map(|s| s.0),
                            "{what}"
                        );
                    }
                    if plan.f16_products() {
                        assert!(
                            plan.tier() == Tier::RegisterBlocked && storage == DType::F16,
                            "{what}"
                        );
                    }
                    assert!(plan.workgroups().iter().all(|&n| n >= 1), "{what}");
                }
            }
        }
    }
}

#[test]
fn register_blocked_keys_per_dispatch_respect_the_loop_cap() {
    let info = profile("llvmpipe (LLVM");
    let long = AttentionShape {
        seq_q: 64,
        ..AttentionShape::self_attention(1, 1 << 20, 1, 128)
    };
    let plan =
        ForwardPlan::for_call(&info, &long, DType::F32, Some(Tier::RegisterBlocked)).unwrap();
    let keys = plan.keys_per_dispatch().expect("llvmpipe caps loops");
    assert!(plan.loop_trips(keys) <= 65_535);
    assert!(plan.loop_trips(keys + 1) > 65_535);
    assert!(plan.key_chunks(1 << 20) >= 2);
}

#[test]
fn wide_and_uneven_head_dims_plan_where_their_tiles_fit() {
    // DeepSeek MLA's 576/512: the smallest tile (4 keys) needs 17 KiB,
    // more than a 16 KiB adapter has; its subgroup tier stages nothing and
    // runs, without subgroups the call is a typed error.
    let mla = AttentionShape::self_attention(1, 1024, 16, 576).with_head_dim_v(512);
    let small = ForwardPlan::new(&profile("Adreno"), &mla).unwrap();
    assert_eq!(small.tier(), Tier::SubgroupBroadcast);
    assert_eq!(small.workgroup_bytes(), 0);
    assert_eq!(small.block_n(), MIN_BLOCK_N);
    let mut info = profile("Adreno");
    info.features.remove(wgpu::Features::SUBGROUP);
    assert!(matches!(
        ForwardPlan::new(&info, &mla),
        Err(Error::WorkgroupMemory {
            head_dim: 576,
            head_dim_v: 512,
            needed: 17408,
            limit: 16384
        })
    ));
    assert!(matches!(
        ForwardPlan::for_call(&profile("Adreno"), &mla, DType::F32, Some(Tier::Portable)),
        Err(Error::WorkgroupMemory { needed: 17408, .. })
    ));
    let cpu = ForwardPlan::new(&profile("llvmpipe (LLVM"), &mla).unwrap();
    assert_eq!(cpu.rows_per_invocation(), 2, "the widest heads hold 2 rows");
    let gpu = ForwardPlan::new(&profile("NVIDIA"), &mla).unwrap();
    assert!(gpu.workgroup_bytes() <= u64::from(48 * KIB));
    // Values of another width size the tile from both.
    let prefill = AttentionShape::self_attention(1, 1024, 16, 192).with_head_dim_v(128);
    let plan = ForwardPlan::for_call(
        &profile("Adreno"),
        &prefill,
        DType::F32,
        Some(Tier::Portable),
    )
    .unwrap();
    assert_eq!(
        plan.block_n(),
        8,
        "8 keys of 192 + 128 f32s fit 16 KiB, 16 do not"
    );
}

#[test]
fn limits_too_small_are_typed_errors_with_the_numbers() {
    let shape = AttentionShape::self_attention(1, 512, 4, 256);
    let mut info = profile("Adreno");
    info.limits.max_compute_workgroup_storage_size = 4 * KIB;
    // (With subgroups, the subgroup tier needs no workgroup memory.)
    assert_eq!(
        ForwardPlan::new(&info, &shape).unwrap().workgroup_bytes(),
        0
    );
    info.features.remove(wgpu::Features::SUBGROUP);
    assert!(matches!(
        ForwardPlan::new(&info, &shape),
        Err(Error::WorkgroupMemory {
            head_dim: 256,
            head_dim_v: 256,
            needed: 8192,
            limit: 4096
        })
    ));
    // Few invocations: the portable workgroup shrinks to fit.
    let mut info = profile("Adreno");
    info.features.remove(wgpu::Features::SUBGROUP);
    info.limits.max_compute_invocations_per_workgroup = 48;
    let plan = ForwardPlan::new(&info, &shape).unwrap();
    assert_eq!(plan.workgroup_size(), 32);
    // The subgroup tier needs a whole subgroup per workgroup.
    let mut info = profile("Adreno");
    info.limits.max_compute_invocations_per_workgroup = 32;
    assert!(matches!(
        ForwardPlan::new(&info, &shape),
        Err(Error::WorkgroupInvocations {
            needed: 64,
            limit: 32
        })
    ));
    // Too many query tiles for one dispatch dimension.
    let mut info = profile("NVIDIA");
    let d64 = AttentionShape::self_attention(1, 512, 1, 64);
    let block_m = ForwardPlan::new(&info, &d64).unwrap().block_m() as usize;
    info.limits.max_compute_workgroups_per_dimension = 100;
    let long = AttentionShape::self_attention(1, block_m * 101, 1, 64);
    assert!(matches!(
        ForwardPlan::new(&info, &long),
        Err(Error::DispatchTooLarge {
            groups: 101,
            limit: 100,
            ..
        })
    ));
}

#[test]
fn only_llvmpipe_caps_loops() {
    let long = AttentionShape {
        seq_q: 64,
        ..AttentionShape::self_attention(1, 1 << 20, 1, 64)
    };
    for p in all() {
        let info = p.info();
        let plan = ForwardPlan::new(&info, &long).unwrap_or_else(|e| panic!("{}: {e}", p.name));
        let spec = plan.specialization();
        if p.name.starts_with("llvmpipe") {
            // A million keys run in chunks that each fit the budget.
            assert_eq!(info.loop_budget(), Some(65_535));
            let keys = plan
                .keys_per_dispatch()
                .expect("a capped adapter limits keys");
            assert!(spec.loop_trips(keys).unwrap() <= 65_535, "{}", p.name);
            assert!(spec.loop_trips(keys + 1).unwrap() > 65_535, "{}", p.name);
            assert_eq!(plan.key_chunks(1 << 20), (1u64 << 20).div_ceil(keys));
            assert!(plan.key_chunks(1 << 20) >= 2);
        } else {
            assert_eq!(info.loop_budget(), None);
            assert_eq!(plan.keys_per_dispatch(), None, "{}", p.name);
            assert_eq!(plan.key_chunks(1 << 20), 1);
        }
    }
}

#[test]
fn a_ragged_decode_dispatches_only_its_sequences_row_tiles() {
    // Three sequences of 40, 0 and 3 query tokens; 8 query heads per KV
    // head.
    let cache = CacheShape {
        batch: 3,
        heads_kv: 2,
        head_dim: 128,
        head_dim_v: 128,
        longest: 4096,
        segments: 1,
        dtype: crate::KvDType::F32,
    };
    let options = DecodeOptions::default();
    let counts = [40, 0, 3];
    for p in all() {
        let info = p.info();
        let ragged = DecodePlan::for_queries(
            &info,
            &cache,
            QueryTokens::PerSequence(&counts),
            16,
            &options,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.name));
        let uniform = DecodePlan::for_call(&info, &cache, 40, 16, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
        let tiles = |n: u32| (n * 8).div_ceil(ragged.rows_per_workgroup);
        assert_eq!(ragged.row_tiles, uniform.row_tiles, "{}", p.name);
        assert_eq!(ragged.row_tiles, tiles(40), "{}", p.name);
        assert_eq!(ragged.total_row_tiles, tiles(40) + tiles(3), "{}", p.name);
        assert_eq!(uniform.total_row_tiles, 3 * tiles(40), "{}", p.name);
    }
    // Only the tiles launched count against the grid's limit: 70,000
    // sequences of which one has query tokens fit where 70,000 with as
    // many each would not.
    let many = CacheShape {
        batch: 70_000,
        longest: 256,
        ..cache
    };
    let mut counts = vec![0; many.batch];
    counts[0] = 1;
    let info = profile("NVIDIA");
    let ragged = DecodePlan::for_queries(
        &info,
        &many,
        QueryTokens::PerSequence(&counts),
        16,
        &options,
    )
    .expect("one sequence's tiles fit");
    assert_eq!(ragged.total_row_tiles, 1);
    let err = DecodePlan::for_call(&info, &many, 1, 16, &options).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DispatchTooLarge {
                axis: "row tiles of every sequence",
                groups: 70_000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn decode_splits_fill_the_adapter_and_respect_the_loop_cap() {
    // Llama-3.1-70B heads, one token, 32K cache.
    let cache = CacheShape {
        batch: 1,
        heads_kv: 8,
        head_dim: 128,
        head_dim_v: 128,
        longest: 32 * 1024,
        segments: 2,
        dtype: crate::KvDType::F32,
    };
    let options = DecodeOptions::default();
    for p in all() {
        let info = p.info();
        let plan = DecodePlan::for_call(&info, &cache, 1, 64, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
        assert_eq!(plan.segments, 2);
        assert_eq!(plan.slots, plan.splits * 2);
        assert!(u64::from(plan.splits) * u64::from(plan.split_keys) >= 32 * 1024);
        if let Some(budget) = info.loop_budget() {
            assert!(plan.loop_trips() <= budget, "{}: {plan:?}", p.name);
        }
        let workgroups = plan.splits as usize * plan.total_row_tiles as usize * 8;
        if p.device_type == wgpu::DeviceType::Cpu {
            // 4 workgroups per host thread, unless the loop cap asks
            // for more.
            assert!(workgroups >= 8, "{}: {plan:?}", p.name);
        } else {
            // Up to ~2048 workgroups on a GPU (here 32K keys at 256 or
            // more each stop at 1024).
            assert_eq!(workgroups, 1024, "{}: {plan:?}", p.name);
            assert!(plan.split_keys >= 256, "{}: {plan:?}", p.name);
        }
    }
    let forced = DecodeOptions::default().kv_splits(0);
    assert!(matches!(
        DecodePlan::for_call(&profile("NVIDIA"), &cache, 1, 64, &forced),
        Err(Error::KvSplits(0))
    ));
}

/// A cache shape given by hand is checked as a call's would be: typed
/// errors, not a division by zero or a wrapped row count.
#[test]
fn decode_plans_of_bad_cache_shapes_are_typed_errors() {
    let info = profile("NVIDIA H200");
    let good = crate::CacheShape {
        batch: 1,
        heads_kv: 8,
        head_dim: 128,
        head_dim_v: 128,
        longest: 1024,
        segments: 1,
        dtype: crate::KvDType::F32,
    };
    let options = DecodeOptions::default();
    let plan = |cache: &crate::CacheShape, seq_q, heads_q| {
        DecodePlan::for_call(&info, cache, seq_q, heads_q, &options)
    };
    assert!(plan(&good, 1, 64).is_ok());
    let no_heads = crate::CacheShape {
        heads_kv: 0,
        ..good
    };
    assert!(matches!(
        plan(&no_heads, 1, 64),
        Err(Error::ZeroDimension {
            tensor: "cache heads_kv",
            ..
        })
    ));
    assert!(matches!(
        plan(&good, 0, 64),
        Err(Error::ZeroDimension {
            tensor: "seq_q",
            ..
        })
    ));
    assert!(matches!(
        plan(&good, 1, 60),
        Err(Error::HeadsNotDivisible {
            heads_q: 60,
            heads_kv: 8
        })
    ));
    let odd_dim = crate::CacheShape {
        head_dim: 12,
        ..good
    };
    assert!(matches!(
        plan(&odd_dim, 1, 64),
        Err(Error::HeadDimUnsupported { got: 12, .. })
    ));
    assert!(matches!(
        plan(&good, usize::MAX / 4, 64),
        Err(Error::DispatchTooLarge { .. })
    ));
}

#[test]
fn decode_lanes_default_to_keys_on_cpu_adapters_and_refuse_the_portable_tier() {
    let cache = |head_dim, head_dim_v, heads_kv| CacheShape {
        batch: 1,
        heads_kv,
        head_dim,
        head_dim_v,
        longest: 4096,
        segments: 1,
        dtype: crate::KvDType::F16,
    };
    let llama = cache(128, 128, 8);
    let mla = cache(576, 512, 1);
    let options = DecodeOptions::default();
    for p in all() {
        let info = p.info();
        let plan = |cache: &CacheShape, heads_q, options: &DecodeOptions| {
            DecodePlan::for_call(&info, cache, 1, heads_q, options)
        };
        let lanes = plan(&llama, 64, &options).unwrap().lanes();
        let subgroups = subgroup_broadcast_missing(&info).is_none();
        let want = match (subgroups, p.device_type) {
            (false, _) => None,
            (true, wgpu::DeviceType::Cpu) => Some(DecodeLanes::Keys),
            (true, _) => Some(DecodeLanes::HeadDim),
        };
        assert_eq!(lanes, want, "{}", p.name);
        // Llama-3.1-405B's 16 rows at d=128 (4096 floats) take two 8-row
        // tiles over keys on CPU adapters; d=256's would be 4-row tiles,
        // so its 8 rows keep lanes over the head dim there.
        let all_heads = plan(&llama, 128, &options).unwrap();
        let wide = plan(&cache(256, 256, 8), 64, &options).unwrap();
        assert_eq!(all_heads.lanes(), want, "{}", p.name);
        if want == Some(DecodeLanes::Keys) {
            assert_eq!(
                (all_heads.rows_per_workgroup, all_heads.row_tiles),
                (8, 2),
                "{}",
                p.name
            );
            assert_eq!(wide.lanes(), Some(DecodeLanes::HeadDim), "{}", p.name);
        } else {
            assert_eq!(wide.lanes(), want, "{}", p.name);
        }
        // MLA's 16 rows x 1088 floats per lane keep the head-dim
        // layout, and forcing lanes over keys there is refused.
        let mla_lanes = plan(&mla, 128, &options).unwrap().lanes();
        assert_eq!(mla_lanes, want.map(|_| DecodeLanes::HeadDim), "{}", p.name);
        if subgroups {
            let forced = plan(&mla, 128, &options.clone().lanes(DecodeLanes::Keys));
            // CPU adapters refuse 8-row tiles (their fewest); a GPU's
            // registers refuse even one row.
            let (rows, floats) = if p.device_type == wgpu::DeviceType::Cpu {
                (8, 8704)
            } else {
                (1, 1088)
            };
            assert!(
                matches!(
                    forced,
                    Err(Error::KeyLanesState { rows: r, floats: f, .. }) if r == rows && f == floats
                ),
                "{}: {forced:?}",
                p.name
            );
            // Forced on a GPU, lanes over keys hold one of the group's 8
            // Llama rows (256 floats) per workgroup: 8 row tiles.
            let keys = plan(&llama, 64, &options.clone().lanes(DecodeLanes::Keys)).unwrap();
            let tiles = if p.device_type == wgpu::DeviceType::Cpu {
                1
            } else {
                8
            };
            assert_eq!(keys.row_tiles, tiles, "{}", p.name);
        }
        for forced in [DecodeLanes::Keys, DecodeLanes::HeadDim] {
            let got = plan(&llama, 64, &options.clone().lanes(forced));
            if subgroups {
                assert_eq!(got.unwrap().lanes(), Some(forced), "{}", p.name);
            } else {
                assert!(
                    matches!(
                        got,
                        Err(Error::TierUnavailable {
                            tier: Tier::SubgroupBroadcast,
                            ..
                        })
                    ),
                    "{}: {got:?}",
                    p.name
                );
            }
            let mut portable = options.clone().lanes(forced);
            portable.config.tier = Some(Tier::Portable);
            assert!(
                matches!(
                    plan(&llama, 64, &portable),
                    Err(Error::UnsupportedCombination { .. })
                ),
                "{}",
                p.name
            );
        }
    }
}

#[test]
fn a_cpu_adapter_on_a_recent_llvm_decodes_a_16_row_group_in_one_workgroup() {
    let cache = |head_dim, heads_kv| CacheShape {
        batch: 1,
        heads_kv,
        head_dim,
        head_dim_v: head_dim,
        longest: 32768,
        segments: 1,
        dtype: crate::KvDType::F32,
    };
    let lavapipe = all()
        .into_iter()
        .find(|p| p.device_type == wgpu::DeviceType::Cpu && p.backend == wgpu::Backend::Vulkan)
        .expect("a lavapipe profile");
    let options = DecodeOptions::default();
    for (llvm, wide_tiles) in [
        ("15.0.6", false),
        ("18.1.8", false),
        ("19.1.7", true),
        ("21.0.0", true),
    ] {
        let mut info = lavapipe.info();
        info.adapter.name = format!("llvmpipe (LLVM {llvm}, 256 bits)");
        assert_eq!(
            info.llvm_major(),
            llvm.split('.').next().unwrap().parse().ok()
        );
        let plan = |cache: &CacheShape, heads_q, options: &DecodeOptions| {
            DecodePlan::for_call(&info, cache, 1, heads_q, options)
        };
        // Llama-3.1-405B's 16 rows at d=128: one workgroup reading the
        // cache once where LLVM compiles it quickly, two 8-row tiles
        // elsewhere.
        let group_405b = plan(&cache(128, 8), 128, &options).unwrap();
        let want = if wide_tiles { (16, 1) } else { (8, 2) };
        assert_eq!(group_405b.lanes(), Some(DecodeLanes::Keys), "LLVM {llvm}");
        assert_eq!(
            (group_405b.rows_per_workgroup, group_405b.row_tiles),
            want,
            "LLVM {llvm}"
        );
        // Llama-3.1-70B's 8 rows are one workgroup either way, and d=256's 8
        // rows keep lanes over the head dim (faster there on LLVM 19 too).
        let group_70b = plan(&cache(128, 8), 64, &options).unwrap();
        assert_eq!(
            (group_70b.rows_per_workgroup, group_70b.row_tiles),
            (8, 1),
            "LLVM {llvm}"
        );
        let wide = plan(&cache(256, 8), 64, &options).unwrap();
        assert_eq!(wide.lanes(), Some(DecodeLanes::HeadDim), "LLVM {llvm}");
        // Forced lanes over keys at d=256: 8 rows (4096 floats) fit the
        // wider tiles, and are refused at the narrower bar.
        let forced = plan(
            &cache(256, 8),
            64,
            &options.clone().lanes(DecodeLanes::Keys),
        );
        if wide_tiles {
            assert_eq!(forced.unwrap().rows_per_workgroup, 8, "LLVM {llvm}");
        } else {
            assert!(
                matches!(
                    forced,
                    Err(Error::KeyLanesState {
                        rows: 8,
                        floats: 4096,
                        limit: 2048,
                        ..
                    })
                ),
                "LLVM {llvm}: {forced:?}"
            );
        }
    }
    // Without an LLVM in the adapter's name or driver info: none.
    let mut other = lavapipe.info();
    other.adapter.name = "SwiftShader Device (Subzero)".into();
    assert_eq!(other.llvm_major(), None);
    other.adapter.driver_info = "Mesa 26.1.6 (LLVM 19.1.7)".into();
    assert_eq!(other.llvm_major(), Some(19));
}

/// On GPUs, lanes over the head dim hold no more rows than NAK kept in
/// registers (`GPU_HEAD_DIM_LANE_REGISTERS`): 8 rows at head dims up to
/// 256, 2 at MLA's 576/512 latent (it spilled 1,854 instructions at the 16
/// rows it had before); the rest of a GQA group takes more row tiles. CPU
/// adapters keep every row of the group in one workgroup.
#[test]
fn decode_rows_per_workgroup_fit_a_gpus_registers() {
    let cache = |head_dim, head_dim_v, heads_kv| CacheShape {
        batch: 1,
        heads_kv,
        head_dim,
        head_dim_v,
        longest: 32768,
        segments: 1,
        dtype: crate::KvDType::F16,
    };
    let head_dim_lanes = DecodeOptions::default().lanes(DecodeLanes::HeadDim);
    let head_dim_plan = |info: &GpuInfo, cache: &CacheShape, heads_q| {
        let plan = DecodePlan::for_call(info, cache, 1, heads_q, &head_dim_lanes).unwrap();
        assert_eq!(plan.lanes(), Some(DecodeLanes::HeadDim));
        plan
    };
    // (K and V head dims, KV heads, query heads, row tiles on the H200)
    let nvidia = [
        ((128, 128), 8, 64, 1),
        ((128, 128), 8, 128, 2),
        ((256, 256), 1, 16, 2),
        ((192, 128), 1, 16, 2),
        ((512, 512), 1, 16, 8),
        ((576, 512), 1, 128, 64),
    ];
    let h200 = profile("NVIDIA H200");
    for ((head_dim, head_dim_v), heads_kv, heads_q, want) in nvidia {
        let got = head_dim_plan(&h200, &cache(head_dim, head_dim_v, heads_kv), heads_q).row_tiles;
        assert_eq!(
            got, want,
            "d={head_dim}/{head_dim_v}, {heads_q}/{heads_kv} heads"
        );
    }
    for p in all() {
        let info = p.info();
        if subgroup_broadcast_missing(&info).is_some() {
            continue;
        }
        let lanes = info.adapter.subgroup_min_size;
        for ((head_dim, head_dim_v), heads_kv, heads_q, _) in nvidia {
            let cache = cache(head_dim, head_dim_v, heads_kv);
            let group = (heads_q / heads_kv) as u32;
            let plan = head_dim_plan(&info, &cache, heads_q);
            let rows = plan.rows_per_workgroup;
            assert_eq!(plan.row_tiles, group.div_ceil(rows), "{}", p.name);
            if p.device_type == wgpu::DeviceType::Cpu {
                assert_eq!(rows, group.min(16), "{}: d={head_dim}", p.name);
                continue;
            }
            let dims = (head_dim as u32, head_dim_v as u32);
            let held = head_dim_lane_registers(lanes, dims, rows);
            // Either the rows fit, or one row is all a workgroup holds.
            assert!(
                held <= GPU_HEAD_DIM_LANE_REGISTERS || rows == 1,
                "{}: d={head_dim}/{head_dim_v}, {rows} rows hold {held} registers",
                p.name
            );
            // And twice the rows would not have fitted.
            if rows < group.min(16) {
                let more = head_dim_lane_registers(lanes, dims, 2 * rows);
                assert!(
                    more > GPU_HEAD_DIM_LANE_REGISTERS,
                    "{}: d={head_dim}, {rows} rows",
                    p.name
                );
            }
        }
    }
}

/// Key tiles hold their K/V tiles and queries in workgroup memory: forced
/// on Llama-3.1-70B heads they fit every adapter with subgroups and 32 KiB
/// (the H200 all 8 rows of a GQA group in one workgroup), and where they do
/// not fit (MLA's 576-wide latent, a 16 KiB adapter) the call is refused
/// with the bytes the smallest tile needs.
#[test]
fn key_tiles_fit_workgroup_memory_or_are_refused() {
    let cache = |head_dim, head_dim_v, heads_kv| CacheShape {
        batch: 1,
        heads_kv,
        head_dim,
        head_dim_v,
        longest: 4096,
        segments: 1,
        dtype: crate::KvDType::Int8,
    };
    let llama = cache(128, 128, 8);
    let mla = cache(576, 512, 1);
    let tiles = DecodeOptions::default().lanes(DecodeLanes::KeyTiles);
    let mut checked = 0;
    for p in all() {
        let info = p.info();
        if subgroup_broadcast_missing(&info).is_some() {
            continue;
        }
        let memory = info.limits.max_compute_workgroup_storage_size;
        let lanes = info.adapter.subgroup_min_size;
        for (cache, heads_q) in [(&llama, 64), (&mla, 128)] {
            let got = DecodePlan::for_call(&info, cache, 1, heads_q, &tiles);
            let smallest = key_tile_bytes(lanes, cache.head_dim as u32, cache.head_dim_v as u32, 1);
            if smallest > u64::from(memory) {
                assert!(
                    matches!(
                        got,
                        Err(Error::WorkgroupMemory { needed, limit, .. })
                            if needed == smallest && limit == memory
                    ),
                    "{}: {got:?}",
                    p.name
                );
                continue;
            }
            let plan = got.unwrap();
            assert_eq!(plan.lanes(), Some(DecodeLanes::KeyTiles), "{}", p.name);
            let group = (heads_q / cache.heads_kv) as u32;
            let rows = group.div_ceil(plan.row_tiles);
            let bytes = key_tile_bytes(lanes, cache.head_dim as u32, cache.head_dim_v as u32, rows);
            assert!(bytes <= u64::from(memory), "{}: {bytes} bytes", p.name);
            checked += 1;
        }
        if p.name == "NVIDIA H200" {
            let plan = DecodePlan::for_call(&info, &llama, 1, 64, &tiles).unwrap();
            assert_eq!(plan.row_tiles, 1, "the whole GQA group in one workgroup");
        }
    }
    assert!(checked >= 4, "{checked} adapters ran key tiles");
}

#[test]
fn naive_chunks_fit_one_binding() {
    let shape = AttentionShape::self_attention(2, 4096, 8, 64);
    let info = profile("NVIDIA");
    let plan = NaivePlan::new(&info, &shape).unwrap();
    assert!(plan.score_buffer_bytes() <= info.limits.max_storage_buffer_binding_size);
    assert_eq!(plan.units, 16);
    assert!(plan.chunks() >= 2);
    let huge = AttentionShape::self_attention(1, 8192, 1, 64);
    assert!(matches!(
        NaivePlan::new(&info, &huge),
        Err(Error::ScoresTooLarge { .. })
    ));
}

/// A decoding step over a long key range (Llama-3.1-70B's heads, one
/// token, 32K keys) runs as split-KV decoding on every adapter, with the
/// decode planner's own plan; a prompt's worth of rows, a forced tier and
/// the limits of `for_forward` keep the forward kernels.
#[test]
fn few_query_rows_over_many_keys_run_as_decoding_on_every_adapter() {
    let step = AttentionShape {
        batch: 1,
        seq_q: 1,
        seq_kv: 32768,
        heads_q: 64,
        heads_kv: 8,
        head_dim: 128,
        head_dim_v: 128,
    };
    let plain = crate::AttentionConfig::new();
    for profile in profiles::all() {
        let info = profile.info();
        let name = profile.name;
        let plan = DecodePlan::for_forward(&info, &step, DType::F32, &plain)
            .unwrap_or_else(|| panic!("{name}: the step runs the forward kernels"));
        let cache = CacheShape::of_call(&step, crate::KvDType::F32);
        let decode = DecodePlan::for_call(&info, &cache, 1, 64, &DecodeOptions::new(&plain));
        assert_eq!(
            Some(plan),
            decode.ok(),
            "{name}: not the decode planner's plan"
        );
        for (what, shape) in [
            (
                "a prompt",
                AttentionShape {
                    seq_q: 2048,
                    ..step
                },
            ),
            (
                "129 rows a KV head",
                AttentionShape {
                    seq_q: 129,
                    heads_q: 8,
                    ..step
                },
            ),
            (
                "240 keys",
                AttentionShape {
                    seq_kv: 240,
                    ..step
                },
            ),
            (
                "1030 keys",
                AttentionShape {
                    seq_kv: 1030,
                    ..step
                },
            ),
            (
                "K and V past one binding",
                AttentionShape {
                    seq_kv: 1 << 22,
                    ..step
                },
            ),
        ] {
            assert_eq!(
                DecodePlan::for_forward(&info, &shape, DType::F32, &plain),
                None,
                "{name}: {what}"
            );
        }
        // 32 rows (four tokens) and 128 (sixteen, the CPU bound): decoding
        // on CPU adapters only.
        for seq_q in [4, 16] {
            let tokens = AttentionShape { seq_q, ..step };
            assert_eq!(
                DecodePlan::for_forward(&info, &tokens, DType::F32, &plain).is_some(),
                super::decode::decodes_as_cpu(&info),
                "{name}: {seq_q} tokens"
            );
        }
        let forced = plain.clone().tier(Tier::Portable);
        assert_eq!(
            DecodePlan::for_forward(&info, &step, DType::F32, &forced),
            None,
            "{name}: a forced tier"
        );
    }
}

/// The other way: a decode call whose decode plan takes 33 row tiles per
/// KV head (Llama-3.1-70B's heads over 4K cached tokens, f32 cache) runs
/// as the forward kernels on every adapter, with the forward planner's
/// plan, which does not send it back to decoding; 32 row tiles, 16-bit
/// queries, forced options, a copy past one binding and a latent cache
/// keep the decode kernel, and so do int8 caches on CPU adapters, and
/// 16-bit ones there where the decode kernel's row tiles hold 16 rows
/// (lavapipe on LLVM 19).
#[test]
fn many_query_rows_over_a_cache_run_as_the_forward_on_every_adapter() {
    let cache = CacheShape {
        batch: 1,
        heads_kv: 8,
        head_dim: 128,
        head_dim_v: 128,
        longest: 4096,
        segments: 1,
        dtype: crate::KvDType::F32,
    };
    let (heads_q, group) = (64, 8);
    let plain = DecodeOptions::new(&crate::AttentionConfig::new().causal(true));
    for profile in profiles::all() {
        let info = profile.info();
        let name = profile.name;
        let tile = DecodePlan::for_call(&info, &cache, 1024, heads_q, &plain)
            .unwrap()
            .rows_per_workgroup as usize;
        let seq_q = (33 * tile).div_ceil(group);
        let plan = DecodePlan::as_forward(&info, &cache, seq_q, heads_q, DType::F32, &plain)
            .unwrap_or_else(|| panic!("{name}: 33 row tiles keep the decode kernel"));
        let shape = AttentionShape {
            batch: 1,
            seq_q,
            seq_kv: 4096,
            heads_q,
            heads_kv: 8,
            head_dim: 128,
            head_dim_v: 128,
        };
        let forward = ForwardPlan::for_config(&info, &shape, DType::F32, &plain.config);
        assert_eq!(Some(plan), forward.ok(), "{name}: not the forward plan");
        assert_eq!(
            DecodePlan::for_forward(&info, &shape, DType::F32, &plain.config),
            None,
            "{name}: the forward would send it back"
        );
        let cpu = super::decode::decodes_as_cpu(&info);
        // 16-bit caches take the route on CPU adapters only in row tiles
        // of at most 8 rows (lavapipe on LLVM 15, not SwiftShader's 64).
        let half_routed = !cpu || tile <= 8;
        for (dtype, routed) in [
            (crate::KvDType::F16, half_routed),
            (crate::KvDType::BF16, half_routed),
            (crate::KvDType::Int8, !cpu),
            (crate::KvDType::Fp8, !cpu),
        ] {
            let typed = CacheShape { dtype, ..cache };
            assert_eq!(
                DecodePlan::as_forward(&info, &typed, seq_q, heads_q, DType::F32, &plain).is_some(),
                routed,
                "{name}: a {dtype:?} cache"
            );
        }
        if cpu && profile.backend == wgpu::Backend::Vulkan {
            // LLVM 19's lavapipe decodes 16-row tiles: 16-bit caches keep
            // the decode kernel there (at as many row tiles), f32 does not.
            let mut recent = info.clone();
            recent.adapter.name = "llvmpipe (LLVM 19.1.7, 256 bits)".to_string();
            let wide_tile = DecodePlan::for_call(&recent, &cache, 1024, heads_q, &plain)
                .unwrap()
                .rows_per_workgroup as usize;
            assert_eq!(wide_tile, 16, "{name} on LLVM 19");
            let seq_q = (33 * wide_tile).div_ceil(group);
            for (dtype, routed) in [
                (crate::KvDType::F32, true),
                (crate::KvDType::F16, false),
                (crate::KvDType::BF16, false),
                (crate::KvDType::Int8, false),
                (crate::KvDType::Fp8, false),
            ] {
                let typed = CacheShape { dtype, ..cache };
                let plan =
                    DecodePlan::as_forward(&recent, &typed, seq_q, heads_q, DType::F32, &plain);
                assert_eq!(
                    plan.is_some(),
                    routed,
                    "{name} on LLVM 19: a {dtype:?} cache"
                );
            }
        }
        let past_binding = CacheShape {
            longest: 1 << 22,
            ..cache
        };
        let latent = CacheShape {
            heads_kv: 1,
            head_dim: 576,
            head_dim_v: 512,
            ..cache
        };
        let tiles_32 = 32 * tile / group;
        for (what, cache, seq_q, q_dtype, options) in [
            ("32 row tiles", cache, tiles_32, DType::F32, plain.clone()),
            ("f16 queries", cache, seq_q, DType::F16, plain.clone()),
            (
                "forced lanes",
                cache,
                seq_q,
                DType::F32,
                plain.clone().lanes(DecodeLanes::HeadDim),
            ),
            (
                "forced splits",
                cache,
                seq_q,
                DType::F32,
                plain.clone().kv_splits(4),
            ),
            (
                "a copy past one binding",
                past_binding,
                seq_q,
                DType::F32,
                plain.clone(),
            ),
            ("a latent cache", latent, seq_q, DType::F32, plain.clone()),
        ] {
            assert_eq!(
                DecodePlan::as_forward(&info, &cache, seq_q, heads_q, q_dtype, &options),
                None,
                "{name}: {what}"
            );
        }
    }
}
