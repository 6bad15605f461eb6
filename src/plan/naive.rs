//! The naive baseline's planner: chunks of (batch, head) pairs whose
//! score matrices fit one binding.

use super::{ForwardPlan, check_loop_budget};
use crate::config::{AttentionShape, Tier};
use crate::error::{Error, Result};
use crate::gpu::GpuInfo;
use crate::shaders::{AttentionTiling, NaivePass, Specialization};
use crate::tensor::DType;

/// Bytes of one score row: keys padded to a multiple of 4 (vec4 slots).
fn row_bytes(seq_kv: usize) -> u64 {
    (seq_kv.div_ceil(4) as u64).saturating_mul(16)
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
        let bytes_per_unit = (shape.seq_q as u64).saturating_mul(row_bytes(shape.seq_kv));
        let units = (shape.batch as u64).saturating_mul(shape.heads_q as u64);
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
