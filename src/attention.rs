//! The forward call: checks operands against the shape and the adapter,
//! plans tiles from the adapter's limits, and records the dispatch.

use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::key_chunks::{ChunkLimits, KvView, Window, plan_key_chunks};
use crate::lse::{Lse, check_lse_output};
use crate::mask::AttentionMask;
use crate::operands::{
    VEC_WIDTH, check_operand, check_output, check_own_buffers, check_unbound_operand,
    require_equal, vec4_strides,
};
use crate::params::{AttentionParams, SequenceRows, blocked_flags, flags};
use crate::pipelines::{PreparedPass, bind_resources, encode_dispatches};
use crate::plan::{ForwardPlan, check_loop_budget};
use crate::tensor::{DType, Tensor, TensorShape, check_binding_size};
use crate::varlen::{Sequence, ValidLengths};

/// What [`Gpu::attention_host`] returns.
#[derive(Debug, Clone)]
pub struct HostAttentionOutput {
    /// `[batch, seq_q, heads_q, head_dim]`, packed.
    pub out: Vec<f32>,
    /// `[batch, heads_q, seq_q]`, natural log; `+inf` for rows that see no
    /// key.
    pub lse: Vec<f32>,
}

/// How the rows of a forward call's batch form sequences.
#[derive(Debug, Clone, Copy, Default)]
pub enum Sequences<'a> {
    /// Every batch entry is one sequence of `seq_q` queries and `seq_kv`
    /// keys.
    #[default]
    Dense,
    /// A dense batch in which sequence `b` has only its first valid rows
    /// and keys (BERT's key padding): padding is never read or computed,
    /// padded query rows are written as zeros (logsumexp `+inf`).
    Padded(ValidLengths<'a>),
    /// A packed batch (FlashAttention's varlen convention): tensors are
    /// `[1, total_tokens, heads, head_dim]` and sequence `i` holds query
    /// tokens `cu_seqlens_q[i]..cu_seqlens_q[i + 1]` and key tokens
    /// `cu_seqlens_k[i]..cu_seqlens_k[i + 1]`.
    Varlen {
        /// `batch + 1` non-decreasing offsets from 0 to `total_q`.
        cu_seqlens_q: &'a [usize],
        /// `batch + 1` non-decreasing offsets from 0 to `total_k`.
        cu_seqlens_k: &'a [usize],
    },
}

/// Everything a forward call may take besides its tensors: the attention
/// options, an optional mask and how the batch forms sequences.
///
/// An `&AttentionConfig` converts into options without mask or sequences,
/// so `gpu.forward(encoder, &args, &config)` is the plain call.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions<'a> {
    /// Causal, windows, scale, softcap, ALiBi, tier.
    pub config: AttentionConfig,
    /// A bias, boolean or block-sparse mask on top of the config's options.
    pub mask: Option<&'a AttentionMask>,
    /// Dense (default), padded or packed variable-length batches.
    pub sequences: Sequences<'a>,
    /// The most keys of a sequence one dispatch visits; `None`: as many as
    /// the adapter allows. Longer calls run their keys in chunks, one
    /// dispatch each, whose results are merged exactly (see
    /// [`Gpu::forward`]); a smaller bound keeps every dispatch short, e.g.
    /// under a driver's watchdog. Not with a mask.
    pub keys_per_dispatch: Option<usize>,
}

impl<'a> ForwardOptions<'a> {
    /// Options with `config` and nothing else.
    pub fn new(config: &AttentionConfig) -> Self {
        ForwardOptions {
            config: config.clone(),
            ..Self::default()
        }
    }
    /// Adds a mask.
    pub fn mask(mut self, mask: &'a AttentionMask) -> Self {
        self.mask = Some(mask);
        self
    }
    /// Valid lengths of a dense batch (see [`Sequences::Padded`]).
    pub fn valid_lengths(mut self, lengths: ValidLengths<'a>) -> Self {
        self.sequences = Sequences::Padded(lengths);
        self
    }
    /// At most `keys` keys per dispatch (see
    /// [`ForwardOptions::keys_per_dispatch`]).
    pub fn keys_per_dispatch(mut self, keys: usize) -> Self {
        self.keys_per_dispatch = Some(keys);
        self
    }
    /// A packed variable-length batch (see [`Sequences::Varlen`]).
    pub fn varlen(mut self, cu_seqlens_q: &'a [usize], cu_seqlens_k: &'a [usize]) -> Self {
        self.sequences = Sequences::Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
        };
        self
    }
}

