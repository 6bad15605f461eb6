//! The CPU oracle: exact softmax attention with f64 accumulation and exactly
//! the crate's semantics (see [`AttentionConfig`]). Every GPU test compares
//! against it; users can call it to validate their own GPU.
//!
//! Inputs are packed BSHD f32 slices. Rows run in parallel with rayon.

use rayon::prelude::*;

mod linear;

pub use linear::{
    LinearReferenceOutput, LinearReferenceState, apply_feature_map, linear_attention,
};

use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};

/// Result of [`attention`].
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    /// `[batch, seq_q, heads_q, head_dim]`.
    pub out: Vec<f64>,
    /// `[batch, heads_q, seq_q]`, natural log; `+inf` for rows that see no key.
    pub lse: Vec<f64>,
}

/// Exact attention of packed BSHD inputs.
pub fn attention(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
) -> Result<ReferenceOutput> {
    attention_rows(shape, q, k, v, config, |_, _, _| true)
}

/// Like [`attention`], but computes only the rows `(batch, head_q, row)` for
/// which `wanted` is true (the others are left as NaN), so a large shape can
/// be validated on a sample.
pub fn attention_rows(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    wanted: impl Fn(usize, usize, usize) -> bool + Sync,
) -> Result<ReferenceOutput> {
    attention_core(shape, q, k, v, config, wanted, |_, _, _, _| Some(0.0))
}

/// A mask as the reference applies it: `[batch|1, heads|1, seq_q, seq_kv]`
/// values, broadcast over batch and heads.
#[derive(Debug, Clone, Copy)]
pub enum HostMask<'a> {
    /// Added to the scores (natural units, after softcap and ALiBi);
    /// `-inf` hides a key.
    Bias {
        /// `[batch|1, heads|1, seq_q, seq_kv]`.
        dims: [usize; 4],
        /// The biases, row-major over `dims`.
        values: &'a [f32],
    },
    /// `true`: the query may attend the key.
    Bool {
        /// `[batch|1, heads|1, seq_q, seq_kv]`.
        dims: [usize; 4],
        /// Whether each query may attend each key, row-major over `dims`.
        values: &'a [bool],
    },
}

impl HostMask<'_> {
    /// Bias for (batch, head, row, key); `None` when the key is hidden.
    pub fn at(&self, b: usize, h: usize, i: usize, j: usize) -> Option<f64> {
        let index = |dims: [usize; 4]| {
            let b = if dims[0] == 1 { 0 } else { b };
            let h = if dims[1] == 1 { 0 } else { h };
            ((b * dims[1] + h) * dims[2] + i) * dims[3] + j
        };
        match *self {
            HostMask::Bias { dims, values } => {
                let x = f64::from(values[index(dims)]);
                (x != f64::NEG_INFINITY).then_some(x)
            }
            HostMask::Bool { dims, values } => values[index(dims)].then_some(0.0),
        }
    }
}

/// Exact attention with a mask as well as the config's options (their
/// intersection). A row whose keys are all hidden outputs zeros and
/// logsumexp `+inf`.
pub fn attention_masked(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    mask: &HostMask<'_>,
) -> Result<ReferenceOutput> {
    attention_masked_rows(shape, q, k, v, config, mask, |_, _, _| true)
}

/// [`attention_masked`] on the rows `(batch, head_q, row)` for which
/// `wanted` is true (the others are NaN), to validate large shapes on a
/// sample.
pub fn attention_masked_rows(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    mask: &HostMask<'_>,
    wanted: impl Fn(usize, usize, usize) -> bool + Sync,
) -> Result<ReferenceOutput> {
    attention_core(shape, q, k, v, config, wanted, |b, h, i, j| {
        mask.at(b, h, i, j)
    })
}

