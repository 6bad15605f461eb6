//! llvmpipe (lavapipe, and llvmpipe on GL) stops every loop of a shader
//! invocation once they have run 65535 iterations together, silently. The
//! planners model each kernel's loop trips (`Specialization::loop_trips`,
//! and the merge's): at the most keys (or splits, or parts) the model
//! allows, results are exact; one step further, the forward runs its keys
//! in two dispatches, decoding adds splits, and what cannot split (a
//! forced split count, the masked forward, the naive baseline, the
//! backward, a merge) refuses with a typed error. At each bound the input
//! met in the loop's last trip is heavy, so a loop stopped even one trip
//! early fails the comparison (a budget raised by 5 trips fails the merge,
//! decode and naive cases here; by 65, the default forward's).

mod common;

use common::{Implementation, Inputs, gpu};
use wgpu_flash_attn::reference::HostMask;
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, BackwardPlan, CacheShape, DType,
    DecodeArgs, DecodeOptions, DecodePlan, Error, ForwardOptions, ForwardPlan, Gpu, KvCache,
    KvCacheConfig, KvDType, KvLayout, LinearArgs, LinearConfig, LinearPlan, LinearShape, Lse,
    NaivePlan, Tensor, Tier, reference,
};

/// The adapter's loop budget, or `None` (having said the test skips)
/// where nothing caps shader loops.
fn budget_or_skip(gpu: &Gpu) -> Option<u64> {
    let budget = gpu.info().loop_budget();
    if budget.is_none() {
        eprintln!("SKIPPED: this adapter caps no shader loops; nothing to check");
    }
    budget
}

/// The largest `n` in `[lo, hi)` that `allowed` takes, by bisection, given
/// that it takes `lo`, refuses `hi` and refuses every `n` past one it
/// refuses. (`n + 1` is then the smallest it refuses.)
fn largest_allowed(mut lo: usize, mut hi: usize, allowed: impl Fn(usize) -> bool) -> usize {
    assert!(allowed(lo) && !allowed(hi), "bisection over [{lo}, {hi}]");
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if allowed(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// One batch entry, one KV head and d=8: the narrowest shape, so a bound
/// of millions of keys fits in memory and runs in a second.
fn narrow(seq_q: usize, seq_kv: usize, heads_q: usize) -> AttentionShape {
    AttentionShape {
        batch: 1,
        seq_q,
        seq_kv,
        heads_q,
        heads_kv: 1,
        head_dim: 8,
        head_dim_v: 8,
    }
}

#[test]
fn the_longest_single_dispatch_and_the_next_key_are_both_exact() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    // The portable tier stages K/V through workgroup memory in a loop, so
    // it meets the cap first: tens of thousands of keys, not millions.
    let tier = Some(Tier::Portable);
    let shape_at = |seq_kv| AttentionShape {
        batch: 1,
        seq_q: 3,
        seq_kv,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 64,
        head_dim_v: 64,
    };
    let plan = ForwardPlan::for_call(gpu.info(), &shape_at(64), DType::F32, tier).unwrap();
    let lo = plan
        .keys_per_dispatch()
        .expect("a capped adapter limits keys") as usize;
    let spec_trips = |keys| plan.loop_trips(keys);
    assert!(spec_trips(lo as u64) <= budget && spec_trips(lo as u64 + 1) > budget);
    eprintln!("portable tier, d=64: at most {lo} keys per dispatch under a budget of {budget}");
    // At the bound one dispatch; one key more, two chunks: both exact.
    for (seq_kv, chunks) in [(lo, 1), (lo + 1, 2)] {
        assert_eq!(plan.key_chunks(seq_kv), chunks);
        let shape = shape_at(seq_kv);
        let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_100b, 1.0));
        let config = AttentionConfig::new().tier(Tier::Portable).causal(true);
        let errors = common::run_with(gpu, Implementation::Flash, &shape, &inputs, &config);
        common::assert_close(errors, &format!("portable tier, {seq_kv} keys"));
    }
}

