//! Linear attention (Katharopoulos et al., "Transformers are RNNs", 2020):
//! the O(n) alternative to softmax attention, beside it under one API.
//!
//! With a positive feature map `phi`, every query row `i` gets
//!
//! ```text
//! out_i = phi(q_i)^T S_i / (phi(q_i) . z_i + eps)
//! S_i   = sum_j phi(k_j) v_j^T     ([head_dim, head_dim_v])
//! z_i   = sum_j phi(k_j)           ([head_dim])
//! ```
//!
//! over every key (non-causal) or over keys `j <= i` (causal, where queries
//! and keys are the same tokens). This is a different function from softmax
//! attention, not an approximation the crate checks against it. Definitions,
//! the feature maps, `eps` and the state layout: `docs/semantics.md`.

mod dispatch;
mod plan;
mod state;

pub use plan::LinearPlan;
pub use state::LinearState;

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorShape};

/// The `eps` of [`LinearConfig::new`], as in the authors' implementation.
pub const DEFAULT_LINEAR_EPS: f32 = 1e-6;

/// The feature map `phi`, applied element-wise to queries and keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum FeatureMap {
    /// `elu(x) + 1`: `x + 1` for `x > 0`, `exp(x)` otherwise; positive for
    /// every finite input, so the denominator is positive (the paper's map).
    #[default]
    EluPlusOne,
    /// `phi(x) = x`. The denominator can then be zero or negative; the
    /// kernel divides by it as it is (plus `eps`).
    Identity,
}

/// Options of a linear attention call (build with [`LinearConfig::new`] and
/// the setters; more options may come).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LinearConfig {
    /// Each query sees keys up to its own position (queries and keys are
    /// the same tokens; earlier tokens enter through a [`LinearState`]).
    pub causal: bool,
    /// The feature map applied to queries and keys.
    pub feature_map: FeatureMap,
    /// Added to every denominator; finite and >= 0.
    pub eps: f32,
    /// Force a kernel tier (default: the best the adapter offers, as for
    /// softmax attention).
    pub tier: Option<crate::Tier>,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig::new()
    }
}

impl LinearConfig {
    /// Non-causal, `elu(x) + 1`, `eps` = [`DEFAULT_LINEAR_EPS`].
    pub fn new() -> Self {
        LinearConfig {
            causal: false,
            feature_map: FeatureMap::EluPlusOne,
            eps: DEFAULT_LINEAR_EPS,
            tier: None,
        }
    }
    /// Sets causality.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the feature map.
    pub fn feature_map(mut self, feature_map: FeatureMap) -> Self {
        self.feature_map = feature_map;
        self
    }
    /// Sets `eps` (finite, >= 0).
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    /// Forces a kernel tier.
    pub fn tier(mut self, tier: crate::Tier) -> Self {
        self.tier = Some(tier);
        self
    }

    /// Checks the options against `shape`.
    pub(crate) fn validate(&self, shape: &LinearShape) -> Result<()> {
        shape.validate()?;
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(Error::InvalidEps(self.eps));
        }
        if self.causal && shape.seq_q != shape.seq_kv {
            return Err(Error::ShapeMismatch {
                what: "causal linear attention takes queries and keys of the same tokens \
                       (earlier tokens go in a LinearState)",
                left_name: "seq_q",
                left: shape.seq_q,
                right_name: "seq_kv",
                right: shape.seq_kv,
            });
        }
        Ok(())
    }
}

/// The dimensions of one linear attention call: Q `[batch, seq_q, heads_q,
/// head_dim]`, K `[batch, seq_kv, heads_kv, head_dim]`, V `[batch, seq_kv,
/// heads_kv, head_dim_v]`, O `[batch, seq_q, heads_q, head_dim_v]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct LinearShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query tokens per sequence.
    pub seq_q: usize,
    /// Key/value tokens per sequence.
    pub seq_kv: usize,
    /// Query heads; a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads (one state each).
    pub heads_kv: usize,
    /// Query/key elements per head: a multiple of 8 from 8 to 256.
    pub head_dim: usize,
    /// Value (and output) elements per head: a multiple of 8 from 8 to 256.
    pub head_dim_v: usize,
}

/// The head dims linear attention takes (query/key and value alike).
pub const LINEAR_HEAD_DIMS: &str = "multiples of 8 from 8 to 256";

