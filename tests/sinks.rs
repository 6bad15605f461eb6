//! Attention sinks in the forward kernels (every tier) and the naive
//! baseline against the reference: each head's sink joins its rows'
//! softmax denominator, rows that see no key output zeros with logsumexp
//! equal to the sink, and bad sinks are typed errors. (Decoding with sinks
//! is in tests/decode.rs, the backward and dsinks in tests/backward.rs.)

mod common;

use common::random::{normal_vec, seeded};
use common::{
    Implementation, Inputs, assert_close, attention_shape as shape, gpu, run_views, run_with,
    upload,
};
use wgpu_flash_attn::{
    Alibi, AttentionConfig, AttentionShape, Error, ForwardOptions, Tier, ValidLengths, reference,
};

/// Sinks of N(0, 2^2) with one large one (8: it takes most of its rows'
/// weight), so both regimes are checked.
fn draw_sinks(heads: usize, seed: u64) -> Vec<f32> {
    let mut sinks = normal_vec(&mut seeded(seed), heads, 2.0);
    sinks[heads / 2] = 8.0;
    sinks
}

fn cases() -> Vec<(AttentionShape, AttentionConfig)> {
    vec![
        (shape(2, 40, 70, (4, 2), 64), AttentionConfig::new()),
        // The first 30 rows see no key: zeros and lse = the sink.
        (
            shape(1, 50, 20, (4, 1), 32),
            AttentionConfig::new().causal(true),
        ),
        (
            shape(2, 33, 90, (6, 3), 128),
            AttentionConfig::new()
                .window(Some(10), Some(3))
                .softcap(5.0)
                .alibi(Alibi::PerBatchHead(
                    (0..12).map(|i| 0.05 * i as f32).collect(),
                )),
        ),
    ]
}

#[test]
fn sinks_join_every_rows_softmax() {
    let Some(gpu) = gpu() else { return };
    // The portable tier's d=64 and d=128 kernels (flash and naive) compile
    // for minutes on a cold lavapipe, where it is not the default: a
    // newcomer's run forces it on the d=32 case only.
    let portable_dims = common::cases(
        "sinks on the portable tier (head dim)",
        &[32],
        &[32, 64, 128],
    );
    for tier in [None, Some(Tier::Portable), Some(Tier::RegisterBlocked)] {
        for (index, (shape, config)) in cases().into_iter().enumerate() {
            if tier == Some(Tier::Portable) && !portable_dims.contains(&shape.head_dim) {
                continue;
            }
            let seed = 70 + index as u64;
            let mut config = config.sinks(draw_sinks(shape.heads_q, seed));
            config.tier = tier;
            let inputs = Inputs::draw(&shape, seed, 1.0);
            for implementation in [Implementation::Flash, Implementation::Naive] {
                let errors = run_with(gpu, implementation, &shape, &inputs, &config);
                assert_close(errors, &format!("{implementation:?} {shape:?} {config:?}"));
            }
        }
    }
}

#[test]
fn a_row_without_keys_outputs_zeros_and_its_sink() {
    let Some(gpu) = gpu() else { return };
    // seq_q > seq_kv with causal: row 0 sits before the first key.
    let shape = shape(1, 3, 1, (2, 2), 16);
    let sinks = vec![-0.25, 3.5];
    let config = AttentionConfig::new().causal(true).sinks(sinks.clone());
    let inputs = Inputs::draw(&shape, 5, 1.0);
    let got = gpu
        .attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
        .unwrap();
    let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
    for (head, &sink) in sinks.iter().enumerate() {
        // lse is [batch, heads_q, seq_q]; out is [batch, seq_q, heads_q, d].
        assert_eq!(got.lse[head * 3], sink, "head {head}: lse of row 0");
        assert_eq!(want.lse[head * 3], f64::from(sink));
        let row0 = &got.out[head * 16..(head + 1) * 16];
        assert!(row0.iter().all(|&x| x == 0.0), "head {head}: {row0:?}");
        // Row 2 sees the key: weight 1 / (1 + exp(sink - s)).
        let lse = f64::from(got.lse[head * 3 + 2]);
        assert!((lse - want.lse[head * 3 + 2]).abs() <= 1e-5, "head {head}");
    }
}

