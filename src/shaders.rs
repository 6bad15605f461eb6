//! The one table of WGSL sources, and how a kernel's specialization becomes
//! WGSL text.
//!
//! Kernels are specialized by generated `const` declarations prepended to the
//! source (rather than pipeline-overridable constants) because WGSL only lets
//! `const` expressions size private arrays, and the accumulators are private
//! arrays sized by the head dimension.

use std::fmt::Write as _;

use crate::decode::DecodeLanes;
use crate::kv_cache::KvDType;
use crate::tensor::DType;

/// Names of the `// #if` variants in the attention kernels.
const SUBGROUP_KV: &str = "SUBGROUP_KV";
const HALF_STORAGE: &str = "HALF_STORAGE";
const BF16_STORAGE: &str = "BF16_STORAGE";
/// K and V (only) stored in 16 bits: decoding over an f16/bf16 KV cache
/// (the forward's half storage sets it with HALF_STORAGE).
const KV_HALF: &str = "KV_HALF";
/// K and V stored as int8 with a per-(token, head) f32 scale (KV caches).
const KV_INT8: &str = "KV_INT8";
const MASK: &str = "MASK";
const CAUSAL: &str = "CAUSAL";
const SUBGROUP_BROADCAST: &str = "SUBGROUP_BROADCAST";
/// Decoding's subgroup tier with lanes over keys ([`DecodeLanes::Keys`]);
/// it replaces SUBGROUP_KV, whose lanes split the head dim.
const KEY_LANES: &str = "KEY_LANES";
/// The cooperative-matrix forward on 8x8 matrices (else 16x16).
const COOP8: &str = "COOP8";
/// The cooperative-matrix forward multiplying f32 matrices (else f16).
const COOP_F32: &str = "COOP_F32";
/// The cooperative-matrix forward with its products in scalar code.
const COOP_EMULATED: &str = "COOP_EMULATED";
/// The register-blocked forward with f16 tiles and products.
const F16_PRODUCTS: &str = "F16_PRODUCTS";
/// The register-blocked gradient passes (flash_backward_blocked.wgsl).
const BLOCKED_BACKWARD: &str = "BLOCKED_BACKWARD";
/// Attention dropout (`AttentionConfig::dropout`): compiled only into the
/// pipelines of calls that drop, since its hashing in the other kernels'
/// unrolled loops lengthens llvmpipe's compiles even where a runtime flag
/// skips it.
const DROPOUT: &str = "DROPOUT";
/// Invocations of an emulated subgroup.
const EMULATED_LANES: u32 = 32;
/// half_codec.wgsl's f16 and bf16 conversions, set from the kernel's
/// 16-bit types (see `codec_flags`).
const F16_CODEC: &str = "F16_CODEC";
const BF16_CODEC: &str = "BF16_CODEC";
/// Decoding's queries (Q_HALF) or output (O_HALF) in 16 bits, whatever the
/// cache's type; QO_HALF marks either, QO_BF16 makes them bf16 (else f16).
const Q_HALF: &str = "Q_HALF";
const O_HALF: &str = "O_HALF";
const QO_HALF: &str = "QO_HALF";
const QO_BF16: &str = "QO_BF16";

/// Every `// #if` name the shaders may use. The preprocessor refuses any
/// other, so a misspelt name fails loudly instead of quietly selecting the
/// `// #else` branch.
pub const VARIANT_NAMES: [&str; 21] = [
    F16_PRODUCTS,
    BLOCKED_BACKWARD,
    DROPOUT,
    F16_CODEC,
    BF16_CODEC,
    Q_HALF,
    O_HALF,
    QO_HALF,
    QO_BF16,
    COOP8,
    COOP_EMULATED,
    COOP_F32,
    SUBGROUP_KV,
    HALF_STORAGE,
    BF16_STORAGE,
    KV_HALF,
    KV_INT8,
    MASK,
    CAUSAL,
    SUBGROUP_BROADCAST,
    KEY_LANES,
];

/// Keys per tile the planner tries, largest first.
const BLOCK_N_CANDIDATES: [u32; 5] = [64, 32, 16, 8, 4];

/// A WGSL kernel family shipped by the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `shaders/flash_attention.wgsl`: the tiled online-softmax forward pass.
    FlashForward,
    /// The same file with an attention mask (`MASK`: bias, boolean or
    /// block-sparse).
    FlashMasked,
    /// `shaders/flash_blocked.wgsl`: the register-blocked forward pass for
    /// hardware GPUs ([`crate::Tier::RegisterBlocked`]).
    FlashBlocked,
    /// The same file with an attention mask.
    FlashBlockedMasked,
    /// `shaders/flash_coop.wgsl`: the cooperative-matrix forward pass
    /// ([`crate::Tier::CooperativeMatrix`]).
    FlashCoop,
    /// The same file with an attention mask.
    FlashCoopMasked,
    /// `shaders/naive_attention.wgsl`, first pass: S = scale * Q K^T, masked.
    NaiveScores,
    /// `shaders/naive_attention.wgsl`, second pass: P = softmax(S) in place.
    NaiveSoftmax,
    /// `shaders/naive_attention.wgsl`, third pass: O = P V.
    NaiveValues,
    /// `shaders/flash_decode.wgsl`: split-KV attention over a paged KV cache.
    Decode,
    /// `shaders/combine_partials.wgsl`: merges partial results by logsumexp.
    Combine,
    /// `shaders/rope.wgsl`: rotary embedding in place.
    Rope,
    /// `shaders/kv_append.wgsl`: appends K/V to a cache, rotating keys.
    KvAppend,
    /// `shaders/linear_attention.wgsl`, first pass: each key split's sums
    /// of phi(k) v^T and phi(k).
    LinearStates,
    /// `shaders/linear_attention.wgsl`, second pass: prefix sums of the
    /// split states from the carried state.
    LinearScan,
    /// `shaders/linear_attention.wgsl`, third pass: the outputs.
    LinearOutputs,
    /// `shaders/linear_attention.wgsl`, recurrent decoding: one token added
    /// to the carried state in place.
    LinearUpdate,
    /// `shaders/flash_backward.wgsl`, first pass: D = rowsum(dO * O).
    BackwardDeltas,
    /// `shaders/flash_backward.wgsl`: dK and dV per block of keys.
    BackwardKeys,
    /// `shaders/flash_backward.wgsl`: dQ per block of query rows.
    BackwardQueries,
    /// `shaders/flash_backward.wgsl`: the attention sinks' gradients.
    BackwardSinks,
}

impl Kernel {
    /// Every kernel family, for tests that validate all shaders.
    #[cfg(test)]
    pub const ALL: [Kernel; 21] = [
        Kernel::FlashForward,
        Kernel::FlashMasked,
        Kernel::FlashBlocked,
        Kernel::FlashBlockedMasked,
        Kernel::FlashCoop,
        Kernel::FlashCoopMasked,
        Kernel::NaiveScores,
        Kernel::NaiveSoftmax,
        Kernel::NaiveValues,
        Kernel::Decode,
        Kernel::Combine,
        Kernel::Rope,
        Kernel::KvAppend,
        Kernel::LinearStates,
        Kernel::LinearScan,
        Kernel::LinearOutputs,
        Kernel::LinearUpdate,
        Kernel::BackwardDeltas,
        Kernel::BackwardKeys,
        Kernel::BackwardQueries,
        Kernel::BackwardSinks,
    ];

