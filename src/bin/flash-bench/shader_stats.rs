//! `flash-bench shader-stats`: what a Vulkan driver compiles the forward
//! kernels into (registers, spills, instruction counts: whatever the driver
//! reports through `VK_KHR_pipeline_executable_properties`), for each tier
//! and register-blocked layout asked for, and decoding's kernels for each
//! lane layout asked for.
//!
//! A kernel's speed on a GPU follows from numbers the timings cannot show:
//! how many registers an invocation holds (so how many workgroups share a
//! compute unit) and whether its arrays spilled to memory. wgpu keeps its
//! pipelines' statistics to itself, so this opens a second Vulkan device on
//! the same adapter with the statistics feature, compiles the crate's WGSL
//! to SPIR-V with naga (once with the runtime checks wgpu adds, once
//! without, to show what they cost) and asks the driver.

use anyhow::{Context, Result, bail};
use clap::Args;
use wgpu_flash_attn::{
    BlockedLayout, CacheShape, DecodeLanes, DecodeOptions, DecodePlan, ForwardPlan, Gpu, KvDType,
    SkippedChecks,
};

use crate::options::{DTypeArg, GlobalArgs, ShapeArgs, TierArg, products_suffix};
use crate::options_json::tier_name;

#[derive(Debug, Args)]
pub struct ShaderStatsArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// Storage type of Q, K, V and O.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Tiers to compile (default: the planner's choice), a comma-separated
    /// list.
    #[arg(long, value_enum, value_delimiter = ',')]
    tier: Vec<TierArg>,
    /// Register-blocked layouts to compile as well, ROW_LANESxKEY_LANESxROWS
    /// (`--blocked-layout 16x8x2,8x8x4`).
    #[arg(long, value_delimiter = ',', value_parser = crate::options::parse_layout)]
    blocked_layout: Vec<BlockedLayout>,
    /// Cooperative-matrix blocks to compile as well, ROW_TILESxKEY_TILES
    /// (`--coop-layout 4x4,4x2`).
    #[arg(long, value_delimiter = ',', value_parser = crate::options::parse_coop_layout)]
    coop_layout: Vec<wgpu_flash_attn::CoopLayout>,
    /// Also compile decoding's kernel for these lane layouts (keys,
    /// head-dim, key-tiles; comma-separated) over a cache of `--kv-dtype`:
    /// the shape's heads and head dims, `--seq-q` new tokens over
    /// `--seq-kv` cached ones (`--seq-q 1 --seq-kv 131072 --heads-q 64
    /// --heads-kv 8 --head-dim 128` for Llama-3.1-70B's decode step).
    #[arg(long, value_delimiter = ',', value_parser = crate::decode::parse_lanes)]
    decode_lanes: Vec<DecodeLanes>,
    /// The cache's storage type for `--decode-lanes`: f32, f16, bf16, int8.
    #[arg(long, default_value = "f32", value_parser = crate::decode::parse_kv_dtype)]
    kv_dtype: KvDType,
    /// Also write each kernel's generated WGSL and the SPIR-V wgpu builds
    /// of it (`NAME.wgsl`, `NAME.spv`) into DIR, for reading with other
    /// tools (spirv-dis, naga).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<std::path::PathBuf>,
}

/// One kernel to compile: how the report names and describes it, and its
/// WGSL.
struct Kernel {
    name: String,
    description: String,
    wgsl: String,
}

impl Kernel {
    fn forward(gpu: &Gpu, name: String, plan: &ForwardPlan) -> Result<Self> {
        Ok(Kernel {
            description: format!(
                "{} invocations, {} B of workgroup memory ({})",
                plan.workgroup_size(),
                plan.workgroup_bytes(),
                plan.kernel_label()
            ),
            wgsl: gpu.forward_wgsl(plan)?,
            name,
        })
    }

    fn decode(gpu: &Gpu, plan: &DecodePlan) -> Result<Self> {
        Ok(Kernel {
            name: format!("decode {}", crate::decode::lanes_name(plan)),
            description: format!(
                "{} splits x {} row tiles ({})",
                plan.splits,
                plan.row_tiles,
                plan.kernel_label()
            ),
            wgsl: gpu.decode_wgsl(plan)?,
        })
    }
}

