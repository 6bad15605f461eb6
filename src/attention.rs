//! The forward call: checks operands against the shape and the adapter,
//! plans tiles from the adapter's limits, and records the dispatch.

use wgpu::util::DeviceExt;

use crate::config::{AttentionConfig, AttentionShape, Tier};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::mask::AttentionMask;
use crate::params::{AttentionParams, TensorStrides, flags};
use crate::pipelines::{bind_buffers, encode_dispatches};
use crate::shaders::{
    AttentionTiling, MIN_BLOCK_N, Specialization, forward_tile_bytes, largest_block_n,
};
use crate::tensor::{DType, Strides, Tensor, TensorShape, check_binding_size, read_buffer};

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
/// Tensors are read as vec4, so strides and offsets are multiples of 4.
const VEC_WIDTH: usize = 4;

/// How a call will run: which pipeline and how many workgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPlan {
    pub specialization: Specialization,
    /// Workgroups along (query tiles, query heads, batch).
    pub workgroups: [u32; 3],
}

impl ForwardPlan {
    /// Tiles for `shape` with f32 storage on this adapter.
    pub fn new(gpu: &Gpu, shape: &AttentionShape) -> Result<Self> {
        Self::for_call(gpu, shape, DType::F32, None)
    }

    /// Tiles for one call: Q, K, V and O stored as `storage` and, if
    /// forced, the kernel tier.
    pub fn for_call(
        gpu: &Gpu,
        shape: &AttentionShape,
        storage: DType,
        tier: Option<Tier>,
    ) -> Result<Self> {
        shape.validate()?;
        let limits = &gpu.info().limits;
        let head_dim = shape.head_dim as u32;
        let block_n = largest_block_n(
            head_dim,
            u64::from(limits.max_compute_workgroup_storage_size),
        )
        .ok_or(Error::WorkgroupMemory {
            head_dim: shape.head_dim,
            needed: forward_tile_bytes(head_dim, MIN_BLOCK_N),
            limit: limits.max_compute_workgroup_storage_size,
        })?;
        let RowTiling {
            workgroup_size,
            rows,
            unroll,
            subgroup_kv,
        } = row_tiling(gpu, shape, tier)?;
        let max_invocations = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x);
        if workgroup_size > max_invocations {
            return Err(Error::WorkgroupInvocations {
                needed: workgroup_size,
                limit: max_invocations,
            });
        }
        let block_m = u64::from(workgroup_size * rows);
        let groups = [
            (shape.seq_q as u64).div_ceil(block_m),
            shape.heads_q as u64,
            shape.batch as u64,
        ];
        let limit = limits.max_compute_workgroups_per_dimension;
        for (axis, &n) in ["query row tiles", "heads_q", "batch"].iter().zip(&groups) {
            if n > u64::from(limit) {
                return Err(Error::DispatchTooLarge {
                    what: "flash attention",
                    axis,
                    groups: n,
                    limit,
                });
            }
        }
        let specialization = Specialization::FlashForward(AttentionTiling {
            head_dim,
            block_n,
            workgroup_size,
            rows,
            unroll,
            subgroup_kv,
            storage,
        });
        gpu.check_loop_budget(&specialization, shape.seq_kv as u64)?;
        Ok(ForwardPlan {
            specialization,
            workgroups: groups.map(|n| n as u32),
        })
    }
}

impl ForwardPlan {
    /// Query rows per invocation on CPU adapters. Registers are memory on a
    /// CPU, so this bounds the per-invocation state (q and acc: 2 * rows *
    /// head_dim floats) and the unrolled code: 16 rows at d=64 compile in
    /// ~25 s on a cold lavapipe and run ~15 % faster than 8 rows
    /// (BENCHMARKS.md). It depends on the head dim only, so each head dim
    /// compiles one pipeline whatever the sequence lengths.
    pub fn cpu_rows(head_dim: u32) -> u32 {
        match head_dim {
            0..=64 => 16,
            65..=128 => 8,
            _ => 4,
        }
    }

    /// The kernel tier this plan runs.
    pub fn tier(&self) -> Tier {
        match self.specialization.attention_tiling() {
            Some(tiling) if tiling.subgroup_kv => Tier::SubgroupBroadcast,
            _ => Tier::Portable,
        }
    }
}

/// How query rows map onto invocations.
struct RowTiling {
    workgroup_size: u32,
    rows: u32,
    unroll: bool,
    subgroup_kv: bool,
}

