// Split-KV decoding over a KV cache (flash-decoding), f32.
//
// One workgroup owns a tile of the query rows of one (sequence, KV head)
// pair (query tokens of the sequence, each with all `group` query heads
// that read this KV head), so each K/V tile it loads serves the whole GQA
// group, and one split: a range of `split_keys` cache positions. The grid
// is (split, row tile, KV head): the row tiles of every sequence with
// query tokens are numbered one after another (`DecodeSequence.tile_first`),
// so a call whose sequences have different numbers of query tokens
// launches no idle workgroups; the KV head is the slowest axis because
// llvmpipe hands each thread one contiguous range of the grid, and every
// KV head has the same work. It writes that split's normalised
// partial output and logsumexp to slot `slot_base + split`;
// combine_partials.wgsl merges the slots exactly. With one slot in all the
// kernel writes the final output directly (o_slot = 0).
//
// The cache is paged: logical position `pos` of sequence `b` lives in page
// block_table[b * pages_per_seq + (pos >> page_shift)], row
// pos & (page_size - 1). A contiguous cache is the identity table. K and V
// pages are spread over several buffers ("segments") when one binding
// cannot hold them; one dispatch per segment binds that segment's K and V
// and skips keys whose page lives elsewhere.
//
// Bindings 0-6 are attention_common.wgsl's: p.q / p.o describe the query
// and output views, p.k = p.v = [page row, heads_kv, vector] inside a
// segment, in the storage type's vec4 units (a vector is D4 of them, plus
// the scale word for int8). A latent cache binds its K buffer as V too:
// a value is the first DV4 vec4s of its key, and an int8 value's scale is
// its key's (after D4 words in both cases);
// p.seq_kv is unused (each sequence has its own length in `sequences`);
// p.seq_q is the logsumexp's row stride (see DecodeSequence).
//
// Two variants (src/decode.rs picks): SUBGROUP_KV below, and the portable
// one after `// #else`, whose generated constants are D4, BLOCK_N, WG_SIZE
// and ROWS (rows per invocation; ROWS * WG_SIZE rows per workgroup,
// `row_tiles` workgroups cover more).

// Twin of `DecodeParams` in src/params.rs.
struct DecodeParams {
    // Query heads per KV head.
    group: u32,
    // Entries of `sequences`.
    sequence_count: u32,
    splits: u32,
    // Cache positions per split.
    split_keys: u32,
    // log2 of the page size in tokens.
    page_shift: u32,
    // Width of a block-table row.
    pages_per_seq: u32,
    // Pages held by this dispatch's segment: [segment_first_page,
    // segment_first_page + segment_pages).
    segment_first_page: u32,
    segment_pages: u32,
    // First output slot of this dispatch (segment * splits).
    slot_base: u32,
    // Stride between output slots in vec4s (0: the final output) and in
    // logsumexp floats.
    o_slot: u32,
    lse_slot: u32,
    _pad: u32,
}

// Twin of `DecodeSequence` in src/params.rs: one sequence (batch entry) of
// the call, its cache length and where its query tokens sit. Every
// sequence of a call may have its own number of query tokens (0: it sits
// the call out); they are the last `q_count` positions of its keys.
struct DecodeSequence {
    // Current length in the cache, its query tokens included.
    len: u32,
    // Its query tokens are rows q_first.. q_first + q_count - 1 of Q and O
    // along seq (inside batch entry `batch`, or of one packed entry whose
    // batch stride is 0).
    q_first: u32,
    q_count: u32,
    // Logsumexp index of its token 0, head 0; head h, token t is at
    // lse_first + h * p.seq_q + t.
    lse_first: u32,
    // Its first row tile among the call's (tiles are numbered sequence by
    // sequence; one without query tokens has none, and the next one's
    // tile_first).
    tile_first: u32,
}

@group(0) @binding(7) var<uniform> dp: DecodeParams;
@group(0) @binding(8) var<storage, read> sequences: array<DecodeSequence>;
@group(0) @binding(9) var<storage, read> block_table: array<u32>;

// The sequence and first query row of the call's row tile `tile`, each
// tile `tile_rows` rows: the last sequence whose first tile is at or
// before it (sequences without query tokens share the next one's
// tile_first and so are never picked). A binary search by halving steps
// (a loop form the crate proves finite, src/shaders/loop_audit.rs).
fn row_tile(tile: u32, tile_rows: u32) -> vec2<u32> {
    var found = 0u;
    for (var step = 1u << firstLeadingBit(dp.sequence_count); step > 0u; step /= 2u) {
        let next = found + step;
        if (next < dp.sequence_count && sequences[next].tile_first <= tile) {
            found = next;
        }
    }
    return vec2<u32>(found, (tile - sequences[found].tile_first) * tile_rows);
}

// Index of the first vec4 of cache position `pos` in this segment, or -1
// when its page lives in another segment.
fn cache_row(batch: u32, pos: u32, head_kv: u32) -> i32 {
    let page = block_table[batch * dp.pages_per_seq + (pos >> dp.page_shift)];
    if (page < dp.segment_first_page || page >= dp.segment_first_page + dp.segment_pages) {
        return -1;
    }
    let row = ((page - dp.segment_first_page) << dp.page_shift) | (pos & ((1u << dp.page_shift) - 1u));
    return i32(row * p.k.seq + head_kv * p.k.head);
}


// vec4 `j` of the K (or V) head vector that starts at `row`, widened to
// f32, and the vector's scale (`vector_scales`: K's, V's). A vector of
// bytes (KV_BYTES) is D4 words of four int8 (or, KV_FP8, four E4M3 bytes),
// first element in the low byte, then its f32 scale: the kernels widen the
// bytes here and apply the scales once per key (to its dot products for K,
// to its weights for V), not per element; the `int8_` helpers below serve
// both byte types. Every other type has scale 1 (folded away) and is read
// by attention_common.wgsl's load_k / load_v.
// #if KV_BYTES
fn widen_bytes(word: u32) -> vec4<f32> {
// #if KV_FP8
    return fp8x4_widen(word);
// #else
    // Each byte moved to the top and shifted back down, sign-extending.
    let bytes = vec4<i32>(bitcast<i32>(word << 24u), bitcast<i32>(word << 16u), bitcast<i32>(word << 8u),
        bitcast<i32>(word)) >> vec4<u32>(24u);
    return vec4<f32>(bytes);
// #endif
}