pub fn run(global: &GlobalArgs, args: &ShaderStatsArgs) -> Result<bool> {
    let setup = global.device_setup()?;
    let adapter = pollster::block_on(setup.options.select()).context("opening a GPU adapter")?;
    let gpu = pollster::block_on(Gpu::from_adapter_with(&adapter, &setup.options))
        .context("opening a GPU adapter")?;
    // The replaced shader files, if any (the runtime-check choice is this
    // command's to show both ways: every check, and those asked skipped
    // or none).
    setup.prepare(&gpu)?;
    if let Some(line) = setup.describe() {
        eprintln!("{line} (shader-stats shows the kernels with every check and without those)");
    }
    // The second build: the checks asked skipped, or without them the
    // crate's default (every check but the loop counters of kernels whose
    // loops are proven finite: what `run` times).
    let skipped = setup.skipped_checks();
    let without = match skipped {
        SkippedChecks::ALL => "unchecked".to_string(),
        SkippedChecks::CRATE_DEFAULT => "default (without loops)".to_string(),
        s => format!("without {}", s.names()),
    };
    let kernels = kernels(&gpu, args)?;
    if kernels.is_empty() {
        bail!("none of the tiers and layouts asked for runs on this adapter (above)");
    }
    let driver = driver::StatsDevice::open(&adapter, gpu.device(), gpu.info().features)?;
    println!(
        "{}: {}; \"checked\" is the SPIR-V wgpu builds (index clamps{}, loop bounds, \
         division checks), \"{without}\" the same without {}",
        adapter.get_info().name,
        if driver.reports_statistics() {
            "pipeline statistics from the driver"
        } else {
            "the driver compiles the kernels but reports no statistics \
             (no VK_KHR_pipeline_executable_properties)"
        },
        if driver.clamps_buffers() {
            ", buffer clamps"
        } else {
            ""
        },
        if skipped == SkippedChecks::ALL {
            "them".to_string()
        } else {
            skipped.names()
        }
    );
    if skipped.loop_bounding {
        println!(
            "(loop counters go only from kernels whose loops are proven finite: \
             a kernel whose text the proof refuses keeps them, said below)"
        );
    }
    let mut legend: Vec<(String, String)> = Vec::new();
    for kernel in &kernels {
        println!("== {}: {}", kernel.name, kernel.description);
        let wgsl = &kernel.wgsl;
        let parsed = driver
            .parse(wgsl)
            .with_context(|| format!("parsing {}", kernel.name))?;
        if let Some(why) = wgpu_flash_attn::unproven_loop(wgsl).filter(|_| skipped.loop_bounding) {
            println!("  keeps its loop counters: {why}");
        }
        for (label, skipped) in [
            ("checked", SkippedChecks::default()),
            (without.as_str(), skipped.for_kernel(wgsl)),
        ] {
            let words = driver
                .spirv(&parsed, skipped)
                .with_context(|| format!("translating {} to SPIR-V", kernel.name))?;
            if let Some(dir) = &args.out_dir {
                write_kernel(dir, &kernel.name, skipped, wgsl, &words)?;
            }
            let executables = driver.statistics(&words, &parsed)?;
            if executables.is_empty() {
                println!("  {label}: compiled ({} SPIR-V words)", words.len());
            }
            for executable in executables {
                let values: Vec<String> = executable
                    .statistics
                    .iter()
                    .map(|s| format!("{}={}", s.name, s.value))
                    .collect();
                println!("  {label} {}: {}", executable.name, values.join(", "));
                for s in executable.statistics {
                    if !legend.iter().any(|(name, _)| *name == s.name) {
                        legend.push((s.name, s.description));
                    }
                }
            }
        }
    }
    if !legend.is_empty() {
        println!("statistics, as the driver describes them:");
    }
    for (name, description) in legend {
        println!("  {name}: {description}");
    }
    Ok(true)
}

