//! How a linear attention call maps onto the three kernels: a pure
//! function of the adapter's [`GpuInfo`] and the call.

use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::linear::{LinearConfig, LinearShape};
use crate::pipelines::ELEMENTWISE_WORKGROUP;
use crate::plan::use_subgroup_tier;
use crate::shaders::{LinearPass, LinearTiling, Specialization};
use crate::tensor::DType;

/// Staged key tiles, largest first.
const BLOCK_N_CANDIDATES: [u32; 5] = [64, 32, 16, 8, 4];
/// The split-state buffer holds at most this much; longer sequences run in
/// segments of splits, one after the other.
const SPLIT_STATE_BUDGET: u64 = 256 << 20;
/// State-pass workgroups a non-causal call aims for on hardware GPUs.
const GPU_STATE_WORKGROUPS: usize = 1024;
/// Invocations per workgroup on CPU adapters: one SIMD group (as the
/// forward kernel's CPU tiling).
const CPU_WORKGROUP: u32 = 8;
/// Output-pass workgroup on hardware GPUs: one query row per invocation.
const GPU_WORKGROUP: u32 = 64;
/// Most accumulator vec4s of a state-pass invocation on CPU adapters
/// (registers are memory there; 2 KiB per invocation keeps them cached).
const CPU_STATE_ACCUMULATORS: u32 = 128;
/// Most value vec4 columns of a state-pass workgroup on GPUs (4 rows x 4
/// vec4s of accumulators per invocation stay in registers).
const GPU_STATE_COLUMNS4: u32 = 4;

/// Tiles, key splits and segments of one linear attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearPlan {
    states: LinearTiling,
    outputs: LinearTiling,
    split_keys: usize,
    splits: usize,
    segment_splits: usize,
    batch_heads_kv: usize,
    batch_heads_q: usize,
}

/// The largest divisor of `n` that is at most `most` (at least 1).
fn largest_divisor_up_to(n: u32, most: u32) -> u32 {
    (1..=most.min(n))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}

/// The tiling of the element-wise passes (scan, one-token update): one
/// invocation per item; the tile fields hold the smallest valid values, so
/// that they size no array to zero and name one pipeline per head dims.
fn elementwise_tiling(head_dim: u32, head_dim_v: u32, storage: DType) -> LinearTiling {
    LinearTiling {
        head_dim,
        head_dim_v,
        workgroup_size: ELEMENTWISE_WORKGROUP,
        block_n: BLOCK_N_CANDIDATES[BLOCK_N_CANDIDATES.len() - 1],
        row_quads: 1,
        columns4: 1,
        rows: 1,
        state_rows: 4,
        causal: false,
        subgroup: false,
        storage,
    }
}

/// Workgroup bytes of `keys` staged keys of phi(K) and V.
fn key_tile_bytes(keys: u32, dk4: u32, dv4: u32) -> u64 {
    u64::from(keys * (dk4 + dv4)) * 16
}

/// Workgroup bytes of `rows` staged state rows and their z.
fn state_tile_bytes(rows: u32, dv4: u32) -> u64 {
    u64::from(rows * dv4) * 16 + u64::from(rows) * 4
}