/// `inputs` with the last key's value raised to 1e5 in every head. Every
/// row that sees that key then carries ~1e5 / keys of it in its output:
/// a loop the driver stopped one trip early would drop it and move the
/// output far past the tolerance, where one ordinary key among ~10^5 would
/// move it by less.
fn heavy_last_value(shape: &AttentionShape, mut inputs: Inputs) -> Inputs {
    let position = shape.heads_kv * shape.head_dim_v;
    for b in 0..shape.batch {
        let last = (b * shape.seq_kv + shape.seq_kv - 1) * position;
        inputs.v[last..last + position].fill(1e5);
    }
    inputs
}

/// Uploads `inputs`, records `call` on them (the forward, the naive
/// baseline) and downloads the output, or the call's error: for the calls
/// a test expects refused (`common::run_with` unwraps).
fn run_attention<T>(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    call: impl FnOnce(&mut wgpu::CommandEncoder, &AttentionArgs<'_>) -> Result<T, Error>,
) -> Result<Vec<f32>, Error> {
    let [q, k, v, out] = common::upload(gpu, shape, inputs);
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    gpu.run(|e| call(e, &args))?;
    out.to_f32_vec(gpu)
}

/// The default tier's model at d=8, where one dispatch takes the most keys
/// (~230K on lavapipe): at its bound one dispatch and one key more two,
/// both exact; the masked kernel, which cannot split its keys, exact at
/// the same bound and refused one key past it.
#[test]
fn the_default_tiers_longest_dispatch_and_the_masked_bound_are_exact() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    // 130 query rows: past the rows that run as decoding on CPU adapters
    // (DecodePlan::for_forward), so the forward kernel itself meets the cap.
    let shape_at = |seq_q, seq_kv| narrow(seq_q, seq_kv, 1);
    let plan = ForwardPlan::for_call(gpu.info(), &shape_at(130, 64), DType::F32, None).unwrap();
    let lo = plan
        .keys_per_dispatch()
        .expect("a capped adapter limits keys") as usize;
    assert!(plan.loop_trips(lo as u64) <= budget && plan.loop_trips(lo as u64 + 1) > budget);
    eprintln!(
        "{:?} tier, d=8: at most {lo} keys per dispatch",
        plan.tier()
    );
    let config = AttentionConfig::new();
    for (seq_kv, chunks) in [(lo, 1), (lo + 1, 2)] {
        let shape = shape_at(130, seq_kv);
        assert!(DecodePlan::for_forward(gpu.info(), &shape, DType::F32, &config).is_none());
        assert_eq!(plan.key_chunks(seq_kv), chunks);
        let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_100e, 1.0));
        let errors = common::run_with(gpu, Implementation::Flash, &shape, &inputs, &config);
        common::assert_close(errors, &format!("{seq_kv} keys in {chunks} dispatch(es)"));
    }
    // A boolean mask hiding a random quarter of the keys, never the last.
    for (seq_kv, allowed) in [(lo, true), (lo + 1, false)] {
        let shape = shape_at(3, seq_kv);
        let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_100f, 1.0));
        let keep: Vec<bool> = (0..3 * seq_kv)
            .map(|i| i % seq_kv == seq_kv - 1 || (i.wrapping_mul(2_654_435_761) >> 7) % 4 != 0)
            .collect();
        let dims = [1, 1, 3, seq_kv];
        let mask = AttentionMask::boolean(gpu, dims, &keep).unwrap();
        let options = ForwardOptions::new(&config).mask(&mask);
        let masked = run_attention(gpu, &shape, &inputs, |e, args| {
            gpu.forward(e, args, options)
        });
        match (masked, allowed) {
            (Ok(got), true) => {
                let host = HostMask::Bool {
                    dims,
                    values: &keep,
                };
                let want = reference::attention_masked(
                    &shape, &inputs.q, &inputs.k, &inputs.v, &config, &host,
                )
                .unwrap();
                let err = common::max_abs_error(&got, &want.out, "masked");
                assert!(err <= 1e-4, "masked, {seq_kv} keys: max error {err:.2e}");
            }
            (Err(Error::LoopBudget { keys, trips, .. }), false) => {
                assert!(keys == seq_kv as u64 && trips > budget)
            }
            (other, _) => panic!("masked, {seq_kv} keys: {:?}", other.map(|_| "ran")),
        }
    }
}

