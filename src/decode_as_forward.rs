//! A decode call with many query rows per KV head runs as the forward
//! kernels over a dense f32 copy of the cache
//! ([`crate::DecodePlan::as_forward`] says when, and why).

use crate::attention::AttentionArgs;
use crate::config::AttentionConfig;
use crate::decode::{DecodeArgs, first_rows};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::params::KvGatherParams;
use crate::pipelines::{ELEMENTWISE_WORKGROUP, PreparedPass, bind_buffers, elementwise_groups};
use crate::plan::QueryTokens;
use crate::shaders::Specialization;
use crate::tensor::{DType, Tensor, TensorShape};
use crate::varlen::{Sequence, ValidLengths};

impl Gpu {
    /// The passes of the decode call `args` (checked by `Gpu::decode`), or
    /// of its sequences `selected` (a ragged call's with many query
    /// tokens), run as the forward, built but not recorded: a copy of
    /// those sequences' caches into dense f32 K and V (`[sequences,
    /// longest of them, heads_kv, head_dim]`, in the device's reusable
    /// scratch), then the forward over the copy with each sequence's
    /// length as its valid keys: its queries are the last positions of
    /// each sequence (bottom-right), as decoding's are. A ragged call's
    /// packed queries see the copy as one packed entry, each sequence its
    /// own rows of it; the forward writes only their rows.
    pub(crate) fn prepare_decode_as_forward(
        &self,
        args: &DecodeArgs<'_>,
        queries: QueryTokens<'_>,
        selected: &[usize],
        config: &AttentionConfig,
    ) -> Result<Vec<PreparedPass>> {
        let cache = args.cache;
        let lens: Vec<usize> = selected.iter().map(|&b| cache.lens()[b]).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let dense = TensorShape::new(selected.len(), longest, cache.heads_kv(), cache.head_dim());
        let bytes = dense.elements() as u64 * DType::F32.size_bytes() as u64;
        let keys = self.scratch_buffer("wgpu-flash-attn gathered keys", bytes)?;
        let values = self.scratch_buffer("wgpu-flash-attn gathered values", bytes)?;
        // One invocation per head vector.
        let vectors = (dense.batch * dense.seq * dense.heads) as u64;
        let groups = elementwise_groups(self, "kv gather", vectors)?;
        let spec = Specialization::KvGather {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            dtype: cache.config().dtype,
        };
        let pipeline = self.pipelines.get(self, &spec)?;
        let table = match queries {
            QueryTokens::Same(_) => cache.table_snapshot(self)?,
            QueryTokens::PerSequence(_) => cache.table_snapshot_of(self, selected)?,
        };
        let dispatches = cache
            .segments
            .iter()
            .map(|segment| {
                let params = KvGatherParams {
                    batch: dense.batch as u32,
                    seq: dense.seq as u32,
                    heads: dense.heads as u32,
                    d4: (dense.head_dim / 4) as u32,
                    page_shift: cache.page_size().trailing_zeros(),
                    pages_per_seq: cache.pages_per_seq() as u32,
                    segment_first_page: segment.first_page,
                    segment_pages: segment.pages,
                };
                let uniform =
                    self.uniform_buffer("kv gather params", bytemuck::bytes_of(&params))?;
                let bind_group = bind_buffers(
                    self,
                    &pipeline.bind_group_layout,
                    &[
                        &uniform,
                        &segment.k,
                        segment.values(),
                        &table,
                        &keys,
                        &values,
                    ],
                )?;
                Ok((bind_group, groups))
            })
            .collect::<Result<_>>()?;
        let gather = PreparedPass {
            label: "kv gather",
            pipeline,
            dispatches,
        };
        // A ragged call's view: the same bytes as one packed entry.
        let view = match queries {
            QueryTokens::Same(_) => dense,
            QueryTokens::PerSequence(_) => {
                TensorShape::new(1, dense.batch * dense.seq, dense.heads, dense.head_dim)
            }
        };
        let strides = view.contiguous_strides();
        let k = Tensor::from_buffer(self, keys, view, strides, 0, DType::F32)?;
        let v = Tensor::from_buffer(self, values, view, strides, 0, DType::F32)?;
        let forward = AttentionArgs {
            q: args.q,
            k: &k,
            v: &v,
            out: args.out,
            lse: args.lse,
        };
        let forward = match queries {
            QueryTokens::Same(_) => {
                let lengths = ValidLengths { q: None, kv: &lens };
                self.prepare_padded_attention(&forward, config, &lengths, None)?
            }
            QueryTokens::PerSequence(counts) => {
                let firsts = first_rows(counts);
                let sequences: Vec<Sequence> = selected
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| Sequence {
                        batch: 0,
                        q_start: firsts[b],
                        q_len: counts[b],
                        kv_batch: 0,
                        kv_start: i * dense.seq,
                        kv_len: lens[i],
                    })
                    .collect();
                // Each sequence's rows are its own: the forward writes
                // them and no other.
                let extents = selected.iter().map(|&b| counts[b]).collect();
                self.prepare_sequences(&forward, config, sequences, extents, None)?
            }
        };
        Ok([gather].into_iter().chain(forward).collect())
    }
}
