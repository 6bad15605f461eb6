//! Compute pipelines, built once per specialization and reused.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::runtime_checks::SkippedChecks;
use crate::shaders::{Kernel, ShaderOverrides, Specialization};
use crate::spirv::SpirvTarget;

/// A compiled kernel and the bind group layout its bindings follow.
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group_layout: wgpu::BindGroupLayout,
}

/// Pipelines kept by default. A compiled pipeline can be large (about
/// 29 MB each on lavapipe, whose code is unrolled machine code), and a
/// long-running program that meets many shapes would otherwise keep every
/// one it ever compiled; a model uses a handful.
pub(crate) const DEFAULT_PIPELINE_CAPACITY: usize = 64;

/// Pipelines keyed by [`Specialization`]; a repeated call compiles nothing.
/// At most `capacity` are kept: compiling one more evicts the least
/// recently used (calls already holding it keep it alive).
pub(crate) struct PipelineCache {
    pipelines: Mutex<Entries<Arc<CachedPipeline>>>,
    layouts: Mutex<HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
    capacity: AtomicUsize,
    /// wgpu's runtime checks the kernels compile without
    /// ([`crate::Gpu::skip_shader_runtime_checks_of`]).
    skipped: Mutex<SkippedChecks>,
    /// `shaders/` files replaced ([`Gpu::override_shader_file`]).
    overrides: Mutex<ShaderOverrides>,
    /// Bumped after the replaced files or the skipped checks change: a
    /// pipeline compiled from what was there before is not cached (a
    /// thread may compile while another changes them).
    generation: AtomicU64,
    /// The device's SPIR-V target, asked once (`None` off Vulkan).
    spirv_target: OnceLock<Option<SpirvTarget>>,
    /// Whether the device is a browser's WebGPU, whose compilers take the
    /// kernels' WGSL as [`Specialization::browser_source_with`] writes it.
    browser: bool,
}

/// Cached values (pipelines) with the tick of their last use.
struct Entries<T> {
    by_spec: HashMap<Specialization, (T, u64)>,
    tick: u64,
}

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries {
            by_spec: HashMap::new(),
            tick: 0,
        }
    }
}

impl<T: Clone> Entries<T> {
    /// Marks `spec` used now and returns it, if cached.
    fn touch(&mut self, spec: &Specialization) -> Option<T> {
        self.tick += 1;
        let tick = self.tick;
        let (pipeline, used) = self.by_spec.get_mut(spec)?;
        *used = tick;
        Some(pipeline.clone())
    }

    /// Adds `value` as the most recently used, first evicting the least
    /// recently used ones so that at most `capacity` remain.
    fn insert(&mut self, spec: Specialization, value: T, capacity: usize) {
        self.shrink_to(capacity.saturating_sub(1));
        self.tick += 1;
        self.by_spec.insert(spec, (value, self.tick));
    }

    /// Drops least recently used entries until at most `keep` remain.
    fn shrink_to(&mut self, keep: usize) {
        while self.by_spec.len() > keep {
            let oldest = self
                .by_spec
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(spec, _)| *spec);
            match oldest {
                Some(spec) => self.by_spec.remove(&spec),
                None => break,
            };
        }
    }
}

impl PipelineCache {
    /// The (empty) cache of a device of `backend`.
    pub fn for_backend(backend: wgpu::Backend) -> Self {
        PipelineCache {
            browser: backend == wgpu::Backend::BrowserWebGpu,
            pipelines: Mutex::default(),
            layouts: Mutex::default(),
            capacity: AtomicUsize::new(DEFAULT_PIPELINE_CAPACITY),
            skipped: Mutex::new(SkippedChecks::CRATE_DEFAULT),
            overrides: Mutex::default(),
            generation: AtomicU64::new(0),
            spirv_target: OnceLock::new(),
        }
    }
}

