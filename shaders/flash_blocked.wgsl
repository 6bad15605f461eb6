// Register-blocked FlashAttention-2 forward pass for hardware GPUs
// (Tier::RegisterBlocked): f32 arithmetic and softmax statistics, Q/K/V/O
// stored as f32, f16 or bf16 (attention_common.wgsl).
//
// flash_attention.wgsl gives each invocation whole query rows, so each
// holds q and its accumulator (2 x head_dim floats: spilled at 128 and
// more on GPUs) and every FMA costs one read of a K or V element. Here a
// workgroup of ROW_LANES x KEY_LANES invocations owns BLOCK_M = ROW_LANES *
// ROWS query rows, staged once in workgroup memory, and walks the keys in
// tiles of BLOCK_N = 4 * KEY_LANES. Invocation (row lane a, key lane b)
// owns rows a * ROWS .. a * ROWS + ROWS - 1 of the block and
//   - for S = Q K^T: the tile's keys 4b .. 4b + 3, a ROWS x 4 micro-tile
//     (each step reads ROWS vec4s of Q and 4 of K for 4 * ROWS vec4 dots);
//   - for O += P V: the value vec4 columns b, b + KEY_LANES, ... (COLS of
//     them), a ROWS x COLS micro-tile (each four-key step reads ROWS vec4s
//     of P and 4 * COLS of V for 4 * ROWS * COLS vec4 FMAs).
// A row's running max is shared by its KEY_LANES invocations (reduced
// through workgroup memory each tile); each keeps a partial running sum
// over its own keys, added up once at the end. The online softmax, masks,
// windows, sinks, padded and variable-length sequences and key chunks
// follow flash_attention.wgsl exactly (whose sequence-table, carry and mask
// declarations src/shaders/ prepends to this file). For GQA calls with
// fewer query rows than a block, the rows of a block are (query row, head)
// pairs of one KV head's query heads (BLOCKED_GROUP_ROWS), so a decoding
// step's heads share every K/V tile.
//
// F16_PRODUCTS (AttentionConfig::f16_products, f16 storage, SHADER_F16):
// the Q block, the K/V tile and the probabilities are f16 in workgroup
// memory (half the bytes to stage and read), and S = Q K^T and O += P V
// multiply f16 operands exactly (a product of two f16 values fits f32) and
// sum in f32: f16 operands, f32 accumulation, as on matrix units. Sums in
// f16 were tried first; their rounding grows with the partial sums and
// broke FlashAttention's rule at d=232 with a sharp scale (fuzz seed
// 20350103: 2.4 times standard f16 attention's error). Products rounded to
// f16 (f16 multiplications, four per instruction) came next and broke it
// with a negative scale over few keys (seed 20634578: 2.2 times). The
// softmax stays f32.
//
// Generated constants (src/shaders/, `BlockedTiling`): D4, DV4 (head
// dims / 4), ROW_LANES, KEY_LANES, ROWS, COLS = ceil(DV4 / KEY_LANES),
// WG_SIZE = ROW_LANES * KEY_LANES, BLOCK_N = 4 * KEY_LANES, PASSES
// (BlockedTiling::passes), KV_TILE (vec4s of the K/V tile: a pass's K or
// V), Q_STRIDE and P_STRIDE (vec4s between the Q block's and the
// probabilities' rows: D4 and KEY_LANES, made odd where they fit,
// BlockedTiling::pad_rows), STAGE_BATCH (loads in flight per invocation
// while staging), D_STEP (head-dim vec4s a trip of the scores' loop,
// dividing DK4). Loops bounded by ROWS, COLS and
// STAGE_BATCH are unrolled by src/shaders/, so the private arrays they
// index stay in registers; so are those bounded by KEY_LANES and D_STEP,
// which would otherwise carry wgpu's loop counters.

