//! How the backward runs on an adapter: a pure function of its
//! [`GpuInfo`] and the call's shape, like the other planners.

use crate::config::{AttentionConfig, AttentionShape, BlockedLayout, Tier};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::plan::{blocked_by_default, check_blocked_layout, check_layout_tier, use_subgroup_tier};
use crate::shaders::{BackwardPass, BackwardTiling, BlockedBackwardTiling, Kernel, Specialization};
use crate::tensor::DType;

/// Storage buffers the backward kernels bind (Q, K, V, O/dK/dQ, logsumexp,
/// ALiBi slopes, dO, row deltas, dV, mask words).
pub const BACKWARD_STORAGE_BUFFERS: u32 = 10;
/// The widest head dim the backward takes.
const BACKWARD_MAX_HEAD_DIM: usize = 256;
/// The head dims the backward takes, in words.
pub const BACKWARD_HEAD_DIMS: &str =
    "multiples of 8 from 8 to 256 for queries/keys and for values (backward)";

/// One SIMD group of llvmpipe (and WARP) per workgroup without subgroups.
const CPU_WORKGROUP_SIZE: u32 = 8;
/// Invocations per workgroup on GPUs.
const GPU_WORKGROUP_SIZE: u32 = 64;
/// Invocations of the row-delta pass (one query row each).
const DELTA_WORKGROUP: u32 = 64;
/// Invocations of the sink-gradient pass (`SINK_WG` in the shader).
const SINK_WORKGROUP: u64 = 64;
/// Staged rows or keys per tile, halved until the tiles fit the adapter's
/// workgroup memory.
const BLOCK_CANDIDATES: [u32; 4] = [32, 16, 8, 4];
/// Register-blocked gradient layouts the planner tries, most work per
/// workgroup first: (row lanes, key lanes, rows per invocation), as
/// [`BlockedLayout`] spells them. Not yet tuned on a GPU; `flash-bench run
/// --backward --blocked-layout` times others.
const BLOCKED_LAYOUTS: [(u32, u32, u32); 9] = [
    (8, 8, 2),
    (4, 8, 2),
    (8, 4, 2),
    (8, 4, 1),
    (4, 4, 2),
    (8, 2, 1),
    (4, 4, 1),
    (4, 2, 1),
    (2, 2, 1),
];

/// Tiles and workgroups of one backward call. See [`BackwardPlan::for_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardPlan {
    pub(crate) tiling: BackwardTiling,
    /// The register-blocked gradient passes, when that tier is forced (the
    /// row-delta and sink passes keep `tiling`'s).
    pub(crate) blocked: Option<BlockedBackwardTiling>,
}

