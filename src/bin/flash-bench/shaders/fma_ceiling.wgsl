// FMA-bound kernel: measures an adapter's arithmetic ceiling (GFLOP/s) so
// that attention can be reported as a share of it.
//
// Eight independent vec4 FMA chains per invocation, all in registers; the
// sum is stored so that no chain is optimised away. Each loop trip runs
// COPIES copies of the chains: software adapters pay a fixed cost per loop
// trip (llvmpipe measured 30 GFLOP/s with one copy, 60-78 with four).
//
// Generated constants (ceiling_kernels.rs beside this folder): ITERATIONS, COPIES, WG_SIZE.

@group(0) @binding(0) var<storage, read_write> sink: array<vec4<f32>>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * WG_SIZE;
    let seed = f32(index) * 1.0e-7;
    var a0 = vec4<f32>(seed, seed + 0.1, seed + 0.2, seed + 0.3);
    var a1 = a0 + 0.01;
    var a2 = a0 + 0.02;
    var a3 = a0 + 0.03;
    var a4 = a0 + 0.04;
    var a5 = a0 + 0.05;
    var a6 = a0 + 0.06;
    var a7 = a0 + 0.07;
    let mul = vec4<f32>(0.9999999);
    let add = vec4<f32>(1.0e-7);
    for (var i = 0u; i < ITERATIONS; i++) {
        // Unrolled by ceiling_kernels.rs into COPIES copies of the chains.
        for (var copy = 0u; copy < COPIES; copy++) {
            a0 = fma(a0, mul, add);
            a1 = fma(a1, mul, add);
            a2 = fma(a2, mul, add);
            a3 = fma(a3, mul, add);
            a4 = fma(a4, mul, add);
            a5 = fma(a5, mul, add);
            a6 = fma(a6, mul, add);
            a7 = fma(a7, mul, add);
        }
    }
    sink[index % arrayLength(&sink)] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
}