/// Writes a kernel's WGSL (once) and SPIR-V into `dir`, named after the
/// kernel with its spaces as dashes (and the checks skipped: `-unchecked`
/// for all, else their names).
fn write_kernel(
    dir: &std::path::Path,
    name: &str,
    skipped: SkippedChecks,
    wgsl: &str,
    words: &[u32],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = name.replace(' ', "-");
    if !skipped.any() {
        std::fs::write(dir.join(format!("{stem}.wgsl")), wgsl)?;
    }
    let suffix = match skipped {
        s if !s.any() => String::new(),
        SkippedChecks::ALL => "-unchecked".to_string(),
        s => format!("-without-{}", s.names().replace(',', "-")),
    };
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{stem}{suffix}.spv")), bytes)?;
    Ok(())
}

/// The kernels of the tiers, layouts and decode lane layouts asked for;
/// those this adapter cannot run are reported and left out.
fn kernels(gpu: &Gpu, args: &ShaderStatsArgs) -> Result<Vec<Kernel>> {
    let shape = args.shape.shape();
    let dtype = args.dtype.dtype();
    // The planner's own forward kernel when nothing at all was asked for.
    let nothing_asked = args.tier.is_empty()
        && args.blocked_layout.is_empty()
        && args.coop_layout.is_empty()
        && args.decode_lanes.is_empty();
    let tiers: Vec<Option<TierArg>> = if nothing_asked {
        vec![None]
    } else {
        args.tier.iter().copied().map(Some).collect()
    };
    let mut kernels = Vec::new();
    for tier in tiers {
        let plan = match tier {
            Some(tier) => tier.plan(gpu.info(), &shape, dtype),
            None => ForwardPlan::for_call(gpu.info(), &shape, dtype, None),
        };
        match plan {
            Ok(plan) => {
                let name = tier.map_or_else(
                    || {
                        format!(
                            "{}{}",
                            tier_name(plan.tier()),
                            products_suffix(plan.f16_products())
                        )
                    },
                    TierArg::label,
                );
                kernels.push(Kernel::forward(gpu, name, &plan)?);
            }
            Err(err) => eprintln!("skipped: {err}"),
        }
    }
    for &layout in &args.blocked_layout {
        match ForwardPlan::for_call_with_layout(gpu.info(), &shape, dtype, None, layout) {
            Ok(plan) => {
                let name = format!(
                    "RegisterBlocked {layout}{}",
                    products_suffix(plan.f16_products())
                );
                kernels.push(Kernel::forward(gpu, name, &plan)?);
            }
            Err(err) => eprintln!("skipped: register-blocked layout {layout}: {err}"),
        }
    }
    for &layout in &args.coop_layout {
        let config = wgpu_flash_attn::AttentionConfig::new().coop_layout(layout);
        match ForwardPlan::for_config(gpu.info(), &shape, dtype, &config) {
            Ok(plan) => kernels.push(Kernel::forward(
                gpu,
                format!("CooperativeMatrix {layout}"),
                &plan,
            )?),
            Err(err) => eprintln!("skipped: cooperative-matrix block {layout}: {err}"),
        }
    }
    let cache = CacheShape::of_call(&shape, args.kv_dtype);
    for &lanes in &args.decode_lanes {
        let options = DecodeOptions::default().lanes(lanes);
        match DecodePlan::for_call(gpu.info(), &cache, shape.seq_q, shape.heads_q, &options) {
            Ok(plan) => kernels.push(Kernel::decode(gpu, &plan)?),
            Err(err) => eprintln!("skipped: decode lanes {lanes:?}: {err}"),
        }
    }
    Ok(kernels)
}

/// One statistic of a compiled executable, as the driver names it.
struct Statistic {
    name: String,
    description: String,
    value: String,
}

/// One executable of a pipeline (a compute pipeline has one, some drivers
/// report more) and its statistics.
struct Executable {
    name: String,
    statistics: Vec<Statistic>,
}

#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
mod driver {
    //! The Vulkan side: a device with the statistics feature, SPIR-V from
    //! naga, one pipeline per kernel build (kept until the device goes).

