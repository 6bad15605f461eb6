//! Recording the backward: operand checks, then the three passes of
//! shaders/flash_backward.wgsl, each one dispatch over every batch entry
//! (dense calls) or every sequence (padded or packed batches, read from a
//! table of units).

use crate::attention::{ForwardOptions, Sequences, option_params, upload_packed};
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lse::{Lse, check_lse_output};
use crate::mask::AttentionMask;
use crate::operands::{check_operand, check_output, check_own_buffers, vec4_view};
use crate::params::{AttentionParams, BackwardParams, BackwardUnit, flags};
use crate::pipelines::{PreparedPass, bind_buffers};
use crate::shaders::BackwardPass;
use crate::tensor::{DType, Tensor};
use crate::varlen::{Sequence, padded_sequences, varlen_sequences};

use super::{BackwardArgs, BackwardPlan, HostGradients, SinkGrads};

/// What the passes' workgroups along y work on: a dense call's batch
/// entries, or a padded or packed call's sequences (`BackwardUnit`s, read
/// by the kernels from a table).
struct Units {
    /// The table; `None` for a dense call.
    table: Option<Vec<BackwardUnit>>,
    /// The shape every unit fits: its batch is the number of units, its
    /// lengths the longest unit's (workgroups past a shorter unit's rows
    /// or keys return at once).
    shape: AttentionShape,
    /// The most query rows and keys a unit writes (padding included).
    extent_q: usize,
    extent_kv: usize,
}

impl Units {
    fn dense(shape: &AttentionShape) -> Self {
        Units {
            table: None,
            shape: *shape,
            extent_q: shape.seq_q,
            extent_kv: shape.seq_kv,
        }
    }

    /// One unit per sequence, each writing the rows and keys `extents`
    /// gives it (past its lengths: zero gradients).
    fn of_sequences(
        shape: &AttentionShape,
        sequences: &[Sequence],
        extents: impl Fn(&Sequence) -> (usize, usize),
    ) -> Self {
        let table: Vec<BackwardUnit> = sequences
            .iter()
            .map(|s| {
                let (extent_q, extent_kv) = extents(s);
                s.backward_unit(extent_q, extent_kv)
            })
            .collect();
        let longest = |f: fn(&BackwardUnit) -> u32| table.iter().map(f).max().unwrap_or(0) as usize;
        Units {
            shape: AttentionShape {
                batch: table.len(),
                seq_q: longest(|u| u.q_len),
                seq_kv: longest(|u| u.kv_len),
                ..*shape
            },
            extent_q: longest(|u| u.extent_q),
            extent_kv: longest(|u| u.extent_kv),
            table: Some(table),
        }
    }
}