impl From<&AttentionConfig> for ForwardOptions<'_> {
    fn from(config: &AttentionConfig) -> Self {
        ForwardOptions::new(config)
    }
}

impl From<AttentionConfig> for ForwardOptions<'_> {
    fn from(config: AttentionConfig) -> Self {
        ForwardOptions {
            config,
            ..ForwardOptions::default()
        }
    }
}

/// The operands of one call; outputs are written in place.
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs<'a> {
    /// `[batch, seq_q, heads_q, head_dim]` queries; their dtype is the call's storage type, which
    /// K, V and `out` share.
    pub q: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim]` keys.
    pub k: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim_v]` values (`head_dim_v` is
    /// usually `head_dim`; see [`AttentionShape`]).
    pub v: &'a Tensor,
    /// Output, `[batch, seq_q, heads_q, head_dim_v]`; written in place.
    pub out: &'a Tensor,
    /// Optional logsumexp output, `[batch, heads_q, seq_q]`, written alongside `out`.
    pub lse: Option<&'a Lse>,
}

impl AttentionArgs<'_> {
    /// The call's shape, after checking that Q, K, V and O agree.
    pub fn shape(&self) -> Result<AttentionShape> {
        let (q, k, v, o) = (
            self.q.shape(),
            self.k.shape(),
            self.v.shape(),
            self.out.shape(),
        );
        let pairs = [
            (
                "K and V shapes differ",
                "k.batch",
                k.batch,
                "v.batch",
                v.batch,
            ),
            ("K and V shapes differ", "k.seq", k.seq, "v.seq", v.seq),
            (
                "K and V shapes differ",
                "k.heads",
                k.heads,
                "v.heads",
                v.heads,
            ),
            (
                "Q and K batch differ",
                "q.batch",
                q.batch,
                "k.batch",
                k.batch,
            ),
            (
                "Q and K head dim differ",
                "q.head_dim",
                q.head_dim,
                "k.head_dim",
                k.head_dim,
            ),
            (
                "O must be shaped like Q",
                "q.batch",
                q.batch,
                "out.batch",
                o.batch,
            ),
            ("O must be shaped like Q", "q.seq", q.seq, "out.seq", o.seq),
            (
                "O must be shaped like Q",
                "q.heads",
                q.heads,
                "out.heads",
                o.heads,
            ),
            (
                "O is [batch, seq_q, heads_q, head_dim_v]",
                "v.head_dim",
                v.head_dim,
                "out.head_dim",
                o.head_dim,
            ),
        ];
        require_equal(&pairs)?;
        Ok(AttentionShape {
            batch: q.batch,
            seq_q: q.seq,
            seq_kv: k.seq,
            heads_q: q.heads,
            heads_kv: k.heads,
            head_dim: q.head_dim,
            head_dim_v: v.head_dim,
        })
    }
}

