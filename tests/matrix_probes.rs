//! The driver's cooperative matrices, one thing the matrix kernel
//! (shaders/flash_coop.wgsl) relies on at a time, each in a kernel of its
//! own on small integers (exact in f16 and f32, so every element must
//! match): row- and column-major loads, an accumulator loaded from memory,
//! matrices held in arrays across barriers and loop trips while the tile
//! they came from is overwritten, several subgroups each at its own tile,
//! a load at an offset inside a wider tile, lone 4-byte workgroup words
//! declared before the tiles, and plain values handed between invocations
//! around matrix stores to the same tile. When the kernel fails on a GPU,
//! which probe fails says why.
//!
//! On Vulkan each probe runs twice: as the crate hands its matrix kernel to
//! the driver (its own SPIR-V, which follows the Vulkan memory model:
//! `wgpu_flash_attn::spirv`), and as WGSL through wgpu (naga's SPIR-V,
//! which declares that model without following it). Only the first can
//! fail the test; the second's failures are reported, and say whether
//! naga's SPIR-V was what broke the kernel on an H100 (NaN in rows that
//! changed from run to run, 2026-12-05: BENCHMARKS.md).
//!
//! Needs real matrix units (a GPU with `FLASH_ATTN_COOPERATIVE_MATRIX=1`,
//! or Mesa 26.1's lavapipe in CI's `.ci/matrix-units` pass); elsewhere it
//! says SKIPPED and why. Every probe runs and reports before the test
//! fails.

mod common;

use common::random::{SeededRng, seeded};
use rand::RngExt;
use wgpu::util::DeviceExt;
use wgpu_flash_attn::spirv::{self, SpirvTarget};
use wgpu_flash_attn::{Gpu, SkippedChecks};

/// One probe: its WGSL body (after the shared header), subgroups per
/// workgroup, input and the exact output expected.
struct Probe {
    name: &'static str,
    /// Workgroup variables declared before the tiles.
    declarations: &'static str,
    subgroups: u32,
    wgsl: String,
    input: Vec<f32>,
    expected: Vec<f32>,
}

/// Row-major `t x t` integer matrices in [-3, 3], exact in f16.
fn matrices(rng: &mut SeededRng, count: usize, t: usize) -> Vec<Vec<f32>> {
    (0..count)
        .map(|_| {
            (0..t * t)
                .map(|_| rng.random_range(-3i32..=3) as f32)
                .collect()
        })
        .collect()
}

/// `a b + c` of row-major `t x t` matrices, in f64 (exact here).
fn multiply_add(a: &[f32], b: &[f32], c: &[f32], t: usize) -> Vec<f32> {
    let mut out = vec![0.0; t * t];
    for i in 0..t {
        for j in 0..t {
            let dot: f64 = (0..t)
                .map(|k| f64::from(a[i * t + k]) * f64::from(b[k * t + j]))
                .sum();
            out[i * t + j] = (dot + f64::from(c[i * t + j])) as f32;
        }
    }
    out
}

fn transpose(m: &[f32], t: usize) -> Vec<f32> {
    (0..t * t).map(|at| m[(at % t) * t + at / t]).collect()
}

fn sum(ms: &[&[f32]]) -> Vec<f32> {
    (0..ms[0].len())
        .map(|i| ms.iter().map(|m| m[i]).sum())
        .collect()
}

/// Staging of `n` values from `inp[from..]` into a workgroup tile as
/// `ty`: a WGSL loop over the workgroup's invocations.
fn stage(tile: &str, ty: &str, from: &str, n: &str) -> String {
    format!("    for (var i = lid; i < {n}; i += WG) {{ {tile}[i] = {ty}(inp[{from} + i]); }}\n")
}

