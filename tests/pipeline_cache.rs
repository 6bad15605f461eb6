//! Repeated calls reuse pipelines: the cache size stays constant.

mod common;

use common::{Inputs, assert_close, gpu, run_and_compare, with_tier};
use wgpu_flash_attn::{AttentionConfig, AttentionShape, DType, SkippedChecks, Tier};

#[test]
fn repeated_calls_compile_nothing() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 33, 2, 64);
    let inputs = Inputs::draw(&shape, 7, 1.0);
    let config = AttentionConfig::new();
    let first = gpu
        .attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
        .unwrap();
    let after_first = gpu.pipeline_count();
    assert!(after_first >= 1);
    for causal in [false, true, false] {
        // Options are runtime parameters, not specializations.
        let config = AttentionConfig::new().causal(causal);
        gpu.attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
            .unwrap();
        assert_eq!(
            gpu.pipeline_count(),
            after_first,
            "a repeated call compiled a pipeline"
        );
    }
    // Same inputs, same pipeline: bit-identical output.
    let again = gpu
        .attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
        .unwrap();
    assert_eq!(first.out, again.out);

    // A new head dim is a new specialization: exactly one more pipeline.
    let shape = AttentionShape::self_attention(1, 33, 2, 32);
    let inputs = Inputs::draw(&shape, 8, 1.0);
    gpu.attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
        .unwrap();
    assert_eq!(gpu.pipeline_count(), after_first + 1);
}

/// The cache keeps at most its capacity, evicting the least recently used;
/// a call that needs an evicted pipeline compiles it again and gets the
/// same result.
#[test]
fn pipeline_cache_is_bounded_least_recently_used() {
    // Own device: the capacity is per Gpu, and the test devices (`gpu()`) serve the
    // other tests of this binary.
    let Some(_) = gpu() else { return };
    let gpu = wgpu_flash_attn::Gpu::new().unwrap();
    assert_eq!(gpu.pipeline_capacity(), 64);
    gpu.set_pipeline_capacity(2);
    let config = AttentionConfig::new();
    let run = |head_dim: usize| {
        let shape = AttentionShape::self_attention(1, 21, 2, head_dim);
        let inputs = Inputs::draw(&shape, head_dim as u64, 1.0);
        gpu.attention_host(&shape, &inputs.q, &inputs.k, &inputs.v, &config)
            .unwrap()
            .out
    };
    let first = run(16);
    run(32);
    run(48);
    assert_eq!(gpu.pipeline_count(), 2, "48 evicted 16");
    assert_eq!(run(16), first, "a recompiled pipeline gives the same bits");
    assert_eq!(gpu.pipeline_count(), 2);
    gpu.set_pipeline_capacity(1);
    assert_eq!(gpu.pipeline_count(), 1);
}

/// Kernels compile by default without wgpu's loop counters
/// (`SkippedChecks::CRATE_DEFAULT`), with every check
/// (`skip_shader_runtime_checks_of(SkippedChecks::default())`, replacing
/// the compiled pipelines) and without any (the measurement switch
/// `Gpu::skip_shader_runtime_checks`), and match the reference each way,
/// on the planner's default and the register-blocked kernel; so do
/// kernels without one check.
#[test]
fn kernels_without_runtime_checks_match_the_reference() {
    // Own device: the switch is per Gpu, and the test devices serve the
    // other tests of this binary.
    let Some(_) = gpu() else { return };
    let gpu = wgpu_flash_attn::Gpu::new().unwrap();
    // d=16: each of the four check sets compiles the kernels again, and on
    // a cold lavapipe d=40's per-row kernels take 4x as long (73 s against
    // 18 s for the test).
    let shape = AttentionShape {
        heads_kv: 1,
        ..AttentionShape::self_attention(2, 37, 3, 16)
    };
    let inputs = Inputs::draw(&shape, 20261204, 1.0);
    let config = AttentionConfig::new().causal(true);
    // The planner's default and the register-blocked kernel against the
    // reference, compiling at least one pipeline.
    let run_every_tier = |how: &str| {
        for tier in [None, Some(Tier::RegisterBlocked)] {
            assert_close(
                run_and_compare(&gpu, &shape, &inputs, &with_tier(&config, tier)),
                &format!("{tier:?} {how}"),
            );
        }
        assert!(gpu.pipeline_count() >= 1);
    };
    // The crate's default: without the loop counters (every kernel's loops
    // are proven finite), with the index clamps and division guards.
    assert_eq!(
        gpu.skipped_shader_runtime_checks(),
        SkippedChecks::CRATE_DEFAULT
    );
    run_every_tier("by default");
    // SAFETY: skips nothing.
    unsafe { gpu.skip_shader_runtime_checks_of(SkippedChecks::default()) };
    assert!(!gpu.shader_runtime_checks_skipped());
    assert_eq!(gpu.pipeline_count(), 0, "the default pipelines are dropped");
    run_every_tier("checked");
    // SAFETY: the crate's kernels, compared with the reference below.
    unsafe { gpu.skip_shader_runtime_checks() };
    assert!(gpu.shader_runtime_checks_skipped());
    assert_eq!(gpu.pipeline_count(), 0, "the checked pipelines are dropped");
    run_every_tier("unchecked");
    // One check at a time (`flash-bench --skip-checks`): the division
    // guards off, the index clamps and loop bounds on.
    let division = SkippedChecks {
        division: true,
        ..SkippedChecks::default()
    };
    // SAFETY: as above.
    unsafe { gpu.skip_shader_runtime_checks_of(division) };
    assert_eq!(gpu.skipped_shader_runtime_checks(), division);
    assert_eq!(
        gpu.pipeline_count(),
        0,
        "the unchecked pipelines are dropped"
    );
    assert_close(
        run_and_compare(&gpu, &shape, &inputs, &config),
        "without division guards",
    );
    // SAFETY: skips nothing.
    unsafe { gpu.skip_shader_runtime_checks_of(SkippedChecks::default()) };
    assert!(!gpu.shader_runtime_checks_skipped());
    assert_eq!(gpu.pipeline_count(), 0);
}

