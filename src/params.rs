//! The uniform blocks shared with the kernels, each the twin of a WGSL
//! struct that its doc comment names.
//!
//! Layout rules: every field is 4 bytes; nested structs are 16 bytes, so the
//! Rust `#[repr(C)]` layout equals WGSL's uniform layout without padding
//! surprises. `src/shader_contract_tests.rs` checks every `#[repr(C)]` struct
//! here member by member (name, offset, size) against naga's layout of its
//! twin, and the `flags` against the shader's `FLAG_*` constants.

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
    pub const SINKS: u32 = 32;
    pub const SEQUENCES: u32 = 64;
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
    /// Softmax scale (scores stay in natural units).
    pub score_scale: f32,
    pub softcap: f32,
    pub window_left: u32,
    pub window_right: u32,
    /// Stride between batch entries of the ALiBi slope table (0 = shared).
    pub alibi_batch_stride: u32,
    /// Naive kernels only: first (batch, query head) pair of the dispatch,
    /// as `batch * heads_q + head`, when the score matrix is built in chunks.
    pub unit_base: u32,
    /// Where the attention sinks start in the per-head table (binding 6),
    /// after the ALiBi slopes.
    pub sink_offset: u32,
    /// Read by pipelines specialized for dropout (DROPOUT): a (query, key)
    /// probability is kept when its hash is at least this
    /// (`Dropout::threshold`; 0, keeping all, in calls without dropout).
    pub dropout_threshold: u32,
    /// The dropout seed's low and high words.
    pub dropout_seed_lo: u32,
    pub dropout_seed_hi: u32,
    pub q: TensorStrides,
    pub k: TensorStrides,
    pub v: TensorStrides,
    pub o: TensorStrides,
}

/// Twin of `struct SequenceRows` in `shaders/flash_attention.wgsl`: one
/// sequence of a padded or variable-length batch, in rows of the tensors.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SequenceRows {
    /// Batch entry and first row of its queries (and outputs, logsumexps).
    pub q_batch: u32,
    pub q_start: u32,
    pub q_len: u32,
    /// Rows the kernel writes from `q_start`; those past `q_len` are
    /// padding (zeros, logsumexp +inf).
    pub extent: u32,
    /// Batch entry and first row of its keys and values.
    pub kv_batch: u32,
    pub kv_start: u32,
    pub kv_len: u32,
    /// Position of query row 0 on this unit's key axis: `kv_len - q_len`
    /// for a whole sequence (bottom-right alignment); a chunk of the keys
    /// subtracts its first key.
    pub diag: i32,
    /// Bit set of [`carry_flags`].
    pub carry: u32,
    /// The sequence the unit belongs to (its index in the call's list: the
    /// batch entry, or a packed batch's sequence), whose dropout mask it
    /// draws from (src/dropout.rs).
    pub sequence: u32,
    /// Where the unit's first key sits in its sequence: 0 for a whole
    /// sequence, a chunk's first key otherwise (dropout's key coordinate).
    pub key_base: u32,
    pub _pad0: u32,
}

/// Bits of [`AttentionParams::flags`] that only the register-blocked forward
/// reads; twins of `BLOCKED_*` in `shaders/flash_blocked.wgsl`. Disjoint
/// from [`flags`].
pub mod blocked_flags {
    /// The block's rows are (query row, head) pairs of one KV head's query
    /// heads; workgroups along z are KV heads.
    pub const GROUP_ROWS: u32 = 128;
}

/// Bits of [`SequenceRows::carry`]; twins of `CARRY_*` in
/// `shaders/flash_attention.wgsl`.
pub mod carry_flags {
    /// Start each row from the state the previous chunk carried.
    pub const IN: u32 = 1;
    /// Leave the state in the carry instead of writing the output.
    pub const OUT: u32 = 2;
}

/// Twin of `struct DecodeParams` in `shaders/flash_decode.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DecodeParams {
    /// Query heads per KV head.
    pub group: u32,
    /// Entries of the sequence table (binding 8).
    pub sequence_count: u32,
    pub splits: u32,
    /// Cache positions per split.
    pub split_keys: u32,
    /// log2 of the page size in tokens.
    pub page_shift: u32,
    /// Width of a block-table row.
    pub pages_per_seq: u32,
    /// Pages of the segment bound to this dispatch.
    pub segment_first_page: u32,
    pub segment_pages: u32,
    /// First output slot of this dispatch.
    pub slot_base: u32,
    /// Stride between output slots in vec4s (0: the final output).
    pub o_slot: u32,
    /// Stride between logsumexp slots in floats.
    pub lse_slot: u32,
    pub _pad: u32,
}

/// Twin of `struct DecodeSequence` in `shaders/flash_decode.wgsl`: one
/// sequence of a decode call (binding 8, one per cache sequence).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DecodeSequence {
    /// Its length in the cache, its query tokens included.
    pub len: u32,
    /// Its query tokens: rows `q_first..q_first + q_count` of Q and O along
    /// seq (0 tokens: it sits the call out).
    pub q_first: u32,
    pub q_count: u32,
    /// Logsumexp index of its token 0, head 0 (head `h`, token `t`: `lse_first
    /// + h * seq_q + t`, `seq_q` the call's Q rows per batch entry).
    pub lse_first: u32,
    /// Its first row tile: the call's row tiles (the dispatch's y axis)
    /// are numbered sequence by sequence; a sequence without query tokens
    /// has none, and the next one's `tile_first`.
    pub tile_first: u32,
}