/// A panic while a lock was held leaves the maps intact; keep using them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PipelineCache {
    pub fn len(&self) -> usize {
        lock(&self.pipelines).by_spec.len()
    }

    /// Keeps at most `capacity` pipelines (at least 1), evicting the least
    /// recently used now if more are cached.
    pub fn set_capacity(&self, capacity: usize) {
        let capacity = capacity.max(1);
        self.capacity.store(capacity, Ordering::Relaxed);
        lock(&self.pipelines).shrink_to(capacity);
    }

    /// The most pipelines kept.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// From now on, compiles kernels without the runtime checks in
    /// `skipped` (and with the others), and drops the pipelines compiled
    /// before.
    ///
    /// # Safety
    /// As [`wgpu::Device::create_shader_module_trusted`]: the kernels must
    /// stay within their arrays, end their loops and divide by nonzero
    /// values, for the checks skipped.
    pub unsafe fn skip_runtime_checks(&self, skipped: SkippedChecks) {
        *lock(&self.skipped) = skipped;
        self.generation.fetch_add(1, Ordering::SeqCst);
        lock(&self.pipelines).shrink_to(0);
    }

    /// Compiles kernels from now on with the `shaders/` file `name`
    /// replaced by `text`, and drops the pipelines compiled before.
    pub fn override_file(&self, name: &str, text: String) -> Result<()> {
        if !lock(&self.overrides).replace(name, text) {
            return Err(Error::UnknownShaderFile {
                name: name.to_string(),
                known: ShaderOverrides::names().collect::<Vec<_>>().join(", "),
            });
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        lock(&self.pipelines).shrink_to(0);
        Ok(())
    }

    /// The WGSL text of `spec` as this cache compiles it (with its
    /// replaced files).
    pub fn source(&self, spec: &Specialization) -> Result<String> {
        let overrides = lock(&self.overrides);
        if self.browser {
            spec.browser_source_with(&overrides)
        } else {
            spec.source_with(&overrides)
        }
        .map_err(|err| Error::ShaderSource {
            kernel: spec.label(),
            reason: err.to_string(),
        })
    }

    /// The runtime checks kernels compile without.
    pub fn skipped_runtime_checks(&self) -> SkippedChecks {
        *lock(&self.skipped)
    }

    /// `device`'s SPIR-V target (the cache serves one device).
    fn spirv_target(&self, device: &wgpu::Device) -> Option<SpirvTarget> {
        *self
            .spirv_target
            .get_or_init(|| SpirvTarget::of_device(device))
    }

    /// The pipeline for `spec`, compiling it on first use. Under error
    /// scopes: a kernel wgpu refuses (a replaced file that no longer
    /// compiles, a driver's error) is [`Error::ShaderSource`] with wgpu's
    /// message, not a panic in the caller's encoder, and is not cached.
    pub fn get(&self, gpu: &Gpu, spec: &Specialization) -> Result<Arc<CachedPipeline>> {
        if let Some(found) = lock(&self.pipelines).touch(spec) {
            return Ok(found);
        }
        let device = gpu.device();
        // Read before the source and the checks it compiles with.
        let generation = self.generation.load(Ordering::SeqCst);
        let source = self.source(spec)?;
        // A replaced file's loops may not be proven: it keeps the counters.
        let skipped = self.skipped_runtime_checks().for_kernel(&source);
        let kernel = spec.kernel();
        kernel.check_storage_buffers(device.limits().max_storage_buffers_per_shader_stage)?;
        let (bind_group_layout, pipeline_layout) = lock(&self.layouts)
            .entry(kernel)
            .or_insert_with(|| layouts(device, kernel))
            .clone();
        let label = spec.label();
        // On Vulkan, naga's SPIR-V of the matrix kernel declares the Vulkan
        // memory model without following it (src/spirv/): the crate writes
        // the words itself and hands them to the driver as they are.
        let vulkan_matrices = if spec.needs_cooperative_matrices() {
            self.spirv_target(device)
        } else {
            None
        };
        let compiled = gpu.validated("compiling a kernel", || {
            let module = match vulkan_matrices {
                Some(target) => {
                    passthrough_module(device, &label, kernel, &source, target, skipped)?
                }
                None => wgsl_module(device, &label, source, skipped),
            };
            Ok::<_, Error>(
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(kernel.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &[],
                        // Every workgroup variable is written before it is read.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                }),
            )
        });
        let pipeline = match compiled {
            Ok(pipeline) => pipeline?,
            Err(Error::GpuValidation { message, .. }) => {
                return Err(Error::ShaderSource {
                    kernel: label,
                    reason: message,
                });
            }
            Err(other) => return Err(other),
        };
        let cached = Arc::new(CachedPipeline {
            pipeline,
            bind_group_layout,
        });
        let mut pipelines = lock(&self.pipelines);
        // Unchanged since: what was compiled is what later calls want.
        if self.generation.load(Ordering::SeqCst) == generation {
            pipelines.insert(*spec, cached.clone(), self.capacity());
        }
        Ok(cached)
    }
}

/// The kernel's module from the crate's own SPIR-V of it for `target`
/// (`crate::spirv`), through wgpu's passthrough.
fn passthrough_module(
    device: &wgpu::Device,
    label: &str,
    kernel: Kernel,
    source: &str,
    target: SpirvTarget,
    skipped: SkippedChecks,
) -> Result<wgpu::ShaderModule> {
    if !device
        .features()
        .contains(wgpu::Features::PASSTHROUGH_SHADERS)
    {
        // (The planner refuses the tier on such a device first.)
        return Err(Error::ShaderSource {
            kernel: label.to_string(),
            reason: "the device lacks PASSTHROUGH_SHADERS, which the matrix kernel's SPIR-V \
                     needs on Vulkan"
                .to_string(),
        });
    }
    let words = crate::spirv::from_wgsl(source, kernel.entry_point(), &target, skipped).map_err(
        |reason| Error::ShaderSource {
            kernel: label.to_string(),
            reason,
        },
    )?;
    // SAFETY: the words are naga's own SPIR-V of a module it validated,
    // with wgpu's runtime checks but those `skipped` (vouched for as for
    // every kernel), changed only in memory-access operands, barrier
    // semantics and one capability that wgpu enables with cooperative
    // matrices; the pipeline layout is the kernel's own, as for every
    // other kernel.
    Ok(unsafe {
        device.create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
            label: Some(label),
            entry_points: Cow::Owned(vec![wgpu::PassthroughShaderEntryPoint {
                name: kernel.entry_point().into(),
                // (Read by Metal only.)
                workgroup_size: (0, 0, 0),
            }]),
            spirv: Some(Cow::Owned(words)),
            ..Default::default()
        })
    })
}

