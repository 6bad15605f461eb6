//! Decoding: attention of a few new query tokens over a KV cache, with the
//! keys split across workgroups (flash-decoding) and the partial results
//! merged exactly by their logsumexp; and that merge as a public call.

use crate::attention::option_params;
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kv_cache::KvCache;
use crate::lse::{Lse, check_lse_output};
use crate::operands::{
    check_operand, check_output, check_own_buffers, require_equal, vec4_strides, vec4_view,
};
use crate::params::{CombineParams, DecodeParams, TensorStrides};
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, PreparedPass, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::plan::DecodePlan;
use crate::shaders::{DecodeIo, Specialization};
use crate::tensor::{DType, Tensor, TensorShape, check_binding_size, require_usage};

/// The operands of one decode call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeArgs<'a> {
    /// `[batch, seq_q, heads_q, head_dim]`: the newest `seq_q` tokens of
    /// each sequence, already appended to the cache. Query `i` sits at
    /// position `len - seq_q + i` (bottom-right, as everywhere). f32, f16
    /// or bf16, whatever the cache's type.
    pub q: &'a Tensor,
    /// The cache to attend over; each sequence's length already counts its `seq_q` query tokens.
    pub cache: &'a KvCache,
    /// Shaped like `q` (its last dim the cache's value head dim), and of
    /// `q`'s storage type.
    pub out: &'a Tensor,
    /// Optional logsumexp output, `[batch, heads_q, seq_q]`.
    pub lse: Option<&'a Lse>,
}

/// How decoding's subgroup tier ([`crate::Tier::SubgroupBroadcast`])
/// spreads a workgroup's keys over its lanes. All give the same results
/// up to f32 rounding order; they differ in speed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeLanes {
    /// Lanes split every head vector, and `subgroupAdd` completes each
    /// score; each lane holds a slice of every row's query and output. The
    /// default on GPUs.
    HeadDim,
    /// Each lane takes its own keys (four of every `4 x lanes`), reads
    /// their whole vectors and keeps its own online softmax of every row;
    /// the lanes merge by logsumexp once at the end. Each lane holds every
    /// row's whole query and output, which suits CPU adapters (the default
    /// there: 2-3x faster on lavapipe) and would spill registers on a GPU.
    /// A GQA group past 2048 such floats per lane runs as several
    /// workgroups of fewer rows (on CPU adapters at least 8; past 2048 at
    /// 8 rows it is lanes over the head dim by default and refused when
    /// forced, [`crate::Error::KeyLanesState`]).
    Keys,
    /// The workgroup stages one key per lane (K and V, widened to f32) in
    /// workgroup memory with coalesced loads; each lane scores its own key
    /// against every row, with no cross-lane sum per score, and lanes split
    /// the value head dim for the weighted sum of values. Built for GPUs
    /// (a head-dim score costs `subgroupAdd` steps per row and four keys,
    /// this one a `subgroupMax` per row and tile); not yet anyone's default
    /// (BENCHMARKS.md). Needs the tiles in workgroup memory: where they do
    /// not fit (wide heads) it is refused ([`crate::Error::WorkgroupMemory`]).
    KeyTiles,
}

/// Options of a decode call: the attention options (as the forward pass)
/// and how the keys are split. An `&AttentionConfig` converts into options
/// with the split count chosen for the adapter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodeOptions {
    /// Causal, windows, scale, softcap, ALiBi, tier.
    pub config: AttentionConfig,
    /// Split each sequence's keys into this many chunks, one workgroup
    /// each; `None` picks enough to fill the adapter ([`DecodePlan`]).
    /// A forced count is refused where it does not fit: past the
    /// adapter's workgroups per dimension (`DispatchTooLarge`), or on
    /// llvmpipe with more keys per split than its loop cap allows
    /// (`LoopBudget`) or more partial results to merge (splits times the
    /// cache's buffers past 32766: `MergeLoopBudget`).
    pub kv_splits: Option<usize>,
    /// The subgroup tier's lane layout; `None` picks the adapter's
    /// ([`DecodePlan`]). Forcing one where the call does not run the
    /// subgroup tier is an error (`TierUnavailable`, or
    /// `UnsupportedCombination` with a forced portable tier).
    pub lanes: Option<DecodeLanes>,
}

