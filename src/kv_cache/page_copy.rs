//! Copies of whole pool pages, and the pages no sequence holds: what a
//! server needs to fork a sequence whose prefix ends mid-page (beam search,
//! parallel sampling). Its full pages are shared read-only; the last, still
//! being filled, must become each fork's own copy.

use super::KvCache;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{check_buffer_size, require_usage};

/// Where one page of the pool lies: its segment, and its first byte in the
/// segment's K (and V) buffer.
pub(super) struct PageLocation {
    pub segment: usize,
    pub offset: u64,
}

impl KvCache {
    /// Pool pages that no sequence's block table lists, in increasing
    /// order: the pages a caller may give a sequence for its own tokens.
    pub fn free_pages(&self) -> Vec<u32> {
        (0..self.pool_pages as u32)
            .filter(|&page| self.page_holders[page as usize] == 0)
            .collect()
    }

    /// Records copies of whole pool pages into `encoder`: for each `(from,
    /// to)` of `pairs`, page `to` gets page `from`'s K and V as they are
    /// when the copies run (every token slot and head, int8 scales
    /// included). Every source is read before any destination is written
    /// (through the device's scratch), so pairs may swap pages or copy one
    /// page to several. Block tables and lengths are not touched: list
    /// `to` in the forked sequence's table at `from`'s index there
    /// ([`KvCache::set_block_table`]) and give it its length
    /// ([`KvCache::set_len`]); its keys keep the RoPE positions they were
    /// appended at.
    ///
    /// Typed errors, before anything is recorded: a page past the pool
    /// ([`Error::CopyPagePastPool`]), a page written by two pairs
    /// ([`Error::CopyPageTwice`]), a destination that two sequences hold
    /// ([`Error::CopyToSharedPage`]: shared pages are read-only), a pool
    /// buffer of the caller's ([`KvCache::from_buffers`]) without
    /// `COPY_SRC` and `COPY_DST` ([`Error::BufferUsage`]), a scratch of
    /// `2 x pairs x page bytes` past `max_buffer_size`
    /// ([`Error::BufferTooLarge`]).
    pub fn copy_pages(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        pairs: &[(u32, u32)],
    ) -> Result<()> {
        self.check_device(gpu)?;
        self.check_copies(pairs)?;
        if pairs.is_empty() {
            return Ok(());
        }
        // wgpu refuses a copy within one buffer, and most pages share
        // their buffer with others: each copy goes out to the scratch and
        // back.
        for (name, buffer) in self.buffers() {
            for (usage, why) in [
                (wgpu::BufferUsages::COPY_SRC, "copy pages out of it"),
                (wgpu::BufferUsages::COPY_DST, "copy pages into it"),
            ] {
                require_usage(name, buffer, usage, why)?;
            }
        }
        let page_bytes = self.config.page_bytes(self.page_size);
        let pools: u64 = if self.config.values_in_keys() { 1 } else { 2 };
        let scratch_bytes = (pairs.len() as u64).saturating_mul(pools * page_bytes);
        check_buffer_size(gpu, "kv cache page copies (scratch)", scratch_bytes)?;
        let scratch = gpu.scratch_buffer("wgpu-flash-attn kv cache page copies", scratch_bytes)?;
        // Slot `pools * i + pool` of the scratch holds pair i's page of
        // K (pool 0) or V (pool 1).
        let slot = |pair: usize, pool: usize| (pools * pair as u64 + pool as u64) * page_bytes;
        for (i, &(from, _)) in pairs.iter().enumerate() {
            let at = self.page_location(from);
            for (pool, buffer) in self.segment_pools(at.segment).enumerate() {
                encoder.copy_buffer_to_buffer(
                    buffer,
                    at.offset,
                    &scratch,
                    slot(i, pool),
                    page_bytes,
                );
            }
        }
        for (i, &(_, to)) in pairs.iter().enumerate() {
            let at = self.page_location(to);
            for (pool, buffer) in self.segment_pools(at.segment).enumerate() {
                encoder.copy_buffer_to_buffer(
                    &scratch,
                    slot(i, pool),
                    buffer,
                    at.offset,
                    page_bytes,
                );
            }
        }
        Ok(())
    }

    /// The pages named exist, no page is written twice, and no destination
    /// is shared.
    fn check_copies(&self, pairs: &[(u32, u32)]) -> Result<()> {
        for (index, &(from, to)) in pairs.iter().enumerate() {
            for (role, page) in [("source", from), ("destination", to)] {
                if page as usize >= self.pool_pages {
                    return Err(Error::CopyPagePastPool {
                        index,
                        role,
                        page,
                        pool_pages: self.pool_pages,
                    });
                }
            }
            if let Some(first) = pairs[..index].iter().position(|&(_, other)| other == to) {
                return Err(Error::CopyPageTwice {
                    page: to,
                    first,
                    second: index,
                });
            }
            let mut holders = (0..self.batch()).filter(|&s| self.block_tables[s].contains(&to));
            if let (Some(sequence), Some(other)) = (holders.next(), holders.next()) {
                return Err(Error::CopyToSharedPage {
                    index,
                    page: to,
                    sequence,
                    other,
                });
            }
        }
        Ok(())
    }

    /// The segment holding pool page `page` (checked to exist: block
    /// tables and copies admit only pages of the pool), and the page's
    /// first byte in its buffers. Segments may hold different page counts
    /// (a caller's buffers, [`KvCache::from_buffers`]).
    pub(super) fn page_location(&self, page: u32) -> PageLocation {
        let segment = self
            .segments
            .iter()
            .position(|s| (s.first_page..s.first_page + s.pages).contains(&page))
            .expect("the segments cover the pool's pages");
        let first_page = self.segments[segment].first_page;
        PageLocation {
            segment,
            offset: u64::from(page - first_page) * self.config.page_bytes(self.page_size),
        }
    }

    /// A segment's K buffer, then its V buffer unless the values live in
    /// the keys.
    fn segment_pools(&self, segment: usize) -> impl Iterator<Item = &wgpu::Buffer> {
        let segment = &self.segments[segment];
        std::iter::once(&segment.k).chain(segment.v.as_ref())
    }
}
