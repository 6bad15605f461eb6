//! The one table of WGSL sources, and how a kernel's specialization becomes
//! WGSL text.
//!
//! Kernels are specialized by generated `const` declarations prepended to the
//! source (rather than pipeline-overridable constants) because WGSL only lets
//! `const` expressions size private arrays, and the accumulators are private
//! arrays sized by the head dimension.

use crate::kv_cache::KvDType;
use crate::tensor::DType;

/// Names of the `// #if` variants in the attention kernels.
const SUBGROUP_KV: &str = "SUBGROUP_KV";
const HALF_STORAGE: &str = "HALF_STORAGE";
const BF16_STORAGE: &str = "BF16_STORAGE";
/// K and V (only) stored in 16 bits: decoding over an f16/bf16 KV cache
/// (the forward's half storage sets it with HALF_STORAGE).
const KV_HALF: &str = "KV_HALF";
/// K and V stored one byte per element with a per-(token, head) f32
/// scale (KV caches): int8, or FP8 E4M3 with KV_FP8.
const KV_BYTES: &str = "KV_BYTES";
/// KV_BYTES's bytes are FP8 E4M3 (else int8).
const KV_FP8: &str = "KV_FP8";
const MASK: &str = "MASK";
const CAUSAL: &str = "CAUSAL";
const SUBGROUP_BROADCAST: &str = "SUBGROUP_BROADCAST";
/// Decoding's subgroup tier with lanes over keys ([`DecodeLanes::Keys`]);
/// it replaces SUBGROUP_KV, whose lanes split the head dim.
const KEY_LANES: &str = "KEY_LANES";
/// Decoding's subgroup tier with key tiles ([`DecodeLanes::KeyTiles`]):
/// set beside SUBGROUP_KV, whose bindings and cache reads it shares.
const KEY_TILES: &str = "KEY_TILES";
/// Decoding with speculative token trees hiding draft keys
/// ([`DecodeMask::TokenTree`]).
const TREE_MASK: &str = "TREE_MASK";
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
pub const VARIANT_NAMES: [&str; 24] = [
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
    KV_BYTES,
    KV_FP8,
    MASK,
    CAUSAL,
    SUBGROUP_BROADCAST,
    KEY_LANES,
    KEY_TILES,
    TREE_MASK,
];

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

/// The `// #if` names that select how a KV cache of `dtype` is read.
fn cache_flags(dtype: KvDType) -> &'static [&'static str] {
    match dtype {
        KvDType::F32 => &[],
        KvDType::F16 => &[KV_HALF],
        KvDType::BF16 => &[KV_HALF, BF16_STORAGE],
        KvDType::Int8 => &[KV_BYTES],
        KvDType::Fp8 => &[KV_BYTES, KV_FP8],
    }
}

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
    /// `shaders/kv_gather.wgsl`: copies a cache into dense f32 K and V.
    KvGather,
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
    pub const ALL: [Kernel; 22] = [
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
        Kernel::KvGather,
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
            Kernel::KvGather => "kv_gather.wgsl",
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
    /// attention declarations, where the kernel uses them, then its file;
    /// the `shaders/` files as built in, or their replacements.
    pub fn template_with(self, overrides: &ShaderOverrides) -> String {
        let file = |name| overrides.file(name);
        let own = match self {
            // The register-blocked gradient passes follow the others'
            // shared declarations (BLOCKED_BACKWARD picks which).
            Kernel::BackwardDeltas
            | Kernel::BackwardKeys
            | Kernel::BackwardQueries
            | Kernel::BackwardSinks => format!(
                "{}\n{}",
                file("flash_backward.wgsl"),
                file("flash_backward_blocked.wgsl")
            ),
            _ => file(self.file_name()).to_string(),
        };
        // The files prepended to the kernel's own, in order: the 16-bit
        // conversions first (attention_common.wgsl, the append and the
        // combine pass call them).
        let codec = file("half_codec.wgsl");
        let rope = file("rope_common.wgsl");
        let attention = file("attention_common.wgsl");
        let prefix: Vec<&str> = match self {
            Kernel::Combine => vec![codec],
            Kernel::Rope => vec![rope],
            Kernel::KvAppend => vec![codec, rope],
            Kernel::KvGather => vec![codec],
            // Both forward kernels read the same sequence table, carry and
            // mask, declared once in flash_attention.wgsl.
            Kernel::FlashBlocked
            | Kernel::FlashBlockedMasked
            | Kernel::FlashCoop
            | Kernel::FlashCoopMasked => vec![
                codec,
                attention,
                forward_tables(file("flash_attention.wgsl")),
                file("forward_blocks.wgsl"),
            ],
            // The kernels whose invocations own whole query rows share
            // their unrolled per-row steps.
            Kernel::FlashForward
            | Kernel::FlashMasked
            | Kernel::Decode
            | Kernel::NaiveScores
            | Kernel::NaiveSoftmax
            | Kernel::NaiveValues => vec![codec, attention, file("row_blocks.wgsl")],
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
        text.push_str(&own);
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

    /// Storage buffers the kernel binds (its device's
    /// `max_storage_buffers_per_shader_stage` must allow them).
    pub fn storage_buffers(self) -> u32 {
        let storage =
            |ty: &&wgpu::BufferBindingType| matches!(ty, wgpu::BufferBindingType::Storage { .. });
        self.bindings().iter().filter(storage).count() as u32
    }

    /// `Error::StorageBuffers` where `limit` (a device's
    /// `max_storage_buffers_per_shader_stage`) is below
    /// [`Kernel::storage_buffers`]: wgpu would refuse the kernel's layout
    /// with a panic in the caller's encoder instead.
    pub(crate) fn check_storage_buffers(self, limit: u32) -> crate::Result<()> {
        let needed = self.storage_buffers();
        if needed > limit {
            return Err(crate::Error::StorageBuffers {
                kernel: self.file_name(),
                needed,
                limit,
            });
        }
        Ok(())
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
            // params, K and V segments, block table, dense K, dense V
            Kernel::KvGather => &[
                Uniform,
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: true },
                Storage { read_only: false },
                Storage { read_only: false },
            ],
        }
    }
}

