//! Forward calls whose keys run in several dispatches (src/key_chunks.rs):
//! past the loop budget, past one storage binding, or at the caller's
//! `keys_per_dispatch`. Each row continues its online softmax from chunk to
//! chunk, so the result is the reference's, and the one-dispatch result up
//! to rounding, for every option that places keys (causal, windows, ALiBi,
//! sinks, GQA), for padded and variable-length batches (lengths 0 and 1),
//! and for K and V bound in windows of a buffer larger than one binding.

mod common;

use common::random::{normal_vec, seeded};
use common::{
    F32_TOLERANCE, Inputs, assert_close, assert_rows_close, cases, compare, forward_tiers, gpu,
    round_to, sequence_reference, unit_roundoff, weight_rounding, with_tier,
};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionShape, DType, Error, ForwardOptions, Gpu, Lse,
    Strides, Tensor, TensorShape, ValidLengths, reference,
};

/// Runs `options` on `[q, k, v]` uploaded as `dtype`; output and
/// logsumexp read back as f32.
fn run(
    gpu: &Gpu,
    shape: &AttentionShape,
    [q, k, v]: [&Tensor; 3],
    options: ForwardOptions<'_>,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let out = Tensor::filled_as(gpu, shape.o_shape(), f32::NAN, q.dtype())?;
    let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q)?;
    let args = AttentionArgs {
        q,
        k,
        v,
        out: &out,
        lse: Some(&lse),
    };
    gpu.run(|e| gpu.forward(e, &args, options))?;
    Ok((out.to_f32_vec(gpu)?, lse.to_vec(gpu)?))
}

fn upload(gpu: &Gpu, shape: &AttentionShape, inputs: &Inputs, dtype: DType) -> [Tensor; 3] {
    [
        Tensor::from_f32_as(gpu, shape.q_shape(), &inputs.q, dtype).unwrap(),
        Tensor::from_f32_as(gpu, shape.k_shape(), &inputs.k, dtype).unwrap(),
        Tensor::from_f32_as(gpu, shape.v_shape(), &inputs.v, dtype).unwrap(),
    ]
}

/// Largest |a - b|, where +inf (a row without keys) must match exactly.
fn max_difference(a: &[f32], b: &[f32], what: &str) -> f64 {
    f64::from(common::max_abs_diff(a, b, what))
}

/// The configurations that place keys differently, on both forward
/// kernels (`forward_tiers`).
fn configs(gpu: &Gpu, heads_q: usize, dtype: DType) -> Vec<(String, AttentionConfig)> {
    let sinks: Vec<f32> = (0..heads_q).map(|h| 0.5 - 0.3 * h as f32).collect();
    let slopes: Vec<f32> = (0..heads_q).map(|h| 0.05 * (h + 1) as f32).collect();
    vec![
        ("plain", AttentionConfig::new()),
        (
            "causal + sinks",
            AttentionConfig::new().causal(true).sinks(sinks),
        ),
        (
            "window (17, 5) + softcap + ALiBi",
            AttentionConfig::new()
                .window(Some(17), Some(5))
                .softcap(8.0)
                .alibi(Alibi::PerHead(slopes)),
        ),
    ]
    .into_iter()
    .flat_map(|(name, config)| {
        forward_tiers(gpu, dtype).map(|tier| (format!("{name} {tier:?}"), with_tier(&config, tier)))
    })
    .collect()
}

