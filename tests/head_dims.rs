//! Head dims past 256 and values of another width than queries and keys:
//! DeepSeek's multi-head latent attention (192/128 in prefill; 576/512 in
//! decoding over one latent KV head whose first 512 elements are the
//! values) and 512-wide heads, against the reference: the forward on every
//! tier the adapter offers, the naive baseline, masks and padded batches,
//! decoding over latent caches of every storage type with the fused RoPE
//! on the latent's tail; and the typed errors.

mod common;

use common::random::{normal_vec, seeded};
use common::{Implementation, Inputs, assert_close, attention_shape, gpu, run_with};
use rand::RngExt;
use rand::seq::SliceRandom;
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, BackwardPlan, DType,
    DecodeArgs, DecodeOptions, Error, ForwardOptions, Gpu, KeyRotation, KvCache, KvCacheConfig,
    KvDType, KvLayout, Rope, RopeStyle, Tensor, TensorShape, Tier, ValidLengths,
};

/// [`common::cases`], except on GL: llvmpipe behind GL compiles each
/// wide or uneven kernel for minutes cold, so the GL pass runs the quick
/// cases and the Vulkan pass all of them.
fn cases<T: Clone + std::fmt::Debug>(gpu: &Gpu, what: &str, quick: &[T], full: &[T]) -> Vec<T> {
    if gpu.info().adapter.backend == wgpu::Backend::Gl {
        eprintln!(
            "SKIPPED: on GL, {what} runs {quick:?} of {full:?} (each compiles for minutes on \
             llvmpipe GL; the Vulkan pass runs them all)"
        );
        return quick.to_vec();
    }
    common::cases(what, quick, full)
}

/// The tiers a test forces: every one the adapter offers in the
/// exhaustive mode, else only the default choice (`None`), since each
/// (tier, head dims) pair compiles a kernel of its own. The
/// register-blocked tier is in the list; [`fits`] says where its tiles
/// outgrow the workgroup memory.
fn tiers(gpu: &Gpu, what: &str) -> Vec<Option<Tier>> {
    let mut offered = vec![Some(Tier::Portable), Some(Tier::RegisterBlocked)];
    let forced = AttentionConfig::new().tier(Tier::SubgroupBroadcast);
    let shape = AttentionShape::self_attention(1, 8, 1, 64);
    if wgpu_flash_attn::ForwardPlan::for_call(gpu.info(), &shape, DType::F32, forced.tier).is_ok() {
        offered.push(Some(Tier::SubgroupBroadcast));
    }
    cases(gpu, what, &[None], &offered)
}

/// Whether `tier` plans for `shape` on this adapter; says so when it does
/// not (the register-blocked tier at head dims whose smallest block
/// outgrows the workgroup memory: lavapipe's 32 KiB at 512 and more).
fn fits(gpu: &Gpu, shape: &AttentionShape, tier: Option<Tier>) -> bool {
    match wgpu_flash_attn::ForwardPlan::for_call(gpu.info(), shape, DType::F32, tier) {
        Err(Error::TierUnavailable { reason, .. }) => {
            eprintln!(
                "SKIPPED: {tier:?} at head dims {}/{}: {reason}",
                shape.head_dim, shape.head_dim_v
            );
            false
        }
        _ => true,
    }
}

/// `config` with `tier` forced, if one is given.
fn with_tier(config: AttentionConfig, tier: Option<Tier>) -> AttentionConfig {
    match tier {
        Some(tier) => config.tier(tier),
        None => config,
    }
}

/// Options that each touch a different part of the kernel's epilogue.
fn option_sets(heads_q: usize) -> Vec<AttentionConfig> {
    let sinks = normal_vec(&mut seeded(0x51c5), heads_q, 1.0);
    vec![
        AttentionConfig::new(),
        AttentionConfig::new().causal(true).sinks(sinks),
        AttentionConfig::new()
            .window(Some(9), Some(3))
            .softcap(20.0)
            .alibi(Alibi::PerHead(Alibi::standard_slopes(heads_q))),
    ]
}

