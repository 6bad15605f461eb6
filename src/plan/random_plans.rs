//! Every planner on random calls over every adapter profile, many of them
//! nonsense or past any adapter's limits: each answer is a plan that fits
//! its adapter or a typed error, never a panic. (The grid tests in
//! `tests.rs` pin the choices; these look for the shapes nobody listed:
//! zero and huge dims, counts that overflow `u32`, forced tiers and
//! layouts that do not fit.) Run them in a debug build too, where an
//! arithmetic overflow panics instead of wrapping.

use super::profiles::all;
use super::*;
use crate::backward::BackwardPlan;
use crate::config::{AttentionConfig, AttentionShape, BlockedLayout, CoopLayout};
use crate::decode::{DecodeLanes, DecodeOptions};
use crate::linear::{LinearConfig, LinearPlan, LinearShape};
use crate::tensor::DType;
use crate::{KvDType, Tier};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

/// Random calls per planner and profile.
const CALLS: usize = 1000;

/// One random call's draws. Half the calls are tame (typical counts,
/// supported head dims, the planner's own tier), so that most of them
/// plan and their plans are checked; the other half are wild: each value
/// may be zero, far past any limit (counts up to 2^40), a head dim of any
/// width, a forced tier or a caller's layout, in or out of range.
struct Draw {
    rng: ChaCha8Rng,
    wild: bool,
}

impl Draw {
    fn new(seed: u64) -> Self {
        Draw {
            rng: ChaCha8Rng::seed_from_u64(seed),
            wild: false,
        }
    }

    /// Starts the next call, tame or wild.
    fn next_call(&mut self) {
        self.wild = self.rng.random_bool(0.5);
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn one_of<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    /// A count up to `typical`; in a wild call sometimes zero or huge.
    fn count(&mut self, typical: usize) -> usize {
        match (self.wild, self.rng.random_range(0..10)) {
            (true, 0) => 0,
            (true, 1 | 2) => 1usize << self.rng.random_range(16..=40),
            _ => self.rng.random_range(1..=typical),
        }
    }

    /// A field of a caller's layout: mostly near the kernels' range
    /// (`0..=near`), sometimes any u32, where products of fields overflow.
    fn layout_field(&mut self, near: u32) -> u32 {
        if self.chance(0.2) {
            self.rng.random()
        } else {
            self.rng.random_range(0..=near)
        }
    }

    /// A supported head dim; in a wild call sometimes any width, zero,
    /// or far too wide.
    fn head_dim(&mut self) -> usize {
        match (self.wild, self.rng.random_range(0..10)) {
            (true, 0) => 0,
            (true, 1 | 2) => self.rng.random_range(1..=640),
            (true, 3) => 8 * self.rng.random_range(73..=512),
            (true, _) => 8 * self.rng.random_range(1..=72),
            (false, _) => 8 * self.rng.random_range(1..=32),
        }
    }

    /// A shape whose query heads divide by its KV heads, except in some
    /// wild calls.
    fn shape(&mut self) -> AttentionShape {
        let heads_kv = self.count(16);
        let heads_q = if self.wild && self.chance(0.2) {
            self.count(64)
        } else {
            heads_kv.saturating_mul(self.one_of(&[1, 2, 8, 16]))
        };
        let head_dim = self.head_dim();
        AttentionShape {
            batch: self.count(8),
            // Decoding-like calls (a few queries over whole pages of keys)
            // are common enough that the routes between the forward and
            // decoding are planned too.
            seq_q: if self.chance(0.3) {
                self.count(16)
            } else {
                self.count(5000)
            },
            seq_kv: if self.chance(0.3) {
                16 * self.count(300)
            } else {
                self.count(5000)
            },
            heads_q,
            heads_kv,
            head_dim,
            head_dim_v: if self.chance(0.7) {
                head_dim
            } else {
                self.head_dim()
            },
        }
    }

    fn storage(&mut self) -> DType {
        self.one_of(&[DType::F32, DType::F16, DType::BF16])
    }

    /// The planner's choice, or (mostly in wild calls) a forced tier.
    fn tier(&mut self) -> Option<Tier> {
        if !self.chance(if self.wild { 0.7 } else { 0.2 }) {
            return None;
        }
        self.one_of(&[
            Tier::Portable,
            Tier::SubgroupBroadcast,
            Tier::RegisterBlocked,
            Tier::CooperativeMatrix,
        ])
        .into()
    }

    /// A config with causality, sometimes dropout and a tier; in wild
    /// calls sometimes a caller's layout (in the kernels' ranges or not)
    /// or f16 products.
    fn config(&mut self) -> AttentionConfig {
        let mut config = AttentionConfig::new().causal(self.chance(0.5));
        config.tier = self.tier();
        if self.chance(0.1) {
            config = config.dropout(0.1, 7);
        }
        if !self.wild {
            return config;
        }
        if self.chance(0.2) {
            config = config.blocked_layout(BlockedLayout {
                row_lanes: self.layout_field(300),
                key_lanes: self.layout_field(300),
                rows: self.layout_field(10),
            });
        }
        if self.chance(0.15) {
            config = config.coop_layout(CoopLayout {
                row_tiles: self.layout_field(9),
                key_tiles: self.layout_field(9),
            });
        }
        if self.chance(0.3) {
            config = config.f16_products(self.chance(0.5));
        }
        config
    }
}

/// Counts a test's plans and refusals. Both must be common, or the random
/// calls no longer test what they were drawn for (every call refused
/// would check nothing).
#[derive(Default)]
struct Tally {
    planned: usize,
    refused: usize,
    /// Plans that take the route to the other planner's kernels.
    rerouted: usize,
}

impl Tally {
    /// The plan, counted, or `None` for a refusal, counted.
    fn count<T>(&mut self, result: crate::Result<T>) -> Option<T> {
        match result {
            Ok(plan) => {
                self.planned += 1;
                Some(plan)
            }
            Err(_) => {
                self.refused += 1;
                None
            }
        }
    }