/// Why this adapter cannot run [`Tier::SubgroupBroadcast`], if it cannot.
fn subgroup_broadcast_missing(gpu: &Gpu) -> Option<String> {
    let info = gpu.info();
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

/// Whether a call runs the subgroup tier: the forced tier, else the best
/// the adapter offers; forcing it where the adapter lacks it is
/// `TierUnavailable`. The forward and decode planners share this rule.
pub(crate) fn use_subgroup_tier(gpu: &Gpu, tier: Option<Tier>) -> Result<bool> {
    match (tier, subgroup_broadcast_missing(gpu)) {
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

/// The tiling for this adapter and shape, honouring a forced tier.
fn row_tiling(gpu: &Gpu, shape: &AttentionShape, tier: Option<Tier>) -> Result<RowTiling> {
    let subgroup_kv = use_subgroup_tier(gpu, tier)?;
    let info = gpu.info();
    let adapter = &info.adapter;
    let cpu = adapter.device_type == wgpu::DeviceType::Cpu;
    let rows = if cpu {
        ForwardPlan::cpu_rows(shape.head_dim as u32)
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
        let limits = &info.limits;
        let invocations = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x);
        return Ok(RowTiling {
            workgroup_size: power_of_two_at_most(invocations, GPU_WORKGROUP_SIZE),
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

/// Logsumexp of each query row, `[batch, heads_q, seq_q]` f32, natural log.
#[derive(Debug, Clone)]
pub struct Lse {
    buffer: wgpu::Buffer,
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
}

impl Lse {
    /// An uninitialised-looking (NaN-filled) logsumexp buffer.
    pub fn new(gpu: &Gpu, batch: usize, heads: usize, seq: usize) -> Result<Self> {
        let n = batch * heads * seq;
        if n == 0 {
            return Err(Error::ZeroDimension {
                tensor: "lse",
                shape: [batch, heads, seq, 1],
            });
        }
        crate::tensor::check_buffer_size(gpu, "lse", 4 * n as u64)?;
        let buffer = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("wgpu-flash-attn lse"),
                contents: bytemuck::cast_slice(&vec![f32::NAN; n]),
                // COPY_DST: varlen calls assemble it from per-sequence parts.
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        Ok(Lse {
            buffer,
            batch,
            heads,
            seq,
        })
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn to_vec(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        read_buffer(gpu, &self.buffer)
    }
}

/// What [`Gpu::attention`] returns.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[batch, seq_q, heads_q, head_dim]`, packed.
    pub out: Tensor,
    /// Present when the config asked for it.
    pub lse: Option<Lse>,
}

/// What [`Gpu::attention_host`] returns.
#[derive(Debug, Clone)]
pub struct HostAttentionOutput {
    pub out: Vec<f32>,
    pub lse: Option<Vec<f32>>,
}

/// The operands of one call; outputs are written in place.
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
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
                "K and V shapes differ",
                "k.head_dim",
                k.head_dim,
                "v.head_dim",
                v.head_dim,
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
                "O must be shaped like Q",
                "q.head_dim",
                q.head_dim,
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
        })
    }
}

impl Gpu {
    /// Attention of device tensors into a new packed output (and logsumexp
    /// if `config.return_lse`). Submits and returns without waiting.
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        config: &AttentionConfig,
    ) -> Result<AttentionOutput> {
        let q_shape = q.shape();
        let out = Tensor::zeros(self, q_shape, q.dtype())?;
        let lse = if config.return_lse {
            Some(Lse::new(self, q_shape.batch, q_shape.heads, q_shape.seq)?)
        } else {
            None
        };
        self.attention_into(
            &AttentionArgs {
                q,
                k,
                v,
                out: &out,
                lse: lse.as_ref(),
            },
            config,
        )?;
        Ok(AttentionOutput { out, lse })
    }

    /// Attention into caller-owned outputs: records and submits one dispatch.
    pub fn attention_into(&self, args: &AttentionArgs<'_>, config: &AttentionConfig) -> Result<()> {
        self.submit_recorded("attention dispatch", |encoder| {
            self.encode_attention(encoder, args, config)
        })
    }

    /// Records the attention dispatch into the caller's encoder (nothing is
    /// submitted), so it can be batched with the caller's own work.
    pub fn encode_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
    ) -> Result<()> {
        self.encode_forward(encoder, args, config, None)
    }

    /// Attention with a mask ([`AttentionMask`]: bias, boolean or
    /// block-sparse) on top of the config's options: records and submits
    /// one dispatch.
    pub fn masked_attention_into(
        &self,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        mask: &AttentionMask,
    ) -> Result<()> {
        self.submit_recorded("masked attention dispatch", |encoder| {
            self.encode_masked_attention(encoder, args, config, mask)
        })
    }

    /// Records a masked attention dispatch into the caller's encoder.
    pub fn encode_masked_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        mask: &AttentionMask,
    ) -> Result<()> {
        self.encode_forward(encoder, args, config, Some(mask))
    }

    /// The forward dispatch, with the mask variant of the kernel when a
    /// mask is given (bindings 7-9: its words, tile states, parameters).
    fn encode_forward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        mask: Option<&AttentionMask>,
    ) -> Result<()> {
        let call = self.prepare_call(args, config)?;
        let params_buffer = self.params_buffer(&call.params);
        let Some(mask) = mask else {
            let pipeline = self
                .pipelines
                .get(&self.device, &call.plan.specialization)?;
            let bind_group =
                call.bind_group(self, &pipeline.bind_group_layout, &params_buffer, &[]);
            encode_dispatches(
                encoder,
                "flash attention forward",
                &pipeline,
                &[bind_group],
                call.plan.workgroups,
            );
            return Ok(());
        };
        mask.check_shape(&call.shape)?;
        let tiling = *call
            .plan
            .specialization
            .attention_tiling()
            .expect("ForwardPlan always plans the flash kernel");
        let spec = Specialization::FlashMasked(tiling);
        self.check_loop_budget(&spec, call.shape.seq_kv as u64)?;
        let pipeline = self.pipelines.get(&self.device, &spec)?;
        let (mask_params, tiles) =
            mask.params(self, tiling.workgroup_size * tiling.rows, tiling.block_n);
        let mask_uniform = self.uniform_buffer("mask params", bytemuck::bytes_of(&mask_params));
        let tiles = tiles.unwrap_or_else(|| self.placeholders.alibi.clone());
        let bind_group = call.bind_group(
            self,
            &pipeline.bind_group_layout,
            &params_buffer,
            &[mask.buffer(), &tiles, &mask_uniform],
        );
        encode_dispatches(
            encoder,
            "masked flash attention forward",
            &pipeline,
            &[bind_group],
            call.plan.workgroups,
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
        config.validate(&shape)?;
        check_lse_output(args.lse, config, [shape.batch, shape.heads_q, shape.seq_q])?;
        let plan = ForwardPlan::for_call(self, &shape, args.q.dtype(), config.tier)?;
        let params = self.pack_params(args, &shape, config)?;
        let alibi = config.alibi.as_ref().map(|alibi| {
            self.storage_buffer(
                "wgpu-flash-attn alibi slopes",
                bytemuck::cast_slice(alibi.slopes()),
            )
        });
        Ok(PreparedCall {
            shape,
            plan,
            params,
            args: *args,
            alibi,
        })
    }

    pub(crate) fn params_buffer(&self, params: &AttentionParams) -> wgpu::Buffer {
        self.uniform_buffer("wgpu-flash-attn params", bytemuck::bytes_of(params))
    }

    /// Host slices in, host vectors out: uploads packed BSHD inputs, runs,
    /// waits and downloads.
    pub fn attention_host(
        &self,
        shape: &AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        config: &AttentionConfig,
    ) -> Result<HostAttentionOutput> {
        config.validate(shape)?;
        let upload = |name: &'static str, dims: TensorShape, data: &[f32]| {
            if data.len() != dims.elements() {
                return Err(Error::DataLength {
                    tensor: name,
                    expected: dims.elements(),
                    got: data.len(),
                });
            }
            Tensor::from_f32(self, dims, data)
        };
        let q = upload("q", shape.q_shape(), q)?;
        let k = upload("k", shape.kv_shape(), k)?;
        let v = upload("v", shape.kv_shape(), v)?;
        let result = self.attention(&q, &k, &v, config)?;
        let out = result.out.to_f32_vec(self)?;
        let lse = result.lse.map(|l| l.to_vec(self)).transpose()?;
        Ok(HostAttentionOutput { out, lse })
    }

    fn pack_params(
        &self,
        args: &AttentionArgs<'_>,
        shape: &AttentionShape,
        config: &AttentionConfig,
    ) -> Result<AttentionParams> {
        let named = [
            ("q", args.q),
            ("k", args.k),
            ("v", args.v),
            ("out", args.out),
        ];
        // Q sets the storage type; mixing types is not supported.
        let storage = args.q.dtype();
        for (name, tensor) in named {
            check_operand(self, name, tensor, storage)?;
        }
        for (name, input) in [("q", args.q), ("k", args.k), ("v", args.v)] {
            if input.buffer() == args.out.buffer() {
                return Err(Error::OutputAliasesInput {
                    tensor: "out",
                    input: name,
                });
            }
            if args.lse.is_some_and(|l| l.buffer() == input.buffer()) {
                return Err(Error::OutputAliasesInput {
                    tensor: "lse",
                    input: name,
                });
            }
        }
        let mut params = option_params(shape, config, args.lse.is_some());
        params.q = vec4_strides(args.q);
        params.k = vec4_strides(args.k);
        params.v = vec4_strides(args.v);
        params.o = vec4_strides(args.out);
        Ok(params)
    }
}
/// A call whose operands passed every check, ready to bind.
pub(crate) struct PreparedCall<'a> {
    pub shape: AttentionShape,
    pub plan: ForwardPlan,
    pub params: AttentionParams,
    args: AttentionArgs<'a>,
    alibi: Option<wgpu::Buffer>,
}

