//! Decoding over a KV cache against the reference: contiguous and paged
//! caches, split-KV with chosen and forced split counts, GQA, causal,
//! window, softcap and ALiBi; the public merge; append with fused RoPE and
//! the standalone RoPE kernel against a CPU RoPE; pages forked, swapped to
//! the host and back, and copied; and the typed errors.

mod common;

use common::random::{SeededRng, normal_vec, random_token_tree, seeded};
use common::{ROPE_BOUND, gpu, round_to, unit_roundoff};
use rand::seq::SliceRandom;
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionShape, CacheShape, DType, DecodeArgs,
    DecodeLanes, DecodeOptions, DecodePlan, Error, Gpu, KeyRotation, KvCache, KvCacheConfig,
    KvDType, KvLayout, Lse, RELEASED_PAGE, Rope, RopeStyle, Strides, Tensor, TensorShape, Tier,
    TokenTree, reference,
};

const HEADS_Q: usize = 8;
const HEADS_KV: usize = 2;

/// A cache and the host copy of what it holds.
struct Filled {
    cache: KvCache,
    /// Per sequence, packed `[len, heads_kv, head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Appends random tokens up to the longest of `lens` (in a few appends),
/// then shortens each sequence to its length.
fn fill(gpu: &Gpu, config: KvCacheConfig, lens: &[usize], seed: u64) -> Filled {
    let mut cache = KvCache::new(gpu, config).unwrap();
    if let KvLayout::Paged { page_size, pages } = config.layout {
        // Each sequence takes pages from a shuffled pool, so no table is
        // consecutive.
        let mut rng = seeded(seed ^ 0x9a9e);
        let mut pool: Vec<u32> = (0..pages as u32).collect();
        pool.shuffle(&mut rng);
        let per_seq = pages / config.batch;
        let longest = *lens.iter().max().unwrap();
        assert!(per_seq * page_size >= longest, "test pool too small");
        for b in 0..config.batch {
            cache
                .set_block_table(b, &pool[b * per_seq..(b + 1) * per_seq])
                .unwrap();
        }
    }
    let token = config.heads_kv * config.head_dim;
    let longest = *lens.iter().max().unwrap();
    let mut rng = seeded(seed);
    let mut k = vec![Vec::new(); config.batch];
    let mut v = vec![Vec::new(); config.batch];
    let mut written = 0;
    while written < longest {
        let chunk = (longest - written).min(1500);
        let shape = TensorShape::new(config.batch, chunk, config.heads_kv, config.head_dim);
        let kd = normal_vec(&mut rng, shape.elements(), 1.0);
        let vd = normal_vec(&mut rng, shape.elements(), 1.0);
        let kt = Tensor::from_f32(gpu, shape, &kd).unwrap();
        let vt = Tensor::from_f32(gpu, shape, &vd).unwrap();
        gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
        for b in 0..config.batch {
            let rows = b * chunk * token..(b + 1) * chunk * token;
            k[b].extend_from_slice(&kd[rows.clone()]);
            v[b].extend_from_slice(&vd[rows]);
        }
        written += chunk;
    }
    for (b, &len) in lens.iter().enumerate() {
        cache.set_len(b, len).unwrap();
        k[b].truncate(len * token);
        v[b].truncate(len * token);
    }
    Filled { cache, k, v }
}

/// Decodes `q` over the cache and returns the largest errors of output and
/// logsumexp against the reference, run sequence by sequence (masked by
/// the token trees in `options`, if any).
fn decode_errors(
    gpu: &Gpu,
    filled: &Filled,
    q: &[f32],
    seq_q: usize,
    options: &DecodeOptions,
) -> (f64, f64, DecodePlan) {
    decode_errors_as(gpu, filled, q, seq_q, options, DType::F32)
}

/// [`decode_errors`] with queries and output stored as `dtype`: `q` is
/// rounded to it first (the reference sees what the GPU reads), and the
/// output error is what exceeds its rounding to `dtype` (|out - want| -
/// u |want|, u the unit roundoff).
fn decode_errors_as(
    gpu: &Gpu,
    filled: &Filled,
    q: &[f32],
    seq_q: usize,
    options: &DecodeOptions,
    dtype: DType,
) -> (f64, f64, DecodePlan) {
    let config = &options.config;
    let cache = &filled.cache;
    let head_dim = cache.head_dim();
    let q_shape = TensorShape::new(cache.batch(), seq_q, HEADS_Q, head_dim);
    let q: Vec<f32> = q.iter().map(|&x| round_to(dtype, x)).collect();
    let q = &q[..];
    let q_t = Tensor::from_f32_as(gpu, q_shape, q, dtype).unwrap();
    let out = Tensor::filled_as(gpu, q_shape, f32::NAN, dtype).unwrap();
    let lse = Lse::new(gpu, cache.batch(), HEADS_Q, seq_q).unwrap();
    let args = DecodeArgs {
        q: &q_t,
        cache,
        out: &out,
        lse: Some(&lse),
    };
    let plan = gpu.run(|e| gpu.decode(e, &args, options.clone())).unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    let got_lse = lse.to_vec(gpu).unwrap();
    let per_seq = seq_q * HEADS_Q * head_dim;
    let (mut out_err, mut lse_err) = (0.0f64, 0.0f64);
    for (b, &len) in cache.lens().iter().enumerate() {
        let shape = AttentionShape {
            batch: 1,
            seq_q,
            seq_kv: len,
            heads_q: HEADS_Q,
            heads_kv: cache.heads_kv(),
            head_dim,
            head_dim_v: head_dim,
        };
        let qb = &q[b * per_seq..(b + 1) * per_seq];
        let (k, v) = (&filled.k[b], &filled.v[b]);
        let want = match &options.token_trees {
            _ if len == 0 => None,
            // A token tree is the dense mask it means.
            Some(trees) => {
                let mask = trees[b].dense_mask(len);
                let mask = reference::HostMask::Bool {
                    dims: [1, 1, seq_q, len],
                    values: &mask,
                };
                Some(reference::attention_masked(&shape, qb, k, v, config, &mask).unwrap())
            }
            None => Some(reference::attention(&shape, qb, k, v, config).unwrap()),
        };
        for (i, g) in got[b * per_seq..(b + 1) * per_seq].iter().enumerate() {
            assert!(!g.is_nan(), "sequence {b} (len {len}): NaN at {i}");
            let w = want.as_ref().map_or(0.0, |w| w.out[i]);
            out_err = out_err.max((f64::from(*g) - w).abs() - unit_roundoff(dtype) * w.abs());
        }
        let rows = HEADS_Q * seq_q;
        // An empty sequence's rows: zeros, lse = the head's sink or +inf.
        let empty_lse = |row: usize| {
            config
                .sinks
                .as_ref()
                .map_or(f64::INFINITY, |s| f64::from(s[row / seq_q]))
        };
        for (i, g) in got_lse[b * rows..(b + 1) * rows].iter().enumerate() {
            let w = want.as_ref().map_or_else(|| empty_lse(i), |w| w.lse[i]);
            assert!(!g.is_nan(), "sequence {b} (len {len}): lse NaN at {i}");
            if w.is_infinite() {
                assert_eq!(f64::from(*g), w, "sequence {b}: lse of an empty row");
            } else {
                lse_err = lse_err.max((f64::from(*g) - w).abs());
            }
        }
    }
    (out_err, lse_err, plan)
}

fn queries(batch: usize, seq_q: usize, head_dim: usize, seed: u64) -> Vec<f32> {
    normal_vec(&mut seeded(seed), batch * seq_q * HEADS_Q * head_dim, 1.0)
}

const LENS: [usize; 6] = [1, 17, 255, 256, 257, 5000];

#[test]
fn decode_matches_the_reference_over_lengths_and_options() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let config = KvCacheConfig::new(
        LENS.len(),
        HEADS_KV,
        head_dim,
        KvLayout::Contiguous { capacity: 5000 },
    );
    let filled = fill(gpu, config, &LENS, 0x5eed_dec0);
    let options = [
        ("plain", AttentionConfig::new()),
        ("causal", AttentionConfig::new().causal(true)),
        (
            "window (100, 0)",
            AttentionConfig::new().window(Some(100), Some(0)),
        ),
        (
            "softcap + ALiBi",
            AttentionConfig::new()
                .softcap(20.0)
                .alibi(Alibi::PerHead(Alibi::standard_slopes(HEADS_Q))),
        ),
    ];
    for seq_q in [1, 2, 7, 16] {
        for (i, (name, options)) in options.iter().enumerate() {
            let q = queries(LENS.len(), seq_q, head_dim, (seq_q * 10 + i) as u64);
            let (out_err, lse_err, plan) =
                decode_errors(gpu, &filled, &q, seq_q, &DecodeOptions::new(options));
            assert!(
                out_err <= 1e-4 && lse_err <= 1e-4,
                "seq_q {seq_q}, {name}: out error {out_err:.2e}, lse error {lse_err:.2e} ({plan:?})"
            );
        }
    }
}

#[test]
fn forced_split_counts_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let lens = [300, 1000, 3];
    let config = KvCacheConfig::new(
        lens.len(),
        HEADS_KV,
        head_dim,
        KvLayout::Contiguous { capacity: 1000 },
    );
    let filled = fill(gpu, config, &lens, 0x5eed_5b11);
    // Both tiers where the adapter has subgroups (the default is the
    // subgroup tier there), the portable one everywhere.
    for (splits, tier) in [1, 2, 3, 16]
        .into_iter()
        .flat_map(|splits| [(splits, None), (splits, Some(Tier::Portable))])
    {
        for causal in [false, true] {
            let q = queries(lens.len(), 2, head_dim, splits as u64);
            let mut config = AttentionConfig::new().causal(causal);
            config.tier = tier;
            let options = DecodeOptions::new(&config).kv_splits(splits);
            let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, 2, &options);
            assert_eq!(plan.splits as usize, splits);
            assert_eq!(plan.slots as usize, splits * filled.cache.segment_count());
            assert!(
                out_err <= 1e-4 && lse_err <= 1e-4,
                "{splits} splits, causal {causal}, tier {tier:?}: out {out_err:.2e}, lse {lse_err:.2e}"
            );
        }
    }
}

#[test]
fn paged_and_contiguous_caches_agree() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let lens = [700, 130, 1];
    let seed = 0x5eed_9a6e;
    let contiguous = fill(
        gpu,
        KvCacheConfig::new(
            lens.len(),
            HEADS_KV,
            head_dim,
            KvLayout::Contiguous { capacity: 700 },
        ),
        &lens,
        seed,
    );
    let q = queries(lens.len(), 3, head_dim, 7);
    let options = AttentionConfig::new().causal(true);
    let (base_err, _, _) = decode_errors(gpu, &contiguous, &q, 3, &DecodeOptions::new(&options));
    assert!(base_err <= 1e-4, "contiguous: {base_err:.2e}");
    for page_size in [16, 64, 256] {
        let pages = lens.len() * 768usize.div_ceil(page_size);
        let paged = fill(
            gpu,
            KvCacheConfig::new(
                lens.len(),
                HEADS_KV,
                head_dim,
                KvLayout::Paged { page_size, pages },
            ),
            &lens,
            seed,
        );
        // Same logical contents, pages scattered.
        assert_eq!(paged.k, contiguous.k);
        let table = paged.cache.block_table(0).unwrap();
        assert!(
            table.windows(2).any(|w| w[1] != w[0] + 1),
            "table is consecutive"
        );
        let (k0, v0) = paged.cache.read_sequence(gpu, 0).unwrap();
        assert_eq!(k0, contiguous.k[0], "page size {page_size}: K read back");
        assert_eq!(v0, contiguous.v[0], "page size {page_size}: V read back");
        let (err, _, _) = decode_errors(gpu, &paged, &q, 3, &DecodeOptions::new(&options));
        assert!(err <= 1e-4, "page size {page_size}: {err:.2e}");
    }
}

#[test]
fn merging_two_halves_equals_attention_over_all_keys() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 2,
        seq_q: 5,
        seq_kv: 333,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 48,
        head_dim_v: 48,
    };
    let inputs = common::Inputs::draw(&shape, 0x5eed_3e26, 1.0);
    let config = AttentionConfig::new();
    let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    // Keys [0, 100) and [100, 333) as two views, attended separately.
    let strides = k.strides();
    let parts: Vec<_> = [(0, 100), (100, 233)]
        .iter()
        .map(|&(start, len)| {
            let dims = TensorShape::new(2, len, 2, 48);
            let offset = start * strides.seq;
            let kv = k.view(dims, strides, offset).unwrap();
            let vv = v.view(dims, strides, offset).unwrap();
            let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
            let lse = Lse::new(gpu, 2, 4, 5).unwrap();
            let args = AttentionArgs {
                q: &q,
                k: &kv,
                v: &vv,
                out: &out,
                lse: Some(&lse),
            };
            gpu.run(|e| gpu.forward(e, &args, &config)).unwrap();
            (out, lse)
        })
        .collect();
    let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let lse = Lse::new(gpu, 2, 4, 5).unwrap();
    let refs: Vec<_> = parts.iter().map(|(out, lse)| (out, lse)).collect();
    gpu.run(|e| gpu.merge(e, &refs, &out, Some(&lse))).unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    let got_lse = lse.to_vec(gpu).unwrap();
    let err = common::max_abs_error(&got, &want.out, "merged out");
    let lse_err = common::max_abs_error(&got_lse, &want.lse, "merged lse");
    assert!(
        err <= 1e-4 && lse_err <= 1e-4,
        "merge: {err:.2e} / {lse_err:.2e}"
    );
    assert!(matches!(
        gpu.run(|e| gpu.merge(e, &[], &out, None)),
        Err(Error::NothingToMerge)
    ));
    // Outputs that would race: one whose rows are one location (seq
    // stride 0), and a logsumexp in the output's buffer.
    let wide = Tensor::zeros(gpu, shape.q_shape(), DType::F32).unwrap();
    let strides = wide.strides();
    let rows_as_one = wide
        .view(shape.q_shape(), Strides { seq: 0, ..strides }, 0)
        .unwrap();
    assert!(matches!(
        gpu.run(|e| gpu.merge(e, &refs, &rows_as_one, None)),
        Err(Error::OverlappingOutput { tensor: "out", .. })
    ));
    let lse_in_out = Lse::from_buffer(gpu, out.buffer().clone(), 2, 4, 5).unwrap();
    assert!(matches!(
        gpu.run(|e| gpu.merge(e, &refs, &out, Some(&lse_in_out))),
        Err(Error::OutputAliasesInput {
            tensor: "lse",
            input: "out"
        })
    ));
}

/// Largest |gpu - reference|; a NaN (unwritten) element fails.
fn max_error(got: &[f32], want: &[f64]) -> f64 {
    common::max_abs_error(got, want, "gpu against reference")
}