    /// File name under `shaders/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Kernel::FlashForward | Kernel::FlashMasked => "flash_attention.wgsl",
            Kernel::FlashBlocked | Kernel::FlashBlockedMasked => "flash_blocked.wgsl",
            Kernel::FlashCoop | Kernel::FlashCoopMasked => "flash_coop.wgsl",
            Kernel::NaiveScores | Kernel::NaiveSoftmax | Kernel::NaiveValues => {
                "naive_attention.wgsl"
            }
            Kernel::Decode => "flash_decode.wgsl",
            Kernel::Combine => "combine_partials.wgsl",
            Kernel::Rope => "rope.wgsl",
            Kernel::KvAppend => "kv_append.wgsl",
            Kernel::LinearStates
            | Kernel::LinearScan
            | Kernel::LinearOutputs
            | Kernel::LinearUpdate => "linear_attention.wgsl",
            Kernel::BackwardDeltas
            | Kernel::BackwardKeys
            | Kernel::BackwardQueries
            | Kernel::BackwardSinks => "flash_backward.wgsl",
        }
    }

    /// The WGSL source without its generated constants: the shared
    /// attention declarations, where the kernel uses them, then its file.
    pub fn template(self) -> String {
        let file = match self {
            Kernel::FlashForward | Kernel::FlashMasked => {
                include_str!("../shaders/flash_attention.wgsl")
            }
            Kernel::FlashBlocked | Kernel::FlashBlockedMasked => {
                include_str!("../shaders/flash_blocked.wgsl")
            }
            Kernel::FlashCoop | Kernel::FlashCoopMasked => {
                include_str!("../shaders/flash_coop.wgsl")
            }
            Kernel::NaiveScores | Kernel::NaiveSoftmax | Kernel::NaiveValues => {
                include_str!("../shaders/naive_attention.wgsl")
            }
            Kernel::Decode => include_str!("../shaders/flash_decode.wgsl"),
            Kernel::Combine => include_str!("../shaders/combine_partials.wgsl"),
            Kernel::Rope => include_str!("../shaders/rope.wgsl"),
            Kernel::KvAppend => include_str!("../shaders/kv_append.wgsl"),
            Kernel::LinearStates
            | Kernel::LinearScan
            | Kernel::LinearOutputs
            | Kernel::LinearUpdate => {
                include_str!("../shaders/linear_attention.wgsl")
            }
            // The register-blocked gradient passes follow the others'
            // shared declarations (BLOCKED_BACKWARD picks which).
            Kernel::BackwardDeltas
            | Kernel::BackwardKeys
            | Kernel::BackwardQueries
            | Kernel::BackwardSinks => concat!(
                include_str!("../shaders/flash_backward.wgsl"),
                "\n",
                include_str!("../shaders/flash_backward_blocked.wgsl")
            ),
        };
        // The files prepended to the kernel's own, in order: the 16-bit
        // conversions first (attention_common.wgsl, the append and the
        // combine pass call them).
        let codec = include_str!("../shaders/half_codec.wgsl");
        let rope = include_str!("../shaders/rope_common.wgsl");
        let attention = include_str!("../shaders/attention_common.wgsl");
        let prefix: Vec<&str> = match self {
            Kernel::Combine => vec![codec],
            Kernel::Rope => vec![rope],
            Kernel::KvAppend => vec![codec, rope],
            // Both forward kernels read the same sequence table, carry and
            // mask, declared once in flash_attention.wgsl.
            Kernel::FlashBlocked
            | Kernel::FlashBlockedMasked
            | Kernel::FlashCoop
            | Kernel::FlashCoopMasked => vec![
                codec,
                attention,
                forward_tables(),
                include_str!("../shaders/forward_blocks.wgsl"),
            ],
            // The kernels whose invocations own whole query rows share
            // their unrolled per-row steps.
            Kernel::FlashForward
            | Kernel::FlashMasked
            | Kernel::Decode
            | Kernel::NaiveScores
            | Kernel::NaiveSoftmax
            | Kernel::NaiveValues => {
                vec![codec, attention, include_str!("../shaders/row_blocks.wgsl")]
            }
            Kernel::LinearStates
            | Kernel::LinearScan
            | Kernel::LinearOutputs
            | Kernel::LinearUpdate
            | Kernel::BackwardDeltas
            | Kernel::BackwardKeys
            | Kernel::BackwardQueries
            | Kernel::BackwardSinks => vec![codec, attention],
        };
        let mut text = prefix.join("\n");
        text.push('\n');
        text.push_str(file);
        text
    }

    /// Name of the compute entry point.
    pub fn entry_point(self) -> &'static str {
        match self {
            Kernel::NaiveScores => "build_scores",
            Kernel::NaiveSoftmax => "softmax_rows",
            Kernel::NaiveValues => "weight_values",
            Kernel::LinearStates => "chunk_states",
            Kernel::LinearScan => "scan_states",
            Kernel::LinearOutputs => "chunk_outputs",
            Kernel::LinearUpdate => "update_state",
            Kernel::BackwardDeltas => "row_deltas",
            Kernel::BackwardKeys => "key_grads",
            Kernel::BackwardQueries => "query_grads",
            Kernel::BackwardSinks => "sink_grads",
            _ => "main",
        }
    }

    /// Buffer bindings of group 0, in binding order.
    pub fn bindings(self) -> &'static [wgpu::BufferBindingType] {
        use wgpu::BufferBindingType::{Storage, Uniform};
        match self {
            // params, q, k, v, out, lse, head table, sequence table, carry
            Kernel::FlashForward | Kernel::FlashBlocked | Kernel::FlashCoop => &FORWARD_BINDINGS,
            // the same, then mask words, tile states, mask params
            Kernel::FlashMasked | Kernel::FlashBlockedMasked | Kernel::FlashCoopMasked => {
                &MASKED_BINDINGS
            }
            // the same, then the score matrix
            Kernel::NaiveScores | Kernel::NaiveSoftmax | Kernel::NaiveValues => &ATTENTION_BINDINGS,
            // bindings 0-6, decode params, sequence lengths, block table
            Kernel::Decode => &DECODE_BINDINGS,
            // params, partial outputs, partial lse, out, lse
            Kernel::Combine => &[
                Uniform,
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: false },
                Storage { read_only: false },
            ],
            // params, starts, frequencies, data
            Kernel::Rope => &[
                Uniform,
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: false },
            ],
            // bindings 0-6, linear params, chunk states, carried state
            Kernel::LinearStates
            | Kernel::LinearScan
            | Kernel::LinearOutputs
            | Kernel::LinearUpdate => &LINEAR_BINDINGS,
            Kernel::BackwardDeltas
            | Kernel::BackwardKeys
            | Kernel::BackwardQueries
            | Kernel::BackwardSinks => &BACKWARD_BINDINGS,
            // params, starts, frequencies, new K, new V, K and V segments,
            // block table
            Kernel::KvAppend => &[
                Uniform,
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: false },
                Storage { read_only: false },
                Storage { read_only: true },
            ],
        }
    }
}

/// Marks the lines of flash_attention.wgsl that the register-blocked
/// kernel shares (sequence table, carry, mask): the line after `BEGIN` to
/// the line before `END`.
const FORWARD_TABLES_BEGIN: &str = "// Shared with flash_blocked.wgsl from here";
const FORWARD_TABLES_END: &str = "// Shared with flash_blocked.wgsl up to here";

/// The declarations of flash_attention.wgsl between its shared-section
/// markers (the markers are checked by a test, so a missing one cannot ship).
pub(crate) fn forward_tables() -> &'static str {
    let file = include_str!("../shaders/flash_attention.wgsl");
    let line_after = |at: usize| file[at..].find('\n').map_or(file.len(), |n| at + n + 1);
    let begin = file.find(FORWARD_TABLES_BEGIN).map_or(0, line_after);
    let end = file[begin..]
        .find(FORWARD_TABLES_END)
        .map_or(begin, |at| begin + at);
    &file[begin..end]
}

/// The attention kernels' bindings 0-6 followed by three of a kernel's own.
const fn attention_bindings_then(
    own: [wgpu::BufferBindingType; 3],
) -> [wgpu::BufferBindingType; 10] {
    let mut all = [own[0]; 10];
    let mut i = 0;
    while i < 7 {
        all[i] = ATTENTION_BINDINGS[i];
        i += 1;
    }
    all[7] = own[0];
    all[8] = own[1];
    all[9] = own[2];
    all
}

/// Bindings 0-6, then the forward's sequence table (7) and the carry
/// between key chunks (8).
const FORWARD_BINDINGS: [wgpu::BufferBindingType; 9] = {
    let mut all = [wgpu::BufferBindingType::Storage { read_only: false }; 9];
    let mut i = 0;
    while i < 7 {
        all[i] = ATTENTION_BINDINGS[i];
        i += 1;
    }
    all[7] = wgpu::BufferBindingType::Storage { read_only: true };
    all
};

/// The mask's words (7), tile states (8) and parameters (9).
const MASKED_BINDINGS: [wgpu::BufferBindingType; 10] = {
    use wgpu::BufferBindingType::{Storage, Uniform};
    attention_bindings_then([
        Storage { read_only: true },
        Storage { read_only: true },
        Uniform,
    ])
};

/// flash_decode.wgsl's decode parameters (7), sequence lengths (8) and
/// block table (9).
const DECODE_BINDINGS: [wgpu::BufferBindingType; 10] = {
    use wgpu::BufferBindingType::{Storage, Uniform};
    attention_bindings_then([
        Uniform,
        Storage { read_only: true },
        Storage { read_only: true },
    ])
};

/// linear_attention.wgsl's parameters (7), chunk states (8) and carried
/// state (9).
const LINEAR_BINDINGS: [wgpu::BufferBindingType; 10] = {
    use wgpu::BufferBindingType::{Storage, Uniform};
    attention_bindings_then([
        Uniform,
        Storage { read_only: false },
        Storage { read_only: false },
    ])
};

/// flash_backward.wgsl: bindings 0-6 (`out` holds O, dK or dQ by pass),
/// then its parameters (7), dO (8), the row deltas (9), dV (10) and the mask
/// words (11). Ten storage buffers: the pass checks the adapter's limit.
const BACKWARD_BINDINGS: [wgpu::BufferBindingType; 12] = {
    use wgpu::BufferBindingType::{Storage, Uniform};
    let mut all = [Uniform; 12];
    let mut i = 0;
    while i < 7 {
        all[i] = ATTENTION_BINDINGS[i];
        i += 1;
    }
    all[8] = Storage { read_only: true };
    all[9] = Storage { read_only: false };
    all[10] = Storage { read_only: false };
    all[11] = Storage { read_only: true };
    all
};

/// Bindings of shaders/attention_common.wgsl (0-6), then the naive
/// kernel's score matrix (7).
const ATTENTION_BINDINGS: [wgpu::BufferBindingType; 8] = {
    use wgpu::BufferBindingType::{Storage, Uniform};
    [
        Uniform,
        Storage { read_only: true },
        Storage { read_only: true },
        Storage { read_only: true },
        Storage { read_only: false },
        Storage { read_only: false },
        Storage { read_only: true },
        Storage { read_only: false },
    ]
};

