//! Whole pool pages as a server handles them: the pages no sequence holds,
//! copies between pages (a sequence forked mid-page, for beam search or
//! parallel sampling, shares its full pages and needs its own copy of the
//! last), and the pages' raw bytes to and from the host (a preempted
//! sequence swapped out of device memory and back).

use super::KvCache;
use crate::allocation::create_buffer_with;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{block_on_readback, check_buffer_size, read_ranges_async, require_usage};

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

    /// Bytes of one page as [`KvCache::read_pages`] returns it: its K,
    /// then its V unless the values live in the keys.
    pub fn page_bytes(&self) -> u64 {
        self.pools() * self.pool_page_bytes()
    }

    /// Bytes of one page in one pool (K's, or V's).
    fn pool_page_bytes(&self) -> u64 {
        self.config.page_bytes(self.page_size)
    }

    /// Records copies of whole pool pages into `encoder`: for each `(from,
    /// to)` of `pairs`, page `to` gets page `from`'s K and V as they are
    /// when the copies run (every token slot and head, int8 and fp8 scales
    /// included). Every source is read before any destination is written
    /// (through the device's scratch), so pairs may swap pages or copy one
    /// page to several. Block tables and lengths are not touched: list
    /// `to` in the forked sequence's table at `from`'s index there
    /// ([`KvCache::set_block_table`]) and give it its length
    /// ([`KvCache::set_len`]); its keys keep the RoPE positions they were
    /// appended at.
    ///
    /// Typed errors, before anything is recorded: a page past the pool
    /// ([`Error::PagePastPool`]), a page written by two pairs
    /// ([`Error::PageWrittenTwice`]), a destination that two sequences
    /// hold ([`Error::SharedPageOverwrite`]: shared pages are read-only), a
    /// pool buffer of the caller's ([`KvCache::from_buffers`]) without
    /// `COPY_SRC` and `COPY_DST` ([`Error::BufferUsage`]), a scratch of
    /// `pairs x page_bytes()` past `max_buffer_size`
    /// ([`Error::BufferTooLarge`]).
    pub fn copy_pages(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        pairs: &[(u32, u32)],
    ) -> Result<()> {
        self.check_device(gpu)?;
        let sources: Vec<u32> = pairs.iter().map(|&(from, _)| from).collect();
        let destinations: Vec<u32> = pairs.iter().map(|&(_, to)| to).collect();
        self.check_pages_exist("source", &sources)?;
        self.check_writable(&destinations)?;
        if pairs.is_empty() {
            return Ok(());
        }
        self.require_pool_usage(wgpu::BufferUsages::COPY_SRC, "copy pages out of it")?;
        self.require_pool_usage(wgpu::BufferUsages::COPY_DST, "copy pages into it")?;
        // wgpu refuses a copy within one buffer, and most pages share
        // their buffer with others: each copy goes out to the scratch and
        // back.
        let bytes = (pairs.len() as u64).saturating_mul(self.page_bytes());
        check_buffer_size(gpu, "kv cache page copies (scratch)", bytes)?;
        let scratch = gpu.scratch_buffer("wgpu-flash-attn kv cache page copies", bytes)?;
        self.record_page_copies(encoder, &sources, PageCopy::Out, &scratch);
        self.record_page_copies(encoder, &destinations, PageCopy::In, &scratch);
        Ok(())
    }

    /// The raw bytes of `pages` (K then V of each, [`KvCache::page_bytes`]
    /// a page, back to back), read once the work already submitted is
    /// done: a preempted sequence's pages swapped out to the host, for
    /// [`KvCache::write_pages`] to bring back into any pages of a cache of
    /// the same configuration. Blocks until the GPU is done (in a browser:
    /// [`KvCache::read_pages_async`]). Needs `COPY_SRC` on a caller's pool;
    /// more bytes than one buffer holds is [`Error::BufferTooLarge`] (read
    /// fewer pages at a time).
    pub fn read_pages(&self, gpu: &Gpu, pages: &[u32]) -> Result<Vec<u8>> {
        block_on_readback(self.read_pages_async(gpu, pages))
    }

    /// [`KvCache::read_pages`] as a future, as
    /// [`crate::Tensor::to_f32_vec_async`].
    pub async fn read_pages_async(&self, gpu: &Gpu, pages: &[u32]) -> Result<Vec<u8>> {
        self.check_device(gpu)?;
        self.check_pages_exist("source", pages)?;
        if pages.is_empty() {
            return Ok(Vec::new());
        }
        let page_bytes = self.pool_page_bytes();
        let ranges: Vec<_> = pages
            .iter()
            .flat_map(|&page| {
                let at = self.page_location(page);
                self.segment_pools(at.segment)
                    .map(move |buffer| (buffer, at.offset, page_bytes))
            })
            .collect();
        read_ranges_async(gpu, "kv cache pages", &ranges).await
    }

    /// Records the writes of `bytes` (as [`KvCache::read_pages`] returned
    /// them, [`KvCache::page_bytes`] a page) into `pages`, in recording
    /// order like every other call (the bytes are uploaded now, copied
    /// when the encoder runs). Tables and lengths are not touched, as for
    /// [`KvCache::copy_pages`], whose errors this shares; `bytes` of
    /// another length than `pages.len() x page_bytes()` is
    /// [`Error::DataLength`], more than one buffer holds
    /// [`Error::BufferTooLarge`]. Needs `COPY_DST` on a caller's pool.
    pub fn write_pages(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        pages: &[u32],
        bytes: &[u8],
    ) -> Result<()> {
        self.check_device(gpu)?;
        self.check_writable(pages)?;
        let expected = pages.len() as u64 * self.page_bytes();
        if bytes.len() as u64 != expected {
            return Err(Error::DataLength {
                tensor: "kv cache page bytes",
                expected: expected as usize,
                got: bytes.len(),
            });
        }
        if pages.is_empty() {
            return Ok(());
        }
        self.require_pool_usage(wgpu::BufferUsages::COPY_DST, "write pages into it")?;
        check_buffer_size(gpu, "kv cache page bytes", expected)?;
        let upload = create_buffer_with(
            gpu,
            "wgpu-flash-attn kv cache page upload",
            bytes,
            wgpu::BufferUsages::COPY_SRC,
        )?;
        self.record_page_copies(encoder, pages, PageCopy::In, &upload);
        Ok(())
    }

    /// Copies between `pages` and `staging`, where entry `i` of the list
    /// takes `page_bytes()` from byte `i x page_bytes()` (K, then V).
    fn record_page_copies(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        pages: &[u32],
        direction: PageCopy,
        staging: &wgpu::Buffer,
    ) {
        let starts = pages.iter().map(|&page| self.page_location(page));
        self.record_pool_copies(encoder, starts, self.pool_page_bytes(), direction, staging);
    }

    /// Copies between `staging` and `bytes` of each pool (K, then V) from
    /// each of `starts`, entry `i` at byte `i x pools() x bytes` of
    /// `staging`: whole pages, or tokens.
    pub(super) fn record_pool_copies(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        starts: impl IntoIterator<Item = PageLocation>,
        bytes: u64,
        direction: PageCopy,
        staging: &wgpu::Buffer,
    ) {
        let mut at = 0;
        for start in starts {
            for buffer in self.segment_pools(start.segment) {
                direction.record(encoder, buffer, start.offset, staging, at, bytes);
                at += bytes;
            }
        }
    }

    /// Every page of `pages` is one of the pool's.
    fn check_pages_exist(&self, role: &'static str, pages: &[u32]) -> Result<()> {
        for (index, &page) in pages.iter().enumerate() {
            if page as usize >= self.pool_pages {
                return Err(Error::PagePastPool {
                    index,
                    role,
                    page,
                    pool_pages: self.pool_pages,
                });
            }
        }
        Ok(())
    }

    /// Pages to be written exist, appear once, and are not shared.
    pub(super) fn check_writable(&self, pages: &[u32]) -> Result<()> {
        self.check_pages_exist("destination", pages)?;
        for (index, &page) in pages.iter().enumerate() {
            if let Some(first) = pages[..index].iter().position(|&other| other == page) {
                return Err(Error::PageWrittenTwice {
                    page,
                    first,
                    second: index,
                });
            }
            let mut holders = (0..self.batch()).filter(|&s| self.block_tables[s].contains(&page));
            if let (Some(sequence), Some(other)) = (holders.next(), holders.next()) {
                return Err(Error::SharedPageOverwrite {
                    index,
                    page,
                    sequence,
                    other,
                });
            }
        }
        Ok(())
    }

    /// Every pool buffer has `usage` (a caller's may not).
    pub(super) fn require_pool_usage(
        &self,
        usage: wgpu::BufferUsages,
        why: &'static str,
    ) -> Result<()> {
        for (name, buffer) in self.buffers() {
            require_usage(name, buffer, usage, why)?;
        }
        Ok(())
    }

    /// The segment holding pool page `page` (checked to exist: block
    /// tables and page lists admit only pages of the pool), and the page's
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
            offset: u64::from(page - first_page) * self.pool_page_bytes(),
        }
    }

    /// Pools a page has: K, and V unless the values live in the keys.
    pub(super) fn pools(&self) -> u64 {
        if self.config.values_in_keys() { 1 } else { 2 }
    }

    /// A segment's K buffer, then its V buffer unless the values live in
    /// the keys.
    pub(super) fn segment_pools(&self, segment: usize) -> impl Iterator<Item = &wgpu::Buffer> {
        let segment = &self.segments[segment];
        std::iter::once(&segment.k).chain(segment.v.as_ref())
    }
}

/// Which way [`KvCache::record_pool_copies`] copies.
#[derive(Clone, Copy)]
pub(super) enum PageCopy {
    /// The pool to the staging buffer.
    Out,
    /// The staging buffer to the pool.
    In,
}

impl PageCopy {
    /// Records the copy of `bytes` between `pool` at `pool_offset` and
    /// `staging` at `staging_offset`, this way.
    pub(super) fn record(
        self,
        encoder: &mut wgpu::CommandEncoder,
        pool: &wgpu::Buffer,
        pool_offset: u64,
        staging: &wgpu::Buffer,
        staging_offset: u64,
        bytes: u64,
    ) {
        match self {
            PageCopy::Out => {
                encoder.copy_buffer_to_buffer(pool, pool_offset, staging, staging_offset, bytes)
            }
            PageCopy::In => {
                encoder.copy_buffer_to_buffer(staging, staging_offset, pool, pool_offset, bytes)
            }
        }
    }
}
