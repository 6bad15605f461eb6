//! The host/shader contract, checked with naga instead of kept by hand. For
//! every specialization the crate ships: its WGSL generates, parses,
//! validates and translates to SPIR-V, MSL, HLSL and GLSL (on any machine,
//! adapter or not; errors are printed with source spans), and its resource
//! bindings are exactly the bind group layout the host builds from
//! [`Kernel::bindings`]. Every `#[repr(C)]` block of `src/params.rs` lays out
//! member by member like the WGSL struct its doc comment names.

use std::collections::{BTreeSet, HashMap, HashSet};

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use rayon::prelude::*;
use wgpu::BufferBindingType;

use crate::params::{
    AttentionParams, BackwardParams, BackwardUnit, CombineParams, DecodeParams, DecodeSequence,
    KvGatherParams, LinearParams, MaskParams, RopeParams, SequenceRows, TensorStrides,
    blocked_flags, carry_flags, flags, linear_flags,
};
use crate::pipelines::ELEMENTWISE_WORKGROUP;
use crate::plan::profiles;
use crate::shaders::{
    BackwardPass, DecodeIo, Kernel, LinearPass, NaivePass, ShaderOverrides, Specialization,
};
use crate::{
    AttentionConfig, AttentionShape, BackwardPlan, CacheShape, DType, DecodeLanes, DecodeOptions,
    DecodePlan, ForwardPlan, GpuInfo, KvDType, LinearConfig, LinearPlan, LinearShape, NaivePlan,
    Tier, is_supported_head_dim,
};

// ---------------------------------------------------------------------------
// The specializations under test.

/// Every specialization the planners choose for the adapter profiles of
/// `plan::profiles` (plus each subgroup size WebGPU allows), over every
/// head dim, storage type and tier, for the forward (plain and masked),
/// naive, decode and element-wise kernels: the one list all checks in this
/// module run over, so it cannot drift from what the planners produce.
pub(crate) fn shipped_specializations() -> Vec<Specialization> {
    let mut infos: Vec<GpuInfo> = profiles::all().iter().map(|p| p.info()).collect();
    let nvidia = profiles::all()
        .into_iter()
        .find(|p| p.name.starts_with("NVIDIA"))
        .expect("an NVIDIA profile")
        .info();
    for size in [4, 8, 16, 32, 64, 128] {
        let mut info = nvidia.clone();
        info.adapter.subgroup_min_size = size;
        info.adapter.subgroup_max_size = size;
        infos.push(info);
    }
    // Cooperative matrices emulated (what the tests run on lavapipe).
    let mut emulated = infos[0].clone();
    emulated.cooperative_matrix_emulation = true;
    emulated.cooperative_matrices = crate::gpu::emulated_cooperative_matrices();
    infos.push(emulated);
    let mut specs = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |spec: Specialization| {
        if seen.insert(spec) {
            specs.push(spec);
        }
    };
    let tiers = [
        None,
        Some(Tier::Portable),
        Some(Tier::SubgroupBroadcast),
        Some(Tier::RegisterBlocked),
        Some(Tier::CooperativeMatrix),
    ];
    // Every head dim up to 256, a spread of wider ones, and values of
    // another width both ways (DeepSeek MLA's 192/128 prefill and 576/512
    // decode among them).
    let head_dims: Vec<(usize, usize)> = (8..=256)
        .filter(|&d| is_supported_head_dim(d))
        .map(|d| (d, d))
        .chain([
            (264, 264),
            (320, 320),
            (512, 512),
            (576, 576),
            (192, 128),
            (128, 192),
            (576, 512),
            (8, 576),
            (576, 8),
        ])
        .collect();
    for info in &infos {
        for &(head_dim, head_dim_v) in &head_dims {
            // Half storage changes only loads and stores: a few head dims
            // per tiling class cover it.
            let representative = [
                (8, 8),
                (40, 40),
                (64, 64),
                (128, 128),
                (256, 256),
                (576, 512),
            ]
            .contains(&(head_dim, head_dim_v));
            let storages: &[DType] = if representative {
                &[DType::F32, DType::F16, DType::BF16]
            } else {
                &[DType::F32]
            };
            let shape =
                AttentionShape::self_attention(1, 256, 8, head_dim).with_head_dim_v(head_dim_v);
            for &storage in storages {
                for tier in tiers {
                    let Ok(plan) = ForwardPlan::for_call(info, &shape, storage, tier) else {
                        continue;
                    };
                    add(plan.specialization());
                    add(plan.masked_specialization());
                    if let Ok(f16_products) = plan.with_f16_products(info) {
                        add(f16_products.specialization());
                        add(f16_products.masked_specialization());
                        add(f16_products.with_dropout().specialization());
                    }
                    // Dropout adds the same few lines to every tiling
                    // class: the representative head dims cover it.
                    if representative {
                        add(plan.with_dropout().specialization());
                        add(plan.with_dropout().masked_specialization());
                    }
                    let naive = NaivePlan::for_call(info, &shape, storage, tier)
                        .expect("the naive plan follows the forward plan");
                    for pass in NaivePass::ALL {
                        add(naive.specialization(pass));
                    }
                }
            }
            // Decoding: 1 to 64 rows per KV head (query tokens x GQA group),
            // every cache storage type.
            for (dtype, rows) in KvDType::ALL
                .into_iter()
                .flat_map(|dtype| [1, 2, 4, 8, 16, 64].map(|rows| (dtype, rows)))
            {
                let cache = CacheShape {
                    batch: 1,
                    heads_kv: 1,
                    head_dim,
                    head_dim_v,
                    longest: 4096,
                    segments: 1,
                    dtype,
                };
                // Each adapter's own layout at every head dim; the forced
                // others (the same code with other constants) at a few.
                let lanes: &[Option<DecodeLanes>] = if representative {
                    &[
                        None,
                        Some(DecodeLanes::Keys),
                        Some(DecodeLanes::HeadDim),
                        Some(DecodeLanes::KeyTiles),
                    ]
                } else {
                    &[None]
                };
                for (tier, lanes) in tiers
                    .into_iter()
                    .flat_map(|tier| lanes.iter().map(move |&lanes| (tier, lanes)))
                {
                    let options = DecodeOptions {
                        config: AttentionConfig {
                            tier,
                            ..AttentionConfig::new()
                        },
                        kv_splits: None,
                        lanes,
                        token_trees: None,
                    };
                    if let Ok(plan) = DecodePlan::for_call(info, &cache, 1, rows, &options) {
                        add(plan.specialization);
                        // Half queries, writing the output or f32 partials:
                        // only loads and stores change, so the
                        // representative head dims cover them.
                        if !representative {
                            continue;
                        }
                        for q in [DType::F16, DType::BF16] {
                            for out in [q, DType::F32] {
                                add(plan.specialization.with_decode_io(DecodeIo { q, out }));
                            }
                        }
                        // Token trees add the same lines to every layout
                        // (the planner takes them from the options).
                        let trees = DecodeOptions {
                            token_trees: Some(Vec::new()),
                            ..options.clone()
                        };
                        let tree_plan = DecodePlan::for_call(info, &cache, 1, rows, &trees)
                            .expect("trees plan as the call without them");
                        assert!(tree_plan.kernel_label().contains("TREE_MASK"));
                        add(tree_plan.specialization);
                    }
                }
            }
        }
    }
    // Callers' register-blocked layouts whose tiles run in two passes
    // (`BlockedTiling::passes`), which no planner default takes: 8x16x4
    // (64-key tiles) where its whole tile does not fit.
    let layout = crate::BlockedLayout {
        row_lanes: 8,
        key_lanes: 16,
        rows: 4,
    };
    let mut two_passes = 0;
    for info in [&infos[0], &nvidia] {
        for (head_dim, storage) in [(64, DType::F32), (128, DType::F32), (128, DType::F16)] {
            let shape = AttentionShape::self_attention(1, 256, 8, head_dim);
            let Ok(plan) = ForwardPlan::for_call_with_layout(info, &shape, storage, None, layout)
            else {
                continue;
            };
            if plan.blocked_tiling().is_some_and(|t| t.passes == 2) {
                two_passes += 1;
            }
            add(plan.specialization());
            add(plan.masked_specialization());
            add(plan.with_dropout().specialization());
            if let Ok(f16_products) = plan.with_f16_products(info) {
                add(f16_products.specialization());
            }
        }
    }
    // (llvmpipe at d=64, the NVIDIA profile at d=128 in f32.)
    assert!(
        two_passes >= 2,
        "{two_passes} two-pass layouts among the callers'"
    );
    // Linear attention: query/key and value head dims independently, a
    // spread per storage type; causal and not.
    let linear_dims = [8, 16, 24, 40, 64, 96, 128, 200, 256];
    for info in &infos {
        for head_dim in linear_dims {
            for head_dim_v in linear_dims {
                let storages: &[DType] = if head_dim == head_dim_v {
                    &[DType::F32, DType::F16, DType::BF16]
                } else {
                    &[DType::F32]
                };
                let shape = LinearShape::self_attention(1, 256, 8, head_dim, head_dim_v);
                for &storage in storages {
                    for causal in [false, true] {
                        let config = LinearConfig::new().causal(causal);
                        let plan = LinearPlan::for_call(info, &shape, storage, &config)
                            .expect("every profile plans linear attention up to d=256");
                        for pass in LinearPass::ALL {
                            add(plan.specialization(pass));
                        }
                    }
                }
            }
        }
    }
    // The backward: one pipeline per head-dim capacity (a power of two),
    // every storage type.
    for info in &infos {
        for head_dim in [8, 16, 32, 64, 128, 256] {
            let shape = AttentionShape::self_attention(1, 256, 8, head_dim);
            for storage in [DType::F32, DType::F16, DType::BF16] {
                for tier in tiers {
                    // Adapters with too few storage buffers refuse the
                    // backward, as those without subgroups refuse that tier.
                    let Ok(plan) = BackwardPlan::for_call(info, &shape, storage, tier) else {
                        continue;
                    };
                    let config = AttentionConfig {
                        tier,
                        ..AttentionConfig::new()
                    }
                    .dropout(0.1, 0);
                    let dropout = BackwardPlan::for_config(info, &shape, storage, &config)
                        .expect("dropout plans where the call without it does");
                    for pass in BackwardPass::ALL {
                        add(plan.specialization(pass));
                        add(dropout.specialization(pass));
                    }
                }
            }
        }
    }
    for out in [DType::F32, DType::F16, DType::BF16] {
        add(Specialization::Combine {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            out,
        });
    }
    add(Specialization::Rope {
        workgroup_size: ELEMENTWISE_WORKGROUP,
    });
    for dtype in KvDType::ALL {
        add(Specialization::KvAppend {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            dtype,
        });
        add(Specialization::KvGather {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            dtype,
        });
    }
    specs
}

