// Standard attention, the baseline the FlashAttention papers measure
// against: the score matrix S = scale * Q K^T is written to device memory,
// a row pass turns it into P = softmax(S) in place, and O = P V reads it
// back. Three entry points, dispatched in that order for each chunk of
// (batch, query head) pairs ("units") whose score rows fit one binding.
//
// Both matrix products use the flash kernel's register tiling (ROWS query
// rows per invocation, four keys per step, K or V shared through workgroup
// memory or, with SUBGROUP_KV, subgroup broadcasts), so the comparison
// measures what materialising S costs rather than a weaker matrix product. Like standard attention, every score is
// computed and then masked: no tile is skipped.
//
// Generated constants and variants as in flash_attention.wgsl (DV4 = D4
// here), whose per-row steps (row_blocks.wgsl) this file shares.
//
// `scores` layout: [unit - unit_base, seq_q, ceil(seq_kv / 4)] of vec4.
// Scores are in natural units. Hidden and padding keys hold -inf (every
// visible score is finite, so they never win the max) until the softmax
// pass zeroes them.

const BLOCK_M: u32 = WG_SIZE * ROWS;

@group(0) @binding(7) var<storage, read_write> scores: array<vec4<f32>>;

// #if SUBGROUP_KV
// #else
var<workgroup> kv_tile: array<vec4<f32>, BLOCK_N * D4>;
// #endif

// vec4 slots per score row.
fn row_slots() -> u32 {
    return (p.seq_kv + 3u) / 4u;
}

struct Unit {
    batch: u32,
    head_q: u32,
    head_kv: u32,
    // Index within this chunk's score rows.
    local: u32,
}

fn unit_of(local: u32) -> Unit {
    let unit = p.unit_base + local;
    let head_q = unit % p.heads_q;
    return Unit(unit / p.heads_q, head_q, head_q / (p.heads_q / p.heads_kv), local);
}

@compute @workgroup_size(WG_SIZE)
fn build_scores(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP_KV
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let u = unit_of(wg.y);
    let row0 = wg.x * BLOCK_M;
    let diag = i32(p.seq_kv) - i32(p.seq_q);
    let alibi_slope = alibi_slope_of(u.batch, u.head_q);
    var q: array<vec4<f32>, ROWS * D4>;
    var row_pos: array<i32, ROWS>;
    var bounds: array<vec2<i32>, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        // Rows past the end compute on a copy of the last row; never stored.
        let row = min(row0 + lid + r * WG_SIZE, p.seq_q - 1u);
        row_pos[r] = i32(row) + diag;
        bounds[r] = visible_keys(row_pos[r], p.seq_kv);
        load_query_row(&q, r, u.batch * p.q.batch + row * p.q.seq + u.head_q * p.q.head + p.q.offset);
    }
    let k_base = u.batch * p.k.batch + u.head_kv * p.k.head + p.k.offset;
    let slots = row_slots();
    for (var kv0 = 0u; kv0 < p.seq_kv; kv0 += BLOCK_N) {
        let n_keys = min(BLOCK_N, p.seq_kv - kv0);
// #if SUBGROUP_KV
// #else
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            var kk = vec4<f32>(0.0);
            if (key < n_keys) {
                kk = load_k(k_base + (kv0 + key) * p.k.seq + i % D4);
            }
            kv_tile[i] = kk;
        }
        workgroupBarrier();
// #endif
        for (var c = 0u; c < n_keys; c += 4u) {
            let t = c * D4;
// #if SUBGROUP_KV
            var slab: array<vec4<f32>, SLOTS>;
            for (var slot = 0u; slot < SLOTS; slot++) {
                slab[slot] = slab_element(false, k_base, kv0, c, n_keys, lane + WG_SIZE * slot);
            }
// #endif
            var dots: array<vec4<f32>, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                dots[r] = vec4<f32>(0.0);
            }
            for (var d = 0u; d < D4; d++) {
// #if SUBGROUP_KV
                let k0 = subgroupBroadcast(slab[d / WG_SIZE], d % WG_SIZE);
                let k1 = subgroupBroadcast(slab[(D4 + d) / WG_SIZE], (D4 + d) % WG_SIZE);
                let k2 = subgroupBroadcast(slab[(2u * D4 + d) / WG_SIZE], (2u * D4 + d) % WG_SIZE);
                let k3 = subgroupBroadcast(slab[(3u * D4 + d) / WG_SIZE], (3u * D4 + d) % WG_SIZE);
// #else
                let k0 = kv_tile[t + d];
                let k1 = kv_tile[t + D4 + d];
                let k2 = kv_tile[t + 2u * D4 + d];
                let k3 = kv_tile[t + 3u * D4 + d];
// #endif
                add_key_column(&q, &dots, d, ROWS, k0, k1, k2, k3);
            }
            let key_pos = vec4<i32>(i32(kv0 + c)) + vec4<i32>(0, 1, 2, 3);
            for (var r = 0u; r < ROWS; r++) {
                let row = row0 + lid + r * WG_SIZE;
                let s = finish_scores(dots[r], row_pos[r], key_pos, alibi_slope);
                let visible = (key_pos >= vec4<i32>(bounds[r].x)) & (key_pos <= vec4<i32>(bounds[r].y));
                if (row < p.seq_q) {
                    scores[(u.local * p.seq_q + row) * slots + (kv0 + c) / 4u] =
                        select(vec4<f32>(negative_infinity()), s, visible);
                }
            }
        }
