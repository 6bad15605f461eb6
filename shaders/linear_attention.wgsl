// Linear attention (Katharopoulos et al. 2020), chunkwise:
//   out_i = phi(q_i)^T S_i / (phi(q_i) . z_i + eps),
//   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j),
// over every key (non-causal) or keys j <= i (causal). Three passes:
//   chunk_states   per key split: its sum of phi(k) v^T and of phi(k), one
//                  "slot" of the split-state buffer each;
//   scan_states    per (batch, KV head): runs over the slots in order,
//                  starting from the carried state; causal calls leave in
//                  each slot the sum of everything before it (an exclusive
//                  prefix), and the carried state ends as the total;
//   chunk_outputs  per block of CHUNK query rows: phi(q) against the state
//                  before the block (causal) or the total (non-causal);
//                  causal calls add the block's own keys j <= i
//                  (quadratic within the chunk).
// Recurrent decoding (one token per sequence, with a state) instead runs
//   update_state   S += phi(k) v^T and z += phi(k) in the carried state, in
//                  place,
// then chunk_outputs in its non-causal form against the updated state:
// the state is read twice and written once, not seven times.
// In causal calls a key split is exactly one chunk of CHUNK keys, aligned
// with the query blocks (queries and keys are the same tokens).
//
// Both heavy passes are matrix products written like the forward kernel:
// an invocation keeps several rows of its result in registers, so that
// each shared value it receives feeds one FMA per row. How shared values
// (V rows, state rows, the chunk's keys) reach the invocations:
//   default              staged in workgroup memory, a barrier per tile;
//   SUBGROUP_BROADCAST   the workgroup is one subgroup: each lane loads a
//                        share of them from storage and subgroupBroadcast
//                        hands every element to all lanes (no per-lane
//                        gather of one address on CPU adapters).
//
// Bindings 0-6 and the storage helpers come from attention_common.wgsl
// (which src/shaders/ prepends); the lse (5) and ALiBi (6) bindings are
// unused placeholders here.
//
// Generated constants (src/shaders/, `LinearTiling`), per pass:
//   DK4      query/key head dim / 4
//   DV4      value head dim / 4
//   WG_SIZE  invocations per workgroup (the smallest subgroup size with
//            SUBGROUP_BROADCAST)
//   BLOCK_N  keys staged per tile (chunk_states; causal chunk_outputs)
//   RQ       chunk_states: row quads of S per invocation (RQ * WG_SIZE >=
//            DK4; equal without SUBGROUP_BROADCAST)
//   CB4      chunk_states: value vec4 columns per workgroup (divides DV4;
//            workgroup_id.z picks the column block)
//   ROWS     chunk_outputs: query rows per invocation
//   S_ROWS   chunk_outputs: rows of the state staged per tile (a multiple
//            of 4 dividing 4 * DK4)
//   SLOTS_C, SLOTS_S, SLOTS_K, SLOTS_V   with SUBGROUP_BROADCAST: vec4s
//            each lane holds of a V row's CB4 columns, of four state rows,
//            of a key's phi(k) and of its v: ceil(n / WG_SIZE)
// Loops bounded by DK4, DV4, RQ, CB4, ROWS or SLOTS_* are unrolled by
// src/shaders/.

// Twin of `LinearParams` in src/params.rs.
struct LinearParams {
    // Bit set of LINEAR_* below.
    flags: u32,
    eps: f32,
    // Keys per split of chunk_states (CHUNK in causal calls).
    split_keys: u32,
    // Splits in this dispatch's segment: slots per (batch, KV head) of the
    // split-state buffer, and chunk_outputs' query blocks in causal calls.
    splits: u32,
    // Index of the segment's first split over the whole sequence.
    first_split: u32,
    // Vec4s of one state slot: 4 * DK4 rows of DV4, then z (DK4).
    slot4: u32,
    // Query heads per KV head.
    group: u32,
    _pad: u32,
}

const LINEAR_CAUSAL: u32 = 1u;
// phi(x) = x instead of elu(x) + 1.
const LINEAR_IDENTITY_MAP: u32 = 2u;
// scan_states starts from the carried state instead of zero.
const LINEAR_CARRY_IN: u32 = 4u;

