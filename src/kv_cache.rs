//! The KV cache for decoding: per-sequence lengths, paged storage (a
//! contiguous cache is the identity block table), split over several
//! buffers when one binding cannot hold the pool, and the in-place append
//! with optional fused rotary embedding of the keys. Whole pages (free
//! ones, copies, host transfers) are `pages.rs`'; the end of a
//! speculative step (an accepted draft path kept) is `draft.rs`'.

mod draft;
mod pages;
mod released;

pub use released::RELEASED_PAGE;
use released::held_entries;

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::RopeParams;
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::rope::Rope;
use crate::shaders::Specialization;
use crate::tensor::{DType, Tensor, block_on_readback, read_buffer_async};

/// Page sizes a paged cache may use (tokens, powers of two).
pub const PAGE_SIZES: std::ops::RangeInclusive<usize> = 16..=256;
/// Block-table entries of unassigned pages: outside every segment, so the
/// kernels treat them as holding no key.
const NO_PAGE: u32 = u32::MAX;

/// How the cache stores each sequence's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// `[batch, capacity, heads_kv, head_dim]`: sequence `b` owns a fixed
    /// run of `capacity` positions (rounded up to whole pages of up to 256
    /// tokens).
    Contiguous {
        /// Token positions reserved per sequence.
        capacity: usize,
    },
    /// A pool of `pages` pages of `page_size` tokens; each sequence lists
    /// its pages in a block table ([`KvCache::set_block_table`]), as vLLM
    /// and FlashAttention's `block_table`.
    Paged {
        /// Tokens per page: a power of two in [`PAGE_SIZES`].
        page_size: usize,
        /// Pages in the pool, shared by all sequences.
        pages: usize,
    },
}

/// How a KV cache stores K and V. Decoding is memory-bound, so the cache's
/// bytes are its speed: every type is read as it is stored and widened to
/// f32 in registers (arithmetic is f32 whatever the type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvDType {
    /// 4 bytes per element.
    #[default]
    F32,
    /// IEEE half, 2 bytes per element (rounded to nearest on append).
    F16,
    /// bfloat16, 2 bytes per element (rounded to nearest even on append).
    BF16,
    /// Symmetric int8 with one f32 scale per (token, head): each head
    /// vector `x` is stored as `round(x / s)` in [-127, 127] with `s =
    /// max|x| / 127`, so each element is within `s / 2 = max|x| / 254` of
    /// its value; `head_dim + 4` bytes per head vector.
    Int8,
    /// FP8 E4M3 (OCP 8-bit float "E4M3FN": 4 exponent bits, 3 mantissa
    /// bits, largest finite 448, no infinities) with one f32 scale per
    /// (token, head), laid out as int8: each head vector `x` is stored as
    /// `x / s` rounded to nearest even with `s = max|x| / 448`, so each
    /// element is within `|x| / 16` of its value (half a unit in the last
    /// place of a 3-bit mantissa) where `|x / s| >= 2^-6`, and within `s /
    /// 1024` below that (E4M3's subnormals, steps of `2^-9 s`). Unlike
    /// int8, small elements of a vector with a large one keep their
    /// relative precision, so it suits keys with strong outlier channels;
    /// on data without them int8 is the more accurate (README). A head
    /// vector takes `head_dim + 4` bytes.
    Fp8,
}

impl KvDType {
    /// Every storage type, in flash-bench's order.
    pub const ALL: [KvDType; 5] = [
        KvDType::F32,
        KvDType::F16,
        KvDType::BF16,
        KvDType::Int8,
        KvDType::Fp8,
    ];

    /// Bytes of one head vector of `head_dim` elements.
    pub fn vector_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDType::F32 => 4 * head_dim,
            KvDType::F16 | KvDType::BF16 => 2 * head_dim,
            KvDType::Int8 | KvDType::Fp8 => head_dim + 4,
        }
    }

    /// Words (4 bytes: the unit the kernels index) of one head vector.
    pub(crate) fn vector_words(self, head_dim: usize) -> usize {
        self.vector_bytes(head_dim) / 4
    }

    /// A head vector in the kernels' vec4 units of this type (four
    /// elements each: an f32 vec4, two words of halves, one word of bytes),
    /// plus a byte vector's scale word: the cache's head stride.
    pub(crate) fn vector_vec4s(self, head_dim: usize) -> usize {
        match self {
            KvDType::Int8 | KvDType::Fp8 => head_dim / 4 + 1,
            _ => head_dim / 4,
        }
    }

    /// Lowercase name, as flash-bench spells it.
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::BF16 => "bf16",
            KvDType::Int8 => "int8",
            KvDType::Fp8 => "fp8",
        }
    }

    /// Whether elements are single bytes beside a per-vector f32 scale
    /// (int8 and fp8 share that layout).
    pub(crate) fn has_scales(self) -> bool {
        matches!(self, KvDType::Int8 | KvDType::Fp8)
    }
}

/// Where a KV cache keeps its values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KvValues {
    /// A V pool beside the K pool, with vectors as wide as the keys.
    #[default]
    Separate,
    /// No V pool: each token's value is the first `head_dim_v` elements of
    /// its key vector. This is multi-head latent attention's cache
    /// (DeepSeek-V2/V3 decoding): one KV head holding the latent `[c_kv |
    /// k_rope]` (512 + 64 = 576 elements), whose first 512 are the values,
    /// in half the bytes of a separate V copy. Tokens go in with
    /// [`KvCache::append_latent`], whose fused RoPE rotates the *last*
    /// `rotary_dim` elements (`k_rope`), which may not reach the values.
    KeyPrefix {
        /// Elements of each key vector that are its value (a supported
        /// head dim, at most the key head dim).
        head_dim_v: usize,
    },
}

