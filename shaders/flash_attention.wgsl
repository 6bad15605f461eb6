// FlashAttention-2 forward pass, f32 storage, f32 accumulation.
//
// One workgroup owns BLOCK_M = WG_SIZE * ROWS query rows of one (batch, query
// head); invocation `lid` owns rows `row0 + lid + r * WG_SIZE`, r < ROWS. The
// workgroup walks the visible key range in tiles of BLOCK_N keys. Per row,
// the running max `m`, running sum `l` and output accumulator `acc` stay in
// registers; scores are formed four keys at a time (one vec4), so every K/V
// element an invocation reads feeds 4 * ROWS FMAs. Several rows per
// invocation is what makes software adapters fast; GPUs use ROWS = 1.
//
// How K and V reach every invocation (chosen by src/shaders/):
//   default      tiles staged in workgroup memory, a barrier per tile;
//   SUBGROUP_KV  the workgroup fits in one subgroup (WG_SIZE is the
//                adapter's smallest subgroup size, so any size the driver
//                picks holds it): each lane loads a share of the four keys'
//                K (then V) straight from storage and subgroupBroadcast
//                hands every element to all lanes.
//                No workgroup memory, no barriers, and on CPU adapters no
//                per-lane gather of the same address.
//
// Generated constants (prepended by src/shaders/, see `Specialization`):
//   D4        query/key head dimension / 4 (head dims are multiples of 8)
//   DV4       value (and output) head dimension / 4; usually D4
//   BLOCK_N   keys per tile, a multiple of 4
//   WG_SIZE   invocations per workgroup (the smallest subgroup size with
//             SUBGROUP_KV)
//   ROWS      query rows per invocation
//   SLOTS     with SUBGROUP_KV: vec4s each lane holds of four keys' K,
//             ceil(4 * D4 / WG_SIZE); SLOTS_V the same for V (DV4)
// Loops bounded by D4, DV4, ROWS, SLOTS or SLOTS_V may be unrolled by src/shaders/, which
// expands `for (var x = 0u; x < BOUND; x++) {` into copies with `const x`;
// lines between `// #if NAME`, `// #else` and `// #endif` are kept or dropped
// by the same code. The unrolled loops over rows and head-dim vec4s live in
// row_blocks.wgsl's helpers and the carry helpers here (row_blocks.wgsl
// says why), which `main` calls with constant arguments.

const BLOCK_M: u32 = WG_SIZE * ROWS;

// Shared with flash_blocked.wgsl from here (src/shaders/ copies these
// declarations into the register-blocked kernel).
// #if MASK
// An attention mask (src/mask.rs): an additive bias (f32 bits) or a
// boolean mask (one bit per key, 32 keys per word), rows of `row_words`
// words, broadcast over batch and heads by zero strides; and, for
// block-sparse masks, a state per (row tile, key tile): 0 = no key
// attended (skipped), 1 = apply the mask, 2 = every key attended.
// Twin of `MaskParams` in src/params.rs.
struct MaskParams {
    // 0: bias, 1: boolean.
    kind: u32,
    batch_stride: u32,
    head_stride: u32,
    row_words: u32,
    // 0: every tile is in state 1 (a dense mask).
    use_tiles: u32,
    tile_batch_stride: u32,
    tile_head_stride: u32,
    key_tiles: u32,
}

@group(0) @binding(7) var<storage, read> mask_words: array<u32>;
@group(0) @binding(8) var<storage, read> tile_states: array<u32>;
@group(0) @binding(9) var<uniform> mp: MaskParams;

// The mask's bias bits (f32) of four keys from `key0` in the row starting
// at word `base`; 0 (+0.0) past the last key (whose index is clamped to
// stay in the row).
fn mask_bias_bits(base: u32, key0: i32) -> vec4<u32> {
    let keys = vec4<i32>(key0) + vec4<i32>(0, 1, 2, 3);
    let last = vec4<i32>(i32(p.seq_kv) - 1);
    let at = vec4<u32>(min(keys, last)) + vec4<u32>(base);
    let bits = vec4<u32>(mask_words[at.x], mask_words[at.y], mask_words[at.z], mask_words[at.w]);
    return select(vec4<u32>(0u), bits, keys <= last);
}

