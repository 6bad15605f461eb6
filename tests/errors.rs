//! Bad input gives a typed error with the numbers in it, never a panic or a
//! GPU fault; the device keeps working afterwards.

mod common;

use common::{Inputs, assert_close, gpu, run_and_compare};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionShape, BackwardArgs, DType, DecodeArgs, Error,
    Gpu, KvCache, KvCacheConfig, KvLayout, Lse, Rope, RopeStyle, Strides, Tensor, TensorShape,
};

fn tensor(gpu: &Gpu, shape: TensorShape) -> Tensor {
    Tensor::from_f32(gpu, shape, &vec![0.5; shape.elements()]).unwrap()
}

fn run(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &AttentionConfig,
) -> Result<(), Error> {
    let out = Tensor::zeros(gpu, q.shape(), wgpu_flash_attn::DType::F32).unwrap();
    let lse = None;
    gpu.run(|e| {
        gpu.forward(
            e,
            &AttentionArgs {
                q,
                k,
                v,
                out: &out,
                lse,
            },
            config,
        )
    })
}

/// The error a default forward call on `args` must return.
fn forward_error(gpu: &Gpu, args: &AttentionArgs<'_>) -> Error {
    gpu.run(|e| gpu.forward(e, args, AttentionConfig::new()))
        .unwrap_err()
}

/// A storage buffer of the program's own, to wrap.
fn caller_buffer(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller's buffer"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

/// The device still computes correct results after an error.
fn still_works(gpu: &Gpu) {
    let shape = AttentionShape::self_attention(1, 9, 1, 32);
    let inputs = Inputs::draw(&shape, 99, 1.0);
    assert_close(
        run_and_compare(gpu, &shape, &inputs, &AttentionConfig::new()),
        "after an error",
    );
}

#[test]
fn host_slices_that_do_not_match_the_shape() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(2, 10, 2, 32);
    let n = shape.q_shape().elements();
    let err = gpu
        .attention_host(
            &shape,
            &vec![0.0; n],
            &vec![0.0; n - 1],
            &vec![0.0; n],
            &AttentionConfig::new(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataLength {
                tensor: "k",
                expected: 1280,
                got: 1279
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("1280") && err.to_string().contains("1279"));
    let err = wgpu_flash_attn::reference::attention(
        &shape,
        &vec![0.0; n + 3],
        &vec![0.0; n],
        &vec![0.0; n],
        &AttentionConfig::new(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataLength {
                tensor: "q",
                expected: 1280,
                got: 1283
            }
        ),
        "{err}"
    );
    still_works(gpu);
}

#[test]
fn zero_dimensions() {
    let Some(gpu) = gpu() else { return };
    let err = Tensor::from_f32(gpu, TensorShape::new(1, 0, 2, 32), &[]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ZeroDimension {
                shape: [1, 0, 2, 32],
                ..
            }
        ),
        "{err}"
    );
    let shape = AttentionShape::self_attention(1, 0, 2, 32);
    let err = gpu
        .attention_host(&shape, &[], &[], &[], &AttentionConfig::new())
        .unwrap_err();
    assert!(matches!(err, Error::ZeroDimension { .. }), "{err}");
    still_works(gpu);
}

#[test]
fn unsupported_head_dims() {
    let Some(gpu) = gpu() else { return };
    for head_dim in [4, 12, 100, 580, 584, 1024] {
        let t = tensor(gpu, TensorShape::new(1, 5, 1, head_dim));
        let err = run(gpu, &t, &t.clone(), &t.clone(), &AttentionConfig::new()).unwrap_err();
        assert!(
            matches!(err, Error::HeadDimUnsupported { got, .. } if got == head_dim),
            "{err}"
        );
        assert!(err.to_string().contains(&head_dim.to_string()));
    }
    still_works(gpu);
}

#[test]
fn k_and_v_shapes_that_differ() {
    let Some(gpu) = gpu() else { return };
    let q = tensor(gpu, TensorShape::new(1, 5, 2, 32));
    let k = tensor(gpu, TensorShape::new(1, 7, 2, 32));
    let v = tensor(gpu, TensorShape::new(1, 8, 2, 32));
    let err = run(gpu, &q, &k, &v, &AttentionConfig::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                left: 7,
                right: 8,
                ..
            }
        ),
        "{err}"
    );
    // V may have a head dim of its own, but O must have it too.
    let v = tensor(gpu, TensorShape::new(1, 7, 2, 64));
    let err = run(gpu, &q, &k, &v, &AttentionConfig::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                left: 64,
                right: 32,
                ..
            }
        ),
        "{err}"
    );
    let k = tensor(gpu, TensorShape::new(2, 7, 2, 32));
    let v = k.clone();
    let err = run(gpu, &q, &k, &v, &AttentionConfig::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeMismatch {
                left: 1,
                right: 2,
                ..
            }
        ),
        "{err}"
    );
    still_works(gpu);
}