// #if SUBGROUP_KV
// #else
        workgroupBarrier();
// #endif
    }
}

// One invocation per score row: max, sum, then P in place, and logsumexp.
@compute @workgroup_size(WG_SIZE)
fn softmax_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.x * WG_SIZE + lid;
    if (row >= p.seq_q) {
        return;
    }
    let u = unit_of(wg.y);
    let slots = row_slots();
    let base = (u.local * p.seq_q + row) * slots;
    // The sink, if any, starts the row as a key with no value; a row that
    // sees no key (and has no sink) keeps l == 0: its P is all zeros.
    let start = softmax_start(u.head_q, true);
    var m = start.x;
    for (var i = 0u; i < slots; i++) {
        let s = scores[base + i];
        m = max(m, max(max(s.x, s.y), max(s.z, s.w)));
    }
    var l = start.y * exp2((start.x - m) * LOG2_E);
    for (var i = 0u; i < slots; i++) {
        let e = exp_shifted(scores[base + i] - vec4<f32>(m));
        l += (e.x + e.y) + (e.z + e.w);
    }
    let inv_l = select(0.0, 1.0 / l, l > 0.0);
    let lse = row_lse(m, l);
    for (var i = 0u; i < slots; i++) {
        scores[base + i] = exp_shifted(scores[base + i] - vec4<f32>(m)) * inv_l;
    }
    if (has_flag(FLAG_WRITE_LSE)) {
        lse_buf[(u.batch * p.heads_q + u.head_q) * p.seq_q + row] = lse;
    }
}

// Every row's output vec4 `d` advanced by four keys' probabilities times
// the keys' value vec4 `d` (`v0`..`v3`); no rescaling, P is final. (The
// unrolled loop lives here, not in the entry point: row_blocks.wgsl says
// why.)
fn add_weighted_values(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, probs: ptr<function, array<vec4<f32>, ROWS>>,
    d: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        let a = r * DV4 + d;
        // (A correction of 1 folds away.)
        (*acc)[a] = weigh_values((*acc)[a], 1.0, (*probs)[r], v0, v1, v2, v3);
    }
}

@compute @workgroup_size(WG_SIZE)
fn weight_values(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if SUBGROUP_KV
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let u = unit_of(wg.y);
    let row0 = wg.x * BLOCK_M;
    let slots = row_slots();
    var acc: array<vec4<f32>, ROWS * DV4>;
    var p_base: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let row = min(row0 + lid + r * WG_SIZE, p.seq_q - 1u);
        p_base[r] = (u.local * p.seq_q + row) * slots;
    }
    // (acc starts at zero, as every WGSL variable does.)
    let v_base = u.batch * p.v.batch + u.head_kv * p.v.head + p.v.offset;
    for (var kv0 = 0u; kv0 < p.seq_kv; kv0 += BLOCK_N) {
        let n_keys = min(BLOCK_N, p.seq_kv - kv0);
// #if SUBGROUP_KV
// #else
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            var vv = vec4<f32>(0.0);
            if (key < n_keys) {
                vv = load_v(v_base + (kv0 + key) * p.v.seq + i % D4);
            }
            kv_tile[i] = vv;
        }
        workgroupBarrier();
// #endif
        for (var c = 0u; c < n_keys; c += 4u) {
            let t = c * D4;
// #if SUBGROUP_KV
            var slab: array<vec4<f32>, SLOTS>;
            for (var slot = 0u; slot < SLOTS; slot++) {
                slab[slot] = slab_element(true, v_base, kv0, c, n_keys, lane + WG_SIZE * slot);
            }
// #endif
            var probs: array<vec4<f32>, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                probs[r] = scores[p_base[r] + (kv0 + c) / 4u];
            }
            for (var d = 0u; d < D4; d++) {
// #if SUBGROUP_KV
                let v0 = subgroupBroadcast(slab[d / WG_SIZE], d % WG_SIZE);
                let v1 = subgroupBroadcast(slab[(D4 + d) / WG_SIZE], (D4 + d) % WG_SIZE);
                let v2 = subgroupBroadcast(slab[(2u * D4 + d) / WG_SIZE], (2u * D4 + d) % WG_SIZE);
                let v3 = subgroupBroadcast(slab[(3u * D4 + d) / WG_SIZE], (3u * D4 + d) % WG_SIZE);
// #else
                let v0 = kv_tile[t + d];
                let v1 = kv_tile[t + D4 + d];
                let v2 = kv_tile[t + 2u * D4 + d];
                let v3 = kv_tile[t + 3u * D4 + d];
// #endif
                add_weighted_values(&acc, &probs, d, v0, v1, v2, v3);
            }
        }
// #if SUBGROUP_KV
// #else
        workgroupBarrier();
// #endif
    }
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + lid + r * WG_SIZE;
        if (row < p.seq_q) {
            store_output_row(&acc, r, u.batch * p.o.batch + row * p.o.seq + u.head_q * p.o.head + p.o.offset, 1.0, true);
        }
    }
}