/// One shipped specialization per kernel and set of `// #if` variants: the
/// generated constants do not change struct declarations, so these cover
/// every distinct declaration of them.
fn one_specialization_per_variant() -> Vec<Specialization> {
    let mut seen = BTreeSet::new();
    shipped_specializations()
        .into_iter()
        .filter(|spec| seen.insert((format!("{:?}", spec.kernel()), spec.variant_flags())))
        .collect()
}

// ---------------------------------------------------------------------------
// From specialization to naga module.

/// The WGSL text of `spec`, failing the test on a template mistake.
fn source_of(spec: &Specialization) -> String {
    spec.source()
        .unwrap_or_else(|e| panic!("{}: preprocessing failed: {e}", spec.label()))
}

/// `source` parsed, failing the test with the error's source span.
fn parse(spec: &Specialization, source: &str) -> naga::Module {
    naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
        panic!(
            "{}: WGSL parse error\n{}",
            spec.label(),
            e.emit_to_string(source)
        )
    })
}

/// The capabilities the pipeline of `spec` asks the adapter for.
fn capabilities(spec: &Specialization) -> Capabilities {
    let mut capabilities = Capabilities::empty();
    if spec.needs_subgroups() {
        capabilities |= Capabilities::SUBGROUP;
    }
    if spec.needs_f16_in_f32() {
        capabilities |= Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    }
    if spec.needs_cooperative_matrices() {
        // wgpu grants this with EXPERIMENTAL_COOPERATIVE_MATRIX.
        capabilities |= Capabilities::COOPERATIVE_MATRIX;
    }
    if spec.needs_f16() {
        // And this with SHADER_F16.
        capabilities |= Capabilities::SHADER_FLOAT16;
    }
    capabilities
}

/// `module` (parsed from `source`) validated with the capabilities `spec`
/// asks for, failing the test with the error's source span.
fn validate(spec: &Specialization, source: &str, module: &naga::Module) -> naga::valid::ModuleInfo {
    Validator::new(ValidationFlags::all(), capabilities(spec))
        .validate(module)
        .unwrap_or_else(|e| {
            panic!(
                "{}: validation error\n{}",
                spec.label(),
                e.emit_to_string(source)
            )
        })
}

// ---------------------------------------------------------------------------
// Coverage, preprocessing and translation.

#[test]
fn every_kernel_family_is_covered() {
    let specs = shipped_specializations();
    for kernel in Kernel::ALL {
        assert!(
            specs.iter().any(|s| s.kernel() == kernel),
            "{} ({}) has no specialization under test",
            kernel.file_name(),
            kernel.entry_point()
        );
    }
}

