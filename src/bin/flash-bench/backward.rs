//! `run --backward`: the backward pass after a forward, validated against
//! the f64 reference backward and timed alone and with its forward. With
//! attention sinks the backward also writes their gradients (dsinks).

use anyhow::Result;
use wgpu_flash_attn::reference;
use wgpu_flash_attn::{
    Alibi, AttentionConfig, AttentionShape, BackwardArgs, BackwardPlan, Error, Lse, SinkGrads,
    Tensor,
};

use crate::measure::{
    Bench, Case, ImplResult, Operands, Status, TOLERANCE, bytes, round_to, unit_roundoff,
};
use crate::options::Impl;
use crate::random::{normal_vec, seeded};
use crate::timing::{TimingPlan, time_gpu};

/// FlashAttention's count: the backward does 2.5 times the forward's FLOPs
/// (five matrix products to its two).
pub const BACKWARD_FLOPS_PER_FORWARD: f64 = 2.5;

/// The f64 reference backward runs on the first KV head of the first batch
/// entry and the last of the last (all their query heads), each up to this
/// many (row, key, head-dim) products; longer calls are timed without
/// validation.
const VALIDATION_BUDGET: f64 = 2.2e9;

impl Bench<'_> {
    pub fn time_backward(&self, case: &Case, operands: &Operands) -> Result<ImplResult> {
        let gpu = self.gpu;
        let shape = &case.shape;
        let dtype = case.dtype;
        // Head dims the backward kernels lack (over 256, on either side),
        // and register-blocked layouts whose tiles the adapter cannot hold,
        // are a row of their own, not a failed run.
        if let Err(
            err @ (Error::HeadDimUnsupported { .. }
            | Error::WorkgroupMemory { .. }
            | Error::WorkgroupInvocations { .. }),
        ) = BackwardPlan::for_config(gpu.info(), shape, dtype, &case.config)
        {
            return Ok(ImplResult::without_timing(
                Impl::Backward,
                Status::Skipped,
                format!("unsupported by the GPU backward: {err}"),
            ));
        }
        let (q_dims, o_dims) = (shape.q_shape(), shape.o_shape());
        let mut rng = seeded(case.seed + 1);
        let d_out_host = round_to(dtype, normal_vec(&mut rng, o_dims.elements(), 1.0));
        let d_out = Tensor::from_f32_as(gpu, o_dims, &d_out_host, dtype)?;
        let poisoned = |dims| Tensor::filled_as(gpu, dims, f32::NAN, dtype);
        let out = poisoned(o_dims)?;
        let (dq, dk, dv) = (
            poisoned(q_dims)?,
            poisoned(shape.k_shape())?,
            poisoned(shape.v_shape())?,
        );
        let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q)?;
        // With sinks, their gradients too (NaN until the backward writes).
        let dsinks = SinkGrads::for_config(gpu, &case.config, shape.heads_q)?;
        let backward = BackwardArgs {
            q: &operands.q,
            k: &operands.k,
            v: &operands.v,
            out: &out,
            lse: &lse,
            d_out: &d_out,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            dsinks: dsinks.as_ref(),
        };
        let forward = backward.forward_args();
        let config = &case.config;
        // The call's own memory: the gradients, and the row deltas (one
        // float per query row, like the logsumexp the forward saved).
        let gpu_bytes = dq.buffer().size()
            + dk.buffer().size()
            + dv.buffer().size()
            + lse.buffer().size()
            + dsinks.as_ref().map_or(0, |d| d.buffer().size());
        // The first run validates and compiles.
        gpu.run(|e| {
            gpu.forward(e, &forward, config)?;
            gpu.backward(e, &backward, config)
        })?;
        let got = [
            dq.to_f32_vec(gpu)?,
            dk.to_f32_vec(gpu)?,
            dv.to_f32_vec(gpu)?,
        ];
        let got_dsinks = match &dsinks {
            Some(dsinks) => Some(dsinks.to_vec(gpu)?),
            None => None,
        };
        if let Some(index) = got.iter().flatten().position(|g| !g.is_finite()) {
            return Ok(ImplResult::invalid(
                Impl::Backward,
                format!("gradient element {index} is not finite"),
                gpu_bytes,
            ));
        }
        if let Some(head) = got_dsinks.iter().flatten().position(|g| !g.is_finite()) {
            return Ok(ImplResult::invalid(
                Impl::Backward,
                format!("the sink gradient of head {head} is not finite"),
                gpu_bytes,
            ));
        }
        let [q, k, v] = &operands.host;
        let validated = validate(
            shape,
            [q, k, v, &d_out_host],
            config,
            &got,
            got_dsinks.as_deref(),
        )?;
        let tolerance = TOLERANCE + 4.0 * unit_roundoff(dtype);
        let plan = TimingPlan {
            warmup: 0,
            runs: self.iters,
        };
        let alone = time_gpu(gpu, plan, |e| gpu.backward(e, &backward, config))?;
        let with_forward = time_gpu(gpu, plan, |e| {
            gpu.forward(e, &forward, config)?;
            gpu.backward(e, &backward, config)
        })?;
        let flops = BACKWARD_FLOPS_PER_FORWARD * shape.flops(config);
        let mut note = format!(
            "forward + backward {:.2} ms; gradients and row statistics {}",
            with_forward.median_ms,
            bytes(gpu_bytes),
        );
        let (error, within) = match validated {
            Some(Validated {
                error,
                dsinks_validated,
            }) => {
                if got_dsinks.is_some() && !dsinks_validated {
                    note.push_str(
                        "; dsinks not validated: they sum over the batch, the reference \
                         runs on batch entry 0",
                    );
                }
                (error, error <= tolerance)
            }
            None => {
                note.push_str("; not validated: the f64 reference is over its budget here");
                (f64::NAN, true)
            }
        };
        let mut result = ImplResult::timed(
            Impl::Backward,
            within,
            Some(note),
            &alone,
            flops,
            gpu_bytes,
            error,
        );
        if validated.is_none() {
            result.max_abs_err = None;
        }
        Ok(result)
    }
}

