//! Seeded random inputs: rand's ChaCha8 generator, whose output for a seed
//! is the same on every machine and rand release (a seed names the data a
//! result was measured or checked on), and rand_distr's normal distribution.
//!
//! flash-bench's module; the tests (tests/common/mod.rs) and benches include
//! the file with `#[path]` so that every seeded input is drawn the same way.

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// The generator behind every seeded input.
pub type SeededRng = ChaCha8Rng;

/// The generator for `seed`.
pub fn seeded(seed: u64) -> SeededRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values drawn from N(0, scale^2).
pub fn normal_vec(rng: &mut SeededRng, n: usize, scale: f32) -> Vec<f32> {
    let normal = Normal::new(0.0, scale).expect("the scale is finite");
    normal.sample_iter(rng).take(n).collect()
}

/// A speculative draft of `tokens` tokens as a token tree: each token's
/// parent is an earlier token or none (a root), each of the `i + 1`
/// choices of token `i` as likely.
pub fn random_token_tree(rng: &mut SeededRng, tokens: usize) -> wgpu_flash_attn::TokenTree {
    use rand::RngExt;
    let parents: Vec<Option<usize>> = (0..tokens)
        .map(|i| {
            let pick = rng.random_range(0..=i);
            (pick < i).then_some(pick)
        })
        .collect();
    wgpu_flash_attn::TokenTree::from_parents(&parents).expect("parents come before children")
}
