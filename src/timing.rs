//! Timing of GPU work: warm-up, repeated runs, median.

use std::time::Instant;

use crate::error::Result;
use crate::gpu::Gpu;

/// Which clock produced a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Host wall clock around submit and a blocking wait: includes submit
    /// overhead, so it slightly overstates short kernels.
    WallClock,
}

impl std::fmt::Display for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Timer::WallClock => f.write_str("wall clock (submit + wait)"),
        }
    }
}

/// Median and spread of repeated runs.
#[derive(Debug, Clone)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub runs: usize,
    pub timer: Timer,
}

/// How many runs to make.
#[derive(Debug, Clone, Copy)]
pub struct TimingPlan {
    pub warmup: usize,
    pub runs: usize,
}

impl Default for TimingPlan {
    fn default() -> Self {
        TimingPlan { warmup: 1, runs: 5 }
    }
}

/// Times `record`, which records the work into an encoder, submitting and
/// waiting for each run separately.
pub fn time_gpu(
    gpu: &Gpu,
    plan: TimingPlan,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<Timing> {
    let mut run_once = || -> Result<f64> {
        let mut encoder = gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("timed"),
            });
        record(&mut encoder)?;
        let start = Instant::now();
        gpu.queue().submit([encoder.finish()]);
        gpu.wait()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..plan.warmup {
        run_once()?;
    }
    let mut times = (0..plan.runs.max(1))
        .map(|_| run_once())
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: median(&times),
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        runs: times.len(),
        timer: Timer::WallClock,
    })
}

/// Median of sorted values.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}
