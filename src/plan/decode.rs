//! The decode planner: lanes, rows per workgroup and key splits of a
//! decode step over a KV cache.

use super::{
    CPU_WORKGROUP_SIZE, ForwardPlan, check_loop_budget, check_merge_budget, tier_of,
    use_subgroup_tier,
};
use crate::config::Tier;
use crate::decode::{DecodeLanes, DecodeOptions};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::shaders::{
    AttentionTiling, DecodeIo, DecodeMask, MIN_BLOCK_N, Specialization, forward_tile_bytes,
    largest_block_n,
};
use crate::tensor::DType;

/// Query rows one subgroup-tier workgroup holds (per lane: that many
/// slices of q and of the accumulator); more rows take more workgroups.
const SUBGROUP_MAX_ROWS: u32 = 16;
/// Floats of query and output one lane may hold for decoding's lanes over
/// keys (8 rows at head dim 128, 4 at 256, 2 at 512): the default on CPU
/// adapters where their fewest rows (below) fit it, refused past it
/// (`Error::KeyLanesState`). lavapipe compiled the 4096-float kernel (4
/// rows at d=512) in about 4 minutes, the 2048-float Llama-3.1-70B one in
/// seconds; MLA's latent widths (16 rows x 1088) keep lanes over the head
/// dim. On Mesa 26.1 (LLVM 19), 8 rows at d=256 (4096 floats) over keys
/// decoded 9-25 % slower than over the head dim (BENCHMARKS.md,
/// 2026-12-06), so this stays the bar for choosing lanes over keys there
/// too.
const KEY_LANES_MAX_STATE: u64 = 8 * 256;
/// How far a workgroup's row tile may grow past [`KEY_LANES_MAX_STATE`]
/// once lanes over keys are chosen, where the adapter compiles with LLVM
/// [`WIDE_TILE_LLVM`] or later: Llama-3.1-405B's 16 rows at d=128 in one
/// workgroup read the cache once, not twice, and decoded 1.1-1.4x faster
/// than two 8-row tiles at 128K tokens on Mesa 26.1 (LLVM 19; f32 cache
/// 49-55 % of the copy ceiling), 1.2-1.4x on Mesa 22.3 (LLVM 15). LLVM 19
/// compiled that kernel in about 20 s, LLVM 15 in about 2.5 minutes per
/// cache type, too long a first call (BENCHMARKS.md, 2026-12-06).
const KEY_LANES_MAX_TILE_STATE: u64 = 16 * 256;
/// The oldest LLVM measured to compile [`KEY_LANES_MAX_TILE_STATE`]'s
/// kernels quickly (19.1, Mesa 26.1; LLVM 15 did not).
const WIDE_TILE_LLVM: u32 = 19;

/// The most floats of query and output a CPU adapter's lanes-over-keys
/// workgroup may hold (its row tile's bound).
fn cpu_key_lanes_tile_limit(info: &GpuInfo) -> u64 {
    match info.llvm_major() {
        Some(major) if major >= WIDE_TILE_LLVM => KEY_LANES_MAX_TILE_STATE,
        _ => KEY_LANES_MAX_STATE,
    }
}

/// The fewest query rows a lanes-over-keys workgroup holds on CPU adapters
/// when a GQA group's rows do not all fit its tile limit
/// ([`cpu_key_lanes_tile_limit`]): the
/// group takes row tiles of at least this many rows (each reading the
/// cache), and lanes over the head dim where not even these fit. On
/// lavapipe (f32, f16 and int8 caches of 8K-32K tokens), Llama-3.1-405B's
/// 16 rows at d=128 as two 8-row tiles decoded 1.36-1.84x faster than
/// lanes over the head dim; 4-row tiles at d=256 were 4-8 % slower than
/// the head dim's 8 rows and 1.4-1.65x slower than its 16; MLA's latent at
/// one row 4x slower (BENCHMARKS.md, 2026-12-05).
const CPU_KEY_LANES_FEWEST_ROWS: u32 = 8;
/// The same state on hardware GPUs, where lanes over keys are only ever
/// forced: a lane's state there lives in registers (255 per lane on
/// NVIDIA), so more rows take more workgroups rather than a kernel that
/// spills. On the H200 the 16-row, 2048-float kernel (head dim 64) ran a
/// test past its 90 s limit without finishing.
const GPU_KEY_LANES_MAX_STATE: u64 = 256;
/// At most this many invocations per workgroup on GPUs.
const GPU_MAX_WORKGROUP_SIZE: u32 = 64;
/// Fewest keys worth a split of their own when the split count is chosen.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// Workgroups a default split count aims for on a GPU; CPU adapters aim
/// for four per core. A decode workgroup is one subgroup streaming its
/// keys, so a GPU hides memory latency only with many of them: on the
/// H200 (132 compute units) 512 gave four per unit and 30 % of the copy
/// ceiling at 128K cached tokens; 2048 gives about sixteen. (Small GPUs
/// pay only a larger merge of partial results, a few MiB.)
const GPU_TARGET_WORKGROUPS: usize = 2048;
/// Workgroup memory of the decode kernel beyond its K/V tiles: per-key
/// rows and (int8 caches) K/V scales, 64 keys at most, per-lane ranges and
/// two scalars.
const DECODE_EXTRA_BYTES: u64 = 64 * 4 + 64 * 8 + 64 * 8 + 16;

