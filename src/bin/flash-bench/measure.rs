//! Validating and timing one configuration with each implementation.

use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;
use wgpu_flash_attn::reference::{self, ReferenceOutput};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, DType, Error, ForwardOptions, Gpu, LinearArgs,
    LinearConfig, LinearShape, Tensor,
};

use crate::ceiling::CeilingProbes;
use crate::options::Impl;
use crate::options_json::{OptionsJson, dtype_name, tier_name};
use crate::random::{normal_vec, seeded};
use crate::timing::{Timer, Timing, TimingPlan, median, time_gpu};

/// Bound on |gpu - reference| for unit-normal inputs (docs/semantics.md), beyond the
/// rounding of the output to its storage type (see `unit_roundoff`).
pub const TOLERANCE: f64 = 1e-4;

/// Largest relative error of rounding an f32 to `dtype` (half an ulp).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    }
}

pub fn round_to(dtype: DType, values: Vec<f32>) -> Vec<f32> {
    match dtype {
        DType::F32 => values,
        DType::F16 => values
            .into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect(),
        DType::BF16 => values
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect(),
    }
}
/// Query rows are validated on a sample so that the f64 reference does at
/// most this many (row, key, head-dim) products per case.
const VALIDATION_BUDGET: f64 = 3e8;
/// Size of the FMA ceiling dispatch (about 0.3 s on lavapipe).
pub const CEILING_WORKGROUPS: u32 = 1024;

/// What to measure and how often.
pub struct Bench<'a> {
    pub gpu: &'a Gpu,
    /// The ceiling kernels, re-run after every case.
    pub probes: &'a CeilingProbes<'a>,
    pub progress: ProgressBar,
    /// Timed runs per GPU implementation (after a validating first run).
    pub iters: usize,
    /// Timed runs of the CPU reference.
    pub cpu_runs: usize,
    /// The CPU reference is timed only for calls up to this many FLOPs.
    pub cpu_budget_flops: f64,
}

/// One configuration to measure.
pub struct Case {
    pub name: String,
    pub shape: AttentionShape,
    pub config: AttentionConfig,
    pub impls: Vec<Impl>,
    pub seed: u64,
    /// Storage type of Q, K, V and O.
    pub dtype: DType,
    /// The flash forward's bound on keys per dispatch, if any.
    pub keys_per_dispatch: Option<usize>,
}

impl Case {
    /// What the flash forward is called with.
    pub fn forward_options(&self) -> ForwardOptions<'static> {
        let options = ForwardOptions::new(&self.config);
        match self.keys_per_dispatch {
            Some(keys) => options.keys_per_dispatch(keys),
            None => options,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The validating run disagreed with the reference.
    Failed,
    /// The call needs more memory than the adapter can bind.
    DoesNotFit,
    /// Not run (e.g. over the CPU budget).
    Skipped,
}

/// One implementation's figures for one case.
#[derive(Debug, Clone, Serialize)]
pub struct ImplResult {
    #[serde(rename = "impl")]
    pub implementation: Impl,
    pub status: Status,
    pub note: Option<String>,
    pub median_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub runs: usize,
    pub timer: Option<String>,
    /// FLOPs credited to this implementation (softmax attention's count, or
    /// linear attention's `LinearShape::flops`).
    pub flops: f64,
    pub gflops: Option<f64>,
    /// Filled in once the run's best FMA ceiling is known.
    pub pct_of_fma_ceiling: Option<f64>,
    pub speedup_over_naive: Option<f64>,
    /// Device memory the call allocates: the output, its parameters and any
    /// scratch (the naive score matrix). For `does_not_fit`, what it would
    /// need.
    pub gpu_bytes: Option<u64>,
    /// Largest |result - reference| over the validated rows.
    pub max_abs_err: Option<f64>,
}

impl ImplResult {
    /// A GPU implementation's result after its validating run and timing.
    pub fn timed(
        implementation: Impl,
        within: bool,
        note: Option<String>,
        timing: &Timing,
        flops: f64,
        gpu_bytes: u64,
        max_error: f64,
    ) -> Self {
        ImplResult {
            implementation,
            status: if within { Status::Ok } else { Status::Failed },
            note,
            median_ms: Some(timing.median_ms),
            min_ms: Some(timing.min_ms),
            max_ms: Some(timing.max_ms),
            runs: timing.runs,
            timer: Some(timing.timer.to_string()),
            flops,
            gflops: Some(flops / (timing.median_ms * 1e6)),
            pct_of_fma_ceiling: None,
            speedup_over_naive: None,
            gpu_bytes: Some(gpu_bytes),
            max_abs_err: Some(max_error),
        }
    }

