// Cooperative-matrix FlashAttention-2 forward pass (Tier::CooperativeMatrix):
// S = Q K^T and O += P V on the adapter's matrix units (NVIDIA tensor cores
// through VK_KHR_cooperative_matrix, Apple simdgroup matrices), softmax
// statistics and accumulation in f32.
//
// src/shaders/ prepends `enable wgpu_cooperative_matrix;` (and `enable
// f16;` for f16 operands), the generated constants, attention_common.wgsl
// and flash_attention.wgsl's sequence-table, carry and mask declarations.
//
// A workgroup owns BLOCK_M = ROW_TILES * T query rows and walks the keys
// in tiles of BLOCK_N = KEY_TILES * T. Q, the K tile and then the V tile
// are staged in workgroup memory as `Operand` (f16 for f16 storage, f32
// for f32 storage where the adapter multiplies f32 matrices: both exact
// conversions of what the tensors hold). Each subgroup takes row tiles
// `subgroup_id, subgroup_id + num_subgroups, ...` (so any subgroup size
// the driver picks covers them) and multiplies T x T matrices:
//   S[rows, keys] = sum over d of Q[rows, d] K[keys, d]^T   (f32 result)
//   O[rows, cols] += P[rows, keys] V[keys, cols]             (f32 result)
// S goes to workgroup memory, where every invocation applies the score
// epilogue (scale, softcap, ALiBi, windows, masks) and the online softmax
// to 4-key quads of one row (LANES_PER_ROW invocations share a row; its
// max is reduced through `partials`); P is written as Operand, and the
// output accumulator O lives in workgroup memory as f32, so that each
// row's rescaling (a per-row factor, which cooperative matrices cannot
// apply) is plain code. Row sums add up the probabilities as rounded to
// Operand, the weights P V actually applies.
//
// Generated constants (src/shaders/, `CoopTiling`): D4, DV4 (head dims
// / 4), D, DV, KV_WIDTH = max(D, DV), T (8 or 16), ROW_TILES, KEY_TILES,
// WG_SIZE, EMULATED_LANES (the emulation's subgroup size), LANES_PER_ROW =
// WG_SIZE / BLOCK_M, QUADS = BLOCK_N / 4 /
// LANES_PER_ROW (the four-key quads of a row each invocation handles;
// loops over them are unrolled by src/shaders/, so the private arrays
// they index stay in registers).

// #if COOP_F32
alias Operand = f32;
// #else
alias Operand = f16;
// #endif
// #if COOP_EMULATED
// #else
// #if COOP8
alias CoopA = coop_mat8x8<Operand, A>;
alias CoopB = coop_mat8x8<Operand, B>;
alias CoopC = coop_mat8x8<f32, C>;
// #else
alias CoopA = coop_mat16x16<Operand, A>;
alias CoopB = coop_mat16x16<Operand, B>;
alias CoopC = coop_mat16x16<f32, C>;
// #endif
// #endif

const BLOCK_M: u32 = ROW_TILES * T;
const BLOCK_N: u32 = KEY_TILES * T;

// The block's query rows, row-major, D wide.
var<workgroup> q_tile: array<Operand, BLOCK_M * D>;
// K of the tile ([key][d], D wide), then V of the same keys ([key][c], DV
// wide): V is staged once the scores no longer need K.
var<workgroup> kv_tile: array<Operand, BLOCK_N * KV_WIDTH>;
// Raw scores Q K^T of the tile, row-major.
var<workgroup> s_tile: array<f32, BLOCK_M * BLOCK_N>;
// Probabilities of the tile, row-major.
var<workgroup> p_tile: array<Operand, BLOCK_M * BLOCK_N>;
// The output accumulator, row-major, DV wide.
var<workgroup> o_tile: array<f32, BLOCK_M * DV>;
// Per (row, lane of the row): the lane's max of the row's scores in the
// tile; at the end, its partial sum.
var<workgroup> partials: array<f32, BLOCK_M * LANES_PER_ROW>;

// Stores four values as Operand from element `at` on.
fn stage4(tile_is_q: bool, at: u32, x: vec4<f32>) {
    let v = vec4<Operand>(x);
    if (tile_is_q) {
        q_tile[at] = v.x;
        q_tile[at + 1u] = v.y;
        q_tile[at + 2u] = v.z;
        q_tile[at + 3u] = v.w;
    } else {
        kv_tile[at] = v.x;
        kv_tile[at + 1u] = v.y;
        kv_tile[at + 2u] = v.z;
        kv_tile[at + 3u] = v.w;
    }
}

