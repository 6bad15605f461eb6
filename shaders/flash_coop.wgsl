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
// in tiles of BLOCK_N = KEY_TILES * T. Subgroup `r` (r < ROW_TILES) owns
// row tile r for the whole call and keeps, in its matrix registers, that
// tile's queries (DT matrices T x T, the A side of S = Q K^T) and its
// output accumulator (DVT matrices, f32); the workgroup has at least
// ROW_TILES subgroups because src/plan sizes it by the adapter's largest
// subgroup (where the driver runs smaller ones, the extra subgroups repeat
// the last tile's products into a spare tile nothing reads). Per key tile:
//   1. all invocations stage K in workgroup memory as `Operand` (f16 for
//      f16 storage, f32 for f32 storage where the adapter multiplies f32
//      matrices: both exact conversions of what the tensors hold);
//   2. each subgroup multiplies S = Q K^T for its rows, stored as f32;
//   3. every invocation applies the score epilogue (scale, softcap, ALiBi,
//      windows, masks) to 4-key quads of one row (LANES_PER_ROW
//      invocations share a row; its max goes through `partials`), while V
//      replaces K;
//   4. each row's softmax is taken against a reference max `m` that moves
//      lazily (FlashAttention-4's trick): only when some row's max passes
//      its reference by more than 2^RESCALE_LOG2 does the whole workgroup
//      move every row's reference to its max and rescale the accumulators,
//      which cooperative matrices can only do through workgroup memory
//      (a per-row factor is not a matrix product). Otherwise the
//      probabilities exp(s - m) stay below 2^RESCALE_LOG2, exact in f16;
//   5. P is written as Operand, and each subgroup adds P V to its
//      accumulators.
// Row sums add up the probabilities as rounded to Operand, the weights
// P V actually applies. The final O / l leaves through workgroup memory.
//
// Every hand-over between invocations goes through a workgroup barrier
// (never a subgroup barrier: naga gives those subgroup-memory semantics
// only, which do not order workgroup memory on real GPUs). Matrices are
// indexed by constants only (src/shaders/ unrolls the loops over DT, DVT,
// KEY_TILES and the passes).
//
// Generated constants (src/shaders/, `CoopTiling`): D4, DV4 (head dims
// / 4), D, DV, KV_WIDTH = max(D, DV), T (8 or 16), DT = D / T, DVT = DV /
// T, ROW_TILES, KEY_TILES, WG_SIZE, EMULATED_LANES (the emulation's
// subgroup size), LANES_PER_ROW = WG_SIZE / BLOCK_M, QUADS = BLOCK_N / 4
// / LANES_PER_ROW (the four-key quads of a row each invocation handles; at
// most 16, whose visibility bits fill two words),
// Q_PASSES x Q_PASS (Q's column tiles, staged Q_PASS at a time through
// the K/V tile), O_PASSES x O_PASS (the accumulator's column tiles, moved
// O_PASS at a time through the score tile), EMU_ELEMENTS = T * T /
// EMULATED_LANES (elements of a matrix one emulated lane holds).

// #if COOP_F32
alias Operand = f32;
// #else
alias Operand = f16;
// #endif
// #if COOP_EMULATED
// The emulation's accumulator matrix: lane `l` of an emulated subgroup
// holds elements l, l + EMULATED_LANES, ... (row-major) of a T x T matrix.
alias CoopC = array<f32, EMU_ELEMENTS>;
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
// Q's columns staged per pass, and the accumulator's moved per pass.
const Q_COLS: u32 = Q_PASS * T;
const O_COLS: u32 = O_PASS * T;
// A row's reference max moves once the row's max passes it by this much
// (log2 units): probabilities stay below 256, far inside f16's range.
const RESCALE_LOG2: f32 = 8.0;

