// Copy-bound kernel: measures an adapter's memory bandwidth (bytes read plus
// bytes written per second), the ceiling for memory-bound work such as
// decoding and the naive baseline's score passes.
//
// One vec4 per invocation, consecutive invocations on consecutive vec4s
// (coalesced on GPUs, whole SIMD rows on CPU adapters). A grid-stride loop
// measured 2.0 GB/s on lavapipe against 2.8-4.6 GB/s for this form.
//
// Generated constants (ceiling_kernels.rs beside this folder): WG_SIZE.

@group(0) @binding(0) var<storage, read> copy_src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> copy_dst: array<vec4<f32>>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WG_SIZE;
    if (i < arrayLength(&copy_dst)) {
        copy_dst[i] = copy_src[i];
    }
}
