//! The KV cache for decoding: per-sequence lengths, paged storage (a
//! contiguous cache is the identity block table), split over several
//! buffers when one binding cannot hold the pool, and the in-place append
//! with optional fused rotary embedding of the keys.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::RopeParams;
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::rope::Rope;
use crate::shaders::Specialization;
use crate::tensor::{DType, Tensor, read_buffer};

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
    Contiguous { capacity: usize },
    /// A pool of `pages` pages of `page_size` tokens; each sequence lists
    /// its pages in a block table ([`KvCache::set_block_table`]), as vLLM
    /// and FlashAttention's `block_table`.
    Paged { page_size: usize, pages: usize },
}

/// Shape of a KV cache. Storage is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub batch: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub layout: KvLayout,
    /// Cap on the bytes of each K (and V) buffer; `None` means the
    /// adapter's storage-binding limit. Pools larger than one buffer are
    /// split over several, whole pages each.
    pub max_buffer_bytes: Option<u64>,
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
        }
    }
    pub fn max_buffer_bytes(mut self, bytes: u64) -> Self {
        self.max_buffer_bytes = Some(bytes);
        self
    }
}

/// Pages `first_page .. first_page + pages` of the pool, in one K and one V
/// buffer.
#[derive(Debug)]
pub(crate) struct CacheSegment {
    pub first_page: u32,
    pub pages: u32,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
}

/// A KV cache on the device. Sequences grow by [`KvCache::append`];
/// [`Gpu::decode_into`](crate::Gpu::decode_into) attends over them.
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    page_size: usize,
    pool_pages: usize,
    /// Width of a block-table row (the most pages one sequence may list).
    pages_per_seq: usize,
    block_tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
    pub(crate) segments: Vec<CacheSegment>,
    pub(crate) table_buffer: wgpu::Buffer,
    pub(crate) lens_buffer: wgpu::Buffer,
}

