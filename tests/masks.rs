//! Attention masks against the reference: additive bias and boolean masks
//! with every broadcast form, combined with causal, windows and GQA;
//! block-sparse masks (each pattern constructor, a block layout, a dense
//! mask made block-sparse) equal to the same dense boolean mask; and the
//! typed errors.

mod common;

use common::random::{normal_vec, seeded};
use common::{Inputs, forward_tiers, gpu, with_tier};
use rand::RngExt;
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, BlockLayout, DType, Error,
    ForwardOptions, Gpu, Lse, Tensor, patterns,
};

/// Runs a masked call (NaN-poisoned outputs) and returns out and lse.
fn run_masked(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
    mask: &AttentionMask,
) -> (Vec<f32>, Vec<f32>) {
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    let out = Tensor::filled(gpu, shape.o_shape(), f32::NAN).unwrap();
    let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: Some(&lse),
    };
    gpu.run(|e| gpu.forward(e, &args, ForwardOptions::new(config).mask(mask)))
        .unwrap();
    (out.to_f32_vec(gpu).unwrap(), lse.to_vec(gpu).unwrap())
}

/// Largest error of out and lse against the reference (+inf lse must match
/// exactly); panics on an unwritten (NaN) element.
fn errors(got: &(Vec<f32>, Vec<f32>), want: &reference::ReferenceOutput) -> (f64, f64) {
    (
        common::max_abs_error(&got.0, &want.out, "out"),
        common::max_abs_error(&got.1, &want.lse, "lse"),
    )
}

fn shape() -> AttentionShape {
    AttentionShape {
        batch: 2,
        seq_q: 77,
        seq_kv: 130,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    }
}

#[test]
fn bias_and_boolean_masks_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let shape = shape();
    let inputs = Inputs::draw(&shape, 0x5eed_3a5c, 1.0);
    let mut rng = seeded(0x5eed_3a5d);
    let configs = [
        AttentionConfig::new(),
        AttentionConfig::new().causal(true),
        AttentionConfig::new()
            .window(Some(40), Some(10))
            .softcap(30.0),
    ];
    for dims in [
        [2, 4, 77, 130],
        [1, 4, 77, 130],
        [2, 1, 77, 130],
        [1, 1, 77, 130],
    ] {
        let n: usize = dims.iter().product();
        // Bias: unit normal, some keys hidden with -inf, one row entirely.
        let mut bias = normal_vec(&mut rng, n, 1.0);
        for (i, x) in bias.iter_mut().enumerate() {
            if rng.random_ratio(1, 10) || i / 130 == 5 {
                *x = f32::NEG_INFINITY;
            }
        }
        // Boolean: 70 % attended, row 9 of every plane empty.
        let bools: Vec<bool> = (0..n)
            .map(|i| i / 130 % 77 != 9 && rng.random_ratio(7, 10))
            .collect();
        let bias_mask = AttentionMask::bias(gpu, dims, &bias).unwrap();
        let bool_mask = AttentionMask::boolean(gpu, dims, &bools).unwrap();
        for config in configs
            .iter()
            .flat_map(|config| forward_tiers(gpu, DType::F32).map(|tier| with_tier(config, tier)))
        {
            let config = &config;
            for (mask, host) in [
                (
                    &bias_mask,
                    HostMask::Bias {
                        dims,
                        values: &bias,
                    },
                ),
                (
                    &bool_mask,
                    HostMask::Bool {
                        dims,
                        values: &bools,
                    },
                ),
            ] {
                let want = reference::attention_masked(
                    &shape, &inputs.q, &inputs.k, &inputs.v, config, &host,
                )
                .unwrap();
                let (out, lse) = errors(&run_masked(gpu, &shape, &inputs, config, mask), &want);
                assert!(
                    out <= 1e-4 && lse <= 1e-4,
                    "{:?} mask {dims:?} {config:?}: out {out:.2e}, lse {lse:.2e}",
                    mask.kind()
                );
            }
        }
    }
}

