//! What flash-bench prints and writes: the adapter, its ceilings, and one
//! table row per (case, implementation); the same as JSON.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use wgpu_flash_attn::GpuInfo;

use crate::measure::{CaseReport, Status, bytes};
use crate::options::Impl;

#[derive(Debug, Clone, Serialize)]
pub struct AdapterJson {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub timestamps: bool,
    pub timestamps_inside_encoders: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size_x: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_shader_stage: u32,
}

impl AdapterJson {
    pub fn new(info: &wgpu::AdapterInfo, features: wgpu::Features, limits: &wgpu::Limits) -> Self {
        AdapterJson {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            vendor_id: info.vendor,
            device_id: info.device,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamps_inside_encoders: features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: limits.max_compute_workgroup_size_x,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
        }
    }

    pub fn of_device(info: &GpuInfo) -> Self {
        AdapterJson::new(&info.adapter, info.features, &info.limits)
    }

    /// Human-readable lines, indented.
    pub fn describe(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let subgroups = if self.subgroups {
            format!(
                "yes, sizes {}-{}",
                self.subgroup_min_size, self.subgroup_max_size
            )
        } else {
            "no".to_string()
        };
        format!(
            "  backend {}, {}, driver {} {}\n  \
             vendor 0x{:04x} device 0x{:04x}\n  \
             f16: {}  subgroups: {}  timestamps: {} (inside encoders: {})\n  \
             storage binding {}, buffer {}, workgroup memory {}, \
             {} invocations/workgroup (x up to {}), {} workgroups/dimension, \
             {} storage buffers/stage",
            self.backend,
            self.device_type,
            self.driver,
            self.driver_info,
            self.vendor_id,
            self.device_id,
            yes_no(self.shader_f16),
            subgroups,
            yes_no(self.timestamps),
            yes_no(self.timestamps_inside_encoders),
            bytes(self.max_storage_buffer_binding_size),
            bytes(self.max_buffer_size),
            bytes(u64::from(self.max_compute_workgroup_storage_size)),
            self.max_compute_invocations_per_workgroup,
            self.max_compute_workgroup_size_x,
            self.max_compute_workgroups_per_dimension,
            self.max_storage_buffers_per_shader_stage,
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceilings {
    /// Best median of the run (measured before and after every case).
    pub fma_gflops: f64,
    pub fma_measurements: Vec<f64>,
    /// Bytes read plus written per second.
    pub copy_gb_per_s: f64,
    pub copy_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub command: String,
    pub adapter: AdapterJson,
    pub timer: String,
    pub ceilings: Ceilings,
    pub cases: Vec<CaseReport>,
}

impl Report {
    /// Fills each result's share of the best FMA ceiling seen in the run:
    /// the ceiling drifts by up to 2x on a shared machine, the best is the
    /// adapter's capability, and it makes the shares conservative.
    pub fn finish(&mut self) {
        for case in &self.cases {
            self.ceilings.fma_measurements.push(case.fma_gflops_after);
        }
        self.ceilings.fma_gflops = self
            .ceilings
            .fma_measurements
            .iter()
            .copied()
            .fold(0.0, f64::max);
        let best = self.ceilings.fma_gflops;
        for case in &mut self.cases {
            for result in &mut case.results {
                result.pct_of_fma_ceiling = result.gflops.map(|g| 100.0 * g / best);
            }
        }
    }

    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed).count()
    }

    /// Whether any implementation of any case has a verdict (ran, or
    /// does not fit the adapter, which is a finding), rather than every one
    /// being skipped for options it does not take.
    pub fn reported_any(&self) -> bool {
        self.cases
            .iter()
            .flat_map(|c| &c.results)
            .any(|r| r.status != crate::measure::Status::Skipped)
    }

    pub fn print_header(&self) {
        println!(
            "adapter: {}\n{}",
            self.adapter.name,
            self.adapter.describe()
        );
        println!(
            "ceilings: FMA {:.1} GFLOP/s (best of {} medians), copy {:.1} GB/s (read + write, {} buffers)",
            self.ceilings.fma_gflops,
            self.ceilings.fma_measurements.len(),
            self.ceilings.copy_gb_per_s,
            bytes(self.ceilings.copy_bytes)
        );
        println!("timer: {}\n", self.timer);
    }

    pub fn print_table(&self) {
        println!(
            "{:<42} {:<8} {:>10} {:>9} {:>7} {:>8} {:>10} {:>9}  status",
            "case", "impl", "time ms", "GFLOP/s", "% FMA", "vs naive", "GPU mem", "max|err|"
        );
        for case in &self.cases {
            for r in &case.results {
                let num = |v: Option<f64>, precision: usize| {
                    v.map_or("-".to_string(), |x| format!("{x:.precision$}"))
                };
                let status = match (r.status, &r.note) {
                    // The backward's note carries its ratio to the forward.
                    (Status::Ok, Some(note)) if r.implementation == Impl::Backward => {
                        format!("ok ({note})")
                    }
                    (Status::Ok, _)
                        if r.implementation == Impl::Flash && case.runs_as_decode.is_some() =>
                    {
                        "ok (as split-KV decoding)".to_string()
                    }
                    (status, _) => status_text(status, r.note.as_deref()),
                };
                println!(
                    "{:<42} {:<8} {:>10} {:>9} {:>6}% {:>7}x {:>10} {:>9}  {}",
                    case.name,
                    r.implementation.to_string(),
                    num(r.median_ms, 2),
                    num(r.gflops, 2),
                    num(r.pct_of_fma_ceiling, 1),
                    num(r.speedup_over_naive, 2),
                    r.gpu_bytes.map_or("-".to_string(), bytes),
                    r.max_abs_err
                        .map_or("-".to_string(), |e| format!("{e:.2e}")),
                    status
                );
            }
        }
        println!(
            "\nGFLOP/s counts 2 x (head_dim + head_dim_v) FLOPs per (query, visible key) (linear: \
             4 per (token, head dim, value head dim) per head, see LinearShape::flops); % FMA is \
             of the best ceiling above; backward rows count 2.5 x the forward's FLOPs (FlashAttention's \
             count); GPU mem is what the call allocates (output and scratch; the parameter uniforms, ~100 bytes, are not counted); \
             GPU results are checked against the f64 reference (tolerance {:e} plus the output's \
             storage rounding; f16 cases on cooperative matrices or f16 products, which round the \
             weights to f16 before P V: plus 2^-11 of the largest |v|, see docs/semantics.md) \
             before timing.",
            crate::measure::TOLERANCE
        );
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A result's status column (notes explain failures and skips).
fn status_text(status: Status, note: Option<&str>) -> String {
    let note = note.unwrap_or("");
    match status {
        Status::Ok => "ok".to_string(),
        Status::Failed => format!("FAILED {note}"),
        Status::DoesNotFit => format!("does not fit: {note}"),
        Status::Skipped => format!("skipped: {note}"),
    }
}