// The two matrix products of a tile, for one subgroup: `lane` of `lanes`
// (used by the emulation only).
// #if COOP_EMULATED
// Emulated with scalar code (COOP_EMULATED, for testing this kernel on
// adapters without matrix units): every element read where, and as, the
// matrix loads below read it (A row-major, B column-major for K^T and
// row-major for V), products summed in f32.

// S[rt, kt] = Q[rt rows, :] K[kt keys, :]^T, stored row-major in s_tile.
fn scores_tile(rt: u32, kt: u32, lane: u32, lanes: u32) {
    for (var e = lane; e < T * T; e += lanes) {
        let i = e / T;
        let j = e % T;
        var dot = 0.0;
        for (var d = 0u; d < D; d++) {
            dot += f32(q_tile[rt * T * D + i * D + d]) * f32(kv_tile[kt * T * D + j * D + d]);
        }
        s_tile[rt * T * BLOCK_N + kt * T + i * BLOCK_N + j] = dot;
    }
}

// O[rt, ct] += P[rt rows, :] V[:, ct columns], in o_tile.
fn values_tile(rt: u32, ct: u32, lane: u32, lanes: u32) {
    for (var e = lane; e < T * T; e += lanes) {
        let i = e / T;
        let j = e % T;
        var sum = o_tile[rt * T * DV + ct * T + i * DV + j];
        for (var k = 0u; k < BLOCK_N; k++) {
            sum += f32(p_tile[rt * T * BLOCK_N + i * BLOCK_N + k]) * f32(kv_tile[ct * T + k * DV + j]);
        }
        o_tile[rt * T * DV + ct * T + i * DV + j] = sum;
    }
}
// #else
// S[rt, kt] = Q[rt rows, :] K[kt keys, :]^T: K's rows are the columns of B
// (column-major, D apart); stored row-major in s_tile.
fn scores_tile(rt: u32, kt: u32, lane: u32, lanes: u32) {
    var s = CoopC();
    for (var d0 = 0u; d0 < D; d0 += T) {
        let a = coopLoadT<CoopA>(&q_tile[rt * T * D + d0], D);
        let b = coopLoad<CoopB>(&kv_tile[kt * T * D + d0], D);
        s = coopMultiplyAdd(a, b, s);
    }
    coopStoreT(s, &s_tile[rt * T * BLOCK_N + kt * T], BLOCK_N);
}

// O[rt, ct] += P[rt rows, :] V[:, ct columns]: V's rows are the rows of B
// (row-major, DV apart); the accumulator is o_tile's block.
fn values_tile(rt: u32, ct: u32, lane: u32, lanes: u32) {
    var o = coopLoadT<CoopC>(&o_tile[rt * T * DV + ct * T], DV);
    for (var kt = 0u; kt < KEY_TILES; kt++) {
        let a = coopLoadT<CoopA>(&p_tile[rt * T * BLOCK_N + kt * T], BLOCK_N);
        let b = coopLoadT<CoopB>(&kv_tile[kt * T * DV + ct * T], DV);
        o = coopMultiplyAdd(a, b, o);
    }
    coopStoreT(o, &o_tile[rt * T * DV + ct * T], DV);
}
// #endif

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
// #if COOP_EMULATED
// #else
    @builtin(subgroup_id) subgroup_id: u32,
    @builtin(num_subgroups) num_subgroups: u32,