#[test]
fn rope_kernels_match_a_cpu_rope() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x5eed_40fe);
    for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
        for rope in [
            Rope::new(style),
            Rope::new(style).base(500_000.0).rotary_dim(32),
        ] {
            // Standalone, in place, with per-sequence offsets.
            let shape = TensorShape::new(2, 9, 3, 64);
            let data = normal_vec(&mut rng, shape.elements(), 1.0);
            let tensor = Tensor::from_f32(gpu, shape, &data).unwrap();
            let starts = [0u32, 4_000_000];
            gpu.run(|e| gpu.rope(e, &tensor, &rope, &starts)).unwrap();
            let want = reference::rope(&rope, shape, &data, &[0, 4_000_000]).unwrap();
            let err = max_error(&tensor.to_f32_vec(gpu).unwrap(), &want);
            assert!(err <= ROPE_BOUND, "{rope:?} in place: {err:.2e}");

            // Fused into the append: keys rotated at cache position +
            // offset, values untouched.
            let mut cache = KvCache::new(
                gpu,
                KvCacheConfig::new(
                    2,
                    3,
                    64,
                    KvLayout::Paged {
                        page_size: 16,
                        pages: 8,
                    },
                ),
            )
            .unwrap();
            cache.set_block_table(0, &[5, 1, 6]).unwrap();
            cache.set_block_table(1, &[0, 7, 2, 3]).unwrap();
            let first = TensorShape::new(2, 20, 3, 64);
            let k1 = normal_vec(&mut rng, first.elements(), 1.0);
            let v1 = normal_vec(&mut rng, first.elements(), 1.0);
            let offsets = [3u32, 2_000_000];
            let k1t = Tensor::from_f32(gpu, first, &k1).unwrap();
            let v1t = Tensor::from_f32(gpu, first, &v1).unwrap();
            gpu.run(|e| {
                cache.append(
                    gpu,
                    e,
                    &k1t,
                    &v1t,
                    Some(KeyRotation {
                        rope: &rope,
                        position_offsets: &offsets,
                    }),
                )
            })
            .unwrap();
            assert_eq!(cache.next_positions(&offsets).unwrap(), vec![23, 2_000_020]);
            let second = TensorShape::new(2, 7, 3, 64);
            let k2 = normal_vec(&mut rng, second.elements(), 1.0);
            let v2 = normal_vec(&mut rng, second.elements(), 1.0);
            let k2t = Tensor::from_f32(gpu, second, &k2).unwrap();
            let v2t = Tensor::from_f32(gpu, second, &v2).unwrap();
            gpu.run(|e| {
                cache.append(
                    gpu,
                    e,
                    &k2t,
                    &v2t,
                    Some(KeyRotation {
                        rope: &rope,
                        position_offsets: &offsets,
                    }),
                )
            })
            .unwrap();
            assert_eq!(cache.lens(), &[27, 27]);
            let want1 = reference::rope(&rope, first, &k1, &[3, 2_000_000]).unwrap();
            let want2 = reference::rope(&rope, second, &k2, &[23, 2_000_020]).unwrap();
            let token = 3 * 64;
            for b in 0..2 {
                let (k, v) = cache.read_sequence(gpu, b).unwrap();
                let mut want_k = want1[b * 20 * token..(b + 1) * 20 * token].to_vec();
                want_k.extend_from_slice(&want2[b * 7 * token..(b + 1) * 7 * token]);
                let mut want_v = v1[b * 20 * token..(b + 1) * 20 * token].to_vec();
                want_v.extend_from_slice(&v2[b * 7 * token..(b + 1) * 7 * token]);
                let err = max_error(&k, &want_k);
                assert!(
                    err <= ROPE_BOUND,
                    "{rope:?} append, sequence {b}: {err:.2e}"
                );
                assert_eq!(v, want_v, "values are copied untouched");
            }
        }
    }
}

#[test]
fn bad_cache_input_is_a_typed_error() {
    let Some(gpu) = gpu() else { return };
    let paged = |page_size| {
        KvCacheConfig::new(
            2,
            2,
            32,
            KvLayout::Paged {
                page_size,
                pages: 4,
            },
        )
    };
    for bad in [0, 8, 48, 512] {
        assert!(
            matches!(KvCache::new(gpu, paged(bad)), Err(Error::PageSize { got }) if got == bad),
            "page size {bad}"
        );
    }
    let mut cache = KvCache::new(gpu, paged(16)).unwrap();
    assert!(matches!(
        cache.set_block_table(1, &[0, 4]),
        Err(Error::BlockTablePage {
            sequence: 1,
            index: 1,
            page: 4,
            pool_pages: 4
        })
    ));
    assert!(matches!(
        cache.set_block_table(2, &[0]),
        Err(Error::CacheSequence {
            sequence: 2,
            batch: 2
        })
    ));
    cache.set_block_table(0, &[0, 1]).unwrap();
    cache.set_block_table(1, &[2]).unwrap();
    assert!(matches!(
        cache.set_len(1, 17),
        Err(Error::CacheCapacity {
            sequence: 1,
            needed: 17,
            capacity: 16
        })
    ));
    let tokens = TensorShape::new(2, 17, 2, 32);
    let k = Tensor::filled(gpu, tokens, 0.5).unwrap();
    assert!(matches!(
        gpu.run(|e| cache.append(gpu, e, &k, &k, None)),
        Err(Error::CacheCapacity {
            sequence: 1,
            needed: 17,
            capacity: 16
        })
    ));
    assert_eq!(cache.lens(), &[0, 0], "a failed append changes nothing");
    let wrong_heads = Tensor::filled(gpu, TensorShape::new(2, 1, 3, 32), 0.5).unwrap();
    assert!(matches!(
        gpu.run(|e| cache.append(gpu, e, &wrong_heads, &wrong_heads, None)),
        Err(Error::ShapeMismatch { .. })
    ));
    let rope = Rope::new(RopeStyle::HalfSplit).rotary_dim(33);
    let one = Tensor::filled(gpu, TensorShape::new(2, 1, 2, 32), 0.5).unwrap();
    assert!(matches!(
        gpu.run(|e| cache.append(
            gpu,
            e,
            &one,
            &one,
            Some(KeyRotation {
                rope: &rope,
                position_offsets: &[0, 0]
            })
        )),
        Err(Error::RotaryDim {
            rotary_dim: 33,
            head_dim: 32
        })
    ));
    // Positions past u32::MAX (the kernels' type) are refused, not wrapped.
    let rope = Rope::new(RopeStyle::HalfSplit);
    let two_tokens = Tensor::filled(gpu, TensorShape::new(2, 2, 2, 32), 0.5).unwrap();
    assert!(matches!(
        gpu.run(|e| cache.append(
            gpu,
            e,
            &two_tokens,
            &two_tokens,
            Some(KeyRotation {
                rope: &rope,
                position_offsets: &[0, u32::MAX]
            })
        )),
        Err(Error::RopePosition {
            sequence: 1,
            first: 4_294_967_295,
            tokens: 2
        })
    ));
    assert_eq!(cache.lens(), &[0, 0], "a refused append changes nothing");
    assert!(matches!(
        gpu.run(|e| gpu.rope(e, &two_tokens, &rope, &[u32::MAX, 0])),
        Err(Error::RopePosition {
            sequence: 0,
            tokens: 2,
            ..
        })
    ));
    assert!(matches!(
        cache.next_positions(&[0]),
        Err(Error::DataLength {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert_eq!(cache.next_positions(&[0, u32::MAX]).unwrap(), [0, u32::MAX]);
    gpu.run(|e| cache.append(gpu, e, &one, &one, None)).unwrap();
    assert!(matches!(
        cache.next_positions(&[0, u32::MAX]),
        Err(Error::RopePosition { sequence: 1, .. })
    ));
    let q = Tensor::filled(gpu, TensorShape::new(2, 1, 4, 32), 0.5).unwrap();
    let out = Tensor::filled(gpu, TensorShape::new(2, 1, 4, 32), 0.0).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    assert!(matches!(
        gpu.run(|e| gpu.decode(
            e,
            &args,
            DecodeOptions::new(&AttentionConfig::new()).kv_splits(0)
        )),
        Err(Error::KvSplits(0))
    ));
    // A logsumexp in the queries' (or the output's) buffer.
    for (name, aliased) in [("q", &q), ("out", &out)] {
        let lse = Lse::from_buffer(gpu, aliased.buffer().clone(), 2, 4, 1).unwrap();
        let with_lse = DecodeArgs {
            lse: Some(&lse),
            ..args
        };
        assert!(
            matches!(
                gpu.run(|e| gpu.decode(e, &with_lse, AttentionConfig::new())),
                Err(Error::OutputAliasesInput { tensor: "lse", input }) if input == name
            ),
            "lse in {name}'s buffer"
        );
    }
    // A forced split count past the dispatch limit (one that would wrap
    // when multiplied by the row tiles) is refused with the numbers.
    let limit = gpu.info().limits.max_compute_workgroups_per_dimension;
    assert!(matches!(
        gpu.run(|e| gpu.decode(
            e,
            &args,
            DecodeOptions::new(&AttentionConfig::new()).kv_splits(usize::MAX)
        )),
        Err(Error::DispatchTooLarge { groups, limit: l, .. }) if groups > u64::from(limit) && l == limit
    ));
    let q3 = Tensor::filled(gpu, TensorShape::new(3, 1, 4, 32), 0.5).unwrap();
    let args = DecodeArgs {
        q: &q3,
        cache: &cache,
        out: &out,
        lse: None,
    };
    assert!(matches!(
        gpu.run(|e| gpu.decode(e, &args, AttentionConfig::new())),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// Pools too large to describe are refused before anything is allocated:
/// a page whose bytes overflow, and a block table past one binding.
#[test]
fn cache_geometries_past_the_limits_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let paged = |batch, heads_kv, pages| {
        KvCacheConfig::new(
            batch,
            heads_kv,
            32,
            KvLayout::Paged {
                page_size: 16,
                pages,
            },
        )
    };
    let err = KvCache::new(gpu, paged(1, 1 << 59, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeOverflow {
                tensor: "kv cache page",
                ..
            }
        ),
        "{err}"
    );
    let limit = gpu.info().limits.max_storage_buffer_binding_size;
    let batch = 64;
    let pages = (limit / 4 / batch as u64 + 1) as usize;
    match KvCache::new(gpu, paged(batch, 1, pages)) {
        Err(Error::BufferTooLarge {
            tensor: "kv cache block table",
            bytes,
            limit: l,
            ..
        }) => assert!(bytes == (batch * pages * 4) as u64 && l == limit),
        Err(Error::ShapeOverflow {
            tensor: "kv cache block table",
            ..
        }) => assert!(batch * pages >= u32::MAX as usize, "{pages} pages"),
        other => panic!("a {batch} x {pages} block table: {other:?}"),
    }
}

/// A buffer of `bytes` for a caller's cache pool (read back by the tests).
fn caller_pool_buffer(gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
    gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller pool"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// A caller's pool must give every page storage of its own, and a call's
/// other operands must keep out of the pool's buffers: a buffer used twice
/// in the pool (K as V, or in two segments) is `CacheBufferRepeat`; an
/// output of a decoding step, or the new tokens of an append, placed in a
/// pool buffer's spare bytes is `OutputAliasesInput`. Each of them was
/// accepted before and wrote one page over another, or had wgpu refuse the
/// dispatch (a buffer bound writable and read-only at once).
#[test]
fn caller_pools_and_operands_keep_their_buffers_apart() {
    let Some(gpu) = gpu() else { return };
    let (head_dim, pages) = (32, 2);
    let config = |values| {
        let paged = KvLayout::Paged {
            page_size: 16,
            pages,
        };
        let config = KvCacheConfig::new(1, HEADS_KV, head_dim, paged);
        match values {
            Some(head_dim_v) => config.latent_values(head_dim_v),
            None => config,
        }
    };
    let page_bytes = (16 * HEADS_KV * head_dim * 4) as u64;
    let buffer = |pages: u64| caller_pool_buffer(gpu, pages * page_bytes);
    let (a, b, c) = (buffer(1), buffer(1), buffer(1));
    let repeat = |segments: &[(wgpu::Buffer, wgpu::Buffer)], values| {
        KvCache::from_buffers(gpu, config(values), segments).map(|_| ())
    };
    let cases = [
        (
            vec![(a.clone(), a.clone()), (b.clone(), c.clone())],
            (0, "K", 0, "V"),
        ),
        (
            vec![(a.clone(), b.clone()), (a.clone(), c.clone())],
            (0, "K", 1, "K"),
        ),
        (
            vec![(a.clone(), b.clone()), (c.clone(), b.clone())],
            (0, "V", 1, "V"),
        ),
        (
            vec![(a.clone(), b.clone()), (c.clone(), a.clone())],
            (0, "K", 1, "V"),
        ),
    ];
    for (segments, (s0, r0, s1, r1)) in cases {
        let err = repeat(&segments, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CacheBufferRepeat { first_segment, first, second_segment, second }
                    if (first_segment, first, second_segment, second) == (s0, r0, s1, r1)
            ),
            "{err}"
        );
    }
    // A latent cache passes K's buffer as V, but no buffer in two segments.
    repeat(&[(a.clone(), a.clone()), (b.clone(), b.clone())], Some(16)).unwrap();
    assert!(matches!(
        repeat(&[(a.clone(), a.clone()), (a.clone(), a.clone())], Some(16)),
        Err(Error::CacheBufferRepeat {
            first_segment: 0,
            second_segment: 1,
            ..
        })
    ));

    // A pool in buffers with room for one more page than the pool holds,
    // and the call's other tensors placed in them.
    let (pool_k, pool_v) = (buffer(pages as u64 + 1), buffer(pages as u64 + 1));
    let segments = [(pool_k.clone(), pool_v.clone())];
    let mut cache = KvCache::from_buffers(gpu, config(None), &segments).unwrap();
    cache.set_block_table(0, &[0, 1]).unwrap();
    let spare = pages * 16 * HEADS_KV * head_dim;
    let in_spare = |buffer: &wgpu::Buffer, shape: TensorShape| {
        let strides = shape.contiguous_strides();
        Tensor::from_buffer(gpu, buffer.clone(), shape, strides, spare, DType::F32).unwrap()
    };
    // New tokens are packed from a buffer's start: here, the pool's.
    let tokens = TensorShape::new(1, 3, HEADS_KV, head_dim);
    let in_pool = |buffer: &wgpu::Buffer| {
        let strides = tokens.contiguous_strides();
        Tensor::from_buffer(gpu, buffer.clone(), tokens, strides, 0, DType::F32).unwrap()
    };
    let fresh = Tensor::filled(gpu, tokens, 0.5).unwrap();
    for (k_new, v_new, want) in [
        (in_pool(&pool_k), &fresh, ("kv cache K", "k")),
        (fresh.clone(), &in_pool(&pool_v), ("kv cache V", "v")),
    ] {
        let err = gpu.run(|e| cache.append(gpu, e, &k_new, v_new, None));
        assert!(
            matches!(err, Err(Error::OutputAliasesInput { tensor, input }) if (tensor, input) == want),
            "{err:?}"
        );
    }
    assert_eq!(cache.lens(), &[0], "a refused append changes nothing");
    gpu.run(|e| cache.append(gpu, e, &fresh, &fresh, None))
        .unwrap();
    let rows = TensorShape::new(1, 1, HEADS_Q, head_dim);
    let q = Tensor::filled(gpu, rows, 0.5).unwrap();
    let out = Tensor::zeros(gpu, rows, DType::F32).unwrap();
    let lse_in_v = Lse::from_buffer(gpu, pool_v.clone(), 1, HEADS_Q, 1).unwrap();
    let out_in_k = in_spare(&pool_k, rows);
    for (out, lse, want) in [
        (&out_in_k, None, ("out", "kv cache K")),
        (&out, Some(&lse_in_v), ("lse", "kv cache V")),
    ] {
        let args = DecodeArgs {
            q: &q,
            cache: &cache,
            out,
            lse,
        };
        for splits in [1, 2] {
            let options = DecodeOptions::new(&AttentionConfig::new()).kv_splits(splits);
            let err = gpu.run(|e| gpu.decode(e, &args, options));
            assert!(
                matches!(err, Err(Error::OutputAliasesInput { tensor, input }) if (tensor, input) == want),
                "{splits} splits: {err:?}"
            );
        }
    }
}

/// Appends `len` seeded N(0, 1) tokens to every sequence of `cache`;
/// returns the K and V appended, `[batch, len, heads_kv, head_dim]`.
fn append_random_tokens(
    gpu: &Gpu,
    cache: &mut KvCache,
    len: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let shape = TensorShape::new(cache.batch(), len, cache.heads_kv(), cache.head_dim());
    let mut rng = seeded(seed);
    let k = normal_vec(&mut rng, shape.elements(), 1.0);
    let v = normal_vec(&mut rng, shape.elements(), 1.0);
    let (kt, vt) = (
        Tensor::from_f32(gpu, shape, &k).unwrap(),
        Tensor::from_f32(gpu, shape, &v).unwrap(),
    );
    gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
    (k, v)
}

/// One new token of each of `filled`'s sequences decodes within 1e-4 of
/// the reference over what it holds.
fn assert_one_token_decodes(gpu: &Gpu, filled: &Filled, seed: u64) {
    let q = queries(filled.cache.batch(), 1, filled.cache.head_dim(), seed);
    let (out_err, lse_err, plan) = decode_errors(
        gpu,
        filled,
        &q,
        1,
        &DecodeOptions::new(&AttentionConfig::new()),
    );
    assert!(
        out_err <= 1e-4 && lse_err <= 1e-4,
        "out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
    );
}

/// A caller's pool in buffers of different sizes (one page, then two):
/// the kernels and the read-back find each page in the buffer whose range
/// holds it.
#[test]
fn caller_buffers_of_different_sizes_hold_their_pages() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let config = KvCacheConfig::new(
        1,
        HEADS_KV,
        head_dim,
        KvLayout::Paged {
            page_size: 16,
            pages: 3,
        },
    );
    let page_bytes = (16 * HEADS_KV * head_dim * 4) as u64;
    let buffer = |pages: u64| caller_pool_buffer(gpu, pages * page_bytes);
    let segments = [(buffer(1), buffer(1)), (buffer(2), buffer(2))];
    let mut cache = KvCache::from_buffers(gpu, config, &segments).unwrap();
    assert_eq!(cache.segment_count(), 2);
    // Page 2 is the second buffer's second page; page 0 the first buffer's.
    cache.set_block_table(0, &[2, 0, 1]).unwrap();
    let (k, v) = append_random_tokens(gpu, &mut cache, 40, 0x5eed_5e66);
    let (k_back, v_back) = cache.read_sequence(gpu, 0).unwrap();
    assert_eq!(k_back, k, "K read back");
    assert_eq!(v_back, v, "V read back");
    let filled = Filled {
        cache,
        k: vec![k],
        v: vec![v],
    };
    assert_one_token_decodes(gpu, &filled, 0x5e66);
}

/// An int8 pool in the caller's buffers holds what `KvCache::from_buffers`
/// documents: vector `(page * page_size + row) * heads_kv + head` of a
/// buffer (pages counted within it) at byte `vector * (head_dim + 4)`, its
/// `head_dim` int8 elements then its f32 scale `max|x| / 127`; and decoding
/// reads them there.
#[test]
fn int8_caller_buffers_hold_elements_then_scales() {
    let Some(gpu) = gpu() else { return };
    let (head_dim, page_size) = (64, 16);
    let config = KvCacheConfig::new(
        1,
        HEADS_KV,
        head_dim,
        KvLayout::Paged {
            page_size,
            pages: 3,
        },
    )
    .dtype(KvDType::Int8);
    let page_bytes = (page_size * HEADS_KV * (head_dim + 4)) as u64;
    // Room for two pages each, plus a few bytes short of a third (the
    // second buffer's second page is not in the pool).
    let buffer = || caller_pool_buffer(gpu, 2 * page_bytes + 12);
    let segments = [(buffer(), buffer()), (buffer(), buffer())];
    let mut cache = KvCache::from_buffers(gpu, config, &segments).unwrap();
    assert_eq!(cache.segment_count(), 2);
    // Positions 0-15 in the second buffer's first page, 16-39 in the first's.
    let table = [2, 0, 1];
    cache.set_block_table(0, &table).unwrap();
    let len = 40;
    let (k, v) = append_random_tokens(gpu, &mut cache, len, 0x1a70_5ca1);
    let raw: Vec<[Vec<u8>; 2]> = segments
        .iter()
        .map(|(kb, vb)| [common::read_bytes(gpu, kb), common::read_bytes(gpu, vb)])
        .collect();
    let vector_bytes = head_dim + 4;
    let mut stored = [Vec::new(), Vec::new()];
    for pos in 0..len {
        let page = table[pos / page_size] as usize;
        let (buffer, page_in_buffer) = (page / 2, page % 2);
        for head in 0..HEADS_KV {
            let vector = (page_in_buffer * page_size + pos % page_size) * HEADS_KV + head;
            for (which, appended) in [&k, &v].into_iter().enumerate() {
                let bytes = &raw[buffer][which];
                let at = vector * vector_bytes + head_dim;
                let scale = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                let x = &appended[(pos * HEADS_KV + head) * head_dim..][..head_dim];
                let amax = x.iter().fold(0.0f32, |m, e| m.max(e.abs()));
                let what = format!("{} at position {pos}, head {head}", ["K", "V"][which]);
                assert!(
                    (scale - amax / 127.0).abs() <= 1e-6 * amax,
                    "{what}: scale {scale}, max|x| / 127 = {}",
                    amax / 127.0
                );
                for (e, (&byte, &xe)) in bytes[vector * vector_bytes..][..head_dim]
                    .iter()
                    .zip(x)
                    .enumerate()
                {
                    let value = f32::from(byte as i8) * scale;
                    assert!(
                        (value - xe).abs() <= 0.5001 * scale,
                        "{what}, element {e}: stored {value}, appended {xe}"
                    );
                    stored[which].push(value);
                }
            }
        }
    }
    let (k_back, v_back) = cache.read_sequence(gpu, 0).unwrap();
    assert_eq!(k_back, stored[0], "K read back");
    assert_eq!(v_back, stored[1], "V read back");
    let [k_stored, v_stored] = stored;
    let filled = Filled {
        cache,
        k: vec![k_stored],
        v: vec![v_stored],
    };
    assert_one_token_decodes(gpu, &filled, 0x1a70);
}

#[test]
fn caches_split_over_several_buffers_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let lens = [900, 333];
    // A contiguous cache of 900 tokens takes 256-token pages (64 KiB here):
    // one page per buffer gives 8 buffers. The paged pool's 16-token pages
    // are 4 KiB: three per buffer gives 38.
    let cases = [
        (KvLayout::Contiguous { capacity: 900 }, 64 * 1024, 8),
        (
            KvLayout::Paged {
                page_size: 16,
                pages: 2 * 57,
            },
            3 * 4096,
            38,
        ),
    ];
    for (layout, buffer_bytes, buffers) in cases {
        let config = KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, layout)
            .max_buffer_bytes(buffer_bytes);
        let filled = fill(gpu, config, &lens, 0x5eed_5e65);
        assert_eq!(filled.cache.segment_count(), buffers, "{layout:?}");
        for b in 0..lens.len() {
            let (k, v) = filled.cache.read_sequence(gpu, b).unwrap();
            assert_eq!(k, filled.k[b], "{layout:?}: K of sequence {b} read back");
            assert_eq!(v, filled.v[b], "{layout:?}: V of sequence {b} read back");
        }
        for (seq_q, causal) in [(1, false), (5, true)] {
            let q = queries(lens.len(), seq_q, head_dim, seq_q as u64);
            let options = AttentionConfig::new().causal(causal);
            let (out_err, lse_err, plan) =
                decode_errors(gpu, &filled, &q, seq_q, &DecodeOptions::new(&options));
            assert!(
                out_err <= 1e-4 && lse_err <= 1e-4,
                "{layout:?}, seq_q {seq_q}: out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
            );
        }
    }
}

/// Attention sinks join each row once, however many splits and buffers
/// the keys are spread over (only the first output slot starts with the
/// sink); an empty sequence outputs zeros with lse = the sink.
#[test]
fn sinks_count_once_over_splits_and_buffers() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let lens = [0, 5, 300, 900];
    let cases = [
        KvCacheConfig::new(
            lens.len(),
            HEADS_KV,
            head_dim,
            KvLayout::Contiguous { capacity: 900 },
        ),
        // 16-token pages, three per buffer: many segments.
        KvCacheConfig::new(
            lens.len(),
            HEADS_KV,
            head_dim,
            KvLayout::Paged {
                page_size: 16,
                pages: 4 * 57,
            },
        )
        .max_buffer_bytes(3 * 4096),
    ];
    let mut sinks = normal_vec(&mut seeded(0x5111), HEADS_Q, 2.0);
    sinks[3] = 8.0;
    for cache_config in cases {
        let filled = fill(gpu, cache_config, &lens, 0x5eed_5111);
        for (splits, tier, causal) in [
            (1, None, false),
            (3, None, true),
            (3, Some(Tier::Portable), false),
            (1, Some(Tier::Portable), true),
        ] {
            let mut config = AttentionConfig::new().causal(causal).sinks(sinks.clone());
            config.tier = tier;
            let seq_q = 3;
            let q = queries(lens.len(), seq_q, head_dim, splits as u64);
            let options = DecodeOptions::new(&config).kv_splits(splits);
            let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, seq_q, &options);
            assert!(
                out_err <= 1e-4 && lse_err <= 1e-4,
                "{:?}, {splits} splits, {tier:?}, causal {causal}: out {out_err:.2e}, \
                 lse {lse_err:.2e} ({plan:?})",
                cache_config.layout
            );
        }
    }
}

/// Checks every stored head vector of `stored` against `original` with
/// [`common::storage_bound`] plus `slack`.
fn assert_stored_within(
    dtype: KvDType,
    head_dim: usize,
    [stored, original]: [&[f32]; 2],
    slack: f32,
    what: &str,
) {
    assert_eq!(stored.len(), original.len(), "{what}");
    for (vector, (got, want)) in stored
        .chunks(head_dim)
        .zip(original.chunks(head_dim))
        .enumerate()
    {
        let amax = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (e, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                f64::from((g - w).abs())
                    <= common::storage_bound(dtype, f64::from(*w), f64::from(amax))
                        + f64::from(slack),
                "{what} {dtype:?}: vector {vector}, element {e}: stored {g}, appended {w}"
            );
        }
    }
}