/// Floats of accumulator one lane may hold with key tiles on a GPU (its
/// slices of every row's output): 8 rows at head dim 128 with 32 lanes.
const GPU_KEY_TILES_MAX_STATE: u32 = 128;

/// Registers (32-bit) one lane of the head-dim layout may hold on a GPU,
/// as [`head_dim_lane_registers`] estimates them; rows past it go to more
/// workgroups (row tiles, each reading the cache) rather than spill. NVIDIA
/// allows 255. The estimate and the limit reproduce where NAK (Mesa's
/// NVIDIA compiler, Ada) starts spilling at 32 lanes: the most rows that
/// compiled without spills were 8 at head dims 64-256 (d256: 240
/// registers) and 2 at 512 and at DeepSeek's 576/512 latent (240); the
/// next power of two spilled (d128 x 16 rows: 232 spill instructions; the
/// latent at 16 rows, the default before this limit: 1,854).
pub(super) const GPU_HEAD_DIM_LANE_REGISTERS: u32 = 248;

/// Registers one lane of the head-dim layout holds for `rows` rows, as
/// fitted to NAK's counts (within 8 of them from 48 to 240): per vec4 slot
/// of the head dims, four keys' K and V loaded together by the unrolled
/// step (16 floats), plus per row the slot's q and accumulator (4 floats
/// per slot), four scores and the running max and sum (6).
pub(super) fn head_dim_lane_registers(
    lanes: u32,
    (head_dim, head_dim_v): (u32, u32),
    rows: u32,
) -> u32 {
    let slots = (head_dim / 4).div_ceil(lanes) + (head_dim_v / 4).div_ceil(lanes);
    16 * slots + 8 + rows * (4 * slots + 6)
}

/// Workgroup memory of a key-tiles decode workgroup: `lanes` keys' K
/// (padded by a vec4) and V, `rows` queries, the tile's weights and key
/// rows, and a flag (flash_decode.wgsl's KEY_TILES declarations).
pub(super) fn key_tile_bytes(lanes: u32, head_dim: u32, head_dim_v: u32, rows: u32) -> u64 {
    let (lanes, d4, dv4, rows) = (
        u64::from(lanes),
        u64::from(head_dim / 4),
        u64::from(head_dim_v / 4),
        u64::from(rows),
    );
    16 * (lanes * (d4 + 1) + lanes * dv4 + rows * d4) + 4 * (lanes * rows + lanes + 1)
}

/// The most query rows (a power of two, at most `rows`) a key-tiles
/// workgroup can hold: within workgroup memory, and on GPUs within
/// [`GPU_KEY_TILES_MAX_STATE`] accumulator floats per lane. `None` where
/// not even one row fits.
fn key_tile_rows(
    info: &GpuInfo,
    (head_dim, head_dim_v): (u32, u32),
    rows: u32,
    cpu: bool,
) -> Option<u32> {
    let lanes = info.adapter.subgroup_min_size;
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let slots_v = (head_dim_v / 4).div_ceil(lanes);
    let fits = |rows: u32| {
        key_tile_bytes(lanes, head_dim, head_dim_v, rows) <= memory
            && (cpu || rows * slots_v * 4 <= GPU_KEY_TILES_MAX_STATE)
    };
    let mut rows = rows;
    while rows > 1 && !fits(rows) {
        rows /= 2;
    }
    fits(rows).then_some(rows)
}