// K of the tile ([key][d], D wide), then V of the same keys ([key][c], DV
// wide); before the key loop, Q's columns in passes ([row][c], Q_COLS
// wide).
var<workgroup> kv_tile: array<Operand, BLOCK_N * KV_WIDTH>;
// Raw scores Q K^T of the tile, row-major; when the accumulators move,
// O_COLS of their columns at a time ([row][c], O_COLS wide). Real
// subgroups have a spare row tile at the end (see `rt_store`).
// #if COOP_EMULATED
var<workgroup> s_tile: array<f32, BLOCK_M * BLOCK_N>;
// #else
var<workgroup> s_tile: array<f32, (BLOCK_M + T) * BLOCK_N>;
// #endif
// Probabilities of the tile, row-major.
var<workgroup> p_tile: array<Operand, BLOCK_M * BLOCK_N>;
// Per (row, lane of the row): the lane's max of the row's scores in the
// tile; at the end, its partial sum.
var<workgroup> partials: array<f32, BLOCK_M * LANES_PER_ROW>;
// Words the workgroup shares, each read uniformly: at TILE_STATE the key
// tile's TILE_* bits (whether the accumulators hold anything yet, which
// invocation 0 sets at the top of each tile, and whether some row's max
// passed its reference by more than RESCALE_LOG2, which the rows vote
// for); at CARRIED_IN whether the rows continue a carried chunk (set by
// invocation 0). Four words where two would do: every workgroup variable
// here is a multiple of 16 bytes, because drivers place the variables in
// an order of their own and matrix loads and stores need 16-byte-aligned
// addresses (the kernel computed NaN on NVIDIA's 580 driver while it had
// two lone words beside the tiles, 2026-12-05: the likely cause, not yet
// confirmed on a GPU; shader_contract_tests checks the sizes).
var<workgroup> shared_words: array<atomic<u32>, 4>;
const TILE_STATE: u32 = 0u;
const CARRIED_IN: u32 = 1u;
const TILE_MOVED: u32 = 1u;
const TILE_LIVE: u32 = 2u;
// #if COOP_EMULATED
// The emulation reads Q here throughout (real subgroups hold it in
// registers).
var<workgroup> q_tile: array<Operand, BLOCK_M * D>;
// #endif

// Stores four values as Operand in the K/V tile from element `at` on.
fn stage4(at: u32, x: vec4<f32>) {
    let v = vec4<Operand>(x);
    kv_tile[at] = v.x;
    kv_tile[at + 1u] = v.y;
    kv_tile[at + 2u] = v.z;
    kv_tile[at + 3u] = v.w;
}

// #if COOP_EMULATED
// Scalar stand-ins for the matrix operations (COOP_EMULATED, for testing
// this kernel on adapters without matrix units): lane `lane` of an
// emulated subgroup computes its elements of each product, reading every
// element where, and as, the matrix loads of the real path read it;
// products summed in f32.

// Row tile `rt`'s scores against key tile `kt`: Q from q_tile, K^T from
// the K tile.
fn emu_scores(rt: u32, kt: u32, lane: u32) -> CoopC {
    var s: CoopC;
    for (var e = 0u; e < EMU_ELEMENTS; e++) {
        let at = lane + e * EMULATED_LANES;
        let i = at / T;
        let j = at % T;
        var dot = 0.0;
        for (var d = 0u; d < D; d++) {
            dot += f32(q_tile[(rt * T + i) * D + d]) * f32(kv_tile[(kt * T + j) * D + d]);
        }
        s[e] = dot;
    }
    return s;
}

// o + P[rt rows, kt keys] V[kt keys, ct columns].
fn emu_values(o: CoopC, rt: u32, kt: u32, ct: u32, lane: u32) -> CoopC {
    var sum = o;
    for (var e = 0u; e < EMU_ELEMENTS; e++) {
        let at = lane + e * EMULATED_LANES;
        let i = at / T;
        let j = at % T;
        for (var k = 0u; k < T; k++) {
            sum[e] += f32(p_tile[(rt * T + i) * BLOCK_N + kt * T + k]) * f32(kv_tile[(kt * T + k) * DV + ct * T + j]);
        }
    }
    return sum;
}

// Stores a matrix row-major in s_tile from `at` on, rows `stride` apart.
fn emu_store(c: CoopC, at: u32, stride: u32, lane: u32) {
    for (var e = 0u; e < EMU_ELEMENTS; e++) {
        let x = lane + e * EMULATED_LANES;
        s_tile[at + (x / T) * stride + x % T] = c[e];
    }
}

