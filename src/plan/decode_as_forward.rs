//! When a decode call runs as the forward kernels instead of the decode
//! kernel: many query rows per KV head over the cache (a chunk of a prompt
//! prefilled over the tokens already cached, a prompt whose prefix is
//! cached). The decode kernel's workgroups hold 8-64 query rows (its row
//! tiles), each reading its split of the cache, so more rows read the
//! cache more times; the forward kernels' row tiles share every K/V tile
//! among more rows. The cache is first copied into dense f32 K and V (one
//! pass over it, widening 16-bit and int8 values as the decode kernel
//! does), then the forward runs over the copy with each sequence's length
//! as its valid keys.
//!
//! Measured on lavapipe (Llama-3.1-70B's heads, d=128, 4K cached tokens,
//! BENCHMARKS.md, 2026-12-06), with an f32 cache: on Mesa 22.3 (8-row
//! tiles) 32 row tiles took the same time either way, 64 were 1.4-2.4x
//! faster as the forward, 128 1.7-2.6x; on Mesa 26.1 (16-row tiles) 32
//! row tiles were 0.93x in one round, 64 1.2-1.4x. Hence the bound in row
//! tiles. With 16-bit and int8 caches lavapipe's decode kernel computes
//! at a higher share of the FMA ceiling than the forward's CPU tier, so on
//! CPU adapters int8 caches keep the decode kernel (1.05-1.9x faster than
//! the copy and forward at 64 row tiles on both Mesas), and so do 16-bit
//! caches where the kernel's row tiles hold 16 rows (Mesa 26.1 at d=128:
//! the kernel faster in three rounds of four). Where they hold 8 (Mesa
//! 22.3), each K/V element is read by twice as many tiles, and 16-bit
//! caches took 1.1-1.8x less time as the forward in six rounds of six
//! (BENCHMARKS.md, 2026-12-07).

use super::decode::{CacheShape, DecodePlan, decodes_as_cpu};
use super::forward::ForwardPlan;
use crate::config::AttentionShape;
use crate::decode::DecodeOptions;
use crate::gpu::GpuInfo;
use crate::kv_cache::KvDType;
use crate::tensor::DType;

/// Most row tiles per KV head (workgroups along the query rows, each
/// reading the cache) the decode kernel keeps: past it a call runs as the
/// forward kernels, where both measured about the same on lavapipe. GPUs
/// share the bound (a head-dim workgroup there holds 8 rows at d=128:
/// 256 rows), unmeasured.
pub(crate) const MAX_DECODE_ROW_TILES: u32 = 32;

impl DecodePlan {
    /// The forward plan a decode call runs as ([`crate::Gpu::decode`]),
    /// or `None` when it runs the decode kernel. It does when the call
    /// leaves its kernels to the planners (no forced splits, lanes, tier,
    /// layout or f16 products), has f32 queries and output, equal key and
    /// value head dims, the decode plan would take more than 32 row tiles
    /// per KV head (more than 256 query rows at 8 a tile), a dense f32 copy
    /// of the cache's longest sequence fits one storage binding (K and V
    /// each), the cache is f32, or 16-bit in row tiles of at most 8 rows,
    /// where the adapter is a CPU (outside GL; any type elsewhere), and the
    /// forward planner can run it. The results are the decode kernel's up
    /// to f32 rounding.
    pub fn as_forward(
        info: &GpuInfo,
        cache: &CacheShape,
        seq_q: usize,
        heads_q: usize,
        q_dtype: DType,
        options: &DecodeOptions,
    ) -> Option<ForwardPlan> {
        DecodePlan::for_call(info, cache, seq_q, heads_q, options)
            .ok()?
            .forward_instead(info, cache, seq_q, heads_q, q_dtype, options)
    }

    /// The most query rows per KV head (query tokens x query heads per KV
    /// head) this plan's decode kernel keeps: a ragged call that runs as
    /// the forward runs its sequences with more there, the others on the
    /// decode kernel.
    pub(crate) fn most_kernel_rows(&self) -> usize {
        self.rows_per_workgroup as usize * MAX_DECODE_ROW_TILES as usize
    }

    /// Whether, on a CPU adapter, a cache of `dtype` is copied for the
    /// forward rather than read by this plan's decode kernel (the module's
    /// measurements).
    fn cpu_copies(&self, dtype: KvDType) -> bool {
        match dtype {
            KvDType::F32 => true,
            KvDType::F16 | KvDType::BF16 => self.rows_per_workgroup <= 8,
            KvDType::Int8 | KvDType::Fp8 => false,
        }
    }

    /// [`DecodePlan::as_forward`] for a call already planned as `self`
    /// (`Gpu::decode` plans once).
    pub(crate) fn forward_instead(
        &self,
        info: &GpuInfo,
        cache: &CacheShape,
        seq_q: usize,
        heads_q: usize,
        q_dtype: DType,
        options: &DecodeOptions,
    ) -> Option<ForwardPlan> {
        let config = &options.config;
        let left_to_planners = options.kv_splits.is_none()
            && options.lanes.is_none()
            && config.tier.is_none()
            && config.f16_products.is_none()
            && config.blocked_layout.is_none()
            && config.coop_layout.is_none()
            && config.active_dropout().is_none()
            // The forward has no token trees.
            && options.token_trees.is_none();
        if !left_to_planners
            || q_dtype != DType::F32
            || cache.head_dim != cache.head_dim_v
            || cache.longest == 0
            || self.row_tiles <= MAX_DECODE_ROW_TILES
            || (decodes_as_cpu(info) && !self.cpu_copies(cache.dtype))
        {
            return None;
        }
        let bytes = (cache.batch as u64)
            .checked_mul(cache.longest as u64)?
            .checked_mul(cache.heads_kv as u64)?
            .checked_mul(cache.head_dim as u64 * 4)?;
        let limits = &info.limits;
        if bytes > limits.max_storage_buffer_binding_size || bytes > limits.max_buffer_size {
            return None;
        }
        let shape = AttentionShape {
            batch: cache.batch,
            seq_q,
            seq_kv: cache.longest,
            heads_q,
            heads_kv: cache.heads_kv,
            head_dim: cache.head_dim,
            head_dim_v: cache.head_dim_v,
        };
        ForwardPlan::for_config(info, &shape, DType::F32, config).ok()
    }
}
