// FlashAttention-2 backward pass: dQ, dK and dV from Q, K, V, O, dO and the
// forward's logsumexp, f32 arithmetic whatever the storage type. Three entry
// points, dispatched in this order by src/backward/dispatch.rs (and, with
// attention sinks, `sink_grads` below):
//
//   row_deltas   D_i = dO_i . O_i per query row (FlashAttention's
//                preprocessing), written to `deltas`.
//   key_grads    one workgroup per block of keys of one (unit, KV head):
//                each invocation keeps ROWS keys' K, V, dK and dV in
//                registers and walks every query row that sees the block
//                (every query head of the KV group, so GQA sums into dK and
//                dV here), staging Q and dO tiles in workgroup memory.
//   query_grads  one workgroup per block of query rows of one (unit, query
//                head), the forward's layout: each invocation keeps ROWS
//                rows' Q, dO and dQ and walks the visible keys, staging K and
//                V tiles.
//
// With BLOCKED_BACKWARD (Tier::RegisterBlocked forced), key_grads and
// query_grads are flash_backward_blocked.wgsl's, appended to this file:
// micro-tiled for hardware GPUs, sharing everything here above them.
//
// P is recomputed from the scores and the saved logsumexp in both gradient
// passes; nothing is accumulated across workgroups, so no atomics are needed
// and every run gives the same bits. A unit (`BackwardUnit`, workgroups' y)
// is a batch entry of a dense call or a sequence of a padded or packed one:
// every sequence runs in the same dispatch. Per (query i, key j), in
// natural units:
//   P = exp(s - lse_i), dP = dO_i . v_j, dS = P (dP - D_i),
//   dX = dS * scale * (softcap ? 1 - tanh(t / cap)^2 : 1)   (t = scale q.k)
//   dQ_i += dX k_j, dK_j += dX q_i, dV_j += P dO_i.
//
// Bindings 0-6 come from attention_common.wgsl: `o_buf` (binding 4) holds O in
// row_deltas, dK in key_grads and dQ in query_grads, with `p.o` its strides;
// `lse_buf` holds the forward's logsumexp (read only here).
//
// Generated constants (src/shaders/, `BackwardTiling`):
//   D4       query/key head-dim capacity / 4: the smallest power of two >=
//            the call's head dim (>= 8) over 4, so one pipeline serves a
//            range of head dims. Elements past the call's head dim
//            (`bp.head_dim4`) load as 0 and are never stored.
//   DV4      the same for values (V, O, dO, dV; `bp.head_dim_v4`): DeepSeek's
//            192/128 prefill holds 256 and 128 wide rows.
//   WG_SIZE  invocations per workgroup
//   ROWS     keys (key_grads) or query rows (query_grads) per invocation
//   BLOCK    query rows (key_grads) or keys (query_grads) per staged tile
//   STAGE    ceil(BLOCK * D4 / WG_SIZE): staging trips per invocation (Q or
//            K tiles), STAGE_V ceil(BLOCK * DV4 / WG_SIZE) (dO or V tiles)
//   SLOTS    ceil((D4 + DV4) / WG_SIZE): with SUBGROUP_BROADCAST, vec4s of a
//            row pair each lane loads
//
// How the staged rows (key pass: q and dO; query pass: k and v) reach every
// invocation:
//   default             tiles of BLOCK rows in workgroup memory, a barrier
//                       per tile;
//   SUBGROUP_BROADCAST  the workgroup is one subgroup (WG_SIZE is the
//                       adapter's smallest subgroup size): each lane loads a
//                       share of one row from storage and subgroupBroadcast
//                       hands it to all lanes; no barriers (2x the tile path
//                       on lavapipe, BENCHMARKS.md).

