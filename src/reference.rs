//! The CPU oracle: exact softmax attention with f64 accumulation and exactly
//! the crate's semantics (see [`AttentionConfig`]). Every GPU test compares
//! against it; users can call it to validate their own GPU.
//!
//! Inputs are packed BSHD f32 slices. Rows run in parallel with rayon.

use rayon::prelude::*;

mod backward;
mod linear;
#[cfg(test)]
mod tests;

pub use backward::{
    ReferenceGradients, attention_backward, attention_backward_f32,
    attention_backward_f32_of_sequences, attention_backward_of_sequences,
};
pub use linear::{
    LinearReferenceOutput, LinearReferenceState, apply_feature_map, linear_attention,
};

use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Result of [`attention`].
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    /// `[batch, seq_q, heads_q, head_dim_v]`.
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
    attention_core(shape, q, k, v, config, Rows::all().only(wanted))
}

/// [`attention`] of sequences cut out of a padded or packed batch: batch
/// entry `b` of this call is sequence `first_sequence + b` of the batch,
/// which is what dropout's mask depends on ([`crate::Dropout::keeps`]);
/// without dropout, the same as [`attention`].
pub fn attention_of_sequences(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    first_sequence: usize,
) -> Result<ReferenceOutput> {
    let rows = Rows::all().of_sequences(first_sequence);
    attention_core(shape, q, k, v, config, rows)
}

/// [`attention_of_sequences`] as standard attention computes it in `dtype`
/// (see [`attention_rows_in_precision`]): the baseline of FlashAttention's
/// rule for a sequence cut out of a padded or packed batch.
pub fn attention_of_sequences_in_precision(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    first_sequence: usize,
    dtype: DType,
) -> Result<ReferenceOutput> {
    let rows = Rows::all().of_sequences(first_sequence).in_precision(dtype);
    attention_core(shape, q, k, v, config, rows)
}

/// Standard attention as a framework computes it in `dtype`, the baseline
/// of FlashAttention's accuracy rule (docs/semantics.md): its two matrix
/// products accumulate in f32 (`q . k` and `P V` summed in f32, in key and
/// head-dim order), and each score, each probability, each output element
/// and the logsumexp are rounded to `dtype` (the logsumexp to f32), for
/// the rows `wanted` selects (the others NaN). A kernel is held to twice
/// this attention's error against [`attention`]: with `DType::F32` the
/// error no f32 kernel can be expected to beat (large scores, long heads),
/// with `DType::F16` that of a kernel whose own arithmetic rounds to f16
/// (`AttentionConfig::f16_products`).
pub fn attention_rows_in_precision(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    dtype: DType,
    wanted: impl Fn(usize, usize, usize) -> bool + Sync,
) -> Result<ReferenceOutput> {
    let rows = Rows::all().only(wanted).in_precision(dtype);
    attention_core(shape, q, k, v, config, rows)
}

/// `x` rounded to `dtype` (through f32).
fn round_to(dtype: DType, x: f64) -> f64 {
    let x = x as f32;
    f64::from(match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    })
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
    /// Checks that the mask holds one value per element of its dims and
    /// broadcasts to `shape` (as a device mask must): `DataLength`,
    /// `ZeroDimension` or `MaskShape` with the numbers.
    pub fn check(&self, shape: &AttentionShape) -> Result<()> {
        let (dims, values) = match *self {
            HostMask::Bias { dims, values } => (dims, values.len()),
            HostMask::Bool { dims, values } => (dims, values.len()),
        };
        crate::mask::check_dims(dims, values)?;
        crate::mask::check_broadcast(dims, shape)
    }

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
    mask.check(shape)?;
    let rows = Rows::all().only(wanted).masked(mask);
    attention_core(shape, q, k, v, config, rows)
}

/// [`attention_masked`] as standard attention computes it in `dtype` (see
/// [`attention_rows_in_precision`]): the baseline of FlashAttention's rule
/// for a masked call.
pub fn attention_masked_in_precision(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    mask: &HostMask<'_>,
    dtype: DType,
) -> Result<ReferenceOutput> {
    mask.check(shape)?;
    let rows = Rows::all().masked(mask).in_precision(dtype);
    attention_core(shape, q, k, v, config, rows)
}

/// Which rows a reference call computes and how: `wanted(b, h, i)` selects
/// the rows (the others are NaN), `bias(b, h, i, j)` is the mask (added to
/// a score, or `None` hiding the key), `precision` is `None` for the exact
/// reference and the storage type of standard attention otherwise (see
/// [`attention_rows_in_precision`]); batch entry `b` is sequence
/// `first_sequence + b` for dropout's mask.
struct Rows<W, B> {
    wanted: W,
    bias: B,
    precision: Option<DType>,
    first_sequence: usize,
}

/// Every row of the exact reference, unmasked, batch entries from sequence 0.
type AllRows = Rows<fn(usize, usize, usize) -> bool, fn(usize, usize, usize, usize) -> Option<f64>>;