/// The naive baseline's three passes cannot split their keys: at the most
/// keys its model allows it is exact, one key more is refused.
#[test]
fn the_naive_baselines_longest_call_is_exact_and_the_next_is_refused() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    let shape_at = |seq_kv| narrow(3, seq_kv, 1);
    let allowed = |n| NaivePlan::for_call(gpu.info(), &shape_at(n), DType::F32, None).is_ok();
    let lo = largest_allowed(64, 1 << 22, allowed);
    let hi = lo + 1;
    eprintln!("naive, d=8: at most {lo} keys under a budget of {budget}");
    let config = AttentionConfig::new();
    for (seq_kv, allowed) in [(lo, true), (hi, false)] {
        let shape = shape_at(seq_kv);
        let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_1010, 1.0));
        if allowed {
            let errors = common::run_with(gpu, Implementation::Naive, &shape, &inputs, &config);
            common::assert_close(errors, &format!("naive, {seq_kv} keys"));
            continue;
        }
        let result = run_attention(gpu, &shape, &inputs, |e, args| {
            gpu.naive_attention(e, args, &config)
        });
        assert!(
            matches!(result, Err(Error::LoopBudget { trips, .. }) if trips > budget),
            "naive, {seq_kv} keys: {:?}",
            result.map(|_| "ran")
        );
    }
}

#[test]
fn decoding_splits_long_caches_under_the_budget() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    let len = 40_000;
    let mut cache = KvCache::new(
        gpu,
        KvCacheConfig::new(1, 1, 128, KvLayout::Contiguous { capacity: len }),
    )
    .unwrap();
    // Random keys and values: a loop the driver cut short would drop keys
    // and move the output away from the reference's.
    let shape = AttentionShape {
        batch: 1,
        seq_q: 1,
        seq_kv: len,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 128,
        head_dim_v: 128,
    };
    let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_100c, 1.0));
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    gpu.run(|e| cache.append(gpu, e, &k, &v, None)).unwrap();
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let want = reference::attention(
        &shape,
        &inputs.q,
        &inputs.k,
        &inputs.v,
        &AttentionConfig::new(),
    )
    .unwrap();
    let fresh_out = || Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    // The portable decode kernel spends ~74 trips per 16 keys at d=128,
    // so one workgroup may take ~14K keys; the subgroup tier ~260K.
    for tier in [None, Some(Tier::Portable)] {
        let mut config = AttentionConfig::new();
        if let Some(tier) = tier {
            config = config.tier(tier);
        }
        let out = fresh_out();
        let args = DecodeArgs {
            q: &q,
            cache: &cache,
            out: &out,
            lse: None,
        };
        let plan = gpu.run(|e| gpu.decode(e, &args, &config)).unwrap();
        let trips = plan.loop_trips();
        assert!(trips <= budget, "{plan:?}: {trips} trips");
        let got = out.to_f32_vec(gpu).unwrap();
        let err = common::max_abs_error(&got, &want.out, &format!("{tier:?}"));
        assert!(
            err <= common::F32_TOLERANCE,
            "{tier:?}: max error {err:.2e}"
        );
    }
    let out = fresh_out();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let one_split = DecodeOptions::new(&AttentionConfig::new().tier(Tier::Portable)).kv_splits(1);
    assert!(matches!(
        gpu.run(|e| gpu.decode(e, &args, one_split.clone())),
        Err(Error::LoopBudget { .. })
    ));
}

