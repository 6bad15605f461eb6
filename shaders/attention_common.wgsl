// Declarations shared by the attention kernels (flash_attention.wgsl and
// naive_attention.wgsl): the parameter block, bindings 0-6 and the score
// epilogue. src/shaders/ prepends this file to each of them, after the
// generated constants.

// Twin of `TensorStrides` in src/params.rs. Units are vec4 (4 elements);
// the head_dim stride is always 1 element.
struct TensorStrides {
    batch: u32,
    seq: u32,
    head: u32,
    offset: u32,
}

// Twin of `AttentionParams` in src/params.rs: same field order, same sizes.
struct Params {
    batch: u32,
    seq_q: u32,
    seq_kv: u32,
    heads_q: u32,
    heads_kv: u32,
    // Bit set of FLAG_* below.
    flags: u32,
    // Softmax scale. Scores and the running max stay in natural units
    // (log2(e) is applied to differences only, so no finite score
    // overflows on the way to exp2).
    score_scale: f32,
    softcap: f32,
    // Window sides in keys; only read when the matching FLAG_ bit is set.
    window_left: u32,
    window_right: u32,
    // Stride between batch entries of the ALiBi slope table (0 = shared).
    alibi_batch_stride: u32,
    // Naive kernels only: first (batch, query head) pair of this dispatch,
    // counted as batch * heads_q + head, when the score matrix is built in
    // chunks. The flash kernel covers every pair in one dispatch.
    unit_base: u32,
    // Where the sinks start in `head_table` (with FLAG_SINKS).
    sink_offset: u32,
    // Pipelines specialized with DROPOUT: a (query, key) probability is
    // kept when its hash (dropout_kept) is at least the threshold; the
    // seed's words. Other pipelines never read them.
    dropout_threshold: u32,
    dropout_seed_lo: u32,
    dropout_seed_hi: u32,
    q: TensorStrides,
    k: TensorStrides,
    v: TensorStrides,
    o: TensorStrides,
}

const FLAG_WINDOW_LEFT: u32 = 1u;
const FLAG_WINDOW_RIGHT: u32 = 2u;
const FLAG_SOFTCAP: u32 = 4u;
const FLAG_ALIBI: u32 = 8u;
const FLAG_WRITE_LSE: u32 = 16u;
const FLAG_SINKS: u32 = 32u;
// The forward reads its sequences from a table (padded and variable-length
// batches in one dispatch; flash_attention.wgsl).
const FLAG_SEQUENCES: u32 = 64u;

const LOG2_E: f32 = 1.4426950408889634;
const LN_2: f32 = 0.6931471805599453;
// The lowest finite f32: the running max before any key, and the score
// of a hidden key. Every finite score is >= it, so the max never passes
// over a real score, and `MIN_SCORE - MIN_SCORE` is 0, never NaN.
const MIN_SCORE: f32 = -3.4028234663852886e38;
// Bits of -inf, the additive mask value that hides a key.
const NEG_INF_BITS: u32 = 0xff800000u;
// The infinities as values: read from private variables, because WGSL
// makes a constant expression that evaluates to an infinity a shader
// creation error (browsers' compilers enforce it; naga does not), and
// `bitcast<f32>(NEG_INF_BITS)` is one.
var<private> positive_infinity_bits: u32 = 0x7f800000u;
var<private> negative_infinity_bits: u32 = NEG_INF_BITS;

fn positive_infinity() -> f32 {
    return bitcast<f32>(positive_infinity_bits);
}

fn negative_infinity() -> f32 {
    return bitcast<f32>(negative_infinity_bits);
}