// #if KEY_LANES
// An int8 vector is D4 + 1 words (with its scale), so vectors start at any
// word: lanes over keys read one as the W4 (KW4 for values) 16-byte blocks
// from the one holding its first word (9 loads instead of 32 at d = 128;
// llvmpipe pays per load), then pick each word by the vector's offset in
// its first block (`shift`). A last block past the buffer's end reads as
// zeros (WebGPU's bounds rule) and is never picked.
fn stage_int8_blocks(rows4: vec4<u32>, k_blocks: ptr<function, array<vec4<u32>, 4 * W4>>,
    v_blocks: ptr<function, array<vec4<u32>, 4 * VW4>>) {
    let first = rows4 >> vec4<u32>(2u);
    for (var w = 0u; w < W4; w++) {
        (*k_blocks)[w] = k_buf[first.x + w];
        (*k_blocks)[W4 + w] = k_buf[first.y + w];
        (*k_blocks)[2u * W4 + w] = k_buf[first.z + w];
        (*k_blocks)[3u * W4 + w] = k_buf[first.w + w];
    }
    for (var w = 0u; w < VW4; w++) {
        (*v_blocks)[w] = v_buf[first.x + w];
        (*v_blocks)[VW4 + w] = v_buf[first.y + w];
        (*v_blocks)[2u * VW4 + w] = v_buf[first.z + w];
        (*v_blocks)[3u * VW4 + w] = v_buf[first.w + w];
    }
}

// Word `j` of a vector whose blocks start at `blocks[0]`, `shift` words
// into it. Every index is a constant once the callers' loops are unrolled.
fn block_word(blocks: array<vec4<u32>, 3>, j: u32, shift: u32) -> u32 {
    let at = vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u);
    let w0 = blocks[at.x >> 2u][at.x & 3u];
    let w1 = blocks[at.y >> 2u][at.y & 3u];
    let w2 = blocks[at.z >> 2u][at.z & 3u];
    let w3 = blocks[at.w >> 2u][at.w & 3u];
    return select(select(w0, w1, shift == 1u), select(w2, w3, shift == 3u), shift >= 2u);
}

// Elements 8e..8e+7 (words 2e, 2e+1) of key `key`'s K vector.
fn int8_k8(k_blocks: ptr<function, array<vec4<u32>, 4 * W4>>, key: u32, shift: u32, e: u32) -> mat2x4<f32> {
    // The three blocks that can hold words 2e..2e+4.
    let b = key * W4 + (2u * e) / 4u;
    let blocks = array<vec4<u32>, 3>((*k_blocks)[b], (*k_blocks)[min(b + 1u, 4u * W4 - 1u)],
        (*k_blocks)[min(b + 2u, 4u * W4 - 1u)]);
    let j = (2u * e) % 4u;
    return mat2x4<f32>(widen_bytes(block_word(blocks, j, shift)), widen_bytes(block_word(blocks, j + 1u, shift)));
}

fn int8_v8(v_blocks: ptr<function, array<vec4<u32>, 4 * VW4>>, key: u32, shift: u32, e: u32) -> mat2x4<f32> {
    let b = key * VW4 + (2u * e) / 4u;
    let blocks = array<vec4<u32>, 3>((*v_blocks)[b], (*v_blocks)[min(b + 1u, 4u * VW4 - 1u)],
        (*v_blocks)[min(b + 2u, 4u * VW4 - 1u)]);
    let j = (2u * e) % 4u;
    return mat2x4<f32>(widen_bytes(block_word(blocks, j, shift)), widen_bytes(block_word(blocks, j + 1u, shift)));
}

// The K and V scales of the vector at word `row`: word D4 of each.
fn vector_scales(row: i32) -> vec2<f32> {
    if (row < 0) {
        return vec2<f32>(0.0);
    }
    let i = u32(row) + D4;
    return vec2<f32>(bitcast<f32>(k_buf[i >> 2u][i & 3u]), bitcast<f32>(v_buf[i >> 2u][i & 3u]));
}
// #else
fn cache_k(row: u32, j: u32) -> vec4<f32> {
    return widen_bytes(k_buf[row + j]);
}

fn cache_v(row: u32, j: u32) -> vec4<f32> {
    return widen_bytes(v_buf[row + j]);
}

fn vector_scales(row: i32) -> vec2<f32> {
    if (row < 0) {
        return vec2<f32>(0.0);
    }
    return vec2<f32>(bitcast<f32>(k_buf[u32(row) + D4]), bitcast<f32>(v_buf[u32(row) + D4]));
}
// #endif
// #else
// #if KEY_LANES
// Elements 8e..8e+7 of the vector at `row` (head dims are multiples of 8).
fn cache_k8(row: u32, e: u32) -> mat2x4<f32> {
    return load_k8(row, e);
}

fn cache_v8(row: u32, e: u32) -> mat2x4<f32> {
    return load_v8(row, e);
}
// #else
fn cache_k(row: u32, j: u32) -> vec4<f32> {
    return load_k(row + j);
}

fn cache_v(row: u32, j: u32) -> vec4<f32> {
    return load_v(row + j);
}
// #endif

fn vector_scales(row: i32) -> vec2<f32> {
    return vec2<f32>(1.0);
}
// #endif

// The K scales (xy of each) and V scales of four keys, as two vec4s.
fn key_scales(rows4: vec4<i32>) -> mat2x4<f32> {
    let a = vector_scales(rows4.x);
    let b = vector_scales(rows4.y);
    let c = vector_scales(rows4.z);
    let d = vector_scales(rows4.w);
    return mat2x4<f32>(vec4<f32>(a.x, b.x, c.x, d.x), vec4<f32>(a.y, b.y, c.y, d.y));
}

// One query row of a (batch, KV head) workgroup: its query token (counted
// in the sequence, and as a row of Q and O) and head, its logsumexp index,
// its position on the key axis, the keys of this split it may see
// (lo > hi: none) and its ALiBi slope.
struct DecodeRow {
    query: u32,
    token: u32,
    head_q: u32,
    lse: u32,
    pos: i32,
    lo: i32,
    hi: i32,
    slope: f32,
}

fn decode_row(row: u32, batch: u32, head_kv: u32, s: DecodeSequence, split: u32) -> DecodeRow {
    var r: DecodeRow;
    r.query = row / dp.group;
    r.token = s.q_first + r.query;
    r.head_q = head_kv * dp.group + row % dp.group;
    r.lse = s.lse_first + r.head_q * p.seq_q + r.query;
    // Bottom-right alignment: the last query sits at the last key.
    r.pos = i32(r.query) + i32(s.len) - i32(s.q_count);
    r.lo = i32(split * dp.split_keys);
    r.hi = min(i32((split + 1u) * dp.split_keys), i32(s.len)) - 1;
    if (has_flag(FLAG_WINDOW_LEFT)) {
        r.lo = max(r.lo, r.pos - i32(p.window_left));
    }
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        r.hi = min(r.hi, r.pos + i32(p.window_right));
    }
    r.slope = alibi_slope_of(batch, r.head_q);
    return r;
}