/// Twin of `struct CombineParams` in `shaders/combine_partials.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CombineParams {
    pub batch: u32,
    pub seq_q: u32,
    pub heads_q: u32,
    pub d4: u32,
    pub slots: u32,
    /// Stride between slots of partial outputs, in vec4s.
    pub o_slot: u32,
    /// Stride between slots of partial logsumexps, in floats.
    pub lse_slot: u32,
    /// 1 to write the merged logsumexp.
    pub write_lse: u32,
    /// The output view `[batch, seq_q, heads_q, d4]`, in vec4s.
    pub out_batch: u32,
    pub out_seq: u32,
    pub out_head: u32,
    pub out_offset: u32,
}

/// Twin of `struct RopeParams` in `shaders/rope_common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RopeParams {
    pub batch: u32,
    /// Tokens per sequence in the source tensor (kv_append: the most any
    /// sequence appends; each sequence's own count is in its table).
    pub tokens: u32,
    pub heads: u32,
    pub head_dim: u32,
    /// Rotated elements per head; 0 for none.
    pub rotary_dim: u32,
    /// 0: interleaved (GPT-J), 1: half-split (GPT-NeoX / Llama).
    pub half_split: u32,
    /// Source strides and offset, in elements (kv_append reads packed
    /// rows from its table and leaves `src_batch` unused).
    pub src_batch: u32,
    pub src_seq: u32,
    pub src_head: u32,
    pub src_offset: u32,
    /// KV append only: paging and the segment of this dispatch.
    pub page_shift: u32,
    pub pages_per_seq: u32,
    pub segment_first_page: u32,
    pub segment_pages: u32,
    /// kv_append only: the first rotated element (a latent cache rotates
    /// its last `rotary_dim` elements).
    pub rotary_start: u32,
    /// kv_append only: 1 to store V vectors, 0 for a latent cache (values
    /// are a prefix of the keys).
    pub write_values: u32,
}

/// Twin of `struct KvGatherParams` in `shaders/kv_gather.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct KvGatherParams {
    pub batch: u32,
    /// Positions per sequence in the dense output (the longest sequence).
    pub seq: u32,
    pub heads: u32,
    /// vec4s per head vector.
    pub d4: u32,
    pub page_shift: u32,
    pub pages_per_seq: u32,
    /// The segment of this dispatch.
    pub segment_first_page: u32,
    pub segment_pages: u32,
}

/// Twin of `struct MaskParams` in `shaders/flash_attention.wgsl` (the
/// `MASK` variant).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MaskParams {
    /// 0: additive bias (f32 bits), 1: boolean (one bit per key).
    pub kind: u32,
    /// Words between batch entries and between heads (0: broadcast).
    pub batch_stride: u32,
    pub head_stride: u32,
    /// Words per query row.
    pub row_words: u32,
    /// 1 when `tile_states` holds block-sparse tile states.
    pub use_tiles: u32,
    pub tile_batch_stride: u32,
    pub tile_head_stride: u32,
    /// Key tiles per row tile in `tile_states`.
    pub key_tiles: u32,
}

/// Flag bits of [`LinearParams::flags`]; twins of `LINEAR_*` in the shader.
pub mod linear_flags {
    pub const CAUSAL: u32 = 1;
    pub const IDENTITY_MAP: u32 = 2;
    pub const CARRY_IN: u32 = 4;
}

/// Twin of `struct LinearParams` in `shaders/linear_attention.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct LinearParams {
    /// Bit set of [`linear_flags`].
    pub flags: u32,
    pub eps: f32,
    /// Keys per split of the state pass.
    pub split_keys: u32,
    /// Splits in this dispatch's segment.
    pub splits: u32,
    /// Index of the segment's first split over the whole sequence.
    pub first_split: u32,
    /// Vec4s of one state slot.
    pub slot4: u32,
    /// Query heads per KV head.
    pub group: u32,
    pub _pad: u32,
}

/// Twin of `struct BackwardParams` in `shaders/flash_backward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct BackwardParams {
    /// The call's query/key head dim / 4 (Q, K, dQ, dK).
    pub head_dim4: u32,
    /// The call's value head dim / 4 (V, O, dO, dV).
    pub head_dim_v4: u32,
    /// Query heads per KV head.
    pub group: u32,
    /// Softmax scale in natural units.
    pub scale: f32,
    /// 0: no mask, 1: additive bias, 2: boolean.
    pub mask_kind: u32,
    /// Mask words between batch entries, heads and rows (0: broadcast).
    pub mask_batch: u32,
    pub mask_head: u32,
    pub mask_row_words: u32,
    /// Logsumexp and row deltas `[batch, heads_q, rows]`, in floats.
    pub stats_batch: u32,
    pub stats_head: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    /// The dO view, in vec4s.
    pub d_out: TensorStrides,
    /// The dV view, in vec4s.
    pub dv: TensorStrides,
}

/// Twin of `struct BackwardUnit` in `shaders/flash_backward.wgsl`: one
/// sequence of a padded or packed batch, which the backward's workgroups
/// with its index along y work on (the kernels read it as words of the
/// table binding).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackwardUnit {
    /// Batch entry and first row of its queries (Q, O, dO, dQ, logsumexp).
    pub q_batch: u32,
    pub q_start: u32,
    /// Rows that attend, and rows written (past `q_len`: zero gradients).
    pub q_len: u32,
    pub extent_q: u32,
    /// Batch entry and first row of its keys (K, V, dK, dV).
    pub kv_batch: u32,
    pub kv_start: u32,
    /// Keys attended, and keys written (past `kv_len`: zero gradients).
    pub kv_len: u32,
    pub extent_kv: u32,
}