#[test]
fn an_f16_bias_is_widened_exactly() {
    let Some(gpu) = gpu() else { return };
    let shape = shape();
    let inputs = Inputs::draw(&shape, 0x5eed_0f16, 1.0);
    let dims = [1, 4, 77, 130];
    let mut rng = seeded(0x5eed_0f17);
    let halves: Vec<half::f16> = normal_vec(&mut rng, dims.iter().product(), 2.0)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    let widened: Vec<f32> = halves.iter().map(|x| x.to_f32()).collect();
    let mask = AttentionMask::bias_f16(gpu, dims, &halves).unwrap();
    let config = AttentionConfig::new().causal(true);
    let host = HostMask::Bias {
        dims,
        values: &widened,
    };
    let want = reference::attention_masked(&shape, &inputs.q, &inputs.k, &inputs.v, &config, &host)
        .unwrap();
    let (out, lse) = errors(&run_masked(gpu, &shape, &inputs, &config, &mask), &want);
    assert!(
        out <= 1e-4 && lse <= 1e-4,
        "f16 bias: out {out:.2e}, lse {lse:.2e}"
    );
}

#[test]
fn block_sparse_masks_equal_their_dense_equivalents() {
    let Some(gpu) = gpu() else { return };
    let seq = 300;
    let shape = AttentionShape {
        batch: 1,
        seq_q: seq,
        seq_kv: seq,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 32,
        head_dim_v: 32,
    };
    let inputs = Inputs::draw(&shape, 0x5eed_b10c, 1.0);
    let mut rng = seeded(0x5eed_b10d);
    let random: Vec<bool> = (0..seq * seq).map(|_| rng.random_ratio(1, 20)).collect();
    let cases = [
        (
            "longformer",
            patterns::longformer(seq, 64, &[0, 150, 299]).unwrap(),
        ),
        ("strided", patterns::strided(seq, 17).unwrap()),
        ("fixed", patterns::fixed(seq, 32, 4).unwrap()),
        ("random 5 %", random),
    ];
    let dims = [1, 1, seq, seq];
    for (name, values) in &cases {
        let dense = AttentionMask::boolean(gpu, dims, values).unwrap();
        let sparse = AttentionMask::block_sparse(gpu, dims, values).unwrap();
        assert!(sparse.is_block_sparse() && !dense.is_block_sparse());
        for config in [AttentionConfig::new(), AttentionConfig::new().causal(true)]
            .iter()
            .flat_map(|config| forward_tiers(gpu, DType::F32).map(|tier| with_tier(config, tier)))
        {
            let host = HostMask::Bool { dims, values };
            let want = reference::attention_masked(
                &shape, &inputs.q, &inputs.k, &inputs.v, &config, &host,
            )
            .unwrap();
            let dense_out = run_masked(gpu, &shape, &inputs, &config, &dense);
            let sparse_out = run_masked(gpu, &shape, &inputs, &config, &sparse);
            let (out, lse) = errors(&sparse_out, &want);
            assert!(
                out <= 1e-4 && lse <= 1e-4,
                "{name} {config:?}: out {out:.2e}, lse {lse:.2e}"
            );
            let (out, lse) = errors(&dense_out, &want);
            assert!(
                out <= 1e-4 && lse <= 1e-4,
                "{name} dense {config:?}: {out:.2e}, {lse:.2e}"
            );
        }
    }

    // A block layout: everything attended equals plain attention; a row of
    // empty blocks gives zeros and lse +inf.
    let (block_q, block_k) = (64, 48);
    let layout_dims = [1, 1, seq.div_ceil(block_q), seq.div_ceil(block_k)];
    let mut layout = BlockLayout {
        block_q,
        block_k,
        dims: layout_dims,
        attend: vec![true; layout_dims.iter().product()],
    };
    let all = AttentionMask::from_blocks(gpu, seq, seq, &layout, None).unwrap();
    let config = AttentionConfig::new();
    let plain = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
    let (out, lse) = errors(&run_masked(gpu, &shape, &inputs, &config, &all), &plain);
    assert!(
        out <= 1e-4 && lse <= 1e-4,
        "all-dense layout: {out:.2e}, {lse:.2e}"
    );
    for kb in 0..layout_dims[3] {
        layout.attend[layout_dims[3] + kb] = false;
    }
    let holes = AttentionMask::from_blocks(gpu, seq, seq, &layout, None).unwrap();
    let got = run_masked(gpu, &shape, &inputs, &config, &holes);
    let row = shape.heads_q * shape.head_dim;
    for i in block_q..2 * block_q {
        assert!(
            got.0[i * row..(i + 1) * row].iter().all(|&x| x == 0.0),
            "row {i}: zeros"
        );
        assert!(
            got.1[i].is_infinite() && got.1[seq + i].is_infinite(),
            "row {i}: lse +inf"
        );
    }
}

