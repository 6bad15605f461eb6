// Rotary position embedding shared by rope.wgsl (in place) and
// kv_append.wgsl (fused into the cache append).
//
// Pair i < rotary_dim / 2 of a head vector is rotated by the angle
// position * theta_i, theta_i = base^(-2i / rotary_dim). Interleaved
// (GPT-J) pairs elements (2i, 2i + 1); half-split (GPT-NeoX, Llama) pairs
// (i, i + rotary_dim / 2). Elements from rotary_dim on pass through.
//
// Angles: position * theta_i in f32 loses ~1e-2 rad at position 1e5, so the
// position is split as hi * 1024 + lo and the host supplies, per pair,
// theta_i and 1024 * theta_i as turns (angle / 2pi) in 32-bit fixed point,
// computed in f64 (`freqs`, src/rope.rs). Wrapping u32 products and sum
// drop whole turns exactly; `turn_cos_sin` turns them into cos and sin.

// Twin of `RopeParams` in src/params.rs.
struct RopeParams {
    batch: u32,
    // Tokens per sequence in the source tensor.
    tokens: u32,
    heads: u32,
    head_dim: u32,
    // Rotated elements per head (even, <= head_dim); 0: no rotation.
    rotary_dim: u32,
    // 0: interleaved (GPT-J), 1: half-split (GPT-NeoX / Llama).
    half_split: u32,
    // Source strides in elements (the head dim is contiguous).
    src_batch: u32,
    src_seq: u32,
    src_head: u32,
    src_offset: u32,
    // kv_append only: the cache's paging and this dispatch's segment.
    page_shift: u32,
    pages_per_seq: u32,
    segment_first_page: u32,
    segment_pages: u32,
    // kv_append only: the first rotated element (rotary_dim elements from
    // it rotate; a latent cache rotates its last ones) and whether V
    // vectors are stored (0: the values are a prefix of the keys).
    rotary_start: u32,
    write_values: u32,
}

// The two element indices invocation-pair `i` moves, and whether it rotates
// them (i < rotary_dim / 2) or copies them (elements past rotary_dim).
fn pair_indices(i: u32) -> vec3<u32> {
    let half_rot = rp.rotary_dim / 2u;
    if (i < half_rot) {
        if (rp.half_split != 0u) {
            return vec3<u32>(i, i + half_rot, 1u);
        }
        return vec3<u32>(2u * i, 2u * i + 1u, 1u);
    }
    let first = rp.rotary_dim + 2u * (i - half_rot);
    return vec3<u32>(first, first + 1u, 0u);
}

// (cos, sin) of `turns` turns in 32-bit fixed point (2^32 = one turn,
// 2pi). Not WGSL's cos and sin: the specification (and SPIR-V's, for
// Vulkan) allows them an absolute error of 2^-11, and a conforming
// implementation uses it: Chromium's SwiftShader rotated by 2e-4 off the
// f64 reference. Here the exact fixed-point angle is reduced to the
// nearest quarter turn q and a remainder within an eighth of a turn
// (integer arithmetic: no rounding), whose cos and sin come from their
// Taylor polynomials (truncation below 2e-10 for |a| <= pi/4; the products
// and sums carry f32 rounding only), then turned by q quarters.
fn turn_cos_sin(turns: u32) -> vec2<f32> {
    let quarter = (turns + 0x20000000u) >> 30u;
    let rest = bitcast<i32>(turns - (quarter << 30u));
    let a = f32(rest) * (6.283185307179586 / 4294967296.0);
    let a2 = a * a;
    let sin_a = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 + a2 * (1.0 / 362880.0)))));
    let cos_a = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0 + a2 * (-1.0 / 3628800.0)))));
    switch quarter {
        case 0u: { return vec2<f32>(cos_a, sin_a); }
        case 1u: { return vec2<f32>(-sin_a, cos_a); }
        case 2u: { return vec2<f32>(-cos_a, -sin_a); }
        default: { return vec2<f32>(sin_a, -cos_a); }
    }
}

// (x, y) rotated by position * theta of pair i.
fn rotate(x: f32, y: f32, position: u32, i: u32) -> vec2<f32> {
    let f = freqs[i];
    let turns = (position >> 10u) * f.y + (position & 1023u) * f.x;
    let cs = turn_cos_sin(turns);
    return vec2<f32>(x * cs.x - y * cs.y, x * cs.y + y * cs.x);
}

// What one invocation of rope.wgsl or kv_append.wgsl works on: element
// pair `i` of the head vector (batch, token, head) of the source, whose
// first element is at `src`. `valid` is false past the last pair (the
// dispatch is rounded up to whole workgroups).
struct PairSite {
    valid: bool,
    i: u32,
    head: u32,
    token: u32,
    batch: u32,
    src: u32,
}

// The site of the invocation at `gid` in a dispatch of `groups` workgroups
// (a second dimension carries what one dimension cannot).
fn pair_site(gid: vec3<u32>, groups: vec3<u32>) -> PairSite {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let pairs = rp.head_dim / 2u;
    var site: PairSite;
    site.valid = index < rp.batch * rp.tokens * rp.heads * pairs;
    site.i = index % pairs;
    site.head = (index / pairs) % rp.heads;
    site.token = (index / (pairs * rp.heads)) % rp.tokens;
    site.batch = index / (pairs * rp.heads * rp.tokens);
    site.src = site.batch * rp.src_batch + site.token * rp.src_seq + site.head * rp.src_head + rp.src_offset;
    return site;
}