#[test]
fn heads_q_not_a_multiple_of_heads_kv() {
    let Some(gpu) = gpu() else { return };
    let q = tensor(gpu, TensorShape::new(1, 5, 6, 32));
    let kv = tensor(gpu, TensorShape::new(1, 5, 4, 32));
    let err = run(gpu, &q, &kv, &kv.clone(), &AttentionConfig::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::HeadsNotDivisible {
                heads_q: 6,
                heads_kv: 4
            }
        ),
        "{err}"
    );
    still_works(gpu);
}

#[test]
fn views_out_of_bounds_or_misaligned() {
    let Some(gpu) = gpu() else { return };
    let base = tensor(gpu, TensorShape::new(1, 8, 2, 32));
    let contiguous = base.shape().contiguous_strides();
    let err = base
        .view(TensorShape::new(1, 9, 2, 32), contiguous, 0)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfBounds {
                needed: 576,
                available: 512,
                ..
            }
        ),
        "{err}"
    );
    let err = base.view(base.shape(), contiguous, 4).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfBounds {
                needed: 516,
                available: 512,
                ..
            }
        ),
        "{err}"
    );

    let odd = base
        .view(
            TensorShape::new(1, 4, 2, 32),
            Strides {
                batch: 512,
                seq: 66,
                head: 32,
            },
            0,
        )
        .unwrap();
    let err = run(
        gpu,
        &odd,
        &odd.clone(),
        &odd.clone(),
        &AttentionConfig::new(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misaligned {
                what: "seq stride",
                value: 66,
                multiple: 4,
                ..
            }
        ),
        "{err}"
    );

    // An output whose rows share memory (a broadcast seq stride, or heads
    // that interleave) is refused; as an input, a broadcast is fine.
    let q = tensor(gpu, TensorShape::new(1, 4, 2, 32));
    let buffer = tensor(gpu, TensorShape::new(1, 8, 2, 32));
    for (strides, what) in [
        (
            Strides {
                batch: 512,
                seq: 0,
                head: 32,
            },
            "broadcast rows",
        ),
        (
            Strides {
                batch: 512,
                seq: 64,
                head: 16,
            },
            "interleaved heads",
        ),
    ] {
        let out = buffer
            .view(TensorShape::new(1, 4, 2, 32), strides, 0)
            .unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &q,
            v: &q,
            out: &out,
            lse: None,
        };
        let err = forward_error(gpu, &args);
        assert!(
            matches!(
                err,
                Error::OverlappingOutput {
                    tensor: "out",
                    shape: [1, 4, 2, 32],
                    ..
                }
            ),
            "{what}: {err}"
        );
    }
    let shared_k = buffer
        .view(
            TensorShape::new(1, 4, 2, 32),
            Strides {
                batch: 512,
                seq: 0,
                head: 32,
            },
            0,
        )
        .unwrap();
    run(gpu, &q, &shared_k, &shared_k, &AttentionConfig::new()).unwrap();
    still_works(gpu);
}