/// One product `a b` (WGSL loads of the tiles) of A and B staged from the
/// input's first two matrices, stored row-major and copied out.
fn one_product(a: &str, b: &str) -> String {
    format!(
        "{}{}    workgroupBarrier();\n    \
         coopStoreT(coopMultiplyAdd({a}, {b}, MC()), &tc[0], T);\n    \
         workgroupBarrier();\n    \
         for (var i = lid; i < TT; i += WG) {{ out[i] = tc[i]; }}\n",
        stage("ta", "f16", "0u", "TT"),
        stage("tb", "f16", "TT", "TT"),
    )
}

/// The probes for `t x t` matrices (`t` 8 or 16).
fn probes(t: usize) -> Vec<Probe> {
    let mut rng = seeded(0x5eed_0b5e);
    let m = matrices(&mut rng, 6, t);
    let zero = vec![0.0; t * t];
    let copy_out =
        |n: &str| format!("    for (var i = lid; i < {n}; i += WG) {{ out[i] = tc[i]; }}\n");
    let mut probes = Vec::new();

    // A B with both loaded row-major (P V's loads).
    probes.push(Probe {
        name: "row-major A and B",
        declarations: "",
        subgroups: 1,
        wgsl: one_product("coopLoadT<MA>(&ta[0], T)", "coopLoadT<MB>(&tb[0], T)"),
        input: [m[0].clone(), m[1].clone()].concat(),
        expected: multiply_add(&m[0], &m[1], &zero, t),
    });

    // B loaded column-major from its transpose stored row-major (Q K^T's
    // load of K).
    probes.push(Probe {
        name: "column-major B",
        declarations: "",
        subgroups: 1,
        wgsl: one_product("coopLoadT<MA>(&ta[0], T)", "coopLoad<MB>(&tb[0], T)"),
        input: [m[0].clone(), transpose(&m[1], t)].concat(),
        expected: multiply_add(&m[0], &m[1], &zero, t),
    });

    // The accumulator starts from a matrix load of f32 memory (the
    // kernel's zeros, carried chunks and rescaled accumulators).
    probes.push(Probe {
        name: "accumulator loaded from memory",
        declarations: "",
        subgroups: 1,
        wgsl: format!(
            "{}{}{}    workgroupBarrier();\n    \
             let c = coopLoadT<MC>(&tc[0], T);\n    \
             workgroupBarrier();\n    \
             coopStoreT(coopMultiplyAdd(coopLoadT<MA>(&ta[0], T), coopLoadT<MB>(&tb[0], T), c), &tc[0], T);\n    \
             workgroupBarrier();\n{}",
            stage("ta", "f16", "0u", "TT"),
            stage("tb", "f16", "TT", "TT"),
            stage("tc", "f32", "2u * TT", "TT"),
            copy_out("TT")
        ),
        input: [m[0].clone(), m[1].clone(), m[2].clone()].concat(),
        expected: multiply_add(&m[0], &m[1], &m[2], t),
    });

    // Two A matrices loaded once into an array from a tile that the next
    // steps overwrite, two accumulators in an array, three loop trips with
    // barriers between (the kernel's Q and O across its key loop).
    probes.push(Probe {
        name: "arrays of matrices across barriers and loop trips",
        declarations: "",
        subgroups: 1,
        wgsl: format!(
            "{}    workgroupBarrier();\n    \
             var qa: array<MA, 2>;\n    \
             qa[0] = coopLoadT<MA>(&tb[0], T);\n    \
             qa[1] = coopLoadT<MA>(&tb[TT], T);\n    \
             var acc: array<MC, 2>;\n    \
             acc[0] = MC();\n    \
             acc[1] = MC();\n    \
             workgroupBarrier();\n    \
             for (var trip = 0u; trip < 3u; trip++) {{\n    \
             {}    workgroupBarrier();\n    \
             let b = coopLoadT<MB>(&tb[0], T);\n    \
             acc[0] = coopMultiplyAdd(qa[0], b, acc[0]);\n    \
             acc[1] = coopMultiplyAdd(qa[1], b, acc[1]);\n    \
             workgroupBarrier();\n    \
             }}\n    \
             coopStoreT(acc[0], &tc[0], T);\n    \
             coopStoreT(acc[1], &tc[TT], T);\n    \
             workgroupBarrier();\n{}",
            stage("tb", "f16", "0u", "2u * TT"),
            stage("tb", "f16", "(2u + trip) * TT", "TT"),
            copy_out("2u * TT")
        ),
        input: [&m[0], &m[1], &m[2], &m[3], &m[4]]
            .iter()
            .flat_map(|x| x.iter().copied())
            .collect(),
        expected: {
            let b = sum(&[&m[2], &m[3], &m[4]]);
            [
                multiply_add(&m[0], &b, &zero, t),
                multiply_add(&m[1], &b, &zero, t),
            ]
            .concat()
        },
    });

    // Eight A and eight accumulator matrices held at once (the kernel's Q
    // and output at d=128 on 16x16 matrices: as many registers as it
    // holds), over two trips.
    let held = 8;
    let m8 = matrices(&mut rng, held + 2, t);
    let loads: String = (0..held)
        .map(|j| format!("    qa[{j}] = coopLoadT<MA>(&tb[{j}u * TT], T);\n    acc[{j}] = MC();\n"))
        .collect();
    let products: String = (0..held)
        .map(|j| format!("    acc[{j}] = coopMultiplyAdd(qa[{j}], b, acc[{j}]);\n"))
        .collect();
    let stores: String = (0..held)
        .map(|j| format!("    coopStoreT(acc[{j}], &tc[{j}u * TT], T);\n"))
        .collect();
    probes.push(Probe {
        name: "eight A and eight accumulator matrices held at once",
        declarations: "",
        subgroups: 1,
        wgsl: format!(
            "{}    workgroupBarrier();\n    \
             var qa: array<MA, {held}>;\n    \
             var acc: array<MC, {held}>;\n{loads}    \
             workgroupBarrier();\n    \
             for (var trip = 0u; trip < 2u; trip++) {{\n    \
             {}    workgroupBarrier();\n    \
             let b = coopLoadT<MB>(&tb[0], T);\n{products}    \
             workgroupBarrier();\n    \
             }}\n{stores}    \
             workgroupBarrier();\n{}",
            stage("tb", "f16", "0u", &format!("{held}u * TT")),
            stage("tb", "f16", &format!("({held}u + trip) * TT"), "TT"),
            copy_out(&format!("{held}u * TT"))
        ),
        input: m8.concat(),
        expected: {
            let b = sum(&[&m8[held], &m8[held + 1]]);
            (0..held)
                .flat_map(|j| multiply_add(&m8[j], &b, &zero, t))
                .collect()
        },
    });

    // Two subgroups, each at the tile its subgroup_id picks (the kernel's
    // row tiles); the number of subgroups goes out last.
    probes.push(Probe {
        name: "two subgroups at their own tiles",
        declarations: "",
        subgroups: 2,
        wgsl: format!(
            "{}{}    workgroupBarrier();\n    \
             let rt = min(sid, 1u);\n    \
             coopStoreT(coopMultiplyAdd(coopLoadT<MA>(&ta[rt * TT], T), coopLoadT<MB>(&tb[0], T), MC()), &tc[rt * TT], T);\n    \
             workgroupBarrier();\n{}    \
             if (lid == 0u) {{ out[2u * TT] = f32(nsg); }}\n",
            stage("ta", "f16", "0u", "2u * TT"),
            stage("tb", "f16", "2u * TT", "TT"),
            copy_out("2u * TT")
        ),
        input: [m[0].clone(), m[1].clone(), m[2].clone()].concat(),
        expected: [
            multiply_add(&m[0], &m[2], &zero, t),
            multiply_add(&m[1], &m[2], &zero, t),
            vec![2.0],
        ]
        .concat(),
    });

    // A loaded at an offset of T elements inside a tile 2T wide (the
    // kernel's Q, K and P column tiles).
    let wide: Vec<f32> = (0..t)
        .flat_map(|r| {
            m[3][r * t..(r + 1) * t]
                .iter()
                .chain(&m[0][r * t..(r + 1) * t])
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    probes.push(Probe {
        name: "a load at an offset inside a wider tile",
        declarations: "",
        subgroups: 1,
        wgsl: format!(
            "{}{}    workgroupBarrier();\n    \
             coopStoreT(coopMultiplyAdd(coopLoadT<MA>(&ta[T], 2u * T), coopLoadT<MB>(&tb[0], T), MC()), &tc[0], T);\n    \
             workgroupBarrier();\n{}",
            stage("ta", "f16", "0u", "2u * TT"),
            stage("tb", "f16", "2u * TT", "TT"),
            copy_out("TT")
        ),
        input: [wide, m[1].clone()].concat(),
        expected: multiply_add(&m[0], &m[1], &zero, t),
    });

    // Products in a branch every invocation takes alike, decided by a word
    // of workgroup memory read with workgroupUniformLoad (the kernel's
    // rescaling of its accumulators), on an accumulator from before the
    // branch.
    probes.push(Probe {
        name: "products in a workgroup-uniform branch",
        declarations: "var<workgroup> words: array<atomic<u32>, 4>;\n",
        subgroups: 1,
        wgsl: format!(
            "    if (lid == 0u) {{ atomicStore(&words[1], 1u); }}\n\
             {}{}    var acc = MC();\n    \
             let live = workgroupUniformLoad(&words[1]);\n    \
             if (live != 0u) {{\n    \
             acc = coopMultiplyAdd(coopLoadT<MA>(&ta[0], T), coopLoadT<MB>(&tb[0], T), acc);\n    \
             }}\n    \
             workgroupBarrier();\n    \
             coopStoreT(acc, &tc[0], T);\n    \
             workgroupBarrier();\n{}",
            stage("ta", "f16", "0u", "TT"),
            stage("tb", "f16", "TT", "TT"),
            copy_out("TT")
        ),
        input: [m[0].clone(), m[1].clone()].concat(),
        expected: multiply_add(&m[0], &m[1], &zero, t),
    });

    // The first probe with two lone 4-byte words declared before the tiles
    // and used (a driver that places workgroup variables in declaration
    // order puts the tiles 8 bytes past a 16-byte boundary; matrix loads
    // need 16: the first suspect for the H100's NaN). Their sum goes out
    // last.
    probes.push(Probe {
        name: "lone workgroup words before the tiles",
        declarations: "var<workgroup> lone_flag: atomic<u32>;\nvar<workgroup> lone_word: u32;\n",
        subgroups: 1,
        wgsl: format!(
            "    if (lid == 0u) {{ atomicStore(&lone_flag, 1u); lone_word = 2u; }}\n{}    \
             if (lid == 0u) {{ out[TT] = f32(atomicLoad(&lone_flag) + lone_word); }}\n",
            one_product("coopLoadT<MA>(&ta[0], T)", "coopLoadT<MB>(&tb[0], T)")
        ),
        input: [m[0].clone(), m[1].clone()].concat(),
        expected: [multiply_add(&m[0], &m[1], &zero, t), vec![3.0]].concat(),
    });
    // Hand-overs of plain values around matrix stores over the same tile
    // (the kernel's scores, then its accumulators, in one workgroup array):
    // every invocation writes its share of the tile, invocation 0 sums all
    // of it (values other invocations wrote), then each subgroup's matrix
    // store overwrites its half and every invocation copies out what the
    // stores wrote where it had written before. Under the Vulkan memory
    // model, which naga declares for any module with matrices, those
    // accesses are private unless marked (src/spirv/): a driver may then
    // read stale values or its own earlier writes.
    probes.push(Probe {
        name: "plain values handed over around matrix stores to the same tile",
        declarations: "",
        subgroups: 2,
        wgsl: format!(
            "{}{}{}    workgroupBarrier();\n    \
             var before = 0.0;\n    \
             if (lid == 0u) {{ for (var i = 0u; i < 2u * TT; i++) {{ before += tc[i]; }} }}\n    \
             workgroupBarrier();\n    \
             let rt = min(sid, 1u);\n    \
             coopStoreT(coopMultiplyAdd(coopLoadT<MA>(&ta[rt * TT], T), coopLoadT<MB>(&tb[0], T), MC()), &tc[rt * TT], T);\n    \
             workgroupBarrier();\n{}    \
             if (lid == 0u) {{ out[2u * TT] = before; }}\n",
            stage("ta", "f16", "0u", "2u * TT"),
            stage("tb", "f16", "2u * TT", "TT"),
            stage("tc", "f32", "3u * TT", "2u * TT"),
            copy_out("2u * TT")
        ),
        input: [&m[0], &m[1], &m[2], &m[3], &m[4]]
            .iter()
            .flat_map(|x| x.iter().copied())
            .collect(),
        expected: [
            multiply_add(&m[0], &m[2], &zero, t),
            multiply_add(&m[1], &m[2], &zero, t),
            vec![m[3].iter().chain(&m[4]).sum()],
        ]
        .concat(),
    });

    probes
}

/// How a probe's kernel reaches the driver: as WGSL through wgpu (naga's
/// SPIR-V on Vulkan), or on Vulkan as the crate hands its own matrix
/// kernel over (naga's SPIR-V made to follow the Vulkan memory model,
/// through wgpu's passthrough).
#[derive(Clone, Copy)]
enum Path {
    Wgsl,
    CrateSpirv(SpirvTarget),
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Wgsl => "WGSL through wgpu",
            Path::CrateSpirv(_) => "the crate's SPIR-V",
        }
    }
}