/// Shape and storage type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Sequences the cache holds.
    pub batch: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Elements per key head vector (a supported head dim); also per value
    /// vector unless `values` says otherwise.
    pub head_dim: usize,
    /// Where the values live (default: a V pool of `head_dim` vectors).
    pub values: KvValues,
    /// Contiguous or paged storage.
    pub layout: KvLayout,
    /// Cap on the bytes of each K (and V) buffer; `None` means the
    /// adapter's storage-binding limit. Pools larger than one buffer are
    /// split over several, whole pages each.
    pub max_buffer_bytes: Option<u64>,
    /// How K and V are stored (default f32).
    pub dtype: KvDType,
}

impl KvCacheConfig {
    /// A cache of `batch` sequences with `heads_kv` heads of `head_dim`.
    pub fn new(batch: usize, heads_kv: usize, head_dim: usize, layout: KvLayout) -> Self {
        KvCacheConfig {
            batch,
            heads_kv,
            head_dim,
            layout,
            max_buffer_bytes: None,
            dtype: KvDType::F32,
            values: KvValues::Separate,
        }
    }
    /// Keeps no V pool: values are the first `head_dim_v` elements of each
    /// key (multi-head latent attention, see [`KvValues::KeyPrefix`]).
    pub fn latent_values(mut self, head_dim_v: usize) -> Self {
        self.values = KvValues::KeyPrefix { head_dim_v };
        self
    }
    /// Elements per value vector.
    pub fn head_dim_v(&self) -> usize {
        match self.values {
            KvValues::Separate => self.head_dim,
            KvValues::KeyPrefix { head_dim_v } => head_dim_v,
        }
    }
    /// Whether the values are a prefix of the keys (no V pool).
    pub fn values_in_keys(&self) -> bool {
        matches!(self.values, KvValues::KeyPrefix { .. })
    }
    /// Stores K and V as `dtype` (see [`KvDType`]).
    pub fn dtype(mut self, dtype: KvDType) -> Self {
        self.dtype = dtype;
        self
    }
    /// Caps the bytes of each K (and V) buffer; the pool is split over more buffers to fit.
    pub fn max_buffer_bytes(mut self, bytes: u64) -> Self {
        self.max_buffer_bytes = Some(bytes);
        self
    }
}

/// Rotary embedding of the keys as [`KvCache::append`] writes them: a token
/// written at cache position `p` of sequence `b` is rotated for position
/// `p + position_offsets[b]`.
#[derive(Debug, Clone, Copy)]
pub struct KeyRotation<'a> {
    /// Convention, base and rotary dims.
    pub rope: &'a Rope,
    /// One offset per sequence (0 for a cache that starts at position 0).
    pub position_offsets: &'a [u32],
}

/// Pages `first_page .. first_page + pages` of the pool, in one K and one V
/// buffer (no V buffer when the values are a prefix of the keys).
#[derive(Debug)]
pub(crate) struct CacheSegment {
    pub first_page: u32,
    pub pages: u32,
    pub k: wgpu::Buffer,
    pub v: Option<wgpu::Buffer>,
}

impl CacheSegment {
    /// The buffer the values are read from: V's, or K's for a latent cache.
    pub fn values(&self) -> &wgpu::Buffer {
        self.v.as_ref().unwrap_or(&self.k)
    }
}

/// A KV cache on the device. Sequences grow by [`KvCache::append`];
/// [`Gpu::decode`](crate::Gpu::decode) attends over them.
///
/// Lengths and block tables live on the host. Every call that reads them
/// ([`KvCache::append`], [`Gpu::decode`](crate::Gpu::decode)) records a
/// snapshot of them as they are when the call is recorded, so recorded
/// work runs with the state it was recorded with, in recording order;
/// [`KvCache::set_len`] and [`KvCache::set_block_table`] affect calls
/// recorded after them.
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    page_size: usize,
    pool_pages: usize,
    /// Width of a block-table row (the most pages one sequence may list).
    pages_per_seq: usize,
    block_tables: Vec<Vec<u32>>,
    /// How many block tables list each pool page: a page held by more than
    /// one is read-only (see [`KvCache::set_block_table`]).
    page_holders: Vec<u32>,
    /// The block tables as the kernels read them, uploaded by the first
    /// call recorded after they last changed and shared by later calls
    /// (the buffer is never written again, so each recorded call still
    /// sees the tables of its recording).
    table_upload: OnceLock<wgpu::Buffer>,
    lens: Vec<usize>,
    pub(crate) segments: Vec<CacheSegment>,
    /// The device the pool lives on.
    device: wgpu::Device,
}

/// Page geometry a cache configuration implies.
struct Geometry {
    page_size: usize,
    pool_pages: usize,
    /// Width of a block-table row.
    pages_per_seq: usize,
    /// Initial block tables (identity for a contiguous cache).
    block_tables: Vec<Vec<u32>>,
}

