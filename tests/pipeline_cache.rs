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
