// Copies a KV cache's K and V vectors into dense f32 tensors
// [batch, seq, heads, head_dim] (packed), widening 16-bit, int8 and fp8
// values as the decode kernel reads them (a byte's value times its vector's
// scale). A decode call with many query rows per KV head then runs the
// forward kernels over the copy (src/decode_as_forward.rs says when).
// One dispatch per cache segment; each copies the vectors whose page
// lives in its segment. Positions with no page (released, or past a
// sequence's block table) are zeros.
//
// One invocation per head vector of K (and the same vector of V): the
// index arithmetic (divisions) once per vector, not per vec4. The cache
// is addressed in 4-byte words, as kv_append.wgsl writes it: a head vector
// is 4 * D4 words (f32), 2 * D4 (KV_HALF) or D4 + 1 (KV_BYTES: four int8,
// or with KV_FP8 four E4M3 bytes, per word, first element in the low byte,
// then the vector's f32 scale).
//
// Generated constants: WG_SIZE.

// Twin of `KvGatherParams` in src/params.rs.
struct KvGatherParams {
    batch: u32,
    // Positions per sequence in the output (the longest sequence).
    seq: u32,
    heads: u32,
    // vec4s per head vector.
    d4: u32,
    // log2 of the page size in tokens.
    page_shift: u32,
    // Width of a block-table row.
    pages_per_seq: u32,
    // Pages held by this dispatch's segment.
    segment_first_page: u32,
    segment_pages: u32,
}

@group(0) @binding(0) var<uniform> gp: KvGatherParams;
@group(0) @binding(1) var<storage, read> k_cache: array<u32>;
@group(0) @binding(2) var<storage, read> v_cache: array<u32>;
@group(0) @binding(3) var<storage, read> block_table: array<u32>;
@group(0) @binding(4) var<storage, read_write> k_out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> v_out: array<vec4<f32>>;

fn cache_word(from_v: bool, i: u32) -> u32 {
    if (from_v) {
        return v_cache[i];
    }
    return k_cache[i];
}

// vec4 `j` of the vector that starts at word `first`, as f32 (`scale`:
// a byte vector's, read once per vector by `vector_scale`).
// #if KV_BYTES
fn vector_words() -> u32 {
    return gp.d4 + 1u;
}

fn vector_scale(from_v: bool, first: u32) -> f32 {
    return bitcast<f32>(cache_word(from_v, first + gp.d4));
}

fn widened(from_v: bool, first: u32, j: u32, scale: f32) -> vec4<f32> {
    let word = cache_word(from_v, first + j);
// #if KV_FP8
    return fp8x4_widen(word) * scale;
// #else
    // Each byte moved to the top and shifted back down, sign-extending.
    let bytes = vec4<i32>(bitcast<i32>(word << 24u), bitcast<i32>(word << 16u), bitcast<i32>(word << 8u),
        bitcast<i32>(word)) >> vec4<u32>(24u);
    return vec4<f32>(bytes) * scale;
// #endif
}
// #else
// #if KV_HALF
fn vector_words() -> u32 {
    return 2u * gp.d4;
}

fn vector_scale(from_v: bool, first: u32) -> f32 {
    return 1.0;
}

fn widened(from_v: bool, first: u32, j: u32, scale: f32) -> vec4<f32> {
    let words = vec2<u32>(cache_word(from_v, first + 2u * j), cache_word(from_v, first + 2u * j + 1u));
// #if BF16_STORAGE
    return bf16x4_widen(words);
// #else
    return f16x4_widen(words);
// #endif
}
// #else
fn vector_words() -> u32 {
    return 4u * gp.d4;
}

fn vector_scale(from_v: bool, first: u32) -> f32 {
    return 1.0;
}

fn widened(from_v: bool, first: u32, j: u32, scale: f32) -> vec4<f32> {
    let at = first + 4u * j;
    return bitcast<vec4<f32>>(vec4<u32>(cache_word(from_v, at), cache_word(from_v, at + 1u),
        cache_word(from_v, at + 2u), cache_word(from_v, at + 3u)));
}
// #endif
// #endif

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    if (index >= gp.batch * gp.seq * gp.heads) {
        return;
    }
    let head = index % gp.heads;
    let pos = (index / gp.heads) % gp.seq;
    let batch = index / (gp.heads * gp.seq);
    let page = block_table[batch * gp.pages_per_seq + (pos >> gp.page_shift)];
    // No page: released behind a window (or past the table). Zeros, from
    // the first segment's dispatch: the forward masks such keys, and its
    // products with a masked key's value must be 0, which a stale NaN in
    // the reused scratch would not give.
    if (page == 0xffffffffu) {
        if (gp.segment_first_page == 0u) {
            for (var j = 0u; j < gp.d4; j++) {
                k_out[index * gp.d4 + j] = vec4<f32>(0.0);
                v_out[index * gp.d4 + j] = vec4<f32>(0.0);
            }
        }
        return;
    }
    if (page < gp.segment_first_page || page >= gp.segment_first_page + gp.segment_pages) {
        return;
    }
    let row = ((page - gp.segment_first_page) << gp.page_shift) | (pos & ((1u << gp.page_shift) - 1u));
    let first = (row * gp.heads + head) * vector_words();
    let k_scale = vector_scale(false, first);
    let v_scale = vector_scale(true, first);
    for (var j = 0u; j < gp.d4; j++) {
        k_out[index * gp.d4 + j] = widened(false, first, j, k_scale);
        v_out[index * gp.d4 + j] = widened(true, first, j, v_scale);
    }
}