// #if TREE_MASK
// Speculative decoding's token tree (DecodeOptions::token_trees): whether
// query token `query` of sequence `batch` (`s`) may see cache position
// `pos`. The sequence's query tokens are its last q_count positions (the
// draft): draft key j is seen by token j and its descendants only; every
// key before the draft is seen by all (the other masks still apply). The
// trees follow the block table's sequence_count rows in its buffer: one
// word per sequence saying where its bits start (counted from there),
// then the bits, one row of ceil(q_count / 32) words per query token, bit
// j % 32 of word j / 32 set where the token sees draft key j
// (src/token_tree.rs writes them). A branch, not a select: keys before
// the draft, nearly all of them, read no word.
fn tree_sees(batch: u32, s: DecodeSequence, query: u32, pos: i32) -> bool {
    let draft = pos - (i32(s.len) - i32(s.q_count));
    var seen = true;
    if (draft >= 0 && draft < i32(s.q_count)) {
        let trees = dp.sequence_count * dp.pages_per_seq;
        let row = trees + block_table[trees + batch] + query * ((s.q_count + 31u) / 32u);
        seen = ((block_table[row + u32(draft) / 32u] >> (u32(draft) % 32u)) & 1u) != 0u;
    }
    return seen;
}

// `tree_sees` of four positions.
fn tree_sees4(batch: u32, s: DecodeSequence, query: u32, pos: vec4<i32>) -> vec4<bool> {
    return vec4<bool>(tree_sees(batch, s, query, pos.x), tree_sees(batch, s, query, pos.y),
        tree_sees(batch, s, query, pos.z), tree_sees(batch, s, query, pos.w));
}
// #endif

// One online-softmax step of a row over four keys: the new running max and
// sum, the factor that rescales the accumulator, and the keys' weights.
struct SoftmaxStep {
    m: f32,
    l: f32,
    correction: f32,
    probs: vec4<f32>,
}

fn softmax_step(scores: vec4<f32>, visible: vec4<bool>, m: f32, l: f32) -> SoftmaxStep {
    let s = select(vec4<f32>(MIN_SCORE), scores, visible);
    var step: SoftmaxStep;
    step.m = max(m, max(max(s.x, s.y), max(s.z, s.w)));
    step.correction = exp2((m - step.m) * LOG2_E);
    step.probs = select(vec4<f32>(0.0), exp_shifted(s - vec4<f32>(step.m)), visible);
    step.l = l * step.correction + (step.probs.x + step.probs.y) + (step.probs.z + step.probs.w);
    return step;
}

// (1 / l, logsumexp) of a finished row; a row that saw no key of this
// split (and no sink) has l == 0: zeros and lse = +inf, which the merge
// reads as "no keys here".
fn row_result(m: f32, l: f32) -> vec2<f32> {
    return vec2<f32>(select(0.0, 1.0 / l, l > 0.0), row_lse(m, l));
}

// The online softmax's start for `row` of output slot `slot`: the sink
// joins the first slot only, so the merge counts it once.
fn decode_start(row: DecodeRow, slot: u32) -> vec2<f32> {
    return softmax_start(row.head_q, slot == 0u);
}

// Where a row's output starts in output slot `slot`; stores its lse there
// when `store_lse` (one invocation per row does).
fn output_base(slot: u32, batch: u32, row: DecodeRow, lse: f32, store_lse: bool) -> u32 {
    if (store_lse && has_flag(FLAG_WRITE_LSE)) {
        lse_buf[slot * dp.lse_slot + row.lse] = lse;
    }
    return slot * dp.o_slot + batch * p.o.batch + row.token * p.o.seq + row.head_q * p.o.head + p.o.offset;
}

// #if KEY_LANES
// Lanes over keys (the default on CPU adapters, whose subgroup lanes are
// SIMD lanes): the workgroup is one subgroup, and each lane takes its own
// four consecutive keys of every 4 * WG_SIZE, reads their whole K and V
// vectors (eight values per load: llvmpipe's loads cost per instruction,
// not per byte) and keeps its own online softmax of every row over them.
// Nothing crosses lanes in the key loop: no subgroupAdd per score, and each
// lane's softmax steps are its own keys' rather than a copy of everyone's.
// The lanes' (max, sum, output) merge once at the end, by logsumexp, as
// split results do. Measured 2-3x faster than lanes over the head dim on
// lavapipe (BENCHMARKS.md); on GPUs each lane's state (ROWS x (D + DV)
// floats) would spill, so they keep the layout below.
//
// Generated constants here: D4, DV4, D8 = D4 / 2, DV8 = DV4 / 2, WG_SIZE,
// ROWS (query rows per workgroup); BLOCK_N is unused.

// The row of cache position `pos` if it is at most `hi`, else -1 (as for
// positions held by another segment).
fn lane_key_row(batch: u32, pos: i32, hi: i32, head_kv: u32) -> i32 {
    if (pos > hi) {
        return -1;
    }
    return cache_row(batch, u32(pos), head_kv);
}

// The rows of cache positions first..first+3.
fn lane_key_rows(batch: u32, first: i32, hi: i32, head_kv: u32) -> vec4<i32> {
    return vec4<i32>(lane_key_row(batch, first, hi, head_kv), lane_key_row(batch, first + 1, hi, head_kv),
        lane_key_row(batch, first + 2, hi, head_kv), lane_key_row(batch, first + 3, hi, head_kv));
}

// Eight values of a key, or zeros for a key that is not here (its weight
// is 0, and 0 x NaN would not be).
fn present_values(v: mat2x4<f32>, here: bool) -> mat2x4<f32> {
    return mat2x4<f32>(select(vec4<f32>(0.0), v[0], here), select(vec4<f32>(0.0), v[1], here));
}

// The unrolled loops over rows live in helpers, as in row_blocks.wgsl
// (which says why).

// Every row's dot products with four keys advanced by the keys' elements
// 8e..8e+7 (`k0`..`k3`).
fn add_key_slice(q: ptr<function, array<vec4<f32>, ROWS * D4>>, dots: ptr<function, array<vec4<f32>, ROWS>>,
    e: u32, k0: mat2x4<f32>, k1: mat2x4<f32>, k2: mat2x4<f32>, k3: mat2x4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        let qa = (*q)[r * D4 + 2u * e];
        let qb = (*q)[r * D4 + 2u * e + 1u];
        let d = (*dots)[r];
        (*dots)[r] = vec4<f32>(fma_dot(qb, k0[1], fma_dot(qa, k0[0], d.x)), fma_dot(qb, k1[1], fma_dot(qa, k1[0], d.y)),
            fma_dot(qb, k2[1], fma_dot(qa, k2[0], d.z)), fma_dot(qb, k3[1], fma_dot(qa, k3[0], d.w)));
    }
}

