//! The library's error type: every way a caller can get a call wrong, with
//! the numbers that explain it.

/// Errors returned by `wgpu_flash_attn`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found for backends {backends}; on a Debian/Ubuntu machine without a GPU, \
         `apt-get install mesa-vulkan-drivers libvulkan1` provides the lavapipe software adapter"
    )]
    NoAdapter { backends: String },

    #[error("no adapter name contains {wanted:?} (WGPU_ADAPTER_NAME); available: {available:?}")]
    AdapterNotFound {
        wanted: String,
        available: Vec<String>,
    },

    #[error("requesting a device failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),

    #[error("{tensor} has a zero dimension: shape {shape:?}")]
    ZeroDimension {
        tensor: &'static str,
        shape: [usize; 4],
    },

    #[error("{tensor}: expected {expected} elements from the shape, got {got}")]
    DataLength {
        tensor: &'static str,
        expected: usize,
        got: usize,
    },

    #[error("{what}: {left_name} has {left}, {right_name} has {right}")]
    ShapeMismatch {
        what: &'static str,
        left_name: &'static str,
        left: usize,
        right_name: &'static str,
        right: usize,
    },

    #[error("head dim {got} is not supported; supported: {supported}")]
    HeadDimUnsupported { got: usize, supported: &'static str },

    #[error("heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")]
    HeadsNotDivisible { heads_q: usize, heads_kv: usize },

    #[error("{tensor} has dtype {got:?}; this call needs {needed:?}")]
    DTypeUnsupported {
        tensor: &'static str,
        got: crate::DType,
        needed: crate::DType,
    },

    #[error("{tensor}: {what} {value} must be a multiple of {multiple} elements")]
    Misaligned {
        tensor: &'static str,
        what: &'static str,
        value: usize,
        multiple: usize,
    },

    #[error("{tensor}: the view reaches element {needed} but its buffer holds {available}")]
    OutOfBounds {
        tensor: &'static str,
        needed: usize,
        available: usize,
    },

    #[error(
        "{tensor}: buffer of {bytes} bytes exceeds the adapter's {limit_name} of {limit} bytes"
    )]
    BufferTooLarge {
        tensor: &'static str,
        bytes: u64,
        limit_name: &'static str,
        limit: u64,
    },

    #[error(
        "naive attention: the score matrix of one (batch, head) pair is {bytes_per_head} bytes \
         ({total_bytes} for the whole call), over the adapter's {limit_name} of {limit} bytes"
    )]
    ScoresTooLarge {
        bytes_per_head: u64,
        total_bytes: u64,
        limit_name: &'static str,
        limit: u64,
    },

    #[error("kernel tier {tier:?} is not available on this adapter: {reason}")]
    TierUnavailable { tier: crate::Tier, reason: String },

    #[error("{what} needs {groups} workgroups along {axis}, the adapter allows {limit}")]
    DispatchTooLarge {
        what: &'static str,
        axis: &'static str,
        groups: u64,
        limit: u32,
    },

    #[error(
        "head dim {head_dim} needs at least {needed} bytes of workgroup memory, the adapter has {limit}"
    )]
    WorkgroupMemory {
        head_dim: usize,
        needed: u64,
        limit: u32,
    },

    #[error("the adapter allows {limit} invocations per workgroup, the kernel needs {needed}")]
    WorkgroupInvocations { needed: u32, limit: u32 },

    #[error("scale must be finite and non-zero, got {0}")]
    InvalidScale(f32),

    #[error("softcap must be finite and > 0, got {0}")]
    InvalidSoftcap(f32),

    #[error("window sides must be >= 0 (None = unbounded), got left {left:?}, right {right:?}")]
    InvalidWindow {
        left: Option<i64>,
        right: Option<i64>,
    },

    #[error("ALiBi slopes: expected {expected} values ({layout}), got {got}")]
    AlibiSlopes {
        expected: String,
        layout: &'static str,
        got: usize,
    },

    #[error("ALiBi slope {index} is not finite: {value}")]
    AlibiSlopeNotFinite { index: usize, value: f32 },

    #[error(
        "the output {tensor} shares a buffer with input {input}: outputs must not alias inputs"
    )]
    OutputAliasesInput {
        tensor: &'static str,
        input: &'static str,
    },

    /// A caller's buffer (or a tensor made from one) belongs to another
    /// device than the `Gpu` it was given to.
    #[error("{tensor} was created on another device than this Gpu's: {message}")]
    ForeignBuffer {
        tensor: &'static str,
        message: String,
    },

    /// An operand was created by (or wrapped for) another `Gpu` whose
    /// device differs from the one the call runs on.
    #[error("{tensor} belongs to another device than the Gpu this call runs on")]
    WrongDevice { tensor: &'static str },

    /// A caller's buffer lacks a usage the crate needs.
    #[error("{tensor}: the buffer's usage {usage} lacks {needed}, needed to {why}")]
    BufferUsage {
        tensor: &'static str,
        usage: String,
        needed: &'static str,
        why: &'static str,
    },

    /// A caller's buffer whose size is not a whole number of 4-byte words
    /// (storage bindings are arrays of 32-bit words).
    #[error("{tensor}: buffer size {bytes} bytes is not a multiple of 4")]
    BufferSize { tensor: &'static str, bytes: u64 },

    /// A shape whose element or byte count does not fit the address space.
    #[error("{tensor} shape {shape:?} has more elements than fit in memory")]
    ShapeOverflow {
        tensor: &'static str,
        shape: [usize; 4],
    },

    /// Two forward options that the crate does not combine.
    #[error("{what} cannot be combined in one forward call")]
    UnsupportedCombination { what: &'static str },

    #[error("lse output is [{got:?}], the call needs [batch, heads_q, seq_q] = {expected:?}")]
    LseShape {
        expected: [usize; 3],
        got: [usize; 3],
    },

    #[error("KV cache page size {got} is not a power of two from 16 to 256")]
    PageSize { got: usize },
    #[error("KV cache sequence {sequence}: {needed} tokens needed, its pages hold {capacity}")]
    CacheCapacity {
        sequence: usize,
        needed: usize,
        capacity: usize,
    },
    #[error(
        "KV cache sequence {sequence}: block table entry {index} names page {page}, the pool has {pool_pages}"
    )]
    BlockTablePage {
        sequence: usize,
        index: usize,
        page: u32,
        pool_pages: usize,
    },
    #[error("KV cache has {batch} sequences, sequence {sequence} does not exist")]
    CacheSequence { sequence: usize, batch: usize },
    #[error("rotary dim {rotary_dim} must be even, > 0 and at most head dim {head_dim}")]
    RotaryDim { rotary_dim: usize, head_dim: usize },
    #[error("RoPE base (theta) must be finite and > 1, got {0}")]
    RopeBase(f64),
    #[error("kv_splits must be at least 1, got {0}")]
    KvSplits(usize),
    #[error("merge: no partial results given")]
    NothingToMerge,
    #[error("{tensor} must be a packed (contiguous) tensor for this call")]
    NotPacked { tensor: &'static str },
    #[error(
        "{kernel} over {keys} keys would run {trips} loop iterations per invocation; this adapter \
         stops shaders after {budget} (llvmpipe), which would silently truncate the result. Use \
         fewer keys per call (split the keys and merge the parts with Gpu::merge_attention) or \
         the default kernel tier"
    )]
    LoopBudget {
        kernel: String,
        keys: u64,
        trips: u64,
        budget: u64,
    },
    #[error("{name}: {problem} (entry {index} is {value}, total {total})")]
    CuSeqlens {
        name: &'static str,
        index: usize,
        value: usize,
        total: usize,
        problem: &'static str,
    },
    #[error("{name}: sequence {index} has valid length {len}, its tensor holds {max}")]
    ValidLength {
        name: &'static str,
        index: usize,
        len: usize,
        max: usize,
    },
    #[error(
        "mask of dims {dims:?} does not broadcast to [batch, heads_q, seq_q, seq_kv] = {shape:?} (its batch and heads must be 1 or equal)"
    )]
    MaskShape { dims: [usize; 4], shape: [usize; 4] },
    #[error("mask value {value} at {index}: a bias must be finite or -inf")]
    MaskValue { index: usize, value: f32 },
    #[error(
        "block layout of dims {dims:?} with {block_q}x{block_k} blocks; the sequence needs {expected:?}"
    )]
    BlockLayout {
        dims: [usize; 4],
        expected: [usize; 4],
        block_q: usize,
        block_k: usize,
    },
    #[error("GPU validation error in {context}: {message}")]
    GpuValidation {
        context: &'static str,
        message: String,
    },

    #[error("reading a buffer back from the GPU failed: {0}")]
    Readback(String),

    /// A kernel's WGSL could not be generated from its template (an unknown
    /// `// #if` name, a malformed block, a loop the specialization unrolls
    /// written in a form the unroller does not expand): a bug in the
    /// crate's shaders, reported instead of compiling the wrong variant.
    #[error("generating the WGSL of {kernel} failed: {reason}")]
    ShaderSource { kernel: String, reason: String },
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