/// Decoding forced to one split walks every key of a sequence in one
/// workgroup (lanes over keys on lavapipe, ~2M keys at d=8; the portable
/// kernel on GL): at the most keys its model allows it is exact, one key
/// more is refused (a forced split count is not raised).
#[test]
fn one_split_decodes_exactly_at_its_bound_and_one_key_more_is_refused() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    let shape_at = |seq_kv| narrow(1, seq_kv, 2);
    let config = AttentionConfig::new();
    let one_split = DecodeOptions::new(&config).kv_splits(1);
    let allowed = |n| {
        let cache = CacheShape::of_call(&shape_at(n), KvDType::F32);
        DecodePlan::for_call(gpu.info(), &cache, 1, 2, &one_split).is_ok()
    };
    let lo = largest_allowed(64, 1 << 24, allowed);
    let hi = lo + 1;
    eprintln!("decode, one split, d=8: at most {lo} keys under a budget of {budget}");
    let shape = shape_at(lo);
    let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_1011, 1.0));
    let mut cache = KvCache::new(
        gpu,
        KvCacheConfig::new(1, 1, 8, KvLayout::Contiguous { capacity: hi }),
    )
    .unwrap();
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    gpu.run(|e| cache.append(gpu, e, &k, &v, None)).unwrap();
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let plan = gpu
        .run(|e| gpu.decode(e, &args, one_split.clone()))
        .unwrap();
    assert_eq!(plan.splits, 1);
    let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
    let err = common::max_abs_error(&out.to_f32_vec(gpu).unwrap(), &want.out, "one split");
    assert!(err <= 1e-4, "{lo} keys in one split: max error {err:.2e}");
    // One token more (its values are whatever the pool held: never read).
    cache.set_len(0, hi).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: None,
    };
    let result = gpu.run(|e| gpu.decode(e, &args, one_split.clone()));
    assert!(
        matches!(result, Err(Error::LoopBudget { keys, trips, .. })
            if keys == hi as u64 && trips > budget),
        "{hi} keys in one split: {result:?}"
    );
}

/// Non-causal linear attention splits its keys so that each split's state
/// pass stays under the cap: at the longest call whose splits each take
/// the most keys the model allows (~262K at d=8 on lavapipe, ~2M keys in
/// all on two cores), the output is exact, and one key more takes another
/// split.
#[test]
fn linear_attention_splits_at_their_bound_are_exact() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    let shape_at = |seq_kv| LinearShape {
        batch: 1,
        seq_q: 2,
        seq_kv,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 8,
        head_dim_v: 8,
    };
    let config = LinearConfig::new();
    let splits_at = |n| {
        LinearPlan::for_call(gpu.info(), &shape_at(n), DType::F32, &config)
            .unwrap()
            .splits()
    };
    // The split count a call takes until the budget asks for more, and
    // the longest call that keeps it.
    let base = splits_at(1 << 16);
    let lo = largest_allowed(1 << 16, 1 << 28, |n| splits_at(n) == base);
    let plan = LinearPlan::for_call(gpu.info(), &shape_at(lo), DType::F32, &config).unwrap();
    assert_eq!(plan.split_keys() * base, lo, "{plan:?}");
    eprintln!(
        "linear, d=8: {base} splits of at most {} keys under a budget of {budget}",
        plan.split_keys()
    );
    let k_bytes = lo * 8 * 4;
    if k_bytes > 128 << 20 {
        eprintln!(
            "SKIPPED: this machine's {} host threads ask for {base} splits, so the bound lies at \
             {lo} keys ({} MiB of K), more than this test allocates",
            gpu.info().host_threads,
            k_bytes >> 20
        );
        return;
    }
    let shape = shape_at(lo);
    let attention = narrow(2, lo, 1);
    let inputs = heavy_last_value(&attention, Inputs::draw(&attention, 0x5eed_1012, 0.5));
    let tensor = |dims, data: &[f32]| Tensor::from_f32(gpu, dims, data).unwrap();
    let (q, k, v) = (
        tensor(shape.q_shape(), &inputs.q),
        tensor(shape.k_shape(), &inputs.k),
        tensor(shape.v_shape(), &inputs.v),
    );
    let out = Tensor::filled(gpu, shape.out_shape(), f32::NAN).unwrap();
    let args = LinearArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        state: None,
    };
    gpu.run(|e| gpu.linear_attention(e, &args, &config))
        .unwrap();
    let want = reference::linear_attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config, None)
        .unwrap();
    let err = common::max_abs_error(&out.to_f32_vec(gpu).unwrap(), &want.out, "linear");
    assert!(err <= 1e-4, "linear, {lo} keys: max error {err:.2e}");
}