@group(0) @binding(0) var<uniform> p: Params;
// Q, K, V and O move four elements at a time (indices are in those units)
// whatever their storage type: f32 as vec4<f32>; f16 and bf16 as vec2<u32>,
// four 16-bit values packed first-element-low, converted with core WGSL
// only, so every adapter runs them without SHADER_F16. HALF_STORAGE makes
// Q and O 16-bit, KV_HALF K and V (the forward sets both; decoding over a
// half KV cache only KV_HALF); KV_BYTES (decoding only) makes K and V words
// of four int8 or fp8 bytes that flash_decode.wgsl dequantizes. Arithmetic
// and softmax statistics are f32 in every case.
// #if HALF_STORAGE
@group(0) @binding(1) var<storage, read> q_buf: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec2<u32>>;
// #else
// Decoding: queries and output of a type of their own (half_codec.wgsl).
// #if Q_HALF
@group(0) @binding(1) var<storage, read> q_buf: array<vec2<u32>>;
// #else
@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f32>>;
// #endif
// #if O_HALF
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec2<u32>>;
// #else
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec4<f32>>;
// #endif
// #endif
// #if KV_BYTES
// #if KEY_LANES
// Four words per load: decoding with lanes over keys reads an int8 vector
// as the 16-byte blocks that cover it (flash_decode.wgsl).
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<u32>>;
// #else
@group(0) @binding(2) var<storage, read> k_buf: array<u32>;
@group(0) @binding(3) var<storage, read> v_buf: array<u32>;
// #endif
// #else
// #if KV_HALF
// #if KEY_LANES
// Decoding with lanes over keys reads eight 16-bit values per load
// (llvmpipe pays per load, not per byte; flash_decode.wgsl).
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<u32>>;
// #else
@group(0) @binding(2) var<storage, read> k_buf: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec2<u32>>;
// #endif
// #else
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f32>>;
// #endif
// #endif
// Logsumexp, [batch, heads_q, seq_q], natural log.
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;
// Per-head values: ALiBi slopes from 0 ([heads_q] or [batch, heads_q]),
// attention sinks ([heads_q]) from p.sink_offset.
@group(0) @binding(6) var<storage, read> head_table: array<f32>;


fn has_flag(bit: u32) -> bool {
    return (p.flags & bit) != 0u;
}

// Scores of one query row against four keys, from raw dot products to
// logits (natural units). `key_pos` are the keys' positions, `row_pos` the
// query's position on the key axis (bottom-right alignment).
fn finish_scores(dots: vec4<f32>, row_pos: i32, key_pos: vec4<i32>, alibi_slope: f32) -> vec4<f32> {
    var s = dots * p.score_scale;
    if (has_flag(FLAG_SOFTCAP)) {
        s = p.softcap * tanh(s / p.softcap);
    }
    if (has_flag(FLAG_ALIBI)) {
        s -= alibi_slope * vec4<f32>(abs(key_pos - vec4<i32>(row_pos)));
    }
    return s;
}

fn alibi_slope_of(batch: u32, head_q: u32) -> f32 {
    if (has_flag(FLAG_ALIBI)) {
        return head_table[batch * p.alibi_batch_stride + head_q];
    }
    return 0.0;
}

// A row's online softmax before its first key: (running max, running sum).
// A sink is a key with no value whose score is the sink itself, so it
// starts the row: max = sink, sum = exp(sink - sink) = 1.
fn softmax_start(head_q: u32, with_sink: bool) -> vec2<f32> {
    if (with_sink && has_flag(FLAG_SINKS)) {
        return vec2<f32>(head_table[p.sink_offset + head_q], 1.0);
    }
    return vec2<f32>(MIN_SCORE, 0.0);
}

// exp(x) for x <= 0 (a score minus the running max) as one exp2.
fn exp_shifted(x: vec4<f32>) -> vec4<f32> {
    return exp2(x * LOG2_E);
}

// Logsumexp of a finished row, natural log; +inf for a row that saw no key
// (l == 0), which every reader takes as "no keys".
fn row_lse(m: f32, l: f32) -> f32 {
    if (l > 0.0) {
        return m + log2(l) * LN_2;
    }
    return positive_infinity();
}