#[test]
fn output_aliasing_an_input() {
    let Some(gpu) = gpu() else { return };
    let q = tensor(gpu, TensorShape::new(1, 5, 2, 32));
    let args = AttentionArgs {
        q: &q,
        k: &q,
        v: &q,
        out: &q,
        lse: None,
    };
    let err = forward_error(gpu, &args);
    assert!(
        matches!(
            err,
            Error::OutputAliasesInput {
                tensor: "out",
                input: "q"
            }
        ),
        "{err}"
    );
    // The logsumexp in the output's buffer: two writable bindings of one
    // buffer, which wgpu accepts and the kernels would race on.
    let shape = TensorShape::new(1, 5, 2, 32);
    let (k, out) = (tensor(gpu, shape), tensor(gpu, shape));
    let lse = Lse::from_buffer(gpu, out.buffer().clone(), 1, 2, 5).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &k,
        out: &out,
        lse: Some(&lse),
    };
    let err = forward_error(gpu, &args);
    assert!(
        matches!(
            err,
            Error::OutputAliasesInput {
                tensor: "lse",
                input: "out"
            }
        ),
        "{err}"
    );
    // The backward reads that lse while its row pass writes `out`.
    let grads = [tensor(gpu, shape), tensor(gpu, shape), tensor(gpu, shape)];
    let backward = BackwardArgs {
        q: &q,
        k: &k,
        v: &k,
        out: &out,
        lse: &lse,
        d_out: &k,
        dq: &grads[0],
        dk: &grads[1],
        dv: &grads[2],
        dsinks: None,
    };
    let err = gpu
        .run(|e| gpu.backward(e, &backward, AttentionConfig::new()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutputAliasesInput {
                tensor: "out",
                input: "lse"
            }
        ),
        "{err}"
    );
    // The backward binds the logsumexp writable (the forward's binding):
    // in the buffer of an input it reads, wgpu would refuse the dispatch.
    let q_and_lse = Tensor::zeros(gpu, TensorShape::new(1, 6, 2, 32), DType::F32).unwrap();
    let q_after_lse = q_and_lse
        .view(shape, shape.contiguous_strides(), 64)
        .unwrap();
    let lse = Lse::from_buffer(gpu, q_and_lse.buffer().clone(), 1, 2, 5).unwrap();
    let out = tensor(gpu, shape);
    for (name, args) in [
        (
            "q",
            BackwardArgs {
                q: &q_after_lse,
                out: &out,
                lse: &lse,
                ..backward
            },
        ),
        (
            "d_out",
            BackwardArgs {
                d_out: &q_after_lse,
                out: &out,
                lse: &lse,
                ..backward
            },
        ),
    ] {
        let err = gpu
            .run(|e| gpu.backward(e, &args, AttentionConfig::new()))
            .unwrap_err();
        assert!(
            matches!(err, Error::OutputAliasesInput { tensor: "lse", input } if input == name),
            "lse in {name}'s buffer: {err}"
        );
    }
    still_works(gpu);
}

