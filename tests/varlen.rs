//! Packed variable-length batches and dense batches with valid lengths:
//! each sequence gives exactly what running it alone gives; padding rows
//! are zeros with logsumexp +inf; bad offsets and lengths are typed errors.

mod common;

use common::random::{normal_vec, seeded};
use common::{assert_rows_close, forward_tiers, gpu, sequence_reference, with_tier};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, Error, ForwardOptions, Gpu, Lse, Tensor,
    TensorShape, ValidLengths,
};

const HEADS_Q: usize = 6;
const HEADS_KV: usize = 2;
const HEAD_DIM: usize = 40;

fn packed(gpu: &Gpu, tokens: usize, heads: usize, data: &[f32]) -> Tensor {
    Tensor::from_f32(gpu, TensorShape::new(1, tokens, heads, HEAD_DIM), data).unwrap()
}

#[test]
fn a_packed_batch_equals_each_sequence_alone() {
    let Some(gpu) = gpu() else { return };
    let q_lens = [0, 1, 37, 64, 130, 9];
    let k_lens = [5, 1, 80, 64, 129, 0];
    let cu = |lens: &[usize]| -> Vec<usize> {
        std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, &n| {
                *acc += n;
                Some(*acc)
            }))
            .collect()
    };
    let (cu_q, cu_k) = (cu(&q_lens), cu(&k_lens));
    let (total_q, total_k) = (cu_q[q_lens.len()], cu_k[k_lens.len()]);
    let mut rng = seeded(0x5eed_7a41);
    let q = normal_vec(&mut rng, total_q * HEADS_Q * HEAD_DIM, 1.0);
    let k = normal_vec(&mut rng, total_k * HEADS_KV * HEAD_DIM, 1.0);
    let v = normal_vec(&mut rng, total_k * HEADS_KV * HEAD_DIM, 1.0);
    let (qt, kt, vt) = (
        packed(gpu, total_q, HEADS_Q, &q),
        packed(gpu, total_k, HEADS_KV, &k),
        packed(gpu, total_k, HEADS_KV, &v),
    );
    // Each sequence draws its own dropout mask (by its index), also when
    // its keys run in chunks (a chunk names its sequence and first key).
    let dropout = AttentionConfig::new().causal(true).dropout(0.3, 21);
    for (config, keys) in [
        (AttentionConfig::new(), None),
        (AttentionConfig::new().causal(true), None),
        (AttentionConfig::new().window(Some(7), Some(3)), None),
        (dropout.clone(), None),
        (dropout, Some(9)),
    ]
    .iter()
    .flat_map(|(config, keys)| {
        forward_tiers(gpu, DType::F32).map(|tier| (with_tier(config, tier), *keys))
    }) {
        let out = Tensor::filled(gpu, qt.shape(), f32::NAN).unwrap();
        let lse = Lse::new(gpu, 1, HEADS_Q, total_q).unwrap();
        let args = AttentionArgs {
            q: &qt,
            k: &kt,
            v: &vt,
            out: &out,
            lse: Some(&lse),
        };
        let options = keys.into_iter().fold(
            ForwardOptions::new(&config).varlen(&cu_q, &cu_k),
            ForwardOptions::keys_per_dispatch,
        );
        gpu.run(|e| gpu.forward(e, &args, options.clone())).unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        let got_lse = lse.to_vec(gpu).unwrap();
        let (qt_row, kv_row) = (HEADS_Q * HEAD_DIM, HEADS_KV * HEAD_DIM);
        for i in 0..q_lens.len() {
            let (q0, q1, k0, k1) = (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]);
            let (want, want_lse) = sequence_reference(
                &config,
                i,
                (HEADS_Q, HEADS_KV, HEAD_DIM),
                &q[q0 * qt_row..q1 * qt_row],
                &k[k0 * kv_row..k1 * kv_row],
                &v[k0 * kv_row..k1 * kv_row],
            );
            let what = format!(
                "{config:?} {keys:?} keys per dispatch, sequence {i} ({} x {})",
                q1 - q0,
                k1 - k0
            );
            assert_rows_close(&got[q0 * qt_row..q1 * qt_row], &want, &what);
            // lse is [1, heads, total_q]: this sequence's rows of each head.
            let rows = q1 - q0;
            for h in 0..HEADS_Q {
                assert_rows_close(
                    &got_lse[h * total_q + q0..h * total_q + q1],
                    &want_lse[h * rows..(h + 1) * rows],
                    &format!("{what} lse head {h}"),
                );
            }
        }
    }
}

