//! A dense forward call with few query rows per KV head runs as split-KV
//! decoding over its own K and V, viewed as a KV cache without a copy
//! ([`DecodePlan::for_forward`] says when, and why).

use crate::AttentionShape;
use crate::attention::AttentionArgs;
use crate::config::AttentionConfig;
use crate::decode::DecodeArgs;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::kv_cache::{KvCache, KvCacheConfig, KvLayout};
use crate::plan::{DecodePlan, cache_dtype, view_page_size};
use crate::tensor::Tensor;

impl Gpu {
    /// Records the forward of `args` as split-KV decoding when the call
    /// qualifies ([`DecodePlan::for_forward`]) and its K and V are laid out
    /// as a cache; `false` (nothing recorded) otherwise. The call's
    /// operands are checked before (`Gpu::prepare_call`).
    pub(crate) fn forward_as_decode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        shape: &AttentionShape,
    ) -> Result<bool> {
        if DecodePlan::for_forward(self.info(), shape, args.q.dtype(), config).is_none() {
            return Ok(false);
        }
        let Some(cache) = self.cache_view(args.k, args.v, shape) else {
            return Ok(false);
        };
        let decode = DecodeArgs {
            q: args.q,
            cache: &cache,
            out: args.out,
            lse: args.lse,
        };
        self.decode(encoder, &decode, config)?;
        Ok(true)
    }

    /// `k` and `v` as a paged cache whose block tables list each
    /// sequence's own pages in order, every sequence `shape.seq_kv` long:
    /// when each token's heads are packed, both start at offset 0 and
    /// share a batch stride of whole pages, and their buffers fit one
    /// binding each (`KvCache::from_shared_buffers` checks the buffers; K and V may
    /// be one tensor, as only decoding reads the view).
    fn cache_view(&self, k: &Tensor, v: &Tensor, shape: &AttentionShape) -> Option<KvCache> {
        let row = shape.heads_kv * shape.head_dim;
        let as_cache_rows = |t: &Tensor| {
            let strides = t.strides();
            t.offset() == 0 && strides.head == shape.head_dim && strides.seq == row
        };
        if !as_cache_rows(k) || !as_cache_rows(v) || k.strides().batch != v.strides().batch {
            return None;
        }
        // Token rows from one sequence's first to the next one's.
        let rows_per_sequence = if shape.batch > 1 {
            let stride = k.strides().batch;
            (stride.is_multiple_of(row) && stride / row >= shape.seq_kv).then_some(stride / row)?
        } else {
            shape.seq_kv
        };
        let page_size = view_page_size(rows_per_sequence)?;
        let pages_per_sequence = rows_per_sequence / page_size;
        let config = KvCacheConfig::new(
            shape.batch,
            shape.heads_kv,
            shape.head_dim,
            KvLayout::Paged {
                page_size,
                pages: shape.batch * pages_per_sequence,
            },
        )
        .dtype(cache_dtype(k.dtype()));
        let buffers = [(k.buffer().clone(), v.buffer().clone())];
        let mut cache = KvCache::from_shared_buffers(self, config, &buffers).ok()?;
        for sequence in 0..shape.batch {
            let first = sequence * pages_per_sequence;
            let pages: Vec<u32> = (first..first + pages_per_sequence)
                .map(|page| page as u32)
                .collect();
            cache.set_block_table(sequence, &pages).ok()?;
            cache.set_len(sequence, shape.seq_kv).ok()?;
        }
        Some(cache)
    }
}
