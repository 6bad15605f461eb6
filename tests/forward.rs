//! GPU forward pass against the f64 reference on seeded random inputs.

mod common;

use common::{Inputs, assert_close, gpu, run_and_compare};
use wgpu_flash_attn::{AttentionConfig, AttentionShape};

const RAGGED: [usize; 9] = [1, 7, 63, 64, 65, 127, 128, 129, 500];

#[test]
fn smoke() {
    let Some(gpu) = gpu() else { return };
    let shape = AttentionShape::self_attention(1, 65, 2, 64);
    let inputs = Inputs::draw(&shape, 1, 1.0);
    for causal in [false, true] {
        let config = AttentionConfig::new().causal(causal);
        let errors = run_and_compare(gpu, &shape, &inputs, &config);
        assert_close(errors, &format!("causal={causal}"));
    }
}