/// Tile sizes and code shape of the attention kernels: the flash kernel
/// and the naive baseline's matrix products share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Keys per tile, a multiple of 4 (staged in workgroup memory unless
    /// `subgroup_kv`).
    pub block_n: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Expand the loops over head dim and rows in the WGSL text, for
    /// compilers that do not unroll them (llvmpipe).
    pub unroll: bool,
    /// K and V reach the invocations by subgroup broadcasts instead of
    /// workgroup memory; requires the SUBGROUP feature, `workgroup_size` at
    /// most the adapter's smallest subgroup size (so that the workgroup is
    /// one subgroup) and `unroll` (broadcast lanes must be constants).
    pub subgroup_kv: bool,
    /// Storage type of Q, K, V and O (arithmetic is f32 regardless).
    pub storage: DType,
    /// The forward applies attention dropout (DROPOUT; never set for the
    /// naive baseline or decoding, which refuse it).
    pub dropout: bool,
}

impl AttentionTiling {
    /// Names of the `// #if NAME` blocks this tiling keeps.
    fn variant_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.subgroup_kv {
            flags.push(SUBGROUP_KV);
        }
        flags.extend(storage_flags(self.storage));
        if self.dropout {
            flags.push(DROPOUT);
        }
        flags
    }
}

/// Tile sizes of the register-blocked forward kernel
/// (shaders/flash_blocked.wgsl). Invocation `lid` is row lane
/// `lid / key_lanes` and key lane `lid % key_lanes`; a workgroup owns
/// `row_lanes * rows` query rows and visits keys in tiles of
/// `4 * key_lanes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations along the query rows.
    pub row_lanes: u32,
    /// Invocations along the keys of a tile (four keys each) and along the
    /// value columns (every `key_lanes`-th vec4 each).
    pub key_lanes: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Storage type of Q, K, V and O.
    pub storage: DType,
    /// Q K^T and P V products in f16 on f16 tiles (F16_PRODUCTS; needs f16
    /// storage and SHADER_F16), else f32 arithmetic throughout.
    pub f16_products: bool,
    /// The forward applies attention dropout (DROPOUT).
    pub dropout: bool,
}

impl BlockedTiling {
    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        self.row_lanes * self.key_lanes
    }
    /// Query rows per workgroup.
    pub fn block_m(&self) -> u32 {
        self.row_lanes * self.rows
    }
    /// Keys per tile.
    pub fn block_n(&self) -> u32 {
        4 * self.key_lanes
    }
    /// Output vec4s per row an invocation accumulates: every
    /// `key_lanes`-th of the row's `head_dim_v / 4`.
    pub fn columns(&self) -> u32 {
        (self.head_dim_v / 4).div_ceil(self.key_lanes)
    }
    /// vec4s of the tile that holds K (rows padded by one vec4, so that
    /// the key lanes read different banks), then V of the same keys.
    fn kv_tile(&self) -> u32 {
        self.block_n() * (self.head_dim / 4 + 1).max(self.head_dim_v / 4)
    }
    /// Workgroup memory the kernel declares: the Q block, the K/V tile,
    /// the probabilities (vec4s of f32, or of f16 with f16 products) and
    /// the per-row partials (f32).
    pub fn workgroup_bytes(&self) -> u64 {
        let block_m = u64::from(self.block_m());
        let key_lanes = u64::from(self.key_lanes);
        let vec4_bytes = if self.f16_products { 8 } else { 16 };
        vec4_bytes
            * (block_m * u64::from(self.head_dim / 4)
                + u64::from(self.kv_tile())
                + block_m * key_lanes)
            + 4 * block_m * key_lanes
    }
}

/// Tile sizes of the cooperative-matrix forward kernel
/// (shaders/flash_coop.wgsl): `row_tiles` x `key_tiles` matrices of
/// `size` x `size` per block, `workgroup_size` invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoopTiling {
    /// Query/key head dimension, a multiple of `size`.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of `size`.
    pub head_dim_v: u32,
    /// Rows and columns of every matrix (8 or 16; K = M = N).
    pub size: u32,
    /// Row tiles per block (`block_m = row_tiles * size`).
    pub row_tiles: u32,
    /// Key tiles per block (`block_n = key_tiles * size`).
    pub key_tiles: u32,
    /// Invocations per workgroup: `row_tiles` subgroups of the adapter's
    /// smallest size, a multiple of `block_m`.
    pub workgroup_size: u32,
    /// Storage type of Q, K, V and O: f16 multiplies f16 matrices, f32
    /// f32 ones (both exact conversions of the stored values).
    pub storage: DType,
    /// The products run as scalar code on emulated 32-lane subgroups
    /// (`AdapterOptions::emulate_cooperative_matrices`, for testing the
    /// kernel on adapters without matrix units).
    pub emulated: bool,
    /// The forward applies attention dropout (DROPOUT) to the
    /// probabilities it stages for P V.
    pub dropout: bool,
}

impl CoopTiling {
    /// Invocations of one (real or emulated) subgroup the layout assumes.
    pub const EMULATED_LANES: u32 = EMULATED_LANES;

    /// Query rows per workgroup.
    pub fn block_m(&self) -> u32 {
        self.row_tiles * self.size
    }
    /// Keys per tile.
    pub fn block_n(&self) -> u32 {
        self.key_tiles * self.size
    }
    /// Invocations sharing one row in the softmax: `workgroup_size / block_m`.
    pub fn lanes_per_row(&self) -> u32 {
        self.workgroup_size / self.block_m()
    }
    /// Bytes of one matrix operand (Q, K, V, P) element.
    fn operand_bytes(&self) -> u64 {
        match self.storage {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Workgroup memory the kernel declares: Q, the K/V tile and the
    /// probabilities as operands; the scores, the output accumulator and
    /// the row partials as f32.
    pub fn workgroup_bytes(&self) -> u64 {
        let (m, n) = (u64::from(self.block_m()), u64::from(self.block_n()));
        let (d, dv) = (u64::from(self.head_dim), u64::from(self.head_dim_v));
        self.operand_bytes() * (m * d + n * d.max(dv) + m * n)
            + 4 * (m * n + m * dv + m * u64::from(self.lanes_per_row()))
    }
}

/// The `// #if` names that select how `storage` is loaded and stored.
fn storage_flags(storage: DType) -> &'static [&'static str] {
    match storage {
        DType::F32 => &[],
        DType::F16 => &[HALF_STORAGE, KV_HALF],
        DType::BF16 => &[HALF_STORAGE, KV_HALF, BF16_STORAGE],
    }
}

/// The `// #if` names that select how decoding's queries and output are
/// stored ([`DecodeIo`]; the combine pass writes the output).
fn io_flags(io: DecodeIo) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if io.q != DType::F32 {
        flags.push(Q_HALF);
    }
    if io.out != DType::F32 {
        flags.push(O_HALF);
    }
    // Queries and output share one 16-bit type (DType::F32 where the
    // output binding holds partial results).
    match [io.q, io.out].into_iter().find(|&t| t != DType::F32) {
        Some(DType::BF16) => flags.extend([QO_HALF, QO_BF16]),
        Some(_) => flags.push(QO_HALF),
        None => {}
    }
    flags
}

/// half_codec.wgsl's conversions that `flags` need: f16 where the 16-bit
/// storage (KV_HALF, BF16_STORAGE) or the query/output type (QO_HALF,
/// QO_BF16) is f16, bf16 where either is bf16.
fn codec_flags(flags: &[&str]) -> Vec<&'static str> {
    let has = |name: &str| flags.contains(&name);
    let kv = has(KV_HALF).then(|| has(BF16_STORAGE));
    let qo = has(QO_HALF).then(|| has(QO_BF16));
    let mut codecs = Vec::new();
    if kv == Some(false) || qo == Some(false) {
        codecs.push(F16_CODEC);
    }
    if kv == Some(true) || qo == Some(true) {
        codecs.push(BF16_CODEC);
    }
    codecs
}

/// Storage types of decoding's queries and output. `out` is the output
/// binding's type: the caller's when the kernel writes the output itself,
/// f32 when it writes partial results that the combine pass merges (and
/// stores in the caller's type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeIo {
    pub q: DType,
    pub out: DType,
}

impl DecodeIo {
    /// f32 queries and output.
    pub const F32: DecodeIo = DecodeIo {
        q: DType::F32,
        out: DType::F32,
    };
}

impl Specialization {
    /// A decode specialization with queries and output of `io`'s types;
    /// any other specialization unchanged.
    pub fn with_decode_io(self, io: DecodeIo) -> Specialization {
        match self {
            Specialization::Decode(tiling, cache, lanes, _) => {
                Specialization::Decode(tiling, cache, lanes, io)
            }
            other => other,
        }
    }
}

/// The `// #if` names that select how a KV cache of `dtype` is read.
fn cache_flags(dtype: KvDType) -> &'static [&'static str] {
    match dtype {
        KvDType::F32 => &[],
        KvDType::F16 => &[KV_HALF],
        KvDType::BF16 => &[KV_HALF, BF16_STORAGE],
        KvDType::Int8 => &[KV_INT8],
    }
}