/// A block layout per batch entry and head, refined by an element mask,
/// is the boolean mask its blocks and elements say: the same bits as
/// `AttentionMask::block_sparse` of that mask (computed here on the host),
/// and the reference's result under it.
#[test]
fn block_layouts_with_element_masks_match_their_boolean_mask() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 2,
        seq_q: 40,
        seq_kv: 70,
        heads_q: 3,
        heads_kv: 3,
        head_dim: 32,
        head_dim_v: 32,
    };
    let (block_q, block_k) = (16, 32);
    let dims = [2, 3, 40usize.div_ceil(block_q), 70usize.div_ceil(block_k)];
    let mut rng = seeded(0x5eed_b10c);
    let attend: Vec<bool> = (0..dims.iter().product::<usize>())
        .map(|_| rng.random_ratio(2, 3))
        .collect();
    let mask_dims = [2, 3, 40, 70];
    let element: Vec<bool> = (0..mask_dims.iter().product::<usize>())
        .map(|_| rng.random_ratio(3, 4))
        .collect();
    let values: Vec<bool> = element
        .iter()
        .enumerate()
        .map(|(index, &on)| {
            let (key, row, plane) = (index % 70, index / 70 % 40, index / (70 * 40));
            let block = (plane * dims[2] + row / block_q) * dims[3] + key / block_k;
            on && attend[block]
        })
        .collect();
    let layout = BlockLayout {
        block_q,
        block_k,
        dims,
        attend,
    };
    let from_blocks = AttentionMask::from_blocks(gpu, 40, 70, &layout, Some(&element)).unwrap();
    let from_values = AttentionMask::block_sparse(gpu, mask_dims, &values).unwrap();
    let inputs = Inputs::draw(&shape, 0x5eed_b10d, 1.0);
    let config = AttentionConfig::new();
    let got = run_masked(gpu, &shape, &inputs, &config, &from_blocks);
    let same = run_masked(gpu, &shape, &inputs, &config, &from_values);
    assert_eq!(got, same, "the layout's mask and its boolean mask");
    let host = HostMask::Bool {
        dims: mask_dims,
        values: &values,
    };
    let want = reference::attention_masked(&shape, &inputs.q, &inputs.k, &inputs.v, &config, &host)
        .unwrap();
    let (out, lse) = errors(&got, &want);
    assert!(out <= 1e-4 && lse <= 1e-4, "out {out:.2e}, lse {lse:.2e}");
}

/// Patterns too large for the host are typed errors, not an abort.
#[test]
fn patterns_past_host_memory_are_typed_errors() {
    for result in [
        patterns::longformer(1 << 33, 16, &[0]),
        patterns::strided(1 << 31, 4),
        patterns::fixed(1 << 31, 4, 1),
    ] {
        assert!(
            matches!(
                result,
                Err(Error::ShapeOverflow {
                    tensor: "mask pattern",
                    ..
                })
            ),
            "{:?}",
            result.err()
        );
    }
}

