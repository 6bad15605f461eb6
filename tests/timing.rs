//! The timer and the FMA ceiling probe report sane, self-consistent figures.

mod common;

use std::time::Instant;

use common::gpu;
use wgpu_flash_attn::ceiling::measure_fma;
use wgpu_flash_attn::timing::{Timer, TimingPlan};

#[test]
fn ceiling_uses_timestamps_when_the_device_has_them() {
    let Some(gpu) = gpu() else { return };
    let start = Instant::now();
    let ceiling = measure_fma(gpu, 64, TimingPlan { warmup: 1, runs: 3 }).unwrap();
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let expected = if gpu.info().has_encoder_timestamps() {
        Timer::GpuTimestamps
    } else {
        Timer::WallClock
    };
    assert_eq!(ceiling.timing.timer, expected);
    assert_eq!(ceiling.timing.runs, 3);
    let t = &ceiling.timing;
    assert!(
        t.min_ms > 0.0 && t.min_ms <= t.median_ms && t.median_ms <= t.max_ms,
        "{t:?}"
    );
    // Four timed runs (warm-up included) cannot take longer than the call.
    assert!(4.0 * t.min_ms <= wall_ms, "{t:?} within {wall_ms} ms");
    assert!(
        ceiling.gflops.is_finite() && ceiling.gflops > 0.0,
        "{ceiling:?}"
    );
}
