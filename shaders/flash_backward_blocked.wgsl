// #if BLOCKED_BACKWARD
// Register-blocked FlashAttention-2 backward for hardware GPUs
// (Tier::RegisterBlocked forced on the backward): the same two gradient
// passes as flash_backward.wgsl above (whose parameters, bindings, units,
// row_deltas, sink_grads and pair gradients they share), with the entry
// point names `key_grads` and `query_grads`, but no invocation holds a
// whole head vector. There each invocation keeps its keys' (or rows') K,
// V, dK and dV (4 x head_dim floats: spilled at 64 and more on GPUs) and
// every FMA reads one staged element; here a workgroup of KEY_LANES x
// ROW_LANES invocations computes small matrix products in which each
// invocation owns a micro-tile, as the register-blocked forward does
// (flash_blocked.wgsl).
//
// Invocation `lid` is key lane a = lid / ROW_LANES and row lane b = lid %
// ROW_LANES. Per staged pair of a block of BLOCK_N = 4 * KEY_LANES keys and
// a block of BLOCK_M = ROW_LANES * ROWS query rows, it computes the dots
// q . k and dP = dO . v of rows b * ROWS .. b * ROWS + ROWS - 1 and keys
// 4a .. 4a + 3 (a ROWS x 4 micro-tile: each head-dim step reads ROWS vec4s
// of Q or dO and 4 of K or V for 4 * ROWS vec4 dots), then P and dX (the
// gradient of the raw dot, `pair_grads`) of those pairs into workgroup
// memory. Then:
//   key_grads    (one workgroup per BLOCK_N keys of one unit and KV head,
//                over the query blocks of every query head of the group):
//                dV += P^T dO and dK += dX^T Q; the invocation owns keys
//                4a .. 4a + 3 and the vec4 columns b, b + ROW_LANES, ... of
//                dK (COLS_K) and dV (COLS_V): per query row it reads its 4
//                weights and one vec4 per column for 4 FMAs each.
//   query_grads  (one workgroup per BLOCK_M query rows of one unit and query
//                head, over the key blocks they see): dQ += dX K; the
//                invocation owns rows b * ROWS .. and the vec4 columns a, a +
//                KEY_LANES, ... of dQ (COLS_Q).
//
// Generated constants (src/shaders/, `BlockedBackwardTiling`): D4, DV4
// (the call's head dims / 4), KEY_LANES, ROW_LANES, ROWS, WG_SIZE, BLOCK_N,
// BLOCK_M, COLS_K = ceil(D4 / ROW_LANES), COLS_V = ceil(DV4 / ROW_LANES),
// COLS_Q = ceil(D4 / KEY_LANES), QUAD = 4 (keys per key lane). Loops
// bounded by ROWS, the COLS and QUAD are unrolled by src/shaders/, so the
// private arrays they index stay in registers.

// Staged rows are one vec4 longer than their width: the key lanes read
// four keys' rows at once (and the row lanes their rows), and with an odd
// stride their vec4s fall in different banks.
const K_STRIDE: u32 = D4 + 1u;
const V_STRIDE: u32 = DV4 + 1u;
const Q_STRIDE: u32 = D4 + 1u;
const DO_STRIDE: u32 = DV4 + 1u;

// The staged keys (K, then V) and query rows (Q, dO, and per row its
// logsumexp and delta).
var<workgroup> key_block: array<vec4<f32>, BLOCK_N * K_STRIDE>;
var<workgroup> value_block: array<vec4<f32>, BLOCK_N * V_STRIDE>;
var<workgroup> query_block: array<vec4<f32>, BLOCK_M * Q_STRIDE>;
var<workgroup> grad_block: array<vec4<f32>, BLOCK_M * DO_STRIDE>;
var<workgroup> stats_block: array<vec2<f32>, BLOCK_M>;
// #if DROPOUT
// Per staged row, its dropout hash state (computed once per block instead
// of once per four keys).
var<workgroup> drop_block: array<u32, BLOCK_M>;
// #endif
// Per (query row of the block, key lane): the four keys' P (key pass only)
// and dX.
var<workgroup> probs_block: array<vec4<f32>, BLOCK_M * KEY_LANES>;
var<workgroup> dx_block: array<vec4<f32>, BLOCK_M * KEY_LANES>;