// Keys a query at key-axis position `row_pos` may see among `seq_kv`, as
// an inclusive range (lo, hi); empty when lo > hi. Causal calls arrive as a
// right window of 0 (src/config.rs, `effective_window`).
fn visible_keys(row_pos: i32, seq_kv: u32) -> vec2<i32> {
    var lo = 0;
    var hi = i32(seq_kv) - 1;
    if (has_flag(FLAG_WINDOW_LEFT)) {
        lo = max(lo, row_pos - i32(p.window_left));
    }
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        hi = min(hi, row_pos + i32(p.window_right));
    }
    return vec2<i32>(lo, hi);
}

// #if DROPOUT
// Attention dropout (src/dropout.rs), compiled into the pipelines of calls
// that drop (a specialization, so that the others' unrolled loops carry no
// dropout branch: llvmpipe's compile time grows with them). Twin of `mix`
// in src/dropout.rs: the PCG output permutation of one LCG step (Jarzynski
// and Olano 2020), on four words at once; integer arithmetic wraps, as
// there.
fn dropout_mix(x: vec4<u32>) -> vec4<u32> {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> vec4<u32>(28u)) + 4u)) ^ state) * 277803737u;
    return (word >> vec4<u32>(22u)) ^ word;
}

// Twin of `row_state` in src/dropout.rs: the hash state of query row `row`
// (counted from its sequence's first) of query head `head` of sequence
// `sequence` (the batch entry; a packed batch's sequence index; in the
// kernels, the unit of workgroups along y), shared by the row's keys.
fn dropout_row_state(sequence: u32, head: u32, row: u32) -> u32 {
    var x = dropout_mix(vec4<u32>(p.dropout_seed_lo)).x;
    x = dropout_mix(vec4<u32>(x ^ p.dropout_seed_hi)).x;
    x = dropout_mix(vec4<u32>(x ^ sequence)).x;
    x = dropout_mix(vec4<u32>(x ^ head)).x;
    return dropout_mix(vec4<u32>(x ^ row)).x;
}

// Which of `keys` (counted from the sequence's first key) the row whose
// state is `row_state` keeps: 1 kept, 0 dropped.
fn dropout_kept(row_state: u32, keys: vec4<i32>) -> vec4<f32> {
    let kept = dropout_mix(vec4<u32>(row_state) ^ vec4<u32>(keys)) >= vec4<u32>(p.dropout_threshold);
    return select(vec4<f32>(0.0), vec4<f32>(1.0), kept);
}

// What dropout multiplies the probability of one key by: 1 / (1 - p) if
// the row keeps it, else 0.
fn dropout_scale_of(row_state: u32, key: i32) -> f32 {
    return dropout_kept(row_state, vec4<i32>(key)).x * dropout_keep_scale();
}
// #endif

// 1 / (1 - p), the scale of the kept probabilities; 1 without dropout.
fn dropout_keep_scale() -> f32 {
// #if DROPOUT
    // 2^-32: the threshold is p in those units.
    return 1.0 / (1.0 - f32(p.dropout_threshold) * 2.3283064365386963e-10);
// #else
    return 1.0;
// #endif
}

// a . b + c as four chained FMAs: 4 instructions where `dot(a, b) + c` may
// take 5 (measured ~5 % faster on lavapipe).
fn fma_dot(a: vec4<f32>, b: vec4<f32>, c: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, c))));
}

// #if KV_HALF
// The storage type's conversions (half_codec.wgsl).
// #if BF16_STORAGE
fn unpack4(x: vec2<u32>) -> vec4<f32> {
    return bf16x4_widen(x);
}

fn pack4(v: vec4<f32>) -> vec2<u32> {
    return bf16x4_narrow(v);
}
// #else
fn unpack4(x: vec2<u32>) -> vec4<f32> {
    return f16x4_widen(x);
}

fn pack4(v: vec4<f32>) -> vec2<u32> {
    return f16x4_narrow(v);
}
// #endif

