//! The backward of the reference attention in f64: the exact gradients of
//! `sum(out * d_out)` with respect to Q, K and V (checked against central
//! finite differences of the forward in tests/backward.rs); and the same
//! computation as standard attention does it in f32, the baseline of
//! FlashAttention's accuracy rule.

use rayon::prelude::*;

use super::{HostMask, Problem, check_len, softmax};
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::Result;

/// Result of [`attention_backward`]: the forward's results and the
/// gradients, packed like the inputs.
#[derive(Debug, Clone)]
pub struct ReferenceGradients {
    /// `[batch, seq_q, heads_q, head_dim_v]`.
    pub out: Vec<f64>,
    /// `[batch, heads_q, seq_q]`, natural log; `+inf` for rows that see no
    /// key.
    pub lse: Vec<f64>,
    /// `[batch, seq_q, heads_q, head_dim]`.
    pub dq: Vec<f64>,
    /// `[batch, seq_kv, heads_kv, head_dim]`, summed over each KV head's
    /// query heads.
    pub dk: Vec<f64>,
    /// `[batch, seq_kv, heads_kv, head_dim_v]`.
    pub dv: Vec<f64>,
    /// `[heads_q]`: the gradient of each attention sink, summed over batch
    /// and rows (`-sum exp(sink - lse) * D`, D = dO . O); empty when the
    /// call has no sinks.
    pub dsinks: Vec<f64>,
}

/// Exact attention and its gradients given `d_out` (packed like the
/// output, `[batch, seq_q, heads_q, head_dim_v]`), with
/// the config's options and, if given, a mask. Rows that see no key have
/// zero gradients. The mask's bias, ALiBi slopes, scale and softcap are
/// constants (not differentiated); sinks are differentiated.
pub fn attention_backward(
    shape: &AttentionShape,
    inputs: [&[f32]; 4],
    config: &AttentionConfig,
    mask: Option<&HostMask<'_>>,
) -> Result<ReferenceGradients> {
    backward(Arithmetic::F64, shape, inputs, config, mask, 0)
}

/// [`attention_backward`] of sequences cut out of a padded or packed
/// batch: batch entry `b` of this call is sequence `first_sequence + b`,
/// which is what dropout's mask depends on (see
/// [`super::attention_of_sequences`]).
pub fn attention_backward_of_sequences(
    shape: &AttentionShape,
    inputs: [&[f32]; 4],
    config: &AttentionConfig,
    first_sequence: usize,
) -> Result<ReferenceGradients> {
    backward(Arithmetic::F64, shape, inputs, config, None, first_sequence)
}

/// [`attention_backward`] as standard (non-flash) attention computes it in
/// f32, as a framework does: the scores `q . k` summed in f32 and rounded
/// after the options, then probabilities, outputs, dP = dO V^T,
/// D = rowsum(dO * O), dS and every gradient's sum in f32 arithmetic. Its distance from
/// [`attention_backward`] is the error no f32 implementation can be
/// expected to beat: where the softmax is sharp and heads are long, dP and
/// D nearly cancel and their f32 sums leave errors far above the gradients'
/// own rounding (FlashAttention's rule: a kernel within twice this).
pub fn attention_backward_f32(
    shape: &AttentionShape,
    inputs: [&[f32]; 4],
    config: &AttentionConfig,
    mask: Option<&HostMask<'_>>,
) -> Result<ReferenceGradients> {
    backward(Arithmetic::F32, shape, inputs, config, mask, 0)
}

/// [`attention_backward_f32`] of sequences cut out of a padded or packed
/// batch, numbered as in [`attention_backward_of_sequences`]: the baseline
/// of FlashAttention's rule for such a batch with dropout.
pub fn attention_backward_f32_of_sequences(
    shape: &AttentionShape,
    inputs: [&[f32]; 4],
    config: &AttentionConfig,
    first_sequence: usize,
) -> Result<ReferenceGradients> {
    backward(Arithmetic::F32, shape, inputs, config, None, first_sequence)
}

/// The arithmetic of a backward: exact-ish f64, or f32 as standard
/// attention does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arithmetic {
    F64,
    F32,
}