/// Devices that bind no storage buffer or dispatch no workgroup (limits a
/// program may open a device with): wrapping them works, and the calls
/// that need what they lack are typed errors, not wgpu's panics.
#[test]
fn devices_without_storage_buffers_or_dispatches() {
    let Some(shared) = gpu() else { return };
    let gpu = &common::gpu_with_limits("no storage buffers", |limits| {
        limits.max_storage_buffers_per_shader_stage = 0;
    })
    .expect("called after the test adapter was found");
    let shape = TensorShape::new(1, 4, 1, 32);
    let q = Tensor::filled(gpu, shape, 0.5).unwrap();
    let out = Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &q,
        v: &q,
        out: &out,
        lse: None,
    };
    let err = forward_error(gpu, &args);
    assert!(
        matches!(err, Error::StorageBuffers { limit: 0, needed, .. } if needed > 0),
        "{err}"
    );
    // Wrapping a program's buffer probes it in a storage binding.
    let buffer = caller_buffer(gpu, 4 * shape.elements() as u64);
    let strides = shape.contiguous_strides();
    let err = Tensor::from_buffer(gpu, buffer, shape, strides, 0, DType::F32).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StorageBuffers {
                limit: 0,
                needed: 1,
                ..
            }
        ),
        "{err}"
    );

    let gpu = &common::gpu_with_limits("no dispatches", |limits| {
        limits.max_compute_workgroups_per_dimension = 0;
    })
    .expect("called after the test adapter was found");
    let q = Tensor::filled(gpu, shape, 0.5).unwrap();
    let rope = Rope::new(RopeStyle::HalfSplit);
    let err = gpu.run(|e| gpu.rope(e, &q, &rope, &[0])).unwrap_err();
    assert!(
        matches!(err, Error::DispatchTooLarge { limit: 0, .. }),
        "{err}"
    );
    still_works(shared);
}

/// A program's buffer destroyed after a tensor wrapped it: the call that
/// binds it is a typed error, recorded into the program's own encoder
/// (where wgpu's own report would be a panic).
#[test]
fn a_destroyed_caller_buffer_is_a_typed_error() {
    let Some(gpu) = gpu() else { return };
    let shape = TensorShape::new(1, 4, 1, 32);
    let buffer = caller_buffer(gpu, 4 * shape.elements() as u64);
    let strides = shape.contiguous_strides();
    let q = Tensor::from_buffer(gpu, buffer.clone(), shape, strides, 0, DType::F32).unwrap();
    buffer.destroy();
    let k = tensor(gpu, shape);
    let out = Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &k,
        out: &out,
        lse: None,
    };
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let err = gpu
        .forward(&mut encoder, &args, AttentionConfig::new())
        .unwrap_err();
    assert!(matches!(err, Error::GpuValidation { .. }), "{err}");
    drop(encoder);
    still_works(gpu);
}

/// A device that binds fewer storage buffers per shader stage than a
/// kernel needs (`Gpu::from_device` of a device opened with low limits):
/// the kernels that need more are `StorageBuffers` with the numbers, those
/// that fit run and match the reference, and the device keeps working.
#[test]
fn devices_binding_few_storage_buffers() {
    let Some(shared) = gpu() else { return };
    let limit = 4;
    let gpu = &common::gpu_with_limits("four storage buffers", |limits| {
        limits.max_storage_buffers_per_shader_stage = limit;
    })
    .expect("called after the test adapter was found");
    assert_eq!(
        gpu.info().limits.max_storage_buffers_per_shader_stage,
        limit
    );
    let refused = |err: Error, what: &str| {
        assert!(
            matches!(err, Error::StorageBuffers { needed, limit: l, .. } if needed > limit && l == limit),
            "{what}: {err}"
        );
    };

    let shape = AttentionShape::self_attention(1, 9, 1, 32);
    let inputs = Inputs::draw(&shape, 0x5b5, 1.0);
    let [q, k, v, out] = common::upload(gpu, &shape, &inputs);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let config = AttentionConfig::new();
    refused(forward_error(gpu, &args), "forward");
    refused(
        gpu.run(|e| gpu.naive_attention(e, &args, &config))
            .unwrap_err(),
        "naive",
    );
    let cache_config = KvCacheConfig::new(1, 1, 32, KvLayout::Contiguous { capacity: 16 });
    let mut cache = KvCache::new(gpu, cache_config).unwrap();
    refused(
        gpu.run(|e| cache.append(gpu, e, &k, &v, None)).unwrap_err(),
        "append",
    );
    let one = Tensor::zeros(gpu, TensorShape::new(1, 1, 1, 32), DType::F32).unwrap();
    let one_out = Tensor::zeros(gpu, one.shape(), DType::F32).unwrap();
    let decode = DecodeArgs {
        q: &one,
        cache: &cache,
        out: &one_out,
        lse: None,
    };
    refused(
        gpu.run(|e| gpu.decode(e, &decode, &config)).unwrap_err(),
        "decode",
    );

    // RoPE binds three storage buffers: it runs, as the reference rotates.
    let rope = Rope::new(RopeStyle::HalfSplit);
    gpu.run(|e| gpu.rope(e, &q, &rope, &[3])).unwrap();
    let want = wgpu_flash_attn::reference::rope(&rope, shape.q_shape(), &inputs.q, &[3]).unwrap();
    let got = q.to_f32_vec(gpu).unwrap();
    let gap = common::max_abs_error(&got, &want, "rope on a four-buffer device");
    assert!(
        gap <= common::ROPE_BOUND,
        "rope on a four-buffer device: {gap:.2e}"
    );
    still_works(shared);
}