const BLOCK_M: u32 = ROW_LANES * ROWS;
// Q, K and V are staged in batches: each invocation issues STAGE_BATCH
// loads from the storage buffers into registers, then stores them all to
// workgroup memory, so that a batch's loads are in flight together
// instead of each waiting out the memory's latency before the next.
const STAGED_VEC4S: u32 = WG_SIZE * STAGE_BATCH;
// Bit of Params.flags (twin of params::blocked_flags::GROUP_ROWS): the
// block's rows are (query row, head) pairs of one KV head's group of query
// heads, head fastest, and workgroups along z are KV heads, so the group
// reads each K/V tile once. The planner sets it for GQA calls with fewer
// query rows than a block (decoding-like shapes); never with a mask.
const BLOCKED_GROUP_ROWS: u32 = 128u;
// K rows are staged one vec4 apart beyond their width: the key lanes of a
// row lane read four keys' rows at once, and with an odd stride their
// vec4s fall in different banks.
const K_STRIDE: u32 = DK4 + 1u;
// The tile in PASSES passes (BlockedTiling::passes): the scores over DK4
// head-dim vec4s of K at a time, P V over PASS_KEYS keys' V at a time
// (PASS_STEPS four-key steps), so that a caller's larger tile fits the
// workgroup memory at the price of two barriers a pass. One by default.
const DK4: u32 = D4 / PASSES;
const PASS_KEYS: u32 = BLOCK_N / PASSES;
const PASS_STEPS: u32 = KEY_LANES / PASSES;
// The same for the query rows and the probabilities, read by the row
// lanes: a lane's r-th row sits at slot r * ROW_LANES + row lane (so the
// row lanes' r-th rows are consecutive slots), slots Q_STRIDE and P_STRIDE
// vec4s apart, odd where the workgroup memory has room, so that the row
// lanes of a subgroup read different banks (rows D4 or KEY_LANES vec4s
// apart all start in the same bank at even widths).
// Invocations n and n ^ 1 are one key lane's, n and n ^ 2 one row lane's
// (when both counts are even), so that every read of K, V (by key lane)
// and of Q, P (by row lane) gives each pair of neighbouring invocations
// one address: NVIDIA's shared memory then returns a 16-byte read to both
// at once, half the cycles of 32 different ones (it returns 128 bytes a
// cycle; a subgroup's vec4 reads take four, two when paired). BlockedTiling
// (src/shaders/tiling.rs) documents the same mapping.
const PAIRED_LANES: bool = ROW_LANES % 2u == 0u && KEY_LANES % 2u == 0u;

// The block's query rows, D4 vec4s each, row `a * ROWS + r` at slot
// `r * ROW_LANES + a`, Q_STRIDE vec4s apart.
// K of the current tile (key 4b + j at slot j * KEY_LANES + b, rows
// K_STRIDE apart), then V of the same keys (key n at row n, DV4 apart):
// V is staged once the scores no longer need K.
// Probabilities of the tile: the keys 4b .. 4b + 3 of the row at slot s
// (as in the Q block) at s * P_STRIDE + b.
// #if F16_PRODUCTS
var<workgroup> q_tile: array<vec4<f16>, BLOCK_M * Q_STRIDE>;
var<workgroup> kv_tile: array<vec4<f16>, KV_TILE>;
var<workgroup> p_tile: array<vec4<f16>, BLOCK_M * P_STRIDE>;
// #else
var<workgroup> q_tile: array<vec4<f32>, BLOCK_M * Q_STRIDE>;
var<workgroup> kv_tile: array<vec4<f32>, KV_TILE>;
var<workgroup> p_tile: array<vec4<f32>, BLOCK_M * P_STRIDE>;
// #endif
// Per (row, key lane): the lane's max of the row's scores in the tile; at
// the end, the lane's partial sum.
var<workgroup> partials: array<f32, BLOCK_M * KEY_LANES>;

// #if F16_PRODUCTS
// a . b of f16 operands with exact products (a product of two f16 values
// is exact in f32) summed in f32, as a matrix unit computes it.
fn f16_products_sum(a: vec4<f16>, b: vec4<f16>) -> f32 {
    let products = vec4<f32>(a) * vec4<f32>(b);
    return (products.x + products.y) + (products.z + products.w);
}
// #endif

// The query head of packed row `row` of workgroup y `wg_y`: the workgroup's
// head, or with grouped rows the row's head within the KV head's group.
fn head_of(row: u32, wg_y: u32, group: u32, grouped: bool) -> u32 {
    return select(wg_y, wg_y * group + row % group, grouped);
}

// The slot of the block's row `row` in the Q block and the probabilities.
fn row_slot(row: u32) -> u32 {
    return (row % ROWS) * ROW_LANES + row / ROWS;
}

