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
use crate::params::{CombineParams, DecodeParams, DecodeSequence, TensorStrides};
use crate::pipelines::{ELEMENTWISE_WORKGROUP, PreparedPass, bind_buffers, elementwise_groups};
use crate::plan::{CacheShape, DecodePlan, QueryTokens, sequence_row_tiles};
use crate::shaders::{DecodeIo, Specialization};
use crate::tensor::{DType, Tensor, TensorShape, check_binding_size, require_usage};
use crate::token_tree::{TokenTree, check_trees, tree_words};

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
    /// Speculative decoding's token trees, one per cache sequence, each
    /// with as many tokens as its sequence has query tokens in the call:
    /// a query token then sees the keys before its sequence's draft, its
    /// ancestors and itself only (on top of causal and windows, which
    /// still apply). `None`: by position alone. Calls with trees always
    /// run the decode kernel, not the forward
    /// ([`DecodePlan::as_forward`] stays `None`). Not one tree per
    /// sequence is [`Error::DataLength`]; a tree of another size than its
    /// sequence's query tokens [`Error::TokenTreeSize`].
    pub token_trees: Option<Vec<TokenTree>>,
}

impl DecodeOptions {
    /// Options with `config` and the default split count.
    pub fn new(config: &AttentionConfig) -> Self {
        DecodeOptions {
            config: config.clone(),
            kv_splits: None,
            lanes: None,
            token_trees: None,
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
    /// Masks each sequence's draft tokens by its token tree (one per cache
    /// sequence, [`DecodeOptions::token_trees`]).
    pub fn token_trees(mut self, trees: Vec<TokenTree>) -> Self {
        self.token_trees = Some(trees);
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
            token_trees: None,
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
        let tokens = QueryTokens::Same(args.q.shape().seq);
        self.record_decode(encoder, args, tokens, options.into())
    }

    /// [`Gpu::decode`] with a number of query tokens per sequence, for a
    /// batch whose sequences move at different speeds (continuous
    /// batching: a new request's prompt chunk beside sequences decoding
    /// one token, speculative drafts of different lengths, a sequence
    /// sitting a step out). Sequence `b` has `query_counts[b]` query
    /// tokens (0 allowed), the last `query_counts[b]` positions of its
    /// keys; they are rows `query_counts[0] + .. + query_counts[b - 1]` on
    /// of `args.q` and `args.out`, packed as `[1, sum of counts, heads,
    /// head_dim]`, and the logsumexp is `[1, heads_q, sum of counts]` (as
    /// a packed variable-length forward's). One dispatch per cache buffer
    /// serves every sequence. Where the largest count would run as the
    /// forward ([`DecodePlan::as_forward`]), the call splits: sequences
    /// with more query rows than the decode kernel keeps run as the
    /// forward over a copy of their caches, the others on the decode
    /// kernel (ALiBi slopes per batch entry keep every sequence on the
    /// kernel). Counts that are all 0 record nothing and return `None` (no
    /// tensor has zero rows), as [`KvCache::append_ragged`] does.
    pub fn decode_ragged(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &DecodeArgs<'_>,
        query_counts: &[usize],
        options: impl Into<DecodeOptions>,
    ) -> Result<Option<DecodePlan>> {
        if query_counts.len() != args.cache.batch() {
            return Err(Error::DataLength {
                tensor: "decode query counts (one per cache sequence)",
                expected: args.cache.batch(),
                got: query_counts.len(),
            });
        }
        if query_counts.iter().all(|&n| n == 0) {
            return Ok(None);
        }
        self.record_decode(
            encoder,
            args,
            QueryTokens::PerSequence(query_counts),
            options.into(),
        )
        .map(Some)
    }

    fn record_decode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &DecodeArgs<'_>,
        queries: QueryTokens<'_>,
        options: DecodeOptions,
    ) -> Result<DecodePlan> {
        let config = &options.config;
        let cache = args.cache;
        cache.check_device(self)?;
        let q = args.q.shape();
        // Query tokens of the sequence with the most; a ragged call's
        // tensors are one packed batch entry.
        let (most_queries, q_batch, batch_what, batch_name) = match queries {
            QueryTokens::Same(_) => (q.seq, cache.batch(), "decode: Q and cache", "cache.batch"),
            QueryTokens::PerSequence(counts) => {
                let total = counts.iter().try_fold(0usize, |sum, &n| sum.checked_add(n));
                if total != Some(q.seq) {
                    return Err(Error::ShapeMismatch {
                        what: "decode_ragged: Q is [1, sum of query counts, heads_q, head_dim]",
                        left_name: "q.seq",
                        left: q.seq,
                        right_name: "sum of query counts",
                        right: total.unwrap_or(usize::MAX),
                    });
                }
                let most = counts.iter().copied().max().unwrap_or(0);
                (
                    most,
                    1,
                    "decode_ragged: Q is one packed batch entry",
                    "packed batch",
                )
            }
        };
        let shape = AttentionShape {
            batch: cache.batch(),
            seq_q: most_queries,
            seq_kv: cache.lens().iter().copied().max().unwrap_or(0).max(1),
            heads_q: q.heads,
            heads_kv: cache.heads_kv(),
            head_dim: q.head_dim,
            head_dim_v: cache.head_dim_v(),
        };
        let o = args.out.shape();
        let like_q = "decode: O is [batch, seq_q, heads_q, cache head_dim_v]";
        require_equal(&[
            (batch_what, "q.batch", q.batch, batch_name, q_batch),
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
        let query_count = |b: usize| match queries {
            QueryTokens::Same(n) => n,
            QueryTokens::PerSequence(counts) => counts[b],
        };
        if let Some(trees) = &options.token_trees {
            check_trees(trees, cache.batch(), query_count)?;
        }
        cache.check_released_out_of_view(query_count, config.window_left)?;
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
        let mut plan =
            DecodePlan::for_queries(self.info(), &cache_shape, queries, q.heads, &options)?;
        // Many query rows per KV head: the forward kernels over a dense
        // copy of the cache (src/decode_as_forward.rs). A ragged call
        // splits: the sequences with more query rows than the decode
        // kernel's row tiles keep (and some keys) take the forward over a
        // copy of their caches alone, the others the kernel, each pass
        // writing its own sequences' rows. Its forward sees one packed
        // batch entry, so ALiBi slopes per batch entry keep it on the
        // decode kernel.
        let group = q.heads / cache.heads_kv();
        let kept_rows = plan.most_kernel_rows();
        let candidates: Vec<usize> = (0..cache.batch())
            .filter(|&b| match queries {
                QueryTokens::Same(_) => true,
                QueryTokens::PerSequence(counts) => {
                    counts[b] * group > kept_rows && cache.lens()[b] > 0
                }
            })
            .collect();
        let per_batch_slopes = matches!(config.alibi, Some(crate::Alibi::PerBatchHead(_)));
        let copied = CacheShape {
            batch: candidates.len(),
            longest: candidates
                .iter()
                .map(|&b| cache.lens()[b])
                .max()
                .unwrap_or(0),
            ..cache_shape
        };
        plan.as_forward = match queries {
            _ if candidates.is_empty() => None,
            QueryTokens::PerSequence(_) if per_batch_slopes => None,
            _ => plan.forward_instead(
                self.info(),
                &copied,
                most_queries,
                q.heads,
                io_dtype,
                &options,
            ),
        };
        let on_forward: Vec<bool> = (0..cache.batch())
            .map(|b| plan.as_forward.is_some() && candidates.contains(&b))
            .collect();
        // Query tokens each sequence has on the decode kernel.
        let kernel_counts: Vec<usize> = (0..cache.batch())
            .map(|b| match queries {
                _ if on_forward[b] => 0,
                QueryTokens::Same(n) => n,
                QueryTokens::PerSequence(counts) => counts[b],
            })
            .collect();
        let mut passes = Vec::new();
        let mut returned = plan;
        if kernel_counts.iter().any(|&n| n > 0) {
            let mut kernel_plan = if on_forward.contains(&true) {
                let mut kernel_plan = DecodePlan::for_queries(
                    self.info(),
                    &cache_shape,
                    QueryTokens::PerSequence(&kernel_counts),
                    q.heads,
                    &options,
                )?;
                kernel_plan.as_forward = plan.as_forward;
                kernel_plan
            } else {
                plan
            };
            let rows = decode_sequences(cache, queries, q, &kernel_counts, &kernel_plan);
            passes.extend(self.prepare_decode_kernel(
                args,
                &options,
                &shape,
                &mut kernel_plan,
                &rows,
                matches!(queries, QueryTokens::PerSequence(_)),
            )?);
            returned = kernel_plan;
        }
        let selected: Vec<usize> = (0..cache.batch()).filter(|&b| on_forward[b]).collect();
        if !selected.is_empty() {
            passes.extend(self.prepare_decode_as_forward(args, queries, &selected, config)?);
        }
        for pass in &passes {
            pass.record(encoder);
        }
        Ok(returned)
    }

    /// The decode kernel's passes (one dispatch per cache buffer, then the
    /// merge of its partial results where the keys were split) for the
    /// query tokens `rows` gives each sequence, built but not recorded;
    /// `plan` gains the kernel's input and output types. `packed`: the
    /// queries and output are one packed batch entry (a ragged call).
    fn prepare_decode_kernel(
        &self,
        args: &DecodeArgs<'_>,
        options: &DecodeOptions,
        shape: &AttentionShape,
        plan: &mut DecodePlan,
        rows: &[DecodeSequence],
        packed: bool,
    ) -> Result<Vec<PreparedPass>> {
        let cache = args.cache;
        let (q, o) = (args.q.shape(), args.out.shape());
        let io_dtype = args.q.dtype();
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
        let (config, trees) = (&options.config, options.token_trees.as_deref());
        let mut params = option_params(shape, config, args.lse.is_some() || partials.is_some());
        // The logsumexp's row stride (DecodeSequence in flash_decode.wgsl).
        params.seq_q = q.seq as u32;
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
        if packed {
            // Every sequence reads and writes rows of the one packed entry.
            params.q.batch = 0;
            params.o.batch = 0;
        }
        let head_table = self.head_table_buffer(config)?;
        let params_buffer = self.params_buffer(&params)?;
        let pipeline = self.pipelines.get(self, &plan.specialization)?;
        let sequences = self.storage_buffer(
            "wgpu-flash-attn decode sequences",
            bytemuck::cast_slice(rows),
        )?;
        // The trees follow the block table in its binding (`tree_sees` in
        // flash_decode.wgsl), so the kernel binds no more storage buffers
        // than WebGPU's default limit of 8.
        let table = match trees {
            Some(trees) => {
                let mut words = cache.table_rows();
                words.extend(tree_words(trees));
                let bytes = bytemuck::cast_slice(&words);
                check_binding_size(
                    self,
                    "decode block table and token trees",
                    bytes.len() as u64,
                )?;
                self.storage_buffer("wgpu-flash-attn block table and token trees", bytes)?
            }
            None => cache.table_snapshot(self)?,
        };
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
                    sequence_count: rows.len() as u32,
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
                        &sequences,
                        &table,
                    ],
                )
            })
            .collect::<Result<_>>()?;
        let combine = match &partials {
            Some(partials) => Some(self.prepare_combine(partials, plan.slots, args.out, args.lse)?),
            None => None,
        };
        // (split, row tile, KV head): flash_decode.wgsl says why.
        let workgroups = [plan.splits, plan.total_row_tiles, cache.heads_kv() as u32];
        let decode = PreparedPass {
            label: "split-KV decode",
            pipeline,
            dispatches: bind_groups.into_iter().map(|g| (g, workgroups)).collect(),
        };
        Ok([decode].into_iter().chain(combine).collect())
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

/// Each sequence's first query row in a ragged call's packed tensors.
pub(crate) fn first_rows(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |first, &count| {
            let this = *first;
            *first += count;
            Some(this)
        })
        .collect()
}