impl DecodeOptions {
    /// Options with `config` and the default split count.
    pub fn new(config: &AttentionConfig) -> Self {
        DecodeOptions {
            config: config.clone(),
            kv_splits: None,
            lanes: None,
        }
    }
    /// Forces the split count.
    pub fn kv_splits(mut self, splits: usize) -> Self {
        self.kv_splits = Some(splits);
        self
    }
    /// Forces the subgroup tier's lane layout.
    pub fn lanes(mut self, lanes: DecodeLanes) -> Self {
        self.lanes = Some(lanes);
        self
    }
}

impl From<&AttentionConfig> for DecodeOptions {
    fn from(config: &AttentionConfig) -> Self {
        DecodeOptions::new(config)
    }
}

impl From<AttentionConfig> for DecodeOptions {
    fn from(config: AttentionConfig) -> Self {
        DecodeOptions {
            config,
            kv_splits: None,
            lanes: None,
        }
    }
}

/// Partial results: slot-major outputs and logsumexps, in the device's
/// reusable scratch (a decode step per token allocates nothing here).
struct Partials {
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
    /// vec4s per slot of `out`, floats per slot of `lse`.
    out_slot: u32,
    lse_slot: u32,
}

impl Partials {
    /// Slots of partial outputs shaped like `o`.
    fn new(gpu: &Gpu, slots: u32, o: TensorShape) -> Result<Self> {
        let rows = (o.batch * o.seq * o.heads) as u64;
        let out_bytes = u64::from(slots) * rows * o.head_dim as u64 * 4;
        check_binding_size(gpu, "decode partial outputs", out_bytes)?;
        Ok(Partials {
            out: gpu.scratch_buffer("wgpu-flash-attn partial outputs", out_bytes)?,
            lse: gpu.scratch_buffer("wgpu-flash-attn partial lse", u64::from(slots) * rows * 4)?,
            out_slot: (rows * o.head_dim as u64 / 4) as u32,
            lse_slot: rows as u32,
        })
    }
}