/// Split-KV decoding merges its partial results in two loops over them (a
/// max, then the weighted sum), which share the cap with everything else an
/// invocation runs: the most splits whose merge fits decode exactly; one
/// more is refused, not merged in part.
#[test]
fn the_most_splits_the_merge_allows_are_exact_and_one_more_is_refused() {
    let Some(gpu) = gpu() else { return };
    let Some(budget) = budget_or_skip(gpu) else {
        return;
    };
    let shape_at = |seq_kv| narrow(1, seq_kv, 2);
    let split_plan = |splits: usize| {
        let cache = CacheShape::of_call(&shape_at(splits), KvDType::F32);
        let options = DecodeOptions::new(&AttentionConfig::new()).kv_splits(splits);
        DecodePlan::for_call(gpu.info(), &cache, 1, 2, &options)
    };
    // Each split one key: the most splits the merge allows, found by
    // bisection over the planner (a plan that undercounted the merge's
    // trips would lose the last splits' keys below).
    let lo = largest_allowed(2, 1 << 16, |n| split_plan(n).is_ok());
    let hi = lo + 1;
    eprintln!("decode: at most {lo} splits under a budget of {budget}");
    match split_plan(hi) {
        Err(Error::MergeLoopBudget {
            parts,
            trips,
            budget: b,
        }) => assert!(parts == hi as u64 && trips > b && b == budget),
        other => panic!("{hi} splits: expected MergeLoopBudget, got {other:?}"),
    }
    let shape = shape_at(hi);
    let mut cache = KvCache::new(
        gpu,
        KvCacheConfig::new(1, 1, 8, KvLayout::Contiguous { capacity: hi }),
    )
    .unwrap();
    let inputs = heavy_last_value(&shape, Inputs::draw(&shape, 0x5eed_100d, 1.0));
    let k = Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap();
    gpu.run(|e| cache.append(gpu, e, &k, &v, None)).unwrap();
    let q = Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap();
    let config = AttentionConfig::new();
    let want = reference::attention(&shape, &inputs.q, &inputs.k, &inputs.v, &config).unwrap();
    let out = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let lse = Lse::new(gpu, 1, 2, 1).unwrap();
    let args = DecodeArgs {
        q: &q,
        cache: &cache,
        out: &out,
        lse: Some(&lse),
    };
    for (splits, allowed) in [(lo, true), (hi, false)] {
        let options = DecodeOptions::new(&config).kv_splits(splits);
        let result = gpu.run(|e| gpu.decode(e, &args, options));
        if !allowed {
            assert!(
                matches!(result, Err(Error::MergeLoopBudget { .. })),
                "{splits} splits: {result:?}"
            );
            continue;
        }
        assert_eq!(result.unwrap().slots as usize, splits);
        let got = out.to_f32_vec(gpu).unwrap();
        let err = common::max_abs_error(&got, &want.out, &format!("{splits} splits"));
        assert!(err <= 1e-4, "{splits} splits: max error {err:.2e}");
        let got_lse = lse.to_vec(gpu).unwrap();
        let err = common::max_abs_error(&got_lse, &want.lse, &format!("{splits} splits, lse"));
        assert!(err <= 1e-4, "{splits} splits: lse error {err:.2e}");
    }
    // Gpu::merge has the same bound. Its parts: lo - 1 of zeros and a last
    // one of 1e4, every logsumexp 0, so the merge is 1e4 / lo and its
    // logsumexp ln lo, exactly in f32 but for the last rounding; dropping
    // the last part would give zeros. One part more is refused.
    let zeros = Tensor::filled(gpu, shape.q_shape(), 0.0).unwrap();
    let heavy = Tensor::filled(gpu, shape.q_shape(), 1e4).unwrap();
    // (A zero tensor's buffer, wide enough, holds the zero logsumexps.)
    let lse_zeros = Lse::from_buffer(gpu, zeros.buffer().clone(), 1, 2, 1).unwrap();
    let mut parts = vec![(&zeros, &lse_zeros); hi - 1];
    parts.push((&heavy, &lse_zeros));
    let merged = Tensor::filled(gpu, shape.q_shape(), f32::NAN).unwrap();
    let merged_lse = Lse::new(gpu, 1, 2, 1).unwrap();
    assert!(matches!(
        gpu.run(|e| gpu.merge(e, &parts, &merged, Some(&merged_lse))),
        Err(Error::MergeLoopBudget { parts, .. }) if parts == hi as u64
    ));
    let parts = &parts[hi - lo..];
    gpu.run(|e| gpu.merge(e, parts, &merged, Some(&merged_lse)))
        .unwrap();
    let want = vec![1e4 / lo as f64; shape.q_shape().elements()];
    let err = common::max_abs_error(&merged.to_f32_vec(gpu).unwrap(), &want, "merged parts");
    assert!(err <= 1e-6, "{lo} merged parts: max error {err:.2e}");
    let want_lse = vec![(lo as f64).ln(); 2];
    let err = common::max_abs_error(&merged_lse.to_vec(gpu).unwrap(), &want_lse, "merged lse");
    assert!(err <= 1e-5, "{lo} merged parts: lse error {err:.2e}");
}