/// Tile sizes of one linear attention pass (shaders/linear_attention.wgsl).
/// Fields a pass does not read hold fixed valid values (see
/// `LinearPlan::specialization`), so that calls differing only in them
/// share its pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearTiling {
    /// Query/key head dim, a multiple of 8.
    pub head_dim: u32,
    /// Value head dim, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations per workgroup of this pass.
    pub workgroup_size: u32,
    /// Keys staged per tile (the state pass; the causal output pass).
    pub block_n: u32,
    /// State pass: row quads of S per invocation (`row_quads *
    /// workgroup_size = head_dim / 4`).
    pub row_quads: u32,
    /// State pass: value vec4 columns per workgroup (divides
    /// `head_dim_v / 4`).
    pub columns4: u32,
    /// Output pass: query rows per invocation.
    pub rows: u32,
    /// Output pass: state rows staged per tile (a multiple of 4 dividing
    /// `head_dim`).
    pub state_rows: u32,
    /// The output pass adds each chunk's own keys (causal calls).
    pub causal: bool,
    /// Shared values reach the lanes by subgroup broadcasts; the workgroup
    /// is one subgroup of the adapter's smallest size, and loops are
    /// unrolled (broadcast lanes must be constants).
    pub subgroup: bool,
    /// Storage type of Q, K, V and O (states are f32).
    pub storage: DType,
}

/// The passes of linear attention: the three of a call in dispatch order,
/// then the one-token state update of recurrent decoding (which precedes a
/// non-causal output pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearPass {
    States,
    Scan,
    Outputs,
    Update,
}

impl LinearPass {
    #[cfg(test)]
    pub const ALL: [LinearPass; 4] = [
        LinearPass::States,
        LinearPass::Scan,
        LinearPass::Outputs,
        LinearPass::Update,
    ];
}

/// Tile sizes of the backward kernels (shaders/flash_backward.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackwardTiling {
    /// Query/key head dims the pipeline holds: a power of two from 8 to
    /// 256, at least the call's head dim (the rest loads as zero), so that
    /// one pipeline serves every head dim of its range.
    pub head_dim_capacity: u32,
    /// The same for the value head dim (V, O, dO, dV).
    pub head_dim_v_capacity: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Keys (key pass) or query rows (query pass) per invocation.
    pub rows: u32,
    /// Query rows (key pass) or keys (query pass) per staged tile.
    pub block: u32,
    /// Expand the loops over head dim, rows and staging in the WGSL text.
    pub unroll: bool,
    /// Staged rows reach the lanes by subgroup broadcasts: the workgroup is
    /// one subgroup of the adapter's smallest size, and `unroll` holds.
    pub subgroup: bool,
    /// Storage type of every tensor (arithmetic is f32).
    pub storage: DType,
    /// The gradient passes regenerate the forward's dropout mask
    /// (DROPOUT; the row-delta and sink passes never do).
    pub dropout: bool,
}

/// Tile sizes of the register-blocked gradient passes
/// (shaders/flash_backward_blocked.wgsl). Invocation `lid` is key lane
/// `lid / row_lanes` and row lane `lid % row_lanes`; a block holds `4 *
/// key_lanes` keys and `row_lanes * rows` query rows, the key pass owning
/// its keys' gradients and the query pass its rows'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedBackwardTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations along the keys of a block (four keys each), and along
    /// dQ's columns.
    pub key_lanes: u32,
    /// Invocations along the query rows of a block, and along dK's and
    /// dV's columns.
    pub row_lanes: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Storage type of every tensor (arithmetic is f32).
    pub storage: DType,
    /// The passes regenerate the forward's dropout mask (DROPOUT).
    pub dropout: bool,
}

impl BlockedBackwardTiling {
    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        self.key_lanes * self.row_lanes
    }
    /// Keys per block (the key pass's workgroup, the query pass's step).
    pub fn block_n(&self) -> u32 {
        4 * self.key_lanes
    }
    /// Query rows per block (the query pass's workgroup, the key pass's
    /// step).
    pub fn block_m(&self) -> u32 {
        self.row_lanes * self.rows
    }
    /// Workgroup memory the passes declare: K and V of a key block and Q
    /// and dO of a query block (each row one vec4 longer), per row its two
    /// statistics (and with dropout its hash state), and two vec4s of P
    /// and dX per (row, key lane).
    pub fn workgroup_bytes(&self) -> u64 {
        let (d4, dv4) = (u64::from(self.head_dim / 4), u64::from(self.head_dim_v / 4));
        let (block_n, block_m) = (u64::from(self.block_n()), u64::from(self.block_m()));
        let vec4s =
            (block_n + block_m) * (d4 + 1 + dv4 + 1) + 2 * block_m * u64::from(self.key_lanes);
        let row_words = if self.dropout { 3 } else { 2 };
        16 * vec4s + 4 * row_words * block_m
    }
}

/// The passes of the backward, in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackwardPass {
    /// D = rowsum(dO * O).
    Deltas,
    /// dK and dV.
    Keys,
    /// dQ.
    Queries,
    /// The sinks' gradients (calls with sinks only).
    Sinks,
}

impl BackwardPass {
    pub const ALL: [BackwardPass; 4] = [
        BackwardPass::Deltas,
        BackwardPass::Keys,
        BackwardPass::Queries,
        BackwardPass::Sinks,
    ];
}

/// Compile-time constants that select one pipeline of a kernel family. Two
/// calls with equal specializations share a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Specialization {
    FlashForward(AttentionTiling),
    /// The forward pass with an attention mask.
    FlashMasked(AttentionTiling),
    /// The register-blocked forward pass.
    FlashBlocked(BlockedTiling),
    /// The register-blocked forward pass with an attention mask.
    FlashBlockedMasked(BlockedTiling),
    /// The cooperative-matrix forward pass.
    FlashCoop(CoopTiling),
    /// The cooperative-matrix forward pass with an attention mask.
    FlashCoopMasked(CoopTiling),
    /// One pass of the naive baseline.
    Naive {
        pass: NaivePass,
        tiling: AttentionTiling,
    },
    /// Split-KV decoding over a cache of the given storage type, with
    /// queries and output of the types in [`DecodeIo`] (the tiling's own
    /// storage stays f32). With `subgroup_kv`, lanes split the head dim or
    /// take their own keys (the third field; the portable tier holds
    /// `HeadDim` there and ignores it) and `rows` counts the workgroup's
    /// rows (not each lane's).
    Decode(AttentionTiling, KvDType, DecodeLanes, DecodeIo),
    /// One invocation per output vec4 (Combine, storing `out`), element
    /// pair (Rope) or appended head vector (KvAppend, storing the cache's
    /// type).
    Combine {
        workgroup_size: u32,
        out: DType,
    },
    Rope {
        workgroup_size: u32,
    },
    KvAppend {
        workgroup_size: u32,
        dtype: KvDType,
    },
    /// One pass of linear attention.
    Linear {
        pass: LinearPass,
        tiling: LinearTiling,
    },
    /// One pass of the backward.
    Backward {
        pass: BackwardPass,
        tiling: BackwardTiling,
    },
    /// A register-blocked gradient pass (`Keys` or `Queries`).
    BackwardBlocked {
        pass: BackwardPass,
        tiling: BlockedBackwardTiling,
    },
}

/// The three passes of the naive baseline, in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NaivePass {
    Scores,
    Softmax,
    Values,
}

impl NaivePass {
    pub const ALL: [NaivePass; 3] = [NaivePass::Scores, NaivePass::Softmax, NaivePass::Values];
}

