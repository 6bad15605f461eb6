//! The adapter's own arithmetic ceiling, measured with an FMA-bound kernel,
//! so attention speed can be stated as a share of what the adapter can do.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::pipelines::bind_buffers;
use crate::shaders::Specialization;
use crate::timing::{Timing, TimingPlan, time_gpu};

const ITERATIONS: u32 = 1024;
/// Copies of the FMA chains per loop trip (see shaders/fma_ceiling.wgsl).
const COPIES: u32 = 4;
const WORKGROUP_SIZE: u32 = 64;
/// FLOPs per loop trip: COPIES x 8 vec4 FMAs, two FLOPs per lane.
const FLOPS_PER_TRIP: f64 = COPIES as f64 * 8.0 * 4.0 * 2.0;

/// A measured ceiling.
#[derive(Debug, Clone)]
pub struct Ceiling {
    pub gflops: f64,
    pub timing: Timing,
}

/// Runs the FMA kernel over `workgroups` workgroups (more for fast GPUs:
/// the run should last tens of milliseconds) and reports GFLOP/s from the
/// median time.
pub fn measure_fma(gpu: &Gpu, workgroups: u32, plan: TimingPlan) -> Result<Ceiling> {
    let spec = Specialization::FmaCeiling {
        iterations: ITERATIONS,
        copies: COPIES,
        workgroup_size: WORKGROUP_SIZE,
    };
    let pipeline = gpu.validated("fma ceiling pipeline", || {
        gpu.pipelines.get(gpu.device(), &spec)
    })?;
    let sink = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("fma ceiling sink"),
        size: 16 * 1024,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let bind_group = bind_buffers(gpu.device(), &pipeline.bind_group_layout, &[&sink]);
    let max_x = gpu.info().limits.max_compute_workgroups_per_dimension;
    let (x, y) = (workgroups.min(max_x), workgroups.div_ceil(max_x).max(1));
    let timing = time_gpu(gpu, plan, |encoder| {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    })?;
    let flops = f64::from(x)
        * f64::from(y)
        * f64::from(WORKGROUP_SIZE)
        * f64::from(ITERATIONS)
        * FLOPS_PER_TRIP;
    Ok(Ceiling {
        gflops: flops / (timing.median_ms * 1e6),
        timing,
    })
}
