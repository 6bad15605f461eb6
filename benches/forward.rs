//! Criterion benchmarks of the library calls on device-resident tensors:
//! no host transfer in the timed region. Throughput is counted in FLOPs
//! (criterion prints them as "elem/s"): 4 * batch * heads * visible pairs *
//! head_dim; the backward's rows count 2.5 times that (FlashAttention's
//! count).
//!
//! Each sample records its iterations into one encoder and is timed with GPU
//! timestamps where the device can write them inside encoders (flash-bench's
//! `timing::time_gpu_repeated`), otherwise with the wall clock around one
//! submit and wait; the group name says which.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, BackwardArgs, DType, Gpu, Lse, Tensor,
};

// flash-bench's modules, included by path so that the benches time and draw
// inputs exactly as the binary does.
#[path = "../src/bin/flash-bench/random.rs"]
#[allow(dead_code, reason = "the bench draws no token trees")]
mod random;
#[path = "../src/bin/flash-bench/timing.rs"]
#[allow(dead_code, reason = "the benches use only the repeated timer")]
mod timing;

use random::{SeededRng, normal_vec, seeded};
use timing::{Timer, time_gpu_repeated};

#[derive(Clone, Copy)]
enum Kernel {
    Flash,
    Naive,
    /// The backward alone, after one forward that saved O and the logsumexp.
    Backward,
}

fn forward(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(err) => panic!("the benchmarks need a wgpu adapter: {err}"),
    };
    let timer = if gpu.info().has_encoder_timestamps() {
        Timer::GpuTimestamps
    } else {
        Timer::WallClock
    };
    let mut group = c.benchmark_group(format!("forward on {} ({timer})", gpu.info().adapter.name));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let square = |seq, heads, head_dim| AttentionShape::self_attention(1, seq, heads, head_dim);
    let cases = [
        (
            "flash B1 H8 N512 d64",
            square(512, 8, 64),
            false,
            Kernel::Flash,
        ),
        (
            "flash B1 H8 N512 d64 causal",
            square(512, 8, 64),
            true,
            Kernel::Flash,
        ),
        (
            "naive B1 H8 N512 d64",
            square(512, 8, 64),
            false,
            Kernel::Naive,
        ),
        (
            "backward B1 H8 N512 d64",
            square(512, 8, 64),
            false,
            Kernel::Backward,
        ),
        (
            "backward B1 H8 N512 d64 causal",
            square(512, 8, 64),
            true,
            Kernel::Backward,
        ),
        (
            "flash B1 H8 N256 d128",
            square(256, 8, 128),
            false,
            Kernel::Flash,
        ),
        (
            "flash B1 H64/8 N256 d128 causal (llama-3.1-70b heads)",
            AttentionShape {
                heads_kv: 8,
                ..square(256, 64, 128)
            },
            true,
            Kernel::Flash,
        ),
    ];
    for (name, shape, causal, kernel) in cases {
        let config = AttentionConfig::new().causal(causal);
        let mut rng = seeded(42);
        let upload = |rng: &mut SeededRng, dims: wgpu_flash_attn::TensorShape| {
            Tensor::from_f32(&gpu, dims, &normal_vec(rng, dims.elements(), 1.0)).expect("upload")
        };
        let q = upload(&mut rng, shape.q_shape());
        let k = upload(&mut rng, shape.k_shape());
        let v = upload(&mut rng, shape.v_shape());
        let d_out = upload(&mut rng, shape.q_shape());
        let zeros = |dims| Tensor::zeros(&gpu, dims, DType::F32).expect("output");
        let out = zeros(shape.q_shape());
        let (dq, dk, dv) = (
            zeros(shape.q_shape()),
            zeros(shape.k_shape()),
            zeros(shape.k_shape()),
        );
        let lse = Lse::new(&gpu, shape.batch, shape.heads_q, shape.seq_q).expect("lse");
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: None,
        };
        let backward = BackwardArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
            d_out: &d_out,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dsinks: None,
        };
        // The backward reads the forward's output and logsumexp.
        gpu.run(|encoder| gpu.forward(encoder, &backward.forward_args(), &config))
            .expect("forward");
        let flops = match kernel {
            Kernel::Backward => 2.5 * shape.flops(&config),
            _ => shape.flops(&config),
        };
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (elapsed, _) = time_gpu_repeated(&gpu, iters, |encoder| match kernel {
                    Kernel::Flash => gpu.forward(encoder, &args, &config),
                    Kernel::Naive => gpu.naive_attention(encoder, &args, &config).map(|_| ()),
                    Kernel::Backward => gpu.backward(encoder, &backward, &config),
                })
                .expect("timed run");
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