@group(0) @binding(7) var<uniform> lp: LinearParams;
// [batch * heads_kv, splits] slots of [4 * DK4, DV4] vec4s + [DK4] vec4s.
@group(0) @binding(8) var<storage, read_write> split_states: array<vec4<f32>>;
// [batch * heads_kv] slots, the same layout: the state carried between
// segments and calls (a caller's LinearState, or scratch).
@group(0) @binding(9) var<storage, read_write> carried: array<vec4<f32>>;

fn has_linear_flag(bit: u32) -> bool {
    return (lp.flags & bit) != 0u;
}

// The feature map, element-wise: elu(x) + 1 (> 0 for every finite x), or
// the identity.
fn feature(x: vec4<f32>) -> vec4<f32> {
    if (has_linear_flag(LINEAR_IDENTITY_MAP)) {
        return x;
    }
    return select(exp(x), x + 1.0, x > vec4<f32>(0.0));
}

// Vec4 offset of z in a slot.
fn z_offset() -> u32 {
    return 4u * DK4 * DV4;
}

// #if SUBGROUP_BROADCAST
// #else
// Keys staged per tile: phi(K), and V (chunk_states: only its CB4 columns).
var<workgroup> k_features: array<vec4<f32>, BLOCK_N * DK4>;
var<workgroup> v_tile: array<vec4<f32>, BLOCK_N * DV4>;
// Rows [a0, a0 + S_ROWS) of the state (S) and their z.
var<workgroup> s_tile: array<vec4<f32>, S_ROWS * DV4>;
var<workgroup> z_tile: array<vec4<f32>, S_ROWS / 4u>;
// #endif

