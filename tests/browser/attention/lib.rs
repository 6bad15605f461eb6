//! wgpu-flash-attn on a browser's WebGPU (wgpu's `BrowserWebGpu` backend):
//! forward passes of seeded random inputs through `Gpu::request` and
//! `Gpu::attention_host_async`, each compared with the crate's f64
//! reference, and a blocking call that must say it cannot block. The
//! page (tests/browser/attention.html) calls `run_checks` and shows the
//! JSON report it returns.

use wasm_bindgen::prelude::*;
use wgpu_flash_attn::{
    AdapterOptions, AttentionConfig, AttentionShape, DType, Error, ForwardPlan, Gpu, Tier,
    reference,
};

/// The tests' bound for f32 storage (tests/common: F32_TOLERANCE).
const F32_TOLERANCE: f64 = 1e-4;

/// A small seeded generator (SplitMix64): the same inputs on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn value(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

fn shape(
    batch: usize,
    seq_q: usize,
    seq_kv: usize,
    heads: (usize, usize),
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        seq_q,
        seq_kv,
        heads_q: heads.0,
        heads_kv: heads.1,
        head_dim,
        head_dim_v: head_dim,
    }
}

/// Largest |a - b|, where +inf matches +inf (rows that see no key).
fn max_error(gpu: &[f32], reference: &[f64]) -> f64 {
    gpu.iter()
        .zip(reference)
        .map(|(&g, &r)| {
            if r.is_infinite() && f64::from(g) == r {
                0.0
            } else {
                (f64::from(g) - r).abs()
            }
        })
        .fold(0.0, |worst, e| {
            if e.is_nan() || worst.is_nan() {
                f64::NAN
            } else {
                worst.max(e)
            }
        })
}

async fn check(
    gpu: &Gpu,
    name: &str,
    shape: AttentionShape,
    config: AttentionConfig,
    seed: u64,
) -> serde_json::Value {
    let mut rng = SplitMix(seed);
    let q = rng.values(shape.q_shape().elements());
    let k = rng.values(shape.k_shape().elements());
    let v = rng.values(shape.v_shape().elements());
    let kernel = ForwardPlan::for_call(gpu.info(), &shape, DType::F32, config.tier)
        .map_or_else(|err| err.to_string(), |plan| plan.kernel_label());
    let expected = match reference::attention(&shape, &q, &k, &v, &config) {
        Ok(expected) => expected,
        Err(err) => return serde_json::json!({"case": name, "error": format!("reference: {err}")}),
    };
    match gpu.attention_host_async(&shape, &q, &k, &v, &config).await {
        Ok(got) => {
            let out = max_error(&got.out, &expected.out);
            let lse = max_error(&got.lse, &expected.lse);
            let passed = out <= F32_TOLERANCE && lse <= F32_TOLERANCE;
            serde_json::json!({"case": name, "kernel": kernel, "max_err_out": out, "max_err_lse": lse, "passed": passed})
        }
        Err(err) => serde_json::json!({"case": name, "kernel": kernel, "error": err.to_string()}),
    }
}

/// Runs every check on the browser's adapter; the report as JSON text.
#[wasm_bindgen]
pub async fn run_checks() -> String {
    let options = AdapterOptions {
        backends: wgpu::Backends::BROWSER_WEBGPU,
        ..AdapterOptions::from_env()
    };
    let gpu = match Gpu::request(&options).await {
        Ok(gpu) => gpu,
        Err(err) => return serde_json::json!({"error": format!("no device: {err}")}).to_string(),
    };
    let mut cases = Vec::new();
    let causal = AttentionConfig::new().causal(true);
    let plain = AttentionConfig::new();
    let windowed = AttentionConfig::new()
        .window(Some(16), Some(0))
        .softcap(30.0);
    let shapes = [
        (
            "B1 H2 N128 d64 causal",
            shape(1, 128, 128, (2, 2), 64),
            &causal,
        ),
        (
            "B2 H4/2 q65 kv129 d128 (GQA)",
            shape(2, 65, 129, (4, 2), 128),
            &plain,
        ),
        (
            "B1 H2 q1 kv500 d64 causal (decode-like)",
            shape(1, 1, 500, (2, 2), 64),
            &causal,
        ),
        (
            "B1 H1 q7 kv63 d32 window 16 softcap 30",
            shape(1, 7, 63, (1, 1), 32),
            &windowed,
        ),
        (
            "B1 H3 q200 kv200 d80 causal",
            shape(1, 200, 200, (3, 3), 80),
            &causal,
        ),
        (
            "B1 H8/1 q16 kv300 d64 (MQA)",
            shape(1, 16, 300, (8, 1), 64),
            &plain,
        ),
        (
            "B1 H1 q16 kv300 d192",
            shape(1, 16, 300, (1, 1), 192),
            &plain,
        ),
        (
            "B1 H1 q16 kv300 d256",
            shape(1, 16, 300, (1, 1), 256),
            &plain,
        ),
    ];
    for (seed, (name, shape, config)) in shapes.into_iter().enumerate() {
        // The default plan, then the per-row tier forced (it crashed
        // Chromium's fallback adapter at d=256: not forced there).
        cases.push(check(&gpu, name, shape, (*config).clone(), seed as u64).await);
        if shape.head_dim <= 192 {
            let portable = (*config).clone().tier(Tier::Portable);
            cases.push(
                check(
                    &gpu,
                    &format!("{name}, per-row tier"),
                    shape,
                    portable,
                    seed as u64,
                )
                .await,
            );
        }
    }
    // A blocking call must refuse with a typed error, not hang or panic.
    let blocking = match Gpu::new() {
        Err(Error::BlockingInBrowser { .. }) => {
            serde_json::json!({"case": "Gpu::new() in a browser", "passed": true})
        }
        Err(other) => {
            serde_json::json!({"case": "Gpu::new() in a browser", "error": other.to_string()})
        }
        Ok(_) => {
            serde_json::json!({"case": "Gpu::new() in a browser", "error": "it returned a device"})
        }
    };
    cases.push(blocking);
    let info = gpu.info();
    serde_json::json!({
        "adapter": info.adapter.name,
        "backend": format!("{:?}", info.adapter.backend),
        "device_type": format!("{:?}", info.adapter.device_type),
        "summary": info.summary(),
        "cases": cases,
    })
    .to_string()
}