/// The kernel's module from its WGSL, through wgpu's naga.
fn wgsl_module(
    device: &wgpu::Device,
    label: &str,
    source: String,
    skipped: SkippedChecks,
) -> wgpu::ShaderModule {
    let descriptor = wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    };
    if skipped.any() {
        // SAFETY: the loops end (proven from the text); for the other
        // checks skipped, the caller of skip_runtime_checks vouched for the
        // kernels.
        unsafe { device.create_shader_module_trusted(descriptor, skipped.to_wgpu()) }
    } else {
        device.create_shader_module(descriptor)
    }
}

fn layouts(device: &wgpu::Device, kernel: Kernel) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
        .bindings()
        .iter()
        .enumerate()
        .map(|(binding, ty)| wgpu::BindGroupLayoutEntry {
            binding: binding as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: *ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(kernel.file_name()),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(kernel.file_name()),
        bind_group_layouts: &[Some(&bind_group_layout)],
        immediate_size: 0,
    });
    (bind_group_layout, pipeline_layout)
}

/// A bind group binding `buffers` whole, in binding order.
pub(crate) fn bind_buffers(
    gpu: &Gpu,
    layout: &wgpu::BindGroupLayout,
    buffers: &[&wgpu::Buffer],
) -> Result<wgpu::BindGroup> {
    let resources = buffers.iter().map(|b| b.as_entire_binding()).collect();
    bind_resources(gpu, layout, resources)
}

/// [`bind_buffers`] for resources that may be parts of buffers. Under
/// error scopes: wgpu refuses a bind group over a buffer the caller has
/// destroyed since wrapping it, which would otherwise panic in the
/// caller's encoder.
pub(crate) fn bind_resources(
    gpu: &Gpu,
    layout: &wgpu::BindGroupLayout,
    resources: Vec<wgpu::BindingResource<'_>>,
) -> Result<wgpu::BindGroup> {
    let entries: Vec<wgpu::BindGroupEntry> = resources
        .into_iter()
        .enumerate()
        .map(|(binding, resource)| wgpu::BindGroupEntry {
            binding: binding as u32,
            resource,
        })
        .collect();
    gpu.validated("binding a kernel's buffers", || {
        gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        })
    })
}