/// A block-sparse mask's tile states (one word per tile of its kernel's
/// block) are bound whole: with a caller's one-row, four-key block they outgrow a
/// binding the mask itself fits, which is `BufferTooLarge` with the bytes;
/// the planner's block, sixteen times fewer tiles, runs and matches the
/// reference.
#[test]
fn mask_tile_states_past_one_binding_are_typed_errors() {
    let binding = 192 << 10;
    let Some(gpu) = common::gpu_with_limits("small storage bindings", |limits| {
        limits.max_storage_buffer_binding_size = binding;
    }) else {
        return;
    };
    let gpu = &gpu;
    let shape = AttentionShape::self_attention(1, 512, 1, 8);
    let inputs = Inputs::draw(&shape, 0x5eed_71e5, 1.0);
    let mut rng = seeded(0x71e5);
    let allowed: Vec<bool> = (0..512 * 512).map(|_| rng.random_bool(0.7)).collect();
    let mask = AttentionMask::block_sparse(gpu, [1, 1, 512, 512], &allowed).unwrap();
    let one_row = AttentionConfig::new().blocked_layout(wgpu_flash_attn::BlockedLayout {
        row_lanes: 1,
        key_lanes: 1,
        rows: 1,
    });
    let [q, k, v, out] = common::upload(gpu, &shape, &inputs);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let err = gpu
        .run(|e| gpu.forward(e, &args, ForwardOptions::new(&one_row).mask(&mask)))
        .unwrap_err();
    let tiles = 512 * 512 / 4;
    assert!(
        matches!(
            err,
            Error::BufferTooLarge { tensor: "mask tile states", bytes, limit, .. }
                if bytes == 4 * tiles && limit == binding
        ),
        "{err}"
    );
    let host = HostMask::Bool {
        dims: [1, 1, 512, 512],
        values: &allowed,
    };
    let config = AttentionConfig::new();
    let want = reference::attention_masked(&shape, &inputs.q, &inputs.k, &inputs.v, &config, &host)
        .unwrap();
    let (out_err, lse_err) = errors(&run_masked(gpu, &shape, &inputs, &config, &mask), &want);
    assert!(
        out_err <= 1e-4 && lse_err <= 1e-4,
        "{out_err:.2e} / {lse_err:.2e}"
    );
}

#[test]
fn bad_masks_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let shape = shape();
    let inputs = Inputs::draw(&shape, 0x5eed_bad0, 1.0);
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let out = Tensor::filled(gpu, shape.q_shape(), 0.0).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &k,
        out: &out,
        lse: None,
    };
    for dims in [
        [3, 1, 77, 130],
        [1, 2, 77, 130],
        [1, 1, 76, 130],
        [1, 1, 77, 131],
    ] {
        let n = dims.iter().product();
        let mask = AttentionMask::boolean(gpu, dims, &vec![true; n]).unwrap();
        match gpu.run(|e| {
            gpu.forward(
                e,
                &args,
                ForwardOptions::new(&AttentionConfig::new()).mask(&mask),
            )
        }) {
            Err(Error::MaskShape {
                dims: got,
                shape: s,
            }) => {
                assert_eq!((got, s), (dims, [2, 4, 77, 130]));
            }
            other => panic!("{dims:?}: expected MaskShape, got {other:?}"),
        }
    }
    let mut bias = vec![0.0f32; 77 * 130];
    bias[100] = f32::NAN;
    assert!(matches!(
        AttentionMask::bias(gpu, [1, 1, 77, 130], &bias),
        Err(Error::MaskValue { index: 100, .. })
    ));
    assert!(matches!(
        AttentionMask::boolean(gpu, [1, 1, 77, 130], &[true; 10]),
        Err(Error::DataLength {
            expected: 10010,
            got: 10,
            ..
        })
    ));
    let layout = BlockLayout {
        block_q: 64,
        block_k: 64,
        dims: [1, 1, 2, 2],
        attend: vec![true; 4],
    };
    assert!(matches!(
        AttentionMask::from_blocks(gpu, 77, 130, &layout, None),
        Err(Error::BlockLayout {
            expected: [1, 1, 2, 3],
            ..
        })
    ));
}