impl Gpu {
    /// Records the forward pass into `encoder` (nothing is submitted):
    /// `args.out` (and `args.lse` when given) receive attention of `args.q`
    /// over `args.k`/`args.v` under `options` (an `&AttentionConfig`, or
    /// [`ForwardOptions`] with a mask or variable-length sequences).
    /// Submit the encoder yourself, or use [`Gpu::run`].
    ///
    /// Keys that do not fit one dispatch (K or V past
    /// `max_storage_buffer_binding_size`, past a software adapter's loop
    /// budget, or past [`ForwardOptions::keys_per_dispatch`]) run in chunks,
    /// one dispatch each, binding windows of K and V; every row continues
    /// its online softmax from chunk to chunk, so the result is the
    /// one-dispatch result up to f32 rounding (src/key_chunks.rs). Masked
    /// calls do not chunk.
    ///
    /// ```
    /// # use wgpu_flash_attn::{AttentionArgs, AttentionConfig, AttentionMask, ForwardOptions, Gpu, Tensor, TensorShape};
    /// # fn main() -> Result<(), wgpu_flash_attn::Error> {
    /// # if std::env::var("FLASH_ATTN_SKIP_GPU_TESTS").as_deref() == Ok("1") { eprintln!("SKIPPED: FLASH_ATTN_SKIP_GPU_TESTS=1"); return Ok(()); }
    /// let gpu = Gpu::new()?;
    /// let dims = TensorShape::new(1, 16, 2, 32);
    /// let values: Vec<f32> = (0..dims.elements()).map(|i| (i % 11) as f32 / 11.0).collect();
    /// let x = Tensor::from_f32(&gpu, dims, &values)?;
    /// let (plain, masked) = (Tensor::zeros(&gpu, dims, x.dtype())?, Tensor::zeros(&gpu, dims, x.dtype())?);
    /// let args = |out| AttentionArgs { q: &x, k: &x, v: &x, out, lse: None };
    /// // A boolean mask that hides nothing: the same result as no mask.
    /// let mask = AttentionMask::boolean(&gpu, [1, 1, 16, 16], &[true; 256])?;
    /// let config = AttentionConfig::new().causal(true);
    /// let mut encoder = gpu.device().create_command_encoder(&Default::default());
    /// gpu.forward(&mut encoder, &args(&plain), &config)?;
    /// gpu.forward(&mut encoder, &args(&masked), ForwardOptions::new(&config).mask(&mask))?;
    /// gpu.queue().submit([encoder.finish()]);
    /// assert_eq!(plain.to_f32_vec(&gpu)?, masked.to_f32_vec(&gpu)?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward<'o>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        options: impl Into<ForwardOptions<'o>>,
    ) -> Result<()> {
        let options = options.into();
        let keys = options.keys_per_dispatch;
        if keys == Some(0) {
            return Err(Error::KeysPerDispatch(0));
        }
        match (options.sequences, options.mask) {
            (_, Some(_)) if keys.is_some() => Err(Error::UnsupportedCombination {
                what: "a mask and keys_per_dispatch",
            }),
            (Sequences::Dense, mask) => {
                self.encode_forward(encoder, args, &options.config, mask, keys)
            }
            (_, Some(_)) => Err(Error::UnsupportedCombination {
                what: "a mask and padded or variable-length sequences",
            }),
            (Sequences::Padded(lengths), None) => {
                self.encode_padded_attention(encoder, args, &options.config, &lengths, keys)
            }
            (
                Sequences::Varlen {
                    cu_seqlens_q,
                    cu_seqlens_k,
                },
                None,
            ) => self.encode_varlen_attention(
                encoder,
                args,
                &options.config,
                (cu_seqlens_q, cu_seqlens_k),
                keys,
            ),
        }
    }

    /// The forward dispatch, with the mask variant of the kernel when a
    /// mask is given (bindings 7-9: its words, tile states, parameters).
    pub(crate) fn encode_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        mask: Option<&AttentionMask>,
        keys_per_dispatch: Option<usize>,
    ) -> Result<()> {
        let call = self.prepare_call(args, config)?;
        let Some(mask) = mask else {
            // Few query rows per KV head over many keys: split-KV decoding
            // (src/forward_as_decode.rs).
            if keys_per_dispatch.is_none()
                && self.forward_as_decode(encoder, args, config, &call.shape)?
            {
                return Ok(());
            }
            let shape = &call.shape;
            let units = (0..shape.batch)
                .map(|b| Sequence::dense(b, shape).rows(b, shape.seq_q))
                .collect();
            return call.dispatch_units(self, encoder, units, keys_per_dispatch, false);
        };
        call.require_whole_kv(self)?;
        let params_buffer = self.params_buffer(&call.params)?;
        mask.check_shape(&call.shape)?;
        mask.check_device(self)?;
        // Mask tiles are per head: a masked call's rows are never grouped.
        let plan = call.plan.without_grouped_rows();
        let spec = plan.masked_specialization();
        check_loop_budget(self.info(), &spec, call.shape.seq_kv as u64)?;
        let pipeline = self.pipelines.get(self, &spec)?;
        let (mask_params, tiles) = mask.params(self, plan.block_m(), plan.block_n())?;
        let mask_uniform = self.uniform_buffer("mask params", bytemuck::bytes_of(&mask_params))?;
        let tiles = tiles.unwrap_or_else(|| self.placeholders.read_only.clone());
        let bind_group = call.bind_group(
            self,
            &pipeline.bind_group_layout,
            &params_buffer,
            &[mask.buffer(), &tiles, &mask_uniform],
        )?;
        encode_dispatches(
            encoder,
            "masked flash attention forward",
            &pipeline,
            &[bind_group],
            plan.workgroups(),
        );
        Ok(())
    }

    /// Checks one call's operands and options against each other and the
    /// adapter, and packs what every attention kernel binds.
    pub(crate) fn prepare_call<'a>(
        &self,
        args: &AttentionArgs<'a>,
        config: &AttentionConfig,
    ) -> Result<PreparedCall<'a>> {
        let shape = args.shape()?;
        self.prepare_planned_call(args, config, shape, &shape)
    }

    /// [`Gpu::prepare_call`] for a call of `shape` (`args.shape()`) with
    /// tiles and workgroups planned for `plan_shape`: one unit per sequence of a padded or variable-length
    /// batch (src/varlen.rs), where the call's own shape is the tensors'.
    pub(crate) fn prepare_planned_call<'a>(
        &self,
        args: &AttentionArgs<'a>,
        config: &AttentionConfig,
        shape: AttentionShape,
        plan_shape: &AttentionShape,
    ) -> Result<PreparedCall<'a>> {
        config.validate(&shape)?;
        check_lse_output(self, args.lse, [shape.batch, shape.heads_q, shape.seq_q])?;
        let plan = ForwardPlan::for_config(self.info(), plan_shape, args.q.dtype(), config)?;
        let params = self.pack_params(args, &shape, config)?;
        Ok(PreparedCall {
            shape,
            plan,
            params,
            args: *args,
            head_table: self.head_table_buffer(config)?,
        })
    }

    /// The call's per-head table (ALiBi slopes, then sinks; binding 6 of
    /// the attention kernels), if it has one.
    pub(crate) fn head_table_buffer(
        &self,
        config: &AttentionConfig,
    ) -> Result<Option<wgpu::Buffer>> {
        config
            .head_table()
            .map(|table| {
                self.storage_buffer("wgpu-flash-attn head table", bytemuck::cast_slice(&table))
            })
            .transpose()
    }

    pub(crate) fn params_buffer(&self, params: &AttentionParams) -> Result<wgpu::Buffer> {
        self.uniform_buffer("wgpu-flash-attn params", bytemuck::bytes_of(params))
    }

    /// Host slices in, host vectors out: uploads packed BSHD f32 inputs,
    /// runs the forward pass, waits and downloads the output and the
    /// logsumexp. For quick use and tests; device-resident data should use
    /// [`Gpu::forward`]. In a browser: [`Gpu::attention_host_async`].
    pub fn attention_host(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        config: &AttentionConfig,
    ) -> Result<HostAttentionOutput> {
        crate::tensor::block_on_readback(self.attention_host_async(shape, q, k, v, config))
    }

    /// [`Gpu::attention_host`] as a future, which a browser's event loop
    /// resolves (natively it has finished when first polled).
    pub async fn attention_host_async(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        config: &AttentionConfig,
    ) -> Result<HostAttentionOutput> {
        config.validate(shape)?;
        let upload = |name, dims, data| upload_packed(self, name, dims, data);
        let q = upload("q", shape.q_shape(), q)?;
        let k = upload("k", shape.k_shape(), k)?;
        let v = upload("v", shape.v_shape(), v)?;
        let out = Tensor::zeros(self, shape.o_shape(), DType::F32)?;
        let lse = Lse::new(self, shape.batch, shape.heads_q, shape.seq_q)?;
        let args = AttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: Some(&lse),
        };
        self.run(|encoder| self.forward(encoder, &args, config))?;
        Ok(HostAttentionOutput {
            out: out.to_f32_vec_async(self).await?,
            lse: lse.to_vec_async(self).await?,
        })
    }

    fn pack_params(
        &self,
        args: &AttentionArgs<'_>,
        shape: &AttentionShape,
        config: &AttentionConfig,
    ) -> Result<AttentionParams> {
        // Q sets the storage type; mixing types is not supported. K and V
        // may outgrow one binding: the forward binds them in windows
        // (src/key_chunks.rs), other kernels check `require_whole_kv`.
        let storage = args.q.dtype();
        check_operand(self, "q", args.q, storage)?;
        check_output(self, "out", args.out, storage)?;
        for (name, tensor) in [("k", args.k), ("v", args.v)] {
            check_unbound_operand(self, name, tensor, storage)?;
        }
        let mut writes = vec![("out", args.out.buffer())];
        writes.extend(args.lse.map(|l| ("lse", l.buffer())));
        let reads = [
            ("q", args.q.buffer()),
            ("k", args.k.buffer()),
            ("v", args.v.buffer()),
        ];
        check_own_buffers(&writes, &reads)?;
        let mut params = option_params(shape, config, args.lse.is_some());
        params.q = vec4_strides(args.q);
        params.k = vec4_strides(args.k);
        params.v = vec4_strides(args.v);
        params.o = vec4_strides(args.out);
        Ok(params)
    }
}
/// A host call's packed f32 input as a tensor, after checking its length
/// against `dims` (named `name` in the error).
pub(crate) fn upload_packed(
    gpu: &Gpu,
    name: &'static str,
    dims: TensorShape,
    data: &[f32],
) -> Result<Tensor> {
    if data.len() != dims.elements() {
        return Err(Error::DataLength {
            tensor: name,
            expected: dims.elements(),
            got: data.len(),
        });
    }
    Tensor::from_f32(gpu, dims, data)
}

