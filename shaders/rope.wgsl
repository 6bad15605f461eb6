// Rotary embedding applied in place to a [batch, tokens, heads, head_dim]
// f32 tensor (queries or keys in a prefill); token t of sequence b sits at
// position starts[b].y + t. One invocation per element pair.
//
// Generated constants: WG_SIZE.

@group(0) @binding(0) var<uniform> rp: RopeParams;
// Per sequence: (unused here, first position).
@group(0) @binding(1) var<storage, read> starts: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> freqs: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> data: array<f32>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let site = pair_site(gid, groups);
    if (!site.valid) {
        return;
    }
    let pair = pair_indices(site.i);
    if (pair.z == 0u) {
        return;
    }
    let rotated = rotate(data[site.src + pair.x], data[site.src + pair.y], starts[site.batch].y + site.token, site.i);
    data[site.src + pair.x] = rotated.x;
    data[site.src + pair.y] = rotated.y;
}