#[test]
fn every_shipped_specialization_preprocesses() {
    let failures: Vec<String> = shipped_specializations()
        .iter()
        .filter_map(|spec| {
            let err = spec.source().err()?;
            Some(format!("{}: {err}", spec.label()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn write_spirv(module: &naga::Module, info: &naga::valid::ModuleInfo, label: &str) {
    spv::write_vec(module, info, &spv::Options::default(), None)
        .unwrap_or_else(|e| panic!("{label}: SPIR-V: {e}"));
}

fn write_msl(module: &naga::Module, info: &naga::valid::ModuleInfo, label: &str, entry: &str) {
    let pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
        ..Default::default()
    };
    // Simdgroup matrices (the cooperative-matrix kernel) are MSL 2.3,
    // which wgpu's Metal backend requires for the feature.
    let options = msl::Options {
        lang_version: (2, 3),
        ..msl::Options::default()
    };
    msl::write_string(module, info, &options, &pipeline)
        .unwrap_or_else(|e| panic!("{label}: MSL: {e}"));
}

fn write_hlsl(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    label: &str,
    entry: &str,
    f16: bool,
) {
    let mut options = hlsl::Options::default();
    if f16 {
        // f16 arithmetic is shader model 6.2, which wgpu's DX12 backend
        // uses for SHADER_F16.
        options.shader_model = hlsl::ShaderModel::V6_2;
    }
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
    };
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &options, &pipeline)
        .write(module, info, None)
        .unwrap_or_else(|e| panic!("{label}: HLSL: {e}"));
}

fn write_glsl(module: &naga::Module, info: &naga::valid::ModuleInfo, label: &str, entry: &str) {
    let options = glsl::Options::default();
    let pipeline = glsl::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
        multiview: None,
    };
    let mut out = String::new();
    glsl::Writer::new(
        &mut out,
        module,
        info,
        &options,
        &pipeline,
        naga::proc::BoundsCheckPolicies::default(),
    )
    .and_then(|mut writer| writer.write())
    .unwrap_or_else(|e| panic!("{label}: GLSL: {e}"));
}

/// Validates `spec` (parsed from `source`) and translates it for every
/// backend wgpu may hand it to, failing the test on the first error.
fn validate_and_translate(
    spec: &Specialization,
    source: &str,
    module: &naga::Module,
) -> naga::valid::ModuleInfo {
    let info = validate(spec, source, module);
    let label = spec.label();
    let entry = spec.kernel().entry_point();
    write_spirv(module, &info, &label);
    write_msl(module, &info, &label, entry);
    // wgpu offers cooperative matrices on Vulkan and Metal only.
    if spec.needs_cooperative_matrices() {
        return info;
    }
    write_hlsl(module, &info, &label, entry, spec.needs_f16());
    // wgpu's GL backend has no subgroups or f16 arithmetic, so those
    // variants never reach GLSL.
    if !spec.needs_subgroups() && !spec.needs_f16() {
        write_glsl(module, &info, &label, entry);
    }
    info
}

/// Every shipped specialization (one per code shape unless exhaustive)
/// parsed once for all of its checks, since parsing is most of their time
/// (the exhaustive mode parses over 20,000 modules on CI's two cores):
/// it validates and translates to every backend, its bindings are its
/// kernel's bind group layout, it declares the workgroup memory its plan
/// budgets, and its loops are proven finite (it compiles without wgpu's
/// loop counters).
#[test]
fn shipped_specializations_keep_their_contract() {
    let specs = shipped_specializations();
    let checked: Vec<(Vec<String>, Option<BudgetedKernel>)> = by_code_shape(&specs, "checked")
        .par_iter()
        .map(|spec| {
            let source = source_of(spec);
            let module = parse(spec, &source);
            let info = validate_and_translate(spec, &source, &module);
            let mut problems = layout_problems(spec, &module);
            let budgeted = workgroup_memory_against_budget(spec, &module);
            if let Err(problem) = &budgeted {
                problems.push(problem.clone());
            }
            problems.extend(misaligned_matrix_memory(spec, &module));
            problems.extend(loose_builtin_calls(spec, &module));
            problems.extend(unordered_matrix_handovers(spec, &source, &module, &info));
            // Every shipped kernel compiles without wgpu's loop counters:
            // its loops must be proven finite.
            problems.extend(
                crate::shaders::unproven_loop(&source)
                    .map(|why| format!("{}: a loop not proven finite: {why}", spec.label())),
            );
            (problems, budgeted.ok().flatten())
        })
        .collect();
    let failures: Vec<&String> = checked.iter().flat_map(|(p, _)| p).collect();
    assert!(
        failures.is_empty(),
        "{}",
        failures
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for kind in BudgetedKernel::ALL {
        assert!(
            checked.iter().any(|(_, k)| *k == Some(kind)),
            "no {kind:?} specialization had its workgroup memory checked"
        );
    }
}

/// The loop proof reads the kernels as generated: a step of zero put into
/// any kernel's first loop, or a `while` added, is refused.
#[test]
fn a_kernel_loop_that_may_not_end_is_refused() {
    let specs = one_specialization_per_variant();
    let mut stalled = 0;
    for spec in &specs {
        let source = source_of(spec);
        // The first loop's update, whatever it was, made `x += 0u` (RoPE's
        // kernel has no loop).
        let first_loop = source
            .lines()
            .find(|line| line.trim_start().starts_with("for (var ") && line.ends_with(") {"));
        if let Some(first_loop) = first_loop {
            let counter = first_loop.trim_start()["for (var ".len()..]
                .split([' ', ':'])
                .next()
                .unwrap();
            let update_at = first_loop.rfind("; ").unwrap();
            let stalled_loop = format!("{}; {counter} += 0u) {{", &first_loop[..update_at]);
            let why = crate::shaders::unproven_loop(&source.replacen(first_loop, &stalled_loop, 1));
            assert!(
                why.as_deref().is_some_and(|w| w.contains("not a constant")),
                "{}: {why:?}",
                spec.label()
            );
            stalled += 1;
        } else {
            assert_eq!(spec.kernel(), Kernel::Rope, "{}: no loop", spec.label());
        }
        let spinning = format!("{source}\nfn spin() {{ while (true) {{ }} }}\n");
        assert!(
            crate::shaders::unproven_loop(&spinning).is_some(),
            "{}",
            spec.label()
        );
    }
    assert!(stalled > 0, "no kernel loop was stalled");
}

/// Every specialization with FLASH_ATTN_EXHAUSTIVE=1 (as .ci/run sets);
/// otherwise one of each code shape (kernel, variant flags, workgroup
/// size, unrolling, rows), which differ in more than the values of their
/// constants. Parsing all of them (over 20,000) takes minutes on two cores.
fn by_code_shape<'a>(specs: &'a [Specialization], what: &str) -> Vec<&'a Specialization> {
    let exhaustive = std::env::var("FLASH_ATTN_EXHAUSTIVE").is_ok_and(|v| v == "1");
    if exhaustive {
        return specs.iter().collect();
    }
    let chosen = one_per_code_shape(specs);
    eprintln!(
        "SKIPPED: {what} {} of {} specializations, one per code shape; FLASH_ATTN_EXHAUSTIVE=1 covers all",
        chosen.len(),
        specs.len()
    );
    chosen
}