impl BackwardPlan {
    /// The plan for `shape` with `storage` on this adapter: on CPU adapters
    /// (lavapipe, llvmpipe, WARP) one SIMD group per workgroup, each
    /// invocation holding several keys (or query rows), with the loops
    /// expanded and, where the adapter has subgroups, the staged rows
    /// broadcast instead of staged in workgroup memory (the forward's
    /// tiers, which `tier` forces as it does there); on GPUs 64 invocations
    /// of one key (or row) each. Errors when the adapter lacks the storage
    /// buffers, workgroup memory or invocations the kernels need, or a
    /// forced tier.
    pub fn for_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
    ) -> Result<Self> {
        Self::plan_call(info, shape, storage, tier, None, false)
    }

    /// The plan [`crate::Gpu::backward`] makes for a call with `config`:
    /// [`BackwardPlan::for_call_with_layout`] when the config gives a
    /// register-blocked layout, else [`BackwardPlan::for_call`] with its
    /// tier; with dropout, its gradient passes specialized to regenerate
    /// the forward's mask.
    pub fn for_config(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        config: &AttentionConfig,
    ) -> Result<Self> {
        let dropout = config.active_dropout().is_some();
        if config.blocked_layout.is_some() {
            check_layout_tier(config.tier)?;
        }
        Self::plan_call(
            info,
            shape,
            storage,
            config.tier,
            config.blocked_layout,
            dropout,
        )
    }

    /// [`BackwardPlan::for_call`] on the register-blocked tier with its
    /// workgroup layout given ([`crate::AttentionConfig::blocked_layout`],
    /// read as for the forward: `row_lanes x key_lanes` invocations, blocks
    /// of `4 * key_lanes` keys and `row_lanes * rows` query rows): a layout
    /// outside the kernels' range, or one the adapter's invocations or
    /// workgroup memory cannot hold, is a typed error with the numbers, as
    /// is another forced tier.
    pub fn for_call_with_layout(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: BlockedLayout,
    ) -> Result<Self> {
        check_layout_tier(tier)?;
        Self::plan_call(info, shape, storage, tier, Some(layout), false)
    }

    fn plan_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: Option<BlockedLayout>,
        dropout: bool,
    ) -> Result<Self> {
        shape.validate()?;
        // Query/key and value head dims each up to 256, each held in a
        // power-of-two capacity of its own.
        for got in [shape.head_dim, shape.head_dim_v] {
            if got > BACKWARD_MAX_HEAD_DIM {
                return Err(Error::HeadDimUnsupported {
                    got,
                    supported: BACKWARD_HEAD_DIMS,
                });
            }
        }
        let limits = &info.limits;
        // Every pass binds the same buffers (BACKWARD_STORAGE_BUFFERS).
        Kernel::BackwardKeys.check_storage_buffers(limits.max_storage_buffers_per_shader_stage)?;
        let capacity = |dim: usize| (dim as u32).next_power_of_two().max(8);
        let (head_dim_capacity, head_dim_v_capacity) =
            (capacity(shape.head_dim), capacity(shape.head_dim_v));
        let cpu = info.adapter.device_type == wgpu::DeviceType::Cpu;
        // Hardware GPUs take the register-blocked gradient passes where
        // they fit: on the H200 (Vulkan) they ran H16 N4096 d128 causal
        // in 163 ms against the per-key passes' 620 ms (BENCHMARKS.md).
        let blocked_default = tier.is_none() && layout.is_none() && blocked_by_default(info);
        let blocked_tier =
            layout.is_some() || tier == Some(Tier::RegisterBlocked) || blocked_default;
        // GPUs get the subgroup tier only when it is forced.
        let subgroup = !blocked_tier && use_subgroup_tier(info, tier)? && (cpu || tier.is_some());
        // Each value read from workgroup memory (or broadcast) feeds `rows`
        // FMAs; the key pass holds 4 x rows x head dim floats per invocation.
        let cpu_rows = match (head_dim_capacity + head_dim_v_capacity) / 2 {
            0..=64 => 8,
            65..=128 => 4,
            _ => 2,
        };
        // llvmpipe behind GL compiles the CPU tiling (several rows, every
        // loop expanded) in minutes per pipeline: it gets the GPU tiling
        // with the loops expanded (for its loop budget), as the forward does.
        let gl = info.adapter.backend == wgpu::Backend::Gl;
        let (workgroup_size, rows, unroll) = match (subgroup, cpu, gl) {
            (true, true, _) => (info.adapter.subgroup_min_size, cpu_rows, true),
            (true, false, _) => (info.adapter.subgroup_min_size, 1, true),
            (false, true, false) => (CPU_WORKGROUP_SIZE, cpu_rows, true),
            (false, _, gl) => (GPU_WORKGROUP_SIZE, 1, gl),
        };
        info.check_invocations(workgroup_size.max(DELTA_WORKGROUP))?;
        let workgroup_bytes = u64::from(limits.max_compute_workgroup_storage_size);
        let block = BLOCK_CANDIDATES
            .into_iter()
            .find(|&block| {
                tile_bytes(head_dim_capacity, head_dim_v_capacity, block) <= workgroup_bytes
            })
            .ok_or(Error::WorkgroupMemory {
                head_dim: shape.head_dim,
                head_dim_v: shape.head_dim_v,
                needed: tile_bytes(head_dim_capacity, head_dim_v_capacity, BLOCK_CANDIDATES[3]),
                limit: limits.max_compute_workgroup_storage_size,
            })?;
        let blocked = match (layout, blocked_tier) {
            (Some(layout), _) => Some(blocked_tiling_of(info, shape, storage, layout, dropout)?),
            (None, true) => match blocked_tiling(info, shape, storage, dropout) {
                Ok(tiling) => Some(tiling),
                // A default that does not fit keeps the per-key passes.
                Err(_) if blocked_default => None,
                Err(err) => return Err(err),
            },
            (None, false) => None,
        };
        Ok(BackwardPlan {
            tiling: BackwardTiling {
                head_dim_capacity,
                head_dim_v_capacity,
                workgroup_size,
                rows,
                block,
                unroll,
                subgroup,
                storage,
                dropout,
            },
            blocked,
        })
    }

    /// The pipeline of one pass. The row-delta and sink passes do not
    /// depend on the tiles, so every call of a storage type shares one.
    pub(crate) fn specialization(&self, pass: BackwardPass) -> Specialization {
        let tiling = match pass {
            BackwardPass::Deltas | BackwardPass::Sinks => BackwardTiling {
                head_dim_capacity: 8,
                head_dim_v_capacity: 8,
                workgroup_size: 8,
                rows: 1,
                block: 4,
                unroll: false,
                subgroup: false,
                storage: self.tiling.storage,
                dropout: false,
            },
            BackwardPass::Keys | BackwardPass::Queries => match self.blocked {
                Some(tiling) => return Specialization::BackwardBlocked { pass, tiling },
                None => self.tiling,
            },
        };
        Specialization::Backward { pass, tiling }
    }

    /// Workgroups of `pass` over `extent_q` query rows and `extent_kv` keys.
    pub(crate) fn workgroups(
        &self,
        pass: BackwardPass,
        shape: &AttentionShape,
        extent_q: usize,
        extent_kv: usize,
    ) -> [u64; 3] {
        let (keys_per_group, rows_per_group) = match self.blocked {
            Some(t) => (t.block_n(), t.block_m()),
            None => (self.rows_per_workgroup(), self.rows_per_workgroup()),
        };
        let (keys_per_group, rows_per_group) =
            (u64::from(keys_per_group), u64::from(rows_per_group));
        // Heads slowest, as in the forward (src/plan/forward.rs): equal
        // work in every contiguous range of the grid on llvmpipe.
        match pass {
            BackwardPass::Deltas => [
                (extent_q as u64).div_ceil(u64::from(DELTA_WORKGROUP)),
                shape.batch as u64,
                shape.heads_q as u64,
            ],
            BackwardPass::Keys => [
                (extent_kv as u64).div_ceil(keys_per_group),
                shape.batch as u64,
                shape.heads_kv as u64,
            ],
            BackwardPass::Queries => [
                (extent_q as u64).div_ceil(rows_per_group),
                shape.batch as u64,
                shape.heads_q as u64,
            ],
            // One workgroup per query head, over the whole call.
            BackwardPass::Sinks => [shape.heads_q as u64, 1, 1],
        }
    }

    /// Checks a dense call of `shape` against the adapter's workgroup
    /// count and loop budget (see [`GpuInfo::loop_budget`]): what
    /// [`crate::Gpu::backward`] refuses with `DispatchTooLarge` or
    /// `LoopBudget` before recording anything.
    pub fn check_limits(&self, info: &GpuInfo, shape: &AttentionShape) -> Result<()> {
        self.check_call(info, shape, shape.seq_q, shape.seq_kv)
    }

    /// [`BackwardPlan::check_limits`] for one part of a call that writes
    /// `extent_q` rows and `extent_kv` keys (padding included).
    pub(crate) fn check_call(
        &self,
        info: &GpuInfo,
        shape: &AttentionShape,
        extent_q: usize,
        extent_kv: usize,
    ) -> Result<()> {
        let limit = info.limits.max_compute_workgroups_per_dimension;
        for pass in BackwardPass::ALL {
            let groups = self.workgroups(pass, shape, extent_q, extent_kv);
            for (axis, &n) in ["x", "batch", "heads"].iter().zip(&groups) {
                if n > u64::from(limit) {
                    return Err(Error::DispatchTooLarge {
                        what: "attention backward",
                        axis,
                        groups: n,
                        limit,
                    });
                }
            }
        }
        let Some(budget) = info.loop_budget() else {
            return Ok(());
        };
        let group = shape.group_size() as u64;
        let (rows, keys) = (shape.seq_q as u64, shape.seq_kv as u64);
        let checks = match self.blocked {
            Some(t) => [
                (BackwardPass::Keys, rows, blocked_key_trips(&t, group, rows)),
                (BackwardPass::Queries, keys, blocked_query_trips(&t, keys)),
            ],
            // Every query row of every head of the group, per key block.
            None => [
                (BackwardPass::Keys, rows, group * self.loop_trips(rows) + 1),
                (BackwardPass::Queries, keys, self.loop_trips(keys)),
            ],
        };
        for (pass, visited, trips) in checks {
            if trips > budget {
                return Err(Error::LoopBudget {
                    kernel: self.specialization(pass).label(),
                    keys: visited,
                    trips,
                    budget,
                });
            }
        }
        Ok(())
    }

    /// Checks the sink-gradient pass of a call of `shape` against the loop
    /// budget: each invocation walks a 64th of every batch entry's rows.
    pub(crate) fn check_sinks(&self, info: &GpuInfo, shape: &AttentionShape) -> Result<()> {
        let Some(budget) = info.loop_budget() else {
            return Ok(());
        };
        let rows = shape.seq_q as u64;
        let trips = shape.batch as u64 * (rows.div_ceil(SINK_WORKGROUP) + 1) + 8;
        if trips > budget {
            return Err(Error::LoopBudget {
                kernel: self.specialization(BackwardPass::Sinks).label(),
                keys: shape.batch as u64 * rows,
                trips,
                budget,
            });
        }
        Ok(())
    }

    /// Loop iterations one invocation runs walking `n` staged rows or keys
    /// (each loop's exit test counted as one): per tile, its own trip and
    /// the exit of the inner walk, plus the staging and inner loops where
    /// they are not unrolled.
    fn loop_trips(&self, n: u64) -> u64 {
        let t = &self.tiling;
        let block = u64::from(t.block);
        let tiles = n.div_ceil(block);
        let mut per_item = 1;
        let mut per_tile = 2;
        if !t.unroll {
            let d4 = u64::from(t.head_dim_capacity / 4);
            let dv4 = u64::from(t.head_dim_v_capacity / 4);
            let rows = u64::from(t.rows);
            // Per row or key: loading the staged pair, the two products
            // and the two updates, each a loop over its head dim (and rows).
            per_item += (d4 + dv4 + 2) + 2 * (d4 + dv4 + 2) * (rows + 1) + 3 * (rows + 1);
            let wg = u64::from(t.workgroup_size);
            per_tile += (block * d4).div_ceil(wg) + (block * dv4).div_ceil(wg) + 2;
        }
        tiles * per_tile + n * per_item + 2
    }

    /// Keys (key pass) or query rows (query pass) per workgroup of the
    /// per-key passes (the register-blocked ones: [`BackwardPlan::blocked_tiling`]).
    pub fn rows_per_workgroup(&self) -> u32 {
        self.tiling.workgroup_size * self.tiling.rows
    }
    /// Invocations per workgroup of the per-key gradient passes.
    pub fn workgroup_size(&self) -> u32 {
        self.tiling.workgroup_size
    }
    /// Query rows or keys per staged tile.
    pub fn block(&self) -> u32 {
        self.tiling.block
    }
    /// Query/key head dims the pipelines hold (a power of two >= the
    /// call's).
    pub fn head_dim_capacity(&self) -> u32 {
        self.tiling.head_dim_capacity
    }
    /// Value head dims the pipelines hold (a power of two >= the call's).
    pub fn head_dim_v_capacity(&self) -> u32 {
        self.tiling.head_dim_v_capacity
    }
    /// Whether the loops are expanded in the WGSL text.
    pub fn unrolled(&self) -> bool {
        self.tiling.unroll
    }
    /// The register-blocked gradient passes' tiles, when that tier runs.
    pub fn blocked_tiling(&self) -> Option<BlockedBackwardTiling> {
        self.blocked
    }
    /// The gradient passes' tier: register-blocked, subgroup broadcasts or
    /// workgroup-memory tiles.
    pub fn tier(&self) -> Tier {
        if self.blocked.is_some() {
            Tier::RegisterBlocked
        } else if self.tiling.subgroup {
            Tier::SubgroupBroadcast
        } else {
            Tier::Portable
        }
    }
}