#[test]
fn values_of_another_width_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    // DeepSeek's prefill widths, and the other way round.
    let pairs = cases(
        gpu,
        "value head dims of their own",
        &[(192, 128)],
        &[(192, 128), (128, 192)],
    );
    let tiers = tiers(gpu, "tiers with value head dims of their own");
    // The naive baseline's three passes compile three more kernels a pair.
    let naive = !cases(gpu, "the naive baseline with them", &[], &[()]).is_empty();
    for (head_dim, head_dim_v) in pairs {
        let shape = attention_shape(2, 37, 53, (4, 2), head_dim).with_head_dim_v(head_dim_v);
        let inputs = Inputs::draw(&shape, (head_dim * 1000 + head_dim_v) as u64, 1.0);
        for &tier in tiers.iter().filter(|&&tier| fits(gpu, &shape, tier)) {
            for config in option_sets(4) {
                let config = with_tier(config, tier);
                let errors = run_with(gpu, Implementation::Flash, &shape, &inputs, &config);
                assert_close(errors, &format!("{head_dim}/{head_dim_v} {config:?}"));
            }
        }
        if naive {
            let config = AttentionConfig::new().causal(true);
            let errors = run_with(gpu, Implementation::Naive, &shape, &inputs, &config);
            assert_close(errors, &format!("naive {head_dim}/{head_dim_v}"));
        }
    }
}

#[test]
fn head_dims_past_256_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let pairs = cases(
        gpu,
        "head dims past 256 (query/key, value)",
        &[(576, 512)],
        &[(320, 320), (512, 512), (576, 512)],
    );
    let tiers = tiers(gpu, "tiers with head dims past 256");
    for (head_dim, head_dim_v) in pairs {
        let shape = attention_shape(1, 21, 45, (2, 1), head_dim).with_head_dim_v(head_dim_v);
        let inputs = Inputs::draw(&shape, head_dim as u64, 1.0);
        for &tier in tiers.iter().filter(|&&tier| fits(gpu, &shape, tier)) {
            let config = with_tier(AttentionConfig::new().causal(true), tier);
            let errors = run_with(gpu, Implementation::Flash, &shape, &inputs, &config);
            assert_close(errors, &format!("{head_dim}/{head_dim_v} {tier:?}"));
        }
    }
}

/// A boolean mask and valid lengths (with sequences of 0 and 1 keys) on
/// values narrower than the keys.
#[test]
fn masks_and_padded_batches_with_narrower_values() {
    let Some(gpu) = gpu() else { return };
    let shape = attention_shape(3, 19, 26, (2, 1), 192).with_head_dim_v(128);
    let inputs = Inputs::draw(&shape, 0x3a5c, 1.0);
    let upload = |dims, data: &[f32]| Tensor::from_f32(gpu, dims, data).unwrap();
    let q = upload(shape.q_shape(), &inputs.q);
    let k = upload(shape.k_shape(), &inputs.k);
    let v = upload(shape.v_shape(), &inputs.v);
    let run = |options: ForwardOptions<'_>| {
        let out = Tensor::filled(gpu, shape.o_shape(), f32::NAN).unwrap();
        common::run_views(
            gpu,
            Implementation::Flash,
            &shape,
            options,
            [&q, &k, &v, &out],
        )
    };
    let config = AttentionConfig::new();

    let mut rng = seeded(0x3a5d);
    let dims = [1, 1, shape.seq_q, shape.seq_kv];
    let allowed: Vec<bool> = (0..dims.iter().product())
        .map(|_| rng.random_bool(0.6))
        .collect();
    let mask = AttentionMask::boolean(gpu, dims, &allowed).unwrap();
    let (got, got_lse) = run(ForwardOptions::new(&config).mask(&mask));
    let host_mask = HostMask::Bool {
        dims,
        values: &allowed,
    };
    let want =
        reference::attention_masked(&shape, &inputs.q, &inputs.k, &inputs.v, &config, &host_mask)
            .unwrap();
    let errors = common::compare_with(&want, &got, &got_lse, "boolean mask, 192/128");
    assert_close(errors, "boolean mask, 192/128");

    let (q_lens, kv_lens) = ([19, 1, 7], [26, 1, 0]);
    let lens = ValidLengths {
        q: Some(&q_lens),
        kv: &kv_lens,
    };
    let (got, got_lse) = run(ForwardOptions::new(&config).valid_lengths(lens));
    let (dk, dv, heads_q) = (shape.head_dim, shape.head_dim_v, shape.heads_q);
    // Per batch entry, in elements: Q rows, K and V keys, O rows.
    let (q_row, k_row, v_row) = (heads_q * dk, shape.heads_kv * dk, shape.heads_kv * dv);
    let o_row = heads_q * dv;
    for b in 0..shape.batch {
        let (q_len, kv_len) = (q_lens[b], kv_lens[b]);
        let got_b = &got[b * shape.seq_q * o_row..][..shape.seq_q * o_row];
        let lse_b = &got_lse[b * heads_q * shape.seq_q..][..heads_q * shape.seq_q];
        // Rows without keys and padding rows: zeros, logsumexp +inf.
        let (mut want_out, mut want_lse) = (
            vec![0.0; shape.seq_q * o_row],
            vec![f64::INFINITY; heads_q * shape.seq_q],
        );
        if kv_len > 0 {
            let entry = AttentionShape {
                batch: 1,
                seq_q: q_len,
                seq_kv: kv_len,
                ..shape
            };
            let want = reference::attention(
                &entry,
                &inputs.q[b * shape.seq_q * q_row..][..q_len * q_row],
                &inputs.k[b * shape.seq_kv * k_row..][..kv_len * k_row],
                &inputs.v[b * shape.seq_kv * v_row..][..kv_len * v_row],
                &config,
            )
            .unwrap();
            want_out[..q_len * o_row].copy_from_slice(&want.out);
            for h in 0..heads_q {
                want_lse[h * shape.seq_q..][..q_len]
                    .copy_from_slice(&want.lse[h * q_len..][..q_len]);
            }
        }
        let what = format!("batch {b} (q {q_len}, kv {kv_len})");
        let errors = common::compare_with(
            &reference::ReferenceOutput {
                out: want_out,
                lse: want_lse,
            },
            got_b,
            lse_b,
            &what,
        );
        assert_close(errors, &what);
        assert!(
            got_b[q_len * o_row..].iter().all(|&x| x == 0.0),
            "{what}: padding rows are zeros"
        );
    }
}