    /// A GPU implementation whose validating run disagreed (NaN output).
    pub fn invalid(implementation: Impl, message: String, gpu_bytes: u64) -> Self {
        let mut result = ImplResult::without_timing(implementation, Status::Failed, message);
        result.gpu_bytes = Some(gpu_bytes);
        result
    }

    pub fn without_timing(implementation: Impl, status: Status, note: String) -> Self {
        ImplResult {
            implementation,
            status,
            note: Some(note),
            median_ms: None,
            min_ms: None,
            max_ms: None,
            runs: 0,
            timer: None,
            flops: 0.0,
            gflops: None,
            pct_of_fma_ceiling: None,
            speedup_over_naive: None,
            gpu_bytes: None,
            max_abs_err: None,
        }
    }
}

/// Everything measured for one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub shape: AttentionShape,
    /// The options of the call, one field each.
    pub options: OptionsJson,
    pub dtype: String,
    /// Kernel tier of the flash kernel for this call.
    pub tier: String,
    /// The decode kernel the flash call runs as, when it runs as split-KV
    /// decoding (few query rows per KV head over many keys:
    /// `DecodePlan::for_forward`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_as_decode: Option<String>,
    /// Whether the flash kernel computes its products from f16 operands
    /// (the caller's `f16_products`, else the planner's choice).
    pub f16_products: bool,
    /// `run --keys-per-dispatch`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_per_dispatch: Option<usize>,
    /// FLOPs softmax attention must do (visible pairs only).
    pub flops: f64,
    pub rows_validated: usize,
    pub rows_total: usize,
    /// The bound on the flash kernel's |error| beyond the output's storage
    /// rounding: 1e-4, plus 2^-11 of the largest |v| where the kernel
    /// rounds the weights to f16 (cooperative matrices, f16 products;
    /// times 1 / (1 - p) with dropout).
    pub tolerance: f64,
    pub passed: bool,
    pub results: Vec<ImplResult>,
    /// FMA ceiling measured right after the case.
    pub fma_gflops_after: f64,
}

impl CaseReport {
    pub fn result(&self, implementation: Impl) -> Option<&ImplResult> {
        self.results
            .iter()
            .find(|r| r.implementation == implementation)
    }
}

/// Validated query rows: every `stride`-th row of every head, and the last.
struct Sample {
    stride: usize,
    want: ReferenceOutput,
    rows: usize,
    /// The output's storage rounding, allowed on top of the tolerance.
    roundoff: f64,
    /// What the flash kernel's rounding of the weights to f16 before
    /// `P V` adds (the cooperative-matrix tier and f16 products on f16
    /// storage; docs/semantics.md): 2^-11 of the largest |v| times the
    /// largest sum of a row's weights (1, or 1 / (1 - p) with dropout). 0
    /// for every other kernel.
    weight_rounding: f64,
}