/// Each sequence's length, query tokens and row tiles as the decode
/// kernel reads them (`DecodeSequence`): `kernel_counts[b]` tokens of
/// sequence `b` run there (0 for one the forward runs or that sits out),
/// in `plan`'s row tiles.
fn decode_sequences(
    cache: &KvCache,
    queries: QueryTokens<'_>,
    q: TensorShape,
    kernel_counts: &[usize],
    plan: &DecodePlan,
) -> Vec<DecodeSequence> {
    let firsts = match queries {
        QueryTokens::Same(_) => vec![0; cache.batch()],
        QueryTokens::PerSequence(counts) => first_rows(counts),
    };
    let group = q.heads / cache.heads_kv();
    let tiles: Vec<usize> = kernel_counts
        .iter()
        .map(|&n| sequence_row_tiles(n, group, plan.rows_per_workgroup) as usize)
        .collect();
    let tile_firsts = first_rows(&tiles);
    (0..cache.batch())
        .map(|b| DecodeSequence {
            len: cache.lens()[b] as u32,
            q_first: firsts[b] as u32,
            q_count: kernel_counts[b] as u32,
            lse_first: match queries {
                QueryTokens::Same(_) => (b * q.heads * q.seq) as u32,
                QueryTokens::PerSequence(_) => firsts[b] as u32,
            },
            tile_first: tile_firsts[b] as u32,
        })
        .collect()
}