/// Chunked calls equal the reference, and the one-dispatch call up to
/// rounding, for key counts per dispatch below a tile, at a tile and
/// between; with more queries than keys (causal rows that see nothing).
#[test]
fn chunked_keys_match_the_reference_and_one_dispatch() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        AttentionShape {
            batch: 2,
            seq_q: 37,
            seq_kv: 203,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 64,
            head_dim_v: 64,
        },
        AttentionShape {
            batch: 1,
            seq_q: 50,
            seq_kv: 30,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 64,
            head_dim_v: 64,
        },
    ];
    for (s, shape) in shapes.iter().enumerate() {
        let inputs = Inputs::draw(shape, 0x0c4u64 + s as u64, 1.0);
        let tensors = upload(gpu, shape, &inputs, DType::F32);
        let tensors = [&tensors[0], &tensors[1], &tensors[2]];
        for (name, config) in configs(gpu, shape.heads_q, DType::F32) {
            let (whole, whole_lse) = run(gpu, shape, tensors, (&config).into()).unwrap();
            for keys in [7, 64, 100] {
                let what = format!("{shape:?} {name}, {keys} keys per dispatch");
                let options = ForwardOptions::new(&config).keys_per_dispatch(keys);
                let (got, got_lse) = run(gpu, shape, tensors, options).unwrap();
                assert_close(compare(shape, &inputs, &config, &got, &got_lse), &what);
                let out_gap = max_difference(&got, &whole, &what);
                let lse_gap = max_difference(&got_lse, &whole_lse, &what);
                assert!(
                    out_gap <= 1e-5 && lse_gap <= 1e-5,
                    "{what}: chunked vs one dispatch: out {out_gap:.2e}, lse {lse_gap:.2e}"
                );
            }
        }
    }
}

/// Half storage carries f32 state between chunks, so a chunked call is
/// the one-dispatch call up to the final rounding to the storage type.
#[test]
fn half_storage_carries_f32_between_chunks() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape {
        batch: 1,
        seq_q: 40,
        seq_kv: 300,
        heads_q: 4,
        heads_kv: 1,
        head_dim: 64,
        head_dim_v: 64,
    };
    let inputs = Inputs::draw(&shape, 0x0c5, 1.0);
    for dtype in cases("storage types", &[DType::F16], &[DType::F16, DType::BF16]) {
        let tensors = upload(gpu, &shape, &inputs, dtype);
        let tensors = [&tensors[0], &tensors[1], &tensors[2]];
        for (name, config) in configs(gpu, shape.heads_q, dtype) {
            let what = format!("{dtype:?} {name}");
            let (whole, whole_lse) = run(gpu, &shape, tensors, (&config).into()).unwrap();
            let options = ForwardOptions::new(&config).keys_per_dispatch(48);
            let (got, got_lse) = run(gpu, &shape, tensors, options).unwrap();
            // Both round the same f32 result (up to f32 noise) once: at
            // most one storage ulp apart (|out| <= max |v| < 8); on the
            // cooperative-matrix tier each also rounded its weights (per
            // chunk, against different running maxima).
            let weights = weight_rounding(gpu, &shape, dtype, &config, &inputs.v).unwrap();
            let bound = 8.0 * 2.0 * unit_roundoff(dtype) + 1e-5 + 2.0 * weights;
            let out_gap = max_difference(&got, &whole, &what);
            assert!(out_gap <= bound, "{what}: out {out_gap:.2e} > {bound:.2e}");
            let lse_gap = max_difference(&got_lse, &whole_lse, &what);
            assert!(lse_gap <= 1e-5, "{what}: lse {lse_gap:.2e}");
            // And the rounded inputs' reference, within the storage type's
            // rounding of the output.
            let rounded = |x: &[f32]| x.iter().map(|&v| round_to(dtype, v)).collect::<Vec<_>>();
            let want = reference::attention(
                &shape,
                &rounded(&inputs.q),
                &rounded(&inputs.k),
                &rounded(&inputs.v),
                &config,
            )
            .unwrap();
            let worst = got
                .iter()
                .zip(&want.out)
                .map(|(&g, &w)| (f64::from(g) - w).abs() - w.abs() * unit_roundoff(dtype))
                .fold(0.0, f64::max);
            let bound = F32_TOLERANCE + weights;
            assert!(
                worst <= bound,
                "{what}: vs reference {worst:.2e} > {bound:.2e}"
            );
        }
    }
}

