//! The library's error type: every way a caller can get a call wrong, with
//! the numbers that explain it.

/// Errors returned by `wgpu_flash_attn`. Non-exhaustive: new ways to fail
/// (as out of memory and device loss were) are added without breaking
/// callers' matches.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter of the selected backends was found (no GPU driver, nor a software one).
    #[error(
        "no GPU adapter found for backends {backends}; on a Debian/Ubuntu machine without a GPU, \
         `apt-get install mesa-vulkan-drivers libvulkan1` provides the lavapipe software adapter"
    )]
    NoAdapter {
        /// The backends searched, as `wgpu::Backends`' debug text.
        backends: String,
    },

    /// No adapter's name contains the requested substring
    /// ([`crate::AdapterOptions::adapter_name`]).
    #[error("no adapter name contains {wanted:?} (WGPU_ADAPTER_NAME); available: {available:?}")]
    AdapterNotFound {
        /// The requested substring (matched case-insensitively).
        wanted: String,
        /// Names of every adapter the selected backends offer.
        available: Vec<String>,
    },

    /// wgpu refused to create a device on the chosen adapter.
    #[error("requesting a device failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),

    /// A tensor, shape, mask, logsumexp or cache configuration has a dimension of 0.
    #[error("{tensor} has a zero dimension: shape {shape:?}")]
    ZeroDimension {
        /// What has the empty dimension (`"tensor"`, `"lse"`, `"mask"`, `"attention shape"`, ...).
        tensor: &'static str,
        /// Its four dimensions as that item orders them (BSHD for tensors); one of them is 0.
        shape: [usize; 4],
    },

    /// A host slice's length differs from what its shape (or another input) implies.
    #[error("{tensor}: expected {expected} elements from the shape, got {got}")]
    DataLength {
        /// Which slice (e.g. `"q"`, `"mask"`, `"valid kv lengths"`).
        tensor: &'static str,
        /// Entries the shape implies.
        expected: usize,
        /// Entries the slice has.
        got: usize,
    },

    /// A token tree names a parent that does not come before its child
    /// (`TokenTree::from_parents`: parents precede children, as the draft
    /// tokens sit in the cache).
    #[error("token tree: token {token}'s parent {parent} is not an earlier token")]
    TokenTreeParent {
        /// The token.
        token: usize,
        /// Its parent as given.
        parent: usize,
    },

    /// `KvCache::keep_draft` was given a draft longer than its sequence.
    #[error("keep_draft: sequence {sequence} holds {len} tokens, fewer than the draft's {draft}")]
    DraftPastSequence {
        /// The sequence.
        sequence: usize,
        /// Draft tokens given.
        draft: usize,
        /// The sequence's length.
        len: usize,
    },

    /// `KvCache::keep_draft`'s kept tokens do not increase, or one lies
    /// past the draft.
    #[error(
        "keep_draft: kept token {index} is draft token {token}; kept tokens must increase and \
         lie below the draft's {draft}"
    )]
    DraftKept {
        /// Its index in the kept list.
        index: usize,
        /// The draft token it names.
        token: usize,
        /// Draft tokens.
        draft: usize,
    },

    /// A decode call's token tree for a sequence has another number of
    /// tokens than the sequence has query tokens.
    #[error(
        "decode token trees: sequence {sequence}'s tree has {tokens} tokens, the sequence \
         {query_tokens} query tokens"
    )]
    TokenTreeSize {
        /// The sequence (cache batch entry).
        sequence: usize,
        /// Tokens in its tree.
        tokens: usize,
        /// Its query tokens in the call.
        query_tokens: usize,
    },

    /// Two sizes that must agree differ (Q/K/V/O dims, merge parts, a packed varlen batch, a
    /// cache's K and V buffers).
    #[error("{what}: {left_name} has {left}, {right_name} has {right}")]
    ShapeMismatch {
        /// The rule that was broken.
        what: &'static str,
        /// Name of the first size.
        left_name: &'static str,
        /// The first size.
        left: usize,
        /// Name of the size it must equal.
        right_name: &'static str,
        /// The size it must equal.
        right: usize,
    },

    /// The head dim is not one the kernels handle (multiples of 8 from 8 to 256).
    #[error("head dim {got} is not supported; supported: {supported}")]
    HeadDimUnsupported {
        /// The head dim asked for.
        got: usize,
        /// The supported head dims in words ([`crate::SUPPORTED_HEAD_DIMS`]).
        supported: &'static str,
    },

    /// Grouped-query attention needs `heads_q` to be a multiple of `heads_kv`.
    #[error("heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")]
    HeadsNotDivisible {
        /// Query heads.
        heads_q: usize,
        /// Key/value heads.
        heads_kv: usize,
    },

    /// An operand's dtype is not the one the call needs: Q's in a forward call; f32 for decode,
    /// merge, RoPE and cache appends.
    #[error("{tensor} has dtype {got:?}; this call needs {needed:?}")]
    DTypeUnsupported {
        /// Which operand.
        tensor: &'static str,
        /// Its dtype.
        got: crate::DType,
        /// The dtype the call needs.
        needed: crate::DType,
    },

    /// An operand's stride or offset is not a multiple of 4 elements (the kernels read vec4s).
    #[error("{tensor}: {what} {value} must be a multiple of {multiple} elements")]
    Misaligned {
        /// Which operand.
        tensor: &'static str,
        /// Which stride, or `"offset"`.
        what: &'static str,
        /// Its value, in elements.
        value: usize,
        /// The multiple it must be, in elements (4).
        multiple: usize,
    },

    /// A view or wrapped buffer is too small for what it must hold.
    #[error("{tensor}: the view reaches element {needed} but its buffer holds {available}")]
    OutOfBounds {
        /// Which tensor or buffer.
        tensor: &'static str,
        /// What the view needs: elements (bytes or pages for KV-cache buffers, as `tensor` says).
        needed: usize,
        /// What the buffer holds, in the same unit.
        available: usize,
    },

    /// A buffer would exceed one of the adapter's buffer-size limits.
    #[error(
        "{tensor}: buffer of {bytes} bytes exceeds the adapter's {limit_name} of {limit} bytes"
    )]
    BufferTooLarge {
        /// Which buffer.
        tensor: &'static str,
        /// Its size in bytes.
        bytes: u64,
        /// The limit exceeded (`max_buffer_size`, `max_storage_buffer_binding_size`, or
        /// `KvCacheConfig::max_buffer_bytes`).
        limit_name: &'static str,
        /// That limit, in bytes.
        limit: u64,
    },

    /// Naive attention: one (batch, head) score matrix does not fit in one storage binding.
    #[error(
        "naive attention: the score matrix of one (batch, head) pair is {bytes_per_head} bytes \
         ({total_bytes} for the whole call), over the adapter's {limit_name} of {limit} bytes"
    )]
    ScoresTooLarge {
        /// Bytes of one `[seq_q, seq_kv]` score matrix (rows padded to vec4s).
        bytes_per_head: u64,
        /// Bytes of all `batch * heads_q` matrices.
        total_bytes: u64,
        /// The limit exceeded (the smaller of `max_storage_buffer_binding_size` and
        /// `max_buffer_size`).
        limit_name: &'static str,
        /// That limit, in bytes.
        limit: u64,
    },

    /// A forced kernel tier ([`crate::AttentionConfig::tier`]) is not offered by this adapter.
    #[error("kernel tier {tier:?} is not available on this adapter: {reason}")]
    TierUnavailable {
        /// The tier asked for.
        tier: crate::Tier,
        /// Why the adapter cannot run it.
        reason: String,
    },

    /// A dispatch needs more workgroups along one axis than `max_compute_workgroups_per_dimension`.
    #[error("{what} needs {groups} workgroups along {axis}, the adapter allows {limit}")]
    DispatchTooLarge {
        /// Which dispatch.
        what: &'static str,
        /// The axis, named by what it counts (e.g. `"heads_q"`) or as `"y"`.
        axis: &'static str,
        /// Workgroups it needs along that axis.
        groups: u64,
        /// Workgroups the adapter allows per axis.
        limit: u32,
    },

    /// The adapter's workgroup memory is too small for even the smallest K/V tile of these head dims.
    #[error(
        "head dims {head_dim} (query/key) and {head_dim_v} (value) need at least {needed} bytes of workgroup memory, the adapter has {limit}"
    )]
    WorkgroupMemory {
        /// The call's query/key head dim.
        head_dim: usize,
        /// The call's value head dim.
        head_dim_v: usize,
        /// Bytes of workgroup memory the smallest tile needs.
        needed: u64,
        /// The adapter's `max_compute_workgroup_storage_size`, in bytes.
        limit: u32,
    },

    /// A kernel binds more storage buffers than the adapter allows per shader stage.
    #[error("{kernel} binds {needed} storage buffers, the adapter allows {limit} per shader stage")]
    StorageBuffers {
        /// Which kernel.
        kernel: &'static str,
        /// Storage buffers it binds.
        needed: u32,
        /// The adapter's `max_storage_buffers_per_shader_stage`.
        limit: u32,
    },

    /// A register-blocked layout outside what the kernel is written for.
    #[error(
        "register-blocked layout {row_lanes}x{key_lanes}x{rows} (row lanes x key lanes x rows): \
         lanes must be 1 to 256 and rows per invocation 1 to 8"
    )]
    InvalidBlockedLayout {
        /// Invocations along the query rows asked for.
        row_lanes: u32,
        /// Invocations along the keys asked for.
        key_lanes: u32,
        /// Query rows per invocation asked for.
        rows: u32,
    },

    /// The planned workgroup has more invocations than the adapter allows.
    #[error("the adapter allows {limit} invocations per workgroup, the kernel needs {needed}")]
    WorkgroupInvocations {
        /// Invocations per workgroup the kernel needs.
        needed: u32,
        /// The adapter's `max_compute_invocations_per_workgroup`.
        limit: u32,
    },

    /// The softmax scale is zero, infinite or NaN (holds the value given).
    #[error("scale must be finite and non-zero, got {0}")]
    InvalidScale(f32),

    /// The dropout probability is outside `[0, 1)` (holds the value given).
    #[error("dropout probability must lie in [0, 1), got {0}")]
    InvalidDropout(f32),

    /// The softcap is not finite and positive (holds the value given).
    #[error("softcap must be finite and > 0, got {0}")]
    InvalidSoftcap(f32),

    /// A sliding-window side is negative.
    #[error("window sides must be >= 0 (None = unbounded), got left {left:?}, right {right:?}")]
    InvalidWindow {
        /// The left side given (keys before the query's position).
        left: Option<i64>,
        /// The right side given (keys after the query's position).
        right: Option<i64>,
    },

    /// The ALiBi slope count does not match its layout's shape.
    #[error("ALiBi slopes: expected {expected} values ({layout}), got {got}")]
    AlibiSlopes {
        /// Slopes the layout needs (`heads_q` or `batch * heads_q`).
        expected: String,
        /// The layout, `"[heads_q]"` or `"[batch, heads_q]"`.
        layout: &'static str,
        /// Slopes given.
        got: usize,
    },

    /// An ALiBi slope is infinite or NaN.
    #[error("ALiBi slope {index} is not finite: {value}")]
    AlibiSlopeNotFinite {
        /// Index of the first such slope.
        index: usize,
        /// Its value.
        value: f32,
    },

    /// The attention sinks are not one per query head.
    #[error("attention sinks: expected one per query head ({heads_q}), got {got}")]
    SinksLength {
        /// Query heads of the call.
        heads_q: usize,
        /// Sinks given.
        got: usize,
    },

    /// An attention sink is infinite or NaN.
    #[error("attention sink of head {head} is not finite: {value}")]
    SinkNotFinite {
        /// The first such head.
        head: usize,
        /// Its sink.
        value: f32,
    },

    /// A tensor the call writes (an output, or a cache being appended to)
    /// shares its buffer with another operand of the call. The kernels
    /// bind what they write as a buffer of its own: sharing would race
    /// with, or overwrite, the other operand.
    #[error(
        "{tensor} shares a buffer with {input}: a buffer a call writes (or binds writable) must be one no other operand of the call uses"
    )]
    OutputAliasesInput {
        /// What the call writes (`"out"`, `"lse"`, `"dq"`, `"kv cache K"`, ...).
        tensor: &'static str,
        /// The operand whose buffer it shares.
        input: &'static str,
    },

    /// [`crate::KvCache::from_buffers`] was given one buffer twice: as a
    /// segment's K and V (where V is stored apart from K), or in two
    /// segments. Pages numbered apart would then be one storage.
    #[error(
        "kv cache buffers: segment {first_segment}'s {first} is also segment {second_segment}'s {second}; every K and V buffer must be distinct (a latent cache passes its K buffer as V)"
    )]
    CacheBufferRepeat {
        /// The segment of the buffer's first use.
        first_segment: usize,
        /// `"K"` or `"V"`.
        first: &'static str,
        /// The segment of its second use.
        second_segment: usize,
        /// `"K"` or `"V"`.
        second: &'static str,
    },

    /// A view reaches past what the kernels' 32-bit indices address: they
    /// index a bound buffer in units of `unit` elements with u32 offsets.
    #[error(
        "{tensor} reaches element {extent}, past the {max} elements the kernels' 32-bit indices address (in units of {unit} elements)"
    )]
    IndexRange {
        /// Which tensor.
        tensor: &'static str,
        /// One past its last element.
        extent: u64,
        /// The most elements addressable: `unit * 2^32`.
        max: u64,
        /// Elements per index step.
        unit: u64,
    },

    /// An output view whose strides make two of its elements one memory
    /// location: the kernels would race on them.
    #[error(
        "the output {tensor} writes some elements twice: shape {shape:?} with strides [{batch_stride}, {seq_stride}, {head_stride}, 1] overlaps"
    )]
    OverlappingOutput {
        /// The output.
        tensor: &'static str,
        /// Its `[batch, seq, heads, head_dim]`.
        shape: [usize; 4],
        /// Its element strides.
        batch_stride: usize,
        /// Along the sequence.
        seq_stride: usize,
        /// Along the heads.
        head_stride: usize,
    },

    /// A block table lists one page twice: two positions of the sequence
    /// would share storage.
    #[error(
        "block table of sequence {sequence} lists page {page} twice (entries {first} and {second})"
    )]
    BlockTableRepeat {
        /// The sequence whose table was given.
        sequence: usize,
        /// The repeated pool page.
        page: u32,
        /// Its first entry in the table.
        first: usize,
        /// Its second entry.
        second: usize,
    },

    /// An append would write into a page another sequence's block table
    /// also holds (shared pages, e.g. a common prompt prefix, are
    /// read-only; give the writing sequence its own page first).
    #[error(
        "appending to sequence {sequence} would write page {page}, which sequence {other} also holds"
    )]
    SharedPageWrite {
        /// The sequence being appended to.
        sequence: usize,
        /// The page the append would write.
        page: u32,
        /// Another sequence whose table holds it.
        other: usize,
    },

    /// An append or `KvCache::keep_draft` would touch a position whose page
    /// was released (`KvCache::release_pages_before`).
    #[error("{what}: position {position} of sequence {sequence} lies in a released page")]
    ReleasedPosition {
        /// The call.
        what: &'static str,
        /// The sequence.
        sequence: usize,
        /// The first such position.
        position: usize,
    },

    /// A decode call's queries would see keys of released pages: their
    /// window (or its absence) reaches further back than the release.
    #[error(
        "decode: the queries of sequence {sequence} see keys from position {first_visible}, but \
         its pages before position {released_end} include released ones (a window must start at \
         or past it)"
    )]
    ReleasedKeysInView {
        /// The sequence.
        sequence: usize,
        /// The lowest position its queries see (0 without a left window).
        first_visible: usize,
        /// The end of its last released page.
        released_end: usize,
    },

    /// `KvCache::release_pages_before` was given a position past the
    /// sequence's length.
    #[error("release_pages_before: position {position} is past sequence {sequence}'s {len} tokens")]
    ReleasePastLength {
        /// The sequence.
        sequence: usize,
        /// The position given.
        position: usize,
        /// The sequence's length.
        len: usize,
    },

    /// A caller's buffer (or a tensor made from one) belongs to another
    /// device than the `Gpu` it was given to.
    #[error("{tensor} was created on another device than this Gpu's: {message}")]
    ForeignBuffer {
        /// Which buffer or tensor.
        tensor: &'static str,
        /// wgpu's validation message.
        message: String,
    },

    /// An operand was created by (or wrapped for) another `Gpu` whose
    /// device differs from the one the call runs on.
    #[error("{tensor} belongs to another device than the Gpu this call runs on")]
    WrongDevice {
        /// Which operand.
        tensor: &'static str,
    },

    /// A caller's buffer lacks a usage the crate needs.
    #[error("{tensor}: the buffer's usage {usage} lacks {needed}, needed to {why}")]
    BufferUsage {
        /// Which buffer.
        tensor: &'static str,
        /// The usages it has, as `wgpu::BufferUsages`' debug text.
        usage: String,
        /// The missing usage (`STORAGE`, `COPY_SRC` or `COPY_DST`).
        needed: &'static str,
        /// What the crate needs it for.
        why: &'static str,
    },

    /// A caller's buffer whose size is not a whole number of 4-byte words
    /// (storage bindings are arrays of 32-bit words).
    #[error("{tensor}: buffer size {bytes} bytes is not a multiple of 4")]
    BufferSize {
        /// Which buffer.
        tensor: &'static str,
        /// Its size in bytes.
        bytes: u64,
    },

    /// A shape whose element or byte count does not fit the address space.
    #[error("{tensor} shape {shape:?} has more elements than fit in memory")]
    ShapeOverflow {
        /// Which tensor.
        tensor: &'static str,
        /// Its dimensions.
        shape: [usize; 4],
    },

    /// [`crate::Gpu::override_shader_file`] was given a name that is not
    /// one of the crate's shader files.
    #[error("{name:?} is not one of the crate's shader files ({known})")]
    UnknownShaderFile {
        /// The name given.
        name: String,
        /// The names that can be replaced.
        known: String,
    },

    /// Two forward options that the crate does not combine.
    #[error("{what} cannot be combined in one call")]
    UnsupportedCombination {
        /// The options that were combined.
        what: &'static str,
    },

    /// The logsumexp output's dims are not the call's `[batch, heads_q, seq_q]`.
    #[error("lse output is [{got:?}], the call needs [batch, heads_q, seq_q] = {expected:?}")]
    LseShape {
        /// `[batch, heads_q, seq_q]` of the call.
        expected: [usize; 3],
        /// The [`crate::Lse`]'s dims.
        got: [usize; 3],
    },

    /// A linear attention state's dims are not the call's.
    #[error(
        "linear state is {got:?}, the call needs [batch, heads_kv, head_dim, head_dim_v] = \
         {expected:?}"
    )]
    LinearStateShape {
        /// `[batch, heads_kv, head_dim, head_dim_v]` of the call.
        expected: [usize; 4],
        /// The [`crate::LinearState`]'s dims.
        got: [usize; 4],
    },

    /// Linear attention's `eps` must be finite and >= 0.
    #[error("linear attention eps must be finite and >= 0, got {0}")]
    InvalidEps(f32),

    /// A paged cache's page size is not a power of two in [`crate::PAGE_SIZES`].
    #[error("KV cache page size {got} is not a power of two from 16 to 256")]
    PageSize {
        /// The page size given, in tokens.
        got: usize,
    },
    /// A cache sequence's pages cannot hold its tokens (after an append, `set_len` or
    /// `set_block_table`).
    #[error("KV cache sequence {sequence}: {needed} tokens needed, its pages hold {capacity}")]
    CacheCapacity {
        /// The sequence's index in the batch.
        sequence: usize,
        /// Tokens it must hold.
        needed: usize,
        /// Tokens its pages (or a block-table row) can hold.
        capacity: usize,
    },
    /// A block-table entry names a page past the end of the pool.
    #[error(
        "KV cache sequence {sequence}: block table entry {index} names page {page}, the pool has {pool_pages}"
    )]
    BlockTablePage {
        /// The sequence's index in the batch.
        sequence: usize,
        /// The entry's index in its block table.
        index: usize,
        /// The page it names.
        page: u32,
        /// Pages in the pool.
        pool_pages: usize,
    },
    /// A page copy, read or write ([`crate::KvCache::copy_pages`],
    /// [`crate::KvCache::read_pages`], [`crate::KvCache::write_pages`])
    /// naming a page past the pool.
    #[error(
        "KV cache page list entry {index}: {role} page {page} is past the pool's {pool_pages} pages"
    )]
    PagePastPool {
        /// The entry's index in the list.
        index: usize,
        /// `source` or `destination`.
        role: &'static str,
        /// The page it names.
        page: u32,
        /// Pages in the pool.
        pool_pages: usize,
    },
    /// Two entries of one page copy or write writing one page: which of
    /// them would win is not the caller's to guess.
    #[error("KV cache page list entries {first} and {second} both write page {page}")]
    PageWrittenTwice {
        /// The page both write.
        page: u32,
        /// The first entry's index in the list.
        first: usize,
        /// The second entry's index.
        second: usize,
    },
    /// A page copy or write into a page that two sequences hold: shared
    /// pages are read-only (a write would change both sequences' tokens).
    #[error(
        "KV cache page list entry {index} would write page {page}, which sequences {sequence} and {other} both hold"
    )]
    SharedPageOverwrite {
        /// The entry's index in the list.
        index: usize,
        /// The page it would write.
        page: u32,
        /// One sequence whose table holds it.
        sequence: usize,
        /// Another.
        other: usize,
    },
    /// A sequence index past the cache's batch.
    #[error("KV cache has {batch} sequences, sequence {sequence} does not exist")]
    CacheSequence {
        /// The index given.
        sequence: usize,
        /// Sequences in the cache.
        batch: usize,
    },
    /// The rotary dim is odd, zero or larger than the head dim.
    #[error("rotary dim {rotary_dim} must be even, > 0 and at most head dim {head_dim}")]
    RotaryDim {
        /// The rotary dim asked for (the head dim when unset).
        rotary_dim: usize,
        /// The head dim.
        head_dim: usize,
    },
    /// A sequence's RoPE positions (`first` and the tokens after it) pass
    /// `u32::MAX`, the kernels' position type.
    #[error(
        "RoPE positions of sequence {sequence} start at {first} and run {tokens} tokens, past u32::MAX"
    )]
    RopePosition {
        /// The sequence (batch entry).
        sequence: usize,
        /// Its first position (cache length plus offset, or the given start).
        first: u64,
        /// Tokens rotated from there.
        tokens: usize,
    },
    /// The RoPE frequency base is not finite or not above 1 (holds the value given).
    #[error("RoPE base (theta) must be finite and > 1, got {0}")]
    RopeBase(f64),
    /// Decoding with lanes over keys holds every row's whole query and
    /// output in each lane; past a budget the kernel would not compile in
    /// reasonable time (or would spill on a GPU).
    #[error(
        "decoding with lanes over keys holds {rows} query rows x ({head_dim} + {head_dim_v}) = \
         {floats} floats per lane, at most {limit}: use DecodeLanes::HeadDim"
    )]
    KeyLanesState {
        /// Query rows per workgroup (query tokens x GQA group, at most 16).
        rows: u32,
        /// Query/key head dim.
        head_dim: usize,
        /// Value head dim.
        head_dim_v: usize,
        /// `rows * (head_dim + head_dim_v)`.
        floats: u64,
        /// The most a lane may hold.
        limit: u64,
    },

    /// Decoding was asked for 0 key splits (holds the count given).
    #[error("kv_splits must be at least 1, got {0}")]
    KvSplits(usize),
    /// A forward was asked for 0 keys per dispatch (holds the count given).
    #[error("keys_per_dispatch must be at least 1, got {0}")]
    KeysPerDispatch(usize),
    /// A merge was given no partial results.
    #[error("merge: no partial results given")]
    NothingToMerge,
    /// A tensor this call needs packed (contiguous BSHD strides, offset 0) is a strided or offset
    /// view.
    #[error("{tensor} must be a packed (contiguous) tensor for this call")]
    NotPacked {
        /// Which tensor.
        tensor: &'static str,
    },
    /// A kernel would run more loop iterations per invocation than the adapter's cap
    /// ([`crate::GpuInfo::loop_budget`], llvmpipe), which would silently truncate the result.
    #[error(
        "{kernel} over {keys} keys would run {trips} loop iterations per invocation; this adapter \
         stops shaders after {budget} (llvmpipe), which would silently truncate the result. Use \
         fewer keys per call (split the keys and merge the parts with Gpu::merge) or \
         the default kernel tier"
    )]
    LoopBudget {
        /// The kernel's label.
        kernel: String,
        /// Keys one invocation would visit.
        keys: u64,
        /// Loop iterations that would take.
        trips: u64,
        /// Iterations the adapter allows per invocation.
        budget: u64,
    },
    /// Merging this many partial results (split-KV decoding's splits times
    /// the cache's buffers, or [`crate::Gpu::merge`]'s parts) would run more
    /// loop iterations per invocation than the adapter's cap
    /// ([`crate::GpuInfo::loop_budget`], llvmpipe), which would silently
    /// drop the last parts.
    #[error(
        "merging {parts} partial results would run {trips} loop iterations per invocation; this \
         adapter stops shaders after {budget} (llvmpipe), which would silently drop the last \
         parts. Use fewer key splits (DecodeOptions::kv_splits), or merge in stages"
    )]
    MergeLoopBudget {
        /// Partial results to merge.
        parts: u64,
        /// Loop iterations that would take.
        trips: u64,
        /// Iterations the adapter allows per invocation.
        budget: u64,
    },
    /// A varlen offset array (`cu_seqlens_q` or `cu_seqlens_k`) is empty, does not start at 0,
    /// decreases, or does not end at the packed token count.
    #[error("{name}: {problem} (entry {index} is {value}, total {total})")]
    CuSeqlens {
        /// Which array.
        name: &'static str,
        /// The offending entry's index.
        index: usize,
        /// That entry's value (0 if the array is empty).
        value: usize,
        /// Tokens in the packed tensor (what the last entry must be).
        total: usize,
        /// Which rule the entry breaks.
        problem: &'static str,
    },
    /// A padded batch's valid length exceeds its tensor's sequence length.
    #[error("{name}: sequence {index} has valid length {len}, its tensor holds {max}")]
    ValidLength {
        /// Which lengths (`"valid kv lengths"` or `"valid q lengths"`).
        name: &'static str,
        /// The sequence's index in the batch.
        index: usize,
        /// Its valid length.
        len: usize,
        /// The tensor's sequence length (`seq_kv` or `seq_q`).
        max: usize,
    },
    /// A mask does not broadcast to the call's `[batch, heads_q, seq_q, seq_kv]`.
    #[error(
        "mask of dims {dims:?} does not broadcast to [batch, heads_q, seq_q, seq_kv] = {shape:?} (its batch and heads must be 1 or equal)"
    )]
    MaskShape {
        /// The mask's dims.
        dims: [usize; 4],
        /// The call's `[batch, heads_q, seq_q, seq_kv]`.
        shape: [usize; 4],
    },
    /// A bias mask holds NaN or `+inf` (only finite values and `-inf` are allowed).
    #[error("mask value {value} at {index}: a bias must be finite or -inf")]
    MaskValue {
        /// Flat index of the first such value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A block size is 0, or a block layout's dims are not the block counts the lengths need.
    #[error(
        "block layout of dims {dims:?} with {block_q}x{block_k} blocks; the sequence needs {expected:?}"
    )]
    BlockLayout {
        /// The layout's dims.
        dims: [usize; 4],
        /// `[batch, heads, ceil(seq_q / block_q), ceil(seq_kv / block_k)]`.
        expected: [usize; 4],
        /// Queries per block.
        block_q: usize,
        /// Keys per block.
        block_k: usize,
    },
    /// wgpu reported a validation error while the crate recorded or submitted work.
    #[error("GPU validation error in {context}: {message}")]
    GpuValidation {
        /// What the crate was doing.
        context: &'static str,
        /// wgpu's message.
        message: String,
    },

    /// wgpu reported the device out of memory: creating a buffer (nothing
    /// was created; the device stays usable: free buffers, e.g.
    /// [`crate::Gpu::release_scratch`], or use smaller calls, and retry), or
    /// while recording or submitting work.
    #[error("{what}: the device is out of memory{}", for_buffer(.bytes))]
    OutOfMemory {
        /// The buffer's purpose, or the work's.
        what: &'static str,
        /// The buffer's size in bytes (`None`: not a buffer's creation).
        bytes: Option<u64>,
    },

    /// The device is lost (a driver reset or watchdog timeout, the device
    /// destroyed): no call on this `Gpu` can run again; open a new one.
    /// Reported for devices the crate requested itself ([`crate::Gpu::new`],
    /// [`crate::Gpu::request`], [`crate::Gpu::from_adapter`]), and for a
    /// device from [`crate::Gpu::from_device`] whose lost callback calls
    /// [`crate::Gpu::device_lost_notifier`]'s function; without that, calls
    /// on such a device that record work or read back fail with
    /// [`Error::GpuValidation`] instead.
    #[error("the GPU device was lost ({reason}); open a new Gpu")]
    DeviceLost {
        /// wgpu's reason and message.
        reason: String,
    },

    /// A blocking call in a browser, whose GPU answers only once control
    /// returns to its event loop: await the async form instead
    /// ([`crate::Gpu::request`], [`crate::Tensor::to_f32_vec_async`],
    /// [`crate::Lse::to_vec_async`]).
    #[error(
        "a browser cannot block on {what}: await its async form (Gpu::request, \
         Tensor::to_f32_vec_async, Lse::to_vec_async)"
    )]
    BlockingInBrowser {
        /// What was to be waited for.
        what: &'static str,
    },

    /// Waiting for the device, or mapping a buffer to read it back, failed (holds wgpu's message).
    #[error("reading a buffer back from the GPU failed: {0}")]
    Readback(String),

    /// A kernel's WGSL could not be generated from its template (an unknown
    /// `// #if` name, a malformed block, a loop the specialization unrolls
    /// written in a form the unroller does not expand): a bug in the
    /// crate's shaders, reported instead of compiling the wrong variant.
    #[error("generating the WGSL of {kernel} failed: {reason}")]
    ShaderSource {
        /// The kernel's label.
        kernel: String,
        /// What went wrong.
        reason: String,
    },
}

/// The out-of-memory message's tail: the buffer's size, when a buffer's.
fn for_buffer(bytes: &Option<u64>) -> String {
    bytes.map_or_else(String::new, |n| format!(" for a buffer of {n} bytes"))
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
