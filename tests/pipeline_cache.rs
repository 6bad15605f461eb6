//! Repeated calls reuse pipelines: the cache size stays constant.

mod common;

use common::{Inputs, gpu};
use wgpu_flash_attn::{AttentionConfig, AttentionShape};

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