// Stages head-dim vec4s d_first .. d_first + DK4 - 1 of K of the tile's keys
// (from kv0; zeros past its n_keys), key 4b + j at slot j * KEY_LANES + b.
fn stage_k_columns(kv0: i32, n_keys: u32, k_base: u32, d_first: u32, lid: u32) {
    for (var base = 0u; base < BLOCK_N * DK4; base += STAGED_VEC4S) {
        var staged: array<vec4<f32>, STAGE_BATCH>;
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            staged[s] = vec4<f32>(0.0);
            if (i < BLOCK_N * DK4 && i / DK4 < n_keys) {
                staged[s] = load_k(k_base + (u32(kv0) + i / DK4) * p.k.seq + d_first + i % DK4);
            }
        }
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            let key = i / DK4;
            if (i < BLOCK_N * DK4) {
// #if F16_PRODUCTS
                kv_tile[((key % 4u) * KEY_LANES + key / 4u) * K_STRIDE + i % DK4] = vec4<f16>(staged[s]);
// #else
                kv_tile[((key % 4u) * KEY_LANES + key / 4u) * K_STRIDE + i % DK4] = staged[s];
// #endif
            }
        }
    }
}

// Stages V of the tile's keys first_key .. first_key + PASS_KEYS - 1 (from
// kv0; zeros past its n_keys), key first_key + n at row n, DV4 apart.
fn stage_v_keys(kv0: i32, n_keys: u32, v_base: u32, first_key: u32, lid: u32) {
    for (var base = 0u; base < PASS_KEYS * DV4; base += STAGED_VEC4S) {
        var staged: array<vec4<f32>, STAGE_BATCH>;
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            let key = first_key + i / DV4;
            staged[s] = vec4<f32>(0.0);
            if (i < PASS_KEYS * DV4 && key < n_keys) {
                staged[s] = load_v(v_base + (u32(kv0) + key) * p.v.seq + i % DV4);
            }
        }
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            if (i < PASS_KEYS * DV4) {
// #if F16_PRODUCTS
                kv_tile[i] = vec4<f16>(staged[s]);
// #else
                kv_tile[i] = staged[s];
// #endif
            }
        }
    }
}

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let seq = sequence_rows(wg.y);
    let batch = seq.q_batch;
    let tile = paired_block(wg.x, groups.x);
    let row0 = tile * BLOCK_M;
    // Block rows are "packed rows": query row `row / group` of query head
    // `head_of(row)` (group = 1 unless BLOCKED_GROUP_ROWS, where the group
    // is the KV head's query heads).
    let grouped = has_flag(BLOCKED_GROUP_ROWS);
    let group = select(1u, p.heads_q / p.heads_kv, grouped);
    let head_kv = select(wg.z / (p.heads_q / p.heads_kv), wg.z, grouped);
    // The dispatch covers the longest sequence; shorter ones stop here
    // (the whole workgroup at once, before any barrier).
    if (row0 >= seq.extent * group) {
        return;
    }
    // Packed rows of the sequence (seq_q) and of its extent.
    let seq_q = seq.q_len * group;
    let extent = seq.extent * group;
    let seq_kv = seq.kv_len;
    let diag = seq.diag;
    let row_lane = select(lid / KEY_LANES, (lid / (2u * KEY_LANES)) * 2u + lid % 2u, PAIRED_LANES);
    let key_lane = select(lid % KEY_LANES, (lid / 2u) % KEY_LANES, PAIRED_LANES);
    // The block's first row of this invocation.
    let my_rows = row_lane * ROWS;
    // Padding rows (from seq_q on) compute on a copy of the last real row
    // and are written as zeros; they widen no key range. Key ranges follow
    // query rows: the block's first and last.
    let first_query = i32(row0 / group);
    let last_query = i32((min(row0 + BLOCK_M, max(seq_q, 1u)) - 1u) / group);

    let keys = block_keys(first_query, last_query, diag, seq_kv, row0 >= seq_q);
    var wg_lo = keys.lo;
    let wg_hi = keys.hi;

    for (var base = 0u; base < BLOCK_M * D4; base += STAGED_VEC4S) {
        var staged: array<vec4<f32>, STAGE_BATCH>;
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            let row = min(row0 + i / D4, max(seq_q, 1u) - 1u);
            let q_row = seq.q_start + row / group;
            let head = head_of(row, wg.z, group, grouped);
            staged[s] = vec4<f32>(0.0);
            if (i < BLOCK_M * D4) {
                staged[s] = load_q(batch * p.q.batch + q_row * p.q.seq + head * p.q.head + p.q.offset + i % D4);
            }
        }
        for (var s = 0u; s < STAGE_BATCH; s++) {
            let i = base + s * WG_SIZE + lid;
            if (i < BLOCK_M * D4) {
// #if F16_PRODUCTS
                q_tile[row_slot(i / D4) * Q_STRIDE + i % D4] = vec4<f16>(staged[s]);
// #else
                q_tile[row_slot(i / D4) * Q_STRIDE + i % D4] = staged[s];
// #endif
            }
        }
    }

    var acc: array<vec4<f32>, ROWS * COLS>;
    var m: array<f32, ROWS>;
    // This lane's share of each row's running sum.
    var l: array<f32, ROWS>;
    var row_pos: array<i32, ROWS>;
    var row_lo: array<i32, ROWS>;
    var row_hi: array<i32, ROWS>;
    // Each row's query head, and its ALiBi slope.
    var heads: array<u32, ROWS>;
    var slopes: array<f32, ROWS>;
