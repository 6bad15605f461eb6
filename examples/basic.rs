//! The smallest use of the library: host slices in, host vector out, checked
//! against the CPU reference.
//!
//! cargo run --release --example basic

use anyhow::Result;
use wgpu_flash_attn::random::SeededRng;
use wgpu_flash_attn::{AttentionConfig, AttentionShape, Gpu, reference};

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.info().summary());

    // One sequence of 300 tokens, 4 heads of dimension 64, causal.
    let shape = AttentionShape::self_attention(1, 300, 4, 64);
    let mut rng = SeededRng::new(1);
    let q = rng.normal_vec(shape.q_shape().elements(), 1.0);
    let k = rng.normal_vec(shape.kv_shape().elements(), 1.0);
    let v = rng.normal_vec(shape.kv_shape().elements(), 1.0);
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