/// The backward's passes under the cap, on the default tier and on the
/// register-blocked passes: the key pass walks every query row of every
/// head of its KV group, the query pass every key. At the longest call the
/// model allows each gradient is exact (a model that undercounted would
/// truncate the loops here); one row or key more is refused.
#[test]
fn the_longest_allowed_backward_is_exact_and_the_next_is_refused() {
    let Some(gpu) = gpu() else { return };
    if budget_or_skip(gpu).is_none() {
        return;
    }
    let gqa = |seq_q| narrow(seq_q, 64, 8);
    let long_keys = |seq_kv| narrow(8, seq_kv, 1);
    let cases: [(&str, &dyn Fn(usize) -> AttentionShape); 2] = [
        ("key pass, 8 query heads per KV head", &gqa),
        ("query pass", &long_keys),
    ];
    for tier in [None, Some(Tier::RegisterBlocked)] {
        for (what, shape_at) in cases {
            let what = format!("{what}, tier {tier:?}");
            check_backward_budget(gpu, &what, shape_at, tier);
        }
    }
}

/// Finds the longest call `shape_at(n)` the backward's model allows on
/// `tier`, checks it against the reference and that `n + 1` is refused.
fn check_backward_budget(
    gpu: &Gpu,
    what: &str,
    shape_at: &dyn Fn(usize) -> AttentionShape,
    tier: Option<Tier>,
) {
    {
        let allowed = |n: usize| {
            let shape = shape_at(n);
            BackwardPlan::for_call(gpu.info(), &shape, DType::F32, tier)
                .and_then(|plan| plan.check_limits(gpu.info(), &shape))
                .is_ok()
        };
        let lo = largest_allowed(64, 1 << 22, allowed);
        let hi = lo + 1;
        eprintln!("backward {what}: at most {lo}");
        let mut config = AttentionConfig::new();
        config.tier = tier;
        let run = |shape: &AttentionShape| {
            // The last key's value and the last query row's output
            // gradient are heavy: each pass meets one of them in its last
            // trip (the query pass walks keys, the key pass rows), so a
            // pass stopped early moves its gradients past the tolerance.
            let inputs = heavy_last_value(shape, Inputs::draw(shape, 0x5eed_0b0b, 1.0));
            let mut d_out = Inputs::draw(shape, 0x5eed_0b0c, 1.0).q;
            let row = shape.heads_q * shape.head_dim_v;
            for b in 0..shape.batch {
                let last = (b * shape.seq_q + shape.seq_q - 1) * row;
                d_out[last..last + row].fill(1e5);
            }
            let got = gpu.attention_backward_host(
                shape,
                [&inputs.q, &inputs.k, &inputs.v, &d_out],
                &config,
            )?;
            Ok::<_, Error>((got, inputs, d_out))
        };
        match run(&shape_at(hi)) {
            Err(Error::LoopBudget { trips, budget, .. }) => assert!(trips > budget),
            Err(other) => panic!("{what}: expected LoopBudget, got {other}"),
            Ok(_) => panic!("{what}: {hi} was accepted"),
        }
        let shape = shape_at(lo);
        let (got, inputs, d_out) = run(&shape).unwrap();
        let want = reference::attention_backward(
            &shape,
            [&inputs.q, &inputs.k, &inputs.v, &d_out],
            &config,
            None,
        )
        .unwrap();
        for (name, got, want) in [
            ("dq", &got.dq, &want.dq),
            ("dk", &got.dk, &want.dk),
            ("dv", &got.dv, &want.dv),
        ] {
            let magnitude = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
            let worst = common::max_abs_error(got, want, &format!("{what}: {name}")) / magnitude;
            assert!(worst <= 2e-5, "{what}: {name} relative error {worst:.3e}");
        }
    }
}
