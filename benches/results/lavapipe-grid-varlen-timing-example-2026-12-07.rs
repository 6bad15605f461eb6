//! A/B timing of packed (varlen) causal batches for the grid-order patches
//! beside it: the forward, or with BWD=1 the backward alone (its forward is
//! recorded, run and waited for before the clock starts). Wall clock around
//! submit and wait, best of the 5 runs after a first. Copy to examples/,
//! `cargo build --release --example varlen_timing`, run `varlen_timing 2048
//! 256` (sequence lengths; 8 heads, d=64). Not validated: the patches' tests
//! check the results.
use anyhow::Result;
use std::time::Instant;
use wgpu_flash_attn::*;

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    let lens: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (h, d) = (8, 64);
    let total: usize = lens.iter().sum();
    let mut cu = vec![0];
    for l in &lens {
        cu.push(cu.last().unwrap() + l);
    }
    let data: Vec<f32> = (0..total * h * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let t = Tensor::from_f32(&gpu, TensorShape::new(1, total, h, d), &data)?;
    let out = Tensor::filled(&gpu, t.shape(), 0.0)?;
    let (dq, dk, dv) = (
        Tensor::filled(&gpu, t.shape(), 0.0)?,
        Tensor::filled(&gpu, t.shape(), 0.0)?,
        Tensor::filled(&gpu, t.shape(), 0.0)?,
    );
    let lse = Lse::new(&gpu, 1, h, total)?;
    let backward = std::env::var("BWD").is_ok();
    let config = AttentionConfig::new().causal(true);
    let mut best = f64::MAX;
    for i in 0..6 {
        let mut e = gpu.device().create_command_encoder(&Default::default());
        let b = BackwardArgs {
            q: &t,
            k: &t,
            v: &t,
            out: &out,
            lse: &lse,
            d_out: &t,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dsinks: None,
        };
        let opts = ForwardOptions::new(&config).varlen(&cu, &cu);
        if backward {
            gpu.forward(&mut e, &b.forward_args(), opts.clone())?;
            gpu.queue().submit([e.finish()]);
            gpu.wait()?;
            e = gpu.device().create_command_encoder(&Default::default());
            gpu.backward(&mut e, &b, opts)?;
        } else {
            gpu.forward(&mut e, &b.forward_args(), opts)?;
        }
        let start = Instant::now();
        gpu.queue().submit([e.finish()]);
        gpu.wait()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i > 0 {
            best = best.min(ms);
        }
    }
    println!("lens {lens:?}: best {best:.2} ms");
    Ok(())
}
