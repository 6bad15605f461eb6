//! Recording a linear attention call: checks, then per segment of key
//! splits the state, scan and (causal) output passes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::linear::plan::slot_bytes;
use crate::linear::{FeatureMap, LinearArgs, LinearConfig, LinearPlan, LinearShape};
use crate::operands::{check_operand, check_output, check_own_buffers, vec4_strides};
use crate::params::{AttentionParams, LinearParams, linear_flags};
use crate::pipelines::{CachedPipeline, PreparedPass, bind_buffers, elementwise_groups};
use crate::shaders::LinearPass;

impl Gpu {
    /// Records linear attention (see [`crate::LinearConfig`] and
    /// `docs/semantics.md`) into `encoder`: `args.out` receives
    /// `phi(q)^T S / (phi(q) . z + eps)` over every key, or in causal
    /// calls over the keys up to each query, after `args.state` when one is
    /// given (which then ends as the state after the last token).
    ///
    /// ```
    /// # use wgpu_flash_attn::{Gpu, LinearArgs, LinearConfig, LinearShape, LinearState, Tensor, reference};
    /// # fn main() -> Result<(), wgpu_flash_attn::Error> {
    /// # if std::env::var("FLASH_ATTN_SKIP_GPU_TESTS").as_deref() == Ok("1") { eprintln!("SKIPPED: FLASH_ATTN_SKIP_GPU_TESTS=1"); return Ok(()); }
    /// let gpu = Gpu::new()?;
    /// let shape = LinearShape::self_attention(1, 100, 2, 32, 16);
    /// let data = |n: usize, seed: usize| -> Vec<f32> {
    ///     (0..n).map(|i| ((i * 7 + seed) % 13) as f32 / 6.5 - 1.0).collect()
    /// };
    /// let (q, k, v) = (data(shape.q_shape().elements(), 1), data(shape.k_shape().elements(), 2), data(shape.v_shape().elements(), 3));
    /// let upload = |dims, values: &[f32]| Tensor::from_f32(&gpu, dims, values);
    /// let (qt, kt, vt) = (upload(shape.q_shape(), &q)?, upload(shape.k_shape(), &k)?, upload(shape.v_shape(), &v)?);
    /// let out = Tensor::zeros(&gpu, shape.out_shape(), qt.dtype())?;
    /// // Causal, continuing from a state (empty here); the state ends as
    /// // the one after token 99, ready for recurrent decoding.
    /// let state = LinearState::zeros(&gpu, 1, 2, 32, 16)?;
    /// let config = LinearConfig::new().causal(true);
    /// let args = LinearArgs { q: &qt, k: &kt, v: &vt, out: &out, state: Some(&state) };
    /// gpu.run(|encoder| gpu.linear_attention(encoder, &args, &config))?;
    /// let want = reference::linear_attention(&shape, &q, &k, &v, &config, None)?;
    /// for (got, want) in out.to_f32_vec(&gpu)?.iter().zip(&want.out) {
    ///     assert!((f64::from(*got) - want).abs() <= 1e-4 * want.abs().max(1.0));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn linear_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &LinearArgs<'_>,
        config: &LinearConfig,
    ) -> Result<()> {
        let shape = args.shape()?;
        let storage = args.q.dtype();
        let plan = LinearPlan::for_call(self.info(), &shape, storage, config)?;
        self.check_linear_operands(args, &shape, config)?;
        let carried_bytes = slot_bytes(&shape) * (shape.batch * shape.heads_kv) as u64;
        let carried = match args.state {
            Some(state) => state.buffer().clone(),
            None => self.scratch_buffer("wgpu-flash-attn linear carried state", carried_bytes)?,
        };
        let split_states = self.scratch_buffer(
            "wgpu-flash-attn linear split states",
            plan.split_state_bytes(&shape),
        )?;
        let params = self.params_buffer(&AttentionParams {
            batch: shape.batch as u32,
            seq_q: shape.seq_q as u32,
            seq_kv: shape.seq_kv as u32,
            heads_q: shape.heads_q as u32,
            heads_kv: shape.heads_kv as u32,
            q: vec4_strides(args.q),
            k: vec4_strides(args.k),
            v: vec4_strides(args.v),
            o: vec4_strides(args.out),
            ..AttentionParams::default()
        })?;
        let mut flags = 0;
        if config.causal {
            flags |= linear_flags::CAUSAL;
        }
        if config.feature_map == FeatureMap::Identity {
            flags |= linear_flags::IDENTITY_MAP;
        }
        let base = LinearParams {
            flags,
            eps: config.eps,
            split_keys: plan.split_keys() as u32,
            splits: 0,
            first_split: 0,
            slot4: (slot_bytes(&shape) / 16) as u32,
            group: shape.group_size() as u32,
            _pad: 0,
        };
        let uniform = |linear: &LinearParams| {
            self.uniform_buffer("wgpu-flash-attn linear params", bytemuck::bytes_of(linear))
        };
        // One uniform per parameter set, bound by each pass that reads it.
        let bind = |layout: &wgpu::BindGroupLayout, linear: &wgpu::Buffer| {
            bind_buffers(
                self,
                layout,
                &[
                    &params,
                    args.q.buffer(),
                    args.k.buffer(),
                    args.v.buffer(),
                    args.out.buffer(),
                    &self.placeholders.writable,
                    &self.placeholders.read_only,
                    linear,
                    &split_states,
                    &carried,
                ],
            )
        };
        // One pass of `pipeline` over `grid`, bound to the parameters
        // `linear`.
        let pass = |label, pipeline: &Arc<CachedPipeline>, linear: &wgpu::Buffer, grid| {
            let bind_group = bind(&pipeline.bind_group_layout, linear)?;
            Ok::<_, Error>(PreparedPass::one(label, pipeline.clone(), bind_group, grid))
        };
        let batch_heads_q = (shape.batch * shape.heads_q) as u32;
        if config.causal && shape.seq_q == 1 && args.state.is_some() {
            // Recurrent decoding: the token joins the state in place, then
            // the query reads the updated state as a non-causal call would
            // (the same pipeline as one).
            let update_spec = plan.specialization(LinearPass::Update);
            let update = self.pipelines.get(self, &update_spec)?;
            let non_causal = LinearConfig {
                causal: false,
                ..*config
            };
            let read = LinearPlan::for_call(self.info(), &shape, storage, &non_causal)?;
            let outputs = self
                .pipelines
                .get(self, &read.specialization(LinearPass::Outputs))?;
            let groups = elementwise_groups(
                self,
                "linear attention state update",
                plan.update_invocations(),
            )?;
            // Neither pass reads the causal flag: one parameter set.
            let linear = uniform(&base)?;
            let passes = [
                pass("linear attention state update", &update, &linear, groups)?,
                pass(
                    "linear attention outputs",
                    &outputs,
                    &linear,
                    [1, batch_heads_q, 1],
                )?,
            ];
            for pass in &passes {
                pass.record(encoder);
            }
            return Ok(());
        }
        let [states, scan, outputs] = [LinearPass::States, LinearPass::Scan, LinearPass::Outputs]
            .map(|pass| self.pipelines.get(self, &plan.specialization(pass)));
        let (states, scan, outputs) = (states?, scan?, outputs?);
        let batch_heads_kv = (shape.batch * shape.heads_kv) as u32;
        let scan_groups = elementwise_groups(
            self,
            "linear attention scan",
            u64::from(base.slot4) * u64::from(batch_heads_kv),
        )?;
        // Every dispatch's parameters and bind group first, so that an
        // error leaves nothing recorded: per segment its states, scan and
        // (causal) outputs, then (non-causal) the outputs over all keys.
        let mut passes = Vec::new();
        for segment in 0..plan.segments() {
            let first_split = segment * plan.segment_splits();
            let splits = plan.segment_splits().min(plan.splits() - first_split);
            let carry_in = segment > 0 || args.state.is_some();
            let linear = uniform(&LinearParams {
                flags: flags | if carry_in { linear_flags::CARRY_IN } else { 0 },
                splits: splits as u32,
                first_split: first_split as u32,
                ..base
            })?;
            let state_groups = plan.state_workgroups(splits);
            passes.push(pass(
                "linear attention states",
                &states,
                &linear,
                state_groups,
            )?);
            passes.push(pass("linear attention scan", &scan, &linear, scan_groups)?);
            if config.causal {
                let grid = [splits as u32, batch_heads_q, 1];
                passes.push(pass("linear attention outputs", &outputs, &linear, grid)?);
            }
        }
        if !config.causal {
            // Every query block against the total state.
            let blocks = shape.seq_q.div_ceil(plan.chunk()) as u32;
            let grid = [blocks, batch_heads_q, 1];
            passes.push(pass(
                "linear attention outputs",
                &outputs,
                &uniform(&base)?,
                grid,
            )?);
        }
        for pass in &passes {
            pass.record(encoder);
        }
        Ok(())
    }

    /// Dtypes, alignment, bounds, devices, aliasing and the state's dims.
    fn check_linear_operands(
        &self,
        args: &LinearArgs<'_>,
        shape: &LinearShape,
        config: &LinearConfig,
    ) -> Result<()> {
        let storage = args.q.dtype();
        let inputs = [("q", args.q), ("k", args.k), ("v", args.v)];
        for (name, tensor) in inputs {
            check_operand(self, name, tensor, storage)?;
        }
        check_output(self, "out", args.out, storage)?;
        // The carried state is read and written in place: an operand's
        // buffer too (a tensor view of the state's own buffer).
        let mut writes = vec![("out", args.out.buffer())];
        writes.extend(args.state.map(|state| ("linear state", state.buffer())));
        let reads = inputs.map(|(name, tensor)| (name, tensor.buffer()));
        check_own_buffers(&writes, &reads)?;
        let Some(state) = args.state else {
            return Ok(());
        };
        if !config.causal {
            return Err(Error::UnsupportedCombination {
                what: "a LinearState and non-causal linear attention",
            });
        }
        state.check_device(self)?;
        let expected = [
            shape.batch,
            shape.heads_kv,
            shape.head_dim,
            shape.head_dim_v,
        ];
        if state.dims() != expected {
            return Err(Error::LinearStateShape {
                expected,
                got: state.dims(),
            });
        }
        Ok(())
    }
}