// Twin of `BackwardParams` in src/params.rs.
struct BackwardParams {
    // The call's query/key head dim / 4 and value head dim / 4 (both <=
    // D4): Q, K, dQ, dK go to head_dim4; V, O, dO, dV to head_dim_v4.
    head_dim4: u32,
    head_dim_v4: u32,
    // Query heads per KV head.
    group: u32,
    // Softmax scale in natural units (the chain rule's factor).
    scale: f32,
    // 0: no mask, 1: additive bias (f32 bits), 2: boolean (a bit per key).
    mask_kind: u32,
    // Mask words between batch entries, heads and query rows.
    mask_batch: u32,
    mask_head: u32,
    mask_row_words: u32,
    // Logsumexp and deltas, [batch, heads_q, rows] in floats.
    stats_batch: u32,
    stats_head: u32,
    _pad0: u32,
    _pad1: u32,
    // The dO view and the dV view, in vec4s.
    d_out: TensorStrides,
    dv: TensorStrides,
}

@group(0) @binding(7) var<uniform> bp: BackwardParams;
// #if HALF_STORAGE
@group(0) @binding(8) var<storage, read> do_buf: array<vec2<u32>>;
@group(0) @binding(10) var<storage, read_write> dv_buf: array<vec2<u32>>;
// #else
@group(0) @binding(8) var<storage, read> do_buf: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dv_buf: array<vec4<f32>>;
// #endif
// D per query row, indexed like the logsumexp.
@group(0) @binding(9) var<storage, read_write> deltas: array<f32>;
// A masked call's mask words, or a padded or packed call's unit table
// (FLAG_SEQUENCES: UNIT_WORDS words per `BackwardUnit`); masks are dense,
// so a call never needs both.
@group(0) @binding(11) var<storage, read> table_words: array<u32>;

// Twin of `BackwardUnit` in src/params.rs: what workgroups with y = the
// unit's index work on (heads run along z, the slowest axis, as in the
// forward). A dense call's unit y is batch entry y whole; a padded or
// packed call's units are its sequences, all in one dispatch.
struct BackwardUnit {
    // Batch entry and first row of the unit's queries (Q, O, dO, dQ and
    // their logsumexp and deltas).
    q_batch: u32,
    q_start: u32,
    // Query rows that attend; rows from q_len to extent_q are padding and
    // get zero gradients.
    q_len: u32,
    extent_q: u32,
    // Batch entry and first row of the unit's keys (K, V, dK, dV).
    kv_batch: u32,
    kv_start: u32,
    // Keys that are attended; keys from kv_len to extent_kv are padding
    // and get zero gradients.
    kv_len: u32,
    extent_kv: u32,
}
const UNIT_WORDS: u32 = 8u;

// The unit of workgroups with y = `index`. Identical in every invocation
// of a workgroup (read-only storage at a uniform index), so control flow
// that depends on it stays uniform.
fn unit_of(index: u32) -> BackwardUnit {
    if (has_flag(FLAG_SEQUENCES)) {
        let w = index * UNIT_WORDS;
        return BackwardUnit(table_words[w], table_words[w + 1u], table_words[w + 2u], table_words[w + 3u],
            table_words[w + 4u], table_words[w + 5u], table_words[w + 6u], table_words[w + 7u]);
    }
    return BackwardUnit(index, 0u, p.seq_q, p.seq_q, index, 0u, p.seq_kv, p.seq_kv);
}

// Where the unit's query rows sit on its key axis: its queries align with
// the end of its keys (bottom-right), as in the forward.
fn unit_diag(u: BackwardUnit) -> i32 {
    return i32(u.kv_len) - i32(u.q_len);
}

// The query rows (lo, hi; none when hi < lo) that may see a key of the
// block key0 .. key0 + block_len - 1 of unit `u`: row i sits at key
// position i + diag and sees keys [pos - left, pos + right].
fn rows_seeing_keys(u: BackwardUnit, key0: u32, block_len: u32) -> vec2<i32> {
    let diag = unit_diag(u);
    let block_hi = min(i32(key0 + block_len), i32(u.kv_len)) - 1;
    var rows = vec2<i32>(0, i32(u.q_len) - 1);
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        rows.x = max(rows.x, i32(key0) - i32(p.window_right) - diag);
    }
    if (has_flag(FLAG_WINDOW_LEFT)) {
        rows.y = min(rows.y, block_hi + i32(p.window_left) - diag);
    }
    if (block_hi < i32(key0)) {
        rows.y = -1;
    }
    return rows;
}

