//! A decode call with many query rows per KV head runs as the forward
//! kernels over a dense f32 copy of the cache
//! ([`crate::DecodePlan::as_forward`] says when, and why).

use crate::attention::AttentionArgs;
use crate::config::AttentionConfig;
use crate::decode::DecodeArgs;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::params::KvGatherParams;
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::shaders::Specialization;
use crate::tensor::{DType, Tensor, TensorShape};
use crate::varlen::ValidLengths;

impl Gpu {
    /// Records the decode call `args` (checked by `Gpu::decode`) as a copy
    /// of its cache into dense f32 K and V (`[batch, longest sequence,
    /// heads_kv, head_dim]`, in the device's reusable scratch), then the
    /// forward over them with each sequence's length as its valid keys:
    /// its queries are the last `seq_q` positions of each sequence
    /// (bottom-right), as decoding's are.
    pub(crate) fn decode_as_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &DecodeArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<()> {
        let cache = args.cache;
        let longest = cache.lens().iter().copied().max().unwrap_or(0);
        let dense = TensorShape::new(cache.batch(), longest, cache.heads_kv(), cache.head_dim());
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
        let table = cache.table_snapshot(self)?;
        let bind_groups: Vec<wgpu::BindGroup> = cache
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
                bind_buffers(
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
                )
            })
            .collect::<Result<_>>()?;
        let strides = dense.contiguous_strides();
        let k = Tensor::from_buffer(self, keys, dense, strides, 0, DType::F32)?;
        let v = Tensor::from_buffer(self, values, dense, strides, 0, DType::F32)?;
        let forward = AttentionArgs {
            q: args.q,
            k: &k,
            v: &v,
            out: args.out,
            lse: args.lse,
        };
        let lengths = ValidLengths {
            q: None,
            kv: cache.lens(),
        };
        // The forward's pass is built before the copy is recorded, so that
        // an error leaves the caller's encoder as it was.
        let forward = self.prepare_padded_attention(&forward, config, &lengths, None)?;
        encode_dispatches(encoder, "kv gather", &pipeline, &bind_groups, groups);
        if let Some(forward) = forward {
            forward.record(encoder);
        }
        Ok(())
    }
}
