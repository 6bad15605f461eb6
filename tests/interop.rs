//! Using the crate from a program that owns its device, buffers and
//! encoders: wrapping caller buffers without a copy, refusing buffers and
//! tensors of another device, recording order as execution order for the
//! KV cache, and one `Gpu` shared by several threads.

mod common;

use common::{Inputs, assert_close, compare, gpu};
use wgpu::util::DeviceExt;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, DType, DecodeArgs, Error, Gpu,
    KvCache, KvCacheConfig, KvLayout, Lse, Tensor, TensorShape, reference,
};

/// A buffer as a program would make it for its own activations.
fn caller_buffer(gpu: &Gpu, data: &[f32], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("caller activations"),
            contents: bytemuck::cast_slice(data),
            usage,
        })
}

/// Reads an f32 buffer back the way the caller would, without the crate.
fn read_back(gpu: &Gpu, buffer: &wgpu::Buffer) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&common::read_bytes(gpu, buffer))
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

#[test]
fn caller_buffers_are_read_and_written_in_place() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 2,
        seq_q: 37,
        seq_kv: 53,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 32,
        head_dim_v: 32,
    };
    let inputs = Inputs::draw(&shape, 0x5eed_1a7e, 1.0);
    let config = AttentionConfig::new().causal(true);
    // One K|V buffer holding both, as a fused projection would.
    let kv: Vec<f32> = inputs.k.iter().chain(&inputs.v).copied().collect();
    let q_buffer = caller_buffer(gpu, &inputs.q, wgpu::BufferUsages::STORAGE);
    let kv_buffer = caller_buffer(gpu, &kv, wgpu::BufferUsages::STORAGE);
    let out_buffer = caller_buffer(gpu, &vec![f32::NAN; inputs.q.len()], USAGE);
    let lse_elems = shape.batch * shape.heads_q * shape.seq_q;
    let lse_buffer = caller_buffer(gpu, &vec![f32::NAN; lse_elems], USAGE);

    let q_dims = shape.q_shape();
    let kv_dims = shape.k_shape();
    let wrap = |buffer: &wgpu::Buffer, dims: TensorShape, offset: usize| {
        Tensor::from_buffer(
            gpu,
            buffer.clone(),
            dims,
            dims.contiguous_strides(),
            offset,
            DType::F32,
        )
        .unwrap()
    };
    let q = wrap(&q_buffer, q_dims, 0);
    let k = wrap(&kv_buffer, kv_dims, 0);
    let v = wrap(&kv_buffer, kv_dims, inputs.k.len());
    let out = wrap(&out_buffer, q_dims, 0);
    let lse = Lse::from_buffer(
        gpu,
        lse_buffer.clone(),
        shape.batch,
        shape.heads_q,
        shape.seq_q,
    )
    .unwrap();
    // No copy: the tensors are the caller's buffers.
    assert!(q.buffer() == &q_buffer && out.buffer() == &out_buffer);
    assert!(k.buffer() == v.buffer() && lse.buffer() == &lse_buffer);

    // Recorded into the caller's own encoder and submitted by the caller.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: Some(&lse),
    };
    gpu.forward(&mut encoder, &args, &config).unwrap();
    gpu.queue().submit([encoder.finish()]);

    // Read from the caller's buffers, not through the crate.
    let got = read_back(gpu, &out_buffer);
    let got_lse = read_back(gpu, &lse_buffer);
    assert_close(
        compare(&shape, &inputs, &config, &got, &got_lse),
        "caller buffers",
    );
}

