//! Linear attention in f64, in its recurrent form (one token at a time),
//! the definition the chunked kernels are checked against.

use rayon::prelude::*;

use super::check_len;
use crate::error::{Error, Result};
use crate::linear::{FeatureMap, LinearConfig, LinearShape};

/// A linear attention state in f64: `s` is `[batch, heads_kv, head_dim,
/// head_dim_v]`, `z` is `[batch, heads_kv, head_dim]` (see
/// [`crate::LinearState`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearReferenceState {
    /// `sum_j phi(k_j) v_j^T` per (batch, KV head), row-major.
    pub s: Vec<f64>,
    /// `sum_j phi(k_j)` per (batch, KV head).
    pub z: Vec<f64>,
}

/// Result of [`linear_attention`].
#[derive(Debug, Clone)]
pub struct LinearReferenceOutput {
    /// `[batch, seq_q, heads_q, head_dim_v]`.
    pub out: Vec<f64>,
    /// The state after every key (the initial state's tokens included).
    pub state: LinearReferenceState,
}

/// `phi(x)` in f64.
pub fn apply_feature_map(map: FeatureMap, x: f32) -> f64 {
    let x = f64::from(x);
    match map {
        FeatureMap::EluPlusOne if x > 0.0 => x + 1.0,
        FeatureMap::EluPlusOne => x.exp(),
        FeatureMap::Identity => x,
    }
}

/// Exact linear attention of packed BSHD inputs: non-causal against every
/// key, or causal token by token from `initial` (no tokens when `None`).
pub fn linear_attention(
    shape: &LinearShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &LinearConfig,
    initial: Option<&LinearReferenceState>,
) -> Result<LinearReferenceOutput> {
    config.validate(shape)?;
    let LinearShape {
        batch,
        seq_q,
        seq_kv,
        heads_q,
        heads_kv,
        head_dim: d,
        head_dim_v: dv,
    } = *shape;
    check_len("q", shape.q_shape().elements(), q.len())?;
    check_len("k", shape.k_shape().elements(), k.len())?;
    check_len("v", shape.v_shape().elements(), v.len())?;
    if initial.is_some() && !config.causal {
        return Err(Error::UnsupportedCombination {
            what: "a LinearState and non-causal linear attention",
        });
    }
    let slots = batch * heads_kv;
    if let Some(state) = initial {
        check_len("state S", slots * d * dv, state.s.len())?;
        check_len("state z", slots * d, state.z.len())?;
    }
    let group = shape.group_size();
    let map = config.feature_map;
    let eps = f64::from(config.eps);

    // One work item per (batch, KV head): its state, and the outputs of
    // its group of query heads, `[seq_q, group, dv]`.
    let per_slot: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = (0..slots)
        .into_par_iter()
        .map(|slot| {
            let (b, hk) = (slot / heads_kv, slot % heads_kv);
            let (mut s, mut z) = match initial {
                Some(state) => (
                    state.s[slot * d * dv..][..d * dv].to_vec(),
                    state.z[slot * d..][..d].to_vec(),
                ),
                None => (vec![0.0; d * dv], vec![0.0; d]),
            };
            let add_key = |j: usize, s: &mut [f64], z: &mut [f64]| {
                let k_row = &k[((b * seq_kv + j) * heads_kv + hk) * d..][..d];
                let v_row = &v[((b * seq_kv + j) * heads_kv + hk) * dv..][..dv];
                for (a, &x) in k_row.iter().enumerate() {
                    let f = apply_feature_map(map, x);
                    z[a] += f;
                    for (c, &y) in v_row.iter().enumerate() {
                        s[a * dv + c] += f * f64::from(y);
                    }
                }
            };
            let mut out = vec![0.0; seq_q * group * dv];
            let mut emit = |i: usize, s: &[f64], z: &[f64]| {
                for g in 0..group {
                    let h = hk * group + g;
                    let q_row = &q[((b * seq_q + i) * heads_q + h) * d..][..d];
                    let row = &mut out[(i * group + g) * dv..][..dv];
                    let mut den = eps;
                    for (a, &x) in q_row.iter().enumerate() {
                        let f = apply_feature_map(map, x);
                        den += f * z[a];
                        for (o, &sv) in row.iter_mut().zip(&s[a * dv..][..dv]) {
                            *o += f * sv;
                        }
                    }
                    row.iter_mut().for_each(|o| *o /= den);
                }
            };
            if config.causal {
                // seq_q == seq_kv (validated): token i sees keys 0..=i.
                for i in 0..seq_q {
                    add_key(i, &mut s, &mut z);
                    emit(i, &s, &z);
                }
            } else {
                for j in 0..seq_kv {
                    add_key(j, &mut s, &mut z);
                }
                for i in 0..seq_q {
                    emit(i, &s, &z);
                }
            }
            (out, s, z)
        })
        .collect();

    let mut out = vec![0.0; shape.out_shape().elements()];
    let mut state = LinearReferenceState {
        s: Vec::with_capacity(slots * d * dv),
        z: Vec::with_capacity(slots * d),
    };
    for (slot, (slot_out, s, z)) in per_slot.into_iter().enumerate() {
        let (b, hk) = (slot / heads_kv, slot % heads_kv);
        for i in 0..seq_q {
            for g in 0..group {
                let h = hk * group + g;
                out[((b * seq_q + i) * heads_q + h) * dv..][..dv]
                    .copy_from_slice(&slot_out[(i * group + g) * dv..][..dv]);
            }
        }
        state.s.extend(s);
        state.z.extend(z);
    }
    Ok(LinearReferenceOutput { out, state })
}
