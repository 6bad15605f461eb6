//! The measurement behind BENCHMARKS.md's "FP8 or int8: output error" (2026-12-08):
//! run as tests/tmp_quant.rs (`cargo test --release --test tmp_quant -- --nocapture`),
//! then removed. Output error of a decode step over f32, f16, int8 and fp8 caches
//! against the f64 reference over the f32 values appended.
mod common;
use common::gpu;
use common::random::{normal_vec, seeded};
use wgpu_flash_attn::*;

#[test]
fn quantization_error() {
    let Some(gpu) = gpu() else { return };
    let (hq, hkv, d, len) = (64usize, 8usize, 128usize, 4096usize);
    for outliers in [0usize, 4] {
        for scale in [1.0f32, 4.0] {
            let mut rng = seeded(0x0e_0001 + outliers as u64);
            let mut k = normal_vec(&mut rng, len * hkv * d, 1.0);
            let v = normal_vec(&mut rng, len * hkv * d, 1.0);
            // Outlier channels: the first `outliers` elements of every key head, x20.
            for vec in k.chunks_mut(d) {
                for x in &mut vec[..outliers] {
                    *x *= 20.0;
                }
            }
            let q: Vec<f32> = normal_vec(&mut rng, hq * d, 1.0).iter().map(|x| x * scale).collect();
            let shape = AttentionShape { batch: 1, seq_q: 1, seq_kv: len, heads_q: hq, heads_kv: hkv, head_dim: d, head_dim_v: d };
            let config = AttentionConfig::new().causal(true);
            let want = reference::attention(&shape, &q, &k, &v, &config).unwrap();
            let mut line = format!("outliers {outliers} qscale {scale}:");
            for dtype in [KvDType::F32, KvDType::F16, KvDType::Int8, KvDType::Fp8] {
                let cfg = KvCacheConfig::new(1, hkv, d, KvLayout::Contiguous { capacity: len }).dtype(dtype);
                let mut cache = KvCache::new(gpu, cfg).unwrap();
                let ts = TensorShape::new(1, len, hkv, d);
                let (kt, vt) = (Tensor::from_f32(gpu, ts, &k).unwrap(), Tensor::from_f32(gpu, ts, &v).unwrap());
                gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
                let qs = TensorShape::new(1, 1, hq, d);
                let qt = Tensor::from_f32(gpu, qs, &q).unwrap();
                let out = Tensor::zeros(gpu, qs, DType::F32).unwrap();
                let args = DecodeArgs { q: &qt, cache: &cache, out: &out, lse: None };
                gpu.run(|e| gpu.decode(e, &args, &config)).unwrap();
                let got = out.to_f32_vec(gpu).unwrap();
                let (mut worst, mut sum) = (0f64, 0f64);
                for (g, w) in got.iter().zip(&want.out) {
                    let e = (f64::from(*g) - w).abs();
                    worst = worst.max(e);
                    sum += e * e;
                }
                let rms = (sum / got.len() as f64).sqrt();
                line += &format!("  {}: max {worst:.2e} rms {rms:.2e}", dtype.name());
            }
            eprintln!("{line}");
        }
    }
}