impl Gpu {
    /// Records a decode step into `encoder`: attention of `args.q` over
    /// the cache into `args.out` (and `args.lse` if given), one dispatch
    /// per cache buffer, then the merge when the keys were split. The
    /// cache's lengths and block tables are taken as they are now (see
    /// [`KvCache`]). `options`: an `&AttentionConfig` or [`DecodeOptions`].
    pub fn decode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &DecodeArgs<'_>,
        options: impl Into<DecodeOptions>,
    ) -> Result<DecodePlan> {
        let options = options.into();
        let config = &options.config;
        let cache = args.cache;
        cache.check_device(self)?;
        let q = args.q.shape();
        let shape = AttentionShape {
            batch: q.batch,
            seq_q: q.seq,
            seq_kv: cache.lens().iter().copied().max().unwrap_or(0).max(1),
            heads_q: q.heads,
            heads_kv: cache.heads_kv(),
            head_dim: q.head_dim,
            head_dim_v: cache.head_dim_v(),
        };
        let o = args.out.shape();
        let like_q = "decode: O is [batch, seq_q, heads_q, cache head_dim_v]";
        require_equal(&[
            (
                "decode: Q and cache",
                "q.batch",
                q.batch,
                "cache.batch",
                cache.batch(),
            ),
            (
                "decode: Q and cache",
                "q.head_dim",
                q.head_dim,
                "cache.head_dim",
                cache.head_dim(),
            ),
            (like_q, "q.batch", q.batch, "out.batch", o.batch),
            (like_q, "q.seq", q.seq, "out.seq", o.seq),
            (like_q, "q.heads", q.heads, "out.heads", o.heads),
            (
                like_q,
                "cache.head_dim_v",
                cache.head_dim_v(),
                "out.head_dim",
                o.head_dim,
            ),
        ])?;
        config.validate(&shape)?;
        if config.active_dropout().is_some() {
            return Err(Error::UnsupportedCombination {
                what: "dropout and decoding (dropout is a training option)",
            });
        }
        // Queries and output in f32, f16 or bf16, one type for both (the
        // cache's type is its own).
        let io_dtype = args.q.dtype();
        check_operand(self, "q", args.q, io_dtype)?;
        check_output(self, "out", args.out, io_dtype)?;
        check_lse_output(self, args.lse, [q.batch, q.heads, q.seq])?;
        // The cache's buffers too: an output placed in a pool buffer's
        // spare bytes would be bound beside it, or overwrite its pages.
        let mut writes = vec![("out", args.out.buffer())];
        writes.extend(args.lse.map(|l| ("lse", l.buffer())));
        let mut reads = vec![("q", args.q.buffer())];
        reads.extend(cache.buffers());
        check_own_buffers(&writes, &reads)?;
        let cache_shape = cache.plan_shape();
        let mut plan = DecodePlan::for_call(self.info(), &cache_shape, q.seq, q.heads, &options)?;
        // Many query rows per KV head: the forward kernels over a dense
        // copy of the cache (src/decode_as_forward.rs).
        plan.as_forward = plan.forward_instead(
            self.info(),
            &cache_shape,
            q.seq,
            q.heads,
            io_dtype,
            &options,
        );
        if plan.as_forward.is_some() {
            self.decode_as_forward(encoder, args, config)?;
            return Ok(plan);
        }
        let partials = if plan.slots > 1 {
            Some(Partials::new(self, plan.slots, o)?)
        } else {
            None
        };
        // Partial results stay f32; the combine pass stores the output.
        plan.specialization = plan.specialization.with_decode_io(DecodeIo {
            q: io_dtype,
            out: if partials.is_some() {
                DType::F32
            } else {
                io_dtype
            },
        });
        let mut params = option_params(&shape, config, args.lse.is_some() || partials.is_some());
        params.q = vec4_strides(args.q);
        let vector_units = cache.config().dtype.vector_vec4s(cache.head_dim()) as u32;
        let cache_strides = TensorStrides {
            batch: 0,
            seq: cache.heads_kv() as u32 * vector_units,
            head: vector_units,
            offset: 0,
        };
        params.k = cache_strides;
        params.v = cache_strides;
        params.o = match &partials {
            Some(_) => vec4_view(o.contiguous_strides(), 0),
            None => vec4_strides(args.out),
        };
        let head_table = self.head_table_buffer(config)?;
        let params_buffer = self.params_buffer(&params)?;
        let pipeline = self.pipelines.get(self, &plan.specialization)?;
        let lens = cache.lens_snapshot(self)?;
        let table = cache.table_snapshot(self)?;
        let (out_buffer, lse_buffer) = match &partials {
            Some(p) => (&p.out, &p.lse),
            None => (
                args.out.buffer(),
                args.lse.map_or(&self.placeholders.writable, |l| l.buffer()),
            ),
        };
        let bind_groups: Vec<wgpu::BindGroup> = cache
            .segments
            .iter()
            .enumerate()
            .map(|(index, segment)| {
                let decode = DecodeParams {
                    group: (q.heads / cache.heads_kv()) as u32,
                    rows: (q.seq * q.heads / cache.heads_kv()) as u32,
                    splits: plan.splits,
                    split_keys: plan.split_keys,
                    page_shift: cache.page_size().trailing_zeros(),
                    pages_per_seq: cache.pages_per_seq() as u32,
                    segment_first_page: segment.first_page,
                    segment_pages: segment.pages,
                    slot_base: index as u32 * plan.splits,
                    o_slot: partials.as_ref().map_or(0, |p| p.out_slot),
                    lse_slot: partials.as_ref().map_or(0, |p| p.lse_slot),
                    _pad: 0,
                };
                let decode_buffer =
                    self.uniform_buffer("decode params", bytemuck::bytes_of(&decode))?;
                bind_buffers(
                    self,
                    &pipeline.bind_group_layout,
                    &[
                        &params_buffer,
                        args.q.buffer(),
                        &segment.k,
                        segment.values(),
                        out_buffer,
                        lse_buffer,
                        head_table.as_ref().unwrap_or(&self.placeholders.read_only),
                        &decode_buffer,
                        &lens,
                        &table,
                    ],
                )
            })
            .collect::<Result<_>>()?;
        let combine = match &partials {
            Some(partials) => Some(self.prepare_combine(partials, plan.slots, args.out, args.lse)?),
            None => None,
        };
        let workgroups = [
            plan.row_tiles * plan.splits,
            cache.heads_kv() as u32,
            cache.batch() as u32,
        ];
        encode_dispatches(
            encoder,
            "split-KV decode",
            &pipeline,
            &bind_groups,
            workgroups,
        );
        if let Some(combine) = combine {
            combine.record(encoder);
        }
        Ok(plan)
    }

    /// Records the exact merge of partial attention results over disjoint
    /// parts of the same keys into the attention over all of them: each
    /// part is an output (`[batch, seq_q, heads_q, head_dim]`, f32, packed)
    /// and its logsumexp (+inf where the part had no key for a row). Shard
    /// a long sequence across calls or devices, then merge here. The parts
    /// need `COPY_SRC` (they are gathered into one scratch buffer). On
    /// llvmpipe one call merges at most 32766 parts
    /// ([`Error::MergeLoopBudget`] past that: merge in stages).
    pub fn merge(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        parts: &[(&Tensor, &Lse)],
        out: &Tensor,
        lse: Option<&Lse>,
    ) -> Result<()> {
        let Some((first, _)) = parts.first() else {
            return Err(Error::NothingToMerge);
        };
        crate::plan::check_merge_budget(self.info(), parts.len() as u64)?;
        let q = first.shape();
        for (name, tensor) in parts
            .iter()
            .map(|(t, _)| ("partial output", *t))
            .chain([("out", out)])
        {
            let s = tensor.shape();
            if s != q {
                return Err(Error::ShapeMismatch {
                    what: "merge: every part and the output must have one shape",
                    left_name: name,
                    left: s.elements(),
                    right_name: "first part",
                    right: q.elements(),
                });
            }
            check_operand(self, name, tensor, DType::F32)?;
        }
        // The parts are copied into scratch before the merge writes: only
        // the two outputs must keep apart.
        out.check_distinct("out")?;
        if let Some(lse) = lse {
            check_own_buffers(&[("out", out.buffer()), ("lse", lse.buffer())], &[])?;
        }
        for (tensor, part_lse) in parts {
            if tensor.strides() != q.contiguous_strides() || tensor.offset() != 0 {
                return Err(Error::NotPacked {
                    tensor: "partial output",
                });
            }
            check_lse_output(self, Some(part_lse), [q.batch, q.heads, q.seq])?;
            let copy = wgpu::BufferUsages::COPY_SRC;
            require_usage("partial output", tensor.buffer(), copy, "gather it")?;
            require_usage("partial lse", part_lse.buffer(), copy, "gather it")?;
        }
        check_lse_output(self, lse, [q.batch, q.heads, q.seq])?;
        let slots = parts.len() as u32;
        let partials = Partials::new(self, slots, q)?;
        let combine = self.prepare_combine(&partials, slots, out, lse)?;
        let out_bytes = u64::from(partials.out_slot) * 16;
        let lse_bytes = u64::from(partials.lse_slot) * 4;
        for (slot, (tensor, part_lse)) in parts.iter().enumerate() {
            let slot = slot as u64;
            encoder.copy_buffer_to_buffer(
                tensor.buffer(),
                0,
                &partials.out,
                slot * out_bytes,
                out_bytes,
            );
            encoder.copy_buffer_to_buffer(
                part_lse.buffer(),
                0,
                &partials.lse,
                slot * lse_bytes,
                lse_bytes,
            );
        }
        combine.record(encoder);
        Ok(())
    }

    /// The merge of `slots` partial results into `out` (and `lse`),
    /// compiled and bound, for the caller to record after what writes the
    /// partials: an error here leaves nothing recorded.
    fn prepare_combine(
        &self,
        partials: &Partials,
        slots: u32,
        out: &Tensor,
        lse: Option<&Lse>,
    ) -> Result<PreparedPass> {
        let q = out.shape();
        let strides = vec4_strides(out);
        let params = CombineParams {
            batch: q.batch as u32,
            seq_q: q.seq as u32,
            heads_q: q.heads as u32,
            d4: (q.head_dim / 4) as u32,
            slots,
            o_slot: partials.out_slot,
            lse_slot: partials.lse_slot,
            write_lse: u32::from(lse.is_some()),
            out_batch: strides.batch,
            out_seq: strides.seq,
            out_head: strides.head,
            out_offset: strides.offset,
        };
        let groups = elementwise_groups(self, "merge", (q.elements() / 4) as u64)?;
        let spec = Specialization::Combine {
            workgroup_size: ELEMENTWISE_WORKGROUP,
            out: out.dtype(),
        };
        let pipeline = self.pipelines.get(self, &spec)?;
        let uniform = self.uniform_buffer("combine params", bytemuck::bytes_of(&params))?;
        let bind_group = bind_buffers(
            self,
            &pipeline.bind_group_layout,
            &[
                &uniform,
                &partials.out,
                &partials.lse,
                out.buffer(),
                lse.map_or(&self.placeholders.writable, |l| l.buffer()),
            ],
        )?;
        Ok(PreparedPass::one(
            "merge partials",
            pipeline,
            bind_group,
            groups,
        ))
    }
}
