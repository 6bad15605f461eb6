// 16-bit storage conversions, with core WGSL only (no SHADER_F16): four
// values travel as a vec2<u32>, first element in the low half. Prepended to
// every kernel that reads or writes f16 or bf16 (src/shaders/ sets
// F16_CODEC / BF16_CODEC from the kernel's storage types, so a kernel
// without f16 never uses unpack2x16float, which some GL adapters lack).
//
// QO_HALF marks a 16-bit query/output type of its own, which decoding may
// have beside a cache of another type (Q_HALF: the queries, O_HALF: the
// output); QO_BF16 makes it bf16, else it is f16. `qo_widen4` and
// `qo_narrow4` convert it.
//
// KV_FP8 adds FP8 E4M3, the byte-per-element KV cache's float type.

// #if BF16_CODEC
// bf16 is the top half of an f32: widening is a shift.
fn bf16x4_widen(x: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(
        bitcast<f32>(x.x << 16u),
        bitcast<f32>(x.x & 0xffff0000u),
        bitcast<f32>(x.y << 16u),
        bitcast<f32>(x.y & 0xffff0000u),
    );
}

// f32 to bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
fn bf16_bits(value: f32) -> u32 {
    let bits = bitcast<u32>(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bits >> 16u) | 0x40u;
    }
    return (bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u;
}

fn bf16x4_narrow(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(
        bf16_bits(v.x) | (bf16_bits(v.y) << 16u),
        bf16_bits(v.z) | (bf16_bits(v.w) << 16u),
    );
}
// #endif

// #if F16_CODEC
fn f16x4_widen(x: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(x.x), unpack2x16float(x.y));
}

// f32 to f16 bits; past f16's range, the infinity it rounds to
// (pack2x16float leaves such values undefined).
fn f16_bits(value: f32) -> u32 {
    if (abs(value) >= 65520.0) {
        return select(0x7c00u, 0xfc00u, value < 0.0);
    }
    return pack2x16float(vec2<f32>(clamp(value, -65504.0, 65504.0), 0.0)) & 0xffffu;
}

// Forward outputs are convex combinations of V rows of the same type, so
// they stay in range: the packing builtin serves them.
fn f16x4_narrow(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
}

// An output that may leave f16's range (decoding over a cache of a wider
// type, gradients): each element saturates to the infinity it rounds to.
fn f16x4_narrow_saturating(v: vec4<f32>) -> vec2<u32> {
    return vec2<u32>(f16_bits(v.x) | (f16_bits(v.y) << 16u), f16_bits(v.z) | (f16_bits(v.w) << 16u));
}
// #endif

// #if QO_HALF
// #if QO_BF16
fn qo_widen4(x: vec2<u32>) -> vec4<f32> {
    return bf16x4_widen(x);
}

fn qo_narrow4(v: vec4<f32>) -> vec2<u32> {
    return bf16x4_narrow(v);
}
// #else
fn qo_widen4(x: vec2<u32>) -> vec4<f32> {
    return f16x4_widen(x);
}

fn qo_narrow4(v: vec4<f32>) -> vec2<u32> {
    return f16x4_narrow_saturating(v);
}
// #endif
// #endif

// #if KV_FP8
// FP8 E4M3 ("E4M3FN": exponent bias 7, 3 mantissa bits, no infinities,
// 0x7f and 0xff are NaN and never written), four to a word, first element
// in the low byte (src/kv_cache.rs, KvDType::Fp8).
//
// Each byte widens as the f16 with its sign, exponent and mantissa bits:
// f16's bias is 15, so that f16 is 2^-8 times the byte's value, E4M3's
// subnormals landing on f16's (exact wherever f16 subnormals widen
// exactly, as every f16-to-f32 conversion we know does; the tests check
// every byte on each adapter they run on). Two f16 to a word: bytes 0 and
// 2, then 1 and 3.
fn fp8x4_widen(word: u32) -> vec4<f32> {
    let pairs = vec2<u32>(word, word >> 8u) & vec2<u32>(0x00ff00ffu);
    let halves = ((pairs & vec2<u32>(0x007f007fu)) << vec2<u32>(7u)) | ((pairs & vec2<u32>(0x00800080u)) << vec2<u32>(8u));
    let even = unpack2x16float(halves.x);
    let odd = unpack2x16float(halves.y);
    return vec4<f32>(even.x, odd.x, even.y, odd.y) * 256.0;
}

// The E4M3 byte of `value`, rounded to nearest even; past 448 (the largest
// finite) it saturates to 448.
fn fp8_bits(value: f32) -> u32 {
    let magnitude = abs(value);
    let bits = bitcast<u32>(magnitude);
    // From 2^-6 up: f32's mantissa rounded to 3 bits (a carry moves into
    // the exponent), the bias from 127 to 7.
    let normal = ((bits + 0x7ffffu + ((bits >> 20u) & 1u)) >> 20u) - (120u << 3u);
    // Below: steps of 2^-9 (`round` ties to even); 8 is 2^-6, the first
    // normal, which the rounding may reach.
    let subnormal = u32(round(magnitude * 512.0));
    let encoded = min(select(normal, subnormal, magnitude < 0.015625), 0x7eu);
    return encoded | select(0u, 0x80u, value < 0.0);
}
// #endif
