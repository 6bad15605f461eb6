//! Attention dropout for training: which (query, key) probabilities a call
//! drops, as a pure function of the seed and the pair's coordinates, so the
//! forward, the backward (which regenerates the same mask instead of
//! storing it) and the CPU reference agree bit for bit.
//!
//! The mask is counter-based, like FlashAttention's Philox stream, but with
//! 32-bit integer hashing only (core WGSL has no 64-bit integers or
//! high-half multiplies): a chain of the PCG output permutation (Jarzynski
//! and Olano, "Hash Functions for GPU Rendering", 2020) over the seed, the
//! sequence (the batch entry, or a packed batch's sequence index), the query
//! head, the query row and the key. Its twin is
//! `dropout_mix` and `dropout_row_state` in `shaders/attention_common.wgsl`.

use crate::error::{Error, Result};

/// 2^32, the hash's range.
const HASH_RANGE: f64 = 4_294_967_296.0;

/// Dropout of the attention probabilities (`AttentionConfig::dropout`): each
/// probability `P[i, j]` of a row is kept with probability `1 - p` and
/// scaled by `1 / (1 - p)`, or dropped (set to 0) after the softmax, as in
/// FlashAttention and PyTorch's `scaled_dot_product_attention`. The row's
/// logsumexp is the softmax's, before dropout. Which pairs drop is
/// [`Dropout::keeps`]: the same seed gives the same mask on every adapter,
/// in the forward and in the backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping each probability, in `[0, 1)`; applied in
    /// steps of 2^-32 (see [`Dropout::keep_probability`]).
    pub p: f32,
    /// Seed of the mask: a training step's calls share it between the
    /// forward and the backward and change it between steps.
    pub seed: u64,
}

impl Dropout {
    /// Dropout with probability `p` and mask seed `seed`.
    pub fn new(p: f32, seed: u64) -> Self {
        Dropout { p, seed }
    }

    /// `Error::InvalidDropout` unless `p` lies in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if (0.0..1.0).contains(&self.p) {
            Ok(())
        } else {
            Err(Error::InvalidDropout(self.p))
        }
    }

    /// Whether the call drops anything (`p` rounds to a threshold above 0).
    pub fn is_active(&self) -> bool {
        self.threshold() > 0
    }

    /// A pair is kept when its hash is at least this: `p` in units of
    /// 2^-32, rounded.
    pub fn threshold(&self) -> u32 {
        (f64::from(self.p) * HASH_RANGE)
            .round()
            .clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// The probability that a pair is kept: `1 - threshold / 2^32`, which
    /// the kept probabilities are divided by.
    pub fn keep_probability(&self) -> f64 {
        1.0 - f64::from(self.threshold()) / HASH_RANGE
    }

    /// Whether the probability of query row `row` and key `key` of query
    /// head `head` of sequence `sequence` is kept: the batch entry, or in a
    /// packed variable-length batch the sequence's index. Rows and keys
    /// count from the sequence's first (key 0 is its first key, whatever
    /// the causal alignment; a padded batch's from the batch entry's).
    pub fn keeps(&self, sequence: usize, head: usize, row: usize, key: usize) -> bool {
        keeps(
            row_state(self.seed, sequence as u32, head as u32, row as u32),
            key as u32,
            self.threshold(),
        )
    }
}

/// The PCG output permutation of one LCG step: every input bit reaches
/// every output bit. Twin of `dropout_mix` in the shaders.
fn mix(x: u32) -> u32 {
    let state = x.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The hash state of one query row, shared by its keys. Twin of
/// `dropout_row_state` in the shaders.
fn row_state(seed: u64, sequence: u32, head: u32, row: u32) -> u32 {
    let x = mix(seed as u32);
    let x = mix(x ^ (seed >> 32) as u32);
    let x = mix(x ^ sequence);
    let x = mix(x ^ head);
    mix(x ^ row)
}

/// Whether key `key` of the row whose state is `row_state` is kept.
fn keeps(row_state: u32, key: u32, threshold: u32) -> bool {
    mix(row_state ^ key) >= threshold
}

/// The seed's two halves as the shaders read them (low, high).
pub(crate) fn seed_words(seed: u64) -> (u32, u32) {
    (seed as u32, (seed >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        for p in [-0.1, 1.0, 1.5, f32::NAN, f32::INFINITY] {
            assert!(
                matches!(Dropout::new(p, 0).validate(), Err(Error::InvalidDropout(got)) if got.to_bits() == p.to_bits()),
                "p = {p}"
            );
        }
        for p in [0.0, 0.1, 0.5, 0.999_999] {
            Dropout::new(p, 0).validate().unwrap();
        }
        assert!(!Dropout::new(0.0, 7).is_active());
        assert!(Dropout::new(1e-6, 7).is_active());
    }

    /// The kept fraction over a million pairs is `1 - p` within five
    /// standard deviations, for several seeds and rates; rows, heads,
    /// sequences and seeds each change the mask.
    #[test]
    fn the_mask_keeps_one_minus_p_and_depends_on_every_coordinate() {
        for (p, seed) in [
            (0.1f32, 1u64),
            (0.5, 0xdead_beef_0000_0001),
            (0.9, u64::MAX),
        ] {
            let dropout = Dropout::new(p, seed);
            let n = 1usize << 20;
            let kept = (0..n)
                .filter(|&i| dropout.keeps(i % 3, (i / 3) % 5, (i / 15) % 1000, i / 15_000))
                .count();
            let q = dropout.keep_probability();
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (kept as f64 - n as f64 * q).abs() < 5.0 * sd,
                "p = {p}: kept {kept} of {n}, expected {:.0} +- {:.0}",
                n as f64 * q,
                5.0 * sd
            );
        }
        let dropout = Dropout::new(0.5, 42);
        let mask = |f: &dyn Fn(usize) -> bool| (0..256).map(f).collect::<Vec<bool>>();
        let base = mask(&|k| dropout.keeps(0, 0, 0, k));
        assert_ne!(base, mask(&|k| dropout.keeps(1, 0, 0, k)));
        assert_ne!(base, mask(&|k| dropout.keeps(0, 1, 0, k)));
        assert_ne!(base, mask(&|k| dropout.keeps(0, 0, 1, k)));
        assert_ne!(base, mask(&|k| Dropout::new(0.5, 43).keeps(0, 0, 0, k)));
        assert_ne!(
            base,
            mask(&|k| Dropout::new(0.5, 42 | (1 << 40)).keeps(0, 0, 0, k))
        );
    }
}
