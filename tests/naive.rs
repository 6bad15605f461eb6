//! The naive baseline (score matrix in device memory) against the f64
//! reference: it must be exact too, or its timings would compare unlike
//! things. Also its chunking over (batch, head) pairs and its typed error
//! when one score matrix cannot fit a binding.

mod common;

use common::random::seeded;
use common::{Implementation, Inputs, assert_close, gpu, run_with};
use rand::{Rng, RngExt};
use wgpu_flash_attn::NaivePlan;
use wgpu_flash_attn::{Alibi, AttentionArgs, AttentionConfig, AttentionShape, Error, Tensor};

#[test]
fn naive_matches_reference_across_options() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x5eed_0a1e);
    let lengths = [1, 7, 64, 65, 129];
    let mut worst = 0.0f64;
    let dims = common::cases("naive baseline", &[64, 136], &[8, 64, 96, 256]);
    for (case, head_dim) in dims.into_iter().enumerate() {
        for &seq_q in &lengths {
            let seq_kv = lengths[(case + seq_q) % lengths.len()];
            let shape = AttentionShape {
                batch: rng.random_range(1..=2),
                seq_q,
                seq_kv,
                heads_q: 4,
                heads_kv: 2,
                head_dim,
                head_dim_v: head_dim,
            };
            let inputs = Inputs::draw(&shape, rng.next_u64(), 1.0);
            let configs = [
                AttentionConfig::new(),
                AttentionConfig::new().causal(true),
                AttentionConfig::new().window(Some(5), Some(3)),
                AttentionConfig::new()
                    .softcap(5.0)
                    .alibi(Alibi::PerHead(Alibi::standard_slopes(4))),
            ];
            for config in configs {
                let errors = run_with(gpu, Implementation::Naive, &shape, &inputs, &config);
                assert_close(errors, &format!("naive {shape:?} {config:?}"));
                worst = worst.max(errors.out);
            }
        }
    }
    eprintln!("naive: worst max|out - ref| = {worst:.2e}");
}

/// A call whose score matrices exceed one binding runs in several chunks
/// over one reused score buffer, with the same results.
#[test]
fn naive_chunks_when_scores_exceed_a_binding() {
    let Some(gpu) = gpu() else { return };
    let seq = 2048;
    let one = AttentionShape::self_attention(1, seq, 1, 8);
    let per_unit = one.score_matrix_bytes();
    let limit = gpu
        .info()
        .limits
        .max_storage_buffer_binding_size
        .min(gpu.info().limits.max_buffer_size);
    let heads = (limit / per_unit + 1) as usize;
    if heads > 16 {
        eprintln!(
            "SKIPPED: this adapter binds {limit} bytes; forcing chunks at N={seq} needs {heads} heads"
        );
        return;
    }
    let shape = AttentionShape::self_attention(1, seq, heads, 8);
    let plan = NaivePlan::new(gpu.info(), &shape).unwrap();
    assert!(plan.chunks() >= 2, "{plan:?}");
    assert!(plan.score_buffer_bytes() <= limit);
    let inputs = Inputs::draw(&shape, 0x5eed_00c4, 1.0);
    let config = AttentionConfig::new().causal(true);
    let errors = run_with(gpu, Implementation::Naive, &shape, &inputs, &config);
    assert_close(errors, &format!("naive in {} chunks", plan.chunks()));
}

#[test]
fn naive_reports_a_score_matrix_that_cannot_fit() {
    let Some(gpu) = gpu() else { return };
    // One (batch, head) matrix of 65536 x 65536 f32 is 16 GiB.
    let shape = AttentionShape::self_attention(1, 65536, 1, 8);
    let q = Tensor::zeros(gpu, shape.q_shape(), wgpu_flash_attn::DType::F32).unwrap();
    let k = Tensor::zeros(gpu, shape.k_shape(), wgpu_flash_attn::DType::F32).unwrap();
    let v = Tensor::zeros(gpu, shape.v_shape(), wgpu_flash_attn::DType::F32).unwrap();
    let out = Tensor::zeros(gpu, shape.q_shape(), wgpu_flash_attn::DType::F32).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    match gpu.run(|e| gpu.naive_attention(e, &args, &AttentionConfig::new())) {
        Err(Error::ScoresTooLarge {
            bytes_per_head,
            total_bytes,
            limit,
            ..
        }) => {
            assert_eq!(bytes_per_head, 65536 * 65536 * 4);
            assert_eq!(total_bytes, bytes_per_head);
            assert!(limit < bytes_per_head);
        }
        other => panic!("expected ScoresTooLarge, got {other:?}"),
    }
    // The flash kernel plans the same call: it needs no score matrix.
    wgpu_flash_attn::ForwardPlan::new(gpu.info(), &shape).unwrap();
}
