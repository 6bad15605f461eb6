//! The forward planner: tier, tiling and workgroups of a forward call.

use super::{
    CPU_WORKGROUP_SIZE, GPU_WORKGROUP_SIZE, check_blocked_layout, check_layout_tier,
    keys_within_loop_budget, power_of_two_at_most, tier_of, use_subgroup_tier,
};
use crate::config::{AttentionShape, BlockedLayout, CoopLayout, Tier};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::shaders::{
    AttentionTiling, BlockedTiling, CoopTiling, MIN_BLOCK_N, Specialization, forward_tile_bytes,
    largest_block_n,
};
use crate::tensor::DType;

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

    /// Workgroups along (query tiles, batch, query heads); along (tiles of
    /// (query row, head) pairs, batch, KV heads) when
    /// [`ForwardPlan::groups_heads`]. A padded or packed batch dispatches
    /// one unit per sequence (or key chunk) along y.
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
    /// Bytes of workgroup memory the forward kernel declares (none for the
    /// subgroup tier, whose lanes hand K and V over by broadcasts).
    pub fn workgroup_bytes(&self) -> u64 {
        match self.tiled {
            Some(TiledKernel::Blocked(b)) => b.workgroup_bytes(),
            Some(TiledKernel::Coop(c)) => c.workgroup_bytes(),
            None if self.tiling.subgroup_kv => 0,
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
    /// The kernel's label in the crate's pipeline cache and in wgpu's
    /// error messages (kernel, tiling and variants).
    pub fn kernel_label(&self) -> String {
        self.specialization().label()
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

    /// The plan without f16 products (the same plan where it had none).
    /// The planner's layouts fit the workgroup memory either way; a
    /// caller's layout ([`ForwardPlan::for_call_with_layout`]) planned with
    /// f16 products was checked with f16 tiles only, and may not.
    pub fn without_f16_products(mut self) -> Self {
        if let Some(TiledKernel::Blocked(blocked)) = &mut self.tiled {
            blocked.f16_products = false;
        }
        self
    }

    /// Whether the plan's kernel computes the forward's products from f16
    /// operands ([`AttentionConfig::f16_products`]; the planner's default
    /// on NVIDIA GPUs for f16 storage, see [`ForwardPlan::for_call`]).
    ///
    /// [`AttentionConfig::f16_products`]: crate::AttentionConfig::f16_products
    pub fn f16_products(&self) -> bool {
        matches!(self.tiled, Some(TiledKernel::Blocked(blocked)) if blocked.f16_products)
    }

    /// Whether the plan's kernel rounds the weights to f16 before `P V`:
    /// f16 matrices (the cooperative-matrix tier on f16 storage) and f16
    /// products. Its outputs then keep the bound docs/semantics.md states
    /// for them (2^-11 of the row's largest |v| beyond their rounding).
    pub fn rounds_weights_to_f16(&self) -> bool {
        match self.tiled {
            Some(TiledKernel::Blocked(blocked)) => blocked.f16_products,
            Some(TiledKernel::Coop(_)) => self.tiling.storage == DType::F16,
            None => false,
        }
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
    /// forced, the kernel tier. Register-blocked plans of f16 storage take
    /// f16 products ([`ForwardPlan::f16_products`]) where they measured
    /// faster: NVIDIA GPUs with `SHADER_F16`.
    pub fn for_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
    ) -> Result<Self> {
        Self::plan_call(info, shape, storage, tier, None, None)
    }

    /// The plan a forward call with `config` runs (its forced tier, its
    /// register-blocked layout or cooperative-matrix block, f16 products
    /// and dropout) on tensors
    /// stored as `storage`: what [`crate::Gpu::forward`] plans, for
    /// callers that want to know ahead (the tier, the workgroup, whether
    /// f16 products round the weights).
    pub fn for_config(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        config: &crate::AttentionConfig,
    ) -> Result<Self> {
        let plan = match (config.blocked_layout, config.coop_layout) {
            (Some(_), Some(_)) => {
                return Err(Error::UnsupportedCombination {
                    what: "a register-blocked layout and a cooperative-matrix layout",
                });
            }
            (None, Some(block)) => {
                if config.tier.is_some_and(|t| t != Tier::CooperativeMatrix) {
                    return Err(Error::UnsupportedCombination {
                        what: "a cooperative-matrix layout and a tier other than CooperativeMatrix",
                    });
                }
                let tier = Some(Tier::CooperativeMatrix);
                Self::plan_call(info, shape, storage, tier, None, Some(block))?
            }
            (Some(layout), None) => Self::plan_with_layout(
                info,
                shape,
                storage,
                config.tier,
                layout,
                config.f16_products,
            )?,
            // f16 products are a variant of the register-blocked tier.
            (None, None) if config.f16_products == Some(true) => {
                let tier = config.tier.unwrap_or(Tier::RegisterBlocked);
                Self::for_call(info, shape, storage, Some(tier))?
            }
            (None, None) => Self::for_call(info, shape, storage, config.tier)?,
        };
        // (None: the plan's own choice.)
        let plan = match config.f16_products {
            Some(true) => plan.with_f16_products(info)?,
            Some(false) => plan.without_f16_products(),
            None => plan,
        };
        Ok(if config.active_dropout().is_some() {
            plan.with_dropout()
        } else {
            plan
        })
    }

    /// [`ForwardPlan::for_call`] on the register-blocked tier with its
    /// workgroup layout given ([`AttentionConfig::blocked_layout`]): a
    /// layout outside the kernel's range, or one the adapter's invocations
    /// or workgroup memory cannot hold, is a typed error with the numbers,
    /// as is another forced tier. Where the plan takes f16 products (f16
    /// storage on NVIDIA), the layout is held to the bytes of its f16
    /// tiles, so layouts too large in f32 may run.
    ///
    /// [`AttentionConfig::blocked_layout`]: crate::AttentionConfig::blocked_layout
    pub fn for_call_with_layout(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: BlockedLayout,
    ) -> Result<Self> {
        Self::plan_with_layout(info, shape, storage, tier, layout, None)
    }

    /// A caller's layout planned with the caller's f16 products setting
    /// (`None`: the planner's), which sets the tile bytes it must fit.
    fn plan_with_layout(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: BlockedLayout,
        products: Option<bool>,
    ) -> Result<Self> {
        check_layout_tier(tier)?;
        let f16_tiles = takes_f16_tiles(info, storage, products);
        Self::plan_call(
            info,
            shape,
            storage,
            tier,
            Some(CallerLayout { layout, f16_tiles }),
            None,
        )
    }

    /// The plan of a call on `tier` (`None`: the planner's choice), with a
    /// caller's register-blocked layout or cooperative-matrix block (the
    /// latter only with the tier forced to `CooperativeMatrix`).
    fn plan_call(
        info: &GpuInfo,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
        layout: Option<CallerLayout>,
        coop_layout: Option<CoopLayout>,
    ) -> Result<Self> {
        shape.validate()?;
        let limits = &info.limits;
        let (head_dim, head_dim_v) = (shape.head_dim as u32, shape.head_dim_v as u32);
        let fitting_block_n = largest_block_n(
            head_dim,
            head_dim_v,
            u64::from(limits.max_compute_workgroup_storage_size),
        );
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
                    coop_tiling(info, shape, storage, coop_layout)
                        .map_err(|reason| unavailable(Tier::CooperativeMatrix, reason))?,
                )),
                Some(Tier::RegisterBlocked) => Some(TiledKernel::Blocked(
                    blocked_tiling(info, shape, storage)
                        .map_err(|reason| unavailable(Tier::RegisterBlocked, reason))?,
                )),
                Some(Tier::Portable | Tier::SubgroupBroadcast) => None,
                // The matrix units where the device offers them and the
                // kernel has passed its tests on them, else register
                // blocking on hardware GPUs, else a per-row tier.
                None => {
                    let coop = coop_tiling(info, shape, storage, None)
                        .ok()
                        .filter(|_| coop_by_default(info));
                    match coop {
                        Some(coop) => Some(TiledKernel::Coop(coop)),
                        None if blocked_by_default(info) => blocked_tiling(info, shape, storage)
                            .ok()
                            .map(TiledKernel::Blocked),
                        None => None,
                    }
                }
            },
        };
        // The subgroup variant of the per-row kernel stages nothing in
        // workgroup memory (its tile length only sets the granularity of
        // its key loop and of the masks' tile states), so it runs where no
        // K/V tile fits; every other plan needs the per-row tile, which
        // the naive baseline shares.
        let block_n = match fitting_block_n {
            Some(block_n) => block_n,
            None if tiled.is_none() && subgroup_kv => MIN_BLOCK_N,
            None => {
                return Err(Error::WorkgroupMemory {
                    head_dim: shape.head_dim,
                    head_dim_v: shape.head_dim_v,
                    needed: forward_tile_bytes(head_dim, head_dim_v, MIN_BLOCK_N),
                    limit: limits.max_compute_workgroup_storage_size,
                });
            }
        };
        // f16 products where they measured faster (f16_products_by_default).
        // The layout was chosen at f32 tile sizes, so a caller who turns
        // them off (`without_f16_products`) still fits the workgroup memory.
        let tiled = match tiled {
            Some(TiledKernel::Blocked(mut blocked))
                if storage == DType::F16 && f16_products_by_default(info) =>
            {
                blocked.f16_products = true;
                Some(TiledKernel::Blocked(blocked))
            }
            other => other,
        };
        let block_m = u64::from(match tiled {
            Some(TiledKernel::Blocked(b)) => b.block_m(),
            Some(TiledKernel::Coop(c)) => c.block_m(),
            None => workgroup_size * rows,
        });
        // Heads slowest: every head has the same work, so contiguous ranges
        // of the grid hold equal work whatever the sequences' lengths
        // (llvmpipe hands each thread one such range; with the batch
        // slowest, a packed batch of 2048 + 256 causal tokens ran on one
        // thread, 1.6-1.9x slower on two cores). FlashAttention-2's grid
        // is ordered the same way. Along x the kernels take row tiles from
        // both ends in turn (`paired_block`), which does the same for the
        // rows of one causal head.
        let ungrouped = [
            (shape.seq_q as u64).div_ceil(block_m),
            shape.batch as u64,
            shape.heads_q as u64,
        ];
        // Decoding-like GQA calls (fewer query rows than a block) give the
        // register-blocked block's rows to the KV head's query heads, so
        // they share each K/V tile instead of each reading it.
        let group = (shape.heads_q / shape.heads_kv) as u64;
        let group_rows =
            matches!(tiled, Some(TiledKernel::Blocked(_))) && groups_rows(shape, block_m as u32);
        let groups = if group_rows {
            [
                (shape.seq_q as u64 * group).div_ceil(block_m),
                shape.batch as u64,
                shape.heads_kv as u64,
            ]
        } else {
            ungrouped
        };
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, &n) in ["query row tiles", "batch", "heads_q"]
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
/// The most row tiles (subgroups) a caller's cooperative-matrix block may have.
const MAX_COOP_ROW_TILES: u32 = 8;
/// The most keys a cooperative-matrix key tile may have (a lane's
/// visibility bits of a tile fill two words; flash_coop.wgsl).
const MAX_COOP_BLOCK_N: u32 = 64;