/// The whole kernel of `probe`: matrices `t x t`, workgroups of
/// `subgroup` invocations per subgroup.
fn kernel(probe: &Probe, t: usize, subgroup: u32) -> String {
    format!(
        "enable f16;\nenable wgpu_cooperative_matrix;\n\
         alias MA = coop_mat{t}x{t}<f16, A>;\n\
         alias MB = coop_mat{t}x{t}<f16, B>;\n\
         alias MC = coop_mat{t}x{t}<f32, C>;\n\
         const T: u32 = {t}u;\nconst TT: u32 = {tt}u;\nconst WG: u32 = {wg}u;\n\
         @group(0) @binding(0) var<storage, read> inp: array<f32>;\n\
         @group(0) @binding(1) var<storage, read_write> out: array<f32>;\n\
         {}\
         var<workgroup> ta: array<f16, 2 * {tt}>;\n\
         var<workgroup> tb: array<f16, 8 * {tt}>;\n\
         var<workgroup> tc: array<f32, 8 * {tt}>;\n\
         @compute @workgroup_size({wg})\n\
         fn main(@builtin(local_invocation_index) lid: u32, \
         @builtin(subgroup_id) sid: u32, @builtin(num_subgroups) nsg: u32) {{\n{}}}\n",
        probe.declarations,
        probe.wgsl,
        tt = t * t,
        wg = subgroup * probe.subgroups,
    )
}