// Every row's accumulator vec4s 2e and 2e + 1 rescaled and advanced by four
// keys' weights times the keys' value elements 8e..8e+7 (`v0`..`v3`).
fn add_value_slice(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, correction: ptr<function, array<f32, ROWS>>,
    probs: ptr<function, array<vec4<f32>, ROWS>>, e: u32, v0: mat2x4<f32>, v1: mat2x4<f32>, v2: mat2x4<f32>,
    v3: mat2x4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        let lo = r * DV4 + 2u * e;
        (*acc)[lo] = weigh_values((*acc)[lo], (*correction)[r], (*probs)[r], v0[0], v1[0], v2[0], v3[0]);
        (*acc)[lo + 1u] = weigh_values((*acc)[lo + 1u], (*correction)[r], (*probs)[r], v0[1], v1[1], v2[1], v3[1]);
    }
}

// Row `r`'s output: the lanes' accumulators rescaled by `factor` and
// summed, times 1 / l; lane d % WG_SIZE stores vec4 d when `stored`.
fn store_row_total(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, r: u32, factor: f32, inv_l: f32, o_base: u32,
    stored: bool, lane: u32) {
    for (var d = 0u; d < DV4; d++) {
        let total = subgroupAdd((*acc)[r * DV4 + d] * factor);
        if (stored && lane == d % WG_SIZE) {
            store_o(o_base + d, total * inv_l);
        }
    }
}

// The key loop's page skip branches on subgroupAll, a subgroup-uniform
// value WGSL's uniformity analysis cannot see as uniform (it reasons per
// workgroup, and this workgroup is one subgroup): browsers' compilers
// would refuse the next iteration's subgroupAll without this filter.
@diagnostic(off, subgroup_uniformity)
@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let split = wg.x;
    let head_kv = wg.z;
    let tile = row_tile(wg.y, ROWS);
    let batch = tile.x;
    let row0 = tile.y;
    let sequence = sequences[batch];
    let seq_kv = sequence.len;
    // Query rows of this (batch, KV head). The host numbers only tiles
    // that hold some; the guard keeps a table that disagrees harmless.
    let row_count = sequence.q_count * dp.group;
    if (row0 >= row_count) {
        return;
    }
    let slot = dp.slot_base + split;

    var q: array<vec4<f32>, ROWS * D4>;
    var acc: array<vec4<f32>, ROWS * DV4>;
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var rows: array<DecodeRow, ROWS>;
    // Keys some row sees; identical in every lane, so uniform.
    var lo_all = i32(seq_kv);
    var hi_all = -1;
    for (var r = 0u; r < ROWS; r++) {
        // Rows past the end compute on a copy of the last row; never stored.
        rows[r] = decode_row(min(row0 + r, row_count - 1u), batch, head_kv, sequence, split);
        if (rows[r].lo <= rows[r].hi) {
            lo_all = min(lo_all, rows[r].lo);
            hi_all = max(hi_all, rows[r].hi);
        }
        // The sink joins lane 0's share of the first slot only, so the
        // merges count it once.
        let start = softmax_start(rows[r].head_q, slot == 0u && lane == 0u);
        m[r] = start.x;
        l[r] = start.y;
        // (acc starts at zero, as every WGSL variable does.)
        load_query_row(&q, r, batch * p.q.batch + rows[r].token * p.q.seq + rows[r].head_q * p.q.head + p.q.offset);
    }

    let stride = i32(4u * WG_SIZE);
    for (var kv0 = lo_all; kv0 <= hi_all; kv0 += stride) {
        let first = kv0 + 4 * i32(lane);
        let rows4 = lane_key_rows(batch, first, hi_all, head_kv);
        let here = rows4 >= vec4<i32>(0);
        // Keys whose pages all live in other segments are those dispatches'
        // work: jump to the end of the page holding the last of them.
        if (subgroupAll(!any(here))) {
            let page_end = (((kv0 + stride - 1) >> dp.page_shift) + 1) << dp.page_shift;
            kv0 = max(kv0, page_end - stride);
            continue;
        }
        // Absent keys read row 0 of the segment (any valid row): their
        // scores are hidden and their values zeroed below.
        let at = vec4<u32>(max(rows4, vec4<i32>(0)));
// #if KV_BYTES
        var k_blocks: array<vec4<u32>, 4 * W4>;
        var v_blocks: array<vec4<u32>, 4 * VW4>;
        stage_int8_blocks(at, &k_blocks, &v_blocks);
        let shifts = at & vec4<u32>(3u);
// #endif
        var dots: array<vec4<f32>, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            dots[r] = vec4<f32>(0.0);
        }
        for (var e = 0u; e < D8; e++) {
// #if KV_BYTES
            let k0 = int8_k8(&k_blocks, 0u, shifts.x, e);
            let k1 = int8_k8(&k_blocks, 1u, shifts.y, e);
            let k2 = int8_k8(&k_blocks, 2u, shifts.z, e);
            let k3 = int8_k8(&k_blocks, 3u, shifts.w, e);
// #else
            let k0 = cache_k8(at.x, e);
            let k1 = cache_k8(at.y, e);
            let k2 = cache_k8(at.z, e);
            let k3 = cache_k8(at.w, e);
// #endif
            add_key_slice(&q, &dots, e, k0, k1, k2, k3);
        }
        let key_pos = vec4<i32>(first) + vec4<i32>(0, 1, 2, 3);
        let scales = key_scales(rows4);
        var probs: array<vec4<f32>, ROWS>;
        var correction: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let scores = finish_scores(dots[r] * scales[0], rows[r].pos, key_pos, rows[r].slope);
// #if TREE_MASK
            let visible = here & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi))
                & tree_sees4(batch, sequence, rows[r].query, key_pos);
// #else
            let visible = here & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi));
