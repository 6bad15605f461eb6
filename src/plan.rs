//! Every planner of the crate, in one place: how a call runs on an
//! adapter (kernel tier, tile sizes, workgroups, key splits, chunks) as a
//! pure function of the adapter's [`GpuInfo`] and the call's shape and
//! options. Nothing here touches a device, so the choices for adapters we
//! do not have are tested from their profiles (see the tests below).

use crate::config::{AttentionShape, BlockedLayout, Tier};
use crate::decode::{DecodeLanes, DecodeOptions};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::shaders::{
    AttentionTiling, BlockedTiling, CoopTiling, DecodeIo, MIN_BLOCK_N, NaivePass, Specialization,
    forward_tile_bytes, largest_block_n,
};
use crate::tensor::DType;

/// Checks that a kernel visiting `keys` keys per invocation stays within
/// the adapter's loop budget ([`GpuInfo::loop_budget`]).
pub(crate) fn check_loop_budget(info: &GpuInfo, spec: &Specialization, keys: u64) -> Result<()> {
    let (Some(budget), Some(trips)) = (info.loop_budget(), spec.loop_trips(keys)) else {
        return Ok(());
    };
    if trips > budget {
        return Err(Error::LoopBudget {
            kernel: spec.label(),
            keys,
            trips,
            budget,
        });
    }
    Ok(())
}

/// The most keys a kernel may visit per invocation within the adapter's
/// loop budget ([`GpuInfo::loop_budget`]); `None` when nothing caps loops.
/// A `LoopBudget` error when not even one key fits.
pub(crate) fn keys_within_loop_budget(
    info: &GpuInfo,
    spec: &Specialization,
) -> Result<Option<u64>> {
    let Some(budget) = info.loop_budget() else {
        return Ok(None);
    };
    let fits = |keys: u64| spec.loop_trips(keys).is_none_or(|trips| trips <= budget);
    if !fits(1) {
        check_loop_budget(info, spec, 1)?;
    }
    // Trips grow with keys; the budget bounds them well below 2^32.
    let (mut lo, mut hi) = (1u64, 1u64 << 32);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Row tiling on hardware GPUs in the portable tier: one query row per
/// invocation, up to 64 invocations, loops left to the driver's compiler.
const GPU_WORKGROUP_SIZE: u32 = 64;
/// Row tiling on CPU adapters (lavapipe, llvmpipe, WARP): one SIMD group per
/// workgroup and many rows per invocation, with unrolled loops, so that each
/// K/V load feeds many FMAs. Measured on lavapipe, d=64: 1 row per
/// invocation 1.9 GFLOP/s, 16 rows 18 GFLOP/s (BENCHMARKS.md).
const CPU_WORKGROUP_SIZE: u32 = 8;
/// Subgroup sizes the subgroup tier is written for (WebGPU's range).
const SUBGROUP_SIZES: std::ops::RangeInclusive<u32> = 4..=128;

/// How a forward call will run on an adapter: kernel tier, tile sizes and
/// workgroups. A pure function of the adapter's [`GpuInfo`] and the call,
/// so the choice for any adapter can be inspected without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPlan {
    /// The tiling of the per-row tiers (flash_attention.wgsl), which the
    /// naive baseline's products share even when `tiled` is chosen.
    pub(crate) tiling: AttentionTiling,
    /// The block-tiled kernel the call runs, if not a per-row one.
    tiled: Option<TiledKernel>,
    workgroups: [u32; 3],
    /// With grouped rows: the workgroups of the same call without them
    /// (what a masked call dispatches).
    ungrouped_workgroups: [u32; 3],
    /// The register-blocked kernel's rows are (query row, head) pairs of a
    /// KV head's query heads ([`ForwardPlan::groups_heads`]).
    group_rows: bool,
    keys_per_dispatch: Option<u64>,
}

impl ForwardPlan {
    /// Tiles for `shape` with f32 storage on this adapter.
    pub fn new(info: &GpuInfo, shape: &AttentionShape) -> Result<Self> {
        Self::for_call(info, shape, DType::F32, None)
    }