/// Packed variable-length and padded batches, chunked: sequences with no
/// keys, one key, one query, and keys spanning several chunks.
#[test]
fn chunked_sequences_match_each_sequence_alone() {
    let Some(gpu) = gpu() else { return };
    let (hq, hkv, d) = (4, 2, 32);
    let q_lens = [3, 0, 1, 40, 9];
    let k_lens = [50, 7, 0, 130, 1];
    let offsets = |lens: &[usize]| {
        std::iter::once(0)
            .chain(lens.iter().scan(0, |total, len| {
                *total += len;
                Some(*total)
            }))
            .collect::<Vec<_>>()
    };
    let (cu_q, cu_k) = (offsets(&q_lens), offsets(&k_lens));
    let (total_q, total_k) = (cu_q[q_lens.len()], cu_k[k_lens.len()]);
    let mut rng = seeded(0x0c6);
    let q = normal_vec(&mut rng, total_q * hq * d, 1.0);
    let k = normal_vec(&mut rng, total_k * hkv * d, 1.0);
    let v = normal_vec(&mut rng, total_k * hkv * d, 1.0);
    let tensors = [
        Tensor::from_f32(gpu, TensorShape::new(1, total_q, hq, d), &q).unwrap(),
        Tensor::from_f32(gpu, TensorShape::new(1, total_k, hkv, d), &k).unwrap(),
        Tensor::from_f32(gpu, TensorShape::new(1, total_k, hkv, d), &v).unwrap(),
    ];
    let packed = AttentionShape {
        batch: 1,
        seq_q: total_q,
        seq_kv: total_k,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        head_dim_v: d,
    };
    for (name, config) in configs(gpu, hq, DType::F32) {
        let options = ForwardOptions::new(&config)
            .varlen(&cu_q, &cu_k)
            .keys_per_dispatch(24);
        let (got, got_lse) = run(
            gpu,
            &packed,
            [&tensors[0], &tensors[1], &tensors[2]],
            options,
        )
        .unwrap();
        for (i, (&lq, &lk)) in q_lens.iter().zip(&k_lens).enumerate() {
            let what = format!("varlen {name}, sequence {i} ({lq} queries, {lk} keys)");
            let rows = cu_q[i] * hq * d..cu_q[i + 1] * hq * d;
            let (want, want_lse) = sequence_reference(
                &config,
                i,
                (hq, hkv, d),
                &q[rows.clone()],
                &k[cu_k[i] * hkv * d..cu_k[i + 1] * hkv * d],
                &v[cu_k[i] * hkv * d..cu_k[i + 1] * hkv * d],
            );
            assert_rows_close(&got[rows], &want, &what);
            // Logsumexp is [1, heads, total_q]: this sequence's rows per head.
            let got_lse: Vec<f32> = (0..hq)
                .flat_map(|h| got_lse[h * total_q + cu_q[i]..h * total_q + cu_q[i + 1]].to_vec())
                .collect();
            assert_rows_close(&got_lse, &want_lse, &format!("{what}, lse"));
        }
    }

    // A padded batch: valid lengths of each batch entry, chunked.
    let shape = AttentionShape {
        batch: 3,
        seq_q: 20,
        seq_kv: 90,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        head_dim_v: d,
    };
    let inputs = Inputs::draw(&shape, 0x0c7, 1.0);
    let tensors = upload(gpu, &shape, &inputs, DType::F32);
    let (kv_lens, q_lens) = ([90, 1, 0], [20, 5, 3]);
    let config = AttentionConfig::new().causal(true);
    let lengths = ValidLengths {
        q: Some(&q_lens),
        kv: &kv_lens,
    };
    let one = run(
        gpu,
        &shape,
        [&tensors[0], &tensors[1], &tensors[2]],
        ForwardOptions::new(&config).valid_lengths(lengths),
    )
    .unwrap();
    let chunked = run(
        gpu,
        &shape,
        [&tensors[0], &tensors[1], &tensors[2]],
        ForwardOptions::new(&config)
            .valid_lengths(lengths)
            .keys_per_dispatch(32),
    )
    .unwrap();
    let gap = max_difference(&chunked.0, &one.0, "padded out");
    let lse_gap = max_difference(&chunked.1, &one.1, "padded lse");
    assert!(
        gap <= 1e-5 && lse_gap <= 1e-5,
        "padded: {gap:.2e} {lse_gap:.2e}"
    );
    // Entry 0 holds every key: the dense reference of that entry.
    let row = shape.seq_q * hq * d;
    let entry = AttentionShape { batch: 1, ..shape };
    let want = reference::attention(
        &entry,
        &inputs.q[..row],
        &inputs.k[..shape.seq_kv * hkv * d],
        &inputs.v[..shape.seq_kv * hkv * d],
        &config,
    )
    .unwrap();
    assert_rows_close(&chunked.0[..row], &want.out, "padded entry 0");
    // Padding rows and key-less entries: zeros, logsumexp +inf.
    assert!(
        chunked.0[row + 5 * hq * d..2 * row]
            .iter()
            .all(|&x| x == 0.0)
    );
    assert!(chunked.0[2 * row..].iter().all(|&x| x == 0.0));
}

