//! Exact, tiled online-softmax attention (FlashAttention-2) in WGSL compute
//! shaders, for every GPU that wgpu reaches, with a CPU f64 reference.
//!
//! ```no_run
//! use wgpu_flash_attn::{AttentionConfig, AttentionShape, Gpu};
//! # fn main() -> Result<(), wgpu_flash_attn::Error> {
//! let gpu = Gpu::new()?;
//! let shape = AttentionShape::self_attention(1, 128, 8, 64);
//! let n = shape.q_shape().elements();
//! let (q, k, v) = (vec![0.1f32; n], vec![0.2f32; n], vec![0.3f32; n]);
//! let result = gpu.attention_host(&shape, &q, &k, &v, &AttentionConfig::new().causal(true))?;
//! assert_eq!(result.out.len(), n);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod attention;
mod config;
mod decode;
mod error;
mod gpu;
mod kv_cache;
mod mask;
mod naive;
mod params;
mod pipelines;
mod plan;
pub mod reference;
mod rope;
#[cfg(test)]
mod shader_contract_tests;
mod shaders;
mod tensor;
mod varlen;

pub use attention::{AttentionArgs, ForwardOptions, HostAttentionOutput, Lse, Sequences};
pub use config::{
    Alibi, AttentionConfig, AttentionShape, SUPPORTED_HEAD_DIMS, Tier, is_supported_head_dim,
};
pub use decode::{DecodeArgs, DecodeOptions};
pub use error::{Error, Result};
pub use gpu::{AdapterOptions, Gpu, GpuInfo, WANTED_FEATURES};
pub use kv_cache::{KeyRotation, KvCache, KvCacheConfig, KvLayout, PAGE_SIZES};
pub use mask::{AttentionMask, BlockLayout, MaskKind, patterns};
pub use plan::{CacheShape, DecodePlan, ForwardPlan, NaivePlan};
pub use rope::{Rope, RopeStyle};
pub use tensor::{DType, Strides, Tensor, TensorShape};
pub use varlen::ValidLengths;