// The keys (lo, hi; none when hi < lo) that some query row of the block
// row0 .. row0 + block_len - 1 of unit `u` may see.
fn keys_seen_by_rows(u: BackwardUnit, row0: u32, block_len: u32) -> vec2<i32> {
    let diag = unit_diag(u);
    let block_last = min(row0 + block_len, max(u.q_len, 1u)) - 1u;
    var keys = vec2<i32>(0, i32(u.kv_len) - 1);
    if (has_flag(FLAG_WINDOW_LEFT)) {
        keys.x = max(keys.x, i32(row0) + diag - i32(p.window_left));
    }
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        keys.y = min(keys.y, i32(block_last) + diag + i32(p.window_right));
    }
    if (row0 >= u.q_len) {
        keys.y = -1;
    }
    return keys;
}

// #if HALF_STORAGE
fn load_do(i: u32) -> vec4<f32> {
    return unpack4(do_buf[i]);
}

fn load_o(i: u32) -> vec4<f32> {
    return unpack4(o_buf[i]);
}

// #if BF16_STORAGE
fn pack_grad(v: vec4<f32>) -> vec2<u32> {
    return bf16x4_narrow(v);
}
// #else
// Gradients, unlike outputs, are not bounded by the inputs: a value past
// f16's range is stored as the infinity it rounds to (half_codec.wgsl).
fn pack_grad(v: vec4<f32>) -> vec2<u32> {
    return f16x4_narrow_saturating(v);
}
// #endif
// #else
fn load_do(i: u32) -> vec4<f32> {
    return do_buf[i];
}

fn load_o(i: u32) -> vec4<f32> {
    return o_buf[i];
}

fn pack_grad(v: vec4<f32>) -> vec4<f32> {
    return v;
}
// #endif

// Element offsets (in vec4s) of head-dim slot 0 of query row `row` or key
// `key` of unit `u`.
fn q_row(u: BackwardUnit, row: u32, head: u32) -> u32 {
    return u.q_batch * p.q.batch + (u.q_start + row) * p.q.seq + head * p.q.head + p.q.offset;
}

fn do_row(u: BackwardUnit, row: u32, head: u32) -> u32 {
    return u.q_batch * bp.d_out.batch + (u.q_start + row) * bp.d_out.seq + head * bp.d_out.head + bp.d_out.offset;
}

// O (row_deltas) or dQ (query_grads): the query side's written binding.
fn o_row(u: BackwardUnit, row: u32, head: u32) -> u32 {
    return u.q_batch * p.o.batch + (u.q_start + row) * p.o.seq + head * p.o.head + p.o.offset;
}

fn k_row(u: BackwardUnit, key: u32, head_kv: u32) -> u32 {
    return u.kv_batch * p.k.batch + (u.kv_start + key) * p.k.seq + head_kv * p.k.head + p.k.offset;
}

fn v_row(u: BackwardUnit, key: u32, head_kv: u32) -> u32 {
    return u.kv_batch * p.v.batch + (u.kv_start + key) * p.v.seq + head_kv * p.v.head + p.v.offset;
}

fn stats_index(u: BackwardUnit, head: u32, row: u32) -> u32 {
    return u.q_batch * bp.stats_batch + head * bp.stats_head + u.q_start + row;
}

// P and dX (the gradient of the raw dot product q . k) of one (query, key)
// pair; both 0 for a pair the options or the mask hide. `lse` is the row's
// logsumexp (natural units, like the scores).
fn pair_grads(dot: f32, dp: f32, u: BackwardUnit, head_q: u32, row: u32, row_pos: i32, key: i32,
    slope: f32, lse: f32, delta: f32) -> vec2<f32> {
    let bounds = visible_keys(row_pos, u.kv_len);
    if (key < bounds.x || key > bounds.y) {
        return vec2<f32>(0.0);
    }
    var s = finish_scores(vec4<f32>(dot), row_pos, vec4<i32>(key), slope).x;
    if (bp.mask_kind != 0u) {
        // Masked calls are dense: the unit is batch entry q_batch whole.
        let base = u.q_batch * bp.mask_batch + head_q * bp.mask_head + row * bp.mask_row_words;
        if (bp.mask_kind == 1u) {
            let bits = table_words[base + u32(key)];
            // -inf hides the key, whatever its score.
            if (bits == NEG_INF_BITS) {
                return vec2<f32>(0.0);
            }
            s += bitcast<f32>(bits);
        } else if (((table_words[base + u32(key) / 32u] >> (u32(key) % 32u)) & 1u) == 0u) {
            return vec2<f32>(0.0);
        }
    }
    let prob = exp2((s - lse) * LOG2_E);
    var dx = prob * (dp - delta) * bp.scale;
    if (has_flag(FLAG_SOFTCAP)) {
        // With softcap the score scale is in natural units.
        let th = tanh(dot * p.score_scale / p.softcap);
        dx *= 1.0 - th * th;
    }
    return vec2<f32>(prob, dx);
}