// #endif
) {
// #if COOP_EMULATED
    // Emulated subgroups of EMULATED_LANES invocations.
    let subgroup = lid / EMULATED_LANES;
    let subgroups = WG_SIZE / EMULATED_LANES;
    let sg_lane = lid % EMULATED_LANES;
    let sg_lanes = EMULATED_LANES;
// #else
    let subgroup = subgroup_id;
    let subgroups = num_subgroups;
    // The matrix operations spread over the subgroup themselves.
    let sg_lane = 0u;
    let sg_lanes = 1u;
// #endif
    let seq = sequence_rows(wg.z);
    let batch = seq.q_batch;
    let head_q = wg.y;
    let row0 = wg.x * BLOCK_M;
    // The dispatch covers the longest sequence; blocks past a shorter
    // one visit no key and write nothing. (No early return: matrix
    // operations need every invocation to reach them.)
    let in_range = row0 < seq.extent;
    let seq_q = seq.q_len;
    let seq_kv = seq.kv_len;
    let head_kv = head_q / (p.heads_q / p.heads_kv);
    let diag = seq.diag;
    // This invocation's row of the block, and its place among the row's
    // lanes.
    let my_row = lid / LANES_PER_ROW;
    let lane = lid % LANES_PER_ROW;
    // Padding rows (from seq_q on) compute on a copy of the last real row
    // and are written as zeros; they widen no key range.
    let last_row = min(row0 + BLOCK_M, max(seq_q, 1u)) - 1u;

    let keys = block_keys(i32(row0), i32(last_row), diag, seq_kv, row0 >= seq_q || !in_range);
    var wg_lo = keys.lo;
    let wg_hi = keys.hi;
    let alibi_slope = alibi_slope_of(batch, head_q);
    let start = softmax_start(head_q, true);

    for (var i = lid; in_range && i < BLOCK_M * D4; i += WG_SIZE) {
        let q_row = seq.q_start + min(row0 + i / D4, max(seq_q, 1u) - 1u);
        stage4(true, 4u * i, load_q(batch * p.q.batch + q_row * p.q.seq + head_q * p.q.head + p.q.offset + i % D4));
    }

    let row = row0 + my_row;
    let row_pos = i32(row) + diag;
    let bounds = visible_keys(row_pos, seq_kv);
// #if DROPOUT
    // The row's dropout hash state, from its sequence's mask; keys count
    // from the sequence's first (a chunk's from `drop_origin.y`).
    let drop_origin = dropout_origin(wg.z, seq);
    let drop_state = dropout_row_state(drop_origin.x, head_q, row);
// #endif
    // A sink counts once per row: in lane 0's share of the sum.
    var m = start.x;
    var l = select(0.0, start.y, lane == 0u);
    let o_row = my_row * DV;
    for (var c = lane; c < DV4; c += LANES_PER_ROW) {
        var o = vec4<f32>(0.0);
// #if MASK
// #else
        if ((seq.carry & CARRY_IN) != 0u) {
            let q_row = seq.q_start + min(row, max(seq_q, 1u) - 1u);
            let carried = lse_buf[(batch * p.heads_q + head_q) * p.seq_q + q_row];
            if (carried != bitcast<f32>(0x7f800000u)) {
                o = carry[carry_base(batch, q_row, head_q) + c];
            }
        }
// #endif
        o_tile[o_row + 4u * c] = o.x;
        o_tile[o_row + 4u * c + 1u] = o.y;
        o_tile[o_row + 4u * c + 2u] = o.z;
        o_tile[o_row + 4u * c + 3u] = o.w;
    }
// #if MASK
    let mask_row = batch * mp.batch_stride + head_q * mp.head_stride + min(row, seq_q - 1u) * mp.row_words;
    // Tiles are aligned to multiples of BLOCK_N, as the tile states are.
    wg_lo -= wg_lo % i32(BLOCK_N);
// #else
    if ((seq.carry & CARRY_IN) != 0u) {
        // As in flash_attention.wgsl: the chunks before left (lse, o).
        let q_row = seq.q_start + min(row, max(seq_q, 1u) - 1u);
        let carried = lse_buf[(batch * p.heads_q + head_q) * p.seq_q + q_row];
        if (carried != bitcast<f32>(0x7f800000u)) {
            m = carried;
            l = select(0.0, 1.0, lane == 0u);
        } else {
            m = MIN_SCORE;
            l = 0.0;
        }
    }
// #endif

    let k_base = seq.kv_batch * p.k.batch + seq.kv_start * p.k.seq + head_kv * p.k.head + p.k.offset;
    let v_base = seq.kv_batch * p.v.batch + seq.kv_start * p.v.seq + head_kv * p.v.head + p.v.offset;

    // Tiles above the causal diagonal or outside the window are never visited.
    for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {
        let n_keys = u32(min(i32(BLOCK_N), wg_hi + 1 - kv0));
// #if MASK
        let mask_state = tile_mask_state(batch, head_q, wg.x, kv0);
        if (mask_state == 0u) {
            continue;
        }
// #endif
        // (The first tile's barrier also publishes Q and the accumulator.)
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            var kk = vec4<f32>(0.0);
            if (key < n_keys) {
                kk = load_k(k_base + (u32(kv0) + key) * p.k.seq + i % D4);
            }
            stage4(false, 4u * i, kk);
        }
        workgroupBarrier();

        // S = Q K^T, each subgroup its row tiles.
        for (var rt = subgroup; rt < ROW_TILES; rt += subgroups) {
            for (var kt = 0u; kt < KEY_TILES; kt++) {
                scores_tile(rt, kt, sg_lane, sg_lanes);
            }
        }
        workgroupBarrier();

// #if MASK
        let unmasked = tile_all_visible(keys, kv0, n_keys) && mask_state == 2u;
// #else
        let unmasked = tile_all_visible(keys, kv0, n_keys);
// #endif
        var scores: array<vec4<f32>, QUADS>;
        var visible: array<vec4<bool>, QUADS>;
        var tile_max = MIN_SCORE;
        for (var i = 0u; i < QUADS; i++) {
            let key = 4u * (lane + LANES_PER_ROW * i);
            let at = my_row * BLOCK_N + key;
            let dots = vec4<f32>(s_tile[at], s_tile[at + 1u], s_tile[at + 2u], s_tile[at + 3u]);
            let key_pos = vec4<i32>(kv0 + i32(key)) + vec4<i32>(0, 1, 2, 3);
            let scored = score_quad(dots, row_pos, key_pos, alibi_slope, bounds, unmasked,
// #if MASK
                mask_state, mask_row,
// #endif
            );
            let s = scored.s;
            scores[i] = s;
            visible[i] = scored.seen;
            tile_max = max(tile_max, max(max(s.x, s.y), max(s.z, s.w)));
        }
        partials[my_row * LANES_PER_ROW + lane] = tile_max;
        // Every lane's maxima are published, and K is no longer read.
        workgroupBarrier();

        for (var i = lid; i < BLOCK_N * DV4; i += WG_SIZE) {
            var vv = vec4<f32>(0.0);
            if (i / DV4 < n_keys) {
                vv = load_v(v_base + (u32(kv0) + i / DV4) * p.v.seq + i % DV4);
            }
            stage4(false, 4u * i, vv);
        }
        var m_new = m;
        for (var b = 0u; b < LANES_PER_ROW; b++) {
            m_new = max(m_new, partials[my_row * LANES_PER_ROW + b]);
        }
        let correction = exp2((m - m_new) * LOG2_E);
        l *= correction;
        m = m_new;
        for (var i = 0u; i < QUADS; i++) {
            let key = 4u * (lane + LANES_PER_ROW * i);
            var probs = vec4<f32>(vec4<Operand>(
                select(vec4<f32>(0.0), exp_shifted(scores[i] - vec4<f32>(m_new)), visible[i])));
            l += (probs.x + probs.y) + (probs.z + probs.w);
// #if DROPOUT
            // Dropout acts after the softmax: the sum (and the logsumexp)
            // keeps every probability, P V only the kept (scaled by
            // 1 / (1 - p) with the output).
            probs *= dropout_kept(drop_state, vec4<i32>(kv0 + i32(key + drop_origin.y)) + vec4<i32>(0, 1, 2, 3));
// #endif
            let at = my_row * BLOCK_N + key;
            p_tile[at] = Operand(probs.x);
            p_tile[at + 1u] = Operand(probs.y);
            p_tile[at + 2u] = Operand(probs.z);
            p_tile[at + 3u] = Operand(probs.w);
        }
        for (var c = lane; c < DV4; c += LANES_PER_ROW) {
            let at = o_row + 4u * c;
            o_tile[at] *= correction;
            o_tile[at + 1u] *= correction;
            o_tile[at + 2u] *= correction;
            o_tile[at + 3u] *= correction;
        }
        // V, the probabilities and the rescaled accumulator are staged.
        workgroupBarrier();

        // O += P V, each subgroup its row tiles.
        for (var rt = subgroup; rt < ROW_TILES; rt += subgroups) {
            for (var ct = 0u; ct < DV / T; ct++) {
                values_tile(rt, ct, sg_lane, sg_lanes);
            }
        }
        // The next tile overwrites K/V, the scores, the probabilities and
        // the maxima; the accumulator is complete.
        workgroupBarrier();
    }

    partials[my_row * LANES_PER_ROW + lane] = l;
    workgroupBarrier();
    // A carried chunk's lse and output, read at the start by whichever
    // invocation loaded the row, are overwritten below by another: a
    // workgroup barrier orders only workgroup memory, this the storage.
    storageBarrier();
    var l_row = 0.0;
    for (var b = 0u; b < LANES_PER_ROW; b++) {
        l_row += partials[my_row * LANES_PER_ROW + b];
    }
    if (row < seq.extent) {
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
        let lse = select(row_lse(m, 0.0), row_lse(m, l_row), real);
        let out_row = seq.q_start + row;
        let out = row_output(seq, batch, out_row, head_q);
        for (var c = lane; c < DV4; c += LANES_PER_ROW) {
            let at = o_row + 4u * c;
            let acc = vec4<f32>(o_tile[at], o_tile[at + 1u], o_tile[at + 2u], o_tile[at + 3u]);
            store_row(out, c, select(vec4<f32>(0.0), acc * inv_l, real));
        }
        if (has_flag(FLAG_WRITE_LSE) && lane == 0u) {
            lse_buf[(batch * p.heads_q + head_q) * p.seq_q + out_row] = lse;
        }
    }
}