/// One specialization per code shape (kernel, variant flags, workgroup
/// size, unrolling, rows per invocation): the others differ from it only
/// in constants.
pub(crate) fn one_per_code_shape(specs: &[Specialization]) -> Vec<&Specialization> {
    let mut shapes = HashSet::new();
    specs
        .iter()
        .filter(|spec| {
            let tiling = spec.attention_tiling();
            shapes.insert((
                spec.kernel(),
                spec.variant_flags(),
                tiling.map(|t| (t.workgroup_size, t.unroll, t.rows)),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Bindings against the bind group layout.

/// A resource binding a shader declares, as naga reflects it.
struct ShaderBinding {
    group: u32,
    binding: u32,
    name: String,
    space: naga::AddressSpace,
}

/// The module's globals that have a resource binding, by binding number.
fn shader_bindings(module: &naga::Module) -> Vec<ShaderBinding> {
    let mut found: Vec<ShaderBinding> = module
        .global_variables
        .iter()
        .filter_map(|(_, var)| {
            let binding = var.binding.as_ref()?;
            Some(ShaderBinding {
                group: binding.group,
                binding: binding.binding,
                name: var.name.clone().unwrap_or_default(),
                space: var.space,
            })
        })
        .collect();
    found.sort_by_key(|b| (b.group, b.binding));
    found
}

/// The buffer binding type a bind group layout needs for a global in
/// `space`; `None` for spaces no buffer binding serves.
fn layout_type(space: naga::AddressSpace) -> Option<BufferBindingType> {
    use naga::StorageAccess as Access;
    match space {
        naga::AddressSpace::Uniform => Some(BufferBindingType::Uniform),
        naga::AddressSpace::Storage { access } if access == Access::LOAD => {
            Some(BufferBindingType::Storage { read_only: true })
        }
        naga::AddressSpace::Storage { access } if access == Access::LOAD | Access::STORE => {
            Some(BufferBindingType::Storage { read_only: false })
        }
        _ => None,
    }
}

/// Every way the shader's bindings differ from `layout` (binding `i` of
/// group 0 is `layout[i]`), one message each.
fn binding_mismatches(layout: &[BufferBindingType], shader: &[ShaderBinding]) -> Vec<String> {
    let mut problems = Vec::new();
    for found in shader.iter().filter(|b| b.group != 0) {
        problems.push(format!(
            "`{}` is in group {} binding {}; the layout has group 0 only",
            found.name, found.group, found.binding
        ));
    }
    let group0: Vec<&ShaderBinding> = shader.iter().filter(|b| b.group == 0).collect();
    let count = group0
        .iter()
        .map(|b| b.binding as usize + 1)
        .chain([layout.len()])
        .max()
        .unwrap_or(0);
    for binding in 0..count {
        let declared: Vec<&ShaderBinding> = group0
            .iter()
            .copied()
            .filter(|b| b.binding as usize == binding)
            .collect();
        problems.extend(binding_mismatch(binding, layout.get(binding), &declared));
    }
    problems
}

/// How binding `binding` differs between the layout's `expected` type and
/// the shader's `declared` globals, if it does.
fn binding_mismatch(
    binding: usize,
    expected: Option<&BufferBindingType>,
    declared: &[&ShaderBinding],
) -> Option<String> {
    let found = match declared {
        [] => {
            let expected = expected?;
            return Some(format!(
                "binding {binding}: the layout has {expected:?}, the shader declares nothing"
            ));
        }
        [found] => found,
        _ => {
            let names: Vec<&str> = declared.iter().map(|b| b.name.as_str()).collect();
            return Some(format!(
                "binding {binding}: declared {} times: {names:?}",
                names.len()
            ));
        }
    };
    let shader_type = layout_type(found.space);
    if shader_type.as_ref() == expected {
        return None;
    }
    let expected = expected.map_or("no such binding".to_string(), |ty| format!("{ty:?}"));
    let shader = shader_type.map_or_else(
        || format!("{:?}, which no buffer binding serves", found.space),
        |ty| format!("{ty:?}"),
    );
    Some(format!(
        "binding {binding}: the layout has {expected}, the shader declares `{}` as {shader}",
        found.name
    ))
}

/// How the bindings `spec` declares (in its parsed `module`) differ from
/// its kernel's layout, each message naming the kernel.
fn layout_problems(spec: &Specialization, module: &naga::Module) -> Vec<String> {
    let kernel = spec.kernel();
    binding_mismatches(kernel.bindings(), &shader_bindings(module))
        .into_iter()
        .map(|problem| format!("{kernel:?} ({}): {problem}", spec.label()))
        .collect()
}

#[test]
fn binding_mismatches_are_reported() {
    use BufferBindingType::{Storage, Uniform};
    let binding = |binding, space| ShaderBinding {
        group: 0,
        binding,
        name: format!("b{binding}"),
        space,
    };
    let read = naga::AddressSpace::Storage {
        access: naga::StorageAccess::LOAD,
    };
    let layout = [Uniform, Storage { read_only: false }, Uniform];
    // Binding 1 is read-only in the shader, 2 is missing, 3 is extra.
    let shader = [
        binding(0, naga::AddressSpace::Uniform),
        binding(1, read),
        binding(3, read),
    ];
    let problems = binding_mismatches(&layout, &shader);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("binding 1:") && problems[0].contains("read_only: true"));
    assert!(problems[1].starts_with("binding 2:") && problems[1].contains("declares nothing"));
    assert!(problems[2].starts_with("binding 3:") && problems[2].contains("no such binding"));
}

// ---------------------------------------------------------------------------
// Parameter blocks against their WGSL twins.

/// Where a member sits in a struct, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    name: String,
    offset: usize,
    size: usize,
}

/// A struct's members and total size, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    members: Vec<Member>,
    size: usize,
}

/// The layout of a Rust parameter block, its fields named as their WGSL
/// twins are (`field => "wgsl_name"` where the names differ). Listing the
/// fields through a pattern without `..` stops the build when a field is
/// added to the struct but not here.
macro_rules! rust_layout {
    ($ty:ident { $($field:ident $(=> $wgsl:literal)?),* $(,)? }) => {{
        let _every_field_listed = |value: &$ty| {
            let $ty { $($field: _),* } = value;
        };
        let value = <$ty>::default();
        (
            stringify!($ty),
            Layout {
                members: vec![$(Member {
                    name: rust_layout!(@name $field $($wgsl)?).to_string(),
                    offset: std::mem::offset_of!($ty, $field),
                    size: std::mem::size_of_val(&value.$field),
                }),*],
                size: std::mem::size_of::<$ty>(),
            },
        )
    }};
    (@name $field:ident) => { stringify!($field) };
    (@name $field:ident $wgsl:literal) => { $wgsl };
}

/// Every Rust twin of a WGSL struct, by Rust name. A `#[repr(C)]` struct
/// in `src/params.rs` missing here fails `every_params_struct_is_checked`.
fn rust_twins() -> Vec<(&'static str, Layout)> {
    vec![
        rust_layout!(TensorStrides {
            batch,
            seq,
            head,
            offset
        }),
        rust_layout!(AttentionParams {
            batch,
            seq_q,
            seq_kv,
            heads_q,
            heads_kv,
            flags,
            score_scale,
            softcap,
            window_left,
            window_right,
            alibi_batch_stride,
            unit_base,
            sink_offset,
            dropout_threshold,
            dropout_seed_lo,
            dropout_seed_hi,
            q,
            k,
            v,
            o,
        }),
        rust_layout!(SequenceRows {
            q_batch,
            q_start,
            q_len,
            extent,
            kv_batch,
            kv_start,
            kv_len,
            diag,
            carry,
            sequence,
            key_base,
            _pad0,
        }),
        rust_layout!(DecodeParams {
            group,
            sequence_count,
            splits,
            split_keys,
            page_shift,
            pages_per_seq,
            segment_first_page,
            segment_pages,
            slot_base,
            o_slot,
            lse_slot,
            _pad,
        }),
        rust_layout!(DecodeSequence {
            len,
            q_first,
            q_count,
            lse_first,
            tile_first,
        }),
        rust_layout!(CombineParams {
            batch,
            seq_q,
            heads_q,
            d4,
            slots,
            o_slot,
            lse_slot,
            write_lse,
            out_batch,
            out_seq,
            out_head,
            out_offset,
        }),
        rust_layout!(RopeParams {
            batch,
            tokens,
            heads,
            head_dim,
            rotary_dim,
            half_split,
            src_batch,
            src_seq,
            src_head,
            src_offset,
            page_shift,
            pages_per_seq,
            segment_first_page,
            segment_pages,
            rotary_start,
            write_values,
        }),
        rust_layout!(KvGatherParams {
            batch,
            seq,
            heads,
            d4,
            page_shift,
            pages_per_seq,
            segment_first_page,
            segment_pages,
        }),
        rust_layout!(LinearParams {
            flags,
            eps,
            split_keys,
            splits,
            first_split,
            slot4,
            group,
            _pad,
        }),
        rust_layout!(BackwardParams {
            head_dim4,
            head_dim_v4,
            group,
            scale,
            mask_kind,
            mask_batch,
            mask_head,
            mask_row_words,
            stats_batch,
            stats_head,
            _pad0,
            _pad1,
            d_out,
            dv,
        }),
        rust_layout!(BackwardUnit {
            q_batch,
            q_start,
            q_len,
            extent_q,
            kv_batch,
            kv_start,
            kv_len,
            extent_kv,
        }),
        rust_layout!(MaskParams {
            kind,
            batch_stride,
            head_stride,
            row_words,
            use_tiles,
            tile_batch_stride,
            tile_head_stride,
            key_tiles,
        }),
    ]
}

/// A `#[repr(C)]` struct of `src/params.rs` and the twin its doc comment
/// names ("Twin of `struct NAME` in `shaders/FILE`").
#[derive(Debug)]
struct DeclaredTwin {
    rust: String,
    wgsl: Option<(String, String)>,
}

/// The text between `open` and the next `close` after it in `text`.
fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// The WGSL struct name and shader file a doc comment names as its twin.
fn twin_in_doc(doc: &str) -> Option<(String, String)> {
    let twin = doc.split("Twin of ").nth(1)?;
    let name = between(twin, "`struct ", "`")?;
    let file = between(twin, "`shaders/", "`")?;
    Some((name.to_string(), file.to_string()))
}

/// Every `#[repr(C)]` struct declared in `source` (Rust), with the twin
/// its doc comment names.
fn declared_twins(source: &str) -> Vec<DeclaredTwin> {
    let mut found = Vec::new();
    let (mut doc, mut repr_c) = (String::new(), false);
    for line in source.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(' ');
            doc.push_str(text.trim());
        } else if line.starts_with("#[") {
            repr_c |= line == "#[repr(C)]";
        } else {
            let name = line
                .strip_prefix("pub struct ")
                .and_then(|rest| rest.split([' ', '{']).next());
            if let (Some(name), true) = (name, repr_c) {
                found.push(DeclaredTwin {
                    rust: name.to_string(),
                    wgsl: twin_in_doc(&doc),
                });
            }
            (doc, repr_c) = (String::new(), false);
        }
    }
    found
}