// Invocation `lane` owns row quads lane + r * WG_SIZE (r < RQ) of S and the
// workgroup's CB4 value columns: per key, RQ vec4s of phi(k) of its own and
// CB4 vec4s of V shared by the workgroup feed 4 * RQ * CB4 vec4 FMAs.
@compute @workgroup_size(WG_SIZE)
fn chunk_states(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
// #if SUBGROUP_BROADCAST
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
    let split = wid.x;
    let bh = wid.y;
    let cb = wid.z;
    let b = bh / p.heads_kv;
    let h = bh % p.heads_kv;
    let first = (lp.first_split + split) * lp.split_keys;
    let last = min(first + lp.split_keys, p.seq_kv);
    let k_base = p.k.offset + b * p.k.batch + h * p.k.head;
    let v_base = p.v.offset + b * p.v.batch + h * p.v.head + cb * CB4;
    // acc[(4 * r + c) * CB4 + x]: row 4 * (lane + r * WG_SIZE) + c, column x.
    var acc: array<vec4<f32>, 4u * RQ * CB4>;
    var z: array<vec4<f32>, RQ>;
    for (var r = 0u; r < RQ; r++) {
        z[r] = vec4<f32>(0.0);
        for (var x = 0u; x < CB4; x++) {
            acc[4u * r * CB4 + x] = vec4<f32>(0.0);
            acc[(4u * r + 1u) * CB4 + x] = vec4<f32>(0.0);
            acc[(4u * r + 2u) * CB4 + x] = vec4<f32>(0.0);
            acc[(4u * r + 3u) * CB4 + x] = vec4<f32>(0.0);
        }
    }
    // Four keys per step: each accumulator is read and written once per
    // four FMAs (on CPU adapters the accumulators live in memory).
// #if SUBGROUP_BROADCAST
    for (var j = first; j < last; j += 4u) {
        var kf: array<vec4<f32>, 4u * RQ>;
        var slab: array<vec4<f32>, 4u * SLOTS_C>;
        for (var step = 0u; step < 4u; step++) {
            // Keys past the split weigh nothing (phi(0) is not 0).
            let key = min(j + step, last - 1u);
            let weight = select(0.0, 1.0, j + step < last);
            for (var r = 0u; r < RQ; r++) {
                // Lanes past the head dim (RQ * WG_SIZE > DK4) repeat the
                // last quad and store nothing.
                kf[step * RQ + r] = weight * feature(load_k(k_base + key * p.k.seq + min(lane + r * WG_SIZE, DK4 - 1u)));
            }
            for (var slot = 0u; slot < SLOTS_C; slot++) {
                slab[step * SLOTS_C + slot] = load_v(v_base + key * p.v.seq + min(lane + slot * WG_SIZE, CB4 - 1u));
            }
        }
        for (var x = 0u; x < CB4; x++) {
            let v0 = subgroupBroadcast(slab[x / WG_SIZE], x % WG_SIZE);
            let v1 = subgroupBroadcast(slab[SLOTS_C + x / WG_SIZE], x % WG_SIZE);
            let v2 = subgroupBroadcast(slab[2u * SLOTS_C + x / WG_SIZE], x % WG_SIZE);
            let v3 = subgroupBroadcast(slab[3u * SLOTS_C + x / WG_SIZE], x % WG_SIZE);
// #else
    let lane = lid;
    for (var tile = first; tile < last; tile += BLOCK_N) {
        let n = min(BLOCK_N, last - tile);
        workgroupBarrier();
        // Past the split's end the tile holds zeros, which weigh nothing.
        for (var i = lid; i < BLOCK_N * DK4; i += WG_SIZE) {
            var kf = vec4<f32>(0.0);
            if (i / DK4 < n) {
                kf = feature(load_k(k_base + (tile + i / DK4) * p.k.seq + i % DK4));
            }
            k_features[i] = kf;
        }
        for (var i = lid; i < BLOCK_N * CB4; i += WG_SIZE) {
            var v = vec4<f32>(0.0);
            if (i / CB4 < n) {
                v = load_v(v_base + (tile + i / CB4) * p.v.seq + i % CB4);
            }
            v_tile[i] = v;
        }
        workgroupBarrier();
        for (var j = 0u; j < n; j += 4u) {
        var kf: array<vec4<f32>, 4u * RQ>;
        for (var step = 0u; step < 4u; step++) {
            for (var r = 0u; r < RQ; r++) {
                kf[step * RQ + r] = k_features[(j + step) * DK4 + lid + r * WG_SIZE];
            }
        }
        for (var x = 0u; x < CB4; x++) {
            let v0 = v_tile[j * CB4 + x];
            let v1 = v_tile[(j + 1u) * CB4 + x];
            let v2 = v_tile[(j + 2u) * CB4 + x];
            let v3 = v_tile[(j + 3u) * CB4 + x];
// #endif
            for (var r = 0u; r < RQ; r++) {
                let k0 = kf[r];
                let k1 = kf[RQ + r];
                let k2 = kf[2u * RQ + r];
                let k3 = kf[3u * RQ + r];
                let at = 4u * r * CB4 + x;
                acc[at] = fma(vec4<f32>(k3.x), v3, fma(vec4<f32>(k2.x), v2, fma(vec4<f32>(k1.x), v1, fma(vec4<f32>(k0.x), v0, acc[at]))));
                acc[at + CB4] = fma(vec4<f32>(k3.y), v3, fma(vec4<f32>(k2.y), v2, fma(vec4<f32>(k1.y), v1, fma(vec4<f32>(k0.y), v0, acc[at + CB4]))));
                acc[at + 2u * CB4] = fma(vec4<f32>(k3.z), v3, fma(vec4<f32>(k2.z), v2, fma(vec4<f32>(k1.z), v1, fma(vec4<f32>(k0.z), v0, acc[at + 2u * CB4]))));
                acc[at + 3u * CB4] = fma(vec4<f32>(k3.w), v3, fma(vec4<f32>(k2.w), v2, fma(vec4<f32>(k1.w), v1, fma(vec4<f32>(k0.w), v0, acc[at + 3u * CB4]))));
            }
        }
        for (var r = 0u; r < RQ; r++) {
            z[r] += (kf[r] + kf[RQ + r]) + (kf[2u * RQ + r] + kf[3u * RQ + r]);
        }
// #if SUBGROUP_BROADCAST
// #else
        }
// #endif
    }
    let slot = (bh * lp.splits + split) * lp.slot4;
    for (var r = 0u; r < RQ; r++) {
        let a4 = lane + r * WG_SIZE;
        if (a4 < DK4) {
            let row = slot + 4u * a4 * DV4 + cb * CB4;
            for (var x = 0u; x < CB4; x++) {
                split_states[row + x] = acc[4u * r * CB4 + x];
                split_states[row + DV4 + x] = acc[(4u * r + 1u) * CB4 + x];
                split_states[row + 2u * DV4 + x] = acc[(4u * r + 2u) * CB4 + x];
                split_states[row + 3u * DV4 + x] = acc[(4u * r + 3u) * CB4 + x];
            }
            if (cb == 0u) {
                split_states[slot + z_offset() + a4] = z[r];
            }
        }
    }
}

// One invocation per vec4 of a slot, per (batch, KV head), folded over two
// dispatch dimensions like the element-wise kernels.
@compute @workgroup_size(WG_SIZE)
fn scan_states(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let slots = p.batch * p.heads_kv;
    if (index >= slots * lp.slot4) {
        return;
    }
    let bh = index / lp.slot4;
    let element = index % lp.slot4;
    var carry = vec4<f32>(0.0);
    if (has_linear_flag(LINEAR_CARRY_IN)) {
        carry = carried[index];
    }
    let causal = has_linear_flag(LINEAR_CAUSAL);
    for (var split = 0u; split < lp.splits; split++) {
        let at = (bh * lp.splits + split) * lp.slot4 + element;
        let delta = split_states[at];
        if (causal) {
            split_states[at] = carry;
        }
        carry += delta;
    }
    carried[index] = carry;
}

// One invocation per row of S (its phi(k) element computed once, its
// DV4 vec4s updated in turn), then one per vec4 of z; per (batch, KV
// head), folded over two dispatch dimensions like the scan.
@compute @workgroup_size(WG_SIZE)
fn update_state(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let per_slot = 5u * DK4;
    if (index >= p.batch * p.heads_kv * per_slot) {
        return;
    }
    let bh = index / per_slot;
    let item = index % per_slot;
    let b = bh / p.heads_kv;
    let h = bh % p.heads_kv;
    let k_base = p.k.offset + b * p.k.batch + h * p.k.head;
    let slot = bh * lp.slot4;
    if (item >= 4u * DK4) {
        let a4 = item - 4u * DK4;
        carried[slot + z_offset() + a4] += feature(load_k(k_base + a4));
        return;
    }
    let kf = feature(load_k(k_base + item / 4u))[item % 4u];
    let v_base = p.v.offset + b * p.v.batch + h * p.v.head;
    let row = slot + item * DV4;
    for (var x = 0u; x < DV4_ROLLED; x++) {
        carried[row + x] = fma(vec4<f32>(kf), load_v(v_base + x), carried[row + x]);
    }
}

// The loop over the state's rows indexes memory, not registers, so it
// stays a loop (the unroller expands loops bounded by DK4 itself).
const DK4_ROLLED: u32 = DK4;
// The same for update_state's loop over a row's value vec4s.
const DV4_ROLLED: u32 = DV4;

const CHUNK: u32 = WG_SIZE * ROWS;

// Element `i` of the state slot at `at` (split states in causal calls, the
// carried total otherwise).
fn state_at(at: u32) -> vec4<f32> {
    // #if CAUSAL
    return split_states[at];
    // #else
    return carried[at];
    // #endif
}

// Invocation `lane` owns query rows row0 + lane + r * WG_SIZE (r < ROWS):
// each state element it receives feeds ROWS FMAs per vec4.
@compute @workgroup_size(WG_SIZE)
fn chunk_outputs(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
// #if SUBGROUP_BROADCAST
    @builtin(subgroup_invocation_id) lane: u32,
// #endif
) {
// #if SUBGROUP_BROADCAST
// #else
    let lane = lid;
// #endif
    let block = wid.x;
    let bh_q = wid.y;
    let b = bh_q / p.heads_q;
    let h = bh_q % p.heads_q;
    let h_kv = h / lp.group;
    let row0 = (lp.first_split + block) * CHUNK;
    // Rows past the end read the last row (always there) and store nothing.
    var q_base: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let row = min(row0 + lane + r * WG_SIZE, p.seq_q - 1u);
        q_base[r] = p.q.offset + b * p.q.batch + row * p.q.seq + h * p.q.head;
    }
    // Causal calls read the state before this block, the others the total.
    var slot = (b * p.heads_kv + h_kv) * lp.slot4;
    // #if CAUSAL
    slot = ((b * p.heads_kv + h_kv) * lp.splits + block) * lp.slot4;
    // #endif
    // phi(q) of the invocation's rows, read once: the loops below index it
    // by a loop variable the whole workgroup shares.
    var q: array<vec4<f32>, ROWS * DK4>;
    for (var a4 = 0u; a4 < DK4_ROLLED; a4++) {
        for (var r = 0u; r < ROWS; r++) {
            q[r * DK4 + a4] = feature(load_q(q_base[r] + a4));
        }
    }
    var acc: array<vec4<f32>, ROWS * DV4>;
    var den: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        den[r] = 0.0;
        for (var x = 0u; x < DV4; x++) {
            acc[r * DV4 + x] = vec4<f32>(0.0);
        }
    }
// #if SUBGROUP_BROADCAST
    for (var t4 = 0u; t4 < DK4_ROLLED; t4++) {
        // Four state rows (4 * DV4 vec4s, contiguous), spread over the
        // lanes; lanes past them repeat the last element.
        var slab: array<vec4<f32>, SLOTS_S>;
        for (var s = 0u; s < SLOTS_S; s++) {
            slab[s] = state_at(slot + 4u * t4 * DV4 + min(lane + s * WG_SIZE, 4u * DV4 - 1u));
        }
        let z = state_at(slot + z_offset() + t4);
        var qf: array<vec4<f32>, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            qf[r] = q[r * DK4 + t4];
            den[r] += dot(qf[r], z);
        }
        for (var x = 0u; x < DV4; x++) {
            let s0 = subgroupBroadcast(slab[x / WG_SIZE], x % WG_SIZE);
            let s1 = subgroupBroadcast(slab[(DV4 + x) / WG_SIZE], (DV4 + x) % WG_SIZE);
            let s2 = subgroupBroadcast(slab[(2u * DV4 + x) / WG_SIZE], (2u * DV4 + x) % WG_SIZE);
            let s3 = subgroupBroadcast(slab[(3u * DV4 + x) / WG_SIZE], (3u * DV4 + x) % WG_SIZE);
// #else
    for (var a0 = 0u; a0 < 4u * DK4; a0 += S_ROWS) {
        workgroupBarrier();
        for (var i = lid; i < S_ROWS * DV4; i += WG_SIZE) {
            s_tile[i] = state_at(slot + a0 * DV4 + i);
        }
        for (var i = lid; i < S_ROWS / 4u; i += WG_SIZE) {
            z_tile[i] = state_at(slot + z_offset() + a0 / 4u + i);
        }
        workgroupBarrier();
        for (var t4 = 0u; t4 < S_ROWS / 4u; t4++) {
        var qf: array<vec4<f32>, ROWS>;
        let z = z_tile[t4];
        for (var r = 0u; r < ROWS; r++) {
            qf[r] = q[r * DK4 + a0 / 4u + t4];
            den[r] += dot(qf[r], z);
        }
        for (var x = 0u; x < DV4; x++) {
            let s0 = s_tile[4u * t4 * DV4 + x];
            let s1 = s_tile[(4u * t4 + 1u) * DV4 + x];
            let s2 = s_tile[(4u * t4 + 2u) * DV4 + x];
            let s3 = s_tile[(4u * t4 + 3u) * DV4 + x];
// #endif
            for (var r = 0u; r < ROWS; r++) {
                var o = fma(vec4<f32>(qf[r].x), s0, acc[r * DV4 + x]);
                o = fma(vec4<f32>(qf[r].y), s1, o);
                o = fma(vec4<f32>(qf[r].z), s2, o);
                acc[r * DV4 + x] = fma(vec4<f32>(qf[r].w), s3, o);
            }
        }
// #if SUBGROUP_BROADCAST
// #else
        }
// #endif
    }
    // #if CAUSAL
    // The block's own keys j <= row: phi(q) . phi(k_j) weighs v_j.
    let k_base = p.k.offset + b * p.k.batch + h_kv * p.k.head;
    let v_base = p.v.offset + b * p.v.batch + h_kv * p.v.head;
// #if SUBGROUP_BROADCAST
    let keys_end = min(row0 + CHUNK, p.seq_kv);
    for (var key = row0; key < keys_end; key++) {
        var k_slab: array<vec4<f32>, SLOTS_K>;
        for (var s = 0u; s < SLOTS_K; s++) {
            k_slab[s] = feature(load_k(k_base + key * p.k.seq + min(lane + s * WG_SIZE, DK4 - 1u)));
        }
        var v_slab: array<vec4<f32>, SLOTS_V>;
        for (var s = 0u; s < SLOTS_V; s++) {
            v_slab[s] = load_v(v_base + key * p.v.seq + min(lane + s * WG_SIZE, DV4 - 1u));
        }
        var w: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            w[r] = 0.0;
        }
        for (var x = 0u; x < DK4; x++) {
            let kx = subgroupBroadcast(k_slab[x / WG_SIZE], x % WG_SIZE);
            for (var r = 0u; r < ROWS; r++) {
                w[r] = fma_dot(q[r * DK4 + x], kx, w[r]);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            w[r] = select(0.0, w[r], key <= row0 + lane + r * WG_SIZE);
            den[r] += w[r];
        }
        for (var x = 0u; x < DV4; x++) {
            let v = subgroupBroadcast(v_slab[x / WG_SIZE], x % WG_SIZE);
// #else
    for (var tile = 0u; tile < CHUNK; tile += BLOCK_N) {
        let key0 = row0 + tile;
        // Uniform: every invocation leaves together.
        if (key0 >= p.seq_kv) {
            break;
        }
        workgroupBarrier();
        for (var i = lid; i < BLOCK_N * DK4; i += WG_SIZE) {
            let key = key0 + i / DK4;
            var kf = vec4<f32>(0.0);
            if (key < p.seq_kv) {
                kf = feature(load_k(k_base + key * p.k.seq + i % DK4));
            }
            k_features[i] = kf;
        }
        for (var i = lid; i < BLOCK_N * DV4; i += WG_SIZE) {
            let key = key0 + i / DV4;
            var v = vec4<f32>(0.0);
            if (key < p.seq_kv) {
                v = load_v(v_base + key * p.v.seq + i % DV4);
            }
            v_tile[i] = v;
        }
        workgroupBarrier();
        for (var j = 0u; j < BLOCK_N; j++) {
        var w: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            var dot_qk = 0.0;
            for (var x = 0u; x < DK4; x++) {
                dot_qk = fma_dot(q[r * DK4 + x], k_features[j * DK4 + x], dot_qk);
            }
            w[r] = select(0.0, dot_qk, key0 + j <= row0 + lane + r * WG_SIZE);
            den[r] += w[r];
        }
        for (var x = 0u; x < DV4; x++) {
            let v = v_tile[j * DV4 + x];
// #endif
            for (var r = 0u; r < ROWS; r++) {
                acc[r * DV4 + x] = fma(vec4<f32>(w[r]), v, acc[r * DV4 + x]);
            }
        }
// #if SUBGROUP_BROADCAST
// #else
        }
// #endif
    }
    // #endif
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + lane + r * WG_SIZE;
        if (row < p.seq_q) {
            let o_base = p.o.offset + b * p.o.batch + row * p.o.seq + h * p.o.head;
            let inv = 1.0 / (den[r] + lp.eps);
            for (var x = 0u; x < DV4; x++) {
                store_o(o_base + x, acc[r * DV4 + x] * inv);
            }
        }
    }
}
