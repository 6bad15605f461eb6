//! Standard attention, the baseline: the full score matrix is materialised
//! in device memory (`shaders/naive_attention.wgsl`). It gives the same
//! results as the flash kernel and shows what the flash kernel saves in
//! memory and time. It supports every option the flash kernel supports.

use crate::attention::AttentionArgs;
use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::plan::NaivePlan;
use crate::shaders::NaivePass;

impl Gpu {
    /// Records standard attention, the baseline, into `encoder`: three
    /// passes per chunk of (batch, head) pairs over one score buffer
    /// allocated here (the full score matrix, as standard attention holds
    /// it). Same operands, options and results as [`Gpu::forward`]
    /// without mask or sequences.
    pub fn naive_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<NaivePlan> {
        if config.active_dropout().is_some() {
            // The baseline is inference-only, as its benchmark use is.
            return Err(Error::UnsupportedCombination {
                what: "dropout and the naive attention baseline",
            });
        }
        let call = self.prepare_call(args, config)?;
        call.require_whole_kv(self)?;
        let plan = NaivePlan::for_call(self.info(), &call.shape, args.q.dtype(), config.tier)?;
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
        let scores = self.create_buffer(
            "wgpu-flash-attn naive scores",
            plan.score_buffer_bytes(),
            wgpu::BufferUsages::STORAGE,
        )?;
        let mut pipelines = Vec::with_capacity(NaivePass::ALL.len());
        for pass in NaivePass::ALL {
            let spec = plan.specialization(pass);
            pipelines.push((pass, self.pipelines.get(self, &spec)?));
        }
        // Every chunk's parameters and bind groups first, so that an error
        // leaves nothing recorded.
        let mut chunks = Vec::with_capacity(plan.chunks() as usize);
        for chunk in 0..plan.chunks() {
            let unit_base = chunk * plan.units_per_chunk;
            let units = plan.units_per_chunk.min(plan.units - unit_base);
            let mut params = call.params;
            params.unit_base = unit_base;
            let params_buffer = self.params_buffer(&params)?;
            let bind_groups = pipelines
                .iter()
                .map(|(_, pipeline)| {
                    let layout = &pipeline.bind_group_layout;
                    call.bind_group(self, layout, &params_buffer, &[&scores])
                })
                .collect::<Result<Vec<_>>>()?;
            chunks.push((units, bind_groups));
        }
        for (units, bind_groups) in &chunks {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("naive attention"),
                timestamp_writes: None,
            });
            for ((stage, pipeline), bind_group) in pipelines.iter().zip(bind_groups) {
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(plan.row_groups(*stage, call.shape.seq_q), *units, 1);
            }
        }
        Ok(plan)
    }
}