    /// Workgroups along (query tiles, query heads, batch); along (tiles of
    /// (query row, head) pairs, KV heads, batch) when
    /// [`ForwardPlan::groups_heads`].
    pub fn workgroups(&self) -> [u32; 3] {
        self.workgroups
    }
    /// Whether a block's rows are (query row, query head) pairs of one KV
    /// head's group (register-blocked GQA calls with fewer query rows than
    /// a block: a decoding step's heads share each K/V tile). Masked calls
    /// never group (their tiles are per head).
    pub fn groups_heads(&self) -> bool {
        self.group_rows
    }
    /// The same plan without grouped rows (what a masked call runs).
    pub(crate) fn without_grouped_rows(&self) -> Self {
        ForwardPlan {
            workgroups: self.ungrouped_workgroups,
            group_rows: false,
            ..*self
        }
    }
    /// The most keys one dispatch may visit per query row on this adapter
    /// (llvmpipe's loop budget); `None` when nothing caps it. Longer calls
    /// run their keys in chunks, one dispatch each (see [`Gpu::forward`]).
    ///
    /// [`Gpu::forward`]: crate::Gpu::forward
    pub fn keys_per_dispatch(&self) -> Option<u64> {
        self.keys_per_dispatch
    }
    /// Loop iterations one invocation runs over `keys` keys, as the planner
    /// models them against [`GpuInfo::loop_budget`].
    pub fn loop_trips(&self, keys: u64) -> u64 {
        self.specialization().loop_trips(keys).unwrap_or(0)
    }
    /// Dispatches the keys of a `seq_kv`-key sequence take under the loop
    /// budget alone (more when K or V is bound in windows, see
    /// [`Gpu::forward`]).
    ///
    /// [`Gpu::forward`]: crate::Gpu::forward
    pub fn key_chunks(&self, seq_kv: usize) -> u64 {
        self.keys_per_dispatch
            .map_or(1, |keys| (seq_kv as u64).div_ceil(keys).max(1))
    }
    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.workgroup_size(),
            Some(TiledKernel::Coop(c)) => c.workgroup_size,
            None => self.tiling.workgroup_size,
        }
    }
    /// Query rows each invocation holds (the cooperative-matrix kernel's
    /// rows are held by subgroups: 0).
    pub fn rows_per_invocation(&self) -> u32 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.rows,
            Some(TiledKernel::Coop(_)) => 0,
            None => self.tiling.rows,
        }
    }
    /// Query rows per workgroup (one tile of Q).
    pub fn block_m(&self) -> u32 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.block_m(),
            Some(TiledKernel::Coop(c)) => c.block_m(),
            None => self.tiling.workgroup_size * self.tiling.rows,
        }
    }
    /// Keys per K/V tile.
    pub fn block_n(&self) -> u32 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.block_n(),
            Some(TiledKernel::Coop(c)) => c.block_n(),
            None => self.tiling.block_n,
        }
    }
    /// The register-blocked tier's layout, when the plan runs it.
    pub fn blocked_tiling(&self) -> Option<BlockedTiling> {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => Some(b),
            _ => None,
        }
    }
    /// The cooperative-matrix tier's layout, when the plan runs it.
    pub fn coop_tiling(&self) -> Option<CoopTiling> {
        match self.tiled {
            Some(TiledKernel::Coop(c)) => Some(c),
            _ => None,
        }
    }
    /// Bytes of workgroup memory the forward kernel declares.
    pub fn workgroup_bytes(&self) -> u64 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.workgroup_bytes(),
            Some(TiledKernel::Coop(c)) => c.workgroup_bytes(),
            None => forward_tile_bytes(
                self.tiling.head_dim,
                self.tiling.head_dim_v,
                self.tiling.block_n,
            ),
        }
    }
    /// Storage type of Q, K, V and O.
    pub fn storage(&self) -> DType {
        self.tiling.storage
    }
    /// Whether the head-dim and row loops are expanded in the WGSL text
    /// (the register-blocked kernel always expands its row and column
    /// loops and never the head-dim one: `false`).
    pub fn unrolled(&self) -> bool {
        self.tiled.is_none() && self.tiling.unroll
    }
    pub(crate) fn specialization(&self) -> Specialization {
        forward_specialization(self.tiled, self.tiling)
    }
    /// The plan with the forward's products in f16
    /// ([`AttentionConfig::f16_products`]): register-blocked plans of f16
    /// storage on adapters with `SHADER_F16` only; the rest is a typed
    /// error.
    ///
    /// [`AttentionConfig::f16_products`]: crate::AttentionConfig::f16_products
    pub fn with_f16_products(mut self, info: &GpuInfo) -> Result<Self> {
        if self.tiling.storage != DType::F16 {
            return Err(Error::DTypeUnsupported {
                tensor: "q (f16 products)",
                got: self.tiling.storage,
                needed: DType::F16,
            });
        }
        let Some(TiledKernel::Blocked(blocked)) = &mut self.tiled else {
            return Err(Error::UnsupportedCombination {
                what: "f16 products and a tier other than RegisterBlocked",
            });
        };
        if !info.has_f16() {
            return Err(Error::TierUnavailable {
                tier: Tier::RegisterBlocked,
                reason: "f16 products need the SHADER_F16 feature".to_string(),
            });
        }
        blocked.f16_products = true;
        Ok(self)
    }

    /// The plan with attention dropout compiled into its kernel
    /// ([`AttentionConfig::dropout`]; the DROPOUT variant, so that calls
    /// without it keep their pipelines free of the mask's hashing).
    ///
    /// [`AttentionConfig::dropout`]: crate::AttentionConfig::dropout
    pub fn with_dropout(mut self) -> Self {
        match &mut self.tiled {
            Some(TiledKernel::Coop(coop)) => coop.dropout = true,
            Some(TiledKernel::Blocked(blocked)) => blocked.dropout = true,
            None => self.tiling.dropout = true,
        }
        self
    }

    /// Whether the plan's kernel applies attention dropout.
    pub fn applies_dropout(&self) -> bool {
        match self.tiled {
            Some(TiledKernel::Blocked(blocked)) => blocked.dropout,
            Some(TiledKernel::Coop(coop)) => coop.dropout,
            None => self.tiling.dropout,
        }
    }

    /// The kernel of the same tier with an attention mask.
    pub(crate) fn masked_specialization(&self) -> Specialization {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => Specialization::FlashBlockedMasked(b),
            Some(TiledKernel::Coop(c)) => Specialization::FlashCoopMasked(c),
            None => Specialization::FlashMasked(self.tiling),
        }
    }

    /// Tiles for one call: Q, K, V and O stored as `storage` and, if
    /// forced, the kernel tier.
    pub fn for_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
    ) -> Result<Self> {
        Self::plan_call(info, shape, storage, tier, None)
    }

    /// [`ForwardPlan::for_call`] on the register-blocked tier with its
    /// workgroup layout given ([`AttentionConfig::blocked_layout`]): a
    /// layout outside the kernel's range, or one the adapter's invocations
    /// or workgroup memory cannot hold, is a typed error with the numbers,
    /// as is another forced tier.
    ///
    /// [`AttentionConfig::blocked_layout`]: crate::AttentionConfig::blocked_layout
    pub fn for_call_with_layout(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: BlockedLayout,
    ) -> Result<Self> {
        check_layout_tier(tier)?;
        Self::plan_call(info, shape, storage, tier, Some(layout))
    }

    fn plan_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: Option<BlockedLayout>,
    ) -> Result<Self> {
        shape.validate()?;
        let limits = &info.limits;
        let (head_dim, head_dim_v) = (shape.head_dim as u32, shape.head_dim_v as u32);
        let block_n = largest_block_n(
            head_dim,
            head_dim_v,
            u64::from(limits.max_compute_workgroup_storage_size),
        )
        .ok_or(Error::WorkgroupMemory {
            head_dim: shape.head_dim,
            head_dim_v: shape.head_dim_v,
            needed: forward_tile_bytes(head_dim, head_dim_v, MIN_BLOCK_N),
            limit: limits.max_compute_workgroup_storage_size,
        })?;
        // The per-row tiers' tiling is planned in every case: the naive
        // baseline shares it.
        let row_tier = tier.filter(|&t| matches!(t, Tier::Portable | Tier::SubgroupBroadcast));
        let RowTiling {
            workgroup_size,
            rows,
            unroll,
            subgroup_kv,
        } = row_tiling(info, shape, row_tier)?;
        info.check_invocations(workgroup_size)?;
        let unavailable = |tier, reason| Error::TierUnavailable { tier, reason };
        let tiled = match (layout, tier) {
            (Some(layout), _) => Some(TiledKernel::Blocked(blocked_tiling_of(
                info, shape, storage, layout,
            )?)),
            (None, tier) => match tier {
                Some(Tier::CooperativeMatrix) => Some(TiledKernel::Coop(
                    coop_tiling(info, shape, storage)
                        .map_err(|reason| unavailable(Tier::CooperativeMatrix, reason))?,
                )),
                Some(Tier::RegisterBlocked) => Some(TiledKernel::Blocked(
                    blocked_tiling(info, shape, storage)
                        .map_err(|reason| unavailable(Tier::RegisterBlocked, reason))?,
                )),
                Some(Tier::Portable | Tier::SubgroupBroadcast) => None,
                // The matrix units where the device offers them, else
                // register blocking on hardware GPUs.
                None => match coop_tiling(info, shape, storage) {
                    Ok(coop) => Some(TiledKernel::Coop(coop)),
                    Err(_) if blocked_by_default(info) => blocked_tiling(info, shape, storage)
                        .ok()
                        .map(TiledKernel::Blocked),
                    Err(_) => None,
                },
            },
        };
        let block_m = u64::from(match tiled {
            Some(TiledKernel::Blocked(b)) => b.block_m(),
            Some(TiledKernel::Coop(c)) => c.block_m(),
            None => workgroup_size * rows,
        });
        let ungrouped = [
            (shape.seq_q as u64).div_ceil(block_m),
            shape.heads_q as u64,
            shape.batch as u64,
        ];
        // Decoding-like GQA calls (fewer query rows than a block) give the
        // register-blocked block's rows to the KV head's query heads, so
        // they share each K/V tile instead of each reading it.
        let group = (shape.heads_q / shape.heads_kv) as u64;
        let group_rows = matches!(tiled, Some(TiledKernel::Blocked(_)))
            && group > 1
            && (shape.seq_q as u64) < block_m;
        let groups = if group_rows {
            [
                (shape.seq_q as u64 * group).div_ceil(block_m),
                shape.heads_kv as u64,
                shape.batch as u64,
            ]
        } else {
            ungrouped
        };
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, &n) in ["query row tiles", "heads_q", "batch"]
            .iter()
            .zip(&ungrouped)
        {
            if n > u64::from(limit) {
                return Err(Error::DispatchTooLarge {
                    what: "flash attention",
                    axis,
                    groups: n,
                    limit,
                });
            }
        }
        let tiling = AttentionTiling {
            head_dim,
            head_dim_v,
            block_n,
            workgroup_size,
            rows,
            unroll,
            subgroup_kv,
            storage,
            dropout: false,
        };
        let keys_per_dispatch =
            keys_within_loop_budget(info, &forward_specialization(tiled, tiling))?;
        Ok(ForwardPlan {
            tiling,
            tiled,
            workgroups: groups.map(|n| n as u32),
            ungrouped_workgroups: ungrouped.map(|n| n as u32),
            group_rows,
            keys_per_dispatch,
        })
    }
}

impl ForwardPlan {
    /// Query rows per invocation on CPU adapters, for the wider of the
    /// query/key and value head dims. Registers are memory on a CPU, so
    /// this bounds the per-invocation state (q and acc: rows * (head_dim +
    /// head_dim_v) floats) and the unrolled code: 16 rows at d=64 compile
    /// in ~25 s on a cold lavapipe and run ~15 % faster than 8 rows
    /// (BENCHMARKS.md); past 256 two rows keep the unrolled code of a
    /// 576-wide head near that of 4 rows at 256. It depends on the head
    /// dims only, so each pair compiles one pipeline whatever the sequence
    /// lengths.
    pub fn cpu_rows(widest_head_dim: u32) -> u32 {
        match widest_head_dim {
            0..=64 => 16,
            65..=128 => 8,
            129..=256 => 4,
            _ => 2,
        }
    }

    /// The kernel tier this plan runs.
    pub fn tier(&self) -> Tier {
        match self.tiled {
            Some(TiledKernel::Blocked(_)) => Tier::RegisterBlocked,
            Some(TiledKernel::Coop(_)) => Tier::CooperativeMatrix,
            None => tier_of(&self.tiling),
        }
    }
}

/// A forward kernel whose workgroup shares a block of rows (rather than
/// giving each invocation rows of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TiledKernel {
    Blocked(BlockedTiling),
    Coop(CoopTiling),
}

/// The unmasked forward kernel of a plan.
fn forward_specialization(tiled: Option<TiledKernel>, tiling: AttentionTiling) -> Specialization {
    match tiled {
        Some(TiledKernel::Blocked(b)) => Specialization::FlashBlocked(b),
        Some(TiledKernel::Coop(c)) => Specialization::FlashCoop(c),
        None => Specialization::FlashForward(tiling),
    }
}

/// Cooperative-matrix layouts, best first: (row tiles, key tiles).
const COOP_TILES: [(u32, u32); 7] = [(4, 4), (4, 2), (2, 4), (2, 2), (2, 1), (1, 2), (1, 1)];