// Stages K and V of keys key0 .. key0 + BLOCK_N - 1 of unit `u` (zeros past
// its kv_len).
fn stage_key_block(u: BackwardUnit, head_kv: u32, key0: u32, lid: u32) {
    for (var e = lid; e < BLOCK_N * D4; e += WG_SIZE) {
        let n = e / D4;
        let d = e % D4;
        var kk = vec4<f32>(0.0);
        if (key0 + n < u.kv_len) {
            kk = load_k(k_row(u, key0 + n, head_kv) + d);
        }
        key_block[n * K_STRIDE + d] = kk;
    }
    for (var e = lid; e < BLOCK_N * DV4; e += WG_SIZE) {
        let n = e / DV4;
        let d = e % DV4;
        var vv = vec4<f32>(0.0);
        if (key0 + n < u.kv_len) {
            vv = load_v(v_row(u, key0 + n, head_kv) + d);
        }
        value_block[n * V_STRIDE + d] = vv;
    }
}

// Stages Q, dO, logsumexp and delta (and with dropout the hash state) of
// query rows row0 .. row0 + BLOCK_M - 1 of unit `u` (number `unit` along
// y) and head `head_q` (zeros past its q_len).
fn stage_query_block(u: BackwardUnit, unit: u32, head_q: u32, row0: u32, lid: u32) {
    for (var e = lid; e < BLOCK_M * D4; e += WG_SIZE) {
        let i = e / D4;
        let d = e % D4;
        var qq = vec4<f32>(0.0);
        if (row0 + i < u.q_len) {
            qq = load_q(q_row(u, row0 + i, head_q) + d);
        }
        query_block[i * Q_STRIDE + d] = qq;
    }
    for (var e = lid; e < BLOCK_M * DV4; e += WG_SIZE) {
        let i = e / DV4;
        let d = e % DV4;
        var gg = vec4<f32>(0.0);
        if (row0 + i < u.q_len) {
            gg = load_do(do_row(u, row0 + i, head_q) + d);
        }
        grad_block[i * DO_STRIDE + d] = gg;
    }
    for (var i = lid; i < BLOCK_M; i += WG_SIZE) {
        var stats = vec2<f32>(0.0);
        if (row0 + i < u.q_len) {
            let at = stats_index(u, head_q, row0 + i);
            stats = vec2<f32>(lse_buf[at], deltas[at]);
        }
        stats_block[i] = stats;
// #if DROPOUT
        drop_block[i] = dropout_row_state(unit, head_q, row0 + i);
// #endif
    }
}

// The raw dots q . k (`dots`) and dP = dO . v (`dps`) of the staged rows
// r0 .. r0 + ROWS - 1 with the staged keys 4a .. 4a + 3, one vec4 of keys
// per row.
fn micro_products(r0: u32, a: u32, dots: ptr<function, array<vec4<f32>, ROWS>>,
    dps: ptr<function, array<vec4<f32>, ROWS>>) {
    for (var r = 0u; r < ROWS; r++) {
        (*dots)[r] = vec4<f32>(0.0);
        (*dps)[r] = vec4<f32>(0.0);
    }
    let k0 = 4u * a * K_STRIDE;
    for (var d = 0u; d < D4; d++) {
        let ka = key_block[k0 + d];
        let kb = key_block[k0 + K_STRIDE + d];
        let kc = key_block[k0 + 2u * K_STRIDE + d];
        let kd = key_block[k0 + 3u * K_STRIDE + d];
        for (var r = 0u; r < ROWS; r++) {
            let q = query_block[(r0 + r) * Q_STRIDE + d];
            let acc = (*dots)[r];
            (*dots)[r] = vec4<f32>(fma_dot(q, ka, acc.x), fma_dot(q, kb, acc.y), fma_dot(q, kc, acc.z),
                fma_dot(q, kd, acc.w));
        }
    }
    let v0 = 4u * a * V_STRIDE;
    for (var d = 0u; d < DV4; d++) {
        let va = value_block[v0 + d];
        let vb = value_block[v0 + V_STRIDE + d];
        let vc = value_block[v0 + 2u * V_STRIDE + d];
        let vd = value_block[v0 + 3u * V_STRIDE + d];
        for (var r = 0u; r < ROWS; r++) {
            let g = grad_block[(r0 + r) * DO_STRIDE + d];
            let acc = (*dps)[r];
            (*dps)[r] = vec4<f32>(fma_dot(g, va, acc.x), fma_dot(g, vb, acc.y), fma_dot(g, vc, acc.z),
                fma_dot(g, vd, acc.w));
        }
    }
}