impl AllRows {
    fn all() -> Self {
        Rows {
            wanted: |_, _, _| true,
            bias: |_, _, _, _| Some(0.0),
            precision: None,
            first_sequence: 0,
        }
    }
}

impl<W, B> Rows<W, B> {
    /// Only the rows `wanted(b, h, i)` selects.
    fn only<W2>(self, wanted: W2) -> Rows<W2, B> {
        Rows {
            wanted,
            bias: self.bias,
            precision: self.precision,
            first_sequence: self.first_sequence,
        }
    }

    /// Under `mask` (its biases, or its hidden keys).
    fn masked<'m>(
        self,
        mask: &'m HostMask<'m>,
    ) -> Rows<W, impl Fn(usize, usize, usize, usize) -> Option<f64> + 'm> {
        Rows {
            wanted: self.wanted,
            bias: move |b, h, i, j| mask.at(b, h, i, j),
            precision: self.precision,
            first_sequence: self.first_sequence,
        }
    }

    /// As standard attention computes it in `dtype`.
    fn in_precision(self, dtype: DType) -> Self {
        Rows {
            precision: Some(dtype),
            ..self
        }
    }

    /// Batch entry `b` is sequence `first_sequence + b` (dropout's mask).
    fn of_sequences(self, first_sequence: usize) -> Self {
        Rows {
            first_sequence,
            ..self
        }
    }
}

fn attention_core<W, B>(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &AttentionConfig,
    rows: Rows<W, B>,
) -> Result<ReferenceOutput>
where
    W: Fn(usize, usize, usize) -> bool + Sync,
    B: Fn(usize, usize, usize, usize) -> Option<f64> + Sync,
{
    let Rows {
        wanted,
        bias,
        precision,
        first_sequence,
    } = rows;
    let mut problem = Problem::new(shape, q, k, v, config, bias)?;
    problem.first_sequence = first_sequence;
    problem.dots_in_f32 = precision.is_some();
    // Each score, probability and output element as the arithmetic holds it.
    let round = |x: f64| precision.map_or(x, |dtype| round_to(dtype, x));
    // A sum of P V: exact, or f32 as a framework's matrix product adds.
    let add = |sum: f64, x: f64| match precision {
        None => sum + x,
        Some(_) => round_to(DType::F32, sum + round_to(DType::F32, x)),
    };
    let AttentionShape {
        batch,
        seq_q,
        heads_q,
        head_dim_v: d,
        ..
    } = *shape;

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
            let mut scores = problem.row_scores(b, h, i);
            for score in &mut scores {
                score.score = round(score.score);
            }
            let Some((weights, lse)) = softmax(&scores, problem.sink(h)) else {
                return (vec![0.0; d], f64::INFINITY);
            };
            // The logsumexp is f32 in every storage type.
            let lse = precision.map_or(lse, |_| round_to(DType::F32, lse));
            let mut out = vec![0.0f64; d];
            for (score, w) in scores.iter().zip(&weights) {
                let w = round(*w) * problem.dropout_factor(b, h, i, score.key);
                for (o, &x) in out.iter_mut().zip(problem.v_row(b, h, score.key)) {
                    *o = add(*o, w * f64::from(x));
                }
            }
            (out.into_iter().map(round).collect(), lse)
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

/// One visible key of a query row.
pub(crate) struct Score {
    pub key: usize,
    /// q . k, before any option.
    pub dot: f64,
    /// The final score: scaled, capped, ALiBi and bias added (natural units).
    pub score: f64,
}

/// Softmax weights of a row's scores and its logsumexp, a sink logit
/// joining the denominator; `None` for a row without keys or sink.
pub(crate) fn softmax(scores: &[Score], sink: Option<f64>) -> Option<(Vec<f64>, f64)> {
    if scores.is_empty() && sink.is_none() {
        return None;
    }
    let max = scores
        .iter()
        .map(|s| s.score)
        .chain(sink)
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s.score - max).exp()).collect();
    let sum: f64 = weights.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - max).exp());
    Some((weights.iter().map(|w| w / sum).collect(), max + sum.ln()))
}

/// A checked call of the reference: packed BSHD inputs, options and the
/// mask as `bias(b, h, i, j)` (`None` hides the key).
pub(crate) struct Problem<'a, B> {
    pub shape: AttentionShape,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub config: &'a AttentionConfig,
    pub scale: f64,
    /// Dropout's sequence index of batch entry 0 (a sequence cut out of a
    /// larger batch); 0 for a whole call.
    pub first_sequence: usize,
    /// Form `q . k` in f32 (standard attention's f32 matrix product) rather
    /// than exactly.
    pub dots_in_f32: bool,
    bias: B,
}