/// What `validate` compared.
struct Validated {
    /// Largest error, relative to the largest reference gradient.
    error: f64,
    /// Whether the sink gradients were among the compared (a one-entry
    /// batch with sinks).
    dsinks_validated: bool,
}

/// Largest |gpu - reference| over dq, dk, dv of two KV heads, the first
/// of the first batch entry and the last of the last (with dropout: the
/// last entry's first; one slice when they are the same), and, with sinks,
/// the sink gradients of their query heads (only for a one-entry batch:
/// the GPU sums them over the batch, the reference sees one entry), each
/// relative to the largest reference gradient (at least 1); `None` over
/// budget.
fn validate(
    shape: &AttentionShape,
    [q, k, v, d_out]: [&[f32]; 4],
    config: &AttentionConfig,
    [dq, dk, dv]: &[Vec<f32>; 3],
    dsinks: Option<&[f32]>,
) -> Result<Option<Validated>> {
    let group = shape.group_size();
    let (d, dv_dim) = (shape.head_dim, shape.head_dim_v);
    let work = (shape.seq_q * shape.seq_kv * group * d.max(dv_dim)) as f64;
    if work > VALIDATION_BUDGET {
        return Ok(None);
    }
    let slice = AttentionShape {
        batch: 1,
        heads_q: group,
        heads_kv: 1,
        ..*shape
    };
    let dsinks_validated = shape.batch == 1 && dsinks.is_some();
    // Dropout's mask depends on the query head, which a slice renumbers
    // from 0: with dropout the second slice is the last entry's first KV
    // head (the entry's index is given to the reference).
    let last_head = match config.active_dropout() {
        Some(_) => 0,
        None => shape.heads_kv - 1,
    };
    let mut slices = vec![(0, 0), (shape.batch - 1, last_head)];
    slices.dedup();
    let mut worst = 0.0f64;
    for (b, head_kv) in slices {
        let first_q = head_kv * group;
        // Row `i` of query heads first_q..first_q + group and key `j` of
        // KV head `head_kv`, batch entry `b`, in tensors of `width`
        // elements per head (Q and K: head_dim; V, O and their gradients:
        // head_dim_v).
        let gather_q = |x: &[f32], width: usize| -> Vec<f32> {
            (0..shape.seq_q)
                .flat_map(|i| {
                    let row = (b * shape.seq_q + i) * shape.heads_q + first_q;
                    x[row * width..][..group * width].iter().copied()
                })
                .collect()
        };
        let gather_kv = |x: &[f32], width: usize| -> Vec<f32> {
            (0..shape.seq_kv)
                .flat_map(|j| {
                    let at = (b * shape.seq_kv + j) * shape.heads_kv + head_kv;
                    x[at * width..][..width].iter().copied()
                })
                .collect()
        };
        let mut sliced = config.clone();
        sliced.alibi = config.alibi.as_ref().map(|alibi| {
            Alibi::PerHead(
                (first_q..first_q + group)
                    .map(|h| alibi.slope(b, h, shape.heads_q))
                    .collect(),
            )
        });
        sliced.sinks = config
            .sinks
            .as_ref()
            .map(|s| s[first_q..first_q + group].to_vec());
        let want = reference::attention_backward_of_sequences(
            &slice,
            [
                &gather_q(q, d),
                &gather_kv(k, d),
                &gather_kv(v, dv_dim),
                &gather_q(d_out, dv_dim),
            ],
            &sliced,
            b,
        )?;
        let mut compared = vec![
            (gather_q(dq, d), &want.dq),
            (gather_kv(dk, d), &want.dk),
            (gather_kv(dv, dv_dim), &want.dv),
        ];
        if let Some(dsinks) = dsinks.filter(|_| dsinks_validated) {
            compared.push((dsinks[first_q..first_q + group].to_vec(), &want.dsinks));
        }
        for (got, want) in compared {
            let magnitude = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((f64::from(*g) - w).abs() / magnitude);
            }
        }
    }
    Ok(Some(Validated {
        error: worst,
        dsinks_validated,
    }))
}
