//! flash-bench's timer and ceiling probes (FMA, copy) report sane,
//! self-consistent figures. The binary's modules are included by path: the
//! adapter comes from the tests' shared `common::gpu`.

#[path = "../src/bin/flash-bench/ceiling.rs"]
mod ceiling;
#[path = "../src/bin/flash-bench/ceiling_kernels.rs"]
mod ceiling_kernels;
mod common;
#[path = "../src/bin/flash-bench/timing.rs"]
mod timing;

use std::time::Instant;

use ceiling::CeilingProbes;
use common::gpu;
use timing::{Timer, TimingPlan, time_gpu_repeated};

#[test]
fn ceiling_uses_timestamps_when_the_device_has_them() {
    let Some(gpu) = gpu() else { return };
    let probes = CeilingProbes::new(gpu).unwrap();
    let start = Instant::now();
    let ceiling = probes
        .measure_fma(64, TimingPlan { warmup: 1, runs: 3 })
        .unwrap();
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
    // The three timed runs (their sum is min + median + max) cannot take
    // longer than the call. The untimed warm-up is left out: it may be
    // faster than any timed run when the machine's load changes.
    let timed_ms = t.min_ms + t.median_ms + t.max_ms;
    assert!(
        timed_ms <= wall_ms,
        "{t:?}: {timed_ms} ms within {wall_ms} ms"
    );
    assert!(
        ceiling.gflops.is_finite() && ceiling.gflops > 0.0,
        "{ceiling:?}"
    );
}

#[test]
fn copy_ceiling_reports_bytes_moved_over_time() {
    let Some(gpu) = gpu() else { return };
    // Deliberately not a multiple of 16: the probe rounds down to vec4s.
    let asked = 8 * 1024 * 1024 + 5;
    let bandwidth = CeilingProbes::new(gpu)
        .unwrap()
        .measure_copy(asked, TimingPlan { warmup: 1, runs: 3 })
        .unwrap();
    assert_eq!(bandwidth.bytes, 8 * 1024 * 1024);
    let t = &bandwidth.timing;
    assert!(t.min_ms > 0.0 && t.min_ms <= t.median_ms, "{t:?}");
    let expected = 2.0 * bandwidth.bytes as f64 / (t.median_ms * 1e6);
    assert!(
        (bandwidth.gb_per_s - expected).abs() <= 1e-9 * expected,
        "{bandwidth:?}"
    );
}

#[test]
fn repeated_timing_grows_with_the_repeats() {
    let Some(gpu) = gpu() else { return };
    let shape = wgpu_flash_attn::AttentionShape::self_attention(1, 256, 4, 64);
    let config = wgpu_flash_attn::AttentionConfig::new();
    let q = wgpu_flash_attn::Tensor::filled(gpu, shape.q_shape(), 0.5).unwrap();
    let k = wgpu_flash_attn::Tensor::filled(gpu, shape.k_shape(), 0.25).unwrap();
    let v = wgpu_flash_attn::Tensor::filled(gpu, shape.v_shape(), 1.0).unwrap();
    let out = wgpu_flash_attn::Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let args = wgpu_flash_attn::AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let time = |repeats| {
        time_gpu_repeated(gpu, repeats, |encoder| gpu.forward(encoder, &args, &config)).unwrap()
    };
    time(1); // compile the pipeline outside the comparison
    // Load from other processes only lengthens a measurement: the fastest
    // of a few single dispatches is the one to compare.
    let (once, timer) = (0..3).map(|_| time(1)).min_by_key(|(d, _)| *d).unwrap();
    let (eight, _) = time(8);
    let expected = if gpu.info().has_encoder_timestamps() {
        Timer::GpuTimestamps
    } else {
        Timer::WallClock
    };
    assert_eq!(timer, expected);
    // Eight dispatches of the same work cannot take less than two of one.
    assert!(eight >= 2 * once, "once {once:?}, eight {eight:?}");
    // And the work really ran: every output is V's constant 1.0.
    assert!(out.to_f32_vec(gpu).unwrap().iter().all(|&x| x == 1.0));
}