#[test]
fn caller_buffers_are_checked() {
    let Some(gpu) = gpu() else { return };
    let dims = TensorShape::new(1, 4, 2, 8);
    let wrap = |buffer: wgpu::Buffer, offset: usize| {
        Tensor::from_buffer(
            gpu,
            buffer,
            dims,
            dims.contiguous_strides(),
            offset,
            DType::F32,
        )
    };
    let no_storage = caller_buffer(gpu, &[0.0; 64], wgpu::BufferUsages::COPY_SRC);
    assert!(matches!(
        wrap(no_storage, 0),
        Err(Error::BufferUsage {
            needed: "STORAGE",
            ..
        })
    ));
    let short = caller_buffer(gpu, &[0.0; 63], USAGE);
    assert!(matches!(
        wrap(short, 0),
        Err(Error::OutOfBounds {
            needed: 64,
            available: 63,
            ..
        })
    ));
    let exact = caller_buffer(gpu, &[0.0; 68], USAGE);
    assert!(matches!(
        wrap(exact.clone(), 5),
        Err(Error::OutOfBounds { needed: 69, .. })
    ));
    // Fits, but the kernels read vec4s: the call refuses the offset.
    let misaligned = wrap(exact, 2).unwrap();
    let out = Tensor::zeros(gpu, dims, DType::F32).unwrap();
    let args = AttentionArgs {
        q: &misaligned,
        k: &misaligned,
        v: &misaligned,
        out: &out,
        lse: None,
    };
    let result = gpu.run(|e| gpu.forward(e, &args, AttentionConfig::new()));
    assert!(
        matches!(
            result,
            Err(Error::Misaligned {
                what: "offset",
                value: 2,
                ..
            })
        ),
        "{result:?}"
    );
    // Downloading needs COPY_SRC.
    let storage_only = caller_buffer(gpu, &[0.0; 64], wgpu::BufferUsages::STORAGE);
    let tensor = wrap(storage_only, 0).unwrap();
    assert!(matches!(
        tensor.to_f32_vec(gpu),
        Err(Error::BufferUsage {
            needed: "COPY_SRC",
            ..
        })
    ));
    let lse = Lse::from_buffer(gpu, caller_buffer(gpu, &[0.0; 7], USAGE), 1, 2, 4);
    assert!(matches!(
        lse,
        Err(Error::OutOfBounds {
            needed: 8,
            available: 7,
            ..
        })
    ));
}

#[test]
fn another_devices_buffers_and_tensors_are_refused() {
    let Some(gpu) = gpu() else { return };
    let other = Gpu::new().expect("a second device on the same adapter");
    let dims = TensorShape::new(1, 8, 2, 16);
    let data = vec![0.25f32; dims.elements()];
    let theirs = caller_buffer(&other, &data, USAGE);
    let wrapped = Tensor::from_buffer(gpu, theirs, dims, dims.contiguous_strides(), 0, DType::F32);
    assert!(
        matches!(
            wrapped,
            Err(Error::ForeignBuffer {
                tensor: "tensor",
                ..
            })
        ),
        "{wrapped:?}"
    );

    // A tensor made by the other Gpu, in any operand position.
    let mine = Tensor::from_f32(gpu, dims, &data).unwrap();
    let foreign = Tensor::from_f32(&other, dims, &data).unwrap();
    let out = Tensor::zeros(gpu, dims, DType::F32).unwrap();
    for position in ["q", "k", "v", "out"] {
        let pick = |name| if name == position { &foreign } else { &mine };
        let out_tensor = if position == "out" { &foreign } else { &out };
        let args = AttentionArgs {
            q: pick("q"),
            k: pick("k"),
            v: pick("v"),
            out: out_tensor,
            lse: None,
        };
        let result = gpu.run(|e| gpu.forward(e, &args, AttentionConfig::new()));
        assert!(
            matches!(result, Err(Error::WrongDevice { tensor }) if tensor == position),
            "{position}: {result:?}"
        );
    }
    assert!(matches!(
        foreign.to_f32_vec(gpu),
        Err(Error::WrongDevice { .. })
    ));
    let their_lse = Lse::new(&other, 1, 2, 8).unwrap();
    let args = AttentionArgs {
        q: &mine,
        k: &mine,
        v: &mine,
        out: &out,
        lse: Some(&their_lse),
    };
    assert!(matches!(
        gpu.run(|e| gpu.forward(e, &args, AttentionConfig::new())),
        Err(Error::WrongDevice { tensor: "lse" })
    ));
    let their_mask = AttentionMask::boolean(&other, [1, 1, 8, 8], &[true; 64]).unwrap();
    let args = AttentionArgs { lse: None, ..args };
    let options = wgpu_flash_attn::ForwardOptions::default().mask(&their_mask);
    assert!(matches!(
        gpu.run(|e| gpu.forward(e, &args, options)),
        Err(Error::WrongDevice { tensor: "mask" })
    ));
    let their_cache = KvCache::new(
        &other,
        KvCacheConfig::new(1, 2, 16, KvLayout::Contiguous { capacity: 32 }),
    )
    .unwrap();
    let q = Tensor::zeros(gpu, TensorShape::new(1, 1, 2, 16), DType::F32).unwrap();
    let decode_out = Tensor::zeros(gpu, q.shape(), DType::F32).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &their_cache,
        out: &decode_out,
        lse: None,
    };
    assert!(matches!(
        gpu.run(|e| gpu.decode(e, &args, AttentionConfig::new())),
        Err(Error::WrongDevice { tensor: "kv cache" })
    ));
}