/// Marks the lines of flash_attention.wgsl that the register-blocked
/// kernel shares (sequence table, carry, mask): the line after `BEGIN` to
/// the line before `END`.
const FORWARD_TABLES_BEGIN: &str = "// Shared with flash_blocked.wgsl from here";
const FORWARD_TABLES_END: &str = "// Shared with flash_blocked.wgsl up to here";

/// Every file under `shaders/`, by name, as built into the crate.
const SHADER_FILES: [(&str, &str); 17] = [
    (
        "attention_common.wgsl",
        include_str!("../../shaders/attention_common.wgsl"),
    ),
    (
        "combine_partials.wgsl",
        include_str!("../../shaders/combine_partials.wgsl"),
    ),
    (
        "flash_attention.wgsl",
        include_str!("../../shaders/flash_attention.wgsl"),
    ),
    (
        "flash_backward.wgsl",
        include_str!("../../shaders/flash_backward.wgsl"),
    ),
    (
        "flash_backward_blocked.wgsl",
        include_str!("../../shaders/flash_backward_blocked.wgsl"),
    ),
    (
        "flash_blocked.wgsl",
        include_str!("../../shaders/flash_blocked.wgsl"),
    ),
    (
        "flash_coop.wgsl",
        include_str!("../../shaders/flash_coop.wgsl"),
    ),
    (
        "flash_decode.wgsl",
        include_str!("../../shaders/flash_decode.wgsl"),
    ),
    (
        "forward_blocks.wgsl",
        include_str!("../../shaders/forward_blocks.wgsl"),
    ),
    (
        "half_codec.wgsl",
        include_str!("../../shaders/half_codec.wgsl"),
    ),
    (
        "kv_append.wgsl",
        include_str!("../../shaders/kv_append.wgsl"),
    ),
    (
        "kv_gather.wgsl",
        include_str!("../../shaders/kv_gather.wgsl"),
    ),
    (
        "linear_attention.wgsl",
        include_str!("../../shaders/linear_attention.wgsl"),
    ),
    (
        "naive_attention.wgsl",
        include_str!("../../shaders/naive_attention.wgsl"),
    ),
    ("rope.wgsl", include_str!("../../shaders/rope.wgsl")),
    (
        "rope_common.wgsl",
        include_str!("../../shaders/rope_common.wgsl"),
    ),
    (
        "row_blocks.wgsl",
        include_str!("../../shaders/row_blocks.wgsl"),
    ),
];

/// Replacements for some of the `shaders/` files, by name
/// ([`crate::Gpu::override_shader_file`]: kernel tuning without a rebuild).
#[derive(Debug, Clone, Default)]
pub struct ShaderOverrides {
    files: std::collections::BTreeMap<&'static str, String>,
}

impl ShaderOverrides {
    /// The names of the files that can be replaced.
    pub fn names() -> impl Iterator<Item = &'static str> {
        SHADER_FILES.iter().map(|(name, _)| *name)
    }

    /// Replaces the file `name`; `false` (nothing replaced) when no
    /// `shaders/` file has that name.
    pub fn replace(&mut self, name: &str, text: String) -> bool {
        match Self::names().find(|known| *known == name) {
            Some(known) => {
                self.files.insert(known, text);
                true
            }
            None => false,
        }
    }

    /// The text of the file `name`: its replacement, else the built-in one.
    fn file(&self, name: &str) -> &str {
        if let Some(text) = self.files.get(name) {
            return text;
        }
        SHADER_FILES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, text)| *text)
            .unwrap_or_else(|| panic!("{name} is not one of the crate's shader files"))
    }
}

/// The declarations of flash_attention.wgsl (`file`) between its
/// shared-section markers (the markers are checked by a test, so a missing
/// one cannot ship).
pub(crate) fn forward_tables(file: &str) -> &str {
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

mod loop_audit;
mod specialization;
mod template;
mod tiling;

pub use loop_audit::unproven_loop;

pub use specialization::{
    MIN_BLOCK_N, NaivePass, Specialization, forward_tile_bytes, largest_block_n,
};
pub use tiling::{
    AttentionTiling, BackwardPass, BackwardTiling, BlockedBackwardTiling, BlockedTiling,
    CoopTiling, DecodeIo, DecodeMask, LinearPass, LinearTiling,
};
