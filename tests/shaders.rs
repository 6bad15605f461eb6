//! Every shader, in every specialization the crate ships, parses and
//! validates with naga and translates to SPIR-V, MSL, HLSL and GLSL, on any
//! machine, adapter or not. Errors are printed with source spans.

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use wgpu_flash_attn::params::{
    AttentionParams, CombineParams, DecodeParams, MaskParams, RopeParams, TensorStrides,
};
use wgpu_flash_attn::shaders::{
    AttentionTiling, Kernel, NaivePass, Specialization, largest_block_n,
};
use wgpu_flash_attn::{DType, ForwardPlan, is_supported_head_dim};

/// Workgroup memory of the smallest adapters WebGPU allows (16 KiB) and of
/// lavapipe and most GPUs (32 KiB).
const WORKGROUP_LIMITS: [u64; 2] = [16 * 1024, 32 * 1024];

/// The tile sizes the planner picks for `head_dim` under those limits.
fn planned_block_ns(head_dim: u32) -> Vec<u32> {
    let mut picks: Vec<u32> = WORKGROUP_LIMITS
        .iter()
        .filter_map(|&limit| largest_block_n(head_dim, limit))
        .collect();
    picks.dedup();
    picks
}

fn shipped_specializations() -> Vec<Specialization> {
    let mut specs = Vec::new();
    for head_dim in (8..=256u32).filter(|&d| is_supported_head_dim(d as usize)) {
        // Hardware-GPU tiling (64 invocations, 1 row, loops kept) and the
        // CPU-adapter tiling (8 invocations, the planner's rows, unrolled;
        // K/V through workgroup memory or subgroup broadcasts).
        let cpu_rows = ForwardPlan::cpu_rows(head_dim);
        let tilings = [
            (64, 1, false, false),
            (8, cpu_rows, true, false),
            (8, cpu_rows, true, true),
        ];
        // Half-precision storage changes only loads and stores: a few head
        // dims cover it.
        let storages: &[DType] = if [8, 64, 128, 256].contains(&head_dim) {
            &[DType::F32, DType::F16, DType::BF16]
        } else {
            &[DType::F32]
        };
        for block_n in planned_block_ns(head_dim) {
            for &storage in storages {
                for (workgroup_size, rows, unroll, subgroup_kv) in tilings {
                    let tiling = AttentionTiling {
                        head_dim,
                        block_n,
                        workgroup_size,
                        rows,
                        unroll,
                        subgroup_kv,
                        storage,
                    };
                    specs.push(Specialization::FlashForward(tiling));
                    // The naive baseline runs with the flash kernel's tiling.
                    specs.extend(NaivePass::ALL.map(|pass| Specialization::Naive { pass, tiling }));
                }
            }
        }
    }
    // The subgroup tier on hardware GPUs: one subgroup of the adapter's
    // smallest size, one row per lane, unrolled (constant broadcast lanes),
    // at every subgroup size it is offered for; the head dims include sizes
    // that do not divide the four keys' vec4s (40 over 64 or 128 lanes, 136
    // over 16).
    let hardware_subgroup = [4, 16, 32, 64, 128]
        .into_iter()
        .flat_map(|size| [(size, 40, DType::F32), (size, 136, DType::F32)])
        .chain([(32, 64, DType::F16), (32, 256, DType::BF16)]);
    for (workgroup_size, head_dim, storage) in hardware_subgroup {
        let tiling = AttentionTiling {
            head_dim,
            block_n: planned_block_ns(head_dim)[0],
            workgroup_size,
            rows: 1,
            unroll: true,
            subgroup_kv: true,
            storage,
        };
        specs.push(Specialization::FlashForward(tiling));
        specs.extend(NaivePass::ALL.map(|pass| Specialization::Naive { pass, tiling }));
    }
    // Decoding: the CPU tiling (8 lanes, 1 to 16 rows each, unrolled) and
    // the GPU one (4 to 64 lanes, one row each); tiles sized with room for
    // the decode kernel's flags.
    for head_dim in [8, 64, 128, 256] {
        let block_n = planned_block_ns(head_dim)[0];
        let cpu_rows = ForwardPlan::cpu_rows(head_dim);
        let cpu = [1, 2, 4, 8, 16]
            .into_iter()
            .filter(|&rows| rows <= cpu_rows)
            .map(|rows| (8, rows, true));
        let gpu = [4, 16, 64].into_iter().map(|size| (size, 1, false));
        for (workgroup_size, rows, unroll) in cpu.chain(gpu) {
            specs.push(Specialization::Decode(AttentionTiling {
                head_dim,
                block_n: block_n.min(32),
                workgroup_size,
                rows,
                unroll,
                subgroup_kv: false,
                storage: DType::F32,
            }));
        }
    }
    // Decoding, subgroup tier: lanes over the head dim at every subgroup
    // size, 1 to 16 rows per workgroup.
    for (workgroup_size, head_dim, rows) in [
        (4, 8, 1),
        (8, 128, 8),
        (16, 40, 16),
        (32, 256, 2),
        (64, 64, 4),
        (128, 136, 1),
    ] {
        specs.push(Specialization::Decode(AttentionTiling {
            head_dim,
            block_n: 4,
            workgroup_size,
            rows,
            unroll: true,
            subgroup_kv: true,
            storage: DType::F32,
        }));
    }
    // Masked forward: the GPU, GL, CPU and subgroup tilings, f32 and f16.
    for (head_dim, workgroup_size, rows, unroll, subgroup_kv, storage) in [
        (64, 64, 1, false, false, DType::F32),
        (128, 64, 1, true, false, DType::F16),
        (64, 8, 16, true, false, DType::F32),
        (32, 8, 16, true, true, DType::F32),
        (256, 32, 1, true, true, DType::BF16),
    ] {
        specs.push(Specialization::FlashMasked(AttentionTiling {
            head_dim,
            block_n: planned_block_ns(head_dim)[0],
            workgroup_size,
            rows,
            unroll,
            subgroup_kv,
            storage,
        }));
    }
    specs.extend([
        Specialization::Combine { workgroup_size: 64 },
        Specialization::Rope { workgroup_size: 64 },
        Specialization::KvAppend { workgroup_size: 64 },
    ]);
    specs
}

