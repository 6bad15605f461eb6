//! Decoding: attention of a few new query tokens over a KV cache, with the
//! keys split across workgroups (flash-decoding) and the partial results
//! merged exactly by their logsumexp; and that merge as a public call.

use crate::attention::{
    Lse, check_lse_output, check_operand, option_params, require_equal, use_subgroup_tier,
    vec4_strides, vec4_view,
};
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kv_cache::KvCache;
use crate::params::{CombineParams, DecodeParams, TensorStrides};
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::shaders::{AttentionTiling, Specialization, forward_tile_bytes, largest_block_n};
use crate::tensor::{DType, Tensor, TensorShape, check_binding_size};

/// Invocations per workgroup on CPU adapters (one SIMD group), as the
/// forward kernel.
const CPU_WORKGROUP_SIZE: u32 = 8;
/// Query rows one subgroup-tier workgroup holds (per lane: that many
/// slices of q and of the accumulator); more rows take more workgroups.
const SUBGROUP_MAX_ROWS: u32 = 16;
/// At most this many invocations per workgroup on GPUs.
const GPU_MAX_WORKGROUP_SIZE: u32 = 64;
/// Fewest keys worth a split of their own when the split count is chosen.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// Workgroups a default split count aims for on a GPU (a few per compute
/// unit on large GPUs); CPU adapters aim for four per core.
const GPU_TARGET_WORKGROUPS: usize = 512;
/// Workgroup memory of the decode kernel beyond its K/V tiles: per-key
/// flags (64 keys at most), per-lane ranges and two scalars.
const DECODE_EXTRA_BYTES: u64 = 64 * 4 + 64 * 8 + 16;

/// The operands of one decode call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeArgs<'a> {
    /// `[batch, seq_q, heads_q, head_dim]`: the newest `seq_q` tokens of
    /// each sequence, already appended to the cache. Query `i` sits at
    /// position `len - seq_q + i` (bottom-right, as everywhere).
    pub q: &'a Tensor,
    pub cache: &'a KvCache,
    /// Shaped like `q`.
    pub out: &'a Tensor,
    pub lse: Option<&'a Lse>,
}

/// How a decode call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub specialization: Specialization,
    /// Key chunks per sequence, one workgroup each.
    pub splits: u32,
    /// Cache positions per chunk.
    pub split_keys: u32,
    /// Buffers the cache is spread over: one dispatch each.
    pub segments: u32,
    /// Workgroups along the query rows of one (batch, KV head) pair.
    pub row_tiles: u32,
    /// Partial results merged at the end (`splits * segments`); 1 means
    /// the kernel wrote the output directly.
    pub slots: u32,
}