impl Specialization {
    /// An upper bound on the loop iterations one invocation runs when the
    /// kernel visits `keys` keys (each loop's exit test counted as one), for
    /// adapters that stop shaders after a fixed number of them (llvmpipe,
    /// see `Gpu::loop_budget`). Loops that `source` unrolls do not count.
    /// `None` for kernels without a key loop.
    pub fn loop_trips(&self, keys: u64) -> Option<u64> {
        if let Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) =
            self
        {
            return Some(blocked_loop_trips(tiling, keys));
        }
        if let Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) = self {
            return Some(coop_loop_trips(tiling, keys));
        }
        let tiling = self.attention_tiling()?;
        let block_n = u64::from(tiling.block_n);
        let d4 = u64::from(tiling.head_dim / 4);
        let dv4 = u64::from(tiling.head_dim_v / 4);
        let lanes = u64::from(tiling.workgroup_size);
        let rows = u64::from(tiling.rows);
        let tiles = keys.div_ceil(block_n) + 1;
        // One trip of the loop over four-key steps, plus its own inner
        // loops when they are not unrolled.
        let step = if tiling.unroll {
            0
        } else {
            (d4 + 1) + (dv4 + 1) + (d4 + dv4) * (rows + 1) + 3 * (rows + 1)
        };
        // K and V are staged by one loop when they are as wide, else by one
        // loop each.
        let staging = if tiling.subgroup_kv {
            0
        } else if d4 == dv4 {
            (block_n * d4).div_ceil(lanes) + 1
        } else {
            (block_n * d4).div_ceil(lanes) + (block_n * dv4).div_ceil(lanes) + 2
        };
        let mut per_tile = 1 + staging + (block_n / 4 + 1) + (block_n / 4) * step;
        let mut fixed = if tiling.unroll {
            0
        } else {
            2 * rows * (d4 + dv4 + 4)
        };
        match self {
            Specialization::Naive {
                pass: NaivePass::Softmax,
                ..
            } => {
                // Three passes over the row's vec4 score slots.
                return Some(3 * (keys.div_ceil(4) + 1));
            }
            Specialization::Decode(tiling, _, DecodeLanes::Keys, _) if tiling.subgroup_kv => {
                // One trip per four keys of each lane; the rest is unrolled.
                return Some(keys.div_ceil(4 * lanes) + 2);
            }
            Specialization::Decode(tiling, _, _, _) if tiling.subgroup_kv => {
                // One trip per four keys; the rest is unrolled.
                return Some(keys.div_ceil(4) + 2);
            }
            Specialization::Decode(..) => {
                // Per-key segment flags, and lane 0's range reduction.
                per_tile += block_n.div_ceil(lanes) + 1;
                fixed += lanes;
            }
            _ => {}
        }
        Some(fixed + tiles * per_tile)
    }

    /// The attention tiling, for the attention kernels.
    pub fn attention_tiling(&self) -> Option<&AttentionTiling> {
        match self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => Some(tiling),
            _ => None,
        }
    }

    pub fn kernel(&self) -> Kernel {
        match self {
            Specialization::FlashForward(_) => Kernel::FlashForward,
            Specialization::FlashMasked(_) => Kernel::FlashMasked,
            Specialization::FlashBlocked(_) => Kernel::FlashBlocked,
            Specialization::FlashBlockedMasked(_) => Kernel::FlashBlockedMasked,
            Specialization::FlashCoop(_) => Kernel::FlashCoop,
            Specialization::FlashCoopMasked(_) => Kernel::FlashCoopMasked,
            Specialization::Naive { pass, .. } => match pass {
                NaivePass::Scores => Kernel::NaiveScores,
                NaivePass::Softmax => Kernel::NaiveSoftmax,
                NaivePass::Values => Kernel::NaiveValues,
            },
            Specialization::Decode(..) => Kernel::Decode,
            Specialization::Combine { .. } => Kernel::Combine,
            Specialization::Rope { .. } => Kernel::Rope,
            Specialization::KvAppend { .. } => Kernel::KvAppend,
            Specialization::Linear { pass, .. } => match pass {
                LinearPass::States => Kernel::LinearStates,
                LinearPass::Scan => Kernel::LinearScan,
                LinearPass::Outputs => Kernel::LinearOutputs,
                LinearPass::Update => Kernel::LinearUpdate,
            },
            Specialization::Backward { pass, .. }
            | Specialization::BackwardBlocked { pass, .. } => match pass {
                BackwardPass::Deltas => Kernel::BackwardDeltas,
                BackwardPass::Keys => Kernel::BackwardKeys,
                BackwardPass::Queries => Kernel::BackwardQueries,
                BackwardPass::Sinks => Kernel::BackwardSinks,
            },
        }
    }

    /// The generated constants, by WGSL name.
    pub fn constants(&self) -> Vec<(&'static str, u32)> {
        match *self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => {
                let mut constants = vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("BLOCK_N", tiling.block_n),
                    ("WG_SIZE", tiling.workgroup_size),
                    ("ROWS", tiling.rows),
                ];
                if tiling.subgroup_kv {
                    let spread = |head_dim: u32| match self {
                        // Decoding spreads one head vector (D4 vec4s) over the lanes.
                        Specialization::Decode(..) => head_dim / 4,
                        // Four keys of K or V are head_dim vec4s, spread over the lanes.
                        _ => head_dim,
                    };
                    let lanes = tiling.workgroup_size;
                    constants.push(("SLOTS", spread(tiling.head_dim).div_ceil(lanes)));
                    constants.push(("SLOTS_V", spread(tiling.head_dim_v).div_ceil(lanes)));
                    if let Specialization::Decode(_, cache, DecodeLanes::Keys, _) = self {
                        // Each lane reads its keys' vectors eight values at a time.
                        constants.push(("D8", tiling.head_dim / 8));
                        constants.push(("DV8", tiling.head_dim_v / 8));
                        if *cache == KvDType::Int8 {
                            // 16-byte blocks covering a vector of D4 (DV4)
                            // words that starts anywhere in its first block.
                            let blocks = |width: u32| (width / 4 + 2) / 4 + 1;
                            constants.push(("W4", blocks(tiling.head_dim)));
                            constants.push(("VW4", blocks(tiling.head_dim_v)));
                        }
                    }
                }
                constants
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("ROW_LANES", tiling.row_lanes),
                    ("KEY_LANES", tiling.key_lanes),
                    ("ROWS", tiling.rows),
                    ("COLS", tiling.columns()),
                    ("WG_SIZE", tiling.workgroup_size()),
                    ("BLOCK_N", tiling.block_n()),
                    ("KV_TILE", tiling.kv_tile()),
                ]
            }
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("D", tiling.head_dim),
                    ("DV", tiling.head_dim_v),
                    ("KV_WIDTH", tiling.head_dim.max(tiling.head_dim_v)),
                    ("T", tiling.size),
                    ("ROW_TILES", tiling.row_tiles),
                    ("KEY_TILES", tiling.key_tiles),
                    ("WG_SIZE", tiling.workgroup_size),
                    ("LANES_PER_ROW", tiling.lanes_per_row()),
                    ("QUADS", tiling.block_n() / 4 / tiling.lanes_per_row()),
                    ("EMULATED_LANES", EMULATED_LANES),
                ]
            }
            Specialization::Combine { workgroup_size, .. }
            | Specialization::Rope { workgroup_size }
            | Specialization::KvAppend { workgroup_size, .. } => vec![("WG_SIZE", workgroup_size)],
            Specialization::Linear { tiling, .. } => vec![
                ("DK4", tiling.head_dim / 4),
                ("DV4", tiling.head_dim_v / 4),
                ("WG_SIZE", tiling.workgroup_size),
                ("BLOCK_N", tiling.block_n),
                ("RQ", tiling.row_quads),
                ("CB4", tiling.columns4),
                ("ROWS", tiling.rows),
                ("S_ROWS", tiling.state_rows),
                ("SLOTS_C", tiling.columns4.div_ceil(tiling.workgroup_size)),
                ("SLOTS_S", tiling.head_dim_v.div_ceil(tiling.workgroup_size)),
                (
                    "SLOTS_K",
                    (tiling.head_dim / 4).div_ceil(tiling.workgroup_size),
                ),
                (
                    "SLOTS_V",
                    (tiling.head_dim_v / 4).div_ceil(tiling.workgroup_size),
                ),
            ],
            Specialization::Backward { tiling, .. } => {
                let d4 = tiling.head_dim_capacity / 4;
                let dv4 = tiling.head_dim_v_capacity / 4;
                let wg = tiling.workgroup_size;
                vec![
                    ("D4", d4),
                    ("DV4", dv4),
                    ("WG_SIZE", wg),
                    ("ROWS", tiling.rows),
                    ("BLOCK", tiling.block),
                    ("STAGE", (tiling.block * d4).div_ceil(wg)),
                    ("STAGE_V", (tiling.block * dv4).div_ceil(wg)),
                    ("SLOTS", (d4 + dv4).div_ceil(wg)),
                ]
            }
            Specialization::BackwardBlocked { tiling, .. } => {
                let (d4, dv4) = (tiling.head_dim / 4, tiling.head_dim_v / 4);
                vec![
                    ("D4", d4),
                    ("DV4", dv4),
                    ("KEY_LANES", tiling.key_lanes),
                    ("ROW_LANES", tiling.row_lanes),
                    ("ROWS", tiling.rows),
                    ("WG_SIZE", tiling.workgroup_size()),
                    ("BLOCK_N", tiling.block_n()),
                    ("BLOCK_M", tiling.block_m()),
                    ("COLS_K", d4.div_ceil(tiling.row_lanes)),
                    ("COLS_V", dv4.div_ceil(tiling.row_lanes)),
                    ("COLS_Q", d4.div_ceil(tiling.key_lanes)),
                    ("QUAD", 4),
                ]
            }
        }
    }

    /// Full WGSL text for this specialization, or the template mistake that
    /// prevents it (its line counted in [`Kernel::template`]).
    pub fn source(&self) -> Result<String, ShaderSourceError> {
        // Enable directives come before any declaration.
        let mut text = self.enable_directives();
        let _ = writeln!(text, "// Generated by wgpu_flash_attn::shaders: {self:?}");
        for (name, value) in self.constants() {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "const {name}: u32 = {value}u;");
        }
        let unrolled = self.unrolled_bounds();
        let bounds: Vec<(&str, u32)> = self
            .constants()
            .into_iter()
            .filter(|(name, _)| unrolled.contains(name))
            .collect();
        let template = self.kernel().template();
        let variant = select_variants(&template, &self.variant_flags())?;
        let unrolled = unroll_loops(&variant, &bounds).map_err(|err| err.in_template(&template))?;
        text.push_str(&unrolled);
        Ok(text)
    }

    /// The WGSL `enable` directives the kernel needs.
    fn enable_directives(&self) -> String {
        match self {
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                let mut directives = String::new();
                if tiling.storage != DType::F32 {
                    directives.push_str("enable f16;\n");
                }
                if !tiling.emulated {
                    directives.push_str("enable wgpu_cooperative_matrix;\n");
                }
                directives
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling)
                if tiling.f16_products =>
            {
                "enable f16;\n".to_string()
            }
            _ => String::new(),
        }
    }

    #[cfg(test)]
    /// Whether the pipeline needs cooperative matrices (and f16 shader
    /// arithmetic when it multiplies f16 matrices).
    pub fn needs_cooperative_matrices(&self) -> bool {
        matches!(
            self,
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling)
                if !tiling.emulated
        )
    }

    #[cfg(test)]
    /// Whether the pipeline does f16 arithmetic (f16 matrices, real or
    /// emulated).
    pub fn needs_f16(&self) -> bool {
        match self {
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                tiling.storage != DType::F32
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                tiling.f16_products
            }
            _ => false,
        }
    }

    /// Names of the `// #if NAME` blocks this specialization keeps.
    pub fn variant_flags(&self) -> Vec<&'static str> {
        let mut flags = self
            .attention_tiling()
            .map_or_else(Vec::new, AttentionTiling::variant_flags);
        match self {
            Specialization::FlashMasked(_) => flags.push(MASK),
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.f16_products {
                    flags.push(F16_PRODUCTS);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
                if matches!(self, Specialization::FlashBlockedMasked(_)) {
                    flags.push(MASK);
                }
            }
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.size == 8 {
                    flags.push(COOP8);
                }
                if tiling.storage == DType::F32 {
                    flags.push(COOP_F32);
                }
                if tiling.emulated {
                    flags.push(COOP_EMULATED);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
                if matches!(self, Specialization::FlashCoopMasked(_)) {
                    flags.push(MASK);
                }
            }
            Specialization::Decode(tiling, cache, lanes, io) => {
                if tiling.subgroup_kv && *lanes == DecodeLanes::Keys {
                    flags.retain(|flag| *flag != SUBGROUP_KV);
                    flags.push(KEY_LANES);
                }
                flags.extend(cache_flags(*cache));
                flags.extend(io_flags(*io));
            }
            Specialization::Combine { out, .. } => flags.extend(io_flags(DecodeIo {
                q: DType::F32,
                out: *out,
            })),
            Specialization::KvAppend { dtype: cache, .. } => flags.extend(cache_flags(*cache)),
            Specialization::Linear { pass, tiling } => {
                flags.extend(storage_flags(tiling.storage));
                if *pass == LinearPass::Outputs && tiling.causal {
                    flags.push(CAUSAL);
                }
                if matches!(pass, LinearPass::States | LinearPass::Outputs) && tiling.subgroup {
                    flags.push(SUBGROUP_BROADCAST);
                }
            }
            Specialization::Backward { tiling, .. } => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.subgroup {
                    flags.push(SUBGROUP_BROADCAST);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
            }
            Specialization::BackwardBlocked { tiling, .. } => {
                flags.extend(storage_flags(tiling.storage));
                flags.push(BLOCKED_BACKWARD);
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
            }
            _ => {}
        }
        let codecs = codec_flags(&flags);
        flags.extend(codecs);
        flags
    }

    #[cfg(test)]
    /// Whether the pipeline converts f16 with `unpack2x16float` /
    /// `pack2x16float`, which wgpu grants where the adapter has
    /// `DownlevelFlags::SHADER_F16_IN_F32` (every Vulkan, Metal and DX12
    /// adapter, and GL from GLSL 4.2 / ES 3.0).
    pub fn needs_f16_in_f32(&self) -> bool {
        self.variant_flags().contains(&F16_CODEC)
    }

    #[cfg(test)]
    /// Whether the pipeline needs the adapter's SUBGROUP feature.
    pub fn needs_subgroups(&self) -> bool {
        let flags = self.variant_flags();
        flags.contains(&SUBGROUP_KV)
            || flags.contains(&KEY_LANES)
            || flags.contains(&SUBGROUP_BROADCAST)
            || self.needs_cooperative_matrices()
    }

    /// Constants whose loops `source` unrolls.
    fn unrolled_bounds(&self) -> &'static [&'static str] {
        match self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => {
                if tiling.unroll {
                    &[
                        "D4", "DV4", "ROWS", "SLOTS", "SLOTS_V", "D8", "DV8", "W4", "VW4",
                    ]
                } else {
                    &[]
                }
            }
            // Rows and output columns index private arrays: unrolled
            // everywhere, so they stay in registers.
            Specialization::FlashBlocked(_) | Specialization::FlashBlockedMasked(_) => {
                &["ROWS", "COLS"]
            }
            // Each lane's score quads index private arrays.
            Specialization::FlashCoop(_) | Specialization::FlashCoopMasked(_) => &["QUADS"],
            Specialization::Linear { .. } => &[
                "DK4", "DV4", "RQ", "CB4", "ROWS", "SLOTS_C", "SLOTS_S", "SLOTS_K", "SLOTS_V",
            ],
            Specialization::Backward { tiling, .. } => {
                if tiling.unroll {
                    &["D4", "DV4", "ROWS", "STAGE", "STAGE_V", "SLOTS"]
                } else {
                    &[]
                }
            }
            // Micro-tiles index private arrays: unrolled everywhere, so
            // they stay in registers.
            Specialization::BackwardBlocked { .. } => {
                &["ROWS", "COLS_K", "COLS_V", "COLS_Q", "QUAD"]
            }
            Specialization::Combine { .. }
            | Specialization::Rope { .. }
            | Specialization::KvAppend { .. } => &[],
        }
    }

    /// A readable label for pipelines and error messages.
    pub fn label(&self) -> String {
        let constants: Vec<String> = self
            .constants()
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let unrolled = if self.unrolled_bounds().is_empty() {
            ""
        } else {
            " unrolled"
        };
        let flags: String = self
            .variant_flags()
            .iter()
            .map(|flag| format!(" {flag}"))
            .collect();
        format!(
            "{}:{} {}{unrolled}{flags}",
            self.kernel().file_name(),
            self.kernel().entry_point(),
            constants.join(" ")
        )
    }
}

