//! The smallest use of the library: host slices in, host vector out, checked
//! against the CPU reference.
//!
//! cargo run --release --example basic

use anyhow::Result;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use wgpu_flash_attn::{AttentionConfig, AttentionShape, Gpu, reference};

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.info().summary());

    // One sequence of 300 tokens, 4 heads of dimension 64, causal.
    let shape = AttentionShape::self_attention(1, 300, 4, 64);
    // Reproducible standard-normal inputs.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut normal = |n: usize| -> Vec<f32> {
        Normal::new(0.0, 1.0)
            .expect("a valid distribution")
            .sample_iter(&mut rng)
            .take(n)
            .collect()
    };
    let q = normal(shape.q_shape().elements());
    let k = normal(shape.k_shape().elements());
    let v = normal(shape.v_shape().elements());
    let config = AttentionConfig::new().causal(true);

    let gpu_result = gpu.attention_host(&shape, &q, &k, &v, &config)?;
    let cpu_result = reference::attention(&shape, &q, &k, &v, &config)?;
    let max_error = gpu_result
        .out
        .iter()
        .zip(&cpu_result.out)
        .map(|(g, c)| (f64::from(*g) - c).abs())
        .fold(0.0, f64::max);
    println!("max |gpu - reference| = {max_error:.2e}");
    Ok(())
}