impl LinearPlan {
    /// The plan for `shape` with `storage` under `config` on this adapter.
    pub fn for_call(
        info: &GpuInfo,
        shape: &LinearShape,
        storage: DType,
        config: &LinearConfig,
    ) -> Result<Self> {
        config.validate(shape)?;
        let limits = &info.limits;
        let cpu = info.adapter.device_type == wgpu::DeviceType::Cpu;
        let (dk4, dv4) = ((shape.head_dim / 4) as u32, (shape.head_dim_v / 4) as u32);
        let workgroup_bytes = u64::from(limits.max_compute_workgroup_storage_size);
        let too_little_memory = |needed: u64| Error::WorkgroupMemory {
            head_dim: shape.head_dim,
            head_dim_v: shape.head_dim_v,
            needed,
            limit: limits.max_compute_workgroup_storage_size,
        };
        let smallest = BLOCK_N_CANDIDATES[BLOCK_N_CANDIDATES.len() - 1];
        let subgroup = use_subgroup_tier(info, config.tier)?;
        // Fields a pass does not read keep the element-wise values.
        let base = LinearTiling {
            subgroup,
            ..elementwise_tiling(shape.head_dim as u32, shape.head_dim_v as u32, storage)
        };

        // With subgroup broadcasts the workgroup is one subgroup, and its
        // lanes may outnumber the row quads.
        let subgroup_lanes = info.adapter.subgroup_min_size;
        let (state_workgroup, row_quads) = match (subgroup, cpu) {
            (true, _) => (subgroup_lanes, dk4.div_ceil(subgroup_lanes)),
            (false, true) => {
                let lanes = largest_divisor_up_to(dk4, CPU_WORKGROUP);
                (lanes, dk4 / lanes)
            }
            (false, false) => (dk4, 1),
        };
        let columns4 = if cpu {
            largest_divisor_up_to(dv4, (CPU_STATE_ACCUMULATORS / (4 * row_quads)).max(1))
        } else {
            largest_divisor_up_to(dv4, GPU_STATE_COLUMNS4)
        };
        let state_block_n = BLOCK_N_CANDIDATES
            .into_iter()
            .find(|&n| key_tile_bytes(n, dk4, dv4) <= workgroup_bytes)
            .ok_or_else(|| too_little_memory(key_tile_bytes(smallest, dk4, dv4)))?;
        let states = LinearTiling {
            workgroup_size: state_workgroup,
            block_n: state_block_n,
            row_quads,
            columns4,
            ..base
        };

        // Output pass: query rows over invocations; the causal one also
        // stages the chunk's keys, in half of the workgroup memory.
        let rows = if cpu {
            cpu_rows(shape.head_dim.max(shape.head_dim_v) as u32)
        } else {
            1
        };
        let output_workgroup = match (subgroup, cpu) {
            (true, _) => subgroup_lanes,
            (false, true) => CPU_WORKGROUP,
            (false, false) => GPU_WORKGROUP,
        };
        let chunk = output_workgroup * rows;
        let (block_n, state_budget) = if config.causal {
            let block_n = BLOCK_N_CANDIDATES
                .into_iter()
                .find(|&n| {
                    chunk.is_multiple_of(n) && key_tile_bytes(n, dk4, dv4) <= workgroup_bytes / 2
                })
                .ok_or_else(|| too_little_memory(2 * key_tile_bytes(smallest, dk4, dv4)))?;
            (block_n, workgroup_bytes - key_tile_bytes(block_n, dk4, dv4))
        } else {
            (smallest, workgroup_bytes)
        };
        let state_rows = (1..=dk4)
            .rev()
            .map(|quads| 4 * quads)
            .find(|&r| dk4.is_multiple_of(r / 4) && state_tile_bytes(r, dv4) <= state_budget)
            .ok_or_else(|| too_little_memory(state_tile_bytes(4, dv4)))?;
        let outputs = LinearTiling {
            workgroup_size: output_workgroup,
            block_n,
            rows,
            state_rows,
            causal: config.causal,
            ..base
        };
        for needed in [state_workgroup, output_workgroup] {
            info.check_invocations(needed)?;
        }

        let batch_heads_kv = shape.batch * shape.heads_kv;
        let batch_heads_q = shape.batch * shape.heads_q;
        let split_keys = if config.causal {
            chunk as usize
        } else {
            // Enough splits to fill the adapter, never more than chunks of
            // output rows, and within llvmpipe's loop budget.
            let wanted = if cpu {
                4 * info.host_threads.max(1)
            } else {
                GPU_STATE_WORKGROUPS
            };
            let most = shape.seq_kv.div_ceil(chunk as usize);
            let mut splits = wanted.div_ceil(batch_heads_kv).clamp(1, most);
            if let Some(budget) = info.loop_budget() {
                splits = splits.max(shape.seq_kv.div_ceil(most_keys_per_split(&states, budget)));
            }
            shape.seq_kv.div_ceil(splits)
        };
        if let Some(budget) = info.loop_budget() {
            let most = most_keys_per_split(&states, budget);
            if split_keys > most {
                return Err(Error::LoopBudget {
                    kernel: Specialization::Linear {
                        pass: LinearPass::States,
                        tiling: states,
                    }
                    .label(),
                    keys: split_keys as u64,
                    trips: state_pass_trips(&states, split_keys as u64),
                    budget,
                });
            }
        }
        let splits = shape.seq_kv.div_ceil(split_keys);
        // Saturating: a product past u64 is past any binding, refused below.
        let carried_bytes = slot_bytes(shape).saturating_mul(batch_heads_kv as u64);
        let binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if carried_bytes > binding {
            return Err(Error::BufferTooLarge {
                tensor: "linear state",
                bytes: carried_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: binding,
            });
        }
        let mut segment_splits = (binding.min(SPLIT_STATE_BUDGET) / carried_bytes) as usize;
        if let Some(budget) = info.loop_budget() {
            // The scan runs one trip per split of a segment.
            segment_splits = segment_splits.min(budget.saturating_sub(2) as usize);
        }
        let segment_splits = segment_splits.clamp(1, splits);
        let plan = LinearPlan {
            states,
            outputs,
            split_keys,
            splits,
            segment_splits,
            batch_heads_kv,
            batch_heads_q,
        };
        plan.check_dispatch_limits(info, shape)?;
        Ok(plan)
    }