// #if DROPOUT
    // Each row's dropout hash state, from its sequence's mask; keys count
    // from the sequence's first (a chunk's from `drop_origin.y`).
    let drop_origin = dropout_origin(wg.y, seq);
    let drop_key_base = vec4<i32>(i32(drop_origin.y));
    var drop_state: array<u32, ROWS>;
// #endif
// #if MASK
    var mask_row: array<u32, ROWS>;
    let mask_base = batch * mp.batch_stride + wg.z * mp.head_stride;
    // Tiles are aligned to multiples of BLOCK_N, as the tile states are.
    wg_lo -= wg_lo % i32(BLOCK_N);
// #endif
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + my_rows + r;
        heads[r] = head_of(row, wg.z, group, grouped);
        slopes[r] = alibi_slope_of(batch, heads[r]);
        let start = softmax_start(heads[r], true);
// #if MASK
        mask_row[r] = mask_base + min(row, seq_q - 1u) * mp.row_words;
// #endif
        row_pos[r] = i32(row / group) + diag;
        let bounds = visible_keys(row_pos[r], seq_kv);
        row_lo[r] = bounds.x;
        row_hi[r] = bounds.y;
// #if DROPOUT
        drop_state[r] = dropout_row_state(drop_origin.x, heads[r], row / group);
// #endif
        // A sink counts once per row: in key lane 0's share.
        m[r] = start.x;
        l[r] = select(0.0, start.y, key_lane == 0u);
        for (var j = 0u; j < COLS; j++) {
            acc[r * COLS + j] = vec4<f32>(0.0);
        }
// #if MASK
// #else
        if ((seq.carry & CARRY_IN) != 0u) {
            // As in flash_attention.wgsl: the chunks before left (lse, o),
            // a running max of lse and a sum of 1 over an accumulator of o.
            let q_row = seq.q_start + min(row, max(seq_q, 1u) - 1u) / group;
            let carried = lse_buf[(batch * p.heads_q + heads[r]) * p.seq_q + q_row];
            if (carried != positive_infinity()) {
                m[r] = carried;
                l[r] = select(0.0, 1.0, key_lane == 0u);
                let c_base = carry_base(batch, q_row, heads[r]);
                for (var j = 0u; j < COLS; j++) {
                    let col = key_lane + KEY_LANES * j;
                    if (col < DV4) {
                        acc[r * COLS + j] = carry[c_base + col];
                    }
                }
            } else {
                m[r] = MIN_SCORE;
                l[r] = 0.0;
            }
        }