/// The cooperative-matrix kernel's layout for this adapter and shape: the
/// largest matrices the adapter multiplies with the storage type's
/// operands into f32, and the first of [`COOP_TILES`] (or the caller's
/// `layout`) whose workgroup memory and invocations fit; or why there is
/// none.
fn coop_tiling(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
    layout: Option<CoopLayout>,
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
    if !emulated
        && adapter.backend == wgpu::Backend::Vulkan
        && !info.features.contains(wgpu::Features::PASSTHROUGH_SHADERS)
    {
        return Err(
            "on Vulkan the kernel is the crate's own SPIR-V (wgpu 30's declares the Vulkan \
             memory model without following it, gfx-rs/wgpu#8805: hand-overs through workgroup \
             memory go unordered), which needs the PASSTHROUGH_SHADERS feature; the crate's \
             own devices request it with cooperative matrices"
                .to_string(),
        );
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
    let (min_lanes, max_lanes) = if emulated {
        (CoopTiling::EMULATED_LANES, CoopTiling::EMULATED_LANES)
    } else {
        (adapter.subgroup_min_size, adapter.subgroup_max_size)
    };
    if !min_lanes.is_power_of_two() || !max_lanes.is_power_of_two() || min_lanes < size {
        return Err(format!(
            "it gives each {size}-row tile a subgroup of at least {size} lanes, a power of two; \
             the adapter's subgroups are {min_lanes}-{max_lanes} lanes"
        ));
    }
    // A workgroup of `row_tiles` of the largest subgroups has a subgroup for
    // each row tile whatever size the driver runs.
    let subgroup = max_lanes;
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let invocations = info.max_invocations();
    let candidates = match layout {
        Some(CoopLayout {
            row_tiles,
            key_tiles,
        }) => {
            // Row tiles are subgroups; a tile's keys are one lane's
            // visibility bits (two words).
            if !(1..=MAX_COOP_ROW_TILES).contains(&row_tiles)
                || key_tiles == 0
                || u64::from(key_tiles) * u64::from(size) > u64::from(MAX_COOP_BLOCK_N)
            {
                return Err(format!(
                    "its block {row_tiles}x{key_tiles} ({size}x{size} matrices) is outside the \
                     kernel's range: 1 to {MAX_COOP_ROW_TILES} row tiles, 1 to \
                     {MAX_COOP_BLOCK_N} keys a tile"
                ));
            }
            vec![(row_tiles, key_tiles)]
        }
        None => COOP_TILES.to_vec(),
    };
    let layouts: Vec<CoopTiling> = candidates
        .iter()
        .map(|&(row_tiles, key_tiles)| CoopTiling {
            head_dim,
            head_dim_v,
            size,
            row_tiles,
            key_tiles,
            workgroup_size: row_tiles * subgroup,
            storage,
            emulated,
            dropout: false,
        })
        .collect();
    // Each lane of a row takes whole four-key quads.
    let quads_split = |t: &CoopTiling| (t.block_n() / 4).is_multiple_of(t.lanes_per_row());
    // Q reaches the matrices through the K/V tile, at least one matrix
    // column at a time.
    let fits = |t: &CoopTiling| {
        quads_split(t)
            && t.q_pass() > 0
            && t.workgroup_bytes() <= memory
            && t.workgroup_size <= invocations
    };
    if let Some(found) = layouts.iter().find(|t| fits(t)) {
        return Ok(*found);
    }
    if let (Some(layout), [asked]) = (layout, &layouts[..]) {
        return Err(format!(
            "block {layout} ({} rows, {} keys, {} invocations) needs {} bytes of workgroup memory \
             at head dims {head_dim}/{head_dim_v}, {} lanes a row taking whole 4-key quads and \
             room for one of Q's {size}-column tiles in the K/V tile; the adapter allows {memory} \
             bytes and {invocations} invocations",
            asked.block_m(),
            asked.block_n(),
            asked.workgroup_size,
            asked.workgroup_bytes(),
            asked.lanes_per_row()
        ));
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

/// Whether the register-blocked tier is the default (forward and
/// backward): on hardware GPUs (the CPU adapters run the per-row tiers,
/// tuned for them), and on every adapter of a browser's WebGPU. A browser
/// reports no device type (wgpu says `Other` for its hardware adapters,
/// `Cpu` for its fallback adapter), and Chromium's fallback (SwiftShader)
/// crashed its GPU process on the per-row tier's unrolled d=256 kernel
/// while the register-blocked one passed (2026-12-06, BENCHMARKS.md).
pub(crate) fn blocked_by_default(info: &GpuInfo) -> bool {
    matches!(
        info.adapter.device_type,
        wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu
    ) || info.adapter.backend == wgpu::Backend::BrowserWebGpu
}

/// PCI vendor id of NVIDIA (`wgpu::AdapterInfo::vendor`).
const NVIDIA: u32 = 0x10de;

/// Whether the cooperative-matrix tier, where the device offers it, is the
/// default: on CPU adapters only (lavapipe from Mesa 26.1, on whose matrix
/// instructions the kernel passes its tests in CI). On hardware GPUs it
/// runs only when forced (`Tier::CooperativeMatrix`, a `CoopLayout`): the
/// kernel computed NaN and wrong outputs on an H100 (2026-12-05,
/// BENCHMARKS.md) before its workgroup variables were made multiples of
/// 16 bytes, and has not run on a hardware GPU since. (On NVIDIA, besides,
/// register blocking with f16 products measured 1.72x faster than the
/// matrix kernel before its rewrite: an H200, 37.14 against 63.98 ms, B4
/// H16 N4096 d128 causal f16.) A GPU family joins once its run of
/// `tests/cooperative_matrix.rs` passes and the tier measures faster there.
fn coop_by_default(info: &GpuInfo) -> bool {
    info.adapter.device_type == wgpu::DeviceType::Cpu
}

/// Whether a register-blocked block of `block_m` rows takes the (query
/// row, head) pairs of a KV head's query heads: GQA calls with fewer query
/// rows than a block (decoding-like), so the group reads each K/V tile once.
fn groups_rows(shape: &AttentionShape, block_m: u32) -> bool {
    shape.heads_q > shape.heads_kv && (shape.seq_q as u64) < u64::from(block_m)
}

/// Whether register-blocked plans of f16 storage compute their products
/// from f16 operands unless the caller says otherwise
/// (`AttentionConfig::f16_products`): where that measured faster, NVIDIA
/// GPUs (an H200: 1.53x and 1.21x the same tier without them, B4 H16
/// N4096 d128 causal, in two runs; BENCHMARKS.md). Elsewhere unmeasured,
/// so off.
pub(crate) fn f16_products_by_default(info: &GpuInfo) -> bool {
    blocked_by_default(info) && info.adapter.vendor == NVIDIA && info.has_f16()
}

/// The register-blocked kernel's layout for this adapter and shape: the
/// first of [`BLOCKED_LANES`] whose tiles fit the workgroup memory and
/// whose invocations the workgroup limit, with rows per invocation chosen
/// so the accumulators stay within [`BLOCKED_ACCUMULATORS`] (or, on
/// NVIDIA, from four, half of those); or why none fits.
fn blocked_tiling(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
) -> std::result::Result<BlockedTiling, String> {
    let (head_dim, head_dim_v) = (shape.head_dim as u32, shape.head_dim_v as u32);
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let invocations = info.max_invocations();
    // Each pair of lanes with its rows per lane, then on NVIDIA (from four
    // rows) with half of them, before fewer lanes: at d=128 in 48 KiB, 16x8x2
    // (128 invocations, 144 registers a lane on NVIDIA's compiler) ran
    // 1.56x faster than 8x8x4 (64 invocations, 233 registers), the same
    // 32 x 32 block (an H100: 23.00 against 35.78 ms, B4 H16 N4096 d128
    // causal f32, one run; BENCHMARKS.md).
    let layouts: Vec<BlockedTiling> = BLOCKED_LANES
        .iter()
        .flat_map(|&(row_lanes, key_lanes)| {
            let columns = (head_dim_v / 4).div_ceil(key_lanes);
            let rows = (BLOCKED_ACCUMULATORS / columns).clamp(1, 4);
            let fewer = (rows == 4 && info.adapter.vendor == NVIDIA).then_some(rows / 2);
            std::iter::once(rows).chain(fewer).flat_map(move |rows| {
                // Whole tiles only: its rows padded, then (where only that
                // fits) without.
                BlockedTiling {
                    head_dim,
                    head_dim_v,
                    row_lanes,
                    key_lanes,
                    rows,
                    storage,
                    dropout: false,
                    f16_products: false,
                    pad_rows: true,
                    passes: 1,
                }
                .forms(1)
            })
        })
        .collect();
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

/// The register-blocked kernel with the caller's layout, after checking it
/// against the kernel's range and the adapter's limits.
fn blocked_tiling_of(
    info: &GpuInfo,
    shape: &AttentionShape,
    storage: DType,
    CallerLayout { layout, f16_tiles }: CallerLayout,
) -> Result<BlockedTiling> {
    check_blocked_layout(layout)?;
    let BlockedLayout {
        row_lanes,
        key_lanes,
        rows,
    } = layout;
    let whole = BlockedTiling {
        head_dim: shape.head_dim as u32,
        head_dim_v: shape.head_dim_v as u32,
        row_lanes,
        key_lanes,
        rows,
        storage,
        dropout: false,
        f16_products: f16_tiles,
        pad_rows: true,
        passes: 1,
    };
    // The first form that fits (whole tiles, then two passes); else the
    // smallest, refused below with its bytes.
    let memory = u64::from(info.limits.max_compute_workgroup_storage_size);
    let forms = whole.forms(2);
    let tiling = *forms
        .iter()
        .find(|t| t.workgroup_bytes() <= memory)
        .unwrap_or(&forms[forms.len() - 1]);
    info.check_workgroup(shape, tiling.workgroup_size(), tiling.workgroup_bytes())?;
    Ok(tiling)
}

/// Whether a register-blocked plan of `storage` runs f16 products (so f16
/// tiles) with the caller's setting `products` (`None`: the planner's
/// default): a caller's layout then only has to fit the workgroup memory
/// with f16 tiles, half the bytes.
fn takes_f16_tiles(info: &GpuInfo, storage: DType, products: Option<bool>) -> bool {
    storage == DType::F16 && products.unwrap_or_else(|| f16_products_by_default(info))
}

/// A caller's register-blocked layout ([`crate::AttentionConfig::blocked_layout`]),
/// and whether its tiles are f16 (f16 products, forced or the planner's
/// default), which sets the workgroup memory it must fit.
#[derive(Debug, Clone, Copy)]
struct CallerLayout {
    layout: BlockedLayout,
    f16_tiles: bool,
}

/// How query rows map onto invocations.
struct RowTiling {
    workgroup_size: u32,
    rows: u32,
    unroll: bool,
    subgroup_kv: bool,
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
