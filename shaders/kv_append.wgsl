// Appends new K and V tokens to a paged KV cache in place, rotating the
// keys (RoPE) on the way when rotary_dim > 0. Token t of sequence b goes to
// cache position starts[b].x + t and is rotated for position
// starts[b].y + t. One dispatch per cache segment; each writes the tokens
// whose page lives in its segment. One invocation per element pair.
//
// Generated constants: WG_SIZE.

@group(0) @binding(0) var<uniform> rp: RopeParams;
// Per sequence: (first cache position written, first rotary position).
@group(0) @binding(1) var<storage, read> starts: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> freqs: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> k_new: array<f32>;
@group(0) @binding(4) var<storage, read> v_new: array<f32>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(7) var<storage, read> block_table: array<u32>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let site = pair_site(gid, groups);
    if (!site.valid) {
        return;
    }
    let pos = starts[site.batch].x + site.token;
    let page = block_table[site.batch * rp.pages_per_seq + (pos >> rp.page_shift)];
    if (page < rp.segment_first_page || page >= rp.segment_first_page + rp.segment_pages) {
        return;
    }
    let row = ((page - rp.segment_first_page) << rp.page_shift) | (pos & ((1u << rp.page_shift) - 1u));
    let dst = (row * rp.heads + site.head) * rp.head_dim;
    let pair = pair_indices(site.i);
    var k = vec2<f32>(k_new[site.src + pair.x], k_new[site.src + pair.y]);
    if (pair.z != 0u) {
        k = rotate(k.x, k.y, starts[site.batch].y + site.token, site.i);
    }
    k_cache[dst + pair.x] = k.x;
    k_cache[dst + pair.y] = k.y;
    v_cache[dst + pair.x] = v_new[site.src + pair.x];
    v_cache[dst + pair.y] = v_new[site.src + pair.y];
}