#[test]
fn invalid_options() {
    let Some(gpu) = gpu() else { return };
    let q = tensor(gpu, TensorShape::new(1, 5, 2, 32));
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(AttentionConfig, Expect)> = vec![
        (
            AttentionConfig::new().scale(f32::NAN),
            |e| matches!(e, Error::InvalidScale(s) if s.is_nan()),
        ),
        (AttentionConfig::new().scale(f32::INFINITY), |e| {
            matches!(e, Error::InvalidScale(_))
        }),
        (
            AttentionConfig::new().softcap(0.0),
            |e| matches!(e, Error::InvalidSoftcap(c) if *c == 0.0),
        ),
        (
            AttentionConfig::new().softcap(-3.0),
            |e| matches!(e, Error::InvalidSoftcap(c) if *c == -3.0),
        ),
        (AttentionConfig::new().window(Some(-2), Some(-1)), |e| {
            matches!(
                e,
                Error::InvalidWindow {
                    left: Some(-2),
                    right: Some(-1)
                }
            )
        }),
        (
            AttentionConfig::new().alibi(Alibi::PerHead(vec![0.5; 3])),
            |e| matches!(e, Error::AlibiSlopes { got: 3, .. }),
        ),
    ];
    for (config, expected) in cases {
        let err = run(gpu, &q, &q.clone(), &q.clone(), &config).unwrap_err();
        assert!(expected(&err), "{config:?} gave {err}");
    }
    still_works(gpu);
}

/// Without any adapter the crate says how to get one (this test needs no
/// GPU: it asks for an adapter on no backend at all).
#[test]
fn no_adapter_error_says_how_to_get_one() {
    let options = wgpu_flash_attn::AdapterOptions {
        backends: wgpu::Backends::empty(),
        adapter_name: None,
        power_preference: wgpu::PowerPreference::default(),
        cooperative_matrix: false,
        emulate_cooperative_matrices: false,
    };
    let err = match pollster::block_on(Gpu::request(&options)) {
        Ok(_) => panic!("an adapter was found on no backend"),
        Err(err) => err,
    };
    assert!(matches!(err, Error::NoAdapter { .. }), "{err}");
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");

    let options = wgpu_flash_attn::AdapterOptions {
        adapter_name: Some("no adapter has this name".into()),
        ..wgpu_flash_attn::AdapterOptions::from_env()
    };
    let err = match pollster::block_on(Gpu::request(&options)) {
        Ok(_) => panic!("an adapter matched an impossible name"),
        Err(err) => err,
    };
    assert!(matches!(err, Error::AdapterNotFound { .. }), "{err}");
}

