//! After a speculative step: the draft tokens the target model accepted
//! (a path through the draft's token tree) kept in place of the whole
//! draft, so that the sequence goes on from them.

use super::KvCache;
use super::pages::{PageCopy, PageLocation};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::check_buffer_size;

impl KvCache {
    /// Records, into `encoder`, the end of a speculative step for
    /// `sequence`, whose last `draft` tokens are the draft it verified:
    /// the draft tokens `kept` (increasing indices into the draft, such as
    /// an accepted root-to-leaf path of its [`crate::TokenTree`]) move to
    /// the first `kept.len()` draft positions, in that order, and the
    /// sequence's length becomes `len - draft + kept.len()`. Each token
    /// moves whole (its K and V of every KV head, int8 and fp8 scales
    /// included), with the RoPE it was appended with: rotate a tree's
    /// tokens at their depth ([`crate::TokenTree::depths`]), which is where
    /// the path puts them. Tokens already in place are not copied; the copies go through
    /// the device's scratch, as [`KvCache::copy_pages`]'.
    ///
    /// Typed errors, before anything is recorded or changed: a sequence
    /// past the batch ([`Error::CacheSequence`]), a draft longer than the
    /// sequence ([`Error::DraftPastSequence`]), kept tokens that do not
    /// increase or lie past the draft ([`Error::DraftKept`]), a
    /// destination page another sequence shares
    /// ([`Error::SharedPageOverwrite`]), a draft in a released page
    /// ([`Error::ReleasedPosition`]), a caller's pool buffer without
    /// `COPY_SRC` and `COPY_DST` ([`Error::BufferUsage`]).
    pub fn keep_draft(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        sequence: usize,
        draft: usize,
        kept: &[usize],
    ) -> Result<()> {
        self.check_device(gpu)?;
        self.check_sequence(sequence)?;
        let len = self.lens[sequence];
        if draft > len {
            return Err(Error::DraftPastSequence {
                sequence,
                draft,
                len,
            });
        }
        for (index, &token) in kept.iter().enumerate() {
            let increasing = index == 0 || kept[index - 1] < token;
            if token >= draft || !increasing {
                return Err(Error::DraftKept {
                    index,
                    token,
                    draft,
                });
            }
        }
        let first = len - draft;
        self.check_unreleased("keep_draft", sequence, first..len)?;
        // (from, to) positions of the tokens that move: kept tokens
        // increase, so once one moves every later one does.
        let moves: Vec<(usize, usize)> = kept
            .iter()
            .enumerate()
            .filter(|&(to, &from)| from != to)
            .map(|(to, &from)| (first + from, first + to))
            .collect();
        if !moves.is_empty() {
            let mut written: Vec<u32> = moves
                .iter()
                .map(|&(_, to)| self.page_of(sequence, to))
                .collect();
            // Destinations increase, so each page's positions are adjacent.
            written.dedup();
            self.check_writable(&written)?;
            self.require_pool_usage(wgpu::BufferUsages::COPY_SRC, "move draft tokens out of it")?;
            self.require_pool_usage(wgpu::BufferUsages::COPY_DST, "move draft tokens into it")?;
            let token_bytes = self.pools() * self.token_bytes();
            let bytes = moves.len() as u64 * token_bytes;
            check_buffer_size(gpu, "kept draft tokens (scratch)", bytes)?;
            let scratch = gpu.scratch_buffer("wgpu-flash-attn kept draft tokens", bytes)?;
            // Every source is read before any destination is written.
            let (sources, destinations): (Vec<usize>, Vec<usize>) = moves.into_iter().unzip();
            self.record_token_copies(encoder, sequence, &sources, PageCopy::Out, &scratch);
            self.record_token_copies(encoder, sequence, &destinations, PageCopy::In, &scratch);
        }
        self.lens[sequence] = first + kept.len();
        Ok(())
    }

    /// Bytes of one token in one pool: its vector of every KV head.
    fn token_bytes(&self) -> u64 {
        self.config.page_bytes(1)
    }

    /// The pool page holding position `pos` of `sequence` (inside its
    /// length, so its table lists the page).
    fn page_of(&self, sequence: usize, pos: usize) -> u32 {
        self.block_tables[sequence][pos / self.page_size]
    }

    /// Copies between the tokens at `positions` of `sequence` and
    /// `staging`, entry `i` at byte `i x pools() x token_bytes()` of
    /// `staging` (K, then V).
    fn record_token_copies(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        sequence: usize,
        positions: &[usize],
        direction: PageCopy,
        staging: &wgpu::Buffer,
    ) {
        let token_bytes = self.token_bytes();
        let starts = positions.iter().map(|&pos| {
            let page = self.page_location(self.page_of(sequence, pos));
            PageLocation {
                segment: page.segment,
                offset: page.offset + (pos % self.page_size) as u64 * token_bytes,
            }
        });
        self.record_pool_copies(encoder, starts, token_bytes, direction, staging);
    }
}