// The mask's bits for four keys from `key0` (a multiple of 4, so one word
// holds all four).
fn mask_bits(base: u32, key0: i32) -> vec4<bool> {
    let word = mask_words[base + u32(key0) / 32u] >> (u32(key0) % 32u);
    return (vec4<u32>(word) & vec4<u32>(1u, 2u, 4u, 8u)) != vec4<u32>(0u);
}
// #endif

// The rows and keys of one (batch entry, query head) unit: where its query
// rows and keys start in the tensors, how many there are, and how many rows
// the dispatch writes (rows from q_len to extent are padding: zeros,
// logsumexp +inf). `diag` places query row 0 on the unit's key axis: a
// whole sequence has kv_len - q_len (bottom-right alignment); a chunk of
// its keys (src/key_chunks.rs) subtracts the chunk's first key, so masks,
// windows and ALiBi see every key at its place in the sequence. `carry`
// holds CARRY_* bits. `sequence` and `key_base` (set in table units, read
// by the dropout variants through dropout_origin) name the sequence the
// unit belongs to and where its first key sits in it. Twin of
// `SequenceRows` in src/params.rs.
struct SequenceRows {
    q_batch: u32,
    q_start: u32,
    q_len: u32,
    extent: u32,
    kv_batch: u32,
    kv_start: u32,
    kv_len: u32,
    diag: i32,
    carry: u32,
    sequence: u32,
    key_base: u32,
    _pad0: u32,
}

// Bits of SequenceRows.carry (twins of params::carry_flags): a unit that
// covers one chunk of its sequence's keys continues the online softmax of
// the chunks before it (CARRY_IN: each row starts from the normalised
// output in `carry` and the logsumexp in `lse_buf`, the state the previous
// chunk left) and, unless it is the last chunk, leaves its state there
// (CARRY_OUT) instead of writing the output.
const CARRY_IN: u32 = 1u;
const CARRY_OUT: u32 = 2u;

// #if MASK
// Masked calls are dense: batch entry `unit`, all of its rows and keys.
fn sequence_rows(unit: u32) -> SequenceRows {
    return SequenceRows(unit, 0u, p.seq_q, p.seq_q, unit, 0u, p.seq_kv, i32(p.seq_kv) - i32(p.seq_q), 0u, 0u, 0u, 0u);
}
// #else
// With FLAG_SEQUENCES, workgroups along y are the units of the table:
// sequences of a padded or variable-length batch (src/varlen.rs), chunks of
// long key ranges (src/key_chunks.rs); otherwise y is the batch entry and
// the table is a placeholder never read. Heads run along z, the slowest
// axis, so that each of llvmpipe's threads (one contiguous range of the
// grid each) gets the same work whatever the sequences' lengths.
@group(0) @binding(7) var<storage, read> sequences: array<SequenceRows>;
// f32 outputs `[batch, seq_q, heads_q, DV4]` carried between the chunks of
// a chunked call (a placeholder otherwise, never touched).
@group(0) @binding(8) var<storage, read_write> carry: array<vec4<f32>>;

fn sequence_rows(unit: u32) -> SequenceRows {
    if (has_flag(FLAG_SEQUENCES)) {
        return sequences[unit];
    }
    return SequenceRows(unit, 0u, p.seq_q, p.seq_q, unit, 0u, p.seq_kv, i32(p.seq_kv) - i32(p.seq_q), 0u, 0u, 0u, 0u);
}

// Where row `row` of query head `head_q` of batch entry `batch` keeps its
// carried output.
fn carry_base(batch: u32, row: u32, head_q: u32) -> u32 {
    return ((batch * p.seq_q + row) * p.heads_q + head_q) * DV4;
}
// #endif
// #if DROPOUT