/// A device on the same adapter whose storage bindings hold only
/// `binding` bytes, so that K and V larger than that are bound in windows.
fn small_binding_gpu(binding: u64) -> Gpu {
    common::gpu_with_limits("small storage bindings", |limits| {
        limits.max_storage_buffer_binding_size = binding;
    })
    .expect("called after the test adapter was found")
}

/// K and V past one binding: windows of the buffers, each dispatch's keys
/// inside its window, with packed tensors and with K and V as strided views
/// into one fused KV buffer.
#[test]
fn keys_past_one_binding_are_bound_in_windows() {
    let Some(shared) = gpu() else { return };
    let binding = 64 << 10;
    let gpu = small_binding_gpu(binding);
    assert_eq!(gpu.info().limits.max_storage_buffer_binding_size, binding);
    let gpu = &gpu;
    let shape = AttentionShape {
        batch: 2,
        seq_q: 24,
        seq_kv: 300,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    };
    assert!(4 * shape.k_shape().elements() as u64 > binding);
    let inputs = Inputs::draw(&shape, 0x0c8, 1.0);
    let [q, k, v] = upload(gpu, &shape, &inputs, DType::F32);
    for (name, config) in configs(gpu, shape.heads_q, DType::F32) {
        let (got, got_lse) = run(gpu, &shape, [&q, &k, &v], (&config).into()).unwrap();
        assert_close(
            compare(&shape, &inputs, &config, &got, &got_lse),
            &format!("windows, {name}"),
        );
    }

    // K and V interleaved per key in one buffer [b, s, 2 * heads_kv, d]
    // (K heads first): each a strided view.
    let (b, s, h, d) = (shape.batch, shape.seq_kv, shape.heads_kv, shape.head_dim);
    let mut fused = vec![0.0f32; b * s * 2 * h * d];
    for (index, x) in fused.iter_mut().enumerate() {
        let (row, within) = (index / (2 * h * d), index % (2 * h * d));
        let source = if within < h * d { &inputs.k } else { &inputs.v };
        *x = source[row * h * d + within % (h * d)];
    }
    let fused = Tensor::from_f32(gpu, TensorShape::new(b, s, 2 * h, d), &fused).unwrap();
    let strides = Strides {
        batch: s * 2 * h * d,
        seq: 2 * h * d,
        head: d,
    };
    let k_view = fused.view(shape.k_shape(), strides, 0).unwrap();
    let v_view = fused.view(shape.v_shape(), strides, h * d).unwrap();
    let config = AttentionConfig::new().causal(true);
    let (got, got_lse) = run(gpu, &shape, [&q, &k_view, &v_view], (&config).into()).unwrap();
    assert_close(
        compare(&shape, &inputs, &config, &got, &got_lse),
        "windows over a fused KV buffer",
    );

    // The test's device (all bindings) binds the same call whole: same result.
    let tensors = upload(shared, &shape, &inputs, DType::F32);
    let (whole, _) = run(
        shared,
        &shape,
        [&tensors[0], &tensors[1], &tensors[2]],
        (&config).into(),
    )
    .unwrap();
    let gap = max_difference(&got, &whole, "windows vs whole");
    assert!(gap <= 1e-5, "windows vs whole binding: {gap:.2e}");
}