/// A call whose operands passed every check, ready to bind.
pub(crate) struct PreparedCall<'a> {
    pub shape: AttentionShape,
    pub plan: ForwardPlan,
    pub params: AttentionParams,
    args: AttentionArgs<'a>,
    head_table: Option<wgpu::Buffer>,
}

impl PreparedCall<'_> {
    /// The parameters of the unmasked forward: the call's, with the
    /// register-blocked kernel's grouped rows when the plan has them.
    fn dispatch_params(&self) -> AttentionParams {
        let mut params = self.params;
        if self.plan.groups_heads() {
            params.flags |= blocked_flags::GROUP_ROWS;
        }
        params
    }

    /// For kernels that bind K and V whole (masked, naive): each within
    /// one storage binding.
    pub fn require_whole_kv(&self, gpu: &Gpu) -> Result<()> {
        check_binding_size(gpu, "k", self.args.k.buffer().size())?;
        check_binding_size(gpu, "v", self.args.v.buffer().size())
    }

    /// Records the plain (unmasked) forward kernel over `units`, one per
    /// sequence (a dense batch's entries, or the sequences of a padded or
    /// variable-length batch): one dispatch when K and V bind whole and
    /// every sequence's keys fit one dispatch (reading `units` from a table
    /// at binding 7 when `from_table`; a dense batch's kernel builds them
    /// itself), else chunks of the keys (src/key_chunks.rs).
    pub fn dispatch_units(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        units: Vec<SequenceRows>,
        keys_per_dispatch: Option<usize>,
        from_table: bool,
    ) -> Result<()> {
        self.prepare_units(gpu, units, keys_per_dispatch, from_table)?
            .record(encoder);
        Ok(())
    }

    /// [`PreparedCall::dispatch_units`]' pass, built but not recorded.
    pub fn prepare_units(
        &self,
        gpu: &Gpu,
        units: Vec<SequenceRows>,
        keys_per_dispatch: Option<usize>,
        from_table: bool,
    ) -> Result<PreparedPass> {
        let limits = &gpu.info().limits;
        let chunk_limits = ChunkLimits {
            binding: limits.max_storage_buffer_binding_size,
            alignment: u64::from(limits.min_storage_buffer_offset_alignment),
            // The tighter of the loop budget and the caller's bound.
            keys_per_dispatch: [
                self.plan.keys_per_dispatch(),
                keys_per_dispatch.map(|k| k as u64),
            ]
            .into_iter()
            .flatten()
            .min(),
            block_n: self.plan.block_n(),
            max_units: limits.max_compute_workgroups_per_dimension,
        };
        let views = [
            self.kv_view("k", self.args.k),
            self.kv_view("v", self.args.v),
        ];
        let pipeline = gpu.pipelines.get(gpu, &self.plan.specialization())?;
        let [x, _, heads] = self.plan.workgroups();
        let chunks = plan_key_chunks(&units, &views[0], &views[1], &chunk_limits)?;
        let Some(dispatches) = chunks else {
            let mut params = self.dispatch_params();
            let table = if from_table {
                params.flags |= flags::SEQUENCES;
                gpu.storage_buffer("wgpu-flash-attn sequences", bytemuck::cast_slice(&units))?
            } else {
                // A dense call's sequence table is never read.
                gpu.placeholders.read_only.clone()
            };
            let params = gpu.params_buffer(&params)?;
            let bindings = self.bindings(gpu, &params);
            let bind_group = bindings.bind(gpu, &pipeline.bind_group_layout, &table, None)?;
            let grid = [x, units.len() as u32, heads];
            return Ok(PreparedPass::one(
                "flash attention forward",
                pipeline,
                bind_group,
                grid,
            ));
        };

        // Chunks continue each row from the logsumexp and f32 output the
        // chunk before left: the caller's logsumexp buffer, or scratch.
        let shape = &self.shape;
        let rows = (shape.batch * shape.seq_q * shape.heads_q) as u64;
        let carry_bytes = 4 * rows * shape.head_dim_v as u64;
        check_binding_size(
            gpu,
            "forward carry (f32 outputs between key chunks)",
            carry_bytes,
        )?;
        let carry = gpu.scratch_buffer("wgpu-flash-attn forward carry", carry_bytes)?;
        let lse = match self.args.lse {
            Some(lse) => lse.buffer().clone(),
            None => gpu.scratch_buffer("wgpu-flash-attn forward chunk logsumexp", 4 * rows)?,
        };
        let mut prepared = Vec::with_capacity(dispatches.len());
        for dispatch in &dispatches {
            let mut params = self.dispatch_params();
            params.flags |= flags::SEQUENCES | flags::WRITE_LSE;
            params.k.offset = rebase(params.k.offset, dispatch.k.base(&views[0]));
            params.v.offset = rebase(params.v.offset, dispatch.v.base(&views[1]));
            let table = gpu.storage_buffer(
                "wgpu-flash-attn key chunks",
                bytemuck::cast_slice(&dispatch.units),
            )?;
            let params = gpu.params_buffer(&params)?;
            let mut bindings = self.bindings(gpu, &params);
            bindings.k = window(self.args.k.buffer(), dispatch.k);
            bindings.v = window(self.args.v.buffer(), dispatch.v);
            bindings.lse = &lse;
            let bind_group = bindings.bind(
                gpu,
                &pipeline.bind_group_layout,
                &table,
                Some((&carry, carry_bytes)),
            )?;
            prepared.push((bind_group, [x, dispatch.units.len() as u32, heads]));
        }
        Ok(PreparedPass {
            label: "flash attention forward (key chunks)",
            pipeline,
            dispatches: prepared,
        })
    }

    /// How the kernel addresses K or V of this call.
    fn kv_view(&self, name: &'static str, tensor: &Tensor) -> KvView {
        KvView {
            name,
            buffer_bytes: tensor.buffer().size(),
            unit_bytes: (VEC_WIDTH * tensor.dtype().size_bytes()) as u64,
            strides: vec4_strides(tensor),
            heads: tensor.shape().heads as u32,
            width4: (tensor.shape().head_dim / VEC_WIDTH) as u32,
        }
    }

    /// Bindings 0-6 shared by the attention kernels, absent optional ones
    /// as placeholders.
    fn bindings<'b>(&'b self, gpu: &'b Gpu, params: &'b wgpu::Buffer) -> CallBindings<'b> {
        CallBindings {
            params,
            q: self.args.q.buffer(),
            k: self.args.k.buffer().as_entire_buffer_binding(),
            v: self.args.v.buffer().as_entire_buffer_binding(),
            out: self.args.out.buffer(),
            lse: self
                .args
                .lse
                .map_or(&gpu.placeholders.writable, |lse| lse.buffer()),
            head_table: self
                .head_table
                .as_ref()
                .unwrap_or(&gpu.placeholders.read_only),
        }
    }

    /// Bindings 0-6 shared by the attention kernels (absent optional ones
    /// get placeholders), then `extra` from binding 7 on.
    pub fn bind_group(
        &self,
        gpu: &Gpu,
        layout: &wgpu::BindGroupLayout,
        params: &wgpu::Buffer,
        extra: &[&wgpu::Buffer],
    ) -> Result<wgpu::BindGroup> {
        let mut resources = self.bindings(gpu, params).resources();
        resources.extend(extra.iter().map(|b| b.as_entire_binding()));
        bind_resources(gpu, layout, resources)
    }
}