// Where unit `index`'s rows and keys sit in the dropout mask (src/dropout.rs):
// the sequence whose mask it draws from (the batch entry, or a packed
// batch's sequence index) and the place of its first key in that sequence.
// Table units name both (a chunk of a sequence's keys starts past its key
// 0, so the mask carries on across chunks instead of restarting); a dense
// call's unit `index` is batch entry `index`, whole.
fn dropout_origin(index: u32, unit: SequenceRows) -> vec2<u32> {
    if (has_flag(FLAG_SEQUENCES)) {
        return vec2<u32>(unit.sequence, unit.key_base);
    }
    return vec2<u32>(index, 0u);
}

// What a row's weighted sum of kept values is multiplied by (besides
// 1 / l) when `unit` writes it: 1 / (1 - p) in the row's last chunk; a
// chunk that carries on leaves it unscaled, since the carry is the row's
// softmax state that the next chunk continues and the last scales, once.
fn dropout_output_scale(unit: SequenceRows) -> f32 {
    return select(dropout_keep_scale(), 1.0, (unit.carry & CARRY_OUT) != 0u);
}
// #endif

// Shared with flash_blocked.wgsl up to here.

// #if MASK
// #else
// Row `r`'s accumulator from a key chunk's carry at vec4 `c_base`.
fn load_carried_row(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, r: u32, c_base: u32) {
    for (var d = 0u; d < DV4; d++) {
        (*acc)[r * DV4 + d] = carry[c_base + d];
    }
}

// Row `r`'s output into the carry at vec4 `c_base`, as store_output_row.
fn store_carried_row(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, r: u32, c_base: u32, inv_l: f32, real: bool) {
    for (var d = 0u; d < DV4; d++) {
        carry[c_base + d] = select(vec4<f32>(0.0), (*acc)[r * DV4 + d] * inv_l, real);
    }
}
// #endif

// #if SUBGROUP_KV
// #else
var<workgroup> k_tile: array<vec4<f32>, BLOCK_N * D4>;
var<workgroup> v_tile: array<vec4<f32>, BLOCK_N * DV4>;
// #endif

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
// #if SUBGROUP_KV
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let tile = paired_block(wg.x, groups.x);
    let seq = sequence_rows(wg.y);
    let batch = seq.q_batch;
    let head_q = wg.z;
    let row0 = tile * BLOCK_M;
    // The dispatch covers the longest sequence; shorter ones stop here
    // (the whole workgroup at once, before any barrier).
    if (row0 >= seq.extent) {
        return;
    }
    let seq_q = seq.q_len;
    let seq_kv = seq.kv_len;
    let head_kv = head_q / (p.heads_q / p.heads_kv);
    // Query row i sits at key position i + diag.
    let diag = seq.diag;
    // Padding rows (from seq_q on) compute on a copy of the last real row
    // and are written as zeros; they widen no key range.
    let last_row = min(row0 + BLOCK_M, max(seq_q, 1u)) - 1u;
    // Of an invocation's rows (row0 + lid + r * WG_SIZE), those with
    // r < live_rows hold a real row in some invocation; the ones past them
    // are padding in all, and skip their products (a short sequence's last
    // row block: 11 % of a BERT batch's time on lavapipe). The test also
    // made llvmpipe's code for full blocks 12-18 % faster; in the masked
    // kernel (dense rows) it cost 3-5 %, so there it is a constant.
// #if MASK
    let live_rows = ROWS;
// #else
    let live_rows = min(ROWS, (min(seq_q - min(row0, seq_q), BLOCK_M) + WG_SIZE - 1u) / WG_SIZE);