/// f16, bf16, int8 and fp8 caches: each element is stored within its
/// type's rounding of the appended value, and decoding reads exactly what
/// is stored (the reference runs on the values read back).
#[test]
fn narrow_caches_store_within_their_rounding_and_decode_what_they_store() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let lens = [1, 130, 700];
    // Three query rows fill 12 of the 16 rows per invocation of lavapipe's
    // keys layout, whose kernel compiles for a minute or more per cache
    // type on a cold lavapipe: two in a newcomer's run (f32 keeps three in
    // `both_lane_layouts_match_the_reference`).
    let rows_with_sinks = common::cases("decode with sinks and splits (query rows)", &[2], &[3])[0];
    let mut sinks = normal_vec(&mut seeded(0xca5e), HEADS_Q, 1.0);
    sinks[0] = 6.0;
    for dtype in [KvDType::F16, KvDType::BF16, KvDType::Int8, KvDType::Fp8] {
        for layout in [
            KvLayout::Contiguous { capacity: 700 },
            KvLayout::Paged {
                page_size: 32,
                pages: 3 * 22,
            },
        ] {
            let config = KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, layout).dtype(dtype);
            let mut filled = fill(gpu, config, &lens, 0xca5e_0001);
            assert_eq!(
                filled.cache.bytes(),
                2 * (filled.cache.pool_pages() * filled.cache.page_size() * HEADS_KV) as u64
                    * dtype.vector_bytes(head_dim) as u64,
                "{dtype:?}: the pool's bytes"
            );
            for b in 0..lens.len() {
                let (k, v) = filled.cache.read_sequence(gpu, b).unwrap();
                assert_stored_within(dtype, head_dim, [&k, &filled.k[b]], 0.0, "K");
                assert_stored_within(dtype, head_dim, [&v, &filled.v[b]], 0.0, "V");
                filled.k[b] = k;
                filled.v[b] = v;
            }
            let cases = [
                (1, None, None, AttentionConfig::new()),
                (
                    rows_with_sinks,
                    None,
                    Some(3),
                    AttentionConfig::new().causal(true).sinks(sinks.clone()),
                ),
                (
                    2,
                    Some(Tier::Portable),
                    None,
                    AttentionConfig::new().window(Some(50), Some(0)),
                ),
                (
                    1,
                    Some(Tier::Portable),
                    Some(2),
                    AttentionConfig::new().softcap(10.0),
                ),
            ];
            for (seq_q, tier, splits, config) in cases {
                let config = match tier {
                    Some(tier) => config.tier(tier),
                    None => config,
                };
                let q = queries(lens.len(), seq_q, head_dim, seq_q as u64 + 40);
                let mut options = DecodeOptions::new(&config);
                options.kv_splits = splits;
                let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, seq_q, &options);
                assert!(
                    out_err <= 1e-4 && lse_err <= 1e-4,
                    "{dtype:?} {layout:?} seq_q {seq_q} {config:?}: out {out_err:.2e}, \
                     lse {lse_err:.2e} ({plan:?})"
                );
            }
        }
    }
}

/// Head vectors of 448 (so each scale is 1) and E4M3 values, in
/// `HEADS_KV`-head tokens: every finite byte once, or the ties halfway
/// between neighbouring bytes. Returns the tokens and what an fp8 cache
/// must hold: the values themselves, or each tie's even neighbour.
fn fp8_probe_tokens(head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let value = |code: u8| float8::F8E4M3::from_bits(code).to_f32();
    // 0x7f and 0xff are NaN.
    let mut pairs: Vec<(f32, f32)> = (0x00..=0x7eu8)
        .chain(0x80..=0xfe)
        .map(|code| (value(code), value(code)))
        .collect();
    for code in 0x00..0x7eu8 {
        let (low, high) = (value(code), value(code + 1));
        // The even byte's mantissa ends in 0.
        let even = if code % 2 == 0 { low } else { high };
        let tie = (low + high) / 2.0;
        pairs.extend([(tie, even), (-tie, -even)]);
    }
    let mut chunks: Vec<&[(f32, f32)]> = pairs.chunks(head_dim - 1).collect();
    // Whole tokens: vectors of 448 and zeros make up the last.
    chunks.resize(chunks.len().next_multiple_of(HEADS_KV), &[]);
    let mut vectors: Vec<(f32, f32)> = Vec::new();
    for chunk in chunks {
        vectors.push((448.0, 448.0));
        vectors.extend_from_slice(chunk);
        vectors.resize(vectors.len().next_multiple_of(head_dim), (0.0, 0.0));
    }
    vectors.into_iter().unzip()
}

/// An fp8 cache holds every finite E4M3 byte exactly, rounds ties to even,
/// and the decode kernel widens each byte as the host does (the `float8`
/// crate): with one visible key a decode's output is that key's value.
#[test]
fn fp8_caches_hold_every_byte_and_round_ties_to_even() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let (data, want) = fp8_probe_tokens(head_dim);
    let tokens = data.len() / (HEADS_KV * head_dim);
    let config = KvCacheConfig::new(1, HEADS_KV, head_dim, KvLayout::Contiguous { capacity: 64 })
        .dtype(KvDType::Fp8);
    let mut cache = KvCache::new(gpu, config).unwrap();
    let shape = TensorShape::new(1, tokens, HEADS_KV, head_dim);
    let values = Tensor::from_f32(gpu, shape, &data).unwrap();
    gpu.run(|e| cache.append(gpu, e, &values, &values, None))
        .unwrap();
    let (k, v) = cache.read_sequence(gpu, 0).unwrap();
    assert_eq!(k, v, "K and V were the same tokens");
    // CPU adapters divide as IEEE does: there the ties are always checked.
    let exact_division = gpu.info().adapter.device_type == wgpu::DeviceType::Cpu;
    for (vector, (got, want)) in v.chunks(head_dim).zip(want.chunks(head_dim)).enumerate() {
        assert!(
            got[0] == 448.0 || !exact_division,
            "vector {vector}: 448 / 448 stored as {} on {}",
            got[0] / 448.0,
            gpu.info().summary()
        );
        if got[0] == 448.0 {
            // Scale 1 (448 / 448): every byte as the host rounds it.
            for (e, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(g, w, "vector {vector}, element {e}");
            }
        } else {
            // An adapter whose division is not correctly rounded may miss
            // scale 1 by an ulp and round ties either way.
            eprintln!(
                "ties unchecked in vector {vector}: {} stores 448 / 448 as {}",
                gpu.info().summary(),
                got[0] / 448.0
            );
            let appended = &data[vector * head_dim..(vector + 1) * head_dim];
            assert_stored_within(KvDType::Fp8, head_dim, [got, appended], 0.0, "V");
        }
    }
    // Token t alone in view: the query at the cache's end with a window
    // of no keys before it, over the first t + 1 tokens.
    let options = DecodeOptions::new(&AttentionConfig::new().window(Some(0), Some(0)));
    let q_shape = TensorShape::new(1, 1, HEADS_Q, head_dim);
    let q = Tensor::from_f32(gpu, q_shape, &queries(1, 1, head_dim, 0xf8_0001)).unwrap();
    let out = Tensor::filled_as(gpu, q_shape, f32::NAN, DType::F32).unwrap();
    let group = HEADS_Q / HEADS_KV;
    for t in 0..tokens {
        cache.set_len(0, t + 1).unwrap();
        let args = DecodeArgs {
            q: &q,
            cache: &cache,
            out: &out,
            lse: None,
        };
        gpu.run(|e| gpu.decode(e, &args, options.clone())).unwrap();
        let got = out.to_f32_vec(gpu).unwrap();
        for (head, row) in got.chunks(head_dim).enumerate() {
            let at = (t * HEADS_KV + head / group) * head_dim;
            assert_eq!(row, &v[at..at + head_dim], "token {t}, query head {head}");
        }
    }
}