// #endif
    }

    let k_base = seq.kv_batch * p.k.batch + seq.kv_start * p.k.seq + head_kv * p.k.head + p.k.offset;
    let v_base = seq.kv_batch * p.v.batch + seq.kv_start * p.v.seq + head_kv * p.v.head + p.v.offset;
    // This lane's four keys of a tile start at this offset.
    let lane_key = i32(4u * key_lane);

    // Tiles above the causal diagonal or outside the window are never visited.
    for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {
        let n_keys = u32(min(i32(BLOCK_N), wg_hi + 1 - kv0));
// #if MASK
        let mask_state = tile_mask_state(batch, wg.z, tile, kv0);
        if (mask_state == 0u) {
            continue;
        }
// #endif
        var dots: array<vec4<f32>, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            dots[r] = vec4<f32>(0.0);
        }
        // The scores in PASSES passes over the head dim, DK4 vec4s each
        // (one unless a caller's layout needs the K tile in parts to fit
        // the workgroup memory). (The first tile's first barrier also
        // publishes the Q block.)
        for (var part = 0u; part < PASSES; part++) {
            if (part > 0u) {
                // The previous pass's columns are consumed.
                workgroupBarrier();
            }
            stage_k_columns(kv0, n_keys, k_base, part * DK4, lid);
            workgroupBarrier();
            // D_STEP head-dim vec4s a trip, unrolled: wgpu bounds every
            // loop the template leaves with a counter, which a trip's work
            // amortizes.
            for (var d0 = 0u; d0 < DK4; d0 += D_STEP) {
                for (var du = 0u; du < D_STEP; du++) {
                    let d = d0 + du;
                    let k0 = kv_tile[key_lane * K_STRIDE + d];
                    let k1 = kv_tile[(KEY_LANES + key_lane) * K_STRIDE + d];
                    let k2 = kv_tile[(2u * KEY_LANES + key_lane) * K_STRIDE + d];
                    let k3 = kv_tile[(3u * KEY_LANES + key_lane) * K_STRIDE + d];
                    for (var r = 0u; r < ROWS; r++) {
                        let qd = q_tile[(r * ROW_LANES + row_lane) * Q_STRIDE + part * DK4 + d];
// #if F16_PRODUCTS
                        dots[r] += vec4<f32>(f16_products_sum(qd, k0), f16_products_sum(qd, k1),
                            f16_products_sum(qd, k2), f16_products_sum(qd, k3));
// #else
                        dots[r] = vec4<f32>(fma_dot(qd, k0, dots[r].x), fma_dot(qd, k1, dots[r].y),
                            fma_dot(qd, k2, dots[r].z), fma_dot(qd, k3, dots[r].w));
// #endif
                    }
                }
            }
        }

        // Keys past the tile's end lie past every row's last visible key.
        let key_pos = vec4<i32>(kv0 + lane_key) + vec4<i32>(0, 1, 2, 3);
// #if MASK
        let unmasked = tile_all_visible(keys, kv0, n_keys) && mask_state == 2u;
// #else
        let unmasked = tile_all_visible(keys, kv0, n_keys);
// #endif
        var scores: array<vec4<f32>, ROWS>;
        var visible: array<vec4<bool>, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let scored = score_quad(dots[r], row_pos[r], key_pos, slopes[r], vec2<i32>(row_lo[r], row_hi[r]), unmasked,
// #if MASK
                mask_state, mask_row[r],
// #endif
            );
            let s = scored.s;
            scores[r] = s;
            visible[r] = scored.seen;
            partials[(my_rows + r) * KEY_LANES + key_lane] = max(max(s.x, s.y), max(s.z, s.w));
        }
        // Every lane's scores are done (K may be overwritten) and its
        // maxima published.
        workgroupBarrier();

        // V of the tile's first PASS_KEYS keys (all of them in one pass).
        stage_v_keys(kv0, n_keys, v_base, 0u, lid);
        var correction: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let row = my_rows + r;
            var tile_max = MIN_SCORE;
            for (var b = 0u; b < KEY_LANES; b++) {
                tile_max = max(tile_max, partials[row * KEY_LANES + b]);
            }
            let m_new = max(m[r], tile_max);
            correction[r] = exp2((m[r] - m_new) * LOG2_E);
            var probs = select(vec4<f32>(0.0), exp_shifted(scores[r] - vec4<f32>(m_new)), visible[r]);
            l[r] = l[r] * correction[r] + (probs.x + probs.y) + (probs.z + probs.w);
            m[r] = m_new;
// #if DROPOUT
            // Dropout acts after the softmax: the sum (and the logsumexp)
            // keep every probability, P V only the kept (scaled by
            // 1 / (1 - p) with the output).
            probs *= dropout_kept(drop_state[r], key_pos + drop_key_base);
// #endif
// #if F16_PRODUCTS
            p_tile[(r * ROW_LANES + row_lane) * P_STRIDE + key_lane] = vec4<f16>(probs);