/// The cooperative-matrix kernel's layout for this adapter and shape: the
/// largest matrices the adapter multiplies with the storage type's
/// operands into f32, and the first of [`COOP_TILES`] whose workgroup
/// memory and invocations fit; or why there is none.
fn coop_tiling(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
) -> std::result::Result<CoopTiling, String> {
    use wgpu::CooperativeScalarType as Scalar;
    let adapter = &info.adapter;
    // The emulation runs the same kernel with scalar products, anywhere.
    let emulated = info.cooperative_matrix_emulation;
    if !emulated
        && !matches!(
            adapter.backend,
            wgpu::Backend::Vulkan | wgpu::Backend::Metal
        )
    {
        return Err(format!(
            "wgpu offers cooperative matrices on Vulkan and Metal, not {:?}",
            adapter.backend
        ));
    }
    if !emulated
        && !info
            .features
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        return Err(
            "the device lacks wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX feature (requested with \
             AdapterOptions::cooperative_matrix or FLASH_ATTN_COOPERATIVE_MATRIX=1 where the \
             adapter has it)"
                .to_string(),
        );
    }
    if !emulated && !info.has_subgroups() {
        return Err("it needs the SUBGROUP feature".to_string());
    }
    let operand = match storage {
        DType::F16 if info.has_f16() => Scalar::F16,
        DType::F16 => return Err("f16 matrices need the SHADER_F16 feature".to_string()),
        DType::F32 => Scalar::F32,
        DType::BF16 => {
            return Err(
                "no configuration multiplies bf16 matrices (f16 or f32 storage does)".to_string(),
            );
        }
    };
    let offered = |size: u32| {
        info.cooperative_matrices.iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (size, size, size)
                && c.ab_type == operand
                && c.cr_type == Scalar::F32
        })
    };
    let sizes: Vec<u32> = [16, 8].into_iter().filter(|&size| offered(size)).collect();
    if sizes.is_empty() {
        let reported: Vec<String> = info
            .cooperative_matrices
            .iter()
            .map(|c| {
                format!(
                    "{}x{}x{} {:?}->{:?}",
                    c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type
                )
            })
            .collect();
        return Err(format!(
            "the adapter multiplies no 16x16 or 8x8 {operand:?} matrices into f32 (it reports: {})",
            reported.join(", ")
        ));
    }
    // The largest matrices that tile both head dims.
    let (head_dim, head_dim_v) = (shape.head_dim as u32, shape.head_dim_v as u32);
    let Some(size) = sizes
        .iter()
        .copied()
        .find(|&size| head_dim.is_multiple_of(size) && head_dim_v.is_multiple_of(size))
    else {
        let sizes: Vec<String> = sizes.iter().map(|s| format!("{s}x{s}")).collect();
        return Err(format!(
            "head dims {head_dim}/{head_dim_v} are not multiples of its {} matrices",
            sizes.join(" or ")
        ));
    };
    let subgroup = if emulated {
        CoopTiling::EMULATED_LANES
    } else {
        adapter.subgroup_min_size
    };
    if !subgroup.is_power_of_two() || subgroup < size {
        return Err(format!(
            "its softmax gives each {size}-row tile a subgroup of at least {size} lanes; the \
             adapter's smallest subgroup is {subgroup}"
        ));
    }
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let invocations = info.max_invocations();
    let layouts = COOP_TILES.map(|(row_tiles, key_tiles)| CoopTiling {
        head_dim,
        head_dim_v,
        size,
        row_tiles,
        key_tiles,
        workgroup_size: row_tiles * subgroup,
        storage,
        emulated,
        dropout: false,
    });
    // Each lane of a row takes whole four-key quads.
    let quads_split = |t: &CoopTiling| (t.block_n() / 4).is_multiple_of(t.lanes_per_row());
    let fits = |t: &CoopTiling| {
        quads_split(t) && t.workgroup_bytes() <= memory && t.workgroup_size <= invocations
    };
    if let Some(found) = layouts.iter().find(|t| fits(t)) {
        return Ok(*found);
    }
    let smallest = layouts
        .iter()
        .filter(|t| quads_split(t))
        .min_by_key(|t| t.workgroup_bytes())
        .copied()
        .unwrap_or(layouts[layouts.len() - 1]);
    Err(format!(
        "its smallest block ({} rows, {} keys, {} invocations) needs {} bytes of workgroup memory \
         at head dims {head_dim}/{head_dim_v}; the adapter allows {memory} bytes and {invocations} \
         invocations",
        smallest.block_m(),
        smallest.block_n(),
        smallest.workgroup_size,
        smallest.workgroup_bytes()
    ))
}

/// Register-blocked layouts, best first: (row lanes, key lanes). 128
/// invocations over 64 rows where the tiles fit, then smaller blocks for
/// wide heads and small workgroup memories.
const BLOCKED_LANES: [(u32, u32); 5] = [(16, 8), (8, 8), (8, 4), (4, 4), (2, 4)];
/// Output vec4s one invocation of the register-blocked kernel accumulates
/// (rows x columns) before it takes fewer rows: 64 floats, with the scores
/// and loads, about what a GPU keeps in registers at full occupancy.
const BLOCKED_ACCUMULATORS: u32 = 16;

/// Whether the register-blocked tier is the default: on hardware GPUs
/// (the CPU adapters run the per-row tiers, tuned for them).
fn blocked_by_default(info: &GpuInfo) -> bool {
    matches!(
        info.adapter.device_type,
        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
    )
}

/// The register-blocked kernel's layout for this adapter and shape: the
/// first of [`BLOCKED_LANES`] whose tiles fit the workgroup memory and
/// whose invocations the workgroup limit, with rows per invocation chosen
/// so the accumulators stay within [`BLOCKED_ACCUMULATORS`]; or why none fits.
fn blocked_tiling(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
) -> std::result::Result<BlockedTiling, String> {
    let (head_dim, head_dim_v) = (shape.head_dim as u32, shape.head_dim_v as u32);
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let invocations = info.max_invocations();
    let layouts = BLOCKED_LANES.map(|(row_lanes, key_lanes)| {
        let columns = (head_dim_v / 4).div_ceil(key_lanes);
        BlockedTiling {
            head_dim,
            head_dim_v,
            row_lanes,
            key_lanes,
            rows: (BLOCKED_ACCUMULATORS / columns).clamp(1, 4),
            storage,
            dropout: false,
            f16_products: false,
        }
    });
    if let Some(fits) = layouts
        .iter()
        .find(|t| t.workgroup_bytes() <= memory && t.workgroup_size() <= invocations)
    {
        return Ok(*fits);
    }
    let smallest = layouts[layouts.len() - 1];
    Err(format!(
        "its smallest block ({} rows, {} keys, {} invocations) needs {} bytes of workgroup memory \
         at head dims {head_dim}/{head_dim_v}; the adapter allows {memory} bytes and {invocations} invocations",
        smallest.block_m(),
        smallest.block_n(),
        smallest.workgroup_size(),
        smallest.workgroup_bytes()
    ))
}

/// `UnsupportedCombination` when a register-blocked layout comes with
/// another forced tier.
pub(crate) fn check_layout_tier(tier: Option<Tier>) -> Result<()> {
    if tier.is_some_and(|t| t != Tier::RegisterBlocked) {
        return Err(Error::UnsupportedCombination {
            what: "a register-blocked layout and a tier other than RegisterBlocked",
        });
    }
    Ok(())
}

/// `InvalidBlockedLayout` for a layout outside the register-blocked
/// kernels' range (lanes 1 to 256 each, rows 1 to 8).
pub(crate) fn check_blocked_layout(layout: BlockedLayout) -> Result<()> {
    let BlockedLayout {
        row_lanes,
        key_lanes,
        rows,
    } = layout;
    let lanes = 1..=BlockedLayout::MAX_LANES;
    if !lanes.contains(&row_lanes)
        || !lanes.contains(&key_lanes)
        || !(1..=BlockedLayout::MAX_ROWS).contains(&rows)
    {
        return Err(Error::InvalidBlockedLayout {
            row_lanes,
            key_lanes,
            rows,
        });
    }
    Ok(())
}

/// The register-blocked kernel with the caller's layout, after checking it
/// against the kernel's range and the adapter's limits.
fn blocked_tiling_of(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
    layout: BlockedLayout,
) -> Result<BlockedTiling> {
    check_blocked_layout(layout)?;
    let BlockedLayout {
        row_lanes,
        key_lanes,
        rows,
    } = layout;
    let tiling = BlockedTiling {
        head_dim: shape.head_dim as u32,
        head_dim_v: shape.head_dim_v as u32,
        row_lanes,
        key_lanes,
        rows,
        storage,
        dropout: false,
        f16_products: false,
    };
    info.check_workgroup(shape, tiling.workgroup_size(), tiling.workgroup_bytes())?;
    Ok(tiling)
}

/// How query rows map onto invocations.
struct RowTiling {
    workgroup_size: u32,
    rows: u32,
    unroll: bool,
    subgroup_kv: bool,
}

/// Why this adapter cannot run [`Tier::SubgroupBroadcast`], if it cannot.
fn subgroup_broadcast_missing(info: &GpuInfo) -> Option<String> {
    let adapter = &info.adapter;
    if adapter.backend == wgpu::Backend::Gl {
        return Some("wgpu's GL backend has no subgroup operations".to_string());
    }
    if !info.has_subgroups() {
        return Some("the device lacks the SUBGROUP feature".to_string());
    }
    let smallest = adapter.subgroup_min_size;
    if !smallest.is_power_of_two() || !SUBGROUP_SIZES.contains(&smallest) {
        return Some(format!(
            "it needs a smallest subgroup size that is a power of two in {SUBGROUP_SIZES:?}; the adapter reports {smallest}-{}",
            adapter.subgroup_max_size
        ));
    }
    None
}

/// The tier an attention tiling belongs to.
fn tier_of(tiling: &AttentionTiling) -> Tier {
    if tiling.subgroup_kv {
        Tier::SubgroupBroadcast
    } else {
        Tier::Portable
    }
}