/// The fused RoPE of the append, into f16, bf16, int8 and fp8 caches: the
/// keys read back are the CPU rotation within the type's rounding.
#[test]
fn rotated_keys_into_narrow_caches() {
    let Some(gpu) = gpu() else { return };
    let mut rng = seeded(0x40fe_ca5e);
    for dtype in [KvDType::F16, KvDType::BF16, KvDType::Int8, KvDType::Fp8] {
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let rope = Rope::new(style).rotary_dim(48);
            let shape = TensorShape::new(2, 21, 2, 64);
            let config =
                KvCacheConfig::new(2, 2, 64, KvLayout::Contiguous { capacity: 32 }).dtype(dtype);
            let mut cache = KvCache::new(gpu, config).unwrap();
            let k = normal_vec(&mut rng, shape.elements(), 1.0);
            let v = normal_vec(&mut rng, shape.elements(), 1.0);
            let (kt, vt) = (
                Tensor::from_f32(gpu, shape, &k).unwrap(),
                Tensor::from_f32(gpu, shape, &v).unwrap(),
            );
            let offsets = [0u32, 5000];
            let rotation = KeyRotation {
                rope: &rope,
                position_offsets: &offsets,
            };
            gpu.run(|e| cache.append(gpu, e, &kt, &vt, Some(rotation)))
                .unwrap();
            let want = reference::rope(&rope, shape, &k, &[0, 5000]).unwrap();
            let token = 2 * 64;
            for b in 0..2 {
                let (got_k, got_v) = cache.read_sequence(gpu, b).unwrap();
                let want_k: Vec<f32> = want[b * 21 * token..(b + 1) * 21 * token]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                // The f32 rotation itself is within ROPE_BOUND (the test
                // above).
                let what = format!("{style:?} keys, sequence {b}");
                assert_stored_within(dtype, 64, [&got_k, &want_k], ROPE_BOUND as f32, &what);
                let want_v = &v[b * 21 * token..(b + 1) * 21 * token];
                assert_stored_within(dtype, 64, [&got_v, want_v], 0.0, "V");
            }
        }
    }
}

/// Continuous batching: ragged appends give each sequence its own count
/// of tokens (0 included), rotated at its own positions. Each sequence
/// then holds exactly what uniform appends of its tokens store in a cache
/// of its own (bit for bit, int8 scales and RoPE included), and decodes
/// against the reference; counts that are all 0 record nothing.
#[test]
fn ragged_appends_give_each_sequence_its_own_tokens() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let rope = Rope::new(RopeStyle::HalfSplit);
    let offsets = [0u32, 300, 7];
    let rotation = || {
        Some(KeyRotation {
            rope: &rope,
            position_offsets: &offsets,
        })
    };
    // The last step leaves sequence 1, full, out: its writes past the
    // end would land in sequence 2's page.
    let steps: [[usize; 3]; 5] = [[7, 0, 3], [1, 12, 0], [0, 0, 0], [0, 20, 0], [1, 0, 0]];
    for (seed, dtype) in [(0x7a_99, KvDType::F32), (0x7a_9a, KvDType::Int8)] {
        let contiguous = KvLayout::Contiguous { capacity: 32 };
        let config = KvCacheConfig::new(3, HEADS_KV, head_dim, contiguous).dtype(dtype);
        let mut cache = KvCache::new(gpu, config).unwrap();
        // One cache per sequence, appended to uniformly: the oracle.
        let alone = KvCacheConfig::new(1, HEADS_KV, head_dim, contiguous).dtype(dtype);
        let mut singles: Vec<KvCache> = (0..3).map(|_| KvCache::new(gpu, alone).unwrap()).collect();
        let mut rng = seeded(seed);
        let token = HEADS_KV * head_dim;
        for counts in steps {
            let total: usize = counts.iter().sum();
            let k = normal_vec(&mut rng, total * token, 1.0);
            let v = normal_vec(&mut rng, total * token, 1.0);
            if total == 0 {
                // No tensor has zero rows: any tensor stands in, unread.
                let any =
                    Tensor::zeros(gpu, TensorShape::new(1, 1, HEADS_KV, head_dim), DType::F32)
                        .unwrap();
                gpu.run(|e| cache.append_ragged(gpu, e, &counts, &any, &any, rotation()))
                    .unwrap();
                continue;
            }
            let rows = TensorShape::new(1, total, HEADS_KV, head_dim);
            let (kt, vt) = (
                Tensor::from_f32(gpu, rows, &k).unwrap(),
                Tensor::from_f32(gpu, rows, &v).unwrap(),
            );
            gpu.run(|e| cache.append_ragged(gpu, e, &counts, &kt, &vt, rotation()))
                .unwrap();
            let mut first = 0;
            for (b, &count) in counts.iter().enumerate() {
                if count > 0 {
                    let own = TensorShape::new(1, count, HEADS_KV, head_dim);
                    let rows = first * token..(first + count) * token;
                    let (kt, vt) = (
                        Tensor::from_f32(gpu, own, &k[rows.clone()]).unwrap(),
                        Tensor::from_f32(gpu, own, &v[rows]).unwrap(),
                    );
                    let offset = [offsets[b]];
                    let rotation = KeyRotation {
                        rope: &rope,
                        position_offsets: &offset,
                    };
                    gpu.run(|e| singles[b].append(gpu, e, &kt, &vt, Some(rotation)))
                        .unwrap();
                }
                first += count;
            }
        }
        assert_eq!(cache.lens(), &[9, 32, 3]);
        let stored = stored_sequences(gpu, &cache);
        for (b, single) in singles.iter().enumerate() {
            assert_eq!(
                stored[b],
                single.read_sequence(gpu, 0).unwrap(),
                "{dtype:?} sequence {b}"
            );
        }
        let (k, v) = stored.into_iter().unzip();
        assert_one_token_decodes(gpu, &Filled { cache, k, v }, seed + 2);
    }
}

/// A cache of two sequences, one KV head of 32, over eight 16-token pages
/// (f32), the sequences holding `tables`; and its layout.
fn small_paged_cache(gpu: &Gpu, tables: [&[u32]; 2]) -> (KvCache, KvLayout) {
    let layout = KvLayout::Paged {
        page_size: 16,
        pages: 8,
    };
    let mut cache = KvCache::new(gpu, KvCacheConfig::new(2, 1, 32, layout)).unwrap();
    for (sequence, table) in tables.into_iter().enumerate() {
        cache.set_block_table(sequence, table).unwrap();
    }
    (cache, layout)
}

/// Ragged appends' own bad input: a count per sequence, rows that add up
/// to the counts, room in each sequence that appends, no write into a
/// shared page (a sequence that appends nothing may share its last page),
/// and the latent and V-pool forms on their own caches.
#[test]
fn bad_ragged_appends_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let (mut cache, layout) = small_paged_cache(gpu, [&[0, 2], &[1]]);
    let rows = |n| Tensor::zeros(gpu, TensorShape::new(1, n, 1, 32), DType::F32).unwrap();
    let append = |cache: &mut KvCache, counts: &[usize], n| {
        let t = rows(n);
        gpu.run(|e| cache.append_ragged(gpu, e, counts, &t, &t, None))
    };
    assert!(matches!(
        append(&mut cache, &[1], 1),
        Err(Error::DataLength {
            tensor: "append counts",
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        append(&mut cache, &[2, 3], 4),
        Err(Error::ShapeMismatch {
            left: 4,
            right: 5,
            ..
        })
    ));
    assert!(matches!(
        append(&mut cache, &[0, 17], 17),
        Err(Error::CacheCapacity {
            sequence: 1,
            needed: 17,
            capacity: 16
        })
    ));
    // Sequence 1 shares sequence 0's full page 0 and stops mid-page after
    // 5 tokens: sequence 0 appends into its own page 2 while sequence 1
    // sits out; sequence 1's own token would land in the shared page.
    append(&mut cache, &[16, 0], 16).unwrap();
    cache.set_block_table(1, &[0]).unwrap();
    cache.set_len(1, 5).unwrap();
    append(&mut cache, &[1, 0], 1).unwrap();
    // Counts that are all 0 record nothing, whatever the rows.
    append(&mut cache, &[0, 0], 1).unwrap();
    assert!(matches!(
        append(&mut cache, &[0, 1], 1),
        Err(Error::SharedPageWrite {
            sequence: 1,
            page: 0,
            other: 0
        })
    ));
    assert_eq!(cache.lens(), &[17, 5]);
    let latent = KvCacheConfig::new(2, 1, 32, layout).latent_values(16);
    let mut latent = KvCache::new(gpu, latent).unwrap();
    assert!(matches!(
        append(&mut latent, &[1, 0], 1),
        Err(Error::UnsupportedCombination { .. })
    ));
    let t = rows(1);
    assert!(matches!(
        gpu.run(|e| cache.append_latent_ragged(gpu, e, &[1, 0], &t, None)),
        Err(Error::UnsupportedCombination { .. })
    ));
}

/// A common prefix held by two sequences' block tables is read by both and
/// written by neither: decoding over it matches the reference, an append
/// that would write into it is refused, and a table may not repeat a page.
#[test]
fn shared_prefix_pages_are_read_only() {
    let Some(gpu) = gpu() else { return };
    let (page, head_dim) = (16, 32);
    let config = KvCacheConfig::new(
        2,
        1,
        head_dim,
        KvLayout::Paged {
            page_size: page,
            pages: 8,
        },
    );
    let mut cache = KvCache::new(gpu, config).unwrap();
    cache.set_block_table(0, &[0, 1]).unwrap();
    cache.set_block_table(1, &[2, 3]).unwrap();
    let mut rng = seeded(0x5eed_5a4e);
    let token = head_dim;
    let append = |cache: &mut KvCache, k: &[f32], v: &[f32], tokens| {
        let dims = TensorShape::new(2, tokens, 1, head_dim);
        let kt = Tensor::from_f32(gpu, dims, k).unwrap();
        let vt = Tensor::from_f32(gpu, dims, v).unwrap();
        gpu.run(|e| cache.append(gpu, e, &kt, &vt, None))
    };
    // Both sequences get 16 tokens; sequence 0's fill page 0.
    let (k1, v1) = (
        normal_vec(&mut rng, 2 * page * token, 1.0),
        normal_vec(&mut rng, 2 * page * token, 1.0),
    );
    append(&mut cache, &k1, &v1, page).unwrap();
    // Sequence 1 now shares sequence 0's first page as its prefix.
    cache.set_block_table(1, &[0, 4]).unwrap();
    // Appending the 17th token writes page 1 (sequence 0) and page 4
    // (sequence 1): neither is shared.
    let (k2, v2) = (
        normal_vec(&mut rng, 2 * token, 1.0),
        normal_vec(&mut rng, 2 * token, 1.0),
    );
    append(&mut cache, &k2, &v2, 1).unwrap();

    let q_host = normal_vec(&mut rng, 2 * 4 * head_dim, 1.0);
    let q = Tensor::from_f32(gpu, TensorShape::new(2, 1, 4, head_dim), &q_host).unwrap();
    let out = Tensor::filled(gpu, q.shape(), f32::NAN).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let attention = AttentionConfig::new().causal(true);
    gpu.run(|e| gpu.decode(e, &args, &attention)).unwrap();
    let got = out.to_f32_vec(gpu).unwrap();
    // Both sequences see sequence 0's 16 prefix tokens, then their own.
    let prefix = |x: &[f32]| x[..page * token].to_vec();
    for (b, own) in [(0usize, 0usize), (1, 1)] {
        let mut k = prefix(&k1);
        k.extend_from_slice(&k2[own * token..(own + 1) * token]);
        let mut v = prefix(&v1);
        v.extend_from_slice(&v2[own * token..(own + 1) * token]);
        let shape = AttentionShape {
            batch: 1,
            seq_q: 1,
            seq_kv: page + 1,
            heads_q: 4,
            heads_kv: 1,
            head_dim,
            head_dim_v: head_dim,
        };
        let qb = &q_host[b * 4 * head_dim..(b + 1) * 4 * head_dim];
        let want = reference::attention(&shape, qb, &k, &v, &attention).unwrap();
        let err = max_error(&got[b * 4 * head_dim..(b + 1) * 4 * head_dim], &want.out);
        assert!(err <= 1e-4, "sequence {b}: {err:e}");
    }

    // Truncating sequence 1 into the shared page makes its next append a
    // write into sequence 0's tokens: refused, nothing written.
    cache.set_len(1, 10).unwrap();
    let before = cache.read_sequence(gpu, 0).unwrap();
    assert!(matches!(
        append(&mut cache, &k2, &v2, 1),
        Err(Error::SharedPageWrite {
            sequence: 1,
            page: 0,
            other: 0
        })
    ));
    assert_eq!(cache.lens(), &[page + 1, 10]);
    assert_eq!(cache.read_sequence(gpu, 0).unwrap(), before);
    assert!(matches!(
        cache.set_block_table(1, &[4, 5, 4]),
        Err(Error::BlockTableRepeat {
            sequence: 1,
            page: 4,
            first: 0,
            second: 2
        })
    ));
}

/// K and V of every sequence of `cache` as stored, widened to f32.
fn stored_sequences(gpu: &Gpu, cache: &KvCache) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..cache.batch())
        .map(|b| cache.read_sequence(gpu, b).unwrap())
        .collect()
}

/// Two sequences over a paged pool of eight 16-token pages of `dtype`
/// (`HEADS_KV` heads of `head_dim`), `pages_per_buffer` pages a buffer:
/// sequence 0 holds pages 5 and 2, sequence 1 pages 1 and 3.
fn two_sequence_pool(gpu: &Gpu, dtype: KvDType, head_dim: usize, pages_per_buffer: u64) -> KvCache {
    let (page, pages) = (16, 8);
    let layout = KvLayout::Paged {
        page_size: page,
        pages,
    };
    let page_bytes = (page * HEADS_KV * dtype.vector_bytes(head_dim)) as u64;
    let config = KvCacheConfig::new(2, HEADS_KV, head_dim, layout)
        .dtype(dtype)
        .max_buffer_bytes(pages_per_buffer * page_bytes);
    let mut cache = KvCache::new(gpu, config).unwrap();
    assert_eq!(
        cache.segment_count() as u64,
        (pages as u64).div_ceil(pages_per_buffer)
    );
    assert_eq!(cache.page_bytes(), 2 * page_bytes);
    cache.set_block_table(0, &[5, 2]).unwrap();
    cache.set_block_table(1, &[1, 3]).unwrap();
    cache
}

