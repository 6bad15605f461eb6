//! Speculative decoding's token trees (SpecInfer, Medusa, EAGLE): the
//! draft tokens a sequence verifies in one decode step form a tree, and
//! each sees the tokens before the draft, its ancestors and itself, not
//! its siblings or their subtrees.

use crate::error::{Error, Result};

/// The draft tokens of one sequence as a tree: token `i` (its `i`-th query
/// token, at cache position `len - tokens + i`) has the parent
/// `parents[i]`, an earlier draft token, or none (a root: its parent is
/// the last token before the draft). Each token sees every key before the
/// draft, its ancestors and itself; [`crate::DecodeOptions::token_trees`]
/// applies it in a decode call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTree {
    parents: Vec<Option<usize>>,
}

impl TokenTree {
    /// The tree with the given parents. Parents come before their
    /// children (the order the draft tokens sit in the cache and in Q):
    /// `parents[i] < i`, else [`Error::TokenTreeParent`].
    pub fn from_parents(parents: &[Option<usize>]) -> Result<Self> {
        for (token, parent) in parents.iter().enumerate() {
            if let Some(parent) = *parent
                && parent >= token
            {
                return Err(Error::TokenTreeParent { token, parent });
            }
        }
        Ok(TokenTree {
            parents: parents.to_vec(),
        })
    }

    /// A chain of `tokens` tokens, each the child of the one before: what
    /// a causal mask gives without a tree.
    pub fn chain(tokens: usize) -> Self {
        TokenTree {
            parents: (0..tokens).map(|i| i.checked_sub(1)).collect(),
        }
    }

    /// Draft tokens in the tree.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// Whether the tree has no token (a sequence sitting the step out).
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// Each token's parent.
    pub fn parents(&self) -> &[Option<usize>] {
        &self.parents
    }

    /// Each token's depth: 0 for a root, its parent's plus one otherwise.
    /// Draft tokens take their RoPE positions by depth, `first + depth`
    /// (`first`: the position after the last token before the draft), so
    /// siblings share one: rotate them so before appending (`Gpu::rope`
    /// over a view of the tokens as a batch of one-token sequences, each
    /// its own first position), and an accepted path then lies at
    /// consecutive positions ([`crate::KvCache::keep_draft`]).
    pub fn depths(&self) -> Vec<usize> {
        let mut depths: Vec<usize> = Vec::with_capacity(self.len());
        for parent in &self.parents {
            // Parents come first, so theirs is known.
            depths.push(parent.map_or(0, |p| depths[p] + 1));
        }
        depths
    }

    /// Whether draft token `token` sees draft token `key`: `key` is
    /// `token` or one of its ancestors.
    pub fn sees(&self, token: usize, key: usize) -> bool {
        let mut at = Some(token);
        while let Some(node) = at {
            if node == key {
                return true;
            }
            // Parents are earlier tokens, so the walk ends.
            at = self.parents[node].filter(|_| node > key);
        }
        false
    }

    /// The dense boolean mask the tree means over a sequence of `len`
    /// keys whose last `self.len()` are the draft: `[tokens, len]`, row
    /// major, `true` where the token may attend. For the forward pass
    /// (`AttentionMask::boolean`, queries at the last positions) and the
    /// reference. `len` must be at least the tree's size.
    pub fn dense_mask(&self, len: usize) -> Vec<bool> {
        let tokens = self.len();
        let draft = len - tokens;
        let mut mask = vec![true; tokens * len];
        for (token, row) in mask.chunks_mut(len).enumerate() {
            for (key, seen) in row[draft..].iter_mut().enumerate() {
                *seen = self.sees(token, key);
            }
        }
        mask
    }

    /// The kernel's words for the tree: one row of `ceil(len / 32)` words
    /// per token, bit `j % 32` of word `j / 32` set where it sees draft
    /// token `j` (`tree_sees` in shaders/flash_decode.wgsl reads them).
    fn bit_rows(&self) -> Vec<u32> {
        let tokens = self.len();
        let words = tokens.div_ceil(32);
        let mut bits = vec![0u32; tokens * words];
        for token in 0..tokens {
            // A token sees what its parent sees, and itself.
            if let Some(parent) = self.parents[token] {
                bits.copy_within(parent * words..(parent + 1) * words, token * words);
            }
            bits[token * words + token / 32] |= 1 << (token % 32);
        }
        bits
    }
}

