//! Compute pipelines, built once per specialization and reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::shaders::{Kernel, Specialization};

/// A compiled kernel and the bind group layout its bindings follow.
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group_layout: wgpu::BindGroupLayout,
}

/// Pipelines keyed by [`Specialization`]; a repeated call compiles nothing.
#[derive(Default)]
pub(crate) struct PipelineCache {
    pipelines: Mutex<HashMap<Specialization, Arc<CachedPipeline>>>,
    layouts: Mutex<HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
}

/// A panic while a lock was held leaves the maps intact; keep using them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PipelineCache {
    pub fn len(&self) -> usize {
        lock(&self.pipelines).len()
    }

    /// The pipeline for `spec`, compiling it on first use.
    pub fn get(&self, device: &wgpu::Device, spec: &Specialization) -> Result<Arc<CachedPipeline>> {
        if let Some(found) = lock(&self.pipelines).get(spec) {
            return Ok(found.clone());
        }
        let source = wgsl_source(spec)?;
        let kernel = spec.kernel();
        let (bind_group_layout, pipeline_layout) = lock(&self.layouts)
            .entry(kernel)
            .or_insert_with(|| layouts(device, kernel))
            .clone();
        let label = spec.label();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
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
        });
        let cached = Arc::new(CachedPipeline {
            pipeline,
            bind_group_layout,
        });
        lock(&self.pipelines).insert(*spec, cached.clone());
        Ok(cached)
    }
}

/// The WGSL text of `spec`, a template mistake becoming the crate's error.
fn wgsl_source(spec: &Specialization) -> Result<String> {
    spec.source().map_err(|err| Error::ShaderSource {
        kernel: spec.label(),
        reason: err.to_string(),
    })
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
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(binding, buffer)| wgpu::BindGroupEntry {
            binding: binding as u32,
            resource: buffer.as_entire_binding(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout,
        entries: &entries,
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

/// Records one compute pass that runs `pipeline` once per bind group, each
/// over `workgroups` (several bind groups: one per KV-cache buffer).
pub(crate) fn encode_dispatches(
    encoder: &mut wgpu::CommandEncoder,
    label: &str,
    pipeline: &CachedPipeline,
    bind_groups: &[wgpu::BindGroup],
    [x, y, z]: [u32; 3],
) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(&pipeline.pipeline);
    for bind_group in bind_groups {
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(x, y, z);
    }
}