/// Appends `tokens` random tokens to both sequences of `cache`; the
/// appended K and V, packed.
fn append_to_both(
    gpu: &Gpu,
    cache: &mut KvCache,
    tokens: usize,
    rng: &mut SeededRng,
) -> (Vec<f32>, Vec<f32>) {
    let shape = TensorShape::new(2, tokens, cache.heads_kv(), cache.head_dim());
    let k = normal_vec(rng, shape.elements(), 1.0);
    let v = normal_vec(rng, shape.elements(), 1.0);
    let (kt, vt) = (
        Tensor::from_f32(gpu, shape, &k).unwrap(),
        Tensor::from_f32(gpu, shape, &v).unwrap(),
    );
    gpu.run(|e| cache.append(gpu, e, &kt, &vt, None)).unwrap();
    (k, v)
}

/// Forking a sequence whose prompt ends mid-page (parallel sampling): the
/// fork shares the full pages and gets its own copy of the partial one
/// (`copy_pages` into a free page). Both then append different tokens,
/// each into its own page, and each decodes over the prompt and its own
/// token. Swapping two pages in one call exchanges their tokens (every
/// source is read before any destination is written). f32 and int8 (whose
/// scales travel with the page), the pool over three buffers.
#[test]
fn a_sequence_forked_mid_page_gets_its_own_copy_of_the_partial_page() {
    let Some(gpu) = gpu() else { return };
    let (page, head_dim, prompt) = (16, 64, 20);
    let token = HEADS_KV * head_dim;
    for (seed, dtype) in [(0xf0_4c, KvDType::F32), (0xf0_4d, KvDType::Int8)] {
        // Pages 0-2, 3-5 and 6-7 in three buffers: the copies cross them.
        let mut cache = two_sequence_pool(gpu, dtype, head_dim, 3);
        assert_eq!(cache.free_pages(), [0, 4, 6, 7]);
        let mut rng = seeded(seed);
        // Both sequences get a prompt; sequence 1's is then dropped for a
        // fork of sequence 0 (page 5 shared, page 2 copied to page 4).
        let (prompt_k, prompt_v) = append_to_both(gpu, &mut cache, prompt, &mut rng);
        gpu.run(|e| cache.copy_pages(gpu, e, &[(2, 4)])).unwrap();
        cache.set_block_table(1, &[5, 4]).unwrap();
        assert_eq!(cache.free_pages(), [0, 1, 3, 6, 7]);
        let forked = stored_sequences(gpu, &cache);
        assert_eq!(forked[1], forked[0], "{dtype:?}: the fork's prompt");
        let what = format!("{dtype:?} prompt");
        let parent = prompt * token;
        assert_stored_within(
            dtype,
            head_dim,
            [&forked[0].0, &prompt_k[..parent]],
            0.0,
            &what,
        );
        assert_stored_within(
            dtype,
            head_dim,
            [&forked[0].1, &prompt_v[..parent]],
            0.0,
            &what,
        );

        // Different next tokens: sequence 0's into page 2, the fork's into
        // page 4; the prompt stays as it was in both.
        let (new_k, new_v) = append_to_both(gpu, &mut cache, 1, &mut rng);
        let grown = stored_sequences(gpu, &cache);
        for (b, (k, v)) in grown.iter().enumerate() {
            assert_eq!(
                k[..parent],
                forked[0].0[..],
                "{dtype:?} sequence {b}: prompt K"
            );
            assert_eq!(
                v[..parent],
                forked[0].1[..],
                "{dtype:?} sequence {b}: prompt V"
            );
            let own = b * token..(b + 1) * token;
            let what = format!("{dtype:?} sequence {b}: its own token");
            assert_stored_within(
                dtype,
                head_dim,
                [&k[parent..], &new_k[own.clone()]],
                0.0,
                &what,
            );
            assert_stored_within(dtype, head_dim, [&v[parent..], &new_v[own]], 0.0, &what);
        }
        let (k, v) = grown.iter().cloned().unzip();
        let filled = Filled { cache, k, v };
        assert_one_token_decodes(gpu, &filled, seed + 2);

        // A swap: each sequence's last page now holds the other's tokens.
        let cache = filled.cache;
        gpu.run(|e| cache.copy_pages(gpu, e, &[(2, 4), (4, 2)]))
            .unwrap();
        let swapped = stored_sequences(gpu, &cache);
        for b in 0..2 {
            let tail = page * token..;
            assert_eq!(swapped[b].0[tail.clone()], grown[1 - b].0[tail.clone()]);
            assert_eq!(swapped[b].1[tail.clone()], grown[1 - b].1[tail]);
        }
    }
}

/// A preempted sequence swapped out to the host and back: `read_pages`
/// returns its pages' raw bytes, the pages are freed and overwritten, and
/// `write_pages` brings the bytes back into other pages, from which the
/// sequence reads and decodes exactly as before. f32 and int8, the pool
/// over two buffers.
#[test]
fn a_sequence_swapped_out_to_the_host_and_back_decodes_as_before() {
    let Some(gpu) = gpu() else { return };
    let (head_dim, len) = (64, 20);
    for (seed, dtype) in [(0x5a_a9, KvDType::F32), (0x5a_aa, KvDType::Int8)] {
        let mut cache = two_sequence_pool(gpu, dtype, head_dim, 4);
        append_to_both(gpu, &mut cache, len, &mut seeded(seed));
        let before = stored_sequences(gpu, &cache);

        let swapped = cache.read_pages(gpu, &[5, 2]).unwrap();
        assert_eq!(swapped.len() as u64, 2 * cache.page_bytes());
        cache.set_len(0, 0).unwrap();
        cache.set_block_table(0, &[]).unwrap();
        // The freed pages go to other work (here: sequence 1's tokens).
        gpu.run(|e| cache.copy_pages(gpu, e, &[(1, 5), (3, 2)]))
            .unwrap();
        gpu.run(|e| cache.write_pages(gpu, e, &[6, 7], &swapped))
            .unwrap();
        cache.set_block_table(0, &[6, 7]).unwrap();
        cache.set_len(0, len).unwrap();
        let after = stored_sequences(gpu, &cache);
        assert_eq!(after, before, "{dtype:?}: the sequences after the swap");
        assert_eq!(cache.read_pages(gpu, &[6, 7]).unwrap(), swapped);

        let (k, v) = after.into_iter().unzip();
        let filled = Filled { cache, k, v };
        assert_one_token_decodes(gpu, &filled, seed + 2);

        // Bad page lists and byte counts.
        let mut cache = filled.cache;
        cache.set_block_table(1, &[1, 3, 6]).unwrap();
        let write = |cache: &KvCache, pages: &[u32], bytes: &[u8]| {
            gpu.run(|e| cache.write_pages(gpu, e, pages, bytes))
        };
        let refused = write(&cache, &[0], &swapped);
        assert!(
            matches!(refused, Err(Error::DataLength { expected, got, .. })
                if expected as u64 == cache.page_bytes() && got == swapped.len()),
            "{refused:?}"
        );
        assert!(matches!(
            write(&cache, &[0, 8], &swapped),
            Err(Error::PagePastPool {
                index: 1,
                role: "destination",
                page: 8,
                ..
            })
        ));
        assert!(matches!(
            write(&cache, &[4, 4], &swapped),
            Err(Error::PageWrittenTwice {
                page: 4,
                first: 0,
                second: 1
            })
        ));
        assert!(matches!(
            write(&cache, &[0, 6], &swapped),
            Err(Error::SharedPageOverwrite {
                index: 1,
                page: 6,
                sequence: 0,
                other: 1
            })
        ));
        assert!(matches!(
            cache.read_pages(gpu, &[2, 9]),
            Err(Error::PagePastPool {
                index: 1,
                role: "source",
                page: 9,
                ..
            })
        ));
        assert_eq!(cache.read_pages(gpu, &[]).unwrap(), Vec::<u8>::new());
        write(&cache, &[], &[]).unwrap();
    }
}

/// A latent cache's pages are its keys alone (no V pool): `page_bytes`
/// counts K only, and a round trip through the host or a copy moves
/// every token (key and value prefix) of a page.
#[test]
fn a_latent_caches_pages_move_as_its_keys() {
    let Some(gpu) = gpu() else { return };
    let (page, head_dim, len) = (16, 64, 20);
    let layout = KvLayout::Paged {
        page_size: page,
        pages: 8,
    };
    let config = KvCacheConfig::new(1, 1, head_dim, layout).latent_values(32);
    let mut cache = KvCache::new(gpu, config).unwrap();
    assert_eq!(cache.page_bytes(), (page * head_dim * 4) as u64);
    cache.set_block_table(0, &[3, 6]).unwrap();
    let shape = TensorShape::new(1, len, 1, head_dim);
    let latent = normal_vec(&mut seeded(0x1a_7e), shape.elements(), 1.0);
    let latent = Tensor::from_f32(gpu, shape, &latent).unwrap();
    gpu.run(|e| cache.append_latent(gpu, e, &latent, None))
        .unwrap();
    let before = cache.read_sequence(gpu, 0).unwrap();
    let bytes = cache.read_pages(gpu, &[3, 6]).unwrap();
    gpu.run(|e| cache.write_pages(gpu, e, &[0, 1], &bytes))
        .unwrap();
    gpu.run(|e| cache.copy_pages(gpu, e, &[(6, 4)])).unwrap();
    for table in [[0, 1], [3, 4]] {
        cache.set_block_table(0, &table).unwrap();
        assert_eq!(
            cache.read_sequence(gpu, 0).unwrap(),
            before,
            "pages {table:?}"
        );
    }
}

/// Page copies that name pages past the pool, write one page twice or
/// write a page two sequences hold, need more scratch than one buffer
/// holds, or run over a caller's pool whose buffers cannot be copied into,
/// are typed errors; so are reads and writes of more bytes than a buffer
/// holds.
#[test]
fn bad_page_copies_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let (cache, _) = small_paged_cache(gpu, [&[5, 2], &[5, 4]]);
    let config = *cache.config();
    let copy = |cache: &KvCache, pairs: &[(u32, u32)]| gpu.run(|e| cache.copy_pages(gpu, e, pairs));
    assert!(matches!(
        copy(&cache, &[(0, 1), (8, 0)]),
        Err(Error::PagePastPool {
            index: 1,
            role: "source",
            page: 8,
            pool_pages: 8
        })
    ));
    assert!(matches!(
        copy(&cache, &[(0, 9)]),
        Err(Error::PagePastPool {
            index: 0,
            role: "destination",
            page: 9,
            pool_pages: 8
        })
    ));
    assert!(matches!(
        copy(&cache, &[(0, 6), (1, 7), (2, 6)]),
        Err(Error::PageWrittenTwice {
            page: 6,
            first: 0,
            second: 2
        })
    ));
    assert!(matches!(
        copy(&cache, &[(2, 5)]),
        Err(Error::SharedPageOverwrite {
            index: 0,
            page: 5,
            sequence: 0,
            other: 1
        })
    ));
    // A page both hold may be copied from, and nothing is copied twice.
    copy(&cache, &[(5, 6), (5, 7), (6, 0)]).unwrap();
    assert!(copy(&cache, &[]).is_ok());

    // A device whose buffers hold four pages (two of K and V): the copies'
    // scratch holds one page of K and V per pair.
    let page_bytes = 16 * 32 * 4;
    let Some(small) = common::gpu_with_limits("four-page buffers", |limits| {
        limits.max_buffer_size = 4 * page_bytes;
        limits.max_storage_buffer_binding_size = 4 * page_bytes;
    }) else {
        return;
    };
    let small_cache = KvCache::new(&small, config).unwrap();
    let copy_small = |pairs: &[(u32, u32)]| small.run(|e| small_cache.copy_pages(&small, e, pairs));
    copy_small(&[(0, 1), (0, 7)]).unwrap();
    // Three pairs need more than a buffer holds, as do a read and a write
    // of three pages.
    let three = vec![0; 3 * small_cache.page_bytes() as usize];
    let refusals = [
        copy_small(&[(0, 1), (0, 2), (0, 7)]),
        small_cache.read_pages(&small, &[0, 1, 2]).map(drop),
        small.run(|e| small_cache.write_pages(&small, e, &[0, 1, 2], &three)),
    ];
    for refused in refusals {
        assert!(
            matches!(
                refused,
                Err(Error::BufferTooLarge {
                    bytes: 12_288,
                    limit: 8192,
                    ..
                })
            ),
            "{refused:?}"
        );
    }

    // A caller's pool without COPY_DST (as the crate's own had before).
    let bytes = 8 * 16 * 32 * 4;
    let buffers = [(
        caller_pool_buffer(gpu, bytes),
        caller_pool_buffer(gpu, bytes),
    )];
    let caller = KvCache::from_buffers(gpu, config, &buffers).unwrap();
    let bytes = vec![0; caller.page_bytes() as usize];
    let written = gpu.run(|e| caller.write_pages(gpu, e, &[0], &bytes));
    for refused in [written, copy(&caller, &[(0, 1)])] {
        assert!(
            matches!(
                refused,
                Err(Error::BufferUsage {
                    tensor: "kv cache K",
                    needed: "COPY_DST",
                    ..
                })
            ),
            "{refused:?}"
        );
    }
}

/// Decodes one random query over a tiny cache with `options`: the plan
/// or the error.
fn tiny_decode(gpu: &Gpu, options: &DecodeOptions) -> Result<DecodePlan, Error> {
    tiny_decode_as(gpu, options, DType::F32, DType::F32)
}

/// [`tiny_decode`] with queries of `q_dtype` and an output of `out_dtype`.
fn tiny_decode_as(
    gpu: &Gpu,
    options: &DecodeOptions,
    q_dtype: DType,
    out_dtype: DType,
) -> Result<DecodePlan, Error> {
    let head_dim = 32;
    let config = KvCacheConfig::new(1, HEADS_KV, head_dim, KvLayout::Contiguous { capacity: 8 });
    let filled = fill(gpu, config, &[8], 1);
    let shape = TensorShape::new(1, 1, HEADS_Q, head_dim);
    let q = Tensor::from_f32_as(gpu, shape, &queries(1, 1, head_dim, 1), q_dtype).unwrap();
    let out = Tensor::filled_as(gpu, shape, 0.0, out_dtype).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &filled.cache,
        out: &out,
        lse: None,
    };
    gpu.run(|e| gpu.decode(e, &args, options.clone()))
}