fn params_source() -> &'static str {
    include_str!("params.rs")
}

/// The twin named in the doc comment of `rust`, failing the test if none
/// is.
fn wgsl_twin_of(rust: &str) -> (String, String) {
    declared_twins(params_source())
        .into_iter()
        .find(|twin| twin.rust == rust)
        .and_then(|twin| twin.wgsl)
        .unwrap_or_else(|| {
            panic!("{rust}: its doc comment names no \"Twin of `struct NAME` in `shaders/FILE`\"")
        })
}

/// The layouts naga gives the named structs of `module`, by name.
fn wgsl_struct_layouts(module: &naga::Module) -> HashMap<String, Layout> {
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .expect("naga lays out every parsed type");
    module
        .types
        .iter()
        .filter_map(|(handle, ty)| {
            let naga::TypeInner::Struct { members, .. } = &ty.inner else {
                return None;
            };
            let members = members
                .iter()
                .map(|member| Member {
                    name: member.name.clone().unwrap_or_default(),
                    offset: member.offset as usize,
                    size: layouter[member.ty].size as usize,
                })
                .collect();
            let size = layouter[handle].size as usize;
            Some((ty.name.clone()?, Layout { members, size }))
        })
        .collect()
}

/// Every way `wgsl` differs from `rust`, one message each.
fn layout_mismatches(rust: &Layout, wgsl: &Layout) -> Vec<String> {
    let mut problems = Vec::new();
    if rust.members.len() != wgsl.members.len() {
        problems.push(format!(
            "{} members in Rust, {} in WGSL",
            rust.members.len(),
            wgsl.members.len()
        ));
    }
    for (index, (r, w)) in rust.members.iter().zip(&wgsl.members).enumerate() {
        if r != w {
            problems.push(format!(
                "member {index}: Rust `{}` at offset {}, {} bytes; WGSL `{}` at offset {}, {} bytes",
                r.name, r.offset, r.size, w.name, w.offset, w.size
            ));
        }
    }
    if rust.size != wgsl.size {
        problems.push(format!(
            "{} bytes in Rust, {} in WGSL",
            rust.size, wgsl.size
        ));
    }
    problems
}