const MLA_HEADS_Q: usize = 16;
const LATENT: usize = 576;
const LATENT_VALUES: usize = 512;
const ROPE_DIMS: usize = 64;

/// DeepSeek-V3's decoding: one latent KV head of 576 (c_kv 512 | k_rope
/// 64) whose first 512 elements are the values, paged, in every storage
/// type; the fused RoPE rotates k_rope only; decode outputs 512-wide rows.
#[test]
fn latent_caches_decode_multi_head_latent_attention() {
    let Some(gpu) = gpu() else { return };
    let lens = [300, 1];
    let (page_size, pages) = (64, 12);
    let dtypes = cases(
        gpu,
        "latent cache storage types",
        &[KvDType::Int8],
        &KvDType::ALL,
    );
    // The forced portable tier (one more kernel per storage type) runs
    // on the f32 cache, in the exhaustive mode.
    let portable_too = cases(
        gpu,
        "latent decode on the forced portable tier",
        &[],
        &[KvDType::F32],
    );
    let rope = Rope::new(RopeStyle::Interleaved).rotary_dim(ROPE_DIMS);
    let offsets = [0u32, 4000];
    for dtype in dtypes {
        let config =
            KvCacheConfig::new(lens.len(), 1, LATENT, KvLayout::Paged { page_size, pages })
                .latent_values(LATENT_VALUES)
                .dtype(dtype);
        let mut cache = KvCache::new(gpu, config).unwrap();
        assert_eq!(
            cache.bytes(),
            (pages * page_size * dtype.vector_bytes(LATENT)) as u64,
            "{dtype:?}: a latent cache holds no V pool"
        );
        let mut pool: Vec<u32> = (0..pages as u32).collect();
        pool.shuffle(&mut seeded(0x1a7e));
        for (b, table) in pool.chunks(pages / lens.len()).enumerate() {
            cache.set_block_table(b, table).unwrap();
        }
        let longest = lens[0];
        let shape = TensorShape::new(lens.len(), longest, 1, LATENT);
        let latent = normal_vec(&mut seeded(0x1a7f), shape.elements(), 1.0);
        let latent_t = Tensor::from_f32(gpu, shape, &latent).unwrap();
        let rotation = KeyRotation {
            rope: &rope,
            position_offsets: &offsets,
        };
        gpu.run(|e| cache.append_latent(gpu, e, &latent_t, Some(rotation)))
            .unwrap();
        for (b, &len) in lens.iter().enumerate() {
            cache.set_len(b, len).unwrap();
        }
        // What the cache should hold: c_kv as appended, k_rope rotated.
        let tail_shape = TensorShape::new(lens.len(), longest, 1, ROPE_DIMS);
        let tails: Vec<f32> = latent
            .chunks(LATENT)
            .flat_map(|vector| vector[LATENT_VALUES..].to_vec())
            .collect();
        let positions: Vec<u64> = offsets.iter().map(|&o| u64::from(o)).collect();
        let rotated = reference::rope(&rope, tail_shape, &tails, &positions).unwrap();

        let mut stored = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            let (k, v) = cache.read_sequence(gpu, b).unwrap();
            assert_eq!(k.len(), len * LATENT);
            assert_eq!(v.len(), len * LATENT_VALUES);
            for t in 0..len {
                let key = &k[t * LATENT..][..LATENT];
                assert_eq!(
                    &v[t * LATENT_VALUES..][..LATENT_VALUES],
                    &key[..LATENT_VALUES],
                    "{dtype:?}: a value is its key's prefix"
                );
                let appended = &latent[(b * longest + t) * LATENT..][..LATENT];
                let amax = key_amax(appended, &rotated[(b * longest + t) * ROPE_DIMS..]);
                for (e, &got) in key.iter().enumerate() {
                    let want = if e < LATENT_VALUES {
                        f64::from(appended[e])
                    } else {
                        rotated[(b * longest + t) * ROPE_DIMS + e - LATENT_VALUES]
                    };
                    // c_kv is stored as appended; k_rope after the f32
                    // rotation, within ROPE_BOUND of the f64 one.
                    let rotation = if e < LATENT_VALUES {
                        0.0
                    } else {
                        common::ROPE_BOUND
                    };
                    let bound = common::storage_bound(dtype, want, amax) + rotation;
                    assert!(
                        (f64::from(got) - want).abs() <= bound,
                        "{dtype:?} sequence {b} token {t} element {e}: stored {got}, want {want}"
                    );
                }
            }
            stored.push((k, v));
        }

        let scale = 1.0 / (192f32).sqrt();
        let mut steps = vec![(1, None, None)];
        if portable_too.contains(&dtype) {
            steps.push((2, Some(Tier::Portable), Some(3)));
        }
        for (seq_q, tier, splits) in steps {
            let mut config = AttentionConfig::new().scale(scale).causal(true);
            if let Some(tier) = tier {
                config = config.tier(tier);
            }
            let mut options = DecodeOptions::new(&config);
            options.kv_splits = splits;
            let q_shape = TensorShape::new(lens.len(), seq_q, MLA_HEADS_Q, LATENT);
            let o_shape = TensorShape::new(lens.len(), seq_q, MLA_HEADS_Q, LATENT_VALUES);
            let q = normal_vec(&mut seeded(seq_q as u64), q_shape.elements(), 1.0);
            let q_t = Tensor::from_f32(gpu, q_shape, &q).unwrap();
            let out = Tensor::filled(gpu, o_shape, f32::NAN).unwrap();
            let args = DecodeArgs {
                q: &q_t,
                cache: &cache,
                out: &out,
                lse: None,
            };
            gpu.run(|e| gpu.decode(e, &args, options.clone())).unwrap();
            let got = out.to_f32_vec(gpu).unwrap();
            for (b, (k, v)) in stored.iter().enumerate() {
                let entry = AttentionShape {
                    batch: 1,
                    seq_q,
                    seq_kv: lens[b],
                    heads_q: MLA_HEADS_Q,
                    heads_kv: 1,
                    head_dim: LATENT,
                    head_dim_v: LATENT_VALUES,
                };
                let q_b = &q[b * seq_q * MLA_HEADS_Q * LATENT..][..seq_q * MLA_HEADS_Q * LATENT];
                let want = reference::attention(&entry, q_b, k, v, &config).unwrap();
                let rows = seq_q * MLA_HEADS_Q * LATENT_VALUES;
                let err = got[b * rows..][..rows]
                    .iter()
                    .zip(&want.out)
                    .map(|(g, w)| {
                        assert!(!g.is_nan(), "{dtype:?}: unwritten output");
                        (f64::from(*g) - w).abs()
                    })
                    .fold(0.0, f64::max);
                assert!(
                    err <= common::F32_TOLERANCE,
                    "{dtype:?} sequence {b} seq_q {seq_q} {tier:?} splits {splits:?}: {err:.2e}"
                );
            }
        }
    }
}