impl KvCacheConfig {
    /// The pool's pages and block tables, after checking that a page's
    /// bytes and the page count fit (block-table entries are u32) and that
    /// the block table fits one binding of `binding_limit` bytes.
    fn geometry(&self, binding_limit: u64) -> Result<Geometry> {
        let KvCacheConfig {
            batch,
            heads_kv,
            head_dim,
            layout,
            ..
        } = *self;
        for (name, n) in [("batch", batch), ("heads_kv", heads_kv)] {
            if n == 0 {
                return Err(Error::ZeroDimension {
                    tensor: name,
                    shape: [batch, 0, heads_kv, head_dim],
                });
            }
        }
        for got in [head_dim, self.head_dim_v()] {
            if !crate::is_supported_head_dim(got) {
                return Err(Error::HeadDimUnsupported {
                    got,
                    supported: crate::SUPPORTED_HEAD_DIMS,
                });
            }
        }
        if self.head_dim_v() > head_dim {
            return Err(Error::ShapeMismatch {
                what: "latent values are a prefix of each key vector",
                left_name: "head_dim_v",
                left: self.head_dim_v(),
                right_name: "head_dim",
                right: head_dim,
            });
        }
        let geometry = match layout {
            KvLayout::Contiguous { capacity } => {
                let page_size = capacity
                    .min(*PAGE_SIZES.end())
                    .next_power_of_two()
                    .clamp(*PAGE_SIZES.start(), *PAGE_SIZES.end());
                let per_seq = capacity.div_ceil(page_size).max(1);
                self.check_pool(batch, per_seq, page_size, binding_limit)?;
                let block_tables = (0..batch)
                    .map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect())
                    .collect();
                Geometry {
                    page_size,
                    pool_pages: batch * per_seq,
                    pages_per_seq: per_seq,
                    block_tables,
                }
            }
            KvLayout::Paged { page_size, pages } => {
                if !page_size.is_power_of_two() || !PAGE_SIZES.contains(&page_size) {
                    return Err(Error::PageSize { got: page_size });
                }
                if pages == 0 {
                    return Err(Error::ZeroDimension {
                        tensor: "kv cache pages",
                        shape: [pages, page_size, heads_kv, head_dim],
                    });
                }
                self.check_pool(batch, pages, page_size, binding_limit)?;
                Geometry {
                    page_size,
                    pool_pages: pages,
                    pages_per_seq: pages,
                    block_tables: vec![Vec::new(); batch],
                }
            }
        };
        Ok(geometry)
    }

    /// Checks, before anything is allocated, that a page's bytes and the
    /// pool's page count fit (a contiguous layout's pool is `batch *
    /// pages_per_seq` pages, a paged one's `pages_per_seq`), and that the
    /// block table (`batch * pages_per_seq` u32 entries) fits a binding.
    fn check_pool(
        &self,
        batch: usize,
        pages_per_seq: usize,
        page_size: usize,
        binding_limit: u64,
    ) -> Result<()> {
        let overflow = |tensor| Error::ShapeOverflow {
            tensor,
            shape: [batch, pages_per_seq, self.heads_kv, self.head_dim],
        };
        page_size
            .checked_mul(self.heads_kv)
            .and_then(|n| n.checked_mul(self.dtype.vector_bytes(self.head_dim)))
            .ok_or(overflow("kv cache page"))?;
        let entries = batch
            .checked_mul(pages_per_seq)
            .filter(|&n| n < NO_PAGE as usize)
            .ok_or(overflow("kv cache block table"))?;
        let bytes = entries as u64 * 4;
        if bytes > binding_limit {
            return Err(Error::BufferTooLarge {
                tensor: "kv cache block table",
                bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: binding_limit,
            });
        }
        Ok(())
    }

    /// Bytes of one page of K (or V): `page_size` tokens of the storage
    /// type.
    fn page_bytes(&self, page_size: usize) -> u64 {
        (page_size * self.heads_kv * self.dtype.vector_bytes(self.head_dim)) as u64
    }
}