impl<'a, B: Fn(usize, usize, usize, usize) -> Option<f64> + Sync> Problem<'a, B> {
    pub fn new(
        shape: &AttentionShape,
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        config: &'a AttentionConfig,
        bias: B,
    ) -> Result<Self> {
        config.validate(shape)?;
        check_len("q", shape.q_shape().elements(), q.len())?;
        check_len("k", shape.k_shape().elements(), k.len())?;
        check_len("v", shape.v_shape().elements(), v.len())?;
        Ok(Problem {
            shape: *shape,
            q,
            k,
            v,
            config,
            scale: f64::from(config.effective_scale(shape.head_dim)),
            first_sequence: 0,
            dots_in_f32: false,
            bias,
        })
    }

    /// Query head `h`'s sink logit, if the call has sinks.
    pub fn sink(&self, h: usize) -> Option<f64> {
        self.config.sinks.as_ref().map(|s| f64::from(s[h]))
    }

    /// What dropout multiplies the probability of key `j` in row `i` of
    /// head `h` of batch entry `b` by: `1 / (1 - p)` where
    /// [`crate::Dropout::keeps`] the pair, 0 where not; 1 without dropout.
    pub fn dropout_factor(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        match self.config.active_dropout() {
            None => 1.0,
            Some(d) if d.keeps(self.first_sequence + b, h, i, j) => 1.0 / d.keep_probability(),
            Some(_) => 0.0,
        }
    }

    /// Offset of query row `i` of head `h` (also of dQ).
    pub fn q_at(&self, b: usize, h: usize, i: usize) -> usize {
        let s = &self.shape;
        ((b * s.seq_q + i) * s.heads_q + h) * s.head_dim
    }

    /// Offset of query row `i` of head `h` in O and dO (`head_dim_v` wide).
    pub fn o_at(&self, b: usize, h: usize, i: usize) -> usize {
        let s = &self.shape;
        ((b * s.seq_q + i) * s.heads_q + h) * s.head_dim_v
    }

    /// Offset of key `j` of the KV head that query head `h` reads (also
    /// of dK).
    pub fn kv_at(&self, b: usize, h: usize, j: usize) -> usize {
        let s = &self.shape;
        ((b * s.seq_kv + j) * s.heads_kv + h / s.group_size()) * s.head_dim
    }

    /// Offset of value `j` of the KV head that query head `h` reads (also
    /// of dV).
    pub fn v_at(&self, b: usize, h: usize, j: usize) -> usize {
        let s = &self.shape;
        ((b * s.seq_kv + j) * s.heads_kv + h / s.group_size()) * s.head_dim_v
    }

    pub fn q_row(&self, b: usize, h: usize, i: usize) -> &'a [f32] {
        &self.q[self.q_at(b, h, i)..][..self.shape.head_dim]
    }

    pub fn k_row(&self, b: usize, h: usize, j: usize) -> &'a [f32] {
        &self.k[self.kv_at(b, h, j)..][..self.shape.head_dim]
    }

    pub fn v_row(&self, b: usize, h: usize, j: usize) -> &'a [f32] {
        &self.v[self.v_at(b, h, j)..][..self.shape.head_dim_v]
    }

    /// The keys query row `i` of head `h` sees, with their scores.
    pub fn row_scores(&self, b: usize, h: usize, i: usize) -> Vec<Score> {
        let AttentionShape {
            seq_q,
            seq_kv,
            heads_q,
            ..
        } = self.shape;
        let config = self.config;
        let pos = i as i64 + seq_kv as i64 - seq_q as i64;
        let slope = config
            .alibi
            .as_ref()
            .map(|a| f64::from(a.slope(b, h, heads_q)));
        let q_row = self.q_row(b, h, i);
        config
            .visible_keys(i, seq_q, seq_kv)
            .filter_map(|j| {
                let extra = (self.bias)(b, h, i, j)?;
                let k_row = self.k_row(b, h, j);
                let dot: f64 = if self.dots_in_f32 {
                    f64::from(
                        q_row
                            .iter()
                            .zip(k_row)
                            .fold(0.0f32, |sum, (&a, &b)| sum + a * b),
                    )
                } else {
                    q_row
                        .iter()
                        .zip(k_row)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum()
                };
                let mut s = dot * self.scale;
                if let Some(cap) = config.softcap {
                    let cap = f64::from(cap);
                    s = cap * (s / cap).tanh();
                }
                if let Some(m) = slope {
                    s -= m * (pos - j as i64).unsigned_abs() as f64;
                }
                Some(Score {
                    key: j,
                    dot,
                    score: s + extra,
                })
            })
            .collect()
    }
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
    crate::tensor::check_shape("rope data", shape)?;
    check_len("rope data", shape.elements(), data.len())?;
    check_len(
        "first_positions (one per sequence)",
        shape.batch,
        first_positions.len(),
    )?;
    // Positions up to first + tokens must be u64s.
    if first_positions
        .iter()
        .any(|&p| p.checked_add(shape.seq as u64).is_none())
    {
        return Err(Error::ShapeOverflow {
            tensor: "rope positions (first_positions[b] + tokens past u64::MAX)",
            shape: shape.as_array(),
        });
    }
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
