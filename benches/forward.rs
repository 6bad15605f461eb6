//! Criterion benchmarks of the forward call on device-resident tensors:
//! no host transfer in the timed region. Throughput is counted in FLOPs
//! (criterion prints them as "elem/s"), 4 * batch * heads * visible pairs *
//! head_dim. Each iteration submits and waits, so the time is wall clock
//! around the GPU work.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wgpu_flash_attn::random::SeededRng;
use wgpu_flash_attn::{AttentionArgs, AttentionConfig, AttentionShape, Gpu, Tensor};

fn forward(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(err) => panic!("the benchmarks need a wgpu adapter: {err}"),
    };
    let mut group = c.benchmark_group(format!("forward on {}", gpu.info().adapter.name));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let shapes = [
        (
            "B1 H8 N512 d64",
            AttentionShape::self_attention(1, 512, 8, 64),
            false,
        ),
        (
            "B1 H8 N512 d64 causal",
            AttentionShape::self_attention(1, 512, 8, 64),
            true,
        ),
        (
            "B1 H8 N256 d128",
            AttentionShape::self_attention(1, 256, 8, 128),
            false,
        ),
    ];
    for (name, shape, causal) in shapes {
        let config = AttentionConfig::new().causal(causal);
        let mut rng = SeededRng::new(42);
        let upload = |rng: &mut SeededRng, dims: wgpu_flash_attn::TensorShape| {
            Tensor::from_f32(&gpu, dims, &rng.normal_vec(dims.elements(), 1.0)).expect("upload")
        };
        let q = upload(&mut rng, shape.q_shape());
        let k = upload(&mut rng, shape.kv_shape());
        let v = upload(&mut rng, shape.kv_shape());
        let out =
            Tensor::zeros(&gpu, shape.q_shape(), wgpu_flash_attn::DType::F32).expect("output");
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: None,
        };
        group.throughput(Throughput::Elements(shape.flops(&config) as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    gpu.attention_into(&args, &config).expect("attention");
                    gpu.wait().expect("wait");
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