/// A binding limit that is no whole number of words (NVIDIA's Vulkan
/// driver reports 2^31 - 1): a dispatch whose sequences have no valid key
/// binds a window of K and V that reads nothing, still a whole number of
/// words, and its rows come out as zeros with logsumexp +inf; the rows of
/// a sequence with keys match the reference.
#[test]
fn a_dispatch_without_keys_binds_whole_words_under_an_odd_binding_limit() {
    let Some(_) = gpu() else { return };
    let binding = (64 << 10) + 2;
    let gpu = small_binding_gpu(binding);
    assert_eq!(gpu.info().limits.max_storage_buffer_binding_size, binding);
    let shape = AttentionShape {
        batch: 2,
        seq_q: 5,
        seq_kv: 300,
        heads_q: 2,
        heads_kv: 2,
        head_dim: 64,
        head_dim_v: 64,
    };
    assert!(4 * shape.k_shape().elements() as u64 > binding);
    let inputs = Inputs::draw(&shape, 0x0cb, 1.0);
    let [q, k, v] = upload(&gpu, &shape, &inputs, DType::F32);
    let config = AttentionConfig::new();
    for kv in [[0, 0], [300, 0]] {
        let lengths = ValidLengths { q: None, kv: &kv };
        let options = ForwardOptions::new(&config).valid_lengths(lengths);
        let (out, lse) = run(&gpu, &shape, [&q, &k, &v], options)
            .unwrap_or_else(|e| panic!("valid key lengths {kv:?}: {e}"));
        let row = shape.seq_q * shape.heads_q * shape.head_dim;
        let rows_lse = shape.heads_q * shape.seq_q;
        for entry in 0..shape.batch {
            let (out, lse) = (
                &out[entry * row..(entry + 1) * row],
                &lse[entry * rows_lse..(entry + 1) * rows_lse],
            );
            if kv[entry] == 0 {
                assert!(
                    out.iter().all(|&x| x == 0.0),
                    "{kv:?}: entry {entry}'s output"
                );
                assert!(
                    lse.iter().all(|&x| x == f32::INFINITY),
                    "{kv:?}: entry {entry}'s lse"
                );
                continue;
            }
            let keys = shape.seq_kv * shape.heads_kv * shape.head_dim;
            let want = reference::attention(
                &AttentionShape { batch: 1, ..shape },
                &inputs.q[entry * row..(entry + 1) * row],
                &inputs.k[entry * keys..(entry + 1) * keys],
                &inputs.v[entry * keys..(entry + 1) * keys],
                &config,
            )
            .unwrap();
            assert_rows_close(out, &want.out, &format!("{kv:?}: entry {entry}"));
        }
    }
}