/// The register-blocked tiles for this adapter and shape: the first of
/// [`BLOCKED_LAYOUTS`] whose workgroup fits the adapter's invocations and
/// workgroup memory, or `WorkgroupMemory` with the smallest one's needs.
fn blocked_tiling(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
    dropout: bool,
) -> Result<BlockedBackwardTiling> {
    let layouts =
        BLOCKED_LAYOUTS.map(|layout| blocked_backward_tiling(shape, storage, layout, dropout));
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    if let Some(fits) = layouts
        .iter()
        .find(|t| t.workgroup_bytes() <= memory && t.workgroup_size() <= info.max_invocations())
    {
        return Ok(*fits);
    }
    Err(Error::WorkgroupMemory {
        head_dim: shape.head_dim,
        head_dim_v: shape.head_dim_v,
        needed: layouts[layouts.len() - 1].workgroup_bytes(),
        limit: info.limits.max_compute_workgroup_storage_size,
    })
}

/// The register-blocked tiles of the caller's layout, checked against the
/// kernels' range and the adapter's limits.
fn blocked_tiling_of(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
    layout: BlockedLayout,
    dropout: bool,
) -> Result<BlockedBackwardTiling> {
    check_blocked_layout(layout)?;
    let lanes = (layout.row_lanes, layout.key_lanes, layout.rows);
    let tiling = blocked_backward_tiling(shape, storage, lanes, dropout);
    info.check_workgroup(shape, tiling.workgroup_size(), tiling.workgroup_bytes())?;
    Ok(tiling)
}