impl Gpu {
    /// Records the backward pass into `encoder` (nothing is submitted):
    /// `args.dq`, `args.dk` and `args.dv` receive the gradients of a loss
    /// `L` with respect to the forward's `q`, `k` and `v`, given
    /// `args.d_out` = dL/d`out`, for the forward that produced `args.out`
    /// and `args.lse` under the same `options` (config, mask, padded or
    /// packed sequences).
    ///
    /// FlashAttention-2's algorithm: the probabilities are recomputed tile
    /// by tile from the saved logsumexp (memory stays linear in the
    /// sequence length), dK and dV are summed per block of keys and dQ per
    /// block of query rows, without atomics: the same inputs give the same
    /// bits on every run. Not differentiated: the mask's bias, ALiBi
    /// slopes, the scale and the softcap (constants of the call). Rows
    /// that see no key get zero gradients, as do padded rows and keys.
    ///
    /// ```
    /// # use wgpu_flash_attn::{AttentionConfig, BackwardArgs, Gpu, Lse, Tensor, TensorShape};
    /// # fn main() -> Result<(), wgpu_flash_attn::Error> {
    /// # if std::env::var("FLASH_ATTN_SKIP_GPU_TESTS").as_deref() == Ok("1") { eprintln!("SKIPPED: FLASH_ATTN_SKIP_GPU_TESTS=1"); return Ok(()); }
    /// let gpu = Gpu::new()?;
    /// let dims = TensorShape::new(1, 16, 2, 32);
    /// let values: Vec<f32> = (0..dims.elements()).map(|i| (i % 7) as f32 / 7.0).collect();
    /// let x = Tensor::from_f32(&gpu, dims, &values)?;
    /// let zeros = || Tensor::zeros(&gpu, dims, x.dtype());
    /// let (out, d_out, dq, dk, dv) = (zeros()?, zeros()?, zeros()?, zeros()?, zeros()?);
    /// let lse = Lse::new(&gpu, 1, 2, 16)?;
    /// let config = AttentionConfig::new().causal(true);
    /// gpu.run(|encoder| {
    ///     let backward = BackwardArgs { q: &x, k: &x, v: &x, out: &out, lse: &lse, d_out: &d_out, dq: &dq, dk: &dk, dv: &dv, dsinks: None };
    ///     // The forward that writes the output and logsumexp it reads.
    ///     gpu.forward(encoder, &backward.forward_args(), &config)?;
    ///     gpu.backward(encoder, &backward, &config)
    /// })?;
    /// // A zero output gradient has zero input gradients.
    /// assert!(dq.to_f32_vec(&gpu)?.iter().all(|&g| g == 0.0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn backward<'o>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &BackwardArgs<'_>,
        options: impl Into<ForwardOptions<'o>>,
    ) -> Result<()> {
        let options = options.into();
        let config = &options.config;
        let shape = args.shape()?;
        config.validate(&shape)?;
        check_lse_output(
            self,
            Some(args.lse),
            [shape.batch, shape.heads_q, shape.seq_q],
        )?;
        check_backward_operands(self, args)?;
        let plan = BackwardPlan::for_config(self.info(), &shape, args.q.dtype(), config)?;
        if let Some(dsinks) = args.dsinks {
            if config.sinks.is_none() {
                return Err(Error::UnsupportedCombination {
                    what: "dsinks without attention sinks in the config",
                });
            }
            dsinks.check_device(self)?;
            if dsinks.heads() != shape.heads_q {
                return Err(Error::SinksLength {
                    heads_q: shape.heads_q,
                    got: dsinks.heads(),
                });
            }
            plan.check_sinks(self.info(), &shape)?;
        }
        let mask = options.mask;
        if let Some(mask) = mask {
            mask.check_shape(&shape)?;
            mask.check_device(self)?;
        }
        let units = match (options.sequences, mask) {
            (Sequences::Dense, _) => Units::dense(&shape),
            (_, Some(_)) => {
                return Err(Error::UnsupportedCombination {
                    what: "a mask and padded or variable-length sequences",
                });
            }
            // Every row and key of each batch entry is written: past the
            // valid lengths, zero gradients.
            (Sequences::Padded(lengths), None) => {
                Units::of_sequences(&shape, &padded_sequences(&shape, &lengths)?, |_| {
                    (shape.seq_q, shape.seq_kv)
                })
            }
            (
                Sequences::Varlen {
                    cu_seqlens_q,
                    cu_seqlens_k,
                },
                None,
            ) => {
                let sequences = varlen_sequences(
                    &[
                        ("q", args.q),
                        ("k", args.k),
                        ("v", args.v),
                        ("out", args.out),
                        ("d_out", args.d_out),
                        ("dq", args.dq),
                        ("dk", args.dk),
                        ("dv", args.dv),
                    ],
                    shape.seq_q,
                    shape.seq_kv,
                    cu_seqlens_q,
                    cu_seqlens_k,
                )?;
                // Every row and key of a packed batch is its sequence's.
                Units::of_sequences(&shape, &sequences, |s| (s.q_len, s.kv_len))
            }
        };
        // One workgroup row along y per unit: more sequences than the
        // adapter's workgroup limit is `DispatchTooLarge` (as in the
        // forward).
        plan.check_call(self.info(), &units.shape, units.extent_q, units.extent_kv)?;
        // Row deltas in the logsumexp's layout, then (with dsinks) one
        // gradient per query head.
        let rows = (shape.batch * shape.heads_q * shape.seq_q) as u64;
        let deltas = self.scratch_buffer(
            "backward row deltas",
            4 * (rows + args.dsinks.map_or(0, |_| shape.heads_q as u64)),
        )?;
        let recorder = Recorder {
            gpu: self,
            plan,
            args,
            config,
            mask,
            shape,
            deltas,
            head_table: self.head_table_buffer(config)?,
        };
        // Every pass's kernel, buffers and bind group before the first pass
        // is recorded: an error (a kernel the driver refuses, memory out)
        // then leaves nothing in the encoder.
        let mut passes = recorder.prepare(&units)?;
        if args.dsinks.is_some() {
            passes.push(recorder.prepare_sinks()?);
        }
        for pass in &passes {
            pass.record(encoder);
        }
        if let Some(dsinks) = args.dsinks {
            encoder.copy_buffer_to_buffer(
                &recorder.deltas,
                4 * rows,
                dsinks.buffer(),
                0,
                4 * shape.heads_q as u64,
            );
        }
        Ok(())
    }

    /// Host slices in, host vectors out: uploads packed BSHD f32 inputs and
    /// the output gradient `d_out`, runs the forward and the backward, waits
    /// and downloads the output, logsumexp and gradients. For quick use and
    /// tests; device-resident data should use [`Gpu::backward`].
    pub fn attention_backward_host(
        &self,
        shape: &AttentionShape,
        [q, k, v, d_out]: [&[f32]; 4],
        config: &AttentionConfig,
    ) -> Result<HostGradients> {
        config.validate(shape)?;
        let upload = |name, dims, data| upload_packed(self, name, dims, data);
        let q = upload("q", shape.q_shape(), q)?;
        let k = upload("k", shape.k_shape(), k)?;
        let v = upload("v", shape.v_shape(), v)?;
        let d_out = upload("d_out", shape.o_shape(), d_out)?;
        let zeros = |dims| Tensor::zeros(self, dims, DType::F32);
        let (out, dq, dk, dv) = (
            zeros(shape.o_shape())?,
            zeros(shape.q_shape())?,
            zeros(shape.k_shape())?,
            zeros(shape.v_shape())?,
        );
        let lse = Lse::new(self, shape.batch, shape.heads_q, shape.seq_q)?;
        let dsinks = SinkGrads::for_config(self, config, shape.heads_q)?;
        self.run(|encoder| {
            let backward = BackwardArgs {
                q: &q,
                k: &k,
                v: &v,
                out: &out,
                lse: &lse,
                d_out: &d_out,
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dsinks: dsinks.as_ref(),
            };
            self.forward(encoder, &backward.forward_args(), config)?;
            self.backward(encoder, &backward, config)
        })?;
        Ok(HostGradients {
            out: out.to_f32_vec(self)?,
            lse: lse.to_vec(self)?,
            dq: dq.to_f32_vec(self)?,
            dk: dk.to_f32_vec(self)?,
            dv: dv.to_f32_vec(self)?,
            dsinks: match &dsinks {
                Some(dsinks) => dsinks.to_vec(self)?,
                None => Vec::new(),
            },
        })
    }
}

