//! Compute pipelines, built once per specialization and reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::shaders::Specialization;

/// Binding layout of `shaders/flash_attention.wgsl`, in binding order.
const FORWARD_BINDINGS: [wgpu::BufferBindingType; 7] = [
    wgpu::BufferBindingType::Uniform,
    wgpu::BufferBindingType::Storage { read_only: true },
    wgpu::BufferBindingType::Storage { read_only: true },
    wgpu::BufferBindingType::Storage { read_only: true },
    wgpu::BufferBindingType::Storage { read_only: false },
    wgpu::BufferBindingType::Storage { read_only: false },
    wgpu::BufferBindingType::Storage { read_only: true },
];

/// A compiled kernel and the bind group layout its bindings follow.
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group_layout: wgpu::BindGroupLayout,
}

/// Pipelines keyed by [`Specialization`]; a repeated call compiles nothing.
pub(crate) struct PipelineCache {
    forward_layout: wgpu::BindGroupLayout,
    forward_pipeline_layout: wgpu::PipelineLayout,
    pipelines: Mutex<HashMap<Specialization, Arc<CachedPipeline>>>,
}

impl PipelineCache {
    pub fn new(device: &wgpu::Device) -> Self {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = FORWARD_BINDINGS
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
        let forward_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("flash_attention bindings"),
            entries: &entries,
        });
        let forward_pipeline_layout =
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("flash_attention layout"),
                bind_group_layouts: &[Some(&forward_layout)],
                immediate_size: 0,
            });
        PipelineCache {
            forward_layout,
            forward_pipeline_layout,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Specialization, Arc<CachedPipeline>>> {
        // A panic while holding the lock leaves the map intact; keep using it.
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pipeline for `spec`, compiling it on first use.
    pub fn get(&self, device: &wgpu::Device, spec: &Specialization) -> Arc<CachedPipeline> {
        if let Some(found) = self.lock().get(spec) {
            return found.clone();
        }
        let label = spec.label();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(spec.source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&self.forward_pipeline_layout),
            module: &module,
            entry_point: Some(spec.kernel.entry_point()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Every workgroup variable is written before it is read.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let cached = Arc::new(CachedPipeline {
            pipeline,
            bind_group_layout: self.forward_layout.clone(),
        });
        self.lock().insert(*spec, cached.clone());
        cached
    }
}
