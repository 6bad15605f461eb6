//! Scores of any finite magnitude and non-finite values at hidden keys,
//! against the reference (docs/semantics.md, "Extreme and non-finite
//! values"): an additive bias of `f32::MIN` on every key (PyTorch's
//! masking convention) gives the average of V, a scale of -1e31 or an ALiBi
//! slope of 1e31 give the winning key's V, in the forward (both tiers), the
//! naive baseline and decoding; a NaN or infinity in K at a hidden key, or
//! in K and V past a sequence's length, changes nothing.

mod common;

use common::random::{normal_vec, seeded};
use common::{Implementation, Inputs, attention_shape, gpu, run_views, upload};
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    Alibi, AttentionConfig, AttentionMask, AttentionShape, ForwardOptions, Gpu, Lse, Tensor, Tier,
    ValidLengths,
};

/// One head-count, one-entry shape.
fn shape(seq_q: usize, seq_kv: usize, heads: usize, head_dim: usize) -> AttentionShape {
    attention_shape(1, seq_q, seq_kv, (heads, heads), head_dim)
}

/// Output and logsumexp of one call on NaN-poisoned outputs.
fn forward(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    options: ForwardOptions<'_>,
    implementation: Implementation,
) -> (Vec<f32>, Vec<f32>) {
    let [q, k, v, out] = upload(gpu, shape, inputs);
    run_views(gpu, implementation, shape, options, [&q, &k, &v, &out])
}

/// Every output within 1e-4 of the reference; every logsumexp within
/// 1e-4 plus f32's relative precision of its magnitude (lse values here
/// reach 1e32, where an f32 ulp is ~1e25).
fn assert_matches(what: &str, (out, lse): (Vec<f32>, Vec<f32>), want: &reference::ReferenceOutput) {
    for (index, (&g, &w)) in out.iter().zip(&want.out).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 1e-4,
            "{what}: out[{index}] = {g}, reference {w}"
        );
    }
    for (index, (&g, &w)) in lse.iter().zip(&want.lse).enumerate() {
        if w.is_infinite() {
            assert_eq!(f64::from(g), w, "{what}: lse[{index}]");
        } else {
            let bound = 1e-4 + 4.0 * f64::from(f32::EPSILON) * w.abs();
            assert!(
                (f64::from(g) - w).abs() <= bound,
                "{what}: lse[{index}] = {g}, reference {w}"
            );
        }
    }
}

const TIERS: [Option<Tier>; 3] = [None, Some(Tier::Portable), Some(Tier::RegisterBlocked)];