/// Runs `probe` through `path`; the mismatches (at most four), or why it
/// did not run.
fn run(gpu: &Gpu, probe: &Probe, t: usize, subgroup: u32, path: Path) -> Result<(), String> {
    let device = gpu.device();
    let source = kernel(probe, t, subgroup);
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = match path {
        Path::Wgsl => device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(probe.name),
            source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
        }),
        Path::CrateSpirv(target) => {
            let words = spirv::from_wgsl(&source, "main", &target, SkippedChecks::default())?;
            // SAFETY: naga's SPIR-V of a module it validated, as the crate
            // hands its matrix kernel to the driver; the layout below
            // matches its two bindings.
            unsafe {
                device.create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
                    label: Some(probe.name),
                    entry_points: vec![wgpu::PassthroughShaderEntryPoint {
                        name: "main".into(),
                        workgroup_size: (0, 0, 0),
                    }]
                    .into(),
                    spirv: Some(words.into()),
                    ..Default::default()
                })
            }
        }
    };
    let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(probe.name),
        entries: &[storage(0, true), storage(1, false)],
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(probe.name),
        bind_group_layouts: &[Some(&bind_group_layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(probe.name),
        layout: Some(&layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(error) = pollster::block_on(scope.pop()) {
        return Err(format!("did not compile: {error}\n{source}"));
    }
    let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("probe input"),
        contents: bytemuck::cast_slice(&probe.input),
        usage: wgpu::BufferUsages::STORAGE,
    });
    // NaN where nothing was written.
    let poison = vec![f32::NAN; probe.expected.len()];
    let output = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("probe output"),
        contents: bytemuck::cast_slice(&poison),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(probe.name),
        layout: &bind_group_layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: input.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: output.as_entire_binding(),
            },
        ],
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    gpu.queue().submit([encoder.finish()]);
    let bytes = common::read_bytes(gpu, &output);
    let got: &[f32] = bytemuck::cast_slice(&bytes);
    let wrong: Vec<String> = got
        .iter()
        .zip(&probe.expected)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| {
            format!(
                "element {i} (row {}, column {}): {g} vs {w}",
                i / t % t,
                i % t
            )
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} elements wrong, first: {}",
            wrong.len(),
            got.len(),
            wrong[..wrong.len().min(4)].join("; ")
        ))
    }
}

