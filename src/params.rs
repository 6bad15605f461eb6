//! The uniform block shared with the attention kernels, declared in WGSL in
//! `shaders/attention_common.wgsl`.
//!
//! Layout rules: every field is 4 bytes; nested structs are 16 bytes, so the
//! Rust `#[repr(C)]` layout equals WGSL's uniform layout without padding
//! surprises. A test checks the sizes match what naga computes.

use bytemuck::{Pod, Zeroable};

/// Twin of `struct TensorStrides` in `shaders/attention_common.wgsl`.
///
/// Element strides of a `[batch, seq, heads, head_dim]` view, in units of
/// vec4 (4 elements). The head_dim stride is 1 element.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TensorStrides {
    pub batch: u32,
    pub seq: u32,
    pub head: u32,
    /// Offset of element `[0, 0, 0, 0]` from the start of the buffer.
    pub offset: u32,
}

/// Flag bits of [`AttentionParams::flags`]; twins of `FLAG_*` in the shader.
pub mod flags {
    pub const WINDOW_LEFT: u32 = 1;
    pub const WINDOW_RIGHT: u32 = 2;
    pub const SOFTCAP: u32 = 4;
    pub const ALIBI: u32 = 8;
    pub const WRITE_LSE: u32 = 16;
}

/// Twin of `struct Params` in `shaders/attention_common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct AttentionParams {
    pub batch: u32,
    pub seq_q: u32,
    pub seq_kv: u32,
    pub heads_q: u32,
    pub heads_kv: u32,
    /// Bit set of [`flags`].
    pub flags: u32,
    /// Softmax scale; pre-multiplied by log2(e) unless softcap or ALiBi is on.
    pub score_scale: f32,
    pub softcap: f32,
    pub window_left: u32,
    pub window_right: u32,
    /// Stride between batch entries of the ALiBi slope table (0 = shared).
    pub alibi_batch_stride: u32,
    /// Naive kernels only: first (batch, query head) pair of the dispatch,
    /// as `batch * heads_q + head`, when the score matrix is built in chunks.
    pub unit_base: u32,
    pub q: TensorStrides,
    pub k: TensorStrides,
    pub v: TensorStrides,
    pub o: TensorStrides,
}