/// What bindings 0-6 of an attention kernel hold for one dispatch.
struct CallBindings<'b> {
    params: &'b wgpu::Buffer,
    q: &'b wgpu::Buffer,
    k: wgpu::BufferBinding<'b>,
    v: wgpu::BufferBinding<'b>,
    out: &'b wgpu::Buffer,
    lse: &'b wgpu::Buffer,
    head_table: &'b wgpu::Buffer,
}

impl<'b> CallBindings<'b> {
    fn resources(self) -> Vec<wgpu::BindingResource<'b>> {
        vec![
            self.params.as_entire_binding(),
            self.q.as_entire_binding(),
            wgpu::BindingResource::Buffer(self.k),
            wgpu::BindingResource::Buffer(self.v),
            self.out.as_entire_binding(),
            self.lse.as_entire_binding(),
            self.head_table.as_entire_binding(),
        ]
    }

    /// The plain forward's bind group: these, the sequence table (7) and
    /// the carry between key chunks (8; a placeholder when `None`).
    fn bind(
        self,
        gpu: &Gpu,
        layout: &wgpu::BindGroupLayout,
        table: &wgpu::Buffer,
        carry: Option<(&wgpu::Buffer, u64)>,
    ) -> Result<wgpu::BindGroup> {
        let mut resources = self.resources();
        resources.push(table.as_entire_binding());
        resources.push(match carry {
            Some((buffer, bytes)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: wgpu::BufferSize::new(bytes.max(16)),
            }),
            None => gpu.placeholders.writable.as_entire_binding(),
        });
        bind_resources(gpu, layout, resources)
    }
}