/// Both lane layouts of the subgroup tier (lanes over keys, CPU adapters'
/// default; lanes over the head dim, GPUs') against the reference, for
/// every cache type, contiguous and paged over several buffers, with GQA,
/// causal and window masks, sinks, splits, and sequences of 0 and 1
/// tokens. Where the adapter has no subgroup tier, forcing a layout is a
/// typed error. A newcomer's run takes d=40, whose ten vec4s spread
/// unevenly over a subgroup's lanes; d=64's kernels compile for three times
/// as long on a cold lavapipe, and the exhaustive run takes both.
#[test]
fn both_lane_layouts_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let lens = [0, 1, 77, 700];
    let sinks = normal_vec(&mut seeded(0x1a2e), HEADS_Q, 1.5);
    let mut portable = DecodeOptions::new(&AttentionConfig::new().tier(Tier::Portable));
    portable.lanes = Some(DecodeLanes::Keys);
    let got = tiny_decode(gpu, &portable);
    assert!(
        matches!(got, Err(Error::UnsupportedCombination { .. })),
        "{got:?}"
    );
    let default_lanes = tiny_decode(gpu, &DecodeOptions::default()).unwrap().lanes();
    let Some(default_lanes) = default_lanes else {
        let got = tiny_decode(gpu, &DecodeOptions::default().lanes(DecodeLanes::Keys));
        assert!(
            matches!(
                got,
                Err(Error::TierUnavailable {
                    tier: Tier::SubgroupBroadcast,
                    ..
                })
            ),
            "{got:?}"
        );
        eprintln!(
            "skipped the layouts themselves: {} has no subgroup decode tier (forcing one is \
             TierUnavailable, checked)",
            gpu.info().summary()
        );
        return;
    };
    let cpu = gpu.info().adapter.device_type == wgpu::DeviceType::Cpu;
    assert_eq!(
        default_lanes == DecodeLanes::Keys,
        cpu,
        "the adapter's default lanes"
    );
    // Three query rows per sequence fill 12 of a GQA group's rows, so the
    // keys layout holds 16 rows per invocation: each cache type's kernel
    // then compiles for a minute or more on a cold lavapipe, so a
    // newcomer's run takes that case in f32 only (the head-dim layout, 1
    // and 2 rows: every type).
    let sixteen_rows = common::cases(
        "decode layouts with 3 query rows (cache type)",
        &[KvDType::F32],
        &KvDType::ALL,
    );
    let head_dims = common::cases("decode lane layouts (head dim)", &[40], &[40, 64]);
    let dtypes = common::kv_dtypes("decode lane layouts (cache type)");
    for (head_dim, dtype) in head_dims
        .into_iter()
        .flat_map(|d| dtypes.iter().map(move |&dtype| (d, dtype)))
    {
        let contiguous = KvLayout::Contiguous { capacity: 700 };
        // 16-token pages, five per buffer: one split's keys spread over
        // several dispatches.
        let paged = KvLayout::Paged {
            page_size: 16,
            pages: 4 * 44,
        };
        let buffer_bytes = (5 * 16 * HEADS_KV * dtype.vector_bytes(head_dim)) as u64;
        let layouts = [
            KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, contiguous),
            KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, paged)
                .max_buffer_bytes(buffer_bytes),
        ];
        for cache_config in layouts {
            let mut filled = fill(gpu, cache_config.dtype(dtype), &lens, 0x1a2e_0001);
            for b in 0..lens.len() {
                // Decoding reads what the cache stores.
                let (k, v) = filled.cache.read_sequence(gpu, b).unwrap();
                filled.k[b] = k;
                filled.v[b] = v;
            }
            let cases = [
                (1, None, AttentionConfig::new().causal(true)),
                (
                    3,
                    Some(3),
                    AttentionConfig::new().causal(true).sinks(sinks.clone()),
                ),
                (
                    2,
                    None,
                    AttentionConfig::new()
                        .window(Some(40), Some(0))
                        .softcap(15.0),
                ),
            ];
            for lanes in [
                DecodeLanes::Keys,
                DecodeLanes::HeadDim,
                DecodeLanes::KeyTiles,
            ] {
                for (seq_q, splits, config) in &cases {
                    let rows = seq_q * (HEADS_Q / HEADS_KV);
                    if rows > 8 && lanes == DecodeLanes::Keys && !sixteen_rows.contains(&dtype) {
                        continue;
                    }
                    let q = queries(lens.len(), *seq_q, head_dim, *seq_q as u64 + 7);
                    let mut options = DecodeOptions::new(config).lanes(lanes);
                    options.kv_splits = *splits;
                    // Progress with its time (shown by --nocapture): a
                    // case that compiles or runs for long names itself.
                    let started = std::time::Instant::now();
                    let (out_err, lse_err, plan) =
                        decode_errors(gpu, &filled, &q, *seq_q, &options);
                    eprintln!(
                        "{dtype:?} d={head_dim} {:?} {lanes:?} seq_q {seq_q}: {:.1} s",
                        cache_config.layout,
                        started.elapsed().as_secs_f64()
                    );
                    assert_eq!(plan.lanes(), Some(lanes));
                    assert!(
                        out_err <= 1e-4 && lse_err <= 1e-4,
                        "{dtype:?} d={head_dim} {:?}, {lanes:?}, seq_q {seq_q}, {config:?}: \
                         out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})",
                        cache_config.layout
                    );
                }
            }
        }
    }
}

/// A GQA group wider than one lanes-over-keys workgroup holds (32 rows at
/// d=128: eight tokens of this file's 4 query heads per KV head, as two
/// tokens of Llama-3.1-405B's 16): CPU adapters run it as workgroups over
/// keys of 8 rows each (16 where llvmpipe's LLVM is 19 or later: the
/// planner's wider tiles), each reading the cache, which must give the
/// reference's results for every row, with sinks, causal masks and
/// sequences of 0 and 1 tokens, in one split and in several.
#[test]
fn gqa_groups_split_into_row_tiles_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 128;
    let lens = [0, 1, 300];
    let seq_q = 8;
    let config = KvCacheConfig::new(
        lens.len(),
        HEADS_KV,
        head_dim,
        KvLayout::Contiguous { capacity: 300 },
    );
    let filled = fill(gpu, config, &lens, 0x405b);
    let q = queries(lens.len(), seq_q, head_dim, 0x405c);
    let sinks = normal_vec(&mut seeded(0x405d), HEADS_Q, 1.5);
    let cpu = gpu.info().adapter.device_type == wgpu::DeviceType::Cpu;
    for splits in [None, Some(3)] {
        let mut options =
            DecodeOptions::new(&AttentionConfig::new().causal(true).sinks(sinks.clone()));
        options.kv_splits = splits;
        let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, seq_q, &options);
        if cpu && plan.lanes().is_some() {
            assert_eq!(plan.lanes(), Some(DecodeLanes::Keys), "{plan:?}");
            let wide_tiles = gpu.info().llvm_major().is_some_and(|major| major >= 19);
            let want = if wide_tiles { (16, 2) } else { (8, 4) };
            assert_eq!((plan.rows_per_workgroup, plan.row_tiles), want, "{plan:?}");
        }
        assert!(
            out_err <= 1e-4 && lse_err <= 1e-4,
            "splits {splits:?}: out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
        );
    }
}

/// Queries and output in f16 or bf16 over every cache type: the kernel
/// writing the output itself (one split) and through f32 partial results
/// merged by the combine pass (three splits, several buffers), on the
/// adapter's default tier; within 1e-4 beyond the output's rounding. A
/// query and output of different types is a typed error. d=32 in a
/// newcomer's run: these decode kernels are nobody else's, and at d=64
/// they compile for three times as long on a cold lavapipe (99 s against
/// 35 s for the test); the exhaustive run takes both.
#[test]
fn half_queries_and_outputs_over_every_cache_type() {
    let Some(gpu) = gpu() else { return };
    let lens = [0, 1, 300];
    let sinks = normal_vec(&mut seeded(0x4a1f), HEADS_Q, 1.5);
    let head_dims = common::cases(
        "half queries over every cache type (head dim)",
        &[32],
        &[32, 64],
    );
    let dtypes = common::kv_dtypes("half queries over every cache type (cache type)");
    for (head_dim, cache_dtype) in head_dims
        .into_iter()
        .flat_map(|d| dtypes.iter().map(move |&dtype| (d, dtype)))
    {
        let contiguous = KvCacheConfig::new(
            lens.len(),
            HEADS_KV,
            head_dim,
            KvLayout::Contiguous { capacity: 300 },
        );
        let paged = KvLayout::Paged {
            page_size: 16,
            pages: 3 * 20,
        };
        let buffer_bytes = (8 * 16 * HEADS_KV * cache_dtype.vector_bytes(head_dim)) as u64;
        let spread = KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, paged)
            .max_buffer_bytes(buffer_bytes);
        // (cache, seq_q, forced splits, config, whether the decode kernel
        // writes the output itself)
        let cases = [
            (contiguous, 1, 1, AttentionConfig::new().causal(true), true),
            (
                spread,
                2,
                3,
                AttentionConfig::new().causal(true).sinks(sinks.clone()),
                false,
            ),
        ];
        for (cache_config, seq_q, splits, config, direct) in cases {
            let mut filled = fill(gpu, cache_config.dtype(cache_dtype), &lens, 0x4a1f_0001);
            for b in 0..lens.len() {
                let (k, v) = filled.cache.read_sequence(gpu, b).unwrap();
                filled.k[b] = k;
                filled.v[b] = v;
            }
            for dtype in [DType::F16, DType::BF16] {
                let q = queries(lens.len(), seq_q, head_dim, seq_q as u64 + 11);
                let mut options = DecodeOptions::new(&config);
                options.kv_splits = Some(splits);
                let (out_err, lse_err, plan) =
                    decode_errors_as(gpu, &filled, &q, seq_q, &options, dtype);
                assert_eq!(plan.slots == 1, direct, "{plan:?}");
                assert!(
                    out_err <= 1e-4 && lse_err <= 1e-4,
                    "{dtype:?} queries, {cache_dtype:?} cache, d={head_dim}, seq_q {seq_q}, \
                     {config:?}: out {out_err:.2e} beyond rounding, lse {lse_err:.2e} ({plan:?})"
                );
            }
        }
    }
    // Queries and output must share their type.
    let got = tiny_decode_as(gpu, &DecodeOptions::default(), DType::F16, DType::F32);
    assert!(
        matches!(
            got,
            Err(Error::DTypeUnsupported {
                tensor: "out",
                got: DType::F32,
                needed: DType::F16,
            })
        ),
        "{got:?}"
    );
}

/// Dropout is a training option: decoding refuses it with a typed error.
#[test]
fn dropout_is_a_typed_error() {
    let Some(gpu) = gpu() else { return };
    let options = DecodeOptions::new(&AttentionConfig::new().dropout(0.1, 1));
    let got = tiny_decode(gpu, &options);
    assert!(
        matches!(got, Err(Error::UnsupportedCombination { what }) if what.contains("dropout")),
        "{got:?}"
    );
}

/// A decode call whose decode plan would take more than 32 row tiles per
/// KV head (a prompt chunk prefilled over the cache) runs as the forward
/// kernels over a dense f32 copy of the cache (`DecodePlan::as_forward`):
/// every cache type, a paged cache with shuffled pages spread over two
/// buffers, sequences longer and shorter than the queries and an empty
/// one, causal with sinks and softcap, a window with ALiBi; results
/// against the reference over the stored values. 32 row tiles, forced
/// lanes and f16 queries keep the decode kernel, and so do 16-bit and int8
/// caches on CPU adapters outside GL (their copies run on GL and GPUs).
/// The decode kernel's rows per workgroup here (`head_dim`, an f32
/// cache) and the query tokens of 33 such row tiles of a GQA group: a
/// call with that many takes the forward route where the route is open.
fn forward_route_tokens(gpu: &Gpu, head_dim: usize) -> (usize, usize) {
    let plain = DecodeOptions::new(&AttentionConfig::new());
    let probe = CacheShape {
        batch: 1,
        heads_kv: HEADS_KV,
        head_dim,
        head_dim_v: head_dim,
        longest: 1000,
        segments: 1,
        dtype: KvDType::F32,
    };
    let tile = DecodePlan::for_call(gpu.info(), &probe, 1024, HEADS_Q, &plain)
        .unwrap()
        .rows_per_workgroup as usize;
    (tile, (33 * tile).div_ceil(HEADS_Q / HEADS_KV))
}

/// A `dtype` cache of `lens` in 16-token pages, its pool over two buffers,
/// filled from `seed`, with the host copy of what it stores (the values
/// the reference must see).
fn stored_over_two_buffers(
    gpu: &Gpu,
    dtype: KvDType,
    head_dim: usize,
    lens: &[usize],
    seed: u64,
) -> Filled {
    let page_size = 16;
    let pages = lens.len() * lens.iter().max().unwrap().div_ceil(page_size);
    let layout = KvLayout::Paged { page_size, pages };
    let page_bytes = (page_size * HEADS_KV * dtype.vector_bytes(head_dim)) as u64;
    let config = KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, layout)
        .dtype(dtype)
        .max_buffer_bytes(page_bytes * pages.div_ceil(2) as u64);
    let mut filled = fill(gpu, config, lens, seed);
    assert_eq!(filled.cache.segment_count(), 2, "{dtype:?}");
    for b in 0..lens.len() {
        let (k, v) = filled.cache.read_sequence(gpu, b).unwrap();
        filled.k[b] = k;
        filled.v[b] = v;
    }
    filled
}

#[test]
fn many_query_rows_run_as_the_forward_kernels_over_every_cache_type() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let group = HEADS_Q / HEADS_KV;
    let info = gpu.info();
    let plain = DecodeOptions::new(&AttentionConfig::new());
    let (tile, seq_q) = forward_route_tokens(gpu, head_dim);
    let lens = [seq_q + 170, seq_q, 40, 0];
    let sinks = normal_vec(&mut seeded(0xf0a5), HEADS_Q, 1.0);
    let configs = [
        (
            "causal, sinks, softcap",
            AttentionConfig::new()
                .causal(true)
                .sinks(sinks)
                .softcap(15.0),
        ),
        (
            "window (50, 0), ALiBi",
            AttentionConfig::new()
                .window(Some(50), Some(0))
                .alibi(Alibi::PerHead(Alibi::standard_slopes(HEADS_Q))),
        ),
    ];
    let cpu_outside_gl = common::cpu_outside_gl(gpu);
    for dtype in common::kv_dtypes("the forward route (cache type)") {
        // CPU adapters copy 16-bit caches only in row tiles of at most 8
        // rows, int8 and fp8 ones never (src/plan/decode_as_forward.rs).
        let routes = match dtype {
            KvDType::F32 => true,
            KvDType::Int8 | KvDType::Fp8 => !cpu_outside_gl,
            _ => !cpu_outside_gl || tile <= 8,
        };
        let filled = stored_over_two_buffers(gpu, dtype, head_dim, &lens, 0xf0a5_0001);
        for (i, (name, attention)) in configs.iter().enumerate() {
            let q = queries(lens.len(), seq_q, head_dim, 0xf0a5_0010 + i as u64);
            let options = DecodeOptions::new(attention);
            let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, seq_q, &options);
            assert_eq!(
                plan.as_forward.is_some(),
                routes,
                "{dtype:?}, {name}: whether {seq_q} tokens ({tile}-row tiles) decode as the \
                 forward kernels ({plan:?})"
            );
            assert!(
                out_err <= 1e-4 && lse_err <= 1e-4,
                "{dtype:?}, {name}: out error {out_err:.2e}, lse error {lse_err:.2e}"
            );
        }
        // Where the decode kernel keeps the call (planned only).
        let shape = filled.cache.plan_shape();
        let as_forward = |seq_q, q_dtype, options: &DecodeOptions| {
            DecodePlan::as_forward(info, &shape, seq_q, HEADS_Q, q_dtype, options).is_some()
        };
        assert_eq!(as_forward(seq_q, DType::F32, &plain), routes, "{dtype:?}");
        let tiles_32 = 32 * tile / group;
        assert!(!as_forward(tiles_32, DType::F32, &plain), "32 row tiles");
        assert!(!as_forward(seq_q, DType::F16, &plain), "f16 queries");
        let forced = plain.clone().lanes(DecodeLanes::HeadDim);
        assert!(!as_forward(seq_q, DType::F32, &forced), "forced lanes");
    }
}

/// `config` as sequence `b` of the call sees it alone: ALiBi slopes per
/// batch entry become that entry's slopes per head.
fn config_of_sequence(config: &AttentionConfig, b: usize) -> AttentionConfig {
    let mut own = config.clone();
    if let Some(Alibi::PerBatchHead(slopes)) = &config.alibi {
        own.alibi = Some(Alibi::PerHead(
            slopes[b * HEADS_Q..(b + 1) * HEADS_Q].to_vec(),
        ));
    }
    own
}