fn parse_and_validate(spec: &Specialization) -> (naga::Module, naga::valid::ModuleInfo) {
    let source = spec.source();
    let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| {
        panic!(
            "{}: WGSL parse error\n{}",
            spec.label(),
            e.emit_to_string(&source)
        )
    });
    let mut capabilities = Capabilities::empty();
    if spec.needs_subgroups() {
        capabilities |= Capabilities::SUBGROUP;
    }
    if spec.needs_f16_in_f32() {
        capabilities |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    let info = Validator::new(ValidationFlags::all(), capabilities)
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{}: validation error\n{}",
                spec.label(),
                e.emit_to_string(&source)
            )
        });
    (module, info)
}

#[test]
fn every_kernel_family_is_covered() {
    let specs = shipped_specializations();
    for kernel in Kernel::ALL {
        assert!(
            specs.iter().any(|s| s.kernel() == kernel),
            "{} has no specialization under test",
            kernel.file_name()
        );
    }
}

#[test]
fn shaders_validate_and_translate_to_every_backend() {
    for spec in shipped_specializations() {
        let (module, info) = parse_and_validate(&spec);
        let label = spec.label();
        let entry = spec.kernel().entry_point().to_string();

        spv::write_vec(&module, &info, &spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{label}: SPIR-V: {e}"));

        let msl_pipeline = msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, entry.clone())),
            ..Default::default()
        };
        msl::write_string(&module, &info, &msl::Options::default(), &msl_pipeline)
            .unwrap_or_else(|e| panic!("{label}: MSL: {e}"));

        let hlsl_options = hlsl::Options::default();
        let hlsl_pipeline = hlsl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, entry.clone())),
        };
        let mut hlsl_out = String::new();
        hlsl::Writer::new(&mut hlsl_out, &hlsl_options, &hlsl_pipeline)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{label}: HLSL: {e}"));

        // wgpu's GL backend has no subgroups, so those variants never reach
        // GLSL.
        if spec.needs_subgroups() {
            continue;
        }
        let glsl_options = glsl::Options::default();
        let glsl_pipeline = glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: entry.clone(),
            multiview: None,
        };
        let mut glsl_out = String::new();
        glsl::Writer::new(
            &mut glsl_out,
            &module,
            &info,
            &glsl_options,
            &glsl_pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write())
        .unwrap_or_else(|e| panic!("{label}: GLSL: {e}"));
    }
}

/// The Rust twins of WGSL structs have the sizes naga computes for them.
#[test]
fn param_structs_match_their_wgsl_twins() {
    let spec = Specialization::FlashForward(AttentionTiling {
        head_dim: 64,
        block_n: 32,
        workgroup_size: 64,
        rows: 1,
        unroll: false,
        subgroup_kv: false,
        storage: DType::F32,
    });
    let (module, _) = parse_and_validate(&spec);
    let size_of = |name: &str| {
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, ty)| ty.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("struct {name} not found in the shader"));
        ty.inner.size(module.to_ctx()) as usize
    };
    assert_eq!(size_of("Params"), std::mem::size_of::<AttentionParams>());
    assert_eq!(
        size_of("TensorStrides"),
        std::mem::size_of::<TensorStrides>()
    );
}

/// The decode, merge, RoPE and mask parameter blocks match their twins too.
#[test]
fn decode_param_structs_match_their_wgsl_twins() {
    let decode = Specialization::Decode(AttentionTiling {
        head_dim: 64,
        block_n: 32,
        workgroup_size: 64,
        rows: 1,
        unroll: false,
        subgroup_kv: false,
        storage: DType::F32,
    });
    let twins = [
        (decode, "DecodeParams", std::mem::size_of::<DecodeParams>()),
        (
            Specialization::Combine { workgroup_size: 64 },
            "CombineParams",
            std::mem::size_of::<CombineParams>(),
        ),
        (
            Specialization::KvAppend { workgroup_size: 64 },
            "RopeParams",
            std::mem::size_of::<RopeParams>(),
        ),
        (
            Specialization::FlashMasked(AttentionTiling {
                head_dim: 64,
                block_n: 32,
                workgroup_size: 64,
                rows: 1,
                unroll: false,
                subgroup_kv: false,
                storage: DType::F32,
            }),
            "MaskParams",
            std::mem::size_of::<MaskParams>(),
        ),
    ];
    for (spec, name, rust_size) in twins {
        let (module, _) = parse_and_validate(&spec);
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, ty)| ty.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("struct {name} not found in the shader"));
        assert_eq!(ty.inner.size(module.to_ctx()) as usize, rust_size, "{name}");
    }
}
