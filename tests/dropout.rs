//! Attention dropout in the forward against the f64 reference, which draws
//! the same mask from the seed (`Dropout::keeps`): every forward kernel,
//! the options that move which keys a row sees, masks, several rates; the
//! same seed gives the same bits, another seed another mask; keys in
//! chunks (the mask carries on across a row's chunks); the calls dropout
//! does not take are typed errors. The cooperative-matrix kernel's
//! dropout is in tests/cooperative_matrix.rs, the backward's in
//! tests/backward.rs, padded and packed batches (each sequence its own
//! mask) in tests/varlen.rs and there.

mod common;

use common::random::seeded;
use common::{Inputs, assert_close, attention_shape as shape, forward_tiers, gpu, with_tier};
use rand::RngExt;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionMask, DType, Dropout, Error, ForwardOptions, Gpu,
    reference,
};

/// The forward's output and logsumexp at `shape`, read back.
fn forward_at(
    gpu: &Gpu,
    shape: &wgpu_flash_attn::AttentionShape,
    inputs: &Inputs,
    options: ForwardOptions<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let [q, k, v, out] = common::upload(gpu, shape, inputs);
    common::run_views(
        gpu,
        common::Implementation::Flash,
        shape,
        options,
        [&q, &k, &v, &out],
    )
}

/// [`forward_at`] the tests' usual shape.
fn forward(gpu: &Gpu, inputs: &Inputs, options: ForwardOptions<'_>) -> (Vec<f32>, Vec<f32>) {
    forward_at(gpu, &inputs_shape(), inputs, options)
}

/// GQA with ragged lengths: 70 query rows over 90 keys, two batch entries;
/// the backward's dropout tests' shape, whose forward pipelines they share.
fn inputs_shape() -> wgpu_flash_attn::AttentionShape {
    shape(2, 70, 90, (4, 2), 32)
}

#[test]
fn forward_dropout_against_the_reference() {
    let Some(gpu) = gpu() else { return };
    let shape = inputs_shape();
    let inputs = Inputs::draw(&shape, 0xd20_0001, 1.0);
    for tier in forward_tiers(gpu, DType::F32) {
        for config in &common::dropout_configs(shape.heads_q) {
            let config = with_tier(config, tier);
            let errors = common::run_and_compare(gpu, &shape, &inputs, &config);
            assert_close(errors, &format!("{config:?}"));
        }
    }
}

/// Keys in chunks (`keys_per_dispatch`; the same path runs K/V past one
/// binding or the loop budget): each chunk names its first key, so the mask
/// is the whole row's, as in one dispatch. Chunks of fewer keys than a
/// tile, of whole tiles, and one key each.
#[test]
fn dropout_in_key_chunks_against_the_reference() {
    let Some(gpu) = gpu() else { return };
    let shape = inputs_shape();
    let inputs = Inputs::draw(&shape, 0xd20_0005, 1.0);
    for tier in forward_tiers(gpu, DType::F32) {
        for (config, keys) in common::dropout_configs(shape.heads_q)
            .iter()
            .zip([13, 64, 1])
        {
            let config = with_tier(config, tier);
            let options = ForwardOptions::new(&config).keys_per_dispatch(keys);
            let (got, got_lse) = forward(gpu, &inputs, options);
            let what = format!("{keys} keys per dispatch, {config:?}");
            assert_close(
                common::compare(&shape, &inputs, &config, &got, &got_lse),
                &what,
            );
        }
    }
}

/// The masked kernels apply the same mask: a boolean mask (random, with
/// whole rows hidden) and dropout together.
#[test]
fn masked_forward_dropout_against_the_reference() {
    let Some(gpu) = gpu() else { return };
    let shape = inputs_shape();
    let inputs = Inputs::draw(&shape, 0xd20_0002, 1.0);
    let dims = [shape.batch, 1, shape.seq_q, shape.seq_kv];
    let mut rng = seeded(0xd20_0003);
    let bits: Vec<bool> = (0..dims.iter().product::<usize>())
        .map(|at| (at / shape.seq_kv) % 17 != 5 && rng.random_bool(0.7))
        .collect();
    let mask = AttentionMask::boolean(gpu, dims, &bits).unwrap();
    let host_mask = reference::HostMask::Bool {
        dims,
        values: &bits,
    };
    for tier in forward_tiers(gpu, DType::F32) {
        let config = with_tier(&AttentionConfig::new().dropout(0.3, 5).causal(true), tier);
        let (got, got_lse) = forward(gpu, &inputs, ForwardOptions::new(&config).mask(&mask));
        let want = reference::attention_masked(
            &shape, &inputs.q, &inputs.k, &inputs.v, &config, &host_mask,
        )
        .unwrap();
        let what = format!("masked {config:?}");
        assert_close(common::compare_with(&want, &got, &got_lse, &what), &what);
    }
}