impl PreparedCall<'_> {
    /// Bindings 0-6 shared by the attention kernels (absent optional ones
    /// get placeholders), then `extra` from binding 7 on.
    pub fn bind_group(
        &self,
        gpu: &Gpu,
        layout: &wgpu::BindGroupLayout,
        params: &wgpu::Buffer,
        extra: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let mut buffers = vec![
            params,
            self.args.q.buffer(),
            self.args.k.buffer(),
            self.args.v.buffer(),
            self.args.out.buffer(),
            self.args
                .lse
                .map_or(&gpu.placeholders.lse, |lse| lse.buffer()),
            self.alibi.as_ref().unwrap_or(&gpu.placeholders.alibi),
        ];
        buffers.extend_from_slice(extra);
        bind_buffers(&gpu.device, layout, &buffers)
    }
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
    let scale = config.effective_scale(shape.head_dim);
    let natural_units = config.softcap.is_some() || config.alibi.is_some();
    AttentionParams {
        batch: shape.batch as u32,
        seq_q: shape.seq_q as u32,
        seq_kv: shape.seq_kv as u32,
        heads_q: shape.heads_q as u32,
        heads_kv: shape.heads_kv as u32,
        flags: bits,
        score_scale: if natural_units {
            scale
        } else {
            scale * std::f32::consts::LOG2_E
        },
        softcap: config.softcap.unwrap_or(1.0),
        window_left: left.unwrap_or(0).min(span) as u32,
        window_right: right.unwrap_or(0).min(span) as u32,
        alibi_batch_stride: match &config.alibi {
            Some(crate::Alibi::PerBatchHead(_)) => shape.heads_q as u32,
            _ => 0,
        },
        unit_base: 0,
        ..AttentionParams::default()
    }
}