/// Whether a call runs the subgroup tier: the forced tier, else the best
/// the adapter offers; forcing it where the adapter lacks it is
/// `TierUnavailable`. The forward and decode planners share this rule.
pub(crate) fn use_subgroup_tier(info: &GpuInfo, tier: Option<Tier>) -> Result<bool> {
    match (tier, subgroup_broadcast_missing(info)) {
        (Some(tier @ (Tier::RegisterBlocked | Tier::CooperativeMatrix)), _) => {
            Err(Error::TierUnavailable {
                tier,
                reason: match tier {
                    Tier::RegisterBlocked => {
                        "only the forward pass and the backward have a RegisterBlocked kernel"
                    }
                    _ => "only the forward pass has a CooperativeMatrix kernel",
                }
                .to_string(),
            })
        }
        (Some(Tier::SubgroupBroadcast), Some(reason)) => Err(Error::TierUnavailable {
            tier: Tier::SubgroupBroadcast,
            reason,
        }),
        (Some(Tier::Portable), _) | (None, Some(_)) => Ok(false),
        (Some(Tier::SubgroupBroadcast), None) | (None, None) => Ok(true),
    }
}

/// The largest power of two at most `limit`, capped at `cap`.
fn power_of_two_at_most(limit: u32, cap: u32) -> u32 {
    let limit = limit.clamp(1, cap);
    1 << (31 - limit.leading_zeros())
}

/// The tiling for this adapter and shape, honouring a forced tier.
fn row_tiling(info: &GpuInfo, shape: &AttentionShape, tier: Option<Tier>) -> Result<RowTiling> {
    let subgroup_kv = use_subgroup_tier(info, tier)?;
    let adapter = &info.adapter;
    let cpu = adapter.device_type == wgpu::DeviceType::Cpu;
    let rows = if cpu {
        ForwardPlan::cpu_rows(shape.head_dim.max(shape.head_dim_v) as u32)
    } else {
        1
    };
    if subgroup_kv {
        // The workgroup is one subgroup of the smallest size the adapter
        // may pick, whatever size it picks (1.7x on lavapipe, BENCHMARKS.md).
        // Broadcast lanes must be constants, so the loops are unrolled.
        return Ok(RowTiling {
            workgroup_size: adapter.subgroup_min_size,
            rows,
            unroll: true,
            subgroup_kv,
        });
    }
    // llvmpipe behind the GL backend compiled the CPU tiling (many rows,
    // unrolled) for head dims of 200 and more in over a minute: GL gets the
    // GPU tiling, unrolled over the head dim only (~10-20 s per head dim
    // cold), because llvmpipe's loop budget (Gpu::loop_budget) would cut
    // the head-dim loops after ~600 keys at d=256.
    let gl = adapter.backend == wgpu::Backend::Gl;
    if !cpu || gl {
        return Ok(RowTiling {
            workgroup_size: power_of_two_at_most(info.max_invocations(), GPU_WORKGROUP_SIZE),
            rows: 1,
            unroll: gl,
            subgroup_kv,
        });
    }
    Ok(RowTiling {
        workgroup_size: CPU_WORKGROUP_SIZE,
        rows,
        unroll: true,
        subgroup_kv,
    })
}

/// Query rows one subgroup-tier workgroup holds (per lane: that many
/// slices of q and of the accumulator); more rows take more workgroups.
const SUBGROUP_MAX_ROWS: u32 = 16;
/// Floats of query and output one lane may hold for decoding's lanes over
/// keys (8 rows at head dim 128, 4 at 256, 2 at 512): the default on CPU
/// adapters within it, refused past it (`Error::KeyLanesState`). lavapipe
/// compiled the 4096-float kernel (4 rows at d=512) in about 4 minutes, the
/// 2048-float Llama-405B one in seconds; MLA's latent widths (16 rows x
/// 1088) keep lanes over the head dim.
const KEY_LANES_MAX_STATE: u64 = 8 * 256;
/// At most this many invocations per workgroup on GPUs.
const GPU_MAX_WORKGROUP_SIZE: u32 = 64;
/// Fewest keys worth a split of their own when the split count is chosen.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// Workgroups a default split count aims for on a GPU (a few per compute
/// unit on large GPUs); CPU adapters aim for four per core.
const GPU_TARGET_WORKGROUPS: usize = 512;
/// Workgroup memory of the decode kernel beyond its K/V tiles: per-key
/// rows and (int8 caches) K/V scales, 64 keys at most, per-lane ranges and
/// two scalars.
const DECODE_EXTRA_BYTES: u64 = 64 * 4 + 64 * 8 + 64 * 8 + 16;

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
    /// Workgroups along the query rows of one (batch, KV head) pair.
    pub row_tiles: u32,
    /// Partial results merged at the end (`splits * segments`); 1 means
    /// the kernel wrote the output directly.
    pub slots: u32,
}

impl DecodePlan {
    /// The subgroup tier's lane layout; `None` for the portable tier.
    pub fn lanes(&self) -> Option<DecodeLanes> {
        match self.specialization {
            Specialization::Decode(tiling, _, lanes, _) if tiling.subgroup_kv => Some(lanes),
            _ => None,
        }
    }

