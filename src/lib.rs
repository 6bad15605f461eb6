//! Exact, tiled online-softmax attention (FlashAttention-2) in WGSL compute
//! shaders, for every GPU that wgpu reaches, with a CPU f64 reference.
//!
//! One function per operation records into a `wgpu::CommandEncoder` (see
//! [`Gpu::forward`], [`Gpu::backward`], [`Gpu::decode`], [`Gpu::merge`],
//! [`Gpu::rope`], [`KvCache::append`], [`Gpu::linear_attention`]);
//! [`Gpu::run`] records, submits and waits; host slices go through
//! [`Gpu::attention_host`] and [`Gpu::attention_backward_host`]. Semantics, the accuracy rule
//! and the measurement method: `docs/semantics.md`.
//!
//! ```
//! use wgpu_flash_attn::{AttentionConfig, AttentionShape, Gpu, reference};
//! # fn main() -> Result<(), wgpu_flash_attn::Error> {
//! # if std::env::var("FLASH_ATTN_SKIP_GPU_TESTS").as_deref() == Ok("1") { eprintln!("SKIPPED: FLASH_ATTN_SKIP_GPU_TESTS=1"); return Ok(()); }
//! let gpu = Gpu::new()?;
//! let shape = AttentionShape::self_attention(1, 128, 8, 64);
//! let n = shape.q_shape().elements();
//! let input = |seed: usize| -> Vec<f32> {
//!     (0..n).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 8.5 - 1.0).collect()
//! };
//! let (q, k, v) = (input(1), input(2), input(3));
//! let config = AttentionConfig::new().causal(true);
//! let result = gpu.attention_host(&shape, &q, &k, &v, &config)?;
//! let expected = reference::attention(&shape, &q, &k, &v, &config)?;
//! for (got, want) in result.out.iter().zip(&expected.out) {
//!     assert!((f64::from(*got) - want).abs() <= 1e-4);
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod allocation;
mod attention;
mod backward;
#[cfg(test)]
mod browser_wgsl_tests;
mod config;
mod decode;
mod decode_as_forward;
mod dropout;
mod error;
mod error_scopes;
mod forward_as_decode;
mod gpu;
mod key_chunks;
mod kv_cache;
mod linear;
mod lse;
mod mask;
mod naive;
mod operands;
mod params;
mod pipelines;
mod plan;
pub mod reference;
mod rope;
mod runtime_checks;
#[cfg(test)]
mod shader_contract_tests;
mod shaders;
pub mod spirv;
mod tensor;
mod token_tree;
mod varlen;
mod vulkan_grants;

pub use attention::{AttentionArgs, ForwardOptions, HostAttentionOutput, Sequences};
pub use backward::{
    BACKWARD_STORAGE_BUFFERS, BackwardArgs, BackwardPlan, HostGradients, SinkGrads,
};
pub use config::{
    Alibi, AttentionConfig, AttentionShape, BlockedLayout, CoopLayout, MAX_HEAD_DIM,
    MAX_SEQUENCE_LEN, SUPPORTED_HEAD_DIMS, Tier, is_supported_head_dim,
};
pub use decode::{DecodeArgs, DecodeLanes, DecodeOptions};
pub use dropout::Dropout;
pub use error::{Error, Result};
pub use gpu::{AdapterOptions, Gpu, GpuInfo, WANTED_FEATURES};
pub use kv_cache::{
    KeyRotation, KvCache, KvCacheConfig, KvDType, KvLayout, KvValues, PAGE_SIZES, RELEASED_PAGE,
};
pub use linear::{
    DEFAULT_LINEAR_EPS, FeatureMap, LINEAR_HEAD_DIMS, LinearArgs, LinearConfig, LinearPlan,
    LinearShape, LinearState,
};
pub use lse::Lse;
pub use mask::{AttentionMask, BlockLayout, MaskKind, patterns};
pub use plan::{CacheShape, DecodePlan, ForwardPlan, NaivePlan};
pub use rope::{Rope, RopeStyle};
pub use runtime_checks::SkippedChecks;
pub use shaders::{BlockedTiling, unproven_loop};
pub use tensor::{DType, Strides, Tensor, TensorShape};
pub use token_tree::TokenTree;
pub use varlen::ValidLengths;