/// A ragged decode of `q` (packed, `counts[b]` tokens of sequence `b`)
/// stored as `dtype`, and the largest errors of output and logsumexp
/// against the reference run sequence by sequence (rounding to `dtype`
/// excepted, as in [`decode_errors_as`]). Rows are NaN-filled first, so
/// a row the call does not write fails. Token trees in `options` mask the
/// reference by their dense masks.
fn ragged_decode_errors(
    gpu: &Gpu,
    filled: &Filled,
    counts: &[usize],
    q: &[f32],
    options: &DecodeOptions,
    dtype: DType,
) -> (f64, f64, DecodePlan) {
    let cache = &filled.cache;
    let head_dim = cache.head_dim();
    let total: usize = counts.iter().sum();
    let q_shape = TensorShape::new(1, total, HEADS_Q, head_dim);
    let q: Vec<f32> = q.iter().map(|&x| round_to(dtype, x)).collect();
    let q_t = Tensor::from_f32_as(gpu, q_shape, &q, dtype).unwrap();
    let out = Tensor::filled_as(gpu, q_shape, f32::NAN, dtype).unwrap();
    let lse = Lse::new(gpu, 1, HEADS_Q, total).unwrap();
    let args = DecodeArgs {
        q: &q_t,
        cache,
        out: &out,
        lse: Some(&lse),
    };
    let plan = gpu
        .run(|e| gpu.decode_ragged(e, &args, counts, options.clone()))
        .unwrap()
        .expect("a call with query tokens records its work");
    let got = out.to_f32_vec(gpu).unwrap();
    let got_lse = lse.to_vec(gpu).unwrap();
    let row = HEADS_Q * head_dim;
    let (mut out_err, mut lse_err) = (0.0f64, 0.0f64);
    let mut first = 0;
    for (b, (&count, &len)) in counts.iter().zip(cache.lens()).enumerate() {
        if count == 0 {
            continue;
        }
        assert!(
            len > 0,
            "the test gives query tokens to sequences with keys"
        );
        let shape = AttentionShape {
            batch: 1,
            seq_q: count,
            seq_kv: len,
            heads_q: HEADS_Q,
            heads_kv: cache.heads_kv(),
            head_dim,
            head_dim_v: head_dim,
        };
        let config = config_of_sequence(&options.config, b);
        let rows = first * row..(first + count) * row;
        let (q, k, v) = (&q[rows.clone()], &filled.k[b], &filled.v[b]);
        // A token tree is the dense mask it means, as the forward takes it.
        let want = match &options.token_trees {
            Some(trees) => {
                let mask = trees[b].dense_mask(len);
                let mask = reference::HostMask::Bool {
                    dims: [1, 1, count, len],
                    values: &mask,
                };
                reference::attention_masked(&shape, q, k, v, &config, &mask)
            }
            None => reference::attention(&shape, q, k, v, &config),
        }
        .unwrap();
        for (i, (g, w)) in got[rows].iter().zip(&want.out).enumerate() {
            assert!(!g.is_nan(), "sequence {b}: NaN at {i} of its rows");
            out_err = out_err.max((f64::from(*g) - w).abs() - unit_roundoff(dtype) * w.abs());
        }
        // Packed logsumexp [1, heads_q, total]; the reference's is
        // [1, heads_q, count].
        for h in 0..HEADS_Q {
            for t in 0..count {
                let g = f64::from(got_lse[h * total + first + t]);
                let w = want.lse[h * count + t];
                assert!(!g.is_nan(), "sequence {b}: lse NaN at head {h}, token {t}");
                lse_err = lse_err.max((g - w).abs());
            }
        }
        first += count;
    }
    (out_err, lse_err, plan)
}

#[test]
fn ragged_query_counts_match_each_sequence_alone() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let group = HEADS_Q / HEADS_KV;
    // A prompt chunk of 33 of the decode kernel's row tiles: enough to run
    // as the forward kernels where the route is open.
    let (_, chunk) = forward_route_tokens(gpu, head_dim);
    // A sequence decoding one token, one sitting out, one verifying five
    // draft tokens, an empty one sitting out, and one whose prompt arrives
    // in chunks: its second chunk (all its keys but the first chunk's
    // count are cached), alone or beside the others (where a forward route
    // splits the call: the chunk as the forward, the rest on the decode
    // kernel), or a short one that keeps the whole call on the kernel.
    let lens = [300, 41, 130, 0, 2 * chunk + 9];
    let kernel_counts = [1, 0, 5, 0, 16];
    let split_counts = [1, 0, 5, 0, chunk];
    let chunk_alone = [0, 0, 0, 0, chunk];
    let slopes = normal_vec(&mut seeded(0x7a66), lens.len() * HEADS_Q, 0.1);
    let sinks = normal_vec(&mut seeded(0x7a67), HEADS_Q, 1.0);
    let configs = [
        (
            "causal, sinks, softcap",
            AttentionConfig::new()
                .causal(true)
                .sinks(sinks)
                .softcap(15.0),
        ),
        (
            "window (20, 0), ALiBi per batch entry",
            AttentionConfig::new()
                .window(Some(20), Some(0))
                .alibi(Alibi::PerBatchHead(slopes)),
        ),
        ("plain", AttentionConfig::new()),
    ];
    let cpu_outside_gl = common::cpu_outside_gl(gpu);
    for (dtype, seed) in [(KvDType::F32, 0x7a60), (KvDType::Int8, 0x7a61)] {
        let filled = stored_over_two_buffers(gpu, dtype, head_dim, &lens, seed);
        for (i, (name, attention)) in configs.iter().enumerate() {
            let per_batch_slopes = matches!(attention.alibi, Some(Alibi::PerBatchHead(_)));
            let calls = [
                (kernel_counts, "kernel"),
                (split_counts, "split"),
                (chunk_alone, "forward"),
            ];
            for (counts, route) in calls {
                let total: usize = counts.iter().sum();
                let q = normal_vec(
                    &mut seeded(seed + 16 * i as u64),
                    total * HEADS_Q * head_dim,
                    1.0,
                );
                let mut options = DecodeOptions::new(attention);
                if route == "kernel" && i == 2 {
                    // Forced splits: the merge of a ragged call's partials.
                    options = options.kv_splits(3);
                }
                let (out_err, lse_err, plan) =
                    ragged_decode_errors(gpu, &filled, &counts, &q, &options, DType::F32);
                let as_forward = route != "kernel"
                    && !per_batch_slopes
                    && (dtype == KvDType::F32 || !cpu_outside_gl);
                assert_eq!(
                    plan.as_forward.is_some(),
                    as_forward,
                    "{dtype:?}, {name}, counts {counts:?}: the route ({plan:?})"
                );
                if as_forward && route == "split" {
                    // The plan returned is the decode kernel's for the
                    // short sequences: row tiles for five tokens.
                    let tiles = (5 * group).div_ceil(plan.rows_per_workgroup as usize);
                    assert_eq!(
                        plan.row_tiles as usize, tiles,
                        "{dtype:?}, {name}: {plan:?}"
                    );
                }
                assert!(
                    out_err <= 1e-4 && lse_err <= 1e-4,
                    "{dtype:?}, {name}, counts {counts:?}: out error {out_err:.2e}, \
                     lse error {lse_err:.2e} ({plan:?})"
                );
            }
        }
        // Half queries and outputs on the kernel's route.
        let total: usize = kernel_counts.iter().sum();
        let q = normal_vec(&mut seeded(seed + 99), total * HEADS_Q * head_dim, 1.0);
        let options = DecodeOptions::new(&configs[0].1);
        let (out_err, lse_err, plan) =
            ragged_decode_errors(gpu, &filled, &kernel_counts, &q, &options, DType::F16);
        assert!(
            out_err <= 1e-4 && lse_err <= 1e-4,
            "{dtype:?}, f16 queries: out error {out_err:.2e}, lse error {lse_err:.2e} ({plan:?})"
        );
    }
}

/// Speculative decoding's token trees (`DecodeOptions::token_trees`): each
/// draft token sees the keys before its sequence's draft, its ancestors
/// and itself, as the reference with the tree's dense mask says, on the
/// portable tier and every lane layout of the subgroup tier the adapter
/// has. Causal with sinks over three splits, and a window with softcap;
/// a paged cache over two buffers; a sequence sitting out; a tree of 70
/// tokens (three words a row, and more query rows than would keep the
/// decode kernel without a tree: trees keep it); f32 everywhere, int8 on
/// the default layout (exhaustive runs). A tree of another size than its sequence's query
/// tokens, or one per sequence missing, is a typed error.
#[test]
fn token_trees_hide_the_other_branches() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let lens = [300, 41, 130, 90];
    let counts = [4, 0, 7, 70];
    let trees = vec![
        // 0 <- 1 <- 3 and 0 <- 2: token 3 sees 0, 1 and itself, not 2.
        TokenTree::from_parents(&[None, Some(0), Some(0), Some(1)]).unwrap(),
        TokenTree::chain(0),
        // Two roots.
        TokenTree::from_parents(&[None, None, Some(0), Some(1), Some(2), Some(2), Some(3)])
            .unwrap(),
        random_token_tree(&mut seeded(0x7ee0), 70),
    ];
    let sinks = normal_vec(&mut seeded(0x7ee1), HEADS_Q, 1.0);
    let configs = [
        (
            "causal, sinks, 3 splits",
            AttentionConfig::new().causal(true).sinks(sinks),
            Some(3),
        ),
        (
            "window (50, 0), softcap",
            AttentionConfig::new()
                .window(Some(50), Some(0))
                .softcap(15.0),
            None,
        ),
    ];
    let default_lanes = tiny_decode(gpu, &DecodeOptions::default()).unwrap().lanes();
    let mut layouts = vec![(Some(Tier::Portable), None)];
    if default_lanes.is_some() {
        layouts.extend(
            [
                DecodeLanes::Keys,
                DecodeLanes::HeadDim,
                DecodeLanes::KeyTiles,
            ]
            .map(|lanes| (None, Some(lanes))),
        );
    } else {
        eprintln!(
            "SKIPPED: the subgroup tier's lane layouts with token trees: {} has no subgroup \
             decode tier (the portable tier runs them)",
            gpu.info().summary()
        );
    }
    let total: usize = counts.iter().sum();
    // An int8 cache's 16-row keys kernel compiles for over a minute on a
    // cold lavapipe: a newcomer's run takes f32 only.
    let dtypes = common::cases(
        "token trees (cache type)",
        &[(KvDType::F32, 0x7ee2)],
        &[(KvDType::F32, 0x7ee2), (KvDType::Int8, 0x7ee3)],
    );
    for (dtype, seed) in dtypes {
        let filled = stored_over_two_buffers(gpu, dtype, head_dim, &lens, seed);
        for &(tier, lanes) in &layouts {
            // int8 on the adapter's default layout only (the portable
            // tier where there is no subgroup tier): the rest is the same
            // code over another cache read, which other tests cover.
            if dtype == KvDType::Int8 && lanes != default_lanes {
                continue;
            }
            for (i, (name, attention, splits)) in configs.iter().enumerate() {
                let mut config = attention.clone();
                config.tier = tier;
                let mut options = DecodeOptions::new(&config).token_trees(trees.clone());
                options.lanes = lanes;
                options.kv_splits = *splits;
                let q = normal_vec(
                    &mut seeded(seed + 16 * i as u64),
                    total * HEADS_Q * head_dim,
                    1.0,
                );
                let started = std::time::Instant::now();
                let (out_err, lse_err, plan) =
                    ragged_decode_errors(gpu, &filled, &counts, &q, &options, DType::F32);
                eprintln!(
                    "{dtype:?} {tier:?} {lanes:?}, {name}: {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                assert!(
                    plan.as_forward.is_none(),
                    "trees keep the decode kernel: {plan:?}"
                );
                assert!(
                    plan.kernel_label().contains("TREE_MASK"),
                    "{}",
                    plan.kernel_label()
                );
                assert!(
                    out_err <= 1e-4 && lse_err <= 1e-4,
                    "{dtype:?} {tier:?} {lanes:?}, {name}: out error {out_err:.2e}, lse error \
                     {lse_err:.2e} ({plan:?})"
                );
            }
        }
    }

    // Bad trees: one per sequence, each the size of its query tokens.
    let filled = stored_over_two_buffers(gpu, KvDType::F32, head_dim, &lens, 0x7ee4);
    let q = Tensor::zeros(
        gpu,
        TensorShape::new(1, total, HEADS_Q, head_dim),
        DType::F32,
    )
    .unwrap();
    let out = Tensor::zeros(
        gpu,
        TensorShape::new(1, total, HEADS_Q, head_dim),
        DType::F32,
    )
    .unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &filled.cache,
        out: &out,
        lse: None,
    };
    let decode = |trees: Vec<TokenTree>| {
        let options = DecodeOptions::new(&AttentionConfig::new().causal(true)).token_trees(trees);
        gpu.run(|e| gpu.decode_ragged(e, &args, &counts, options))
    };
    let got = decode(trees[..3].to_vec());
    assert!(
        matches!(
            got,
            Err(Error::DataLength {
                expected: 4,
                got: 3,
                ..
            })
        ),
        "{got:?}"
    );
    let mut wrong = trees.clone();
    wrong[2] = TokenTree::chain(6);
    let got = decode(wrong);
    assert!(
        matches!(
            got,
            Err(Error::TokenTreeSize {
                sequence: 2,
                tokens: 6,
                query_tokens: 7
            })
        ),
        "{got:?}"
    );
}

/// A whole speculative step with a token tree, as a server runs it (README,
/// "Decoding with a KV cache"): the draft's queries and keys rotated at
/// their depths (`Gpu::rope` over a view of the tokens as one-token
/// sequences), the keys appended unrotated, the step decoded with the
/// tree (`Gpu::decode`); then an accepted path kept
/// (`KvCache::keep_draft`) and the next token decoded after it. Rotations
/// against the CPU's RoPE, attention against the reference.
#[test]
fn a_speculative_tree_step_rotates_decodes_and_keeps_its_path() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let prefix = 50;
    // 0 <- 1 <- 3 <- 5 and 0 <- 2 <- 4: the path 0, 1, 3, 5 is accepted.
    let tree =
        TokenTree::from_parents(&[None, Some(0), Some(0), Some(1), Some(2), Some(3)]).unwrap();
    let path = [0, 1, 3, 5];
    let depths = tree.depths();
    assert_eq!(
        path.map(|t| depths[t]),
        [0, 1, 2, 3],
        "a path lies at consecutive positions"
    );
    let n = tree.len();
    let config = KvCacheConfig::new(
        1,
        HEADS_KV,
        head_dim,
        KvLayout::Paged {
            page_size: 16,
            pages: 8,
        },
    );
    let mut filled = fill(gpu, config, &[prefix], 0x5bec);
    let rope = Rope::new(RopeStyle::HalfSplit);
    let positions: Vec<u32> = depths.iter().map(|&d| (prefix + d) as u32).collect();
    let mut rng = seeded(0x5bed);
    let mut draft = |heads: usize| {
        let shape = TensorShape::new(1, n, heads, head_dim);
        let host = normal_vec(&mut rng, shape.elements(), 1.0);
        (Tensor::from_f32(gpu, shape, &host).unwrap(), host)
    };
    let ((q, q_host), (k, k_host), (v, _)) = (draft(HEADS_Q), draft(HEADS_KV), draft(HEADS_KV));
    // The n tokens as n one-token sequences, each at its own position.
    let per_token = |t: &Tensor, heads: usize| {
        let token = heads * head_dim;
        let strides = Strides {
            batch: token,
            seq: token,
            head: head_dim,
        };
        t.view(TensorShape::new(n, 1, heads, head_dim), strides, 0)
            .unwrap()
    };
    gpu.run(|e| {
        gpu.rope(e, &per_token(&q, HEADS_Q), &rope, &positions)?;
        gpu.rope(e, &per_token(&k, HEADS_KV), &rope, &positions)?;
        filled.cache.append(gpu, e, &k, &v, None)
    })
    .unwrap();
    let first_positions: Vec<u64> = positions.iter().map(|&p| u64::from(p)).collect();
    let rotated = |host: &[f32], heads: usize| {
        let shape = TensorShape::new(n, 1, heads, head_dim);
        reference::rope(&rope, shape, host, &first_positions).unwrap()
    };
    let q_rotated = q.to_f32_vec(gpu).unwrap();
    let (cached_k, cached_v) = filled.cache.read_sequence(gpu, 0).unwrap();
    let draft_k = &cached_k[prefix * HEADS_KV * head_dim..];
    for (got, want, what) in [
        (&q_rotated[..], rotated(&q_host, HEADS_Q), "queries"),
        (draft_k, rotated(&k_host, HEADS_KV), "keys"),
    ] {
        let err = max_error(got, &want);
        assert!(
            err <= ROPE_BOUND,
            "{what} rotated at their depths: {err:.2e}"
        );
    }
    filled.k[0] = cached_k;
    filled.v[0] = cached_v;
    let causal = AttentionConfig::new().causal(true);
    let options = DecodeOptions::new(&causal).token_trees(vec![tree]);
    let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q_rotated, n, &options);
    assert!(
        out_err <= 1e-4 && lse_err <= 1e-4,
        "the tree step: out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
    );

    gpu.run(|e| filled.cache.keep_draft(gpu, e, 0, n, &path))
        .unwrap();
    assert_eq!(filled.cache.lens(), [prefix + path.len()]);
    let (k_kept, v_kept) = filled.cache.read_sequence(gpu, 0).unwrap();
    let token = HEADS_KV * head_dim;
    let kept_rows = |data: &[f32]| kept_draft_rows(data, prefix, &path, token);
    assert!(k_kept == kept_rows(&filled.k[0]), "the kept path's keys");
    assert!(v_kept == kept_rows(&filled.v[0]), "the kept path's values");
    // The next token, after the path.
    let (k_next, v_next) = append_random_tokens(gpu, &mut filled.cache, 1, 0x5bee);
    filled.k[0] = [k_kept, k_next].concat();
    filled.v[0] = [v_kept, v_next].concat();
    assert_one_token_decodes(gpu, &filled, 0x5bef);
}