/// What the decode planner needs to know of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub heads_kv: usize,
    /// Head dim of the keys.
    pub head_dim: usize,
    /// Head dim of the values (a latent cache's values are the first
    /// `head_dim_v` elements of its keys).
    pub head_dim_v: usize,
    /// Length of the longest sequence.
    pub longest: usize,
    /// Buffers the pool is spread over.
    pub segments: usize,
    /// How the cache stores K and V.
    pub dtype: crate::KvDType,
}

/// Whether decoding plans for a CPU adapter (lanes over keys, splits per
/// core): a CPU adapter on any backend but GL, where llvmpipe runs the
/// portable kernel as GPUs without subgroups do.
pub(super) fn decodes_as_cpu(info: &GpuInfo) -> bool {
    let adapter = &info.adapter;
    adapter.device_type == wgpu::DeviceType::Cpu && adapter.backend != wgpu::Backend::Gl
}

impl CacheShape {
    /// The cache an attention call's K and V would be: every sequence
    /// `seq_kv` tokens long, in one buffer, stored as `dtype`.
    pub fn of_call(shape: &crate::AttentionShape, dtype: crate::KvDType) -> Self {
        CacheShape {
            batch: shape.batch,
            heads_kv: shape.heads_kv,
            head_dim: shape.head_dim,
            head_dim_v: shape.head_dim_v,
            longest: shape.seq_kv,
            segments: 1,
            dtype,
        }
    }
}

/// Query tokens of each sequence of a decode call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum QueryTokens<'a> {
    /// The same number for every sequence, from a `[batch, seq_q, ..]`
    /// tensor ([`crate::Gpu::decode`]).
    Same(usize),
    /// `counts[b]` tokens of sequence `b` (0: it sits the call out), packed
    /// in sequence order in a `[1, sum of counts, ..]` tensor
    /// ([`crate::Gpu::decode_ragged`]).
    PerSequence(&'a [usize]),
}

impl QueryTokens<'_> {
    /// The most any sequence has.
    fn most(&self) -> usize {
        match self {
            QueryTokens::Same(n) => *n,
            QueryTokens::PerSequence(counts) => counts.iter().copied().max().unwrap_or(0),
        }
    }

    /// Row tiles of every sequence together (`batch` sequences, `group`
    /// query heads per KV head, tiles of `tile_rows` rows); saturating.
    fn row_tiles(&self, batch: usize, group: usize, tile_rows: u32) -> u64 {
        let tiles = |tokens| sequence_row_tiles(tokens, group, tile_rows);
        match self {
            QueryTokens::Same(n) => tiles(*n).saturating_mul(batch as u64),
            QueryTokens::PerSequence(counts) => counts
                .iter()
                .fold(0u64, |sum, &n| sum.saturating_add(tiles(n))),
        }
    }
}

/// Row tiles of `tile_rows` rows that one sequence's `tokens` query
/// tokens take with `group` query heads per KV head; saturating.
pub(crate) fn sequence_row_tiles(tokens: usize, group: usize, tile_rows: u32) -> u64 {
    (tokens as u64)
        .saturating_mul(group as u64)
        .div_ceil(u64::from(tile_rows))
}

/// How a decode call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub(crate) specialization: Specialization,
    /// Key chunks per sequence, one workgroup each.
    pub splits: u32,
    /// Cache positions per chunk.
    pub split_keys: u32,
    /// Buffers the cache is spread over: one dispatch each.
    pub segments: u32,
    /// Query rows (query token, head) of a KV head's group one workgroup
    /// holds: the subgroup tier's lanes share them, the portable tier's
    /// invocations hold their own.
    pub rows_per_workgroup: u32,
    /// Workgroups along the query rows of one (sequence, KV head) pair,
    /// for the sequence with the most query tokens.
    pub row_tiles: u32,
    /// Row tiles of every sequence of the call together: the workgroups
    /// along the dispatch's query-row axis (sequences with fewer query
    /// tokens than the most launch fewer; one without, none).
    pub total_row_tiles: u32,
    /// Partial results merged at the end (`splits * segments`); 1 means
    /// the kernel wrote the output directly.
    pub slots: u32,
    /// Set by [`crate::Gpu::decode`] when the call ran as the forward
    /// kernels over a dense copy of the cache instead
    /// ([`DecodePlan::as_forward`] says when, ahead of the call); the
    /// fields above are then the decode kernel's plan, not run. From
    /// [`crate::Gpu::decode_ragged`], set when the sequences with many
    /// query tokens ran so; the fields above are then the decode kernel's
    /// plan for the others, run where some of them had query tokens.
    pub as_forward: Option<ForwardPlan>,
}

