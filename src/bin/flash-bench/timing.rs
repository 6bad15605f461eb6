//! Timing of GPU work: warm-up, repeated runs, median; GPU timestamps where
//! the device has them, the host wall clock otherwise.
//!
//! flash-bench's own module; benches/forward.rs and tests/timing.rs include
//! the file with `#[path]`, so it uses nothing but the library's public API.
//! The recorded work returns the library's `Result` (it records library
//! calls); the timer's own failures are `anyhow` errors.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use wgpu_flash_attn::Gpu;

/// Which clock produced a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// GPU timestamps written before and after the recorded work.
    GpuTimestamps,
    /// Host wall clock around submit and a blocking wait: includes submit
    /// overhead, so it slightly overstates short kernels.
    WallClock,
}

impl std::fmt::Display for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Timer::GpuTimestamps => f.write_str("GPU timestamps"),
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

/// Two timestamps bracketing the recorded work, and where they land.
struct Stopwatch {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    /// The host's copy of `resolved`: a resolve target cannot be mapped.
    readback: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

impl Stopwatch {
    /// A stopwatch where the device can write timestamps inside encoders.
    fn for_device(gpu: &Gpu) -> Option<Self> {
        gpu.info()
            .has_encoder_timestamps()
            .then(|| Stopwatch::new(gpu))
    }

    fn new(gpu: &Gpu) -> Self {
        let queries = gpu.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolved = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("timing resolve"),
            size: 2 * u64::from(wgpu::QUERY_SIZE),
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("timing readback"),
            size: 2 * u64::from(wgpu::QUERY_SIZE),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Stopwatch {
            queries,
            resolved,
            readback,
            period_ns: f64::from(gpu.queue().get_timestamp_period()),
        }
    }

    /// Records the resolve of both timestamps and their copy to the host
    /// side, after the work.
    fn finish(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.write_timestamp(&self.queries, 1);
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, self.resolved.size());
    }

    /// The time between the two timestamps, once the submission finished.
    fn elapsed_ms(&self, gpu: &Gpu) -> Result<f64> {
        let ticks = self.read_ticks(gpu)?;
        let delta = ticks[1]
            .checked_sub(ticks[0])
            .ok_or_else(|| anyhow!("timestamps went backwards: {ticks:?}"))?;
        Ok(delta as f64 * self.period_ns / 1e6)
    }

    fn read_ticks(&self, gpu: &Gpu) -> Result<[u64; 2]> {
        let slice = self.readback.slice(..);
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            // The receiver waits below; a send error cannot happen.
            let _ = sender.send(result);
        });
        gpu.wait()?;
        receiver
            .recv()
            .context("the timestamp readback was dropped")?
            .context("mapping the timestamps")?;
        let ticks = {
            let bytes = slice.get_mapped_range().context("reading the timestamps")?;
            // Timestamps are u64s in the device's (= the host's) byte order.
            let tick = |i: usize| {
                let size = std::mem::size_of::<u64>();
                u64::from_ne_bytes(
                    bytes[i * size..(i + 1) * size]
                        .try_into()
                        .expect("eight bytes"),
                )
            };
            [tick(0), tick(1)]
        };
        self.readback.unmap();
        Ok(ticks)
    }
}

/// GPU time a hardware GPU spends on the work, in batches that grow, before
/// it is timed. GPUs raise their clocks only under sustained load: on the
/// H200 decode steps timed right after the host had filled a cache ran up
/// to 5x slower than steps timed right after a prefill had loaded the GPU
/// (BENCHMARKS.md, 2026-12-04; most likely this). CPU adapters, whose
/// cores clock up at once and whose runs are long, skip it.
const GPU_WARMUP_MS: f64 = 250.0;
/// Most recordings in one warm-up submission, and most submissions.
const WARMUP_MAX_REPEATS: u64 = 256;
const WARMUP_MAX_SUBMISSIONS: usize = 32;