// #endif
            let step = softmax_step(scores, visible, m[r], l[r]);
            m[r] = step.m;
            l[r] = step.l;
            probs[r] = step.probs * scales[1];
            correction[r] = step.correction;
        }
        for (var e = 0u; e < DV8; e++) {
// #if KV_BYTES
            let v0 = present_values(int8_v8(&v_blocks, 0u, shifts.x, e), here.x);
            let v1 = present_values(int8_v8(&v_blocks, 1u, shifts.y, e), here.y);
            let v2 = present_values(int8_v8(&v_blocks, 2u, shifts.z, e), here.z);
            let v3 = present_values(int8_v8(&v_blocks, 3u, shifts.w, e), here.w);
// #else
            let v0 = present_values(cache_v8(at.x, e), here.x);
            let v1 = present_values(cache_v8(at.y, e), here.y);
            let v2 = present_values(cache_v8(at.z, e), here.z);
            let v3 = present_values(cache_v8(at.w, e), here.w);
// #endif
            add_value_slice(&acc, &correction, &probs, e, v0, v1, v2, v3);
        }
    }

    // Merge the lanes' shares of each row: rescale to the common max, sum.
    for (var r = 0u; r < ROWS; r++) {
        let m_all = subgroupMax(m[r]);
        // A lane that saw no key has l = 0 and acc = 0: any factor works.
        let factor = exp_shifted(vec4<f32>(m[r] - m_all)).x;
        let l_all = subgroupAdd(l[r] * factor);
        let result = row_result(m_all, l_all);
        let stored = row0 + r < row_count;
        let o_base = output_base(slot, batch, rows[r], result.y, stored && lane == 0u);
        store_row_total(&acc, r, factor, result.x, o_base, stored, lane);
    }
}
// #else
// #if SUBGROUP_KV
// Subgroup tier: the workgroup is one subgroup (WG_SIZE is the adapter's
// smallest subgroup size). Lanes split the head dim instead of the rows:
// lane `lane` holds vec4s lane + WG_SIZE * slot (slot < SLOTS) of every
// row's q and acc, loads the same slice of each key's K and V (adjacent
// lanes, adjacent addresses), and subgroupAdd completes the dot products.
// No workgroup memory, no barriers; every lane runs the same softmax on the
// reduced scores, so control flow stays uniform.
//
// Generated constants here: D4 (keys), DV4 (values), WG_SIZE, ROWS (query
// rows per workgroup), SLOTS = ceil(D4 / WG_SIZE), SLOTS_V = ceil(DV4 /
// WG_SIZE); BLOCK_N is unused.

// #if KEY_TILES
// Key tiles (DecodeLanes::KeyTiles), for GPUs: the workgroup (one
// subgroup) stages WG_SIZE keys' K and V in workgroup memory with
// coalesced loads, widened to f32 once; then each lane scores its own key
// against every row (queries read from workgroup memory, the same address
// in every lane), so a score costs no cross-lane reduction; the row max is
// one subgroupMax per row and tile. P goes through workgroup memory, and
// lanes split the value head dim for O += P V (lane `lane` owns vec4s
// lane + WG_SIZE * slot, slot < SLOTS_V), reading V from the tile. The
// running max is uniform across lanes; each lane keeps its own share of
// the row sums, added up at the end.
//
// Generated constants here: D4, DV4, WG_SIZE (keys per tile), ROWS (query
// rows per workgroup), SLOTS_V = ceil(DV4 / WG_SIZE); BLOCK_N and SLOTS
// are unused.

// A staged key's stride in vec4s: one more than its width, so lanes
// reading their own keys' vec4 d fall in different banks.
const KEY_STRIDE: u32 = D4 + 1u;
// The query staging loop's bound (named: the unroller expands only loops
// from 0 to D4 itself).
const QUERY_VEC4S: u32 = ROWS * D4;

var<workgroup> q_rows: array<vec4<f32>, ROWS * D4>;
var<workgroup> k_keys: array<vec4<f32>, WG_SIZE * KEY_STRIDE>;
var<workgroup> v_keys: array<vec4<f32>, WG_SIZE * DV4>;
// The tile's weights, [key][row], V's scale folded in (int8 caches).
var<workgroup> weights: array<f32, WG_SIZE * ROWS>;
// Per key of the tile: the vec4 index of its K/V row in this segment, or
// -1 (another segment's page, or past the keys some row sees).
var<workgroup> tile_rows: array<i32, WG_SIZE>;
var<workgroup> tile_has_keys: u32;

// vec4 `i` of the tile's keys (key i / D4), from the cache into k_keys;
// zeros for an absent key.
fn stage_key_vec4(i: u32) {
    let key = i / D4;
    let at = tile_rows[key];
    var k = vec4<f32>(0.0);
    if (at >= 0) {
        k = cache_k(u32(at), i % D4);
    }
    k_keys[key * KEY_STRIDE + i % D4] = k;
}

// vec4 `i` of the tile's values, from the cache into v_keys; zeros for an
// absent key (its weight is 0, and 0 x NaN would not be).
fn stage_value_vec4(i: u32) {
    let at = tile_rows[i / DV4];
    var v = vec4<f32>(0.0);
    if (at >= 0) {
        v = cache_v(u32(at), i % DV4);
    }
    v_keys[i] = v;
}

// Every row's score of this lane's key, advanced by the key's vec4 `d`.
fn add_tile_key(dots: ptr<function, array<f32, ROWS>>, d: u32, k: vec4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        (*dots)[r] = fma_dot(q_rows[r * D4 + d], k, (*dots)[r]);
    }
}

// This lane's accumulator slices advanced by key `key`'s weights times its
// value slices.
fn add_tile_values(acc: ptr<function, array<vec4<f32>, ROWS * SLOTS_V>>, key: u32, lane: u32) {
    for (var slot = 0u; slot < SLOTS_V; slot++) {
        let j = lane + WG_SIZE * slot;
        let v = select(vec4<f32>(0.0), v_keys[key * DV4 + min(j, DV4 - 1u)], j < DV4);
        for (var r = 0u; r < ROWS; r++) {
            (*acc)[r * SLOTS_V + slot] = fma(vec4<f32>(weights[key * ROWS + r]), v, (*acc)[r * SLOTS_V + slot]);
        }
    }
}