/// The part of `buffer` a dispatch binds.
fn window(buffer: &wgpu::Buffer, window: Window) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset: window.offset,
        size: wgpu::BufferSize::new(window.size),
    }
}

/// A view's offset in a window starting `base` vec4s into its buffer. The
/// kernel indexes in wrapping u32 arithmetic, so an offset "below" the
/// window (a batch entry or key before it, never read) wraps and every
/// index the kernel reads lands inside the window.
fn rebase(offset: u32, base: u64) -> u32 {
    u64::from(offset).wrapping_sub(base) as u32
}

/// The parameters every attention kernel reads for `config` on `shape`;
/// tensor strides are left for the caller.
pub(crate) fn option_params(
    shape: &AttentionShape,
    config: &AttentionConfig,
    write_lse: bool,
) -> AttentionParams {
    let (left, right) = config.effective_window();
    // A side wider than both sequences is the same as unbounded; clamping
    // keeps it in u32 range for the shader.
    let span = (shape.seq_q + shape.seq_kv) as u64;
    let mut bits = 0;
    if left.is_some() {
        bits |= flags::WINDOW_LEFT;
    }
    if right.is_some() {
        bits |= flags::WINDOW_RIGHT;
    }
    if config.softcap.is_some() {
        bits |= flags::SOFTCAP;
    }
    if config.alibi.is_some() {
        bits |= flags::ALIBI;
    }
    if write_lse {
        bits |= flags::WRITE_LSE;
    }
    if config.sinks.is_some() {
        bits |= flags::SINKS;
    }
    let dropout = config.active_dropout();
    let (dropout_seed_lo, dropout_seed_hi) =
        crate::dropout::seed_words(dropout.map_or(0, |d| d.seed));
    AttentionParams {
        batch: shape.batch as u32,
        seq_q: shape.seq_q as u32,
        seq_kv: shape.seq_kv as u32,
        heads_q: shape.heads_q as u32,
        heads_kv: shape.heads_kv as u32,
        flags: bits,
        score_scale: config.effective_scale(shape.head_dim),
        softcap: config.softcap.unwrap_or(1.0),
        window_left: left.unwrap_or(0).min(span) as u32,
        window_right: right.unwrap_or(0).min(span) as u32,
        alibi_batch_stride: match &config.alibi {
            Some(crate::Alibi::PerBatchHead(_)) => shape.heads_q as u32,
            _ => 0,
        },
        unit_base: 0,
        sink_offset: config.sink_offset() as u32,
        dropout_threshold: dropout.map_or(0, |d| d.threshold()),
        dropout_seed_lo,
        dropout_seed_hi,
        ..AttentionParams::default()
    }
}