// #if SUBGROUP_BROADCAST
// Element j of the D4 + DV4 vec4s of one row pair, a then b: q and dO of a
// query row (key pass) or k and v of a key (query pass), from `a_base` and
// `b_base`; zero past each side's head dim.
fn row_element(from_kv: bool, a_base: u32, b_base: u32, j: u32) -> vec4<f32> {
    let on_b = j >= D4;
    let d = select(j, j - D4, on_b);
    if (j >= D4 + DV4 || d >= select(bp.head_dim4, bp.head_dim_v4, on_b)) {
        return vec4<f32>(0.0);
    }
    if (from_kv) {
        if (!on_b) {
            return load_k(a_base + d);
        }
        return load_v(b_base + d);
    }
    if (!on_b) {
        return load_q(a_base + d);
    }
    return load_do(b_base + d);
}
// #endif

// Whether the scores are the scaled dot products alone (no softcap, ALiBi
// or mask): then pairs that the window bounds cannot hide take
// `plain_grads`.
fn plain_scores() -> bool {
    return (p.flags & (FLAG_SOFTCAP | FLAG_ALIBI)) == 0u && bp.mask_kind == 0u;
}

// `pair_grads` of a visible pair when `plain_scores()` holds.
fn plain_grads(dot: f32, dp: f32, lse: f32, delta: f32) -> vec2<f32> {
    let prob = exp2(fma(dot, p.score_scale, -lse) * LOG2_E);
    return vec2<f32>(prob, prob * (dp - delta) * bp.scale);
}

@compute @workgroup_size(64)
fn row_deltas(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.x;
    let u = unit_of(id.y);
    let head = id.z;
    if (row >= u.extent_q) {
        return;
    }
    var sum = 0.0;
    let g = do_row(u, row, head);
    let o = o_row(u, row, head);
    // The same fused order as the kernels' dP = dO.V: where a row sees one
    // key, O is that key's V and D must equal dP bit for bit, so that
    // dS = P (dP - D) is exactly 0 as the definition says.
    for (var d = 0u; d < bp.head_dim_v4; d++) {
        sum = fma_dot(load_do(g + d), load_o(o + d), sum);
    }
    deltas[stats_index(u, head, row)] = sum;
}

// Per query head h: dsink_h = -sum over batch entries and rows of
// exp(sink_h - lse) * D. The sink is a key whose value is 0, so its dP is
// 0 and its dS is P_sink (0 - D). One dispatch per call, over the whole
// [p.batch, p.heads_q, p.seq_q] logsumexp and deltas (rows with lse = +inf,
// padding or rows with no key, add 0); one workgroup per head. Each
// invocation sums a strided share of the rows in order and a fixed tree
// adds the shares, so every run gives the same bits. The result goes to
// deltas[p.batch * p.heads_q * p.seq_q + h], past the rows.
const SINK_WG: u32 = 64u;
var<workgroup> sink_shares: array<f32, SINK_WG>;

@compute @workgroup_size(SINK_WG)
fn sink_grads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wg.x;
    let sink = head_table[p.sink_offset + head];
    var sum = 0.0;
    for (var b = 0u; b < p.batch; b++) {
        let base = (b * p.heads_q + head) * p.seq_q;
        for (var i = lid; i < p.seq_q; i += SINK_WG) {
            sum = fma(exp2((sink - lse_buf[base + i]) * LOG2_E), deltas[base + i], sum);
        }
    }
    sink_shares[lid] = sum;
    workgroupBarrier();
    for (var stride = SINK_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            sink_shares[lid] += sink_shares[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        deltas[p.batch * p.heads_q * p.seq_q + head] = -sink_shares[0];
    }
}