/// The reference proper: `bias(b, h, i, j)` adds to a score, or hides the
/// key with `None`.
fn attention_core(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    wanted: impl Fn(usize, usize, usize) -> bool + Sync,
    bias: impl Fn(usize, usize, usize, usize) -> Option<f64> + Sync,
) -> Result<ReferenceOutput> {
    config.validate(shape)?;
    check_len("q", shape.q_shape().elements(), q.len())?;
    check_len("k", shape.kv_shape().elements(), k.len())?;
    check_len("v", shape.kv_shape().elements(), v.len())?;

    let AttentionShape {
        batch,
        seq_q,
        seq_kv,
        heads_q,
        heads_kv,
        head_dim: d,
    } = *shape;
    let group = shape.group_size();
    let scale = f64::from(config.effective_scale(d));

    // One work item per (batch, row, head_q), in output order.
    let rows: Vec<(Vec<f64>, f64)> = (0..batch * seq_q * heads_q)
        .into_par_iter()
        .map(|index| {
            let h = index % heads_q;
            let i = (index / heads_q) % seq_q;
            let b = index / (heads_q * seq_q);
            if !wanted(b, h, i) {
                return (vec![f64::NAN; d], f64::NAN);
            }
            let hk = h / group;
            let q_row = &q[((b * seq_q + i) * heads_q + h) * d..][..d];
            let keys = config.visible_keys(i, seq_q, seq_kv);
            if keys.is_empty() {
                return (vec![0.0; d], f64::INFINITY);
            }
            let pos = i as i64 + seq_kv as i64 - seq_q as i64;
            let slope = config
                .alibi
                .as_ref()
                .map(|a| f64::from(a.slope(b, h, heads_q)));
            let kv_at = |j: usize| ((b * seq_kv + j) * heads_kv + hk) * d;
            let keys: Vec<(usize, f64)> =
                keys.filter_map(|j| Some((j, bias(b, h, i, j)?))).collect();
            if keys.is_empty() {
                return (vec![0.0; d], f64::INFINITY);
            }
            let scores: Vec<f64> = keys
                .iter()
                .map(|&(j, extra)| {
                    let k_row = &k[kv_at(j)..][..d];
                    let dot: f64 = q_row
                        .iter()
                        .zip(k_row)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let mut s = dot * scale;
                    if let Some(cap) = config.softcap {
                        let cap = f64::from(cap);
                        s = cap * (s / cap).tanh();
                    }
                    if let Some(m) = slope {
                        s -= m * (pos - j as i64).unsigned_abs() as f64;
                    }
                    s + extra
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let mut out = vec![0.0f64; d];
            for (&(j, _), w) in keys.iter().zip(&weights) {
                let v_row = &v[kv_at(j)..][..d];
                for (o, &x) in out.iter_mut().zip(v_row) {
                    *o += w * f64::from(x);
                }
            }
            out.iter_mut().for_each(|o| *o /= sum);
            (out, max + sum.ln())
        })
        .collect();

    let mut out = Vec::with_capacity(batch * seq_q * heads_q * d);
    let mut lse = vec![0.0; batch * heads_q * seq_q];
    for (index, (row, row_lse)) in rows.into_iter().enumerate() {
        let h = index % heads_q;
        let i = (index / heads_q) % seq_q;
        let b = index / (heads_q * seq_q);
        out.extend_from_slice(&row);
        lse[(b * heads_q + h) * seq_q + i] = row_lse;
    }
    Ok(ReferenceOutput { out, lse })
}

fn check_len(tensor: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::DataLength {
            tensor,
            expected,
            got,
        });
    }
    Ok(())
}

/// Rotary embedding in f64: `data` is packed `[batch, tokens, heads,
/// head_dim]`, token `t` of sequence `b` sits at position
/// `first_positions[b] + t`.
pub fn rope(
    rope: &crate::Rope,
    shape: crate::TensorShape,
    data: &[f32],
    first_positions: &[u64],
) -> crate::Result<Vec<f64>> {
    let rotary_dim = rope.checked_rotary_dim(shape.head_dim)?;
    let mut out: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
    let half = rotary_dim / 2;
    for (vector, chunk) in out.chunks_mut(shape.head_dim).enumerate() {
        let token = (vector / shape.heads) % shape.seq;
        let batch = vector / (shape.heads * shape.seq);
        let position = (first_positions[batch] + token as u64) as f64;
        for i in 0..half {
            let (a, b) = match rope.style {
                crate::RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                crate::RopeStyle::HalfSplit => (i, i + half),
            };
            let (sin, cos) = (position * rope.theta(i, rotary_dim)).sin_cos();
            let (x, y) = (chunk[a], chunk[b]);
            chunk[a] = x * cos - y * sin;
            chunk[b] = x * sin + y * cos;
        }
    }
    Ok(out)
}
