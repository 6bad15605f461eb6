//! A program that owns its device, its buffers and its command encoder (as a
//! rendering engine or an ML framework does) calling the crate without a
//! copy: its activation buffers become tensors, the attention pass is
//! recorded into its own encoder between its own commands, and it reads the
//! result from its own output buffer.
//!
//! cargo run --release --example interop

use anyhow::{Context, Result};
use wgpu::util::DeviceExt;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, Gpu, Lse, Strides, Tensor, TensorShape,
    reference,
};

fn main() -> Result<()> {
    // The program's own device, requested with the features and limits it
    // wants; the crate adapts its kernels to whatever was enabled.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .context(
                "no wgpu adapter (on Linux without a GPU: apt-get install mesa-vulkan-drivers)",
            )?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("my engine"),
        required_features: adapter.features() & wgpu_flash_attn::WANTED_FEATURES,
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    let gpu = Gpu::from_device(device.clone(), queue.clone(), adapter.get_info());
    println!("adapter: {}", gpu.info().summary());
    // The device's one lost callback is the program's; passing the loss on
    // makes the crate's calls return Error::DeviceLost from then on.
    let notify_crate = gpu.device_lost_notifier();
    device.set_device_lost_callback(move |reason, message| {
        eprintln!("device lost ({reason:?}): {message}");
        notify_crate(reason, message);
    });

    // The program's activations: one fused QKV projection, laid out
    // `[batch, seq, 3, heads, head_dim]`, as a transformer layer writes it.
    let shape = AttentionShape::self_attention(2, 200, 4, 64);
    let (batch, seq, heads, head_dim) = (shape.batch, shape.seq_q, shape.heads_q, shape.head_dim);
    let qkv_host: Vec<f32> = (0..batch * seq * 3 * heads * head_dim)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
        .collect();
    let qkv = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("my qkv projection"),
        contents: bytemuck::cast_slice(&qkv_host),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("my attention output"),
        size: (batch * seq * heads * head_dim * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let lse = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("my logsumexp"),
        size: (batch * heads * seq * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });

    // Views of the program's buffers: no upload, no copy.
    let dims = TensorShape::new(batch, seq, heads, head_dim);
    let fused = Strides {
        batch: seq * 3 * heads * head_dim,
        seq: 3 * heads * head_dim,
        head: head_dim,
    };
    let view = |part: usize| {
        Tensor::from_buffer(
            &gpu,
            qkv.clone(),
            dims,
            fused,
            part * heads * head_dim,
            DType::F32,
        )
    };
    let (q, k, v) = (view(0)?, view(1)?, view(2)?);
    let o = Tensor::from_buffer(
        &gpu,
        out.clone(),
        dims,
        dims.contiguous_strides(),
        0,
        DType::F32,
    )?;
    let lse = Lse::from_buffer(&gpu, lse, batch, heads, seq)?;

    // The program's own encoder: its work, then attention, then its copy.
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("my readback"),
        size: out.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    let config = AttentionConfig::new().causal(true);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &o,
        lse: Some(&lse),
    };
    gpu.forward(&mut encoder, &args, &config)?;
    encoder.copy_buffer_to_buffer(&out, 0, &staging, 0, out.size());
    queue.submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let got: Vec<f32> = bytemuck::cast_slice(&staging.slice(..).get_mapped_range()?).to_vec();

    // Check against the CPU reference on packed copies of the same values.
    let unfuse = |part: usize| -> Vec<f32> {
        qkv_host
            .chunks(heads * head_dim)
            .skip(part)
            .step_by(3)
            .flatten()
            .copied()
            .collect()
    };
    let want = reference::attention(&shape, &unfuse(0), &unfuse(1), &unfuse(2), &config)?;
    let max_error = got
        .iter()
        .zip(&want.out)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0.0, f64::max);
    println!("fused QKV, causal, no copies: max |gpu - reference| = {max_error:.2e}");
    anyhow::ensure!(max_error <= 1e-4, "result disagrees with the reference");
    Ok(())
}