/// What cannot be chunked is refused with the numbers.
#[test]
fn what_cannot_be_chunked_is_a_typed_error() {
    let Some(shared) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 16, 2, 32);
    let inputs = Inputs::draw(&shape, 0x0c9, 1.0);
    let [q, k, v] = upload(shared, &shape, &inputs, DType::F32);
    let config = AttentionConfig::new();
    assert!(matches!(
        run(
            shared,
            &shape,
            [&q, &k, &v],
            ForwardOptions::new(&config).keys_per_dispatch(0)
        ),
        Err(Error::KeysPerDispatch(0))
    ));
    let mask =
        wgpu_flash_attn::AttentionMask::boolean(shared, [1, 1, 16, 16], &[true; 256]).unwrap();
    assert!(matches!(
        run(
            shared,
            &shape,
            [&q, &k, &v],
            ForwardOptions::new(&config)
                .mask(&mask)
                .keys_per_dispatch(8)
        ),
        Err(Error::UnsupportedCombination { .. })
    ));

    // Past one binding, the masked and naive kernels (which bind K whole)
    // refuse; so does a key whose heads alone outgrow a binding.
    let binding = 16 << 10;
    let gpu = small_binding_gpu(binding);
    let long = AttentionShape {
        seq_q: 4,
        ..AttentionShape::self_attention(1, 256, 2, 32)
    };
    let inputs = Inputs::draw(&long, 0x0ca, 1.0);
    let [q, k, v] = upload(&gpu, &long, &inputs, DType::F32);
    // The mask's bits (128 bytes) fit the small binding.
    let mask =
        wgpu_flash_attn::AttentionMask::boolean(&gpu, [1, 1, 4, 256], &[true; 1024]).unwrap();
    let got = run(
        &gpu,
        &long,
        [&q, &k, &v],
        ForwardOptions::new(&config).mask(&mask),
    );
    assert!(
        matches!(got, Err(Error::BufferTooLarge { tensor: "k", limit, .. }) if limit == binding),
        "{got:?}"
    );
    let out = Tensor::filled(&gpu, long.o_shape(), f32::NAN).unwrap();
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    let naive = gpu.run(|e| gpu.naive_attention(e, &args, &config).map(|_| ()));
    assert!(
        matches!(naive, Err(Error::BufferTooLarge { tensor: "k", .. })),
        "{naive:?}"
    );
    let wide = AttentionShape {
        seq_q: 1,
        seq_kv: 4,
        heads_q: 64,
        heads_kv: 64,
        head_dim: 64,
        ..long
    };
    let inputs = Inputs::draw(&wide, 0x0cb, 1.0);
    let [q, k, v] = upload(&gpu, &wide, &inputs, DType::F32);
    let got = run(&gpu, &wide, [&q, &k, &v], (&config).into());
    assert!(
        matches!(got, Err(Error::BufferTooLarge { tensor: "k", .. })),
        "{got:?}"
    );
}

/// The carry between chunks is scratch the `Gpu` keeps for the next call
/// (`scratch_bytes`), and `release_scratch` drops it; a later chunked call
/// allocates it again and is still exact. (A device of its own, so no
/// other test's calls touch its scratch.)
#[test]
fn chunk_scratch_is_reported_and_released() {
    let Some(_) = gpu() else { return };
    let gpu = Gpu::new().expect("a second device on the adapter");
    let shape = AttentionShape::self_attention(1, 90, 2, 32);
    let inputs = Inputs::draw(&shape, 0x5c7a, 1.0);
    let tensors = upload(&gpu, &shape, &inputs, DType::F32);
    let tensors = [&tensors[0], &tensors[1], &tensors[2]];
    let config = AttentionConfig::new().causal(true);
    assert_eq!(gpu.scratch_bytes(), 0, "a new device holds no scratch");
    // f32 outputs of every (row, head) carried between the chunks.
    let carry = (shape.seq_q * shape.heads_q * shape.head_dim_v * 4) as u64;
    for round in 0..2 {
        let options = ForwardOptions::new(&config).keys_per_dispatch(16);
        let (got, got_lse) = run(&gpu, &shape, tensors, options).unwrap();
        assert_close(
            compare(&shape, &inputs, &config, &got, &got_lse),
            &format!("round {round}"),
        );
        assert!(
            gpu.scratch_bytes() >= carry,
            "round {round}: {} bytes of scratch, the carry alone is {carry}",
            gpu.scratch_bytes()
        );
        gpu.release_scratch();
        assert_eq!(gpu.scratch_bytes(), 0, "round {round}: released");
    }
}