// This lane's accumulator slices of every row times the rows' corrections.
fn rescale_tile_rows(acc: ptr<function, array<vec4<f32>, ROWS * SLOTS_V>>, correction: ptr<function, array<f32, ROWS>>) {
    for (var r = 0u; r < ROWS; r++) {
        for (var slot = 0u; slot < SLOTS_V; slot++) {
            (*acc)[r * SLOTS_V + slot] *= (*correction)[r];
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let split = wg.x;
    let head_kv = wg.z;
    let tile = row_tile(wg.y, ROWS);
    let batch = tile.x;
    let row0 = tile.y;
    let sequence = sequences[batch];
    let seq_kv = sequence.len;
    // Query rows of this (batch, KV head). The host numbers only tiles
    // that hold some; the guard keeps a table that disagrees harmless.
    let row_count = sequence.q_count * dp.group;
    if (row0 >= row_count) {
        return;
    }
    let slot = dp.slot_base + split;

    var acc: array<vec4<f32>, ROWS * SLOTS_V>;
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var rows: array<DecodeRow, ROWS>;
    // Keys some row sees; the same in every lane.
    var lo_all = i32(seq_kv);
    var hi_all = -1;
    for (var r = 0u; r < ROWS; r++) {
        // Rows past the end compute on a copy of the last row; never stored.
        rows[r] = decode_row(min(row0 + r, row_count - 1u), batch, head_kv, sequence, split);
        if (rows[r].lo <= rows[r].hi) {
            lo_all = min(lo_all, rows[r].lo);
            hi_all = max(hi_all, rows[r].hi);
        }
        // The running max is every lane's (the sink's logit where the
        // slot has it); the sink's weight joins lane 0's share of the sum
        // only, so the end's subgroupAdd counts it once.
        let start = decode_start(rows[r], slot);
        m[r] = start.x;
        l[r] = select(0.0, start.y, lane == 0u);
        // (acc starts at zero, as every WGSL variable does.)
    }
    // The rows' queries, spread over the lanes. (Each row's token and head
    // are recomputed rather than read from `rows` at a run-time index,
    // which would move that array out of a GPU's registers.)
    for (var i = lane; i < QUERY_VEC4S; i += WG_SIZE) {
        let row = min(row0 + i / D4, row_count - 1u);
        let head_q = head_kv * dp.group + row % dp.group;
        q_rows[i] = load_q(batch * p.q.batch + (sequence.q_first + row / dp.group) * p.q.seq + head_q * p.q.head + p.q.offset + i % D4);
    }

    for (var kv0 = lo_all; kv0 <= hi_all; kv0 += i32(WG_SIZE)) {
        // Each lane looks up its own key, in parallel.
        let key_pos = kv0 + i32(lane);
        let row = key_row_until(batch, key_pos, hi_all, head_kv);
        let scales = vector_scales(row);
        // The previous tile is consumed before its rows are overwritten
        // (the first barrier also publishes the queries).
        workgroupBarrier();
        tile_rows[lane] = row;
        let any_here = subgroupAny(row >= 0);
        if (lane == 0u) {
            tile_has_keys = select(0u, 1u, any_here);
        }
        // Tiles whose pages all live in other segments are those
        // dispatches' work: jump to the end of the page holding the last.
        if (workgroupUniformLoad(&tile_has_keys) == 0u) {
            let page_end = (((kv0 + i32(WG_SIZE) - 1) >> dp.page_shift) + 1) << dp.page_shift;
            kv0 = max(kv0, page_end - i32(WG_SIZE));
            continue;
        }
        // Stage K and V: lanes take vec4s lane + WG_SIZE * t of the tile,
        // so adjacent lanes load adjacent vec4s of a key. The loops over t
        // are unrolled, so a GPU compiler can issue their loads together.
        for (var t = 0u; t < D4; t++) {
            stage_key_vec4(lane + WG_SIZE * t);
        }
        for (var t = 0u; t < DV4; t++) {
            stage_value_vec4(lane + WG_SIZE * t);
        }
        workgroupBarrier();

        var dots: array<f32, ROWS>;
        for (var d = 0u; d < D4; d++) {
            add_tile_key(&dots, d, k_keys[lane * KEY_STRIDE + d]);
        }
        var correction: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let s = finish_scores(vec4<f32>(dots[r] * scales.x), rows[r].pos, vec4<i32>(key_pos), rows[r].slope).x;
// #if TREE_MASK
            let visible = row >= 0 && key_pos >= rows[r].lo && key_pos <= rows[r].hi
                && tree_sees(batch, sequence, rows[r].query, key_pos);
// #else
            let visible = row >= 0 && key_pos >= rows[r].lo && key_pos <= rows[r].hi;
// #endif
            let shown = select(MIN_SCORE, s, visible);
            let m_new = max(m[r], subgroupMax(shown));
            correction[r] = exp_shifted(vec4<f32>(m[r] - m_new)).x;
            let weight = select(0.0, exp_shifted(vec4<f32>(shown - m_new)).x, visible);
            l[r] = l[r] * correction[r] + weight;
            m[r] = m_new;
            weights[lane * ROWS + r] = weight * scales.y;
        }
        rescale_tile_rows(&acc, &correction);
        workgroupBarrier();
        for (var key = 0u; key < WG_SIZE; key++) {
            add_tile_values(&acc, key, lane);
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let result = row_result(m[r], subgroupAdd(l[r]));
        if (row0 + r < row_count) {
            store_lane_slices(&acc, r, output_base(slot, batch, rows[r], result.y, lane == 0u), result.x, lane);
        }
    }
}
// #else
@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let split = wg.x;
    let head_kv = wg.z;
    let tile = row_tile(wg.y, ROWS);
    let batch = tile.x;
    let row0 = tile.y;
    let sequence = sequences[batch];
    let seq_kv = sequence.len;
    // Query rows of this (batch, KV head). The host numbers only tiles
    // that hold some; the guard keeps a table that disagrees harmless.
    let row_count = sequence.q_count * dp.group;
    if (row0 >= row_count) {
        return;
    }

    var q: array<vec4<f32>, ROWS * SLOTS>;
    var acc: array<vec4<f32>, ROWS * SLOTS_V>;
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var rows: array<DecodeRow, ROWS>;
    // Keys some row sees; identical in every lane, so uniform.
    var lo_all = i32(seq_kv);
    var hi_all = -1;
    for (var r = 0u; r < ROWS; r++) {
        // Rows past the end compute on a copy of the last row; never stored.
        rows[r] = decode_row(min(row0 + r, row_count - 1u), batch, head_kv, sequence, split);
        if (rows[r].lo <= rows[r].hi) {
            lo_all = min(lo_all, rows[r].lo);
            hi_all = max(hi_all, rows[r].hi);
        }
        let start = decode_start(rows[r], dp.slot_base + split);
        m[r] = start.x;
        l[r] = start.y;
        // (acc starts at zero, as every WGSL variable does.)
        load_query_slices(&q, r, batch * p.q.batch + rows[r].token * p.q.seq + rows[r].head_q * p.q.head + p.q.offset,
            lane);
    }

    for (var kv0 = lo_all; kv0 <= hi_all; kv0 += 4) {
        // The four keys' rows in this segment (-1: elsewhere or past the end).
        let rows4 = vec4<i32>(key_row_until(batch, kv0, hi_all, head_kv), key_row_until(batch, kv0 + 1, hi_all, head_kv),
            key_row_until(batch, kv0 + 2, hi_all, head_kv), key_row_until(batch, kv0 + 3, hi_all, head_kv));
        // Keys whose pages live in another segment are that dispatch's
        // work: jump to the end of the page.
        if (all(rows4 < vec4<i32>(0))) {
            let page_end = ((kv0 >> dp.page_shift) + 1) << dp.page_shift;
            kv0 = max(kv0, page_end - 4);
            continue;
        }
        var k: array<vec4<f32>, 4 * SLOTS>;
        var v: array<vec4<f32>, 4 * SLOTS_V>;
        stage_key_slices(&k, &v, rows4, lane);
        let key_pos = vec4<i32>(kv0) + vec4<i32>(0, 1, 2, 3);
        let scales = key_scales(rows4);
        for (var r = 0u; r < ROWS; r++) {
            let dots = subgroupAdd(lane_dots(&q, &k, r)) * scales[0];
            let scores = finish_scores(dots, rows[r].pos, key_pos, rows[r].slope);
// #if TREE_MASK
            let visible = (rows4 >= vec4<i32>(0)) & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi))
                & tree_sees4(batch, sequence, rows[r].query, key_pos);
// #else
            let visible = (rows4 >= vec4<i32>(0)) & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi));
