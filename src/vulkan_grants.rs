//! What a Vulkan driver grants that wgpu 30 does not check before asking,
//! and what its SPIR-V options depend on.
//!
//! wgpu reports `EXPERIMENTAL_COOPERATIVE_MATRIX` for any Vulkan adapter
//! that lists a usable matrix configuration, and a device requested with it
//! enables `VkPhysicalDeviceCooperativeMatrixFeaturesKHR::cooperativeMatrix`.
//! A driver may list configurations without granting that feature (lavapipe
//! 26.1 does at 4-lane subgroups, `LP_NATIVE_VECTOR_WIDTH=128`): device
//! creation then fails with `VK_ERROR_FEATURE_NOT_PRESENT`, which wgpu-hal
//! turns into a panic. The crate asks the driver first.

/// Whether `adapter`'s driver grants the cooperative matrices wgpu reports
/// for it. Only Vulkan can differ; every other adapter, and a Vulkan
/// instance too old to be asked (before 1.1), is taken at wgpu's word.
#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
pub(crate) fn grants_cooperative_matrices(adapter: &wgpu::Adapter) -> bool {
    use ash::vk;
    // SAFETY: the hal adapter is only read, while `adapter` keeps it alive.
    let Some(hal) = (unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }) else {
        return true;
    };
    let instance = hal.shared_instance();
    if instance.instance_api_version() < vk::API_VERSION_1_1 {
        return true;
    }
    let mut cooperative = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
    let mut features = vk::PhysicalDeviceFeatures2::default().push_next(&mut cooperative);
    // SAFETY: a 1.1 instance has vkGetPhysicalDeviceFeatures2; the physical
    // device is the instance's; the chained struct is the extension's,
    // which wgpu saw listed before reporting the feature.
    unsafe {
        instance
            .raw_instance()
            .get_physical_device_features2(hal.raw_physical_device(), &mut features)
    };
    cooperative.cooperative_matrix == vk::TRUE
}

/// Off wgpu's Vulkan platforms there is no driver to ask.
#[cfg(not(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
)))]
pub(crate) fn grants_cooperative_matrices(_adapter: &wgpu::Adapter) -> bool {
    true
}

/// The SPIR-V target of `device`'s Vulkan driver (its Vulkan version and
/// robust buffer access 2, which wgpu enables where offered); `None` off
/// Vulkan.
#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
pub(crate) fn spirv_target(device: &wgpu::Device) -> Option<crate::spirv::SpirvTarget> {
    use ash::vk;
    // SAFETY: the hal device is only read, while `device` keeps it alive.
    let hal = unsafe { device.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance();
    let raw = instance.raw_instance();
    let physical = hal.raw_physical_device();
    // SAFETY: the physical device is the instance's.
    let properties = unsafe { raw.get_physical_device_properties(physical) };
    let api = properties.api_version.min(instance.instance_api_version());
    let mut robustness = vk::PhysicalDeviceRobustness2FeaturesEXT::default();
    if instance.instance_api_version() >= vk::API_VERSION_1_1 {
        let mut features = vk::PhysicalDeviceFeatures2::default().push_next(&mut robustness);
        // SAFETY: a 1.1 instance has vkGetPhysicalDeviceFeatures2; the
        // robustness struct reads as false where its extension is absent.
        unsafe { raw.get_physical_device_features2(physical, &mut features) };
    }
    Some(crate::spirv::SpirvTarget::for_vulkan(
        api,
        robustness.robust_buffer_access2 == vk::TRUE,
    ))
}

/// Off wgpu's Vulkan platforms there is no driver to ask.
#[cfg(not(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
)))]
pub(crate) fn spirv_target(_device: &wgpu::Device) -> Option<crate::spirv::SpirvTarget> {
    None
}