impl DecodePlan {
    /// The subgroup tier's lane layout; `None` for the portable tier.
    pub fn lanes(&self) -> Option<DecodeLanes> {
        match self.specialization {
            Specialization::Decode(tiling, _, lanes, ..) if tiling.subgroup_kv => Some(lanes),
            _ => None,
        }
    }

    /// The decode kernel's name with its constants and variants, as
    /// pipeline labels and errors give it (the forward kernel's where the
    /// call ran as the forward, [`DecodePlan::as_forward`]).
    pub fn kernel_label(&self) -> String {
        match &self.as_forward {
            Some(forward) => forward.kernel_label(),
            None => self.specialization.label(),
        }
    }

    /// The kernel tier this plan runs (the forward's where the call ran as
    /// the forward).
    pub fn tier(&self) -> Tier {
        match &self.as_forward {
            Some(forward) => forward.tier(),
            None => self
                .specialization
                .attention_tiling()
                .map_or(Tier::Portable, tier_of),
        }
    }

    /// Loop iterations one invocation runs over its chunk of keys, as the
    /// planner models them against [`GpuInfo::loop_budget`].
    pub fn loop_trips(&self) -> u64 {
        self.specialization
            .loop_trips(u64::from(self.split_keys))
            .unwrap_or(0)
    }
}

impl DecodePlan {
    /// The plan for `seq_q` queries with `heads_q` heads over a cache of
    /// this shape.
    pub fn for_call(
        info: &GpuInfo,
        cache: &CacheShape,
        seq_q: usize,
        heads_q: usize,
        options: &DecodeOptions,
    ) -> Result<Self> {
        Self::for_queries(info, cache, QueryTokens::Same(seq_q), heads_q, options)
    }