    fn check_dispatch_limits(&self, info: &GpuInfo, shape: &LinearShape) -> Result<()> {
        let limit = info.limits.max_compute_workgroups_per_dimension;
        // Causal calls dispatch one segment's chunks at a time.
        let output_blocks = if self.outputs.causal {
            self.segment_splits
        } else {
            shape.seq_q.div_ceil(self.chunk())
        };
        let groups = [
            ("linear attention states", "key splits", self.segment_splits),
            (
                "linear attention states",
                "batch * heads_kv",
                self.batch_heads_kv,
            ),
            ("linear attention outputs", "query blocks", output_blocks),
            (
                "linear attention outputs",
                "batch * heads_q",
                self.batch_heads_q,
            ),
        ];
        for (what, axis, n) in groups {
            if n as u64 > u64::from(limit) {
                return Err(Error::DispatchTooLarge {
                    what,
                    axis,
                    groups: n as u64,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// The specialization of one pass.
    pub(crate) fn specialization(&self, pass: LinearPass) -> Specialization {
        let tiling = match pass {
            LinearPass::States => self.states,
            // The scan reads only the parameters: one pipeline serves all.
            LinearPass::Scan => elementwise_tiling(8, 8, DType::F32),
            LinearPass::Outputs => self.outputs,
            // One invocation per state row: only the head dims and the
            // storage type matter.
            LinearPass::Update => {
                let s = self.states;
                elementwise_tiling(s.head_dim, s.head_dim_v, s.storage)
            }
        };
        Specialization::Linear { pass, tiling }
    }

    /// Invocations of the one-token state update: per (batch, KV head),
    /// one per row of S and one per vec4 of z.
    pub(crate) fn update_invocations(&self) -> u64 {
        5 * u64::from(self.states.head_dim / 4) * self.batch_heads_kv as u64
    }

    /// Workgroups of the state pass for `splits` splits: (splits, batch *
    /// heads_kv, value column blocks).
    pub(crate) fn state_workgroups(&self, splits: usize) -> [u32; 3] {
        [
            splits as u32,
            self.batch_heads_kv as u32,
            self.states.head_dim_v / 4 / self.states.columns4,
        ]
    }

    /// Keys per split of the state pass (one chunk in causal calls).
    pub fn split_keys(&self) -> usize {
        self.split_keys
    }
    /// Key splits over the whole sequence.
    pub fn splits(&self) -> usize {
        self.splits
    }
    /// Splits per segment: the split-state scratch holds one segment, and
    /// longer sequences run segment after segment.
    pub fn segment_splits(&self) -> usize {
        self.segment_splits
    }
    /// Segments the call runs in.
    pub fn segments(&self) -> usize {
        self.splits.div_ceil(self.segment_splits)
    }
    /// Query rows per output workgroup (keys per chunk in causal calls).
    pub fn chunk(&self) -> usize {
        (self.outputs.workgroup_size * self.outputs.rows) as usize
    }
    /// Bytes of the split-state scratch the call binds.
    pub fn split_state_bytes(&self, shape: &LinearShape) -> u64 {
        slot_bytes(shape) * (self.batch_heads_kv * self.segment_splits) as u64
    }
}

/// Query rows per output-pass invocation on CPU adapters: half the
/// forward kernel's. The unrolled body grows with rows x head dims and
/// lavapipe's compile time faster than that (d=64: 16 rows compile in
/// ~100 s cold, 8 rows in ~20 s), while 8 rows run as fast as 16 (each
/// state element broadcast feeds 8 FMAs per vec4; loads, not FMAs, bound
/// this pass there; BENCHMARKS.md).
fn cpu_rows(widest_head_dim: u32) -> u32 {
    match widest_head_dim {
        0..=64 => 8,
        65..=128 => 4,
        _ => 2,
    }
}

/// Loop trips of one state-pass invocation over `keys` keys (llvmpipe
/// counts every trip, each loop's exit test included; unrolled loops do
/// not count): four keys per trip with subgroup broadcasts; otherwise per
/// staged tile, the tile loop, two staging loops and the key loop.
fn state_pass_trips(tiling: &LinearTiling, keys: u64) -> u64 {
    if tiling.subgroup {
        return keys.div_ceil(4) + 1;
    }
    let block_n = u64::from(tiling.block_n);
    let lanes = u64::from(tiling.workgroup_size);
    let stage_k = (block_n * u64::from(tiling.head_dim / 4)).div_ceil(lanes);
    let stage_v = (block_n * u64::from(tiling.columns4)).div_ceil(lanes);
    let tiles = keys.div_ceil(block_n) + 1;
    tiles * (1 + stage_k + 1 + stage_v + 1 + block_n / 4 + 1)
}

/// The most keys one state-pass split may cover within `budget` trips.
fn most_keys_per_split(tiling: &LinearTiling, budget: u64) -> usize {
    let block_n = u64::from(tiling.block_n);
    let mut keys = block_n;
    // Grow by tiles while the next still fits (trips grow linearly).
    let per_tile = state_pass_trips(tiling, 2 * block_n) - state_pass_trips(tiling, block_n);
    let spare = budget.saturating_sub(state_pass_trips(tiling, block_n));
    keys += spare / per_tile.max(1) * block_n;
    keys as usize
}

/// Bytes of one (batch, KV head) state: `S` and `z` in f32.
pub(crate) fn slot_bytes(shape: &LinearShape) -> u64 {
    4 * (shape.head_dim * (shape.head_dim_v + 1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profiles;

    fn plan(info: &GpuInfo, shape: &LinearShape, causal: bool) -> Result<LinearPlan> {
        LinearPlan::for_call(info, shape, DType::F32, &LinearConfig::new().causal(causal))
    }

    /// Every profile plans every head-dim pair within its limits, with
    /// tilings the kernel's indexing assumes.
    #[test]
    fn plans_fit_every_profile() {
        let dims = [8, 16, 24, 40, 64, 96, 128, 200, 256];
        for profile in profiles::all() {
            let info = profile.info();
            let limits = &info.limits;
            for d in dims {
                for dv in dims {
                    for causal in [false, true] {
                        let shape = LinearShape::self_attention(2, 1000, 4, d, dv);
                        let p = plan(&info, &shape, causal)
                            .unwrap_or_else(|e| panic!("{}: d={d} dv={dv}: {e}", profile.name));
                        let (dk4, dv4) = ((d / 4) as u32, (dv / 4) as u32);
                        let what = format!("{} d={d} dv={dv} causal={causal}: {p:?}", profile.name);
                        let s = p.states;
                        if s.subgroup {
                            assert!(s.row_quads * s.workgroup_size >= dk4, "{what}");
                        } else {
                            assert_eq!(s.row_quads * s.workgroup_size, dk4, "{what}");
                        }
                        assert!(dv4.is_multiple_of(s.columns4), "{what}");
                        let o = p.outputs;
                        assert!(o.state_rows.is_multiple_of(4), "{what}");
                        assert!(dk4.is_multiple_of(o.state_rows / 4), "{what}");
                        let chunk = o.workgroup_size * o.rows;
                        assert!(!causal || chunk.is_multiple_of(o.block_n), "{what}");
                        let bytes = u64::from(limits.max_compute_workgroup_storage_size);
                        if !s.subgroup {
                            assert!(key_tile_bytes(s.block_n, dk4, dv4) <= bytes, "{what}");
                            let staged = state_tile_bytes(o.state_rows, dv4)
                                + if causal {
                                    key_tile_bytes(o.block_n, dk4, dv4)
                                } else {
                                    0
                                };
                            assert!(staged <= bytes, "{what}");
                        }
                        for lanes in [s.workgroup_size, o.workgroup_size] {
                            assert!(
                                lanes <= limits.max_compute_invocations_per_workgroup,
                                "{what}"
                            );
                        }
                        assert!(
                            p.split_state_bytes(&shape) <= limits.max_storage_buffer_binding_size
                        );
                        assert_eq!(p.splits(), 1000usize.div_ceil(p.split_keys()), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn lavapipe_broadcasts_and_gl_stages_in_workgroup_memory() {
        let all = profiles::all();
        let lavapipe = all[0].info();
        let gl = all[1].info();
        let shape = LinearShape::self_attention(1, 16384, 8, 64, 64);
        let vulkan = plan(&lavapipe, &shape, false).unwrap();
        assert!(vulkan.states.subgroup && vulkan.outputs.subgroup);
        // One split per head fills two host threads at 8 heads, within the
        // loop budget (four keys per trip).
        assert_eq!(vulkan.splits(), 1);
        assert_eq!(vulkan.chunk(), 64);
        let causal = plan(&gl, &shape, true).unwrap();
        assert!(!causal.states.subgroup && !causal.outputs.subgroup);
        assert_eq!(causal.split_keys(), causal.chunk());
        assert_eq!(causal.segments(), 1);
    }

    #[test]
    fn long_non_causal_calls_split_keys_within_llvmpipes_loop_budget() {
        let gl = profiles::all()[1].info();
        let budget = gl.loop_budget().expect("llvmpipe has a loop budget");
        let shape = LinearShape::self_attention(1, 1 << 20, 1, 64, 64);
        let p = plan(&gl, &shape, false).unwrap();
        assert!(p.splits() > 1, "{p:?}");
        assert!(
            state_pass_trips(&p.states, p.split_keys() as u64) <= budget,
            "{p:?}"
        );
    }

    #[test]
    fn long_causal_calls_run_in_segments() {
        // d=256: 257 KiB of state per chunk and head.
        let info = profiles::all()[0].info();
        let shape = LinearShape::self_attention(1, 1 << 16, 4, 256, 256);
        let p = plan(&info, &shape, true).unwrap();
        assert!(p.segments() > 1, "{p:?}");
        assert!(p.split_state_bytes(&shape) <= 128 << 20, "{p:?}");
        assert_eq!(p.segments(), p.splits().div_ceil(p.segment_splits()));
    }
}