impl Sample {
    fn new(case: &Case, rounds_weights: bool, [q, k, v]: [&[f32]; 3]) -> Result<Self> {
        let s = &case.shape;
        // The wider of the two products per (row, key): Q.K (head_dim) or
        // P.V (head_dim_v).
        let work = (s.batch * s.heads_q * s.seq_q * s.seq_kv * s.head_dim.max(s.head_dim_v)) as f64;
        let stride = ((work / VALIDATION_BUDGET).ceil() as usize).max(1);
        let last = s.seq_q - 1;
        let wanted =
            move |_: usize, _: usize, row: usize| row.is_multiple_of(stride) || row == last;
        let want = reference::attention_rows(s, q, k, v, &case.config, wanted)?;
        let rows = (0..s.seq_q).filter(|&r| wanted(0, 0, r)).count() * s.batch * s.heads_q;
        let weight_rounding = if rounds_weights {
            let v_max = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
            let weights = case
                .config
                .active_dropout()
                .map_or(1.0, |dropout| 1.0 / dropout.keep_probability());
            unit_roundoff(DType::F16) * v_max * weights
        } else {
            0.0
        };
        Ok(Sample {
            stride,
            want,
            rows,
            roundoff: unit_roundoff(case.dtype),
            weight_rounding,
        })
    }

    /// The bound the flash kernel's largest error is held to beyond the
    /// output's storage rounding.
    fn bound(&self) -> f64 {
        TOLERANCE + self.weight_rounding
    }

    /// Largest |error| over the sampled rows, and whether every element is
    /// within the tolerance plus its storage rounding (plus, for the flash
    /// kernel, `weight_rounding`); NaN anywhere is an error (an unwritten
    /// or invalid element).
    fn check(&self, got: &[f32], implementation: Impl) -> Result<(f64, bool), String> {
        let extra = match implementation {
            Impl::Flash => self.weight_rounding,
            _ => 0.0,
        };
        let mut worst = 0.0f64;
        let mut within = true;
        for (index, (g, w)) in got.iter().zip(&self.want.out).enumerate() {
            if g.is_nan() {
                return Err(format!("output element {index} is NaN"));
            }
            if !w.is_nan() {
                let error = (f64::from(*g) - w).abs();
                worst = worst.max(error);
                within &= error <= TOLERANCE + extra + self.roundoff * w.abs();
            }
        }
        Ok((worst, within))
    }
}

pub struct Operands {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub host: [Vec<f32>; 3],
}