/// Device, storage type, alignment, bounds and aliasing of every operand.
/// Outputs may not share a buffer with any input or with each other: the
/// kernels bind inputs read-only and outputs writable.
fn check_backward_operands(gpu: &Gpu, args: &BackwardArgs<'_>) -> Result<()> {
    let storage = args.q.dtype();
    let inputs = [
        ("q", args.q),
        ("k", args.k),
        ("v", args.v),
        ("out", args.out),
        ("d_out", args.d_out),
    ];
    let outputs = [("dq", args.dq), ("dk", args.dk), ("dv", args.dv)];
    for (name, tensor) in inputs {
        check_operand(gpu, name, tensor, storage)?;
    }
    // `out` too: the forward before the backward writes it.
    for (name, tensor) in outputs.iter().copied().chain([("out", args.out)]) {
        check_output(gpu, name, tensor, storage)?;
    }
    // The logsumexp and `out` are read here, but bound writable: `out` is
    // the forward's output binding (the row-delta pass writes it when run
    // after a forward) and the logsumexp is the forward's too.
    let mut writes = outputs.map(|(name, t)| (name, t.buffer())).to_vec();
    writes.extend([("lse", args.lse.buffer()), ("out", args.out.buffer())]);
    let reads = inputs
        .iter()
        .filter(|(name, _)| *name != "out")
        .map(|&(name, t)| (name, t.buffer()))
        .collect::<Vec<_>>();
    check_own_buffers(&writes, &reads)?;
    Ok(())
}