// #endif

    // Keys some row of the workgroup sees (the tiles to visit), and keys
    // every row sees (tiles inside that range need no mask).
    var wg_lo = 0;
    var wg_hi = i32(seq_kv) - 1;
    var all_lo = 0;
    var all_hi = i32(seq_kv) - 1;
    if (row0 >= seq_q) {
        wg_hi = -1;
    }
    if (has_flag(FLAG_WINDOW_LEFT)) {
        wg_lo = max(wg_lo, i32(row0) + diag - i32(p.window_left));
        all_lo = max(all_lo, i32(last_row) + diag - i32(p.window_left));
    }
    if (has_flag(FLAG_WINDOW_RIGHT)) {
        wg_hi = min(wg_hi, i32(last_row) + diag + i32(p.window_right));
        all_hi = min(all_hi, i32(row0) + diag + i32(p.window_right));
    }
    let alibi_slope = alibi_slope_of(batch, head_q);
    let start = softmax_start(head_q, true);

    var q: array<vec4<f32>, ROWS * D4>;
    var acc: array<vec4<f32>, ROWS * DV4>;
    var m: array<f32, ROWS>;
    var l: array<f32, ROWS>;
    var row_pos: array<i32, ROWS>;
    var row_lo: array<i32, ROWS>;
    var row_hi: array<i32, ROWS>;
// #if DROPOUT
    // Each row's dropout hash state, from its sequence's mask; keys count
    // from the sequence's first (a chunk's from `drop_origin.y`).
    let drop_origin = dropout_origin(wg.y, seq);
    let drop_key_base = vec4<i32>(i32(drop_origin.y));
    var drop_state: array<u32, ROWS>;
// #endif
// #if MASK
    var mask_row: array<u32, ROWS>;
    let mask_base = batch * mp.batch_stride + head_q * mp.head_stride;
    // Tiles are aligned to multiples of BLOCK_N, as the tile states are.
    wg_lo -= wg_lo % i32(BLOCK_N);
// #endif
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + lid + r * WG_SIZE;
// #if MASK
        mask_row[r] = mask_base + min(row, seq_q - 1u) * mp.row_words;
// #endif
        row_pos[r] = i32(row) + diag;
        let bounds = visible_keys(row_pos[r], seq_kv);
        row_lo[r] = bounds.x;
        row_hi[r] = bounds.y;
        m[r] = start.x;
        l[r] = start.y;
// #if DROPOUT
        drop_state[r] = dropout_row_state(drop_origin.x, head_q, row);
// #endif
        // Rows past the end compute on a copy of the last row; never stored.
        let q_row = seq.q_start + min(row, max(seq_q, 1u) - 1u);
        // (acc starts at zero, as every WGSL variable does.)
        load_query_row(&q, r, batch * p.q.batch + q_row * p.q.seq + head_q * p.q.head + p.q.offset);
// #if MASK
// #else
        if ((seq.carry & CARRY_IN) != 0u) {
            // The chunks before left (lse, o): the same softmax as a running
            // max of lse and a sum of 1 over an accumulator of o (a sink
            // is already in lse). +inf: they saw no key and had no sink.
            let carried = lse_buf[(batch * p.heads_q + head_q) * p.seq_q + q_row];
            if (carried != positive_infinity()) {
                m[r] = carried;
                l[r] = 1.0;
                load_carried_row(&acc, r, carry_base(batch, q_row, head_q));
            } else {
                m[r] = MIN_SCORE;
                l[r] = 0.0;
            }
        }