/// The words `tree_sees` (shaders/flash_decode.wgsl) finds after the block
/// table: one word per sequence saying where its bit rows start (counted
/// from the first of these words), then every tree's bit rows.
pub(crate) fn tree_words(trees: &[TokenTree]) -> Vec<u32> {
    let mut words = vec![0u32; trees.len()];
    for (b, tree) in trees.iter().enumerate() {
        words[b] = words.len() as u32;
        words.extend(tree.bit_rows());
    }
    words
}

/// `Error::TokenTreeSize` unless `trees` has one tree per sequence, each
/// with `query_tokens(b)` tokens (a decode call's trees).
pub(crate) fn check_trees(
    trees: &[TokenTree],
    sequences: usize,
    query_tokens: impl Fn(usize) -> usize,
) -> Result<()> {
    if trees.len() != sequences {
        return Err(Error::DataLength {
            tensor: "decode token trees (one per cache sequence)",
            expected: sequences,
            got: trees.len(),
        });
    }
    for (sequence, tree) in trees.iter().enumerate() {
        if tree.len() != query_tokens(sequence) {
            return Err(Error::TokenTreeSize {
                sequence,
                tokens: tree.len(),
                query_tokens: query_tokens(sequence),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with two children, the first with a child: 0 <- 1 <- 3, 0 <- 2.
    fn small() -> TokenTree {
        TokenTree::from_parents(&[None, Some(0), Some(0), Some(1)]).unwrap()
    }

    #[test]
    fn tokens_see_their_ancestors_and_themselves_only() {
        let tree = small();
        let seen: Vec<Vec<usize>> = (0..4)
            .map(|t| (0..4).filter(|&k| tree.sees(t, k)).collect())
            .collect();
        assert_eq!(seen, [vec![0], vec![0, 1], vec![0, 2], vec![0, 1, 3]]);
    }

    #[test]
    fn bit_rows_and_the_dense_mask_agree_with_sees() {
        // 40 tokens: two words per row. Each token's parent is a random
        // earlier one (or none), from a fixed linear congruential walk.
        let mut state = 12345u64;
        let parents: Vec<Option<usize>> = (0..40)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick = (state >> 33) as usize % (i + 1);
                (pick < i).then_some(pick)
            })
            .collect();
        let tree = TokenTree::from_parents(&parents).unwrap();
        let rows = tree.bit_rows();
        assert_eq!(rows.len(), 40 * 2);
        let mask = tree.dense_mask(45);
        for t in 0..40 {
            assert!(
                mask[t * 45..t * 45 + 5].iter().all(|&m| m),
                "keys before the draft"
            );
            for k in 0..40 {
                let bit = rows[t * 2 + k / 32] >> (k % 32) & 1 == 1;
                assert_eq!(bit, tree.sees(t, k), "token {t}, key {k}");
                assert_eq!(mask[t * 45 + 5 + k], tree.sees(t, k), "token {t}, key {k}");
            }
        }
    }

    #[test]
    fn depths_count_ancestors() {
        assert_eq!(small().depths(), [0, 1, 1, 2]);
        assert_eq!(TokenTree::chain(3).depths(), [0, 1, 2]);
    }

    #[test]
    fn a_chain_sees_every_earlier_token() {
        let tree = TokenTree::chain(5);
        for t in 0..5 {
            for k in 0..5 {
                assert_eq!(tree.sees(t, k), k <= t);
            }
        }
    }

    #[test]
    fn tree_words_start_each_sequence_after_the_offsets() {
        let trees = [small(), TokenTree::chain(0), TokenTree::chain(2)];
        let words = tree_words(&trees);
        // Three offsets, four rows of one word, none, two rows of one.
        assert_eq!(words.len(), 3 + 4 + 2);
        assert_eq!(&words[..3], &[3, 7, 7]);
        assert_eq!(&words[3..7], &[0b1, 0b11, 0b101, 0b1011]);
        assert_eq!(&words[7..], &[0b1, 0b11]);
    }

    #[test]
    fn bad_trees_are_typed_errors() {
        assert!(matches!(
            TokenTree::from_parents(&[None, Some(1)]),
            Err(Error::TokenTreeParent {
                token: 1,
                parent: 1
            })
        ));
        assert!(matches!(
            TokenTree::from_parents(&[Some(2), None, None]),
            Err(Error::TokenTreeParent {
                token: 0,
                parent: 2
            })
        ));
        let trees = [small(), TokenTree::chain(3)];
        assert!(matches!(
            check_trees(&trees, 3, |_| 4),
            Err(Error::DataLength {
                expected: 3,
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            check_trees(&trees, 2, |_| 4),
            Err(Error::TokenTreeSize {
                sequence: 1,
                tokens: 3,
                query_tokens: 4
            })
        ));
        check_trees(&trees, 2, |b| [4, 3][b]).unwrap();
    }
}