// #endif
            let step = softmax_step(scores, visible, m[r], l[r]);
            m[r] = step.m;
            l[r] = step.l;
            add_lane_values(&acc, &v, r, step.probs * scales[1], step.correction);
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        if (row0 + r < row_count) {
            let result = row_result(m[r], l[r]);
            store_lane_slices(&acc, r, output_base(dp.slot_base + split, batch, rows[r], result.y, lane == 0u),
                result.x, lane);
        }
    }
}
// #endif

// vec4 `j` of the query vector at `base`; zero for lanes past the head dim.
fn q_slice(base: u32, j: u32) -> vec4<f32> {
    if (j >= D4) {
        return vec4<f32>(0.0);
    }
    return load_q(base + j);
}

// cache_row for a position up to `hi`, else -1.
fn key_row_until(batch: u32, pos: i32, hi: i32, head_kv: u32) -> i32 {
    if (pos > hi) {
        return -1;
    }
    return cache_row(batch, u32(pos), head_kv);
}

// vec4 `j` of the K (or V) row at `row`; zero for absent rows and for lanes
// past the head dim (the value head dim for V).
fn slice_of(from_v: bool, row: i32, j: u32) -> vec4<f32> {
    if (row < 0 || j >= select(D4, DV4, from_v)) {
        return vec4<f32>(0.0);
    }
    if (from_v) {
        return cache_v(u32(row), j);
    }
    return cache_k(u32(row), j);
}

// Query row `r`'s vec4s of this lane (lane + WG_SIZE * slot), from vec4
// `q_base` of Q.
fn load_query_slices(q: ptr<function, array<vec4<f32>, ROWS * SLOTS>>, r: u32, q_base: u32, lane: u32) {
    for (var slot = 0u; slot < SLOTS; slot++) {
        (*q)[r * SLOTS + slot] = q_slice(q_base, lane + WG_SIZE * slot);
    }
}

// This lane's vec4s of the K and V rows of four keys (`rows4`).
fn stage_key_slices(k: ptr<function, array<vec4<f32>, 4 * SLOTS>>, v: ptr<function, array<vec4<f32>, 4 * SLOTS_V>>,
    rows4: vec4<i32>, lane: u32) {
    for (var slot = 0u; slot < SLOTS; slot++) {
        let j = lane + WG_SIZE * slot;
        (*k)[slot] = slice_of(false, rows4.x, j);
        (*k)[SLOTS + slot] = slice_of(false, rows4.y, j);
        (*k)[2u * SLOTS + slot] = slice_of(false, rows4.z, j);
        (*k)[3u * SLOTS + slot] = slice_of(false, rows4.w, j);
    }
    for (var slot = 0u; slot < SLOTS_V; slot++) {
        let j = lane + WG_SIZE * slot;
        (*v)[slot] = slice_of(true, rows4.x, j);
        (*v)[SLOTS_V + slot] = slice_of(true, rows4.y, j);
        (*v)[2u * SLOTS_V + slot] = slice_of(true, rows4.z, j);
        (*v)[3u * SLOTS_V + slot] = slice_of(true, rows4.w, j);
    }
}

// This lane's share of row `r`'s dot products with the four keys.
fn lane_dots(q: ptr<function, array<vec4<f32>, ROWS * SLOTS>>, k: ptr<function, array<vec4<f32>, 4 * SLOTS>>,
    r: u32) -> vec4<f32> {
    var partial = vec4<f32>(0.0);
    for (var slot = 0u; slot < SLOTS; slot++) {
        let qd = (*q)[r * SLOTS + slot];
        partial = vec4<f32>(fma_dot(qd, (*k)[slot], partial.x), fma_dot(qd, (*k)[SLOTS + slot], partial.y),
            fma_dot(qd, (*k)[2u * SLOTS + slot], partial.z), fma_dot(qd, (*k)[3u * SLOTS + slot], partial.w));
    }
    return partial;
}

// Row `r`'s accumulator slices rescaled by `correction` and advanced by the
// four keys' weights `pr` times their values.
fn add_lane_values(acc: ptr<function, array<vec4<f32>, ROWS * SLOTS_V>>, v: ptr<function, array<vec4<f32>, 4 * SLOTS_V>>,
    r: u32, pr: vec4<f32>, correction: f32) {
    for (var slot = 0u; slot < SLOTS_V; slot++) {
        let a = r * SLOTS_V + slot;
        (*acc)[a] = weigh_values((*acc)[a], correction, pr, (*v)[slot], (*v)[SLOTS_V + slot], (*v)[2u * SLOTS_V + slot],
            (*v)[3u * SLOTS_V + slot]);
    }
}

// Row `r`'s output slices of this lane, times 1 / l, from vec4 `o_base`.
fn store_lane_slices(acc: ptr<function, array<vec4<f32>, ROWS * SLOTS_V>>, r: u32, o_base: u32, inv_l: f32, lane: u32) {
    for (var slot = 0u; slot < SLOTS_V; slot++) {
        let j = lane + WG_SIZE * slot;
        if (j < DV4) {
            store_o(o_base + j, (*acc)[r * SLOTS_V + slot] * inv_l);
        }
    }
}
// #else
const BLOCK_M: u32 = WG_SIZE * ROWS;

var<workgroup> k_tile: array<vec4<f32>, BLOCK_N * D4>;
var<workgroup> v_tile: array<vec4<f32>, BLOCK_N * DV4>;
// Per key of the tile: the vec4 index of its K/V row in this segment, or
// -1 when its page lives in another segment (or past the tile's end).
var<workgroup> key_row: array<i32, BLOCK_N>;
// #if KV_BYTES
// Per key of the tile: its K and V scales.
var<workgroup> tile_scales: array<vec2<f32>, BLOCK_N>;

fn stage_scales(key: u32, row: i32) {
    tile_scales[key] = vector_scales(row);
}

// The K scales and V scales of the tile's four keys from `c`.
fn tile_key_scales(c: u32) -> mat2x4<f32> {
    let a = tile_scales[c];
    let b = tile_scales[c + 1u];
    let d = tile_scales[c + 2u];
    let e = tile_scales[c + 3u];
    return mat2x4<f32>(vec4<f32>(a.x, b.x, d.x, e.x), vec4<f32>(a.y, b.y, d.y, e.y));
}
// #else
// Every other type has scale 1: nothing staged, and the multiplies by the
// constant fold away.
fn stage_scales(key: u32, row: i32) {
}