/// A rate of 0 is no dropout (the same bits); the same seed gives the same
/// bits on every run, another seed another output; the logsumexp is the
/// softmax's, before dropout, whatever the seed.
#[test]
fn seeds_and_rates() {
    let Some(gpu) = gpu() else { return };
    let inputs = Inputs::draw(&inputs_shape(), 0xd20_0004, 1.0);
    let run = |config: &AttentionConfig| forward(gpu, &inputs, ForwardOptions::new(config));
    let plain = run(&AttentionConfig::new());
    assert_eq!(plain, run(&AttentionConfig::new().dropout(0.0, 9)));
    let dropped = run(&AttentionConfig::new().dropout(0.2, 9));
    assert_ne!(dropped.0, plain.0);
    assert_eq!(dropped, run(&AttentionConfig::new().dropout(0.2, 9)));
    let reseeded = run(&AttentionConfig::new().dropout(0.2, 10));
    assert_ne!(reseeded.0, dropped.0);
    for (a, b) in [(&dropped, &plain), (&reseeded, &plain)] {
        let worst = common::max_abs_diff(&a.1, &b.1, "logsumexp with and without dropout");
        assert!(worst <= 1e-5, "logsumexp moved by {worst} with dropout");
    }
}

/// The probability of keeping a pair is 1 - p up to the mask's 2^-32
/// steps, and the kept fraction of a GPU mask is what the reference says:
/// with equal scores (Q = 0) and V = 1 each output element is
/// `kept / (n (1 - p))`, so the output counts the kept keys of its row.
#[test]
fn the_gpu_keeps_the_pairs_the_reference_keeps() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(1, 64, 256, (2, 2), 8);
    let inputs = Inputs {
        q: vec![0.0; shape.q_shape().elements()],
        k: Inputs::draw(&shape, 1, 1.0).k,
        v: vec![1.0; shape.v_shape().elements()],
    };
    let dropout = Dropout::new(0.25, 0x5eed);
    let config = AttentionConfig::new().dropout(dropout.p, dropout.seed);
    let (got, _) = forward_at(gpu, &shape, &inputs, ForwardOptions::new(&config));
    let n = shape.seq_kv as f64;
    let mut kept_total = 0usize;
    for h in 0..shape.heads_q {
        for i in 0..shape.seq_q {
            let want = (0..shape.seq_kv)
                .filter(|&j| dropout.keeps(0, h, i, j))
                .count();
            kept_total += want;
            let o = got[(i * shape.heads_q + h) * shape.head_dim_v];
            let counted = f64::from(o) * n * dropout.keep_probability();
            assert!(
                (counted - want as f64).abs() < 1e-3,
                "head {h} row {i}: the GPU kept {counted:.4} keys, the reference {want}"
            );
        }
    }
    let pairs = (shape.heads_q * shape.seq_q * shape.seq_kv) as f64;
    let q = dropout.keep_probability();
    let sd = (pairs * q * (1.0 - q)).sqrt();
    assert!((kept_total as f64 - pairs * q).abs() < 5.0 * sd);
}

#[test]
fn calls_dropout_does_not_take_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(2, 8, 8, (2, 2), 16);
    let inputs = Inputs::draw(&shape, 3, 1.0);
    let [q, k, v, out] = common::upload(gpu, &shape, &inputs);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let call = |options: ForwardOptions<'_>| gpu.run(|e| gpu.forward(e, &args, options));
    for p in [-0.1f32, 1.0, f32::NAN] {
        let config = AttentionConfig::new().dropout(p, 0);
        let err = call(ForwardOptions::new(&config)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidDropout(got) if got.to_bits() == p.to_bits()),
            "p = {p}: {err}"
        );
    }
    // The naive baseline has no dropout (decoding's refusal is in
    // tests/decode.rs).
    let config = AttentionConfig::new().dropout(0.1, 0);
    let err = gpu
        .run(|e| gpu.naive_attention(e, &args, &config).map(|_| ()))
        .unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedCombination { what } if what.contains("dropout")),
        "{err}"
    );
}