/// The register-blocked tiles of `shape` in the layout (row lanes, key
/// lanes, rows per invocation), as [`BLOCKED_LAYOUTS`] spells it.
fn blocked_backward_tiling(
    shape: &AttentionShape,
    storage: DType,
    (row_lanes, key_lanes, rows): (u32, u32, u32),
    dropout: bool,
) -> BlockedBackwardTiling {
    BlockedBackwardTiling {
        head_dim: shape.head_dim as u32,
        head_dim_v: shape.head_dim_v as u32,
        key_lanes,
        row_lanes,
        rows,
        storage,
        dropout,
    }
}

/// Loop iterations an invocation of the staging loops runs for `items`
/// vec4s (or rows) of a block, exit test included.
fn staging_trips(t: &BlockedBackwardTiling, items: u32) -> u64 {
    u64::from(items.div_ceil(t.workgroup_size())) + 1
}

/// Trips of `micro_products`' two head-dim loops.
fn product_trips(t: &BlockedBackwardTiling) -> u64 {
    u64::from(t.head_dim / 4 + t.head_dim_v / 4) + 2
}

/// Trips of staging a key block (K, then V) and a query block (Q, dO,
/// statistics).
fn block_trips(t: &BlockedBackwardTiling) -> (u64, u64) {
    let (d4, dv4) = (t.head_dim / 4, t.head_dim_v / 4);
    (
        staging_trips(t, t.block_n() * d4) + staging_trips(t, t.block_n() * dv4),
        staging_trips(t, t.block_m() * d4)
            + staging_trips(t, t.block_m() * dv4)
            + staging_trips(t, t.block_m()),
    )
}

