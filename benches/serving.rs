//! Criterion benchmarks of a continuous-batching server's decode step
//! (`Gpu::decode_ragged`): what a prompt chunk costs when it joins the
//! step of sequences decoding one token each, against the step without it
//! and the chunk alone. Llama-3.1-8B's heads (32 query / 8 KV heads of
//! 128), eight sequences of 2,048 cached tokens, f16 and f32 caches.
//! Cases:
//!
//! - `decode 8 x 1`: `Gpu::decode`, one token per sequence;
//! - `ragged 8 x 1`: the same step through `decode_ragged` (counts all 1);
//! - `ragged chunk alone`: sequence 0's 128-token chunk, the others
//!   sitting out (counts 128, 0, ..);
//! - `ragged chunk + 7 x 1`: both in one call (counts 128, 1, ..).
//!
//! Timed as `benches/forward.rs` is: each sample's iterations recorded
//! into one encoder, GPU timestamps where the device writes them inside
//! encoders, else the wall clock around one submit and wait.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wgpu_flash_attn::{
    AttentionConfig, DType, DecodeArgs, Gpu, KvCache, KvCacheConfig, KvDType, KvLayout, Tensor,
    TensorShape,
};

#[path = "../src/bin/flash-bench/random.rs"]
#[allow(dead_code, reason = "the bench draws no token trees")]
mod random;
#[path = "../src/bin/flash-bench/timing.rs"]
#[allow(dead_code, reason = "the benches use only the repeated timer")]
mod timing;

use random::{normal_vec, seeded};
use timing::{Timer, time_gpu_repeated};

const SEQUENCES: usize = 8;
const CACHED: usize = 2048;
const CHUNK: usize = 128;
const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;

/// A cache of `SEQUENCES` sequences, each `CACHED` random tokens long
/// (the chunk's own tokens included, as a step's queries are).
fn filled_cache(gpu: &Gpu, dtype: KvDType) -> KvCache {
    let layout = KvLayout::Paged {
        page_size: 256,
        pages: SEQUENCES * CACHED / 256,
    };
    let config = KvCacheConfig::new(SEQUENCES, HEADS_KV, HEAD_DIM, layout).dtype(dtype);
    let mut cache = KvCache::new(gpu, config).expect("the cache");
    let per_sequence = CACHED / 256;
    for b in 0..SEQUENCES {
        let pages: Vec<u32> = (0..per_sequence)
            .map(|i| (i * SEQUENCES + b) as u32)
            .collect();
        cache.set_block_table(b, &pages).expect("a block table");
    }
    let tokens = TensorShape::new(SEQUENCES, CACHED, HEADS_KV, HEAD_DIM);
    let mut rng = seeded(7);
    let k = Tensor::from_f32(gpu, tokens, &normal_vec(&mut rng, tokens.elements(), 1.0))
        .expect("the keys");
    let v = Tensor::from_f32(gpu, tokens, &normal_vec(&mut rng, tokens.elements(), 1.0))
        .expect("the values");
    gpu.run(|e| cache.append(gpu, e, &k, &v, None))
        .expect("the prompts appended");
    cache
}

fn serving(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(err) => panic!("the benchmarks need a wgpu adapter: {err}"),
    };
    let gpu = &gpu;
    let timer = if gpu.info().has_encoder_timestamps() {
        Timer::GpuTimestamps
    } else {
        Timer::WallClock
    };
    let mut group = c.benchmark_group(format!(
        "serving step on {} ({timer})",
        gpu.info().adapter.name
    ));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let config = AttentionConfig::new().causal(true);
    let mut chunk_and_ones = vec![1; SEQUENCES];
    chunk_and_ones[0] = CHUNK;
    let mut chunk_alone = vec![0; SEQUENCES];
    chunk_alone[0] = CHUNK;
    let cases: [(&str, Option<Vec<usize>>); 4] = [
        ("decode 8 x 1", None),
        ("ragged 8 x 1", Some(vec![1; SEQUENCES])),
        ("ragged chunk alone", Some(chunk_alone)),
        ("ragged chunk + 7 x 1", Some(chunk_and_ones)),
    ];
    for dtype in [KvDType::F16, KvDType::F32] {
        let cache = filled_cache(gpu, dtype);
        for (name, counts) in &cases {
            let (batch, rows) = match counts {
                Some(counts) => (1, counts.iter().sum()),
                None => (SEQUENCES, 1),
            };
            let shape = TensorShape::new(batch, rows, HEADS_Q, HEAD_DIM);
            let q = Tensor::from_f32(
                gpu,
                shape,
                &normal_vec(&mut seeded(11), shape.elements(), 1.0),
            )
            .expect("the queries");
            let out = Tensor::zeros(gpu, shape, DType::F32).expect("the output");
            let args = DecodeArgs {
                q: &q,
                cache: &cache,
                out: &out,
                lse: None,
            };
            let label = format!("{name}, {} cache", dtype.name());
            group.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let (elapsed, _) = time_gpu_repeated(gpu, iters, |encoder| match counts {
                        Some(counts) => gpu
                            .decode_ragged(encoder, &args, counts, &config)
                            .map(|_| ()),
                        None => gpu.decode(encoder, &args, &config).map(|_| ()),
                    })
                    .expect("timed run");
                    elapsed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, serving);
criterion_main!(benches);