#[test]
fn bad_sinks_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(1, 8, 8, (4, 2), 32);
    let inputs = Inputs::draw(&shape, 1, 1.0);
    let run = |sinks: Vec<f32>| {
        let config = AttentionConfig::new().sinks(sinks);
        gpu.attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
    };
    let err = run(vec![0.0; 3]).map(|_| ());
    assert!(
        matches!(err, Err(Error::SinksLength { heads_q: 4, got: 3 })),
        "{err:?}"
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = run(vec![0.0, 1.0, bad, 0.0]).map(|_| ());
        assert!(
            matches!(err, Err(Error::SinkNotFinite { head: 2, .. })),
            "{bad}: {err:?}"
        );
    }
    // The reference checks the same way.
    let config = AttentionConfig::new().sinks(vec![0.0; 5]);
    let err = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).map(|_| ());
    assert!(matches!(err, Err(Error::SinksLength { .. })), "{err:?}");
}

#[test]
fn padded_batches_with_sinks_and_per_entry_alibi() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(3, 20, 24, (4, 2), 32);
    let q_lens = [20, 7, 5];
    let kv_lens = [24, 9, 0];
    let sinks = draw_sinks(4, 31);
    let slopes: Vec<f32> = (0..12).map(|i| 0.04 * i as f32).collect();
    let config = AttentionConfig::new()
        .causal(true)
        .sinks(sinks.clone())
        .alibi(Alibi::PerBatchHead(slopes.clone()));
    let inputs = Inputs::draw(&shape, 32, 1.0);
    let [q, k, v, out] = upload(gpu, &shape, &inputs);
    let lengths = ValidLengths {
        q: Some(&q_lens),
        kv: &kv_lens,
    };
    let options = ForwardOptions::new(&config).valid_lengths(lengths);
    let (got, got_lse) = run_views(
        gpu,
        Implementation::Flash,
        &shape,
        options,
        [&q, &k, &v, &out],
    );
    let (row, key_row) = (4 * 32, 2 * 32);
    for b in 0..3 {
        let alone = AttentionShape {
            batch: 1,
            seq_q: q_lens[b],
            seq_kv: kv_lens[b].max(1),
            ..shape
        };
        let entry = AttentionConfig::new()
            .causal(true)
            .sinks(sinks.clone())
            .alibi(Alibi::PerHead(slopes[b * 4..(b + 1) * 4].to_vec()));
        let q0 = b * 20 * row;
        let k0 = b * 24 * key_row;
        let want = (kv_lens[b] > 0).then(|| {
            reference::attention(
                &alone,
                &inputs.q[q0..q0 + q_lens[b] * row],
                &inputs.k[k0..k0 + kv_lens[b] * key_row],
                &inputs.v[k0..k0 + kv_lens[b] * key_row],
                &entry,
            )
            .unwrap()
        });
        for i in 0..20 {
            for h in 0..4 {
                let got_lse = got_lse[(b * 4 + h) * 20 + i];
                let at = q0 + (i * 4 + h) * 32;
                let (want_out, want_lse): (Vec<f64>, f64) = match &want {
                    _ if i >= q_lens[b] => (vec![0.0; 32], f64::INFINITY),
                    None => (vec![0.0; 32], f64::from(sinks[h])),
                    Some(w) => (
                        w.out[(i * 4 + h) * 32..][..32].to_vec(),
                        w.lse[h * q_lens[b] + i],
                    ),
                };
                let what = format!("entry {b}, row {i}, head {h}");
                if want_lse.is_infinite() {
                    assert_eq!(got_lse, f32::INFINITY, "{what}: padding row's lse");
                } else {
                    assert!(
                        (f64::from(got_lse) - want_lse).abs() <= 1e-4,
                        "{what}: lse {got_lse} vs {want_lse}"
                    );
                }
                for (c, (&g, w)) in got[at..at + 32].iter().zip(&want_out).enumerate() {
                    assert!(
                        (f64::from(g) - w).abs() <= 1e-4,
                        "{what}, element {c}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