// P (column 0) and dX (column 1) of query row `row` of unit `u` (the row
// staged at `staged`) with keys first .. first + 3,
// from their dots and dP: zeros for a padding row and for pairs the
// options or the mask hide. With dropout, P (dV's weight) and dP count
// only where the forward kept the pair, scaled as it was.
fn quad_grads(u: BackwardUnit, head_q: u32, row: u32, staged: u32, first: i32, slope: f32,
    plain: bool, dots: vec4<f32>, dps: vec4<f32>) -> mat2x4<f32> {
    var probs = vec4<f32>(0.0);
    var dx = vec4<f32>(0.0);
    if (row < u.q_len) {
        var drop = vec4<f32>(1.0);
// #if DROPOUT
        drop = dropout_kept(drop_block[staged], vec4<i32>(first) + vec4<i32>(0, 1, 2, 3)) * dropout_keep_scale();
// #endif
        let kept_dps = dps * drop;
        let stats = stats_block[staged];
        let row_pos = i32(row) + unit_diag(u);
        let bounds = visible_keys(row_pos, u.kv_len);
        // The row sees all four keys (the common case).
        let all_seen = plain && bounds.x <= first && bounds.y >= first + 3;
        for (var j = 0u; j < QUAD; j++) {
            var grads: vec2<f32>;
            if (all_seen) {
                grads = plain_grads(dots[j], kept_dps[j], stats.x, stats.y);
            } else {
                grads = pair_grads(dots[j], kept_dps[j], u, head_q, row, row_pos, first + i32(j), slope, stats.x,
                    stats.y);
            }
            probs[j] = grads.x * drop[j];
            dx[j] = grads.y;
        }
    }
    return mat2x4<f32>(probs, dx);
}