/// Shapes whose element counts do not fit in memory are typed errors, in
/// the GPU path and in the reference, never a wrapped count or a panic.
#[test]
fn overflowing_shapes_are_typed_errors() {
    let huge = TensorShape::new(1 << 20, 1 << 20, 1 << 20, 256);
    let shape = AttentionShape::self_attention(1 << 20, 1 << 20, 1 << 20, 256);
    let err = wgpu_flash_attn::reference::attention(&shape, &[], &[], &[], &AttentionConfig::new())
        .unwrap_err();
    assert!(
        matches!(err, Error::ShapeOverflow { tensor: "q", .. }),
        "{err}"
    );
    // Positions are i32 in the kernels: a longer sequence is refused.
    let long = AttentionShape::self_attention(1, 1 << 31, 1, 8);
    let err = wgpu_flash_attn::reference::attention(&long, &[], &[], &[], &AttentionConfig::new())
        .unwrap_err();
    assert!(
        matches!(err, Error::ShapeOverflow { tensor, .. } if tensor.starts_with("sequence")),
        "{err}"
    );
    let Some(gpu) = gpu() else { return };
    for result in [
        Tensor::zeros(gpu, huge, wgpu_flash_attn::DType::F32),
        Tensor::from_f32(gpu, huge, &[]),
    ] {
        assert!(
            matches!(result, Err(Error::ShapeOverflow { .. })),
            "{result:?}"
        );
    }
    // Sizes that count but do not fit the device are refused before any
    // host memory of their size is allocated (the process would abort).
    let too_big = TensorShape::new(1 << 20, 1 << 20, 1, 64);
    for result in [
        Tensor::filled(gpu, too_big, f32::NAN),
        Tensor::filled_as(gpu, too_big, 0.0, wgpu_flash_attn::DType::F16),
    ] {
        assert!(
            matches!(result, Err(Error::BufferTooLarge { .. })),
            "{result:?}"
        );
    }
    let state = wgpu_flash_attn::LinearState::zeros(gpu, 1 << 24, 1 << 10, 256, 256);
    assert!(
        matches!(state, Err(Error::BufferTooLarge { .. })),
        "{:?}",
        state.err()
    );
    // One block per query and key at N = 2^20: 2^40 bits of mask.
    let layout = wgpu_flash_attn::BlockLayout {
        block_q: 1 << 20,
        block_k: 1 << 20,
        dims: [1, 1, 1, 1],
        attend: vec![true],
    };
    let mask = wgpu_flash_attn::AttentionMask::from_blocks(gpu, 1 << 20, 1 << 20, &layout, None);
    assert!(
        matches!(mask, Err(Error::BufferTooLarge { tensor: "mask", .. })),
        "{:?}",
        mask.err()
    );
    // A view whose extent overflows is out of bounds, not wrapped in.
    let small = Tensor::zeros(
        gpu,
        TensorShape::new(1, 4, 1, 8),
        wgpu_flash_attn::DType::F32,
    )
    .unwrap();
    let strides = wgpu_flash_attn::Strides {
        batch: usize::MAX / 2,
        seq: usize::MAX / 2,
        head: 8,
    };
    assert!(matches!(
        small.view(TensorShape::new(3, 3, 1, 8), strides, 0),
        Err(Error::OutOfBounds { .. })
    ));
}

/// A window side of `i64::MAX` is an unbounded side, in the reference
/// (and so in `AttentionShape::flops`) as on the GPU.
#[test]
fn widest_window_equals_unbounded() {
    let shape = AttentionShape {
        batch: 1,
        seq_q: 23,
        seq_kv: 9,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 16,
        head_dim_v: 16,
    };
    let widest = AttentionConfig::new().window(Some(i64::MAX), Some(i64::MAX));
    let unbounded = AttentionConfig::new();
    for row in 0..shape.seq_q {
        assert_eq!(
            widest.visible_keys(row, shape.seq_q, shape.seq_kv),
            0..shape.seq_kv,
            "row {row}"
        );
    }
    assert_eq!(shape.flops(&widest), shape.flops(&unbounded));
    let Some(gpu) = gpu() else { return };
    let inputs = Inputs::draw(&shape, 0x5eed_7777, 1.0);
    for config in [
        widest,
        AttentionConfig::new().window(Some(i64::MAX), Some(0)),
    ] {
        assert_close(
            common::run_and_compare(gpu, &shape, &inputs, &config),
            &format!("{config:?}"),
        );
    }
}