impl KvCache {
    pub fn new(gpu: &Gpu, config: KvCacheConfig) -> Result<Self> {
        let KvCacheConfig {
            batch,
            heads_kv,
            head_dim,
            layout,
            max_buffer_bytes,
        } = config;
        for (name, n) in [("batch", batch), ("heads_kv", heads_kv)] {
            if n == 0 {
                return Err(Error::ZeroDimension {
                    tensor: name,
                    shape: [batch, 0, heads_kv, head_dim],
                });
            }
        }
        if !crate::is_supported_head_dim(head_dim) {
            return Err(Error::HeadDimUnsupported {
                got: head_dim,
                supported: crate::SUPPORTED_HEAD_DIMS,
            });
        }
        let (page_size, pool_pages, pages_per_seq, block_tables) = match layout {
            KvLayout::Contiguous { capacity } => {
                let page_size = capacity
                    .next_power_of_two()
                    .clamp(*PAGE_SIZES.start(), *PAGE_SIZES.end());
                let per_seq = capacity.div_ceil(page_size).max(1);
                let tables = (0..batch)
                    .map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect())
                    .collect();
                (page_size, batch * per_seq, per_seq, tables)
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
                (page_size, pages, pages, vec![Vec::new(); batch])
            }
        };
        let page_bytes = (page_size * heads_kv * head_dim * 4) as u64;
        let limits = &gpu.info().limits;
        let (limit_name, binding_limit) = [
            (
                "max_storage_buffer_binding_size",
                limits.max_storage_buffer_binding_size,
            ),
            ("max_buffer_size", limits.max_buffer_size),
            (
                "KvCacheConfig::max_buffer_bytes",
                max_buffer_bytes.unwrap_or(u64::MAX),
            ),
        ]
        .into_iter()
        .min_by_key(|&(_, limit)| limit)
        .expect("three candidates");
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
                    gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: pages as u64 * page_bytes,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    })
                };
                CacheSegment {
                    first_page: first as u32,
                    pages: pages as u32,
                    k: make("wgpu-flash-attn kv cache K"),
                    v: make("wgpu-flash-attn kv cache V"),
                }
            })
            .collect();
        let table_buffer = gpu.storage_buffer(
            "wgpu-flash-attn block table",
            bytemuck::cast_slice(&vec![NO_PAGE; batch * pages_per_seq]),
        );
        let lens_buffer = gpu.storage_buffer(
            "wgpu-flash-attn sequence lengths",
            bytemuck::cast_slice(&vec![0u32; batch]),
        );
        let mut cache = KvCache {
            config,
            page_size,
            pool_pages,
            pages_per_seq,
            block_tables: vec![Vec::new(); batch],
            lens: vec![0; batch],
            segments,
            table_buffer,
            lens_buffer,
        };
        for (sequence, table) in block_tables.into_iter().enumerate() {
            cache.set_block_table(gpu, sequence, &table)?;
        }
        Ok(cache)
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }
    pub fn batch(&self) -> usize {
        self.config.batch
    }
    pub fn heads_kv(&self) -> usize {
        self.config.heads_kv
    }
    pub fn head_dim(&self) -> usize {
        self.config.head_dim
    }
    /// Tokens per page (for a contiguous cache, the page size it chose).
    pub fn page_size(&self) -> usize {
        self.page_size
    }
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
        self.segments.iter().map(|s| s.k.size() + s.v.size()).sum()
    }
    /// Current length of each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
    /// Tokens sequence `sequence` can hold with its pages.
    pub fn capacity(&self, sequence: usize) -> usize {
        self.block_tables
            .get(sequence)
            .map_or(0, |table| table.len() * self.page_size)
    }
    pub fn block_table(&self, sequence: usize) -> &[u32] {
        &self.block_tables[sequence]
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

    /// Lists the pool pages of `sequence`, in order of position. Pages may
    /// be shared between sequences (a common prefix) and need not be
    /// consecutive. The sequence keeps its length, which must still fit.
    pub fn set_block_table(&mut self, gpu: &Gpu, sequence: usize, pages: &[u32]) -> Result<()> {
        self.check_sequence(sequence)?;
        for (index, &page) in pages.iter().enumerate() {
            if page as usize >= self.pool_pages {
                return Err(Error::BlockTablePage {
                    sequence,
                    index,
                    page,
                    pool_pages: self.pool_pages,
                });
            }
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
        let mut row = vec![NO_PAGE; self.pages_per_seq];
        row[..pages.len()].copy_from_slice(pages);
        gpu.queue.write_buffer(
            &self.table_buffer,
            (sequence * self.pages_per_seq * 4) as u64,
            bytemuck::cast_slice(&row),
        );
        self.block_tables[sequence] = pages.to_vec();
        Ok(())
    }

    /// Sets the length of `sequence` (to drop rejected tokens, or to start
    /// over); what lies past it is ignored.
    pub fn set_len(&mut self, gpu: &Gpu, sequence: usize, len: usize) -> Result<()> {
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
        self.upload_lens(gpu);
        Ok(())
    }

    fn upload_lens(&self, gpu: &Gpu) {
        let lens: Vec<u32> = self.lens.iter().map(|&n| n as u32).collect();
        gpu.queue
            .write_buffer(&self.lens_buffer, 0, bytemuck::cast_slice(&lens));
    }

    /// Appends `k` and `v` (`[batch, tokens, heads_kv, head_dim]`, f32,
    /// packed) after each sequence's last token, on the GPU.
    pub fn append(&mut self, gpu: &Gpu, k: &Tensor, v: &Tensor) -> Result<()> {
        self.append_inner(gpu, k, v, None)
    }

    /// Like [`KvCache::append`], rotating the keys with `rope` on the way:
    /// a token written at cache position `p` of sequence `b` is rotated for
    /// position `p + position_offsets[b]`.
    pub fn append_rotated(
        &mut self,
        gpu: &Gpu,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        position_offsets: &[u32],
    ) -> Result<()> {
        self.append_inner(gpu, k, v, Some((rope, position_offsets)))
    }

    /// Positions where each sequence's next token will be rotated by
    /// [`KvCache::append_rotated`] with these offsets: the queries of the
    /// same tokens use them with [`Gpu::rope_in_place`].
    pub fn next_positions(&self, position_offsets: &[u32]) -> Vec<u32> {
        self.lens
            .iter()
            .zip(position_offsets)
            .map(|(&len, &offset)| len as u32 + offset)
            .collect()
    }

    fn append_inner(
        &mut self,
        gpu: &Gpu,
        k: &Tensor,
        v: &Tensor,
        rope: Option<(&Rope, &[u32])>,
    ) -> Result<()> {
        let shape = k.shape();
        let expected = [self.batch(), shape.seq, self.heads_kv(), self.head_dim()];
        for (name, tensor) in [("k", k), ("v", v)] {
            let got = tensor.shape();
            let axes = ["batch", "tokens", "heads", "head_dim"];
            for ((axis, have), want) in axes.into_iter().zip(got.as_array()).zip(expected) {
                if have != want {
                    return Err(Error::ShapeMismatch {
                        what: "appended tokens must be [cache batch, tokens, cache heads_kv, cache head_dim]",
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
        }
        for sequence in 0..self.batch() {
            let needed = self.lens[sequence] + shape.seq;
            let capacity = self.capacity(sequence);
            if needed > capacity {
                return Err(Error::CacheCapacity {
                    sequence,
                    needed,
                    capacity,
                });
            }
        }
        let (rotary_dim, half_split, freqs, offsets) = match rope {
            Some((rope, offsets)) => {
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
        let starts: Vec<[u32; 2]> = self
            .lens
            .iter()
            .zip(&offsets)
            .map(|(&len, &offset)| [len as u32, len as u32 + offset])
            .collect();
        let strides = shape.contiguous_strides();
        let base = RopeParams {
            batch: self.batch() as u32,
            tokens: shape.seq as u32,
            heads: self.heads_kv() as u32,
            head_dim: self.head_dim() as u32,
            rotary_dim: rotary_dim as u32,
            half_split,
            src_batch: strides.batch as u32,
            src_seq: strides.seq as u32,
            src_head: strides.head as u32,
            src_offset: 0,
            page_shift: self.page_size.trailing_zeros(),
            pages_per_seq: self.pages_per_seq as u32,
            ..RopeParams::default()
        };
        let groups = elementwise_groups(gpu, "kv append", (shape.elements() / 2) as u64)?;
        let spec = Specialization::KvAppend {
            workgroup_size: ELEMENTWISE_WORKGROUP,
        };
        let pipeline = gpu.pipelines.get(&gpu.device, &spec)?;
        let starts = gpu.storage_buffer("kv append starts", bytemuck::cast_slice(&starts));
        let freqs = gpu.storage_buffer("rope frequencies", bytemuck::cast_slice(&freqs));
        let bind_groups: Vec<wgpu::BindGroup> = self
            .segments
            .iter()
            .map(|segment| {
                let params = RopeParams {
                    segment_first_page: segment.first_page,
                    segment_pages: segment.pages,
                    ..base
                };
                let uniform = gpu.uniform_buffer("kv append params", bytemuck::bytes_of(&params));
                bind_buffers(
                    &gpu.device,
                    &pipeline.bind_group_layout,
                    &[
                        &uniform,
                        &starts,
                        &freqs,
                        k.buffer(),
                        v.buffer(),
                        &segment.k,
                        &segment.v,
                        &self.table_buffer,
                    ],
                )
            })
            .collect();
        gpu.submit_recorded("kv append dispatch", |encoder| {
            encode_dispatches(encoder, "kv append", &pipeline, &bind_groups, groups);
            Ok(())
        })?;
        for len in &mut self.lens {
            *len += shape.seq;
        }
        self.upload_lens(gpu);
        Ok(())
    }

    /// Reads the K and V of `sequence` back, `[len, heads_kv, head_dim]`
    /// each, packed (for tests and inspection; reads whole segments).
    pub fn read_sequence(&self, gpu: &Gpu, sequence: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_sequence(sequence)?;
        let token = self.heads_kv() * self.head_dim();
        let len = self.lens[sequence];
        let mut k_out = Vec::with_capacity(len * token);
        let mut v_out = Vec::with_capacity(len * token);
        let mut loaded: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; self.segments.len()];
        for pos in 0..len {
            let page = self.block_tables[sequence][pos / self.page_size] as usize;
            let pages_per_segment = self.segments[0].pages as usize;
            let index = page / pages_per_segment;
            if loaded[index].is_none() {
                let segment = &self.segments[index];
                loaded[index] =
                    Some((read_buffer(gpu, &segment.k)?, read_buffer(gpu, &segment.v)?));
            }
            let (k, v) = loaded[index].as_ref().expect("loaded above");
            let row = (page % pages_per_segment) * self.page_size + pos % self.page_size;
            k_out.extend_from_slice(&k[row * token..(row + 1) * token]);
            v_out.extend_from_slice(&v[row * token..(row + 1) * token]);
        }
        Ok((k_out, v_out))
    }
}