// #if KEY_LANES
// Elements 8e..8e+7 of the K (or V) vector whose first vec4 of four
// values is `row` (even: head dims are multiples of 8).
fn load_k8(row: u32, e: u32) -> mat2x4<f32> {
    let w = k_buf[(row >> 1u) + e];
    return mat2x4<f32>(unpack4(w.xy), unpack4(w.zw));
}

fn load_v8(row: u32, e: u32) -> mat2x4<f32> {
    let w = v_buf[(row >> 1u) + e];
    return mat2x4<f32>(unpack4(w.xy), unpack4(w.zw));
}
// #else
fn load_k(i: u32) -> vec4<f32> {
    return unpack4(k_buf[i]);
}

fn load_v(i: u32) -> vec4<f32> {
    return unpack4(v_buf[i]);
}
// #endif
// #else
// #if KV_BYTES
// #else
// #if KEY_LANES
fn load_k8(row: u32, e: u32) -> mat2x4<f32> {
    return mat2x4<f32>(k_buf[row + 2u * e], k_buf[row + 2u * e + 1u]);
}

fn load_v8(row: u32, e: u32) -> mat2x4<f32> {
    return mat2x4<f32>(v_buf[row + 2u * e], v_buf[row + 2u * e + 1u]);
}
// #else
fn load_k(i: u32) -> vec4<f32> {
    return k_buf[i];
}

fn load_v(i: u32) -> vec4<f32> {
    return v_buf[i];
}
// #endif
// #endif
// #endif

// #if HALF_STORAGE
fn load_q(i: u32) -> vec4<f32> {
    return unpack4(q_buf[i]);
}

fn store_o(i: u32, value: vec4<f32>) {
    o_buf[i] = pack4(value);
}
// #else
// #if Q_HALF
fn load_q(i: u32) -> vec4<f32> {
    return qo_widen4(q_buf[i]);
}
// #else
fn load_q(i: u32) -> vec4<f32> {
    return q_buf[i];
}
// #endif

// #if O_HALF
fn store_o(i: u32, value: vec4<f32>) {
    o_buf[i] = qo_narrow4(value);
}
// #else
fn store_o(i: u32, value: vec4<f32>) {
    o_buf[i] = value;
}
// #endif
// #endif

// The row tile (forward) or key or query block (backward) of workgroup
// `x` of `blocks` along x: blocks from both ends in turn (0, n-1, 1, n-2,
// ...), so that any run of consecutive workgroups holds as much of a
// causal mask's work (its long late rows) as any other. llvmpipe hands
// each thread one contiguous range of the grid: in order, one causal head
// on two threads split its work 1 : 3 (the paired order ran it 1.45-1.8x
// faster).
fn paired_block(x: u32, blocks: u32) -> u32 {
    let k = x / 2u;
    return select(blocks - 1u - k, k, (x & 1u) == 0u);
}

// #if SUBGROUP_KV
// #if KV_BYTES
// #else
// The vec4 a lane holds in slab slot `j / WG_SIZE` (j = lane + WG_SIZE * slot):
// element j of the 4 * D4 vec4s of K (4 * DV4 of V) for the four keys at
// offset `c` of the tile starting at key `tile_start`, which holds `n_keys`
// keys; zero past its end. `base` is the (batch, head) offset of K or V.
fn slab_element(from_v: bool, base: u32, tile_start: u32, c: u32, n_keys: u32, j: u32) -> vec4<f32> {
    // `from_v` is a constant at every call, so these fold.
    let width = select(D4, DV4, from_v);
    let slots = select(SLOTS, SLOTS_V, from_v);
    let key = c + j / width;
    // The first test is a constant: false unless WG_SIZE does not divide
    // 4 * width and the last slot has lanes past the four keys.
    if ((slots * WG_SIZE > 4u * width && j >= 4u * width) || key >= n_keys) {
        return vec4<f32>(0.0);
    }
    if (from_v) {
        return load_v(base + (tile_start + key) * p.v.seq + j % width);
    }
    return load_k(base + (tile_start + key) * p.k.seq + j % width);
}
// #endif
// #endif