    fn assert_mixed(&self, what: &str) {
        let total = self.planned + self.refused;
        eprintln!(
            "{what}: {} planned ({} rerouted), {} refused",
            self.planned, self.rerouted, self.refused
        );
        assert!(
            self.planned * 5 >= total && self.refused * 5 >= total,
            "{what}: {} of {total} calls planned; the draws need rebalancing",
            self.planned
        );
    }
}

/// Each axis of a dispatch holds at least one workgroup and at most the
/// adapter's limit.
fn assert_dispatch_fits(info: &GpuInfo, groups: [u64; 3], what: &str) {
    let limit = u64::from(info.limits.max_compute_workgroups_per_dimension);
    assert!(
        groups.iter().all(|&n| (1..=limit).contains(&n)),
        "{what}: workgroups {groups:?} against the limit {limit}"
    );
}

/// A plan's loop trips within llvmpipe's budget, where it has one.
fn assert_loops_fit(info: &GpuInfo, trips: u64, what: &str) {
    if let Some(budget) = info.loop_budget() {
        assert!(
            trips <= budget,
            "{what}: {trips} loop trips, budget {budget}"
        );
    }
}

/// Runs `call` on `CALLS` random calls (from `seed`) on each adapter
/// profile: the draws of the call, the profile's `GpuInfo` and name.
fn each_call(seed: u64, mut call: impl FnMut(&mut Draw, &GpuInfo, &str)) {
    let mut draw = Draw::new(seed);
    for profile in all() {
        let info = profile.info();
        for _ in 0..CALLS {
            draw.next_call();
            call(&mut draw, &info, profile.name);
        }
    }
}

/// What every forward plan must hold on its adapter.
fn assert_forward_plan_fits(
    info: &GpuInfo,
    plan: &ForwardPlan,
    shape: &AttentionShape,
    what: &str,
) {
    assert_dispatch_fits(info, plan.workgroups().map(u64::from), what);
    assert!(
        plan.workgroup_size() <= info.max_invocations(),
        "{what}: {} invocations",
        plan.workgroup_size()
    );
    assert!(
        plan.workgroup_bytes() <= u64::from(info.limits.max_compute_workgroup_storage_size),
        "{what}: {} workgroup bytes",
        plan.workgroup_bytes()
    );
    let keys = plan.keys_per_dispatch().unwrap_or(shape.seq_kv as u64);
    assert!(keys >= 1, "{what}: no keys per dispatch");
    assert_loops_fit(info, plan.loop_trips(keys.min(shape.seq_kv as u64)), what);
}

/// What every decode plan of `seq_q` queries with `heads_q` heads over
/// `cache` must hold on its adapter.
fn assert_decode_plan_fits(
    info: &GpuInfo,
    plan: &DecodePlan,
    cache: &CacheShape,
    seq_q: usize,
    heads_q: usize,
    what: &str,
) {
    // The grid is (split, row tile, KV head); every sequence has seq_q
    // tokens here.
    assert_eq!(
        u64::from(plan.total_row_tiles),
        u64::from(plan.row_tiles) * cache.batch as u64,
        "{what}: row tiles of the call"
    );
    let grid = [
        u64::from(plan.splits),
        u64::from(plan.total_row_tiles),
        cache.heads_kv as u64,
    ];
    assert_dispatch_fits(info, grid, what);
    // Every query row falls in a row tile, every position of the longest
    // sequence in a split.
    let rows = (seq_q * (heads_q / cache.heads_kv)) as u64;
    assert!(
        u64::from(plan.row_tiles) * u64::from(plan.rows_per_workgroup) >= rows,
        "{what}: {} row tiles of {} rows",
        plan.row_tiles,
        plan.rows_per_workgroup
    );
    assert!(
        u64::from(plan.splits) * u64::from(plan.split_keys) >= cache.longest as u64,
        "{what}: {} splits of {} keys",
        plan.splits,
        plan.split_keys
    );
    assert_eq!(
        u64::from(plan.slots),
        u64::from(plan.splits) * cache.segments as u64,
        "{what}: merge slots"
    );
    assert_eq!(plan.segments as usize, cache.segments, "{what}: segments");
    assert_loops_fit(info, plan.loop_trips(), what);
}

#[test]
fn random_forward_calls_plan_within_the_adapter_or_refuse() {
    let mut tally = Tally::default();
    each_call(0x5eed_00f0, |draw, info, profile| {
        let (shape, storage, config) = (draw.shape(), draw.storage(), draw.config());
        let what = format!("{profile} {storage:?} {shape:?} {config:?}");
        let Some(plan) = tally.count(ForwardPlan::for_config(info, &shape, storage, &config))
        else {
            return;
        };
        assert_forward_plan_fits(info, &plan, &shape, &what);
        // Where the call would run as decoding, that plan fits too.
        if let Some(decode) = DecodePlan::for_forward(info, &shape, storage, &config) {
            tally.rerouted += 1;
            let cache = CacheShape::of_call(&shape, KvDType::F32);
            let what = format!("{what}, as decoding");
            assert_decode_plan_fits(info, &decode, &cache, shape.seq_q, shape.heads_q, &what);
        }
        // The naive baseline plans on the same tiling, or refuses.
        if let Ok(naive) = NaivePlan::for_call(info, &shape, storage, config.tier) {
            assert!(naive.chunks() >= 1, "{what}: naive chunks");
            assert!(
                naive.score_buffer_bytes() <= info.limits.max_storage_buffer_binding_size,
                "{what}: naive scores of {} bytes",
                naive.score_buffer_bytes()
            );
        }
    });
    tally.assert_mixed("forward");
    assert!(tally.rerouted > 0, "no forward call ran as decoding");
}

#[test]
fn random_decode_calls_plan_within_the_adapter_or_refuse() {
    let mut tally = Tally::default();
    each_call(0x5eed_00de, |draw, info, profile| {
        let call = draw.shape();
        let dtype = draw.one_of(&KvDType::ALL);
        let cache = CacheShape {
            segments: draw.count(4),
            ..CacheShape::of_call(&call, dtype)
        };
        let mut options = DecodeOptions::new(&draw.config());
        if draw.chance(0.2) {
            options = options.kv_splits(draw.count(64));
        }
        if draw.wild && draw.chance(0.3) {
            let lanes = [
                DecodeLanes::HeadDim,
                DecodeLanes::Keys,
                DecodeLanes::KeyTiles,
            ];
            options = options.lanes(draw.one_of(&lanes));
        }
        let what = format!(
            "{profile} {cache:?} seq_q {} heads_q {} {options:?}",
            call.seq_q, call.heads_q
        );
        let planned = DecodePlan::for_call(info, &cache, call.seq_q, call.heads_q, &options);
        let Some(plan) = tally.count(planned) else {
            return;
        };
        assert_decode_plan_fits(info, &plan, &cache, call.seq_q, call.heads_q, &what);
        // Where the call would run as the forward over a copy, that
        // plan fits too.
        let forward =
            DecodePlan::as_forward(info, &cache, call.seq_q, call.heads_q, DType::F32, &options);
        if let Some(forward) = forward {
            tally.rerouted += 1;
            let shape = AttentionShape {
                seq_kv: cache.longest,
                ..call
            };
            assert_forward_plan_fits(info, &forward, &shape, &format!("{what}, as the forward"));
        }
    });
    tally.assert_mixed("decode");
    assert!(tally.rerouted > 0, "no decode call ran as the forward");
}

#[test]
fn random_backward_calls_plan_within_the_adapter_or_refuse() {
    let mut tally = Tally::default();
    each_call(0x5eed_00ba, |draw, info, profile| {
        let (shape, storage, config) = (draw.shape(), draw.storage(), draw.config());
        let what = format!("{profile} {storage:?} {shape:?} {config:?}");
        // The plan, and what Gpu::backward checks before it records
        // anything.
        let planned = BackwardPlan::for_config(info, &shape, storage, &config)
            .and_then(|plan| plan.check_limits(info, &shape).map(|()| plan));
        let Some(plan) = tally.count(planned) else {
            return;
        };
        assert!(
            plan.workgroup_size() <= info.max_invocations(),
            "{what}: {} invocations",
            plan.workgroup_size()
        );
        for pass in crate::shaders::BackwardPass::ALL {
            let groups = plan.workgroups(pass, &shape, shape.seq_q, shape.seq_kv);
            assert_dispatch_fits(info, groups, &format!("{what} {pass:?}"));
        }
    });
    tally.assert_mixed("backward");
}

#[test]
fn random_linear_calls_plan_within_the_adapter_or_refuse() {
    let mut tally = Tally::default();
    each_call(0x5eed_0011, |draw, info, profile| {
        let s = draw.shape();
        let causal = draw.chance(0.5);
        let shape = LinearShape {
            batch: s.batch,
            // Causal calls take queries and keys of the same tokens.
            seq_q: if causal && !draw.wild {
                s.seq_kv
            } else {
                s.seq_q
            },
            seq_kv: s.seq_kv,
            heads_q: s.heads_q,
            heads_kv: s.heads_kv,
            head_dim: s.head_dim,
            head_dim_v: s.head_dim_v,
        };
        let config = LinearConfig {
            causal,
            tier: draw.tier(),
            ..LinearConfig::new()
        };
        let storage = draw.storage();
        let what = format!("{profile} {storage:?} {shape:?} {config:?}");
        let Some(plan) = tally.count(LinearPlan::for_call(info, &shape, storage, &config)) else {
            return;
        };
        assert!(plan.splits() >= 1 && plan.chunk() >= 1, "{what}: {plan:?}");
        let groups = plan.state_workgroups(plan.segment_splits()).map(u64::from);
        assert_dispatch_fits(info, groups, &what);
    });
    tally.assert_mixed("linear");
}