    use std::cell::RefCell;
    use std::ffi::CStr;

    use anyhow::{Context, Result, bail};
    use ash::{khr, vk};
    use wgpu::hal::api::Vulkan;

    use wgpu_flash_attn::spirv::{self, SpirvTarget};

    use super::{Executable, SkippedChecks, Statistic};

    /// A kernel's WGSL, parsed and validated once for both SPIR-V builds.
    pub struct Parsed {
        module: naga::Module,
        info: naga::valid::ModuleInfo,
    }

    pub struct StatsDevice {
        /// wgpu-hal's device, opened with the same wgpu features as the
        /// crate's (so every kernel's SPIR-V capabilities are enabled) plus
        /// the statistics feature; destroyed when dropped.
        device: wgpu::hal::vulkan::Device,
        /// The statistics queries, where the driver offers them.
        executables: Option<khr::pipeline_executable_properties::Device>,
        /// The SPIR-V wgpu writes for it (and the crate, for its matrix
        /// kernel).
        target: SpirvTarget,
        /// Every pipeline [`Self::statistics`] created, with its module and
        /// layouts, alive until the device goes: no handle is reused
        /// while the driver may still associate statistics with it (an
        /// H100's driver once reported one kernel's build with another's
        /// registers and shared memory, 2026-12-05).
        kept: RefCell<Vec<Objects>>,
    }

    impl Drop for StatsDevice {
        fn drop(&mut self) {
            let device = self.device.raw_device();
            for objects in self.kept.get_mut().drain(..).rev() {
                objects.destroy(device);
            }
        }
    }

    impl StatsDevice {
        /// A statistics device on `adapter`, writing SPIR-V as for `device`
        /// (the crate's own on the same adapter).
        pub fn open(
            adapter: &wgpu::Adapter,
            device: &wgpu::Device,
            features: wgpu::Features,
        ) -> Result<Self> {
            // SAFETY: the hal adapter is only used while `adapter` lives.
            let Some(hal) = (unsafe { adapter.as_hal::<Vulkan>() }) else {
                bail!(
                    "shader-stats asks a Vulkan driver; this adapter is {:?} (WGPU_BACKEND=vulkan)",
                    adapter.get_info().backend
                );
            };
            let extension = khr::pipeline_executable_properties::NAME;
            let instance = hal.shared_instance().raw_instance();
            let physical = hal.raw_physical_device();
            let target = SpirvTarget::of_device(device)
                .context("the crate's device is not a Vulkan device")?;
            let listed = hal
                .physical_device_capabilities()
                .supports_extension(extension);
            let mut offered = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
            if listed {
                let mut query = vk::PhysicalDeviceFeatures2::default().push_next(&mut offered);
                // SAFETY: the physical device is the instance's; the
                // statistics struct is chained only where its extension is
                // listed.
                unsafe { instance.get_physical_device_features2(physical, &mut query) };
            }
            // Without the statistics the device still compiles every
            // kernel (the driver accepts naga's SPIR-V), which is what
            // lavapipe, without the extension, can check.
            let statistics = offered.pipeline_executable_info == vk::TRUE;
            let mut enable = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default()
                .pipeline_executable_info(true);
            let open = {
                let enable = &mut enable;
                let callback: Box<wgpu::hal::vulkan::CreateDeviceCallback<'_>> =
                    Box::new(move |args| {
                        if statistics {
                            args.extensions.push(extension);
                            *args.create_info = args.create_info.push_next(enable);
                        }
                    });
                // SAFETY: the callback adds an extension the driver lists
                // and a feature it grants; it removes nothing.
                unsafe {
                    hal.open_with_callback(
                        features,
                        &adapter.limits(),
                        &wgpu::MemoryHints::Performance,
                        Some(callback),
                    )
                }
            }
            .context("opening a second Vulkan device for the statistics")?;
            let executables = statistics.then(|| {
                khr::pipeline_executable_properties::Device::new(instance, open.device.raw_device())
            });
            Ok(StatsDevice {
                device: open.device,
                executables,
                target,
                kept: RefCell::new(Vec::new()),
            })
        }