// #else
            p_tile[(r * ROW_LANES + row_lane) * P_STRIDE + key_lane] = probs;
// #endif
        }
        // V and the probabilities are staged.
        workgroupBarrier();

        for (var r = 0u; r < ROWS; r++) {
            for (var j = 0u; j < COLS; j++) {
                acc[r * COLS + j] *= correction[r];
            }
        }
        for (var step = 0u; step < KEY_LANES; step++) {
// #if F16_PRODUCTS
            var probs: array<vec4<f16>, ROWS>;
// #else
            var probs: array<vec4<f32>, ROWS>;
// #endif
            // (A constant test once the loop is unrolled: false in one pass.)
            if (step > 0u && step % PASS_STEPS == 0u) {
                // The previous pass's values are consumed; stage the next.
                workgroupBarrier();
                stage_v_keys(kv0, n_keys, v_base, 4u * step, lid);
                workgroupBarrier();
            }
            for (var r = 0u; r < ROWS; r++) {
                probs[r] = p_tile[(r * ROW_LANES + row_lane) * P_STRIDE + step];
            }
            let v_row = 4u * (step % PASS_STEPS) * DV4;
            for (var j = 0u; j < COLS; j++) {
                let col = key_lane + KEY_LANES * j;
                // A constant test unless KEY_LANES does not divide DV4.
                if (COLS * KEY_LANES == DV4 || col < DV4) {
                    let v0 = kv_tile[v_row + col];
                    let v1 = kv_tile[v_row + DV4 + col];
                    let v2 = kv_tile[v_row + 2u * DV4 + col];
                    let v3 = kv_tile[v_row + 3u * DV4 + col];
                    for (var r = 0u; r < ROWS; r++) {
                        let pr = probs[r];
// #if F16_PRODUCTS
                        let p32 = vec4<f32>(pr);
                        acc[r * COLS + j] += (p32.x * vec4<f32>(v0) + p32.y * vec4<f32>(v1))
                            + (p32.z * vec4<f32>(v2) + p32.w * vec4<f32>(v3));
// #else
                        acc[r * COLS + j] = fma(vec4<f32>(pr.w), v3, fma(vec4<f32>(pr.z), v2,
                            fma(vec4<f32>(pr.y), v1, fma(vec4<f32>(pr.x), v0, acc[r * COLS + j]))));
// #endif
                    }
                }
            }
        }
        // The next tile overwrites K/V, the probabilities and the maxima.
        workgroupBarrier();
    }

    // Each row's sum: the key lanes' shares added up.
    for (var r = 0u; r < ROWS; r++) {
        partials[(my_rows + r) * KEY_LANES + key_lane] = l[r];
    }
    workgroupBarrier();
    // A carried chunk's lse and output, read at the start by whichever
    // invocation loaded the row, are overwritten below by another: a
    // workgroup barrier orders only workgroup memory, this the storage.
    storageBarrier();
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + my_rows + r;
        var l_row = 0.0;
        for (var b = 0u; b < KEY_LANES; b++) {
            l_row += partials[(my_rows + r) * KEY_LANES + b];
        }
        if (row < extent) {
            // A row that saw no key (and has no sink) has l == 0: zeros and
            // lse = +inf; so has a padding row, whatever it computed.
            let real = row < seq_q;
            // Dropout scales the kept probabilities here, once per row (in its
            // last chunk when its keys run in chunks: dropout_output_scale).
// #if DROPOUT
            let inv_l = select(0.0, dropout_output_scale(seq) / l_row, real && l_row > 0.0);
// #else
            let inv_l = select(0.0, dropout_keep_scale() / l_row, real && l_row > 0.0);
// #endif
            let lse = select(row_lse(m[r], 0.0), row_lse(m[r], l_row), real);
            let o_row = seq.q_start + row / group;
            let out = row_output(seq, batch, o_row, heads[r]);
            for (var j = 0u; j < COLS; j++) {
                let col = key_lane + KEY_LANES * j;
                if (COLS * KEY_LANES == DV4 || col < DV4) {
                    store_row(out, col, select(vec4<f32>(0.0), acc[r * COLS + j] * inv_l, real));
                }
            }
            if (has_flag(FLAG_WRITE_LSE) && key_lane == 0u) {
                lse_buf[(batch * p.heads_q + heads[r]) * p.seq_q + o_row] = lse;
            }
        }
    }
}