impl DecodePlan {
    /// The plan for `seq_q` queries with `heads_q` heads over `cache`.
    pub fn for_call(
        gpu: &Gpu,
        cache: &KvCache,
        seq_q: usize,
        heads_q: usize,
        config: &AttentionConfig,
    ) -> Result<Self> {
        let head_dim = cache.head_dim() as u32;
        let group = heads_q / cache.heads_kv();
        let rows = (seq_q * group) as u32;
        let info = gpu.info();
        let adapter = &info.adapter;
        let cpu =
            adapter.device_type == wgpu::DeviceType::Cpu && adapter.backend != wgpu::Backend::Gl;
        let limits = &info.limits;
        let max_invocations = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x);
        let subgroup = use_subgroup_tier(gpu, config.tier)?;
        let (tiling, rows_per_workgroup) = if subgroup {
            // Lanes split the head dim; every lane holds all the rows.
            let rows_per_workgroup = rows.next_power_of_two().min(SUBGROUP_MAX_ROWS);
            let tiling = AttentionTiling {
                head_dim,
                block_n: 4,
                workgroup_size: adapter.subgroup_min_size,
                rows: rows_per_workgroup,
                unroll: true,
                subgroup_kv: true,
                storage: DType::F32,
            };
            (tiling, rows_per_workgroup)
        } else {
            let (workgroup_size, rows_per_lane, unroll) = if cpu {
                let lanes = rows.div_ceil(CPU_WORKGROUP_SIZE).next_power_of_two();
                let cap = crate::ForwardPlan::cpu_rows(head_dim);
                (CPU_WORKGROUP_SIZE, lanes.min(cap), true)
            } else {
                let size = rows
                    .next_power_of_two()
                    .clamp(4, GPU_MAX_WORKGROUP_SIZE.min(max_invocations));
                // llvmpipe on GL: unrolled head-dim loops, as the forward kernel.
                (size, 1, adapter.backend == wgpu::Backend::Gl)
            };
            let storage = u64::from(limits.max_compute_workgroup_storage_size);
            let block_n = largest_block_n(head_dim, storage.saturating_sub(DECODE_EXTRA_BYTES))
                .ok_or(Error::WorkgroupMemory {
                    head_dim: cache.head_dim(),
                    needed: forward_tile_bytes(head_dim, crate::shaders::MIN_BLOCK_N)
                        + DECODE_EXTRA_BYTES,
                    limit: limits.max_compute_workgroup_storage_size,
                })?;
            let tiling = AttentionTiling {
                head_dim,
                block_n,
                workgroup_size,
                rows: rows_per_lane,
                unroll,
                subgroup_kv: false,
                storage: DType::F32,
            };
            (tiling, workgroup_size * rows_per_lane)
        };
        if tiling.workgroup_size > max_invocations {
            return Err(Error::WorkgroupInvocations {
                needed: tiling.workgroup_size,
                limit: max_invocations,
            });
        }
        let row_tiles = rows.div_ceil(rows_per_workgroup).max(1);
        let longest = cache.lens().iter().copied().max().unwrap_or(0);
        let splits = match config.kv_splits {
            Some(0) => return Err(Error::KvSplits(0)),
            Some(n) => n,
            None => {
                let base = row_tiles as usize * cache.heads_kv() * cache.batch();
                let target = if cpu {
                    4 * std::thread::available_parallelism().map_or(4, |n| n.get())
                } else {
                    GPU_TARGET_WORKGROUPS
                };
                target
                    .div_ceil(base)
                    .min(longest.div_ceil(MIN_KEYS_PER_SPLIT))
                    .max(1)
            }
        };
        let specialization = Specialization::Decode(tiling);
        // On adapters that cap loop iterations (llvmpipe), more splits keep
        // each workgroup's share of the keys under the cap; a forced count
        // that does not is refused rather than silently truncated.
        let mut splits = splits;
        if let (Some(budget), None) = (gpu.loop_budget(), config.kv_splits) {
            while splits < longest
                && specialization
                    .loop_trips(longest.div_ceil(splits) as u64)
                    .is_some_and(|trips| trips > budget)
            {
                splits *= 2;
            }
        }
        let split_keys = longest.div_ceil(splits).max(1);
        gpu.check_loop_budget(&specialization, split_keys as u64)?;
        let x_groups = u64::from(row_tiles) * splits as u64;
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, n) in [
            ("row tiles x splits", x_groups),
            ("heads_kv", cache.heads_kv() as u64),
            ("batch", cache.batch() as u64),
        ] {
            if n > u64::from(limit) {
                return Err(Error::DispatchTooLarge {
                    what: "decode",
                    axis,
                    groups: n,
                    limit,
                });
            }
        }
        let segments = cache.segment_count() as u32;
        Ok(DecodePlan {
            specialization,
            splits: splits as u32,
            split_keys: split_keys as u32,
            segments,
            row_tiles,
            slots: splits as u32 * segments,
        })
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
    fn new(gpu: &Gpu, slots: u32, q: TensorShape) -> Result<Self> {
        let rows = (q.batch * q.seq * q.heads) as u64;
        let out_bytes = u64::from(slots) * rows * q.head_dim as u64 * 4;
        check_binding_size(gpu, "decode partial outputs", out_bytes)?;
        Ok(Partials {
            out: gpu.scratch_buffer("wgpu-flash-attn partial outputs", out_bytes),
            lse: gpu.scratch_buffer("wgpu-flash-attn partial lse", u64::from(slots) * rows * 4),
            out_slot: (rows * q.head_dim as u64 / 4) as u32,
            lse_slot: rows as u32,
        })
    }
}