@compute @workgroup_size(WG_SIZE)
fn key_grads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) groups: vec3<u32>) {
    let u = unit_of(wg.y);
    let head_kv = wg.z;
    let key0 = paired_block(wg.x, groups.x) * BLOCK_N;
    // Workgroups past a shorter unit's keys (the dispatch covers the
    // longest); uniform across the workgroup.
    if (key0 >= u.extent_kv) {
        return;
    }
    let a = lid / ROW_LANES;
    let b = lid % ROW_LANES;
    stage_key_block(u, head_kv, key0, lid);

    // Key 4a + j's column b + ROW_LANES * c at j * COLS + c.
    var dk: array<vec4<f32>, 4 * COLS_K>;
    var dv: array<vec4<f32>, 4 * COLS_V>;
    for (var j = 0u; j < QUAD; j++) {
        for (var c = 0u; c < COLS_K; c++) {
            dk[j * COLS_K + c] = vec4<f32>(0.0);
        }
        for (var c = 0u; c < COLS_V; c++) {
            dv[j * COLS_V + c] = vec4<f32>(0.0);
        }
    }

    // Query rows some key of the block is visible to.
    let rows_seen = rows_seeing_keys(u, key0, BLOCK_N);
    let row_lo = rows_seen.x;
    let row_hi = rows_seen.y;
    let plain = plain_scores();
    let first = i32(key0 + 4u * a);

    for (var g = 0u; g < bp.group; g++) {
        let head_q = head_kv * bp.group + g;
        let slope = alibi_slope_of(u.q_batch, head_q);
        for (var i0 = row_lo; i0 <= row_hi; i0 += i32(BLOCK_M)) {
            // The previous block is consumed (and the key block staged).
            workgroupBarrier();
            stage_query_block(u, wg.y, head_q, u32(i0), lid);
            workgroupBarrier();
            var dots: array<vec4<f32>, ROWS>;
            var dps: array<vec4<f32>, ROWS>;
            micro_products(b * ROWS, a, &dots, &dps);
            for (var r = 0u; r < ROWS; r++) {
                let staged = b * ROWS + r;
                let grads = quad_grads(u, head_q, u32(i0) + staged, staged, first, slope, plain, dots[r],
                    dps[r]);
                probs_block[staged * KEY_LANES + a] = grads[0];
                dx_block[staged * KEY_LANES + a] = grads[1];
            }
            workgroupBarrier();
            // dV += P^T dO and dK += dX^T Q over the block's rows (rows
            // past the unit's have P = dX = 0).
            for (var i = 0u; i < BLOCK_M; i++) {
                let probs = probs_block[i * KEY_LANES + a];
                let dx = dx_block[i * KEY_LANES + a];
                for (var c = 0u; c < COLS_V; c++) {
                    let col = b + ROW_LANES * c;
                    if (col < DV4) {
                        let gg = grad_block[i * DO_STRIDE + col];
                        for (var j = 0u; j < QUAD; j++) {
                            dv[j * COLS_V + c] = fma(vec4<f32>(probs[j]), gg, dv[j * COLS_V + c]);
                        }
                    }
                }
                for (var c = 0u; c < COLS_K; c++) {
                    let col = b + ROW_LANES * c;
                    if (col < D4) {
                        let qq = query_block[i * Q_STRIDE + col];
                        for (var j = 0u; j < QUAD; j++) {
                            dk[j * COLS_K + c] = fma(vec4<f32>(dx[j]), qq, dk[j * COLS_K + c]);
                        }
                    }
                }
            }
        }
    }

    for (var j = 0u; j < QUAD; j++) {
        let key = key0 + 4u * a + j;
        if (key < u.extent_kv) {
            // dK in the written binding (`p.o` its strides), dV in dv_buf.
            let k_out = u.kv_batch * p.o.batch + (u.kv_start + key) * p.o.seq + head_kv * p.o.head + p.o.offset;
            let v_out = u.kv_batch * bp.dv.batch + (u.kv_start + key) * bp.dv.seq + head_kv * bp.dv.head
                + bp.dv.offset;
            for (var c = 0u; c < COLS_K; c++) {
                let col = b + ROW_LANES * c;
                if (col < D4) {
                    o_buf[k_out + col] = pack_grad(dk[j * COLS_K + c]);
                }
            }
            for (var c = 0u; c < COLS_V; c++) {
                let col = b + ROW_LANES * c;
                if (col < DV4) {
                    dv_buf[v_out + col] = pack_grad(dv[j * COLS_V + c]);
                }
            }
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn query_grads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(num_workgroups) groups: vec3<u32>) {
    let u = unit_of(wg.y);
    let head_q = wg.z;
    let head_kv = head_q / bp.group;
    let row0 = paired_block(wg.x, groups.x) * BLOCK_M;
    // Workgroups past a shorter unit's rows; uniform across the workgroup.
    if (row0 >= u.extent_q) {
        return;
    }
    let a = lid / ROW_LANES;
    let b = lid % ROW_LANES;
    let slope = alibi_slope_of(u.q_batch, head_q);
    stage_query_block(u, wg.y, head_q, row0, lid);

    // Row b * ROWS + r's column a + KEY_LANES * c at r * COLS_Q + c.
    var dq: array<vec4<f32>, ROWS * COLS_Q>;
    for (var r = 0u; r < ROWS; r++) {
        for (var c = 0u; c < COLS_Q; c++) {
            dq[r * COLS_Q + c] = vec4<f32>(0.0);
        }
    }

    // Keys some row of the block sees.
    let keys_seen = keys_seen_by_rows(u, row0, BLOCK_M);
    let key_lo = keys_seen.x;
    let key_hi = keys_seen.y;
    let plain = plain_scores();

    for (var kv0 = key_lo; kv0 <= key_hi; kv0 += i32(BLOCK_N)) {
        // The previous key block is consumed (and the query block staged).
        workgroupBarrier();
        stage_key_block(u, head_kv, u32(kv0), lid);
        workgroupBarrier();
        var dots: array<vec4<f32>, ROWS>;
        var dps: array<vec4<f32>, ROWS>;
        micro_products(b * ROWS, a, &dots, &dps);
        let first = kv0 + i32(4u * a);
        for (var r = 0u; r < ROWS; r++) {
            let staged = b * ROWS + r;
            let grads = quad_grads(u, head_q, row0 + staged, staged, first, slope, plain, dots[r], dps[r]);
            dx_block[staged * KEY_LANES + a] = grads[1];
        }
        workgroupBarrier();
        // dQ += dX K over the block's keys (keys past the unit's are zeros
        // with dX = 0).
        for (var n4 = 0u; n4 < KEY_LANES; n4++) {
            var dx: array<vec4<f32>, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                dx[r] = dx_block[(b * ROWS + r) * KEY_LANES + n4];
            }
            for (var j = 0u; j < QUAD; j++) {
                let key = (4u * n4 + j) * K_STRIDE;
                for (var c = 0u; c < COLS_Q; c++) {
                    let col = a + KEY_LANES * c;
                    if (col < D4) {
                        let kk = key_block[key + col];
                        for (var r = 0u; r < ROWS; r++) {
                            dq[r * COLS_Q + c] = fma(vec4<f32>(dx[r][j]), kk, dq[r * COLS_Q + c]);
                        }
                    }
                }
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + b * ROWS + r;
        if (row < u.extent_q) {
            let out = o_row(u, row, head_q);
            let real = row < u.q_len;
            for (var c = 0u; c < COLS_Q; c++) {
                let col = a + KEY_LANES * c;
                if (col < D4) {
                    o_buf[out + col] = pack_grad(select(vec4<f32>(0.0), dq[r * COLS_Q + c], real));
                }
            }
        }
    }
}
// #endif