impl Arithmetic {
    /// `x` as this arithmetic holds it.
    fn round(self, x: f64) -> f64 {
        match self {
            Arithmetic::F64 => x,
            Arithmetic::F32 => f64::from(x as f32),
        }
    }
    /// `a . b`, summed in this arithmetic.
    fn dot(self, a: &[f32], b: &[f32]) -> f64 {
        match self {
            Arithmetic::F64 => a
                .iter()
                .zip(b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum(),
            Arithmetic::F32 => f64::from(a.iter().zip(b).fold(0.0f32, |sum, (&x, &y)| sum + x * y)),
        }
    }
    /// `sum += x`, rounded as this arithmetic sums.
    fn add(self, sum: &mut f64, x: f64) {
        *sum = self.round(*sum + self.round(x));
    }
}

fn backward(
    arithmetic: Arithmetic,
    shape: &AttentionShape,
    [q, k, v, d_out]: [&[f32]; 4],
    config: &AttentionConfig,
    mask: Option<&HostMask<'_>>,
    first_sequence: usize,
) -> Result<ReferenceGradients> {
    let a = arithmetic;
    if let Some(mask) = mask {
        mask.check(shape)?;
    }
    let mut problem = Problem::new(shape, q, k, v, config, |b, h, i, j| match mask {
        Some(mask) => mask.at(b, h, i, j),
        None => Some(0.0),
    })?;
    problem.first_sequence = first_sequence;
    problem.dots_in_f32 = arithmetic == Arithmetic::F32;
    check_len("d_out", shape.o_shape().elements(), d_out.len())?;
    let AttentionShape {
        batch,
        seq_q,
        seq_kv,
        heads_q,
        heads_kv,
        head_dim: d,
        head_dim_v: dv,
    } = *shape;
    let group = shape.group_size();

    // One work item per (batch, KV head): it owns that head's dK and dV
    // and the dQ rows of its query heads.
    struct Unit {
        out: Vec<(usize, Vec<f64>)>,
        lse: Vec<(usize, f64)>,
        dq: Vec<(usize, Vec<f64>)>,
        dk: Vec<f64>,
        dv: Vec<f64>,
        /// Per query head of the group: its sink's gradient from this unit.
        dsinks: Vec<f64>,
    }
    let units: Vec<Unit> = (0..batch * heads_kv)
        .into_par_iter()
        .map(|unit| {
            let (b, hk) = (unit / heads_kv, unit % heads_kv);
            let mut result = Unit {
                out: Vec::new(),
                lse: Vec::new(),
                dq: Vec::new(),
                dk: vec![0.0; seq_kv * d],
                dv: vec![0.0; seq_kv * dv],
                dsinks: vec![0.0; group],
            };
            for h in hk * group..(hk + 1) * group {
                for i in 0..seq_q {
                    let at = problem.q_at(b, h, i);
                    let o_at = problem.o_at(b, h, i);
                    let scores = problem.row_scores(b, h, i);
                    let lse_at = (b * heads_q + h) * seq_q + i;
                    let sink = problem.sink(h);
                    // f32: the scores (q . k summed in f32) rounded, and
                    // the probabilities of the rounded scores rounded.
                    let mut scores = scores;
                    for score in &mut scores {
                        score.score = a.round(score.score);
                    }
                    let Some((probs, lse)) = softmax(&scores, sink) else {
                        result.out.push((o_at, vec![0.0; dv]));
                        result.lse.push((lse_at, f64::INFINITY));
                        result.dq.push((at, vec![0.0; d]));
                        continue;
                    };
                    let probs: Vec<f64> = probs.into_iter().map(|p| a.round(p)).collect();
                    let grad_out = &d_out[o_at..][..dv];
                    let q_row = problem.q_row(b, h, i);
                    // Dropout: each pair's factor (1 / (1 - p) kept, 0
                    // dropped; 1 without) weighs its value in O and dV, and
                    // its dP.
                    let drop: Vec<f64> = scores
                        .iter()
                        .map(|s| problem.dropout_factor(b, h, i, s.key))
                        .collect();
                    let dp: Vec<f64> = scores
                        .iter()
                        .zip(&drop)
                        .map(|(s, f)| a.dot(grad_out, problem.v_row(b, h, s.key)) * f)
                        .collect();
                    // D = sum_j P_j dP_j (= dO . O); in f32 from the f32 O,
                    // as standard attention forms it.
                    let delta: f64 = match a {
                        Arithmetic::F64 => probs.iter().zip(&dp).map(|(p, g)| p * g).sum(),
                        Arithmetic::F32 => {
                            let mut out = vec![0.0f64; dv];
                            for ((score, &p), f) in scores.iter().zip(&probs).zip(&drop) {
                                let v_row = problem.v_row(b, h, score.key);
                                for (o, &x) in out.iter_mut().zip(v_row) {
                                    a.add(o, p * f * f64::from(x));
                                }
                            }
                            let out: Vec<f32> = out.iter().map(|&o| o as f32).collect();
                            a.dot(grad_out, &out)
                        }
                    };
                    // The sink has no value (dP = 0): dsink = P_sink (0 - D).
                    if let Some(sink) = sink {
                        let d_sink = a.round(a.round((sink - lse).exp()) * delta);
                        a.add(&mut result.dsinks[h - hk * group], -d_sink);
                    }
                    let mut out = vec![0.0; dv];
                    let mut dq = vec![0.0; d];
                    for (((score, &p), &dp), f) in scores.iter().zip(&probs).zip(&dp).zip(&drop) {
                        let mut dx = a.round(a.round(p * a.round(dp - delta)) * problem.scale);
                        if let Some(cap) = config.softcap {
                            let th = (score.dot * problem.scale / f64::from(cap)).tanh();
                            dx = a.round(dx * (1.0 - th * th));
                        }
                        let (k_row, v_row) = (
                            problem.k_row(b, h, score.key),
                            problem.v_row(b, h, score.key),
                        );
                        let key = score.key * d;
                        for c in 0..d {
                            a.add(&mut dq[c], dx * f64::from(k_row[c]));
                            a.add(&mut result.dk[key + c], dx * f64::from(q_row[c]));
                        }
                        let value = score.key * dv;
                        let kept = p * f;
                        for c in 0..dv {
                            a.add(&mut out[c], kept * f64::from(v_row[c]));
                            a.add(&mut result.dv[value + c], kept * f64::from(grad_out[c]));
                        }
                    }
                    result.out.push((o_at, out));
                    result.lse.push((lse_at, lse));
                    result.dq.push((at, dq));
                }
            }
            result
        })
        .collect();

    let mut grads = ReferenceGradients {
        out: vec![0.0; shape.o_shape().elements()],
        lse: vec![0.0; batch * heads_q * seq_q],
        dq: vec![0.0; shape.q_shape().elements()],
        dk: vec![0.0; shape.k_shape().elements()],
        dv: vec![0.0; shape.v_shape().elements()],
        dsinks: vec![0.0; if config.sinks.is_some() { heads_q } else { 0 }],
    };
    for (unit_index, unit) in units.into_iter().enumerate() {
        let (b, hk) = (unit_index / heads_kv, unit_index % heads_kv);
        for (at, row) in unit.out {
            grads.out[at..at + dv].copy_from_slice(&row);
        }
        for (at, row) in unit.dq {
            grads.dq[at..at + d].copy_from_slice(&row);
        }
        for (at, lse) in unit.lse {
            grads.lse[at] = lse;
        }
        // Batch entries in order, so the sum is the same every run.
        for (g, dsink) in unit.dsinks.iter().enumerate() {
            if let Some(total) = grads.dsinks.get_mut(hk * group + g) {
                *total += dsink;
            }
        }
        for j in 0..seq_kv {
            let key = (b * seq_kv + j) * heads_kv + hk;
            grads.dk[key * d..][..d].copy_from_slice(&unit.dk[j * d..][..d]);
            grads.dv[key * dv..][..dv].copy_from_slice(&unit.dv[j * dv..][..dv]);
        }
    }
    Ok(grads)
}