/// What `KvCache::keep_draft` leaves of a sequence's rows `data` (`width`
/// values a token) whose draft starts at `first`: the tokens before it,
/// then the `kept` draft tokens.
fn kept_draft_rows(data: &[f32], first: usize, kept: &[usize], width: usize) -> Vec<f32> {
    (0..first)
        .chain(kept.iter().map(|&t| first + t))
        .flat_map(|t| data[t * width..(t + 1) * width].to_vec())
        .collect()
}

/// The end of a speculative step (`KvCache::keep_draft`): the accepted
/// draft tokens move to the first draft positions, whole (every KV head,
/// int8 scales included), across pages and cache buffers; the length
/// drops the rest, and the other sequence is untouched; over a paged
/// cache in two buffers and a contiguous one, f32 and int8. Bad input is a
/// typed error that changes nothing.
#[test]
fn keeping_an_accepted_draft_path_moves_its_tokens_whole() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 32;
    let lens = [100, 60];
    // Sequence 0's draft is positions 60..100: three 16-token pages and
    // part of a fourth, some in each buffer.
    let (draft, first) = (40, 60);
    let kept = [0, 3, 17, 18, 39];
    let token = HEADS_KV * head_dim;
    for dtype in [KvDType::F32, KvDType::Int8] {
        let paged = stored_over_two_buffers(gpu, dtype, head_dim, &lens, 0xd4af);
        let contiguous = KvCacheConfig::new(
            2,
            HEADS_KV,
            head_dim,
            KvLayout::Contiguous { capacity: 100 },
        )
        .dtype(dtype);
        let contiguous = fill(gpu, contiguous, &lens, 0xd4b0);
        for mut filled in [paged, contiguous] {
            let layout = filled.cache.config().layout;
            let before: Vec<_> = (0..2)
                .map(|b| filled.cache.read_sequence(gpu, b).unwrap())
                .collect();
            gpu.run(|e| filled.cache.keep_draft(gpu, e, 0, draft, &kept))
                .unwrap();
            assert_eq!(
                filled.cache.lens(),
                [first + kept.len(), 60],
                "{dtype:?} {layout:?}"
            );
            let want = |data: &[f32]| kept_draft_rows(data, first, &kept, token);
            let (k, v) = filled.cache.read_sequence(gpu, 0).unwrap();
            assert!(k == want(&before[0].0), "{dtype:?} {layout:?}: keys");
            assert!(v == want(&before[0].1), "{dtype:?} {layout:?}: values");
            assert!(
                filled.cache.read_sequence(gpu, 1).unwrap() == before[1],
                "{dtype:?} {layout:?}: the other sequence"
            );
        }
    }

    let mut cache = stored_over_two_buffers(gpu, KvDType::F32, head_dim, &lens, 0xd4b1).cache;
    let keep = |cache: &mut KvCache, sequence, draft, kept: &[usize]| {
        let got = gpu.run(|e| cache.keep_draft(gpu, e, sequence, draft, kept));
        assert_eq!(cache.lens(), lens, "a refused call changes nothing");
        got
    };
    let got = keep(&mut cache, 2, 1, &[0]);
    assert!(
        matches!(
            got,
            Err(Error::CacheSequence {
                sequence: 2,
                batch: 2
            })
        ),
        "{got:?}"
    );
    let got = keep(&mut cache, 1, 61, &[0]);
    assert!(
        matches!(
            got,
            Err(Error::DraftPastSequence {
                sequence: 1,
                draft: 61,
                len: 60
            })
        ),
        "{got:?}"
    );
    let got = keep(&mut cache, 0, draft, &[3, 3]);
    assert!(
        matches!(
            got,
            Err(Error::DraftKept {
                index: 1,
                token: 3,
                draft: 40
            })
        ),
        "{got:?}"
    );
    let got = keep(&mut cache, 0, draft, &[1, 40]);
    assert!(
        matches!(
            got,
            Err(Error::DraftKept {
                index: 1,
                token: 40,
                draft: 40
            })
        ),
        "{got:?}"
    );
    // Sequence 1 shares the page of sequence 0's position 61, where draft
    // token 3 would move: shared pages are read-only.
    let mut table = cache.block_table(1).unwrap().to_vec();
    table[3] = cache.block_table(0).unwrap()[61 / 16];
    cache.set_block_table(1, &table).unwrap();
    let got = keep(&mut cache, 0, draft, &[0, 3]);
    assert!(
        matches!(got, Err(Error::SharedPageOverwrite { .. })),
        "{got:?}"
    );
}

/// Ragged decodes' own bad input: a count per sequence, query rows that add
/// up to the counts in one packed batch entry, an output and logsumexp
/// shaped like them; counts that are all 0 record nothing.
/// A sliding window's pages behind it are released: they join the free
/// pages, the table keeps its positions, and decoding with the window
/// (one token, a few, and as many rows as take the forward route, whose
/// copy holds zeros there) matches the reference over every key, which
/// the window hides anyway. A window reaching into them, appends, draft
/// moves and releases past the length are typed errors; a table read
/// back goes back in as it is; the other sequence is untouched.
#[test]
fn pages_released_behind_a_window_decode_as_before() {
    let Some(gpu) = gpu() else { return };
    let head_dim = 64;
    let (_, route_tokens) = forward_route_tokens(gpu, head_dim);
    let window = 100;
    let lens = [route_tokens + 300, 200];
    let layout = KvLayout::Paged {
        page_size: 16,
        pages: 2 * (lens[0] + 1).div_ceil(16),
    };
    let config = KvCacheConfig::new(lens.len(), HEADS_KV, head_dim, layout);
    let mut filled = fill(gpu, config, &lens, 0x7e1e_a5e0);
    let table = filled.cache.block_table(0).unwrap().to_vec();
    let free_before = filled.cache.free_pages();
    let options = DecodeOptions::new(
        &AttentionConfig::new()
            .causal(true)
            .window(Some(window as i64), Some(0)),
    );
    // The first query of the longest step sees back to this position.
    let first_visible = lens[0] - route_tokens - window;
    let released = filled.cache.release_pages_before(0, first_visible).unwrap();
    let released_end = first_visible / 16 * 16;
    assert_eq!(released, table[..first_visible / 16], "released pages");
    let mut free_after = free_before.clone();
    free_after.extend(&released);
    free_after.sort_unstable();
    assert_eq!(filled.cache.free_pages(), free_after);
    assert_eq!(
        filled.cache.release_pages_before(0, first_visible).unwrap(),
        [],
        "released twice"
    );
    let (k, v) = filled.cache.read_sequence(gpu, 0).unwrap();
    let token = HEADS_KV * head_dim;
    assert!(k[..released_end * token].iter().all(|&x| x == 0.0));
    assert!(v[..released_end * token].iter().all(|&x| x == 0.0));
    assert_eq!(
        k[released_end * token..],
        filled.k[0][released_end * token..]
    );
    assert_eq!(
        v[released_end * token..],
        filled.v[0][released_end * token..]
    );

    for seq_q in [1, 3, route_tokens] {
        let q = queries(lens.len(), seq_q, head_dim, 0x7e1e_a5e1 + seq_q as u64);
        let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, seq_q, &options);
        assert!(
            out_err <= 1e-4 && lse_err <= 1e-4,
            "{seq_q} query tokens: out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
        );
        assert_eq!(plan.as_forward.is_some(), seq_q == route_tokens, "{plan:?}");
    }

    // Refused: a window reaching into the released pages, or none.
    let q_shape = TensorShape::new(lens.len(), 1, HEADS_Q, head_dim);
    let q = Tensor::from_f32(gpu, q_shape, &queries(lens.len(), 1, head_dim, 3)).unwrap();
    let out = Tensor::zeros(gpu, q_shape, DType::F32).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &filled.cache,
        out: &out,
        lse: None,
    };
    let reaching = lens[0] - 1 - (released_end - 1);
    for (left, first_visible) in [(Some(reaching as i64), released_end - 1), (None, 0)] {
        let config = AttentionConfig::new().causal(true).window(left, None);
        let got = gpu.run(|e| gpu.decode(e, &args, &config));
        assert!(
            matches!(
                got,
                Err(Error::ReleasedKeysInView { sequence: 0, first_visible: f, released_end: r })
                    if f == first_visible && r == released_end
            ),
            "window {left:?}: {got:?}"
        );
    }
    // A window starting exactly at the released pages' end decodes.
    let config = AttentionConfig::new()
        .causal(true)
        .window(Some(reaching as i64 - 1), None);
    gpu.run(|e| gpu.decode(e, &args, &config)).unwrap();

    // A table read back goes back in; the sequence then grows into live
    // pages and decodes its new token.
    let read_back = filled.cache.block_table(0).unwrap().to_vec();
    assert_eq!(read_back[0], RELEASED_PAGE);
    filled.cache.set_block_table(0, &read_back).unwrap();
    assert_eq!(filled.cache.free_pages(), free_after, "the same pages held");
    let appended = append_random_tokens_to_all(gpu, &mut filled, 1, 0x7e1e_a5e2);
    assert_eq!(appended, [lens[0] + 1, lens[1] + 1]);
    let q = queries(lens.len(), 1, head_dim, 0x7e1e_a5e3);
    let (out_err, lse_err, plan) = decode_errors(gpu, &filled, &q, 1, &options);
    assert!(
        out_err <= 1e-4 && lse_err <= 1e-4,
        "after an append: out {out_err:.2e}, lse {lse_err:.2e} ({plan:?})"
    );

    // Writes into released pages, releases past the length.
    let cache = &mut filled.cache;
    let len = cache.lens()[0];
    cache.set_len(0, released_end - 20).unwrap();
    let shape = TensorShape::new(2, 1, HEADS_KV, head_dim);
    let token_t = Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let got = gpu.run(|e| cache.append(gpu, e, &token_t, &token_t, None));
    assert!(
        matches!(
            got,
            Err(Error::ReleasedPosition { what: "append", sequence: 0, position })
                if position == released_end - 20
        ),
        "{got:?}"
    );
    cache.set_len(0, len).unwrap();
    let got = gpu.run(|e| cache.keep_draft(gpu, e, 0, len - released_end + 5, &[1]));
    assert!(
        matches!(
            got,
            Err(Error::ReleasedPosition { what: "keep_draft", sequence: 0, position })
                if position == released_end - 5
        ),
        "{got:?}"
    );
    let got = cache.release_pages_before(1, lens[1] + 2);
    assert!(
        matches!(
            got,
            Err(Error::ReleasePastLength { sequence: 1, position, len })
                if position == lens[1] + 2 && len == lens[1] + 1
        ),
        "{got:?}"
    );
    assert_eq!(
        cache.lens(),
        [len, lens[1] + 1],
        "refusals change no length"
    );
}

/// Appends `tokens` random tokens to every sequence of `filled` and to its
/// host copy; returns the lengths after.
fn append_random_tokens_to_all(
    gpu: &Gpu,
    filled: &mut Filled,
    tokens: usize,
    seed: u64,
) -> Vec<usize> {
    let cache = &mut filled.cache;
    let (k, v) = append_random_tokens(gpu, cache, tokens, seed);
    let per_seq = tokens * cache.heads_kv() * cache.head_dim();
    for b in 0..cache.batch() {
        filled.k[b].extend_from_slice(&k[b * per_seq..(b + 1) * per_seq]);
        filled.v[b].extend_from_slice(&v[b * per_seq..(b + 1) * per_seq]);
    }
    cache.lens().to_vec()
}

#[test]
fn bad_ragged_decodes_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let (mut cache, _) = small_paged_cache(gpu, [&[0, 2], &[1]]);
    let k = Tensor::zeros(gpu, TensorShape::new(2, 3, 1, 32), DType::F32).unwrap();
    gpu.run(|e| cache.append(gpu, e, &k, &k, None)).unwrap();
    let rows = |batch, n| {
        Tensor::filled_as(
            gpu,
            TensorShape::new(batch, n, HEADS_Q, 32),
            f32::NAN,
            DType::F32,
        )
        .unwrap()
    };
    let decode = |counts: &[usize], q: &Tensor, out: &Tensor, lse: Option<&Lse>| {
        let args = DecodeArgs {
            q,
            cache: &cache,
            out,
            lse,
        };
        gpu.run(|e| gpu.decode_ragged(e, &args, counts, AttentionConfig::new()))
    };
    let (q3, out3) = (rows(1, 3), rows(1, 3));
    assert!(matches!(
        decode(&[3], &q3, &out3, None),
        Err(Error::DataLength {
            expected: 2,
            got: 1,
            ..
        })
    ));
    assert!(matches!(
        decode(&[2, 2], &q3, &out3, None),
        Err(Error::ShapeMismatch {
            left_name: "q.seq",
            left: 3,
            right: 4,
            ..
        })
    ));
    let (q_batched, out_batched) = (rows(2, 3), rows(2, 3));
    assert!(matches!(
        decode(&[1, 2], &q_batched, &out_batched, None),
        Err(Error::ShapeMismatch {
            left_name: "q.batch",
            left: 2,
            right: 1,
            ..
        })
    ));
    let out4 = rows(1, 4);
    assert!(matches!(
        decode(&[1, 2], &q3, &out4, None),
        Err(Error::ShapeMismatch {
            left_name: "q.seq",
            right_name: "out.seq",
            ..
        })
    ));
    let lse = Lse::new(gpu, 2, HEADS_Q, 3).unwrap();
    assert!(matches!(
        decode(&[1, 2], &q3, &out3, Some(&lse)),
        Err(Error::LseShape {
            expected: [1, HEADS_Q, 3],
            ..
        })
    ));
    // Counts that are all 0: nothing recorded, the output untouched.
    assert!(matches!(decode(&[0, 0], &q3, &out3, None), Ok(None)));
    assert!(out3.to_f32_vec(gpu).unwrap().iter().all(|x| x.is_nan()));
    // And a good call writes every row.
    let q = Tensor::zeros(gpu, TensorShape::new(1, 3, HEADS_Q, 32), DType::F32).unwrap();
    assert!(decode(&[1, 2], &q, &out3, None).unwrap().is_some());
    assert!(out3.to_f32_vec(gpu).unwrap().iter().all(|x| *x == 0.0));
}