/// What every part of one call shares.
struct Recorder<'a> {
    gpu: &'a Gpu,
    plan: BackwardPlan,
    args: &'a BackwardArgs<'a>,
    config: &'a AttentionConfig,
    mask: Option<&'a AttentionMask>,
    shape: AttentionShape,
    deltas: wgpu::Buffer,
    /// The call's per-head table (ALiBi slopes, sinks), uploaded once.
    head_table: Option<wgpu::Buffer>,
}

impl Recorder<'_> {
    /// The three passes, each one dispatch over every unit (a pass with
    /// nothing to write left out).
    fn prepare(&self, units: &Units) -> Result<Vec<PreparedPass>> {
        let gpu = self.gpu;
        let args = self.args;
        let whole = |t: &Tensor| vec4_view(t.strides(), t.offset());
        let mut params = option_params(&units.shape, self.config, false);
        params.q = whole(args.q);
        params.k = whole(args.k);
        params.v = whole(args.v);
        let lse_seq = self.shape.seq_q;
        let mut backward = BackwardParams {
            head_dim4: (self.shape.head_dim / 4) as u32,
            head_dim_v4: (self.shape.head_dim_v / 4) as u32,
            group: self.shape.group_size() as u32,
            scale: self.config.effective_scale(self.shape.head_dim),
            stats_batch: (self.shape.heads_q * lse_seq) as u32,
            stats_head: lse_seq as u32,
            d_out: whole(args.d_out),
            dv: whole(args.dv),
            ..BackwardParams::default()
        };
        if let Some(mask) = self.mask {
            let layout = mask.word_layout();
            backward.mask_kind = layout.kind + 1;
            backward.mask_batch = layout.batch_stride;
            backward.mask_head = layout.head_stride;
            backward.mask_row_words = layout.row_words;
        }
        let backward_uniform = gpu.uniform_buffer(
            "wgpu-flash-attn backward params",
            bytemuck::bytes_of(&backward),
        )?;
        let placeholders = &gpu.placeholders;
        // Binding 11: the unit table, the mask's words, or nothing (masked
        // calls are dense, so never both).
        let table_words = match (&units.table, self.mask) {
            (Some(table), _) => {
                params.flags |= flags::SEQUENCES;
                gpu.storage_buffer(
                    "wgpu-flash-attn backward units",
                    bytemuck::cast_slice(table),
                )?
            }
            (None, Some(mask)) => mask.buffer().clone(),
            (None, None) => placeholders.read_only.clone(),
        };
        let head_table = self.head_table.as_ref().unwrap_or(&placeholders.read_only);
        let mut prepared = Vec::with_capacity(3);
        let passes = [
            (BackwardPass::Deltas, args.out, None, units.extent_q),
            (BackwardPass::Keys, args.dk, Some(args.dv), units.extent_kv),
            (BackwardPass::Queries, args.dq, None, units.extent_q),
        ];
        for (pass, written, dv, extent) in passes {
            if extent == 0 {
                continue;
            }
            let pass_params = AttentionParams {
                o: whole(written),
                ..params
            };
            let params_buffer = gpu.params_buffer(&pass_params)?;
            let groups = self
                .plan
                .workgroups(pass, &units.shape, units.extent_q, units.extent_kv);
            let bindings = PassBindings {
                params: &params_buffer,
                written: written.buffer(),
                head_table,
                backward: &backward_uniform,
                dv: dv.map_or(&placeholders.writable, |t| t.buffer()),
                table_words: &table_words,
            };
            prepared.push(self.prepare_pass(pass, &bindings, groups)?);
        }
        Ok(prepared)
    }

    /// One pass's dispatch over the bindings every pass shares (those of
    /// the call's operands) and the pass's own.
    fn prepare_pass(
        &self,
        pass: BackwardPass,
        own: &PassBindings<'_>,
        groups: [u64; 3],
    ) -> Result<PreparedPass> {
        let gpu = self.gpu;
        let args = self.args;
        let pipeline = gpu.pipelines.get(gpu, &self.plan.specialization(pass))?;
        let bind_group = bind_buffers(
            gpu,
            &pipeline.bind_group_layout,
            &[
                own.params,
                args.q.buffer(),
                args.k.buffer(),
                args.v.buffer(),
                own.written,
                args.lse.buffer(),
                own.head_table,
                own.backward,
                args.d_out.buffer(),
                &self.deltas,
                own.dv,
                own.table_words,
            ],
        )?;
        let grid = groups.map(|n| n as u32);
        Ok(PreparedPass::one(
            pass_label(pass),
            pipeline,
            bind_group,
            grid,
        ))
    }
}