    /// [`DecodePlan::for_call`] with each sequence's own query tokens
    /// (`tokens`), the ragged call's plan.
    pub(crate) fn for_queries(
        info: &GpuInfo,
        cache: &CacheShape,
        tokens: QueryTokens<'_>,
        heads_q: usize,
        options: &DecodeOptions,
    ) -> Result<Self> {
        let seq_q = tokens.most();
        let config = &options.config;
        // Here, before the route to the forward records its copy of the
        // cache (fetching a pipeline checks this too).
        let storage_limit = info.limits.max_storage_buffers_per_shader_stage;
        crate::shaders::Kernel::Decode.check_storage_buffers(storage_limit)?;
        // (Gpu::decode checks its tensors against the cache before this;
        // a CacheShape given by hand is checked here.)
        for (tensor, n) in [
            ("cache batch", cache.batch),
            ("cache heads_kv", cache.heads_kv),
            ("cache segments", cache.segments),
            ("seq_q", seq_q),
            ("heads_q", heads_q),
        ] {
            if n == 0 {
                return Err(Error::ZeroDimension {
                    tensor,
                    shape: [cache.batch, seq_q, heads_q, cache.heads_kv],
                });
            }
        }
        // The kernels hold positions in i32 (as AttentionShape::validate).
        if cache.longest > crate::MAX_SEQUENCE_LEN {
            return Err(Error::ShapeOverflow {
                tensor: "cache sequence (at most MAX_SEQUENCE_LEN = 2^29 positions)",
                shape: [cache.batch, cache.longest, cache.heads_kv, cache.head_dim],
            });
        }
        if !heads_q.is_multiple_of(cache.heads_kv) {
            return Err(Error::HeadsNotDivisible {
                heads_q,
                heads_kv: cache.heads_kv,
            });
        }
        for got in [cache.head_dim, cache.head_dim_v] {
            if !crate::is_supported_head_dim(got) {
                return Err(Error::HeadDimUnsupported {
                    got,
                    supported: crate::SUPPORTED_HEAD_DIMS,
                });
            }
        }
        let (head_dim, head_dim_v) = (cache.head_dim as u32, cache.head_dim_v as u32);
        let group = heads_q / cache.heads_kv;
        let rows = seq_q
            .checked_mul(group)
            .and_then(|rows| u32::try_from(rows).ok())
            .ok_or(Error::DispatchTooLarge {
                what: "decode",
                axis: "query rows (seq_q x query heads per KV head)",
                groups: (seq_q as u64).saturating_mul(group as u64),
                limit: info.limits.max_compute_workgroups_per_dimension,
            })?;
        // (Saturating: past 2^31 rows no plan dispatches them, and the
        // limit checks below say so.)
        let rows_pow2 = rows.checked_next_power_of_two().unwrap_or(1 << 31);
        let adapter = &info.adapter;
        let cpu = decodes_as_cpu(info);
        let limits = &info.limits;
        let max_invocations = info.max_invocations();
        let subgroup = match (options.lanes, config.tier) {
            (Some(_), Some(Tier::Portable)) => {
                return Err(Error::UnsupportedCombination {
                    what: "DecodeOptions::lanes with the portable tier (lane layouts belong to the subgroup tier)",
                });
            }
            // A forced lane layout asks for the subgroup tier.
            (Some(_), tier) => use_subgroup_tier(info, tier.or(Some(Tier::SubgroupBroadcast)))?,
            (None, tier) => use_subgroup_tier(info, tier)?,
        };
        let (tiling, rows_per_workgroup, lanes) = if subgroup {
            // Lanes split the head dim; every lane holds all the rows.
            let mut rows_per_workgroup = rows_pow2.min(SUBGROUP_MAX_ROWS);
            // CPU adapters take lanes over keys where each lane's state
            // (every row's query and output) stays small enough to compile
            // and cache well.
            let width = u64::from(head_dim + head_dim_v);
            let fewest_cpu_rows = rows_per_workgroup.min(CPU_KEY_LANES_FEWEST_ROWS);
            let keys_fit = u64::from(fewest_cpu_rows) * width <= KEY_LANES_MAX_STATE;
            let lanes = options.lanes.unwrap_or(if cpu && keys_fit {
                DecodeLanes::Keys
            } else {
                DecodeLanes::HeadDim
            });
            if lanes == DecodeLanes::Keys {
                // Rows past the limit go to more workgroups (row tiles),
                // each reading the cache: on CPU adapters at least 8 rows
                // a workgroup, on GPUs down to one.
                let (limit, fewest_rows) = if cpu {
                    (cpu_key_lanes_tile_limit(info), fewest_cpu_rows)
                } else {
                    (GPU_KEY_LANES_MAX_STATE, 1)
                };
                while rows_per_workgroup > fewest_rows
                    && u64::from(rows_per_workgroup) * width > limit
                {
                    rows_per_workgroup /= 2;
                }
                let state = u64::from(rows_per_workgroup) * width;
                if state > limit {
                    return Err(Error::KeyLanesState {
                        rows: rows_per_workgroup,
                        head_dim: cache.head_dim,
                        head_dim_v: cache.head_dim_v,
                        floats: state,
                        limit,
                    });
                }
            }
            if lanes == DecodeLanes::KeyTiles {
                rows_per_workgroup = key_tile_rows(
                    info,
                    (head_dim, head_dim_v),
                    rows_per_workgroup,
                    cpu,
                )
                .ok_or(Error::WorkgroupMemory {
                    head_dim: cache.head_dim,
                    head_dim_v: cache.head_dim_v,
                    needed: key_tile_bytes(adapter.subgroup_min_size, head_dim, head_dim_v, 1),
                    limit: limits.max_compute_workgroup_storage_size,
                })?;
            }
            // A hardware GPU's lane keeps its state in registers, so rows
            // past the limit go to more workgroups rather than spill.
            if lanes == DecodeLanes::HeadDim && adapter.device_type != wgpu::DeviceType::Cpu {
                let dims = (head_dim, head_dim_v);
                while rows_per_workgroup > 1
                    && head_dim_lane_registers(adapter.subgroup_min_size, dims, rows_per_workgroup)
                        > GPU_HEAD_DIM_LANE_REGISTERS
                {
                    rows_per_workgroup /= 2;
                }
            }
            let tiling = AttentionTiling {
                head_dim,
                head_dim_v,
                block_n: 4,
                workgroup_size: adapter.subgroup_min_size,
                rows: rows_per_workgroup,
                unroll: true,
                subgroup_kv: true,
                storage: DType::F32,
                dropout: false,
            };
            (tiling, rows_per_workgroup, lanes)
        } else {
            let (workgroup_size, rows_per_lane, unroll) = if cpu {
                let lanes = rows.div_ceil(CPU_WORKGROUP_SIZE).next_power_of_two();
                let cap = ForwardPlan::cpu_rows(head_dim.max(head_dim_v));
                (CPU_WORKGROUP_SIZE, lanes.min(cap), true)
            } else {
                let size = rows_pow2.clamp(4, GPU_MAX_WORKGROUP_SIZE.min(max_invocations));
                // llvmpipe on GL: unrolled head-dim loops, as the forward kernel.
                (size, 1, adapter.backend == wgpu::Backend::Gl)
            };
            let storage = u64::from(limits.max_compute_workgroup_storage_size);
            let block_n = largest_block_n(
                head_dim,
                head_dim_v,
                storage.saturating_sub(DECODE_EXTRA_BYTES),
            )
            .ok_or(Error::WorkgroupMemory {
                head_dim: cache.head_dim,
                head_dim_v: cache.head_dim_v,
                needed: forward_tile_bytes(head_dim, head_dim_v, MIN_BLOCK_N) + DECODE_EXTRA_BYTES,
                limit: limits.max_compute_workgroup_storage_size,
            })?;
            let tiling = AttentionTiling {
                head_dim,
                head_dim_v,
                block_n,
                workgroup_size,
                rows: rows_per_lane,
                unroll,
                subgroup_kv: false,
                storage: DType::F32,
                dropout: false,
            };
            // The portable tier stages tiles; it has no lane layout.
            (tiling, workgroup_size * rows_per_lane, DecodeLanes::HeadDim)
        };
        info.check_invocations(tiling.workgroup_size)?;
        let row_tiles = rows.div_ceil(rows_per_workgroup).max(1);
        // (Saturating: counts past the dispatch limit are refused below.)
        let total_tiles = tokens.row_tiles(cache.batch, group, rows_per_workgroup);
        let longest = cache.longest;
        let splits = match options.kv_splits {
            Some(0) => return Err(Error::KvSplits(0)),
            Some(n) => n,
            None => {
                // Saturating: counts past the dispatch limit are refused
                // below, and must not wrap (to zero) on the way there.
                let base = usize::try_from(total_tiles)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(cache.heads_kv);
                let target = if cpu {
                    4 * info.host_threads.max(1)
                } else {
                    GPU_TARGET_WORKGROUPS
                };
                target
                    .div_ceil(base)
                    .min(longest.div_ceil(MIN_KEYS_PER_SPLIT))
                    .max(1)
            }
        };
        let specialization = Specialization::Decode(
            tiling,
            cache.dtype,
            lanes,
            DecodeIo::F32,
            match options.token_trees {
                Some(_) => DecodeMask::TokenTree,
                None => DecodeMask::Positions,
            },
        );
        // On adapters that cap loop iterations (llvmpipe), more splits keep
        // each workgroup's share of the keys under the cap; a forced count
        // that does not is refused rather than silently truncated.
        let mut splits = splits;
        if let (Some(budget), None) = (info.loop_budget(), options.kv_splits) {
            while splits < longest
                && specialization
                    .loop_trips(longest.div_ceil(splits) as u64)
                    .is_some_and(|trips| trips > budget)
            {
                splits *= 2;
            }
        }
        let split_keys = longest.div_ceil(splits).max(1);
        check_loop_budget(info, &specialization, split_keys as u64)?;
        // The grid is (split, row tile, KV head): flash_decode.wgsl.
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, n) in [
            ("splits", splits as u64),
            ("row tiles of every sequence", total_tiles),
            ("heads_kv", cache.heads_kv as u64),
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
        // Each split of each segment leaves a partial result for the merge.
        let overflow = || Error::ShapeOverflow {
            tensor: "decode partial results (splits x cache segments)",
            shape: [splits, cache.segments, 1, 1],
        };
        let segments = u32::try_from(cache.segments).map_err(|_| overflow())?;
        let slots = segments.checked_mul(splits as u32).ok_or_else(overflow)?;
        if slots > 1 {
            check_merge_budget(info, u64::from(slots))?;
        }
        Ok(DecodePlan {
            specialization,
            splits: splits as u32,
            split_keys: split_keys as u32,
            segments,
            rows_per_workgroup,
            row_tiles,
            // (At most the dispatch limit: checked above.)
            total_row_tiles: total_tiles as u32,
            slots,
            as_forward: None,
        })
    }
}
