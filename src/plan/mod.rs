//! Every planner of the crate's forward, decode and naive calls (the
//! backward's and linear attention's live beside their kernels, and use the
//! rules shared here): how a call runs on an adapter (kernel tier, tile
//! sizes, workgroups, key splits, chunks) as a pure function of the
//! adapter's [`GpuInfo`] and the call's shape and options. Nothing here
//! touches a device, so the choices for adapters we do not have are tested
//! from their profiles (`profiles.rs`, and the tests in `tests.rs`).

mod decode;
mod decode_as_forward;
mod forward;
mod forward_as_decode;
mod naive;
#[cfg(test)]
pub(crate) mod profiles;
#[cfg(test)]
mod random_plans;
#[cfg(test)]
mod tests;

pub use decode::{CacheShape, DecodePlan};
pub(crate) use decode::{QueryTokens, sequence_row_tiles};
pub use forward::ForwardPlan;
pub(crate) use forward::blocked_by_default;
pub(crate) use forward_as_decode::{cache_dtype, view_page_size};
pub use naive::NaivePlan;

use crate::config::{BlockedLayout, Tier};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::shaders::{AttentionTiling, Specialization};

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

/// Checks that merging `parts` partial results (combine_partials.wgsl
/// walks them twice per output element: their max, then their weighted
/// sum) stays within the adapter's loop budget: split-KV decoding's
/// splits times the cache's buffers, or [`crate::Gpu::merge`]'s parts.
pub(crate) fn check_merge_budget(info: &GpuInfo, parts: u64) -> Result<()> {
    let Some(budget) = info.loop_budget() else {
        return Ok(());
    };
    // Each loop's trips plus one for its exit.
    let trips = 2 * (parts + 1);
    if trips > budget {
        return Err(Error::MergeLoopBudget {
            parts,
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