/// Invocations per workgroup of the element-wise kernels (RoPE, KV append,
/// the merge).
pub(crate) const ELEMENTWISE_WORKGROUP: u32 = 64;

/// Workgroups for `invocations` one-per-item invocations of
/// `ELEMENTWISE_WORKGROUP`, folded into a second dimension past the
/// per-dimension limit (the kernels rebuild the index from both).
pub(crate) fn elementwise_groups(
    gpu: &Gpu,
    what: &'static str,
    invocations: u64,
) -> Result<[u32; 3]> {
    let groups = invocations
        .div_ceil(u64::from(ELEMENTWISE_WORKGROUP))
        .max(1);
    let limit = u64::from(gpu.info().limits.max_compute_workgroups_per_dimension);
    if limit == 0 {
        // A device without compute dispatches runs nothing.
        return Err(Error::DispatchTooLarge {
            what,
            axis: "x",
            groups,
            limit: 0,
        });
    }
    let y = groups.div_ceil(limit);
    if y > limit {
        return Err(Error::DispatchTooLarge {
            what,
            axis: "y",
            groups: y,
            limit: limit as u32,
        });
    }
    Ok([groups.min(limit) as u32, y as u32, 1])
}

/// One compute pass ready to record: a kernel and its dispatches, each a
/// bind group and a grid. A call that records several passes prepares them
/// all first, so that an error (a kernel refused, memory out) leaves the
/// caller's encoder as it was.
pub(crate) struct PreparedPass {
    pub label: &'static str,
    pub pipeline: Arc<CachedPipeline>,
    pub dispatches: Vec<(wgpu::BindGroup, [u32; 3])>,
}

impl PreparedPass {
    /// A pass of one dispatch.
    pub fn one(
        label: &'static str,
        pipeline: Arc<CachedPipeline>,
        bind_group: wgpu::BindGroup,
        workgroups: [u32; 3],
    ) -> Self {
        PreparedPass {
            label,
            pipeline,
            dispatches: vec![(bind_group, workgroups)],
        }
    }

    pub fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        let dispatches = self.dispatches.iter().map(|(group, grid)| (group, *grid));
        record_pass(encoder, self.label, &self.pipeline, dispatches);
    }
}

/// Records one compute pass that runs `pipeline` once per bind group, each
/// over `workgroups` (several bind groups: one per KV-cache buffer).
pub(crate) fn encode_dispatches(
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    pipeline: &CachedPipeline,
    bind_groups: &[wgpu::BindGroup],
    workgroups: [u32; 3],
) {
    let dispatches = bind_groups.iter().map(|group| (group, workgroups));
    record_pass(encoder, label, pipeline, dispatches);
}

/// One compute pass of `pipeline`: each dispatch a bind group and a grid.
fn record_pass<'a>(
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    pipeline: &CachedPipeline,
    dispatches: impl Iterator<Item = (&'a wgpu::BindGroup, [u32; 3])>,
) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(&pipeline.pipeline);
    for (bind_group, [x, y, z]) in dispatches {
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(x, y, z);
    }
}

#[cfg(test)]
mod tests {
    use super::Entries;
    use crate::shaders::Specialization;

    fn spec(n: u32) -> Specialization {
        Specialization::Combine {
            workgroup_size: n,
            out: crate::tensor::DType::F32,
        }
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut entries = Entries::default();
        entries.insert(spec(1), 1, 2);
        entries.insert(spec(2), 2, 2);
        // 1 is used again, so 2 is now the least recently used.
        assert_eq!(entries.touch(&spec(1)), Some(1));
        entries.insert(spec(3), 3, 2);
        assert_eq!(entries.touch(&spec(2)), None);
        assert_eq!(entries.touch(&spec(1)), Some(1));
        assert_eq!(entries.touch(&spec(3)), Some(3));
        entries.shrink_to(1);
        assert_eq!(entries.by_spec.len(), 1);
        assert_eq!(entries.touch(&spec(3)), Some(3));
    }
}