// The gradient passes: register-blocked ones (flash_backward_blocked.wgsl,
// appended to this file) or the ones below.
// #if BLOCKED_BACKWARD
// #else
// Staged tiles: Q and dO rows (key_grads) or K and V rows (query_grads),
// and per staged query row its logsumexp and delta.
var<workgroup> tile_a: array<vec4<f32>, BLOCK * D4>;
var<workgroup> tile_b: array<vec4<f32>, BLOCK * DV4>;
var<workgroup> row_stats: array<vec2<f32>, BLOCK>;

@compute @workgroup_size(WG_SIZE)
fn key_grads(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
// #if SUBGROUP_BROADCAST
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let u = unit_of(wg.y);
    let head_kv = wg.z;
    let key0 = paired_block(wg.x, groups.x) * WG_SIZE * ROWS;
    // Workgroups past a shorter unit's keys (the dispatch covers the
    // longest); uniform across the workgroup.
    if (key0 >= u.extent_kv) {
        return;
    }
    let diag = unit_diag(u);
    // Keys past kv_len (padding) see no query; the index is clamped for loads.
    let last_key = max(u.kv_len, 1u) - 1u;

    var k: array<vec4<f32>, ROWS * D4>;
    var v: array<vec4<f32>, ROWS * DV4>;
    var dk: array<vec4<f32>, ROWS * D4>;
    var dv: array<vec4<f32>, ROWS * DV4>;
    var key_pos: array<i32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let key = key0 + lid + r * WG_SIZE;
        key_pos[r] = i32(key);
        let at = min(key, last_key);
        let k_base = k_row(u, at, head_kv);
        let v_base = v_row(u, at, head_kv);
        for (var d = 0u; d < D4; d++) {
            var kk = vec4<f32>(0.0);
            if (d < bp.head_dim4) {
                kk = load_k(k_base + d);
            }
            k[r * D4 + d] = kk;
            dk[r * D4 + d] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < DV4; d++) {
            var vv = vec4<f32>(0.0);
            if (d < bp.head_dim_v4) {
                vv = load_v(v_base + d);
            }
            v[r * DV4 + d] = vv;
            dv[r * DV4 + d] = vec4<f32>(0.0);
        }
    }

    // Query rows some key of the block is visible to.
    let rows_seen = rows_seeing_keys(u, key0, WG_SIZE * ROWS);
    let row_lo = rows_seen.x;
    let row_hi = rows_seen.y;
    // The block's last key, whether past seq_kv or not.
    let block_end = i32(key0 + WG_SIZE * ROWS) - 1;
    let plain = plain_scores();

    for (var g = 0u; g < bp.group; g++) {
        let head_q = head_kv * bp.group + g;
        let slope = alibi_slope_of(u.q_batch, head_q);
        // The query row's q and dO, in every invocation.
        var qrow: array<vec4<f32>, D4>;
        var grow: array<vec4<f32>, DV4>;
// #if SUBGROUP_BROADCAST
        // No staging: each lane loads a share of the row from storage and
        // broadcasts it (the workgroup is one subgroup).
        for (var i = row_lo; i <= row_hi; i++) {
            let row = u32(i);
            var slab: array<vec4<f32>, SLOTS>;
            for (var slot = 0u; slot < SLOTS; slot++) {
                slab[slot] = row_element(false, q_row(u, row, head_q), do_row(u, row, head_q),
                    lane + WG_SIZE * slot);
            }
            for (var d = 0u; d < D4; d++) {
                qrow[d] = subgroupBroadcast(slab[d / WG_SIZE], d % WG_SIZE);
            }
            for (var d = 0u; d < DV4; d++) {
                grow[d] = subgroupBroadcast(slab[(D4 + d) / WG_SIZE], (D4 + d) % WG_SIZE);
            }
            let at = stats_index(u, head_q, row);
            let stats = vec2<f32>(lse_buf[at], deltas[at]);
// #else
        for (var i0 = row_lo; i0 <= row_hi; i0 += i32(BLOCK)) {
            let n_rows = u32(min(i32(BLOCK), row_hi + 1 - i0));
            for (var s = 0u; s < STAGE; s++) {
                let e = lid + s * WG_SIZE;
                if (e < BLOCK * D4) {
                    let row = e / D4;
                    let d = e % D4;
                    var qq = vec4<f32>(0.0);
                    let i = u32(i0) + min(row, n_rows - 1u);
                    if (row < n_rows && d < bp.head_dim4) {
                        qq = load_q(q_row(u, i, head_q) + d);
                    }
                    tile_a[e] = qq;
                    if (d == 0u) {
                        let at = stats_index(u, head_q, i);
                        row_stats[row] = vec2<f32>(lse_buf[at], deltas[at]);
                    }
                }
            }
            for (var s = 0u; s < STAGE_V; s++) {
                let e = lid + s * WG_SIZE;
                if (e < BLOCK * DV4) {
                    let row = e / DV4;
                    let d = e % DV4;
                    var gg = vec4<f32>(0.0);
                    if (row < n_rows && d < bp.head_dim_v4) {
                        gg = load_do(do_row(u, u32(i0) + row, head_q) + d);
                    }
                    tile_b[e] = gg;
                }
            }
            workgroupBarrier();
            for (var ii = 0u; ii < n_rows; ii++) {
                let row = u32(i0) + ii;
                for (var d = 0u; d < D4; d++) {
                    qrow[d] = tile_a[ii * D4 + d];
                }
                for (var d = 0u; d < DV4; d++) {
                    grow[d] = tile_b[ii * DV4 + d];
                }
                let stats = row_stats[ii];
// #endif
                let row_pos = i32(row) + diag;
                var dots: array<f32, ROWS>;
                var dps: array<f32, ROWS>;
                for (var r = 0u; r < ROWS; r++) {
                    dots[r] = 0.0;
                    dps[r] = 0.0;
                }
                for (var d = 0u; d < D4; d++) {
                    for (var r = 0u; r < ROWS; r++) {
                        dots[r] = fma_dot(qrow[d], k[r * D4 + d], dots[r]);
                    }
                }
                for (var d = 0u; d < DV4; d++) {
                    for (var r = 0u; r < ROWS; r++) {
                        dps[r] = fma_dot(grow[d], v[r * DV4 + d], dps[r]);
                    }
                }
// #if DROPOUT
                // Dropout: dP and P's share of dV only where the forward
                // kept the pair, scaled as it was.
                var drop: array<f32, ROWS>;
                let state = dropout_row_state(wg.y, head_q, row);
                for (var r = 0u; r < ROWS; r++) {
                    drop[r] = dropout_scale_of(state, key_pos[r]);
                    dps[r] *= drop[r];
                }
// #endif
                var grads: array<vec2<f32>, ROWS>;
                // The row sees every key of the block (the common case).
                let bounds = visible_keys(row_pos, u.kv_len);
                if (plain && bounds.x <= i32(key0) && bounds.y >= block_end) {
                    for (var r = 0u; r < ROWS; r++) {
                        grads[r] = plain_grads(dots[r], dps[r], stats.x, stats.y);
                    }
                } else {
                    for (var r = 0u; r < ROWS; r++) {
                        grads[r] = pair_grads(dots[r], dps[r], u, head_q, row, row_pos, key_pos[r],
                            slope, stats.x, stats.y);
                    }
                }
// #if DROPOUT
                for (var r = 0u; r < ROWS; r++) {
                    grads[r].x *= drop[r];
                }
// #endif
                for (var d = 0u; d < DV4; d++) {
                    for (var r = 0u; r < ROWS; r++) {
                        dv[r * DV4 + d] = fma(vec4<f32>(grads[r].x), grow[d], dv[r * DV4 + d]);
                    }
                }
                for (var d = 0u; d < D4; d++) {
                    for (var r = 0u; r < ROWS; r++) {
                        dk[r * D4 + d] = fma(vec4<f32>(grads[r].y), qrow[d], dk[r * D4 + d]);
                    }
                }
// #if SUBGROUP_BROADCAST
        }
// #else
            }
            workgroupBarrier();
        }
// #endif
    }

    for (var r = 0u; r < ROWS; r++) {
        let key = key0 + lid + r * WG_SIZE;
        if (key < u.extent_kv) {
            // dK in the written binding (`p.o` its strides), dV in dv_buf.
            let k_out = u.kv_batch * p.o.batch + (u.kv_start + key) * p.o.seq + head_kv * p.o.head + p.o.offset;
            let v_out = u.kv_batch * bp.dv.batch + (u.kv_start + key) * bp.dv.seq + head_kv * bp.dv.head
                + bp.dv.offset;
            for (var d = 0u; d < D4; d++) {
                if (d < bp.head_dim4) {
                    o_buf[k_out + d] = pack_grad(dk[r * D4 + d]);
                }
            }
            for (var d = 0u; d < DV4; d++) {
                if (d < bp.head_dim_v4) {
                    dv_buf[v_out + d] = pack_grad(dv[r * DV4 + d]);
                }
            }
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn query_grads(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
// #if SUBGROUP_BROADCAST
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let u = unit_of(wg.y);
    let head_q = wg.z;
    let head_kv = head_q / bp.group;
    let row0 = paired_block(wg.x, groups.x) * WG_SIZE * ROWS;
    // Workgroups past a shorter unit's rows (the dispatch covers the
    // longest); uniform across the workgroup.
    if (row0 >= u.extent_q) {
        return;
    }
    let diag = unit_diag(u);
    // Rows past q_len (padding) compute on a copy of the last row and are
    // written as zeros.
    let last_row = max(u.q_len, 1u) - 1u;
    let slope = alibi_slope_of(u.q_batch, head_q);

    var q: array<vec4<f32>, ROWS * D4>;
    var g: array<vec4<f32>, ROWS * DV4>;
    var dq: array<vec4<f32>, ROWS * D4>;
    var lse_row: array<f32, ROWS>;
    var delta: array<f32, ROWS>;
// #if DROPOUT
    // Each row's dropout hash state (the unit is the sequence, as in the
    // forward).
    var drop_state: array<u32, ROWS>;
// #endif
    for (var r = 0u; r < ROWS; r++) {
        let row = min(row0 + lid + r * WG_SIZE, last_row);
        let q_base = q_row(u, row, head_q);
        let g_base = do_row(u, row, head_q);
        for (var d = 0u; d < D4; d++) {
            var qq = vec4<f32>(0.0);
            if (d < bp.head_dim4) {
                qq = load_q(q_base + d);
            }
            q[r * D4 + d] = qq;
            dq[r * D4 + d] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < DV4; d++) {
            var gg = vec4<f32>(0.0);
            if (d < bp.head_dim_v4) {
                gg = load_do(g_base + d);
            }
            g[r * DV4 + d] = gg;
        }
        let at = stats_index(u, head_q, row);
        lse_row[r] = lse_buf[at];
        delta[r] = deltas[at];
// #if DROPOUT
        drop_state[r] = dropout_row_state(wg.y, head_q, row);
// #endif
    }

    // Keys some row of the block sees (the forward's tile range).
    let keys_seen = keys_seen_by_rows(u, row0, WG_SIZE * ROWS);
    let key_lo = keys_seen.x;
    let key_hi = keys_seen.y;
    // Keys every row of the block sees; rows past seq_q (padding) see
    // whatever the last row sees, and are never stored.
    let block_end = row0 + WG_SIZE * ROWS - 1u;
    let all_lo = visible_keys(i32(min(block_end, last_row)) + diag, u.kv_len).x;
    let all_hi = visible_keys(i32(row0) + diag, u.kv_len).y;
    let plain = plain_scores();

    let k_base = k_row(u, 0u, head_kv);
    let v_base = v_row(u, 0u, head_kv);
    // The key's k and v, in every invocation.
    var krow: array<vec4<f32>, D4>;
    var vrow: array<vec4<f32>, DV4>;
// #if SUBGROUP_BROADCAST
    for (var key = key_lo; key <= key_hi; key++) {
        var slab: array<vec4<f32>, SLOTS>;
        for (var slot = 0u; slot < SLOTS; slot++) {
            slab[slot] = row_element(true, k_base + u32(key) * p.k.seq, v_base + u32(key) * p.v.seq,
                lane + WG_SIZE * slot);
        }
        for (var d = 0u; d < D4; d++) {
            krow[d] = subgroupBroadcast(slab[d / WG_SIZE], d % WG_SIZE);
        }
        for (var d = 0u; d < DV4; d++) {
            vrow[d] = subgroupBroadcast(slab[(D4 + d) / WG_SIZE], (D4 + d) % WG_SIZE);
        }
// #else
    for (var kv0 = key_lo; kv0 <= key_hi; kv0 += i32(BLOCK)) {
        let n_keys = u32(min(i32(BLOCK), key_hi + 1 - kv0));
        for (var s = 0u; s < STAGE; s++) {
            let e = lid + s * WG_SIZE;
            if (e < BLOCK * D4) {
                let key = e / D4;
                let d = e % D4;
                var kk = vec4<f32>(0.0);
                if (key < n_keys && d < bp.head_dim4) {
                    kk = load_k(k_base + (u32(kv0) + key) * p.k.seq + d);
                }
                tile_a[e] = kk;
            }
        }
        for (var s = 0u; s < STAGE_V; s++) {
            let e = lid + s * WG_SIZE;
            if (e < BLOCK * DV4) {
                let key = e / DV4;
                let d = e % DV4;
                var vv = vec4<f32>(0.0);
                if (key < n_keys && d < bp.head_dim_v4) {
                    vv = load_v(v_base + (u32(kv0) + key) * p.v.seq + d);
                }
                tile_b[e] = vv;
            }
        }
        workgroupBarrier();
        for (var jj = 0u; jj < n_keys; jj++) {
            let key = kv0 + i32(jj);
            for (var d = 0u; d < D4; d++) {
                krow[d] = tile_a[jj * D4 + d];
            }
            for (var d = 0u; d < DV4; d++) {
                vrow[d] = tile_b[jj * DV4 + d];
            }
// #endif
            var dots: array<f32, ROWS>;
            var dps: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                dots[r] = 0.0;
                dps[r] = 0.0;
            }
            for (var d = 0u; d < D4; d++) {
                for (var r = 0u; r < ROWS; r++) {
                    dots[r] = fma_dot(q[r * D4 + d], krow[d], dots[r]);
                }
            }
            for (var d = 0u; d < DV4; d++) {
                for (var r = 0u; r < ROWS; r++) {
                    dps[r] = fma_dot(g[r * DV4 + d], vrow[d], dps[r]);
                }
            }
// #if DROPOUT
            // Dropout: dP only where the forward kept the pair, scaled.
            for (var r = 0u; r < ROWS; r++) {
                dps[r] *= dropout_scale_of(drop_state[r], key);
            }
// #endif
            var dx: array<f32, ROWS>;
            // Every row of the block sees the key (the common case).
            if (plain && key >= all_lo && key <= all_hi) {
                for (var r = 0u; r < ROWS; r++) {
                    dx[r] = plain_grads(dots[r], dps[r], lse_row[r], delta[r]).y;
                }
            } else {
                for (var r = 0u; r < ROWS; r++) {
                    let row = min(row0 + lid + r * WG_SIZE, last_row);
                    dx[r] = pair_grads(dots[r], dps[r], u, head_q, row, i32(row) + diag, key,
                        slope, lse_row[r], delta[r]).y;
                }
            }
            for (var d = 0u; d < D4; d++) {
                for (var r = 0u; r < ROWS; r++) {
                    dq[r * D4 + d] = fma(vec4<f32>(dx[r]), krow[d], dq[r * D4 + d]);
                }
            }
// #if SUBGROUP_BROADCAST
    }
// #else
        }
        workgroupBarrier();
    }
// #endif

    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + lid + r * WG_SIZE;
        if (row < u.extent_q) {
            let out = o_row(u, row, head_q);
            let real = row < u.q_len;
            for (var d = 0u; d < D4; d++) {
                if (d < bp.head_dim4) {
                    o_buf[out + d] = pack_grad(select(vec4<f32>(0.0), dq[r * D4 + d], real));
                }
            }
        }
    }
}
// #endif