/// The logsumexp output a call was given: present when the config asks for
/// it, and shaped `expected` = `[batch, heads_q, seq_q]`.
pub(crate) fn check_lse_output(
    lse: Option<&Lse>,
    config: &AttentionConfig,
    expected: [usize; 3],
) -> Result<()> {
    match lse {
        None if config.return_lse => Err(Error::MissingLseOutput),
        Some(lse) if [lse.batch, lse.heads, lse.seq] != expected => Err(Error::LseShape {
            expected,
            got: [lse.batch, lse.heads, lse.seq],
        }),
        _ => Ok(()),
    }
}

/// One `(what, left_name, left, right_name, right)` dimension check.
pub(crate) type DimPair = (&'static str, &'static str, usize, &'static str, usize);

/// `ShapeMismatch` for the first pair whose two sides differ.
pub(crate) fn require_equal(pairs: &[DimPair]) -> Result<()> {
    match pairs.iter().find(|pair| pair.2 != pair.4) {
        Some(&(what, left_name, left, right_name, right)) => Err(Error::ShapeMismatch {
            what,
            left_name,
            left,
            right_name,
            right,
        }),
        None => Ok(()),
    }
}

/// Dtype, alignment, bounds and binding-size checks for one operand.
pub(crate) fn check_operand(
    gpu: &Gpu,
    name: &'static str,
    tensor: &Tensor,
    storage: DType,
) -> Result<()> {
    if tensor.dtype() != storage {
        return Err(Error::DTypeUnsupported {
            tensor: name,
            got: tensor.dtype(),
            needed: storage,
        });
    }
    let s = tensor.strides();
    for (what, value) in [
        ("batch stride", s.batch),
        ("seq stride", s.seq),
        ("head stride", s.head),
        ("offset", tensor.offset()),
    ] {
        if !value.is_multiple_of(VEC_WIDTH) {
            return Err(Error::Misaligned {
                tensor: name,
                what,
                value,
                multiple: VEC_WIDTH,
            });
        }
    }
    tensor.check_in_bounds(name)?;
    check_binding_size(gpu, name, tensor.buffer().size())
}

pub(crate) fn vec4_strides(tensor: &Tensor) -> TensorStrides {
    vec4_view(tensor.strides(), tensor.offset())
}

/// Element strides and offset in the kernels' vec4 units (all multiples
/// of 4, checked by `check_operand`).
pub(crate) fn vec4_view(s: Strides, offset: usize) -> TensorStrides {
    TensorStrides {
        batch: (s.batch / VEC_WIDTH) as u32,
        seq: (s.seq / VEC_WIDTH) as u32,
        head: (s.head / VEC_WIDTH) as u32,
        offset: (offset / VEC_WIDTH) as u32,
    }
}