/// [`Specialization::loop_trips`] of the register-blocked kernel: its
/// loops over rows and output columns are unrolled; the rest are counted.
fn blocked_loop_trips(tiling: &BlockedTiling, keys: u64) -> u64 {
    let lanes = u64::from(tiling.workgroup_size());
    let d4 = u64::from(tiling.head_dim / 4);
    let dv4 = u64::from(tiling.head_dim_v / 4);
    let block_m = u64::from(tiling.block_m());
    let block_n = u64::from(tiling.block_n());
    let key_lanes = u64::from(tiling.key_lanes);
    let rows = u64::from(tiling.rows);
    let tiles = keys.div_ceil(block_n) + 1;
    // Staging K, the scores' head-dim loop, each row's max over the key
    // lanes, staging V, the loop over the tile's four-key steps.
    let per_tile = 1
        + ((block_n * d4).div_ceil(lanes) + 1)
        + (d4 + 1)
        + rows * (key_lanes + 1)
        + ((block_n * dv4).div_ceil(lanes) + 1)
        + (key_lanes + 1);
    // Staging Q, then each row's sum over the key lanes.
    let fixed = (block_m * d4).div_ceil(lanes) + 1 + rows * (key_lanes + 1);
    fixed + tiles * per_tile
}

/// [`Specialization::loop_trips`] of the cooperative-matrix kernel, whose
/// emulation (the only form llvmpipe, which caps loops, can run) loops
/// over every element of every product.
fn coop_loop_trips(tiling: &CoopTiling, keys: u64) -> u64 {
    let lanes = u64::from(tiling.workgroup_size);
    let (d, dv) = (u64::from(tiling.head_dim), u64::from(tiling.head_dim_v));
    let (m, n, t) = (
        u64::from(tiling.block_m()),
        u64::from(tiling.block_n()),
        u64::from(tiling.size),
    );
    let per_row = u64::from(tiling.lanes_per_row());
    let key_tiles = u64::from(tiling.key_tiles);
    // Trips of a subgroup's loop over row tiles: the plan gives each
    // subgroup one (`workgroup_size` = row tiles x subgroup lanes), plus
    // the loop's exit.
    let row_tiles = 2;
    // One product: a matrix operation per step, or (emulated) the
    // elements a lane computes, each a dot product of `depth` terms.
    let product = |steps: u64, depth: u64| {
        if tiling.emulated {
            ((t * t).div_ceil(u64::from(EMULATED_LANES)) + 1) * (depth + 1)
        } else {
            steps + 1
        }
    };
    let per_tile = 1
        + ((n * d / 4).div_ceil(lanes) + 1)
        + row_tiles * (key_tiles + 1 + key_tiles * product(d / t, d))
        + ((n * dv / 4).div_ceil(lanes) + 1)
        + (per_row + 1)
        + ((dv / 4).div_ceil(per_row) + 1)
        + row_tiles * (dv / t + 1 + dv / t * product(key_tiles, n));
    let fixed =
        (m * d / 4).div_ceil(lanes) + 1 + 2 * ((dv / 4).div_ceil(per_row) + 1) + per_row + 1;
    fixed + (keys.div_ceil(n) + 1) * per_tile
}

