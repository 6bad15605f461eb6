//! Standard attention, the baseline: the full score matrix is materialised
//! in device memory (`shaders/naive_attention.wgsl`). It gives the same
//! results as the flash kernel and shows what the flash kernel saves in
//! memory and time. It supports every option the flash kernel supports.

use crate::attention::AttentionArgs;
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::shaders::{AttentionTiling, NaivePass, Specialization};
use crate::tensor::DType;

/// Bytes of one score row: keys padded to a multiple of 4 (vec4 slots).
fn row_bytes(seq_kv: usize) -> u64 {
    seq_kv.div_ceil(4) as u64 * 16
}

/// Bytes of the whole score matrix, `[batch, heads_q, seq_q, seq_kv]` f32,
/// as standard attention would hold it.
pub fn full_score_bytes(shape: &AttentionShape) -> u64 {
    (shape.batch * shape.heads_q * shape.seq_q) as u64 * row_bytes(shape.seq_kv)
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
    pub fn new(gpu: &Gpu, shape: &AttentionShape) -> Result<Self> {
        Self::for_call(gpu, shape, DType::F32, None)
    }

    /// The plan for one call: storage type and, if forced, the tier of the
    /// matrix products.
    pub fn for_call(
        gpu: &Gpu,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<crate::Tier>,
    ) -> Result<Self> {
        let forward = crate::ForwardPlan::for_call(gpu, shape, storage, tier)?;
        let tiling = *forward
            .specialization
            .attention_tiling()
            .expect("ForwardPlan always plans the flash kernel");
        let limits = &gpu.info().limits;
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
                total_bytes: full_score_bytes(shape),
                limit_name,
                limit,
            });
        }
        let units_per_chunk = (limit / bytes_per_unit)
            .min(units)
            .min(u64::from(limits.max_compute_workgroups_per_dimension));
        for pass in NaivePass::ALL {
            gpu.check_loop_budget(&Specialization::Naive { pass, tiling }, shape.seq_kv as u64)?;
        }
        Ok(NaivePlan {
            units: units as u32,
            units_per_chunk: units_per_chunk as u32,
            bytes_per_unit,
            tiling,
        })
    }

    /// Bytes of the score buffer a call allocates.
    pub fn score_buffer_bytes(&self) -> u64 {
        u64::from(self.units_per_chunk) * self.bytes_per_unit
    }

    pub fn chunks(&self) -> u32 {
        self.units.div_ceil(self.units_per_chunk)
    }

    fn specialization(&self, pass: NaivePass) -> Specialization {
        Specialization::Naive {
            pass,
            tiling: self.tiling,
        }
    }

    /// Workgroups along x for `pass` (query rows).
    fn row_groups(&self, pass: NaivePass, seq_q: usize) -> u32 {
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

impl Gpu {
    /// Standard attention into caller-owned outputs: records and submits.
    pub fn naive_attention_into(
        &self,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<NaivePlan> {
        self.submit_recorded("naive attention dispatch", |encoder| {
            self.encode_naive_attention(encoder, args, config)
        })
    }

    /// Records standard attention into the caller's encoder: three passes
    /// per chunk of (batch, head) pairs, over one score buffer allocated
    /// here. Same operands, options and results as
    /// [`Gpu::encode_attention`].
    pub fn encode_naive_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<NaivePlan> {
        let call = self.prepare_call(args, config)?;
        let plan = NaivePlan::for_call(self, &call.shape, args.q.dtype(), config.tier)?;
        let x_limit = self.info().limits.max_compute_workgroups_per_dimension;
        let x_groups = plan.row_groups(NaivePass::Softmax, call.shape.seq_q);
        if x_groups > x_limit {
            return Err(Error::DispatchTooLarge {
                what: "naive attention",
                axis: "query rows",
                groups: u64::from(x_groups),
                limit: x_limit,
            });
        }
        let scores = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-flash-attn naive scores"),
            size: plan.score_buffer_bytes(),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let mut pipelines = Vec::with_capacity(NaivePass::ALL.len());
        for pass in NaivePass::ALL {
            let spec = plan.specialization(pass);
            pipelines.push((pass, self.pipelines.get(&self.device, &spec)?));
        }
        for chunk in 0..plan.chunks() {
            let unit_base = chunk * plan.units_per_chunk;
            let units = plan.units_per_chunk.min(plan.units - unit_base);
            let mut params = call.params;
            params.unit_base = unit_base;
            let params_buffer = self.params_buffer(&params);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("naive attention"),
                timestamp_writes: None,
            });
            for (stage, pipeline) in &pipelines {
                let bind_group = call.bind_group(
                    self,
                    &pipeline.bind_group_layout,
                    &params_buffer,
                    &[&scores],
                );
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(plan.row_groups(*stage, call.shape.seq_q), units, 1);
            }
        }
        Ok(plan)
    }
}
