//! When a dense forward call runs as split-KV decoding instead of the
//! forward kernels: few query rows per KV head over many keys (a decoding
//! step, or a short chunk of a prompt, over K and V tensors the caller
//! keeps itself). The forward kernels give each (batch, head) pair's query
//! tile one workgroup that walks every key, so such a call occupies a
//! handful of workgroups; the decode kernel splits the keys over many and
//! merges them exactly (FlashAttention's split-KV forward does the same).
//! Measured: on an H100 Llama-3.1-70B's heads over 128K keys took 40 ms
//! through the forward kernels and 0.98 ms through decoding; on lavapipe
//! Llama-3.1-405B's over 32K keys 4.2 s and 0.12 s (BENCHMARKS.md).

use super::decode::{CacheShape, DecodePlan, decodes_as_cpu};
use crate::AttentionShape;
use crate::config::AttentionConfig;
use crate::decode::DecodeOptions;
use crate::gpu::GpuInfo;
use crate::kv_cache::{KvDType, PAGE_SIZES};
use crate::tensor::DType;

/// Most query rows a KV head's group may have (`seq_q` x query heads per
/// KV head) for the call to run as decoding on a GPU: two decode
/// workgroups' rows there (head-dim lanes keep 8 in registers); past it,
/// the forward kernels' row tiles share each key load among more rows.
/// Measured there only at one query token (8 rows): 40x faster.
pub(crate) const MAX_ROWS_PER_KV_HEAD: usize = 16;

/// Fewest keys for the call to run as decoding on a GPU: shorter calls
/// are quick either way.
pub(crate) const MIN_KEYS: usize = 1024;

/// [`MAX_ROWS_PER_KV_HEAD`] on CPU adapters (lavapipe), where decoding
/// measured faster than the forward kernels up to 128 rows at every key
/// count tried (Llama-3.1-70B's heads, 256 to 32K keys: 8 rows 15-34x, 16
/// rows 13-18x, 64 rows 2.3-4.5x, 128 rows 1.8-2.2x on Mesa 22.3 and
/// 2.1-2.5x on Mesa 26.1; 256 rows 0.7-0.8x at 256-1K keys on Mesa 22.3;
/// BENCHMARKS.md, 2026-12-06).
pub(crate) const CPU_MAX_ROWS_PER_KV_HEAD: usize = 128;

/// [`MIN_KEYS`] on CPU adapters: at 256 keys one token decoded 15.6x and
/// 64 rows 2.3x faster there.
pub(crate) const CPU_MIN_KEYS: usize = 256;

/// Tokens per page of a cache view whose sequences are runs of `rows`
/// token rows: the largest power of two in [`PAGE_SIZES`] dividing `rows`,
/// so that page boundaries fall on sequence boundaries. `None` when not
/// even the smallest does.
pub(crate) fn view_page_size(rows: usize) -> Option<usize> {
    PAGE_SIZES
        .rev()
        .filter(|size| size.is_power_of_two())
        .find(|&size| rows.is_multiple_of(size))
}

/// The cache type that holds a forward call's K and V as they are.
pub(crate) fn cache_dtype(storage: DType) -> KvDType {
    match storage {
        DType::F32 => KvDType::F32,
        DType::F16 => KvDType::F16,
        DType::BF16 => KvDType::BF16,
    }
}

impl DecodePlan {
    /// The split-KV decode plan a dense forward call of `shape` runs as
    /// ([`crate::Gpu::forward`] without a mask, sequence lengths or
    /// `keys_per_dispatch`), or `None` when it runs the forward kernels
    /// ([`crate::ForwardPlan`]). It does when the call leaves its kernel to
    /// the planner (no forced tier, layout or f16 products; no dropout),
    /// has at most 16 query rows per KV head and at least 1024 keys on GPUs
    /// (128 rows and 256 keys on CPU adapters, where decoding measured
    /// faster that far), a multiple of 16, equal query/key and value
    /// head dims, K and V within one storage binding, and the decode
    /// planner can run it; and (checked by the call itself) K and V are
    /// laid out as a cache: `[batch, seq_kv, heads_kv, head_dim]` rows
    /// packed within each sequence, starting at offset 0, the same batch
    /// stride for both (a whole number of 16-token pages when `batch > 1`).
    /// Otherwise the call runs the forward kernels, with the same results
    /// up to f32 rounding.
    pub fn for_forward(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        config: &AttentionConfig,
    ) -> Option<DecodePlan> {
        let left_to_planner = config.tier.is_none()
            && config.f16_products.is_none()
            && config.blocked_layout.is_none()
            && config.coop_layout.is_none()
            && config.active_dropout().is_none();
        let (max_rows, min_keys) = if decodes_as_cpu(info) {
            (CPU_MAX_ROWS_PER_KV_HEAD, CPU_MIN_KEYS)
        } else {
            (MAX_ROWS_PER_KV_HEAD, MIN_KEYS)
        };
        if !left_to_planner
            || shape.heads_kv == 0
            || !shape.heads_q.is_multiple_of(shape.heads_kv)
            || shape.head_dim != shape.head_dim_v
            || shape.seq_kv < min_keys
            || view_page_size(shape.seq_kv).is_none()
        {
            return None;
        }
        shape
            .seq_q
            .checked_mul(shape.heads_q / shape.heads_kv)
            .filter(|&rows| rows <= max_rows)?;
        let dtype = cache_dtype(storage);
        let bytes = (shape.batch as u64)
            .checked_mul(shape.seq_kv as u64)?
            .checked_mul(shape.heads_kv as u64)?
            .checked_mul(dtype.vector_bytes(shape.head_dim) as u64)?;
        if bytes > info.limits.max_storage_buffer_binding_size {
            return None;
        }
        DecodePlan::for_call(
            info,
            &CacheShape::of_call(shape, dtype),
            shape.seq_q,
            shape.heads_q,
            &DecodeOptions::new(config),
        )
        .ok()
    }
}