/// Parameter blocks lay out like their WGSL twins in every variant of every
/// kernel that declares them, and each twin is declared by at least one.
#[test]
fn params_structs_match_their_wgsl_twins() {
    let twins: Vec<_> = rust_twins()
        .into_iter()
        .map(|(rust_name, rust)| (rust_name, rust, wgsl_twin_of(rust_name)))
        .collect();
    let mut checked = vec![0usize; twins.len()];
    let mut failures = Vec::new();
    for spec in one_specialization_per_variant() {
        let layouts = wgsl_struct_layouts(&parse(&spec, &source_of(&spec)));
        for ((rust_name, rust, (wgsl_name, file)), checks) in twins.iter().zip(&mut checked) {
            let Some(wgsl) = layouts.get(wgsl_name) else {
                continue;
            };
            *checks += 1;
            for problem in layout_mismatches(rust, wgsl) {
                failures.push(format!(
                    "{rust_name} vs `struct {wgsl_name}` (shaders/{file}) in {}: {problem}",
                    spec.label()
                ));
            }
        }
    }
    for ((rust_name, _, (wgsl_name, _)), checks) in twins.iter().zip(checked) {
        if checks == 0 {
            failures.push(format!(
                "{rust_name}: no shipped kernel declares `struct {wgsl_name}`"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each twin's doc comment names a struct that its shader file declares.
#[test]
fn params_docs_name_their_twins() {
    for twin in declared_twins(params_source()) {
        let (name, file) = wgsl_twin_of(&twin.rust);
        let path = format!("{}/shaders/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: its doc names {path}: {e}", twin.rust));
        assert!(
            text.contains(&format!("struct {name} {{")),
            "{}: shaders/{file} declares no `struct {name}`",
            twin.rust
        );
    }
}

/// No `#[repr(C)]` struct of `src/params.rs` escapes the member check, and
/// the check lists no struct that is gone.
#[test]
fn every_params_struct_is_checked() {
    let declared: BTreeSet<String> = declared_twins(params_source())
        .into_iter()
        .map(|twin| twin.rust)
        .collect();
    let checked: BTreeSet<String> = rust_twins()
        .into_iter()
        .map(|(name, _)| name.to_string())
        .collect();
    assert_eq!(declared, checked, "src/params.rs structs vs rust_twins()");
}

#[test]
fn layout_mismatches_are_reported() {
    let member = |name: &str, offset, size| Member {
        name: name.to_string(),
        offset,
        size,
    };
    let rust = Layout {
        members: vec![member("a", 0, 4), member("b", 4, 4)],
        size: 8,
    };
    let wgsl = Layout {
        members: vec![member("a", 0, 4), member("c", 4, 4), member("d", 8, 4)],
        size: 12,
    };
    let problems = layout_mismatches(&rust, &wgsl);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[1].contains("Rust `b`") && problems[1].contains("WGSL `c`"));
}

#[test]
fn doc_twins_are_read_from_params_source() {
    let source = "/// Twin of `struct P` in\n/// `shaders/p.wgsl`.\n#[repr(C)]\n#[derive(Clone)]\npub struct Q {\n}\n/// Not a twin.\npub struct R;\n#[repr(C)]\npub struct S {}\n";
    let twins = declared_twins(source);
    assert_eq!(twins.len(), 2, "{twins:?}");
    assert_eq!(twins[0].rust, "Q");
    assert_eq!(twins[0].wgsl, Some(("P".into(), "p.wgsl".into())));
    assert_eq!((twins[1].rust.as_str(), &twins[1].wgsl), ("S", &None));
}

// ---------------------------------------------------------------------------
// Flag bits against the shader's constants.

/// Rust flag bits by the name of their WGSL twin.
const FLAG_TWINS: [(&str, u32); 7] = [
    ("FLAG_WINDOW_LEFT", flags::WINDOW_LEFT),
    ("FLAG_WINDOW_RIGHT", flags::WINDOW_RIGHT),
    ("FLAG_SOFTCAP", flags::SOFTCAP),
    ("FLAG_ALIBI", flags::ALIBI),
    ("FLAG_WRITE_LSE", flags::WRITE_LSE),
    ("FLAG_SINKS", flags::SINKS),
    ("FLAG_SEQUENCES", flags::SEQUENCES),
];

/// The same for the forward's carry bits (per unit of its sequence table).
const CARRY_FLAG_TWINS: [(&str, u32); 2] = [
    ("CARRY_IN", carry_flags::IN),
    ("CARRY_OUT", carry_flags::OUT),
];

/// The same for the register-blocked kernel's own flag bits.
const BLOCKED_FLAG_TWINS: [(&str, u32); 1] = [("BLOCKED_GROUP_ROWS", blocked_flags::GROUP_ROWS)];

/// The same for linear attention's flags.
const LINEAR_FLAG_TWINS: [(&str, u32); 3] = [
    ("LINEAR_CAUSAL", linear_flags::CAUSAL),
    ("LINEAR_IDENTITY_MAP", linear_flags::IDENTITY_MAP),
    ("LINEAR_CARRY_IN", linear_flags::CARRY_IN),
];

/// The module's `const {prefix}*` declarations with their values (`None`
/// for a value that is not a `u32` literal).
fn wgsl_flags(module: &naga::Module, prefix: &str) -> BTreeSet<(String, Option<u32>)> {
    module
        .constants
        .iter()
        .filter_map(|(_, constant)| {
            let name = constant.name.as_deref()?;
            let value = match module.global_expressions[constant.init] {
                naga::Expression::Literal(naga::Literal::U32(value)) => Some(value),
                _ => None,
            };
            name.starts_with(prefix).then(|| (name.to_string(), value))
        })
        .collect()
}

/// The names in `pub mod {module} {` of `src/params.rs`, each prefixed.
fn rust_flag_names(source: &str, module: &str, prefix: &str) -> BTreeSet<String> {
    let body = source
        .split(&format!("pub mod {module} {{"))
        .nth(1)
        .unwrap_or_default();
    let body = body.split('}').next().unwrap_or_default();
    body.lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|rest| rest.split(':').next())
        .map(|name| format!("{prefix}{name}"))
        .collect()
}

/// The WGSL flag constants of `kernel` equal the Rust ones of `module`,
/// by name and value, and `twins` lists every Rust one.
fn check_flag_twins(kernel: Kernel, twins: &[(&str, u32)], module: &str, prefix: &str) {
    let spec = shipped_specializations()
        .into_iter()
        .find(|spec| spec.kernel() == kernel)
        .expect("the kernel is shipped");
    let parsed = parse(&spec, &source_of(&spec));
    let expected: BTreeSet<(String, Option<u32>)> = twins
        .iter()
        .map(|&(name, value)| (name.to_string(), Some(value)))
        .collect();
    assert_eq!(
        wgsl_flags(&parsed, prefix),
        expected,
        "WGSL {prefix}* constants vs params::{module}"
    );
    let listed: BTreeSet<String> = twins.iter().map(|(name, _)| name.to_string()).collect();
    assert_eq!(
        rust_flag_names(params_source(), module, prefix),
        listed,
        "params::{module} vs its twin table"
    );
}

#[test]
fn attention_flags_match_the_shader() {
    check_flag_twins(Kernel::FlashForward, &FLAG_TWINS, "flags", "FLAG_");
}

#[test]
fn carry_flags_match_the_shader() {
    check_flag_twins(
        Kernel::FlashForward,
        &CARRY_FLAG_TWINS,
        "carry_flags",
        "CARRY_",
    );
}

/// The register-blocked kernel reads the sequence table and carry that
/// flash_attention.wgsl declares between its shared-section markers.
#[test]
fn carry_flags_match_the_register_blocked_shader() {
    check_flag_twins(
        Kernel::FlashBlocked,
        &CARRY_FLAG_TWINS,
        "carry_flags",
        "CARRY_",
    );
    check_flag_twins(
        Kernel::FlashBlocked,
        &BLOCKED_FLAG_TWINS,
        "blocked_flags",
        "BLOCKED_",
    );
    // Its own bits share `Params.flags` with the common ones.
    for (name, bit) in BLOCKED_FLAG_TWINS {
        assert!(
            FLAG_TWINS.iter().all(|&(_, common)| common & bit == 0),
            "{name} overlaps a common flag"
        );
    }
    let shared = crate::shaders::forward_tables(include_str!("../shaders/flash_attention.wgsl"));
    assert!(
        shared.contains("struct SequenceRows") && shared.contains("fn carry_base"),
        "flash_attention.wgsl's shared-section markers moved: {shared:.200}"
    );
}

#[test]
fn linear_flags_match_the_shader() {
    check_flag_twins(
        Kernel::LinearOutputs,
        &LINEAR_FLAG_TWINS,
        "linear_flags",
        "LINEAR_",
    );
}

// ---------------------------------------------------------------------------
// Workgroup memory against the planners' budgets.

/// Name and size of each of the module's `var<workgroup>` declarations, as
/// naga lays them out.
fn workgroup_variables(module: &naga::Module) -> Vec<(String, u64)> {
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .expect("naga lays out every parsed type");
    module
        .global_variables
        .iter()
        .filter(|(_, var)| var.space == naga::AddressSpace::WorkGroup)
        .map(|(_, var)| {
            let name = var.name.clone().unwrap_or_default();
            (name, u64::from(layouter[var.ty].size))
        })
        .collect()
}

/// Bytes of the module's `var<workgroup>` declarations, as naga lays them
/// out, without the variables named in `except`.
fn declared_workgroup_bytes_except(module: &naga::Module, except: &[&str]) -> u64 {
    workgroup_variables(module)
        .iter()
        .filter(|(name, _)| !except.contains(&name.as_str()))
        .map(|(_, bytes)| bytes)
        .sum()
}

// ---------------------------------------------------------------------------
// Built-ins whose precision the specification leaves loose.

/// WGSL built-ins whose specified accuracy is too loose for a result held
/// to the f64 reference: `sin` and `cos` may be off by 2^-11 absolute (and
/// SPIR-V's by as much, for Vulkan), `tan` and `atan2` inherit that, the
/// inverse functions are allowed 4096 ULP, and `pow` inherits
/// `exp2(y * log2(x))`, whose absolute log error grows with `y`.
/// Conforming implementations use that freedom (Chromium's SwiftShader
/// rotated RoPE pairs 2e-4 off, 2026-12-06), while lavapipe's are exact
/// enough to hide it: no kernel may call them. (`exp`, `exp2` and `log`
/// stay: a few ULP, relative; so does softcap's `tanh`, which inherits
/// `exp`'s: a few ULP of 1 absolute.)
const LOOSE_BUILTINS: [naga::MathFunction; 8] = {
    use naga::MathFunction as M;
    [
        M::Sin,
        M::Cos,
        M::Tan,
        M::Asin,
        M::Acos,
        M::Atan,
        M::Atan2,
        M::Pow,
    ]
};

/// The calls of [`LOOSE_BUILTINS`] in `module`, one line each.
fn loose_builtin_calls(spec: &Specialization, module: &naga::Module) -> Vec<String> {
    let functions = module
        .functions
        .iter()
        .map(|(_, f)| f)
        .chain(module.entry_points.iter().map(|e| &e.function));
    functions
        .flat_map(|function| {
            function
                .expressions
                .iter()
                .filter_map(move |(_, e)| match e {
                    naga::Expression::Math { fun, .. } if LOOSE_BUILTINS.contains(fun) => {
                        Some(format!(
                            "{}: calls {fun:?} in {}, a built-in the specification allows a loose \
                     accuracy (see LOOSE_BUILTINS)",
                            spec.label(),
                            function.name.as_deref().unwrap_or("?")
                        ))
                    }
                    _ => None,
                })
        })
        .collect()
}

/// The check finds such a call, and passes the RoPE kernels, which once
/// made them.
#[test]
fn a_kernel_calling_a_loose_builtin_is_refused() {
    let spec = shipped_specializations()
        .into_iter()
        .find(|spec| matches!(spec, Specialization::Rope { .. }))
        .expect("a RoPE kernel is shipped");
    let source = source_of(&spec);
    assert!(loose_builtin_calls(&spec, &parse(&spec, &source)).is_empty());
    let with_sin = source.replace(
        "let cs = turn_cos_sin(turns);",
        "let cs = vec2<f32>(cos(f32(turns)), sin(f32(turns)));",
    );
    assert_ne!(with_sin, source, "the RoPE kernel's rotation moved");
    let found = loose_builtin_calls(&spec, &parse(&spec, &with_sin));
    assert_eq!(found.len(), 2, "{found:?}");
}

/// The workgroup variables of a cooperative-matrix kernel whose sizes are
/// not multiples of 16 bytes. Drivers place workgroup variables in an
/// order of their own, and matrix loads and stores need 16-byte-aligned
/// addresses: only variables that are all multiples of 16 bytes keep every
/// tile aligned whatever the order (the kernel computed NaN on NVIDIA's
/// driver while it had two 4-byte words beside the tiles, 2026-12-05: the
/// likely cause, not yet confirmed on a GPU).
fn misaligned_matrix_memory(spec: &Specialization, module: &naga::Module) -> Vec<String> {
    if !matches!(
        spec,
        Specialization::FlashCoop(_) | Specialization::FlashCoopMasked(_)
    ) {
        return Vec::new();
    }
    workgroup_variables(module)
        .into_iter()
        .filter(|(_, bytes)| bytes % 16 != 0)
        .map(|(name, bytes)| {
            format!(
                "{}: workgroup variable {name} is {bytes} bytes, not a multiple of 16",
                spec.label()
            )
        })
        .collect()
}

/// What in a cooperative-matrix kernel's SPIR-V, as the crate hands it to
/// a Vulkan driver (`crate::spirv`), leaves its hand-overs between
/// invocations unordered under the Vulkan memory model that naga declares
/// for it (the rewrite must have marked every access and barrier).
fn unordered_matrix_handovers(
    spec: &Specialization,
    source: &str,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
) -> Vec<String> {
    if !spec.needs_cooperative_matrices() {
        return Vec::new();
    }
    let target = crate::spirv::SpirvTarget::VULKAN_1_3;
    let skipped = crate::SkippedChecks::CRATE_DEFAULT.for_kernel(source);
    let entry = spec.kernel().entry_point();
    let words = match crate::spirv::write(module, info, entry, &target, skipped) {
        Ok(words) => words,
        Err(why) => return vec![format!("{}: SPIR-V: {why}", spec.label())],
    };
    if !crate::spirv::uses_vulkan_memory_model(&words) {
        return vec![format!(
            "{}: not under the Vulkan memory model",
            spec.label()
        )];
    }
    crate::spirv::memory_model_violations(&words)
        .into_iter()
        .map(|problem| format!("{}: {problem}", spec.label()))
        .collect()
}

/// naga's own SPIR-V of the matrix kernel breaks the Vulkan memory model
/// (what `crate::spirv` exists for; if naga starts following it, the
/// rewrite can go): the check above is not vacuous.
#[test]
fn nagas_matrix_kernel_spirv_leaves_handovers_unordered() {
    let spec = shipped_specializations()
        .into_iter()
        .find(|s| s.needs_cooperative_matrices())
        .expect("a matrix kernel");
    let source = source_of(&spec);
    let module = parse(&spec, &source);
    let info = validate(&spec, &source, &module);
    let words = crate::spirv::nagas_own_words(&module, &info);
    assert!(crate::spirv::uses_vulkan_memory_model(&words));
    let problems = crate::spirv::memory_model_violations(&words);
    assert!(
        problems.iter().any(|p| p.contains("private access"))
            && problems.iter().any(|p| p.contains("barrier"))
            && problems.iter().any(|p| p.contains("DeviceScope")),
        "{problems:?}"
    );
}

/// The kernels whose plans budget workgroup memory against the adapter's
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BudgetedKernel {
    PerRowForward,
    RegisterBlockedForward,
    CooperativeMatrixForward,
    RegisterBlockedBackward,
}

impl BudgetedKernel {
    const ALL: [BudgetedKernel; 4] = [
        BudgetedKernel::PerRowForward,
        BudgetedKernel::RegisterBlockedForward,
        BudgetedKernel::CooperativeMatrixForward,
        BudgetedKernel::RegisterBlockedBackward,
    ];
}

/// Whether `spec` declares the workgroup memory its plan budgets: exactly,
/// for the block-tiled kernels (whose layouts the planners size from the
/// limit; the blocked gradient passes besides the sink pass's shares,
/// which they do not use); at most, for the per-row forward (none for its
/// subgroup variant, which stages nothing). `Ok(None)` for kernels without
/// a budget.
fn workgroup_memory_against_budget(
    spec: &Specialization,
    module: &naga::Module,
) -> Result<Option<BudgetedKernel>, String> {
    use Specialization as S;
    let (kind, budget, exact, unbudgeted): (_, _, _, &[&str]) = match spec {
        S::FlashBlocked(t) | S::FlashBlockedMasked(t) => (
            BudgetedKernel::RegisterBlockedForward,
            t.workgroup_bytes(),
            true,
            &[],
        ),
        S::FlashCoop(t) | S::FlashCoopMasked(t) => (
            BudgetedKernel::CooperativeMatrixForward,
            t.workgroup_bytes(),
            true,
            &[],
        ),
        S::FlashForward(t) | S::FlashMasked(t) => (
            BudgetedKernel::PerRowForward,
            if t.subgroup_kv {
                0
            } else {
                crate::shaders::forward_tile_bytes(t.head_dim, t.head_dim_v, t.block_n)
            },
            false,
            &[],
        ),
        S::BackwardBlocked { tiling, .. } => (
            BudgetedKernel::RegisterBlockedBackward,
            tiling.workgroup_bytes(),
            true,
            &["sink_shares"],
        ),
        _ => return Ok(None),
    };
    let declared = declared_workgroup_bytes_except(module, unbudgeted);
    let within = if exact {
        declared == budget
    } else {
        declared <= budget
    };
    if within {
        Ok(Some(kind))
    } else {
        Err(format!(
            "{}: declares {declared} bytes of workgroup memory, its plan budgets {budget}",
            spec.label()
        ))
    }
}

// ---------------------------------------------------------------------------
// Replaced shader files (Gpu::override_shader_file).

#[test]
fn the_replaceable_files_are_exactly_the_shaders_directory() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wgsl"))
        .collect();
    let built_in: BTreeSet<String> = ShaderOverrides::names().map(str::to_string).collect();
    assert_eq!(on_disk, built_in);
}

#[test]
fn a_replaced_file_reaches_exactly_the_kernels_built_from_it() {
    let blocked = Specialization::FlashBlocked(crate::BlockedTiling {
        head_dim: 64,
        head_dim_v: 64,
        row_lanes: 8,
        key_lanes: 8,
        rows: 2,
        storage: DType::F32,
        dropout: false,
        f16_products: false,
        pad_rows: true,
        passes: 1,
    });
    let combine = Specialization::Combine {
        workgroup_size: 64,
        out: DType::F32,
    };
    let mut overrides = ShaderOverrides::default();
    assert!(!overrides.replace("flash_blocked", String::new()));
    assert!(!overrides.replace("../shaders/flash_blocked.wgsl", String::new()));
    let marker = "// replaced forward_blocks.wgsl";
    let text = format!(
        "{}{marker}\n",
        include_str!("../shaders/forward_blocks.wgsl")
    );
    assert!(overrides.replace("forward_blocks.wgsl", text));
    let replaced = blocked.source_with(&overrides).unwrap();
    assert!(replaced.contains(marker));
    assert_eq!(
        replaced.replace(&format!("{marker}\n"), ""),
        blocked.source().unwrap(),
        "only the marker differs"
    );
    assert!(!combine.source_with(&overrides).unwrap().contains(marker));
}
