//! The kernels as SPIR-V for a Vulkan device: written by naga with the
//! options wgpu 30 gives it for that device (so the driver compiles the
//! same code wgpu would hand it), then, where naga declares the Vulkan
//! memory model (the cooperative-matrix kernel), with its accesses and
//! barriers ordered as that model requires ([`follow_vulkan_memory_model`]).
//! The crate creates such kernels through wgpu's SPIR-V passthrough
//! (`Features::PASSTHROUGH_SHADERS`); `flash-bench shader-stats` asks the
//! driver about the same words.

mod memory_model;
#[cfg(test)]
mod validator_tests;

#[cfg(test)]
pub(crate) use memory_model::memory_model_violations;
pub use memory_model::{SpirvRewriteError, follow_vulkan_memory_model, uses_vulkan_memory_model};

use crate::runtime_checks::SkippedChecks;

/// The facts about a Vulkan device that the SPIR-V wgpu writes for it
/// depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpirvTarget {
    /// The SPIR-V version: the highest the device's Vulkan version takes.
    pub version: (u8, u8),
    /// Whether storage-buffer indices are clamped: wgpu clamps them unless
    /// the driver offers robust buffer access 2 (which wgpu then enables).
    pub clamps_buffers: bool,
}

impl SpirvTarget {
    /// A Vulkan 1.3 device without robust buffer access 2 (every clamp
    /// kept): the tests' target.
    #[cfg(test)]
    pub(crate) const VULKAN_1_3: SpirvTarget = SpirvTarget {
        version: (1, 6),
        clamps_buffers: true,
    };

    /// The target of a device of Vulkan version `api` (a `VK_MAKE_API_VERSION`
    /// value), with or without robust buffer access 2, as wgpu 30 picks
    /// its SPIR-V options.
    pub fn for_vulkan(api: u32, robust_buffer_access2: bool) -> Self {
        let version = match (api >> 22 & 0x7f, api >> 12 & 0x3ff) {
            (1, 0) => (1, 0),
            (1, 1) => (1, 3),
            (1, 2) => (1, 5),
            _ => (1, 6),
        };
        SpirvTarget {
            version,
            clamps_buffers: !robust_buffer_access2,
        }
    }

    /// The target of `device`'s Vulkan driver; `None` off Vulkan.
    pub fn of_device(device: &wgpu::Device) -> Option<Self> {
        crate::vulkan_grants::spirv_target(device)
    }
}

/// A kernel's SPIR-V for `target` (its entry point `entry` alone), from
/// its parsed and validated module, with wgpu's runtime checks but those `skipped`, and without wgpu's
/// zeroing of workgroup memory (the crate turns it off for its kernels:
/// every workgroup variable is written before it is read). Under the
/// Vulkan memory model, rewritten to follow it.
pub fn write(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    target: &SpirvTarget,
    skipped: SkippedChecks,
) -> Result<Vec<u32>, String> {
    use naga::back::spv;
    use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
    let clamp = |on: bool| match on {
        true => BoundsCheckPolicy::Restrict,
        false => BoundsCheckPolicy::Unchecked,
    };
    let options = spv::Options {
        lang_version: target.version,
        flags: spv::WriterFlags::empty(),
        capabilities: None,
        bounds_check_policies: BoundsCheckPolicies {
            index: clamp(!skipped.bounds),
            buffer: clamp(!skipped.bounds && target.clamps_buffers),
            image_load: BoundsCheckPolicy::Unchecked,
            binding_array: BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: !skipped.loop_bounding,
        emit_int_div_checks: !skipped.division,
        ..spv::Options::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    let words =
        spv::write_vec(module, info, &options, Some(&pipeline)).map_err(|e| e.to_string())?;
    follow_vulkan_memory_model(&words).map_err(|e| e.to_string())
}

/// [`write()`] from WGSL text (parsed and validated here).
pub fn from_wgsl(
    wgsl: &str,
    entry: &str,
    target: &SpirvTarget,
    skipped: SkippedChecks,
) -> Result<Vec<u32>, String> {
    let (module, info) = parse(wgsl)?;
    write(&module, &info, entry, target, skipped)
}

/// `wgsl` parsed and validated (every capability allowed: the planner
/// checked the device's features before choosing the kernel).
pub fn parse(wgsl: &str) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(wgsl))?;
    Ok((module, info))
}

/// naga's own SPIR-V of a parsed module (SPIR-V 1.6, naga's defaults: no
/// rewrite), which the tests hold against the crate's.
#[cfg(test)]
pub(crate) fn nagas_own_words(module: &naga::Module, info: &naga::valid::ModuleInfo) -> Vec<u32> {
    let options = naga::back::spv::Options {
        lang_version: (1, 6),
        ..naga::back::spv::Options::default()
    };
    naga::back::spv::write_vec(module, info, &options, None).expect("naga writes SPIR-V")
}