// Loads a matrix stored as emu_store stores it.
fn emu_load(at: u32, stride: u32, lane: u32) -> CoopC {
    var c: CoopC;
    for (var e = 0u; e < EMU_ELEMENTS; e++) {
        let x = lane + e * EMULATED_LANES;
        c[e] = s_tile[at + (x / T) * stride + x % T];
    }
    return c;
}
// #endif

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
// #if COOP_EMULATED
// #else
    @builtin(subgroup_id) subgroup_id: u32,
    @builtin(num_subgroups) num_subgroups: u32,
// #endif
) {
// #if COOP_EMULATED
    // Emulated subgroups of EMULATED_LANES invocations, one per row tile.
    let rt = lid / EMULATED_LANES;
    let rt_store = rt;
    let sg_lane = lid % EMULATED_LANES;
    let covered = true;
// #else
    // This subgroup's row tile. Subgroups beyond ROW_TILES (where the
    // driver runs smaller subgroups than the adapter's largest) repeat the
    // last tile's products, in the same control flow as the others
    // (matrix operations must be uniform), and store into the spare tile
    // past the block's rows, which nothing reads.
    let rt = min(subgroup_id, ROW_TILES - 1u);
    let rt_store = min(subgroup_id, ROW_TILES);
    // A driver that ran larger subgroups than the adapter reported would
    // leave row tiles without a subgroup: such a block writes NaN rather
    // than a plausible wrong answer.
    let covered = num_subgroups >= ROW_TILES;
// #endif
    let seq = sequence_rows(wg.y);
    let batch = seq.q_batch;
    let head_q = wg.z;
    let tile = paired_block(wg.x, groups.x);
    let row0 = tile * BLOCK_M;
    // The dispatch covers the longest sequence; blocks past a shorter
    // one visit no key and write nothing. (No early return: barriers and
    // matrix operations need every invocation to reach them.)
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
    let q_base = batch * p.q.batch + head_q * p.q.head + p.q.offset;

    // Q into the subgroups' matrices (the emulation: into q_tile).
// #if COOP_EMULATED
    for (var i = lid; in_range && i < BLOCK_M * D4; i += WG_SIZE) {
        let q_row = seq.q_start + min(row0 + i / D4, max(seq_q, 1u) - 1u);
        let v = vec4<Operand>(load_q(q_base + q_row * p.q.seq + i % D4));
        q_tile[4u * i] = v.x;
        q_tile[4u * i + 1u] = v.y;
        q_tile[4u * i + 2u] = v.z;
        q_tile[4u * i + 3u] = v.w;
    }
// #else
    var q_a: array<CoopA, DT>;
    for (var qp = 0u; qp < Q_PASSES; qp++) {
        for (var i = lid; in_range && i < BLOCK_M * (Q_COLS / 4u); i += WG_SIZE) {
            let r = i / (Q_COLS / 4u);
            let q_row = seq.q_start + min(row0 + r, max(seq_q, 1u) - 1u);
            stage4(4u * i, load_q(q_base + q_row * p.q.seq + qp * (Q_COLS / 4u) + i % (Q_COLS / 4u)));
        }
        workgroupBarrier();
        for (var j = 0u; j < Q_PASS; j++) {
            q_a[qp * Q_PASS + j] = coopLoadT<CoopA>(&kv_tile[rt * T * Q_COLS + j * T], Q_COLS);
        }
        // The next pass (or the first K tile) overwrites the staged columns.
        workgroupBarrier();
    }
// #endif

    let row = row0 + my_row;
    let row_pos = i32(row) + diag;
    let bounds = visible_keys(row_pos, seq_kv);
// #if DROPOUT
    // The row's dropout hash state, from its sequence's mask; keys count
    // from the sequence's first (a chunk's from `drop_origin.y`).
    let drop_origin = dropout_origin(wg.y, seq);
    let drop_state = dropout_row_state(drop_origin.x, head_q, row);
// #endif
    // A sink counts once per row: in lane 0's share of the sum. `m` is
    // the row's reference max.
    var m = start.x;
    var l = select(0.0, start.y, lane == 0u);
    // The output accumulators. They start from a matrix load of zeros or
    // of a carried chunk's output rather than from the variable's zero
    // value, which naga writes as a null constant of the matrix array:
    // whether drivers honour that is unknown, and the load costs two
    // barriers a workgroup.
    var o_c: array<CoopC, DVT>;
    if (lid == 0u) {
// #if MASK
        atomicStore(&shared_words[CARRIED_IN], 0u);
// #else
        atomicStore(&shared_words[CARRIED_IN], seq.carry & CARRY_IN);
// #endif
    }
    // Whether the rows continue a carried chunk (the accumulators start
    // from its output).
    let carried = workgroupUniformLoad(&shared_words[CARRIED_IN]) != 0u;
    // As in flash_attention.wgsl: the chunks before left (lse, o); a row
    // that saw no key there (lse +inf) starts empty.
    let q_row = seq.q_start + min(row, max(seq_q, 1u) - 1u);
    var saw_keys = false;
// #if MASK
    let mask_row = batch * mp.batch_stride + head_q * mp.head_stride + min(row, seq_q - 1u) * mp.row_words;
    // Tiles are aligned to multiples of BLOCK_N, as the tile states are.
    wg_lo -= wg_lo % i32(BLOCK_N);
// #else
    if (carried) {
        let carried_lse = lse_buf[(batch * p.heads_q + head_q) * p.seq_q + q_row];
        saw_keys = carried_lse != positive_infinity();
        m = select(MIN_SCORE, carried_lse, saw_keys);
        l = select(0.0, 1.0, saw_keys && lane == 0u);
    }
// #endif
    // The accumulators' first values, O_COLS columns at a time through
    // s_tile.
    for (var op = 0u; op < O_PASSES; op++) {
        for (var c = lane; c < O_COLS / 4u; c += LANES_PER_ROW) {
            var o = vec4<f32>(0.0);
// #if MASK
// #else
            if (saw_keys) {
                o = carry[carry_base(batch, q_row, head_q) + op * (O_COLS / 4u) + c];
            }
// #endif
            let at = my_row * O_COLS + 4u * c;
            s_tile[at] = o.x;
            s_tile[at + 1u] = o.y;
            s_tile[at + 2u] = o.z;
            s_tile[at + 3u] = o.w;
        }
        workgroupBarrier();
        for (var j = 0u; j < O_PASS; j++) {
// #if COOP_EMULATED
            o_c[op * O_PASS + j] = emu_load(rt * T * O_COLS + j * T, O_COLS, sg_lane);
// #else
            o_c[op * O_PASS + j] = coopLoadT<CoopC>(&s_tile[rt * T * O_COLS + j * T], O_COLS);
// #endif
        }
        workgroupBarrier();
    }

    let k_base = seq.kv_batch * p.k.batch + seq.kv_start * p.k.seq + head_kv * p.k.head + p.k.offset;
    let v_base = seq.kv_batch * p.v.batch + seq.kv_start * p.v.seq + head_kv * p.v.head + p.v.offset;

    // Tiles above the causal diagonal or outside the window are never
    // visited. The accumulators hold something from the first P V on, or
    // from the start in a carried chunk (invocation 0's record).
    var live = carried;
    for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {
        let n_keys = u32(min(i32(BLOCK_N), wg_hi + 1 - kv0));
// #if MASK
        let mask_state = tile_mask_state(batch, head_q, tile, kv0);
        if (mask_state == 0u) {
            continue;
        }
// #endif
        if (lid == 0u) {
            atomicStore(&shared_words[TILE_STATE], select(0u, TILE_LIVE, live));
        }
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            var kk = vec4<f32>(0.0);
            if (key < n_keys) {
                kk = load_k(k_base + (u32(kv0) + key) * p.k.seq + i % D4);
            }
            stage4(4u * i, kk);
        }
        workgroupBarrier();

        // S = Q K^T for each subgroup's row tile. K's rows are the columns
        // of B (column-major, D apart).
        for (var kt = 0u; kt < KEY_TILES; kt++) {
// #if COOP_EMULATED
            emu_store(emu_scores(rt, kt, sg_lane), rt * T * BLOCK_N + kt * T, BLOCK_N, sg_lane);
// #else
            var s = CoopC();
            for (var dt = 0u; dt < DT; dt++) {
                s = coopMultiplyAdd(q_a[dt], coopLoad<CoopB>(&kv_tile[kt * T * D + dt * T], D), s);
            }
            coopStoreT(s, &s_tile[rt_store * T * BLOCK_N + kt * T], BLOCK_N);
// #endif
        }
        workgroupBarrier();

// #if MASK
        let unmasked = tile_all_visible(keys, kv0, n_keys) && mask_state == 2u;
// #else
        let unmasked = tile_all_visible(keys, kv0, n_keys);
// #endif
        // Each lane's finished scores go back to its own places in s_tile
        // for the probabilities below, and which keys the row sees to bits
        // of `seen` (quad i: bits 4i..4i+3): registers that hold the
        // matrices are scarcer than workgroup memory reads.
        var seen = vec2<u32>(0u);
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
            s_tile[at] = s.x;
            s_tile[at + 1u] = s.y;
            s_tile[at + 2u] = s.z;
            s_tile[at + 3u] = s.w;
            let bits = dot(select(vec4<u32>(0u), vec4<u32>(1u, 2u, 4u, 8u), scored.seen), vec4<u32>(1u));
            seen[i / 8u] |= bits << (4u * (i % 8u));
            tile_max = max(tile_max, max(max(s.x, s.y), max(s.z, s.w)));
        }
        partials[my_row * LANES_PER_ROW + lane] = tile_max;
        // Every lane's maxima are published, and K and the scores are no
        // longer read.
        workgroupBarrier();

        for (var i = lid; i < BLOCK_N * DV4; i += WG_SIZE) {
            var vv = vec4<f32>(0.0);
            if (i / DV4 < n_keys) {
                vv = load_v(v_base + (u32(kv0) + i / DV4) * p.v.seq + i % DV4);
            }
            stage4(4u * i, vv);
        }
        var m_new = m;
        for (var b = 0u; b < LANES_PER_ROW; b++) {
            m_new = max(m_new, partials[my_row * LANES_PER_ROW + b]);
        }
        if ((m_new - m) * LOG2_E > RESCALE_LOG2) {
            atomicOr(&shared_words[TILE_STATE], TILE_MOVED);
        }
        // (Also publishes V.)
        let state = workgroupUniformLoad(&shared_words[TILE_STATE]);
        let moved = (state & TILE_MOVED) != 0u;
        var correction = 1.0;
        if (moved) {
            correction = exp2((m - m_new) * LOG2_E);
            l *= correction;
            m = m_new;
        }
        for (var i = 0u; i < QUADS; i++) {
            let key = 4u * (lane + LANES_PER_ROW * i);
            let at_s = my_row * BLOCK_N + key;
            let s = vec4<f32>(s_tile[at_s], s_tile[at_s + 1u], s_tile[at_s + 2u], s_tile[at_s + 3u]);
            let bits = vec4<u32>(seen[i / 8u] >> (4u * (i % 8u))) & vec4<u32>(1u, 2u, 4u, 8u);
            var probs = vec4<f32>(vec4<Operand>(
                select(vec4<f32>(0.0), exp_shifted(s - vec4<f32>(m)), bits != vec4<u32>(0u))));
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
        // (One test, no `&&`: naga lowers that through a variable, which its
        // uniformity analysis cannot follow.)
        let rescale = (state & (TILE_MOVED | TILE_LIVE)) == (TILE_MOVED | TILE_LIVE);
        if (rescale) {
            // Every row's accumulator times its correction, O_COLS columns
            // at a time through s_tile, once every lane has read its scores
            // there.
            workgroupBarrier();
            for (var op = 0u; op < O_PASSES; op++) {
                for (var j = 0u; j < O_PASS; j++) {
// #if COOP_EMULATED
                    emu_store(o_c[op * O_PASS + j], rt * T * O_COLS + j * T, O_COLS, sg_lane);
// #else
                    coopStoreT(o_c[op * O_PASS + j], &s_tile[rt_store * T * O_COLS + j * T], O_COLS);
// #endif
                }
                workgroupBarrier();
                for (var c = lane; c < O_COLS; c += LANES_PER_ROW) {
                    s_tile[my_row * O_COLS + c] *= correction;
                }
                workgroupBarrier();
                for (var j = 0u; j < O_PASS; j++) {
// #if COOP_EMULATED
                    o_c[op * O_PASS + j] = emu_load(rt * T * O_COLS + j * T, O_COLS, sg_lane);
// #else
                    o_c[op * O_PASS + j] = coopLoadT<CoopC>(&s_tile[rt * T * O_COLS + j * T], O_COLS);
// #endif
                }
                workgroupBarrier();
            }
        }
        // The probabilities are published.
        workgroupBarrier();

        // O += P V for each subgroup's row tile: V's rows are the rows of B
        // (row-major, DV apart).
        for (var kt = 0u; kt < KEY_TILES; kt++) {
// #if COOP_EMULATED
            for (var ct = 0u; ct < DVT; ct++) {
                o_c[ct] = emu_values(o_c[ct], rt, kt, ct, sg_lane);
            }
// #else
            let a = coopLoadT<CoopA>(&p_tile[rt * T * BLOCK_N + kt * T], BLOCK_N);
            for (var ct = 0u; ct < DVT; ct++) {
                o_c[ct] = coopMultiplyAdd(a, coopLoadT<CoopB>(&kv_tile[kt * T * DV + ct * T], DV), o_c[ct]);
            }
// #endif
        }
        live = true;
        // The next tile overwrites K/V, the scores and the probabilities.
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
    // A row that saw no key (and has no sink) has l == 0: zeros and lse =
    // +inf; so has a padding row, whatever it computed.
    let real = row < seq_q;
    // Dropout scales the kept probabilities here, once per row (in its
    // last chunk when its keys run in chunks: dropout_output_scale).
// #if DROPOUT
    var inv_l = select(0.0, dropout_output_scale(seq) / l_row, real && l_row > 0.0);
// #else
    var inv_l = select(0.0, dropout_keep_scale() / l_row, real && l_row > 0.0);
// #endif
    if (!covered) {
        // (A NaN made at run time: WGSL makes a constant expression that
        // evaluates to NaN a shader creation error.)
        inv_l = positive_infinity() - positive_infinity();
    }
    let lse = select(row_lse(m, 0.0), row_lse(m, l_row), real);
    let out_row = seq.q_start + row;
    let out = row_output(seq, batch, out_row, head_q);
    // The accumulators out through s_tile, O_COLS columns at a time.
    for (var op = 0u; op < O_PASSES; op++) {
        for (var j = 0u; j < O_PASS; j++) {
// #if COOP_EMULATED
            emu_store(o_c[op * O_PASS + j], rt * T * O_COLS + j * T, O_COLS, sg_lane);
// #else
            coopStoreT(o_c[op * O_PASS + j], &s_tile[rt_store * T * O_COLS + j * T], O_COLS);
// #endif
        }
        workgroupBarrier();
        for (var c = lane; row < seq.extent && c < O_COLS / 4u; c += LANES_PER_ROW) {
            let at = my_row * O_COLS + 4u * c;
            let acc = vec4<f32>(s_tile[at], s_tile[at + 1u], s_tile[at + 2u], s_tile[at + 3u]);
            store_row(out, op * (O_COLS / 4u) + c, select(vec4<f32>(0.0), acc * inv_l, real || !covered));
        }
        workgroupBarrier();
    }
    if (row < seq.extent && has_flag(FLAG_WRITE_LSE) && lane == 0u) {
        lse_buf[(batch * p.heads_q + head_q) * p.seq_q + out_row] = lse;
    }
}