/// Every probe on the adapter's f16 -> f32 matrices (16x16 where offered,
/// else 8x8), each reported; fails if any probe does.
#[test]
fn the_drivers_matrices_do_what_the_kernel_relies_on() {
    let Some(gpu) = common::cooperative_gpu() else {
        return;
    };
    let info = gpu.info();
    if info.cooperative_matrix_emulation || info.cooperative_matrices.is_empty() {
        eprintln!(
            "SKIPPED: the adapter offers no cooperative matrices (these probes need real \
             ones: FLASH_ATTN_COOPERATIVE_MATRIX=1 on a GPU that has them, or Mesa 26.1's \
             lavapipe)"
        );
        return;
    }
    let offers = |size: u32| {
        info.cooperative_matrices.iter().any(|p| {
            p.m_size == size
                && p.n_size == size
                && p.k_size == size
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    };
    let Some(t) = [16u32, 8].into_iter().find(|&size| offers(size)) else {
        eprintln!(
            "SKIPPED: no 16x16x16 or 8x8x8 f16 -> f32 matrices (the adapter offers {:?})",
            info.cooperative_matrices
        );
        return;
    };
    let subgroup = info.adapter.subgroup_max_size;
    // On Vulkan the crate runs its matrix kernel as its own SPIR-V; WGSL
    // through wgpu there is naga's, which declares the Vulkan memory model
    // without following it: its failures are reported (they say whether
    // that was the H100's NaN), not what the crate runs.
    let crate_spirv = SpirvTarget::of_device(gpu.device())
        .filter(|_| info.features.contains(wgpu::Features::PASSTHROUGH_SHADERS));
    let paths = match crate_spirv {
        Some(target) => vec![Path::CrateSpirv(target), Path::Wgsl],
        None => vec![Path::Wgsl],
    };
    let mut failed = Vec::new();
    for probe in probes(t as usize) {
        for &path in &paths {
            let what = format!(
                "{} ({t}x{t}, subgroups of {subgroup}, {})",
                probe.name,
                path.name()
            );
            match run(gpu, &probe, t as usize, subgroup, path) {
                Ok(()) => eprintln!("probe ok: {what}"),
                Err(why) if matches!(path, Path::Wgsl) && crate_spirv.is_some() => {
                    eprintln!("probe FAILED (not the crate's path; reported only): {what}: {why}")
                }
                Err(why) => {
                    eprintln!("probe FAILED: {what}: {why}");
                    failed.push(probe.name);
                }
            }
        }
    }
    assert!(failed.is_empty(), "probes failed: {failed:?}");
}
