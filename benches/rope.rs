//! Criterion benchmarks of rotary embeddings on device-resident tensors: a
//! prompt's queries (4,096 tokens x 32 heads x 128) rotated in place
//! (`Gpu::rope`) and its keys and values (4,096 x 8 KV heads x 128)
//! appended to a KV cache with and without the fused rotation
//! (`KvCache::append`), for each cache type. Both are elementwise and
//! memory-bound on GPUs, so throughput is counted in bytes read plus bytes
//! written (criterion's "GB/s"); the copy kernel's rate, measured first in
//! the same run, is the ceiling to compare them with.
//!
//! Timed as benches/forward.rs times: each sample records its iterations
//! into one encoder, with GPU timestamps where the device can write them
//! inside encoders. `FLASH_ATTN_BENCH_SHADER_DIR=DIR` replaces the kernels'
//! files with DIR's (`rope_common.wgsl`, ...), as `flash-bench
//! --shader-dir` does: two runs, one with an old file, compare versions.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wgpu_flash_attn::{
    Gpu, KeyRotation, KvCache, KvCacheConfig, KvDType, KvLayout, Rope, RopeStyle, Tensor,
    TensorShape,
};

// flash-bench's modules, included by path so that the benches time, draw
// inputs and measure the ceiling exactly as the binary does.
#[path = "../src/bin/flash-bench/ceiling.rs"]
#[allow(dead_code, reason = "the bench measures only the copy ceiling")]
mod ceiling;
#[path = "../src/bin/flash-bench/ceiling_kernels.rs"]
#[allow(
    unused_imports,
    reason = "its unit tests' imports: a bench without the test harness drops #[test] functions"
)]
mod ceiling_kernels;
#[path = "../src/bin/flash-bench/random.rs"]
#[allow(dead_code, reason = "the bench draws only normal values")]
mod random;
#[path = "../src/bin/flash-bench/shader_files.rs"]
mod shader_files;
#[path = "../src/bin/flash-bench/timing.rs"]
#[allow(
    dead_code,
    reason = "the bench uses the repeated timer and the ceiling's"
)]
mod timing;

use ceiling::CeilingProbes;
use random::{SeededRng, normal_vec, seeded};
use timing::{Timer, TimingPlan, time_gpu_repeated};

/// A prompt of Llama-3.1-8B's shape: 4,096 tokens, 32 query heads and 8 KV
/// heads of 128, at positions from 100,000 (late in a long context, where
/// the angles wrap many turns).
const TOKENS: usize = 4096;
const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
const FIRST_POSITION: u32 = 100_000;

/// Opens the device and applies `FLASH_ATTN_BENCH_SHADER_DIR`.
fn open_gpu() -> Gpu {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(err) => panic!("the benchmarks need a wgpu adapter: {err}"),
    };
    if let Some(dir) = std::env::var_os("FLASH_ATTN_BENCH_SHADER_DIR") {
        let files = shader_files::read_shader_dir(dir.as_ref())
            .unwrap_or_else(|err| panic!("FLASH_ATTN_BENCH_SHADER_DIR: {err:#}"));
        for (name, text) in files {
            eprintln!(
                "kernels compiled with {name} from {}",
                dir.to_string_lossy()
            );
            gpu.override_shader_file(&name, text)
                .unwrap_or_else(|err| panic!("replacing {name}: {err}"));
        }
    }
    gpu
}

fn rope(c: &mut Criterion) {
    let gpu = open_gpu();
    let timer = if gpu.info().has_encoder_timestamps() {
        Timer::GpuTimestamps
    } else {
        Timer::WallClock
    };
    let name = &gpu.info().adapter.name;
    // The queries' size: past the caches of a CPU adapter.
    let query_bytes = (TOKENS * HEADS_Q * HEAD_DIM * 4) as u64;
    let copy = CeilingProbes::new(&gpu)
        .and_then(|probes| probes.measure_copy(query_bytes, TimingPlan { warmup: 1, runs: 5 }))
        .expect("copy ceiling");
    eprintln!(
        "copy ceiling on {name}: {:.2} GB/s (read + written, {} MiB)",
        copy.gb_per_s,
        copy.bytes >> 20
    );

    let mut group = c.benchmark_group(format!("rope on {name} ({timer})"));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let llama3 = Rope::new(RopeStyle::HalfSplit).base(500_000.0);
    let mut rng = seeded(7);
    let upload = |rng: &mut SeededRng, shape: TensorShape| {
        Tensor::from_f32(&gpu, shape, &normal_vec(rng, shape.elements(), 1.0)).expect("upload")
    };

    let queries = upload(&mut rng, TensorShape::new(1, TOKENS, HEADS_Q, HEAD_DIM));
    group.throughput(Throughput::BytesDecimal(2 * query_bytes));
    group.bench_function("queries in place", |b| {
        b.iter_custom(|iters| {
            time_gpu_repeated(&gpu, iters, |encoder| {
                gpu.rope(encoder, &queries, &llama3, &[FIRST_POSITION])
            })
            .expect("timed run")
            .0
        })
    });

    let kv_shape = TensorShape::new(1, TOKENS, HEADS_KV, HEAD_DIM);
    let (k, v) = (upload(&mut rng, kv_shape), upload(&mut rng, kv_shape));
    for dtype in [KvDType::F32, KvDType::F16, KvDType::Int8] {
        let config = KvCacheConfig::new(
            1,
            HEADS_KV,
            HEAD_DIM,
            KvLayout::Contiguous { capacity: TOKENS },
        )
        .dtype(dtype);
        let mut cache = KvCache::new(&gpu, config).expect("cache");
        let read = 2 * (TOKENS * HEADS_KV * HEAD_DIM * 4) as u64;
        let written = 2 * (TOKENS * HEADS_KV * dtype.vector_bytes(HEAD_DIM)) as u64;
        group.throughput(Throughput::BytesDecimal(read + written));
        for rotated in [false, true] {
            let rotation = rotated.then_some(KeyRotation {
                rope: &llama3,
                position_offsets: &[FIRST_POSITION],
            });
            // Criterion cuts longer names (and then numbers the
            // duplicates): the shapes are in the module's documentation.
            let case = format!(
                "append to {}{}",
                dtype.name(),
                if rotated { ", keys rotated" } else { "" }
            );
            group.bench_function(case, |b| {
                b.iter_custom(|iters| {
                    time_gpu_repeated(&gpu, iters, |encoder| {
                        // Every iteration writes the same positions.
                        cache.set_len(0, 0)?;
                        cache.append(&gpu, encoder, &k, &v, rotation)
                    })
                    .expect("timed run")
                    .0
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, rope);
criterion_main!(benches);
