//! GPU forward pass against the f64 reference on seeded random inputs:
//! ragged lengths, every head dim of the foundation, causal and not,
//! seq_q != seq_kv both ways, and large-magnitude scores.

mod common;

use common::random::seeded;
use common::{Inputs, assert_close, forward_tiers, gpu, run_and_compare, with_tier};
use rand::{Rng, RngExt};
use wgpu_flash_attn::{AttentionConfig, AttentionShape, DType, Gpu};

const RAGGED: [usize; 9] = [1, 7, 63, 64, 65, 127, 128, 129, 500];

/// Checks `shape` on inputs drawn from `seed`, causal and not, on both
/// forward kernels (`forward_tiers`); returns the largest max |out - ref|.
fn check_causal_and_not(gpu: &Gpu, shape: &AttentionShape, seed: u64) -> f64 {
    let inputs = Inputs::draw(shape, seed, 1.0);
    let mut worst = 0.0f64;
    for causal in [false, true] {
        for tier in forward_tiers(gpu, DType::F32) {
            let config = with_tier(&AttentionConfig::new().causal(causal), tier);
            let errors = run_and_compare(gpu, shape, &inputs, &config);
            assert_close(
                errors,
                &format!("{shape:?} causal={causal} {tier:?} seed={seed}"),
            );
            worst = worst.max(errors.out);
        }
    }
    worst
}

/// Every (seq_q, seq_kv) pair of the ragged lengths, causal and not, with
/// batch 1-3 and 1-8 heads drawn from a seeded generator.
#[test]
fn ragged_lengths_all_pairs() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x5eed_0001);
    let mut worst = 0.0f64;
    for &seq_q in &RAGGED {
        for &seq_kv in &RAGGED {
            let batch = rng.random_range(1..=3);
            let heads = rng.random_range(1..=8);
            // Keep the biggest cases small in batch*heads so the run stays quick.
            let (batch, heads) = if seq_q * seq_kv > 20_000 {
                (1, heads.min(2))
            } else {
                (batch, heads)
            };
            let shape = AttentionShape {
                batch,
                seq_q,
                seq_kv,
                heads_q: heads,
                heads_kv: heads,
                head_dim: 64,
                head_dim_v: 64,
            };
            worst = worst.max(check_causal_and_not(gpu, &shape, rng.next_u64()));
        }
    }
    eprintln!("ragged pairs: worst max|out - ref| = {worst:.2e}");
}

/// Head dims of each tiling class on ragged, unequal lengths (the head dims
/// `semantics::every_head_dim` compiles anyway; 32 and 96 as well in the
/// exhaustive mode).
#[test]
fn head_dims() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x5eed_0002);
    let dims = common::cases(
        "forward head_dims",
        &[40, 64, 72, 128],
        &[32, 40, 64, 72, 96, 128],
    );
    for head_dim in dims {
        for (seq_q, seq_kv) in [(1, 129), (65, 65), (129, 63), (500, 127), (63, 500)] {
            let heads = rng.random_range(1..=3);
            let shape = AttentionShape {
                batch: rng.random_range(1..=2),
                seq_q,
                seq_kv,
                heads_q: heads,
                heads_kv: heads,
                head_dim,
                head_dim_v: head_dim,
            };
            check_causal_and_not(gpu, &shape, rng.next_u64());
        }
    }
}

/// Inputs scaled so raw scores reach magnitude ~100: the online softmax must
/// stay finite and exact.
#[test]
fn large_scores_stay_finite_and_exact() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(2, 129, 3, 64);
    // q.k / sqrt(d) has standard deviation scale^2 = 36: extremes pass 100.
    let inputs = Inputs::draw(&shape, 0x5eed_0003, 6.0);
    let max_score = max_abs_score(&shape, &inputs);
    assert!(
        max_score > 100.0,
        "inputs too tame: max |score| = {max_score}"
    );
    for causal in [false, true] {
        for tier in forward_tiers(gpu, DType::F32) {
            let config = with_tier(&AttentionConfig::new().causal(causal), tier);
            let errors = run_and_compare(gpu, &shape, &inputs, &config);
            assert_close(
                errors,
                &format!("large scores causal={causal} {tier:?} max|score|={max_score:.0}"),
            );
        }
    }
}

fn max_abs_score(shape: &AttentionShape, inputs: &Inputs) -> f32 {
    let d = shape.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let mut max = 0.0f32;
    for q_row in inputs.q.chunks(d) {
        for k_row in inputs.k.chunks(d) {
            let dot: f32 = q_row.iter().zip(k_row).map(|(a, b)| a * b).sum();
            max = max.max((dot * scale).abs());
        }
    }
    max
}

/// A causal call with seq_q > seq_kv has rows that see no key: zeros and
/// logsumexp +inf (checked inside `compare`), never NaN.
#[test]
fn causal_rows_without_keys_are_zero() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 1,
        seq_q: 100,
        seq_kv: 30,
        heads_q: 2,
        heads_kv: 2,
        head_dim: 32,
        head_dim_v: 32,
    };
    let inputs = Inputs::draw(&shape, 0x5eed_0004, 1.0);
    let config = AttentionConfig::new().causal(true);
    let reference =
        wgpu_flash_attn::reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
            .unwrap();
    // Rows 0..70 sit before key 0 under bottom-right alignment.
    assert!(reference.lse[..70].iter().all(|l| l.is_infinite()));
    assert!(reference.lse[70..100].iter().all(|l| l.is_finite()));
    for tier in forward_tiers(gpu, DType::F32) {
        let errors = run_and_compare(gpu, &shape, &inputs, &with_tier(&config, tier));
        assert_close(errors, &format!("causal seq_q > seq_kv {tier:?}"));
    }
}