impl Bench<'_> {
    pub fn run_case(&self, case: &Case) -> Result<CaseReport> {
        let shape = &case.shape;
        let gpu = self.gpu;
        self.progress
            .set_message(format!("{}: inputs and reference", case.name));
        let dtype = case.dtype;
        // The shape, options and the device's limits first: a shape that
        // cannot run is refused before its inputs are drawn on the host.
        let plan =
            wgpu_flash_attn::ForwardPlan::for_config(gpu.info(), shape, dtype, &case.config)?;
        let max_buffer = gpu.info().limits.max_buffer_size;
        for (tensor, dims) in [
            ("q", shape.q_shape()),
            ("k", shape.k_shape()),
            ("v", shape.v_shape()),
        ] {
            let bytes = (dims.elements() as u64).saturating_mul(dtype.size_bytes() as u64);
            if bytes > max_buffer {
                return Err(wgpu_flash_attn::Error::BufferTooLarge {
                    tensor,
                    bytes,
                    limit_name: "max_buffer_size",
                    limit: max_buffer,
                }
                .into());
            }
        }
        let mut rng = seeded(case.seed);
        // The reference sees exactly the values the storage type holds.
        let mut draw = |n: usize| round_to(dtype, normal_vec(&mut rng, n, 1.0));
        let q = draw(shape.q_shape().elements());
        let k = draw(shape.k_shape().elements());
        let v = draw(shape.v_shape().elements());
        let operands = Operands {
            q: Tensor::from_f32_as(gpu, shape.q_shape(), &q, dtype)?,
            k: Tensor::from_f32_as(gpu, shape.k_shape(), &k, dtype)?,
            v: Tensor::from_f32_as(gpu, shape.v_shape(), &v, dtype)?,
            host: [q, k, v],
        };
        let needs_sample = case
            .impls
            .iter()
            .any(|i| matches!(i, Impl::Flash | Impl::Naive));
        // Few query rows over many keys run as split-KV decoding (f32
        // arithmetic: no weights rounded to f16) rather than the plan's
        // forward kernel; flash-bench's K and V are laid out as a cache.
        let as_decode = case
            .keys_per_dispatch
            .is_none()
            .then(|| {
                wgpu_flash_attn::DecodePlan::for_forward(gpu.info(), shape, dtype, &case.config)
            })
            .flatten();
        let tier = as_decode.map_or(plan.tier(), |decode| decode.tier());
        let f16_products = as_decode.is_none() && plan.f16_products();
        let sample = if needs_sample {
            let [q, k, v] = &operands.host;
            let rounds_weights = as_decode.is_none() && plan.rounds_weights_to_f16();
            Some(Sample::new(case, rounds_weights, [q, k, v])?)
        } else {
            None
        };
        let flops = shape.flops(&case.config);

        let mut results = Vec::new();
        for &implementation in &case.impls {
            self.progress
                .set_message(format!("{}: {implementation}", case.name));
            let result = match (implementation, &sample) {
                (Impl::Cpu, _) => self.time_cpu(case, &operands, flops)?,
                (Impl::Linear, _) => self.time_linear(case, &operands)?,
                (Impl::Backward, _) => self.time_backward(case, &operands)?,
                (gpu_impl, Some(sample)) => {
                    self.time_gpu_impl(gpu_impl, case, &operands, sample, flops)?
                }
                (_, None) => unreachable!("GPU implementations always get a sample"),
            };
            results.push(result);
            self.progress.inc(1);
        }
        if let Some(naive_ms) = results
            .iter()
            .find(|r| r.implementation == Impl::Naive)
            .and_then(|r| r.median_ms)
        {
            // The backward is not the same work as a forward.
            for r in results
                .iter_mut()
                .filter(|r| r.implementation != Impl::Backward)
            {
                r.speedup_over_naive = r.median_ms.map(|ms| naive_ms / ms);
            }
        }
        let forward_ms = results
            .iter()
            .find(|r| r.implementation == Impl::Flash)
            .and_then(|r| r.median_ms);
        if let Some(forward_ms) = forward_ms {
            for r in &mut results {
                if let (Impl::Backward, Some(ms)) = (r.implementation, r.median_ms) {
                    let ratio = format!("backward / forward = {:.2}", ms / forward_ms);
                    r.note = Some(match r.note.take() {
                        Some(note) => format!("{ratio}; {note}"),
                        None => ratio,
                    });
                }
            }
        }
        self.progress
            .set_message(format!("{}: FMA ceiling", case.name));
        let ceiling = self
            .probes
            .measure_fma(CEILING_WORKGROUPS, TimingPlan { warmup: 1, runs: 3 })?;
        let passed = results.iter().all(|r| r.status != Status::Failed);
        Ok(CaseReport {
            name: case.name.clone(),
            shape: *shape,
            options: OptionsJson::new(&case.config, dtype),
            dtype: dtype_name(dtype).to_string(),
            tier: tier_name(tier).to_string(),
            runs_as_decode: as_decode.map(|decode| decode.kernel_label()),
            f16_products,
            keys_per_dispatch: case.keys_per_dispatch,
            flops,
            rows_validated: sample.as_ref().map_or(0, |s| s.rows),
            rows_total: shape.batch * shape.heads_q * shape.seq_q,
            tolerance: sample.as_ref().map_or(TOLERANCE, Sample::bound),
            passed,
            results,
            fma_gflops_after: ceiling.gflops,
        })
    }

    fn time_gpu_impl(
        &self,
        implementation: Impl,
        case: &Case,
        operands: &Operands,
        sample: &Sample,
        flops: f64,
    ) -> Result<ImplResult> {
        let gpu = self.gpu;
        let shape = &case.shape;
        let out = Tensor::filled_as(gpu, shape.o_shape(), f32::NAN, case.dtype)?;
        let args = AttentionArgs {
            q: &operands.q,
            k: &operands.k,
            v: &operands.v,
            out: &out,
            lse: None,
        };
        let output_bytes = out.buffer().size();
        // Scratch the call needs (the carry between key chunks) shows once
        // the scratch an earlier case left is dropped.
        gpu.release_scratch();
        // The first run validates and warms up (pipelines compile on it).
        let gpu_bytes = match implementation {
            Impl::Flash => {
                gpu.run(|e| gpu.forward(e, &args, case.forward_options()))?;
                output_bytes + gpu.scratch_bytes()
            }
            Impl::Naive => match gpu.run(|e| gpu.naive_attention(e, &args, &case.config)) {
                Ok(plan) => output_bytes + plan.score_buffer_bytes(),
                Err(
                    err @ Error::ScoresTooLarge {
                        bytes_per_head,
                        limit,
                        ..
                    },
                ) => {
                    let mut result = ImplResult::without_timing(
                        implementation,
                        Status::DoesNotFit,
                        format!(
                            "score matrix needs {} per head ({} for the call), over the {} binding limit",
                            bytes(bytes_per_head),
                            bytes(shape.score_matrix_bytes()),
                            bytes(limit)
                        ),
                    );
                    result.gpu_bytes = Some(output_bytes + shape.score_matrix_bytes());
                    self.progress
                        .println(format!("{}: naive: {err}", case.name));
                    return Ok(result);
                }
                // The naive kernel binds K and V whole (the flash forward
                // binds them in windows), and its score matrix may outgrow
                // the device's memory rather than one binding: either way
                // the baseline's row says so and the run goes on.
                Err(err @ (Error::BufferTooLarge { .. } | Error::OutOfMemory { .. })) => {
                    let note = match &err {
                        Error::BufferTooLarge {
                            tensor,
                            bytes: size,
                            limit,
                            ..
                        } => format!(
                            "{tensor} is {}, over the {} binding limit",
                            bytes(*size),
                            bytes(*limit)
                        ),
                        _ => format!(
                            "score matrix of {} for the call: the device is out of memory",
                            bytes(shape.score_matrix_bytes())
                        ),
                    };
                    self.progress
                        .println(format!("{}: naive: {err}", case.name));
                    return Ok(ImplResult::without_timing(
                        implementation,
                        Status::DoesNotFit,
                        note,
                    ));
                }
                Err(err) => return Err(err.into()),
            },
            Impl::Cpu | Impl::Linear | Impl::Backward => {
                unreachable!("timed by time_cpu, time_linear and time_backward")
            }
        };
        let got = out.to_f32_vec(gpu)?;
        let (max_error, within) = match sample.check(&got, implementation) {
            Ok(checked) => checked,
            Err(message) => return Ok(ImplResult::invalid(implementation, message, gpu_bytes)),
        };
        let timing = time_gpu(
            gpu,
            TimingPlan {
                warmup: 0,
                runs: self.iters,
            },
            |encoder| match implementation {
                Impl::Naive => gpu
                    .naive_attention(encoder, &args, &case.config)
                    .map(|_| ()),
                _ => gpu.forward(encoder, &args, case.forward_options()),
            },
        )?;
        Ok(ImplResult::timed(
            implementation,
            within,
            (sample.stride > 1).then(|| format!("validated every {}th row", sample.stride)),
            &timing,
            flops,
            gpu_bytes,
            max_error,
        ))
    }

    /// Linear attention on the case's inputs (V's head dim is the case's),
    /// checked on every row against its f64 reference, then timed.
    fn time_linear(&self, case: &Case, operands: &Operands) -> Result<ImplResult> {
        let Some((shape, config)) = linear_args_of(case) else {
            return Ok(ImplResult::without_timing(
                Impl::Linear,
                Status::Skipped,
                "linear attention takes no window, scale, softcap, ALiBi or sinks".into(),
            ));
        };
        let gpu = self.gpu;
        let s = &case.shape;
        let out = Tensor::filled_as(gpu, shape.out_shape(), f32::NAN, case.dtype)?;
        let args = LinearArgs {
            q: &operands.q,
            k: &operands.k,
            v: &operands.v,
            out: &out,
            state: None,
        };
        let flops = shape.flops();
        gpu.run(|e| gpu.linear_attention(e, &args, &config))?;
        let [q, k, v] = &operands.host;
        let want = reference::linear_attention(&shape, q, k, v, &config, None)?;
        let sample = Sample {
            stride: 1,
            rows: s.batch * s.heads_q * s.seq_q,
            want: ReferenceOutput {
                out: want.out,
                lse: Vec::new(),
            },
            roundoff: unit_roundoff(case.dtype),
            weight_rounding: 0.0,
        };
        let plan = wgpu_flash_attn::LinearPlan::for_call(gpu.info(), &shape, case.dtype, &config)?;
        let gpu_bytes = out.buffer().size() + plan.split_state_bytes(&shape);
        let (max_error, within) = match sample.check(&out.to_f32_vec(gpu)?, Impl::Linear) {
            Ok(checked) => checked,
            Err(message) => return Ok(ImplResult::invalid(Impl::Linear, message, gpu_bytes)),
        };
        let timing = time_gpu(
            gpu,
            TimingPlan {
                warmup: 0,
                runs: self.iters,
            },
            |encoder| gpu.linear_attention(encoder, &args, &config),
        )?;
        Ok(ImplResult::timed(
            Impl::Linear,
            within,
            Some(format!(
                "{} key splits of {} keys",
                plan.splits(),
                plan.split_keys()
            )),
            &timing,
            flops,
            gpu_bytes,
            max_error,
        ))
    }

    fn time_cpu(&self, case: &Case, operands: &Operands, flops: f64) -> Result<ImplResult> {
        if flops > self.cpu_budget_flops {
            return Ok(ImplResult::without_timing(
                Impl::Cpu,
                Status::Skipped,
                format!(
                    "{:.1} GFLOP is over the CPU reference budget of {:.1} GFLOP",
                    flops / 1e9,
                    self.cpu_budget_flops / 1e9
                ),
            ));
        }
        let [q, k, v] = &operands.host;
        let mut times = Vec::new();
        for _ in 0..self.cpu_runs.max(1) {
            let start = Instant::now();
            std::hint::black_box(reference::attention(&case.shape, q, k, v, &case.config)?);
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median_ms = median(&times);
        Ok(ImplResult {
            implementation: Impl::Cpu,
            status: Status::Ok,
            note: Some("f64 reference on all CPU cores".into()),
            median_ms: Some(median_ms),
            min_ms: times.first().copied(),
            max_ms: times.last().copied(),
            runs: times.len(),
            timer: Some(Timer::WallClock.to_string()),
            flops,
            gflops: Some(flops / (median_ms * 1e6)),
            pct_of_fma_ceiling: None,
            speedup_over_naive: None,
            gpu_bytes: None,
            max_abs_err: None,
        })
    }
}

/// Linear attention's shape and options on `case`'s inputs (its
/// causality and forced tier), or `None` where the case has options that
/// linear attention does not take.
pub fn linear_args_of(case: &Case) -> Option<(LinearShape, LinearConfig)> {
    let config = &case.config;
    let mut plain = AttentionConfig::new().causal(config.causal);
    let mut linear = LinearConfig::new().causal(config.causal);
    if let Some(tier) = config.tier {
        plain = plain.tier(tier);
        linear = linear.tier(tier);
    }
    let s = &case.shape;
    let shape = LinearShape {
        batch: s.batch,
        seq_q: s.seq_q,
        seq_kv: s.seq_kv,
        heads_q: s.heads_q,
        heads_kv: s.heads_kv,
        head_dim: s.head_dim,
        head_dim_v: s.head_dim_v,
    };
    (*config == plain).then_some((shape, linear))
}

/// Bytes in the largest binary unit that keeps the number at least 1.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