/// What one backward pass binds besides the call's operands.
struct PassBindings<'a> {
    params: &'a wgpu::Buffer,
    /// Binding 4: O (row deltas), dK (key pass) or dQ (query pass).
    written: &'a wgpu::Buffer,
    head_table: &'a wgpu::Buffer,
    backward: &'a wgpu::Buffer,
    dv: &'a wgpu::Buffer,
    /// Binding 11: the unit table or the mask's words.
    table_words: &'a wgpu::Buffer,
}

impl Recorder<'_> {
    /// The sinks' gradients over the whole call, after every part wrote
    /// its rows' deltas: one workgroup per query head, into the deltas
    /// scratch past the rows. It reads only the logsumexp, the table and
    /// the deltas; the rest is bound as for the row-delta pass.
    fn prepare_sinks(&self) -> Result<PreparedPass> {
        let gpu = self.gpu;
        let params = option_params(&self.shape, self.config, false);
        let params_buffer = gpu.params_buffer(&params)?;
        let backward_uniform = gpu.uniform_buffer(
            "wgpu-flash-attn backward params",
            bytemuck::bytes_of(&BackwardParams::default()),
        )?;
        let placeholders = &gpu.placeholders;
        let bindings = PassBindings {
            params: &params_buffer,
            written: self.args.out.buffer(),
            head_table: self.head_table.as_ref().unwrap_or(&placeholders.read_only),
            backward: &backward_uniform,
            dv: &placeholders.writable,
            table_words: &placeholders.read_only,
        };
        let groups = self.plan.workgroups(BackwardPass::Sinks, &self.shape, 0, 0);
        self.prepare_pass(BackwardPass::Sinks, &bindings, groups)
    }
}

fn pass_label(pass: BackwardPass) -> &'static str {
    match pass {
        BackwardPass::Sinks => "attention backward: dsinks",
        BackwardPass::Deltas => "attention backward: row deltas",
        BackwardPass::Keys => "attention backward: dK, dV",
        BackwardPass::Queries => "attention backward: dQ",
    }
}