#[test]
fn valid_lengths_skip_padding_and_zero_padded_rows() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 3,
        seq_q: 50,
        seq_kv: 70,
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        head_dim_v: HEAD_DIM,
    };
    let inputs = common::Inputs::draw(&shape, 0x5eed_9add, 1.0);
    let (q_lens, kv_lens) = ([50, 20, 0], [70, 33, 1]);
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    let dropout = AttentionConfig::new().dropout(0.4, 22);
    for (config, keys) in [
        (AttentionConfig::new(), None),
        (AttentionConfig::new().causal(true), None),
        (dropout.clone(), None),
        (dropout, Some(16)),
    ]
    .iter()
    .flat_map(|(config, keys)| {
        forward_tiers(gpu, DType::F32).map(|tier| (with_tier(config, tier), *keys))
    }) {
        let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
        let lse = Lse::new(gpu, 3, HEADS_Q, 50).unwrap();
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: Some(&lse),
        };
        let lens = ValidLengths {
            q: Some(&q_lens),
            kv: &kv_lens,
        };
        let options = keys.into_iter().fold(
            ForwardOptions::new(&config).valid_lengths(lens),
            ForwardOptions::keys_per_dispatch,
        );
        gpu.run(|e| gpu.forward(e, &args, options.clone())).unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        let got_lse = lse.to_vec(gpu).unwrap();
        let (q_row, kv_row) = (HEADS_Q * HEAD_DIM, HEADS_KV * HEAD_DIM);
        for b in 0..3 {
            let q_base = b * 50 * q_row;
            let kv_base = b * 70 * kv_row;
            let (want, want_lse) = sequence_reference(
                &config,
                b,
                (HEADS_Q, HEADS_KV, HEAD_DIM),
                &inputs.q[q_base..q_base + q_lens[b] * q_row],
                &inputs.k[kv_base..kv_base + kv_lens[b] * kv_row],
                &inputs.v[kv_base..kv_base + kv_lens[b] * kv_row],
            );
            let what = format!("{config:?} {keys:?} keys per dispatch, batch {b}");
            assert_rows_close(&got[q_base..q_base + q_lens[b] * q_row], &want, &what);
            let padding = &got[q_base + q_lens[b] * q_row..q_base + 50 * q_row];
            assert!(
                padding.iter().all(|&x| x == 0.0),
                "{what}: padded rows are zeros"
            );
            for h in 0..HEADS_Q {
                let row0 = (b * HEADS_Q + h) * 50;
                assert_rows_close(
                    &got_lse[row0..row0 + q_lens[b]],
                    &want_lse[h * q_lens[b]..(h + 1) * q_lens[b]],
                    &format!("{what} lse head {h}"),
                );
                assert!(
                    got_lse[row0 + q_lens[b]..row0 + 50]
                        .iter()
                        .all(|x| x.is_infinite()),
                    "{what}: padded rows have lse +inf"
                );
            }
        }
    }
}

#[test]
fn bad_offsets_and_lengths_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let q = packed(gpu, 10, HEADS_Q, &vec![0.5; 10 * HEADS_Q * HEAD_DIM]);
    let k = packed(gpu, 8, HEADS_KV, &vec![0.5; 8 * HEADS_KV * HEAD_DIM]);
    let out = Tensor::filled(gpu, q.shape(), 0.0).unwrap();
    let run = |cu_q: &[usize], cu_k: &[usize]| {
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &k,
            out: &out,
            lse: None,
        };
        let options = ForwardOptions::default().varlen(cu_q, cu_k);
        gpu.run(|e| gpu.forward(e, &args, options))
    };
    let problem = |result: Result<(), Error>| match result {
        Err(Error::CuSeqlens {
            name,
            index,
            problem,
            ..
        }) => (name, index, problem),
        other => panic!("expected CuSeqlens, got {other:?}"),
    };
    assert_eq!(
        problem(run(&[1, 10], &[0, 8])),
        ("cu_seqlens_q", 0, "must start at 0")
    );
    assert_eq!(
        problem(run(&[0, 6, 4, 10], &[0, 2, 4, 8])),
        ("cu_seqlens_q", 2, "must not decrease")
    );
    assert_eq!(
        problem(run(&[0, 4, 10], &[0, 4, 7])),
        ("cu_seqlens_k", 2, "must end at the total token count")
    );
    assert!(matches!(
        run(&[0, 4, 10], &[0, 8]),
        Err(Error::DataLength {
            expected: 3,
            got: 2,
            ..
        })
    ));

    let shape = AttentionShape {
        batch: 2,
        seq_q: 5,
        seq_kv: 7,
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        head_dim_v: HEAD_DIM,
    };
    let dq = Tensor::filled(gpu, shape.q_shape(), 0.5).unwrap();
    let dk = Tensor::filled(gpu, shape.k_shape(), 0.5).unwrap();
    let dout = Tensor::filled(gpu, shape.q_shape(), 0.0).unwrap();
    let args = AttentionArgs {
        q: &dq,
        k: &dk,
        v: &dk,
        out: &dout,
        lse: None,
    };
    let padded = |q: Option<&[usize]>, kv: &[usize]| {
        gpu.run(|e| {
            gpu.forward(
                e,
                &args,
                ForwardOptions::new(&AttentionConfig::new()).valid_lengths(ValidLengths { q, kv }),
            )
        })
    };
    assert!(matches!(
        padded(None, &[7, 8]),
        Err(Error::ValidLength {
            index: 1,
            len: 8,
            max: 7,
            ..
        })
    ));
    assert!(matches!(
        padded(Some(&[6, 1]), &[7, 7]),
        Err(Error::ValidLength {
            index: 0,
            len: 6,
            max: 5,
            ..
        })
    ));
    assert!(matches!(
        padded(None, &[7]),
        Err(Error::DataLength {
            expected: 2,
            got: 1,
            ..
        })
    ));
}