// #endif
    }

    let k_base = seq.kv_batch * p.k.batch + seq.kv_start * p.k.seq + head_kv * p.k.head + p.k.offset;
    let v_base = seq.kv_batch * p.v.batch + seq.kv_start * p.v.seq + head_kv * p.v.head + p.v.offset;

    // Tiles above the causal diagonal or outside the window are never visited.
    for (var kv0 = wg_lo; kv0 <= wg_hi; kv0 += i32(BLOCK_N)) {
        let n_keys = u32(min(i32(BLOCK_N), wg_hi + 1 - kv0));
// #if MASK
        var mask_state = 1u;
        if (mp.use_tiles != 0u) {
            mask_state = tile_states[batch * mp.tile_batch_stride + head_q * mp.tile_head_stride + tile * mp.key_tiles + u32(kv0) / BLOCK_N];
        }
        if (mask_state == 0u) {
            continue;
        }
// #endif
// #if SUBGROUP_KV
// #else
        // One loop stages K and V when they are as wide (the test is a
        // constant), else each has its own.
        for (var i = lid; i < BLOCK_N * D4; i += WG_SIZE) {
            let key = i / D4;
            let d = i % D4;
            var kk = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (key < n_keys) {
                let pos = u32(kv0) + key;
                kk = load_k(k_base + pos * p.k.seq + d);
                if (D4 == DV4) {
                    vv = load_v(v_base + pos * p.v.seq + d);
                }
            }
            k_tile[i] = kk;
            if (D4 == DV4) {
                v_tile[i] = vv;
            }
        }
        if (D4 != DV4) {
            for (var i = lid; i < BLOCK_N * DV4; i += WG_SIZE) {
                let key = i / DV4;
                var vv = vec4<f32>(0.0);
                if (key < n_keys) {
                    vv = load_v(v_base + (u32(kv0) + key) * p.v.seq + i % DV4);
                }
                v_tile[i] = vv;
            }
        }
        workgroupBarrier();
// #endif

// #if MASK
        let unmasked = n_keys == BLOCK_N && kv0 >= all_lo && kv0 + i32(BLOCK_N) - 1 <= all_hi && mask_state == 2u;
// #else
        let unmasked = n_keys == BLOCK_N && kv0 >= all_lo && kv0 + i32(BLOCK_N) - 1 <= all_hi;
// #endif
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
// #if SUBGROUP_KV
            // The four keys' 4 * D4 vec4s, spread over the subgroup: lane
            // `lane` holds element j = lane + WG_SIZE * slot. Each lane loads
            // a different element and broadcasts it, instead of every lane
            // loading every element (a gather per load on CPU adapters).
            // Lanes are numbered by subgroup_invocation_id, not by the
            // invocation index, so no lane layout is assumed.
            var slab: array<vec4<f32>, SLOTS>;
            for (var slot = 0u; slot < SLOTS; slot++) {
                slab[slot] = slab_element(false, k_base, u32(kv0), c, n_keys, lane + WG_SIZE * slot);
            }
// #endif
            for (var d = 0u; d < D4; d++) {
// #if SUBGROUP_KV
                let k0 = subgroupBroadcast(slab[d / WG_SIZE], d % WG_SIZE);
                let k1 = subgroupBroadcast(slab[(D4 + d) / WG_SIZE], (D4 + d) % WG_SIZE);
                let k2 = subgroupBroadcast(slab[(2u * D4 + d) / WG_SIZE], (2u * D4 + d) % WG_SIZE);
                let k3 = subgroupBroadcast(slab[(3u * D4 + d) / WG_SIZE], (3u * D4 + d) % WG_SIZE);
// #else
                let k0 = k_tile[t + d];
                let k1 = k_tile[t + D4 + d];
                let k2 = k_tile[t + 2u * D4 + d];
                let k3 = k_tile[t + 3u * D4 + d];
// #endif
                add_key_column(&q, &dots, d, live_rows, k0, k1, k2, k3);
            }

            let key_pos = vec4<i32>(kv0 + i32(c)) + vec4<i32>(0, 1, 2, 3);
            var probs: array<vec4<f32>, ROWS>;
            var correction: array<f32, ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                var s = finish_scores(dots[r], row_pos[r], key_pos, alibi_slope);
                var visible = vec4<bool>(true);
                if (!unmasked) {
                    visible = (key_pos >= vec4<i32>(row_lo[r])) & (key_pos <= vec4<i32>(row_hi[r]));
// #if MASK
                    if (mask_state == 1u) {
                        if (mp.kind == 0u) {
                            // -inf hides a key; its bits say so whatever
                            // the score (even a NaN from a hidden key's K).
                            let bits = mask_bias_bits(mask_row[r], key_pos.x);
                            visible = visible & (bits != vec4<u32>(NEG_INF_BITS));
                            s += bitcast<vec4<f32>>(bits);
                        } else {
                            visible = visible & mask_bits(mask_row[r], key_pos.x);
                        }
                    }
// #endif
                    s = select(vec4<f32>(MIN_SCORE), s, visible);
                }
                let m_new = max(m[r], max(max(s.x, s.y), max(s.z, s.w)));
                correction[r] = exp2((m[r] - m_new) * LOG2_E);
                probs[r] = select(vec4<f32>(0.0), exp_shifted(s - vec4<f32>(m_new)), visible);
                l[r] = l[r] * correction[r] + (probs[r].x + probs[r].y) + (probs[r].z + probs[r].w);
                m[r] = m_new;
            }