/// A decode recorded before an append sees the cache as it was then, even
/// when both run in one submission: recording order is execution order.
#[test]
fn kv_cache_calls_run_in_recording_order() {
    let Some(gpu) = gpu() else { return };
    let (heads, head_dim, first, more) = (2, 32, 21, 11);
    let mut cache = KvCache::new(
        gpu,
        KvCacheConfig::new(1, heads, head_dim, KvLayout::Contiguous { capacity: 64 }),
    )
    .unwrap();
    let shape = AttentionShape::self_attention(1, first + more, heads, head_dim);
    let inputs = Inputs::draw(&shape, 0x5eed_0bde, 1.0);
    let token = heads * head_dim;
    let tokens = |data: &[f32], range: std::ops::Range<usize>| {
        let dims = TensorShape::new(1, range.len(), heads, head_dim);
        Tensor::from_f32(gpu, dims, &data[range.start * token..range.end * token]).unwrap()
    };
    let q_host = &inputs.q[..token];
    let q = Tensor::from_f32(gpu, TensorShape::new(1, 1, heads, head_dim), q_host).unwrap();
    let before = Tensor::filled(gpu, q.shape(), f32::NAN).unwrap();
    let after = Tensor::filled(gpu, q.shape(), f32::NAN).unwrap();
    let config = AttentionConfig::new();

    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let (k1, v1) = (tokens(&inputs.k, 0..first), tokens(&inputs.v, 0..first));
    cache.append(gpu, &mut encoder, &k1, &v1, None).unwrap();
    let decode = |encoder: &mut wgpu::CommandEncoder, cache: &KvCache, out: &Tensor| {
        let args = DecodeArgs {
            q: &q,
            cache,
            out,
            lse: None,
        };
        gpu.decode(encoder, &args, &config).unwrap();
    };
    decode(&mut encoder, &cache, &before);
    let (k2, v2) = (
        tokens(&inputs.k, first..first + more),
        tokens(&inputs.v, first..first + more),
    );
    cache.append(gpu, &mut encoder, &k2, &v2, None).unwrap();
    decode(&mut encoder, &cache, &after);
    // Truncating after recording changes nothing already recorded.
    cache.set_len(0, 3).unwrap();
    gpu.queue().submit([encoder.finish()]);

    for (out, keys) in [(&before, first), (&after, first + more)] {
        let part = AttentionShape {
            seq_q: 1,
            seq_kv: keys,
            ..shape
        };
        let want = reference::attention(
            &part,
            q_host,
            &inputs.k[..keys * token],
            &inputs.v[..keys * token],
            &config,
        )
        .unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        let err = common::max_abs_error(&got, &want.out, &format!("decode over {keys} keys"));
        assert!(err <= common::F32_TOLERANCE, "{keys} keys: error {err:e}");
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Gpu>();
    send_sync::<Tensor>();
    send_sync::<Lse>();
    send_sync::<KvCache>();
    send_sync::<AttentionMask>();
    send_sync::<AttentionConfig>();
    send_sync::<Error>();
}

/// Several threads share one `Gpu` (its pipeline cache and scratch) and
/// each gets its own correct result.
#[test]
fn threads_share_one_gpu() {
    let Some(gpu) = gpu() else { return };
    if gpu.info().adapter.backend == wgpu::Backend::Gl {
        eprintln!(
            "SKIPPED: wgpu's GL backend shares one context between threads and gives up waiting for it; on GL a Gpu is used from one thread at a time"
        );
        return;
    }
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            scope.spawn(move || {
                for call in 0..3u64 {
                    let shape = AttentionShape::self_attention(1, 19 + 7 * thread as usize, 2, 32);
                    let inputs = Inputs::draw(&shape, 0x5eed_7700 + 16 * thread + call, 1.0);
                    let config = AttentionConfig::new().causal(call % 2 == 1);
                    let errors = common::run_and_compare(gpu, &shape, &inputs, &config);
                    assert_close(errors, &format!("thread {thread} call {call}"));
                }
            });
        }
    });
}