/// Loop iterations of a register-blocked key-pass invocation walking `rows`
/// query rows of each of `group` query heads (its loops over rows, columns
/// and the four keys are unrolled).
fn blocked_key_trips(t: &BlockedBackwardTiling, group: u64, rows: u64) -> u64 {
    let (keys, queries) = block_trips(t);
    let blocks = rows.div_ceil(u64::from(t.block_m())) + 1;
    let per_block = 1 + queries + product_trips(t) + u64::from(t.block_m()) + 1;
    keys + group * (blocks * per_block + 1) + 1
}

/// Loop iterations of a register-blocked query-pass invocation walking
/// `keys` keys.
fn blocked_query_trips(t: &BlockedBackwardTiling, keys: u64) -> u64 {
    let (key_block, queries) = block_trips(t);
    let blocks = keys.div_ceil(u64::from(t.block_n())) + 1;
    let per_block = 1 + key_block + product_trips(t) + u64::from(t.key_lanes) + 1;
    queries + blocks * per_block
}

/// Workgroup memory of a gradient pass: f32 tiles of `block` rows by
/// `head_dim` (Q or K) and by `head_dim_v` (dO or V), and two floats of row
/// statistics per row.
fn tile_bytes(head_dim: u32, head_dim_v: u32, block: u32) -> u64 {
    u64::from(block) * (u64::from(head_dim + head_dim_v) * 4 + 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profiles;

    /// The limit the planner checks is what each backward kernel binds.
    #[test]
    fn storage_buffer_count_is_the_kernels() {
        let kernels = [
            Kernel::BackwardDeltas,
            Kernel::BackwardKeys,
            Kernel::BackwardQueries,
            Kernel::BackwardSinks,
        ];
        for kernel in kernels {
            assert_eq!(
                kernel.storage_buffers(),
                BACKWARD_STORAGE_BUFFERS,
                "{kernel:?}"
            );
        }
    }

    /// With dropout the two gradient passes compile its mask (the DROPOUT
    /// variant) and the row-delta and sink passes share their pipelines
    /// with calls without it; a rate that drops nothing changes nothing.
    #[test]
    fn dropout_specializes_the_gradient_passes_only() {
        let shape = AttentionShape::self_attention(1, 1024, 8, 64);
        for profile in profiles::all() {
            let info = profile.info();
            for tier in [None, Some(Tier::RegisterBlocked)] {
                let config = AttentionConfig {
                    tier,
                    ..AttentionConfig::new()
                };
                let Ok(plain) = BackwardPlan::for_config(&info, &shape, DType::F32, &config) else {
                    continue;
                };
                let dropping = config.clone().dropout(0.1, 7);
                let dropout = BackwardPlan::for_config(&info, &shape, DType::F32, &dropping)
                    .expect("dropout plans where the call without it does");
                let idle = config.clone().dropout(0.0, 7);
                let idle = BackwardPlan::for_config(&info, &shape, DType::F32, &idle).unwrap();
                for pass in BackwardPass::ALL {
                    let gradient = matches!(pass, BackwardPass::Keys | BackwardPass::Queries);
                    let flags = dropout.specialization(pass).variant_flags();
                    assert_eq!(
                        flags.contains(&"DROPOUT"),
                        gradient,
                        "{} {pass:?}",
                        profile.name
                    );
                    assert!(
                        !plain
                            .specialization(pass)
                            .variant_flags()
                            .contains(&"DROPOUT")
                    );
                    assert_eq!(idle.specialization(pass), plain.specialization(pass));
                }
            }
        }
    }

    #[test]
    fn every_profile_plans_or_says_why() {
        for profile in profiles::all() {
            let info = profile.info();
            for head_dim in (8..=256).step_by(8) {
                let shape = AttentionShape::self_attention(1, 1024, 8, head_dim);
                match BackwardPlan::for_call(&info, &shape, DType::F32, None) {
                    Ok(plan) => {
                        let t = plan.tiling;
                        assert!(t.head_dim_capacity as usize >= head_dim);
                        assert!(t.head_dim_capacity.is_power_of_two());
                        assert!(
                            tile_bytes(t.head_dim_capacity, t.head_dim_v_capacity, t.block)
                                <= u64::from(profile.workgroup_bytes),
                            "{}: d={head_dim} block {}",
                            profile.name,
                            t.block
                        );
                        let cpu = profile.device_type == wgpu::DeviceType::Cpu;
                        assert_eq!(t.unroll, cpu || profile.backend == wgpu::Backend::Gl);
                        // CPU adapters with subgroups broadcast, as the
                        // forward does; GPUs stage tiles unless forced.
                        assert_eq!(
                            t.subgroup,
                            cpu && info.has_subgroups() && profile.backend != wgpu::Backend::Gl
                        );
                        // Hardware GPUs default to the register-blocked
                        // passes where they fit; the rest to per-key ones.
                        let blocked_fits = BackwardPlan::for_call(
                            &info,
                            &shape,
                            DType::F32,
                            Some(Tier::RegisterBlocked),
                        )
                        .is_ok();
                        assert_eq!(
                            plan.tier() == Tier::RegisterBlocked,
                            blocked_by_default(&info) && blocked_fits,
                            "{} d={head_dim}",
                            profile.name
                        );
                        plan.check_call(&info, &shape, 1024, 1024)
                            .unwrap_or_else(|e| panic!("{}: {e}", profile.name));
                    }
                    Err(Error::StorageBuffers { needed, limit, .. }) => {
                        assert!(limit < needed, "{}", profile.name);
                        assert_eq!(profile.storage_buffers, limit);
                    }
                    Err(e) => panic!("{} d={head_dim}: {e}", profile.name),
                }
            }
        }
    }

    #[test]
    fn register_blocked_gradients_fit_every_profile_or_say_why() {
        let pairs = (8..=256)
            .step_by(8)
            .map(|d| (d, d))
            .chain([(192, 128), (128, 192), (40, 8)]);
        for (head_dim, head_dim_v) in pairs {
            let shape = AttentionShape {
                head_dim_v,
                ..AttentionShape::self_attention(1, 1024, 8, head_dim)
            };
            for profile in profiles::all() {
                let info = profile.info();
                let tier = Some(Tier::RegisterBlocked);
                match BackwardPlan::for_call(&info, &shape, DType::F32, tier) {
                    Ok(plan) => {
                        let t = plan.blocked_tiling().expect("the blocked tiles");
                        assert_eq!(plan.tier(), Tier::RegisterBlocked);
                        assert_eq!(
                            (t.head_dim as usize, t.head_dim_v as usize),
                            (head_dim, head_dim_v)
                        );
                        assert!(t.workgroup_bytes() <= u64::from(profile.workgroup_bytes));
                        assert!(t.workgroup_size() <= info.max_invocations());
                        // Key blocks for the key pass, query blocks for the
                        // query pass; the other passes keep their own.
                        // Heads along z, the slowest axis, as in the
                        // forward.
                        for pass in [BackwardPass::Keys, BackwardPass::Queries] {
                            let grid = plan.workgroups(pass, &shape, 1000, 900);
                            assert_eq!(grid[1..], [1, 8]);
                        }
                        let groups = |pass| plan.workgroups(pass, &shape, 1000, 900)[0];
                        assert_eq!(
                            groups(BackwardPass::Keys),
                            900u64.div_ceil(t.block_n().into())
                        );
                        assert_eq!(
                            groups(BackwardPass::Queries),
                            1000u64.div_ceil(t.block_m().into())
                        );
                        assert!(matches!(
                            plan.specialization(BackwardPass::Keys),
                            Specialization::BackwardBlocked { .. }
                        ));
                        assert!(matches!(
                            plan.specialization(BackwardPass::Deltas),
                            Specialization::Backward { .. }
                        ));
                        plan.check_call(&info, &shape, 1024, 1024)
                            .unwrap_or_else(|e| panic!("{}: {e}", profile.name));
                    }
                    Err(Error::StorageBuffers { .. }) => {}
                    Err(e) => panic!("{} {head_dim}/{head_dim_v}: {e}", profile.name),
                }
            }
        }
        // What the H200 (48 KiB of workgroup memory) gets: 64 invocations
        // up to head dim 64, then fewer rows per block.
        let h200 = profiles::all()[2].info();
        let layout = |head_dim| {
            let shape = AttentionShape::self_attention(1, 1024, 8, head_dim);
            let plan =
                BackwardPlan::for_call(&h200, &shape, DType::F32, Some(Tier::RegisterBlocked));
            let t = plan.unwrap().blocked_tiling().unwrap();
            (t.row_lanes, t.key_lanes, t.rows)
        };
        assert_eq!(layout(64), (8, 8, 2));
        assert_eq!(layout(128), (4, 8, 2));
        assert_eq!(layout(256), (8, 2, 1));
    }

    #[test]
    fn uneven_head_dims_get_a_capacity_each_and_past_256_are_refused() {
        for profile in profiles::all() {
            let info = profile.info();
            // DeepSeek's MLA prefill (192 / 128) both ways, and a narrow pair.
            for (head_dim, head_dim_v, capacities) in [
                (192, 128, (256, 128)),
                (128, 192, (128, 256)),
                (8, 40, (8, 64)),
            ] {
                let shape = AttentionShape {
                    head_dim_v,
                    ..AttentionShape::self_attention(1, 256, 4, head_dim)
                };
                match BackwardPlan::for_call(&info, &shape, DType::F32, None) {
                    Ok(plan) => assert_eq!(
                        (plan.head_dim_capacity(), plan.head_dim_v_capacity()),
                        capacities,
                        "{}",
                        profile.name
                    ),
                    Err(Error::StorageBuffers { .. }) => {}
                    Err(e) => panic!("{} {head_dim}/{head_dim_v}: {e}", profile.name),
                }
            }
            for (head_dim, head_dim_v) in [(264, 128), (128, 264), (576, 512)] {
                let shape = AttentionShape {
                    head_dim_v,
                    ..AttentionShape::self_attention(1, 256, 4, head_dim)
                };
                let err = BackwardPlan::for_call(&info, &shape, DType::F32, None).unwrap_err();
                // The first dim past 256 is named.
                let first_over = if head_dim > 256 { head_dim } else { head_dim_v };
                assert!(
                    matches!(err, Error::HeadDimUnsupported { got, .. } if got == first_over),
                    "{}: {err}",
                    profile.name
                );
            }
        }
    }

    /// A caller's register-blocked layout is checked against the adapter,
    /// not searched: one too wide or too large for it gets the typed error
    /// with its own numbers.
    #[test]
    fn a_callers_layout_past_the_limits_gets_the_numbers() {
        let shape = AttentionShape::self_attention(1, 1024, 8, 128);
        let mut info = profiles::all()[2].info();
        let layout = BlockedLayout {
            row_lanes: 8,
            key_lanes: 8,
            rows: 2,
        };
        let needed =
            blocked_backward_tiling(&shape, DType::F32, (8, 8, 2), false).workgroup_bytes();
        info.limits.max_compute_workgroup_storage_size = (needed - 4) as u32;
        let err = BackwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, layout)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::WorkgroupMemory { head_dim: 128, head_dim_v: 128, needed: n, limit }
                    if n == needed && u64::from(limit) == needed - 4
            ),
            "{err}"
        );
        info.limits.max_compute_workgroup_storage_size = needed as u32;
        BackwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, layout).unwrap();

        let limit = info.max_invocations();
        let wide = BlockedLayout {
            row_lanes: limit / 4,
            key_lanes: 8,
            rows: 1,
        };
        let err =
            BackwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, wide).unwrap_err();
        assert!(
            matches!(err, Error::WorkgroupInvocations { needed, limit: l } if needed == 2 * limit && l == limit),
            "{err}"
        );
    }

    #[test]
    fn webgpu_minimum_storage_buffers_are_refused_with_the_numbers() {
        let adreno = profiles::all()
            .into_iter()
            .find(|p| p.name.starts_with("Adreno"))
            .unwrap()
            .info();
        let shape = AttentionShape::self_attention(1, 64, 2, 64);
        let err = BackwardPlan::for_call(&adreno, &shape, DType::F16, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::StorageBuffers {
                    needed: 10,
                    limit: 8,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn llvmpipe_refuses_past_its_loop_budget() {
        let llvmpipe = profiles::all()[0].info();
        let gqa = AttentionShape {
            batch: 1,
            seq_q: 20_000,
            seq_kv: 20_000,
            heads_q: 8,
            heads_kv: 1,
            head_dim: 64,
            head_dim_v: 64,
        };
        let plan = BackwardPlan::for_call(&llvmpipe, &gqa, DType::F32, None).unwrap();
        // 8 query heads x 20,000 rows per key block: over 65,535.
        let err = plan
            .check_call(&llvmpipe, &gqa, 20_000, 20_000)
            .unwrap_err();
        assert!(
            matches!(err, Error::LoopBudget { keys: 20_000, .. }),
            "{err}"
        );
        let mha = AttentionShape { heads_kv: 8, ..gqa };
        plan.check_call(&llvmpipe, &mha, 20_000, 20_000).unwrap();
    }
}
