// Rotary embedding applied in place to a [batch, tokens, heads, head_dim]
// f32 tensor (queries or keys in a prefill); token t of sequence b sits at
// position starts[b].y + t. One invocation per element pair.
//
// Generated constants: WG_SIZE.

@group(0) @binding(0) var<uniform> rp: RopeParams;
// Per sequence: (unused here, first position).
@group(0) @binding(1) var<storage, read> starts: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> freqs: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> data: array<f32>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let pairs = rp.head_dim / 2u;
    if (index >= rp.batch * rp.tokens * rp.heads * pairs) {
        return;
    }
    let i = index % pairs;
    let head = (index / pairs) % rp.heads;
    let token = (index / (pairs * rp.heads)) % rp.tokens;
    let batch = index / (pairs * rp.heads * rp.tokens);
    let pair = pair_indices(i);
    if (pair.z == 0u) {
        return;
    }
    let base = batch * rp.src_batch + token * rp.src_seq + head * rp.src_head + rp.src_offset;
    let rotated = rotate(data[base + pair.x], data[base + pair.y], starts[batch].y + token, i);
    data[base + pair.x] = rotated.x;
    data[base + pair.y] = rotated.y;
}
