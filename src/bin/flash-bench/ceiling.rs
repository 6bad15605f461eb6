//! The adapter's own ceilings, measured: arithmetic with an FMA-bound kernel
//! and memory bandwidth with a copy kernel, so attention speed can be stated
//! as a share of what the adapter can do.

use anyhow::Result;
use wgpu_flash_attn::Gpu;

use crate::ceiling_kernels::{CeilingKernel, copy_source, fma_source};
use crate::timing::{Timing, TimingPlan, time_gpu};

const ITERATIONS: u32 = 1024;
/// Copies of the FMA chains per loop trip (see shaders/fma_ceiling.wgsl).
const COPIES: u32 = 4;
const WORKGROUP_SIZE: u32 = 64;
/// FLOPs per loop trip: COPIES x 8 vec4 FMAs, two FLOPs per lane.
const FLOPS_PER_TRIP: f64 = COPIES as f64 * 8.0 * 4.0 * 2.0;

/// Invocations per workgroup of the copy kernel.
const COPY_WORKGROUP_SIZE: u32 = 64;

/// A measured arithmetic ceiling.
#[derive(Debug, Clone)]
pub struct Ceiling {
    pub gflops: f64,
    pub timing: Timing,
}

/// A measured memory bandwidth ceiling.
#[derive(Debug, Clone)]
pub struct Bandwidth {
    /// Bytes read plus bytes written, per second, in units of 1e9.
    pub gb_per_s: f64,
    /// Bytes copied per run.
    pub bytes: u64,
    #[allow(
        dead_code,
        reason = "tests/timing.rs checks it; flash-bench reports only the rate"
    )]
    pub timing: Timing,
}

/// Both ceiling kernels, compiled once for a device: the FMA ceiling is
/// re-measured after every case, and compiling is slow on software adapters.
pub struct CeilingProbes<'a> {
    gpu: &'a Gpu,
    fma: CeilingKernel,
    copy: CeilingKernel,
}

impl<'a> CeilingProbes<'a> {
    pub fn new(gpu: &'a Gpu) -> Result<Self> {
        Ok(CeilingProbes {
            gpu,
            // sink
            fma: CeilingKernel::new(
                gpu,
                "fma ceiling pipeline",
                &fma_source(ITERATIONS, COPIES, WORKGROUP_SIZE),
                &[false],
            )?,
            // source, destination
            copy: CeilingKernel::new(
                gpu,
                "copy ceiling pipeline",
                &copy_source(COPY_WORKGROUP_SIZE),
                &[true, false],
            )?,
        })
    }

    /// Runs the FMA kernel over `workgroups` workgroups (more for fast GPUs:
    /// the run should last tens of milliseconds) and reports GFLOP/s from the
    /// median time.
    pub fn measure_fma(&self, workgroups: u32, plan: TimingPlan) -> Result<Ceiling> {
        let gpu = self.gpu;
        let sink = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("fma ceiling sink"),
            size: 16 * 1024,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let bind_group = self.fma.bind(gpu, &[&sink]);
        let max_x = gpu.info().limits.max_compute_workgroups_per_dimension;
        let (x, y) = (workgroups.min(max_x), workgroups.div_ceil(max_x).max(1));
        let timing = time_gpu(gpu, plan, |encoder| {
            self.fma.record(encoder, &bind_group, [x, y]);
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

    /// Copies a `bytes`-sized buffer (rounded down to whole vec4s, capped by
    /// the adapter's binding size) into another and reports (read + written)
    /// GB/s from the median time. Use a buffer well past the adapter's
    /// caches: tens of MiB on CPUs, hundreds on GPUs.
    pub fn measure_copy(&self, bytes: u64, plan: TimingPlan) -> Result<Bandwidth> {
        let gpu = self.gpu;
        let limits = &gpu.info().limits;
        let bytes = bytes
            .min(limits.max_storage_buffer_binding_size)
            .min(limits.max_buffer_size)
            / 16
            * 16;
        // A device that cannot hold them is a typed error, not a panic.
        let buffer = |label| gpu.create_buffer(label, bytes, wgpu::BufferUsages::STORAGE);
        let (source, destination) = (
            buffer("copy ceiling source")?,
            buffer("copy ceiling target")?,
        );
        let bind_group = self.copy.bind(gpu, &[&source, &destination]);
        let total = (bytes / 16).div_ceil(u64::from(COPY_WORKGROUP_SIZE)) as u32;
        let max_x = limits.max_compute_workgroups_per_dimension;
        let (gx, gy) = (total.min(max_x), total.div_ceil(max_x));
        let timing = time_gpu(gpu, plan, |encoder| {
            self.copy.record(encoder, &bind_group, [gx, gy]);
            Ok(())
        })?;
        Ok(Bandwidth {
            gb_per_s: 2.0 * bytes as f64 / (timing.median_ms * 1e6),
            bytes,
            timing,
        })
    }
}