impl KvCache {
    /// A cache whose pool the crate allocates: one K and one V buffer,
    /// or several of whole pages each when the pool is larger than one
    /// storage binding (or than `config.max_buffer_bytes`).
    pub fn new(gpu: &Gpu, config: KvCacheConfig) -> Result<Self> {
        let limits = &gpu.info().limits;
        let geometry = config.geometry(limits.max_storage_buffer_binding_size)?;
        let page_bytes = config.page_bytes(geometry.page_size);
        let (limit_name, binding_limit) = [
            (
                "max_storage_buffer_binding_size",
                limits.max_storage_buffer_binding_size,
            ),
            ("max_buffer_size", limits.max_buffer_size),
            (
                "KvCacheConfig::max_buffer_bytes",
                config.max_buffer_bytes.unwrap_or(u64::MAX),
            ),
        ]
        .into_iter()
        .min_by_key(|&(_, limit)| limit)
        .expect("three candidates");
        let pool_pages = geometry.pool_pages;
        let pages_per_segment = (binding_limit / page_bytes).min(pool_pages as u64) as usize;
        if pages_per_segment == 0 {
            return Err(Error::BufferTooLarge {
                tensor: "kv cache page",
                bytes: page_bytes,
                limit_name,
                limit: binding_limit,
            });
        }
        let segments = (0..pool_pages)
            .step_by(pages_per_segment)
            .map(|first| {
                let pages = pages_per_segment.min(pool_pages - first);
                let make = |label| {
                    gpu.create_buffer(
                        label,
                        pages as u64 * page_bytes,
                        // (Copies: read_sequence and kv_cache/pages.rs.)
                        wgpu::BufferUsages::STORAGE
                            | wgpu::BufferUsages::COPY_SRC
                            | wgpu::BufferUsages::COPY_DST,
                    )
                };
                Ok(CacheSegment {
                    first_page: first as u32,
                    pages: pages as u32,
                    k: make("wgpu-flash-attn kv cache K")?,
                    v: (!config.values_in_keys())
                        .then(|| make("wgpu-flash-attn kv cache V"))
                        .transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Self::assemble(gpu, config, geometry, segments)
    }

    /// A cache over K/V pools the caller owns (no copy): `segments` lists
    /// (K buffer, V buffer) pairs (for a latent cache, [`KvValues::KeyPrefix`],
    /// the K buffer twice: it has no V pool), each holding whole pages of
    /// `[page_size, heads_kv, head_dim]` tokens of the config's storage type
    /// (int8 and fp8: each head vector's `head_dim` bytes then its f32
    /// scale), pages numbered across the pairs in order. Together they must hold the
    /// layout's pool (`KvLayout::Paged { pages, .. }` pages; for a
    /// contiguous layout `batch * ceil(capacity / page_size)` pages, see
    /// [`KvCache::page_size`]). Checked: this device's buffers, `STORAGE`
    /// usage, sizes, the binding limit, and that each buffer appears once
    /// ([`Error::CacheBufferRepeat`]: a K buffer given as its V, or one
    /// buffer in two segments, would store two pages in one place). Later
    /// calls refuse operands in the pool's buffers: a decoding step's
    /// output or logsumexp, an append's new tokens
    /// ([`Error::OutputAliasesInput`]). [`KvCache::copy_pages`] also needs
    /// `COPY_SRC` and `COPY_DST`, [`KvCache::write_pages`] `COPY_DST`,
    /// [`KvCache::read_pages`] and [`KvCache::read_sequence`] `COPY_SRC`,
    /// checked when called.
    pub fn from_buffers(
        gpu: &Gpu,
        config: KvCacheConfig,
        segments: &[(wgpu::Buffer, wgpu::Buffer)],
    ) -> Result<Self> {
        check_distinct_segments(&config, segments)?;
        Self::from_shared_buffers(gpu, config, segments)
    }

    /// [`KvCache::from_buffers`] where buffers may repeat, for a cache
    /// that is only ever read (then nothing is written through two page
    /// numbers): the forward's view of K and V as a cache
    /// (`src/forward_as_decode.rs`) may get one tensor as both.
    pub(crate) fn from_shared_buffers(
        gpu: &Gpu,
        config: KvCacheConfig,
        segments: &[(wgpu::Buffer, wgpu::Buffer)],
    ) -> Result<Self> {
        let geometry = config.geometry(gpu.info().limits.max_storage_buffer_binding_size)?;
        let page_bytes = config.page_bytes(geometry.page_size);
        let mut first_page = 0usize;
        let mut owned = Vec::new();
        for (k, v) in segments {
            if first_page >= geometry.pool_pages {
                break;
            }
            for (name, buffer) in [("kv cache K", k), ("kv cache V", v)] {
                crate::tensor::check_caller_buffer(gpu, name, buffer)?;
                crate::tensor::check_binding_size(gpu, name, buffer.size())?;
            }
            if config.values_in_keys() && k != v {
                return Err(Error::UnsupportedCombination {
                    what: "a latent cache (values in the keys) and a V buffer other than its K buffer",
                });
            }
            if k.size() != v.size() {
                return Err(Error::ShapeMismatch {
                    what: "each K buffer of a cache must be as large as its V buffer",
                    left_name: "k bytes",
                    left: k.size() as usize,
                    right_name: "v bytes",
                    right: v.size() as usize,
                });
            }
            let pages = (k.size() / page_bytes) as usize;
            if pages == 0 {
                return Err(Error::OutOfBounds {
                    tensor: "kv cache buffer (one page)",
                    needed: page_bytes as usize,
                    available: k.size() as usize,
                });
            }
            let pages = pages.min(geometry.pool_pages - first_page);
            owned.push(CacheSegment {
                first_page: first_page as u32,
                pages: pages as u32,
                k: k.clone(),
                v: (!config.values_in_keys()).then(|| v.clone()),
            });
            first_page += pages;
        }
        if first_page < geometry.pool_pages {
            return Err(Error::OutOfBounds {
                tensor: "kv cache pool (pages)",
                needed: geometry.pool_pages,
                available: first_page,
            });
        }
        Self::assemble(gpu, config, geometry, owned)
    }

    fn assemble(
        gpu: &Gpu,
        config: KvCacheConfig,
        geometry: Geometry,
        segments: Vec<CacheSegment>,
    ) -> Result<Self> {
        let batch = config.batch;
        let mut cache = KvCache {
            config,
            device: gpu.device.clone(),
            page_size: geometry.page_size,
            pool_pages: geometry.pool_pages,
            pages_per_seq: geometry.pages_per_seq,
            block_tables: vec![Vec::new(); batch],
            page_holders: vec![0; geometry.pool_pages],
            table_upload: OnceLock::new(),
            lens: vec![0; batch],
            segments,
        };
        for (sequence, table) in geometry.block_tables.into_iter().enumerate() {
            cache.set_block_table(sequence, &table)?;
        }
        Ok(cache)
    }

    /// The configuration the cache was made with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }
    /// Sequences in the cache.
    pub fn batch(&self) -> usize {
        self.config.batch
    }
    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.config.heads_kv
    }
    /// Elements per key head vector.
    pub fn head_dim(&self) -> usize {
        self.config.head_dim
    }
    /// Elements per value head vector (see [`KvValues`]).
    pub fn head_dim_v(&self) -> usize {
        self.config.head_dim_v()
    }
    /// Tokens per page (for a contiguous cache, the page size it chose).
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages in the pool (for a contiguous cache, `batch * ceil(capacity / page_size)`).
    pub fn pool_pages(&self) -> usize {
        self.pool_pages
    }
    pub(crate) fn pages_per_seq(&self) -> usize {
        self.pages_per_seq
    }
    /// Buffers per K (and per V) the pool is split over.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// Bytes of K plus V storage on the device.
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.k.size() + s.v.as_ref().map_or(0, wgpu::Buffer::size))
            .sum()
    }
    /// Current length of each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
    /// Tokens sequence `sequence` can hold with its pages, at most
    /// [`crate::MAX_SEQUENCE_LEN`] (the kernels hold positions in i32).
    pub fn capacity(&self, sequence: usize) -> usize {
        self.block_tables
            .get(sequence)
            .map_or(0, |table| table.len() * self.page_size)
            .min(crate::MAX_SEQUENCE_LEN)
    }
    /// Pool pages of `sequence`, in position order.
    pub fn block_table(&self, sequence: usize) -> Result<&[u32]> {
        self.check_sequence(sequence)?;
        Ok(&self.block_tables[sequence])
    }

    fn check_sequence(&self, sequence: usize) -> Result<()> {
        if sequence >= self.batch() {
            return Err(Error::CacheSequence {
                sequence,
                batch: self.batch(),
            });
        }
        Ok(())
    }

    /// Lists the pool pages of `sequence`, in order of position. A table
    /// may not list a page twice. Pages may be shared between sequences (a
    /// common prefix, read-only: [`KvCache::append`] refuses to write a
    /// shared page with [`Error::SharedPageWrite`]) and need not be
    /// consecutive. The sequence keeps its length, which must still fit.
    /// Entries may be [`RELEASED_PAGE`] (a table read back after
    /// [`KvCache::release_pages_before`]).
    pub fn set_block_table(&mut self, sequence: usize, pages: &[u32]) -> Result<()> {
        self.check_sequence(sequence)?;
        for (index, page) in held_entries(pages) {
            if page as usize >= self.pool_pages {
                return Err(Error::BlockTablePage {
                    sequence,
                    index,
                    page,
                    pool_pages: self.pool_pages,
                });
            }
        }
        let mut first_entry = HashMap::with_capacity(pages.len());
        for (index, page) in held_entries(pages) {
            if let Some(&first) = first_entry.get(&page) {
                return Err(Error::BlockTableRepeat {
                    sequence,
                    page,
                    first,
                    second: index,
                });
            }
            first_entry.insert(page, index);
        }
        if pages.len() > self.pages_per_seq {
            return Err(Error::CacheCapacity {
                sequence,
                needed: pages.len() * self.page_size,
                capacity: self.pages_per_seq * self.page_size,
            });
        }
        let capacity = pages.len() * self.page_size;
        if self.lens[sequence] > capacity {
            return Err(Error::CacheCapacity {
                sequence,
                needed: self.lens[sequence],
                capacity,
            });
        }
        for (_, page) in held_entries(&self.block_tables[sequence]) {
            self.page_holders[page as usize] -= 1;
        }
        for (_, page) in held_entries(pages) {
            self.page_holders[page as usize] += 1;
        }
        self.block_tables[sequence] = pages.to_vec();
        self.table_upload = OnceLock::new();
        Ok(())
    }

    /// Sets the length of `sequence` (to drop rejected tokens, or to start
    /// over); what lies past it is ignored.
    pub fn set_len(&mut self, sequence: usize, len: usize) -> Result<()> {
        self.check_sequence(sequence)?;
        let capacity = self.capacity(sequence);
        if len > capacity {
            return Err(Error::CacheCapacity {
                sequence,
                needed: len,
                capacity,
            });
        }
        self.lens[sequence] = len;
        Ok(())
    }

    /// The block tables as the kernels read them (`[batch, pages_per_seq]`,
    /// unassigned entries outside every segment), for the call being
    /// recorded.
    pub(crate) fn table_snapshot(&self, gpu: &Gpu) -> Result<wgpu::Buffer> {
        if let Some(table) = self.table_upload.get() {
            return Ok(table.clone());
        }
        let rows = self.table_rows();
        let table =
            gpu.storage_buffer("wgpu-flash-attn block table", bytemuck::cast_slice(&rows))?;
        Ok(self.table_upload.get_or_init(|| table).clone())
    }

    /// The block table as the kernels read it: one row of
    /// `pages_per_seq` words per sequence, `NO_PAGE` past its pages.
    pub(crate) fn table_rows(&self) -> Vec<u32> {
        self.table_rows_of(&(0..self.batch()).collect::<Vec<_>>())
    }

    /// [`KvCache::table_rows`] of `sequences` only, in that order.
    fn table_rows_of(&self, sequences: &[usize]) -> Vec<u32> {
        let mut rows = vec![NO_PAGE; sequences.len() * self.pages_per_seq];
        for (row, &sequence) in rows.chunks_mut(self.pages_per_seq).zip(sequences) {
            let table = &self.block_tables[sequence];
            row[..table.len()].copy_from_slice(table);
        }
        rows
    }

    /// [`KvCache::table_snapshot`]'s rows of `sequences` only, in that
    /// order (a copy of some sequences' caches), for the call being
    /// recorded.
    pub(crate) fn table_snapshot_of(&self, gpu: &Gpu, sequences: &[usize]) -> Result<wgpu::Buffer> {
        let rows = self.table_rows_of(sequences);
        gpu.storage_buffer(
            "wgpu-flash-attn block table rows",
            bytemuck::cast_slice(&rows),
        )
    }

    /// What the decode planner needs to know of the cache now.
    pub fn plan_shape(&self) -> crate::CacheShape {
        crate::CacheShape {
            batch: self.batch(),
            heads_kv: self.heads_kv(),
            head_dim: self.head_dim(),
            head_dim_v: self.head_dim_v(),
            longest: self.lens.iter().copied().max().unwrap_or(0),
            segments: self.segments.len(),
            dtype: self.config.dtype,
        }
    }

    /// Every buffer of the pool, named as errors name them.
    pub(crate) fn buffers(&self) -> impl Iterator<Item = (&'static str, &wgpu::Buffer)> {
        self.segments.iter().flat_map(|segment| {
            std::iter::once(("kv cache K", &segment.k))
                .chain(segment.v.as_ref().map(|v| ("kv cache V", v)))
        })
    }

    /// Whether the pool lives on `gpu`'s device.
    pub(crate) fn check_device(&self, gpu: &Gpu) -> Result<()> {
        gpu.check_owner(&self.device, "kv cache")
    }

    /// Records the append of `k` and `v` (`[batch, tokens, heads_kv,
    /// head_dim]`, f32, packed) after each sequence's last token into
    /// `encoder`, and advances the lengths (on the host, at once: calls
    /// recorded later see the new tokens). An encoder dropped unsubmitted
    /// after it never writes them: set the lengths back
    /// ([`KvCache::set_len`]) before recording more. With `rotation`, keys are
    /// rotated on the way (see [`KeyRotation`]). A latent cache takes
    /// [`KvCache::append_latent`] instead.
    pub fn append(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        k: &Tensor,
        v: &Tensor,
        rotation: Option<KeyRotation<'_>>,
    ) -> Result<()> {
        self.require_values_in_keys(
            false,
            "KvCache::append with a V tensor and a latent cache (values in the keys; use append_latent)",
        )?;
        self.record_append(gpu, encoder, k, Some(v), None, rotation)
    }

    /// [`KvCache::append`] with a count of tokens per sequence, for a batch
    /// whose sequences move at different speeds (continuous batching: a
    /// new request's prompt admitted while others decode, or a sequence
    /// sitting a step out): sequence `b` appends `counts[b]` tokens (0
    /// allowed), rows `counts[0] + .. + counts[b - 1]` on of `k` and `v`
    /// (`[1, sum of counts, heads_kv, head_dim]`, f32, packed). Its checks,
    /// rotation and lengths work per sequence as `append`'s do. Counts that
    /// are all 0 record nothing (no tensor has zero rows).
    pub fn append_ragged(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        counts: &[usize],
        k: &Tensor,
        v: &Tensor,
        rotation: Option<KeyRotation<'_>>,
    ) -> Result<()> {
        self.require_values_in_keys(
            false,
            "KvCache::append_ragged with a V tensor and a latent cache (values in the keys; use append_latent_ragged)",
        )?;
        self.record_append(gpu, encoder, k, Some(v), Some(counts), rotation)
    }

    /// Records the append of `latent` (`[batch, tokens, heads_kv,
    /// head_dim]`, f32, packed) to a latent cache ([`KvValues::KeyPrefix`]),
    /// like [`KvCache::append`]: each vector is stored once, as the key,
    /// and its first `head_dim_v` elements are the value. With `rotation`,
    /// the *last* `rotary_dim` elements are rotated (DeepSeek's `k_rope`
    /// after `c_kv`); they may not reach the value elements.
    pub fn append_latent(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        latent: &Tensor,
        rotation: Option<KeyRotation<'_>>,
    ) -> Result<()> {
        self.require_values_in_keys(
            true,
            "KvCache::append_latent and a cache with a V pool (use append)",
        )?;
        self.record_append(gpu, encoder, latent, None, None, rotation)
    }

    /// [`KvCache::append_latent`] with a count of tokens per sequence, as
    /// [`KvCache::append_ragged`].
    pub fn append_latent_ragged(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        counts: &[usize],
        latent: &Tensor,
        rotation: Option<KeyRotation<'_>>,
    ) -> Result<()> {
        self.require_values_in_keys(
            true,
            "KvCache::append_latent_ragged and a cache with a V pool (use append_ragged)",
        )?;
        self.record_append(gpu, encoder, latent, None, Some(counts), rotation)
    }

    /// `UnsupportedCombination` (naming the call, `what`) unless the
    /// cache's values live in its keys exactly when `in_keys`: the append
    /// forms with a V tensor are for caches with a V pool, the latent forms
    /// for latent caches.
    fn require_values_in_keys(&self, in_keys: bool, what: &'static str) -> Result<()> {
        if self.config.values_in_keys() != in_keys {
            return Err(Error::UnsupportedCombination { what });
        }
        Ok(())
    }

    /// An append of `k` (and `v`): `counts` tokens per sequence from a
    /// packed `[1, total, ..]` tensor, or (`None`) the same count for each
    /// from a `[batch, tokens, ..]` one.
    fn record_append(
        &mut self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        k: &Tensor,
        v: Option<&Tensor>,
        counts: Option<&[usize]>,
        rotation: Option<KeyRotation<'_>>,
    ) -> Result<()> {
        self.check_device(gpu)?;
        let shape = k.shape();
        let (counts, expected, layout) = match counts {
            None => (
                vec![shape.seq; self.batch()],
                [self.batch(), shape.seq, self.heads_kv(), self.head_dim()],
                "appended tokens must be [cache batch, tokens, cache heads_kv, cache head_dim]",
            ),
            Some(counts) => {
                if counts.len() != self.batch() {
                    return Err(Error::DataLength {
                        tensor: "append counts",
                        expected: self.batch(),
                        got: counts.len(),
                    });
                }
                let total = counts.iter().try_fold(0usize, |sum, &n| sum.checked_add(n));
                match total {
                    Some(0) => return Ok(()),
                    Some(total) => (
                        counts.to_vec(),
                        [1, total, self.heads_kv(), self.head_dim()],
                        "ragged appended tokens must be [1, sum of counts, cache heads_kv, cache head_dim]",
                    ),
                    None => {
                        return Err(Error::ShapeOverflow {
                            tensor: "append counts",
                            shape: [counts.len(), usize::MAX, self.heads_kv(), self.head_dim()],
                        });
                    }
                }
            }
        };
        for (name, tensor) in [("k", k)].into_iter().chain(v.map(|v| ("v", v))) {
            let got = tensor.shape();
            let axes = ["batch", "tokens", "heads", "head_dim"];
            for ((axis, have), want) in axes.into_iter().zip(got.as_array()).zip(expected) {
                if have != want {
                    return Err(Error::ShapeMismatch {
                        what: layout,
                        left_name: name,
                        left: have,
                        right_name: axis,
                        right: want,
                    });
                }
            }
            if tensor.dtype() != DType::F32 {
                return Err(Error::DTypeUnsupported {
                    tensor: name,
                    got: tensor.dtype(),
                    needed: DType::F32,
                });
            }
            if tensor.strides() != got.contiguous_strides() || tensor.offset() != 0 {
                return Err(Error::NotPacked { tensor: name });
            }
            tensor.check_in_bounds(name)?;
            tensor.check_device(gpu, name)?;
            // The append kernel binds the tokens' buffer whole: larger
            // inputs go in several appends.
            crate::tensor::check_binding_size(gpu, name, tensor.buffer().size())?;
        }
        // The kernel writes the pool: new tokens in a pool buffer's spare
        // bytes would be bound read-only beside it.
        let tokens = [("k", k)].into_iter().chain(v.map(|v| ("v", v)));
        let reads: Vec<_> = tokens.map(|(name, t)| (name, t.buffer())).collect();
        let writes: Vec<_> = self.buffers().collect();
        crate::operands::check_own_buffers(&writes, &reads)?;
        for (sequence, &count) in counts.iter().enumerate() {
            let needed = self.lens[sequence] + count;
            let capacity = self.capacity(sequence);
            if needed > capacity {
                return Err(Error::CacheCapacity {
                    sequence,
                    needed,
                    capacity,
                });
            }
            self.check_unreleased("append", sequence, self.lens[sequence]..needed)?;
        }
        self.check_pages_unshared(&counts)?;
        let (rotary_dim, half_split, freqs, offsets) = match rotation {
            Some(KeyRotation {
                rope,
                position_offsets: offsets,
            }) => {
                if offsets.len() != self.batch() {
                    return Err(Error::DataLength {
                        tensor: "position_offsets",
                        expected: self.batch(),
                        got: offsets.len(),
                    });
                }
                let rotary_dim = rope.checked_rotary_dim(self.head_dim())?;
                (
                    rotary_dim,
                    rope.half_split_flag(),
                    rope.frequency_table(rotary_dim),
                    offsets.to_vec(),
                )
            }
            None => (0, 0, Vec::new(), vec![0; self.batch()]),
        };
        if rotation.is_some() {
            let firsts = self.lens.iter().zip(&offsets);
            crate::rope::check_position_ranges(
                firsts
                    .map(|(&len, &offset)| len as u64 + u64::from(offset))
                    .zip(counts.iter().copied()),
            )?;
        }
        // Keys rotate their first rotary_dim elements; a latent its last
        // ones, which must leave the value prefix alone.
        let rotary_start = if v.is_some() {
            0
        } else {
            let rope_part = self.head_dim() - self.head_dim_v();
            if rotary_dim > rope_part {
                return Err(Error::ShapeMismatch {
                    what: "a latent's RoPE rotates its last rotary_dim elements, which may not reach the head_dim_v value elements",
                    left_name: "rotary_dim",
                    left: rotary_dim,
                    right_name: "head_dim - head_dim_v",
                    right: rope_part,
                });
            }
            self.head_dim() - rotary_dim
        };
        // Per sequence: first cache position, first rotary position (checked
        // above to fit u32 where they rotate anything), tokens, first
        // source row.
        let mut first_row = 0;
        let starts: Vec<[u32; 4]> = (0..self.batch())
            .map(|b| {
                let len = self.lens[b] as u64;
                let start = [
                    len as u32,
                    (len + u64::from(offsets[b])) as u32,
                    counts[b] as u32,
                    first_row as u32,
                ];
                first_row += counts[b];
                start
            })
            .collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        let strides = shape.contiguous_strides();
        let base = RopeParams {
            batch: self.batch() as u32,
            tokens: most as u32,
            heads: self.heads_kv() as u32,
            head_dim: self.head_dim() as u32,
            rotary_dim: rotary_dim as u32,
            half_split,
            src_seq: strides.seq as u32,
            src_head: strides.head as u32,
            src_offset: 0,
            page_shift: self.page_size.trailing_zeros(),
            pages_per_seq: self.pages_per_seq as u32,
            rotary_start: rotary_start as u32,
            write_values: u32::from(v.is_some()),
            ..RopeParams::default()
        };
        // One invocation per head vector a sequence may append (those past
        // a sequence's count return at once).
        let vectors = (self.batch() * most * shape.heads) as u64;
        let groups = elementwise_groups(gpu, "kv append", vectors)?;
        let spec = Specialization::KvAppend {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            dtype: self.config.dtype,
        };
        let pipeline = gpu.pipelines.get(gpu, &spec)?;
        let starts = gpu.storage_buffer("kv append starts", bytemuck::cast_slice(&starts))?;
        let freqs = gpu.storage_buffer("rope frequencies", bytemuck::cast_slice(&freqs))?;
        let table = self.table_snapshot(gpu)?;
        // A latent append stores no V (write_values = 0): the kernel's V
        // bindings get the source latent and the writable placeholder,
        // neither touched.
        let v_source = v.unwrap_or(k).buffer();
        let bind_groups: Vec<wgpu::BindGroup> = self
            .segments
            .iter()
            .map(|segment| {
                let params = RopeParams {
                    segment_first_page: segment.first_page,
                    segment_pages: segment.pages,
                    ..base
                };
                let uniform =
                    gpu.uniform_buffer("kv append params", bytemuck::bytes_of(&params))?;
                bind_buffers(
                    gpu,
                    &pipeline.bind_group_layout,
                    &[
                        &uniform,
                        &starts,
                        &freqs,
                        k.buffer(),
                        v_source,
                        &segment.k,
                        segment.v.as_ref().unwrap_or(&gpu.placeholders.writable),
                        &table,
                    ],
                )
            })
            .collect::<Result<_>>()?;
        encode_dispatches(encoder, "kv append", &pipeline, &bind_groups, groups);
        for (len, count) in self.lens.iter_mut().zip(&counts) {
            *len += count;
        }
        Ok(())
    }

    /// Positions where each sequence's next token will be rotated by
    /// [`KvCache::append`] with these offsets: the queries of the same
    /// tokens use them with [`Gpu::rope`](crate::Gpu::rope).
    /// `DataLength` unless there is one offset per sequence, `RopePosition`
    /// where a position would pass `u32::MAX`.
    pub fn next_positions(&self, position_offsets: &[u32]) -> Result<Vec<u32>> {
        if position_offsets.len() != self.batch() {
            return Err(Error::DataLength {
                tensor: "position_offsets",
                expected: self.batch(),
                got: position_offsets.len(),
            });
        }
        let firsts: Vec<u64> = self
            .lens
            .iter()
            .zip(position_offsets)
            .map(|(&len, &offset)| len as u64 + u64::from(offset))
            .collect();
        crate::rope::check_positions(firsts.iter().copied(), 1)?;
        Ok(firsts.into_iter().map(|p| p as u32).collect())
    }

    /// Appending `counts[b]` tokens to each sequence `b` writes pages that
    /// only the writing sequence may hold: a page shared with another
    /// sequence (a common prefix) is read-only, since a write would change
    /// the other sequence's tokens.
    fn check_pages_unshared(&self, counts: &[usize]) -> Result<()> {
        for (sequence, table) in self.block_tables.iter().enumerate() {
            let tokens = counts[sequence];
            if tokens == 0 {
                continue;
            }
            let first = self.lens[sequence] / self.page_size;
            let last = (self.lens[sequence] + tokens).div_ceil(self.page_size);
            for &page in &table[first.min(table.len())..last.min(table.len())] {
                if self.page_holders[page as usize] > 1 {
                    let other = (0..self.batch())
                        .find(|&other| {
                            other != sequence && self.block_tables[other].contains(&page)
                        })
                        .expect("a page held twice has another holder");
                    return Err(Error::SharedPageWrite {
                        sequence,
                        page,
                        other,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads the K and V of `sequence` back, `[len, heads_kv, head_dim]`
    /// and `[len, heads_kv, head_dim_v]`, packed (for tests and
    /// inspection; reads whole segments; released positions read as
    /// zeros). A latent cache's values are the prefixes of the keys read
    /// back. Blocks until the GPU is done (in a browser:
    /// [`KvCache::read_sequence_async`]).
    pub fn read_sequence(&self, gpu: &Gpu, sequence: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        block_on_readback(self.read_sequence_async(gpu, sequence))
    }

    /// [`KvCache::read_sequence`] as a future, as
    /// [`Tensor::to_f32_vec_async`].
    pub async fn read_sequence_async(
        &self,
        gpu: &Gpu,
        sequence: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_sequence(sequence)?;
        self.check_device(gpu)?;
        let (head_dim, head_dim_v) = (self.head_dim(), self.head_dim_v());
        let len = self.lens[sequence];
        let mut k_out = Vec::with_capacity(len * self.heads_kv() * head_dim);
        let mut v_out = Vec::with_capacity(len * self.heads_kv() * head_dim_v);
        // Whole segments as 4-byte words; tokens widened to f32 below.
        let mut loaded: Vec<Option<SegmentWords>> = vec![None; self.segments.len()];
        let dtype = self.config.dtype;
        let token_words = self.heads_kv() * dtype.vector_words(head_dim);
        for pos in 0..len {
            let page = self.block_tables[sequence][pos / self.page_size];
            if page == RELEASED_PAGE {
                k_out.resize(k_out.len() + self.heads_kv() * head_dim, 0.0);
                v_out.resize(v_out.len() + self.heads_kv() * head_dim_v, 0.0);
                continue;
            }
            let index = self.page_location(page).segment;
            let first_page = self.segments[index].first_page;
            if loaded[index].is_none() {
                let segment = &self.segments[index];
                let v = segment.v.as_ref();
                let v = match v {
                    Some(v) => Some(read_buffer_async(gpu, "kv cache V", v).await?),
                    None => None,
                };
                loaded[index] = Some((read_buffer_async(gpu, "kv cache K", &segment.k).await?, v));
            }
            let (k, v) = loaded[index].as_ref().expect("loaded above");
            let row = (page - first_page) as usize * self.page_size + pos % self.page_size;
            let words = row * token_words..(row + 1) * token_words;
            let token_start = k_out.len();
            widen_token(dtype, head_dim, &k[words.clone()], &mut k_out);
            match v {
                Some(v) => widen_token(dtype, head_dim, &v[words], &mut v_out),
                None => {
                    for key in k_out[token_start..].chunks_exact(head_dim) {
                        v_out.extend_from_slice(&key[..head_dim_v]);
                    }
                }
            }
        }
        Ok((k_out, v_out))
    }
}

/// One segment read back as words: K, and V unless the values are the
/// keys' prefix.
type SegmentWords = (Vec<u32>, Option<Vec<u32>>);

/// Each buffer of `segments` once: a segment's K and V apart (unless the
/// values live in the keys, where V is K's buffer) and no buffer in two
/// segments. Pages in one buffer under two page numbers would be written
/// through each other.
fn check_distinct_segments(
    config: &KvCacheConfig,
    segments: &[(wgpu::Buffer, wgpu::Buffer)],
) -> Result<()> {
    let mut seen: Vec<(usize, &'static str, &wgpu::Buffer)> = Vec::new();
    for (segment, (k, v)) in segments.iter().enumerate() {
        let mut uses = vec![("K", k)];
        if !config.values_in_keys() {
            uses.push(("V", v));
        }
        for (role, buffer) in uses {
            if let Some(&(first_segment, first, _)) = seen.iter().find(|(_, _, b)| *b == buffer) {
                return Err(Error::CacheBufferRepeat {
                    first_segment,
                    first,
                    second_segment: segment,
                    second: role,
                });
            }
            seen.push((segment, role, buffer));
        }
    }
    Ok(())
}

/// Appends one token's head vectors, stored as `dtype` in `words`, to `out`
/// as f32 (int8 and fp8: each value times its vector's scale).
fn widen_token(dtype: KvDType, head_dim: usize, words: &[u32], out: &mut Vec<f32>) {
    let halves = || words.iter().flat_map(|w| [*w as u16, (*w >> 16) as u16]);
    match dtype {
        KvDType::F32 => out.extend(words.iter().map(|&w| f32::from_bits(w))),
        KvDType::F16 => out.extend(halves().map(|h| half::f16::from_bits(h).to_f32())),
        KvDType::BF16 => out.extend(halves().map(|h| half::bf16::from_bits(h).to_f32())),
        KvDType::Int8 | KvDType::Fp8 => {
            let widen = match dtype {
                KvDType::Int8 => |b: u8| f32::from(b as i8),
                _ => |b: u8| float8::F8E4M3::from_bits(b).to_f32(),
            };
            for vector in words.chunks_exact(dtype.vector_words(head_dim)) {
                let (values, scale) = vector.split_at(head_dim / 4);
                let scale = f32::from_bits(scale[0]);
                out.extend(
                    values
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .map(|b| widen(b) * scale),
                );
            }
        }
    }
}