fn tile_key_scales(c: u32) -> mat2x4<f32> {
    return mat2x4<f32>(vec4<f32>(1.0), vec4<f32>(1.0));
}
// #endif
var<workgroup> tile_has_keys: u32;
var<workgroup> lane_ranges: array<vec2<i32>, WG_SIZE>;
var<workgroup> tile_range: vec2<i32>;

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let split = wg.x;
    let head_kv = wg.z;
    let tile = row_tile(wg.y, BLOCK_M);
    let batch = tile.x;
    let row0 = tile.y;
    let sequence = sequences[batch];
    let seq_kv = sequence.len;
    // Query rows of this (batch, KV head). The host numbers only tiles
    // that hold some; the guard keeps a table that disagrees harmless.
    let row_count = sequence.q_count * dp.group;
    if (row0 >= row_count) {
        return;
    }

    var q: array<vec4<f32>, ROWS * D4>;
    var acc: array<vec4<f32>, ROWS * DV4>;
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var rows: array<DecodeRow, ROWS>;
    // Keys some row of this invocation sees.
    var wg_lo = i32(seq_kv);
    var wg_hi = -1;
    for (var r = 0u; r < ROWS; r++) {
        // Rows past the end compute on a copy of the last row; never stored.
        rows[r] = decode_row(min(row0 + lid + r * WG_SIZE, row_count - 1u), batch, head_kv, sequence, split);
        if (rows[r].lo <= rows[r].hi) {
            wg_lo = min(wg_lo, rows[r].lo);
            wg_hi = max(wg_hi, rows[r].hi);
        }
        let start = decode_start(rows[r], dp.slot_base + split);
        m[r] = start.x;
        l[r] = start.y;
        // (acc starts at zero, as every WGSL variable does.)
        load_query_row(&q, r, batch * p.q.batch + rows[r].token * p.q.seq + rows[r].head_q * p.q.head + p.q.offset);
    }
    // Every invocation must agree on the tile loop (it has barriers): the
    // union of the rows' ranges, made uniform through workgroup memory.
    lane_ranges[lid] = vec2<i32>(wg_lo, wg_hi);
    workgroupBarrier();
    if (lid == 0u) {
        var range = lane_ranges[0];
        for (var i = 1u; i < WG_SIZE; i++) {
            range = vec2<i32>(min(range.x, lane_ranges[i].x), max(range.y, lane_ranges[i].y));
        }
        tile_range = range;
    }
    let range = workgroupUniformLoad(&tile_range);

    for (var kv0 = range.x; kv0 <= range.y; kv0 += i32(BLOCK_N)) {
        let n_keys = u32(min(i32(BLOCK_N), range.y + 1 - kv0));
        // The previous tile is consumed before its flags are overwritten.
        workgroupBarrier();
        if (lid == 0u) {
            tile_has_keys = 0u;
        }
        workgroupBarrier();
        // One block-table lookup per key, shared by the staging loop below.
        for (var key = lid; key < BLOCK_N; key += WG_SIZE) {
            var row = -1;
            if (key < n_keys) {
                row = cache_row(batch, u32(kv0) + key, head_kv);
            }
            key_row[key] = row;
            stage_scales(key, row);
            if (row >= 0) {
                tile_has_keys = 1u;
            }
        }
        // Tiles whose pages all live in other segments are skipped whole.
        if (workgroupUniformLoad(&tile_has_keys) == 0u) {
            continue;
        }
        // One loop stages K and V when they are as wide (the test is a
        // constant), else each has its own.
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            let d = i % D4;
            var kk = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            let row = key_row[key];
            if (row >= 0) {
                kk = cache_k(u32(row), d);
                if (D4 == DV4) {
                    vv = cache_v(u32(row), d);
                }
            }
            k_tile[i] = kk;
            if (D4 == DV4) {
                v_tile[i] = vv;
            }
        }
        if (D4 != DV4) {
            for (var i = lid; i < BLOCK_N * DV4; i += WG_SIZE) {
                let row = key_row[i / DV4];
                var vv = vec4<f32>(0.0);
                if (row >= 0) {
                    vv = cache_v(u32(row), i % DV4);
                }
                v_tile[i] = vv;
            }
        }
        workgroupBarrier();

        for (var c = 0u; c < BLOCK_N; c += 4u) {
            // A tile's last keys past its range (a short sequence's end, a
            // split's) cost nothing: the count stays a constant for the
            // compiler, the loop leaves early.
            if (c >= n_keys) {
                break;
            }
            let t = c * D4;
            let tv = c * DV4;
            var dots: array<vec4<f32>, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                dots[r] = vec4<f32>(0.0);
            }
            for (var d = 0u; d < D4; d++) {
                let k0 = k_tile[t + d];
                let k1 = k_tile[t + D4 + d];
                let k2 = k_tile[t + 2u * D4 + d];
                let k3 = k_tile[t + 3u * D4 + d];
                add_key_column(&q, &dots, d, ROWS, k0, k1, k2, k3);
            }
            let key_pos = vec4<i32>(kv0 + i32(c)) + vec4<i32>(0, 1, 2, 3);
            let here = vec4<i32>(key_row[c], key_row[c + 1u], key_row[c + 2u], key_row[c + 3u]) >= vec4<i32>(0);
            let scales = tile_key_scales(c);
            var probs: array<vec4<f32>, ROWS>;
            var correction: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                let scores = finish_scores(dots[r] * scales[0], rows[r].pos, key_pos, rows[r].slope);
// #if TREE_MASK
                let visible = here & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi))
                    & tree_sees4(batch, sequence, rows[r].query, key_pos);
// #else
                let visible = here & (key_pos >= vec4<i32>(rows[r].lo)) & (key_pos <= vec4<i32>(rows[r].hi));
// #endif
                let step = softmax_step(scores, visible, m[r], l[r]);
                m[r] = step.m;
                l[r] = step.l;
                probs[r] = step.probs * scales[1];
                correction[r] = step.correction;
            }
            for (var d = 0u; d < DV4; d++) {
                let v0 = v_tile[tv + d];
                let v1 = v_tile[tv + DV4 + d];
                let v2 = v_tile[tv + 2u * DV4 + d];
                let v3 = v_tile[tv + 3u * DV4 + d];
                add_value_column(&acc, &correction, &probs, d, ROWS, v0, v1, v2, v3);
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        if (row0 + lid + r * WG_SIZE < row_count) {
            let result = row_result(m[r], l[r]);
            store_output_row(&acc, r, output_base(dp.slot_base + split, batch, rows[r], result.y, true), result.x, true);
        }
    }
}
// #endif
// #endif