/// A replaced shader file (`Gpu::override_shader_file`) drops the compiled
/// pipelines and is what the next call compiles: a copy of the kernel's own
/// file matches the reference, and a file whose block loop was cut short
/// (every key tile skipped) gives the wrong answer the reference catches;
/// a name the crate has no file of is a typed error.
#[test]
fn a_replaced_shader_file_is_what_the_next_call_compiles() {
    let Some(_) = gpu() else { return };
    let gpu = wgpu_flash_attn::Gpu::new().unwrap();
    let shape = AttentionShape::self_attention(1, 45, 2, 32);
    let inputs = Inputs::draw(&shape, 20261205, 1.0);
    let config = with_tier(&AttentionConfig::new(), Some(Tier::RegisterBlocked));
    assert_close(run_and_compare(&gpu, &shape, &inputs, &config), "built in");
    assert!(gpu.pipeline_count() >= 1);
    let kernel = include_str!("../shaders/flash_blocked.wgsl");
    gpu.override_shader_file("flash_blocked.wgsl", format!("{kernel}// a copy\n"))
        .unwrap();
    assert_eq!(
        gpu.pipeline_count(),
        0,
        "the pipelines compiled before are dropped"
    );
    assert_close(run_and_compare(&gpu, &shape, &inputs, &config), "a copy");
    let loop_header = "for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {";
    assert!(kernel.contains(loop_header), "the kernel's key loop moved");
    let skipping = kernel.replace(
        loop_header,
        "for (var kv0 = wg_hi + 1; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {",
    );
    gpu.override_shader_file("flash_blocked.wgsl", skipping)
        .unwrap();
    let errors = run_and_compare(&gpu, &shape, &inputs, &config);
    assert!(errors.out > 1e-2, "the replaced kernel ran: {errors:?}");
    // A loop whose end the crate cannot prove (its step read at run time)
    // keeps wgpu's loop counter, and the kernel still runs right.
    let runtime_step = kernel.replace(
        loop_header,
        "for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N * max(p.batch, 1u) / p.batch)) {",
    );
    gpu.override_shader_file("flash_blocked.wgsl", runtime_step)
        .unwrap();
    let plan =
        wgpu_flash_attn::ForwardPlan::for_config(gpu.info(), &shape, DType::F32, &config).unwrap();
    let why = wgpu_flash_attn::unproven_loop(&gpu.forward_wgsl(&plan).unwrap());
    assert!(
        why.as_deref().is_some_and(|w| w.contains("not a constant")),
        "{why:?}"
    );
    assert_close(
        run_and_compare(&gpu, &shape, &inputs, &config),
        "a loop kept bounded",
    );
    let err = gpu
        .override_shader_file("flash_blocked", kernel)
        .unwrap_err();
    assert!(
        matches!(&err, wgpu_flash_attn::Error::UnknownShaderFile { name, known }
            if name == "flash_blocked" && known.contains("flash_blocked.wgsl")),
        "{err}"
    );
}