/// Times `record`, which records the work into an encoder, submitting and
/// waiting for each run separately.
pub fn time_gpu(
    gpu: &Gpu,
    plan: TimingPlan,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> wgpu_flash_attn::Result<()>,
) -> Result<Timing> {
    // One query set and resolve buffer for every run.
    let stopwatch = Stopwatch::for_device(gpu);
    warm_up(gpu, stopwatch.as_ref(), &mut record)?;
    let mut run_once = || -> Result<f64> {
        let elapsed = submit_timed(gpu, stopwatch.as_ref(), 1, &mut record)?;
        Ok(elapsed.as_secs_f64() * 1e3)
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
        timer: Timer::of(stopwatch.as_ref()),
    })
}

/// What the reports add to their timer line about the warm-up.
#[allow(
    dead_code,
    reason = "flash-bench's reports use it; tests/timing.rs includes this file without them"
)]
pub fn warm_up_note(gpu: &Gpu) -> String {
    if warms_up(gpu) {
        format!(" and {GPU_WARMUP_MS} ms of warm-up")
    } else {
        String::new()
    }
}

/// Whether timings on `gpu` start with the warm-up: hardware GPUs only.
fn warms_up(gpu: &Gpu) -> bool {
    gpu.info().adapter.device_type != wgpu::DeviceType::Cpu
}

/// Runs `record` on a hardware GPU for [`GPU_WARMUP_MS`] of GPU time,
/// doubling the recordings per submission while one takes under an eighth
/// of it; nothing on CPU adapters.
fn warm_up(
    gpu: &Gpu,
    stopwatch: Option<&Stopwatch>,
    record: &mut impl FnMut(&mut wgpu::CommandEncoder) -> wgpu_flash_attn::Result<()>,
) -> Result<()> {
    if !warms_up(gpu) {
        return Ok(());
    }
    let (mut spent_ms, mut repeats) = (0.0, 1);
    for _ in 0..WARMUP_MAX_SUBMISSIONS {
        if spent_ms >= GPU_WARMUP_MS {
            break;
        }
        let ms = submit_timed(gpu, stopwatch, repeats, &mut *record)?.as_secs_f64() * 1e3;
        spent_ms += ms;
        if ms < GPU_WARMUP_MS / 8.0 {
            repeats = (repeats * 2).min(WARMUP_MAX_REPEATS);
        }
    }
    Ok(())
}

/// Records `record` `repeats` times into one encoder, submits once, waits,
/// and returns the total time: between two GPU timestamps where the device
/// has them, otherwise wall clock around submit and wait. This is the shape
/// of measurement criterion's `iter_custom` wants.
#[allow(
    dead_code,
    reason = "benches/forward.rs and tests/timing.rs use it, flash-bench does not"
)]
pub fn time_gpu_repeated(
    gpu: &Gpu,
    repeats: u64,
    record: impl FnMut(&mut wgpu::CommandEncoder) -> wgpu_flash_attn::Result<()>,
) -> Result<(std::time::Duration, Timer)> {
    let stopwatch = Stopwatch::for_device(gpu);
    let elapsed = submit_timed(gpu, stopwatch.as_ref(), repeats, record)?;
    Ok((elapsed, Timer::of(stopwatch.as_ref())))
}

impl Timer {
    fn of(stopwatch: Option<&Stopwatch>) -> Timer {
        match stopwatch {
            Some(_) => Timer::GpuTimestamps,
            None => Timer::WallClock,
        }
    }
}

/// One submission of `repeats` recordings, timed by `stopwatch` if given,
/// by the wall clock around submit and wait otherwise.
fn submit_timed(
    gpu: &Gpu,
    stopwatch: Option<&Stopwatch>,
    repeats: u64,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> wgpu_flash_attn::Result<()>,
) -> Result<std::time::Duration> {
    let mut encoder = gpu
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("timed"),
        });
    if let Some(watch) = stopwatch {
        encoder.write_timestamp(&watch.queries, 0);
    }
    for _ in 0..repeats {
        record(&mut encoder)?;
    }
    if let Some(watch) = stopwatch {
        watch.finish(&mut encoder);
    }
    let start = Instant::now();
    gpu.queue().submit([encoder.finish()]);
    gpu.wait()?;
    let wall = start.elapsed();
    match stopwatch {
        Some(watch) => Ok(std::time::Duration::from_secs_f64(
            watch.elapsed_ms(gpu)? / 1e3,
        )),
        None => Ok(wall),
    }
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