#[test]
fn a_bias_of_f32_min_on_every_key_gives_the_average_of_v() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(16, 40, 2, 32);
    let inputs = Inputs::draw(&shape, 3, 1.0);
    // Rows 0-7: f32::MIN on every key (the scores all round to f32::MIN,
    // so every key weighs the same). Rows 8-15: f32::MIN on even keys, 0
    // on odd ones (the even keys weigh exactly 0).
    let bias: Vec<f32> = (0..shape.seq_q * shape.seq_kv)
        .map(|at| {
            let (row, key) = (at / shape.seq_kv, at % shape.seq_kv);
            if row < 8 || key % 2 == 0 {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    let dims = [1, 1, shape.seq_q, shape.seq_kv];
    let mask = AttentionMask::bias(gpu, dims, &bias).unwrap();
    let host = HostMask::Bias {
        dims,
        values: &bias,
    };
    for tier in TIERS {
        let mut config = AttentionConfig::new();
        config.tier = tier;
        let want =
            reference::attention_masked(&shape, &inputs.q, &inputs.k, &inputs.v, &config, &host)
                .unwrap();
        // Row 0 of head 0 is the plain average of V (head 0's values).
        for c in 0..shape.head_dim {
            let mean: f64 = (0..shape.seq_kv)
                .map(|j| f64::from(inputs.v[(j * 2) * 32 + c]))
                .sum::<f64>()
                / shape.seq_kv as f64;
            assert!((want.out[c] - mean).abs() <= 1e-12, "the reference's row 0");
        }
        let got = forward(
            gpu,
            &shape,
            &inputs,
            ForwardOptions::new(&config).mask(&mask),
            Implementation::Flash,
        );
        assert_matches(&format!("f32::MIN bias, tier {tier:?}"), got, &want);
    }
}

#[test]
fn huge_scales_and_alibi_slopes_pick_the_winning_key() {
    let Some(gpu) = gpu() else { return };
    // d=32: the extremes do not depend on the head dim, and the variants
    // below (ALiBi, sinks, three tiers) compile 4x faster on a cold
    // lavapipe than at d=64 (26 s against 101 s for the test).
    let shape = shape(24, 37, 2, 32);
    let inputs = Inputs::draw(&shape, 4, 1.0);
    let configs = [
        ("scale -1e31", AttentionConfig::new().scale(-1e31)),
        (
            "scale 1e30, causal",
            AttentionConfig::new().scale(1e30).causal(true),
        ),
        (
            "ALiBi slopes 1e31 and 1e35",
            AttentionConfig::new().alibi(Alibi::PerHead(vec![1e31, 1e35])),
        ),
        (
            "bias-free scores past -1e30 with sinks",
            AttentionConfig::new().scale(-3e30).sinks(vec![0.0, -5e30]),
        ),
    ];
    for (what, config) in configs {
        let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
        for tier in TIERS {
            let mut config = config.clone();
            config.tier = tier;
            let got = forward(
                gpu,
                &shape,
                &inputs,
                ForwardOptions::new(&config),
                Implementation::Flash,
            );
            assert_matches(&format!("{what}, tier {tier:?}"), got, &want);
        }
        let got = forward(
            gpu,
            &shape,
            &inputs,
            ForwardOptions::new(&config),
            Implementation::Naive,
        );
        assert_matches(&format!("{what}, naive"), got, &want);
    }
}

#[test]
fn non_finite_values_at_hidden_keys_change_nothing() {
    let Some(gpu) = gpu() else { return };
    let shape = shape(20, 20, 2, 32);
    let clean = Inputs::draw(&shape, 6, 1.0);
    let token = shape.heads_kv * shape.head_dim;
    // Key 13 is hidden from every row by the bias mask (-inf) and key 17
    // by the boolean mask; rows 0-12 do not see key 13 causally either. Both
    // keys' K holds NaN and infinities.
    let mut poisoned = Inputs {
        q: clean.q.clone(),
        k: clean.k.clone(),
        v: clean.v.clone(),
    };
    for key in [13, 17] {
        for (index, value) in poisoned.k[key * token..(key + 1) * token]
            .iter_mut()
            .enumerate()
        {
            *value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][index % 3];
        }
    }
    let dims = [1, 1, shape.seq_q, shape.seq_kv];
    let bias: Vec<f32> = (0..shape.seq_q * shape.seq_kv)
        .map(|at| {
            if at % shape.seq_kv == 13 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let allowed: Vec<bool> = (0..shape.seq_q * shape.seq_kv)
        .map(|at| at % shape.seq_kv != 17)
        .collect();
    let masks = [
        (
            "a -inf bias",
            13,
            AttentionMask::bias(gpu, dims, &bias).unwrap(),
            HostMask::Bias {
                dims,
                values: &bias,
            },
        ),
        (
            "a boolean mask",
            17,
            AttentionMask::boolean(gpu, dims, &allowed).unwrap(),
            HostMask::Bool {
                dims,
                values: &allowed,
            },
        ),
    ];
    for tier in TIERS {
        let mut config = AttentionConfig::new();
        config.tier = tier;
        for (what, hidden_key, mask, host) in &masks {
            // Only the key the mask hides is poisoned; the reference sees
            // the clean K (a hidden key's K never matters).
            let keys = hidden_key * token..(hidden_key + 1) * token;
            let mut hidden = clean.k.clone();
            hidden[keys.clone()].copy_from_slice(&poisoned.k[keys]);
            let inputs = Inputs {
                q: clean.q.clone(),
                k: hidden,
                v: clean.v.clone(),
            };
            let want =
                reference::attention_masked(&shape, &clean.q, &clean.k, &clean.v, &config, host)
                    .unwrap();
            let got = forward(
                gpu,
                &shape,
                &inputs,
                ForwardOptions::new(&config).mask(mask),
                Implementation::Flash,
            );
            assert_matches(&format!("NaN K behind {what}, tier {tier:?}"), got, &want);
        }

        let causal = config.clone().causal(true);
        let want_causal =
            reference::attention(&shape, &clean.q, &clean.k, &clean.v, &causal).unwrap();
        let got = forward(
            gpu,
            &shape,
            &poisoned,
            ForwardOptions::new(&causal),
            Implementation::Flash,
        );
        // Rows 13-19 see key 13: NaN there is the definition. Rows 0-12 are exact.
        let rows = 13 * shape.heads_q * shape.head_dim;
        let (got_out, got_lse) = got;
        for (index, (&g, &w)) in got_out[..rows].iter().zip(&want_causal.out).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-4,
                "causal, tier {tier:?}: out[{index}] = {g}, reference {w}"
            );
        }
        for head in 0..shape.heads_q {
            for row in 0..13 {
                let at = head * shape.seq_q + row;
                assert!((f64::from(got_lse[at]) - want_causal.lse[at]).abs() <= 1e-4);
            }
        }
    }

    // Keys and rows past the valid lengths are never read: NaN everywhere
    // there changes nothing.
    let lengths = [20usize];
    let kv_len = 11;
    let mut padded = Inputs {
        q: clean.q.clone(),
        k: clean.k.clone(),
        v: clean.v.clone(),
    };
    for x in padded.k[kv_len * token..]
        .iter_mut()
        .chain(&mut padded.v[kv_len * token..])
    {
        *x = f32::NAN;
    }
    let short = AttentionShape {
        seq_kv: kv_len,
        ..shape
    };
    let config = AttentionConfig::new();
    let want = reference::attention(
        &short,
        &clean.q,
        &clean.k[..kv_len * token],
        &clean.v[..kv_len * token],
        &config,
    )
    .unwrap();
    let valid = ValidLengths {
        q: Some(&lengths),
        kv: &[kv_len],
    };
    let got = forward(
        gpu,
        &shape,
        &padded,
        ForwardOptions::new(&config).valid_lengths(valid),
        Implementation::Flash,
    );
    assert_matches("NaN past the valid length", got, &want);
}

#[test]
fn decoding_handles_the_same_extremes() {
    let Some(gpu) = gpu() else { return };
    // The same score magnitudes through the decode kernel: one query row
    // per head over a contiguous cache, four key splits merged by
    // logsumexp.
    let shape = AttentionShape {
        batch: 1,
        seq_q: 1,
        seq_kv: 300,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 32,
        head_dim_v: 32,
    };
    let mut rng = seeded(8);
    let q = normal_vec(&mut rng, shape.q_shape().elements(), 1.0);
    let k = normal_vec(&mut rng, shape.k_shape().elements(), 1.0);
    let v = normal_vec(&mut rng, shape.v_shape().elements(), 1.0);
    for config in [
        AttentionConfig::new().scale(-1e31),
        AttentionConfig::new().alibi(Alibi::PerHead(vec![1e31, 1e20, 1e35, 1.0])),
        AttentionConfig::new()
            .scale(2e30)
            .sinks(vec![0.0, 1e31, -1e31, 5.0]),
    ] {
        let want = reference::attention(&shape, &q, &k, &v, &config).unwrap();
        let got = decode_once(gpu, &shape, [&q, &k, &v], &config);
        assert_matches(&format!("decode {config:?}"), got, &want);
    }
}

/// One decode step over a contiguous cache holding `k`, `v`, four splits.
fn decode_once(
    gpu: &Gpu,
    shape: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    config: &AttentionConfig,
) -> (Vec<f32>, Vec<f32>) {
    use wgpu_flash_attn::{DecodeArgs, DecodeOptions, KvCache, KvCacheConfig, KvLayout};
    let cache_config = KvCacheConfig::new(
        1,
        shape.heads_kv,
        shape.head_dim,
        KvLayout::Contiguous {
            capacity: shape.seq_kv,
        },
    );
    let mut cache = KvCache::new(gpu, cache_config).unwrap();
    let kt = Tensor::from_f32(gpu, shape.k_shape(), k).unwrap();
    let vt = Tensor::from_f32(gpu, shape.v_shape(), v).unwrap();
    gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
    let qt = Tensor::from_f32(gpu, shape.q_shape(), q).unwrap();
    let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let lse = Lse::new(gpu, 1, shape.heads_q, 1).unwrap();
    let args = DecodeArgs {
        q: &qt,
        cache: &cache,
        out: &out,
        lse: Some(&lse),
    };
    let options = DecodeOptions::new(config).kv_splits(4);
    gpu.run(|e| gpu.decode(e, &args, options)).unwrap();
    (out.to_f32_vec(gpu).unwrap(), lse.to_vec(gpu).unwrap())
}