    /// The kernel tier this plan runs.
    pub fn tier(&self) -> Tier {
        self.specialization
            .attention_tiling()
            .map_or(Tier::Portable, tier_of)
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
        let config = &options.config;
        let (head_dim, head_dim_v) = (cache.head_dim as u32, cache.head_dim_v as u32);
        let group = heads_q / cache.heads_kv;
        let rows = (seq_q * group) as u32;
        let adapter = &info.adapter;
        let cpu =
            adapter.device_type == wgpu::DeviceType::Cpu && adapter.backend != wgpu::Backend::Gl;
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
            let rows_per_workgroup = rows.next_power_of_two().min(SUBGROUP_MAX_ROWS);
            // CPU adapters take lanes over keys where each lane's state
            // (every row's query and output) stays small enough to compile
            // and cache well.
            let state = u64::from(rows_per_workgroup) * u64::from(head_dim + head_dim_v);
            let keys_fit = state <= KEY_LANES_MAX_STATE;
            let lanes = options.lanes.unwrap_or(if cpu && keys_fit {
                DecodeLanes::Keys
            } else {
                DecodeLanes::HeadDim
            });
            if lanes == DecodeLanes::Keys && !keys_fit {
                return Err(Error::KeyLanesState {
                    rows: rows_per_workgroup,
                    head_dim: cache.head_dim,
                    head_dim_v: cache.head_dim_v,
                    floats: state,
                    limit: KEY_LANES_MAX_STATE,
                });
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
                let size = rows
                    .next_power_of_two()
                    .clamp(4, GPU_MAX_WORKGROUP_SIZE.min(max_invocations));
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
        let longest = cache.longest;
        let splits = match options.kv_splits {
            Some(0) => return Err(Error::KvSplits(0)),
            Some(n) => n,
            None => {
                let base = row_tiles as usize * cache.heads_kv * cache.batch;
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
        let specialization = Specialization::Decode(tiling, cache.dtype, lanes, DecodeIo::F32);
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
        let x_groups = u64::from(row_tiles) * splits as u64;
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, n) in [
            ("row tiles x splits", x_groups),
            ("heads_kv", cache.heads_kv as u64),
            ("batch", cache.batch as u64),
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
        let segments = cache.segments as u32;
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

/// Bytes of one score row: keys padded to a multiple of 4 (vec4 slots).
fn row_bytes(seq_kv: usize) -> u64 {
    seq_kv.div_ceil(4) as u64 * 16
}

/// How a naive call runs: (batch, head) pairs are processed in chunks whose
/// score matrices fit one storage binding; the score buffer is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NaivePlan {
    /// (batch, head) pairs in the call.
    pub units: u32,
    /// Pairs per chunk; the score buffer holds this many matrices.
    pub units_per_chunk: u32,
    /// Bytes of one pair's score matrix.
    pub bytes_per_unit: u64,
    /// The flash kernel's tiling, which the matrix products share.
    tiling: AttentionTiling,
}

impl NaivePlan {
    /// The plan for f32 storage.
    pub fn new(info: &GpuInfo, shape: &AttentionShape) -> Result<Self> {
        Self::for_call(info, shape, DType::F32, None)
    }

    /// The plan for one call: storage type and, if forced, the tier of the
    /// matrix products.
    pub fn for_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
    ) -> Result<Self> {
        let tiling = ForwardPlan::for_call(info, shape, storage, tier)?.tiling;
        let limits = &info.limits;
        let (limit_name, limit) =
            if limits.max_storage_buffer_binding_size <= limits.max_buffer_size {
                (
                    "max_storage_buffer_binding_size",
                    limits.max_storage_buffer_binding_size,
                )
            } else {
                ("max_buffer_size", limits.max_buffer_size)
            };
        let bytes_per_unit = shape.seq_q as u64 * row_bytes(shape.seq_kv);
        let units = (shape.batch * shape.heads_q) as u64;
        if bytes_per_unit > limit {
            return Err(Error::ScoresTooLarge {
                bytes_per_head: bytes_per_unit,
                total_bytes: shape.score_matrix_bytes(),
                limit_name,
                limit,
            });
        }
        let units_per_chunk = (limit / bytes_per_unit)
            .min(units)
            .min(u64::from(limits.max_compute_workgroups_per_dimension));
        let plan = NaivePlan {
            units: units as u32,
            units_per_chunk: units_per_chunk as u32,
            bytes_per_unit,
            tiling,
        };
        for pass in NaivePass::ALL {
            check_loop_budget(info, &plan.specialization(pass), shape.seq_kv as u64)?;
        }
        Ok(plan)
    }

    /// Bytes of the score buffer a call allocates.
    pub fn score_buffer_bytes(&self) -> u64 {
        u64::from(self.units_per_chunk) * self.bytes_per_unit
    }

    /// Chunks a call runs in, `units / units_per_chunk` rounded up; each reuses the score buffer.
    pub fn chunks(&self) -> u32 {
        self.units.div_ceil(self.units_per_chunk)
    }

    pub(crate) fn specialization(&self, pass: NaivePass) -> Specialization {
        // Each product reads one operand's width: Q K^T the query/key head
        // dim, P V the value one.
        let tiling = self.tiling;
        let width = match pass {
            NaivePass::Scores | NaivePass::Softmax => tiling.head_dim,
            NaivePass::Values => tiling.head_dim_v,
        };
        Specialization::Naive {
            pass,
            tiling: AttentionTiling {
                head_dim: width,
                head_dim_v: width,
                ..tiling
            },
        }
    }

    /// Workgroups along x for `pass` (query rows).
    pub(crate) fn row_groups(&self, pass: NaivePass, seq_q: usize) -> u32 {
        let AttentionTiling {
            workgroup_size,
            rows,
            ..
        } = self.tiling;
        let per_group = match pass {
            NaivePass::Softmax => workgroup_size,
            NaivePass::Scores | NaivePass::Values => workgroup_size * rows,
        };
        (seq_q as u32).div_ceil(per_group)
    }
}

/// The planners over a table of adapter profiles, none of which needs to be
/// present: what each adapter would run, and the errors where it cannot.
#[cfg(test)]
pub(crate) mod profiles {
    use super::*;

    const KIB: u32 = 1024;

    /// An adapter profile: what its `GpuInfo` reports.
    pub(crate) struct Profile {
        pub name: &'static str,
        pub device_type: wgpu::DeviceType,
        pub backend: wgpu::Backend,
        /// Smallest and largest subgroup size; `None`: no SUBGROUP feature.
        pub subgroups: Option<(u32, u32)>,
        pub workgroup_bytes: u32,
        pub invocations: u32,
        /// `max_storage_buffers_per_shader_stage`.
        pub storage_buffers: u32,
        /// Cooperative-matrix configurations (size, operand, result) of a
        /// device that enabled the feature; empty: not enabled.
        pub coop: &'static [(u32, Scalar, Scalar)],
    }

    use wgpu::CooperativeScalarType as Scalar;

    /// What NVIDIA's Vulkan driver reports for subgroup-scope square
    /// matrices of the sizes wgpu takes (16x16x16, f16 operands).
    const NVIDIA_COOP: &[(u32, Scalar, Scalar)] = &[
        (16, Scalar::F16, Scalar::F16),
        (16, Scalar::F16, Scalar::F32),
    ];
    /// What wgpu's Metal backend reports (simdgroup matrices, Apple7+).
    const APPLE_COOP: &[(u32, Scalar, Scalar)] = &[
        (8, Scalar::F32, Scalar::F32),
        (8, Scalar::F16, Scalar::F16),
        (8, Scalar::F16, Scalar::F32),
    ];

    impl Profile {
        pub(crate) fn info(&self) -> GpuInfo {
            let (min, max) = self.subgroups.unwrap_or((4, 4));
            let mut features = wgpu::Features::SHADER_F16;
            if self.subgroups.is_some() {
                features |= wgpu::Features::SUBGROUP;
            }
            if !self.coop.is_empty() {
                features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            }
            let limits = wgpu::Limits {
                max_compute_workgroup_storage_size: self.workgroup_bytes,
                max_compute_invocations_per_workgroup: self.invocations,
                max_compute_workgroup_size_x: self.invocations,
                max_storage_buffers_per_shader_stage: self.storage_buffers,
                max_storage_buffer_binding_size: 128 << 20,
                max_buffer_size: 256 << 20,
                ..wgpu::Limits::default()
            };
            let llvmpipe = self.name.starts_with("llvmpipe");
            GpuInfo {
                adapter: wgpu::AdapterInfo {
                    name: self.name.to_string(),
                    vendor: 0,
                    device: 0,
                    device_type: self.device_type,
                    device_pci_bus_id: String::new(),
                    driver: if llvmpipe { "llvmpipe" } else { "" }.to_string(),
                    driver_info: String::new(),
                    backend: self.backend,
                    subgroup_min_size: min,
                    subgroup_max_size: max,
                    transient_saves_memory: None,
                    limit_bucket: None,
                },
                features,
                limits,
                host_threads: 2,
                cooperative_matrices: self
                    .coop
                    .iter()
                    .map(
                        |&(size, ab_type, cr_type)| wgpu::CooperativeMatrixProperties {
                            m_size: size,
                            n_size: size,
                            k_size: size,
                            ab_type,
                            cr_type,
                            saturating_accumulation: false,
                        },
                    )
                    .collect(),
                cooperative_matrix_emulation: false,
            }
        }
    }

    /// The adapters the crate is planned for, from the software adapters
    /// CI has to the hardware it has not.
    pub(crate) fn all() -> Vec<Profile> {
        use wgpu::{Backend, DeviceType};
        vec![
            Profile {
                name: "llvmpipe (LLVM 15.0.6, 256 bits)",
                device_type: DeviceType::Cpu,
                backend: Backend::Vulkan,
                subgroups: Some((8, 8)),
                workgroup_bytes: 32 * KIB,
                invocations: 1024,
                storage_buffers: 32,
                coop: &[],
            },
            Profile {
                name: "llvmpipe (LLVM 15.0.6, 256 bits) GL",
                device_type: DeviceType::Cpu,
                backend: Backend::Gl,
                subgroups: None,
                workgroup_bytes: 32 * KIB,
                invocations: 1024,
                storage_buffers: 16,
                coop: &[],
            },
            Profile {
                name: "NVIDIA H200",
                device_type: DeviceType::DiscreteGpu,
                backend: Backend::Vulkan,
                subgroups: Some((32, 32)),
                workgroup_bytes: 48 * KIB,
                invocations: 1024,
                storage_buffers: 1048576,
                coop: &[],
            },
            Profile {
                name: "AMD Radeon RX 7900 XTX",
                device_type: DeviceType::DiscreteGpu,
                backend: Backend::Vulkan,
                subgroups: Some((32, 64)),
                workgroup_bytes: 64 * KIB,
                invocations: 1024,
                storage_buffers: 1048576,
                coop: &[],
            },
            Profile {
                name: "Apple M2",
                device_type: DeviceType::IntegratedGpu,
                backend: Backend::Metal,
                subgroups: Some((32, 32)),
                workgroup_bytes: 32 * KIB,
                invocations: 1024,
                storage_buffers: 31,
                coop: &[],
            },
            Profile {
                name: "Intel Arc A770",
                device_type: DeviceType::DiscreteGpu,
                backend: Backend::Dx12,
                subgroups: Some((16, 32)),
                workgroup_bytes: 64 * KIB,
                invocations: 1024,
                storage_buffers: 64,
                coop: &[],
            },
            Profile {
                name: "Adreno mobile, WebGPU's minimum limits",
                device_type: DeviceType::IntegratedGpu,
                backend: Backend::Vulkan,
                subgroups: Some((64, 128)),
                workgroup_bytes: 16 * KIB,
                invocations: 256,
                storage_buffers: 8,
                coop: &[],
            },
            Profile {
                name: "WARP",
                device_type: DeviceType::Cpu,
                backend: Backend::Dx12,
                subgroups: Some((4, 128)),
                workgroup_bytes: 32 * KIB,
                invocations: 1024,
                storage_buffers: 64,
                coop: &[],
            },
            // The same GPUs on devices that enabled cooperative matrices.
            Profile {
                name: "NVIDIA H200 with cooperative matrices",
                device_type: DeviceType::DiscreteGpu,
                backend: Backend::Vulkan,
                subgroups: Some((32, 32)),
                workgroup_bytes: 48 * KIB,
                invocations: 1024,
                storage_buffers: 1048576,
                coop: NVIDIA_COOP,
            },
            Profile {
                name: "Apple M2 with cooperative matrices",
                device_type: DeviceType::IntegratedGpu,
                backend: Backend::Metal,
                subgroups: Some((32, 32)),
                workgroup_bytes: 32 * KIB,
                invocations: 1024,
                storage_buffers: 31,
                coop: APPLE_COOP,
            },
        ]
    }

    fn profile(name: &str) -> GpuInfo {
        all()
            .into_iter()
            .find(|p| p.name.starts_with(name))
            .expect("a profile of that name")
            .info()
    }

    /// (tier, workgroup size, rows per invocation, keys per tile, unrolled)
    type Tiling = (Tier, u32, u32, u32, bool);

    fn forward(info: &GpuInfo, head_dim: usize) -> Tiling {
        let shape = AttentionShape::self_attention(1, 1024, 8, head_dim);
        let plan = ForwardPlan::new(info, &shape).expect("plans");
        (
            plan.tier(),
            plan.workgroup_size(),
            plan.rows_per_invocation(),
            plan.block_n(),
            plan.unrolled(),
        )
    }

    /// Only calls with dropout compile its hashing (the DROPOUT variant),
    /// on every tier.
    #[test]
    fn dropout_is_a_variant_of_its_own() {
        let shape = AttentionShape::self_attention(1, 1024, 8, 64);
        for profile in profiles::all() {
            let info = profile.info();
            for storage in [DType::F32, DType::F16] {
                let Ok(plan) = ForwardPlan::for_call(&info, &shape, storage, None) else {
                    continue;
                };
                let has_dropout = |spec: Specialization| spec.variant_flags().contains(&"DROPOUT");
                assert!(!has_dropout(plan.specialization()), "{}", profile.name);
                assert!(!has_dropout(plan.masked_specialization()));
                assert!(!plan.applies_dropout());
                let dropout = plan.with_dropout();
                assert!(dropout.applies_dropout());
                assert!(has_dropout(dropout.specialization()), "{}", profile.name);
                assert!(has_dropout(dropout.masked_specialization()));
                // The same tier and tiles otherwise.
                assert_eq!(dropout.tier(), plan.tier());
                assert_eq!(dropout.workgroups(), plan.workgroups());
                assert_eq!(dropout.block_m(), plan.block_m());
            }
        }
    }

    #[test]
    fn forward_tiling_per_adapter() {
        use Tier::{Portable, RegisterBlocked, SubgroupBroadcast};
        // name, head dim, (tier, workgroup, rows, block_n, unrolled)
        let table: [(&str, usize, Tiling); 17] = [
            // lavapipe: one subgroup of 8, many rows each, unrolled.
            (
                "llvmpipe (LLVM 15.0.6, 256 bits)",
                64,
                (SubgroupBroadcast, 8, 16, 64, true),
            ),
            (
                "llvmpipe (LLVM 15.0.6, 256 bits)",
                256,
                (SubgroupBroadcast, 8, 4, 16, true),
            ),
            // GL: no subgroups; the GPU tiling, head-dim loops unrolled.
            (
                "llvmpipe (LLVM 15.0.6, 256 bits) GL",
                64,
                (Portable, 64, 1, 64, true),
            ),
            (
                "llvmpipe (LLVM 15.0.6, 256 bits) GL",
                256,
                (Portable, 64, 1, 16, true),
            ),
            // Hardware: register-blocked, 64 rows x 32 keys by 128
            // invocations where the workgroup memory holds them, smaller
            // blocks (and fewer rows per invocation) for wider heads.
            ("NVIDIA", 64, (RegisterBlocked, 128, 4, 32, false)),
            ("NVIDIA", 128, (RegisterBlocked, 64, 4, 32, false)),
            ("NVIDIA", 256, (RegisterBlocked, 32, 1, 16, false)),
            ("AMD", 128, (RegisterBlocked, 128, 4, 32, false)),
            ("AMD", 256, (RegisterBlocked, 64, 2, 32, false)),
            ("Apple", 64, (RegisterBlocked, 64, 4, 32, false)),
            ("Apple", 256, (RegisterBlocked, 32, 1, 16, false)),
            ("Intel", 64, (RegisterBlocked, 128, 4, 32, false)),
            ("Intel", 192, (RegisterBlocked, 128, 2, 32, false)),
            // 16 KiB of workgroup memory: small blocks, and at d=256 none
            // fits, so the subgroup tier (one row per lane).
            ("Adreno", 64, (RegisterBlocked, 32, 4, 16, false)),
            ("Adreno", 256, (SubgroupBroadcast, 64, 1, 8, true)),
            // WARP: a CPU adapter whose smallest subgroup is 4.
            ("WARP", 64, (SubgroupBroadcast, 4, 16, 64, true)),
            ("WARP", 128, (SubgroupBroadcast, 4, 8, 32, true)),
        ];
        for (name, head_dim, expected) in table {
            assert_eq!(
                forward(&profile(name), head_dim),
                expected,
                "{name} d={head_dim}"
            );
        }
    }

    #[test]
    fn portable_tier_everywhere_and_subgroups_only_where_offered() {
        let shape = AttentionShape::self_attention(1, 512, 4, 64);
        for p in all() {
            let info = p.info();
            let portable = ForwardPlan::for_call(&info, &shape, DType::F16, Some(Tier::Portable))
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(portable.tier(), Tier::Portable);
            assert_eq!(portable.storage(), DType::F16);
            assert!(portable.workgroup_size() <= p.invocations);
            let forced =
                ForwardPlan::for_call(&info, &shape, DType::F32, Some(Tier::SubgroupBroadcast));
            match (p.backend, p.subgroups) {
                (wgpu::Backend::Gl, _) | (_, None) => assert!(
                    matches!(forced, Err(Error::TierUnavailable { .. })),
                    "{}: {forced:?}",
                    p.name
                ),
                _ => assert_eq!(forced.expect("offered").tier(), Tier::SubgroupBroadcast),
            }
        }
        // Without the feature, or with a smallest size outside 4..=128, the
        // per-row default (a CPU adapter's) is the portable tier and
        // forcing says why.
        let mut info = profile("WARP");
        info.features.remove(wgpu::Features::SUBGROUP);
        assert_eq!(
            ForwardPlan::new(&info, &shape).unwrap().tier(),
            Tier::Portable
        );
        let mut info = profile("WARP");
        info.adapter.subgroup_min_size = 256;
        info.adapter.subgroup_max_size = 256;
        assert_eq!(
            ForwardPlan::new(&info, &shape).unwrap().tier(),
            Tier::Portable
        );
        match ForwardPlan::for_call(&info, &shape, DType::F32, Some(Tier::SubgroupBroadcast)) {
            Err(Error::TierUnavailable { reason, .. }) => {
                assert!(reason.contains("256"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_blocked_layouts_given_by_the_caller() {
        let shape = AttentionShape::self_attention(2, 1000, 8, 128);
        let layout = |row_lanes, key_lanes, rows| BlockedLayout {
            row_lanes,
            key_lanes,
            rows,
        };
        for p in all() {
            let info = p.info();
            let what = p.name;
            // A small layout fits every profile and is taken exactly, on
            // any storage, CPU adapters included.
            let plan =
                ForwardPlan::for_call_with_layout(&info, &shape, DType::F16, None, layout(4, 2, 3))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            let blocked = plan.blocked_tiling().expect("register-blocked");
            assert_eq!(
                (blocked.row_lanes, blocked.key_lanes, blocked.rows),
                (4, 2, 3),
                "{what}"
            );
            assert_eq!(plan.tier(), Tier::RegisterBlocked);
            assert_eq!(plan.workgroups(), [1000u32.div_ceil(12), 8, 2]);
            assert_eq!(plan.block_n(), 8);
            // Out of the kernel's range: the numbers come back.
            for bad in [
                layout(0, 8, 2),
                layout(8, 0, 2),
                layout(8, 8, 0),
                layout(8, 8, 9),
            ] {
                match ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, bad) {
                    Err(Error::InvalidBlockedLayout {
                        row_lanes,
                        key_lanes,
                        rows,
                    }) => assert_eq!(layout(row_lanes, key_lanes, rows), bad),
                    other => panic!("{what} {bad}: {other:?}"),
                }
            }
            // Past the adapter's invocations or workgroup memory.
            let wide = layout(256, 256, 1);
            assert!(matches!(
                ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, wide),
                Err(Error::WorkgroupInvocations { needed: 65536, limit }) if limit == p.invocations
            ));
            let tall = layout(128, 1, 8);
            let needed = BlockedTiling {
                head_dim: 128,
                head_dim_v: 128,
                row_lanes: 128,
                key_lanes: 1,
                rows: 8,
                storage: DType::F32,
                f16_products: false,
                dropout: false,
            }
            .workgroup_bytes();
            match ForwardPlan::for_call_with_layout(&info, &shape, DType::F32, None, tall) {
                Err(Error::WorkgroupMemory {
                    needed: n, limit, ..
                }) => {
                    assert_eq!((n, limit), (needed, p.workgroup_bytes), "{what}");
                }
                Err(Error::WorkgroupInvocations { .. }) => assert!(p.invocations < 128, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
            // Only the register-blocked tier has layouts.
            for tier in [
                Tier::Portable,
                Tier::SubgroupBroadcast,
                Tier::CooperativeMatrix,
            ] {
                assert!(matches!(
                    ForwardPlan::for_call_with_layout(
                        &info,
                        &shape,
                        DType::F32,
                        Some(tier),
                        layout(4, 2, 3)
                    ),
                    Err(Error::UnsupportedCombination { .. })
                ));
            }
        }
    }

    #[test]
    fn register_blocked_where_it_fits_and_by_default_on_hardware_gpus() {
        for p in all() {
            let info = p.info();
            let gpu = matches!(
                p.device_type,
                wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
            );
            for (head_dim, head_dim_v) in [(64, 64), (128, 128), (192, 128), (256, 256)] {
                let shape = AttentionShape::self_attention(1, 1000, 4, head_dim)
                    .with_head_dim_v(head_dim_v);
                let what = format!("{} d={head_dim}/{head_dim_v}", p.name);
                let limit = u64::from(p.workgroup_bytes);
                let default = ForwardPlan::new(&info, &shape).unwrap();
                match ForwardPlan::for_call(&info, &shape, DType::BF16, Some(Tier::RegisterBlocked))
                {
                    Ok(plan) => {
                        let blocked = plan.blocked_tiling().expect("a blocked layout");
                        assert_eq!(plan.tier(), Tier::RegisterBlocked, "{what}");
                        assert!(plan.workgroup_bytes() <= limit, "{what}");
                        assert!(plan.workgroup_size() <= p.invocations, "{what}");
                        assert_eq!(plan.block_m(), blocked.row_lanes * blocked.rows);
                        assert_eq!(plan.block_n(), 4 * blocked.key_lanes);
                        assert!(blocked.rows * blocked.columns() <= 16 || blocked.rows == 1);
                        assert_eq!(plan.workgroups()[0], 1000u32.div_ceil(plan.block_m()));
                        assert!(matches!(
                            plan.masked_specialization(),
                            Specialization::FlashBlockedMasked(t) if t == blocked
                        ));
                        // The default takes it exactly on hardware GPUs
                        // (unless their matrix units take the call).
                        let coop = default.tier() == Tier::CooperativeMatrix;
                        assert_eq!(
                            default.tier() == Tier::RegisterBlocked,
                            gpu && !coop,
                            "{what}"
                        );
                    }
                    Err(Error::TierUnavailable { reason, .. }) => {
                        assert!(reason.contains(&limit.to_string()), "{what}: {reason}");
                        assert_ne!(default.tier(), Tier::RegisterBlocked, "{what}");
                    }
                    Err(other) => panic!("{what}: {other}"),
                }
            }
        }
        // The naive baseline keeps the per-row tiling; decoding has no
        // register-blocked kernel.
        let info = profile("NVIDIA");
        let shape = AttentionShape::self_attention(1, 256, 4, 64);
        let naive =
            NaivePlan::for_call(&info, &shape, DType::F32, Some(Tier::RegisterBlocked)).unwrap();
        assert!(matches!(
            naive.specialization(NaivePass::Scores),
            Specialization::Naive { .. }
        ));
        // Decoding has neither block-tiled kernel.
        let cache = CacheShape {
            batch: 1,
            heads_kv: 1,
            head_dim: 64,
            head_dim_v: 64,
            longest: 100,
            segments: 1,
            dtype: crate::KvDType::F16,
        };
        for tier in [Tier::RegisterBlocked, Tier::CooperativeMatrix] {
            let options = DecodeOptions::new(&crate::AttentionConfig::new().tier(tier));
            let info = profile("NVIDIA H200 with");
            match DecodePlan::for_call(&info, &cache, 1, 4, &options) {
                Err(Error::TierUnavailable { tier: refused, .. }) => assert_eq!(refused, tier),
                other => panic!("decode with {tier:?}: {other:?}"),
            }
        }
    }

    /// (tier, matrix size, block rows, block keys, invocations) of a forced
    /// or default plan, or the reason it is unavailable.
    fn coop(
        name: &str,
        head_dim: usize,
        storage: DType,
        tier: Option<Tier>,
    ) -> std::result::Result<(Tier, u32, u32, u32, u32), String> {
        let shape = AttentionShape::self_attention(1, 1000, 4, head_dim);
        match ForwardPlan::for_call(&profile(name), &shape, storage, tier) {
            Ok(plan) => Ok((
                plan.tier(),
                plan.coop_tiling().map_or(0, |c| c.size),
                plan.block_m(),
                plan.block_n(),
                plan.workgroup_size(),
            )),
            Err(Error::TierUnavailable { reason, .. }) => Err(reason),
            Err(other) => panic!("{name}: {other}"),
        }
    }

    #[test]
    fn cooperative_matrices_where_the_device_multiplies_the_storage_type() {
        use Tier::{CooperativeMatrix, RegisterBlocked};
        let nvidia = "NVIDIA H200 with";
        let apple = "Apple M2 with";
        // NVIDIA: 16x16 f16 matrices into f32; 32 x 32 blocks fit 48 KiB
        // at d=128 (O accumulates as f32 in workgroup memory).
        assert_eq!(
            coop(nvidia, 128, DType::F16, None),
            Ok((CooperativeMatrix, 16, 32, 32, 64))
        );
        assert_eq!(
            coop(nvidia, 64, DType::F16, None),
            Ok((CooperativeMatrix, 16, 64, 32, 128))
        );
        // No f32 or bf16 matrices there: the default is register-blocked,
        // and forcing says why.
        assert_eq!(
            coop(nvidia, 128, DType::F32, None).unwrap().0,
            RegisterBlocked
        );
        let why = coop(nvidia, 128, DType::F32, Some(CooperativeMatrix)).unwrap_err();
        assert!(
            why.contains("F32") && why.contains("16x16x16 F16->F32"),
            "{why}"
        );
        let why = coop(nvidia, 128, DType::BF16, Some(CooperativeMatrix)).unwrap_err();
        assert!(why.contains("bf16"), "{why}");
        // Head dims that 16x16 matrices do not tile.
        let why = coop(nvidia, 72, DType::F16, Some(CooperativeMatrix)).unwrap_err();
        assert!(why.contains("72/72") && why.contains("16x16"), "{why}");
        assert_eq!(
            coop(nvidia, 72, DType::F16, None).unwrap().0,
            RegisterBlocked
        );
        // Apple: 8x8 matrices, f32 ones too; four lanes per row.
        assert_eq!(
            coop(apple, 128, DType::F32, None),
            Ok((CooperativeMatrix, 8, 16, 16, 64))
        );
        assert_eq!(
            coop(apple, 72, DType::F16, None).unwrap().0,
            CooperativeMatrix
        );
        // Without the feature (the default device), or on GL and DX12.
        let why = coop("NVIDIA H200", 128, DType::F16, Some(CooperativeMatrix)).unwrap_err();
        assert!(why.contains("EXPERIMENTAL_COOPERATIVE_MATRIX"), "{why}");
        let why = coop("Intel", 128, DType::F16, Some(CooperativeMatrix)).unwrap_err();
        assert!(why.contains("Dx12"), "{why}");
        // Every layout chosen fits and splits a row's quads evenly.
        for p in all().iter().filter(|p| !p.coop.is_empty()) {
            for head_dim in (16..=256).step_by(16) {
                for storage in [DType::F16, DType::F32] {
                    let shape = AttentionShape::self_attention(1, 500, 4, head_dim);
                    let info = p.info();
                    let Ok(plan) =
                        ForwardPlan::for_call(&info, &shape, storage, Some(CooperativeMatrix))
                    else {
                        continue;
                    };
                    let c = plan.coop_tiling().unwrap();
                    assert!(c.workgroup_bytes() <= u64::from(p.workgroup_bytes));
                    assert_eq!(c.workgroup_size % c.block_m(), 0);
                    assert_eq!((c.block_n() / 4) % c.lanes_per_row(), 0);
                    assert_eq!(
                        plan.masked_specialization(),
                        Specialization::FlashCoopMasked(c)
                    );
                }
            }
        }
    }

    #[test]
    fn decoding_like_gqa_calls_group_a_kv_heads_rows() {
        let info = profile("NVIDIA H200");
        let plan_of = |seq_q: usize, heads_q: usize, heads_kv: usize, tier: Option<Tier>| {
            let shape = AttentionShape {
                batch: 2,
                seq_q,
                seq_kv: 4096,
                heads_q,
                heads_kv,
                head_dim: 128,
                head_dim_v: 128,
            };
            ForwardPlan::for_call(&info, &shape, DType::F32, tier).unwrap()
        };
        // One token of Llama-405B's heads: 8 KV heads' workgroups, each a
        // block of its 8 query heads (32 rows: 4 queries x 8 heads).
        let step = plan_of(1, 64, 8, None);
        assert!(step.groups_heads());
        assert_eq!(step.workgroups(), [1, 8, 2]);
        assert_eq!(step.without_grouped_rows().workgroups(), [1, 64, 2]);
        assert!(!step.without_grouped_rows().groups_heads());
        // Five queries x 8 heads: 40 pairs, two blocks.
        assert_eq!(plan_of(5, 64, 8, None).workgroups(), [2, 8, 2]);
        // Not for full blocks, plain multi-head calls or per-row tiers.
        assert!(!plan_of(32, 64, 8, None).groups_heads());
        assert!(!plan_of(1, 8, 8, None).groups_heads());
        assert!(!plan_of(1, 64, 8, Some(Tier::SubgroupBroadcast)).groups_heads());
        assert!(!plan_of(1, 64, 8, Some(Tier::Portable)).groups_heads());
    }

    #[test]
    fn register_blocked_keys_per_dispatch_respect_the_loop_cap() {
        let info = profile("llvmpipe (LLVM");
        let long = AttentionShape {
            seq_q: 64,
            ..AttentionShape::self_attention(1, 1 << 20, 1, 128)
        };
        let plan =
            ForwardPlan::for_call(&info, &long, DType::F32, Some(Tier::RegisterBlocked)).unwrap();
        let keys = plan.keys_per_dispatch().expect("llvmpipe caps loops");
        assert!(plan.loop_trips(keys) <= 65_535);
        assert!(plan.loop_trips(keys + 1) > 65_535);
        assert!(plan.key_chunks(1 << 20) >= 2);
    }

    #[test]
    fn wide_and_uneven_head_dims_plan_where_their_tiles_fit() {
        // DeepSeek MLA's 576/512: the smallest tile (4 keys) needs 17 KiB.
        let mla = AttentionShape::self_attention(1, 1024, 16, 576).with_head_dim_v(512);
        assert!(matches!(
            ForwardPlan::new(&profile("Adreno"), &mla),
            Err(Error::WorkgroupMemory {
                head_dim: 576,
                head_dim_v: 512,
                needed: 17408,
                limit: 16384
            })
        ));
        let cpu = ForwardPlan::new(&profile("llvmpipe (LLVM"), &mla).unwrap();
        assert_eq!(cpu.rows_per_invocation(), 2, "the widest heads hold 2 rows");
        let gpu = ForwardPlan::new(&profile("NVIDIA"), &mla).unwrap();
        assert!(gpu.workgroup_bytes() <= u64::from(48 * KIB));
        // Values of another width size the tile from both.
        let prefill = AttentionShape::self_attention(1, 1024, 16, 192).with_head_dim_v(128);
        let plan = ForwardPlan::for_call(
            &profile("Adreno"),
            &prefill,
            DType::F32,
            Some(Tier::Portable),
        )
        .unwrap();
        assert_eq!(
            plan.block_n(),
            8,
            "8 keys of 192 + 128 f32s fit 16 KiB, 16 do not"
        );
    }

    #[test]
    fn limits_too_small_are_typed_errors_with_the_numbers() {
        let shape = AttentionShape::self_attention(1, 512, 4, 256);
        let mut info = profile("Adreno");
        info.limits.max_compute_workgroup_storage_size = 4 * KIB;
        assert!(matches!(
            ForwardPlan::new(&info, &shape),
            Err(Error::WorkgroupMemory {
                head_dim: 256,
                head_dim_v: 256,
                needed: 8192,
                limit: 4096
            })
        ));
        // Few invocations: the portable workgroup shrinks to fit.
        let mut info = profile("Adreno");
        info.features.remove(wgpu::Features::SUBGROUP);
        info.limits.max_compute_invocations_per_workgroup = 48;
        let plan = ForwardPlan::new(&info, &shape).unwrap();
        assert_eq!(plan.workgroup_size(), 32);
        // The subgroup tier needs a whole subgroup per workgroup.
        let mut info = profile("Adreno");
        info.limits.max_compute_invocations_per_workgroup = 32;
        assert!(matches!(
            ForwardPlan::new(&info, &shape),
            Err(Error::WorkgroupInvocations {
                needed: 64,
                limit: 32
            })
        ));
        // Too many query tiles for one dispatch dimension.
        let mut info = profile("NVIDIA");
        info.limits.max_compute_workgroups_per_dimension = 100;
        let long = AttentionShape::self_attention(1, 64 * 101, 1, 64);
        assert!(matches!(
            ForwardPlan::new(&info, &long),
            Err(Error::DispatchTooLarge {
                groups: 101,
                limit: 100,
                ..
            })
        ));
    }

    #[test]
    fn only_llvmpipe_caps_loops() {
        let long = AttentionShape {
            seq_q: 64,
            ..AttentionShape::self_attention(1, 1 << 20, 1, 64)
        };
        for p in all() {
            let info = p.info();
            let plan = ForwardPlan::new(&info, &long).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            let spec = plan.specialization();
            if p.name.starts_with("llvmpipe") {
                // A million keys run in chunks that each fit the budget.
                assert_eq!(info.loop_budget(), Some(65_535));
                let keys = plan
                    .keys_per_dispatch()
                    .expect("a capped adapter limits keys");
                assert!(spec.loop_trips(keys).unwrap() <= 65_535, "{}", p.name);
                assert!(spec.loop_trips(keys + 1).unwrap() > 65_535, "{}", p.name);
                assert_eq!(plan.key_chunks(1 << 20), (1u64 << 20).div_ceil(keys));
                assert!(plan.key_chunks(1 << 20) >= 2);
            } else {
                assert_eq!(info.loop_budget(), None);
                assert_eq!(plan.keys_per_dispatch(), None, "{}", p.name);
                assert_eq!(plan.key_chunks(1 << 20), 1);
            }
        }
    }

    #[test]
    fn decode_splits_fill_the_adapter_and_respect_the_loop_cap() {
        // Llama-3.1-405B heads, one token, 32K cache.
        let cache = CacheShape {
            batch: 1,
            heads_kv: 8,
            head_dim: 128,
            head_dim_v: 128,
            longest: 32 * 1024,
            segments: 2,
            dtype: crate::KvDType::F32,
        };
        let options = DecodeOptions::default();
        for p in all() {
            let info = p.info();
            let plan = DecodePlan::for_call(&info, &cache, 1, 64, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(plan.segments, 2);
            assert_eq!(plan.slots, plan.splits * 2);
            assert!(u64::from(plan.splits) * u64::from(plan.split_keys) >= 32 * 1024);
            if let Some(budget) = info.loop_budget() {
                assert!(plan.loop_trips() <= budget, "{}: {plan:?}", p.name);
            }
            let workgroups = plan.splits as usize * plan.row_tiles as usize * 8;
            if p.device_type == wgpu::DeviceType::Cpu {
                // 4 workgroups per host thread, unless the loop cap asks
                // for more.
                assert!(workgroups >= 8, "{}: {plan:?}", p.name);
            } else {
                // ~512 workgroups on a GPU, at least 256 keys each.
                assert!((256..=1024).contains(&workgroups), "{}: {plan:?}", p.name);
                assert!(plan.split_keys >= 256, "{}: {plan:?}", p.name);
            }
        }
        let forced = DecodeOptions::default().kv_splits(0);
        assert!(matches!(
            DecodePlan::for_call(&profile("NVIDIA"), &cache, 1, 64, &forced),
            Err(Error::KvSplits(0))
        ));
    }

    #[test]
    fn decode_lanes_default_to_keys_on_cpu_adapters_and_refuse_the_portable_tier() {
        let cache = |head_dim, head_dim_v, heads_kv| CacheShape {
            batch: 1,
            heads_kv,
            head_dim,
            head_dim_v,
            longest: 4096,
            segments: 1,
            dtype: crate::KvDType::F16,
        };
        let llama = cache(128, 128, 8);
        let mla = cache(576, 512, 1);
        let options = DecodeOptions::default();
        for p in all() {
            let info = p.info();
            let plan = |cache: &CacheShape, heads_q, options: &DecodeOptions| {
                DecodePlan::for_call(&info, cache, 1, heads_q, options)
            };
            let lanes = plan(&llama, 64, &options).unwrap().lanes();
            let subgroups = subgroup_broadcast_missing(&info).is_none();
            let want = match (subgroups, p.device_type) {
                (false, _) => None,
                (true, wgpu::DeviceType::Cpu) => Some(DecodeLanes::Keys),
                (true, _) => Some(DecodeLanes::HeadDim),
            };
            assert_eq!(lanes, want, "{}", p.name);
            // MLA's 16 rows x 1088 floats per lane keep the head-dim
            // layout, and forcing lanes over keys there is refused.
            let mla_lanes = plan(&mla, 128, &options).unwrap().lanes();
            assert_eq!(mla_lanes, want.map(|_| DecodeLanes::HeadDim), "{}", p.name);
            if subgroups {
                let forced = plan(&mla, 128, &options.clone().lanes(DecodeLanes::Keys));
                assert!(
                    matches!(
                        forced,
                        Err(Error::KeyLanesState {
                            rows: 16,
                            floats: 17408,
                            ..
                        })
                    ),
                    "{}: {forced:?}",
                    p.name
                );
            }
            for forced in [DecodeLanes::Keys, DecodeLanes::HeadDim] {
                let got = plan(&llama, 64, &options.clone().lanes(forced));
                if subgroups {
                    assert_eq!(got.unwrap().lanes(), Some(forced), "{}", p.name);
                } else {
                    assert!(
                        matches!(
                            got,
                            Err(Error::TierUnavailable {
                                tier: Tier::SubgroupBroadcast,
                                ..
                            })
                        ),
                        "{}: {got:?}",
                        p.name
                    );
                }
                let mut portable = options.clone().lanes(forced);
                portable.config.tier = Some(Tier::Portable);
                assert!(
                    matches!(
                        plan(&llama, 64, &portable),
                        Err(Error::UnsupportedCombination { .. })
                    ),
                    "{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn naive_chunks_fit_one_binding() {
        let shape = AttentionShape::self_attention(2, 4096, 8, 64);
        let info = profile("NVIDIA");
        let plan = NaivePlan::new(&info, &shape).unwrap();
        assert!(plan.score_buffer_bytes() <= info.limits.max_storage_buffer_binding_size);
        assert_eq!(plan.units, 16);
        assert!(plan.chunks() >= 2);
        let huge = AttentionShape::self_attention(1, 8192, 1, 64);
        assert!(matches!(
            NaivePlan::new(&info, &huge),
            Err(Error::ScoresTooLarge { .. })
        ));
    }
}