// #if DROPOUT
            // Dropout acts after the softmax: the sums (and the logsumexps)
            // keep every probability, P V only the kept (scaled by
            // 1 / (1 - p) with the output).
            for (var r = 0u; r < ROWS; r++) {
                probs[r] *= dropout_kept(drop_state[r], key_pos + drop_key_base);
            }
// #endif

// #if SUBGROUP_KV
            var slab_v: array<vec4<f32>, SLOTS_V>;
            for (var slot = 0u; slot < SLOTS_V; slot++) {
                slab_v[slot] = slab_element(true, v_base, u32(kv0), c, n_keys, lane + WG_SIZE * slot);
            }
// #endif
            for (var d = 0u; d < DV4; d++) {
// #if SUBGROUP_KV
                let v0 = subgroupBroadcast(slab_v[d / WG_SIZE], d % WG_SIZE);
                let v1 = subgroupBroadcast(slab_v[(DV4 + d) / WG_SIZE], (DV4 + d) % WG_SIZE);
                let v2 = subgroupBroadcast(slab_v[(2u * DV4 + d) / WG_SIZE], (2u * DV4 + d) % WG_SIZE);
                let v3 = subgroupBroadcast(slab_v[(3u * DV4 + d) / WG_SIZE], (3u * DV4 + d) % WG_SIZE);
// #else
                let v0 = v_tile[tv + d];
                let v1 = v_tile[tv + DV4 + d];
                let v2 = v_tile[tv + 2u * DV4 + d];
                let v3 = v_tile[tv + 3u * DV4 + d];
// #endif
                add_value_column(&acc, &correction, &probs, d, live_rows, v0, v1, v2, v3);
            }
        }
// #if SUBGROUP_KV
// #else
        workgroupBarrier();
// #endif
    }

    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + lid + r * WG_SIZE;
        if (row < seq.extent) {
            // A row that saw no key (and has no sink) has l == 0: zeros and
            // lse = +inf; so has a padding row, whatever it computed.
            let real = row < seq_q;
            // Dropout scales the kept probabilities here, once per row (in its
            // last chunk when its keys run in chunks: dropout_output_scale).
// #if DROPOUT
            let inv_l = select(0.0, dropout_output_scale(seq) / l[r], real && l[r] > 0.0);
// #else
            let inv_l = select(0.0, dropout_keep_scale() / l[r], real && l[r] > 0.0);
// #endif
            let lse = select(row_lse(m[r], 0.0), row_lse(m[r], l[r]), real);
            let o_row = seq.q_start + row;
            let o_base = batch * p.o.batch + o_row * p.o.seq + head_q * p.o.head + p.o.offset;
// #if MASK
            store_output_row(&acc, r, o_base, inv_l, real);
// #else
            if ((seq.carry & CARRY_OUT) != 0u) {
                store_carried_row(&acc, r, carry_base(batch, o_row, head_q), inv_l, real);
            } else {
                store_output_row(&acc, r, o_base, inv_l, real);
            }
// #endif
            if (has_flag(FLAG_WRITE_LSE)) {
                lse_buf[(batch * p.heads_q + head_q) * p.seq_q + o_row] = lse;
            }
        }
    }
}
