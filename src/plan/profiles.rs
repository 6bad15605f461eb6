//! Adapter profiles: what each adapter's `GpuInfo` reports, none of which
//! needs to be present. The planners' tests (here and beside the backward's
//! and linear attention's planners) run over them.

use super::*;

pub(super) const KIB: u32 = 1024;

/// An adapter profile: what its `GpuInfo` reports.
pub(crate) struct Profile {
    pub name: &'static str,
    pub device_type: wgpu::DeviceType,
    pub backend: wgpu::Backend,
    /// Smallest and largest subgroup size; `None`: no SUBGROUP feature.
    pub subgroups: Option<(u32, u32)>,
    pub workgroup_bytes: u32,
    pub invocations: u32,
    /// `max_storage_buffers_per_shader_stage`.
    pub storage_buffers: u32,
    /// Cooperative-matrix configurations (size, operand, result) of a
    /// device that enabled the feature; empty: not enabled.
    pub coop: &'static [(u32, Scalar, Scalar)],
}

use wgpu::CooperativeScalarType as Scalar;

/// What NVIDIA's Vulkan driver reports for subgroup-scope square
/// matrices of the sizes wgpu takes (16x16x16, f16 operands).
const NVIDIA_COOP: &[(u32, Scalar, Scalar)] = &[
    (16, Scalar::F16, Scalar::F16),
    (16, Scalar::F16, Scalar::F32),
];
/// What wgpu's Metal backend reports (simdgroup matrices, Apple7+).
const APPLE_COOP: &[(u32, Scalar, Scalar)] = &[
    (8, Scalar::F32, Scalar::F32),
    (8, Scalar::F16, Scalar::F16),
    (8, Scalar::F16, Scalar::F32),
];

impl Profile {
    pub(crate) fn info(&self) -> GpuInfo {
        let (min, max) = self.subgroups.unwrap_or((4, 4));
        let mut features = wgpu::Features::SHADER_F16;
        if self.subgroups.is_some() {
            features |= wgpu::Features::SUBGROUP;
        }
        if !self.coop.is_empty() {
            // As the crate's own device requests them (passthrough for
            // the matrix kernel's SPIR-V on Vulkan).
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            if self.backend == wgpu::Backend::Vulkan {
                features |= wgpu::Features::PASSTHROUGH_SHADERS;
            }
        }
        let limits = wgpu::Limits {
            max_compute_workgroup_storage_size: self.workgroup_bytes,
            max_compute_invocations_per_workgroup: self.invocations,
            max_compute_workgroup_size_x: self.invocations,
            max_storage_buffers_per_shader_stage: self.storage_buffers,
            max_storage_buffer_binding_size: 128 << 20,
            max_buffer_size: 256 << 20,
            ..wgpu::Limits::default()
        };
        let llvmpipe = self.name.starts_with("llvmpipe");
        // PCI vendor ids, as the drivers report them (the planner tells
        // NVIDIA's apart).
        let vendor = [
            ("NVIDIA", 0x10de),
            ("AMD", 0x1002),
            ("Intel", 0x8086),
            ("Apple", 0x106b),
        ]
        .into_iter()
        .find(|(maker, _)| self.name.starts_with(maker))
        .map_or(0, |(_, id)| id);
        GpuInfo {
            adapter: wgpu::AdapterInfo {
                name: self.name.to_string(),
                vendor,
                device: 0,
                device_type: self.device_type,
                device_pci_bus_id: String::new(),
                driver: if llvmpipe { "llvmpipe" } else { "" }.to_string(),
                driver_info: String::new(),
                backend: self.backend,
                subgroup_min_size: min,
                subgroup_max_size: max,
                transient_saves_memory: None,
                limit_bucket: None,
            },
            features,
            limits,
            host_threads: 2,
            cooperative_matrices: self
                .coop
                .iter()
                .map(
                    |&(size, ab_type, cr_type)| wgpu::CooperativeMatrixProperties {
                        m_size: size,
                        n_size: size,
                        k_size: size,
                        ab_type,
                        cr_type,
                        saturating_accumulation: false,
                    },
                )
                .collect(),
            cooperative_matrix_emulation: false,
        }
    }
}

