//! The backward pass of softmax attention: dQ, dK and dV from the forward's
//! inputs, output and logsumexp and the gradient of the output, with every
//! option of the forward (see `Gpu::backward`).

mod dispatch;
mod plan;

pub use plan::{BACKWARD_STORAGE_BUFFERS, BackwardPlan};

use crate::attention::AttentionArgs;
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::Result;
use crate::lse::Lse;
use crate::operands::require_equal;
use crate::tensor::Tensor;

/// The operands of a backward call. Inputs are what the forward read and
/// wrote; `dq`, `dk` and `dv` are written in place. Every tensor has the
/// storage type of `q`, its own strides and offset (any layout the forward
/// takes), and lives on the call's `Gpu`.
#[derive(Debug, Clone, Copy)]
pub struct BackwardArgs<'a> {
    /// `[batch, seq_q, heads_q, head_dim]` queries of the forward.
    pub q: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim]` keys.
    pub k: &'a Tensor,
    /// `[batch, seq_kv, heads_kv, head_dim]` values.
    pub v: &'a Tensor,
    /// The forward's output, shaped like `q`.
    pub out: &'a Tensor,
    /// The forward's logsumexp, `[batch, heads_q, seq_q]`.
    pub lse: &'a Lse,
    /// Gradient of the loss with respect to `out`, shaped like `q`.
    pub d_out: &'a Tensor,
    /// Written: gradient with respect to `q`, shaped like `q`.
    pub dq: &'a Tensor,
    /// Written: gradient with respect to `k`, shaped like `k` (summed over
    /// the query heads of each KV head).
    pub dk: &'a Tensor,
    /// Written: gradient with respect to `v`, shaped like `v`.
    pub dv: &'a Tensor,
    /// Written when given: the gradient of each attention sink (the
    /// config's `sinks`, which must then be set), summed over the batch and
    /// rows. `None` treats the sinks as constants.
    pub dsinks: Option<&'a SinkGrads>,
}

/// The gradients of a call's attention sinks, `[heads_q]` f32 on the device
/// (see [`BackwardArgs::dsinks`]).
#[derive(Debug, Clone)]
pub struct SinkGrads {
    values: Lse,
}

impl SinkGrads {
    /// Room for the sink gradients of `heads_q` query heads (NaN until a
    /// backward writes them).
    pub fn new(gpu: &crate::Gpu, heads_q: usize) -> Result<Self> {
        Ok(SinkGrads {
            values: Lse::new(gpu, 1, heads_q, 1)?,
        })
    }

    /// Room for the sink gradients of `heads_q` query heads when `config`
    /// has sinks (what its backward needs), else `None`.
    pub fn for_config(
        gpu: &crate::Gpu,
        config: &AttentionConfig,
        heads_q: usize,
    ) -> Result<Option<Self>> {
        config
            .sinks
            .as_ref()
            .map(|_| Self::new(gpu, heads_q))
            .transpose()
    }

    /// Query heads it holds.
    pub fn heads(&self) -> usize {
        self.values.dims()[1]
    }

    /// Downloads the gradients (blocks until the GPU is done).
    pub fn to_vec(&self, gpu: &crate::Gpu) -> Result<Vec<f32>> {
        self.values.to_vec(gpu)
    }

    /// The buffer: `heads` f32 from byte 0.
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.values.buffer()
    }

    pub(crate) fn check_device(&self, gpu: &crate::Gpu) -> Result<()> {
        gpu.check_owner(self.values.device(), "dsinks")
    }
}

impl<'a> BackwardArgs<'a> {
    /// The operands of the forward call this backward differentiates: it
    /// reads `q`, `k` and `v` and writes `out` and `lse`, which the
    /// backward then reads (record both with the same options).
    pub fn forward_args(&self) -> AttentionArgs<'a> {
        AttentionArgs {
            q: self.q,
            k: self.k,
            v: self.v,
            out: self.out,
            lse: Some(self.lse),
        }
    }

    /// The call's shape, after checking that every tensor agrees with it.
    pub fn shape(&self) -> Result<AttentionShape> {
        let shape = self.forward_args().shape()?;
        let (q, k, v, o) = (
            self.q.shape(),
            self.k.shape(),
            self.v.shape(),
            self.out.shape(),
        );
        let mut pairs = Vec::new();
        for (what, name, tensor, like_name, like) in [
            ("dO must be shaped like O", "d_out", self.d_out, "out", o),
            ("dQ must be shaped like Q", "dq", self.dq, "q", q),
            ("dK must be shaped like K", "dk", self.dk, "k", k),
            ("dV must be shaped like V", "dv", self.dv, "v", v),
        ] {
            let got = tensor.shape().as_array();
            for (&g, &want) in got.iter().zip(&like.as_array()) {
                pairs.push((what, name, g, like_name, want));
            }
        }
        require_equal(&pairs)?;
        Ok(shape)
    }
}

/// What [`crate::Gpu::attention_backward_host`] returns: the forward's
/// results and the gradients, packed like the inputs.
#[derive(Debug, Clone)]
pub struct HostGradients {
    /// `[batch, seq_q, heads_q, head_dim]`.
    pub out: Vec<f32>,
    /// `[batch, heads_q, seq_q]`, natural log.
    pub lse: Vec<f32>,
    /// `[batch, seq_q, heads_q, head_dim]`.
    pub dq: Vec<f32>,
    /// `[batch, seq_kv, heads_kv, head_dim]`.
    pub dk: Vec<f32>,
    /// `[batch, seq_kv, heads_kv, head_dim]`.
    pub dv: Vec<f32>,
    /// `[heads_q]`, the attention sinks' gradients; empty without sinks.
    pub dsinks: Vec<f32>,
}