/// Workgroup memory of the forward kernel: f32 K and V tiles of `block_n`
/// keys, `head_dim` and `head_dim_v` wide.
pub fn forward_tile_bytes(head_dim: u32, head_dim_v: u32, block_n: u32) -> u64 {
    u64::from(block_n) * u64::from(head_dim + head_dim_v) * 4
}

/// The largest tile whose K and V fit `workgroup_bytes` of workgroup memory
/// at these head dims, or `None` when even the smallest does not.
pub fn largest_block_n(head_dim: u32, head_dim_v: u32, workgroup_bytes: u64) -> Option<u32> {
    BLOCK_N_CANDIDATES
        .into_iter()
        .find(|&n| forward_tile_bytes(head_dim, head_dim_v, n) <= workgroup_bytes)
}

/// The smallest tile the planner would use.
pub const MIN_BLOCK_N: u32 = BLOCK_N_CANDIDATES[BLOCK_N_CANDIDATES.len() - 1];

/// A shader template mistake that the preprocessor refuses rather than
/// guesses around. `line` counts from 1 in the text the preprocessor was
/// given; `text` is the offending line (for a loop, its header), trimmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShaderSourceError {
    /// A flag asked for a variant no template may contain.
    #[error(
        "variant {name:?} was requested but is not a known variant name (known: {:?})",
        VARIANT_NAMES
    )]
    UnknownFlag { name: String },
    /// `// #if NAME` with a NAME outside [`VARIANT_NAMES`].
    #[error(
        "line {line}: `{text}` names no known variant (known: {:?})",
        VARIANT_NAMES
    )]
    UnknownVariant { line: usize, text: String },
    /// A `// #` line that is no directive, such as `// #ifdef X`.
    #[error(
        "line {line}: `{text}` is not a preprocessor directive (`// #if NAME`, `// #else`, \
         `// #endif`)"
    )]
    UnknownDirective { line: usize, text: String },
    /// `// #else` or `// #endif` outside any block.
    #[error("line {line}: `{text}` has no open `// #if` block")]
    NoOpenBlock { line: usize, text: String },
    /// A block's second `// #else`.
    #[error("line {line}: `{text}` is a second `// #else` in the block opened at line {opened}")]
    SecondElse {
        line: usize,
        text: String,
        opened: usize,
    },
    /// A block open at the end of the template (`line` is its `// #if`).
    #[error("line {line}: `{text}` is never closed by `// #endif`")]
    UnclosedBlock { line: usize, text: String },
    /// A loop over a bound the specialization unrolls, still there after
    /// unrolling because its header is not in the form the unroller expands.
    #[error(
        "line {line}: `{text}` loops to {bound}, which this specialization unrolls, but the \
         unroller only expands loops written `for (var x = 0u; x < {bound}; x++) {{`"
    )]
    LoopLeft {
        line: usize,
        text: String,
        bound: String,
    },
}

impl ShaderSourceError {
    /// The error with its line counted in `template`, the text the variant
    /// given to [`unroll_loops`] was selected from.
    fn in_template(self, template: &str) -> Self {
        match self {
            ShaderSourceError::LoopLeft { text, bound, .. } => ShaderSourceError::LoopLeft {
                line: first_line_containing(template, &text),
                text,
                bound,
            },
            other => other,
        }
    }
}

/// A line of a template as the `// #if` preprocessor sees it.
enum TemplateLine<'a> {
    /// WGSL or an ordinary comment.
    Code,
    /// `// #if NAME`, with NAME.
    If(&'a str),
    Else,
    Endif,
    /// A `// #` line that is none of the above (say `// #ifdef X`).
    Unknown,
}

fn classify(line: &str) -> TemplateLine<'_> {
    let Some(directive) = line.trim().strip_prefix("// #") else {
        return TemplateLine::Code;
    };
    match directive {
        "else" => TemplateLine::Else,
        "endif" => TemplateLine::Endif,
        _ => directive
            .strip_prefix("if ")
            .map_or(TemplateLine::Unknown, |name| TemplateLine::If(name.trim())),
    }
}

/// A `// #if` block not yet closed by its `// #endif`.
struct OpenBlock<'a> {
    /// Where its `// #if` is.
    line: usize,
    text: &'a str,
    /// Whether the branch being read is kept.
    kept: bool,
    /// Whether its `// #else` has been read.
    in_else: bool,
}

/// Refuses requested variant names that no template can contain.
fn check_flags(flags: &[&str]) -> Result<(), ShaderSourceError> {
    match flags.iter().find(|flag| !VARIANT_NAMES.contains(flag)) {
        Some(flag) => Err(ShaderSourceError::UnknownFlag {
            name: flag.to_string(),
        }),
        None => Ok(()),
    }
}

/// Opens the block of `// #if name` at `line`, kept when `flags` names it.
fn open_block<'a>(
    line: usize,
    text: &'a str,
    name: &str,
    flags: &[&str],
) -> Result<OpenBlock<'a>, ShaderSourceError> {
    if !VARIANT_NAMES.contains(&name) {
        return Err(ShaderSourceError::UnknownVariant {
            line,
            text: text.to_string(),
        });
    }
    Ok(OpenBlock {
        line,
        text,
        kept: flags.contains(&name),
        in_else: false,
    })
}

/// Moves the innermost open block to its `// #else` branch.
fn enter_else(
    block: Option<&mut OpenBlock<'_>>,
    line: usize,
    text: &str,
) -> Result<(), ShaderSourceError> {
    let Some(block) = block else {
        return Err(ShaderSourceError::NoOpenBlock {
            line,
            text: text.to_string(),
        });
    };
    if block.in_else {
        return Err(ShaderSourceError::SecondElse {
            line,
            text: text.to_string(),
            opened: block.line,
        });
    }
    block.in_else = true;
    block.kept = !block.kept;
    Ok(())
}

/// Keeps the lines of `// #if NAME` blocks whose NAME is in `flags` and of
/// the `// #else` blocks of the others; drops the directive lines. Blocks
/// nest. Every NAME, in the source and in `flags`, must be one of
/// [`VARIANT_NAMES`], and every block must be well formed: an unknown name
/// or a stray directive is an error, never a silent `// #else`.
pub fn select_variants(source: &str, flags: &[&str]) -> Result<String, ShaderSourceError> {
    check_flags(flags)?;
    let mut open: Vec<OpenBlock> = Vec::new();
    let mut out = String::with_capacity(source.len());
    for (index, line) in source.lines().enumerate() {
        let (number, text) = (index + 1, line.trim());
        match classify(line) {
            TemplateLine::Code => {
                if open.iter().all(|block| block.kept) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            TemplateLine::If(name) => open.push(open_block(number, text, name, flags)?),
            TemplateLine::Else => enter_else(open.last_mut(), number, text)?,
            TemplateLine::Endif => {
                if open.pop().is_none() {
                    return Err(ShaderSourceError::NoOpenBlock {
                        line: number,
                        text: text.to_string(),
                    });
                }
            }
            TemplateLine::Unknown => {
                return Err(ShaderSourceError::UnknownDirective {
                    line: number,
                    text: text.to_string(),
                });
            }
        }
    }
    match open.pop() {
        Some(block) => Err(ShaderSourceError::UnclosedBlock {
            line: block.line,
            text: block.text.to_string(),
        }),
        None => Ok(out),
    }
}

/// Expands every loop written exactly `for (var x = 0u; x < BOUND; x++) {`
/// whose BOUND is one of `bounds` into copies of its body, each wrapped as
/// `{ const x = Nu; body }` (a constant, so indices built from it are
/// const-expressions, as `subgroupBroadcast` requires). Nested loops are
/// expanded as well. Other loops are left alone, except that a loop still
/// comparing against one of `bounds` afterwards is an error: the
/// specialization counts on it being gone (no loop trips, constant lanes).
pub fn unroll_loops(source: &str, bounds: &[(&str, u32)]) -> Result<String, ShaderSourceError> {
    let out = expand_loops(source, bounds);
    match first_loop_left(&out, bounds) {
        None => Ok(out),
        Some((header, bound)) => Err(ShaderSourceError::LoopLeft {
            line: first_line_containing(source, header),
            text: header.to_string(),
            bound: bound.to_string(),
        }),
    }
}

/// The expansion of [`unroll_loops`], without its check.
fn expand_loops(source: &str, bounds: &[(&str, u32)]) -> String {
    let mut out = String::with_capacity(source.len() * 2);
    let mut rest = source;
    while let Some(found) = next_unrollable_loop(rest, bounds) {
        out.push_str(&rest[..found.start]);
        let body = expand_loops(&rest[found.body_start..found.body_end], bounds);
        for i in 0..found.count {
            let _ = writeln!(out, "{{ const {} = {i}u;{body}}}", found.var);
        }
        rest = &rest[found.body_end + 1..];
    }
    out.push_str(rest);
    out
}

/// The first `for` header in `source` (outside comments) whose condition
/// compares against one of `bounds`, and that bound.
fn first_loop_left<'s, 'b>(
    source: &'s str,
    bounds: &[(&'b str, u32)],
) -> Option<(&'s str, &'b str)> {
    source.lines().find_map(|line| {
        let code = line.split("//").next().unwrap_or_default();
        for_headers(code).find_map(|header| {
            let condition = header.split(';').nth(1)?;
            compared_bound(condition, bounds).map(|bound| (header, bound))
        })
    })
}

/// The `for (...)` headers in one line of code, each up to its body's `{`
/// (or the end of the line).
fn for_headers(code: &str) -> impl Iterator<Item = &str> {
    code.match_indices("for").filter_map(move |(at, _)| {
        let starts_word = !code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let opens = code[at + "for".len()..].trim_start().starts_with('(');
        let header = code[at..].split('{').next().unwrap_or_default();
        (starts_word && opens).then(|| header.trim_end())
    })
}

/// The name among `bounds` that one side of `condition` is, whatever the
/// comparison and spacing (`d < D4`, `d<=D4`, `D4 > d`); `None` when the
/// bound only takes part in an expression (`i < BLOCK_N * D4`).
fn compared_bound<'b>(condition: &str, bounds: &[(&'b str, u32)]) -> Option<&'b str> {
    condition
        .split(['<', '>', '=', '!'])
        .map(|side| side.trim_matches(|c: char| c.is_whitespace() || c == '(' || c == ')'))
        .find_map(|side| {
            bounds
                .iter()
                .map(|&(name, _)| name)
                .find(|&name| name == side)
        })
}