/// The adapters the crate is planned for, from the software adapters
/// CI has to the hardware it has not.
pub(crate) fn all() -> Vec<Profile> {
    use wgpu::{Backend, DeviceType};
    vec![
        Profile {
            name: "llvmpipe (LLVM 15.0.6, 256 bits)",
            device_type: DeviceType::Cpu,
            backend: Backend::Vulkan,
            subgroups: Some((8, 8)),
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 32,
            coop: &[],
        },
        Profile {
            name: "llvmpipe (LLVM 15.0.6, 256 bits) GL",
            device_type: DeviceType::Cpu,
            backend: Backend::Gl,
            subgroups: None,
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 16,
            coop: &[],
        },
        Profile {
            name: "NVIDIA H200",
            device_type: DeviceType::DiscreteGpu,
            backend: Backend::Vulkan,
            subgroups: Some((32, 32)),
            workgroup_bytes: 48 * KIB,
            invocations: 1024,
            storage_buffers: 1048576,
            coop: &[],
        },
        Profile {
            name: "AMD Radeon RX 7900 XTX",
            device_type: DeviceType::DiscreteGpu,
            backend: Backend::Vulkan,
            subgroups: Some((32, 64)),
            workgroup_bytes: 64 * KIB,
            invocations: 1024,
            storage_buffers: 1048576,
            coop: &[],
        },
        Profile {
            name: "Apple M2",
            device_type: DeviceType::IntegratedGpu,
            backend: Backend::Metal,
            subgroups: Some((32, 32)),
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 31,
            coop: &[],
        },
        Profile {
            name: "Intel Arc A770",
            device_type: DeviceType::DiscreteGpu,
            backend: Backend::Dx12,
            subgroups: Some((16, 32)),
            workgroup_bytes: 64 * KIB,
            invocations: 1024,
            storage_buffers: 64,
            coop: &[],
        },
        Profile {
            name: "Adreno mobile, WebGPU's minimum limits",
            device_type: DeviceType::IntegratedGpu,
            backend: Backend::Vulkan,
            subgroups: Some((64, 128)),
            workgroup_bytes: 16 * KIB,
            invocations: 256,
            storage_buffers: 8,
            coop: &[],
        },
        Profile {
            name: "WARP",
            device_type: DeviceType::Cpu,
            backend: Backend::Dx12,
            subgroups: Some((4, 128)),
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 64,
            coop: &[],
        },
        // A browser's WebGPU (wgpu's BrowserWebGpu backend), which reports
        // no device type and, through wgpu 30, no subgroups: Chromium's
        // limits on a desktop GPU, and its fallback adapter (SwiftShader)
        // as Chromium 156 reports it.
        Profile {
            name: "Chromium WebGPU, hardware GPU",
            device_type: DeviceType::Other,
            backend: Backend::BrowserWebGpu,
            subgroups: None,
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 10,
            coop: &[],
        },
        Profile {
            name: "Chromium WebGPU, fallback adapter (SwiftShader)",
            device_type: DeviceType::Cpu,
            backend: Backend::BrowserWebGpu,
            subgroups: None,
            workgroup_bytes: 32 * KIB,
            invocations: 256,
            storage_buffers: 10,
            coop: &[],
        },
        // The same GPUs on devices that enabled cooperative matrices.
        Profile {
            name: "NVIDIA H200 with cooperative matrices",
            device_type: DeviceType::DiscreteGpu,
            backend: Backend::Vulkan,
            subgroups: Some((32, 32)),
            workgroup_bytes: 48 * KIB,
            invocations: 1024,
            storage_buffers: 1048576,
            coop: NVIDIA_COOP,
        },
        Profile {
            name: "Apple M2 with cooperative matrices",
            device_type: DeviceType::IntegratedGpu,
            backend: Backend::Metal,
            subgroups: Some((32, 32)),
            workgroup_bytes: 32 * KIB,
            invocations: 1024,
            storage_buffers: 31,
            coop: APPLE_COOP,
        },
    ]
}
