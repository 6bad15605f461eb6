//! Criterion benchmarks of what a call costs the host before the GPU does
//! anything: recording it into an encoder (operand checks, planning,
//! parameter uploads, bind groups, and the error scopes around what wgpu
//! could refuse). A serving loop pays this per layer and token, so it is
//! timed apart from the kernels: each iteration records one call into a
//! fresh encoder that is then dropped unsubmitted (no kernel runs, and
//! lavapipe compiles a kernel only at its first dispatch). The device is
//! polled between samples, outside the timing, so that what the dropped
//! encoders held is freed there rather than inside a timed call.
//!
//! Calls: one decoding step of Llama-3.1-8B's heads (32 query / 8 KV
//! heads of 128) over 4,096 cached f16 tokens, the append of that token's
//! K and V, the copy of one of its pages (a fork), and a forward of B1 H8
//! N1024 d64 (causal).

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, DecodeArgs, Gpu, KvCache, KvCacheConfig,
    KvDType, KvLayout, Tensor, TensorShape,
};

const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
const CACHED: usize = 4096;

/// Times `iters` calls of `record`, each into a fresh encoder dropped
/// unsubmitted, then polls the device (untimed) to free what they held.
fn time_recording(
    gpu: &Gpu,
    iters: u64,
    mut record: impl FnMut(&mut wgpu::CommandEncoder),
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        record(&mut encoder);
    }
    let elapsed = start.elapsed();
    gpu.device()
        .poll(wgpu::PollType::Poll)
        .expect("the device polled");
    elapsed
}

fn recording(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(err) => panic!("the benchmarks need a wgpu adapter: {err}"),
    };
    let gpu = &gpu;
    eprintln!("adapter: {}", gpu.info().adapter.name);
    let mut group = c.benchmark_group("recording");
    group.measurement_time(Duration::from_secs(5));

    // A cache filled to CACHED tokens (one append of zeros, run once).
    let config = KvCacheConfig::new(
        1,
        HEADS_KV,
        HEAD_DIM,
        KvLayout::Contiguous {
            capacity: CACHED + 1,
        },
    )
    .dtype(KvDType::F16);
    let mut cache = KvCache::new(gpu, config).expect("the cache");
    let prompt = Tensor::zeros(
        gpu,
        TensorShape::new(1, CACHED, HEADS_KV, HEAD_DIM),
        DType::F32,
    )
    .expect("the prompt's keys");
    gpu.run(|e| cache.append(gpu, e, &prompt, &prompt, None))
        .expect("the prompt appended");
    let token = Tensor::zeros(gpu, TensorShape::new(1, 1, HEADS_KV, HEAD_DIM), DType::F32)
        .expect("a token's keys");
    let rows = TensorShape::new(1, 1, HEADS_Q, HEAD_DIM);
    let q = Tensor::zeros(gpu, rows, DType::F32).expect("the queries");
    let out = Tensor::zeros(gpu, rows, DType::F32).expect("the output");
    let step = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let causal = AttentionConfig::new().causal(true);
    group.bench_function("decode step, Llama-3.1-8B heads, 4K f16 cache", |b| {
        b.iter_custom(|iters| {
            time_recording(gpu, iters, |encoder| {
                gpu.decode(encoder, &step, &causal).expect("recorded");
            })
        })
    });

    // Appending records the same token each time; the cache's length is
    // set back so that it never fills.
    group.bench_function("append one token, Llama-3.1-8B heads, f16 cache", |b| {
        b.iter_custom(|iters| {
            time_recording(gpu, iters, |encoder| {
                cache
                    .append(gpu, encoder, &token, &token, None)
                    .expect("recorded");
                cache.set_len(0, CACHED).expect("the length set back");
            })
        })
    });

    // A fork's copy of one page (256 tokens; never submitted, so the
    // cache is untouched).
    group.bench_function("copy one page, Llama-3.1-8B heads, f16 cache", |b| {
        b.iter_custom(|iters| {
            time_recording(gpu, iters, |encoder| {
                cache.copy_pages(gpu, encoder, &[(0, 1)]).expect("recorded");
            })
        })
    });

    let shape = AttentionShape::self_attention(1, 1024, 8, 64);
    let tensor = |dims| Tensor::zeros(gpu, dims, DType::F32).expect("a tensor");
    let (q, k, v, out) = (
        tensor(shape.q_shape()),
        tensor(shape.k_shape()),
        tensor(shape.v_shape()),
        tensor(shape.o_shape()),
    );
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    group.bench_function("forward, B1 H8 N1024 d64 causal", |b| {
        b.iter_custom(|iters| {
            time_recording(gpu, iters, |encoder| {
                gpu.forward(encoder, &args, &causal).expect("recorded");
            })
        })
    });
    group.finish();
}

criterion_group!(benches, recording);
criterion_main!(benches);