impl LinearShape {
    /// Self-attention (`seq_q = seq_kv`, `heads_q = heads_kv`).
    pub fn self_attention(
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        head_dim_v: usize,
    ) -> Self {
        LinearShape {
            batch,
            seq_q: seq,
            seq_kv: seq,
            heads_q: heads,
            heads_kv: heads,
            head_dim,
            head_dim_v,
        }
    }
    /// `[batch, seq_q, heads_q, head_dim]`.
    pub fn q_shape(&self) -> TensorShape {
        TensorShape::new(self.batch, self.seq_q, self.heads_q, self.head_dim)
    }
    /// `[batch, seq_kv, heads_kv, head_dim]`.
    pub fn k_shape(&self) -> TensorShape {
        TensorShape::new(self.batch, self.seq_kv, self.heads_kv, self.head_dim)
    }
    /// `[batch, seq_kv, heads_kv, head_dim_v]`.
    pub fn v_shape(&self) -> TensorShape {
        TensorShape::new(self.batch, self.seq_kv, self.heads_kv, self.head_dim_v)
    }
    /// `[batch, seq_q, heads_q, head_dim_v]`.
    pub fn out_shape(&self) -> TensorShape {
        TensorShape::new(self.batch, self.seq_q, self.heads_q, self.head_dim_v)
    }
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        // 0 for a shape without KV heads (which every call refuses).
        self.heads_q.checked_div(self.heads_kv).unwrap_or(0)
    }

    /// The FLOPs linear attention needs, causal or not: 2 per (key, head
    /// dim, value head dim) per KV head to build the state, and 2 per
    /// (query, head dim, value head dim) per query head to apply it (the
    /// count of the recurrent form the reference computes; the kernels'
    /// chunk-local quadratic part in causal calls is not credited).
    /// `4 * N * head_dim * head_dim_v` per head for self-attention.
    pub fn flops(&self) -> f64 {
        // In f64: a shape past usize (which every call refuses) counts
        // rather than overflows.
        let f = |n: usize| n as f64;
        let rows =
            f(self.batch) * (f(self.heads_kv) * f(self.seq_kv) + f(self.heads_q) * f(self.seq_q));
        2.0 * rows * f(self.head_dim) * f(self.head_dim_v)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let dims = [
            self.batch,
            self.seq_q,
            self.seq_kv,
            self.heads_q,
            self.heads_kv,
            self.head_dim,
            self.head_dim_v,
        ];
        if dims.contains(&0) {
            return Err(Error::ZeroDimension {
                tensor: "linear attention shape",
                shape: [
                    self.batch,
                    self.seq_q.min(self.seq_kv),
                    self.heads_q.min(self.heads_kv),
                    self.head_dim.min(self.head_dim_v),
                ],
            });
        }
        for (name, shape) in [
            ("q", self.q_shape()),
            ("k", self.k_shape()),
            ("v", self.v_shape()),
            ("out", self.out_shape()),
        ] {
            crate::tensor::check_shape(name, shape)?;
        }
        if !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::HeadsNotDivisible {
                heads_q: self.heads_q,
                heads_kv: self.heads_kv,
            });
        }
        for got in [self.head_dim, self.head_dim_v] {
            // The state is head_dim x head_dim_v per KV head: the kernels
            // stop at 256 (wider heads would need the state split).
            if !(got.is_multiple_of(8) && (8..=256).contains(&got)) {
                return Err(Error::HeadDimUnsupported {
                    got,
                    supported: LINEAR_HEAD_DIMS,
                });
            }
        }
        Ok(())
    }
}

/// The operands of one linear attention call; `out` is written in place.
#[derive(Debug, Clone, Copy)]
pub struct LinearArgs<'a> {
    /// `[batch, seq_q, heads_q, head_dim]`; its dtype is the call's storage
    /// type, which K, V and `out` share.
    pub q: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim]`.
    pub k: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim_v]`.
    pub v: &'a Tensor,
    /// `[batch, seq_q, heads_q, head_dim_v]`, written in place.
    pub out: &'a Tensor,
    /// Causal calls only: the state of the tokens before this call's
    /// (read), replaced by the state after them (written). Recurrent
    /// decoding is a causal call of one token with a state.
    pub state: Option<&'a LinearState>,
}

impl LinearArgs<'_> {
    /// The call's shape, after checking that Q, K, V and O agree.
    pub fn shape(&self) -> Result<LinearShape> {
        let (q, k, v, o) = (
            self.q.shape(),
            self.k.shape(),
            self.v.shape(),
            self.out.shape(),
        );
        let differ = "K and V differ";
        let q_k = "Q and K differ";
        let out = "O must be [batch, seq_q, heads_q, head_dim_v]";
        crate::operands::require_equal(&[
            (differ, "k.batch", k.batch, "v.batch", v.batch),
            (differ, "k.seq", k.seq, "v.seq", v.seq),
            (differ, "k.heads", k.heads, "v.heads", v.heads),
            (q_k, "q.batch", q.batch, "k.batch", k.batch),
            (q_k, "q.head_dim", q.head_dim, "k.head_dim", k.head_dim),
            (out, "out.batch", o.batch, "q.batch", q.batch),
            (out, "out.seq", o.seq, "q.seq", q.seq),
            (out, "out.heads", o.heads, "q.heads", q.heads),
            (out, "out.head_dim", o.head_dim, "v.head_dim", v.head_dim),
        ])?;
        Ok(LinearShape {
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
