// Steps of kernels whose invocations own ROWS whole query rows, each row's
// query and accumulator in private arrays (flash_attention.wgsl,
// naive_attention.wgsl and flash_decode.wgsl's portable variant):
// prepended to those files by src/shaders/.
//
// The loops over rows and head-dim vec4s that `source` unrolls live in
// helpers like these, which the entry point calls with constant arguments,
// rather than in the entry point itself. naga 30's WGSL front end takes time quadratic in
// one function's expression count, so a fully unrolled entry point cost most of
// a pipeline's creation (the decode kernel at d = 576 took 0.9 s to parse
// on CI's machine); a helper is parsed once rather than once per row or
// vec4. SPIR-V consumers inline the calls, after which every index is the
// constant the unrolled loop had, and the arrays stay in registers.

// acc * correction + four keys' weights `probs` times one vec4 of each
// key's value vector (`v0`..`v3`).
fn weigh_values(acc: vec4<f32>, correction: f32, probs: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>,
    v3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(probs.w), v3, fma(vec4<f32>(probs.z), v2, fma(vec4<f32>(probs.y), v1,
        fma(vec4<f32>(probs.x), v0, acc * correction))));
}

// Query row `r`'s D4 vec4s, from vec4 `q_base` of Q.
fn load_query_row(q: ptr<function, array<vec4<f32>, ROWS * D4>>, r: u32, q_base: u32) {
    for (var d = 0u; d < D4; d++) {
        (*q)[r * D4 + d] = load_q(q_base + d);
    }
}

// Every row's dot products with four keys advanced by the keys' vec4 `d`
// (`k0`..`k3`). Rows from `live` on are skipped: the caller knows they are
// padding past the sequence's end, computed for nothing (a constant
// `live` of ROWS, or ROWS == 1, folds the test away).
fn add_key_column(q: ptr<function, array<vec4<f32>, ROWS * D4>>, dots: ptr<function, array<vec4<f32>, ROWS>>, d: u32,
    live: u32, k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        if (ROWS == 1u || r < live) {
            let qd = (*q)[r * D4 + d];
            let dr = (*dots)[r];
            (*dots)[r] = vec4<f32>(fma_dot(qd, k0, dr.x), fma_dot(qd, k1, dr.y), fma_dot(qd, k2, dr.z), fma_dot(qd, k3, dr.w));
        }
    }
}

// Every row's accumulator vec4 `d` rescaled by the row's correction and
// advanced by four keys' weights times the keys' value vec4 `d`
// (`v0`..`v3`); rows from `live` on skipped, as in add_key_column.
fn add_value_column(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, correction: ptr<function, array<f32, ROWS>>,
    probs: ptr<function, array<vec4<f32>, ROWS>>, d: u32, live: u32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>,
    v3: vec4<f32>) {
    for (var r = 0u; r < ROWS; r++) {
        if (ROWS == 1u || r < live) {
            let a = r * DV4 + d;
            (*acc)[a] = weigh_values((*acc)[a], (*correction)[r], (*probs)[r], v0, v1, v2, v3);
        }
    }
}

// Row `r`'s output from vec4 `o_base` of O: its accumulator times `inv_l`
// (1 / l), or zeros unless `real` (padding rows).
fn store_output_row(acc: ptr<function, array<vec4<f32>, ROWS * DV4>>, r: u32, o_base: u32, inv_l: f32, real: bool) {
    for (var d = 0u; d < DV4; d++) {
        store_o(o_base + d, select(vec4<f32>(0.0), (*acc)[r * DV4 + d] * inv_l, real));
    }
}
