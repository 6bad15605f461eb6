// Appends new K and V tokens to a paged KV cache in place, rotating the
// keys (RoPE) on the way when rotary_dim > 0, and storing both in the
// cache's type (a latent cache, write_values = 0, stores keys only: its
// values are their prefix). Sequence b appends starts[b].z tokens (0 to
// rp.tokens, the most any sequence appends), source rows starts[b].w on:
// its token t goes to cache position starts[b].x + t and is rotated for
// position starts[b].y + t. One dispatch per cache segment; each writes
// the tokens whose page lives in its segment. One invocation per
// (sequence, token, head) vector: the int8 scale needs the whole vector,
// and 16-bit and int8 elements share words.
//
// The cache is addressed in 4-byte words: a head vector is head_dim words
// (f32), head_dim / 2 (KV_HALF: two halves per word, first element low) or
// head_dim / 4 + 1 (KV_BYTES: four int8, or with KV_FP8 four E4M3 bytes,
// per word, first element in the low byte, then the vector's f32 scale).
//
// Generated constants: WG_SIZE.

@group(0) @binding(0) var<uniform> rp: RopeParams;
// Per sequence: (first cache position written, first rotary position,
// tokens appended, first source row).
@group(0) @binding(1) var<storage, read> starts: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> freqs: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> k_new: array<f32>;
@group(0) @binding(4) var<storage, read> v_new: array<f32>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(7) var<storage, read> block_table: array<u32>;

// Element `e` of the new key (`is_key`) or value vector at `src`; keys are
// rotated for `position` (each element from its pair, so no invocation
// needs another's result).
fn element(is_key: bool, src: u32, e: u32, position: u32) -> f32 {
    if (!is_key) {
        return v_new[src + e];
    }
    // Index within the rotated part [rotary_start, rotary_start + rotary_dim).
    let r = e - rp.rotary_start;
    if (e < rp.rotary_start || r >= rp.rotary_dim) {
        return k_new[src + e];
    }
    // Pair `pair` is elements (a, b) of the part; `r` is the first of them or not.
    var pair = r / 2u;
    var first = (r & 1u) == 0u;
    var at = vec2<u32>(2u * pair, 2u * pair + 1u);
    if (rp.half_split != 0u) {
        let half_rot = rp.rotary_dim / 2u;
        first = r < half_rot;
        pair = select(r - half_rot, r, first);
        at = vec2<u32>(pair, pair + half_rot);
    }
    at += vec2<u32>(src + rp.rotary_start);
    let rotated = rotate(k_new[at.x], k_new[at.y], position, pair);
    return select(rotated.y, rotated.x, first);
}

fn store_word(is_key: bool, at: u32, word: u32) {
    if (is_key) {
        k_cache[at] = word;
    } else {
        v_cache[at] = word;
    }
}

// #if KV_BYTES
fn vector_words() -> u32 {
    return rp.head_dim / 4u + 1u;
}

// Symmetric quantization: scale = max|x| / 127, values round(x / scale)
// (to nearest, ties to even) in [-127, 127]; an all-zero vector has scale 0.
// KV_FP8: scale = max|x| / 448 (E4M3's largest finite), values x / scale
// as E4M3 bytes (half_codec.wgsl's fp8_bits).
fn store_vector(is_key: bool, src: u32, dst: u32, position: u32) {
    var amax = 0.0;
    for (var e = 0u; e < rp.head_dim; e++) {
        amax = max(amax, abs(element(is_key, src, e, position)));
    }
// #if KV_FP8
    let scale = amax / 448.0;
// #else
    let scale = amax / 127.0;
// #endif
    let inverse = select(0.0, 1.0 / scale, scale > 0.0);
    for (var w = 0u; w < rp.head_dim / 4u; w++) {
        var word = 0u;
        for (var b = 0u; b < 4u; b++) {
// #if KV_FP8
            word |= fp8_bits(element(is_key, src, 4u * w + b, position) * inverse) << (8u * b);
// #else
            let value = clamp(round(element(is_key, src, 4u * w + b, position) * inverse), -127.0, 127.0);
            word |= (bitcast<u32>(i32(value)) & 0xffu) << (8u * b);
// #endif
        }
        store_word(is_key, dst + w, word);
    }
    store_word(is_key, dst + rp.head_dim / 4u, bitcast<u32>(scale));
}
// #else
// #if KV_HALF
fn vector_words() -> u32 {
    return rp.head_dim / 2u;
}

// The storage type's bits of one value (half_codec.wgsl); f16 saturates
// to the infinity a value past its range rounds to.
// #if BF16_STORAGE
fn half_bits(value: f32) -> u32 {
    return bf16_bits(value);
}
// #else
fn half_bits(value: f32) -> u32 {
    return f16_bits(value);
}
// #endif

fn store_vector(is_key: bool, src: u32, dst: u32, position: u32) {
    for (var w = 0u; w < rp.head_dim / 2u; w++) {
        let low = half_bits(element(is_key, src, 2u * w, position));
        let high = half_bits(element(is_key, src, 2u * w + 1u, position));
        store_word(is_key, dst + w, low | (high << 16u));
    }
}
// #else
fn vector_words() -> u32 {
    return rp.head_dim;
}

fn store_vector(is_key: bool, src: u32, dst: u32, position: u32) {
    for (var e = 0u; e < rp.head_dim; e++) {
        store_word(is_key, dst + e, bitcast<u32>(element(is_key, src, e, position)));
    }
}
// #endif
// #endif

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    if (index >= rp.batch * rp.tokens * rp.heads) {
        return;
    }
    let head = index % rp.heads;
    let token = (index / rp.heads) % rp.tokens;
    let batch = index / (rp.heads * rp.tokens);
    let start = starts[batch];
    if (token >= start.z) {
        return;
    }
    let pos = start.x + token;
    let page = block_table[batch * rp.pages_per_seq + (pos >> rp.page_shift)];
    if (page < rp.segment_first_page || page >= rp.segment_first_page + rp.segment_pages) {
        return;
    }
    let row = ((page - rp.segment_first_page) << rp.page_shift) | (pos & ((1u << rp.page_shift) - 1u));
    let dst = (row * rp.heads + head) * vector_words();
    // (The source is packed: row start.w + token, whatever the batch.)
    let src = (start.w + token) * rp.src_seq + head * rp.src_head + rp.src_offset;
    let position = start.y + token;
    store_vector(true, src, dst, position);
    if (rp.write_values != 0u) {
        store_vector(false, src, dst, position);
    }
}