/// The largest magnitude of a stored latent vector: c_kv as appended and
/// k_rope rotated (int8 scales come from it).
fn key_amax(appended: &[f32], rotated_tail: &[f64]) -> f64 {
    appended[..LATENT_VALUES]
        .iter()
        .map(|&x| f64::from(x).abs())
        .chain(rotated_tail[..ROPE_DIMS].iter().map(|x| x.abs()))
        .fold(0.0, f64::max)
}

/// `err` is a `ShapeMismatch` between these two numbers.
fn assert_shape_mismatch(err: &Error, want_left: usize, want_right: usize) {
    assert!(
        matches!(err, Error::ShapeMismatch { left, right, .. } if *left == want_left && *right == want_right),
        "expected a mismatch of {want_left} and {want_right}: {err}"
    );
}

#[test]
fn bad_head_dims_and_latent_caches_are_typed_errors() {
    let Some(gpu) = gpu() else { return };
    let config = AttentionConfig::new();
    // Past the widest head dim, and not a multiple of 8.
    for (head_dim, head_dim_v) in [(584, 512), (576, 584), (128, 100)] {
        let shape = attention_shape(1, 4, 4, (1, 1), head_dim).with_head_dim_v(head_dim_v);
        let err = config.validate(&shape).unwrap_err();
        let bad = if head_dim == 584 { 584 } else { head_dim_v };
        assert!(
            matches!(err, Error::HeadDimUnsupported { got, .. } if got == bad),
            "{head_dim}/{head_dim_v}: {err}"
        );
    }
    // O must be as wide as V.
    let shape = attention_shape(1, 4, 4, (1, 1), 192).with_head_dim_v(128);
    let [q, k, v, _] = common::upload(gpu, &shape, &Inputs::draw(&shape, 1, 1.0));
    let wrong_out = Tensor::zeros(gpu, shape.q_shape(), DType::F32).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &wrong_out,
        lse: None,
    };
    let err = gpu.run(|e| gpu.forward(e, &args, &config)).unwrap_err();
    assert_shape_mismatch(&err, 128, 192);
    // The backward takes head dims up to 256 on each side (192/128 is
    // tests/backward.rs's).
    for shape in [
        attention_shape(1, 4, 4, (1, 1), 128).with_head_dim_v(512),
        attention_shape(1, 4, 4, (1, 1), 512),
    ] {
        let err = BackwardPlan::for_call(gpu.info(), &shape, DType::F32, None).unwrap_err();
        assert!(
            matches!(err, Error::HeadDimUnsupported { .. }),
            "{shape:?}: {err}"
        );
    }

    // Latent caches.
    let layout = KvLayout::Contiguous { capacity: 16 };
    let latent = KvCacheConfig::new(1, 1, LATENT, layout).latent_values(LATENT_VALUES);
    let err =
        KvCache::new(gpu, KvCacheConfig::new(1, 1, 64, layout).latent_values(128)).unwrap_err();
    assert_shape_mismatch(&err, 128, 64);
    let mut cache = KvCache::new(gpu, latent).unwrap();
    let tokens = Tensor::zeros(gpu, TensorShape::new(1, 2, 1, LATENT), DType::F32).unwrap();
    let err = gpu
        .run(|e| cache.append(gpu, e, &tokens, &tokens, None))
        .unwrap_err();
    assert!(matches!(err, Error::UnsupportedCombination { .. }), "{err}");
    let rope = Rope::new(RopeStyle::HalfSplit).rotary_dim(128);
    let rotation = KeyRotation {
        rope: &rope,
        position_offsets: &[0],
    };
    let err = gpu
        .run(|e| cache.append_latent(gpu, e, &tokens, Some(rotation)))
        .unwrap_err();
    assert_shape_mismatch(&err, 128, 64);
    assert_eq!(cache.lens(), &[0], "a refused append adds nothing");
    let mut separate = KvCache::new(gpu, KvCacheConfig::new(1, 1, 64, layout)).unwrap();
    let small = Tensor::zeros(gpu, TensorShape::new(1, 2, 1, 64), DType::F32).unwrap();
    let err = gpu
        .run(|e| separate.append_latent(gpu, e, &small, None))
        .unwrap_err();
    assert!(matches!(err, Error::UnsupportedCombination { .. }), "{err}");
    // A caller's pool for a latent cache is its K buffers alone.
    let bytes = (cache.pool_pages() * cache.page_size() * LATENT * 4) as u64;
    let buffer = |label| {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let (k_pool, v_pool) = (buffer("k"), buffer("v"));
    let err = KvCache::from_buffers(gpu, latent, &[(k_pool.clone(), v_pool)]).unwrap_err();
    assert!(matches!(err, Error::UnsupportedCombination { .. }), "{err}");
    KvCache::from_buffers(gpu, latent, &[(k_pool.clone(), k_pool)]).unwrap();
    // Decoding writes value-wide rows.
    gpu.run(|e| cache.append_latent(gpu, e, &tokens, None))
        .unwrap();
    let q_shape = TensorShape::new(1, 1, 4, LATENT);
    let q = Tensor::zeros(gpu, q_shape, DType::F32).unwrap();
    let out = Tensor::zeros(gpu, q_shape, DType::F32).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let err = gpu.run(|e| gpu.decode(e, &args, &config)).unwrap_err();
    assert_shape_mismatch(&err, 512, 576);
}
