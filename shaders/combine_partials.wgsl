// Exact merge of partial attention results by their logsumexp.
//
// Slot s holds, for every row, the attention over one part of the keys: a
// normalised output o_s and its logsumexp lse_s (+inf when the part had no
// key for that row). The merge over all parts is
//     lse = log(sum_s exp(lse_s)),   o = sum_s exp(lse_s - lse) * o_s,
// computed against the largest finite lse_s so no exp overflows. A row
// with no key in any part gets zeros and +inf, like the forward kernel.
// One invocation per (row, vec4 of the head dim).
//
// Generated constants: WG_SIZE. O_HALF stores the output in 16 bits
// (half_codec.wgsl), the partials stay f32.

// Twin of `CombineParams` in src/params.rs.
struct CombineParams {
    batch: u32,
    seq_q: u32,
    heads_q: u32,
    d4: u32,
    slots: u32,
    // Stride between slots: partial outputs in vec4s, lse in floats.
    o_slot: u32,
    lse_slot: u32,
    write_lse: u32,
    // The output view [batch, seq_q, heads_q, d4], in vec4s.
    out_batch: u32,
    out_seq: u32,
    out_head: u32,
    out_offset: u32,
}

@group(0) @binding(0) var<uniform> cp: CombineParams;
// Slot-major [slots, batch, seq_q, heads_q, d4], packed.
@group(0) @binding(1) var<storage, read> partial_o: array<vec4<f32>>;
// Slot-major [slots, batch, heads_q, seq_q].
@group(0) @binding(2) var<storage, read> partial_lse: array<f32>;
// #if O_HALF
@group(0) @binding(3) var<storage, read_write> out: array<vec2<u32>>;

fn store_out(i: u32, value: vec4<f32>) {
    out[i] = qo_narrow4(value);
}
// #else
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

fn store_out(i: u32, value: vec4<f32>) {
    out[i] = value;
}
// #endif
@group(0) @binding(4) var<storage, read_write> out_lse: array<f32>;

const INF_BITS: u32 = 0x7f800000u;
// +inf as a value, read from a private variable: WGSL makes a constant
// expression that evaluates to an infinity a shader creation error
// (browsers' compilers enforce it; naga does not).
var<private> inf_bits: u32 = INF_BITS;

fn is_empty(lse: f32) -> bool {
    return bitcast<u32>(lse) == INF_BITS;
}

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let rows = cp.batch * cp.seq_q * cp.heads_q;
    if (index >= rows * cp.d4) {
        return;
    }
    // Packed [batch, seq_q, heads_q] row and the vec4 within it.
    let row = index / cp.d4;
    let d = index % cp.d4;
    let head = row % cp.heads_q;
    let query = (row / cp.heads_q) % cp.seq_q;
    let batch = row / (cp.heads_q * cp.seq_q);
    let lse_index = (batch * cp.heads_q + head) * cp.seq_q + query;

    // The lowest finite f32: every partial lse is >= it (its max is a
    // finite score and its sum >= 1).
    var top = -3.4028234663852886e38;
    var any = false;
    for (var s = 0u; s < cp.slots; s++) {
        let lse = partial_lse[s * cp.lse_slot + lse_index];
        if (!is_empty(lse)) {
            top = max(top, lse);
            any = true;
        }
    }
    var total = 0.0;
    var acc = vec4<f32>(0.0);
    if (any) {
        for (var s = 0u; s < cp.slots; s++) {
            let lse = partial_lse[s * cp.lse_slot + lse_index];
            if (!is_empty(lse)) {
                let w = exp(lse - top);
                total += w;
                acc = fma(vec4<f32>(w), partial_o[s * cp.o_slot + row * cp.d4 + d], acc);
            }
        }
        acc /= total;
    }
    let o_index = batch * cp.out_batch + query * cp.out_seq + head * cp.out_head + cp.out_offset + d;
    store_out(o_index, acc);
    if (cp.write_lse != 0u && d == 0u) {
        var merged = bitcast<f32>(inf_bits);
        if (any) {
            merged = top + log(total);
        }
        out_lse[lse_index] = merged;
    }
}