/// 1-based number of the first line of `source` containing `text`; 0 when
/// none does.
fn first_line_containing(source: &str, text: &str) -> usize {
    source
        .lines()
        .position(|line| line.contains(text))
        .map_or(0, |index| index + 1)
}

struct UnrollableLoop<'a> {
    /// Byte offset of `for`.
    start: usize,
    var: &'a str,
    count: u32,
    /// Body between the braces (exclusive).
    body_start: usize,
    body_end: usize,
}

fn next_unrollable_loop<'a>(source: &'a str, bounds: &[(&str, u32)]) -> Option<UnrollableLoop<'a>> {
    let mut search_from = 0;
    while let Some(offset) = source[search_from..].find("for (var ") {
        let start = search_from + offset;
        search_from = start + 1;
        let header_rest = &source[start + "for (var ".len()..];
        let var_len = header_rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(0);
        let var = &header_rest[..var_len];
        let Some(after_var) = header_rest[var_len..].strip_prefix(" = 0u; ") else {
            continue;
        };
        let Some(after_cond_var) = after_var
            .strip_prefix(var)
            .and_then(|s| s.strip_prefix(" < "))
        else {
            continue;
        };
        let Some(&(_, count)) = bounds
            .iter()
            .find(|(name, _)| after_cond_var.starts_with(&format!("{name}; {var}++) {{")))
        else {
            continue;
        };
        let bound_len = after_cond_var.find(';').unwrap_or(0);
        let header_len = after_cond_var[bound_len..].find('{').unwrap_or(0) + 1;
        let body_start = source.len() - after_cond_var.len() + bound_len + header_len;
        let body_end = matching_brace(source, body_start)?;
        return Some(UnrollableLoop {
            start,
            var,
            count,
            body_start,
            body_end,
        });
    }
    None
}

/// Offset of the `}` that closes a block whose body starts at `body_start`.
fn matching_brace(source: &str, body_start: usize) -> Option<usize> {
    let mut depth = 1usize;
    for (offset, c) in source[body_start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body_start + offset);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{ShaderSourceError, select_variants, unroll_loops};

    const NESTED: &str = "a\n// #if SUBGROUP_KV\nx\n// #if MASK\nxy\n// #else\nx_not_y\n// #endif\n// #else\nnot_x\n// #endif\nb\n";

    #[test]
    fn keeps_the_selected_variant_and_nests() {
        let select = |flags: &[&str]| select_variants(NESTED, flags).unwrap();
        assert_eq!(select(&["SUBGROUP_KV"]), "a\nx\nx_not_y\nb\n");
        assert_eq!(select(&["SUBGROUP_KV", "MASK"]), "a\nx\nxy\nb\n");
        assert_eq!(select(&[]), "a\nnot_x\nb\n");
    }

    /// The error `select_variants` gives for `source` with no flags.
    fn variant_error(source: &str) -> ShaderSourceError {
        select_variants(source, &[]).expect_err("the preprocessor accepted a malformed template")
    }

    #[test]
    fn refuses_an_unknown_variant_name() {
        assert_eq!(
            variant_error("a\n// #if SUBGROUPKV\nx\n// #endif\n"),
            ShaderSourceError::UnknownVariant {
                line: 2,
                text: "// #if SUBGROUPKV".into()
            }
        );
    }

    #[test]
    fn refuses_an_unknown_requested_flag() {
        assert_eq!(
            select_variants(NESTED, &["MASK", "HALF"]),
            Err(ShaderSourceError::UnknownFlag {
                name: "HALF".into()
            })
        );
    }

    #[test]
    fn refuses_an_unknown_directive() {
        assert_eq!(
            variant_error("// #ifdef MASK\nx\n// #endif\n"),
            ShaderSourceError::UnknownDirective {
                line: 1,
                text: "// #ifdef MASK".into()
            }
        );
    }

    #[test]
    fn refuses_else_and_endif_without_a_block() {
        assert_eq!(
            variant_error("a\n  // #else\n"),
            ShaderSourceError::NoOpenBlock {
                line: 2,
                text: "// #else".into()
            }
        );
        assert_eq!(
            variant_error("// #if MASK\n// #endif\n// #endif\n"),
            ShaderSourceError::NoOpenBlock {
                line: 3,
                text: "// #endif".into()
            }
        );
    }

    #[test]
    fn refuses_a_second_else() {
        assert_eq!(
            variant_error("// #if MASK\na\n// #else\nb\n// #else\nc\n// #endif\n"),
            ShaderSourceError::SecondElse {
                line: 5,
                text: "// #else".into(),
                opened: 1
            }
        );
    }

    #[test]
    fn refuses_a_block_left_open() {
        assert_eq!(
            variant_error("// #if MASK\n// #if BF16_STORAGE\n// #endif\na\n"),
            ShaderSourceError::UnclosedBlock {
                line: 1,
                text: "// #if MASK".into()
            }
        );
    }

    #[test]
    fn unrolls_named_bounds_only_and_nests() {
        let source = "a; for (var d = 0u; d < D4; d++) { x[d] = 1; for (var r = 0u; r < ROWS; r++) { y[r] = d; } } for (var i = 0u; i < N; i++) { z; } for (var i = lid; i < BLOCK_N * D4; i += WG) { w; } b;";
        let out = unroll_loops(source, &[("D4", 2), ("ROWS", 3)]).unwrap();
        assert_eq!(out.matches("const d = ").count(), 2);
        assert_eq!(out.matches("const r = ").count(), 6);
        assert!(out.contains("for (var i = 0u; i < N; i++) { z; }"));
        assert!(out.contains("for (var i = lid; i < BLOCK_N * D4; i += WG) { w; }"));
        assert!(out.starts_with("a; ") && out.ends_with(" b;"));
        assert!(!out.contains("d < D4") && !out.contains("r < ROWS"));
    }

    /// The error `unroll_loops` gives for `source` when D4 and ROWS are
    /// unrolled.
    fn unroll_error(source: &str) -> ShaderSourceError {
        unroll_loops(source, &[("D4", 2), ("ROWS", 3)])
            .expect_err("a loop over an unrolled bound was left")
    }

    #[test]
    fn refuses_to_leave_a_loop_over_an_unrolled_bound() {
        assert_eq!(
            unroll_error("a;\n  for (var d: u32 = 0u; d < D4; d++) {\n x; }\n"),
            ShaderSourceError::LoopLeft {
                line: 2,
                text: "for (var d: u32 = 0u; d < D4; d++)".into(),
                bound: "D4".into()
            }
        );
        // Other spacing and comparisons, nested inside an unrolled loop.
        for header in [
            "for (var r = 0u; r<ROWS; r++)",
            "for(var r = 0u; r <= ROWS; r++)",
            "for (var r = 0u; ROWS > r; r++)",
            "for (var r = 0u;  r  <  ROWS ; r += 1u)",
        ] {
            let source = format!("for (var d = 0u; d < D4; d++) {{\n{header} {{ y; }}\n}}\n");
            match unroll_error(&source) {
                ShaderSourceError::LoopLeft { line, text, bound } => {
                    assert_eq!((line, text.as_str(), bound.as_str()), (2, header, "ROWS"));
                }
                other => panic!("{header}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_left_loop_is_located_in_the_template() {
        let left = ShaderSourceError::LoopLeft {
            line: 1,
            text: "for (var d: u32 = 0u; d < D4; d++)".into(),
            bound: "D4".into(),
        };
        let template = "// #if MASK\nm;\n// #endif\n  for (var d: u32 = 0u; d < D4; d++) {\n}\n";
        match left.in_template(template) {
            ShaderSourceError::LoopLeft { line, .. } => assert_eq!(line, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loops_in_comments_and_other_bounds_are_not_left_loops() {
        let source = "// for (var d: u32 = 0u; d < D4; d++) {\nfor (var i = 0u; i < D4X; i++) { a; }\nfor (var i = 0u; i < 2u * ROWS; i++) { b; }\n";
        assert_eq!(
            unroll_loops(source, &[("D4", 2), ("ROWS", 3)]).unwrap(),
            source
        );
    }
}