impl Gpu {
    /// Attention of `args.q` over the cache into `args.out` (and `args.lse`
    /// if given): one dispatch per cache segment, then the merge when the
    /// keys were split. Submits and returns the plan without waiting.
    pub fn decode_into(
        &self,
        args: &DecodeArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<DecodePlan> {
        self.submit_recorded("decode dispatch", |encoder| {
            self.encode_decode(encoder, args, config)
        })
    }

    /// Records a decode call into the caller's encoder.
    pub fn encode_decode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &DecodeArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<DecodePlan> {
        let cache = args.cache;
        let q = args.q.shape();
        let shape = AttentionShape {
            batch: q.batch,
            seq_q: q.seq,
            seq_kv: cache.lens().iter().copied().max().unwrap_or(0).max(1),
            heads_q: q.heads,
            heads_kv: cache.heads_kv(),
            head_dim: q.head_dim,
        };
        let o = args.out.shape();
        let like_q = "decode: O must be shaped like Q";
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
            (like_q, "q.head_dim", q.head_dim, "out.head_dim", o.head_dim),
        ])?;
        config.validate(&shape)?;
        check_operand(self, "q", args.q, DType::F32)?;
        check_operand(self, "out", args.out, DType::F32)?;
        if args.q.buffer() == args.out.buffer() {
            return Err(Error::OutputAliasesInput {
                tensor: "out",
                input: "q",
            });
        }
        check_lse_output(args.lse, config, [q.batch, q.heads, q.seq])?;
        let plan = DecodePlan::for_call(self, cache, q.seq, q.heads, config)?;
        let partials = if plan.slots > 1 {
            Some(Partials::new(self, plan.slots, q)?)
        } else {
            None
        };
        let mut params = option_params(&shape, config, args.lse.is_some() || partials.is_some());
        params.q = vec4_strides(args.q);
        let token_vec4s = (cache.heads_kv() * cache.head_dim() / 4) as u32;
        let cache_strides = TensorStrides {
            batch: 0,
            seq: token_vec4s,
            head: (cache.head_dim() / 4) as u32,
            offset: 0,
        };
        params.k = cache_strides;
        params.v = cache_strides;
        params.o = match &partials {
            Some(_) => vec4_view(q.contiguous_strides(), 0),
            None => vec4_strides(args.out),
        };
        let alibi = config.alibi.as_ref().map(|alibi| {
            self.storage_buffer(
                "wgpu-flash-attn alibi slopes",
                bytemuck::cast_slice(alibi.slopes()),
            )
        });
        let params_buffer = self.params_buffer(&params);
        let pipeline = self.pipelines.get(&self.device, &plan.specialization)?;
        let (out_buffer, lse_buffer) = match &partials {
            Some(p) => (&p.out, &p.lse),
            None => (
                args.out.buffer(),
                args.lse.map_or(&self.placeholders.lse, |l| l.buffer()),
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
                    self.uniform_buffer("decode params", bytemuck::bytes_of(&decode));
                bind_buffers(
                    &self.device,
                    &pipeline.bind_group_layout,
                    &[
                        &params_buffer,
                        args.q.buffer(),
                        &segment.k,
                        &segment.v,
                        out_buffer,
                        lse_buffer,
                        alibi.as_ref().unwrap_or(&self.placeholders.alibi),
                        &decode_buffer,
                        &cache.lens_buffer,
                        &cache.table_buffer,
                    ],
                )
            })
            .collect();
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
        if let Some(partials) = &partials {
            self.encode_combine(encoder, partials, plan.slots, args.out, args.lse)?;
        }
        Ok(plan)
    }

    /// Merges partial attention results over disjoint parts of the same
    /// keys into the attention over all of them, exactly: each part is an
    /// output (`[batch, seq_q, heads_q, head_dim]`, f32, packed) and its
    /// logsumexp (+inf where the part had no key for a row). Shard a long
    /// sequence across calls or devices, then merge here. Submits and
    /// returns without waiting.
    pub fn merge_attention(
        &self,
        parts: &[(&Tensor, &Lse)],
        out: &Tensor,
        lse: Option<&Lse>,
    ) -> Result<()> {
        let Some((first, _)) = parts.first() else {
            return Err(Error::NothingToMerge);
        };
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
        for (tensor, part_lse) in parts {
            if tensor.strides() != q.contiguous_strides() || tensor.offset() != 0 {
                return Err(Error::NotPacked {
                    tensor: "partial output",
                });
            }
            let expected = [q.batch, q.heads, q.seq];
            let got = [part_lse.batch, part_lse.heads, part_lse.seq];
            if expected != got {
                return Err(Error::LseShape { expected, got });
            }
        }
        let slots = parts.len() as u32;
        let partials = Partials::new(self, slots, q)?;
        self.submit_recorded("merge dispatch", |encoder| {
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
            self.encode_combine(encoder, &partials, slots, out, lse)
        })
    }

    fn encode_combine(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        partials: &Partials,
        slots: u32,
        out: &Tensor,
        lse: Option<&Lse>,
    ) -> Result<()> {
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
        };
        let pipeline = self.pipelines.get(&self.device, &spec)?;
        let uniform = self.uniform_buffer("combine params", bytemuck::bytes_of(&params));
        let bind_group = bind_buffers(
            &self.device,
            &pipeline.bind_group_layout,
            &[
                &uniform,
                &partials.out,
                &partials.lse,
                out.buffer(),
                lse.map_or(&self.placeholders.lse, |l| l.buffer()),
            ],
        );
        encode_dispatches(encoder, "merge partials", &pipeline, &[bind_group], groups);
        Ok(())
    }
}