        pub fn clamps_buffers(&self) -> bool {
            self.target.clamps_buffers
        }

        /// Whether the driver reports statistics (or only compiles).
        pub fn reports_statistics(&self) -> bool {
            self.executables.is_some()
        }

        /// `wgsl` parsed and validated, for [`Self::spirv`] and
        /// [`Self::statistics`].
        pub fn parse(&self, wgsl: &str) -> Result<Parsed> {
            let (module, info) = spirv::parse(wgsl).map_err(|err| anyhow::anyhow!("{err}"))?;
            Ok(Parsed { module, info })
        }

        /// The kernel as SPIR-V for this device: with the runtime checks
        /// wgpu adds, but those `skipped`, as the crate hands it to the
        /// driver (the matrix kernel's rewritten for the Vulkan memory
        /// model, `wgpu_flash_attn::spirv`).
        pub fn spirv(&self, parsed: &Parsed, skipped: SkippedChecks) -> Result<Vec<u32>> {
            // (The forward's and decoding's entry point.)
            spirv::write(&parsed.module, &parsed.info, "main", &self.target, skipped)
                .map_err(|err| anyhow::anyhow!("{err}"))
        }

        /// The driver's statistics for a compute pipeline of `words`, whose
        /// bindings are those the parsed kernel declares.
        pub fn statistics(&self, words: &[u32], parsed: &Parsed) -> Result<Vec<Executable>> {
            let device = self.device.raw_device();
            let bindings = bindings(&parsed.module);
            let mut kept = self.kept.borrow_mut();
            kept.push(Objects::default());
            let objects = kept.last_mut().expect("just pushed");
            // SAFETY: every create info below is complete and valid for a
            // compute pipeline; what is created is recorded in `objects` at
            // once, and destroyed with the device, however this returns.
            unsafe {
                let shader = device.create_shader_module(
                    &vk::ShaderModuleCreateInfo::default().code(words),
                    None,
                )?;
                objects.shader = Some(shader);
                for set in &bindings {
                    let entries: Vec<vk::DescriptorSetLayoutBinding> = set
                        .iter()
                        .map(|&(binding, ty)| {
                            vk::DescriptorSetLayoutBinding::default()
                                .binding(binding)
                                .descriptor_type(ty)
                                .descriptor_count(1)
                                .stage_flags(vk::ShaderStageFlags::COMPUTE)
                        })
                        .collect();
                    let layout = device.create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default().bindings(&entries),
                        None,
                    )?;
                    objects.set_layouts.push(layout);
                }
                let layout = device.create_pipeline_layout(
                    &vk::PipelineLayoutCreateInfo::default().set_layouts(&objects.set_layouts),
                    None,
                )?;
                objects.layout = Some(layout);
                let stage = vk::PipelineShaderStageCreateInfo::default()
                    .stage(vk::ShaderStageFlags::COMPUTE)
                    .module(shader)
                    .name(c"main");
                let flags = match self.executables {
                    Some(_) => vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR,
                    None => vk::PipelineCreateFlags::empty(),
                };
                let info = vk::ComputePipelineCreateInfo::default()
                    .flags(flags)
                    .stage(stage)
                    .layout(layout);
                let pipeline = device
                    .create_compute_pipelines(vk::PipelineCache::null(), &[info], None)
                    .map_err(|(_, err)| err)
                    .context("the driver refused the pipeline")?[0];
                objects.pipeline = Some(pipeline);
                let Some(queries) = &self.executables else {
                    return Ok(Vec::new());
                };
                let executables = queries.get_pipeline_executable_properties(
                    &vk::PipelineInfoKHR::default().pipeline(pipeline),
                )?;
                let mut found = Vec::new();
                for (index, executable) in executables.iter().enumerate() {
                    let statistics = queries.get_pipeline_executable_statistics(
                        &vk::PipelineExecutableInfoKHR::default()
                            .pipeline(pipeline)
                            .executable_index(index as u32),
                    )?;
                    found.push(Executable {
                        name: text(executable.name_as_c_str()),
                        statistics: statistics
                            .iter()
                            .map(|s| Statistic {
                                name: text(s.name_as_c_str()),
                                description: text(s.description_as_c_str()),
                                value: value(s),
                            })
                            .collect(),
                    });
                }
                Ok(found)
            }
        }
    }

    /// The Vulkan objects of one pipeline (destroyed by [`StatsDevice`]'s
    /// drop).
    #[derive(Default)]
    struct Objects {
        shader: Option<vk::ShaderModule>,
        set_layouts: Vec<vk::DescriptorSetLayout>,
        layout: Option<vk::PipelineLayout>,
        pipeline: Option<vk::Pipeline>,
    }

    impl Objects {
        /// Destroys what was created, in reverse order.
        fn destroy(self, device: &ash::Device) {
            // SAFETY: each handle was created on `device` and no command
            // buffer ever used it.
            unsafe {
                if let Some(pipeline) = self.pipeline {
                    device.destroy_pipeline(pipeline, None);
                }
                if let Some(layout) = self.layout {
                    device.destroy_pipeline_layout(layout, None);
                }
                for &set in &self.set_layouts {
                    device.destroy_descriptor_set_layout(set, None);
                }
                if let Some(shader) = self.shader {
                    device.destroy_shader_module(shader, None);
                }
            }
        }
    }

    /// Each bind group's (binding, descriptor type), groups in order (an
    /// unused group gets an empty set layout).
    fn bindings(module: &naga::Module) -> Vec<Vec<(u32, vk::DescriptorType)>> {
        let mut sets: Vec<Vec<(u32, vk::DescriptorType)>> = Vec::new();
        for (_, global) in module.global_variables.iter() {
            let Some(binding) = &global.binding else {
                continue;
            };
            let ty = match global.space {
                naga::AddressSpace::Uniform => vk::DescriptorType::UNIFORM_BUFFER,
                _ => vk::DescriptorType::STORAGE_BUFFER,
            };
            let group = binding.group as usize;
            if sets.len() <= group {
                sets.resize(group + 1, Vec::new());
            }
            sets[group].push((binding.binding, ty));
        }
        sets
    }

    fn text(name: Result<&CStr, std::ffi::FromBytesUntilNulError>) -> String {
        name.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn value(statistic: &vk::PipelineExecutableStatisticKHR) -> String {
        // SAFETY: the union is read as the format the driver gave it.
        unsafe {
            match statistic.format {
                vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                    (statistic.value.b32 == vk::TRUE).to_string()
                }
                vk::PipelineExecutableStatisticFormatKHR::INT64 => statistic.value.i64.to_string(),
                vk::PipelineExecutableStatisticFormatKHR::UINT64 => statistic.value.u64.to_string(),
                vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => {
                    statistic.value.f64.to_string()
                }
                other => format!("({other:?})"),
            }
        }
    }
}

#[cfg(not(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
)))]
mod driver {
    //! Off wgpu's Vulkan platforms there is no driver to ask.

    use anyhow::{Result, bail};

    use super::{Executable, SkippedChecks};

    pub struct StatsDevice;
    pub struct Parsed;

    impl StatsDevice {
        pub fn open(
            _adapter: &wgpu::Adapter,
            _device: &wgpu::Device,
            _features: wgpu::Features,
        ) -> Result<Self> {
            bail!("shader-stats asks a Vulkan driver; this platform has none")
        }
        pub fn clamps_buffers(&self) -> bool {
            false
        }
        pub fn reports_statistics(&self) -> bool {
            false
        }
        pub fn parse(&self, _wgsl: &str) -> Result<Parsed> {
            unreachable!("no StatsDevice exists off Vulkan platforms")
        }
        pub fn spirv(&self, _parsed: &Parsed, _skipped: SkippedChecks) -> Result<Vec<u32>> {
            unreachable!("no StatsDevice exists off Vulkan platforms")
        }
        pub fn statistics(&self, _words: &[u32], _parsed: &Parsed) -> Result<Vec<Executable>> {
            unreachable!("no StatsDevice exists off Vulkan platforms")
        }
    }
}
